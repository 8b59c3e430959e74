"""`qdqc check`: lint a Q/DQ graph against TensorRT's explicit-quantization rules (TensorRT developer guide,
"Working with Quantized Types"; onnx-tensorrt's QuantizeLinear/DequantizeLinear importer)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from . import ir, quant
from .patterns.blocks import match_layer_norm
from .carried import encoder_layers


@dataclass(frozen=True)
class Violation:
    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.node}: [{self.rule}] {self.message}"


def check_graph(graph: gs.Graph) -> list[Violation]:
    found: list[Violation] = []
    opset = graph.opset
    if opset < ir.MIN_OPSET:
        found.append(Violation("opset", "<model>", f"opset {opset} < {ir.MIN_OPSET}: per-channel axis needs opset 13"))
    for node in graph.nodes:
        if node.op in ir.QDQ_OPS:
            found.extend(_check_qdq(node))
    found.extend(_check_float_regions(graph))
    return found


def _check_qdq(node: gs.Node) -> list[Violation]:
    out: list[Violation] = []

    def bad(rule: str, message: str):
        out.append(Violation(rule, ir.label(node), message))

    scale = ir.constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if scale is None:
        bad("scale-constant", "scale is not a constant")
        return out
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        bad("scale-positive", f"scale must be positive and finite (min {np.min(scale):g})")
    zero = ir.constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    if zero is None:
        bad("int8-type", "no zero point: the quantized type defaults to UINT8, TensorRT wants INT8")
    else:
        if zero.dtype != np.int8:
            bad("int8-type", f"zero point is {zero.dtype}, TensorRT wants int8")
        if np.any(zero != 0):
            bad("zero-point", "zero point must be all zeros (TensorRT is symmetric only)")
    if node.op == "DequantizeLinear":
        stored = ir.constant(node.inputs[0])
        if stored is not None and stored.dtype != np.int8:
            bad("int8-type", f"dequantizes a {stored.dtype} constant, TensorRT wants int8")
    axis = node.attrs.get("axis")
    if scale.size > 1:
        weight = _quantized_constant(node)
        if weight is None:
            bad("per-channel-activation", "per-channel scale on an activation (only constant weights may be per-channel)")
        else:
            dim = weight.shape[quant.channel_axis(node.attrs, scale.size) % weight.ndim]
            if scale.size != dim:
                bad("per-channel-length", f"{scale.size} scales for axis {axis} of length {dim}")
    elif axis is not None:
        bad("axis-on-per-tensor", "per-tensor scale with an axis attribute (TensorRT rejects it)")
    if node.op == "QuantizeLinear" and not ir.is_constant(node.inputs[0]):
        readers = sorted({user.op for user in node.outputs[0].outputs})
        if readers != ["DequantizeLinear"]:
            bad("q-without-dq", f"activation quantizer feeds {readers or 'nothing'}, not only a DequantizeLinear")
    return out


def _quantized_constant(node: gs.Node) -> np.ndarray | None:
    value = ir.constant(node.inputs[0])
    if value is not None or node.op == "QuantizeLinear":
        return value
    q = ir.producer(node.inputs[0])
    return ir.constant(q.inputs[0]) if q is not None and q.op == "QuantizeLinear" else None


def _check_float_regions(graph: gs.Graph) -> list[Violation]:
    """No Q/DQ between the nodes of a LayerNorm or GELU (they must run in float)."""
    regions: list[tuple[tuple[gs.Node, ...], str, str]] = []
    for tensor in graph.tensors().values():
        if any(n.op in ("ReduceMean", "LayerNormalization") for n in tensor.outputs):
            norm = match_layer_norm(tensor)
            if norm is not None and norm.kind == "decomposed":
                regions.append((norm.nodes, "LayerNorm", norm.output))
    for layer in encoder_layers(graph).layers:   # the carried plan, or matched without one
        if layer.activation is not None:
            regions.append((layer.activation.nodes, "GELU", layer.activation.output))
    found = []
    for members, kind, output in regions:
        internal = {t.name for member in members for t in member.outputs} - {output}
        for node in graph.nodes:
            if node.op == "QuantizeLinear" and node.inputs[0].name in internal:
                found.append(Violation("float-region", ir.label(node),
                                       f"quantizes '{node.inputs[0].name}' inside a {kind} (keep it in float)"))
    return found

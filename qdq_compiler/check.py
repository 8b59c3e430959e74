"""`qdqc check`: lint a Q/DQ graph against TensorRT's explicit-quantization rules (TensorRT developer guide,
"Working with Quantized Types"; onnx-tensorrt's QuantizeLinear/DequantizeLinear importer), and its
float types: a strongly typed build (and onnxruntime's loader) takes each node's types as written, so
an FP16 tensor meeting an FP32 one (ONNX operator schemas: one type T for all inputs) is an error there."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
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
    found.extend(check_types(graph))
    return found


FLOATS = frozenset({np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)})
# ops whose listed inputs share one type T (ONNX schemas); None: every input
SAME_TYPE_INPUTS = {"Add": None, "Sub": None, "Mul": None, "Div": None, "MatMul": None, "Gemm": None, "Sum": None,
                    "Max": None, "Min": None, "Mean": None, "Concat": None, "Equal": None, "Less": None,
                    "Greater": None, "LayerNormalization": None, "Where": (1, 2)}
# ops whose first output has the type of their first float input
TYPE_PRESERVING = frozenset({"Add", "Sub", "Mul", "Div", "MatMul", "Gemm", "Sum", "Max", "Min", "Mean", "Concat",
                             "LayerNormalization", "Where", "Erf", "Tanh", "Sqrt", "Relu", "Gelu", "Sigmoid", "Softmax",
                             "Neg", "Abs", "Exp", "Log", "Reciprocal", "Pow", "ReduceMean", "ReduceSum", "Transpose",
                             "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice", "Gather", "Expand",
                             "Split", "Dropout"})


def _dtype(tensor: gs.Tensor) -> np.dtype | None:
    value = ir.constant(tensor)
    if value is not None:
        return value.dtype
    return np.dtype(tensor.dtype) if isinstance(tensor, gs.Variable) and tensor.dtype is not None else None


def check_types(graph: gs.Graph) -> list[Violation]:
    """Each node's float types as its schema wants them: one T across the inputs that share it, outputs
    declared with the type the node computes, Q/DQ scales of the type they (de)quantize to."""
    found: list[Violation] = []

    def bad(node: gs.Node, message: str):
        found.append(Violation("types", ir.label(node), message))

    for node in graph.nodes:
        declared = _dtype(node.outputs[0]) if node.outputs and isinstance(node.outputs[0], gs.Variable) \
            and node.outputs[0].dtype is not None else None
        if node.op == "Constant":
            value = ir.constant(node.outputs[0])
            if value is not None and declared is not None and value.dtype != np.dtype(node.outputs[0].dtype):
                bad(node, f"Constant holds {value.dtype} but '{node.outputs[0].name}' is declared "
                          f"{np.dtype(node.outputs[0].dtype)}")
            continue
        if node.op == "Cast":
            to = onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"])
            if declared is not None and declared != to:
                bad(node, f"casts to {to} but '{node.outputs[0].name}' is declared {declared}")
            continue
        if node.op in ir.QDQ_OPS:
            scale = _dtype(node.inputs[1]) if len(node.inputs) > 1 else None
            if scale is None:
                continue
            if node.op == "DequantizeLinear" and declared is not None and declared != scale:
                bad(node, f"scale is {scale}, so it computes {scale}, but '{node.outputs[0].name}' is declared {declared}")
            if node.op == "QuantizeLinear":
                source = _dtype(node.inputs[0])
                if graph.opset < 19 and scale != np.float32:
                    bad(node, f"scale is {scale}: before opset 19 Q/DQ scales must be float32")
                elif source is not None and source in FLOATS and source != scale:
                    bad(node, f"quantizes a {source} tensor '{node.inputs[0].name}' with a {scale} scale")
            continue
        if node.op in SAME_TYPE_INPUTS:
            positions = SAME_TYPE_INPUTS[node.op] or range(len(node.inputs))
            kinds = {}
            for index in positions:
                if index < len(node.inputs) and node.inputs[index].name:
                    kind = _dtype(node.inputs[index])
                    if kind in FLOATS:
                        kinds.setdefault(kind, node.inputs[index].name)
            if len(kinds) > 1:
                bad(node, "reads " + " and ".join(f"{k} '{name}'" for k, name in kinds.items()) +
                    f": {node.op} takes one float type")
                continue
        if node.op in TYPE_PRESERVING and declared in FLOATS:
            source = next((k for k in map(_dtype, node.inputs[:3]) if k in FLOATS), None)
            if source is not None and source != declared:
                bad(node, f"computes {source} but '{node.outputs[0].name}' is declared {declared}")
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

"""The float part of a Q/DQ graph in FP16 for TensorRT's strongly typed builds, with FP32 islands.

TensorRT 10.12+/11 builds the types the ONNX carries (its docs: "Use explicit quantization with
Strong Typing"; the FP16/INT8 builder flags are deprecated in 10.12 and gone in 11): everything that is
not INT8 runs in the precision its tensors have. LayerNorm stays FP32 by default (FP16
LayerNorm's variance overflows in BERT); `keep_fp32` can add Softmax and GELU. Casts
are inserted at every island boundary and at the graph outputs, which keep their FP32 type.
Q/DQ scales become FP16 (opset 19), so a DequantizeLinear produces FP16 directly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qdq_compiler import ir
from qdq_compiler.patterns.blocks import match_layer_norm
from qdq_compiler.carried import encoder_layers
from qdq_compiler.lower import DEFAULT_FP32
from qdq_compiler.pipeline import PassContext, PassResult, register

FP16_MAX = 65504.0
QDQ_FP16_OPSET = 19


def fp32_islands(graph: gs.Graph, keep: frozenset[str]) -> set[int]:
    """The nodes that stay FP32 (by identity: `id(node)`): LayerNorm, and Softmax / Gelu when asked."""
    nodes: set[int] = set()
    if "LayerNorm" in keep:
        nodes |= {id(n) for n in graph.nodes if n.op == "LayerNormalization"}
        for tensor in graph.tensors().values():
            if any(n.op == "ReduceMean" for n in tensor.outputs):
                norm = match_layer_norm(tensor)
                if norm is not None:
                    nodes |= {id(n) for n in norm.nodes}
    if "Softmax" in keep:
        nodes |= {id(n) for n in graph.nodes if n.op == "Softmax"}
    if "Gelu" in keep:
        nodes |= {id(n) for n in graph.nodes if n.op == "Gelu"}
        for layer in encoder_layers(graph).layers:   # the carried plan, or matched without one
            if layer.activation is not None:
                nodes |= {id(n) for n in layer.activation.nodes}
    return nodes


def _is_float(tensor: gs.Tensor, dtype) -> bool:
    return tensor.dtype is not None and np.dtype(tensor.dtype) == np.dtype(dtype)


class Retyper:
    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.names = ir.Names(graph)
        self.casts: dict[tuple[str, str], gs.Variable] = {}
        self.halves: dict[str, gs.Constant] = {}
        self.inserted = 0

    def cast(self, tensor: gs.Tensor, dtype) -> gs.Variable:
        key = (tensor.name, np.dtype(dtype).name)
        if key not in self.casts:
            out = gs.Variable(self.names.fresh(f"{tensor.name}::{np.dtype(dtype).name}"), dtype=dtype, shape=tensor.shape)
            to = onnx.TensorProto.FLOAT16 if np.dtype(dtype) == np.float16 else onnx.TensorProto.FLOAT
            self.graph.nodes.append(gs.Node("Cast", self.names.fresh(f"{tensor.name}::cast"), {"to": to},
                                            inputs=[tensor], outputs=[out]))
            self.casts[key] = out
            self.inserted += 1
        return self.casts[key]

    def half(self, constant: gs.Constant) -> gs.Constant:
        if constant.name not in self.halves:
            values = np.asarray(np.clip(constant.values, -FP16_MAX, FP16_MAX), dtype=np.float16)
            self.halves[constant.name] = gs.Constant(self.names.fresh(f"{constant.name}::fp16"), values)
        return self.halves[constant.name]


@dataclass(frozen=True)
class Fp16Settings:
    keep_fp32: frozenset[str] = DEFAULT_FP32   # of LayerNorm, Softmax, Gelu

    @classmethod
    def from_config(cls, config) -> "Fp16Settings":
        return cls(frozenset(config.keep_fp32))


@register("to-fp16", settings=Fp16Settings)
def to_fp16(graph: gs.Graph, ctx: PassContext) -> PassResult:
    upgraded = graph.opset < QDQ_FP16_OPSET
    if upgraded:
        ir.replace_contents(graph, ir.upgrade_opset(graph, QDQ_FP16_OPSET))
    keep = fp32_islands(graph, ctx.settings(Fp16Settings).keep_fp32)
    retype = Retyper(graph)
    converted = 0
    for node in list(graph.nodes):
        if id(node) in keep:
            for index, tensor in enumerate(node.inputs):
                if isinstance(tensor, gs.Variable) and _is_float(tensor, np.float16):
                    node.inputs[index] = retype.cast(tensor, np.float32)
            continue
        touched = False
        for index, tensor in enumerate(node.inputs):
            if not _is_float(tensor, np.float32):
                continue
            if isinstance(tensor, gs.Constant):
                node.inputs[index] = retype.half(tensor)
            elif ir.producer(tensor) is None or id(ir.producer(tensor)) in keep:
                node.inputs[index] = retype.cast(tensor, np.float16)   # a graph input or an FP32 island
            touched = True
        for tensor in node.outputs:
            if _is_float(tensor, np.float32):
                tensor.dtype = np.float16
                touched = True
        if node.op == "Cast" and node.attrs.get("to") == onnx.TensorProto.FLOAT:
            node.attrs["to"] = onnx.TensorProto.FLOAT16
            touched = True
        if node.op == "ConstantOfShape" and isinstance(node.attrs.get("value"), gs.Constant) \
                and node.attrs["value"].values.dtype == np.float32:
            node.attrs["value"] = retype.half(node.attrs["value"])
            touched = True
        converted += touched
    # graph outputs keep their FP32 type: the FP16 result is cast back under the public name
    for position, tensor in enumerate(list(graph.outputs)):
        if _is_float(tensor, np.float16):
            public = tensor.name
            tensor.name = retype.names.fresh(f"{public}::fp16")
            restored = retype.cast(tensor, np.float32)
            restored.name = public
            graph.outputs[position] = restored
    retyped = converted > 0 or retype.inserted > 0 or bool(retype.halves)
    if retyped:
        ir.cleanup(graph)
    return PassResult(upgraded or retyped, {"fp16_nodes": converted, "fp32_nodes": len(keep), "casts_inserted": retype.inserted,
                             "opset": graph.opset})

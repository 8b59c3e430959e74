"""Quantizer parameters as initializers: what a QAT export computes, lowering reads as constants.

torch's exporter writes a fake-quantizer's scale and zero point as `Constant` nodes, or as a small
subgraph computing them (amax clipped, divided by 127); ModelOpt's exports hold them in `Constant`
nodes too. Every lowering reads scales as constants, and TensorRT's FP16 conversion must convert them
(a `Constant` node left FP32 beside an FP16 graph breaks both onnxruntime's and TensorRT's type
checks), so the lowering pipelines begin here: constant subgraphs folded (Q/DQ left alone), `Constant`
nodes made initializers. A graph whose quantizer parameters are already initializers is untouched.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from qdq_compiler import ir
from qdq_compiler.errors import ModelError
from qdq_compiler.pipeline import PassContext, PassResult, register

from .canonicalize import fold_constants


def _parameters(node: gs.Node) -> list[gs.Tensor]:
    return [t for t in node.inputs[1:3] if t.name]


def _pending(graph: gs.Graph) -> bool:
    return any(n.op == "Constant" for n in graph.nodes) or any(
        not isinstance(t, gs.Constant) for n in graph.nodes if n.op in ir.QDQ_OPS for t in _parameters(n))


@register("qdq-constants")
def qdq_constants(graph: gs.Graph, ctx: PassContext) -> PassResult:
    if not _pending(graph):
        return PassResult(False, {"constant_nodes_inlined": 0})
    before = sum(n.op == "Constant" for n in graph.nodes)
    ir.toposort(graph)
    fold_constants(graph)
    for node in [n for n in graph.nodes if n.op == "Constant"]:
        value = ir.constant(node.outputs[0])
        if value is not None and node.outputs[0] not in graph.outputs:
            ir.inline_constant(graph, node.outputs[0], value)
    for node in graph.nodes:
        if node.op in ir.QDQ_OPS:
            computed = next((t for t in _parameters(node) if not isinstance(t, gs.Constant)), None)
            if computed is not None:
                raise ModelError(f"{ir.describe(node)}: its scale or zero point '{computed.name}' is computed from "
                                 "the model's inputs, not a constant (dynamic quantization cannot be lowered)")
    ir.cleanup(graph)
    return PassResult(True, {"constant_nodes_inlined": before - sum(n.op == "Constant" for n in graph.nodes)})

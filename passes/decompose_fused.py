"""Decompose onnxruntime's fused transformer ops (com.microsoft) into standard ONNX.

A model saved by onnxruntime's transformer optimizer holds Attention,
SkipLayerNormalization, BiasGelu, EmbedLayerNormalization... nodes: the encoder
matcher cannot see the GEMMs inside them and TensorRT cannot parse them. Each one
`qdq_compiler.plugins.onnxruntime_fused` knows is replaced by the standard ops it
computes (same numerics as onnxruntime running the fused node); any other
com.microsoft node stays and is reported in one line. A known op using a feature
the restatement does not cover (past state, packed QKV, 4-D masks) is an error.
"""
from __future__ import annotations

import warnings
from collections import Counter

import onnx_graphsurgeon as gs

from qdq_compiler import ir
from qdq_compiler.errors import ModelError, QdqcNote
from qdq_compiler.pipeline import Diagnostic, PassContext, PassResult, register
from qdq_compiler.plugins import onnxruntime_fused as fused


def fused_nodes(graph: gs.Graph) -> list[gs.Node]:
    return [n for n in graph.nodes if n.domain == fused.DOMAIN]


@register("decompose-fused")
def decompose_fused(graph: gs.Graph, ctx: PassContext) -> PassResult:
    found = fused_nodes(graph)
    if not found:
        return PassResult(False, {"decomposed": 0})
    ir.toposort(graph)
    names = ir.Names(graph)
    cache: dict = {}
    done: Counter = Counter()
    kept: Counter = Counter()
    created: list[gs.Node] = []
    for node in fused_nodes(graph):
        if node.op not in fused.DECOMPOSERS:
            kept[node.op] += 1
            continue
        try:
            created += fused.decompose(graph, node, names, cache)
        except fused.Unsupported as exc:
            raise ModelError(f"{ir.describe(node)} (com.microsoft): {exc}") from None
        done[node.op] += 1
    diagnostics = ()
    if kept:
        listed = ", ".join(f"{op} x{count}" for op, count in sorted(kept.items()))
        message = (f"com.microsoft ops left as they are (no standard-ONNX restatement): {listed}; "
                   "they stay unquantized and TensorRT cannot parse them")
        diagnostics = (Diagnostic("warning", message),)
        warnings.warn(message, QdqcNote, stacklevel=2)   # the CLI prints it as one `qdqc: note:` line
    else:
        graph.import_domains = [d for d in (graph.import_domains or []) if d.domain != fused.DOMAIN] or None
    if done:
        ir.cleanup(graph)
        ir.annotate_shapes(graph)
        # past an op shape inference does not know, a made tensor keeps no type: a typed value_info
        # without a shape is refused by onnx.checker
        outputs = {id(t) for t in graph.outputs}
        for made in created:
            for tensor in made.outputs:
                if tensor.shape is None and id(tensor) not in outputs:
                    tensor.dtype = None
    return PassResult(bool(done), {"decomposed": sum(done.values()), "by_op": dict(sorted(done.items())),
                                   "kept": dict(sorted(kept.items()))}, diagnostics)

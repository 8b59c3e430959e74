"""Softmax NaN guards go, on the TensorRT target, so its fused INT8 attention can match.

torch's scaled-dot-product-attention export guards the attention probabilities with
Where(IsNaN(p), 0, p). TensorRT fuses Q·K^T → softmax → ·V with their Q/DQ into one INT8 kernel
only when nothing sits between the softmax and its quantizer: with the guard, TensorRT-RTX 1.7
builds MiniLM's six attentions as separate kernels (0/6 fused); without it, 6/6. A softmax row is
NaN only when every score in it is −inf or NaN; BERT masks padding with a finite −3.4e38 (−65504
in the FP16 graph), and a row always has its own token, so the guard never fires on such models.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from qdq_compiler import ir
from qdq_compiler.graph import is_nan_guard, replace_all_uses
from qdq_compiler.pipeline import PassContext, PassResult, register


@register("drop-nan-guard")
def drop_nan_guard(graph: gs.Graph, ctx: PassContext) -> PassResult:
    dropped = 0
    for where in list(graph.nodes):
        guarded = where.inputs[2] if where.op == "Where" and len(where.inputs) == 3 else None
        source = ir.producer(guarded) if guarded is not None else None
        if source is None or source.op != "Softmax" or not is_nan_guard(where, 2):
            continue
        test = ir.producer(where.inputs[0])
        if test.inputs[0] is not guarded:
            continue
        result = where.outputs[0]
        if result in graph.outputs:
            continue
        replace_all_uses(result, guarded)
        where.outputs.clear()
        dropped += 1
    if dropped:
        graph.cleanup()
    return PassResult(dropped > 0, {"nan_guards_dropped": dropped})

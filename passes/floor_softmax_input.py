"""Softmax inputs floored at (row max − 80): no denormals in onnxruntime's exp (onnxruntime target).

BERT masks padded keys by adding −3.4e38 (or −1e4) to their attention scores. onnxruntime's
Softmax then computes exp(x − max) far below −87.3, where the result is denormal or underflows;
MLAS's exp builds it through denormal arithmetic, which x86 runs at a fraction of the normal speed
unless the session flushes denormals (`session.set_denormal_as_zero`, off by default). On MiniLM's
attention scores (8×12×128×128, a quarter of the keys real) that makes Softmax 8.7 ms instead of
2.2 ms with the floor (`python tools/bench_kernels.py`).

    Softmax(x)  ->  Softmax(Max(x, ReduceMax(x) − 80))

Every element within 80 of its row's max is unchanged; one further below becomes exactly
max − 80, so its probability is e^-80 / Σ ≤ 1.8e-35 instead of (almost) 0. The denominator moves by
less than n·1.8e-35, under float32's resolution of a sum ≥ 1 for any n below 10^27: the other
probabilities are bit-identical, and a quantized softmax output (ft1 quantizes it) is too, since
1.8e-35 rounds to level 0 at any scale the calibration can choose.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qdq_compiler import ir
from qdq_compiler.pipeline import PassContext, PassResult, register

from .clamp_attention_mask import clamped_already
from .mask_key_columns import masked_in_gemm

FLOOR = 80.0   # e^-80 ≈ 1.8e-35: normal in float32 (the smallest normal is 1.2e-38, e^-87.3)


def _last_axis(softmax: gs.Node) -> bool:
    axis = softmax.attrs.get("axis", -1)
    rank = len(softmax.inputs[0].shape) if softmax.inputs[0].shape is not None else None
    return axis == -1 or (rank is not None and axis == rank - 1)


def _floored_already(softmax: gs.Node) -> bool:
    source = ir.producer(softmax.inputs[0])
    return source is not None and source.op == "Max" and "::softmax_floor" in source.name


@register("floor-softmax-input")
def floor_softmax_input(graph: gs.Graph, ctx: PassContext) -> PassResult:
    names = ir.Names(graph)
    floored = 0
    offset = None
    for softmax in [n for n in graph.nodes if n.op == "Softmax"]:
        if (not _last_axis(softmax) or _floored_already(softmax) or clamped_already(softmax)
                or masked_in_gemm(softmax) or graph.opset < 13):
            continue
        x = softmax.inputs[0]
        if offset is None:
            offset = gs.Constant(names.fresh("softmax_floor_offset"), np.array(-FLOOR, np.float32))
        row_max = gs.Variable(names.fresh(f"{x.name}::row_max"), dtype=np.float32)
        floor = gs.Variable(names.fresh(f"{x.name}::floor"), dtype=np.float32)
        kept = gs.Variable(names.fresh(f"{x.name}::floored"), dtype=np.float32, shape=x.shape)
        if graph.opset >= 18:   # axes became an input in opset 18
            axes = gs.Constant(names.fresh(f"{x.name}::row_axis"), np.array([-1], np.int64))
            reduce = gs.Node("ReduceMax", names.fresh(f"{softmax.name}::row_max"), {"keepdims": 1},
                             inputs=[x, axes], outputs=[row_max])
        else:
            reduce = gs.Node("ReduceMax", names.fresh(f"{softmax.name}::row_max"), {"axes": [-1], "keepdims": 1},
                             inputs=[x], outputs=[row_max])
        graph.nodes += [reduce,
                        gs.Node("Add", names.fresh(f"{softmax.name}::floor_value"), inputs=[row_max, offset],
                                outputs=[floor]),
                        gs.Node("Max", names.fresh(f"{softmax.name}::softmax_floor"), inputs=[x, floor],
                                outputs=[kept])]
        softmax.inputs[0] = kept
        floored += 1
    if floored:
        ir.toposort(graph)
    return PassResult(floored > 0, {"softmaxes_floored": floored})

"""Pre-quantize weights: every Q(W) -> DQ becomes an INT8 initializer -> DQ.

No FP32 copy of a quantized weight is left in the model (a quarter of the size).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qdq_compiler import ir, quant
from qdq_compiler.pipeline import PassContext, PassResult, register


def weight_pairs(graph: gs.Graph) -> list[tuple[gs.Node, gs.Node]]:
    """(Q, DQ) pairs whose Q reads a constant."""
    pairs = []
    for q in graph.nodes:
        if q.op == "QuantizeLinear" and ir.is_constant(q.inputs[0]):
            pairs += [(q, dq) for dq in q.outputs[0].outputs if dq.op == "DequantizeLinear"]
    return pairs


def quantized_weight(q: gs.Node) -> np.ndarray:
    """The INT8 values QuantizeLinear would produce for this constant."""
    axis = quant.channel_axis(q.attrs, ir.constant(q.inputs[1]).size)
    return quant.quantize(ir.constant(q.inputs[0]), ir.constant(q.inputs[1]), axis)


@register("fold-weight-quantizers")
def fold_weight_quantizers(graph: gs.Graph, ctx: PassContext) -> PassResult:
    names = ir.Names(graph)
    folded = saved = 0
    cache: dict[str, gs.Constant] = {}
    for q, dq in weight_pairs(graph):
        weight = q.inputs[0]
        if weight.name not in cache:
            cache[weight.name] = gs.Constant(names.fresh(f"{weight.name}::int8"), quantized_weight(q))
            saved += ir.constant(weight).nbytes - cache[weight.name].values.nbytes
        dq.inputs[0] = cache[weight.name]
        folded += 1
    if folded:
        ir.cleanup(graph)
    return PassResult(folded > 0, {"weights_folded": folded, "bytes_saved": int(saved)})

"""Store what insert decided in the model (qdq_compiler/carried.py), for the stages after it."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from qdq_compiler import carried, ir
from qdq_compiler.pipeline import PassContext, PassResult, register


@register("record-plan", requires=("encoder", "plan", "qdq"), provides=("carried-plan",))
def record_plan(graph: gs.Graph, ctx: PassContext) -> PassResult:
    match = ctx.analyses["encoder"]
    record = carried.record(match, ctx.analyses["plan"], match.family)
    before = ir.metadata(graph).get(carried.PLAN_KEY)
    carried.store(graph, record)
    return PassResult(ir.metadata(graph)[carried.PLAN_KEY] != before,
                      {"family": record.family, "layers": len(record.layers), "sites": len(record.sites)})

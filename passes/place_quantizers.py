"""Decide the quantizers for the configured mode (analysis only)."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from qdq_compiler.config import InsertConfig
from qdq_compiler.placement import TensorKind, plan_quantizers
from qdq_compiler.pipeline import Diagnostic, PassContext, PassResult, register


@register("place-quantizers", requires=("encoder",), provides=("plan",), settings=InsertConfig)
def place_quantizers(graph: gs.Graph, ctx: PassContext) -> PassResult:
    plan = plan_quantizers(graph, ctx.analyses["encoder"], ctx.settings(InsertConfig))
    ctx.analyses["plan"] = plan
    diagnostics = []
    if plan.fallback:
        diagnostics.append(Diagnostic("warning", f"no BERT encoder layer matched: mode '{plan.mode.value}' "
                                      "fell back to 'generic' (every MatMul/Gemm/Conv input quantized)"))
    diagnostics += [Diagnostic("info", f"site {site} skipped: {why}") for site, why in plan.skipped]
    weights = sum(q.kind is TensorKind.WEIGHT for q in plan.quantizers)
    return PassResult(False, {"quantizers": len(plan.quantizers), "weights": weights,
                              "activations": len(plan.quantizers) - weights,
                              "already_quantized_sites": len(plan.existing),
                              "skipped_sites": len(plan.skipped), "fallback_generic": plan.fallback},
                      tuple(diagnostics))

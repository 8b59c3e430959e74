"""Round INT8 weights with GPTQ on the calibration activations (qdq_compiler/weight_rounding.py)."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from qdq_compiler.calibrate import weight_bits
from qdq_compiler.pipeline import Diagnostic, PassContext, PassResult, register
from qdq_compiler.quant import weight_qmax
from qdq_compiler.weight_rounding import gptq_targets, round_weights


@register("round-weights-gptq", requires=("hessians", "qdq"))
def round_weights_gptq(graph: gs.Graph, ctx: PassContext) -> PassResult:
    targets = gptq_targets(graph)
    rounded, skipped = round_weights(graph, ctx.analyses["hessians"], targets, weight_qmax(weight_bits(graph)))
    diagnostics = () if not skipped else (Diagnostic("warning", f"{skipped} weight(s) kept nearest rounding: their "
                                                                "GEMM inputs are not token rows of their width"),)
    return PassResult(rounded > 0, {"weights_rounded": rounded, "linear_layers": len(targets), "skipped": skipped},
                      diagnostics)

"""Find the encoder layers with the registered layer patterns (analysis only: the graph is not touched).

Named match-bert for its history; every family in qdq_compiler/patterns/ is tried."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from qdq_compiler import ir
from qdq_compiler.patterns import match_encoder
from qdq_compiler.pipeline import Diagnostic, PassContext, PassResult, register


@register("match-bert", provides=("encoder",))
def match_bert(graph: gs.Graph, ctx: PassContext) -> PassResult:
    match = match_encoder(graph)
    ctx.analyses["encoder"] = match
    diagnostics = tuple(Diagnostic("info", f"attention at {ir.describe(r.anchor)} rejected: {r.reason}", ir.label(r.anchor))
                        for r in match.rejections)
    layers = match.layers
    return PassResult(False, {"layers": len(layers), "family": match.family,
                              "fused_qkv_layers": sum(layer.fused_qkv for layer in layers),
                              "rejected_attention_blocks": len(match.rejections),
                              "unmatched_gemms": len(match.unmatched_gemms)}, diagnostics)

"""Split a Gemm's bias into its own Add when the mode quantizes GEMM outputs before the bias.

FasterTransformer's ft2/ft3 `aftergemm` quantizer reads x·W before the bias; a
Gemm that adds C itself has no such tensor. Gemm(A, B, C) = Gemm(A, B) + C for
alpha = beta = 1 and a constant C broadcast over rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from qdq_compiler import ir
from qdq_compiler.config import SiteKind
from qdq_compiler.pipeline import PassContext, PassResult, register


@dataclass(frozen=True)
class SplitGemmBiasSettings:
    split: bool = False    # true when the mode quantizes GEMM outputs before the bias (ft2, ft3)

    @classmethod
    def from_config(cls, config) -> "SplitGemmBiasSettings":
        return cls(SiteKind.GEMM_OUTPUT in config.sites)


@register("split-gemm-bias", settings=SplitGemmBiasSettings)
def split_gemm_bias(graph: gs.Graph, ctx: PassContext) -> PassResult:
    if not ctx.settings(SplitGemmBiasSettings).split:
        return PassResult(False, {"gemms_split": 0})
    names = ir.Names(graph)
    split = 0
    for node in list(graph.nodes):
        if node.op != "Gemm" or len(node.inputs) < 3 or not node.inputs[2].name:
            continue
        bias = ir.constant(node.inputs[2])
        if bias is None or bias.ndim > 1 or node.attrs.get("alpha", 1.0) != 1.0 or node.attrs.get("beta", 1.0) != 1.0:
            continue
        output = node.outputs[0]
        product = gs.Variable(names.fresh(f"{node.name}::product"), dtype=output.dtype)
        bias_const = node.inputs[2]
        del node.inputs[2]
        node.outputs[0] = product
        add = gs.Node("Add", names.fresh(f"{node.name}::bias"), inputs=[product, bias_const], outputs=[output])
        graph.nodes.append(add)
        split += 1
    if split:
        ir.toposort(graph)
    return PassResult(split > 0, {"gemms_split": split})

"""Smooth the attention-output GEMM input through the value projection (qdq_compiler/smooth.py).

The context is quantized before the head-merging Reshape, so no per-channel Mul can sit between its
quantizer and the GEMM; instead V's projection output columns and bias are divided by s (softmax·V
keeps each channel) and the output GEMM's input rows multiplied by s: exact in float, no runtime op.
"""
from __future__ import annotations

import json

import numpy as np
import onnx_graphsurgeon as gs

from qdq_compiler import ir
from qdq_compiler.calibrate import refresh_weight_scales
from qdq_compiler.pipeline import PassContext, PassResult, register
from qdq_compiler.smooth import FOLDED_KEY, SmoothConfig, reader_weight, smoothing_factors, value_bias, value_fold_sites


def _scaled(constant: gs.Constant, factors: np.ndarray, axis: int) -> None:
    shape = [1] * constant.values.ndim
    shape[axis] = len(factors)
    constant.values = (constant.values * factors.reshape(shape)).astype(constant.values.dtype)


@register("smooth-attention-output", requires=("channel_max", "qdq"), settings=SmoothConfig)
def smooth_attention_output(graph: gs.Graph, ctx: PassContext) -> PassResult:
    maxima: dict[str, np.ndarray] = ctx.analyses["channel_max"]
    alphas: dict[str, float] = ctx.analyses.get("alpha", {})
    folded, used = [], []
    for site in value_fold_sites(graph):
        if site.tensor not in maxima:
            continue
        weight, axis = reader_weight(site.reader)
        alpha = alphas.get(site.tensor, ctx.settings(SmoothConfig).alpha)
        factors = smoothing_factors(maxima[site.tensor], np.abs(weight.values).max(axis=1 - axis), alpha)
        _scaled(weight, factors, axis)
        _scaled(graph.tensors()[site.value.weight], 1.0 / factors, site.value.weight_axis)
        bias = value_bias(site.value)
        if bias is not None:
            _scaled(bias, 1.0 / factors, 0)
        folded.append(site.tensor)
        used.append(alpha)
    if folded:
        done = json.loads(ir.metadata(graph).get(FOLDED_KEY, "[]"))
        ir.metadata(graph)[FOLDED_KEY] = json.dumps(sorted(set(done) | set(folded)))
        refresh_weight_scales(graph)
    return PassResult(bool(folded), {"sites_folded": len(folded), "folded_alphas": sorted(set(used))})

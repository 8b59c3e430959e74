"""Apply SmoothQuant factors (qdq_compiler/smooth.py) from per-channel activation maxima, and OS+
shifts where measured: the GEMM branch computes (x − z)/s and each reader's bias takes z·W.

The bias keeps z·W of the float weight when the weight is later rounded: the INT8 GEMM then computes
Q((x − z)/s)·Q(sW) + b + z·W, whose weight-rounding error multiplies only the centred input. Following
the rounding (z·Q(W)) would multiply it by the whole input again (measured: 5× the error on a BERT
with offset channels)."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qdq_compiler import ir
from qdq_compiler.calibrate import refresh_weight_scales
from qdq_compiler.pipeline import Diagnostic, PassContext, PassResult, register
from qdq_compiler.smooth import SmoothConfig, fold_into_bias, reader_weight, smooth_sites, smoothing_factors


@register("smooth-gemm-inputs", requires=("channel_max", "qdq"), settings=SmoothConfig)
def smooth_gemm_inputs(graph: gs.Graph, ctx: PassContext) -> PassResult:
    maxima: dict[str, np.ndarray] = ctx.analyses["channel_max"]
    alphas: dict[str, float] = ctx.analyses.get("alpha", {})
    shifts: dict[str, np.ndarray] = ctx.analyses.get("channel_shift", {})
    names = ir.Names(graph)
    smoothed, shifted, diagnostics, used = 0, 0, [], []
    for site in smooth_sites(graph):
        if site.tensor not in maxima:
            continue
        weights = [reader_weight(reader) for reader in site.readers]
        rows = [np.abs(w.values).max(axis=1 - axis) for w, axis in weights]
        if len({len(r) for r in rows}) != 1 or len(rows[0]) != len(maxima[site.tensor]):
            diagnostics.append(Diagnostic("info", f"'{site.tensor}': channel counts disagree, not smoothed"))
            continue
        alpha = alphas.get(site.tensor, ctx.settings(SmoothConfig).alpha)
        factors = smoothing_factors(maxima[site.tensor], np.max(rows, axis=0), alpha)
        shift = shifts.get(site.tensor)
        if shift is not None:   # readers' biases take z·W of the float weights, before smoothing scales them
            for reader in site.readers:
                fold_into_bias(reader, shift)
        for weight, axis in weights:
            shape = [1, 1]
            shape[axis] = len(factors)
            weight.values = (weight.values * factors.reshape(shape)).astype(weight.values.dtype)
        q = site.quantizer
        source = q.inputs[0]
        smoothed_tensor = gs.Variable(names.fresh(f"{source.name}::smoothed"), dtype=source.dtype, shape=source.shape)
        inverse = gs.Constant(names.fresh(f"{source.name}::smooth_inverse"), (1.0 / factors).astype(np.float32))
        graph.nodes.append(gs.Node("Mul", names.fresh(f"{source.name}::smooth"), inputs=[source, inverse],
                                   outputs=[smoothed_tensor]))
        if shift is not None:
            centred = gs.Variable(names.fresh(f"{source.name}::centred"), dtype=source.dtype, shape=source.shape)
            offset = gs.Constant(names.fresh(f"{source.name}::shift_offset"), (shift / factors).astype(np.float32))
            graph.nodes.append(gs.Node("Sub", names.fresh(f"{source.name}::shift"), inputs=[smoothed_tensor, offset],
                                       outputs=[centred]))
            smoothed_tensor = centred
            shifted += 1
        q.inputs[0] = smoothed_tensor
        smoothed += 1
        used.append(alpha)
    if smoothed:
        refresh_weight_scales(graph)
        ir.toposort(graph)
    return PassResult(smoothed > 0, {"sites_smoothed": smoothed, "sites_shifted": shifted, "alphas": sorted(set(used))},
                      tuple(diagnostics))

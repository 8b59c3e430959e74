"""Weights whose int8 pairs fit x86's int16 pair sums: the integer GEMMs are exact on every CPU.

On x86 without VNNI, onnxruntime's and OpenVINO's uint8·int8 kernels (VPMADDUBSW) add the products
of each pair of adjacent weights along the reduction axis into a saturating int16, so a pair of
same-sign weights with |b0| + |b1| > 128 can overflow (`qdq_compiler.cpu`). This pass moves the
smaller member of each such pair toward zero until it fits; the larger one (a column's ±127, which
fixes its scale) and every other weight stay as they are. Measured on all-MiniLM-L6-v2 after
smoothing and GPTQ: a few hundredths of a percent of the weights move (README).

It runs at the end of calibration, so the fake-quant model already holds the fitted weights and every
lowering computes its function exactly; the onnxruntime and OpenVINO lowerings run it again for models
calibrated elsewhere (a QAT export's own weights). The VNNI form (`--isa vnni`) skips it.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qdq_compiler import ir, quant
from qdq_compiler.cpu import Isa, KernelSettings, fit_pairs
from qdq_compiler.pipeline import PassContext, PassResult, register

from .fold_weight_quantizers import quantized_weight


def weight_grid(gemm: gs.Node) -> tuple[gs.Node, int] | None:
    """(the Q of a constant float weight or the DQ of an int8 one, the weight's reduction axis) for a
    2-D GEMM weight reached through Transposes and DQ/Q only."""
    if gemm.op not in ("MatMul", "Gemm") or len(gemm.inputs) < 2:
        return None
    reduction = 1 if gemm.op == "Gemm" and gemm.attrs.get("transB", 0) else 0
    tensor = gemm.inputs[1]
    for _ in range(6):
        source = ir.producer(tensor)
        if source is None:
            return None
        if source.op == "Transpose" and list(source.attrs.get("perm", [1, 0])) == [1, 0]:
            reduction = 1 - reduction
        elif source.op == "QuantizeLinear" and ir.is_constant(source.inputs[0]):
            return (source, reduction) if ir.constant(source.inputs[0]).ndim == 2 else None
        elif source.op == "DequantizeLinear" and ir.is_constant(source.inputs[0]):
            stored = ir.constant(source.inputs[0])
            return (source, reduction) if stored.ndim == 2 and stored.dtype == np.int8 else None
        elif source.op != "DequantizeLinear":
            return None
        tensor = source.inputs[0]
    return None


def fit(node: gs.Node, reduction: int) -> int:
    """Fit the weight behind `node` (its Q or its int8 DQ) in place; how many integers moved."""
    if node.op == "DequantizeLinear":
        stored = ir.constant(node.inputs[0])
        fitted = fit_pairs(stored, reduction)
        moved = int(np.count_nonzero(fitted != stored))
        if moved:
            node.inputs[0].values = fitted
        return moved
    integers = quantized_weight(node)
    fitted = fit_pairs(integers, reduction)
    changed = fitted != integers
    moved = int(np.count_nonzero(changed))
    if moved:
        weight, scale = node.inputs[0], ir.constant(node.inputs[1])
        step = quant.along(scale, integers.ndim, quant.channel_axis(node.attrs, scale.size))
        grid = (fitted.astype(np.float32) * step).astype(weight.values.dtype)
        weight.values = np.where(changed, grid, weight.values)
    return moved


@register("fit-int16-pairs", settings=KernelSettings)
def fit_int16_pairs(graph: gs.Graph, ctx: PassContext) -> PassResult:
    if ctx.settings(KernelSettings).isa is Isa.VNNI:
        return PassResult(False, {"weights_fitted": 0, "values_moved": 0})
    seen: set[int] = set()
    weights = moved = 0
    for gemm in graph.nodes:
        found = weight_grid(gemm)
        if found is None or id(found[0].inputs[0]) in seen:
            continue
        seen.add(id(found[0].inputs[0]))
        count = fit(*found)
        weights += count > 0
        moved += count
    return PassResult(moved > 0, {"weights_fitted": weights, "values_moved": moved})

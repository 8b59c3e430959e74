"""`--method auto`: per activation tensor, the calibration candidate that minimizes the error of
the layer reading it.

Candidates: max, percentile 99.9 / 99.99 / 99.999, mse, entropy (all from the histograms the one
pass collected). Error, on up to `rows` token rows of the first calibration batch: for a linear
layer ||x·W − Q(x)·W||² with its float weight; for a batched matmul the same against its other
operand in float; for any other reader ||x − Q(x)||².
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from . import ir
from .graph import float_source
from .patterns.blocks import linear_at
from .calibration import HistogramCollector, amaxes, compute_amax
from .quant import fake_quantize

PERCENTILES = (99.9, 99.99, 99.999)


def candidates(collector: HistogramCollector) -> dict[str, float]:
    common = amaxes(collector)   # max (the exact running max), mse, entropy
    found = {"max": common["max"]}
    for percentile in PERCENTILES:
        found[f"percentile {percentile}"] = compute_amax(collector.counts, collector.edges, "percentile",
                                                         percentile=percentile)
    found.update(mse=common["mse"], entropy=common["entropy"])
    return found


def reader_plans(graph: gs.Graph, tensor: str) -> list[tuple[str, object]]:
    """How each reader of the tensor's DequantizeLinear turns it into a layer output."""
    plans = []
    source = graph.tensors()[tensor]
    for q in (n for n in source.outputs if n.op == "QuantizeLinear"):
        for dq in (d for d in q.outputs[0].outputs if d.op == "DequantizeLinear"):
            for reader in dq.outputs[0].outputs:
                index = next(i for i, t in enumerate(reader.inputs) if t is dq.outputs[0])
                linear = linear_at(reader) if index == 0 else None
                if linear is not None:
                    weight = ir.constant(graph.tensors()[linear.weight])
                    plans.append(("linear", weight if linear.weight_axis == 1 else weight.T))
                elif reader.op == "MatMul" and len(reader.inputs) == 2:
                    other = float_source(reader.inputs[1 - index])
                    plans.append(("bmm", (other.name, index)))
                else:
                    plans.append(("self", None))
    return plans or [("self", None)]


def layer_error(values: np.ndarray, quantized: np.ndarray, plan, others: dict[str, np.ndarray]) -> float:
    kind, detail = plan
    if kind == "linear":
        rows = values.reshape(-1, values.shape[-1])
        diff = (rows - quantized.reshape(rows.shape)) @ detail
        return float((diff.astype(np.float64) ** 2).sum())
    if kind == "bmm":
        name, index = detail
        other = others[name]
        diff = values - quantized
        product = diff @ other if index == 0 else other @ diff
        return float((product.astype(np.float64) ** 2).sum())
    return float(((values - quantized).astype(np.float64) ** 2).sum())


def choose(graph: gs.Graph, collectors: dict[str, HistogramCollector], samples: dict[str, np.ndarray],
           rows: int = 256) -> dict[str, tuple[str, float]]:
    """tensor -> (winning candidate, its amax)."""
    chosen = {}
    for tensor, collector in collectors.items():
        if not collector.width or tensor not in samples:
            chosen[tensor] = ("max", collector.amax)
            continue
        values = samples[tensor]
        plans = reader_plans(graph, tensor)
        if all(kind == "linear" for kind, _ in plans) and values.ndim >= 2:
            flat = values.reshape(-1, values.shape[-1])
            values = flat[np.linspace(0, len(flat) - 1, min(rows, len(flat))).astype(int)]
        else:
            values = values[:2]  # batched matmuls: the first two samples, all heads
        errors = {}
        for label, amax in candidates(collector).items():
            quantized = fake_quantize(values, amax)
            errors[label] = (sum(layer_error(values, quantized, plan, {k: v[:2] for k, v in samples.items()})
                                 for plan in plans), amax)
        best = min(errors, key=lambda label: errors[label][0])
        chosen[tensor] = (best, errors[best][1])
    return chosen


def needed_tensors(graph: gs.Graph, tensors: list[str]) -> list[str]:
    """The quantized tensors plus every float operand a batched-matmul error needs."""
    needed = list(tensors)
    for tensor in tensors:
        for kind, detail in reader_plans(graph, tensor):
            if kind == "bmm" and detail[0] not in needed:
                needed.append(detail[0])
    return needed

"""Outlier channel splitting (Zhao et al. 2019, "Improving Neural Network Quantization without Retraining
using Outlier Channel Splitting", ICML) for a GEMM whose input another linear layer computes through
pointwise ops only: a BERT FFN, FFN1 -> GELU -> FFN2.

Per-output-channel INT8 weights take each output channel's step from its largest weight. After
SmoothQuant migrates the activation outliers of FFN2's input into its weight rows, a few input channels
hold weights hundreds of times the rest's, and those few set every output channel's step. Splitting
input channel j into m copies, each with weight row W_j / m, computes the same product and divides
that row's magnitude by m. The copies add no op at run time: FFN1 computes channel j m times (its
weight column, bias and every per-channel constant between the two GEMMs duplicated), so the wider
tensor is produced, not gathered. The two GEMMs grow by the copies only (16 per 768 channels, ~2 %).

Data-free: the counts come from the weights alone (`split_counts`). Weight rounding (GPTQ) afterwards
sees the copies as perfectly correlated inputs and spreads each row's rounding error over them.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from . import ir
from .graph import POINTWISE_OPS, sole_reader
from .patterns.blocks import linear_at, linear_producing
from .patterns.records import Linear
from .smooth import reader_weight

SPLIT_KEY = "qdqc.channels_split"   # metadata: the weights whose input channels were split (never twice)


@dataclass(frozen=True, eq=False)
class SplitSite:
    quantizer: gs.Node              # the per-tensor activation QuantizeLinear of the readers' input
    readers: tuple[gs.Node, ...]    # the GEMMs whose input channels are split (FFN2)
    producer: Linear                # the linear layer computing those channels (FFN1)
    region: tuple[gs.Node, ...]     # the pointwise nodes between them (GELU, smoothing Mul, shift Sub, Q/DQ),
                                    # and a per-tensor Q/DQ between the producer's GEMM and its bias (ft2, ft3)
    width: int                      # the channel count before splitting


def extra_channels(width: int) -> int:
    """How many copies a site gets: ~2 % of its channels, a multiple of 16 so a width that suits
    tensor-core tiles stays one (1536 -> 1568, 3072 -> 3136)."""
    return 16 * math.ceil(width / 768)


def split_counts(weight: np.ndarray, extra: int) -> np.ndarray:
    """Copies per input row of `weight` [K inputs, N outputs]: greedily, each extra copy goes to the row
    whose split most lowers sum_n (max_k |W_kn| / m_k)², the per-output-channel INT8 steps squared
    (what rounding noise grows with). Returns m (ints >= 1, summing to K + extra at most)."""
    magnitude = np.abs(np.asarray(weight, np.float64))
    counts = np.ones(len(magnitude))
    columns = np.arange(magnitude.shape[1])
    for _ in range(extra):
        effective = magnitude / counts[:, None]
        order = np.argpartition(effective, -2, axis=0)[-2:] if len(magnitude) > 1 else None
        if order is None:
            break
        pair = effective[order, columns]
        first = pair.argmax(axis=0)
        top_row = order[first, columns]
        top, second = pair[first, columns], pair[1 - first, columns]
        lowered = np.maximum(second, top * counts[top_row] / (counts[top_row] + 1))
        gain = np.bincount(top_row, weights=top ** 2 - lowered ** 2, minlength=len(magnitude))
        best = int(gain.argmax())
        if gain[best] <= 0:
            break
        counts[best] += 1
    return counts.astype(np.int64)


def _channel_constant(value: np.ndarray, width: int) -> bool:
    """A per-tensor constant (size 1) or one per channel of the last axis (broadcasting over the rest)."""
    return value.size == 1 or (value.ndim >= 1 and value.shape[-1] == width and value.size == width)


def producer_weight(linear: Linear) -> tuple[gs.Constant | None, int]:
    """The float weight constant behind the producing layer and its input-channel axis: under its weight
    quantizer (`reader_weight`), or bare when the layer was left float; None for one stored quantized."""
    weight, axis = reader_weight(linear.node)
    if weight is not None:
        return weight, axis
    user, index = linear.weight_user
    bare = user.inputs[index]
    if isinstance(bare, gs.Constant) and bare.name == linear.weight and bare.values.dtype.kind == "f":
        return bare, 1 - linear.weight_axis
    return None, 0


def _has_copies(weight: np.ndarray, axis: int) -> bool:
    """Whether two output channels of the producer's weight are equal: split already (a model whose
    metadata was stripped), or a pruned model's zero columns, which a split would not help either."""
    columns = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
    return len(np.unique(columns, axis=0)) < len(columns)


def _region(end: gs.Tensor, width: int) -> tuple[list[gs.Node], gs.Tensor, Linear] | None:
    """The pointwise nodes computing `end` from one linear layer's output, that output and the layer;
    None when anything else (another variable input, a constant neither scalar nor per channel) takes part."""
    region, frontier, seen, start, producer = [], [end], set(), None, None
    while frontier:
        tensor = frontier.pop()
        node = ir.producer(tensor)
        linear = linear_producing(tensor)
        if linear is not None and linear.output == tensor.name:
            if start is not None and start is not tensor:
                return None
            start, producer = tensor, linear
            continue
        if node is None or node.op not in POINTWISE_OPS or len(node.outputs) != 1:
            return None
        if id(node) in seen:
            continue
        seen.add(id(node))
        region.append(node)
        for value in node.inputs:
            constant = ir.constant(value)
            if constant is not None:
                if not _channel_constant(constant, width) or \
                        (node.op in ("QuantizeLinear", "DequantizeLinear") and constant.size != 1):
                    return None
            else:
                frontier.append(value)
    return (region, start, producer) if start is not None else None


def _output_quantizers(linear: Linear) -> list[gs.Node] | None:
    """The Q/DQ nodes between a linear layer's GEMM and its bias Add (ft2/ft3 quantize GEMM outputs);
    None when one is per channel (its scales would need widening too)."""
    found, frontier = [], [linear.node.outputs[0]]
    while frontier:
        for node in frontier.pop().outputs:
            if node.op in ("QuantizeLinear", "DequantizeLinear"):
                if any(ir.constant(v) is None or ir.constant(v).size != 1 for v in node.inputs[1:]):
                    return None
                found.append(node)
                frontier.extend(node.outputs)
    return found


def _closed(region: list[gs.Node], start: gs.Tensor, end: gs.Tensor, quantizer: gs.Node, graph: gs.Graph) -> bool:
    """Nothing outside reads the region's tensors (they change width): the start feeds the region only,
    the end only its quantizer, no graph output among them."""
    members = {id(n) for n in region}
    outputs = {id(t) for t in graph.outputs}
    for tensor in [start] + [n.outputs[0] for n in region]:
        readers = tensor.outputs
        if id(tensor) in outputs:
            return False
        if tensor is end:
            if any(r is not quantizer and id(r) not in members for r in readers):
                return False
        elif any(id(r) not in members for r in readers):
            return False
    return True


def split_sites(graph: gs.Graph) -> list[SplitSite]:
    """GEMM-input quantizers (per tensor) whose float input a linear layer computes through pointwise ops
    alone, every reader being a linear layer with a float weight; sites split before are left alone."""
    done = set(json.loads(ir.metadata(graph).get(SPLIT_KEY, "[]")))
    sites = []
    for q in graph.nodes:
        if q.op != "QuantizeLinear" or ir.is_constant(q.inputs[0]) or ir.constant(q.inputs[1]) is None \
                or ir.constant(q.inputs[1]).size != 1:
            continue
        dequantizers = q.outputs[0].outputs
        if not dequantizers or any(dq.op != "DequantizeLinear" for dq in dequantizers):
            continue
        readers = [reader for dq in dequantizers for reader in dq.outputs[0].outputs]
        linears = [linear_at(reader) for reader in readers]
        if not readers or any(l is None or l.input not in {dq.outputs[0].name for dq in dequantizers}
                              for l in linears):
            continue
        # readers' weights under their quantizers (a weight left float gains nothing from a split)
        weights = [reader_weight(r) for r in readers]
        if any(w is None or w.name in done or not sole_reader(w, r) for (w, _), r in zip(weights, readers)):
            continue
        widths = {w.values.shape[axis] for w, axis in weights}
        if len(widths) != 1:
            continue
        width = widths.pop()
        found = _region(q.inputs[0], width)
        if found is None:
            continue
        region, start, producer = found
        weight, axis = producer_weight(producer)
        hidden = _output_quantizers(producer)
        if weight is None or not sole_reader(weight, producer.node) or weight.values.shape[1 - axis] != width \
                or hidden is None or not _closed(region, start, q.inputs[0], q, graph) \
                or _has_copies(weight.values, 1 - axis):
            continue
        sites.append(SplitSite(q, tuple(readers), producer, tuple(region + hidden), width))
    return sites

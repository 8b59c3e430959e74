"""Split the input channels that set FFN2's per-output-channel weight steps (qdq_compiler/channel_split.py):
FFN1 computes each chosen channel m times (weight column, bias and the per-channel constants between
the GEMMs duplicated) and FFN2 reads each copy with its weight row divided by m. Exact in float."""
from __future__ import annotations

import json

import numpy as np
import onnx_graphsurgeon as gs

from qdq_compiler import ir
from qdq_compiler.calibrate import refresh_weight_scales
from qdq_compiler.channel_split import SPLIT_KEY, extra_channels, producer_weight, split_counts, split_sites
from qdq_compiler.pipeline import PassContext, PassResult, register
from qdq_compiler.smooth import reader_weight, value_bias


def _widen(node: gs.Node, constant: gs.Constant, index: np.ndarray, axis: int) -> None:
    """`node`'s own copy of `constant`, its channels on `axis` taken at `index`."""
    own = ir.own_constant(node, constant)
    own.values = np.ascontiguousarray(np.take(own.values, index, axis=axis))


def _clear_shapes(tensors) -> None:
    """Widened tensors lose their recorded shapes; onnxruntime and TensorRT infer them again."""
    for tensor in tensors:
        if isinstance(tensor, gs.Variable):
            tensor.shape = None


def _quantized_forms(weight: gs.Constant) -> list[gs.Tensor]:
    """What the weight's Q and DQ nodes produce from it."""
    quantized = [t for q in weight.outputs for t in q.outputs]
    return quantized + [dq.outputs[0] for t in quantized for dq in t.outputs]


def _share_readers(weights, index: np.ndarray, counts: np.ndarray) -> None:
    """Each reader's input rows taken at `index`, each copy with 1/m of its original row."""
    share = (1.0 / counts)[index].astype(np.float32)
    for weight, axis in weights:
        shape = [1, 1]
        shape[axis] = len(index)
        weight.values = np.ascontiguousarray(np.take(weight.values, index, axis=axis) * share.reshape(shape),
                                             dtype=weight.values.dtype)
        _clear_shapes(_quantized_forms(weight))


def _widen_producer(producer, index: np.ndarray, width: int) -> None:
    """The producer's output columns, their quantizer's per-channel scales and its bias taken at `index`."""
    weight, axis = producer_weight(producer)
    for q in list(weight.outputs):
        for node in [q] + [dq for t in q.outputs for dq in t.outputs]:
            for value in node.inputs[1:]:
                if isinstance(value, gs.Constant) and value.values.size == width:
                    _widen(node, value, index, 0)
    _clear_shapes(_quantized_forms(weight))
    weight.values = np.ascontiguousarray(np.take(weight.values, index, axis=1 - axis))
    bias = value_bias(producer)
    if bias is not None:
        _widen(producer.bias_add if producer.bias_add is not None else producer.node, bias, index, -1)


def _widen_region(site, index: np.ndarray) -> None:
    """The per-channel constants between the GEMMs (smoothing, shifts) taken at `index`; every tensor
    from the producer's GEMM to the readers' input forgets its shape."""
    for node in site.region:
        for value in node.inputs:
            if isinstance(value, gs.Constant) and value.values.size == site.width:
                _widen(node, value, index, -1)
    producer = site.producer
    _clear_shapes([t for dq in site.quantizer.outputs[0].outputs for t in dq.outputs] + site.quantizer.outputs +
                  [producer.node.outputs[0]] + [t for n in site.region for t in n.outputs] +
                  ([producer.bias_add.outputs[0]] if producer.bias_add is not None else []))


@register("split-outlier-channels", requires=("qdq",))
def split_outlier_channels(graph: gs.Graph, ctx: PassContext) -> PassResult:
    done = json.loads(ir.metadata(graph).get(SPLIT_KEY, "[]"))
    sites, added = 0, 0
    for site in split_sites(graph):
        weights = [reader_weight(reader) for reader in site.readers]
        stacked = np.concatenate([w.values if axis == 0 else w.values.T for w, axis in weights], axis=1)
        counts = split_counts(stacked, extra_channels(site.width))
        if counts.max() == 1:
            continue
        # channel j, then its m_j - 1 copies at the end (GPTQ, in act order, rounds them after it)
        index = np.concatenate([np.arange(site.width), np.repeat(np.arange(site.width), counts - 1)])
        _share_readers(weights, index, counts)
        _widen_producer(site.producer, index, site.width)
        _widen_region(site, index)
        done.extend(weight.name for weight, _ in weights)
        sites += 1
        added += len(index) - site.width
    if sites:
        ir.metadata(graph)[SPLIT_KEY] = json.dumps(sorted(set(done)))
        refresh_weight_scales(graph)
    return PassResult(sites > 0, {"sites_split": sites, "channels_added": added})

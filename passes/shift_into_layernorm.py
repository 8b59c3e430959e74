"""Fold an OS+ channel shift on a LayerNorm output into the LayerNorm's beta: no Sub at run time.

A smoothed, shifted GEMM input computes y/s − z from the LayerNorm output y = γ·n + β. With
β' = β − s·z the LayerNorm gives y − s·z, the smoothing Mul alone gives y/s − z, and every residual
Add reading y gets s·z back through the bias of the linear layer on its other side: the same function,
one elementwise pass over the tokens fewer per site (two of the three shifted sites of a BERT layer).
A LayerNorm whose output reaches anything else (the model's output, a pooler) keeps its Sub.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from qdq_compiler import ir
from qdq_compiler.pipeline import PassContext, PassResult, register


def _shift_on_layernorm(sub: gs.Node):
    """(LayerNorm, smoothing Mul, s·z) for a `::shift` Sub fed by a `::smooth` Mul of a LayerNorm output."""
    if sub.op != "Sub" or "::shift" not in sub.name or not isinstance(sub.inputs[1], gs.Constant):
        return None
    mul = ir.producer(sub.inputs[0])
    if mul is None or mul.op != "Mul" or "::smooth" not in mul.name or len(mul.outputs[0].outputs) != 1:
        return None
    norm = ir.producer(mul.inputs[0])
    inverse = ir.constant(mul.inputs[1])
    if norm is None or norm.op != "LayerNormalization" or len(norm.inputs) < 3 or inverse is None \
            or not isinstance(norm.inputs[2], gs.Constant):
        return None
    return norm, mul, sub.inputs[1].values / inverse


def _residual_bias(add: gs.Node, tensor: gs.Tensor) -> tuple[gs.Node, gs.Constant] | None:
    """For a residual Add(tensor, other): the Add producing `other` and its bias vector."""
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    other = add.inputs[1] if add.inputs[0] is tensor else add.inputs[0]
    producer = ir.producer(other)
    if producer is None or producer.op != "Add" or len(other.outputs) != 1:
        return None
    bias = next((t for t in producer.inputs if isinstance(t, gs.Constant)), None)
    if bias is None or bias.values.ndim != 1:
        return None
    return producer, bias


@register("shift-into-layernorm", requires=("qdq",))
def shift_into_layernorm(graph: gs.Graph, ctx: PassContext) -> PassResult:
    folded = kept = 0
    outputs = set(id(t) for t in graph.outputs)
    for sub in list(graph.nodes):
        found = _shift_on_layernorm(sub)
        if found is None:
            continue
        norm, mul, offset = found
        normed = norm.outputs[0]
        others = [n for n in normed.outputs if n is not mul and n.op != "Shape"]   # Shape reads no value
        biases = [_residual_bias(n, normed) for n in others]
        if id(normed) in outputs or any(b is None for b in biases):
            kept += 1
            continue
        beta = ir.own_constant(norm, norm.inputs[2])
        beta.values = (beta.values - offset).astype(beta.values.dtype)
        for producer, bias in biases:
            bias = ir.own_constant(producer, bias)
            bias.values = (bias.values + offset).astype(bias.values.dtype)
        for reader in list(sub.outputs[0].outputs):
            reader.inputs[reader.inputs.index(sub.outputs[0])] = mul.outputs[0]
        sub.outputs.clear()
        folded += 1
    if folded:
        ir.cleanup(graph)
    return PassResult(folded > 0, {"shifts_folded": folded, "shifts_kept": kept})

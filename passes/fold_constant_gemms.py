"""A quantized GEMM whose every input is a constant computes a constant: fold it, Q/DQ included.

DeBERTa's relative-position projections read the relative-position embedding table, which is a
constant once exported (its LayerNorm folded), and a QAT toolkit quantizes them like any Linear:
DQ(Q(table))·DQ(Q(W)) + b. There is no activation to quantize at run time, so no integer kernel is
needed: folding evaluates exactly what the QAT model computes, once, and the GEMM disappears.
A Q/DQ that another, non-constant GEMM also reads is left alone (that GEMM keeps its INT8 weight).
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from qdq_compiler import ir
from qdq_compiler.graph import GEMM_OPS, LAYOUT_OPS, is_dequantized, replace_all_uses
from qdq_compiler.pipeline import Diagnostic, PassContext, PassResult, register

from .canonicalize import fold_constants
from .release_quantizers import dequantized_value, stored_integers

CHAIN_OPS = LAYOUT_OPS | ir.QDQ_OPS | {"Cast", "Identity"}


def constant_chain(tensor: gs.Tensor) -> list[gs.Node] | None:
    """The Q/DQ and data-movement nodes between a constant and `tensor`, or None if it is not one."""
    nodes = []
    while not ir.is_constant(tensor):
        node = ir.producer(tensor)
        if node is None or node.op not in CHAIN_OPS or not all(ir.is_constant(t) for t in node.inputs[1:] if t.name):
            return None
        nodes.append(node)
        tensor = node.inputs[0]
    return nodes


def foldable(graph: gs.Graph) -> list[tuple[gs.Node, list[gs.Node]]]:
    """Each quantized GEMM that reads only constants, with the chain nodes folding it takes away; a
    chain node that a GEMM outside the set also reads (its INT8 weight) keeps its GEMM out of the set."""
    found: dict[int, tuple[gs.Node, list[gs.Node]]] = {}   # nodes hash by identity only through id()
    for gemm in graph.nodes:
        if gemm.op in GEMM_OPS and any(is_dequantized(t) for t in gemm.inputs[:2]):
            chains = [constant_chain(t) for t in gemm.inputs if t.name]
            if all(c is not None for c in chains):
                found[id(gemm)] = (gemm, [n for chain in chains for n in chain])
    while True:
        inside = {id(n) for _, nodes in found.values() for n in nodes} | set(found)
        shared = [key for key, (_, nodes) in found.items()
                  if any(id(reader) not in inside for n in nodes for reader in n.outputs[0].outputs)]
        if not shared:
            return list(found.values())
        for key in shared:
            del found[key]


@register("fold-constant-gemms")
def fold_constant_gemms(graph: gs.Graph, ctx: PassContext) -> PassResult:
    found = foldable(graph)
    if not found:
        return PassResult(False, {"constant_gemms_folded": 0})
    labels = [ir.label(gemm) for gemm, _ in found]
    names = ir.Names(graph)
    dequantizers = {id(n): n for _, nodes in found for n in nodes if n.op == "DequantizeLinear"}
    for dq in dequantizers.values():   # graphsurgeon never folds Q/DQ: their values, computed here
        value = dequantized_value(dq, stored_integers(dq))
        replace_all_uses(dq.outputs[0], gs.Constant(names.fresh(f"{dq.outputs[0].name}::value"), value))
    ir.cleanup(graph)
    fold_constants(graph)
    diagnostics = (Diagnostic("info", f"{len(labels)} quantized GEMM(s) read only constants (e.g. DeBERTa's "
                                      f"relative-position projections): folded to their float result, first "
                                      f"'{labels[0]}'", labels[0]),)
    return PassResult(True, {"constant_gemms_folded": len(labels)}, diagnostics)

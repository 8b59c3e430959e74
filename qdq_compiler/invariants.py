"""Structural invariants every pass must keep (checked with --verify and in tests).

TensorRT's Q/DQ rules are not invariants (a graph lowered for onnxruntime breaks them on
purpose); `qdqc check` lints those.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from .ir import GENERATED_MARK, describe


def check_invariants(graph: gs.Graph) -> list[str]:
    problems: list[str] = []
    seen_nodes: set[str] = set()
    available = {t.name for t in graph.inputs}
    available |= {name for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    produced: set[str] = set()
    for node in graph.nodes:
        # empty and repeated names are legal ONNX (the input model may have them); the names qdqc
        # generates (`{tensor}::q`, ...: GENERATED_MARK) are unique by construction
        if GENERATED_MARK in node.name:
            if node.name in seen_nodes:
                problems.append(f"generated node name '{node.name}' is used twice")
            seen_nodes.add(node.name)
        for tensor in node.inputs:
            if tensor.name and not isinstance(tensor, gs.Constant) and tensor.name not in available:
                problems.append(f"{describe(node)} reads '{tensor.name}' before it is produced")
        for tensor in node.outputs:
            if tensor.name in produced:
                problems.append(f"tensor '{tensor.name}' is produced twice")
            produced.add(tensor.name)
            available.add(tensor.name)
    for tensor in graph.outputs:
        if tensor.name not in available:
            problems.append(f"graph output '{tensor.name}' is never produced")
    return problems

"""Structural invariants every pass must keep (checked with --verify and in tests)."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from . import ir


def check_invariants(graph: gs.Graph) -> list[str]:
    problems: list[str] = []
    seen_nodes: set[str] = set()
    available = {t.name for t in graph.inputs}
    available |= {name for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    produced: set[str] = set()
    for node in graph.nodes:
        if not node.name:
            problems.append(f"a {node.op} node has no name")
        elif node.name in seen_nodes:
            problems.append(f"node name '{node.name}' is used twice")
        seen_nodes.add(node.name)
        for tensor in node.inputs:
            if tensor.name and not isinstance(tensor, gs.Constant) and tensor.name not in available:
                problems.append(f"node '{node.name}' reads '{tensor.name}' before it is produced")
        for tensor in node.outputs:
            if tensor.name in produced:
                problems.append(f"tensor '{tensor.name}' is produced twice")
            produced.add(tensor.name)
            available.add(tensor.name)
        if node.op == "QuantizeLinear" and ir.constant(node.inputs[0]) is None:
            readers = {user.op for out in node.outputs for user in out.outputs}
            if readers - {"DequantizeLinear"}:
                problems.append(f"activation quantizer '{node.name}' feeds {sorted(readers)} instead of a DequantizeLinear")
    for tensor in graph.outputs:
        if tensor.name not in available:
            problems.append(f"graph output '{tensor.name}' is never produced")
    return problems

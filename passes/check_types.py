"""The TensorRT graph is checked before it is written: one float type per node as the schemas want
(`qdqc check`'s type lint), so a graph neither onnxruntime nor TensorRT's parser would load never
leaves `lower`."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from qdq_compiler.check import check_types as lint_types
from qdq_compiler.errors import PassError
from qdq_compiler.pipeline import PassContext, PassResult, register


@register("check-types")
def check_types(graph: gs.Graph, ctx: PassContext) -> PassResult:
    found = lint_types(graph)
    if found:
        raise PassError(f"the lowered graph is not type-consistent ({len(found)} node(s); first: {found[0]})")
    return PassResult(False, {"type_violations": 0})

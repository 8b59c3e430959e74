"""Never a silent float GEMM: after lowering for onnxruntime, every MatMul/Gemm that still reads a
dequantized tensor (the model quantized it, the lowering could not make it integer) is named with
the reason, as a warning; `qdqc lower --strict` turns any of them into an error. A GEMM the recipe
carried in the model left in float on purpose (`--exclude`, a recipe entry, the fallback) is a note."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qdq_compiler import ir
from qdq_compiler.graph import GEMM_OPS, LAYOUT_OPS, is_dequantized
from qdq_compiler.pipeline import Diagnostic, PassContext, PassResult, register

from .lower_onnxruntime import Operand


def _dequantizer(tensor: gs.Tensor) -> gs.Node | None:
    node = ir.producer(tensor)
    while node is not None and node.op in LAYOUT_OPS and len(node.outputs[0].outputs) == 1:
        node = ir.producer(node.inputs[0])
    return node if node is not None and node.op == "DequantizeLinear" else None


def why_float(gemm: gs.Node) -> str:
    """Why the onnxruntime lowering left this quantized GEMM in float."""
    roles = ("activation", "weight")
    for index, role in enumerate(roles):
        if not is_dequantized(gemm.inputs[index]):
            return f"its {role} input '{gemm.inputs[index].name}' is not quantized"
        dq = _dequantizer(gemm.inputs[index])
        if dq is None:
            return (f"an op other than Reshape/Transpose sits between the {role}'s DequantizeLinear and the GEMM "
                    f"({ir.describe(ir.producer(gemm.inputs[index]))})")
        zero = ir.constant(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2].name else None
        if zero is None or zero.dtype != np.int8 or np.any(zero != 0):
            kind = "none" if zero is None else f"{zero.dtype} {zero.reshape(-1)[0]}"
            return f"the {role}'s zero point is {kind}, not int8 0 (asymmetric quantization has no integer form here)"
    if gemm.op == "Gemm" and (gemm.attrs.get("transA", 0) or gemm.attrs.get("alpha", 1.0) != 1.0
                              or gemm.attrs.get("beta", 1.0) != 1.0):
        return "Gemm with transA, alpha or beta"
    a, b = Operand.of(gemm.inputs[0]), Operand.of(gemm.inputs[1])
    if a is not None and a.weight is not None:
        return "its first input is a constant"
    if a is None or a.q is None:
        return "the activation's DequantizeLinear has no QuantizeLinear of a float tensor before it"
    if b is not None and b.weight is None and b.axis is not None:
        return "per-channel quantization of a non-constant second input"
    if b is not None and b.weight is not None and b.axis is not None:
        return "the weight's per-channel axis is not its output channel"
    return "no integer form for this GEMM"


def _float_by_recipe(gemm: gs.Node, deliberate: dict[str, str]) -> str | None:
    """The site the carried recipe left in float at one of this GEMM's float inputs (looking back through
    the Reshape/Transpose that only flatten it), else None."""
    for tensor in gemm.inputs[:2]:
        if is_dequantized(tensor):
            continue
        while True:
            if tensor.name in deliberate:
                return deliberate[tensor.name]
            node = ir.producer(tensor)
            if node is None or node.op not in LAYOUT_OPS:
                break
            tensor = node.inputs[0]
    return None


@register("report-float-gemms")
def report_float_gemms(graph: gs.Graph, ctx: PassContext) -> PassResult:
    from qdq_compiler import carried

    plan = carried.read(graph)
    deliberate = plan.deliberate_float() if plan is not None else {}
    left = [n for n in graph.nodes if n.op in GEMM_OPS and any(is_dequantized(t) for t in n.inputs[:2])]
    diagnostics, accidental = [], 0
    for n in left:
        site = _float_by_recipe(n, deliberate)
        if site is not None:   # what the user asked for (--exclude, a recipe, the fallback): a note
            diagnostics.append(Diagnostic("info", f"{ir.describe(n)} runs in float: the recipe in the model leaves "
                                                  f"{site} in float", ir.label(n)))
        else:
            accidental += 1
            diagnostics.append(Diagnostic("warning", f"quantized {ir.describe(n)} left in float: {why_float(n)}",
                                          ir.label(n)))
    return PassResult(False, {"quantized_gemms_left_float": accidental,
                              "left_float_by_recipe": len(left) - accidental}, tuple(diagnostics))

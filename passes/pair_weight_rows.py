"""Integer GEMMs exact on every CPU: each weight's reduction rows ordered so that its int8 pairs fit
x86's int16 pair sums, the activation's columns gathered to match.

On x86 without VNNI, onnxruntime's and OpenVINO's uint8·int8 kernels (VPMADDUBSW) add the products of
each pair of adjacent weights along the reduction axis into a saturating int16; a pair of same-sign
weights with |b0| + |b1| > 128 can overflow it (`qdq_compiler.cpu`). A sum does not depend on the order
of its terms, so the rows are reordered to pair a large row with one it fits beside, and a row that fits
beside none is split into its two halves (⌊b/2⌋ + ⌈b/2⌉, within ±64 each). The GEMM then computes the
fake-quant model's integers exactly everywhere, at the cost of one Gather of its (uint8) input and
split rows: on all-MiniLM-L6-v2's 8-bit weights 24 Gathers and 22 % more rows, which made the model
slower than FP32 (onnxruntime's Gather along the last axis is slow). So `compile` calibrates CPU
targets on a 7-bit weight grid, whose pairs always fit, and this pass is the exact fallback for 8-bit
weights (a QAT model's, or `calibrate`'s default). The GEMMs reading one activation share one order.

onnxruntime: on the lowered graph, a Gather of MatMulIntegerToFloat's uint8 input. OpenVINO: on the
Q/DQ graph, a Gather before the activation's QuantizeLinear (the form its low-precision
transformations quantize). With `--isa vnni` the pass does nothing.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qdq_compiler import ir
from qdq_compiler.cpu import Isa, KernelSettings, arrange_rows, arranged
from qdq_compiler.graph import LAYOUT_OPS
from qdq_compiler.pipeline import Diagnostic, PassContext, PassResult, register


def _integer_groups(graph: gs.Graph) -> dict[int, list[gs.Node]]:
    """MatMulIntegerToFloat nodes with int8 constant weights, by the uint8 input they read."""
    groups: dict[int, list[gs.Node]] = {}
    for node in graph.nodes:
        if node.op == "MatMulIntegerToFloat" and ir.constant(node.inputs[1]) is not None \
                and ir.constant(node.inputs[1]).dtype == np.int8 and ir.constant(node.inputs[1]).ndim == 2:
            groups.setdefault(id(node.inputs[0]), []).append(node)
    return groups


def _qdq_weight(gemm: gs.Node) -> tuple[gs.Node, bool] | None:
    """(the DQ of the int8 weight, whether it is stored [N, K]) of a float GEMM with a folded weight."""
    if gemm.op not in ("MatMul", "Gemm") or len(gemm.inputs) < 2:
        return None
    dq = ir.producer(gemm.inputs[1])
    stored = ir.constant(dq.inputs[0]) if dq is not None and dq.op == "DequantizeLinear" else None
    if stored is None or stored.dtype != np.int8 or stored.ndim != 2 or len(dq.outputs[0].outputs) != 1:
        return None
    return dq, bool(gemm.op == "Gemm" and gemm.attrs.get("transB", 0))


def _activation_quantizer(gemm: gs.Node) -> tuple[gs.Node, gs.Tensor] | None:
    """(the per-tensor QuantizeLinear behind the GEMM's input, the float tensor to gather): Q's own input
    when the GEMM reads Q -> DQ directly, else the GEMM's input itself (Q -> DQ -> Reshape/Transpose ->
    GEMM: the moved values, re-quantized on the same grid after the Gather)."""
    node = ir.producer(gemm.inputs[0])
    direct = True
    while node is not None and node.op in LAYOUT_OPS:
        node, direct = ir.producer(node.inputs[0]), False
    q = ir.producer(node.inputs[0]) if node is not None and node.op == "DequantizeLinear" else None
    if q is None or q.op != "QuantizeLinear" or ir.constant(q.inputs[1]) is None or ir.constant(q.inputs[1]).size != 1:
        return None
    return q, (q.inputs[0] if direct else gemm.inputs[0])


class Rearranger:
    def __init__(self, graph: gs.Graph):
        self.graph, self.names = graph, ir.Names(graph)

    def gather(self, tensor: gs.Tensor, rows: np.ndarray) -> gs.Variable:
        out = gs.Variable(self.names.fresh(f"{tensor.name}::paired"), dtype=tensor.dtype)
        index = gs.Constant(self.names.fresh(f"{tensor.name}::pair_order"), rows)
        self.graph.nodes.append(gs.Node("Gather", self.names.fresh(f"{tensor.name}::pair"), {"axis": -1},
                                        inputs=[tensor, index], outputs=[out]))
        return out

    def requantized(self, tensor: gs.Variable, q: gs.Node) -> gs.Variable:
        """Q -> DQ of `tensor` with `q`'s scale and zero point (the gathered values, on the same grid)."""
        dq = next(r for r in q.outputs[0].outputs if r.op == "DequantizeLinear")
        quantized = gs.Variable(self.names.fresh(f"{tensor.name}::quantized"), dtype=q.outputs[0].dtype)
        self.graph.nodes.append(gs.Node("QuantizeLinear", self.names.fresh(f"{tensor.name}::q"), dict(q.attrs),
                                        inputs=[tensor, *q.inputs[1:]], outputs=[quantized]))
        out = gs.Variable(self.names.fresh(f"{tensor.name}::dequantized"), dtype=tensor.dtype)
        self.graph.nodes.append(gs.Node("DequantizeLinear", self.names.fresh(f"{tensor.name}::dq"), dict(dq.attrs),
                                        inputs=[quantized, *dq.inputs[1:]], outputs=[out]))
        return out

    def weight(self, like: gs.Tensor, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self.names.fresh(f"{like.name}::paired"), np.ascontiguousarray(values))


def _lowered(graph: gs.Graph, rearrange: Rearranger) -> tuple[int, int]:
    activations = split = 0
    for gemms in _integer_groups(graph).values():
        weights = [ir.constant(g.inputs[1]) for g in gemms]
        plan = arrange_rows(np.concatenate(weights, axis=1))
        if plan is None:
            continue
        gathered = rearrange.gather(gemms[0].inputs[0], plan[0])
        for gemm, weight in zip(gemms, weights):
            gemm.inputs[0] = gathered
            gemm.inputs[1] = rearrange.weight(gemm.inputs[1], arranged(weight, *plan))
        activations += 1
        split += int(np.count_nonzero(plan[1] == 1))
    return activations, split


def _qdq(graph: gs.Graph, rearrange: Rearranger) -> tuple[int, int]:
    groups: dict[int, tuple[gs.Node, gs.Tensor, list[tuple[gs.Node, gs.Node, bool]]]] = {}
    for gemm in graph.nodes:
        found, quantizer = _qdq_weight(gemm), _activation_quantizer(gemm)
        if found is not None and quantizer is not None:
            groups.setdefault(id(quantizer[1]), (*quantizer, []))[2].append((gemm, *found))
    activations = split = 0
    for q, source, members in groups.values():
        weights = [ir.constant(dq.inputs[0]).T if transposed else ir.constant(dq.inputs[0])
                   for _, dq, transposed in members]
        plan = arrange_rows(np.concatenate(weights, axis=1))
        if plan is None:
            continue
        dequantized = rearrange.requantized(rearrange.gather(source, plan[0]), q)
        for (gemm, dq, transposed), weight in zip(members, weights):
            gemm.inputs[0] = dequantized
            values = arranged(weight, *plan)
            dq.inputs[0] = rearrange.weight(dq.inputs[0], values.T if transposed else values)
        activations += 1
        split += int(np.count_nonzero(plan[1] == 1))
    return activations, split


@register("pair-weight-rows", settings=KernelSettings)
def pair_weight_rows(graph: gs.Graph, ctx: PassContext) -> PassResult:
    if ctx.settings(KernelSettings).isa is Isa.VNNI:
        return PassResult(False, {"inputs_gathered": 0, "rows_halved": 0})
    rearrange = Rearranger(graph)
    integer = any(n.op == "MatMulIntegerToFloat" for n in graph.nodes)
    activations, split = (_lowered if integer else _qdq)(graph, rearrange)
    diagnostics = ()
    if activations:
        ir.cleanup(graph)
        diagnostics = (Diagnostic("warning", f"8-bit weights: {activations} GEMM input(s) gathered and {split} weight "
                                  "row(s) halved to stay exact on CPUs without VNNI (much slower: all-MiniLM-L6-v2 "
                                  "ran slower than FP32); a 7-bit grid avoids it (--weight-bits 7 on calibrate or "
                                  "compile, compile's default for CPU targets), or --isa vnni for CPUs with VNNI "
                                  "only"),)
    return PassResult(activations > 0, {"inputs_gathered": activations, "rows_halved": split}, diagnostics)

"""Integer GEMMs exact on every CPU: each weight's reduction rows ordered so that its int8 pairs fit
x86's int16 pair sums, the activation's columns gathered to match.

On x86 without VNNI, onnxruntime's and OpenVINO's uint8·int8 kernels (VPMADDUBSW) add the products of
each pair of adjacent weights along the reduction axis into a saturating int16; a pair of same-sign
weights with |b0| + |b1| > 128 can overflow it (`qdq_compiler.cpu`). A sum does not depend on the order
of its terms, so the rows are reordered to pair a large row with one it fits beside, and a row that fits
beside none is split into its two halves (⌊b/2⌋ + ⌈b/2⌉, within ±64 each). The GEMM then computes the
fake-quant model's integers exactly everywhere, at the cost of one Gather of its (uint8) input and a
few split rows (README: MiniLM's figures). The GEMMs reading one activation share one order.

onnxruntime: on the lowered graph, a Gather of MatMulIntegerToFloat's uint8 input. OpenVINO: on the
Q/DQ graph, a Gather before the activation's QuantizeLinear (the form its low-precision
transformations quantize). With `--isa vnni` the pass does nothing.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qdq_compiler import ir
from qdq_compiler.cpu import Isa, KernelSettings, arrange_rows, arranged
from qdq_compiler.pipeline import PassContext, PassResult, register


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


def _activation_quantizer(gemm: gs.Node) -> gs.Node | None:
    """The per-tensor QuantizeLinear behind the GEMM's input (Q -> DQ -> GEMM)."""
    dq = ir.producer(gemm.inputs[0])
    q = ir.producer(dq.inputs[0]) if dq is not None and dq.op == "DequantizeLinear" else None
    if q is None or q.op != "QuantizeLinear" or ir.constant(q.inputs[1]) is None or ir.constant(q.inputs[1]).size != 1:
        return None
    return q


class Rearranger:
    def __init__(self, graph: gs.Graph):
        self.graph, self.names = graph, ir.Names(graph)

    def gather(self, tensor: gs.Tensor, rows: np.ndarray) -> gs.Variable:
        out = gs.Variable(self.names.fresh(f"{tensor.name}::paired"), dtype=tensor.dtype)
        index = gs.Constant(self.names.fresh(f"{tensor.name}::pair_order"), rows)
        self.graph.nodes.append(gs.Node("Gather", self.names.fresh(f"{tensor.name}::pair"), {"axis": -1},
                                        inputs=[tensor, index], outputs=[out]))
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
    groups: dict[int, list[tuple[gs.Node, gs.Node, bool]]] = {}
    for gemm in graph.nodes:
        found, q = _qdq_weight(gemm), _activation_quantizer(gemm)
        if found is not None and q is not None:
            groups.setdefault(id(q), []).append((gemm, *found))
    activations = split = 0
    for members in groups.values():
        weights = [ir.constant(dq.inputs[0]).T if transposed else ir.constant(dq.inputs[0])
                   for _, dq, transposed in members]
        plan = arrange_rows(np.concatenate(weights, axis=1))
        if plan is None:
            continue
        q = _activation_quantizer(members[0][0])
        gathered = rearrange.gather(q.inputs[0], plan[0])
        requantized = gs.Variable(rearrange.names.fresh(f"{q.outputs[0].name}::paired"), dtype=q.outputs[0].dtype)
        rearrange.graph.nodes.append(gs.Node("QuantizeLinear", rearrange.names.fresh(f"{q.name}::paired"),
                                             dict(q.attrs), inputs=[gathered, *q.inputs[1:]], outputs=[requantized]))
        for (gemm, dq, transposed), weight in zip(members, weights):
            source = ir.producer(gemm.inputs[0])
            dequantized = gs.Variable(rearrange.names.fresh(f"{source.outputs[0].name}::paired"),
                                      dtype=source.outputs[0].dtype)
            rearrange.graph.nodes.append(gs.Node("DequantizeLinear", rearrange.names.fresh(f"{source.name}::paired"),
                                                 dict(source.attrs), inputs=[requantized, *source.inputs[1:]],
                                                 outputs=[dequantized]))
            gemm.inputs[0] = dequantized
            values = arranged(weight, *plan)
            dq.inputs[0] = rearrange.weight(dq.inputs[0], values.T if transposed else values)
        activations += 1
        split += int(np.count_nonzero(plan[1] == 1))
    return activations, split


@register("pair-weight-rows", settings=KernelSettings)
def pair_weight_rows(graph: gs.Graph, ctx: PassContext) -> PassResult:
    if ctx.settings(KernelSettings).isa is Isa.VNNI:
        return PassResult(False, {"inputs_gathered": 0, "rows_split": 0})
    rearrange = Rearranger(graph)
    integer = any(n.op == "MatMulIntegerToFloat" for n in graph.nodes)
    activations, split = (_lowered if integer else _qdq)(graph, rearrange)
    if activations:
        ir.cleanup(graph)
    return PassResult(activations > 0, {"inputs_gathered": activations, "rows_split": split})

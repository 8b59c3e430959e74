"""A key padding mask becomes extra columns of the integer Q·K^T, instead of a float Add over the
scores (onnxruntime target, integer attention).

After lowering, BERT's mask is an Add of a B×1×S×S tensor to the B×heads×S×S float scores: a read and
a write of the largest tensor of the layer (at batch 8, seq 384 about a ninth of MiniLM's time). The
scores come from MatMulIntegerToFloat over uint8 Q (zero point 128) and int8 K^T, scaled by
s = s_q·s_k·(1/sqrt(d)). Append c columns to Q holding 255 (the integer 127) and c rows to K^T holding
−128 for a padded key and 0 otherwise: the padded key's score drops by c·127·128·s, which c makes at
least 60 — the masking of `clamp-attention-mask` (its docstring: exact in float32 for MiniLM, exp stays
out of denormals), computed inside the GEMM. The wider GEMM costs more than its c/d extra
multiply-adds, but less than the Add (MiniLM: c = 2 to 20 by layer, d = 32; rounding c up measured
slower, README).

The portable form (the default) fills −64 instead, twice the columns, so each pair of mask columns
stays within x86's int16 pair sums; it applies where K^T is int8 (a 7-bit operand: `--weight-bits 7`);
a uint8 K^T (the U8U8 form of 8-bit models) keeps the Add.

The mask must be a key padding mask of one input: checked by running the graph's mask computation on
a probe (every query row equal, 0 at attended keys, at most −60 at padded ones) — causal or other
masks keep their Add.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qdq_compiler import ir
from qdq_compiler.cpu import Isa, KernelSettings
from qdq_compiler.pipeline import Diagnostic, PassContext, PassResult, register

from .clamp_attention_mask import MASK_FLOOR, mask_input

A_SCALE, B_SCALE, A_ZERO = 2, 3, 4
VNNI_FILL, PORTABLE_FILL = -128, -64   # K^T's padded-key level: −64 keeps each pair of mask columns
                                       # (255 · −64 · 2 = −32640) within x86's int16 pair sums
MAX_COLUMNS = 64             # a bound for tiny scales; MiniLM's layers need at most 20
PROBE = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], np.int64)
WITH_MASK = "::with_mask"     # names the widened K^T: the floor pass knows these scores need none


def masked_in_gemm(softmax: gs.Node) -> bool:
    """The softmax reads scores whose padded keys the GEMM already lowered by at least 60."""
    gemm = ir.producer(softmax.inputs[0])
    return gemm is not None and gemm.op == "MatMulIntegerToFloat" and WITH_MASK in gemm.inputs[1].name


def padding_input(graph: gs.Graph, mask: gs.Tensor) -> gs.Tensor | None:
    """The B×S graph input `mask` is the key padding mask of, checked on a probe, or None."""
    sub = graph.copy()
    sub.outputs = [sub.tensors()[mask.name]]
    sub.cleanup()
    from qdq_compiler.evaluate import open_session

    candidates = [t for t in sub.inputs if t.shape is not None and len(t.shape) == 2]
    for candidate in candidates:
        feeds = {t.name: (PROBE if t.name == candidate.name else np.zeros_like(PROBE)).astype(t.dtype or np.int64)
                 for t in sub.inputs}
        try:
            value, = open_session(ir.to_model(sub), optimize=False).run(None, feeds)
        except Exception:   # onnxruntime's own error types (and QdqcError): not a mask this probe computes
            return None
        if value.ndim != 4 or value.shape[0] != PROBE.shape[0] or value.shape[-1] != PROBE.shape[1]:
            continue
        keys = np.broadcast_to(value, (value.shape[0], value.shape[1], PROBE.shape[1], PROBE.shape[1]))
        attended = PROBE.astype(bool)[:, None, None, :]
        if np.all(keys[np.broadcast_to(attended, keys.shape)] == 0) and \
                np.all(keys[np.broadcast_to(~attended, keys.shape)] <= MASK_FLOOR):
            return graph.tensors()[candidate.name]
    return None


class Builder:
    def __init__(self, graph: gs.Graph):
        self.graph, self.names = graph, ir.Names(graph)

    def node(self, op: str, inputs: list, label: str, dtype, attrs=None) -> gs.Variable:
        out = gs.Variable(self.names.fresh(label), dtype=dtype)
        self.graph.nodes.append(gs.Node(op, self.names.fresh(f"{label}_{op}"), attrs or {}, inputs=inputs,
                                        outputs=[out]))
        return out

    def const(self, label: str, value) -> gs.Constant:
        return gs.Constant(self.names.fresh(label), np.asarray(value))

    def padded_keys(self, source: gs.Tensor, fill: int) -> gs.Variable:
        """B×1×1×S int8: `fill` at padded keys, 0 at attended ones."""
        base = source.name
        wide = self.node("Cast", [source], f"{base}::int64", np.int64, {"to": onnx.TensorProto.INT64})
        padded = self.node("Equal", [wide, self.const(f"{base}::zero", np.array(0, np.int64))],
                           f"{base}::padded", np.bool_)
        level = self.node("Where", [padded, self.const(f"{base}::min_level", np.array(fill, np.int8)),
                                    self.const(f"{base}::zero_level", np.array(0, np.int8))],
                          f"{base}::padded_level", np.int8)
        return self.node("Unsqueeze", [level, self.const(f"{base}::axes", np.array([1, 2], np.int64))],
                         f"{base}::key_columns", np.int8)

    def widen(self, tensor: gs.Tensor, fill: gs.Tensor, axis: int, columns: int) -> gs.Variable:
        """Concat(tensor, fill broadcast to tensor's shape with `columns` along `axis`)."""
        base = tensor.name
        head = self.node("Shape", [tensor], f"{base}::lead", np.int64, {"end": axis})
        parts = [head, self.const(f"{base}::columns", np.array([columns], np.int64))]
        if axis < 3:
            parts.append(self.node("Shape", [tensor], f"{base}::tail", np.int64, {"start": axis + 1}))
        shape = self.node("Concat", parts, f"{base}::widened_shape", np.int64, {"axis": 0})
        filler = self.node("Expand", [fill, shape], f"{base}::mask_columns", tensor.dtype)
        return self.node("Concat", [tensor, filler], f"{base}{WITH_MASK}", tensor.dtype, {"axis": axis})


@register("mask-key-columns", requires=("integer-gemms",), settings=KernelSettings)
def mask_key_columns(graph: gs.Graph, ctx: PassContext) -> PassResult:
    if graph.opset < 15:
        return PassResult(False, {"masks_in_gemm": 0})   # Shape(start, end) is opset 15
    fill = VNNI_FILL if ctx.settings(KernelSettings).isa is Isa.VNNI else PORTABLE_FILL
    builder = Builder(graph)
    sources: dict[int, gs.Tensor | None] = {}
    keys: dict[int, gs.Variable] = {}
    moved, diagnostics = 0, []
    for softmax in [n for n in graph.nodes if n.op == "Softmax"]:
        add = ir.producer(softmax.inputs[0])
        index = mask_input(add, softmax) if add is not None else None
        gemm = ir.producer(add.inputs[1 - index]) if index is not None else None
        if gemm is None or gemm.op != "MatMulIntegerToFloat" or ir.is_constant(gemm.inputs[1]) \
                or len(gemm.outputs[0].outputs) != 1 or len(gemm.inputs) > 5:
            continue
        moves = [ir.producer(t) for t in gemm.inputs[:2]]
        if any(m is None or m.op != "Transpose" or len(m.attrs.get("perm", ())) != 4 for m in moves):
            continue   # the head split of B×heads×S×d tensors: the columns go on its last axes
        a_scale, b_scale = ir.constant(gemm.inputs[A_SCALE]), ir.constant(gemm.inputs[B_SCALE])
        a_zero = ir.constant(gemm.inputs[A_ZERO])
        if a_scale is None or b_scale is None or a_scale.size != 1 or b_scale.size != 1 or a_zero is None \
                or a_zero.dtype != np.uint8 or int(a_zero) != 128:
            continue
        per_column = 127 * -fill * float(a_scale) * float(b_scale)   # (255 − 128) · fill: one column's drop
        columns = math.ceil(-MASK_FLOOR / per_column) if per_column > 0 else MAX_COLUMNS + 1
        if columns > MAX_COLUMNS:
            diagnostics.append(Diagnostic("info", f"{ir.label(gemm)}: the mask would need {columns} columns; "
                                          "kept as an Add"))
            continue
        mask = add.inputs[index]
        if id(mask) not in sources:
            sources[id(mask)] = padding_input(graph, mask)
        source = sources[id(mask)]
        if source is None:
            continue
        if id(source) not in keys:
            keys[id(source)] = builder.padded_keys(source, fill)
        query, key_t = gemm.inputs[0], gemm.inputs[1]
        gemm.inputs[0] = builder.widen(query, builder.const(f"{query.name}::one_level",
                                                             np.full((1, 1, 1, 1), 255, np.uint8)), 3, columns)
        gemm.inputs[1] = builder.widen(key_t, keys[id(source)], 2, columns)
        softmax.inputs[0] = gemm.outputs[0]
        moved += 1
    if moved:
        ir.cleanup(graph)
        ir.toposort(graph)
    return PassResult(moved > 0, {"masks_in_gemm": moved}, tuple(diagnostics))

"""Linear-layer inputs as uint8 with zero point 128: the same grid, the form OpenVINO runs fastest.

An int8 activation quantizer (zero point 0) and a uint8 one with zero point 128 on the same scale
give the same values: round(x/s) saturated to [-128, 127], stored shifted by 128. Only the storage
type differs, and that is what OpenVINO's low-precision transformations read: an int8 input to a
FullyConnected runs the CPU plugin's older `FullyConnectedQuantizedLegacy` kernel, a uint8 one its
`FullyConnected` brgemm INT8 kernel (measured on MiniLM with the performance counters, README).
With `--isa vnni`, only quantizers read by linear layers alone are changed (through
Reshape/Transpose): the attention batched-matmul inputs stay int8, the form the plugin's fused INT8
attention takes, which on x86 without VNNI sums int8·int8 pairs into a saturating int16 (wrong
there) unless the second operand (Kᵀ, V) is on a 7-bit grid: the portable form of a model calibrated
with `--weight-bits 7` (compile's default for CPU targets) keeps that form, exact everywhere (checked
under `qemu-x86_64 -cpu Haswell`, tests/test_cpu.py). A portable model with 8-bit operands instead
makes every quantizer read only as a MatMul's first input uint8 (Q and the softmax output too):
uint8·int8 is exact everywhere, and the plugin then runs those two batched matmuls in FP32 on the
dequantized values (slower: README).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qdq_compiler import ir
from qdq_compiler.cpu import Isa, KernelSettings
from qdq_compiler.graph import final_readers, narrowing_clip
from qdq_compiler.patterns.blocks import linear_at
from qdq_compiler.pipeline import PassContext, PassResult, register


def _linear_readers_only(tensor: gs.Tensor) -> bool:
    """Every reader of `tensor` (past single-reader Reshape/Transpose) is a linear layer's activation input."""
    readers = final_readers(tensor)
    return bool(readers) and all(linear_at(r) is not None and r.inputs[0] is source for source, r in readers)


def _first_inputs_only(tensor: gs.Tensor) -> bool:
    """Every reader of `tensor` (past single-reader Reshape/Transpose) takes it as a MatMul's first input:
    a uint8 A with an int8 B is exact on every CPU (only int8·int8 pairs saturate without VNNI)."""
    readers = final_readers(tensor)
    return bool(readers) and all(r.op in ("MatMul", "Gemm") and r.inputs[0] is source for source, r in readers)


def _int8_activation_quantizer(q: gs.Node) -> bool:
    if q.op != "QuantizeLinear" or ir.is_constant(q.inputs[0]) or len(q.inputs) < 3:
        return False
    scale, zero = ir.constant(q.inputs[1]), ir.constant(q.inputs[2])
    return scale is not None and scale.size == 1 and zero is not None and zero.dtype == np.int8 and not zero.any()


@register("unsigned-linear-inputs", requires=("qdq",), settings=KernelSettings)
def unsigned_linear_inputs(graph: gs.Graph, ctx: PassContext) -> PassResult:
    portable = ctx.settings(KernelSettings).isa is Isa.PORTABLE
    narrowed = any(narrowing_clip(n) for n in graph.nodes if n.op == "QuantizeLinear")   # 7-bit Kᵀ and V
    names = ir.Names(graph)
    changed = kept = 0
    for q in list(graph.nodes):
        if not _int8_activation_quantizer(q):
            continue
        dequantizers = q.outputs[0].outputs
        if not dequantizers or any(dq.op != "DequantizeLinear" or ir.constant(dq.inputs[2]) is None
                                   or dq.inputs[1] is not q.inputs[1] and not np.array_equal(
                                       ir.constant(dq.inputs[1]), ir.constant(q.inputs[1]))
                                   for dq in dequantizers):
            continue
        wanted = _first_inputs_only if portable and not narrowed else _linear_readers_only
        if not all(wanted(dq.outputs[0]) for dq in dequantizers):
            kept += 1
            continue
        zero = gs.Constant(names.fresh(f"{q.inputs[0].name}::u8_zero_point"), np.array(128, np.uint8))
        q.inputs[2] = zero
        q.outputs[0].dtype = np.uint8
        for dq in dequantizers:
            dq.inputs[2] = zero
        changed += 1
    if changed:
        ir.cleanup(graph)
    return PassResult(changed > 0, {"uint8_quantizers": changed, "int8_quantizers_kept": kept})

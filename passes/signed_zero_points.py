"""uint8 quantizers with zero point 128 become int8 with zero point 0: the same grid, exactly.

onnxruntime's `quantize_static` with symmetric activations writes uint8 activations with zero point
128: q_u8 = clamp(round(x/s) + 128, 0, 255) = q_s8 + 128 with q_s8 = clamp(round(x/s), -128, 127), and
DQ gives s·(q_u8 - 128) = s·q_s8. Every lowering here (MatMulIntegerToFloat's shift, OpenVINO's
uint8 inputs, TensorRT's symmetric INT8) starts from the int8 form, so the rewrite is exact and free.
Any other uint8 zero point is asymmetric quantization: TensorRT has no such mode, so for it the
pass refuses in one line (onnxruntime and OpenVINO keep the quantizer; `report-float-gemms` names the
GEMMs that then stay float).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qdq_compiler import ir
from qdq_compiler.errors import ModelError
from qdq_compiler.pipeline import PassContext, PassResult, register

SHIFT = 128


@dataclass(frozen=True)
class ZeroPointSettings:
    symmetric_only: bool = False   # refuse asymmetric quantizers (TensorRT)

    @classmethod
    def from_config(cls, config) -> "ZeroPointSettings":
        target = getattr(getattr(config, "target", None), "value", None)
        return cls(symmetric_only=target == "tensorrt")


def _zero_point(node: gs.Node) -> np.ndarray | None:
    return ir.constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None


@register("signed-zero-points", settings=ZeroPointSettings)
def signed_zero_points(graph: gs.Graph, ctx: PassContext) -> PassResult:
    strict = ctx.settings(ZeroPointSettings).symmetric_only
    names = ir.Names(graph)
    converted = 0
    for q in [n for n in graph.nodes if n.op == "QuantizeLinear"]:
        zero = _zero_point(q)
        if zero is None or zero.dtype != np.uint8:
            continue
        dequantizers = q.outputs[0].outputs
        shifted = np.all(zero == SHIFT) and all(dq.op == "DequantizeLinear" and _zero_point(dq) is not None
                                                and np.all(_zero_point(dq) == SHIFT) for dq in dequantizers)
        if not shifted:
            if strict:
                raise ModelError(f"{ir.describe(q)}: uint8 zero point {zero.reshape(-1)[0]} is asymmetric quantization; "
                                 "TensorRT takes symmetric INT8 only (zero point 0, or uint8 128 which qdqc converts "
                                 "exactly): quantize with symmetric activations (onnxruntime: "
                                 "extra_options ActivationSymmetric=True)")
            continue
        signed = gs.Constant(names.fresh(f"{q.inputs[0].name}::int8_zero_point"), np.zeros(zero.shape, np.int8))
        q.inputs[2] = signed
        q.outputs[0].dtype = np.int8
        for dq in dequantizers:
            dq.inputs[2] = signed
        converted += 1
    if strict:   # uint8 weights stored without their Q (DQ of a uint8 constant) are asymmetric too
        stored = next((dq for dq in graph.nodes if dq.op == "DequantizeLinear" and ir.constant(dq.inputs[0]) is not None
                       and ir.constant(dq.inputs[0]).dtype == np.uint8), None)
        if stored is not None:
            raise ModelError(f"{ir.describe(stored)}: dequantizes a uint8 constant; TensorRT takes symmetric INT8 "
                             "weights only (onnxruntime: weight_type=QInt8)")
    if converted:
        ir.cleanup(graph)
    return PassResult(converted > 0, {"uint8_quantizers_made_int8": converted})

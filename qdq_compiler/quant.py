"""Symmetric INT8 quantization maths (pure numpy)."""
from __future__ import annotations

import numpy as np

QMAX = 127
MIN_AMAX = 2.0 ** -24   # below this pytorch-quantization treats a range as zero
PLACEHOLDER_SCALE = 1.0  # what `insert` gives every activation quantizer until calibration
DEFAULT_AXIS = 1        # ONNX QuantizeLinear/DequantizeLinear: `axis` defaults to 1
WEIGHT_BITS = (7, 8)    # 7: every uint8·int8 product pair fits x86's int16 pair sums (255·63·2 < 32767)
WEIGHT_BITS_KEY = "qdqc.weight_bits"   # metadata: the weights' grid, decided at calibration


def weight_qmax(bits: int) -> int:
    """The largest integer of a symmetric `bits`-bit weight grid: 127 for 8, 63 for 7."""
    return 2 ** (bits - 1) - 1


def channel_axis(attrs: dict, scale_size: int) -> int | None:
    """The per-channel axis of a Q/DQ with these attributes and this many scales, None when per-tensor.

    A per-channel node without an `axis` attribute (QAT exports) quantizes along ONNX's default axis 1."""
    return int(attrs.get("axis", DEFAULT_AXIS)) if scale_size > 1 else None


def is_placeholder(scale: np.ndarray) -> bool:
    """A scale still at insert's placeholder (the quantizer was never calibrated)."""
    return scale.size == 1 and float(scale.reshape(())) == PLACEHOLDER_SCALE


def along(parameter: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """A per-channel Q/DQ parameter (1-D) shaped to broadcast along `axis` of an `ndim`-D tensor; a
    per-tensor one as it is."""
    parameter = np.asarray(parameter)
    if axis is None or parameter.ndim != 1:
        return parameter
    shape = [1] * ndim
    shape[axis] = parameter.size
    return parameter.reshape(shape)


def amax(values: np.ndarray, axis: int | None = None) -> np.ndarray:
    """max |x| over everything (axis None) or over all axes but `axis` (per channel)."""
    magnitude = np.abs(np.asarray(values, dtype=np.float32))
    if axis is None:
        return np.asarray(magnitude.max() if magnitude.size else 0.0, dtype=np.float32)
    others = tuple(i for i in range(magnitude.ndim) if i != axis % magnitude.ndim)
    return magnitude.max(axis=others).astype(np.float32)


def scale_from_amax(value: np.ndarray, qmax: int = QMAX) -> np.ndarray:
    """amax/qmax (127), with a tiny positive floor so an all-zero range still has a valid scale."""
    value = np.asarray(value, dtype=np.float32)
    return np.asarray(np.maximum(value, MIN_AMAX) / qmax, dtype=np.float32)  # an array even for a scalar


def quantize(values: np.ndarray, scale: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Round half to even and saturate to [-128, 127], as QuantizeLinear does."""
    scale = along(np.asarray(scale, dtype=np.float32), values.ndim, axis)
    return np.clip(np.rint(values / scale), -128, 127).astype(np.int8)


def fake_quantize(values: np.ndarray, amax) -> np.ndarray:
    """Q then DQ with scale amax/127 (amax a scalar, or one per channel on the last axis)."""
    scale = scale_from_amax(amax)
    return quantize(values, scale).astype(np.float32) * scale

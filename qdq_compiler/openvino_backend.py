"""OpenVINO as a runtime: reading models, compiling them for the CPU, running them, and the
per-layer performance counters (what each layer executed as, in which precision, how long).

`openvino` is an optional dependency (`pip install qdqc[openvino]`): it is imported here,
lazily, and its absence is one clear error. Every qdqc path that runs OpenVINO (bench, the
profile tool, the `openvino` target's checks) goes through `compile_model`, so thread count,
precision and performance-counter settings are decided in one place.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from .errors import QdqcError, UsageError


def check_ir_target(path, target: str | None) -> None:
    """An IR is written for the openvino target (or before lowering): OpenVINO reads neither
    com.microsoft's integer GEMMs nor a graph typed for TensorRT."""
    if target not in (None, "openvino"):
        raise UsageError(f"{path}: an OpenVINO IR (.xml) is written for --target openvino, not {target}; "
                         "pass --target openvino or write an .onnx file")
    if Path(path).suffix != ".xml":   # OpenVINO's writer takes the lowercase suffix only
        raise UsageError(f"{path}: OpenVINO writes an IR to a lowercase .xml name: use "
                         f"{Path(path).with_suffix('.xml').name}")


class Precision(str, Enum):
    """OpenVINO's floating-point execution precision (`INFERENCE_PRECISION_HINT`).

    DEFAULT is what OpenVINO picks by itself: bf16 on a CPU with avx512_bf16/AMX, f32 elsewhere.
    F32 forces float32 (the like-for-like comparison with onnxruntime FP32)."""

    DEFAULT = "default"
    F32 = "f32"
    BF16 = "bf16"


def openvino():
    try:
        import openvino as ov
    except ImportError:
        raise QdqcError("OpenVINO is not installed: pip install 'qdqc[openvino]'") from None
    return ov


_CORE = None


def reason(exc: Exception) -> str:
    """OpenVINO's exception text in one line: its last line that says something (the first ones name
    source files)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    telling = [line for line in lines if not line.startswith("Exception from") and not line.startswith("Check '")]
    return (telling or lines or [type(exc).__name__])[-1]


def core():
    global _CORE
    if _CORE is None:
        _CORE = openvino().Core()
    return _CORE


def read_model(model):
    """An ov.Model from a .xml IR, an .onnx path, an onnx.ModelProto or an ov.Model."""
    ov = openvino()
    if isinstance(model, ov.Model):
        return model
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.exists():
            raise UsageError(f"{path}: no such file")
        try:
            return core().read_model(str(path))
        except Exception as exc:  # OpenVINO raises its own RuntimeError subtypes
            raise QdqcError(f"{path}: OpenVINO cannot read it ({reason(exc)})") from None
    import onnx

    if isinstance(model, onnx.ModelProto):
        import tempfile

        # Core.read_model, not ov.convert_model: the latter's offline transformations give every
        # quantized FullyConnected the slower `FullyConnectedQuantizedLegacy` kernel (measured).
        with tempfile.TemporaryDirectory(prefix="qdqc-ov-") as folder:
            path = Path(folder) / "model.onnx"
            onnx.save(model, str(path))
            try:
                return core().read_model(str(path))
            except Exception as exc:
                raise QdqcError(f"OpenVINO cannot read the model ({reason(exc)})") from None
    raise UsageError(f"expected a path, an onnx.ModelProto or an openvino.Model, got {type(model).__name__}")


def compile_model(model, *, threads: int = 2, precision: Precision | str = Precision.DEFAULT,
                  profile: bool = False, device: str = "CPU"):
    """The compiled model, latency mode, `threads` inference threads, one stream."""
    from .config import choice

    precision = choice(Precision, precision, "precision")
    config = {"INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
    if precision is not Precision.DEFAULT:
        config["INFERENCE_PRECISION_HINT"] = precision.value
    if profile:
        config["PERF_COUNT"] = True
    try:
        return core().compile_model(read_model(model), device, config)
    except QdqcError:
        raise
    except Exception as exc:
        raise QdqcError(f"OpenVINO cannot compile the model ({reason(exc)})") from None


def input_specs(compiled) -> list[tuple[str, np.dtype, tuple]]:
    """(name, numpy dtype, shape with -1 for dynamic dims) per input, the bench's input form."""
    specs = []
    for port in compiled.inputs:
        shape = tuple(d.get_length() if d.is_static else -1 for d in port.get_partial_shape())
        specs.append((port.get_any_name(), np.dtype(port.get_element_type().to_dtype()), shape))
    return specs


class OpenVinoRunner:
    """One infer request; `runner(feeds)` runs it (outputs left in the request)."""

    def __init__(self, model, *, threads: int = 2, precision: Precision | str = Precision.DEFAULT,
                 profile: bool = False):
        self.compiled = compile_model(model, threads=threads, precision=precision, profile=profile)
        self.request = self.compiled.create_infer_request()
        self.inputs = input_specs(self.compiled)

    def __call__(self, feeds: dict) -> None:
        try:
            self.request.infer({name: feeds[name] for name, _, _ in self.inputs})
        except Exception as exc:
            raise QdqcError(f"OpenVINO failed: {reason(exc)}") from None

    def get_inputs(self):
        """onnxruntime's session interface (names only), so qdqc's evaluation code runs OpenVINO too."""
        from types import SimpleNamespace

        return [SimpleNamespace(name=name) for name, _, _ in self.inputs]

    def run(self, names, feeds: dict) -> list[np.ndarray]:
        """onnxruntime's `session.run(None, feeds)`: every output, copied out of the request."""
        return self.outputs(feeds)

    def outputs(self, feeds: dict) -> list[np.ndarray]:
        self(feeds)
        return [self.request.get_output_tensor(i).data.copy() for i in range(len(self.compiled.outputs))]

    def counters(self) -> list["LayerTime"]:
        """The last inference's performance counters (compile with profile=True)."""
        found = []
        for info in self.request.profiling_info:
            if info.status != info.Status.EXECUTED:
                continue
            found.append(LayerTime(info.node_name, info.node_type, info.exec_type,
                                   info.real_time.total_seconds() * 1000))
        return found


@dataclass(frozen=True)
class LayerTime:
    """One executed layer: its name, its type after the plugin's fusions, the kernel and precision
    it ran as (`exec_type`, e.g. 'brgemm_avx512_amx_I8' or 'jit_avx512_FP32') and milliseconds."""

    name: str
    type: str
    exec_type: str
    ms: float

    @property
    def precision(self) -> str:
        tail = self.exec_type.rsplit("_", 1)[-1].upper()
        return tail if tail in {"I8", "U8", "FP32", "F32", "BF16", "FP16", "F16", "I32", "I64"} else "-"


def save_ir(model, path: str | os.PathLike) -> Path:
    """Write `model` (an onnx.ModelProto, .onnx path or ov.Model) as OpenVINO IR: `path` (.xml) and
    its .bin. Float constants stay float32 (`compress_to_fp16=False`): the IR computes what the
    ONNX model does; each Q/DQ pair is one FakeQuantize, an int8 weight with its DequantizeLinear
    a compressed int8 constant."""
    path = Path(path)
    if path.suffix.lower() != ".xml":
        raise UsageError(f"{path}: an OpenVINO IR is written to a .xml file (with its .bin beside it)")
    check_ir_target(path, None)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise QdqcError(f"{path}: cannot write output (directory {parent} does not exist)")
    converted = read_model(model)
    try:
        openvino().save_model(converted, str(path), compress_to_fp16=False)
    except Exception as exc:
        raise QdqcError(f"{path}: OpenVINO cannot write it ({reason(exc)})") from None
    return path

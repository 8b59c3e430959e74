"""Running a serialized engine built by TensorRT or TensorRT-RTX (tensor API, execute_async_v3).

Imported only when a `.plan` is benchmarked. Device memory goes through cuda-python's runtime
bindings (the default, as TensorRT's own `samples/python/common_runtime.py` does) or through
pycuda when that is the one installed. Written against both APIs; it needs a GPU to run, which
this project's CI does not have, so only the choice of libraries and the error paths are tested.
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import numpy as np

from .errors import QdqcError

RUNTIME_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
INSTALL = {"tensorrt": "pip install 'qdqc[gpu]' (tensorrt and cuda-python, from NVIDIA's index)",
           "tensorrt-rtx": "pip install tensorrt-rtx cuda-python"}


class CudaPython:
    """cuda-python's runtime API (`cuda.bindings.runtime`)."""
    name = "cuda-python"

    def __init__(self, runtime):
        self.rt = runtime

    def _call(self, result):
        if int(result[0]) != 0:
            raise QdqcError(f"CUDA error {result[0]}: is there a usable GPU and driver?")
        return result[1] if len(result) > 1 else None

    def usable(self) -> bool:
        return int(self.rt.cudaFree(0)[0]) == 0

    def malloc(self, nbytes: int):
        return self._call(self.rt.cudaMalloc(nbytes))

    def free(self, pointer) -> None:
        self._call(self.rt.cudaFree(pointer))

    def address(self, pointer) -> int:
        return int(pointer)

    def stream(self):
        return self._call(self.rt.cudaStreamCreate())

    def stream_handle(self, stream) -> int:
        return int(stream)

    def upload(self, pointer, host: np.ndarray, stream) -> None:
        self._call(self.rt.cudaMemcpyAsync(pointer, host.ctypes.data, host.nbytes,
                                           self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def synchronize(self, stream) -> None:
        self._call(self.rt.cudaStreamSynchronize(stream))


class PyCuda:
    """pycuda's driver API, with a context on device 0 made on first use."""
    name = "pycuda"

    def __init__(self, driver):
        self.driver = driver
        self.context = None

    def usable(self) -> bool:
        try:
            self.driver.init()
            if self.driver.Device.count() < 1:
                return False
            self.context = self.context or self.driver.Device(0).make_context()
            return True
        except self.driver.Error:
            return False

    def malloc(self, nbytes: int):
        return self.driver.mem_alloc(nbytes)

    def free(self, pointer) -> None:
        pointer.free()

    def address(self, pointer) -> int:
        return int(pointer)

    def stream(self):
        return self.driver.Stream()

    def stream_handle(self, stream) -> int:
        return stream.handle

    def upload(self, pointer, host: np.ndarray, stream) -> None:
        self.driver.memcpy_htod_async(pointer, host, stream)

    def synchronize(self, stream) -> None:
        stream.synchronize()


def device_library():
    """cuda-python when it imports (the default), else pycuda; one line when neither does."""
    try:
        return CudaPython(importlib.import_module("cuda.bindings.runtime"))
    except ImportError:
        pass
    try:
        return PyCuda(importlib.import_module("pycuda.driver"))
    except ImportError:
        raise QdqcError("device memory needs cuda-python (pip install cuda-python) or pycuda") from None


def gpu_modules(purpose: str, backend: str = "tensorrt"):
    """The backend's module and a device library on a usable GPU, or one line saying what is missing."""
    try:
        trt = importlib.import_module(RUNTIME_MODULES[backend])
    except ImportError:
        raise QdqcError(f"{purpose} needs {'TensorRT-RTX' if backend == 'tensorrt-rtx' else 'TensorRT'}: "
                        f"{INSTALL[backend]} on a machine with a GPU") from None
    device = device_library()
    if not device.usable():  # fails fast, in one line, without a usable GPU
        raise QdqcError(f"no usable GPU: {purpose} ({backend}) needs an NVIDIA GPU and driver")
    return trt, device


def engine_backend(path: Path) -> str:
    """Which runtime reads this engine: the one `build-engine` recorded beside it, else the one installed
    (TensorRT first)."""
    from .engine_build import read_summary

    recorded = (read_summary(path) or {}).get("backend")
    if recorded in RUNTIME_MODULES:
        return recorded
    for backend, module in RUNTIME_MODULES.items():
        if importlib.util.find_spec(module) is not None:
            return backend
    return "tensorrt"


class EngineRunner:
    def __init__(self, path: Path, backend: str | None = None):
        self.backend = backend or engine_backend(Path(path))
        trt, self.device = gpu_modules(f"running {path}", self.backend)
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise QdqcError(f"{path}: {self.backend} cannot deserialize this engine (built by another version "
                            "or backend, or for another GPU?)")
        self.context = self.engine.create_execution_context()
        self.stream = self.device.stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.trt = trt
        self.inputs = [(n, np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))), tuple(self.engine.get_tensor_shape(n)))
                       for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self.buffers: dict[str, tuple[object, int]] = {}

    def _buffer(self, name: str, nbytes: int) -> int:
        pointer, size = self.buffers.get(name, (None, 0))
        if size < nbytes:
            if pointer is not None:
                self.device.free(pointer)
            pointer = self.device.malloc(nbytes)
            self.buffers[name] = (pointer, nbytes)
        return pointer

    def __call__(self, feeds: dict) -> None:
        for name, dtype, _ in self.inputs:
            host = np.ascontiguousarray(feeds[name], dtype=dtype)
            self.context.set_input_shape(name, host.shape)
            pointer = self._buffer(name, host.nbytes)
            self.device.upload(pointer, host, self.stream)
            self.context.set_tensor_address(name, self.device.address(pointer))
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            size = int(np.prod(shape)) * np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name))).itemsize
            self.context.set_tensor_address(name, self.device.address(self._buffer(name, max(size, 1))))
        if not self.context.execute_async_v3(self.device.stream_handle(self.stream)):
            raise QdqcError(f"{self.backend}: execute_async_v3 failed")
        self.device.synchronize(self.stream)

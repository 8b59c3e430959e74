"""Running a serialized TensorRT engine (TensorRT 10/11 tensor API, device memory through cuda-python).

Imported only when a `.plan` is benchmarked. Written against the TensorRT Python API (execute_async_v3,
set_tensor_address, set_input_shape) and cuda-python's runtime bindings, as TensorRT's own samples
(`samples/python/common_runtime.py`) do; untested here, where no GPU is available.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import QdqcError


def gpu_modules(purpose: str):
    """tensorrt and cuda-python's runtime on a usable GPU, or one line saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise QdqcError(f"{purpose} needs TensorRT: pip install 'qdqc[gpu]' (tensorrt and cuda-python, "
                        "from NVIDIA's index) on a machine with a GPU") from None
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        raise QdqcError(f"{purpose} needs cuda-python: pip install cuda-python") from None
    if int(cudart.cudaFree(0)[0]) != 0:  # fails fast, in one line, without a usable GPU
        raise QdqcError(f"no usable GPU: {purpose} needs an NVIDIA GPU and driver")
    return trt, cudart


def _check(result):
    error = result[0]
    if int(error) != 0:
        raise QdqcError(f"CUDA error {error}: is there a usable GPU and driver?")
    return result[1] if len(result) > 1 else None


class EngineRunner:
    def __init__(self, path: Path):
        trt, self.cudart = gpu_modules("running a TensorRT engine")
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise QdqcError(f"{path}: TensorRT cannot deserialize this engine (other version or GPU?)")
        self.context = self.engine.create_execution_context()
        self.stream = _check(self.cudart.cudaStreamCreate())
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.trt = trt
        self.inputs = [(n, np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))), tuple(self.engine.get_tensor_shape(n)))
                       for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self.buffers: dict[str, tuple[int, int]] = {}

    def _buffer(self, name: str, nbytes: int) -> int:
        pointer, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if pointer:
                _check(self.cudart.cudaFree(pointer))
            pointer = _check(self.cudart.cudaMalloc(nbytes))
            self.buffers[name] = (pointer, nbytes)
        return pointer

    def __call__(self, feeds: dict) -> None:
        kind = self.cudart.cudaMemcpyKind
        for name, dtype, _ in self.inputs:
            host = np.ascontiguousarray(feeds[name], dtype=dtype)
            self.context.set_input_shape(name, host.shape)
            pointer = self._buffer(name, host.nbytes)
            _check(self.cudart.cudaMemcpyAsync(pointer, host.ctypes.data, host.nbytes,
                                               kind.cudaMemcpyHostToDevice, self.stream))
            self.context.set_tensor_address(name, pointer)
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            size = int(np.prod(shape)) * np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name))).itemsize
            self.context.set_tensor_address(name, self._buffer(name, max(size, 1)))
        if not self.context.execute_async_v3(self.stream):
            raise QdqcError("TensorRT execute_async_v3 failed")
        _check(self.cudart.cudaStreamSynchronize(self.stream))

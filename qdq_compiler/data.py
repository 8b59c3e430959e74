"""Calibration data: npz files keyed by model input name, validated before any run.

A dataset is one .npz or a folder of .npz shards; every array has a leading
sample axis. Arrays are never unpickled.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx_graphsurgeon as gs

from .errors import QdqcError, UsageError

TRIMMABLE_MASK = "attention_mask"


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple  # ints for fixed dims, None/str for dynamic ones

    @classmethod
    def of(cls, tensor: gs.Variable) -> "InputSpec":
        return cls(tensor.name, np.dtype(tensor.dtype), tuple(tensor.shape or ()))


class Dataset:
    """Validated npz shards; iterates batches without holding more than one shard."""

    def __init__(self, path: str | Path, inputs: list[InputSpec]):
        self.path = Path(path)
        self.inputs = inputs
        if not self.path.exists():
            raise UsageError(f"{self.path}: no such file or directory")
        self.files = sorted(self.path.glob("*.npz")) if self.path.is_dir() else [self.path]
        if not self.files:
            raise UsageError(f"{self.path}: folder holds no .npz files")
        self.sizes = [self._validate(f) for f in self.files]
        self.samples = sum(self.sizes)
        if self.samples == 0:
            raise QdqcError(f"{self.path}: no samples (every array has a leading axis of 0)")

    def _open(self, file: Path):
        try:
            return np.load(file, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise QdqcError(f"{file}: not a readable .npz ({exc})") from None

    def _validate(self, file: Path) -> int:
        with self._open(file) as data:
            keys = set(data.files)
            expected = {spec.name for spec in self.inputs}
            if keys - expected:
                raise QdqcError(f"{file}: unexpected arrays {sorted(keys - expected)}; model inputs are {sorted(expected)}")
            if expected - keys:
                raise QdqcError(f"{file}: missing model inputs {sorted(expected - keys)}")
            sizes = set()
            for spec in self.inputs:
                try:
                    array = data[spec.name]
                except ValueError as exc:  # object arrays need pickle: refused
                    raise QdqcError(f"{file}: tensor '{spec.name}' cannot be read without pickle ({exc})") from None
                self._check_array(file, spec, array)
                sizes.add(array.shape[0])
            if len(sizes) != 1:
                raise QdqcError(f"{file}: arrays disagree on the number of samples ({sorted(sizes)})")
            return sizes.pop()

    @staticmethod
    def _check_array(file: Path, spec: InputSpec, array: np.ndarray) -> None:
        where = f"{file}: tensor '{spec.name}'"
        if array.dtype != spec.dtype:
            raise QdqcError(f"{where} is {array.dtype}, the model wants {spec.dtype}")
        if array.ndim != len(spec.shape):
            raise QdqcError(f"{where} has shape {array.shape}: the model wants rank {len(spec.shape)} "
                            f"{list(spec.shape)} with samples on axis 0")
        for axis, (have, want) in enumerate(zip(array.shape[1:], spec.shape[1:]), start=1):
            if isinstance(want, int) and want > 0 and have != want:
                raise QdqcError(f"{where} has shape {array.shape}: dimension {axis} must be {want}")
        if np.issubdtype(array.dtype, np.floating):
            bad = ~np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1)
            if bad.any():
                sample = int(np.flatnonzero(bad)[0])
                kind = "NaN" if np.isnan(array[sample]).any() else "Inf"
                raise QdqcError(f"{where}: sample {sample} contains {kind}")

    def batches(self, batch_size: int, limit: int | None = None, trim_padding: bool = True,
                select=lambda index: True) -> Iterator[dict[str, np.ndarray]]:
        """Batches of up to `batch_size` samples (the first `limit` samples), as model feeds."""
        remaining = self.samples if limit is None else min(limit, self.samples)
        index = 0
        for file, size in zip(self.files, self.sizes):
            if remaining <= 0:
                return
            with self._open(file) as data:
                arrays = {spec.name: data[spec.name] for spec in self.inputs}
            for start in range(0, min(size, remaining), batch_size):
                stop = min(start + batch_size, size, remaining)
                if select(index):
                    feeds = {name: array[start:stop] for name, array in arrays.items()}
                    yield trim(feeds) if trim_padding else feeds
                index += 1
            remaining -= min(size, remaining)


def trim(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop trailing sequence positions no sample in the batch attends to.

    Real tokens see the same inputs (BERT masks padding out of attention), and
    calibration then measures the activations of real tokens, not of padding.
    """
    mask = feeds.get(TRIMMABLE_MASK)
    if mask is None or mask.ndim != 2:
        return feeds
    used = np.flatnonzero(mask.any(axis=0))
    length = int(used[-1]) + 1 if used.size else 1
    if length == mask.shape[1]:
        return feeds
    return {name: (array[:, :length] if array.shape == mask.shape else array) for name, array in feeds.items()}

"""Calibration data: arrays keyed by model input name, validated before any run.

A dataset is one .npz or a folder of .npz shards, a text file tokenized on the way
(qdq_compiler/text.py), a dict name -> array, feed dicts, or an onnxruntime
CalibrationDataReader; every array has a leading sample axis. Arrays are never unpickled.
`open_data` is the one entry point the CLI and the Python API share.
"""
from __future__ import annotations

import contextlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

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
    """Validated npz shards (or in-memory arrays); iterates batches without holding more than one shard."""

    def __init__(self, path: str | Path, inputs: list[InputSpec]):
        self.path = Path(path)
        if not self.path.exists():
            raise UsageError(f"{self.path}: no such file or directory")
        files = sorted(self.path.glob("*.npz")) if self.path.is_dir() else [self.path]
        if not files:
            raise UsageError(f"{self.path}: folder holds no .npz files")
        self._setup(files, [str(f) for f in files], inputs)

    @classmethod
    def from_arrays(cls, shards: list[tuple[str, Mapping]], inputs: list[InputSpec], where: str = "data") -> "Dataset":
        """Arrays already in memory, one mapping name -> array per shard (`label` names it in errors)."""
        dataset = cls.__new__(cls)
        dataset.path = where
        if not shards:
            raise QdqcError(f"{where}: no samples (no batches)")
        sources = []
        for label, arrays in shards:
            if not isinstance(arrays, Mapping):
                raise UsageError(f"{label}: expected a dict of input name -> array, got {type(arrays).__name__}")
            sources.append({str(name): np.asarray(array) for name, array in arrays.items()})
        dataset._setup(sources, [label for label, _ in shards], inputs)
        return dataset

    def _setup(self, sources: list, labels: list[str], inputs: list[InputSpec]) -> None:
        self.inputs, self.files, self.labels = inputs, sources, labels
        self.sizes = [self._validate(source, label) for source, label in zip(sources, labels)]
        self.samples = sum(self.sizes)
        if self.samples == 0:
            raise QdqcError(f"{self.path}: no samples (every array has a leading axis of 0)")

    def _open(self, source):
        if isinstance(source, Mapping):
            return contextlib.nullcontext(source)
        try:
            return np.load(source, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise QdqcError(f"{source}: not a readable .npz ({exc})") from None

    def _validate(self, source, file: str) -> int:
        with self._open(source) as data:
            keys = set(data.keys())
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
    def _check_array(file: str, spec: InputSpec, array: np.ndarray) -> None:
        where = f"{file}: tensor '{spec.name}'"
        if array.dtype == object:
            raise QdqcError(f"{where} holds Python objects, not numbers")
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


def open_data(source, graph: gs.Graph, *, tokenizer=None, max_length: int | None = None, field: str = "text",
              option: str = "--data") -> Dataset:
    """A validated dataset for `graph` from any of the accepted sources:

    an .npz path or a folder of .npz shards; a .txt/.jsonl path with `tokenizer` (tokenized here,
    fitted to the model: qdq_compiler.text.fit_to_model); a dict name -> array (samples on axis 0;
    `calibration_data`'s result is fitted to the model too); an iterable of feed dicts, or an object
    with `get_next()` returning feed dicts then None (onnxruntime's CalibrationDataReader): each
    feed dict is one shard, so batches never mix them."""
    from .text import MAX_LENGTH, TEXT_SUFFIXES, TextData, calibration_data, fit_to_model

    inputs = [InputSpec.of(t) for t in graph.inputs]
    if isinstance(source, Dataset):
        return source
    if source is None:
        raise UsageError(f"{option}: no calibration data given")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        text = path.suffix in TEXT_SUFFIXES or (tokenizer is not None and path.is_file() and path.suffix != ".npz")
        if not text:
            if tokenizer is not None:
                raise UsageError(f"--tokenizer: {path} is not text (.txt, .jsonl); npz data is already tokenized")
            return Dataset(path, inputs)
        if tokenizer is None:
            raise UsageError(f"{path}: text data needs a tokenizer (--tokenizer DIR, the model's Hugging Face folder)")
        source = calibration_data(path, tokenizer, max_length=max_length or MAX_LENGTH, field=field)
    elif tokenizer is not None:
        raise UsageError("--tokenizer: applies to text files only (pass the text file's path as the data)")
    if isinstance(source, Mapping):
        if isinstance(source, TextData):
            return Dataset.from_arrays([(source.source, fit_to_model(source, graph))], inputs, source.source)
        return Dataset.from_arrays([("data", source)], inputs)
    if callable(getattr(source, "get_next", None)):
        feeds = list(iter(source.get_next, None))
        return Dataset.from_arrays([(f"reader batch {i}", f) for i, f in enumerate(feeds)], inputs, "the reader")
    if isinstance(source, Iterable) and not isinstance(source, (bytes, str)):
        feeds = list(source)
        return Dataset.from_arrays([(f"feed dict {i}", f) for i, f in enumerate(feeds)], inputs, "the feed dicts")
    raise UsageError(f"{option}: expected an npz path or folder, a text path with a tokenizer, a dict of arrays, "
                     f"feed dicts or a CalibrationDataReader; got {type(source).__name__}")

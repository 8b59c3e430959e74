"""Calibration data: arrays keyed by model input name, validated before any run.

A dataset is one .npz or a folder of .npz shards, a text file tokenized on the way
(qdq_compiler/text.py), a dict name -> array, feed dicts, or an onnxruntime
CalibrationDataReader; every array has a leading sample axis. Arrays are never unpickled.
`open_data` is the one entry point the CLI and the Python API share.
"""
from __future__ import annotations

import ast
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from .errors import QdqcError, UsageError

TRIMMABLE_MASK = "attention_mask"
# Deflate cannot expand more than about 1032:1; a member claiming more is corrupt (or a zip bomb)
MAX_DEFLATE_RATIO = 1100


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple | None  # ints for fixed dims, None/str for dynamic ones; None: the model does not say
    index_limit: int | None = None   # token ids: indices of an embedding table of this many rows
    binary: bool = False             # an attention mask: 0 or 1

    @classmethod
    def of(cls, tensor: gs.Variable) -> "InputSpec":
        return cls(tensor.name, np.dtype(tensor.dtype), None if tensor.shape is None else tuple(tensor.shape),
                   _table_rows(tensor),
                   tensor.name == TRIMMABLE_MASK)


def _table_rows(tensor: gs.Tensor) -> int | None:
    """The fewest rows of the constant tables this input indexes (Gather indices, through Casts)."""
    rows = []
    frontier = [tensor]
    while frontier:
        current = frontier.pop()
        for node in current.outputs:
            if node.op == "Cast" and node.inputs[0] is current:
                frontier.append(node.outputs[0])
            elif node.op == "Gather" and len(node.inputs) > 1 and node.inputs[1] is current \
                    and node.attrs.get("axis", 0) == 0 and isinstance(node.inputs[0], gs.Constant):
                rows.append(node.inputs[0].shape[0])
    return min(rows) if rows else None


class Arrays:
    """Arrays given in memory, read like an `Npz` (same checks, nothing to trust or allocate)."""

    def __init__(self, arrays: dict[str, np.ndarray], label: str):
        self.arrays, self.path = arrays, label

    @property
    def files(self) -> list[str]:
        return list(self.arrays)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def header(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        array = self.arrays[key]
        if array.dtype.hasobject:
            raise QdqcError(f"{self.path}: tensor '{key}' holds Python objects, not numbers")
        return tuple(array.shape), array.dtype

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]


class Npz:
    """An .npz read without pickle and without trusting its headers: every array's header is checked
    against the size its zip entry declares before anything is allocated (a header claiming 10^9
    elements in a small file is refused, not allocated)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.zip = zipfile.ZipFile(self.path)
            self.members = {info.filename[:-4]: info for info in self.zip.infolist() if info.filename.endswith(".npy")}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise QdqcError(f"{self.path}: not a readable .npz ({exc})") from None

    @property
    def files(self) -> list[str]:
        return list(self.members)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.zip.close()

    def header(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        """The shape and dtype an array declares, checked against its zip entry."""
        where = f"{self.path}: array '{key}'"
        info = self.members[key]
        try:
            with self.zip.open(info) as handle:
                version = np.lib.format.read_magic(handle)
                head = handle.read(2 if version[0] == 1 else 4)
                length = int.from_bytes(head, "little")
                if length > 1 << 20:
                    raise ValueError(f"header of {length} bytes")
                text = handle.read(length).decode("latin1" if version[0] < 3 else "utf8")
            fields = ast.literal_eval(text)
            shape, dtype = tuple(int(d) for d in fields["shape"]), np.dtype(fields["descr"])
        except (OSError, ValueError, TypeError, KeyError, SyntaxError, zipfile.BadZipFile, EOFError) as exc:
            raise QdqcError(f"{where}: not a readable .npy entry ({exc})") from None
        if dtype.hasobject:
            raise QdqcError(f"{where} holds Python objects: it cannot be read without pickle (refused)")
        if any(d < 0 for d in shape):
            raise QdqcError(f"{where}: negative dimension in shape {shape}")
        needed = int(np.prod(shape, dtype=object)) * dtype.itemsize
        stored = info.file_size - (len(np.lib.format.magic(*version)) + len(head) + length)
        if needed != stored:
            raise QdqcError(f"{where}: its header says {shape} {dtype} ({needed} bytes) but the file holds "
                            f"{stored} bytes (truncated or corrupt)")
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_DEFLATE_RATIO * max(info.compress_size, 1):
            raise QdqcError(f"{where}: declares {info.file_size} bytes from {info.compress_size} compressed (corrupt)")
        return shape, dtype

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.members:
            raise KeyError(key)
        self.header(key)
        try:
            with self.zip.open(self.members[key]) as handle:
                return np.lib.format.read_array(handle, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise QdqcError(f"{self.path}: array '{key}' cannot be read ({exc})") from None


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
            sources.append(Arrays({str(name): np.asarray(array) for name, array in arrays.items()}, label))
        dataset._setup(sources, [label for label, _ in shards], inputs)
        return dataset

    def _setup(self, sources: list, labels: list[str], inputs: list[InputSpec]) -> None:
        self.inputs, self.files, self.labels = inputs, sources, labels
        self.sizes = [self._validate(source, label) for source, label in zip(sources, labels)]
        self.samples = sum(self.sizes)
        if self.samples == 0:
            raise QdqcError(f"{self.path}: no samples (every array has a leading axis of 0)")

    def _open(self, source) -> "Npz | Arrays":
        return source if isinstance(source, Arrays) else Npz(source)

    def _validate(self, source, file: str) -> int:
        with self._open(source) as data:
            keys = set(data.files)
            expected = {spec.name for spec in self.inputs}
            if keys - expected:
                raise QdqcError(f"{file}: unexpected arrays {sorted(keys - expected)}; model inputs are {sorted(expected)}")
            if expected - keys:
                raise QdqcError(f"{file}: missing model inputs {sorted(expected - keys)}")
            sizes = set()
            for spec in self.inputs:
                shape, dtype = data.header(spec.name)   # checked before anything is read
                self._check_layout(file, spec, shape, dtype)
                array = data[spec.name]
                self._check_values(file, spec, array)
                sizes.add(array.shape[0])
            if len(sizes) != 1:
                raise QdqcError(f"{file}: arrays disagree on the number of samples ({sorted(sizes)})")
            return sizes.pop()

    @staticmethod
    def _check_layout(file: str, spec: InputSpec, shape: tuple, dtype: np.dtype) -> None:
        where = f"{file}: tensor '{spec.name}'"
        if dtype != spec.dtype:
            raise QdqcError(f"{where} is {dtype}, the model wants {spec.dtype}")
        if not shape:
            raise QdqcError(f"{where} is a scalar: samples go on axis 0")
        if 0 in shape[1:]:
            raise QdqcError(f"{where} has shape {shape}: an empty dimension (no tokens or features to run)")
        if spec.shape is None:
            return
        if len(shape) != len(spec.shape):
            raise QdqcError(f"{where} has shape {shape}: the model wants rank {len(spec.shape)} "
                            f"{list(spec.shape)} with samples on axis 0")
        for axis, (have, want) in enumerate(zip(shape[1:], spec.shape[1:]), start=1):
            if isinstance(want, int) and want > 0 and have != want:
                raise QdqcError(f"{where} has shape {shape}: dimension {axis} must be {want}")

    @staticmethod
    def _check_values(file: str, spec: InputSpec, array: np.ndarray) -> None:
        where = f"{file}: tensor '{spec.name}'"
        if not array.size:
            return
        rows = array.reshape(array.shape[0], -1)
        if np.issubdtype(array.dtype, np.floating):
            bad = ~np.isfinite(rows).all(axis=1)
            if bad.any():
                sample = int(np.flatnonzero(bad)[0])
                kind = "NaN" if np.isnan(array[sample]).any() else "Inf"
                raise QdqcError(f"{where}: sample {sample} contains {kind}")
        if spec.index_limit is not None:
            bad = ((rows < 0) | (rows >= spec.index_limit)).any(axis=1)
            if bad.any():
                sample = int(np.flatnonzero(bad)[0])
                value = rows[sample][(rows[sample] < 0) | (rows[sample] >= spec.index_limit)][0]
                raise QdqcError(f"{where}: sample {sample} has id {value}, outside the model's embedding table "
                                f"[0, {spec.index_limit})")
        if spec.binary:
            bad = ((rows != 0) & (rows != 1)).any(axis=1)
            if bad.any():
                sample = int(np.flatnonzero(bad)[0])
                value = rows[sample][(rows[sample] != 0) & (rows[sample] != 1)][0]
                raise QdqcError(f"{where}: sample {sample} has {value}; an attention mask holds only 0 and 1")

    def batches(self, batch_size: int, limit: int | None = None, trim_padding: bool = True,
                select=lambda index: True, whole: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """Batches of `batch_size` samples (the first `limit` samples; the last batch may be smaller,
        unless `whole`: a model with a fixed batch dimension gets only full batches), as model feeds.
        Batches span shard files."""
        remaining = self.usable(batch_size, limit, whole)
        trim_padding = trim_padding and self.trimmable
        index, pending, held = 0, [], 0

        def fits(part) -> bool:   # shards may differ in sequence length: only equal shapes share a batch
            return all(part[name].shape[1:] == pending[0][name].shape[1:] for name in part)

        def emit():
            feeds = pending[0] if len(pending) == 1 else \
                {name: np.concatenate([part[name] for part in pending]) for name in pending[0]}
            return trim(feeds) if trim_padding else feeds

        for file, label, size in zip(self.files, self.labels, self.sizes):
            if remaining <= 0:
                break
            take = min(size, remaining)
            remaining -= take
            with self._open(file) as data:
                arrays = {spec.name: data[spec.name] for spec in self.inputs}
            start = 0
            if pending and not fits({name: array[:0] for name, array in arrays.items()}):
                if whole:
                    raise QdqcError(f"{label}: its arrays' shapes differ from the previous shard's, so they cannot "
                                    f"share the model's fixed batch of {batch_size}")
                if select(index):
                    yield emit()
                index, pending, held = index + 1, [], 0
            while start < take:
                stop = min(start + batch_size - held, take)
                pending.append({name: array[start:stop] for name, array in arrays.items()})
                held += stop - start
                start = stop
                if held == batch_size:
                    if select(index):
                        yield emit()
                    index, pending, held = index + 1, [], 0
        if held and select(index):
            yield emit()

    def usable(self, batch_size: int, limit: int | None = None, whole: bool = False) -> int:
        """How many samples `batches` yields with these settings."""
        total = self.samples if limit is None else min(limit, self.samples)
        return total - total % batch_size if whole else total

    @property
    def trimmable(self) -> bool:
        """Padding can be trimmed when the model takes an attention mask with a dynamic sequence length."""
        mask = next((spec for spec in self.inputs if spec.name == TRIMMABLE_MASK), None)
        return mask is not None and mask.shape is not None and len(mask.shape) == 2 \
            and not (isinstance(mask.shape[1], int) and mask.shape[1] > 0)


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

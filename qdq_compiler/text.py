"""Calibration data from text: sentences tokenized into the int64 arrays a BERT-family model reads.

The `tokenizers` library does the work: a Hugging Face model folder's tokenizer.json, or its
vocab.txt (WordPiece, as BERT-family tokenizers build it). A `tokenizers.Tokenizer` or a
transformers tokenizer object is used as given (transformers only then). Every sample is
truncated and padded to `max_length`, as `tokenizer(texts, padding="max_length",
truncation=True, max_length=...)` does; calibration trims the trailing padding per batch.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import QdqcError, QdqcNote, UsageError

TEXT_SUFFIXES = (".txt", ".jsonl")
MAX_LENGTH = 128                                                     # tokens per sample by default
DEFAULT_NAMES = ("input_ids", "token_type_ids", "attention_mask")   # transformers' BERT tokenizers
_SPECIAL = {"unk_token": "[UNK]", "sep_token": "[SEP]", "cls_token": "[CLS]", "pad_token": "[PAD]"}


class TextData(dict):
    """Token arrays, name -> int64 [samples, max_length], with the tokenizer's vocabulary size
    (checked against the model's embedding table) and the number of empty texts skipped."""

    def __init__(self, arrays: dict[str, np.ndarray], *, vocab_size: int, skipped: int, source: str):
        super().__init__(arrays)
        self.vocab_size, self.skipped, self.source = vocab_size, skipped, source

    @property
    def samples(self) -> int:
        return len(next(iter(self.values())))


def read_texts(path: str | os.PathLike, field: str = "text") -> tuple[list[str], int]:
    """The non-empty texts of a .txt file (one per line) or a .jsonl file (`field` of each object),
    and how many empty ones were skipped."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file" if not path.exists() else f"{path}: not a text file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise QdqcError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise QdqcError(f"{path}: cannot read ({exc.strerror})") from None
    texts, skipped = [], 0
    for number, line in enumerate(lines, 1):
        if path.suffix == ".jsonl" and line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise QdqcError(f"{path}:{number}: not JSON ({exc.msg})") from None
            if not isinstance(record, dict) or field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise QdqcError(f"{path}:{number}: no field '{field}' (found {keys}); choose one with --field")
            line = record[field]
            if not isinstance(line, str):
                raise QdqcError(f"{path}:{number}: field '{field}' is {type(line).__name__}, not text")
        if line.strip():
            texts.append(line)
        else:
            skipped += 1
    return texts, skipped


def _config(folder: Path) -> dict:
    merged = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            merged.update(json.loads((folder / name).read_text()))
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            raise QdqcError(f"{folder / name}: not readable JSON ({exc})") from None
    return merged


def _token(config: dict, key: str) -> str:
    value = config.get(key) or _SPECIAL[key]
    return value["content"] if isinstance(value, dict) else value


def _word_piece(vocab: Path, config: dict):
    """The WordPiece pipeline of transformers' BERT tokenizers, from vocab.txt and tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    unk, sep, cls = (_token(config, k) for k in ("unk_token", "sep_token", "cls_token"))
    tokenizer = Tokenizer(models.WordPiece.from_file(str(vocab), unk_token=unk))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=config.get("tokenize_chinese_chars", True),
        strip_accents=config.get("strip_accents"), lowercase=config.get("do_lower_case", True))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    ids = {token: tokenizer.token_to_id(token) for token in (sep, cls)}
    if None in ids.values():
        raise QdqcError(f"{vocab}: no {[t for t, i in ids.items() if i is None][0]} token in the vocabulary")
    tokenizer.post_processor = processors.BertProcessing((sep, ids[sep]), (cls, ids[cls]))
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


class _Tokenizer:
    """One interface over a tokenizers.Tokenizer (padding and truncation set here) and a transformers object."""

    def __init__(self, tokenizer):
        self.names, self.pad_token, self.hf = list(DEFAULT_NAMES), None, None
        if isinstance(tokenizer, (str, os.PathLike)):
            self.tokenizer = self._from_folder(Path(tokenizer))
        elif type(tokenizer).__module__.startswith("tokenizers"):
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_str(tokenizer.to_str())   # a copy: the caller's keeps its settings
        elif callable(tokenizer) and hasattr(tokenizer, "model_input_names"):
            self.hf, self.names = tokenizer, list(tokenizer.model_input_names)
        else:
            raise UsageError(f"tokenizer: expected a folder, a tokenizers.Tokenizer or a transformers tokenizer, "
                             f"got {type(tokenizer).__name__}")

    def _from_folder(self, folder: Path):
        from tokenizers import Tokenizer

        if not folder.exists():
            raise UsageError(f"{folder}: no such tokenizer folder")
        if folder.is_file():
            folder, file = folder.parent, folder
        else:
            file = folder / "tokenizer.json"
        config = _config(folder)
        self.names = list(config.get("model_input_names") or DEFAULT_NAMES)
        self.pad_token = _token(config, "pad_token") if config else None
        if file.is_file():
            try:
                return Tokenizer.from_file(str(file))
            except Exception as exc:  # tokenizers raises its own exception type
                raise QdqcError(f"{file}: not a tokenizers file ({str(exc).splitlines()[0]})") from None
        if (folder / "vocab.txt").is_file():
            return _word_piece(folder / "vocab.txt", config)
        raise UsageError(f"{folder}: no tokenizer.json or vocab.txt (a Hugging Face model folder holds one)")

    @property
    def vocab_size(self) -> int:
        return len(self.hf) if self.hf is not None else self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: list[str], pairs: list[str] | None, max_length: int) -> dict[str, np.ndarray]:
        if self.hf is not None:
            batch = self.hf(texts, pairs, padding="max_length", truncation=True, max_length=max_length,
                            return_tensors="np")
            return {name: np.asarray(batch[name], np.int64) for name in self.names if name in batch}
        tokenizer = self.tokenizer
        padding = tokenizer.padding or {}
        pad_token = padding.get("pad_token") or self.pad_token or next(
            (t for t in ("[PAD]", "<pad>") if tokenizer.token_to_id(t) is not None), None)
        if pad_token is None or tokenizer.token_to_id(pad_token) is None:
            raise QdqcError(f"the tokenizer has no padding token ({pad_token or '[PAD]'} is not in its vocabulary)")
        tokenizer.enable_truncation(max_length)
        tokenizer.enable_padding(length=max_length, pad_id=tokenizer.token_to_id(pad_token), pad_token=pad_token,
                                 pad_type_id=padding.get("pad_type_id", 0))
        encodings = tokenizer.encode_batch(texts if pairs is None else list(zip(texts, pairs)))
        fields = {"input_ids": "ids", "token_type_ids": "type_ids", "attention_mask": "attention_mask"}
        return {name: np.array([getattr(e, fields[name]) for e in encodings], np.int64)
                for name in self.names if name in fields}


def calibration_data(texts: Iterable[str] | str | os.PathLike, tokenizer, *, max_length: int = MAX_LENGTH,
                     pairs: Iterable[str] | None = None, field: str = "text") -> TextData:
    """Token arrays for calibration: name -> int64 [samples, max_length], named as the tokenizer names them.

    `texts`: sentences, or the path of a .txt (one per line) or .jsonl file (`field` of each line).
    `tokenizer`: a Hugging Face model folder (tokenizer.json or vocab.txt), a `tokenizers.Tokenizer`,
    or a transformers tokenizer. `pairs`: second segments, one per text (sentence-pair models).
    Empty texts are skipped and counted (`.skipped` of the result)."""
    if max_length < 2:
        raise UsageError(f"--max-length must be at least 2, got {max_length}")
    source = "texts"
    if isinstance(texts, (str, os.PathLike)):
        if isinstance(texts, str) and ("\n" in texts or not Path(texts).exists()):
            raise UsageError(f"texts: {texts[:40]!r} is not a file: pass sentences as a list, or a file's path")
        source = str(texts)
        texts, skipped = read_texts(texts, field)
        if pairs is not None:
            raise UsageError("pairs: give the texts as a list when pairing them (a file's empty lines are skipped)")
    else:
        texts = list(texts)
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise UsageError(f"texts[{bad}] is {type(texts[bad]).__name__}, not str")
        if pairs is not None:
            pairs = list(pairs)
            if len(pairs) != len(texts):
                raise UsageError(f"pairs: {len(pairs)} for {len(texts)} texts (one second segment per text)")
            kept = [i for i, t in enumerate(texts) if t.strip()]
            pairs = [pairs[i] for i in kept]
        skipped = sum(not t.strip() for t in texts)
        texts = [t for t in texts if t.strip()]
    if not texts:
        raise QdqcError(f"{source}: no text (every line is empty)")
    wrapped = _Tokenizer(tokenizer)
    data = TextData(wrapped.encode(texts, pairs, max_length), vocab_size=wrapped.vocab_size, skipped=skipped,
                    source=source)
    if skipped:
        warnings.warn(f"{source}: skipped {skipped} empty line(s); {len(texts)} samples", QdqcNote, stacklevel=2)
    return data


# ---------------------------------------------------------------- checked against the model

_PASS_THROUGH = frozenset({"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten"})


def embedding_table(graph) -> tuple[str, int] | None:
    """The word-embedding table the `input_ids` input indexes (name, rows), if one is found."""
    from . import ir

    start = next((t for t in graph.inputs if t.name == "input_ids"), None)
    frontier = [start] if start is not None else []
    while frontier:
        tensor = frontier.pop()
        for node in tensor.outputs:
            if node.op == "Gather" and len(node.inputs) > 1 and node.inputs[1] is tensor:
                table = ir.constant(node.inputs[0])
                if table is not None and table.ndim == 2:
                    return node.inputs[0].name, table.shape[0]
            elif node.op in _PASS_THROUGH:
                frontier.extend(node.outputs)
    return None


def position_table(graph, word_table: str) -> tuple[str, int] | None:
    """The learned position-embedding table (name, rows): a 2-D constant as wide as the word table,
    gathered by indices that no input's values feed (position ids made from the sequence length:
    Range, or a stored table sliced by it). Position ids computed from the token values (RoBERTa's
    padding offset) are not recognized: such models are checked when they run."""
    from . import ir

    words = ir.constant(graph.tensors()[word_table])
    fed = set()
    frontier = list(graph.inputs)
    while frontier:
        tensor = frontier.pop()
        if id(tensor) not in fed:
            fed.add(id(tensor))
            frontier.extend(out for node in tensor.outputs if node.op != "Shape" for out in node.outputs)
    for node in graph.nodes:
        if node.op != "Gather" or len(node.inputs) < 2 or node.inputs[0].name == word_table:
            continue
        table = ir.constant(node.inputs[0])
        if table is not None and table.ndim == 2 and table.shape[1] == words.shape[1] \
                and id(node.inputs[1]) not in fed and table.shape[0] > 2:
            return node.inputs[0].name, table.shape[0]
    return None


def fit_to_model(data: TextData, graph) -> dict[str, np.ndarray]:
    """The arrays the model takes: a tokenizer larger than the embedding table is refused (a mismatched
    tokenizer reads the wrong rows, or past the table), so is a --max-length longer than the learned
    position table; arrays the model does not take are dropped with a note."""
    table = embedding_table(graph)
    if table is not None and data.vocab_size > table[1]:
        raise QdqcError(f"{data.source}: the tokenizer has {data.vocab_size} tokens but the model's embedding "
                        f"table '{table[0]}' has {table[1]} rows: a tokenizer for another model?")
    positions = position_table(graph, table[0]) if table is not None else None
    length = next(iter(data.values())).shape[1]
    if positions is not None and length > positions[1]:
        raise UsageError(f"--max-length {length}: the model's position table '{positions[0]}' has "
                         f"{positions[1]} rows; use --max-length {positions[1]} or less")
    names = {t.name for t in graph.inputs}
    dropped = sorted(set(data) - names)
    if dropped:
        warnings.warn(f"{data.source}: the model takes no {', '.join(dropped)}: dropped", QdqcNote, stacklevel=2)
    return {name: array for name, array in data.items() if name in names}


def save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """The arrays as an .npz, written atomically."""
    import io

    from . import ir

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    ir.write_bytes_atomic(path, buffer.getvalue())

"""Parse a model with TensorRT's ONNX parser, as shipped in TensorRT-RTX (PyPI `tensorrt-rtx`).

The RTX parser runs without a GPU, so it is a faithful parse check of the Q/DQ rules it
enforces (zero points, per-channel scale counts, types) — not proof that a real TensorRT
engine builds or fuses as hoped.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .errors import QdqcError


@dataclass(frozen=True)
class ParseResult:
    ok: bool
    errors: tuple[str, ...]
    layers: dict[str, int]          # "TYPE:DTYPE" -> count


def parse(path: str | Path) -> ParseResult:
    try:
        import tensorrt_rtx as trt
    except ImportError:
        raise QdqcError("--parse needs TensorRT's ONNX parser: pip install tensorrt-rtx") from None
    logger = trt.Logger(trt.Logger.INTERNAL_ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    ok = bool(parser.parse_from_file(str(path)))
    errors = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        errors.append(f"{error.node_name() or '<model>'}: {error.desc()}")
    layers = Counter()
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        kind = str(layer.type).rsplit(".", 1)[-1]
        dtype = str(layer.get_output(0).dtype).rsplit(".", 1)[-1] if layer.num_outputs else "-"
        layers[f"{kind}:{dtype}"] += 1
    return ParseResult(ok and not errors, tuple(errors), dict(layers))

"""Encoder-layer patterns as data: a registry of families, each its own module.

A pattern is a family name and a function that, anchored on one attention Softmax, walks the layer
around it and returns an `EncoderLayer` record (or fails with a reason). Every family returns the
same record, so it exposes the same named sites (`EncoderLayer.sites()`: qkv.input, q, k, v,
softmax.output, attention_output.input, ffn1.input, ffn2.input, residual1, residual2, output);
placement names every site `layer.<i>.<site>` from them, the modes cover sites by name
(`config.site_kind`), and recipes, the carried plan and the reports use those names whatever the family.
Adding a family is one module here that calls `register_pattern`, plus its test.
Matching never mutates the graph.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from typing import Callable

import onnx_graphsurgeon as gs

from .. import ir
from ..graph import GEMM_OPS
from .blocks import Walk, linear_at
from .records import EncoderLayer, EncoderMatch, NoMatch, Rejection

# the pattern modules, tried in this order on each Softmax
FAMILY_MODULES = ("bert_post_ln", "pre_ln", "modernbert", "deberta_v2")


@dataclass(frozen=True)
class LayerPattern:
    family: str
    description: str
    match: Callable[[dict[str, gs.Tensor], gs.Node, Walk], EncoderLayer]   # (tensors, softmax, walk)


PATTERNS: dict[str, LayerPattern] = {}


def register_pattern(pattern: LayerPattern) -> LayerPattern:
    if pattern.family in PATTERNS:
        raise ValueError(f"layer pattern '{pattern.family}' is already registered")
    PATTERNS[pattern.family] = pattern
    return pattern


def patterns() -> tuple[LayerPattern, ...]:
    for module in FAMILY_MODULES:
        importlib.import_module(f"{__name__}.{module}")
    return tuple(PATTERNS.values())


def match_layer(tensors: dict[str, gs.Tensor], softmax: gs.Node) -> tuple[EncoderLayer | None, Rejection | None]:
    """The first registered pattern that matches the layer around `softmax`, or why none did."""
    reasons, touched = [], []
    candidates = patterns()
    for pattern in candidates:
        walk = Walk(softmax)
        try:
            return pattern.match(tensors, softmax, walk), None
        except NoMatch as exc:
            reasons.append(str(exc) if len(candidates) == 1 else f"{pattern.family}: {exc}")
            touched += [g for g in walk.gemms if not any(g is t for t in touched)]
    return None, Rejection(softmax, "; ".join(reasons), tuple(touched))


def match_encoder(graph: gs.Graph) -> EncoderMatch:
    tensors = graph.tensors()
    order = {id(node): i for i, node in enumerate(graph.nodes)}
    layers, rejections = [], []
    for softmax in (n for n in graph.nodes if n.op == "Softmax"):
        layer, rejection = match_layer(tensors, softmax)
        if layer is not None:
            layers.append(layer)
        else:
            rejections.append(rejection)
    layers.sort(key=lambda layer: order[id(layer.attention.bmm1)])
    layers = [_renumber(layer, i) for i, layer in enumerate(layers)]
    claimed = set()
    for layer in layers:
        claimed |= {id(lin.node) for lin in layer.linears().values()}
        claimed |= {id(layer.attention.bmm1), id(layer.attention.bmm2)}
    kept_float = {id(gemm): f"layer {layer.index}: {why}" for layer in layers for gemm, why in layer.float_gemms}
    unmatched = []
    for node in graph.nodes:
        if node.op not in GEMM_OPS and node.op != "Conv" or id(node) in claimed:
            continue
        why = kept_float.get(id(node)) or next((f"attention block at {ir.describe(r.anchor)} rejected: {r.reason}"
                    for r in rejections if any(g is node for g in r.gemms)), None)
        if why is None:
            why = ("linear layer outside every matched encoder layer (e.g. embeddings projection, pooler or head)"
                   if linear_at(node) is not None else
                   "convolution outside every matched encoder layer (e.g. a patch embedding)" if node.op == "Conv" else
                   f"{node.op} with no constant 2-D weight and no Softmax next to it: not an attention matmul")
        unmatched.append((node, why))
    families = sorted({layer.family for layer in layers})
    return EncoderMatch(tuple(layers), tuple(rejections), tuple(unmatched), "+".join(families) or "none")


def _renumber(layer: EncoderLayer, index: int) -> EncoderLayer:
    return replace(layer, index=index)

"""DeBERTa-v2/v3 encoder layer: post-LayerNorm like BERT, with disentangled attention

    scores = Q·(K^T / s) + c2p + p2c,   c2p = gather(Q·Kr^T) / s,   p2c = gather(K·Qr^T)^T / s

(Kr, Qr: the relative-position embeddings through the key/query projections, constant in an
inference export; s = sqrt(head size · scale factor), computed from shapes), then the mask
(Where(mask, min, scores)) and the softmax.

The content GEMMs and the attention core are quantized at the FasterTransformer sites (Q and K^T
into the content matmul, the probabilities and V into the context matmul). The rule for the two
relative-position matmuls: they stay in float. They are 2 of the layer's 10 GEMMs, over a
[sequence x 2·buckets] table each, and their results are gathered and added to the scores in float
anyway; tests/test_families.py measures what quantizing them as well would cost (generic mode,
which quantizes every MatMul input).
"""
from __future__ import annotations

from dataclasses import replace

import onnx_graphsurgeon as gs

from .. import ir
from ..graph import MOVE_OPS, is_bmm, up
from . import LayerPattern, register_pattern
from .bert_post_ln import match_layer as match_post_ln
from .blocks import Walk
from .records import Attention, EncoderLayer, Linear

FAMILY = "deberta-v2"
RELATIVE_OPS = frozenset({"Add", "Div", "Mul", "Transpose", "GatherElements", "Reshape"})


def shape_scalar(tensor: gs.Tensor, depth: int = 12) -> bool:
    """A value computed from constants and tensor shapes only (DeBERTa's sqrt(head size · factor))."""
    if ir.is_constant(tensor):
        return True
    node = ir.producer(tensor)
    if node is None or depth == 0:
        return False
    if node.op == "Shape":
        return True
    return all(shape_scalar(t, depth - 1) for t in node.inputs if t.name)


class DisentangledWalk(Walk):
    """Walks DeBERTa's attention: scale by a shape-derived scalar, relative-position terms added to
    the content scores before the mask."""

    def __init__(self, anchor: gs.Node):
        super().__init__(anchor)
        self.relative: list[gs.Node] = []

    def projection(self, tensor: gs.Tensor, role: str) -> tuple[Linear, list[gs.Node]]:
        scales = []
        for _ in range(8):
            node = up(tensor)
            if node is not None and node.op in ("Mul", "Div") and shape_scalar(node.inputs[1]) \
                    and not ir.is_constant(node.inputs[0]):
                scales.append(node)
                tensor = node.inputs[0]
            elif node is not None and node.op == "Transpose":
                tensor = node.inputs[0]
            else:
                break
        linear, more = super().projection(tensor, role)
        return linear, scales + more

    def attention(self, softmax: gs.Node) -> tuple[Attention, list[Linear]]:
        tensor, mask, bmm1 = softmax.inputs[0], None, None
        for _ in range(8):
            node = self.score_producer(tensor)
            if is_bmm(node):
                bmm1 = node
                break
            if node.op == "Where" and len(node.inputs) == 3:
                mask, tensor = node, node.inputs[2]
            elif node.op in MOVE_OPS:
                tensor = node.inputs[0]
            elif node.op == "Add" and not any(ir.is_constant(t) for t in node.inputs):
                content = [t for t in node.inputs if is_bmm(up(t))]
                if len(content) != 1:
                    self.fail(f"cannot tell the content scores from the relative-position terms at {ir.describe(node)}")
                self.relative += relative_gemms(next(t for t in node.inputs if t is not content[0]))
                tensor = content[0]
            else:
                self.fail(f"softmax input comes from {ir.describe(node)}, not from Q·K^T plus relative terms")
        if bmm1 is None or len(self.relative) != 2:
            self.fail("no content matmul with two relative-position matmuls (c2p, p2c) added to it")
        return self.attention_around(bmm1, softmax, mask, [])


def relative_gemms(tensor: gs.Tensor) -> list[gs.Node]:
    """The batched matmuls behind the relative-position terms (through gathers, scales and adds)."""
    found, frontier, seen = [], [tensor], set()
    while frontier and len(seen) < 24:
        node = up(frontier.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if is_bmm(node):
            found.append(node)
        elif node.op in RELATIVE_OPS:
            frontier += [t for t in node.inputs[:1 if node.op == "GatherElements" else 2] if not ir.is_constant(t)]
    return found


def match_layer(tensors: dict[str, gs.Tensor], softmax: gs.Node, walk: Walk) -> EncoderLayer:
    inner = DisentangledWalk(softmax)
    try:
        layer = match_post_ln(tensors, softmax, inner)
    finally:
        for gemm in inner.gemms:
            walk.touch(gemm)
    return replace(layer, family=FAMILY, float_gemms=tuple(
        (gemm, "DeBERTa relative-position term: kept in float (patterns/deberta_v2.py)") for gemm in inner.relative))


PATTERN = register_pattern(LayerPattern(FAMILY, "DeBERTa-v2/v3: post-LN, disentangled attention", match_layer))

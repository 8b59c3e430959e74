"""Post-LayerNorm BERT encoder layer (BERT, RoBERTa, XLM-R, ALBERT, ELECTRA, MPNet, MiniLM, DistilBERT):

    x -> Q, K, V projections -> softmax(Q·K^T · scale + mask) · V -> attention output projection
      -> Add(x) -> LayerNorm = y -> FFN1 -> GELU -> FFN2 -> Add(y) -> LayerNorm = layer output

Anchored on the attention's Softmax; every block is one of patterns/blocks.py.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from .. import ir
from ..graph import origin
from .blocks import Walk, match_layer_norm
from .records import EncoderLayer
from . import LayerPattern, register_pattern

FAMILY = "bert-post-ln"


def match_layer(graph_tensors: dict[str, gs.Tensor], softmax: gs.Node, walk: Walk) -> EncoderLayer:
    t = graph_tensors
    attention, (query, key, value) = walk.attention(softmax)
    projections, layer_input = walk.projections(t, query, key, value)
    attn_out = walk.linear_reading(t[attention.context])
    attn_res = walk.residual(t, attn_out.output, "attention output projection")
    if origin(t[attn_res.skip]).name != layer_input:
        walk.fail("attention residual does not add the layer input (not a post-LayerNorm BERT layer)")
    attn_norm = match_layer_norm(t[attn_res.output])
    if attn_norm is None:
        walk.fail(f"attention residual {ir.describe(attn_res.add)} is not followed by a LayerNorm")
    ffn1, ffn2, activation = walk.gelu_ffn(t, t[attn_norm.output])
    ffn_res = walk.residual(t, ffn2.output, "FFN2")
    if origin(t[ffn_res.skip]) is not origin(t[attn_norm.output]):
        walk.fail("FFN residual does not add the attention LayerNorm output")
    ffn_norm = match_layer_norm(t[ffn_res.output])
    if ffn_norm is None:
        walk.fail(f"FFN residual {ir.describe(ffn_res.add)} is not followed by a LayerNorm")
    return EncoderLayer(0, layer_input, projections, attention, attn_out, attn_res, attn_norm,
                        ffn1, activation, ffn2, ffn_res, ffn_norm, family=FAMILY)


PATTERN = register_pattern(LayerPattern(FAMILY, "post-LayerNorm BERT-style encoder layer", match_layer))

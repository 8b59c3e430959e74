"""Pre-LayerNorm encoder layer (ViT, DeiT; the final LayerNorm after the last layer is outside it):

    x -> LayerNorm -> Q, K, V projections -> softmax(Q·K^T · scale + mask) · V -> attention output
      -> Add(x) = h -> LayerNorm -> FFN1 -> GELU -> FFN2 -> Add(h) = layer output

Anchored on the attention's Softmax; the layer input is what the first LayerNorm reads, the layer
output the second residual Add (the next layer's first LayerNorm, or the final one, reads it).
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from .. import ir
from ..graph import origin, uses
from .blocks import Walk, match_layer_norm
from .records import EncoderLayer, Norm
from . import LayerPattern, register_pattern

FAMILY = "pre-ln"


def norm_producing(tensor: gs.Tensor) -> Norm | None:
    """The LayerNorm whose output is `tensor` (the op, or its decomposition), else None."""
    node = ir.producer(tensor)
    if node is not None and node.op == "LayerNormalization":
        return Norm("op", (node,), node.inputs[0].name, tensor.name)
    for _ in range(4):   # up through the affine Mul/Add to the Div that normalizes the centred input
        if node is None or node.op not in ("Add", "Mul", "Div"):
            return None
        if node.op == "Div":
            sub = ir.producer(node.inputs[0])
            if sub is None or sub.op != "Sub":
                return None
            norm = match_layer_norm(sub.inputs[0])
            return norm if norm is not None and norm.output == tensor.name else None
        data = [t for t in node.inputs if not ir.is_constant(t)]
        if len(data) != 1:
            return None
        node = ir.producer(data[0])
    return None


def match_layer(t: dict[str, gs.Tensor], softmax: gs.Node, walk: Walk) -> EncoderLayer:
    attention, (query, key, value) = walk.attention(softmax)
    projections, qkv_input = walk.projections(t, query, key, value)
    attn_norm = norm_producing(t[qkv_input])
    if attn_norm is None:
        walk.fail("the projections do not read a LayerNorm (not a pre-LayerNorm layer)")
    layer_input = t[attn_norm.input]
    attn_out = walk.linear_reading(t[attention.context])
    attn_res = walk.residual(t, attn_out.output, "attention output projection")
    if origin(t[attn_res.skip]) is not origin(layer_input):
        walk.fail("attention residual does not add the first LayerNorm's input (not a pre-LayerNorm layer)")
    middle = t[attn_res.output]
    ffn_norm = match_layer_norm(middle)
    if ffn_norm is None:
        walk.fail(f"attention residual {ir.describe(attn_res.add)} does not feed a LayerNorm")
    ffn1, ffn2, activation = walk.gelu_ffn(t, t[ffn_norm.output])
    ffn_res = walk.residual(t, ffn2.output, "FFN2")
    if origin(t[ffn_res.skip]) is not origin(middle):
        walk.fail("FFN residual does not add the attention residual's sum")
    if not any(n is ffn_res.add for n, _ in uses(middle)) and origin(t[ffn_res.skip]) is not middle:
        walk.fail("FFN residual does not read the attention residual's sum")
    return EncoderLayer(0, layer_input.name, projections, attention, attn_out, attn_res, attn_norm,
                        ffn1, activation, ffn2, ffn_res, ffn_norm, family=FAMILY, norm_position="pre",
                        qkv_input=qkv_input)


PATTERN = register_pattern(LayerPattern(FAMILY, "pre-LayerNorm encoder layer (ViT, DeiT)", match_layer))

"""ModernBERT encoder layer: pre-LayerNorm (the first layer's attention norm is an identity, the
embeddings' LayerNorm stands in), one fused QKV projection, rotary position embeddings on Q and K,
GeGLU feed-forward, no biases; local (sliding-window) and global layers differ only in their mask:

    x -> [LayerNorm] -> Wqkv -> split -> rotary(Q), rotary(K), V -> softmax(Q·K^T · scale + mask) · V
      -> Wo -> Add(x) = h -> LayerNorm -> Wi -> (input, gate) -> GELU(input) · gate -> Wo -> Add(h)

The quantizers sit where FasterTransformer puts them: the batched matmuls read Q and K after the
rotation (the rotation itself stays in float), the GEMMs read their inputs.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from .. import ir
from ..graph import GEMM_OPS, MOVE_OPS, POINTWISE_OPS, RESHAPE_OPS, float_source, origin, up, uses
from .blocks import Walk, linear_at, match_layer_norm
from .pre_ln import norm_producing
from .records import Activation, EncoderLayer, Linear, NoMatch, Norm
from . import LayerPattern, register_pattern

FAMILY = "modernbert"
GLU_OPS = POINTWISE_OPS | RESHAPE_OPS | {"Slice", "Split"}


class RotaryWalk(Walk):
    """A walk whose projections see through a rotary embedding x·cos + rotate_half(x)·sin."""

    def projection(self, tensor: gs.Tensor, role: str) -> tuple[Linear, list[gs.Node]]:
        try:
            return super().projection(tensor, role)
        except NoMatch as direct:
            rotation = rotary_add(tensor)
            if rotation is None:
                raise
            for candidate in (t for mul in rotation for t in mul.inputs if not ir.is_constant(t)):
                try:
                    return super().projection(candidate, role)
                except NoMatch:
                    continue
            raise direct


def rotary_add(tensor: gs.Tensor) -> list[gs.Node] | None:
    """The two Muls of x·cos + rotate_half(x)·sin above `tensor` (through data movement), else None."""
    node = up(tensor)
    while node is not None and node.op in MOVE_OPS:
        node = up(node.inputs[0])
    if node is None or node.op != "Add":
        return None
    muls = [up(t) for t in node.inputs]
    if not all(m is not None and m.op == "Mul" for m in muls):
        return None
    rotated = [m for m in muls if any(up(t) is not None and up(t).op == "Concat" for t in m.inputs)]
    return [m for m in muls if not any(m is r for r in rotated)] if len(rotated) == 1 else None


def glu(ffn1: Linear, walk: Walk) -> tuple[Linear, Activation]:
    """FFN2 and the GeGLU between: both halves of FFN1's output meet in a Mul that FFN2 reads."""
    region, frontier, seen, ffn2 = [], [ffn1_output(ffn1)], set(), None
    while frontier:
        tensor = frontier.pop(0)
        for node, index in uses(tensor):
            walk.touch(node)
            if node.op in GEMM_OPS and index == 0 and linear_at(node) is not None:
                ffn2 = ffn2 or linear_at(node)
                continue
            if node.op in GLU_OPS and id(node) not in seen and len(seen) < 24:
                seen.add(id(node))
                region.append(node)
                frontier.extend(node.outputs)
    if ffn2 is None:
        walk.fail(f"FFN1 {ir.describe(ffn1.node)} output does not reach a second linear layer through a GLU")
    end = float_source(ffn2.node.inputs[0])
    ops = {n.op for n in region}
    if not ops & {"Slice", "Split"} or not ops & {"Erf", "Tanh", "Gelu", "Sigmoid"}:
        walk.fail(f"FFN1 {ir.describe(ffn1.node)}: no gated GELU (split halves, one through a GELU)")
    kind = "geglu-erf" if "Erf" in ops else "geglu-tanh" if "Tanh" in ops else "geglu"
    return ffn2, Activation(kind, tuple(region), ffn1.output, end.name)


def ffn1_output(linear: Linear) -> gs.Tensor:
    return linear.node.outputs[0] if linear.bias_add is None else linear.bias_add.outputs[0]


def match_layer(t: dict[str, gs.Tensor], softmax: gs.Node, walk: Walk) -> EncoderLayer:
    walk = RotaryWalk(softmax)
    attention, (query, key, value) = walk.attention(softmax)
    if not query.node is key.node is value.node:
        walk.fail("query, key and value do not come from one fused QKV projection")
    projections = (query,)
    qkv_input = origin(t[query.input])
    attention_norm = norm_producing(qkv_input)
    attn_out = walk.linear_reading(t[attention.context])
    attn_res = walk.residual(t, attn_out.output, "attention output projection")
    skip = origin(t[attn_res.skip])
    if skip is qkv_input:   # the first layer: its attention norm is an identity
        layer_input, attention_norm = qkv_input, Norm("identity", (), qkv_input.name, qkv_input.name)
    elif attention_norm is not None and skip is origin(t[attention_norm.input]):
        layer_input = t[attention_norm.input]
    else:
        walk.fail("attention residual adds neither the QKV input nor its LayerNorm's input")
    middle = t[attn_res.output]
    ffn_norm = match_layer_norm(middle)
    if ffn_norm is None:
        walk.fail(f"attention residual {ir.describe(attn_res.add)} does not feed a LayerNorm")
    ffn1 = walk.linear_reading(t[ffn_norm.output])
    ffn2, activation = glu(ffn1, walk)
    ffn_res = walk.residual(t, ffn2.output, "FFN2")
    if origin(t[ffn_res.skip]) is not origin(middle):
        walk.fail("FFN residual does not add the attention residual's sum")
    return EncoderLayer(0, layer_input.name, projections, attention, attn_out, attn_res, attention_norm,
                        ffn1, activation, ffn2, ffn_res, ffn_norm, family=FAMILY, norm_position="pre",
                        qkv_input=qkv_input.name)


PATTERN = register_pattern(LayerPattern(FAMILY, "ModernBERT: pre-LN, rotary, GeGLU", match_layer))

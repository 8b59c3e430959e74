"""onnxruntime's fused transformer ops (domain com.microsoft) restated in standard ONNX.

onnxruntime's transformer optimizer (`onnxruntime.transformers.optimizer`) rewrites
a BERT export into Attention, SkipLayerNormalization, BiasGelu, FastGelu,
EmbedLayerNormalization and MultiHeadAttention nodes. TensorRT has none of them
and qdqc's encoder matcher cannot see inside them, so each is rewritten here
into the standard ops it computes, with onnxruntime's exact semantics (defaults,
mask formats, mask_filter_value, scale, epsilon):

- projections become MatMul + bias Add per Q, K and V (the fused weight is cut
  into three constants), heads are Reshape + Transpose, the scores are
  MatMul -> Mul(scale) -> Add(mask) -> Softmax -> MatMul: the layout of an
  unfused export, so every FasterTransformer site exists again;
- SkipLayerNormalization is (input + bias) + skip -> LayerNormalization;
- BiasGelu / Gelu are the erf GELU, FastGelu the tanh one.

`DECOMPOSERS` maps an op type to its rewrite; `decompose(graph, node, ...)`
replaces one node in place and returns nothing, or raises `Unsupported` (a
one-line reason) when the node uses a feature outside what is restated here
(past / present state, rotary embeddings, packed-QKV inputs, 4-D masks).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from qdq_compiler import ir

DOMAIN = "com.microsoft"
DEFAULT_EPSILON = 1e-12            # SkipLayerNormalization / EmbedLayerNormalization schema default
DEFAULT_MASK_FILTER = -10000.0     # Attention / MultiHeadAttention schema default
SQRT1_2 = np.float32(0.7071067811865476)
TANH_GELU_A = np.float32(0.7978845608028654)          # sqrt(2 / pi)
TANH_GELU_B = np.float32(0.044715 * 0.7978845608028654)


class Unsupported(Exception):
    """The node uses a feature the decomposition does not restate; the message is one line."""


def _present(node: gs.Node, index: int) -> gs.Tensor | None:
    """Input `index` when it is given (optional inputs may be absent or named '')."""
    if index < len(node.inputs) and node.inputs[index].name:
        return node.inputs[index]
    return None


def _used(graph: gs.Graph, node: gs.Node, index: int) -> bool:
    """Whether output `index` is read by a node or is a graph output."""
    if index >= len(node.outputs) or not node.outputs[index].name:
        return False
    tensor = node.outputs[index]
    return bool(tensor.outputs) or any(t is tensor for t in graph.outputs)


class Builder:
    """Creates the nodes of one decomposition, named `{fused node's first output}::{role}` (node and output alike)."""

    def __init__(self, graph: gs.Graph, names: ir.Names, node: gs.Node, cache: dict):
        self.graph, self.names, self.cache = graph, names, cache
        self.base = node.outputs[0].name or node.name or node.op
        # the float type the node computes in (float16 models too): the first float input's
        self.dtype = next((t.dtype for t in node.inputs if t.dtype is not None
                           and np.issubdtype(np.dtype(t.dtype), np.floating)), np.float32)
        self.created: list[gs.Node] = []

    def const(self, role: str, value) -> gs.Constant:
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating):
            value = value.astype(self.dtype)
        return gs.Constant(self.names.fresh(f"{self.base}::{role}"), value)

    def op(self, op: str, inputs: list, role: str, attrs: dict | None = None, out: gs.Tensor | None = None,
           dtype=None) -> gs.Tensor:
        if out is None:
            out = gs.Variable(self.names.fresh(f"{self.base}::{role}"), dtype=dtype or self.dtype)
            name = out.name   # node and tensor names are separate namespaces: a made node shares its output's
        else:
            name = self.names.fresh(f"{self.base}::{role}")
        node = gs.Node(op, name, attrs=attrs or {}, inputs=inputs, outputs=[out])
        self.graph.nodes.append(node)
        self.created.append(node)
        return out

    # ------------------------------------------------------------ shared pieces

    def dim(self, tensor: gs.Tensor, axis: int, role: str) -> gs.Tensor:
        """Dimension `axis` of `tensor` as an int64 scalar (Shape -> Gather works from opset 13)."""
        shape = self.op("Shape", [tensor], f"{role}_shape", dtype=np.int64)
        return self.op("Gather", [shape, self.const(f"{role}_axis", np.int64(axis))], role, {"axis": 0},
                       dtype=np.int64)

    def unsqueeze(self, tensor: gs.Tensor, axes: list[int], role: str, dtype=None) -> gs.Tensor:
        if self.graph.opset >= 13:
            return self.op("Unsqueeze", [tensor, self.const(f"{role}_axes", np.array(axes, np.int64))], role,
                           dtype=dtype or tensor.dtype)
        return self.op("Unsqueeze", [tensor], role, {"axes": axes}, dtype=dtype or tensor.dtype)

    def layer_norm(self, x: gs.Tensor, gamma: gs.Tensor, beta: gs.Tensor | None, epsilon: float,
                   out: gs.Tensor, role: str = "layernorm") -> None:
        """LayerNormalization over the last axis (the op from opset 17, its standard expansion before)."""
        if self.graph.opset >= 17:
            inputs = [x, gamma] + ([beta] if beta is not None else [])
            self.op("LayerNormalization", inputs, role, {"axis": -1, "epsilon": float(epsilon)}, out=out)
            return
        reduce = {"axes": [-1], "keepdims": 1}
        mean = self.op("ReduceMean", [x], f"{role}_mean", reduce)
        centered = self.op("Sub", [x, mean], f"{role}_centered")
        square = self.op("Pow", [centered, self.const(f"{role}_two", np.float32(2.0))], f"{role}_square")
        var = self.op("ReduceMean", [square], f"{role}_var", reduce)
        var_eps = self.op("Add", [var, self.const(f"{role}_eps", np.float32(epsilon))], f"{role}_var_eps")
        std = self.op("Sqrt", [var_eps], f"{role}_std")
        normed = self.op("Div", [centered, std], f"{role}_normed")
        if beta is None:
            self.op("Mul", [normed, gamma], f"{role}_scaled", out=out)
        else:
            scaled = self.op("Mul", [normed, gamma], f"{role}_scaled")
            self.op("Add", [scaled, beta], f"{role}_shifted", out=out)

    def gelu_erf(self, x: gs.Tensor, out: gs.Tensor) -> None:
        """0.5 * x * (1 + erf(x / sqrt(2))): onnxruntime's Gelu / BiasGelu."""
        inner = self.op("Mul", [x, self.const("gelu_rsqrt2", SQRT1_2)], "gelu_inner")
        erf = self.op("Erf", [inner], "gelu_erf")
        one_plus = self.op("Add", [erf, self.const("gelu_one", np.float32(1.0))], "gelu_one_plus")
        half_x = self.op("Mul", [x, self.const("gelu_half", np.float32(0.5))], "gelu_half_x")
        self.op("Mul", [half_x, one_plus], "gelu", out=out)

    def gelu_tanh(self, x: gs.Tensor, out: gs.Tensor) -> None:
        """x * (0.5 + 0.5 * tanh(x * (a + b * x * x))): onnxruntime's FastGelu."""
        square = self.op("Mul", [x, x], "gelu_square")
        poly = self.op("Mul", [square, self.const("gelu_b", TANH_GELU_B)], "gelu_poly")
        poly = self.op("Add", [poly, self.const("gelu_a", TANH_GELU_A)], "gelu_poly_a")
        inner = self.op("Mul", [x, poly], "gelu_inner")
        tanh = self.op("Tanh", [inner], "gelu_tanh")
        half = self.op("Mul", [tanh, self.const("gelu_half", np.float32(0.5))], "gelu_half_tanh")
        half = self.op("Add", [half, self.const("gelu_half_b", np.float32(0.5))], "gelu_half_plus")
        self.op("Mul", [x, half], "gelu", out=out)


# ---------------------------------------------------------------- attention

def _additive_mask(b: Builder, mask: gs.Tensor | None, key: gs.Tensor, filter_value: float,
                   unidirectional: bool) -> gs.Tensor | None:
    """The float mask added to the scaled scores, broadcastable to (batch, heads, query, key); None when
    nothing is masked. Shared by every attention node reading the same mask with the same settings."""
    rank = len(mask.shape) if mask is not None and mask.shape is not None else None
    if mask is not None and rank not in (1, 2, 3):
        raise Unsupported(f"mask of rank {rank} (supported: 1-D sequence lengths, 2-D or 3-D 0/1 masks)")
    cache_key = (id(mask), id(key) if mask is not None and rank == 1 or unidirectional else None,
                 float(filter_value), unidirectional)
    if cache_key in b.cache:
        return b.cache[cache_key]
    zero, fill = b.const("mask_zero", np.float32(0.0)), b.const("mask_fill", np.float32(filter_value))
    additive = None
    if mask is not None and rank == 1:
        # right padding: mask_index[b] is the length of sequence b; later key positions are masked
        if mask.shape[0] is not None and isinstance(mask.shape[0], int) and key.shape is not None \
                and isinstance(key.shape[0], int) and mask.shape[0] != key.shape[0]:
            raise Unsupported(f"1-D mask of {mask.shape[0]} entries for batch {key.shape[0]} "
                              "(left-padding start/end positions are not supported)")
        # integer positions: a float Range would become float16 in the TensorRT lowering, which TensorRT refuses
        positions = b.op("Range", [b.const("mask_start", np.int64(0)), b.dim(key, 1, "mask_keys"),
                                   b.const("mask_step", np.int64(1))], "mask_positions", dtype=np.int64)
        ends = b.op("Cast", [mask], "mask_ends", {"to": 7}, dtype=np.int64)
        ends = b.unsqueeze(ends, [1], "mask_ends_column")
        valid = b.op("Less", [positions, ends], "mask_valid", dtype=np.bool_)
        additive = b.op("Where", [valid, zero, fill], "mask_additive")
        additive = b.unsqueeze(additive, [1, 2], "mask_heads")
    elif mask is not None:
        # raw mask: a position is kept where the mask is > 0
        valid = b.op("Greater", [mask, b.const("mask_threshold", np.zeros((), mask.dtype or np.int32))],
                     "mask_valid", dtype=np.bool_)
        additive = b.op("Where", [valid, zero, fill], "mask_additive")
        additive = b.unsqueeze(additive, [1, 2] if rank == 2 else [1], "mask_heads")
    if unidirectional:
        # every query position t attends to key positions <= t (no past state: query and key lengths agree)
        positions = b.op("Range", [b.const("causal_start", np.int64(0)), b.dim(key, 1, "causal_keys"),
                                   b.const("causal_step", np.int64(1))], "causal_positions", dtype=np.int64)
        rows = b.unsqueeze(positions, [1], "causal_rows")
        future = b.op("Greater", [positions, rows], "causal_future", dtype=np.bool_)
        causal = b.op("Where", [future, fill, zero], "causal_additive")
        additive = causal if additive is None else b.op("Add", [additive, causal], "mask_causal")
    b.cache[cache_key] = additive
    return additive


def _heads(b: Builder, x: gs.Tensor, num_heads: int, head_size: int, perm: list[int], role: str) -> gs.Tensor:
    shaped = b.op("Reshape", [x, b.const(f"{role}_heads_shape", np.array([0, 0, num_heads, head_size], np.int64))],
                  f"{role}_heads")
    return b.op("Transpose", [shaped], f"{role}_transposed", {"perm": perm})


def _attend(b: Builder, q: gs.Tensor, k: gs.Tensor, v: gs.Tensor, *, key_input: gs.Tensor, num_heads: int,
            sizes: tuple[int, int, int], scale: float | None, mask: gs.Tensor | None, filter_value: float,
            unidirectional: bool, attention_bias: gs.Tensor | None, out: gs.Tensor) -> None:
    """softmax(scale * Q·K^T + mask + bias)·V per head, from the projected (batch, seq, hidden) Q, K, V."""
    q_size, k_size, v_size = sizes
    if q_size != k_size or q_size % num_heads or v_size % num_heads:
        raise Unsupported(f"hidden sizes {sizes} do not split into {num_heads} heads")
    head, v_head = q_size // num_heads, v_size // num_heads
    qh = _heads(b, q, num_heads, head, [0, 2, 1, 3], "query")
    kt = _heads(b, k, num_heads, head, [0, 2, 3, 1], "key")
    vh = _heads(b, v, num_heads, v_head, [0, 2, 1, 3], "value")
    scores = b.op("MatMul", [qh, kt], "scores")
    factor = np.float32(1.0) / np.sqrt(np.float32(head)) if not scale else np.float32(scale)
    scores = b.op("Mul", [scores, b.const("scale", factor)], "scaled")
    additive = _additive_mask(b, mask, key_input, filter_value, unidirectional)
    if additive is not None:
        scores = b.op("Add", [scores, additive], "masked")
    if attention_bias is not None:
        scores = b.op("Add", [scores, attention_bias], "biased")
    probs = b.op("Softmax", [scores], "probs", {"axis": -1})
    context = b.op("MatMul", [probs, vh], "context")
    context = b.op("Transpose", [context], "context_transposed", {"perm": [0, 2, 1, 3]})
    b.op("Reshape", [context, b.const("context_shape", np.array([0, 0, v_size], np.int64))], "context_merged",
         out=out)


def _attention_settings(node: gs.Node) -> tuple[int, float | None, float, bool]:
    num_heads = node.attrs.get("num_heads")
    if not num_heads:
        raise Unsupported("no num_heads attribute")
    for name in ("do_rotary", "past_present_share_buffer"):
        if node.attrs.get(name, 0):
            raise Unsupported(f"{name}=1 is not supported")
    return (int(num_heads), node.attrs.get("scale"), float(node.attrs.get("mask_filter_value", DEFAULT_MASK_FILTER)),
            bool(node.attrs.get("unidirectional", 0)))


def attention(graph: gs.Graph, node: gs.Node, b: Builder) -> None:
    """Attention(input, weights, bias, mask_index, past, attention_bias, past_sequence_length)."""
    if _present(node, 4) is not None or _present(node, 6) is not None or _used(graph, node, 1):
        raise Unsupported("past / present state is not supported (encoder self-attention only)")
    num_heads, scale, filter_value, unidirectional = _attention_settings(node)
    x, weights = node.inputs[0], ir.constant(node.inputs[1])
    if weights is None or weights.ndim != 2:
        raise Unsupported("the merged QKV weight is not a constant 2-D tensor")
    bias = ir.constant(node.inputs[2]) if _present(node, 2) is not None else None
    if _present(node, 2) is not None and bias is None:
        raise Unsupported("the merged QKV bias is not a constant")
    sizes = tuple(int(s) for s in node.attrs.get("qkv_hidden_sizes", [])) or (weights.shape[1] // 3,) * 3
    if len(sizes) != 3 or sum(sizes) != weights.shape[1] or (bias is not None and bias.shape != (sum(sizes),)):
        raise Unsupported(f"qkv_hidden_sizes {list(sizes)} do not match the weight's {weights.shape[1]} columns")
    projected, start = [], 0
    for role, size in zip(("query", "key", "value"), sizes):
        gemm = b.op("MatMul", [x, b.const(f"{role}_weight", np.ascontiguousarray(weights[:, start:start + size]))],
                    f"{role}_matmul")
        if bias is not None:
            gemm = b.op("Add", [gemm, b.const(f"{role}_bias", np.ascontiguousarray(bias[start:start + size]))],
                        f"{role}_bias_add")
        projected.append(gemm)
        start += size
    _attend(b, *projected, key_input=x, num_heads=num_heads, sizes=sizes, scale=scale, mask=_present(node, 3),
            filter_value=filter_value, unidirectional=unidirectional, attention_bias=_present(node, 5),
            out=node.outputs[0])


def multi_head_attention(graph: gs.Graph, node: gs.Node, b: Builder) -> None:
    """MultiHeadAttention(query, key, value, bias, key_padding_mask, attention_bias, past_key, past_value, ...),
    3-D query / key / value only (not the packed or head-major formats)."""
    if any(_present(node, i) is not None for i in range(6, len(node.inputs))) \
            or any(_used(graph, node, i) for i in (1, 2, 3)):
        raise Unsupported("past / present state and the qk output are not supported")
    num_heads, scale, filter_value, unidirectional = _attention_settings(node)
    query, key, value = node.inputs[0], _present(node, 1), _present(node, 2)
    if key is None or value is None:
        raise Unsupported("packed QKV / KV inputs are not supported (give query, key and value)")
    shapes = [t.shape for t in (query, key, value)]
    if any(s is None or len(s) != 3 or not isinstance(s[2], int) for s in shapes):
        raise Unsupported("query, key and value must be 3-D (batch, sequence, hidden) with a known hidden size")
    sizes = tuple(int(s[2]) for s in shapes)
    projected = [query, key, value]
    if _present(node, 3) is not None:
        bias = ir.constant(node.inputs[3])
        if bias is None or bias.shape != (sum(sizes),):
            raise Unsupported("the bias is not a constant of query + key + value hidden sizes")
        start = 0
        for index, (role, size) in enumerate(zip(("query", "key", "value"), sizes)):
            projected[index] = b.op("Add", [projected[index], b.const(f"{role}_bias",
                                    np.ascontiguousarray(bias[start:start + size]))], f"{role}_bias_add")
            start += size
    _attend(b, *projected, key_input=key, num_heads=num_heads, sizes=sizes, scale=scale, mask=_present(node, 4),
            filter_value=filter_value, unidirectional=unidirectional, attention_bias=_present(node, 5),
            out=node.outputs[0])


# ---------------------------------------------------------------- normalization and activations

def skip_layer_norm(graph: gs.Graph, node: gs.Node, b: Builder) -> None:
    """SkipLayerNormalization(input, skip, gamma, beta, bias) -> LayerNorm(input + bias + skip)."""
    if _used(graph, node, 1) or _used(graph, node, 2):
        raise Unsupported("the mean / inv_std_var outputs are not supported")
    x, skip, gamma = node.inputs[0], node.inputs[1], node.inputs[2]
    beta, bias = _present(node, 3), _present(node, 4)
    if bias is not None:
        x = b.op("Add", [x, bias], "bias_add")
    total = node.outputs[3] if _used(graph, node, 3) else None
    total = b.op("Add", [x, skip], "residual", out=total)
    b.layer_norm(total, gamma, beta, node.attrs.get("epsilon", DEFAULT_EPSILON), node.outputs[0])


def bias_gelu(graph: gs.Graph, node: gs.Node, b: Builder) -> None:
    b.gelu_erf(b.op("Add", [node.inputs[0], node.inputs[1]], "bias_add"), node.outputs[0])


def gelu(graph: gs.Graph, node: gs.Node, b: Builder) -> None:
    b.gelu_erf(node.inputs[0], node.outputs[0])


def fast_gelu(graph: gs.Graph, node: gs.Node, b: Builder) -> None:
    x = node.inputs[0]
    if _present(node, 1) is not None:
        x = b.op("Add", [x, node.inputs[1]], "bias_add")
    b.gelu_tanh(x, node.outputs[0])


def embed_layer_norm(graph: gs.Graph, node: gs.Node, b: Builder) -> None:
    """EmbedLayerNormalization(input_ids, segment_ids, word, position, segment embeddings, gamma, beta, mask,
    position_ids) -> LayerNorm(word[ids] + position[positions] + segment[segment_ids]); mask_index is the count
    of ones in each mask row (zeros without a mask)."""
    ids, segment_ids = node.inputs[0], _present(node, 1)
    word, position, segment = node.inputs[2], node.inputs[3], _present(node, 4)
    gamma, beta, mask, position_ids = node.inputs[5], node.inputs[6], _present(node, 7), _present(node, 8)
    if (segment_ids is None) != (segment is None):
        raise Unsupported("segment_ids and segment_embedding must be given together")
    total = b.op("Gather", [word, ids], "word", {"axis": 0})
    if position_ids is None:
        length = b.dim(ids, 1, "sequence")
        position_ids = b.op("Range", [b.const("position_start", np.int64(0)), length,
                                      b.const("position_step", np.int64(1))], "positions", dtype=np.int64)
    total = b.op("Add", [total, b.op("Gather", [position, position_ids], "position", {"axis": 0})], "word_position")
    if segment is not None:
        total = b.op("Add", [total, b.op("Gather", [segment, segment_ids], "segment", {"axis": 0})],
                     "embedding_sum", out=node.outputs[2] if _used(graph, node, 2) else None)
    elif _used(graph, node, 2):
        total = b.op("Identity", [total], "embedding_sum", out=node.outputs[2])
    b.layer_norm(total, gamma, beta, node.attrs.get("epsilon", DEFAULT_EPSILON), node.outputs[0])
    if _used(graph, node, 1):
        target = node.outputs[1]
        target.dtype, target.shape = np.int32, [ids.shape[0] if ids.shape else None]
        if mask is not None:
            ones = b.op("Equal", [mask, b.const("mask_one", np.ones((), mask.dtype or np.int32))], "mask_ones",
                        dtype=np.bool_)
            ones = b.op("Cast", [ones], "mask_ones_float", {"to": 1}, dtype=np.float32)
            count = _reduce_sum_rows(b, ones)
            b.op("Cast", [count], "mask_index", {"to": 6}, out=target)
        else:
            batch = b.unsqueeze(b.dim(ids, 0, "batch"), [0], "batch_shape")
            b.op("ConstantOfShape", [batch], "mask_index", {"value": gs.Constant("zero", np.zeros(1, np.int32))},
                 out=target)


def _reduce_sum_rows(b: Builder, x: gs.Tensor) -> gs.Tensor:
    if b.graph.opset >= 13:
        return b.op("ReduceSum", [x, b.const("mask_axes", np.array([1], np.int64))], "mask_count",
                    {"keepdims": 0}, dtype=np.float32)
    return b.op("ReduceSum", [x], "mask_count", {"axes": [1], "keepdims": 0}, dtype=np.float32)


DecomposeFn = Callable[[gs.Graph, gs.Node, Builder], None]
DECOMPOSERS: dict[str, DecomposeFn] = {
    "Attention": attention,
    "MultiHeadAttention": multi_head_attention,
    "SkipLayerNormalization": skip_layer_norm,
    "BiasGelu": bias_gelu,
    "Gelu": gelu,
    "FastGelu": fast_gelu,
    "EmbedLayerNormalization": embed_layer_norm,
}


def decompose(graph: gs.Graph, node: gs.Node, names: ir.Names, cache: dict) -> list[gs.Node]:
    """Replace the com.microsoft `node` by standard ops computing the same outputs; returns the nodes made.

    Raises `Unsupported` (and leaves the graph as it was) when the node uses a feature not restated here;
    `KeyError` for an op with no decomposition."""
    fn = DECOMPOSERS[node.op]
    before = len(graph.nodes)
    b = Builder(graph, names, node, cache)
    try:
        fn(graph, node, b)
    except Unsupported:
        # a shared mask built for this node is discarded with it: forget it
        made = {id(t) for m in b.created for t in m.outputs}
        for key in [k for k, v in cache.items() if id(v) in made]:
            del cache[key]
        del graph.nodes[before:]
        for created in b.created:
            created.inputs.clear()
            created.outputs.clear()
        raise
    # the new nodes produce the fused node's outputs now: detach it
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes = [n for n in graph.nodes if n is not node]  # by identity: equal-looking nodes are distinct
    return b.created

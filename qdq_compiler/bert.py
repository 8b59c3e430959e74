"""Declarative BERT encoder-layer matcher.

`match_encoder(graph)` never mutates the graph: it anchors on each Softmax,
walks the attention block and the feed-forward block around it and returns one
`EncoderLayer` record per matched layer, plus the reason every other GEMM was
not taken. Walks see through Q/DQ pairs, so QAT exports match too.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import onnx_graphsurgeon as gs

from . import ir

MOVE_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Cast", "Identity",
                      "Dropout", "QuantizeLinear", "DequantizeLinear", "Split", "Slice", "Gather"})
POINTWISE_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Erf", "Tanh", "Sigmoid", "Gelu", "Relu",
                           "Sqrt", "Cast", "QuantizeLinear", "DequantizeLinear", "FastGelu", "BiasGelu"})
GEMM_OPS = frozenset({"MatMul", "Gemm"})
RESHAPE_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
# only rearrange elements: they commute with per-tensor quantization
LAYOUT_OPS = RESHAPE_OPS | {"Transpose"}


# ---------------------------------------------------------------- records

# Records hold the graph's nodes themselves: node names may be empty or repeated (legal ONNX), so
# nodes are compared by identity (eq=False) and named only in messages and reports (`ir.describe`).

@dataclass(frozen=True, eq=False)
class Linear:
    """A linear layer: MatMul(+Add bias) or Gemm, with a constant 2-D weight."""

    node: gs.Node
    op: str
    input: str                    # activation tensor read by the GEMM
    weight: str                   # the constant (float, or int8 under an existing DQ)
    weight_axis: int              # output-channel axis of that constant
    weight_user: tuple[gs.Node, int]  # (node, input index) that reads the constant
    gemm_output: str              # GEMM result before the bias
    bias_add: gs.Node | None
    output: str                   # after the bias
    weight_quantized: bool = False


@dataclass(frozen=True, eq=False)
class Attention:
    bmm1: gs.Node
    query: str        # BMM1 input A (Q)
    key: str          # BMM1 input B (K^T)
    scores: str       # BMM1 output, before scale and mask
    scale: tuple[gs.Node, ...]   # Mul/Div nodes applying 1/sqrt(d) ("folded" when empty)
    scale_position: str      # after_bmm | before_bmm | folded
    mask: gs.Node | None     # Add or Where node
    softmax: gs.Node
    probs: str        # BMM2 input A
    bmm2: gs.Node
    value: str        # BMM2 input B
    context: str      # BMM2 output


@dataclass(frozen=True, eq=False)
class Residual:
    add: gs.Node
    skip: str    # tensor from the layer input (the residual branch)
    local: str   # tensor from the GEMM branch
    output: str


@dataclass(frozen=True, eq=False)
class Norm:
    kind: str    # op | decomposed
    nodes: tuple[gs.Node, ...]
    input: str
    output: str


@dataclass(frozen=True, eq=False)
class Activation:
    kind: str    # gelu-op | gelu-erf | gelu-tanh | sigmoid | relu
    nodes: tuple[gs.Node, ...]
    input: str
    output: str


@dataclass(frozen=True, eq=False)
class EncoderLayer:
    """One matched post-LayerNorm BERT encoder layer: every site FasterTransformer quantizes."""

    index: int
    input: str
    projections: tuple[Linear, ...]   # (query, key, value) or (fused qkv,)
    attention: Attention
    attention_output: Linear
    attention_residual: Residual
    attention_norm: Norm
    ffn1: Linear
    activation: Activation
    ffn2: Linear
    ffn_residual: Residual
    ffn_norm: Norm

    @property
    def fused_qkv(self) -> bool:
        return len(self.projections) == 1

    @property
    def output(self) -> str:
        return self.ffn_norm.output

    def linears(self) -> dict[str, Linear]:
        names = ("qkv",) if self.fused_qkv else ("query", "key", "value")
        named = dict(zip(names, self.projections))
        named.update(attention_output=self.attention_output, ffn1=self.ffn1, ffn2=self.ffn2)
        return named


@dataclass(frozen=True, eq=False)
class Rejection:
    anchor: gs.Node
    reason: str
    gemms: tuple[gs.Node, ...]


@dataclass(frozen=True, eq=False)
class EncoderMatch:
    layers: tuple[EncoderLayer, ...]
    rejections: tuple[Rejection, ...]
    unmatched_gemms: tuple[tuple[gs.Node, str], ...] = ()  # (node, why)
    family: str = "bert-post-ln"


class NoMatch(Exception):
    pass


# ---------------------------------------------------------------- graph walking

def float_source(tensor: gs.Tensor) -> gs.Tensor:
    """The float tensor behind any chain of Q->DQ pairs."""
    while True:
        dq = ir.producer(tensor)
        if dq is None or dq.op != "DequantizeLinear":
            return tensor
        q = ir.producer(dq.inputs[0])
        if q is None or q.op != "QuantizeLinear":
            return tensor
        tensor = q.inputs[0]


def origin(tensor: gs.Tensor) -> gs.Tensor:
    """The tensor behind Q/DQ pairs, reshapes (Gemm exports flatten tokens around each GEMM) and
    per-channel constant Muls (SmoothQuant's 1/s on a GEMM branch)."""
    while True:
        tensor = float_source(tensor)
        node = ir.producer(tensor)
        if node is not None and is_channel_scale(node, 0):
            tensor = node.inputs[0]
        elif node is not None and node.op in RESHAPE_OPS:
            tensor = node.inputs[0]
        else:
            return tensor


def is_channel_scale(node: gs.Node, index: int) -> bool:
    """Mul(x, constant vector) read at x: SmoothQuant's per-channel 1/s on a GEMM branch."""
    return node.op == "Mul" and index == 0 and len(node.inputs) == 2 and ir.is_constant(node.inputs[1]) \
        and ir.constant(node.inputs[1]).ndim == 1


def uses(tensor: gs.Tensor) -> list[tuple[gs.Node, int]]:
    """(node, input index) reading `tensor`, looking through Q->DQ pairs."""
    found = []
    for node in tensor.outputs:
        if node.op == "QuantizeLinear" and node.inputs[0] is tensor:
            for dq in node.outputs[0].outputs:
                if dq.op == "DequantizeLinear":
                    found.extend(uses(dq.outputs[0]))
            continue
        for index, value in enumerate(node.inputs):
            if value is tensor:
                found.append((node, index))
    return found


def up(tensor: gs.Tensor) -> gs.Node | None:
    """The producer of `tensor`, skipping Q/DQ and Cast."""
    tensor = float_source(tensor)
    node = ir.producer(tensor)
    while node is not None and node.op in ("Cast", "QuantizeLinear", "DequantizeLinear"):
        node = ir.producer(node.inputs[0])
    return node


def weight_of(node: gs.Node, index: int):
    """(constant, output axis, user, already quantized) for a 2-D GEMM weight input, else None."""
    tensor = node.inputs[index]
    user = (node, index)
    quantized = False
    source = ir.producer(tensor)
    if source is not None and source.op == "DequantizeLinear":
        quantized = True
        inner = ir.producer(source.inputs[0])
        tensor = inner.inputs[0] if inner is not None and inner.op == "QuantizeLinear" else source.inputs[0]
        source = ir.producer(tensor)
    transposed = False
    if source is not None and source.op == "Transpose" and ir.is_constant(source.inputs[0]):
        if list(source.attrs.get("perm", [1, 0])) != [1, 0]:
            return None
        user, tensor, transposed = (source, 0), source.inputs[0], True
    value = ir.constant(tensor)
    if value is None or value.ndim != 2:
        return None
    return tensor, transposed, user, quantized


def linear_at(node: gs.Node) -> Linear | None:
    """The linear layer whose GEMM is `node`, or None when it has no constant 2-D weight."""
    if node.op not in GEMM_OPS or len(node.inputs) < 2 or ir.is_constant(node.inputs[0]):
        return None
    found = weight_of(node, 1)
    if found is None:
        return None
    weight, transposed, user, quantized = found
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return None
        axis = 0 if node.attrs.get("transB", 0) else 1
    else:
        axis = 1
    if transposed:
        axis = 1 - axis
    out_features = ir.constant(weight).shape[axis]
    gemm_output = node.outputs[0]
    output, bias_add = gemm_output, None
    readers = uses(gemm_output)
    if len(readers) == 1 and readers[0][0].op == "Add":
        add = readers[0][0]
        bias = add.inputs[1 - readers[0][1]]
        value = ir.constant(bias)
        if value is not None and value.size == out_features:
            bias_add, output = add, add.outputs[0]
    return Linear(node, node.op, node.inputs[0].name, weight.name, axis, user,
                  gemm_output.name, bias_add, output.name, quantized)


def linear_producing(tensor: gs.Tensor) -> Linear | None:
    """The linear layer whose (biased) output is `tensor`."""
    node = up(tensor)
    if node is None:
        return None
    if node.op == "Add":
        for value in node.inputs:
            gemm = up(value)
            if gemm is not None and gemm.op in GEMM_OPS:
                linear = linear_at(gemm)
                if linear is not None and linear.output == float_source(tensor).name:
                    return linear
        return None
    linear = linear_at(node)
    return linear if linear is not None and linear.output == float_source(tensor).name else None


def is_dequantized(tensor: gs.Tensor) -> bool:
    """Produced by a DequantizeLinear, possibly reshaped, transposed or cast on the way (data movement
    commutes with quantization; TensorRT moves Q/DQ across it)."""
    node = ir.producer(tensor)
    while node is not None and node.op in LAYOUT_OPS | {"Cast", "Identity"}:
        node = ir.producer(node.inputs[0])
    return node is not None and node.op == "DequantizeLinear"


def is_nan_guard(node: gs.Node, index: int) -> bool:
    """Where(IsNaN(x), 0, x): torch's SDPA export guards the softmax output this way."""
    if node.op != "Where" or index != 2:
        return False
    test = ir.producer(node.inputs[0])
    return test is not None and test.op == "IsNaN" and ir.is_constant(node.inputs[1])


def is_bmm(node: gs.Node | None) -> bool:
    return node is not None and node.op == "MatMul" and not any(ir.is_constant(t) for t in node.inputs)


def reaches_bmm(tensor: gs.Tensor, depth: int = 6) -> bool:
    node = up(tensor)
    if node is None or depth == 0:
        return False
    if is_bmm(node):
        return True
    if node.op in ("Mul", "Div", "Add", "Where", "Sub"):
        return any(reaches_bmm(t, depth - 1) for t in node.inputs if not ir.is_constant(t))
    return False


# ---------------------------------------------------------------- blocks

class Walk:
    """One attempt from one anchor: remembers the GEMMs it touched for --explain."""

    def __init__(self, anchor: gs.Node):
        self.anchor = anchor
        self.gemms: list[gs.Node] = []

    def fail(self, reason: str):
        raise NoMatch(reason)

    def touch(self, node: gs.Node | None):
        if node is not None and node.op in GEMM_OPS and not any(g is node for g in self.gemms):
            self.gemms.append(node)

    def projection(self, tensor: gs.Tensor, role: str) -> tuple[Linear, list[gs.Node]]:
        """Walk up from a BMM input to the linear layer that projects it."""
        scales = []
        for _ in range(16):
            linear = linear_producing(tensor)
            if linear is not None:
                return linear, scales
            node = up(tensor)
            self.touch(node)
            if node is None:
                self.fail(f"{role} input of the attention matmul has no producer")
            if node.op in MOVE_OPS:
                tensor = node.inputs[0]
            elif node.op in ("Mul", "Div") and any(ir.scalar(t) is not None for t in node.inputs):
                scales.append(node)
                tensor = next(t for t in node.inputs if ir.scalar(t) is None)
            else:
                self.fail(f"{role} input of the attention matmul comes from {ir.describe(node)}, "
                          "not from a linear projection")
        self.fail(f"{role} input of the attention matmul: no linear projection within 16 nodes")

    def down_to(self, tensor: gs.Tensor, accept) -> tuple[gs.Node, int]:
        """Follow single readers through data-movement ops until `accept(node, index)`."""
        for _ in range(12):
            readers = uses(tensor)
            for node, index in readers:
                self.touch(node)
                if accept(node, index):
                    return node, index
            movers = [n for n, i in readers if n.op in MOVE_OPS and i == 0 or is_nan_guard(n, i)
                      or is_channel_scale(n, i)]
            if len(movers) != 1:
                break
            tensor = movers[0].outputs[0]
        self.fail(f"'{tensor.name}' does not lead to the expected consumer")

    def attention(self, softmax: gs.Node) -> tuple[Attention, list[Linear]]:
        tensor, mask, after = softmax.inputs[0], None, []
        while True:
            node = up(tensor)
            self.touch(node)
            if node is None:
                self.fail("softmax input has no producer")
            if is_bmm(node):
                bmm1 = node
                break
            if node.op in ("Mul", "Div") and any(ir.scalar(t) is not None for t in node.inputs):
                after.append(node)
                tensor = next(t for t in node.inputs if ir.scalar(t) is None)
            elif node.op in ("Add", "Where"):
                data = [t for t in node.inputs if reaches_bmm(t)]
                if len(data) != 1:
                    self.fail(f"cannot tell the scores from the mask at {ir.describe(node)}")
                mask = mask or node
                tensor = data[0]
            else:
                self.fail(f"softmax input comes from {ir.describe(node)}, not from a Q·K^T matmul")
        query_linear, q_scales = self.projection(bmm1.inputs[0], "query")
        key_linear, k_scales = self.projection(bmm1.inputs[1], "key")
        bmm2, _ = self.down_to(softmax.outputs[0], lambda n, i: is_bmm(n) and i == 0)
        value_linear, _ = self.projection(bmm2.inputs[1], "value")
        scale = after or q_scales + k_scales
        position = "after_bmm" if after else "before_bmm" if scale else "folded"
        record = Attention(bmm1, bmm1.inputs[0].name, bmm1.inputs[1].name, bmm1.outputs[0].name,
                           tuple(scale), position, mask, softmax, bmm2.inputs[0].name, bmm2,
                           bmm2.inputs[1].name, bmm2.outputs[0].name)
        return record, [query_linear, key_linear, value_linear]

    def linear_reading(self, tensor: gs.Tensor) -> Linear:
        node, _ = self.down_to(tensor, lambda n, i: i == 0 and linear_at(n) is not None)
        return linear_at(node)

    def residual(self, tensors: dict[str, gs.Tensor], local: str, what: str) -> Residual:
        try:
            add, index = self.down_to(tensors[local], lambda n, i: n.op == "Add" and not any(
                ir.is_constant(t) for t in n.inputs))
        except NoMatch:
            self.fail(f"{what} output does not feed a residual Add")
        return Residual(add, add.inputs[1 - index].name, add.inputs[index].name, add.outputs[0].name)


def match_layer_norm(tensor: gs.Tensor) -> Norm | None:
    """LayerNormalization op, or ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add reading `tensor`."""
    readers = uses(tensor)
    for node, _ in readers:
        if node.op == "LayerNormalization":
            return Norm("op", (node,), tensor.name, node.outputs[0].name)
    mean = next((n for n, _ in readers if n.op == "ReduceMean"), None)
    sub = next((n for n, i in readers if n.op == "Sub" and i == 0), None)
    if mean is None or sub is None or float_source(sub.inputs[1]) is not mean.outputs[0]:
        return None
    nodes = [mean, sub]
    centered = sub.outputs[0]
    square = next((n for n, _ in uses(centered) if n.op == "Pow"
                   or (n.op == "Mul" and float_source(n.inputs[0]) is float_source(n.inputs[1]))), None)
    divide = next((n for n, i in uses(centered) if n.op == "Div" and i == 0), None)
    if square is None or divide is None:
        return None
    nodes += [square, divide]
    chain = square.outputs[0]
    for op in ("ReduceMean", "Add", "Sqrt"):
        step = next((n for n, _ in uses(chain) if n.op == op), None)
        if step is None:
            return None
        nodes.append(step)
        chain = step.outputs[0]
    if float_source(divide.inputs[1]) is not chain:
        return None
    out = divide.outputs[0]
    for op in ("Mul", "Add"):
        step = next((n for n, _ in uses(out) if n.op == op and any(ir.is_constant(t) for t in n.inputs)), None)
        if step is None:
            break
        nodes.append(step)
        out = step.outputs[0]
    return Norm("decomposed", tuple(nodes), tensor.name, out.name)


def match_activation(start: gs.Tensor, end: gs.Tensor) -> Activation | None:
    """The pointwise region between `start` (FFN1 output) and `end` (FFN2 input)."""
    target = float_source(end)
    region, frontier, seen, members = [], [start], {start.name}, set()
    while frontier:
        tensor = frontier.pop()
        for node, _ in uses(tensor):
            if node.op not in POINTWISE_OPS | RESHAPE_OPS or id(node) in members:
                continue
            region.append(node)
            members.add(id(node))
            out = node.outputs[0]
            if out is not target and out.name not in seen and len(region) < 16:
                seen.add(out.name)
                frontier.append(out)
    if target.name not in {n.outputs[0].name for n in region}:
        return None
    # reshapes at either end only move data between the GEMMs and the activation
    by_output = {n.outputs[0].name: n for n in region}
    while by_output.get(target.name) is not None and by_output[target.name].op in RESHAPE_OPS:
        node = by_output.pop(target.name)
        region = [n for n in region if n is not node]
        target = float_source(node.inputs[0])
    while True:
        lead = next((n for n, _ in uses(start) if any(n is r for r in region) and n.op in RESHAPE_OPS), None)
        if lead is None:
            break
        region = [n for n in region if n is not lead]
        start = lead.outputs[0]
    ops = {n.op for n in region}
    kind = ("gelu-op" if ops & {"Gelu", "FastGelu", "BiasGelu"} else "gelu-erf" if "Erf" in ops
            else "gelu-tanh" if "Tanh" in ops else "sigmoid" if "Sigmoid" in ops
            else "relu" if "Relu" in ops else None)
    if kind is None:
        return None
    return Activation(kind, tuple(region), start.name, target.name)


# ---------------------------------------------------------------- the matcher

def _match_layer(graph_tensors: dict[str, gs.Tensor], softmax: gs.Node, walk: Walk) -> EncoderLayer:
    t = graph_tensors
    attention, (query, key, value) = walk.attention(softmax)
    if query.node is key.node is value.node:
        projections = (query,)
    elif len({id(query.node), id(key.node), id(value.node)}) == 3:
        projections = (query, key, value)
    else:
        walk.fail("query, key and value come from two different projections")
    layer_input = {origin(t[p.input]).name for p in projections}
    if len(layer_input) != 1:
        walk.fail("query, key and value projections read different tensors")
    attn_out = walk.linear_reading(t[attention.context])
    attn_res = walk.residual(t, attn_out.output, "attention output projection")
    if origin(t[attn_res.skip]).name not in layer_input:
        walk.fail("attention residual does not add the layer input (not a post-LayerNorm BERT layer)")
    attn_norm = match_layer_norm(t[attn_res.output])
    if attn_norm is None:
        walk.fail(f"attention residual {ir.describe(attn_res.add)} is not followed by a LayerNorm")
    ffn1 = walk.linear_reading(t[attn_norm.output])
    ffn2 = _find_ffn2(t, ffn1, walk)
    activation = match_activation(t[ffn1.output], t[ffn2.input])
    if activation is None:
        walk.fail(f"no GELU between FFN1 {ir.describe(ffn1.node)} and FFN2 {ir.describe(ffn2.node)}")
    ffn_res = walk.residual(t, ffn2.output, "FFN2")
    if origin(t[ffn_res.skip]) is not origin(t[attn_norm.output]):
        walk.fail("FFN residual does not add the attention LayerNorm output")
    ffn_norm = match_layer_norm(t[ffn_res.output])
    if ffn_norm is None:
        walk.fail(f"FFN residual {ir.describe(ffn_res.add)} is not followed by a LayerNorm")
    return EncoderLayer(0, layer_input.pop(), projections, attention, attn_out, attn_res, attn_norm,
                        ffn1, activation, ffn2, ffn_res, ffn_norm)


def _find_ffn2(tensors: dict[str, gs.Tensor], ffn1: Linear, walk: Walk) -> Linear:
    frontier, seen = [tensors[ffn1.output]], set()
    while frontier:
        tensor = frontier.pop(0)
        for node, index in uses(tensor):
            walk.touch(node)
            if index == 0 and node.op in GEMM_OPS and linear_at(node) is not None:
                return linear_at(node)
            if (node.op in POINTWISE_OPS or node.op in RESHAPE_OPS) and id(node) not in seen and len(seen) < 16:
                seen.add(id(node))
                frontier.append(node.outputs[0])
    walk.fail(f"FFN1 {ir.describe(ffn1.node)} output does not reach a second linear layer through pointwise ops")


def match_encoder(graph: gs.Graph) -> EncoderMatch:
    tensors = graph.tensors()
    order = {id(node): i for i, node in enumerate(graph.nodes)}
    layers, rejections = [], []
    for softmax in (n for n in graph.nodes if n.op == "Softmax"):
        walk = Walk(softmax)
        try:
            layers.append(_match_layer(tensors, softmax, walk))
        except NoMatch as exc:
            rejections.append(Rejection(softmax, str(exc), tuple(walk.gemms)))
    layers.sort(key=lambda layer: order[id(layer.attention.bmm1)])
    layers = [_renumber(layer, i) for i, layer in enumerate(layers)]
    claimed = set()
    for layer in layers:
        claimed |= {id(lin.node) for lin in layer.linears().values()}
        claimed |= {id(layer.attention.bmm1), id(layer.attention.bmm2)}
    unmatched = []
    for node in graph.nodes:
        if node.op not in GEMM_OPS and node.op != "Conv" or id(node) in claimed:
            continue
        why = next((f"attention block at {ir.describe(r.anchor)} rejected: {r.reason}"
                    for r in rejections if any(g is node for g in r.gemms)), None)
        if why is None:
            why = ("linear layer outside every matched encoder layer (e.g. embeddings projection, pooler or head)"
                   if linear_at(node) is not None else
                   f"{node.op} with no constant 2-D weight and no Softmax next to it: not an attention matmul")
        unmatched.append((node, why))
    return EncoderMatch(tuple(layers), tuple(rejections), tuple(unmatched))


def _renumber(layer: EncoderLayer, index: int) -> EncoderLayer:
    return replace(layer, index=index)

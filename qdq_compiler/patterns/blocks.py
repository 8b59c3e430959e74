"""Building blocks patterns are written with: linear layers, the attention core, residual Adds,
LayerNorm and the FFN activation. Each walks the graph without changing it; `Walk.fail` rejects
the candidate with a reason (`--explain` prints it)."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from .. import ir
from ..graph import (GEMM_OPS, MOVE_OPS, POINTWISE_OPS, RESHAPE_OPS, float_source, is_bmm, is_channel_scale,
                     is_nan_guard, origin, reaches_bmm, up, uses, weight_of)
from .records import Activation, Attention, Linear, NoMatch, Norm, Residual

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

    def score_producer(self, tensor: gs.Tensor) -> gs.Node:
        """One step up the softmax's input towards the Q·K^T matmul."""
        node = up(tensor)
        self.touch(node)
        if node is None:
            self.fail("softmax input has no producer")
        return node

    def attention(self, softmax: gs.Node) -> tuple[Attention, list[Linear]]:
        tensor, mask, after = softmax.inputs[0], None, []
        while True:
            node = self.score_producer(tensor)
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
        return self.attention_around(bmm1, softmax, mask, after)

    def attention_around(self, bmm1: gs.Node, softmax: gs.Node, mask: gs.Node | None,
                         after: list[gs.Node]) -> tuple[Attention, list[Linear]]:
        """The attention record once the scores' matmul is found: its Q/K projections, softmax·V and
        V's projection; the scores' scale is `after` (Mul/Div past the matmul) or Q's and K's own."""
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

    def projections(self, tensors: dict[str, gs.Tensor], query: Linear, key: Linear,
                    value: Linear) -> tuple[tuple[Linear, ...], str]:
        """The distinct Q/K/V projections (one fused, or three) and the one tensor they all read."""
        if query.node is key.node is value.node:
            found = (query,)
        elif len({id(query.node), id(key.node), id(value.node)}) == 3:
            found = (query, key, value)
        else:
            self.fail("query, key and value come from two different projections")
        inputs = {origin(tensors[p.input]).name for p in found}
        if len(inputs) != 1:
            self.fail("query, key and value projections read different tensors")
        return found, inputs.pop()

    def gelu_ffn(self, tensors: dict[str, gs.Tensor], normed: gs.Tensor) -> tuple[Linear, Linear, Activation]:
        """FFN1 reading `normed`, the GELU after it and the FFN2 it feeds."""
        ffn1 = self.linear_reading(normed)
        ffn2 = find_ffn2(tensors, ffn1, self)
        activation = match_activation(tensors[ffn1.output], tensors[ffn2.input])
        if activation is None:
            self.fail(f"no GELU between FFN1 {ir.describe(ffn1.node)} and FFN2 {ir.describe(ffn2.node)}")
        return ffn1, ffn2, activation

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


def find_ffn2(tensors: dict[str, gs.Tensor], ffn1: Linear, walk: Walk) -> Linear:
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

"""Each quantized attention block becomes one com.microsoft.MultiHeadAttention (onnxruntime target,
`LowerConfig.attention = fused`).

The integer form runs Q·K^T and P·V as two MatMulIntegerToFloat and, between them, four passes over
the batch×heads×seq×seq scores in float (mask Add, Softmax, the probabilities' QuantizeLinear, the
GEMM's own float output): at batch 8, seq 384 most of MiniLM's time. onnxruntime's CPU
MultiHeadAttention does the whole block per (batch, head) with the scores in cache. It reads the same
fake-quantized Q, K and V (their Q/DQ pairs move before the head split: a per-tensor quantizer
commutes with Reshape/Transpose), so the one difference from the fake-quant function is that the
softmax output is not re-quantized to 8 bits before P·V (a quantizer dropped, not a new error).
The additive mask, clamped at −60 as `clamp-attention-mask` does (its docstring says why that is
exact in float32 for MiniLM, and keeps exp out of denormals), becomes the kernel's attention_bias.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qdq_compiler import ir
from qdq_compiler.carried import encoder_layers
from qdq_compiler.lower import AttentionKernel, LowerConfig
from qdq_compiler.pipeline import Diagnostic, PassContext, PassResult, register

from .clamp_attention_mask import CLAMP_SUFFIX, MASK_FLOOR, mask_input
from .lower_onnxruntime import MS_DOMAIN

SPLIT_HEADS = [0, 2, 1, 3]        # B,S,H,d -> B,H,S,d (Q, V; and back for the context)
SPLIT_HEADS_KT = [0, 2, 3, 1]     # B,S,H,d -> B,H,d,S (K^T)


class Block:
    """One attention block of the Q/DQ graph in the form MultiHeadAttention computes, or why not."""

    def __init__(self, bmm1: gs.Node, probs: gs.Tensor):
        self.bmm1 = bmm1
        self.bmm2 = next((n for n in probs.outputs if n.op == "MatMul" and n.inputs[0] is probs), None)
        if self.bmm2 is None:
            raise ValueError("the probabilities feed no P·V MatMul")
        self.query = self.quantized_heads(bmm1.inputs[0], SPLIT_HEADS, "query")
        self.key = self.quantized_heads(bmm1.inputs[1], SPLIT_HEADS_KT, "key")
        self.value = self.quantized_heads(self.bmm2.inputs[1], SPLIT_HEADS, "value")
        self.heads, self.head_size = self.query[3]
        self.scale, self.mask = self.scores()
        self.context, self.merge, self.context_qdq = self.merged_context()

    @staticmethod
    def quantized_heads(tensor: gs.Tensor, perm: list[int], role: str):
        """DQ(Q(Transpose(Reshape(x)))) with a per-tensor int8 quantizer -> (Q, DQ, x, (heads, head size))."""
        dq = ir.producer(tensor)
        q = ir.producer(dq.inputs[0]) if dq is not None and dq.op == "DequantizeLinear" else None
        if q is None or q.op != "QuantizeLinear" or len(tensor.outputs) != 1 or len(q.outputs[0].outputs) != 1:
            raise ValueError(f"{role}: not read through its own Q/DQ pair")
        if ir.constant(q.inputs[1]) is None or ir.constant(q.inputs[1]).size != 1:
            raise ValueError(f"{role}: its quantizer is not per-tensor")
        source, order = q.inputs[0], list(range(4))
        while (move := ir.producer(source)) is not None and move.op == "Transpose":
            order = [move.attrs.get("perm", [3, 2, 1, 0])[i] for i in order]
            source = move.inputs[0]
        if move is None or move.op != "Reshape" or order != perm:
            raise ValueError(f"{role}: not a head split (Reshape then Transpose {perm})")
        split, flat = move.outputs[0].shape, move.inputs[0].shape
        if (not split or len(split) != 4 or not isinstance(split[3], int) or not flat or len(flat) != 3
                or not isinstance(flat[2], int) or flat[2] % split[3]):
            raise ValueError(f"{role}: the head split's shapes are unknown")
        heads = flat[2] // split[3]   # shape inference often leaves the head count symbolic
        if isinstance(split[2], int) and split[2] != heads:
            raise ValueError(f"{role}: {split[2]} heads of {split[3]} do not make {flat[2]}")
        return q, dq, move.inputs[0], (heads, split[3])

    def scores(self) -> tuple[float, gs.Tensor]:
        """The scalar on the scores (1/sqrt(d)) and the additive mask before the softmax."""
        tensor, scale = self.bmm1.outputs[0], 1.0
        while len(tensor.outputs) == 1 and tensor.outputs[0].op in ("Mul", "Div"):
            node = tensor.outputs[0]
            other = node.inputs[1] if node.inputs[0] is tensor else node.inputs[0]
            value = ir.scalar(other)
            if value is None or (node.op == "Div" and node.inputs[0] is not tensor) or value == 0:
                break
            scale *= value if node.op == "Mul" else 1.0 / value
            tensor = node.outputs[0]
        add = tensor.outputs[0] if len(tensor.outputs) == 1 else None
        softmax = add.outputs[0].outputs[0] if add is not None and len(add.outputs[0].outputs) == 1 else None
        if softmax is None or softmax.op != "Softmax" or softmax.attrs.get("axis", -1) not in (-1, 3):
            raise ValueError("the scores do not go through one mask Add into a last-axis Softmax")
        index = mask_input(add, softmax)
        mask = add.inputs[index] if index is not None else None
        if mask is None or mask.shape is None or len(mask.shape) > 4:
            raise ValueError("no additive mask of rank at most 4 before the softmax")
        quantizer = softmax.outputs[0].outputs[0] if len(softmax.outputs[0].outputs) == 1 else None
        if quantizer is None or quantizer.op != "QuantizeLinear":
            raise ValueError("the probabilities are not quantized")
        return scale, mask

    def merged_context(self) -> tuple[gs.Tensor, gs.Node, tuple[gs.Node, gs.Node] | None]:
        """P·V -> Transpose back -> [Q/DQ] -> Reshape to B×S×hidden: the tensor the block outputs, the
        Reshape, and the context's per-tensor Q/DQ pair (it moves after the kernel)."""
        tensor, order, pair = self.bmm2.outputs[0], list(range(4)), None
        while len(tensor.outputs) == 1 and tensor.outputs[0].op == "Transpose":
            move = tensor.outputs[0]
            order = [order[i] for i in move.attrs.get("perm", [3, 2, 1, 0])]
            tensor = move.outputs[0]
        reader = tensor.outputs[0] if len(tensor.outputs) == 1 else None
        if reader is not None and reader.op == "QuantizeLinear" and ir.constant(reader.inputs[1]) is not None \
                and ir.constant(reader.inputs[1]).size == 1 and len(reader.outputs[0].outputs) == 1 \
                and reader.outputs[0].outputs[0].op == "DequantizeLinear":
            pair = (reader, reader.outputs[0].outputs[0])
            tensor = pair[1].outputs[0]
        merge = tensor.outputs[0] if len(tensor.outputs) == 1 else None
        if order != SPLIT_HEADS or merge is None or merge.op != "Reshape":
            raise ValueError("the context is not merged back to B×S×hidden (Transpose then Reshape)")
        shape = merge.outputs[0].shape
        if shape and (len(shape) != 3 or (isinstance(shape[2], int) and shape[2] != self.heads * self.head_size)):
            raise ValueError("the merged context is not B×S×heads·head size")
        return merge.outputs[0], merge, pair


class AttentionBiases:
    """The kernel's attention_bias for an additive mask, made once per mask: Max(mask, −60) broadcast to
    B×1×S×T (the kernel wants the full S×T, a B×1×1×T padding mask does not broadcast there)."""

    def __init__(self, graph: gs.Graph, names: ir.Names):
        self.graph, self.names, self.made = graph, names, {}

    def of(self, mask: gs.Tensor, query: gs.Tensor, key: gs.Tensor) -> gs.Variable:
        if id(mask) in self.made:
            return self.made[id(mask)]
        base, fresh = mask.name, self.names.fresh

        def node(op, inputs, attrs=None, dtype=np.int64, name=None):
            out = gs.Variable(fresh(f"{base}::{name or op.lower()}"), dtype=dtype)
            self.graph.nodes.append(gs.Node(op, fresh(f"{base}::{op}"), attrs or {}, inputs=inputs, outputs=[out]))
            return out

        def const(label, value):
            return gs.Constant(fresh(f"{base}::{label}"), np.asarray(value))

        def length(tensor):   # dim 1 of a B×S×hidden tensor (Shape + Slice: valid from opset 10)
            return node("Slice", [node("Shape", [tensor]), const("start", np.array([1], np.int64)),
                                  const("end", np.array([2], np.int64))], name="length")

        clamped = node("Max", [mask, const("floor", np.array(MASK_FLOOR, mask.dtype or np.float32))],
                       dtype=mask.dtype or np.float32, name=CLAMP_SUFFIX.lstrip(":"))
        target = node("Concat", [const("ones", np.array([1, 1], np.int64)), length(query), length(key)], {"axis": 0})
        self.made[id(mask)] = node("Expand", [clamped, target], dtype=mask.dtype or np.float32, name="attention_bias")
        return self.made[id(mask)]


def fuse(graph: gs.Graph, block: Block, biases: AttentionBiases, names: ir.Names) -> None:
    inputs = []
    for q, dq, flat, _ in (block.query, block.key, block.value):
        q.inputs[0] = flat                    # quantize B×S×hidden: the same levels before the head split
        dq.outputs[0].shape = flat.shape
        inputs.append(dq.outputs[0])
    bias = biases.of(block.mask, block.query[2], block.key[2])
    context = block.context
    block.merge.outputs.clear()
    if block.context_qdq is not None:   # the context's quantizer, now on B×S×hidden
        q, dq = block.context_qdq
        context = gs.Variable(names.fresh(f"{block.context.name}::attention"), dtype=np.float32)
        q.inputs[0] = context
        dq.outputs[0] = block.context
    graph.nodes.append(gs.Node("MultiHeadAttention", names.fresh(f"{block.bmm1.name}::fused_attention"),
                               {"num_heads": block.heads, "scale": float(block.scale)},
                               inputs=[*inputs, gs.Variable.empty(), gs.Variable.empty(), bias], outputs=[context],
                               domain=MS_DOMAIN))


@register("fuse-attention", requires=("qdq",), settings=LowerConfig)
def fuse_attention(graph: gs.Graph, ctx: PassContext) -> PassResult:
    if ctx.settings(LowerConfig).attention is not AttentionKernel.FUSED:
        return PassResult(False, {"fused": 0})
    ir.annotate_shapes(graph)   # head count and head size from the head split's inferred shapes
    found = encoder_layers(graph)
    names = ir.Names(graph)
    biases = AttentionBiases(graph, names)
    fused, diagnostics = 0, []
    for layer in found.layers:
        try:
            if layer.bmm1 is None:
                raise ValueError("no Q·K^T MatMul")
            block = Block(layer.bmm1, layer.attention["probs"])
        except ValueError as why:
            diagnostics.append(Diagnostic("info", f"layer {layer.index}: attention left integer ({why})"))
            continue
        fuse(graph, block, biases, names)
        fused += 1
    if fused:
        domains = [d for d in (graph.import_domains or []) if d.domain != MS_DOMAIN]
        if not any(d.domain in ("", "ai.onnx") for d in domains):
            domains.append(onnx.helper.make_opsetid("", graph.opset))
        graph.import_domains = domains + [onnx.helper.make_opsetid(MS_DOMAIN, 1)]
        ir.cleanup(graph)
        ir.toposort(graph)
    return PassResult(fused > 0, {"fused": fused, "layers": len(found.layers)}, tuple(diagnostics))

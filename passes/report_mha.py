"""What TensorRT's INT8 fused attention needs, per matched layer (analysis only).

TensorRT fuses INT8 multi-head attention only with Q/DQ before both batched matmuls and
after the softmax, head size 16, 32 or 64 and sequence length at most 512 (TensorRT developer
guide, "Multi-Head Attention Fusion"; NVIDIA/TensorRT issues #2981, #3724).
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from qdq_compiler import ir
from qdq_compiler.carried import encoder_layers
from qdq_compiler.pipeline import Diagnostic, PassContext, PassResult, register

FUSED_HEAD_SIZES = (16, 32, 64)
FUSED_MAX_SEQUENCE = 512


def _dequantized(tensor: gs.Tensor) -> bool:
    node = ir.producer(tensor)
    return node is not None and node.op == "DequantizeLinear"


def _scores_quantized(bmm1: gs.Node | None) -> bool:
    """A quantizer on Q·K^T's output (ft3's qk_output site) sits between the batched matmul and the
    softmax: TensorRT then runs them as separate kernels (an engine built from an ft3 graph fuses none)."""
    return bmm1 is not None and any(n.op == "QuantizeLinear" for n in bmm1.outputs[0].outputs)


@register("report-mha", requires=("qdq",))
def report_mha(graph: gs.Graph, ctx: PassContext) -> PassResult:
    typed = ir.annotate_shapes(graph)  # head sizes come from the shapes of Q (data propagation through Reshape)
    head_sizes, quantized, fusable, diagnostics = set(), 0, 0, []
    found = encoder_layers(graph)   # the plan insert stored, or matched for models without one
    if found.note:
        diagnostics.append(Diagnostic("info", found.note))
    for layer in found.layers:
        shape = layer.attention["query"].shape
        if shape and isinstance(shape[-1], int):
            head_sizes.add(shape[-1])
        if all(_dequantized(tensor) for tensor in layer.attention.values()):
            quantized += 1
            if _scores_quantized(layer.bmm1):
                diagnostics.append(Diagnostic("warning", f"layer {layer.index}: Q·K^T's output is quantized before "
                                              "the softmax (ft3), TensorRT will not fuse this attention",
                                              ir.label(layer.bmm1)))
            else:
                fusable += 1
        else:
            where = ir.label(layer.bmm1) if layer.bmm1 is not None else None
            diagnostics.append(Diagnostic("warning", f"layer {layer.index}: batched-matmul inputs are not all "
                                          "quantized, TensorRT will not fuse INT8 attention", where))
    eligible = bool(head_sizes) and head_sizes <= set(FUSED_HEAD_SIZES) and fusable > 0
    if head_sizes and not head_sizes <= set(FUSED_HEAD_SIZES):
        diagnostics.append(Diagnostic("warning", f"head size {sorted(head_sizes)}: TensorRT fuses INT8 attention "
                                      f"only for {FUSED_HEAD_SIZES}"))
    return PassResult(typed > 0, {"layers": len(found.layers), "layers_from": found.source,
                                  "attention_blocks_quantized": quantized,
                                  "attention_blocks_fusable": fusable if eligible else 0,
                                  "head_sizes": sorted(head_sizes),
                              "int8_fused_mha_head_size_ok": eligible,
                              "int8_fused_mha_max_sequence": FUSED_MAX_SEQUENCE}, tuple(diagnostics))

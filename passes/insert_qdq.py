"""Insert the planned QuantizeLinear/DequantizeLinear pairs.

Weights get their scales from their values now; activation scales are
placeholders (1.0) until `qdqc calibrate`. A tensor that already feeds a Q->DQ
pair is not quantized again: its existing DequantizeLinear is reused.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qdq_compiler import ir, quant
from qdq_compiler.graph import dequantized_source
from qdq_compiler.placement import Quantizer, TensorKind
from qdq_compiler.pipeline import PassContext, PassResult, register

PLACEHOLDER_SCALE = quant.PLACEHOLDER_SCALE


def weight_scales(quantizers: tuple[Quantizer, ...], tensors: dict[str, gs.Tensor]) -> dict[str, np.ndarray]:
    """Scales of every weight quantizer; a per-tensor scale group (fused QKV) takes the largest amax."""
    weights = [q for q in quantizers if q.kind is TensorKind.WEIGHT]
    amaxes = {q.tensor: quant.amax(ir.constant(tensors[q.tensor]), q.axis) for q in weights}
    groups: dict[str, np.ndarray] = {}
    for q in weights:
        if q.scale_group and q.axis is None:
            groups[q.scale_group] = np.maximum(groups.get(q.scale_group, 0.0), amaxes[q.tensor])
    scales = {}
    for q in weights:
        shared = q.scale_group and q.axis is None
        scales[q.tensor] = quant.scale_from_amax(groups[q.scale_group] if shared else amaxes[q.tensor])
    return scales


def make_pair(graph: gs.Graph, names: ir.Names, tensor: gs.Tensor, scale_const: gs.Constant,
              zero: gs.Constant, axis: int | None) -> tuple[gs.Tensor, list[str]]:
    base = tensor.name
    attrs = {"axis": int(axis)} if axis is not None else {}
    quantized = gs.Variable(names.fresh(f"{base}::quantized"), dtype=np.int8, shape=tensor.shape)
    dequantized = gs.Variable(names.fresh(f"{base}::dequantized"), dtype=tensor.dtype or np.float32,
                              shape=tensor.shape)
    q = gs.Node("QuantizeLinear", names.fresh(f"{base}::q"), dict(attrs), [tensor, scale_const, zero], [quantized])
    dq = gs.Node("DequantizeLinear", names.fresh(f"{base}::dq"), dict(attrs), [quantized, scale_const, zero],
                 [dequantized])
    graph.nodes.extend([q, dq])
    return dequantized, [q.name, dq.name]


@register("insert-qdq", requires=("plan",), provides=("created", "qdq"))
def insert_qdq(graph: gs.Graph, ctx: PassContext) -> PassResult:
    plan = ctx.analyses["plan"]
    tensors = graph.tensors()
    names = ir.Names(graph)
    scales = weight_scales(plan.quantizers, tensors)
    created: dict[str, list[str]] = {}
    constants: dict[str, tuple[gs.Constant, gs.Constant]] = {}
    inserted = reused = rewired = 0
    for quantizer in plan.quantizers:
        tensor = tensors[quantizer.tensor]
        dequantized = dequantized_source(tensor)
        if dequantized is None:
            # a scale group (FT's fuse_qkv) is one scale initializer read by all its quantizers,
            # so calibration and every later pass see the sharing in the graph itself
            key = quantizer.scale_group if quantizer.scale_group and quantizer.axis is None else quantizer.tensor
            if key not in constants:
                scale = np.asarray(scales.get(quantizer.tensor, PLACEHOLDER_SCALE), dtype=np.float32)
                constants[key] = (gs.Constant(names.fresh(f"{key}::scale"), scale),
                                  gs.Constant(names.fresh(f"{key}::zero_point"), np.zeros(scale.shape, np.int8)))
            scale_const, zero = constants[key]
            dequantized, made = make_pair(graph, names, tensor, scale_const, zero, quantizer.axis)
            created.update({name: list(quantizer.sites) for name in made})
            inserted += 1
        else:
            reused += 1
        for use in quantizer.uses:
            if use.node is None:  # the graph output
                rename_graph_output(graph, names, tensor, dequantized)
                rewired += 1
                continue
            node = use.node
            for index, value in enumerate(node.inputs):
                if value is tensor:
                    node.inputs[index] = dequantized
                    rewired += 1
    ir.toposort(graph)
    ctx.analyses["created"] = created
    return PassResult(inserted > 0 or rewired > 0,
                      {"qdq_pairs_inserted": inserted, "existing_pairs_reused": reused, "inputs_rewired": rewired})


def rename_graph_output(graph: gs.Graph, names: ir.Names, tensor: gs.Tensor, dequantized: gs.Tensor) -> None:
    """The dequantized tensor takes over the graph output's name, so the interface is unchanged."""
    public = tensor.name
    tensor.name = names.fresh(f"{public}::float")
    dequantized.name = public
    graph.outputs = [dequantized if t is tensor else t for t in graph.outputs]

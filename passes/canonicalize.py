"""Canonicalize: drop Identity nodes and float->float Casts, fold constants (Q/DQ left alone), share
identical weights, infer shapes."""
from __future__ import annotations

import contextlib
import hashlib

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qdq_compiler import ir
from qdq_compiler.graph import replace_all_uses
from qdq_compiler.pipeline import PassContext, PassResult, register


def remove_identities(graph: gs.Graph) -> int:
    """Bypass Identity nodes; one that names a graph output hands its name to its input."""
    removed = 0
    for node in list(graph.nodes):
        if node.op != "Identity":
            continue
        source, target = node.inputs[0], node.outputs[0]
        if target in graph.outputs:
            if isinstance(source, gs.Constant) or source in graph.inputs or source in graph.outputs:
                continue
            node.outputs.clear()
            source.name = target.name
            source.dtype = target.dtype if target.dtype is not None else source.dtype
            source.shape = target.shape if target.shape is not None else source.shape
            graph.outputs = [source if t is target else t for t in graph.outputs]
        replace_all_uses(target, source)
        node.outputs.clear()
        removed += 1
    return removed


def remove_noop_casts(graph: gs.Graph) -> int:
    """Bypass Casts to the type their input already has (QAT exports put float->float Casts on the
    Q/K/V path): they compute nothing and would hide the layer from the matcher."""
    removed = 0
    for node in list(graph.nodes):
        if node.op != "Cast" or not node.outputs or node.outputs[0] in graph.outputs:
            continue
        source, target = node.inputs[0], node.outputs[0]
        if source.dtype is None or onnx.helper.np_dtype_to_tensor_dtype(np.dtype(source.dtype)) != node.attrs.get("to"):
            continue
        replace_all_uses(target, source)
        node.outputs.clear()
        removed += 1
    return removed


def share_identical_weights(graph: gs.Graph) -> int:
    """Make byte-identical constant weights (rank >= 2) one tensor; returns how many copies were dropped.

    torch.onnx's dynamo exporter folds `W.T` once per use, so a weight that ALBERT shares between its
    layers arrives as one copy per layer; as one tensor it gets one quantizer and is rounded once.
    Scalars and vectors are left apart: a scale that happens to equal another's must stay its own.
    """
    keeper: dict[tuple, gs.Constant] = {}
    replace: dict[int, gs.Constant] = {}
    boundary = {id(t) for t in (*graph.inputs, *graph.outputs)}
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Constant) or len(tensor.shape) < 2 or id(tensor) in boundary:
            continue
        values = np.ascontiguousarray(tensor.values)
        key = (values.dtype.str, values.shape, hashlib.sha256(memoryview(values).cast("B")).digest())
        first = keeper.setdefault(key, tensor)
        if first is not tensor:
            replace[id(tensor)] = first
    for node in graph.nodes:
        for index, tensor in enumerate(node.inputs):
            if id(tensor) in replace:
                node.inputs[index] = replace[id(tensor)]
    return len(replace)


@contextlib.contextmanager
def _onnxruntime_quiet():
    """onnxruntime's own optimizer warns while graphsurgeon runs the folded subgraph (torch's SDPA
    export: "UnsqueezeElimination cannot remove node"), and graphsurgeon takes no session options:
    errors only on the default logger meanwhile, then onnxruntime's default (warnings) again."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    try:
        yield
    finally:
        onnxruntime.set_default_logger_severity(2)


def fold_constants(graph: gs.Graph, exclude=lambda node: node.op in ir.QDQ_OPS) -> None:
    """Fold every constant subgraph except the nodes `exclude` names (Q/DQ); Constant nodes become
    initializers."""
    # Folding a weight's Q->DQ would erase a QAT model's quantization: leave Q/DQ alone.
    # graphsurgeon folds by running onnxruntime, which refuses repeated node names: fold with unique
    # ones, then give every node its own name back
    names = [(node, node.name) for node in graph.nodes]
    ir.unique_node_names(graph)
    with _onnxruntime_quiet():
        graph.fold_constants(should_exclude_node=exclude, error_ok=True)
    for node, name in names:
        node.name = name
    ir.cleanup(graph)


@register("canonicalize")
def canonicalize(graph: gs.Graph, ctx: PassContext) -> PassResult:
    before = len(graph.nodes)
    ir.toposort(graph)
    identities = remove_identities(graph)
    typed = 0
    if any(n.op == "Cast" and n.inputs[0].dtype is None for n in graph.nodes):
        ir.cleanup(graph)
        typed += ir.annotate_shapes(graph)   # a Cast's input type tells a float->float Cast
    casts = remove_noop_casts(graph)
    fold_constants(graph)
    shared = share_identical_weights(graph)
    if shared:
        ir.cleanup(graph)
    typed += ir.annotate_shapes(graph)
    folded = before - identities - casts - len(graph.nodes)
    return PassResult(modified=identities > 0 or casts > 0 or folded > 0 or shared > 0 or typed > 0,
                      stats={"identities_removed": identities, "noop_casts_removed": casts, "nodes_folded": folded,
                             "weights_shared": shared, "tensors_typed": typed, "nodes": len(graph.nodes)})

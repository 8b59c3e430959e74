"""A site the recipe leaves in float that the input model already quantizes (a QAT export's quantizer)
is taken out of INT8 for that reader: an activation reads the float tensor again (its Q->DQ pair
bypassed), a weight reads its dequantized values as a float constant (the values the QAT model computed
with). Other readers of the same quantized tensor keep it; a pair no one reads any more goes at cleanup.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qdq_compiler import ir, quant
from qdq_compiler.errors import ModelError
from qdq_compiler.graph import LAYOUT_OPS
from qdq_compiler.pipeline import PassContext, PassResult, register

PATH_OPS = LAYOUT_OPS | {"Cast", "Identity"}


def _dequantized_path(tensor: gs.Tensor) -> tuple[gs.Node, gs.Tensor] | None:
    """(the DequantizeLinear behind `tensor` through data movement, the tensor it writes) or None."""
    node = ir.producer(tensor)
    while node is not None and node.op in PATH_OPS:
        tensor = node.inputs[0]
        node = ir.producer(tensor)
    return (node, tensor) if node is not None and node.op == "DequantizeLinear" else None


def _parameter(dq: gs.Node, index: int, default) -> np.ndarray:
    value = ir.constant(dq.inputs[index]) if len(dq.inputs) > index and dq.inputs[index].name else None
    if value is None and default is None:
        raise ModelError(f"{ir.describe(dq)}: its scale is not a constant; cannot take the quantizer out")
    return np.asarray(default if value is None else value)


def dequantized_value(dq: gs.Node, stored: np.ndarray) -> np.ndarray:
    """DequantizeLinear(stored) in numpy, per-tensor or along the node's axis."""
    axis = int(dq.attrs.get("axis", quant.DEFAULT_AXIS))
    scale = quant.along(_parameter(dq, 1, None).astype(np.float32), stored.ndim, axis)
    zero = quant.along(_parameter(dq, 2, 0).astype(np.float32), stored.ndim, axis)
    return ((stored.astype(np.float32) - zero) * scale).astype(np.float32)


def stored_integers(dq: gs.Node) -> np.ndarray | None:
    """The integer values a weight's DequantizeLinear reads: stored, or its QuantizeLinear of a constant."""
    value = ir.constant(dq.inputs[0])
    if value is not None:
        return value
    q = ir.producer(dq.inputs[0])
    weight = ir.constant(q.inputs[0]) if q is not None and q.op == "QuantizeLinear" else None
    if weight is None:
        return None
    axis = int(q.attrs.get("axis", quant.DEFAULT_AXIS))
    zero = _parameter(q, 2, np.int8(0))
    low, high = (0, 255) if zero.dtype == np.uint8 else (-128, 127)
    scale = quant.along(_parameter(q, 1, None).astype(np.float32), weight.ndim, axis)
    return np.clip(np.rint(weight / scale) + quant.along(zero.astype(np.float32), weight.ndim, axis), low, high)


@register("release-quantizers", requires=("plan",))
def release_quantizers(graph: gs.Graph, ctx: PassContext) -> PassResult:
    plan = ctx.analyses["plan"]
    names = ir.Names(graph)
    activations = weights = 0
    renames: list[tuple[gs.Constant, str]] = []   # a float weight takes its trained weight's name once free
    for use in plan.released:
        for value in use.node.inputs[:2]:
            found = _dequantized_path(value)
            if found is None:
                continue
            dq, dequantized = found
            q = ir.producer(dq.inputs[0])
            behind = {value.name, dequantized.name, dq.inputs[0].name} | ({q.inputs[0].name} if q is not None else set())
            if use.tensor not in behind:
                continue   # the GEMM's other input: not the site the recipe turned off
            chain_reader = next((n for n in dequantized.outputs if n is use.node or _leads_to(n, use.node)), None)
            if chain_reader is None:
                continue   # data movement shared with other readers: nothing to rewire for this one alone
            if q is not None and q.op == "QuantizeLinear" and not ir.is_constant(q.inputs[0]):
                float_tensor = q.inputs[0]
                activations += 1
            else:
                stored = stored_integers(dq)
                if stored is None:
                    continue
                float_tensor = gs.Constant(names.fresh(f"{dequantized.name}::float"), dequantized_value(dq, stored))
                if q is not None and ir.is_constant(q.inputs[0]):
                    renames.append((float_tensor, q.inputs[0].name))
                weights += 1
            chain_reader.inputs[[i for i, t in enumerate(chain_reader.inputs) if t is dequantized][0]] = float_tensor
    if activations or weights:
        ir.cleanup(graph)
        # the site's weight keeps its name (the plan carried in the model records what the recipe left in
        # float by tensor name) unless another reader still quantizes the trained one
        taken = graph.tensors()
        for constant, name in renames:
            if name not in taken:
                constant.name = name
    return PassResult(activations + weights > 0, {"activation_quantizers_bypassed": activations,
                                                  "weights_made_float": weights})


def _leads_to(node: gs.Node, target: gs.Node) -> bool:
    """`node` reaches `target` through single-reader data movement."""
    while node is not target:
        if node.op not in PATH_OPS or len(node.outputs[0].outputs) != 1:
            return False
        node = node.outputs[0].outputs[0]
    return True

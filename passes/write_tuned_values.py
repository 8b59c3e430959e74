"""Write the values end-to-end tuning found (qdq_compiler/tune.py) into their constants: activation
scales (each QuantizeLinear and its DequantizeLinear read the same scale tensor), GEMM biases and
LayerNorm affines. Values only: no node or tensor is added or removed."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qdq_compiler.errors import PassError
from qdq_compiler.pipeline import PassContext, PassResult, register


@register("write-tuned-values", requires=("tuned", "qdq"))
def write_tuned_values(graph: gs.Graph, ctx: PassContext) -> PassResult:
    values = ctx.analyses["tuned"].values
    tensors = graph.tensors()
    for name, value in values.items():
        tensor = tensors.get(name)
        if not isinstance(tensor, gs.Constant) or tensor.values.shape != np.shape(value):
            raise PassError(f"tuned value for '{name}' has no constant of shape {value.shape} in the graph")
        tensor.values = np.array(value, dtype=tensor.values.dtype)
    return PassResult(bool(values), dict(ctx.analyses["tuned"].stats))

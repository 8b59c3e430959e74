"""A calibrated Q/DQ graph executed by torch, differentiably: what end-to-end tuning (tune.py) trains.

Every QuantizeLinear -> DequantizeLinear pair becomes one fake-quantizer with a straight-through
gradient (Bengio et al. 2013; the estimator of pytorch-quantization's and torch.ao's fake
quantizers): the forward pass rounds exactly as ONNX does (x / scale, round half to even,
saturate), the backward pass lets the gradient through inside the grid's range and stops it
outside. The float weight behind each weight quantizer is a trainable parameter; everything else
is a constant. Ops follow the ONNX operator specification (opset 13-21) as far as encoder graphs
use them; any other op is refused by name before anything runs.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from . import ir
from .errors import ModelError

_DTYPES = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
           onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.INT64: torch.int64,
           onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT8: torch.int8,
           onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool}
_RANGES = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255)}


def _ints(value: torch.Tensor) -> list[int]:
    return [int(v) for v in value.reshape(-1).tolist()]


def _axes(node: gs.Node, args: list, index: int, rank: int) -> list[int] | None:
    """Axes from the attribute (older opsets) or the optional input `index` (newer), made non-negative."""
    axes = node.attrs.get("axes")
    if axes is None and len(args) > index and args[index] is not None:
        axes = _ints(args[index])
    return None if axes is None else sorted(a % rank for a in axes)


def _reshape(node, data, shape):
    target = _ints(shape)
    if not node.attrs.get("allowzero", 0):
        target = [data.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return data.reshape(target)


def _slice(node, data, starts, ends, axes=None, steps=None):
    axes = _ints(axes) if axes is not None else list(range(len(_ints(starts))))
    steps = _ints(steps) if steps is not None else [1] * len(axes)
    index = [slice(None)] * data.dim()
    for axis, start, end, step in zip(axes, _ints(starts), _ints(ends), steps):
        if step < 0:   # torch tensors slice forward only; encoder graphs do not reverse
            raise ModelError(f"{ir.describe(node)}: Slice with a negative step is not supported by the torch executor")
        size = data.shape[axis]
        start = max(0, min(size, start + size if start < 0 else start))
        end = max(0, min(size, end + size if end < 0 else end))
        index[axis % data.dim()] = slice(start, end, step)
    return data[tuple(index)]


def _unsqueeze(node, data, axes=None):
    rank = data.dim() + len(node.attrs.get("axes", None) or _ints(axes))
    for axis in _axes(node, [data, axes], 1, rank):
        data = data.unsqueeze(axis)
    return data


def _squeeze(node, data, axes=None):
    found = _axes(node, [data, axes], 1, data.dim())
    if found is None:
        return data.squeeze()
    for axis in reversed(found):
        data = data.squeeze(axis)
    return data


def _reduce(reducer):
    def run(node, data, axes=None):
        found = _axes(node, [data, axes], 1, data.dim())
        keep = bool(node.attrs.get("keepdims", 1))
        if found is None:
            if node.attrs.get("noop_with_empty_axes", 0):
                return data
            found = list(range(data.dim()))
        return reducer(data, dim=found, keepdim=keep)
    return run


def _layer_norm(node, data, weight, bias=None):
    axis = node.attrs.get("axis", -1) % data.dim()
    mean = data.mean(dim=tuple(range(axis, data.dim())), keepdim=True)
    centred = data - mean
    variance = (centred * centred).mean(dim=tuple(range(axis, data.dim())), keepdim=True)
    out = centred / torch.sqrt(variance + node.attrs.get("epsilon", 1e-5)) * weight
    return out if bias is None else out + bias


def _gemm(node, a, b, c=None):
    a = a.transpose(0, 1) if node.attrs.get("transA", 0) else a
    b = b.transpose(0, 1) if node.attrs.get("transB", 0) else b
    out = node.attrs.get("alpha", 1.0) * (a @ b)
    return out if c is None else out + node.attrs.get("beta", 1.0) * c


def _div(node, a, b):
    if a.dtype.is_floating_point:
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _cast(node, data):
    return data.to(_DTYPES[node.attrs["to"]])


def _constant_of_shape(node, shape):
    value = node.attrs.get("value")
    fill = torch.from_numpy(np.array(value.values)).reshape(()) if value is not None else torch.tensor(0.0)
    return torch.full(_ints(shape), fill.item(), dtype=fill.dtype)


def _shape(node, data):
    dims = list(data.shape)[node.attrs.get("start", 0):node.attrs.get("end", None)]
    return torch.tensor(dims, dtype=torch.int64)


def _gather(node, data, indices):
    axis = node.attrs.get("axis", 0) % data.dim()
    size = data.shape[axis]
    indices = torch.where(indices < 0, indices + size, indices)
    return torch.index_select(data, axis, indices.reshape(-1)).reshape(
        data.shape[:axis] + indices.shape + data.shape[axis + 1:])


def _expand(node, data, shape):
    target = torch.broadcast_shapes(tuple(data.shape), tuple(_ints(shape)))
    return data.expand(target)


def _flatten(node, data):
    axis = node.attrs.get("axis", 1) % (data.dim() + 1) if data.dim() else 0
    outer = math.prod(data.shape[:axis])
    return data.reshape(outer, -1)


def _split(node, data, split=None):
    axis = node.attrs.get("axis", 0)
    sizes = node.attrs.get("split") or (_ints(split) if split is not None else None)
    if sizes is None:
        count = len(node.outputs)
        sizes = [math.ceil(data.shape[axis] / count)] * count
    return tuple(torch.split(data, sizes, dim=axis))


def _range(node, start, limit, delta):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


def _where(node, condition, a, b):
    return torch.where(condition, a, b)


def _simple(function):
    return lambda node, *args: function(*args)


OPS: dict[str, Callable] = {
    "Add": _simple(torch.add), "Sub": _simple(torch.sub), "Mul": _simple(torch.mul), "Div": _div,
    "Pow": _simple(torch.pow), "Sqrt": _simple(torch.sqrt), "Erf": _simple(torch.erf), "Tanh": _simple(torch.tanh),
    "Exp": _simple(torch.exp), "Log": _simple(torch.log), "Neg": _simple(torch.neg), "Abs": _simple(torch.abs),
    "Relu": _simple(torch.relu), "Sigmoid": _simple(torch.sigmoid), "Reciprocal": _simple(torch.reciprocal),
    "Identity": _simple(lambda x: x), "Not": _simple(torch.logical_not),
    "And": _simple(torch.logical_and), "Or": _simple(torch.logical_or), "Equal": _simple(torch.eq),
    "Greater": _simple(torch.gt), "GreaterOrEqual": _simple(torch.ge), "Less": _simple(torch.lt),
    "LessOrEqual": _simple(torch.le), "Where": _where, "Max": _simple(torch.maximum), "Min": _simple(torch.minimum),
    "MatMul": _simple(torch.matmul), "Gemm": _gemm,
    "Softmax": lambda node, x: torch.softmax(x, dim=node.attrs.get("axis", -1)),
    "Gelu": lambda node, x: torch.nn.functional.gelu(x, approximate=node.attrs.get("approximate", "none")),
    "LayerNormalization": _layer_norm,
    "ReduceMean": _reduce(torch.mean), "ReduceSum": _reduce(torch.sum),
    "Reshape": _reshape, "Transpose": lambda node, x: x.permute(node.attrs.get("perm", list(range(x.dim()))[::-1])),
    "Shape": _shape, "Gather": _gather, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze,
    "Concat": lambda node, *xs: torch.cat(xs, dim=node.attrs["axis"]), "Slice": _slice, "Cast": _cast,
    "Expand": _expand, "ConstantOfShape": _constant_of_shape, "Range": _range, "Flatten": _flatten, "Split": _split,
    "Constant": lambda node: torch.from_numpy(np.array(node.attrs["value"].values)),
}


class _FakeQuantize(torch.autograd.Function):
    """ONNX's Q then DQ in the forward pass; the straight-through gradient for x (zero where it
    saturated) and LSQ's gradient for the scale (Esser et al. 2020, "Learned Step Size Quantization", eq. 3)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, low, high):
        ratio = x / scale
        rounded = torch.round(ratio) + zero_point
        clamped = torch.clamp(rounded, low, high)
        inside = (rounded >= low) & (rounded <= high)
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(inside, torch.where(inside, rounded - zero_point - ratio, clamped - zero_point))
        else:
            ctx.save_for_backward(inside)
        ctx.scale_shape = scale.shape
        return (clamped - zero_point) * scale

    @staticmethod
    def backward(ctx, grad):
        inside = ctx.saved_tensors[0]
        grad_scale = None
        if ctx.needs_input_grad[1]:
            # summed over what the scale was broadcast along: all of x (per tensor), all but its axis (per channel)
            grad_scale = (grad * ctx.saved_tensors[1]).sum_to_size(ctx.scale_shape)
        return grad * inside, grad_scale, None, None, None


class _Pair:
    """One Q -> DQ pair: its scale and zero point shaped to broadcast, and the integer range."""

    def __init__(self, q: gs.Node):
        scale = ir.constant(q.inputs[1])
        zero = ir.constant(q.inputs[2]) if len(q.inputs) > 2 and q.inputs[2] is not None else None
        if scale is None:
            raise ModelError(f"{ir.describe(q)}: its scale is computed at run time; the torch executor needs a constant")
        dtype = np.dtype(zero.dtype) if zero is not None else np.dtype(np.uint8)
        if dtype not in _RANGES:
            raise ModelError(f"{ir.describe(q)}: zero point of type {dtype} is not supported by the torch executor")
        self.low, self.high = _RANGES[dtype]
        self.axis = int(q.attrs.get("axis", 1)) if scale.size > 1 else None
        self.scale = torch.from_numpy(np.asarray(scale, np.float32).copy())
        self.zero = torch.from_numpy(np.asarray(zero if zero is not None else 0, np.float32).copy())
        self.log_gain: torch.nn.Parameter | None = None   # trained scale = scale * exp(log_gain)

    def trained_scale(self) -> torch.Tensor:
        return self.scale if self.log_gain is None else self.scale * torch.exp(self.log_gain)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero = self.trained_scale(), self.zero
        if self.axis is not None:
            shape = [1] * x.dim()
            shape[self.axis % x.dim()] = scale.numel()
            scale, zero = scale.reshape(shape), zero.reshape(shape) if zero.numel() > 1 else zero
        return _FakeQuantize.apply(x, scale, zero, self.low, self.high)


def _paired(dq: gs.Node) -> gs.Node | None:
    """The QuantizeLinear feeding `dq` when both quantize with the same scale and zero point."""
    q = ir.producer(dq.inputs[0])
    if q is None or q.op != "QuantizeLinear":
        return None
    same = all(a is b or (ir.constant(a) is not None and ir.constant(b) is not None
                          and np.array_equal(ir.constant(a), ir.constant(b)))
               for a, b in zip(q.inputs[1:], dq.inputs[1:]))
    return q if same and len(q.inputs) == len(dq.inputs) and q.attrs.get("axis", 1) == dq.attrs.get("axis", 1) \
        else None


def check_supported(graph: gs.Graph) -> None:
    """A one-line ModelError naming the ops of `graph` the executor cannot run, if any."""
    missing = sorted({node.op for node in graph.nodes if node.op not in OPS and node.op not in ir.QDQ_OPS})
    if missing:
        raise ModelError(f"tuning runs the model in torch, which does not support op {missing[0]}"
                         + (f" (nor {', '.join(missing[1:])})" if missing[1:] else "") + "; use --tune off")


class TorchGraph(torch.nn.Module):
    """`graph` as a torch module: `forward(feeds)` -> the graph outputs, a list of tensors.

    The float weight behind each per-channel weight quantizer is a parameter (`weight(name)`), what
    the tuner trains and writes back. `quantize_activations` / `quantize_weights` switch the two kinds
    of fake-quantizer off, to run the float network the graph carries."""

    def __init__(self, graph: gs.Graph):
        super().__init__()
        check_supported(graph)
        self.quantize_activations = self.quantize_weights = True
        self.outputs = [t.name for t in graph.outputs]
        self.weights = torch.nn.ParameterDict()
        self._keys: dict[str, str] = {}               # weight tensor name -> its ParameterDict key
        self._constants: dict[str, torch.Tensor] = {}
        pairs = {id(node): q for node in graph.nodes if node.op == "DequantizeLinear"
                 for q in [_paired(node)] if q is not None}
        feeds_only_pairs = {id(q) for q in pairs.values()
                            if all(id(reader) in pairs for reader in q.outputs[0].outputs)}
        # (node, fake-quantizer or None, the pair's float input, whether that input is a trained weight)
        self._steps: list[tuple[gs.Node, _Pair | None, gs.Tensor | None, bool]] = []
        for node in graph.nodes:
            if id(node) in feeds_only_pairs:
                continue   # computed by its DequantizeLinear(s), as one fake-quantizer
            for tensor in node.inputs:
                if isinstance(tensor, gs.Constant) and tensor.name not in self._constants:
                    self._constants[tensor.name] = torch.from_numpy(np.array(tensor.values))
            q = pairs.get(id(node))
            if q is None:
                self._steps.append((node, None, None, False))
                continue
            pair, source = _Pair(q), q.inputs[0]
            if isinstance(source, gs.Constant):
                self._constants.setdefault(source.name, torch.from_numpy(np.array(source.values)))
            trained = isinstance(source, gs.Constant) and pair.axis is not None and source.values.dtype == np.float32
            if trained and source.name not in self._keys:
                self._keys[source.name] = f"w{len(self._keys)}"
                self.weights[self._keys[source.name]] = torch.nn.Parameter(self._constants[source.name].clone())
            self._steps.append((node, pair, source, trained))

    def train_constants(self, names) -> list[torch.nn.Parameter]:
        """Make these float constants (biases, LayerNorm affines) parameters too; returns them."""
        found = []
        for name in names:
            value = self._constants[name]
            if not isinstance(value, torch.nn.Parameter):
                value = self._constants[name] = torch.nn.Parameter(value.float().clone())
            found.append(value)
        return found

    def train_scales(self) -> dict[str, torch.nn.Parameter]:
        """Make every per-tensor activation scale trainable, as a gain on it: scale tensor name -> log gain
        (one per scale tensor, so quantizers that share a scale keep sharing it)."""
        gains: dict[str, torch.nn.Parameter] = {}
        for node, pair, source, _ in self._steps:
            if pair is not None and not isinstance(source, gs.Constant) and pair.axis is None:
                name = _paired(node).inputs[1].name
                pair.log_gain = gains.setdefault(name, torch.nn.Parameter(torch.zeros(())))
        return gains

    def constant(self, name: str) -> torch.Tensor:
        return self._constants[name]

    def weight(self, name: str) -> torch.nn.Parameter:
        return self.weights[self._keys[name]]

    @property
    def weight_names(self) -> list[str]:
        return list(self._keys)

    def _value(self, values: dict, tensor) -> torch.Tensor | None:
        if tensor is None or (isinstance(tensor, gs.Variable) and not tensor.name):
            return None
        if tensor.name in self._keys:
            return self.weights[self._keys[tensor.name]]
        if tensor.name in values:
            return values[tensor.name]
        return self._constants[tensor.name]

    def forward(self, feeds: dict[str, torch.Tensor], given: dict[str, torch.Tensor] | None = None,
                record: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The graph outputs. To check each node against another runtime: nodes read a tensor's value
        from `given` when it holds one (instead of what this executor computed), and `record`
        receives every value computed."""
        values = dict(feeds)
        for node, pair, source, _ in self._steps:
            if pair is not None:
                x = self._value(values, source)
                on = self.quantize_weights if isinstance(source, gs.Constant) else self.quantize_activations
                outputs = (pair(x.float()) if on else x.float(),)
            elif node.op in ir.QDQ_OPS:
                outputs = (_lone(node, [self._value(values, t) for t in node.inputs]),)
            else:
                result = OPS[node.op](node, *[self._value(values, t) for t in node.inputs])
                outputs = result if isinstance(result, tuple) else (result,)
            for tensor, value in zip(node.outputs, outputs):
                if record is not None:
                    record[tensor.name] = value
                values[tensor.name] = given[tensor.name] if given is not None and tensor.name in given else value
        return [values[name] for name in self.outputs]


def _lone(node: gs.Node, args: list) -> torch.Tensor:
    """A QuantizeLinear or DequantizeLinear outside a pair, exactly as ONNX computes it (no gradient)."""
    pair = _Pair(node)
    x = args[0]
    scale, zero = pair.scale, pair.zero
    if pair.axis is not None:
        shape = [-1 if i == pair.axis % x.dim() else 1 for i in range(x.dim())]
        scale, zero = scale.reshape(shape), zero.reshape(shape) if zero.numel() > 1 else zero
    if node.op == "DequantizeLinear":
        return (x.float() - zero) * scale
    q = torch.clamp(torch.round(x / scale) + zero, pair.low, pair.high)
    return q.to(torch.int8 if pair.low < 0 else torch.uint8)

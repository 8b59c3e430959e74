"""SmoothQuant (Xiao et al. 2022): migrate activation outliers into the weights before calibration.

Per input channel j of the GEMMs reading one quantized activation x,
    s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)
(max|W_j| over the j-th input row of every reader's weight). The GEMM branch gets a
per-channel Mul by 1/s_j in front of its QuantizeLinear and every reader's weight rows are
multiplied by s_j: (x/s)·(s·W) = x·W. Only quantizers whose every reader is a linear layer
are smoothed, so a residual branch (which reads x itself) never changes.

The attention-output GEMM reads the context quantized before the head-merging Reshape; it is
smoothed without a runtime Mul: context = softmax(QKᵀ)·V is linear in V channel by channel, so 1/s
is folded into the value projection's output columns and bias (`value_fold_sites`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from . import carried, ir
from .errors import UsageError
from .quant import fake_quantize
from .graph import LAYOUT_OPS, RESHAPE_OPS, float_source, is_bmm, sole_reader
from .patterns.blocks import linear_at, linear_producing
from .patterns.records import Linear


# placement's GEMM-input sites: `layer3.ffn1.input` (matched layers), `{node}.input0` (generic)
GEMM_INPUT_SITE = re.compile(r"\.input\d?$")


@dataclass(frozen=True, eq=False)
class SmoothSite:
    quantizer: gs.Node              # the activation QuantizeLinear (nodes by identity, not name)
    tensor: str                     # the float activation it reads
    readers: tuple[gs.Node, ...]    # the linear layers reading its DequantizeLinear


def smooth_sites(graph: gs.Graph) -> list[SmoothSite]:
    """The activation quantizers that feed only linear layers; with the plan insert stored in the model,
    only those it placed at GEMM inputs (a model without one: every such quantizer)."""
    return [SmoothSite(q, q.inputs[0].name, readers) for q, readers in _candidates(graph)
            if all(_smoothable(reader) for reader in readers)]


def shared_weight_sites(graph: gs.Graph) -> list[str]:
    """The activations smoothing would take but for a weight other layers read too (ALBERT's)."""
    return [q.inputs[0].name for q, readers in _candidates(graph)
            if all(_linear_reader(reader) for reader in readers) and not all(_smoothable(r) for r in readers)]


def smoothed_before(graph: gs.Graph) -> int:
    """How many activation quantizers read a smoothing or shift an earlier run inserted."""
    return sum(_smoothed_already(q) for q in graph.nodes if q.op == "QuantizeLinear" and not ir.is_constant(q.inputs[0]))


def _smoothed_already(q: gs.Node) -> bool:
    source = ir.producer(q.inputs[0])
    return source is not None and source.op in ("Mul", "Sub") and \
        ("::smooth" in source.name or "::shift" in source.name)


def _candidates(graph: gs.Graph):
    """(activation quantizer, the nodes reading its DequantizeLinears) for each GEMM-input quantizer not
    yet smoothed."""
    plan = carried.read(graph)
    planned = None if plan is None else {tensor for site, tensor in plan.sites.items() if GEMM_INPUT_SITE.search(site)}
    for q in graph.nodes:
        if q.op != "QuantizeLinear" or ir.is_constant(q.inputs[0]) or ir.constant(q.inputs[1]).size != 1:
            continue
        if planned is not None and q.inputs[0].name not in planned and "::smooth" not in q.inputs[0].name:
            continue
        if _smoothed_already(q):
            continue   # smoothed by an earlier run: recalibrating a calibrated model never smooths twice
        dequantizers = q.outputs[0].outputs
        if not dequantizers or any(dq.op != "DequantizeLinear" for dq in dequantizers):
            continue
        readers = tuple(reader for dq in dequantizers for reader in dq.outputs[0].outputs)
        if readers:
            yield q, readers


def _linear_reader(reader: gs.Node) -> bool:
    """A linear layer reading the DQ directly, with a float weight behind its own Q/DQ."""
    return (linear_at(reader) is not None and reader.inputs[0].inputs[0].op == "DequantizeLinear"
            and reader_weight(reader)[0] is not None)


def _smoothable(reader: gs.Node) -> bool:
    """A linear layer that is the only one reading its float weight (a weight shared by layers, as
    ALBERT's, would take one layer's factors for all of them)."""
    return _linear_reader(reader) and sole_reader(reader_weight(reader)[0], reader)


def reader_weight(reader: gs.Node) -> tuple[gs.Constant | None, int]:
    """The float weight constant behind a linear layer, and the axis of its input channels."""
    linear = linear_at(reader)
    dq = ir.producer(reader.inputs[1])
    q = ir.producer(dq.inputs[0]) if dq is not None and dq.op == "DequantizeLinear" else None
    weight = q.inputs[0] if q is not None and q.op == "QuantizeLinear" else None
    if not isinstance(weight, gs.Constant) or weight.name != linear.weight:
        return None, 0
    return weight, 1 - linear.weight_axis


@dataclass(frozen=True, eq=False)
class ValueFoldSite:
    quantizer: gs.Node      # the context's QuantizeLinear (before the head merge)
    tensor: str             # the merged [tokens, hidden] float tensor the output GEMM reads
    reader: gs.Node         # the attention-output GEMM
    value: Linear           # the value projection, whose output columns and bias take 1/s


FOLDED_KEY = "qdqc.smooth_folded"   # metadata: the output-GEMM inputs already smoothed through V


def value_fold_sites(graph: gs.Graph) -> list[ValueFoldSite]:
    """Attention-output GEMMs whose quantized input is softmax·V behind layout ops only, V being a
    linear layer's output behind layout ops that keep the channel axis last (the head split); a
    site folded by an earlier run is left alone."""
    folded = set(json.loads(ir.metadata(graph).get(FOLDED_KEY, "[]")))
    sites = []
    for q in graph.nodes:
        if q.op != "QuantizeLinear" or ir.is_constant(q.inputs[0]) or ir.constant(q.inputs[1]).size != 1:
            continue
        dequantizers = q.outputs[0].outputs
        if len(dequantizers) != 1 or dequantizers[0].op != "DequantizeLinear":
            continue
        merged, reader = _through(dequantizers[0].outputs[0], RESHAPE_OPS)
        weight = reader_weight(reader)[0] if reader is not None and linear_at(reader) is not None else None
        if weight is None or len(weight.outputs) != 1 or merged.name in folded:
            continue
        context = _layout_source(q.inputs[0])
        bmm = ir.producer(context) if context is not None else None
        if not is_bmm(bmm):
            continue
        value_tensor = _layout_source(float_source(bmm.inputs[1]))
        value = linear_producing(value_tensor) if value_tensor is not None else None
        if value is None or not _foldable(graph, value, bmm):
            continue
        weight, axis = reader_weight(reader)
        if weight.values.shape[axis] != graph.tensors()[value.weight].values.shape[value.weight_axis]:
            continue
        sites.append(ValueFoldSite(q, merged.name, reader, value))
    return sites


def _through(tensor: gs.Tensor, ops) -> tuple[gs.Tensor, gs.Node | None]:
    """Down a chain of single-reader `ops` from `tensor`: (the last tensor, its only reader)."""
    while len(tensor.outputs) == 1 and tensor.outputs[0].op in ops:
        tensor = tensor.outputs[0].outputs[0]
    return tensor, tensor.outputs[0] if len(tensor.outputs) == 1 else None


def _layout_source(tensor: gs.Tensor | None) -> gs.Tensor | None:
    """The tensor above a chain of single-reader layout ops ending at `tensor`; None past a transpose
    that moves the last (channel) axis."""
    while tensor is not None:
        node = ir.producer(tensor)
        if node is None or node.op not in LAYOUT_OPS or len(tensor.outputs) != 1:
            return tensor
        perm = list(node.attrs.get("perm", [])) if node.op == "Transpose" else None
        if perm is not None and (not perm or perm[-1] != len(perm) - 1):
            return None
        tensor = node.inputs[0]
    return None


def _foldable(graph: gs.Graph, value: Linear, bmm: gs.Node) -> bool:
    """The value projection feeds only this batched matmul (through its quantizer and the head split)
    and owns its float weight and bias."""
    output = graph.tensors()[value.output]
    _, reader = _through(output, LAYOUT_OPS | {"QuantizeLinear", "DequantizeLinear"})
    weight = graph.tensors()[value.weight]
    bias = value_bias(value)
    return reader is bmm and isinstance(weight, gs.Constant) and weight.values.dtype == np.float32 \
        and sole_reader(weight, value.node) and (bias is None or len(bias.outputs) == 1)


def value_bias(value: Linear) -> gs.Constant | None:
    if value.bias_add is not None:
        return next((t for t in value.bias_add.inputs if isinstance(t, gs.Constant)), None)
    if value.op == "Gemm" and len(value.node.inputs) > 2 and isinstance(value.node.inputs[2], gs.Constant):
        return value.node.inputs[2]
    return None


def reader_bias(reader: gs.Node) -> gs.Constant | None:
    """The bias constant of a linear layer (its Add's constant, or Gemm's C) when it owns it alone."""
    linear = linear_at(reader)
    bias = value_bias(linear) if linear is not None else None
    return bias if bias is not None and len(bias.outputs) == 1 else None


def owned_bias(reader: gs.Node) -> gs.Constant | None:
    """The bias constant of a linear layer as that layer alone reads it (`ir.own_constant`), so a shift
    can fold into it; None when the layer has no constant bias."""
    linear = linear_at(reader)
    bias = value_bias(linear) if linear is not None else None
    if bias is None:
        return None
    return ir.own_constant(linear.bias_add if linear.bias_add is not None else linear.node, bias)


def channel_shift(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """The per-channel shift z of Outlier Suppression+ (Wei et al. 2023): the centre of each channel's
    range, (min + max)/2, so a symmetric INT8 grid (TensorRT's only form) covers one-sided channels
    such as GELU's outputs (>= -0.17) with half the step. After calibration each shift is moved onto
    the quantizer's grid (`align_shifts`): an exact zero then stays exact, which most GELU outputs are
    close to."""
    return ((np.asarray(low, np.float64) + np.asarray(high, np.float64)) / 2).astype(np.float32)


def smoothing_factors(activation_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|x_j|^alpha / max|W_j|^(1-alpha); a channel with no range keeps s_j = 1."""
    activation_max = np.asarray(activation_max, np.float64)
    weight_max = np.asarray(weight_max, np.float64)
    usable = (activation_max > 0) & (weight_max > 0)
    factors = np.ones_like(activation_max)
    factors[usable] = activation_max[usable] ** alpha / weight_max[usable] ** (1 - alpha)
    return factors.astype(np.float32)


ALPHA_GRID = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)


@dataclass(frozen=True)
class SmoothConfig:
    alpha: float | None = 0.85   # None: search ALPHA_GRID per site ("--smooth auto")
    through_value: bool = False  # the attention-output GEMM input too, folded into V's projection
    shift: bool = False          # OS+: centre each GEMM input per channel on the grid, folded into the biases
                                 # (the API's default: on with GPTQ weights)

    def __post_init__(self):
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"--smooth {self.alpha}: alpha must be in [0, 1]")

    @classmethod
    def parse(cls, value) -> "SmoothConfig | None":
        """`--smooth` as the CLI and the API spell it: "off" (or False) -> None, "auto" (or True) -> alpha
        searched per site, an alpha in [0, 1] (number or text) -> that alpha; a SmoothConfig as it is."""
        if isinstance(value, cls):
            return value
        if value is False or value == "off":
            return None
        if value is True or value == "auto":
            return cls(None)
        try:
            return cls(float(value))
        except (TypeError, ValueError):
            raise UsageError(f"--smooth {value!r}: expected off, auto or an alpha such as 0.85") from None


DEFAULT_SMOOTH = "auto"   # with calibration data; calibrating from saved statistics cannot smooth


def site_error(rows: np.ndarray, weights: list[np.ndarray], factors: np.ndarray) -> float:
    """||x·W − Q(x/s)·Q(s·W)||² over the readers: activation per tensor, weight per output column."""
    quantized = fake_quantize(rows / factors, np.abs(rows / factors).max())
    total = 0.0
    for weight in weights:          # [K, N], input channels on axis 0
        scaled = weight * factors[:, None]
        weight_q = fake_quantize(scaled, np.abs(scaled).max(axis=0))
        total += float(((rows @ weight - quantized @ weight_q).astype(np.float64) ** 2).sum())
    return total


def best_alpha(rows: np.ndarray, weights: list[np.ndarray], activation_max: np.ndarray, rows_limit: int = 256) -> float:
    """The grid alpha with the smallest `site_error` on (a spread of) the first batch's rows."""
    rows = rows[np.linspace(0, len(rows) - 1, min(rows_limit, len(rows))).astype(int)]
    weight_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    errors = {alpha: site_error(rows, weights, smoothing_factors(activation_max, weight_max, alpha))
              for alpha in ALPHA_GRID}
    return min(errors, key=errors.get)


def recipe_sites(graph: gs.Graph, config: SmoothConfig | None) -> tuple[list[SmoothSite], dict[str, float]]:
    """The sites to smooth and the alphas the recipe fixed: a site it says `off` is left alone, a site it
    gives an alpha is smoothed with it (even with --smooth off); the others follow `config`."""
    settings = carried.recipe_settings(graph)
    chosen, fixed = [], {}
    for site in smooth_sites(graph):
        wanted = settings[site.tensor].smooth if site.tensor in settings else None
        if wanted == "off" or (wanted is None and config is None):
            continue
        if wanted is not None:
            fixed[site.tensor] = float(wanted)
        chosen.append(site)
    return chosen, fixed


def wanted(graph: gs.Graph) -> bool:
    """Whether the recipe in force asks some site for an alpha (smoothing runs then, even with --smooth off)."""
    return any(isinstance(s.smooth, float) for s in carried.recipe_settings(graph).values())


def smooth(graph: gs.Graph, dataset, calibration, config: SmoothConfig | None, *, verify: bool = False):
    """Measure per-channel ranges of the smoothable activations, then rewrite (passes `smooth-gemm-inputs`
    and, with `through_value`, `smooth-attention-output`); with alpha None, each site's alpha is the grid
    value minimizing its layer's quantized error. With `shift`, the GEMM-input sites are centred first
    (OS+). The recipe in force may fix a site's alpha or turn it off (`config` None: only its fixed sites)."""
    from .calibrate import channel_ranges
    from .pipeline import PassContext, run_pipeline

    chosen, fixed = recipe_sites(graph, config)
    settings = config or SmoothConfig()
    recipe = carried.recipe_settings(graph)
    folds = [f for f in value_fold_sites(graph) if config is not None and config.through_value
             and (recipe[f.quantizer.inputs[0].name].smooth if f.quantizer.inputs[0].name in recipe else None) != "off"]
    sites = [(s.tensor, s.readers) for s in chosen] + [(f.tensor, (f.reader,)) for f in folds]
    ctx = PassContext(settings)
    low, high, attended, first = channel_ranges(graph, dataset, calibration, [tensor for tensor, _ in sites])
    # smoothing factors and alphas from the ranges as they are: the shift only re-centres the grid
    shifts = {s.tensor: channel_shift(*attended.get(s.tensor, (low[s.tensor], high[s.tensor]))) for s in chosen
              if settings.shift and all(owned_bias(r) is not None for r in s.readers)}
    maxima = {tensor: np.maximum(np.abs(low[tensor]), np.abs(high[tensor])) for tensor, _ in sites}
    ctx.analyses["channel_max"] = maxima
    ctx.analyses["channel_shift"] = shifts
    ctx.analyses["alpha"] = dict(fixed)
    if config is not None and config.alpha is None:
        for tensor, readers in sites:
            if tensor not in fixed:
                weights = [(w.values if axis == 0 else w.values.T) for w, axis in
                           (reader_weight(reader) for reader in readers)]
                ctx.analyses["alpha"][tensor] = best_alpha(first[tensor], weights, maxima[tensor])
    passes = ("smooth-gemm-inputs",) + (("smooth-attention-output",) if folds else ())
    return run_pipeline(graph, passes, ctx, verify=verify)


def fold_into_bias(reader: gs.Node, shift: np.ndarray) -> None:
    """The reader's bias takes shift·W (its weight as it stands, input rows on the weight's input axis):
    what a GEMM loses when its input is moved by −shift."""
    weight, axis = reader_weight(reader)
    bias = reader_bias(reader)
    bias.values = (bias.values + np.tensordot(shift, weight.values, axes=([0], [axis]))).astype(bias.values.dtype)


def align_shifts(graph: gs.Graph) -> int:
    """Move each OS+ shift onto its calibrated quantizer's grid (z = step·round(z/step)), the readers'
    biases taking the difference through their weights, exactly; returns how many were aligned. Runs
    after every calibration: before weight rounding, or on a model recalibrated with new scales."""
    aligned = 0
    for node in graph.nodes:
        if node.op != "Sub" or "::shift" not in node.name or len(node.outputs[0].outputs) != 1:
            continue
        q = node.outputs[0].outputs[0]
        if q.op != "QuantizeLinear" or ir.constant(q.inputs[1]).size != 1:
            continue
        step = float(ir.constant(q.inputs[1]).reshape(()))
        offset = node.inputs[1]
        readers = [r for dq in q.outputs[0].outputs for r in dq.outputs[0].outputs]
        if step <= 0 or not isinstance(offset, gs.Constant) or \
                any(reader_weight(r)[0] is None or reader_bias(r) is None for r in readers):
            continue   # a reader whose weight is already integer (a lowered model) cannot take the difference
        on_grid = (step * np.round(offset.values.astype(np.float64) / step)).astype(np.float32)
        moved = on_grid - offset.values
        for reader in readers:
            fold_into_bias(reader, moved)
        offset.values = on_grid
        aligned += 1
    return aligned

"""SmoothQuant (Xiao et al. 2022): migrate activation outliers into the weights before calibration.

Per input channel j of the GEMMs reading one quantized activation x,
    s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)
(max|W_j| over the j-th input row of every reader's weight). The GEMM branch gets a
per-channel Mul by 1/s_j in front of its QuantizeLinear and every reader's weight rows are
multiplied by s_j: (x/s)·(s·W) = x·W. Only quantizers whose every reader is a linear layer
are smoothed, so a residual branch (which reads x itself) never changes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from . import carried, ir
from .errors import UsageError
from .quant import fake_quantize
from .patterns.blocks import linear_at


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
    plan = carried.read(graph)
    planned = None if plan is None else {tensor for site, tensor in plan.sites.items() if GEMM_INPUT_SITE.search(site)}
    sites = []
    for q in graph.nodes:
        if q.op != "QuantizeLinear" or ir.is_constant(q.inputs[0]) or ir.constant(q.inputs[1]).size != 1:
            continue
        if planned is not None and q.inputs[0].name not in planned and "::smooth" not in q.inputs[0].name:
            continue
        source = ir.producer(q.inputs[0])
        if source is not None and source.op == "Mul" and "::smooth" in source.name:
            continue   # smoothed by an earlier run: recalibrating a calibrated model never smooths twice
        dequantizers = q.outputs[0].outputs
        if not dequantizers or any(dq.op != "DequantizeLinear" for dq in dequantizers):
            continue
        readers = [reader for dq in dequantizers for reader in dq.outputs[0].outputs]
        if readers and all(_smoothable(reader) for reader in readers):
            sites.append(SmoothSite(q, q.inputs[0].name, tuple(readers)))
    return sites


def _smoothable(reader: gs.Node) -> bool:
    """A linear layer reading the DQ directly, whose float weight feeds only its own quantizer."""
    if linear_at(reader) is None or reader.inputs[0].inputs[0].op != "DequantizeLinear":
        return False
    weight = reader_weight(reader)[0]
    return weight is not None and len(weight.outputs) == 1


def reader_weight(reader: gs.Node) -> tuple[gs.Constant | None, int]:
    """The float weight constant behind a linear layer, and the axis of its input channels."""
    linear = linear_at(reader)
    dq = ir.producer(reader.inputs[1])
    q = ir.producer(dq.inputs[0]) if dq is not None and dq.op == "DequantizeLinear" else None
    weight = q.inputs[0] if q is not None and q.op == "QuantizeLinear" else None
    if not isinstance(weight, gs.Constant) or weight.name != linear.weight:
        return None, 0
    return weight, 1 - linear.weight_axis


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

    def __post_init__(self):
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"--smooth {self.alpha}: alpha must be in [0, 1]")

    @classmethod
    def parse(cls, value) -> "SmoothConfig | None":
        """`--smooth` as the CLI and the API spell it: "off" (or False) -> None, "auto" (or True) -> alpha
        searched per site, an alpha in [0, 1] (number or text) -> that alpha."""
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
    """Measure per-channel maxima of the smoothable activations, then rewrite (pass `smooth-gemm-inputs`);
    with alpha None, each site's alpha is the grid value minimizing its layer's quantized error. The
    recipe in force may fix a site's alpha or turn it off (`config` None: only its fixed sites)."""
    from .calibrate import channel_maxima
    from .pipeline import PassContext, run_pipeline

    sites, fixed = recipe_sites(graph, config)
    ctx = PassContext(config or SmoothConfig())
    maxima, first = channel_maxima(graph, dataset, calibration, [s.tensor for s in sites])
    ctx.analyses["channel_max"] = maxima
    ctx.analyses["alpha"] = dict(fixed)
    if config is not None and config.alpha is None:
        alphas = ctx.analyses["alpha"]
        for site in (s for s in sites if s.tensor not in fixed):
            weights = [(w.values if axis == 0 else w.values.T) for w, axis in
                       (reader_weight(reader) for reader in site.readers)]
            alphas[site.tensor] = best_alpha(first[site.tensor], weights, maxima[site.tensor])
    return run_pipeline(graph, ("smooth-gemm-inputs",), ctx, verify=verify)

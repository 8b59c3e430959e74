"""Per-site sensitivity: how much each activation quantizer costs at the model output.

For every activation QuantizeLinear, two variants run on the data: only that site quantized
(everything else float, weights included), and every quantizer but that site. Error is the
cosine (mean over samples) and SNR of the first output against the float network; with an
attention mask both are of mask-averaged embeddings, so padding never counts.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from . import ir
from .calibrate import CalibrationConfig, float_network, model_batches, run, session
from .data import Dataset
from .errors import UsageError


@dataclass(frozen=True)
class FallbackConfig:
    """Which sites `compile` leaves in float: the `budget` worst, or as few as reach `target_cosine`."""

    budget: int | None = None
    target_cosine: float | None = None
    samples: int = 32

    def __post_init__(self):
        for option, value, kind in (("--fallback-budget", self.budget, numbers.Integral),
                                    ("--target-cosine", self.target_cosine, numbers.Real),
                                    ("--samples", self.samples, numbers.Integral)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
                raise UsageError(f"{option}: expected a number, got {value!r}")
        if self.budget is not None and self.budget < 0:
            raise UsageError(f"--fallback-budget must be at least 0, got {self.budget}")
        if self.target_cosine is not None and not 0 < self.target_cosine <= 1:
            raise UsageError(f"--target-cosine must be in (0, 1], got {self.target_cosine}")
        if self.samples < 1:
            raise UsageError(f"--samples must be at least 1, got {self.samples}")

    @property
    def active(self) -> bool:
        return self.budget is not None or self.target_cosine is not None


@dataclass(frozen=True)
class Sensitivity:
    quantizer: str          # the QuantizeLinear's name (for people; `node` identifies it)
    tensor: str
    only_cosine: float      # mean cosine with only this site quantized
    only_snr_db: float
    without_cosine: float   # mean cosine with every quantizer but this one
    without_snr_db: float
    node: gs.Node | None = field(default=None, compare=False, repr=False)
    sites: tuple[str, ...] = ()   # the site names insert gave this quantizer (`layer.3.ffn2.input`)

    def to_json(self) -> dict:
        found = {k: v for k, v in vars(self).items() if k not in ("node", "sites")}
        found["sites"] = list(self.sites)
        return found

    @property
    def names(self) -> tuple[str, ...]:
        """How a recipe names it: its sites, or the tensor when the model carries no plan."""
        return self.sites or (self.tensor,)


def _outputs(graph: gs.Graph, batches: list[dict], providers) -> list[np.ndarray]:
    runner = session(graph, providers)
    name = graph.outputs[0].name
    return [run(runner, [name], feeds, f"batch {index}")[0] for index, feeds in enumerate(batches)]


def _pooled(values: np.ndarray, feeds: dict) -> np.ndarray:
    mask = feeds.get("attention_mask")
    if mask is None or values.ndim != 3 or mask.shape != values.shape[:2]:
        return values.reshape(len(values), -1)
    weights = mask[..., None].astype(np.float32)
    return (values * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)


def compare(reference: list[np.ndarray], found: list[np.ndarray], batches: list[dict]) -> tuple[float, float]:
    cosines, signal, noise = [], 0.0, 0.0
    for ref, out, feeds in zip(reference, found, batches):
        a, b = _pooled(ref, feeds).astype(np.float64), _pooled(out, feeds).astype(np.float64)
        cosines.append((a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
        signal += float((a ** 2).sum())
        noise += float(((a - b) ** 2).sum())
    snr = math.inf if noise == 0 else 10 * math.log10(signal / noise)
    return float(np.concatenate(cosines).mean()), snr


def activation_sites(graph: gs.Graph) -> list[gs.Node]:
    return [n for n in graph.nodes if n.op == "QuantizeLinear" and not ir.is_constant(n.inputs[0])]


class _Measurement:
    """The samples, the float network's outputs on them, and the cosine/SNR of any Q/DQ subset."""

    def __init__(self, graph: gs.Graph, dataset: Dataset, config: CalibrationConfig, samples: int,
                 option: str | None = None):
        self.graph, self.providers = graph, config.providers
        self.batches = list(model_batches(graph, dataset, config, samples, option=option)[1])
        self.reference = _outputs(float_network(graph, []), self.batches, self.providers)
        self.every = [n for n in graph.nodes if n.op == "QuantizeLinear"]

    def but(self, left_out) -> list[gs.Node]:
        """Every QuantizeLinear but the nodes in `left_out` (by identity)."""
        skipped = {id(n) for n in left_out}
        return [n for n in self.every if id(n) not in skipped]

    def error(self, keep) -> tuple[float, float]:
        """(cosine, SNR dB) with only the QuantizeLinear nodes in `keep` active."""
        return compare(self.reference, _outputs(float_network(self.graph, [], keep), self.batches, self.providers),
                       self.batches)

    def ranking(self, progress=None) -> list[Sensitivity]:
        from .carried import quantizer_sites

        found, names = [], quantizer_sites(self.graph)
        for q in activation_sites(self.graph):
            only, without = self.error([q]), self.error(self.but([q]))
            found.append(Sensitivity(ir.label(q), q.inputs[0].name, *only, *without, node=q,
                                     sites=names.get(q.inputs[0].name, ())))
            if progress is not None:
                progress.update(1)
        return sorted(found, key=lambda s: s.only_cosine)


def sensitivity(graph: gs.Graph, dataset: Dataset, config: CalibrationConfig, samples: int = 32,
                progress=None) -> list[Sensitivity]:
    """Every activation site's cost, worst first (lowest cosine with only that site quantized)."""
    from .calibrate import require_calibrated, require_fake_quant

    require_fake_quant(graph, "qdqc analyze")
    require_calibrated(graph, "qdqc analyze")
    return _Measurement(graph, dataset, config, samples, "--samples").ranking(progress)


def leave_in_float(graph: gs.Graph, quantizers: list[gs.Node]) -> int:
    """Bypass these activation QuantizeLinear nodes for good (their readers take the float tensor)."""
    chosen = {id(q) for q in quantizers}
    bypassed = 0
    for q in [n for n in graph.nodes if n.op == "QuantizeLinear" and id(n) in chosen]:
        source = q.inputs[0]
        for dq in list(q.outputs[0].outputs):
            if dq.op != "DequantizeLinear":
                continue
            for reader in list(dq.outputs[0].outputs):
                for index, value in enumerate(reader.inputs):
                    if value is dq.outputs[0]:
                        reader.inputs[index] = source
        bypassed += 1
    ir.cleanup(graph)
    return bypassed


def choose_fallback(graph: gs.Graph, dataset: Dataset, config: CalibrationConfig, *, budget: int | None = None,
                    target_cosine: float | None = None,
                    samples: int = 32) -> tuple[list[Sensitivity], float, list[Sensitivity]]:
    """The sites to leave in float, worst first: the `budget` worst, or as few as reach `target_cosine`
    (mean cosine on the calibration samples; at most `budget` when both are given); the cosine
    measured with those sites in float; and the whole ranking."""
    measure = _Measurement(graph, dataset, config, samples)
    ranking = measure.ranking()
    # only sites a recipe can name are candidates: a QAT model's own quantizer away from every site
    # (e.g. before a LayerNorm) could not be left out again when the decision is replayed
    candidates = [s for s in ranking if s.sites] if any(s.sites for s in ranking) else ranking
    limit = len(candidates) if budget is None else min(budget, len(candidates))

    def cosine_without(chosen: list[Sensitivity]) -> float:
        return measure.error(measure.but([s.node for s in chosen]))[0]

    if target_cosine is None:
        chosen = candidates[:limit]
        return chosen, cosine_without(chosen), ranking
    chosen = []
    reached = cosine_without(chosen)
    while reached < target_cosine and len(chosen) < limit:
        chosen.append(candidates[len(chosen)])
        reached = cosine_without(chosen)
    return chosen, reached, ranking


def float_gemm_share(graph: gs.Graph, quantizers: list[gs.Node]) -> tuple[int, float]:
    """How many weight GEMMs read these QuantizeLinear nodes, and their share of all weight-GEMM
    multiply-adds (per token, K·N each): what leaving those sites in float costs in integer work."""
    from .patterns.blocks import linear_at

    sizes = {}
    for node in graph.nodes:
        linear = linear_at(node)
        if linear is not None:
            sizes[id(node)] = ir.constant(graph.tensors()[linear.weight]).size
    chosen = {id(q) for q in quantizers}
    moved = {id(reader) for q in graph.nodes if q.op == "QuantizeLinear" and id(q) in chosen
             for dq in q.outputs[0].outputs for reader in dq.outputs[0].outputs if id(reader) in sizes}
    total = sum(sizes.values())
    return len(moved), (sum(sizes[n] for n in moved) / total if total else 0.0)

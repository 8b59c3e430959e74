"""End-to-end tuning of a calibrated Q/DQ model on its calibration data (`--tune EPOCHS`).

After calibration (and GPTQ), the Q/DQ graph runs in torch (torch_graph.py: every Q -> DQ pair a
fake-quantizer with a straight-through gradient) and a few epochs of Adam lower the distance between
its outputs and the float model's on the calibration samples (mean squared error over the tokens the
attention mask keeps, relative to the float output's mean square). What is trained:

- every per-tensor activation scale, as a gain on the calibrated one, with LSQ's gradient (Esser et
  al. 2020, "Learned Step Size Quantization");
- the float vectors the model adds or normalizes with (GEMM biases, LayerNorm scale and shift), which
  the INT8 model keeps in float.

The INT8 weights keep their calibrated (GPTQ) values: measured on all-MiniLM-L6-v2, training them
through the straight-through estimator lowered the error on the 256 calibration sentences but not on
held-out ones (README, "End-to-end tuning"). Only values change, never the graph: the scales and vectors are
written back where they were, so every target lowers the tuned model as it lowers the untuned one.
The tuned values are kept only when they lower the error on the calibration data.

Epochs, not seconds, bound the work, so the same model and data give the same result on any machine.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs

from .errors import QdqcError, UsageError

DEFAULT_EPOCHS = 3
MAX_SAMPLES = 256        # tuning reads at most this many calibration samples (the cost stays bounded)
TUNE_BATCH = 16
SCALE_LR, VECTOR_LR = 1e-2, 3e-4   # Adam steps: log-gain of a scale; a bias or LayerNorm entry
SEED = 0


@dataclass(frozen=True)
class TuneConfig:
    """How end-to-end tuning runs; `epochs` 0 is off."""

    epochs: int = DEFAULT_EPOCHS
    samples: int = MAX_SAMPLES
    batch_size: int = TUNE_BATCH
    scale_lr: float = SCALE_LR
    vector_lr: float = VECTOR_LR

    def __post_init__(self):
        for name in ("epochs", "samples", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "epochs" else 1):
                raise UsageError(f"tune {name} {value!r}: expected a{' non-negative' if name == 'epochs' else ''} "
                                 "whole number" + ("" if name == "epochs" else " of at least 1"))
        for name in ("scale_lr", "vector_lr"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                raise UsageError(f"tune {name} {getattr(self, name)!r}: expected a positive number")

    @property
    def active(self) -> bool:
        return self.epochs > 0

    @classmethod
    def parse(cls, value) -> "TuneConfig":
        """`--tune` as the CLI and the API spell it: off, a number of epochs, or a TuneConfig; None is off."""
        if isinstance(value, cls):
            return value
        if value is None or value is False or (isinstance(value, str) and value.strip().lower() == "off"):
            return cls(epochs=0)
        try:
            epochs = int(value) if not isinstance(value, float) else None
        except (TypeError, ValueError):
            epochs = None
        if epochs is None or epochs < 0 or isinstance(value, bool):
            raise UsageError(f"--tune {value!r}: expected off or a number of epochs (e.g. 3)")
        return cls(epochs=epochs)


def require_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UsageError("--tune needs torch (pip install 'qdqc[tune]'), or --tune off") from None


def tuned_vectors(graph: gs.Graph) -> list[gs.Constant]:
    """The float vectors tuning trains: 1-D float constants a LayerNormalization or an Add reads beside
    a computed tensor (GEMM biases, LayerNorm scale and shift), each once."""
    found: dict[int, gs.Constant] = {}
    for node in graph.nodes:
        if node.op not in ("Add", "LayerNormalization"):
            continue
        if not any(isinstance(t, gs.Variable) for t in node.inputs):
            continue
        for tensor in node.inputs:
            if isinstance(tensor, gs.Constant) and tensor.values.dtype == np.float32 and tensor.values.ndim == 1 \
                    and tensor.values.size > 1:
                found.setdefault(id(tensor), tensor)
    return list(found.values())


def training_batches(graph: gs.Graph, dataset, config, tune: TuneConfig) -> list[dict[str, np.ndarray]]:
    """The first `tune.samples` calibration samples in batches of similar length (sorted by attended
    tokens, padding trimmed), so little compute goes to padding; as given when the model has no
    attention mask to sort by, or a fixed batch size."""
    from .calibrate import fixed_batch, model_batches
    from .data import TRIMMABLE_MASK, trim

    untrimmed = replace(config, trim_padding=False, batch_size=tune.batch_size)
    limit = min(tune.samples, config.num_samples or tune.samples)
    _, batches = model_batches(graph, dataset, untrimmed, limit=limit, option=None)
    batches = list(batches)
    if fixed_batch(graph) is not None or not batches or TRIMMABLE_MASK not in batches[0] \
            or len({b[TRIMMABLE_MASK].shape[1:] for b in batches}) != 1:
        return [trim(b) if config.trim_padding else b for b in batches]
    feeds = {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}
    order = np.argsort(feeds[TRIMMABLE_MASK].sum(axis=1), kind="stable")
    return [trim({name: array[order[start:start + tune.batch_size]] for name, array in feeds.items()})
            for start in range(0, len(order), tune.batch_size)]


def float_outputs(graph: gs.Graph, batches: list[dict[str, np.ndarray]], providers) -> list[list[np.ndarray]]:
    """What the float network the graph carries (every Q -> DQ pair bypassed) outputs on each batch:
    the targets, taken before weight rounding (the float weights) and smoothing is exact in float."""
    from .calibrate import float_network, run, session

    names = [t.name for t in graph.outputs]
    runner = session(float_network(graph, names), providers)
    return [run(runner, names, feeds, f"tuning batch {index}") for index, feeds in enumerate(batches)]


@dataclass(frozen=True)
class TuneOutcome:
    """New values by constant tensor name (empty when tuning did not lower the error) and the record."""

    values: dict[str, np.ndarray]
    stats: dict


def tune(graph: gs.Graph, batches: list[dict[str, np.ndarray]], targets: list[list[np.ndarray]],
         config: TuneConfig) -> TuneOutcome:
    """Train the activation scales and float vectors of the calibrated `graph` (read, never modified)
    so that its outputs on `batches` approach `targets`; returns the values to write back."""
    import torch

    # one thread: the same result on every machine (a reduction's order follows the thread count), and
    # no stall when the cores are shared (measured on MiniLM, 2 loaded cores: 1 thread as fast as 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _tune(graph, batches, targets, config)
    finally:
        torch.set_num_threads(threads)


def _tune(graph: gs.Graph, batches, targets, config: TuneConfig) -> TuneOutcome:
    import torch

    from .torch_graph import TorchGraph

    started = time.perf_counter()
    net = TorchGraph(graph)
    for parameter in net.weights.values():
        parameter.requires_grad_(False)
    vectors = tuned_vectors(graph)
    gains = net.train_scales()
    groups = [{"params": list(gains.values()), "lr": config.scale_lr},
              {"params": net.train_constants([v.name for v in vectors]), "lr": config.vector_lr}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise QdqcError("--tune: the model has no activation scale or float bias to tune")
    optimizer = torch.optim.Adam(groups)
    feeds = [{name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in b.items()} for b in batches]
    wanted = [[torch.from_numpy(np.asarray(t, np.float32)) for t in outs] for outs in targets]

    def loss(index: int) -> "torch.Tensor":
        return _relative_error(net(feeds[index]), wanted[index], feeds[index].get("attention_mask"))

    def mean_loss() -> float:
        with torch.no_grad():
            total = sum(loss(i).item() * _samples(feeds[i]) for i in range(len(feeds)))
        return total / sum(_samples(f) for f in feeds)

    before = mean_loss()
    order = np.random.default_rng(SEED)
    steps = 0
    for _ in range(config.epochs):
        for index in order.permutation(len(feeds)):
            optimizer.zero_grad()
            value = loss(int(index))
            value.backward()
            optimizer.step()
            steps += 1
    after = mean_loss()
    kept = after < before
    values: dict[str, np.ndarray] = {}
    if kept:
        tensors = graph.tensors()
        for name, gain in gains.items():
            values[name] = np.asarray(tensors[name].values * np.exp(gain.item()), np.float32)   # 0-d stays an array
        for vector in vectors:
            values[vector.name] = np.array(net.constant(vector.name).detach().numpy(), np.float32)
    stats = {"epochs": config.epochs, "steps": steps, "samples": sum(_samples(f) for f in feeds),
             "loss_before": round(before, 8), "loss_after": round(after, 8), "kept": kept,
             "scales_tuned": len(gains) if kept else 0, "vectors_tuned": len(vectors) if kept else 0,
             "seconds": round(time.perf_counter() - started, 2)}
    return TuneOutcome(values, stats)


def _samples(feeds: dict) -> int:
    return len(next(iter(feeds.values())))


def _relative_error(outputs, targets, mask) -> "torch.Tensor":
    """Mean over the float outputs of ‖out − target‖² / ‖target‖², over the tokens `mask` keeps
    (an output laid out [batch, tokens, ...] like the mask); every position when there is no mask."""
    total = 0.0
    for out, target in zip(outputs, targets):
        if not out.dtype.is_floating_point:
            continue
        weight = None
        if mask is not None and out.dim() >= 2 and tuple(out.shape[:2]) == tuple(mask.shape):
            weight = mask.to(out.dtype).reshape(*mask.shape, *([1] * (out.dim() - 2)))
        error = (out - target) ** 2
        size = target ** 2
        if weight is not None:
            error, size = error * weight, size * weight
        total = total + error.sum() / size.sum().clamp_min(1e-30)
    return total


def apply_tuning(graph: gs.Graph, batches, targets, config: TuneConfig, *, verify: bool = False):
    """Tune, then write the values back (pass `write-tuned-values`); returns its records."""
    from .pipeline import PassContext, run_pipeline

    ctx = PassContext(config)
    ctx.analyses["tuned"] = tune(graph, batches, targets, config)
    return run_pipeline(graph, ("write-tuned-values",), ctx, verify=verify)

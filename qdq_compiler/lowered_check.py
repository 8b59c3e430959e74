"""The lowered model against the fake-quant model it came from, on this host's kernels.

A lowering is a rewrite of the same function: the integer GEMMs compute the fake-quant GEMMs'
products exactly, so the two models agree to float rounding. Where a kernel saturates (a VNNI-form
model on a CPU without VNNI) or a pass is wrong, they do not; this check says so, and where it starts:
the first tensor both graphs share (in the fake-quant model's order) whose cosine falls below the bar.

The fake-quant model runs with onnxruntime's graph optimizations off, so its Q/DQ pairs stay float
arithmetic (optimized, onnxruntime would fuse them into the very integer kernels being checked).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .cpu import ISA_KEY, Isa, host
from .errors import ModelError, UsageError
from .evaluate import open_session

MIN_COSINE = 0.9999     # float rounding; a saturating kernel gives 0.4-0.99 on MiniLM
SAMPLES = 16


@dataclass(frozen=True)
class CheckResult:
    runtime: str
    samples: int
    mean: float
    min: float
    first_divergence: str | None = None

    @property
    def passed(self) -> bool:
        return self.min >= MIN_COSINE

    def line(self) -> str:
        verdict = "ok" if self.passed else f"DIVERGES (< {MIN_COSINE})"
        return (f"check: lowered vs fake-quant on {self.samples} calibration samples ({self.runtime}, "
                f"{host().describe()}): cosine mean {self.mean:.6f} min {self.min:.6f} {verdict}")

    def to_json(self) -> dict:
        return {"runtime": self.runtime, "samples": self.samples, "mean": self.mean, "min": self.min,
                "passed": self.passed, "first_divergence": self.first_divergence, "cpu": host().to_json()}


def require_host_isa(model: onnx.ModelProto, what: str) -> None:
    """Refuse a model lowered for kernels this CPU lacks: it would run, and compute something else."""
    wanted = next((p.value for p in model.metadata_props if p.key == ISA_KEY), None)
    if wanted is None:
        return
    try:
        isa = Isa(wanted)
    except ValueError:
        raise UsageError(f"{what}: lowered for unknown CPU kernels '{wanted}' (metadata {ISA_KEY})") from None
    if not host().supports(isa):
        raise UsageError(f"{what}: lowered with --isa {isa.value}, which this CPU lacks ({host().describe()}); its "
                         "integer GEMMs would saturate here: lower it again without --isa (portable)")


def sample_feeds(dataset, count: int = SAMPLES) -> dict[str, np.ndarray]:
    """The last `count` calibration samples, as one feed dict (padded to the data's width)."""
    batches = list(dataset.batches(64, trim_padding=False))
    feeds = {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}
    return {name: value[-count:] for name, value in feeds.items()}


def synthetic_feeds(model: onnx.ModelProto, samples: int = 8, sequence: int = 64) -> dict[str, np.ndarray]:
    """Inputs when no data is given (`qdqc lower`): token ids valid for any vocabulary, a mask padding
    each sample at another length (masked keys are where integer tricks go wrong), random floats."""
    rng = np.random.default_rng(0)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dynamic = iter((samples, sequence))
        shape = tuple(d.dim_value if d.dim_value > 0 else next(dynamic, 1) for d in tensor.shape.dim)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        if value.name == "attention_mask" and len(shape) == 2:
            lengths = np.linspace(shape[1], max(1, shape[1] // 4), shape[0]).astype(int)
            feeds[value.name] = (np.arange(shape[1])[None, :] < lengths[:, None]).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            feeds[value.name] = (np.zeros(shape, dtype) if "type" in value.name
                                 else rng.integers(1, 100, shape).astype(dtype))
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def _runner(model: onnx.ModelProto, target: str):
    """A function feeds -> {output name: array} on the runtime the target deploys to."""
    if target == "openvino":
        from .openvino_backend import Precision, compile_model

        compiled = compile_model(model, precision=Precision.F32)   # the integer kernels, not bf16's rounding
        names = [port.get_any_name() for port in compiled.outputs]

        def run_openvino(feeds):
            wanted = {p.get_any_name() for p in compiled.inputs}
            result = compiled({k: v for k, v in feeds.items() if k in wanted})
            return {name: np.asarray(result[port]) for name, port in zip(names, compiled.outputs)}
        return run_openvino
    session = open_session(model)
    inputs = {i.name for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(outputs, session.run(None, {k: v for k, v in feeds.items() if k in inputs})))


def _cosines(reference: np.ndarray, found: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Per sample, over the attended tokens when the tensor is [B, S, ...] with the mask's B×S."""
    a, b = np.asarray(reference, np.float64), np.asarray(found, np.float64)
    if a.shape != b.shape or a.ndim == 0:
        return np.array([0.0 if a.shape != b.shape else 1.0])
    if mask is not None and a.ndim >= 2 and a.shape[:2] == mask.shape:
        keep = mask.astype(bool)
        rows = [(a[i][keep[i]].ravel(), b[i][keep[i]].ravel()) for i in range(a.shape[0])]
    else:
        rows = [(a[i].ravel(), b[i].ravel()) for i in range(a.shape[0])] if a.ndim >= 2 else [(a.ravel(), b.ravel())]
    result = []
    for x, y in rows:
        norm = np.linalg.norm(x) * np.linalg.norm(y)
        result.append(1.0 if norm == 0 and np.array_equal(x, y) else float(x @ y / norm) if norm else 0.0)
    return np.array(result)


def check(fake_quant: onnx.ModelProto, lowered: onnx.ModelProto, target: str,
          feeds: dict[str, np.ndarray]) -> CheckResult:
    """Run both on `feeds`; on a divergence, find the first shared tensor where it starts."""
    require_host_isa(lowered, "the lowered model")
    mask = feeds.get("attention_mask")
    reference = _runner_reference(fake_quant)(feeds)
    found = _runner(lowered, target)(feeds)
    per_sample = np.min([_cosines(reference[name], found[name], mask) for name in reference if name in found],
                        axis=0)
    result = CheckResult(target, len(per_sample), float(np.mean(per_sample)), float(np.min(per_sample)))
    if result.passed:
        return result
    return CheckResult(result.runtime, result.samples, result.mean, result.min,
                       first_divergence(fake_quant, lowered, target, feeds))


def _runner_reference(model: onnx.ModelProto):
    session = open_session(model, optimize=False)
    inputs = {i.name for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(outputs, session.run(None, {k: v for k, v in feeds.items() if k in inputs})))


def first_divergence(fake_quant: onnx.ModelProto, lowered: onnx.ModelProto, target: str,
                     feeds: dict[str, np.ndarray]) -> str | None:
    """'tensor T (after op N of layer ...)': the first float tensor both graphs compute that differs."""
    produced = {out: node for node in lowered.graph.node for out in node.output}
    shared = [(out, node) for node in fake_quant.graph.node if node.op_type not in ("QuantizeLinear", "DequantizeLinear")
              for out in node.output if out and out in produced]
    if not shared:
        return None
    names = [name for name, _ in shared]
    mask = feeds.get("attention_mask")
    reference = _runner_reference(_with_outputs(fake_quant, names))(feeds)
    found = _runner(_with_outputs(lowered, names), target)(feeds)
    for name, node in shared:
        if name not in reference or name not in found or reference[name].dtype.kind != "f":
            continue
        cosine = float(np.min(_cosines(reference[name], found[name], mask)))
        if cosine < MIN_COSINE:
            return f"{name} (cosine {cosine:.4f}; {node.op_type} {node.name or '(unnamed)'} in the fake-quant model)"
    return None


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    have = {o.name for o in copy.graph.output}
    copy.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in have)
    return copy


def enforce(result: CheckResult) -> None:
    if not result.passed:
        where = f"; it starts at {result.first_divergence}" if result.first_divergence else ""
        raise ModelError(f"the lowered model diverges from the fake-quant model on this CPU (cosine min "
                         f"{result.min:.4f} < {MIN_COSINE}){where}. --no-check skips this check")


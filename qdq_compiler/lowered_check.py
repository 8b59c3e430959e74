"""The lowered model against the fake-quant model it came from, on this host's kernels.

A lowering is a rewrite of the same function: each integer GEMM computes its fake-quant GEMM's
products exactly. End to end the two models still differ by more than float rounding: a one-ulp
difference (float32 against int32 accumulation, another erf) moves a re-quantizer to the neighbouring
level, and each later layer multiplies those flips (on all-MiniLM-L6-v2: per-sample cosine 0.9986-1.0,
mean 0.9998, the same spread as onnxruntime's optimized and unoptimized runs of the fake-quant model
itself; on 16 calibration samples mean 0.9994, min 0.9990). A saturating kernel (a VNNI-form model on a CPU without VNNI) is another matter: a wrong
integer GEMM, and on MiniLM a cosine of 0.47-0.86.

So the check has two parts: (1) onnxruntime: every integer GEMM's output, on the inputs it was given
in this run, against its exact integer product (relative error ≤ 1e-5) — the first GEMM that misses
is named; (2) both runtimes: the per-sample cosine against the fake-quant model, mean ≥ 0.99 and min ≥ 0.9,
the first residual-stream or softmax tensor below 0.999 named where it is not. The bound is loose
because flips amplify more in a less accurate model (MiniLM calibrated with mse and no smoothing:
mean 0.9988, min 0.9897 with every integer GEMM exact); (1) is the exact part. OpenVINO gives no
access to its integer kernels' inputs, so its check is (2) alone; its kernels are checked on other
CPUs by the test suite (qemu).

The fake-quant model runs with onnxruntime's graph optimizations off, so its Q/DQ pairs stay float
arithmetic (optimized, onnxruntime would fuse them into the very integer kernels being checked).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import numpy_helper

from .cpu import ISA_KEY, Isa, host
from .errors import ModelError, UsageError
from .data import trim
from .evaluate import open_session

MEAN_COSINE, MIN_COSINE = 0.99, 0.9       # re-quantizer flips amplified, not a wrong kernel (docstring)
GEMM_ERROR = 1e-5                          # an integer GEMM against its exact product: float32 scaling only
LOCATE_COSINE = 0.999
SAMPLES = 8


@dataclass(frozen=True)
class CheckResult:
    runtime: str
    samples: int
    mean: float
    min: float
    gemms: int = 0                          # integer GEMMs checked against their exact products
    worst_gemm: float = 0.0                 # their largest relative error
    first_divergence: str | None = None
    inputs: str = "calibration samples"      # or "synthetic padded samples" (`lower` without --data)

    @property
    def passed(self) -> bool:
        return self.mean >= MEAN_COSINE and self.min >= MIN_COSINE and self.worst_gemm <= GEMM_ERROR

    def line(self) -> str:
        if not self.samples:
            return f"check: skipped ({self.first_divergence})"
        verdict = "ok" if self.passed else "DIVERGES"
        gemms = f"; {self.gemms} integer GEMMs exact (largest error {self.worst_gemm:.1e})" if self.gemms else ""
        return (f"check: lowered vs fake-quant on {self.samples} {self.inputs}, {self.runtime} on "
                f"{host().describe()}: cosine mean {self.mean:.6f} min {self.min:.6f}{gemms}: {verdict}")

    def to_json(self) -> dict:
        return {"runtime": self.runtime, "samples": self.samples, "mean": self.mean, "min": self.min,
                "gemms": self.gemms, "worst_gemm_error": self.worst_gemm, "passed": self.passed,
                "first_divergence": self.first_divergence, "cpu": host().to_json()}


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
                         "integer GEMMs would saturate here: lower it without --isa (portable) to run it here, or "
                         "with --no-check to build it for a machine that has them")


def sample_feeds(dataset, count: int = SAMPLES) -> dict[str, np.ndarray]:
    """The last `count` calibration samples, as one feed dict, trailing padding no sample attends to cut."""
    batches = list(dataset.batches(64, trim_padding=False))
    feeds = {name: np.concatenate([b[name] for b in batches])[-count:] for name in batches[0]}
    return trim(feeds) if dataset.trimmable else feeds   # the rest keeps its padding: masked keys are checked


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
    return _onnxruntime(model, optimize=True)


def _onnxruntime(model: onnx.ModelProto, optimize: bool):
    session = open_session(model, optimize=optimize)
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
          feeds: dict[str, np.ndarray], inputs: str = "calibration samples") -> CheckResult:
    """Run both on `feeds` (described by `inputs`); where they diverge, say where it starts."""
    require_host_isa(lowered, "the lowered model")
    mask = feeds.get("attention_mask")
    reference = _runner_reference(fake_quant)(feeds)
    found = _runner(lowered, target)(feeds)
    per_sample = np.min([_cosines(reference[name], found[name], mask) for name in reference if name in found],
                        axis=0)
    finite = np.isfinite(per_sample)   # a sample the model itself overflows on (inf/NaN in both) says nothing
    if not finite.any():
        return CheckResult(target, 0, 1.0, 1.0, first_divergence="no sample with a finite output to compare")
    per_sample = per_sample[finite]
    errors = gemm_errors(lowered, feeds) if target == "onnxruntime" else []
    worst = max((error for _, error in errors), default=0.0)
    result = CheckResult(target, len(per_sample), float(np.mean(per_sample)), float(np.min(per_sample)),
                         len(errors), worst, inputs=inputs)
    if result.passed:
        return result
    wrong = next((f"integer GEMM {name} (relative error {error:.1e} against its exact product)"
                  for name, error in errors if error > GEMM_ERROR), None)
    return replace(result, first_divergence=wrong or first_divergence(fake_quant, lowered, target, feeds))


def gemm_errors(lowered: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[tuple[str, float]]:
    """(node name, relative error) of every MatMulIntegerToFloat, in graph order: its output as this
    host's kernel computed it, against the exact product of the very inputs it was given."""
    constants = {t.name: numpy_helper.to_array(t) for t in lowered.graph.initializer}
    gemms = [n for n in lowered.graph.node if n.op_type == "MatMulIntegerToFloat"]
    wanted = [name for n in gemms for name in [*n.input[:2], n.output[0]] if name and name not in constants]
    values = {**constants, **_runner(_with_outputs(lowered, list(dict.fromkeys(wanted))), "onnxruntime")(feeds)}
    errors = []
    for gemm in gemms:
        inputs = list(gemm.input) + [""] * (7 - len(gemm.input))
        a, b = (values[name].astype(np.float64) for name in inputs[:2])   # integers: float64 sums are exact
        a_zero, b_zero = (values[name].astype(np.float64) if name else 0.0 for name in inputs[4:6])
        exact = np.matmul(a - a_zero, b - b_zero)
        exact *= values[inputs[2]].astype(np.float64) * values[inputs[3]].astype(np.float64)
        if inputs[6]:
            exact += values[inputs[6]]
        got = values[gemm.output[0]].astype(np.float64)
        finite = np.isfinite(exact) & np.isfinite(got)
        if not finite.any():
            continue
        difference, scale = np.abs(got - exact)[finite].max(), np.abs(exact)[finite].max()
        errors.append((gemm.name, float(difference / max(scale, 1e-30))))
    return errors


def _runner_reference(model: onnx.ModelProto):
    return _onnxruntime(model, optimize=False)   # Q/DQ stay float arithmetic (module docstring)


def first_divergence(fake_quant: onnx.ModelProto, lowered: onnx.ModelProto, target: str,
                     feeds: dict[str, np.ndarray]) -> str | None:
    """The first residual-stream sum (a LayerNormalization's input) or softmax output both graphs compute
    whose cosine falls below LOCATE_COSINE: tensors no lowering pass rewrites on purpose (a shift moves a
    LayerNorm's output and a GEMM's input, never the residual sum)."""
    produced = {out for node in lowered.graph.node for out in node.output}
    readers = {name for node in fake_quant.graph.node if node.op_type == "LayerNormalization" for name in node.input[:1]}
    shared = [(out, node) for node in fake_quant.graph.node for out in node.output[:1]
              if out in produced and (node.op_type == "Softmax" or out in readers)]
    if not shared:
        return None
    names = [name for name, _ in shared]
    mask = feeds.get("attention_mask")
    reference = _runner_reference(_with_outputs(fake_quant, names))(feeds)
    found = _runner(_with_outputs(lowered, names), target)(feeds)
    for name, node in shared:
        if name not in reference or name not in found:
            continue
        cosine = float(np.min(_cosines(reference[name], found[name], mask)))
        if cosine < LOCATE_COSINE:
            return f"{name} (cosine {cosine:.4f}; the output of {node.op_type} {node.name or '(unnamed)'})"
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
        raise ModelError(f"the lowered model diverges from the fake-quant model on this CPU (cosine mean "
                         f"{result.mean:.4f} min {result.min:.4f}, integer GEMMs' largest error "
                         f"{result.worst_gemm:.1e}){where}. --no-check skips this check")


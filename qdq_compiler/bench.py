"""`qdqc bench`: latency of ONNX models (onnxruntime or OpenVINO), OpenVINO IR (.xml) or TensorRT
engines, trtexec-style.

Several models are run interleaved round by round in one process (the fair way to compare on a
noisy machine) and each is reported with its ratio to the first. onnxruntime sessions run with
thread spinning off (or, with `spin`, spinning between the ops of a run only: onnxruntime's default spins,
and many small ops then wait less for a sleeping thread to wake); OpenVINO with the same number of inference threads, one stream, latency
mode; the thread count is printed.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np
import onnx

from .cpu import host
from .errors import QdqcError, UsageError
from .lowered_check import require_host_isa

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
MAX_FEED_ELEMENTS = 1 << 28   # one random input past this (2 GiB of int64) is refused, not allocated


class Runtime(str, Enum):
    """What runs an .onnx file (an .xml is always OpenVINO IR, a .plan/.engine a TensorRT engine)."""

    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"


@dataclass(frozen=True)
class BenchConfig:
    provider: str = "cpu"
    threads: int = 2
    warmup: int = 5
    iterations: int = 50
    duration: float | None = None   # seconds per model, instead of iterations
    batch: int = 1
    sequence: int = 128
    shapes: dict = field(default_factory=dict)   # input name -> shape, overrides batch/sequence
    runtime: Runtime = Runtime.ONNXRUNTIME
    precision: Enum | str = "default"   # OpenVINO's float precision: default (bf16 where the CPU has it), f32, bf16
    spin: bool = False   # onnxruntime's threads spin between the ops of a run (its own default), stopping after it

    def __post_init__(self):
        from .config import choice
        from .openvino_backend import Precision

        object.__setattr__(self, "runtime", choice(Runtime, self.runtime, "--runtime"))
        object.__setattr__(self, "precision", choice(Precision, self.precision, "--ov-precision"))
        if self.provider not in PROVIDERS:
            raise UsageError(f"--provider {self.provider!r}: expected one of {', '.join(PROVIDERS)}")
        for name, value in (("--threads", self.threads), ("--iterations", self.iterations),
                            ("--batch", self.batch), ("--seq", self.sequence)):
            if value < 1:
                raise UsageError(f"{name} must be at least 1, got {value}")
        if self.warmup < 0:
            raise UsageError(f"--warmup must be at least 0, got {self.warmup}")


def p90(values) -> float:
    """The 90th percentile of latencies (linear interpolation), as every qdqc benchmark reports it."""
    return float(np.percentile(values, 90))


def interleaved(calls: dict, rounds: int) -> dict[str, list[float]]:
    """Milliseconds per call of each named zero-argument callable, the calls interleaved round by
    round after one warm-up call each (the benchmark tools' side-by-side timing)."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1000)
    return times


@dataclass(frozen=True)
class Summary:
    name: str
    latencies_ms: tuple[float, ...]
    batch: int
    inputs: str = ""    # the shapes that ran, "input_ids 8x128, ..." (--seq means nothing to an image model)

    def stat(self, key: str) -> float:
        values = sorted(self.latencies_ms)
        if key.startswith("p"):
            return float(np.percentile(values, float(key[1:])))
        return {"min": values[0], "max": values[-1], "mean": statistics.fmean(values),
                "median": statistics.median(values)}[key]

    @property
    def throughput(self) -> float:
        """Samples per second at the median latency (runs per second times the batch)."""
        return 1000.0 * self.batch / self.stat("median")

    def to_json(self) -> dict:
        return {"model": self.name, "batch": self.batch, "iterations": len(self.latencies_ms),
                "throughput_samples_per_s": self.throughput,
                **{f"{k}_ms": self.stat(k) for k in ("min", "max", "mean", "median", "p90", "p95", "p99")}}


def parse_shapes(text: str | None) -> dict[str, tuple[int, ...]]:
    """'input_ids:1x128,attention_mask:1x128' -> {name: (1, 128)}."""
    shapes = {}
    for part in filter(None, (text or "").split(",")):
        name, _, dims = part.rpartition(":")
        try:
            shapes[name] = tuple(int(d) for d in dims.split("x"))
        except ValueError:
            raise UsageError(f"--shapes {part!r}: expected name:AxB") from None
        if not name or any(d < 1 for d in shapes[name]):
            raise UsageError(f"--shapes {part!r}: expected name:AxB with positive dimensions")
    return shapes


def random_feeds(inputs, config: BenchConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for (name, dtype, shape) triples: dynamic dims -> batch, then sequence."""
    rng = np.random.default_rng(seed)
    if config.shapes:
        names = [name for name, _, _ in inputs]
        unknown, missing = sorted(set(config.shapes) - set(names)), [n for n in names if n not in config.shapes]
        if unknown or missing:
            raise UsageError(f"--shapes must give every model input: " + (f"no input named {unknown}; " if unknown
                             else "") + (f"missing {missing}" if missing else "") + f" (inputs: {names})")
    feeds = {}
    for name, dtype, shape in inputs:
        if name in config.shapes:
            concrete = config.shapes[name]
        else:
            dynamic = iter((config.batch, config.sequence))
            concrete = tuple(d if isinstance(d, int) and d > 0 else next(dynamic, 1) for d in shape)
        if int(np.prod(concrete, dtype=object)) > MAX_FEED_ELEMENTS:
            raise UsageError(f"input '{name}' of shape {list(concrete)} is more than {MAX_FEED_ELEMENTS} elements: "
                             "refused (check --batch/--seq/--shapes and the model's input shape)")
        if np.issubdtype(dtype, np.integer):
            value = {"attention_mask": np.ones(concrete, dtype), "token_type_ids": np.zeros(concrete, dtype)}.get(
                name, rng.integers(1, 100, concrete).astype(dtype))  # ids valid for any real vocabulary
        else:
            value = rng.standard_normal(concrete).astype(dtype)
        feeds[name] = value
    return feeds


class OrtRunner:
    def __init__(self, path: Path, config: BenchConfig):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 4  # fatal only: failures come back as one line
        options.intra_op_num_threads = config.threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.spin else "0")
        if config.spin:   # spinning stops when a run ends, so it takes no core from the next model's run
            options.add_session_config_entry("session.force_spinning_stop", "1")
        provider = PROVIDERS[config.provider]
        if provider not in ort.get_available_providers():
            raise UsageError(f"--provider {config.provider}: onnxruntime here has only "
                             f"{', '.join(ort.get_available_providers())}")
        self.path = path
        try:
            self.session = ort.InferenceSession(str(path), options, providers=[provider])
        except Exception as exc:  # onnxruntime's own exception types
            from .calibrate import ort_message

            raise QdqcError(f"{path}: onnxruntime cannot load it ({ort_message(exc)})") from None
        types = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
                 "tensor(float16)": np.float16, "tensor(bool)": np.bool_}
        self.inputs = [(i.name, np.dtype(types.get(i.type, np.float32)), tuple(i.shape))
                       for i in self.session.get_inputs()]

    def __call__(self, feeds: dict) -> None:
        from .calibrate import run

        run(self.session, None, {name: feeds[name] for name, _, _ in self.inputs}, f"{self.path}")


def make_runner(path: Path, config: BenchConfig):
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.suffix in (".plan", ".engine"):
        from .trt_engine import EngineRunner

        return EngineRunner(path)
    if path.suffix.lower() == ".xml" or config.runtime is Runtime.OPENVINO:
        if config.provider != "cpu":
            raise UsageError(f"{path}: OpenVINO runs here on the CPU only (--provider cpu)")
        from .openvino_backend import OpenVinoRunner

        return OpenVinoRunner(path, threads=config.threads, precision=config.precision)
    from . import ir

    ir.read_model(path)   # a readable graph, a supported opset, external data inside the model's folder
    return OrtRunner(path, config)


def data_feeds(data: Path, model: Path, inputs, batch: int) -> dict[str, np.ndarray]:
    """The first `batch` samples of `data`, checked as calibration data is (data.py) against the model;
    fewer when the data holds fewer (the caller reports the batch that ran)."""
    import warnings

    from .data import Dataset, InputSpec

    if model.suffix == ".onnx":
        from . import ir
        from .calibrate import model_inputs

        specs = model_inputs(ir.load(model))
    else:
        specs = [InputSpec(name, np.dtype(dtype), tuple(shape)) for name, dtype, shape in inputs]
    dataset = Dataset(data, specs)
    fixed = specs[0].shape[0] if specs and specs[0].shape else None
    if isinstance(fixed, int) and fixed > 0:   # a model with a fixed batch dimension takes only that batch
        if fixed != batch:
            warnings.warn(f"{model}: its inputs have a fixed batch of {fixed}: running batches of {fixed}", stacklevel=2)
        if dataset.samples < fixed:
            raise QdqcError(f"{data}: {model} takes batches of exactly {fixed} samples, the data holds "
                            f"{dataset.samples}")
        batch = fixed
    if dataset.samples < batch:
        warnings.warn(f"--batch {batch}: {data} holds only {dataset.samples} samples; running batches of "
                      f"{dataset.samples}", stacklevel=2)
    return next(dataset.batches(batch, trim_padding=False))


def _refuse_foreign_isa(path: Path) -> None:
    """A model lowered with --isa vnni times (and computes) something else on a CPU without VNNI."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:   # protobuf's DecodeError and kin: not a model; the runner says so in its own words
        return
    require_host_isa(model, str(path))


def bench(paths: list[Path], config: BenchConfig, data: Path | None = None) -> list[Summary]:
    """Run every model interleaved, round by round; one Summary each, in the given order. With `data`
    (an npz), the first `config.batch` samples are the inputs."""
    for path in paths:
        if Path(path).suffix.lower() == ".onnx" and Path(path).is_file():
            _refuse_foreign_isa(Path(path))
    runners = [make_runner(p, config) for p in paths]
    feeds = []
    for path, runner in zip(paths, runners):
        if data is not None:
            feeds.append(data_feeds(data, path, runner.inputs, config.batch))
        else:
            feeds.append(random_feeds(runner.inputs, config))
    for runner, feed in zip(runners, feeds):
        for _ in range(config.warmup):
            runner(feed)
    timings: list[list[float]] = [[] for _ in runners]
    deadline = None if config.duration is None else time.perf_counter() + config.duration * len(runners)
    rounds = 0
    while (rounds < config.iterations) if deadline is None else (time.perf_counter() < deadline or rounds < 2):
        for runner, feed, times in zip(runners, feeds, timings):
            start = time.perf_counter()
            runner(feed)
            times.append((time.perf_counter() - start) * 1000)
        rounds += 1
    return [Summary(str(p), tuple(t), _batch_of(feed), _shapes_of(feed)) for p, t, feed in zip(paths, timings, feeds)]


def _shapes_of(feeds: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{name} {'x'.join(map(str, value.shape)) or 'scalar'}" for name, value in feeds.items())


def _batch_of(feeds: dict[str, np.ndarray]) -> int:
    """The batch that ran: the leading dimension of the inputs (1 for scalar inputs)."""
    return max((value.shape[0] for value in feeds.values() if value.ndim), default=1)


def format_summary(summaries: list[Summary], config: BenchConfig) -> str:
    """trtexec's summary layout, one block per model, plus ratios to the first."""
    names = [s.name.lower() for s in summaries]
    openvino = config.runtime is Runtime.OPENVINO or any(n.endswith(".xml") for n in names)
    onnxruntime = config.runtime is Runtime.ONNXRUNTIME and any(n.endswith(".onnx") for n in names)
    spinning = "spinning within each run" if config.spin else "spinning off"
    parts = ([f"{config.provider}, intra-op threads {config.threads}, {spinning}"] if onnxruntime else []) + \
        ([f"OpenVINO threads {config.threads}, 1 stream, precision {config.precision.value}"] if openvino else []) + \
        (["TensorRT engines"] if any(n.endswith((".plan", ".engine")) for n in names) else [])
    where = "; ".join(parts)
    lines = [f"=== Performance summary ({where}, {len(summaries[0].latencies_ms)} interleaved iterations) ===",
             f"CPU: {host().describe()}"]
    base = summaries[0].stat("median")
    for summary in summaries:
        s = summary.stat
        lines += [f"[{summary.name}]",
                  f"Inputs: {summary.inputs}" if summary.inputs else "",
                  f"Throughput: {summary.throughput:.2f} samples/s"
                  + (f" ({summary.throughput / summary.batch:.2f} runs/s of batch {summary.batch})"
                     if summary.batch > 1 else ""),
                  f"Latency: min = {s('min'):.3f} ms, max = {s('max'):.3f} ms, mean = {s('mean'):.3f} ms, "
                  f"median = {s('median'):.3f} ms, percentile(90%) = {s('p90'):.3f} ms, "
                  f"percentile(95%) = {s('p95'):.3f} ms, percentile(99%) = {s('p99'):.3f} ms",
                  _versus(base, s("median")) if summary is not summaries[0] else ""]
    return "\n".join(line for line in lines if line)


def plot(summaries: list[Summary], path: Path) -> None:
    from .html_report import _pyplot

    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 3))
    axes.boxplot([s.latencies_ms for s in summaries], vert=False)
    axes.set_yticks(range(1, len(summaries) + 1), [Path(s.name).name for s in summaries])
    axes.set_xlabel("latency ms")
    import io

    from . import ir

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    ir.write_bytes_atomic(path, buffer.getvalue())


SAME_SPEED = 0.005   # medians this close read as the same speed


def _versus(first: float, median: float) -> str:
    """'Median vs first model: 2.31x faster', '1.09x slower' (never 'faster' for a slowdown), or 'same speed'
    within 0.5% (where '1.00x slower' would say nothing)."""
    ratio = first / median
    if abs(ratio - 1) < SAME_SPEED:
        return f"Median vs first model: same speed (within {SAME_SPEED:.1%})"
    return (f"Median vs first model: {ratio:.2f}x faster" if ratio >= 1
            else f"Median vs first model: {1 / ratio:.2f}x slower")

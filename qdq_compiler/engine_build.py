"""`qdqc build-engine`: a strongly typed engine from an ONNX graph, by TensorRT or TensorRT-RTX.

Two backends share one Python API. **TensorRT** 10/11 builds on (and for) the GPU it runs on.
**TensorRT-RTX** (PyPI `tensorrt-rtx`) builds ahead of time with no GPU present ("The CPU-only
Ahead Of Time (AOT) feature is enabled by default": NVIDIA's TensorRT-RTX docs, "CPU-Only AOT and
TensorRT-RTX Engines") for compute capabilities 8.0, 8.6, 8.9 and 12.0 unless told otherwise; the
engine is JIT-compiled on its first run. `auto` takes TensorRT when it imports and a GPU answers,
else TensorRT-RTX.

Both are strongly typed: the graph's own types decide precision (INT8 where Q/DQ says so, FP16
where `qdqc lower --target tensorrt` typed it). TensorRT 11 has no precision flags; on 10.x the
network is created STRONGLY_TYPED and the FP16/INT8 flags are set only before 10.12, where they
still mattered. The optimization profile covers dynamic batch and sequence: min 1, opt from
--shapes (or 1x128), max from --max-shapes (or batch 32 and sequence 512: INT8 fused attention needs
sequence <= 512; a batch-1 maximum would refuse the batched requests a server sends).

The summary is the builder's evidence (`engine_evidence`): its log at VERBOSE with DETAILED
profiling verbosity, and the engine inspector where a GPU can deserialize the engine.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from . import engine_evidence, ir
from .errors import QdqcError, UsageError

DEFAULT_OPT, DEFAULT_MAX_BATCH, DEFAULT_MAX_SEQUENCE = (1, 128), 32, 512
BACKENDS = ("auto", "tensorrt", "tensorrt-rtx")
# TensorRT-RTX's ComputeCapability members by "major.minor"
COMPUTE_CAPABILITIES = {"7.5": "SM75", "8.0": "SM80", "8.6": "SM86", "8.9": "SM89", "12.0": "SM120",
                        "12.1": "SM121", "current": "CURRENT"}


@dataclass(frozen=True)
class EngineConfig:
    int8: bool = False
    fp16: bool = False
    opt_shapes: dict = field(default_factory=dict)
    min_shapes: dict = field(default_factory=dict)
    max_shapes: dict = field(default_factory=dict)
    workspace_mib: int | None = None
    timing_cache: Path | None = None
    opt_level: int | None = None
    backend: str = "auto"
    compute_capabilities: tuple[str, ...] = ()
    baseline: Path | None = None         # a float engine's .plan (its .layers.json) to compare weights with

    def __post_init__(self):
        from .bench import parse_shapes

        for name in ("opt_shapes", "min_shapes", "max_shapes"):  # the API takes "8x128" as the CLI does
            given = getattr(self, name)
            object.__setattr__(self, name, {k: parse_shapes(f"{k}:{v}")[k] if isinstance(v, str) else tuple(v)
                                            for k, v in (given or {}).items()})
        capabilities = self.compute_capabilities
        if isinstance(capabilities, str):
            capabilities = capabilities.split(",")
        object.__setattr__(self, "compute_capabilities", tuple(c.strip() for c in capabilities if c.strip()))
        for name in ("timing_cache", "baseline"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.workspace_mib is not None and self.workspace_mib < 1:
            raise UsageError(f"--workspace must be at least 1 MiB, got {self.workspace_mib}")
        if self.opt_level is not None and not 0 <= self.opt_level <= 5:
            raise UsageError(f"--opt-level must be 0..5, got {self.opt_level}")
        if self.backend not in BACKENDS:
            raise UsageError(f"--backend {self.backend!r}: expected one of {', '.join(BACKENDS)}")
        unknown = [c for c in self.compute_capabilities if c not in COMPUTE_CAPABILITIES]
        if unknown:
            raise UsageError(f"--compute-capability {unknown[0]!r}: TensorRT-RTX targets {', '.join(COMPUTE_CAPABILITIES)} "
                             "(Turing to Blackwell RTX GPUs); for datacenter GPUs such as Hopper (9.0) build with "
                             "--backend tensorrt on that GPU")
        if self.compute_capabilities and self.backend == "tensorrt":
            raise UsageError("--compute-capability is a TensorRT-RTX setting; TensorRT builds for the GPU it runs on")
        if "current" in self.compute_capabilities and len(self.compute_capabilities) > 1:
            raise UsageError("--compute-capability current cannot be combined with others")


@dataclass(frozen=True)
class Backend:
    name: str           # "tensorrt" or "tensorrt-rtx"
    trt: object         # the imported module
    reason: str         # why this one was chosen

    @property
    def version(self) -> str:
        return self.trt.__version__

    @property
    def rtx(self) -> bool:
        return self.name == "tensorrt-rtx"


def _import_rtx():
    try:
        import tensorrt_rtx
    except ImportError:
        raise QdqcError("the tensorrt-rtx backend needs TensorRT-RTX: pip install tensorrt-rtx "
                        "(builds engines without a GPU)") from None
    return tensorrt_rtx


def select_backend(choice: str) -> Backend:
    """TensorRT on a usable GPU, else TensorRT-RTX's CPU-only ahead-of-time builder (for `auto`)."""
    from .trt_engine import gpu_modules

    if choice == "tensorrt-rtx":
        return Backend("tensorrt-rtx", _import_rtx(), "asked for")
    if choice == "tensorrt":
        return Backend("tensorrt", gpu_modules("build-engine --backend tensorrt")[0], "asked for")
    try:
        return Backend("tensorrt", gpu_modules("build-engine")[0], "TensorRT and a GPU are present")
    except QdqcError as missing:
        why = "TensorRT is not installed" if "needs TensorRT" in str(missing) else "no GPU for TensorRT"
    try:
        return Backend("tensorrt-rtx", _import_rtx(), f"{why}; TensorRT-RTX builds ahead of time without a GPU")
    except QdqcError:
        raise QdqcError("build-engine needs TensorRT (pip install 'qdqc[gpu]', with a GPU) or TensorRT-RTX "
                        "(pip install tensorrt-rtx, no GPU needed)") from None


def _dimension_names(graph: gs.Graph) -> dict[str, str]:
    """Symbolic dimension name -> the first input that has it ('batch' -> 'input_ids')."""
    names = {}
    for tensor in graph.inputs:
        for d in tensor.shape or ():
            if isinstance(d, str) and d:
                names.setdefault(d, tensor.name)
    return names


def profile_shapes(graph: gs.Graph, config: EngineConfig) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) for every input: fixed dims as they are; a dynamic dim from the option naming its
    input, else from another input sharing its symbolic name (batch, sequence), else the defaults."""
    inputs = {t.name: t for t in graph.inputs}
    for option, given in (("--shapes", config.opt_shapes), ("--min-shapes", config.min_shapes),
                          ("--max-shapes", config.max_shapes)):
        unknown = sorted(set(given) - set(inputs))
        if unknown:
            raise UsageError(f"{option}: the model has no input '{unknown[0]}'; its inputs are {', '.join(inputs)}")

    def shared(given: dict) -> dict[str, int]:
        """Values of symbolic dims fixed by the shapes given for some input."""
        values = {}
        for name, shape in given.items():
            dims = inputs[name].shape or ()
            for d, value in zip(dims, shape):
                if isinstance(d, str) and d:
                    values.setdefault(d, value)
        return values

    shapes = {}
    for tensor in graph.inputs:
        dims = tuple(tensor.shape or ())
        dynamic = [i for i, d in enumerate(dims) if not (isinstance(d, int) and d > 0)]

        def fill(given: dict, fallback: tuple) -> tuple:
            if tensor.name in given:
                shape = tuple(given[tensor.name])
                if len(shape) != len(dims) or any(isinstance(d, int) and d > 0 and d != s
                                                  for d, s in zip(dims, shape)):
                    raise UsageError(f"shape {shape} for input '{tensor.name}' contradicts the model's {list(dims)}")
                return shape
            known, values = shared(given), iter(fallback)
            return tuple(d if i not in dynamic else known.get(d) or next(values, 1) if isinstance(d, str)
                         else next(values, 1) for i, d in enumerate(dims))

        opt = fill(config.opt_shapes, DEFAULT_OPT)
        low = fill(config.min_shapes, tuple(1 for _ in dynamic))
        high = fill(config.max_shapes, (max(opt[dynamic[0]], DEFAULT_MAX_BATCH) if dynamic else 1,
                                        DEFAULT_MAX_SEQUENCE))
        if any(a > b or b > c for a, b, c in zip(low, opt, high)):
            hint = "" if tensor.name in config.max_shapes else (
                f" (max is the default: batch {DEFAULT_MAX_BATCH} or that of --shapes, sequence "
                f"{DEFAULT_MAX_SEQUENCE}; set --max-shapes)")
            raise UsageError(f"input '{tensor.name}': need min <= opt <= max, got {low}, {opt}, {high}{hint}")
        shapes[tensor.name] = (low, opt, high)
    return shapes


def check_precisions(graph: gs.Graph, config: EngineConfig, model: Path | str = "model") -> None:
    """--int8 / --fp16 promise what the graph must carry (strong typing builds the types it sees); a
    graph lowered for onnxruntime carries com.microsoft kernels TensorRT cannot parse."""
    from .insert import LOWERED_OPS

    lowered = next((n.op for n in graph.nodes if n.op in LOWERED_OPS or n.domain == "com.microsoft"), None)
    if lowered is not None:
        raise UsageError(f"{model}: lowered for onnxruntime ({lowered}, com.microsoft integer GEMMs); build-engine "
                         "needs `qdqc lower --target tensorrt` of the calibrated Q/DQ model")
    has_qdq = any(n.op == "DequantizeLinear" for n in graph.nodes)
    has_fp16 = any(t.dtype is not None and np.dtype(t.dtype) == np.float16 for t in graph.tensors().values())
    if config.int8 and not has_qdq:
        raise UsageError("--int8: the graph has no Q/DQ; run `qdqc compile ... --target tensorrt` "
                         "(or insert, calibrate, then `qdqc lower --target tensorrt`)")
    if config.fp16 and not has_fp16:
        raise UsageError("--fp16: the graph has no FP16 tensors; run `qdqc lower --target tensorrt` first")


def _version(trt) -> tuple[int, int]:
    major, minor = (int(p) for p in trt.__version__.split(".")[:2])
    return major, minor


def build_logger(trt):
    """A `trt.ILogger` that keeps every message, VERBOSE included: the build's evidence. Errors are kept
    apart and end up in the one-line error a failed parse or build raises, not echoed line by line."""

    class BuildLog(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[str] = []
            self.errors: list[str] = []

        def log(self, severity, message):
            self.messages.append(message)
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(" ".join(message.split()))

    return BuildLog()


def network_from_onnx(trt, path: Path, logger, rtx: bool = False):
    """Builder, network and parser for `path`; parser errors listed with their node names."""
    builder = trt.Builder(logger)
    flags = 0
    if not rtx and _version(trt) < (11, 0) and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)  # TensorRT-RTX and TensorRT 11: strongly typed always
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        def where(error) -> str:
            if error.node_name():
                return error.node_name()
            index, op = error.node(), error.node_operator()
            return f"node #{index} ({op})" if index >= 0 and op else "<model>"

        errors = [f"{where(parser.get_error(i))}: {' '.join(parser.get_error(i).desc().split())}"
                  for i in range(parser.num_errors)]
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise QdqcError(f"{path}: TensorRT's parser failed: " + "; ".join(errors[:5]) + more)
    return builder, network, parser


def builder_config(trt, builder, shapes: dict, config: EngineConfig, rtx: bool = False):
    settings = builder.create_builder_config()
    settings.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer metadata: the ONNX nodes each covers
    if config.workspace_mib:
        settings.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mib << 20)
    if config.opt_level is not None:
        settings.builder_optimization_level = config.opt_level
    if not rtx and _version(trt) < (10, 12):  # before strong typing superseded them
        for wanted, name in ((config.fp16, "FP16"), (config.int8, "INT8")):
            if wanted and hasattr(trt.BuilderFlag, name):
                settings.set_flag(getattr(trt.BuilderFlag, name))
    if rtx and config.compute_capabilities:
        settings.num_compute_capabilities = len(config.compute_capabilities)
        for index, capability in enumerate(config.compute_capabilities):
            member = getattr(trt.ComputeCapability, COMPUTE_CAPABILITIES[capability])
            if not settings.set_compute_capability(member, index):
                raise UsageError(f"--compute-capability {capability}: TensorRT-RTX {trt.__version__} refused it")
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    settings.add_optimization_profile(profile)
    if config.timing_cache is not None:
        if rtx:  # its docs: a timing cache makes the builder query a GPU
            print(f"warning: --timing-cache ignored: TensorRT-RTX would need a GPU to use {config.timing_cache}",
                  file=sys.stderr)
        else:
            cached = config.timing_cache.read_bytes() if config.timing_cache.exists() else b""
            settings.set_timing_cache(settings.create_timing_cache(cached), ignore_mismatch=False)
    return settings


def _inspector_layers(backend: Backend, logger, serialized: bytes) -> tuple[list, dict | None]:
    """The engine inspector's layers, where the engine deserializes (TensorRT on its GPU)."""
    if backend.rtx:  # deserializing needs a CUDA driver; the AOT build log carries the layers instead
        return [], None
    trt = backend.trt
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    if engine is None:
        return [], None
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    return [engine_evidence.layer_from_inspector(layer) for layer in info.get("Layers", [])], info


def sidecar(engine: Path) -> Path:
    return engine.with_suffix(engine.suffix + ".layers.json")


def read_summary(engine: Path) -> dict | None:
    """The summary `build-engine` wrote beside an engine, or None."""
    path = sidecar(engine)
    try:
        return json.loads(path.read_text())["summary"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_engine(model: Path, output: Path, config: EngineConfig) -> dict:
    """Build `model` into the engine `output`; returns the summary also written to `<output>.layers.json`."""
    model, output = Path(model), Path(output)
    for kept in (model, config.baseline):
        if kept is not None and (ir.same_file(output, kept) or ir.same_file(sidecar(output), kept)):
            raise UsageError(f"{output}: the engine or its .layers.json would overwrite {kept}")
    if not output.parent.is_dir():
        raise UsageError(f"{output}: no such folder {output.parent}")
    graph = ir.load(model)
    check_precisions(graph, config, model)
    shapes = profile_shapes(graph, config)
    baseline = None
    if config.baseline is not None:
        baseline = read_summary(config.baseline)
        if baseline is None:
            raise UsageError(f"--baseline {config.baseline}: no {sidecar(config.baseline).name} beside it "
                             "(build that engine with `qdqc build-engine` first)")
        if baseline.get("inputs") not in (None, [t.name for t in graph.inputs]):
            raise UsageError(f"--baseline {config.baseline}: built from a model with inputs {baseline['inputs']}, "
                             f"not {[t.name for t in graph.inputs]}")
    backend = select_backend(config.backend)
    if backend.rtx and "current" in config.compute_capabilities:
        from .trt_engine import device_library

        if not device_library().usable():
            raise UsageError("--compute-capability current targets the GPU of this machine, and it has none")
    blocks = engine_evidence.attention_blocks(graph)   # walked once: the warning, the summary, the record
    warnings = long_sequence_warning(blocks, shapes)
    for warning in warnings:
        print(f"qdqc: warning: {warning}", file=sys.stderr)
    trt = backend.trt
    logger = build_logger(trt)
    builder, network, _parser = network_from_onnx(trt, model, logger, backend.rtx)
    settings = builder_config(trt, builder, shapes, config, backend.rtx)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, settings)
    seconds = time.perf_counter() - started
    if serialized is None:
        detail = "; ".join(logger.errors[-3:]) or "see its log above"
        raise QdqcError(f"{model}: {backend.name} could not build an engine: {detail}")
    payload = bytes(serialized)
    ir.write_bytes_atomic(output, payload)
    if config.timing_cache is not None and not backend.rtx:
        ir.write_bytes_atomic(config.timing_cache, bytes(settings.get_timing_cache().serialize()))
    log = engine_evidence.read_log(logger.messages)
    layers, inspector = _inspector_layers(backend, logger, payload)
    layers = layers or log["layers"]
    summary = {"backend": backend.name, "version": backend.version, "chosen_because": backend.reason,
               "engine": str(output), "model": str(model), "inputs": [t.name for t in graph.inputs],
               "profile": {name: {"min": list(low), "opt": list(opt), "max": list(high)}
                           for name, (low, opt, high) in shapes.items()},
               "engine_bytes": len(payload), "build_seconds": round(seconds, 3),
               **engine_evidence.summarize(graph, log, layers, blocks), "warnings": warnings}
    if backend.rtx:
        summary["compute_capabilities"] = list(config.compute_capabilities) or ["default (8.0, 8.6, 8.9, 12.0)"]
    if baseline is not None and baseline.get("weights_bytes") and summary["weights_bytes"]:
        summary["baseline"] = {"engine": str(config.baseline), "weights_bytes": baseline["weights_bytes"],
                               "engine_bytes": baseline.get("engine_bytes"),
                               "float": not baseline.get("int8_layers") and not baseline.get("attention_quantized"),
                               "weights_ratio": round(summary["weights_bytes"] / baseline["weights_bytes"], 4)}
    record = {"summary": summary, "layers": [layer.to_json() for layer in layers],
              "attention": [{"scores": b.scores, "softmax": b.softmax, "context": b.context, "quantized": b.quantized}
                            for b in blocks],
              "self_attention_pattern_nodes": log["attention_pattern_nodes"]}
    if inspector is not None:
        record["inspector"] = inspector
    ir.write_text_atomic(sidecar(output), json.dumps(record, indent=1) + "\n")
    return summary


def long_sequence_warning(blocks: list[engine_evidence.AttentionBlock], shapes: dict) -> list[str]:
    """TensorRT documents its INT8 fused attention for sequences up to 512 ("mha-fusion" in its developer
    guide); a longer max builds, but the attention may run unfused or as the builder alone decides."""
    quantized = any(block.quantized for block in blocks)
    longest = max((max(high[1:], default=0) for _, _, high in shapes.values()), default=0)
    if quantized and longest > DEFAULT_MAX_SEQUENCE:
        return [f"max sequence {longest} > {DEFAULT_MAX_SEQUENCE}: TensorRT documents INT8 fused attention "
                f"for sequences up to {DEFAULT_MAX_SEQUENCE}"]
    return []


def _mib(count: int | None) -> str:
    return "?" if count is None else f"{count / 2**20:.1f} MiB"


def summary_line(summary: dict) -> str:
    """One line: who built it, sizes, attention fused, INT8 GEMMs, and the float baseline when given."""
    def ratio(done, total):
        return "unknown (no layer records)" if done is None else f"{done}/{total}"

    text = (f"{summary['backend']} {summary['version']} built {summary['engine']} in {summary['build_seconds']:.1f} s: "
            f"engine {_mib(summary['engine_bytes'])}, weights {_mib(summary['weights_bytes'])}, "
            f"activations {_mib(summary['activation_bytes'])}, {summary['engine_layers']} engine layers; "
            f"attention fused {ratio(summary['attention_fused'], summary['attention_blocks'])}")
    if summary["attention_quantized"]:
        text += f" (INT8 {ratio(summary['attention_fused_int8'], summary['attention_quantized'])})"
    if summary["quantized_gemms"]:
        text += f", quantized GEMMs in INT8 {ratio(summary['int8_gemms'], summary['quantized_gemms'])}"
    if "baseline" in summary:
        base = summary["baseline"]
        kind = "float" if base["float"] else "quantized"
        text += f"; weights {base['weights_ratio']:.2f}x of the {kind} {base['engine']}'s {_mib(base['weights_bytes'])}"
    return text


def profile_line(summary: dict) -> str:
    return "profile " + "; ".join(f"{name} min {'x'.join(map(str, p['min']))} opt {'x'.join(map(str, p['opt']))} "
                                  f"max {'x'.join(map(str, p['max']))}" for name, p in summary["profile"].items())

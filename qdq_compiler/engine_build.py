"""`qdqc build-engine`: a strongly typed TensorRT 10/11 engine from a lowered (`--target tensorrt`) graph.

TensorRT is imported lazily. TensorRT 11 is strongly typed only (no precision flags, no
calibrator); on 10.x the network is created STRONGLY_TYPED, and before 10.12 the FP16/INT8
builder flags are set when asked (REFERENCE.md §0, §9). The optimization profile covers dynamic
batch and sequence: min 1, opt from --shapes (or 1x128), max from --max-shapes (or 1x512: INT8
fused attention needs sequence <= 512).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from . import ir
from .errors import QdqcError, UsageError

DEFAULT_OPT, DEFAULT_MAX_SEQUENCE = (1, 128), 512


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

    def __post_init__(self):
        if self.workspace_mib is not None and self.workspace_mib < 1:
            raise UsageError(f"--workspace must be at least 1 MiB, got {self.workspace_mib}")
        if self.opt_level is not None and not 0 <= self.opt_level <= 5:
            raise UsageError(f"--opt-level must be 0..5, got {self.opt_level}")


def profile_shapes(graph: gs.Graph, config: EngineConfig) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) for every input: fixed dims as they are, dynamic ones from the options."""
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
            values = iter(fallback)
            return tuple(d if i not in dynamic else next(values, 1) for i, d in enumerate(dims))

        opt = fill(config.opt_shapes, DEFAULT_OPT)
        low = fill(config.min_shapes, tuple(1 for _ in dynamic))
        high = fill(config.max_shapes, (opt[dynamic[0]] if dynamic else 1, DEFAULT_MAX_SEQUENCE))
        if any(a > b or b > c for a, b, c in zip(low, opt, high)):
            raise UsageError(f"input '{tensor.name}': need min <= opt <= max, got {low}, {opt}, {high}")
        shapes[tensor.name] = (low, opt, high)
    return shapes


def check_precisions(graph: gs.Graph, config: EngineConfig) -> None:
    """--int8 / --fp16 promise what the graph must carry (strong typing builds the types it sees)."""
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


def network_from_onnx(trt, path: Path, logger):
    """Builder, network and parser for `path`; parser errors listed with their node names."""
    builder = trt.Builder(logger)
    flags = 0
    if _version(trt) < (11, 0) and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = [f"{parser.get_error(i).node_name() or '<model>'}: {parser.get_error(i).desc()}"
                  for i in range(parser.num_errors)]
        raise QdqcError(f"{path}: TensorRT's parser failed: " + "; ".join(errors[:5]))
    return builder, network, parser


def builder_config(trt, builder, shapes: dict, config: EngineConfig):
    settings = builder.create_builder_config()
    if config.workspace_mib:
        settings.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mib << 20)
    if config.opt_level is not None:
        settings.builder_optimization_level = config.opt_level
    if _version(trt) < (10, 12):  # before strong typing superseded them
        for wanted, name in ((config.fp16, "FP16"), (config.int8, "INT8")):
            if wanted and hasattr(trt.BuilderFlag, name):
                settings.set_flag(getattr(trt.BuilderFlag, name))
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    settings.add_optimization_profile(profile)
    if config.timing_cache is not None:
        cached = config.timing_cache.read_bytes() if config.timing_cache.exists() else b""
        settings.set_timing_cache(settings.create_timing_cache(cached), ignore_mismatch=False)
    return settings


def layer_summary(layers: list[dict]) -> dict:
    """Counts by precision and whether attention fused, from the inspector's JSON layers."""
    precisions: dict[str, int] = {}
    fused_attention = 0
    for layer in layers:
        text = json.dumps(layer).lower()
        kind = "INT8" if "int8" in text else "FP16" if ("half" in text or "fp16" in text) else "FP32"
        precisions[kind] = precisions.get(kind, 0) + 1
        fused_attention += ("mha" in text or "fmha" in text or "attention" in text) and "int8" in text
    return {"layers": len(layers), "by_precision": precisions, "int8_attention_layers": fused_attention}


def build_engine(model: Path, output: Path, config: EngineConfig) -> dict:
    graph = ir.load(model)
    check_precisions(graph, config)
    shapes = profile_shapes(graph, config)
    from .trt_engine import gpu_modules

    trt, _cudart = gpu_modules("build-engine")
    logger = trt.Logger(trt.Logger.WARNING)
    builder, network, _parser = network_from_onnx(trt, model, logger)
    settings = builder_config(trt, builder, shapes, config)
    serialized = builder.build_serialized_network(network, settings)
    if serialized is None:
        raise QdqcError(f"{model}: TensorRT could not build an engine (see its log above)")
    ir.write_bytes_atomic(output, bytes(serialized))
    if config.timing_cache is not None:
        ir.write_bytes_atomic(config.timing_cache, bytes(settings.get_timing_cache().serialize()))
    engine = trt.Runtime(logger).deserialize_cuda_engine(bytes(serialized))
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    summary = layer_summary(info.get("Layers", []))
    ir.write_text_atomic(output.with_suffix(output.suffix + ".layers.json"),
                         json.dumps({"summary": summary, "inspector": info}, indent=1) + "\n")
    return summary

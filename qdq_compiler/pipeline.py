"""Pass registry and pipeline runner.

A pass is a function `(graph, ctx) -> PassResult`, registered by name with its contract: the
analyses or graph properties it `requires`, those it `provides`, and the frozen settings class it
reads (`ctx.settings(cls)`). A pipeline is a tuple of pass names; the runner refuses a pass whose
requirements nothing before it provided ("place-quantizers needs match-bert"), checks the graph after
each pass when asked and records a per-pass summary for the report.
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import onnx_graphsurgeon as gs

from . import ir
from .errors import PassError, QdqcError


@dataclass(frozen=True)
class Diagnostic:
    level: str  # "info" | "warning"
    message: str
    node: str | None = None


@dataclass(frozen=True)
class PassResult:
    modified: bool
    stats: Mapping[str, Any] = field(default_factory=dict)
    diagnostics: tuple[Diagnostic, ...] = ()


@dataclass
class PassContext:
    """What passes share: the caller's configuration, the analyses earlier passes produced, and the
    properties the graph is known to have. A pass reads its own settings with `settings(cls)`."""

    config: Any = None
    analyses: dict[str, Any] = field(default_factory=dict)
    properties: set[str] = field(default_factory=set)

    def settings(self, cls: type):
        """The pass settings of type `cls`: the config itself when it is one, else `cls.from_config(config)`
        when the settings class knows how to read it, else the class defaults."""
        if isinstance(self.config, cls):
            return self.config
        if self.config is not None and hasattr(cls, "from_config"):
            return cls.from_config(self.config)
        return cls()


@dataclass(frozen=True)
class PassRecord:
    name: str
    modified: bool
    stats: Mapping[str, Any]
    diagnostics: tuple[Diagnostic, ...]
    seconds: float

    def to_json(self) -> dict:
        return {"pass": self.name, "modified": self.modified, "stats": dict(self.stats),
                "seconds": round(self.seconds, 4),
                "diagnostics": [vars(d) for d in self.diagnostics]}


PassFn = Callable[[gs.Graph, PassContext], PassResult]


@dataclass(frozen=True)
class PassSpec:
    """A registered pass and its contract."""

    name: str
    fn: PassFn
    requires: tuple[str, ...] = ()   # analyses (keys of ctx.analyses) or graph properties
    provides: tuple[str, ...] = ()
    settings: type | None = None     # the frozen settings class the pass reads


# Graph properties a pass may require without an earlier pass providing them in the same pipeline:
# each is checked on the graph itself (a model saved by `insert` and loaded again has its Q/DQ).
PROPERTIES: Mapping[str, tuple[Callable[[gs.Graph], bool], str]] = {
    "qdq": (lambda graph: any(n.op == "QuantizeLinear" for n in graph.nodes),
            "Q/DQ pairs in the graph (run qdqc insert, or the insert-qdq pass)"),
    "integer-gemms": (lambda graph: any(n.op == "MatMulIntegerToFloat" for n in graph.nodes),
                      "integer GEMMs in the graph (run the lower-onnxruntime pass)"),
}
# Analyses that callers compute outside any pass and put in ctx.analyses before running the pass.
EXTERNAL_ANALYSES: Mapping[str, str] = {
    "channel_max": "per-channel activation maxima (qdq_compiler.smooth.smooth computes them)",
    "hessians": "input Hessians (qdq_compiler.weight_rounding.apply_gptq computes them)",
}
_REGISTRY: dict[str, PassSpec] = {}

PIPELINES: Mapping[str, tuple[str, ...]] = {
    "canonicalize": ("canonicalize",),
    "insert": ("canonicalize", "decompose-fused", "split-gemm-bias", "match-bert", "place-quantizers",
               "release-quantizers", "insert-qdq",
               "record-plan"),
    "lower-onnxruntime": ("qdq-constants", "signed-zero-points", "fold-constant-gemms", "shift-into-layernorm",
                          "lower-onnxruntime", "fold-output-scale",
                          "mask-key-columns", "residual-sum", "clamp-attention-mask", "floor-softmax-input",
                          "fold-weight-quantizers", "pair-weight-rows", "report-float-gemms"),
    "lower-openvino": ("qdq-constants", "signed-zero-points", "fold-constant-gemms", "shift-into-layernorm",
                       "unsigned-linear-inputs", "fold-weight-quantizers", "pair-weight-rows"),
    "lower-tensorrt": ("qdq-constants", "signed-zero-points", "fold-constant-gemms", "shift-into-layernorm", "report-mha", "drop-nan-guard", "fold-weight-quantizers",
                       "to-fp16", "check-types"),
}


def register(name: str, *, requires: tuple[str, ...] = (), provides: tuple[str, ...] = (),
             settings: type | None = None) -> Callable[[PassFn], PassFn]:
    def decorate(fn: PassFn) -> PassFn:
        if name in _REGISTRY:
            raise ValueError(f"pass '{name}' is already registered")
        _REGISTRY[name] = PassSpec(name, fn, tuple(requires), tuple(provides), settings)
        return fn

    return decorate


def get_spec(name: str) -> PassSpec:
    importlib.import_module("qdq_compiler.passes")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise QdqcError(f"unknown pass '{name}' (known: {', '.join(sorted(_REGISTRY))})") from None


def get_pass(name: str) -> PassFn:
    return get_spec(name).fn


def _provider(requirement: str) -> str:
    """Who provides `requirement`, for the message of a pass run out of order."""
    if requirement in PROPERTIES:
        return PROPERTIES[requirement][1]
    passes = [spec.name for spec in _REGISTRY.values() if requirement in spec.provides]
    if passes:
        return " or ".join(passes)
    return EXTERNAL_ANALYSES.get(requirement, f"'{requirement}'")


def missing_requirements(spec: PassSpec, graph: gs.Graph, ctx: PassContext) -> list[str]:
    missing = []
    for requirement in spec.requires:
        if requirement in ctx.analyses or requirement in ctx.properties:
            continue
        if requirement in PROPERTIES and PROPERTIES[requirement][0](graph):
            continue
        missing.append(requirement)
    return missing


def run_pipeline(graph: gs.Graph, passes: tuple[str, ...], ctx: PassContext, *,
                 verify: bool = False) -> list[PassRecord]:
    """Run `passes` in order on `graph` (in place); returns one record per pass."""
    records: list[PassRecord] = []
    for name in passes:
        spec = get_spec(name)
        ran = ", ".join(r.name for r in records) or "none"
        missing = missing_requirements(spec, graph, ctx)
        if missing:
            raise PassError(f"{name} needs {'; '.join(_provider(m) for m in missing)}; passes run before it: {ran}")
        if spec.settings is not None:
            try:
                ctx.settings(spec.settings)
            except QdqcError:
                raise
            except Exception as exc:
                raise PassError(f"{name}: its settings ({spec.settings.__name__}) cannot be read from "
                                f"{type(ctx.config).__name__} ({exc})") from None
        start = time.perf_counter()
        try:
            result = spec.fn(graph, ctx)
        except QdqcError:
            raise
        except Exception as exc:  # a bug or an unexpected graph: say where it happened
            raise PassError(f"pass '{name}' failed ({type(exc).__name__}: {exc}); passes run before it: {ran}") from exc
        records.append(PassRecord(name, result.modified, result.stats, result.diagnostics,
                                  time.perf_counter() - start))
        ctx.properties.update(spec.provides)
        if verify and result.modified:
            try:
                verify_graph(graph)
            except QdqcError as exc:
                raise PassError(f"graph invalid after pass '{name}': {exc}; passes run before it: {ran}") from None
    return records


def verify_graph(graph: gs.Graph) -> None:
    """onnx.checker plus qdqc's own invariants."""
    from .invariants import check_invariants

    problems = check_invariants(graph)
    if problems:
        raise QdqcError("; ".join(problems[:5]))
    ir.check_model(graph)

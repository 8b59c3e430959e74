"""Pass registry and pipeline runner.

A pass is a function `(graph, ctx) -> PassResult`, registered by name. A
pipeline is a tuple of pass names; the runner checks the graph after each pass
when asked and records a per-pass summary for the report.
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
    """What passes share: the settings and the analyses earlier passes produced."""

    config: Any
    analyses: dict[str, Any] = field(default_factory=dict)


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
_REGISTRY: dict[str, PassFn] = {}

PIPELINES: Mapping[str, tuple[str, ...]] = {
    "canonicalize": ("canonicalize",),
    "insert": ("canonicalize", "decompose-fused", "split-gemm-bias", "match-bert", "place-quantizers", "insert-qdq"),
    "lower-onnxruntime": ("lower-onnxruntime", "fold-output-scale", "residual-sum", "floor-softmax-input",
                          "fold-weight-quantizers"),
    "lower-openvino": ("unsigned-linear-inputs", "fold-weight-quantizers"),
    "lower-tensorrt": ("report-mha", "drop-nan-guard", "fold-weight-quantizers", "to-fp16"),
}


def register(name: str) -> Callable[[PassFn], PassFn]:
    def decorate(fn: PassFn) -> PassFn:
        if name in _REGISTRY:
            raise ValueError(f"pass '{name}' is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorate


def get_pass(name: str) -> PassFn:
    importlib.import_module("qdq_compiler.passes")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise QdqcError(f"unknown pass '{name}' (known: {', '.join(sorted(_REGISTRY))})") from None


def run_pipeline(graph: gs.Graph, passes: tuple[str, ...], ctx: PassContext, *,
                 verify: bool = False) -> list[PassRecord]:
    """Run `passes` in order on `graph` (in place); returns one record per pass."""
    records: list[PassRecord] = []
    for name in passes:
        fn = get_pass(name)
        ran = ", ".join(r.name for r in records) or "none"
        start = time.perf_counter()
        try:
            result = fn(graph, ctx)
        except QdqcError:
            raise
        except Exception as exc:  # a bug or an unexpected graph: say where it happened
            raise PassError(f"pass '{name}' failed ({type(exc).__name__}: {exc}); passes run before it: {ran}") from exc
        records.append(PassRecord(name, result.modified, result.stats, result.diagnostics,
                                  time.perf_counter() - start))
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

"""`lower`: a calibrated Q/DQ graph to what a backend runs fast."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import onnx_graphsurgeon as gs

from .config import choice, names
from .cpu import ISA_KEY, Isa
from .errors import UsageError
from .pipeline import PIPELINES, PassContext, PassRecord, run_pipeline


class Target(str, Enum):
    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"
    TENSORRT = "tensorrt"


LOWERED_KEY = "qdqc.lowered_for"   # metadata: the target a model was lowered for
FP32_CHOICES = frozenset({"LayerNorm", "Softmax", "Gelu"})
DEFAULT_FP32 = frozenset({"LayerNorm"})   # LayerNorm's variance overflows FP16 in BERT


@dataclass(frozen=True)
class LowerConfig:
    target: Target = Target.ONNXRUNTIME
    keep_fp32: frozenset[str] | None = None   # tensorrt: what stays FP32 (None: LayerNorm)
    strict: bool = False   # a quantized GEMM the target cannot make integer is an error, not a warning
    isa: Isa = Isa.PORTABLE   # the CPU kernels the output may assume (onnxruntime, openvino)

    def __post_init__(self):
        object.__setattr__(self, "target", choice(Target, self.target, "--target"))
        object.__setattr__(self, "isa", choice(Isa, self.isa, "--isa"))
        if self.isa is not Isa.PORTABLE and self.target is Target.TENSORRT:
            raise UsageError(f"--isa {self.isa.value} picks CPU integer kernels; the tensorrt lowering has none")
        if self.keep_fp32 is None:
            keep = DEFAULT_FP32 if self.target is Target.TENSORRT else frozenset()
        else:
            keep = frozenset(names(self.keep_fp32, "--keep-fp32"))
            if keep - FP32_CHOICES:
                raise UsageError(f"--keep-fp32 {','.join(sorted(keep - FP32_CHOICES))}: expected any of "
                                 f"{','.join(sorted(FP32_CHOICES))}")
            if keep and self.target is not Target.TENSORRT:   # said, and silently ignored, would mislead
                raise UsageError(f"--keep-fp32 applies to --target tensorrt (the FP16 graph); the "
                                 f"{self.target.value} lowering casts nothing to FP16")
        object.__setattr__(self, "keep_fp32", keep)


def lower(graph: gs.Graph, config: LowerConfig, *, verify: bool = False,
          require_calibrated: bool = True) -> list[PassRecord]:
    """Lower a calibrated Q/DQ graph; one whose activation scales are still insert's placeholders is
    refused unless `require_calibrated` is False (structure-only uses)."""
    if not any(n.op == "QuantizeLinear" for n in graph.nodes):
        raise UsageError("the model has no QuantizeLinear: run `qdqc insert` and `qdqc calibrate` first")
    if require_calibrated:
        from .calibrate import require_calibrated as check

        check(graph, "qdqc lower")
    from .calibrate import require_fake_quant

    require_fake_quant(graph, "qdqc lower")
    records = run_pipeline(graph, PIPELINES[f"lower-{config.target.value}"], PassContext(config), verify=verify)
    left = [d for r in records for d in r.diagnostics if d.level == "warning" and r.name == "report-float-gemms"]
    if config.strict and left:
        from .errors import ModelError

        raise ModelError(f"--strict: {len(left)} quantized GEMM(s) left in float; first: {left[0].message}")
    from . import ir

    ir.unique_node_names(graph)   # a lowered model is for a runtime, and onnxruntime refuses repeated node names
    ir.metadata(graph)[LOWERED_KEY] = config.target.value   # calibrate / compile / lower refuse it from now on
    if config.isa is not Isa.PORTABLE:
        ir.metadata(graph)[ISA_KEY] = config.isa.value   # bench and the check refuse it on a host without it
    return records

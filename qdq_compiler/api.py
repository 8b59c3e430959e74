"""The Python API: every qdqc command as a function taking and returning Python objects.

    import qdq_compiler
    result = qdq_compiler.compile("model.onnx", "calib.npz")   # smooth auto + percentile 99.999, ft1
    result.save("model.int8.onnx")

Options are keyword arguments with the CLI's names and defaults; they become the same frozen
config objects the CLI builds (validated in their __post_init__), and errors are qdq_compiler
exceptions (`QdqcError` and its subclasses), never SystemExit. The CLI (cli.py) parses its
arguments into these calls and prints.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from . import ir
from .analyze import FallbackConfig, Sensitivity
from .calibrate import QDQ_MODEL, CalibrationConfig, TensorReport
from .config import InsertConfig, Mode, choice, names
from .data import Dataset, open_data
from .errors import QdqcError, QdqcNote, UsageError
from .insert import InsertResult  # also loads the submodule before __init__ binds `insert`
from .cpu import Isa
from .lower import LowerConfig, Target
from .quant import WEIGHT_BITS
from .pipeline import PassRecord
from .recipe import Recipe, SiteRule, decision, parse_recipe
from .smooth import DEFAULT_SMOOTH, SmoothConfig, align_shifts
from .weight_rounding import parse_rounding
from .text import MAX_LENGTH, TEXT_SUFFIXES, calibration_data

__all__ = ["Result", "analyze", "calibrate", "calibration_data", "compile", "insert", "lower", "recommend"]

_CAL = CalibrationConfig   # its field defaults are the options' defaults (one source for CLI and API)


@dataclass
class Result:
    """A model produced by qdqc and what was done to it.

    `graph` is the onnx-graphsurgeon graph; `model` exports it; `save` writes it atomically (weights
    to `<path>.data` past 2 GB); `report` is JSON-ready: "sites" (what insert placed), "calibration"
    (per tensor, every method's amax and the one used), "smoothing", "fallbacks", "lowering",
    "timings" (seconds per stage)."""

    graph: gs.Graph
    report: dict[str, Any]
    source: Path | None = None                      # the input model's path, when it was one
    inserted: InsertResult | None = None
    tensors: list[TensorReport] = field(default_factory=list)
    collectors: dict = field(default_factory=dict)
    left_out: list[Sensitivity] = field(default_factory=list)
    ranking: list[Sensitivity] | None = None
    records: list[PassRecord] = field(default_factory=list)
    recipe: dict | None = None    # the recipe in force, to replay (insert: as given; compile: + fallback, auto methods)
    target: str | None = None                       # the lowering's target; None before lowering

    @property
    def model(self) -> onnx.ModelProto:
        return ir.to_model(self.graph)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the model to `path` (temp file + rename); refuses to replace the input model unless `overwrite`.
        A `.xml` path writes OpenVINO IR (`.xml` + `.bin`, needs the `openvino` extra)."""
        if Path(path).suffix.lower() == ".xml":   # OV.XML is an IR too
            from .openvino_backend import check_ir_target, save_ir

            check_ir_target(path, self.target)
            if self.source is not None and ir.same_file(path, self.source) and not overwrite:
                raise UsageError(f"{path}: output would overwrite the input model (pass --overwrite to allow it)")
            return save_ir(self.model, path)
        return ir.save(self.graph, path, source=self.source, overwrite=overwrite)


def load(model) -> tuple[gs.Graph, Path | None]:
    """A fresh graph from a path, an onnx.ModelProto or an earlier Result (never modified in place)."""
    if isinstance(model, (str, os.PathLike)):
        return ir.load(model), Path(model)
    if isinstance(model, Result):
        return ir.from_model(model.model), model.source
    if isinstance(model, onnx.ModelProto):
        return ir.from_model(model), None
    raise UsageError(f"model: expected a path, an onnx.ModelProto or a qdq_compiler Result, got {type(model).__name__}")


def _smoothing(smooth, data_given: bool, shift: bool | None, rounding: str) -> SmoothConfig | None:
    """`smooth=None` is the default: auto when there is data to measure, off from saved statistics.
    `shift` turns the OS+ channel shifts on or off; None: on with GPTQ rounding (a SmoothConfig given
    keeps its own). GPTQ rounds on the shifted inputs, so the weights' rounding error is compensated
    along the shift too; rounded to nearest, that error would multiply the shift itself — on GELU
    outputs, which are mostly ≈ 0, the whole of z for every token (MiniLM: 0.863 mean cosine)."""
    if shift is not None and not isinstance(shift, bool):
        raise UsageError(f"shift={shift!r}: expected True, False or None (the default)")
    if smooth is None:
        config = SmoothConfig.parse(DEFAULT_SMOOTH) if data_given else None
    else:
        config = SmoothConfig.parse(smooth)
        if config is not None and not data_given:
            raise UsageError("--smooth needs --data (it measures per-channel activation maxima)")
    if config is None:
        if shift:
            raise UsageError("--shift (shift=True) centres smoothed GEMM inputs: it needs smoothing "
                             "(--smooth auto or an alpha), not --smooth off")
        return None
    if shift is None:
        shift = config.shift if isinstance(smooth, SmoothConfig) else rounding == "gptq"
    if shift and rounding != "gptq":
        warnings.warn("OS+ shifts with weights rounded to nearest: the weights' rounding error then multiplies "
                      "each shift (on MiniLM as low as 0.863 mean cosine, against 0.998); keep GPTQ weights "
                      "(--weights gptq) or drop the shifts (--no-shift, shift=False)", stacklevel=3)
    return replace(config, shift=shift)


def _calibration(method, percentile, batch_size, num_samples, providers, no_trim, shard, quiet) -> CalibrationConfig:
    return CalibrationConfig(method, percentile, batch_size, num_samples, providers, not no_trim, shard, not quiet)


def _data(data, graph, tokenizer, max_length, field_name) -> Dataset:
    return open_data(data, graph, tokenizer=tokenizer, max_length=max_length, field=field_name)


class _Clock:
    """Seconds per stage, for report["timings"]: `with clock("insert"): ...`."""

    def __init__(self):
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = round(self.timings.get(stage, 0.0) + time.perf_counter() - start, 4)


def insert_config(mode: str | None = None, recipe=None, include=(), exclude=()) -> InsertConfig:
    """The insert settings from the options: `recipe` (a path, a dict in the file's form or a Recipe),
    then `include`/`exclude` globs (a list, or comma-separated); `mode` None takes the recipe's mode,
    else ft1. A --mode that contradicts the recipe's is refused."""
    parsed = parse_recipe(recipe)
    parsed = parsed.with_filters(_patterns(include, "--include"), _patterns(exclude, "--exclude"))
    if mode is None:
        return InsertConfig(parsed.mode or InsertConfig.mode, parsed)
    if parsed.mode is not None and choice(Mode, mode, "--mode") is not parsed.mode:
        raise UsageError(f"--mode {mode}: the recipe ({parsed.source or 'recipe'}) says mode {parsed.mode.value}")
    return InsertConfig(mode, parsed)


def _patterns(value, option: str) -> tuple[str, ...]:
    """--include/--exclude globs (a list, or comma-separated); an empty one names no site: refused."""
    items = value.split(",") if isinstance(value, str) else list(value or ())
    if any(isinstance(item, str) and not item.strip() for item in items):
        raise UsageError(f"{option} '': an empty pattern names no site (e.g. 'layer.*.ffn2.input')")
    return names(items, option)


insert_config_of = insert_config   # inside `compile`, `insert_config` names its local


def insert(model, *, mode: str | None = None, recipe=None, include=(), exclude=(), verify: bool = False) -> Result:
    """Q/DQ at the FasterTransformer BERT sites (`qdqc insert`); report["sites"] is the site report.
    `recipe`/`include`/`exclude`: per-site rules (recipe.py), e.g. exclude=["layer.*.ffn2.input"]."""
    from .insert import insert as run_insert, report

    config, clock = insert_config(mode, recipe, include, exclude), _Clock()
    with clock("load"):
        graph, source = _load_unlowered(model, "qdqc insert")
    with clock("insert"):
        inserted = run_insert(graph, config, verify=verify)
    return Result(graph, {"sites": report(inserted, config), "timings": clock.timings}, source, inserted,
                  records=list(inserted.records), recipe=config.recipe.to_json() if config.recipe else None)


def _smooth_and_calibrate(graph, dataset, config: CalibrationConfig, smoothing, clock, verify=False,
                          weights: str = "nearest", split: bool = True) -> dict:
    """[smooth] -> calibrate -> [split outlier channels] -> [GPTQ weight rounding: it needs the activation
    scales, and rounds the split weights]."""
    from .calibrate import calibrate as run_calibrate, report_json
    from .smooth import smooth

    from .smooth import shared_weight_sites, smoothed_before, wanted

    found: dict[str, Any] = {"smoothing": {"smooth": "off"}, "weights": {"rounding": weights}}
    if smoothing is not None or wanted(graph):   # the recipe may smooth some sites even with --smooth off
        shared, before = shared_weight_sites(graph), smoothed_before(graph)
        with clock("smooth"):
            records = smooth(graph, dataset, config, smoothing, verify=verify)
        label = "off (recipe sites only)" if smoothing is None else "auto" if smoothing.alpha is None else smoothing.alpha
        found["smoothing"] = {"smooth": label, **({"shared_weight_sites": len(shared)} if shared else {}),
                              **({"smoothed_before": before} if before else {})}
        for record in records:
            found["smoothing"].update(record.stats)
    with clock("calibrate"):
        collectors, tensors, samples, seconds = run_calibrate(graph, dataset, config)
    found.update(calibration=report_json(tensors, config, samples, seconds), collectors=collectors, tensors=tensors)
    on_grid = align_shifts(graph)   # this run's shifts, or those of a model recalibrated with new scales
    if on_grid:
        found["smoothing"]["shifts_on_grid"] = on_grid
    if split:
        found["weights"].update(_split_channels(graph, clock, verify))
    if weights == "gptq":
        from .weight_rounding import apply_gptq

        with clock("round weights"):
            records = apply_gptq(graph, dataset, config, verify=verify)
        found["weights"].update(records[0].stats)
    return found


def _split_channels(graph, clock, verify: bool = False) -> dict:
    """Outlier channel splitting (pass `split-outlier-channels`): data-free, after smoothing has moved the
    activation outliers into the weights, before they are rounded."""
    from .pipeline import PassContext, run_pipeline

    with clock("split channels"):
        records = run_pipeline(graph, ("split-outlier-channels",), PassContext(None), verify=verify)
    return dict(records[0].stats) if records[0].stats["sites_split"] else {}


def _note_unsplit(graph, asked: bool, found: dict) -> None:
    """Say so when --split was asked for and no GEMM input could take it."""
    from .channel_split import SPLIT_KEY

    if asked and not found["weights"].get("sites_split"):
        why = ("its channels were split before" if SPLIT_KEY in ir.metadata(graph) else
               "no GEMM reads another's output through pointwise ops alone with a weight of its own (a weight "
               "shared by layers, as ALBERT's, and a gated FFN's halves are left as they are)")
        warnings.warn(f"--split: nothing split in this model: {why}", QdqcNote, stacklevel=3)


def _load_unlowered(model, command: str, wanted: str = "the float model (or a QAT export with Q/DQ)"):
    """`load`, refusing a model already lowered for a runtime: there is no float network left to quantize."""
    from .calibrate import require_fake_quant

    graph, source = load(model)
    require_fake_quant(graph, command, wanted)
    return graph, source


def _split_option(split, keep_scales: bool) -> bool:
    """None: on, unless the model's own weights are kept (`keep_scales`), which asking for it refuses."""
    if split is not None and not isinstance(split, bool):
        raise UsageError(f"split={split!r}: expected True, False or None (the default: on, off with kept scales)")
    if keep_scales and split:
        raise UsageError("--split widens the model's weights, which --keep-scales keeps as they are (the default "
                         "on a model that already has Q/DQ); --no-keep-scales recalibrates and splits")
    return not keep_scales if split is None else split


def calibrate(model, data=None, *, stats: str | os.PathLike | None = None, method: str = _CAL.method.value,
              percentile: float = _CAL.percentile, batch_size: int = _CAL.batch_size, num_samples: int | None = None,
              providers=_CAL.providers, no_trim: bool = False, shard=None, smooth=None, shift: bool | None = None,
              weights=None, split: bool | None = None,
              tokenizer=None, max_length: int = MAX_LENGTH, field: str = "text", quiet: bool = False,
              keep_scales: bool | None = None, weight_bits: int | None = None) -> Result:
    """Activation scales from data (`qdqc calibrate`). With `data`: smoothing (default auto), one pass,
    and `stats` (if given) receives the collector states. Without `data`: scales recomputed from the
    `stats` file, which cannot smooth (the default then means off). report["calibration"] lists, per
    tensor, every method's amax. `split` (None: on, unless `keep_scales`): outlier channel splitting of the GEMMs fed through
    pointwise ops by another (BERT's FFN2), data-free, so with `stats` too. `keep_scales` (a QAT model):
    only the quantizers insert added are calibrated; every scale the model had, weights' included, and
    the weights themselves are kept (nor split).
    None: kept when the model mixes insert's placeholder scales with calibrated ones (insert added
    quantizers to a QAT export), as `compile` does."""
    from .calibrate import apply_scales, existing_scales, report_json
    from .calibration import load_states, save_states

    if data is None and stats is None:
        raise UsageError("calibrate needs --data (to collect) or --stats (to recompute from saved statistics)")
    config = _calibration(method, percentile, batch_size, num_samples, providers, no_trim, shard, quiet)
    clock, loaded = _Clock(), None
    if keep_scales is None:   # decided by the model: loaded once, here
        from .calibrate import mixes_placeholder_and_calibrated_scales

        with clock("load"):
            loaded = _load_unlowered(model, "qdqc calibrate", QDQ_MODEL)
        keep_scales = mixes_placeholder_and_calibrated_scales(loaded[0])
    if keep_scales:
        if smooth not in (None, "off") or weights == "gptq":
            raise UsageError("--keep-scales keeps the model's weights and scales (the default when insert added "
                             "quantizers to a calibrated model): it cannot take --smooth or --weights gptq; "
                             "--no-keep-scales recalibrates them all")
        smooth, weights = "off", "nearest"
    asked_split, split = split is True, _split_option(split, keep_scales)
    if config.shard is not None and data is not None:
        # a shard sees part of the data: the rewrites measured on the data would differ shard by shard,
        # and the merged statistics would describe none of the shards' models
        if smooth not in (None, "off") or weights == "gptq" or shift:
            raise UsageError("--shard collects the statistics of the model as it is: smoothing, OS+ shifts and GPTQ "
                             "measure all the data (run them in one calibration without --shard; a shard smooths "
                             "nothing and rounds weights to nearest by itself)")
        smooth, weights = "off", "nearest"
    rounding = parse_rounding(weights, data is not None)
    smoothing = _smoothing(smooth, data is not None, shift, rounding)
    if config.method.value == "auto" and data is None:
        raise UsageError("--method auto needs --data (it measures each layer's error)")
    if shift is not None and data is None:
        raise UsageError("--shift / --no-shift (shift=) apply when smoothing measures the data (--data); recomputing "
                         "scales from --stats keeps the model's shifts as they are")
    if stats is not None and data is None and not Path(stats).exists():
        raise UsageError(f"{stats}: no such file")
    if loaded is None:
        with clock("load"):
            loaded = _load_unlowered(model, "qdqc calibrate", QDQ_MODEL)
    graph, source = loaded
    _weight_grid(graph, weight_bits, keep_scales)
    kept = existing_scales(graph) if keep_scales else {}
    if data is not None:
        with clock("data"):
            dataset = _data(data, graph, tokenizer, max_length, field)
        found = _smooth_and_calibrate(graph, dataset, config, smoothing, clock, weights=rounding, split=split)
        if stats is not None:
            save_states(stats, found["collectors"])
    else:
        try:
            collectors = load_states(stats)
        except (OSError, ValueError, KeyError) as exc:
            raise QdqcError(f"{stats}: not a qdqc statistics file ({exc})") from None
        with clock("calibrate"):
            tensors = apply_scales(graph, collectors, config)
            align_shifts(graph)   # a shifted model's shifts onto the new scales' grid
        found = {"smoothing": {"smooth": "off", "why": "calibrating from saved statistics cannot smooth"},
                 "weights": {"rounding": "nearest", **(_split_channels(graph, clock) if split else {})},
                 "calibration": report_json(tensors, config, None, 0.0), "collectors": collectors, "tensors": tensors}
    _restore(graph, kept, found, config)
    _note_unsplit(graph, asked_split, found)
    report = {"smoothing": found["smoothing"], "weights": found["weights"], "calibration": found["calibration"],
              "timings": clock.timings, "scales_kept": len(kept)}
    return Result(graph, report, source, tensors=found["tensors"], collectors=found["collectors"])


def cpu_weight_bits(config: LowerConfig) -> int:
    """compile's weight grid: 7 bits for a portable CPU target (every uint8·int8 pair then fits x86's
    int16 pair sums: exact and fast on every CPU), 8 for TensorRT and for --isa vnni."""
    portable_cpu = config.target is not Target.TENSORRT and config.isa is Isa.PORTABLE
    return 7 if portable_cpu else 8


def _weight_grid(graph: gs.Graph, bits: int | None, keep_scales: bool, default: int | None = None) -> int:
    """Record the weights' grid (`bits`, else `default`) before any scale is computed; kept weights (a QAT
    model) keep theirs."""
    from .calibrate import set_weight_bits, weight_bits

    if bits is not None and (isinstance(bits, bool) or bits not in WEIGHT_BITS or not isinstance(bits, int)):
        raise UsageError(f"--weight-bits {bits!r}: expected 7 or 8")
    if keep_scales:
        if bits is not None and bits != weight_bits(graph):
            warnings.warn(f"--weight-bits {bits}: the model's own weights and scales are kept (--keep-scales)",
                          QdqcNote, stacklevel=3)
        return weight_bits(graph)
    if bits is not None or default is not None:
        set_weight_bits(graph, bits if bits is not None else default)
    return weight_bits(graph)


def _restore(graph: gs.Graph, kept: dict, found: dict, config: CalibrationConfig) -> None:
    """--keep-scales: the model's own scales back in the graph, and in the calibration report as kept."""
    from .calibrate import report_json, restore_scales

    if not kept:
        return
    found["tensors"] = restore_scales(graph, kept, found["tensors"])
    calibration = found["calibration"]
    calibration["tensors"] = report_json(found["tensors"], config, calibration["samples"], 0.0)["tensors"]


def lower(model, *, target: str = LowerConfig.target.value, keep_fp32=LowerConfig.keep_fp32,
          verify: bool = False, strict: bool = False, isa: str = LowerConfig.isa.value, check: bool = True,
          data=None, tokenizer=None, max_length: int = MAX_LENGTH, field: str = "text") -> Result:
    """A calibrated Q/DQ model lowered for a backend (`qdqc lower`): integer GEMMs for onnxruntime,
    FP16 + INT8 for TensorRT. report["lowering"] has each pass's stats and diagnostics (a quantized GEMM
    left in float is a warning; with `strict` an error). `isa`: "portable" (exact on every CPU) or
    "vnni" (faster U8S8 kernels, exact only on CPUs with VNNI/AMX or ARM64). `check`: run the lowered
    model against the Q/DQ model on this CPU (on `data`'s last samples, or synthetic padded inputs)
    and raise ModelError where they diverge; report["check"] has the figures."""
    from .lower import lower as run_lower

    config, clock = LowerConfig(target, keep_fp32, strict, isa), _Clock()
    with clock("load"):
        graph, source = load(model)
        check = check and _checkable(graph)
        fake_quant = _runnable(graph) if check else None
        dataset = _data(data, graph, tokenizer, max_length, field) if check and data is not None else None
    with clock("lower"):
        records = run_lower(graph, config, verify=verify)
    report = {"lowering": [r.to_json() for r in records], "timings": clock.timings}
    result = Result(graph, report, source, records=records, target=config.target.value)
    if check:
        with clock("check"):
            report["check"] = _check(fake_quant, result.model, config, dataset)
    return result


def _checkable(graph: gs.Graph) -> bool:
    """The check runs the models from memory, which protobuf caps at 2 GB: past that it is skipped, said."""
    if ir.constant_bytes(graph) <= ir.EXTERNAL_DATA_THRESHOLD:
        return True
    warnings.warn("the lowered-vs-fake-quant check is skipped: the model's weights pass 2 GB (the check runs "
                  "models from memory); run `qdqc bench` on the saved model to see it run", QdqcNote, stacklevel=3)
    return False


def _runnable(graph: gs.Graph) -> onnx.ModelProto:
    """A copy of `graph` onnxruntime can load (it refuses repeated node names, which ONNX allows)."""
    copy = graph.copy()
    ir.unique_node_names(copy)
    return ir.to_model(copy)


def _check(fake_quant: onnx.ModelProto, lowered: onnx.ModelProto, config: LowerConfig, dataset) -> dict:
    """The lowered model against the fake-quant one on this CPU (lowered_check); a divergence raises."""
    from .lowered_check import check, enforce, sample_feeds, synthetic_feeds

    if config.target is Target.TENSORRT:
        return {"skipped": "the TensorRT graph runs in TensorRT (a GPU); `qdqc build-engine` builds it"}
    if config.target is Target.OPENVINO:
        try:
            import openvino  # noqa: F401
        except ImportError:
            return {"skipped": "openvino is not installed (pip install qdqc[openvino])"}
    feeds = sample_feeds(dataset) if dataset is not None else synthetic_feeds(fake_quant)
    inputs = "calibration samples" if dataset is not None else "synthetic padded samples"
    found = check(fake_quant, lowered, config.target.value, feeds, inputs)
    enforce(found)
    return {**found.to_json(), "line": found.line()}


def analyze(model, data, *, samples: int = FallbackConfig.samples, providers=_CAL.providers, tokenizer=None,
            max_length: int = MAX_LENGTH, field: str = "text", quiet: bool = False) -> list[Sensitivity]:
    """Every activation site of a calibrated Q/DQ model, worst first (`qdqc analyze`): the cosine and
    SNR with only that site quantized, and with every site but that one."""
    from .analyze import activation_sites, sensitivity

    checked = FallbackConfig(samples=samples)
    config = CalibrationConfig(providers=providers, progress=False)
    graph, _ = load(model)
    if not activation_sites(graph):
        raise UsageError("the model has no activation QuantizeLinear: run `qdqc insert` and `qdqc calibrate` first")
    dataset = _data(data, graph, tokenizer, max_length, field)
    with _bar(len(activation_sites(graph)), "analyzing", "site", quiet) as bar:
        return sensitivity(graph, dataset, config, checked.samples, bar)


@dataclass(frozen=True)
class Recommendation:
    """`recommend`: the sites to leave in float, the mean cosine reached with them in float, the whole
    ranking, and the decision as a recipe (the model's own rules first)."""

    left_out: list[Sensitivity]
    cosine: float
    ranking: list[Sensitivity]
    recipe: dict


def recommend(model, data, *, fallback_budget: int | None = None, target_cosine: float | None = None,
              samples: int = FallbackConfig.samples, providers=_CAL.providers, tokenizer=None,
              max_length: int = MAX_LENGTH, field: str = "text") -> Recommendation:
    """`qdqc analyze --emit-recipe`: which sites of a calibrated Q/DQ model to leave in float (the
    `fallback_budget` worst, or as few as reach `target_cosine`), written as a recipe to replay with
    `compile --recipe` (on this model's float original or its next checkpoint)."""
    from .analyze import activation_sites, choose_fallback
    from .calibrate import require_calibrated, require_fake_quant
    from . import carried

    checked = FallbackConfig(fallback_budget, target_cosine, samples)
    if not checked.active:
        raise UsageError("--emit-recipe needs --fallback-budget or --target-cosine (which sites to leave in float)")
    config = CalibrationConfig(providers=providers, progress=False)
    graph, _ = load(model)
    if not activation_sites(graph):
        raise UsageError("the model has no activation QuantizeLinear: run `qdqc insert` and `qdqc calibrate` first")
    require_fake_quant(graph, "qdqc analyze")
    require_calibrated(graph, "qdqc analyze")
    dataset = _data(data, graph, tokenizer, max_length, field)
    left_out, reached, ranking = choose_fallback(graph, dataset, config, budget=checked.budget,
                                                 target_cosine=checked.target_cosine, samples=checked.samples)
    plan = carried.read(graph)
    base = Recipe.from_dict(plan.recipe, "the model's recipe") if plan is not None and plan.recipe else Recipe()
    mode = plan.mode if plan is not None and plan.family is not None else None
    return Recommendation(left_out, reached, ranking,
                          decision(base, mode, [name for s in left_out for name in s.names]))


def _bar(total: int, desc: str, unit: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, disable=quiet or not sys.stderr.isatty())


def compile(model, data, *, target: str = LowerConfig.target.value, mode: str | None = None, recipe=None,
            include=(), exclude=(),
            method: str = _CAL.method.value, percentile: float = _CAL.percentile, batch_size: int = _CAL.batch_size,
            num_samples: int | None = None, providers=_CAL.providers, no_trim: bool = False, smooth=None,
            shift: bool | None = None, weights=None, split: bool | None = None, keep_fp32=LowerConfig.keep_fp32, fallback_budget: int | None = None, target_cosine: float | None = None,
            samples: int = FallbackConfig.samples, strict: bool = False,
            tokenizer=None, max_length: int = MAX_LENGTH, field: str = "text", html: str | os.PathLike | None = None,
            eval=None, verify: bool = False, quiet: bool = False, keep_scales: bool | None = None,
            isa: str = LowerConfig.isa.value, check: bool = True, weight_bits: int | None = None) -> Result:
    """insert -> [smooth] -> calibrate -> [fallback] -> lower (`qdqc compile`), all in memory.

    `keep_scales` (None: yes when the model already has Q/DQ, a QAT export): the model's own scales
    and weights are kept as trained and only what insert added is calibrated (`calibrate --keep-scales`),
    so smoothing and GPTQ rounding are off; report["scales_kept"] counts them.

    By default: FasterTransformer ft1 sites, SmoothQuant with alpha searched per site and OS+ shifts,
    percentile 99.999, FFN2's outlier channels split, GPTQ weights, lowered for onnxruntime (the best
    recipe measured, README). `--smooth off --method percentile --percentile 99.99 --weights nearest
    --no-split` is pytorch-quantization's own default. `html` also writes the
    HTML report (with `eval` data: the FP32-vs-INT8 cosine distribution); `samples`: how many the fallback
    measures sensitivity on; `strict`: as `lower`'s. `recipe`/`include`/`exclude`:
    per-site rules (recipe.py). With a fallback, the sites it chooses are excluded and the model is built
    again from the float one, so it equals `exclude=` those sites; `Result.recipe` is the decision
    (rules in force, sites left in float, `--method auto`'s choices) as a recipe to replay."""
    from .analyze import choose_fallback, float_gemm_share
    from .calibrate import existing_scales
    from .carried import record_decision
    from .insert import insert as run_insert, report as sites_report
    from .lower import lower as run_lower

    insert_config = insert_config_of(mode, recipe, include, exclude)
    lower_config = LowerConfig(target, keep_fp32, strict, isa)
    calibration = _calibration(method, percentile, batch_size, num_samples, providers, no_trim, None, quiet)
    rounding = parse_rounding(weights, True)
    smoothing = _smoothing(smooth, True, shift, rounding)
    fallback = FallbackConfig(fallback_budget, target_cosine, samples)
    if eval is not None and html is None:
        raise UsageError("--eval only feeds the HTML report: add --html FILE")
    clock = _Clock()
    with clock("load"):
        graph, source = _load_unlowered(model, "qdqc compile")
    with clock("data"):
        dataset = _data(data, graph, tokenizer, max_length, field)   # validated before any work
        evaluation = None
        if eval is not None:   # the tokenizer serves a text --eval too, and is not asked of an npz one
            text = isinstance(eval, (str, os.PathLike)) and Path(eval).suffix in TEXT_SUFFIXES
            evaluation = _data(eval, graph, tokenizer if text else None, max_length, field)
        reference = None
        if evaluation is not None:   # the float model, runnable: onnxruntime refuses repeated node names
            float_graph = graph.copy()
            ir.unique_node_names(float_graph)
            reference = ir.to_model(float_graph)
    with clock("insert"):
        inserted = run_insert(graph, insert_config, verify=verify)
    if keep_scales is None:
        keep_scales = inserted.input_qdq.get("QuantizeLinear", 0) > 0
    if keep_scales:
        if smooth not in (None, "off") or weights == "gptq":
            raise UsageError("--keep-scales keeps the model's weights and scales (the default on a model that "
                             "already has Q/DQ): it cannot take --smooth or --weights gptq; --no-keep-scales "
                             "recalibrates every scale")
        alpha_rule = next((r for r in insert_config.recipe.rules if r.smooth not in (None, "off")), None)
        if alpha_rule is not None:
            raise UsageError(f"{alpha_rule.label}: smooth {alpha_rule.smooth} cannot apply: the model's own scales "
                             "and weights are kept (--keep-scales, the default on a model that already has Q/DQ); "
                             "--no-keep-scales smooths and recalibrates every scale")
        smoothing, rounding = None, "nearest"
    asked_split, split = split is True, _split_option(split, keep_scales)
    if weight_bits == 7 and lower_config.target is Target.TENSORRT:
        warnings.warn("--weight-bits 7: the 7-bit grid keeps x86 CPUs' int16 pair sums exact; TensorRT's INT8 "
                      "kernels need no such thing, and the model loses fidelity for it", QdqcNote, stacklevel=2)
    bits = _weight_grid(graph, weight_bits, keep_scales, cpu_weight_bits(lower_config))
    kept = existing_scales(graph) if keep_scales else {}
    found = _smooth_and_calibrate(graph, dataset, calibration, smoothing, clock, verify, rounding, split)
    _restore(graph, kept, found, calibration)
    left_out, ranking, fallbacks = [], None, None
    if fallback.active:
        with clock("fallback"):
            left_out, reached, ranking = choose_fallback(graph, dataset, calibration, budget=fallback.budget,
                                                         target_cosine=fallback.target_cosine, samples=fallback.samples)
            gemms, share = float_gemm_share(graph, [s.node for s in left_out])
        fallbacks = {"left_in_float": [s.to_json() for s in left_out], "cosine": reached,
                     "float_weight_gemms": gemms, "float_multiply_add_share": share,
                     "ranking": [s.to_json() for s in ranking]}
        if left_out:   # the decision as rules, applied from the float model: the same as excluding those sites
            chosen = [name for s in left_out for name in s.names]
            in_force = insert_config.recipe
            off = tuple(SiteRule(site, enabled=False, origin="the fallback") for site in chosen)
            insert_config = InsertConfig(insert_config.mode, replace(in_force, rules=in_force.rules + off))
            graph, _ = load(model)
            with clock("insert"):
                inserted = run_insert(graph, insert_config, verify=verify)
            _weight_grid(graph, weight_bits, keep_scales, bits)
            kept = existing_scales(graph) if keep_scales else {}
            found = _smooth_and_calibrate(graph, dataset, calibration, smoothing, clock, verify, rounding, split)
            _restore(graph, kept, found, calibration)
    _note_unsplit(graph, asked_split, found)
    report = {"options": {"mode": insert_config.mode.value, "target": lower_config.target.value,
                          "method": calibration.method.value, "percentile": calibration.percentile,
                          "smooth": found["smoothing"]["smooth"], "weights": rounding, "split": split,
                          "weight_bits": bits, "isa": lower_config.isa.value},
              "sites": sites_report(inserted, insert_config), "smoothing": found["smoothing"],
              "weights": found["weights"],
              "calibration": found["calibration"], "fallbacks": fallbacks, "scales_kept": len(kept)}
    methods = _auto_methods(graph, found["tensors"])
    decided = decision(insert_config.recipe, insert_config.mode.value, (), methods)
    record_decision(graph, decided, methods)   # the recipe in force, as its replay records it
    report["recipe"] = decided
    check = check and _checkable(graph)
    fake_quant = _runnable(graph) if check else None
    with clock("lower"):
        records = run_lower(graph, lower_config, verify=verify)
    report["lowering"] = [r.to_json() for r in records]
    report["timings"] = clock.timings
    result = Result(graph, report, source, inserted, found["tensors"], found["collectors"], left_out, ranking,
                    list(inserted.records) + records, decided, lower_config.target.value)
    if check:
        with clock("check"):
            report["check"] = _check(fake_quant, result.model, lower_config, dataset)
    if html is not None:
        with clock("html"):
            label = str(data) if isinstance(data, (str, os.PathLike)) else f"{dataset.samples} samples given in memory"
            write_html(result, html, reference=reference, evaluation=evaluation, data_label=label)
    return result


def _auto_methods(graph: gs.Graph, tensors: list[TensorReport]) -> dict[str, str]:
    """Site -> the method `--method auto` chose for its quantizer ("mse", "percentile 99.99", ...)."""
    from .carried import quantizer_sites

    sites = quantizer_sites(graph)
    chosen = {}
    for report in tensors:
        label = report.amax.get("auto")
        if isinstance(label, str) and "recipe" not in report.amax:
            for site in sites.get(report.tensor, ()) or (report.tensor,):
                chosen[site] = label.split(" -> ")[0]
    return chosen


def write_html(result: Result, path: str | os.PathLike, *, reference: onnx.ModelProto | None = None,
               evaluation: Dataset | None = None, data_label: str = "") -> Path:
    """The self-contained HTML report of a compile (histograms, sensitivity, and with `evaluation`
    and the FP32 `reference` model, the cosine distribution)."""
    import numpy as np

    from .evaluate import cosines as cosine_of, embeddings, open_session
    from .html_report import write_report

    cosines = None
    if evaluation is not None and reference is not None:
        batches = list(evaluation.batches(256, trim_padding=False))
        feeds = {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}
        cosines = cosine_of(embeddings(open_session(reference), feeds), embeddings(open_session(result.model), feeds))
    options = result.report["options"]
    settings = {"model": result.source or "(in memory)", **options,
                "calibration samples": data_label,
                "left in float": ", ".join(s.tensor for s in result.left_out) or "none"}
    chosen = {r.tensor: r.chosen for r in result.tensors}
    name = result.source.name if result.source is not None else "model"
    write_report(Path(path), title=f"qdqc report: {name}", settings=settings, collectors=result.collectors,
                 chosen=chosen, percentile=options["percentile"], ranking=result.ranking, cosines=cosines)
    return Path(path)

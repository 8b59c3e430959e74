"""The `qdqc` command line: a thin shell over the library."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .errors import QdqcError, QdqcNote, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (`qdqc insert: error: ...`, exit 2) instead of
    printing the whole usage block; `--help` still shows it."""

    def error(self, message):
        command = self.prog.removeprefix("qdqc").strip()
        raise UsageError(f"{command + ': ' if command else ''}{message} (see {self.prog} --help)")


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="input ONNX model")


def _output_args(parser: argparse.ArgumentParser, suffix: str) -> None:
    parser.add_argument("-o", "--output", type=Path, help=f"output model (default: <model>{suffix})")
    parser.add_argument("--overwrite", action="store_true", help="allow the output to replace the input model")
    parser.set_defaults(default_suffix=suffix)


def _mode_args(parser: argparse.ArgumentParser) -> None:
    from .config import InsertConfig, Mode

    parser.add_argument("--mode", choices=[m.value for m in Mode],
                        help=f"FasterTransformer quantization mode (default: the recipe's, else "
                             f"{InsertConfig.mode.value})")
    parser.add_argument("--recipe", type=Path,
                        help="per-site settings (JSON or .toml): an ordered list of {match, enabled, method, "
                             "percentile, weights, smooth}; later entries win")
    parser.add_argument("--include", action="append", default=[], metavar="PATTERN",
                        help="quantize only the sites this glob names (site name such as layer.*.ffn1.input, "
                             "the name or op type of the node reading the site, or a tensor's exact name); "
                             "repeatable")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="leave the sites this glob names in float (e.g. 'layer.*.ffn2.input'); repeatable")


def _site_options(args) -> dict:
    return dict(mode=args.mode, recipe=args.recipe, include=args.include, exclude=args.exclude)


def _target_args(parser: argparse.ArgumentParser) -> None:
    from .cpu import Isa
    from .lower import DEFAULT_FP32, FP32_CHOICES, LowerConfig, Target

    parser.add_argument("--target", default=LowerConfig.target.value, choices=[t.value for t in Target])
    parser.add_argument("--keep-fp32",
                        help=f"tensorrt: comma-separated {','.join(sorted(FP32_CHOICES))} kept in FP32 "
                             f"(default {','.join(sorted(DEFAULT_FP32))})")
    parser.add_argument("--isa", default=LowerConfig.isa.value, choices=[i.value for i in Isa],
                        help="onnxruntime/openvino: the CPU kernels the model may assume: portable (default; exact on "
                             "every CPU) or vnni (8-bit grids, exact only on CPUs with VNNI/AMX or "
                             "ARM64 dot products; recorded in the model and refused elsewhere)")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip running the lowered model against the Q/DQ model on this CPU (on by default; a "
                             "divergence is an error naming the tensor where it starts)")


def _data_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--data", type=Path, required=required,
                        help="npz (or folder of npz shards) keyed by model input name, or a .txt/.jsonl of "
                             "sentences with --tokenizer")
    _text_args(parser, "with a text --data: ")


def _text_args(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    parser.add_argument("--tokenizer", type=Path,
                        help=f"{prefix}the model's Hugging Face folder (tokenizer.json or vocab.txt)")
    from .text import MAX_LENGTH

    parser.add_argument("--max-length", type=int, default=MAX_LENGTH,
                        help=f"{prefix}tokens per sample (default {MAX_LENGTH})")
    parser.add_argument("--field", default="text", help=f"{prefix}the .jsonl field holding the text (default text)")


def _calibration_args(parser: argparse.ArgumentParser) -> None:
    from .calibrate import CalibrationConfig as defaults

    _data_args(parser)
    parser.add_argument("--method", default=defaults.method.value,
                        choices=["max", "percentile", "mse", "entropy", "auto"],
                        help=f"default {defaults.method.value}; auto: per tensor, the candidate minimizing its "
                             "layer's output error")
    parser.add_argument("--percentile", type=float, default=defaults.percentile,
                        help=f"default {defaults.percentile} (pytorch-quantization's is 99.99)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--num-samples", type=int, help="use only the first N samples")
    parser.add_argument("--providers", default=",".join(defaults.providers),
                        help="onnxruntime execution providers, comma-separated")
    parser.add_argument("--no-trim", action="store_true",
                        help="keep trailing padding positions no sample in the batch attends to")
    parser.add_argument("--smooth", help="SmoothQuant outlier migration before calibration: off, auto (alpha searched "
                                         "per site) or an alpha in [0, 1]; default auto with --data, off when "
                                         "recomputing from --stats (smoothing measures the data)")
    parser.add_argument("--shift", action=argparse.BooleanOptionalAction, default=None,
                        help="Outlier Suppression+ channel shifts: each smoothed GEMM input centred per channel on "
                             "its INT8 grid, the shift folded into the GEMMs' biases (default: on with GPTQ weights, "
                             "off with --weights nearest, whose rounding error would multiply each shift)")
    parser.add_argument("--split", action=argparse.BooleanOptionalAction, default=None,
                        help="outlier channel splitting, on by default (off with --keep-scales, which keeps the "
                             "weights): the input channels that set FFN2's INT8 weight steps are computed twice or "
                             "more by FFN1, each copy reading a share of the weight row (16 copies per 768 "
                             "channels, exact in float)")
    parser.add_argument("--weights", choices=["gptq", "nearest"],
                        help="INT8 weight rounding: gptq (error-compensated on the calibration activations; the "
                             "default with --data) or nearest (the default when recomputing from --stats)")
    parser.add_argument("--weight-bits", type=int, choices=[7, 8],
                        help="the weights' grid: 8 (calibrate's default, TensorRT's) or 7 (compile's default for "
                             "onnxruntime/openvino: every uint8·int8 product pair then fits x86's int16 pair sums, "
                             "so the integer GEMMs are exact and fast on CPUs without VNNI too)")


def _calibration_options(args) -> dict:
    """The calibration options as the API's keyword arguments."""
    return dict(method=args.method, percentile=args.percentile, batch_size=args.batch_size,
                num_samples=args.num_samples, providers=args.providers, no_trim=args.no_trim, smooth=args.smooth,
                shift=args.shift, weights=args.weights, split=args.split, weight_bits=args.weight_bits,
                tokenizer=args.tokenizer, max_length=args.max_length, field=args.field,
                quiet=args.quiet)


def _compile_args(parser: argparse.ArgumentParser) -> None:
    from .analyze import FallbackConfig

    _model_args(parser)
    _output_args(parser, ".int8.onnx")
    _mode_args(parser)
    _calibration_args(parser)
    _target_args(parser)
    parser.add_argument("--report", type=Path, help="site report of the insert step (JSON)")
    parser.add_argument("--fallback-budget", type=int,
                        help="leave the K most sensitive activation sites in float (measured by `analyze`)")
    parser.add_argument("--samples", type=int, default=FallbackConfig.samples,
                        help=f"with --fallback-budget/--target-cosine: samples to measure sensitivity on "
                             f"(default {FallbackConfig.samples})")
    parser.add_argument("--target-cosine", type=float,
                        help="leave the fewest most-sensitive sites in float that reach this mean cosine to "
                             "the float model on the calibration samples (at most --fallback-budget)")
    parser.add_argument("--emit-recipe", type=Path,
                        help="write what was decided (rules in force, sites the fallback left in float, "
                             "--method auto's choices) as a recipe to replay with --recipe")
    parser.add_argument("--strict", action="store_true",
                        help="fail when a quantized GEMM cannot be made integer (as `lower --strict`; the sites the "
                             "recipe leaves in float are noted, never a failure)")
    parser.add_argument("--html", type=Path, help="also write the HTML report (histograms, sensitivity, fidelity)")
    parser.add_argument("--eval", type=Path, help="with --html: samples for the FP32-vs-INT8 cosine distribution")
    parser.add_argument("--keep-scales", action=argparse.BooleanOptionalAction, default=None,
                        help="keep the model's own Q/DQ scales and weights (a QAT export), calibrate only what "
                             "insert added (default: yes when the model already has Q/DQ)")
    parser.add_argument("--quiet", action="store_true")
    parser.set_defaults(run=run_compile, report_command=False)


def _checked_output(args, *extra: Path | None) -> Path:
    """The output path, checked before any work (writable folder; the input only with --overwrite), and
    the command's other outputs (`extra`, e.g. --report), which may replace neither an input nor it."""
    from . import ir

    ir.check_input(args.model)
    data = [getattr(args, name, None) for name in ("data", "eval", "stats", "recipe")]
    if data[2] is not None and data[0] is None:   # recomputing from --stats: it must exist, said first
        ir.check_input(data[2], "a statistics .npz")
    output = ir.check_output(_output_path(args), inputs=[args.model], overwrite=args.overwrite)
    if output.suffix.lower() == ".xml":
        from .openvino_backend import check_ir_target

        check_ir_target(output, getattr(args, "target", None))
    for path in data:   # the data, statistics and recipe are never an output, --overwrite or not
        if path is not None and ir.same_file(output, path):
            raise UsageError(f"{output}: output would overwrite the input {path}")
    _checked_extra(args, *extra, output=output)
    return output


def _checked_extra(args, *paths: Path | None, output: Path | None = None) -> None:
    from . import ir

    inputs = [getattr(args, name, None) for name in ("model", "data", "eval", "recipe")]
    if getattr(args, "data", None) is None:   # without --data, --stats is read (with it, --stats is an output)
        inputs.append(getattr(args, "stats", None))
    inputs += list(getattr(args, "models", None) or []) + list(getattr(args, "compare", None) or [])
    paths = [p for p in paths if p is not None]
    for index, path in enumerate(paths):
        ir.check_output(path, inputs=inputs, others=[output, *paths[:index]])


def _output_path(args) -> Path:
    if args.output is not None:
        return args.output
    stem = args.model.name.removesuffix(".onnx")
    if args.default_suffix != ".qdq.onnx":  # model.qdq.onnx -> model.calib.onnx -> model.int8.onnx
        stem = stem.removesuffix(".qdq").removesuffix(".calib")
    return args.model.with_name(stem + args.default_suffix)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qdqc", description="INT8 Q/DQ compiler for BERT-family ONNX models")
    parser.add_argument("--version", action="version", version=f"qdqc {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the full traceback (also QDQC_DEBUG=1), for bug reports")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    insert = sub.add_parser("insert", help="insert Q/DQ at the FasterTransformer BERT sites")
    _model_args(insert)
    _output_args(insert, ".qdq.onnx")
    _mode_args(insert)
    insert.add_argument("--report", type=Path, help="write the site report (JSON) here")
    insert.add_argument("--explain", action="store_true", help="say why each unmatched GEMM was not taken")
    insert.add_argument("--verify", action="store_true", help="run onnx.checker and qdqc invariants after every pass")
    insert.add_argument("--quiet", action="store_true", help="print nothing but errors")
    insert.set_defaults(run=run_insert)

    data = sub.add_parser("data", help="calibration data from text: tokenize sentences into an npz",
                          description="qdqc data texts.txt|texts.jsonl --tokenizer DIR [-o calib.npz]")
    data.add_argument("texts", type=Path, help="one sentence per line (.txt) or JSON objects per line (.jsonl)")
    data.add_argument("-o", "--output", type=Path, help="the npz (default: <texts>.npz)")
    _text_args(data)
    data.add_argument("--model", type=Path, help="check against this ONNX model: its embedding table, its inputs")
    data.set_defaults(run=run_data)

    calibrate = sub.add_parser("calibrate", help="calibrate activation scales with onnxruntime over npz data",
                               description="calibrate MODEL --data D | calibrate MODEL --stats S (no rerun) | "
                                           "calibrate merge A.npz B.npz -o ALL.npz")
    _model_args(calibrate)
    _output_args(calibrate, ".calib.onnx")
    _calibration_args(calibrate)
    calibrate.add_argument("--stats", type=Path, help="collector states: written after --data, read without it")
    calibrate.add_argument("--keep-scales", action=argparse.BooleanOptionalAction, default=None,
                           help="a QAT model: calibrate only the quantizers insert added, keep every other scale "
                                "and the weights (no smoothing, nearest rounding); default: yes when insert added "
                                "quantizers to a model that already had calibrated ones")
    calibrate.add_argument("--report", type=Path, help="per-tensor samples, max and every method's amax (JSON)")
    calibrate.add_argument("--shard", help="K/N: collect every N-th batch from the K-th (merge the shards' --stats)")
    calibrate.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    calibrate.set_defaults(run=run_calibrate)

    compile_ = sub.add_parser("compile", help="insert -> calibrate -> lower in one command")
    _compile_args(compile_)
    report_ = sub.add_parser("report", help="compile and write the HTML report (`compile --html FILE`)")
    _compile_args(report_)
    report_.set_defaults(report_command=True)

    lower = sub.add_parser("lower", help="lower a calibrated Q/DQ model for a backend (INT8 weights, integer GEMMs)")
    _model_args(lower)
    _output_args(lower, ".int8.onnx")
    _target_args(lower)
    _data_args(lower)
    lower.add_argument("--verify", action="store_true", help="run onnx.checker and qdqc invariants after every pass")
    lower.add_argument("--strict", action="store_true",
                       help="fail when a quantized GEMM cannot be made integer (by default: a warning naming it); "
                            "GEMMs the model's recipe leaves in float are a note, never a failure")
    lower.add_argument("--quiet", action="store_true")
    lower.set_defaults(run=run_lower)

    analyze = sub.add_parser("analyze", help="per-site sensitivity of a calibrated Q/DQ model (cosine, SNR)")
    _model_args(analyze)
    _data_args(analyze, required=True)
    analyze.add_argument("--samples", type=int, default=32, help="samples to measure on (default 32)")
    analyze.add_argument("--json", type=Path, help="write the ranking (with each quantizer's site names) as JSON here")
    analyze.add_argument("--fallback-budget", type=int, help="with --emit-recipe: leave the K worst sites in float")
    analyze.add_argument("--target-cosine", type=float,
                         help="with --emit-recipe: leave the fewest worst sites in float that reach this mean cosine")
    analyze.add_argument("--emit-recipe", type=Path,
                         help="write the sites to leave in float as a recipe (replay with compile --recipe)")
    analyze.add_argument("--providers", default="CPUExecutionProvider")
    analyze.add_argument("--quiet", action="store_true")
    analyze.set_defaults(run=run_analyze)

    bench = sub.add_parser("bench", help="latency of ONNX models (onnxruntime or OpenVINO), OpenVINO IR or TensorRT "
                                          "engines, interleaved")
    bench.add_argument("models", type=Path, nargs="*",
                       help="one or more .onnx / .xml (OpenVINO IR) / .plan files (compared to the first)")
    bench.add_argument("--compare", type=Path, nargs="+", default=[], help="more models, run interleaved with them")
    bench.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"])
    bench.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op / OpenVINO threads (default 2)")
    bench.add_argument("--spin", action="store_true",
                       help="onnxruntime: threads spin between the ops of a run, as onnxruntime does by default, "
                            "and stop when it ends (default: spinning off)")
    bench.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "openvino"],
                       help="what runs the .onnx models (an .xml always runs in OpenVINO)")
    bench.add_argument("--ov-precision", default="default", choices=["default", "f32", "bf16"],
                       help="OpenVINO float precision (default: OpenVINO's own choice, bf16 on CPUs that have it)")
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--seq", type=int, help="sequence length of random inputs (default 128)")
    bench.add_argument("--shapes", help="name:AxB,... for every input (overrides --batch/--seq)")
    bench.add_argument("--sweep", nargs="*", default=[], help="batch=1,8,32 seq=128,384: every combination")
    bench.add_argument("--data", type=Path, help="real inputs from an npz (first --batch samples)")
    bench.add_argument("--warmup", type=int, default=5)
    bench.add_argument("--iterations", type=int, default=50)
    bench.add_argument("--duration", type=float, help="seconds per model instead of --iterations")
    bench.add_argument("--json", type=Path, help="write every figure as JSON")
    bench.add_argument("--plot", type=Path, help="latency distribution per model (PNG, needs matplotlib)")
    bench.set_defaults(run=run_bench)

    build = sub.add_parser("build-engine", help="a strongly typed TensorRT / TensorRT-RTX engine (TensorRT-RTX "
                                                "builds without a GPU)")
    _model_args(build)
    build.add_argument("-o", "--output", type=Path, required=True, help="the engine (.plan)")
    build.add_argument("--backend", default="auto", choices=["auto", "tensorrt", "tensorrt-rtx"],
                       help="auto: TensorRT when it imports and a GPU answers, else TensorRT-RTX (CPU-only AOT build)")
    build.add_argument("--compute-capability", default="",
                       help="tensorrt-rtx: target GPUs among 7.5,8.0,8.6,8.9,12.0,12.1 (default "
                            "8.0,8.6,8.9,12.0) or current")
    build.add_argument("--baseline", type=Path, help="a float engine built by build-engine: compare weights with it")
    build.add_argument("--int8", action="store_true", help="check the graph carries INT8 Q/DQ (strongly typed: "
                                                         "the graph's types decide precision)")
    build.add_argument("--fp16", action="store_true", help="check the graph carries FP16 tensors")
    build.add_argument("--shapes", help="opt shapes name:1x128,... (default batch 1, sequence 128)")
    build.add_argument("--min-shapes", help="min shapes (default 1 for dynamic dims)")
    build.add_argument("--opt-shapes", help="same as --shapes")
    build.add_argument("--max-shapes", help="max shapes (default sequence 512)")
    build.add_argument("--workspace", type=int, help="workspace pool limit in MiB")
    build.add_argument("--timing-cache", type=Path, help="tensorrt: read and update this timing cache "
                                                           "(tensorrt-rtx: ignored, it would need a GPU)")
    build.add_argument("--opt-level", type=int, help="builder optimization level 0..5")
    build.set_defaults(run=run_build_engine)

    check = sub.add_parser("check", help="lint a Q/DQ model against TensorRT's explicit-quantization rules")
    _model_args(check)
    check.add_argument("--json", type=Path, help="also write the violations as JSON here")
    check.add_argument("--parse", action="store_true",
                       help="also run TensorRT's ONNX parser (pip install tensorrt-rtx) and list its errors")
    check.set_defaults(run=run_check)
    return parser


def run_insert(args) -> int:
    from . import api, ir
    from .config import InsertConfig
    from .insert import summary

    _check_recipe(args)
    output = _checked_output(args, args.report)
    result = api.insert(args.model, verify=args.verify, **_site_options(args))
    result.save(output, overwrite=args.overwrite)
    if args.report:
        _write_json(args.report, result.report["sites"])
    text = summary(result.inserted, InsertConfig(result.inserted.plan.mode))
    if not args.quiet:
        print(text)
        if args.explain:
            for node, why in result.inserted.match.unmatched_gemms:
                print(f"  unmatched {ir.label(node)}: {why}")
        print(f"wrote {output}")
    elif result.inserted.plan.fallback:
        print(text.splitlines()[0], file=sys.stderr)
    return 0


def _write_json(path: Path, payload) -> None:
    from . import ir

    ir.write_text_atomic(path, json.dumps(payload, indent=1) + "\n")


def run_data(args) -> int:
    from . import ir
    from .text import calibration_data, fit_to_model, save_npz

    output = args.output or args.texts.with_suffix(".npz")
    if ir.same_file(output, args.texts) or (args.model is not None and ir.same_file(output, args.model)):
        raise UsageError(f"{output}: output would overwrite an input")
    if args.tokenizer is None:
        raise UsageError("data needs --tokenizer DIR (the model's Hugging Face folder)")
    graph = ir.load(args.model) if args.model is not None else None
    data = calibration_data(args.texts, args.tokenizer, max_length=args.max_length, field=args.field)
    arrays = fit_to_model(data, graph) if graph is not None else dict(data)
    save_npz(output, arrays)
    print(f"wrote {output}: {data.samples} samples x {args.max_length} tokens ({', '.join(arrays)}); "
          f"{data.skipped} empty line(s) skipped")
    return 0


def _calibration_line(result) -> str:
    calibration, smoothing = result.report["calibration"], result.report["smoothing"]
    samples = calibration["samples"]
    seen = f"{samples} samples in {calibration['seconds']:.1f} s" if samples is not None else "from saved statistics"
    smooth = smoothing["smooth"]
    if smooth == "off":
        smooth = "no smoothing" + (" (it needs --data)" if samples is None else "")
    else:
        smooth = f"smooth {smooth}: {smoothing.get('sites_smoothed', 0)} sites"
        if smoothing.get("sites_shifted"):
            smooth += f", {smoothing['sites_shifted']} shifted"
        if smoothing.get("smoothed_before"):
            smooth += f", {smoothing['smoothed_before']} smoothed by an earlier run"
        if smoothing.get("shared_weight_sites"):
            smooth += f", {smoothing['shared_weight_sites']} skipped as their weights are shared across layers"
    method = calibration["method"]
    if method == "percentile":
        method += f" {calibration['percentile']:g}"
    rounding = result.report.get("weights", {})
    weights = f"weights {rounding.get('rounding', 'nearest')}"
    if "weights_rounded" in rounding:
        weights += f": {rounding['weights_rounded']} GEMMs in {result.report['timings'].get('round weights', 0):.1f} s"
        if rounding.get("skipped"):
            weights += f", {rounding['skipped']} kept nearest rounding"
    if rounding.get("sites_split"):
        sites = rounding["sites_split"]
        weights += (f", outlier channels split: {rounding['channels_added']} copies over {sites} "
                    f"GEMM input{'s' if sites > 1 else ''}")
    kept = sum(bool(t.get("kept")) for t in calibration["tensors"])
    other = max(0, result.report.get("scales_kept", 0) - kept)
    kept_line = (f"; {kept} activation and {other} other scales (weights') kept as the model holds them "
                 "(--keep-scales)" if result.report.get("scales_kept") else "")
    return (f"calibrated {len(calibration['tensors']) - kept} activation tensors ({seen}, {smooth}, method {method}, "
            f"{weights}){kept_line}")


def run_calibrate(args) -> int:
    from . import api

    if args.data is None and args.stats is None:
        raise UsageError("calibrate needs --data (to collect) or --stats (to recompute from saved statistics)")
    output = _checked_output(args, args.report, args.stats if args.data is not None else None)
    result = api.calibrate(args.model, args.data, stats=args.stats, shard=args.shard, keep_scales=args.keep_scales,
                           **_calibration_options(args))
    result.save(output, overwrite=args.overwrite)
    if args.report:
        _write_json(args.report, result.report["calibration"])
    if not args.quiet:
        print(_calibration_line(result))
        print(f"wrote {output}")
    return 0


def run_merge(argv: list[str]) -> int:
    from . import ir
    from .calibration import merge_state_files, save_states

    parser = _Parser(prog="qdqc calibrate merge",
                                     description="merge collector states from shards (exact with --shard)")
    parser.add_argument("states", type=Path, nargs="+")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    ir.check_output(args.output, inputs=args.states)
    merged = merge_state_files(args.states)
    save_states(args.output, merged)
    print(f"merged {len(args.states)} statistics files ({len(merged)} tensors) into {args.output}")
    return 0


def run_lower(args) -> int:
    from . import api

    output = _checked_output(args)
    result = api.lower(args.model, target=args.target, keep_fp32=args.keep_fp32, verify=args.verify,
                       strict=args.strict, isa=args.isa, check=args.check, data=args.data, tokenizer=args.tokenizer,
                       max_length=args.max_length, field=args.field)
    result.save(output, overwrite=args.overwrite)
    _print_diagnostics(result.records, args.quiet)
    if not args.quiet:
        _print_records(result.records)
        _print_check(result)
        print(f"wrote {output}")
    return 0


def _print_check(result) -> None:
    found = result.report.get("check")
    if found is not None:
        print(found.get("line") or f"check: skipped ({found['skipped']})")


def _print_diagnostics(records, quiet: bool) -> None:
    """Warnings print even with --quiet (never a silent float GEMM); notes (what a recipe asked for) without it."""
    for record in records:
        for diagnostic in record.diagnostics:
            if diagnostic.level == "warning":
                print(f"qdqc: warning: {diagnostic.message}", file=sys.stderr)
            elif record.name == "report-float-gemms" and not quiet:
                print(f"qdqc: note: {diagnostic.message}", file=sys.stderr)


def _print_records(records) -> None:
    for record in records:
        print(f"{record.name}: " + ", ".join(f"{k} {v}" for k, v in record.stats.items()))


def run_compile(args) -> int:
    from . import api
    from .config import InsertConfig
    from .insert import summary

    if args.data is None:
        raise UsageError(f"{'report' if args.report_command else 'compile'} needs --data (calibration samples)")
    if args.report_command and args.html is None:
        raise UsageError("report needs --html FILE (where to write the report)")
    _check_recipe(args)
    output = _checked_output(args, args.report, args.html, args.emit_recipe)
    if args.emit_recipe is not None:   # after the overwrite check: writing over an input is the worse mistake
        from .recipe import check_suffix

        check_suffix(args.emit_recipe, "--emit-recipe")
    result = api.compile(args.model, args.data, target=args.target, keep_fp32=args.keep_fp32,
                         fallback_budget=args.fallback_budget, target_cosine=args.target_cosine,
                         samples=args.samples, strict=args.strict, html=args.html, eval=args.eval,
                         keep_scales=args.keep_scales, isa=args.isa, check=args.check, **_site_options(args),
                         **_calibration_options(args))
    result.save(output, overwrite=args.overwrite)
    _print_diagnostics(result.records[-len(result.report["lowering"]):], args.quiet)
    if args.report:
        _write_json(args.report, result.report["sites"])
    if args.emit_recipe:
        from .recipe import write

        write(result.recipe, args.emit_recipe)
    if not args.quiet:
        print(summary(result.inserted, InsertConfig(result.inserted.plan.mode)))
        print(_calibration_line(result))
        for site in result.left_out:
            print(f"left in float: {', '.join(site.names)} (alone it costs cosine {1 - site.only_cosine:.2e}); the "
                  "GEMMs reading it run in float")
        fallbacks = result.report["fallbacks"]
        if fallbacks is not None:
            print(f"fallback: {len(result.left_out)} site(s) in float; mean cosine to the float model on the "
                  f"calibration samples {fallbacks['cosine']:.5f}; {fallbacks['float_weight_gemms']} weight GEMM(s) "
                  f"in float = {100 * fallbacks['float_multiply_add_share']:.1f} % of the weight-GEMM multiply-adds "
                  "no longer integer")
        _print_records(result.records[-len(result.report["lowering"]):])
        _print_check(result)
        if args.html is not None:
            print(f"wrote {args.html}")
        if args.emit_recipe is not None:
            print(f"wrote {args.emit_recipe}")
        print(f"wrote {output}")
    return 0


def _check_recipe(args) -> None:
    """A missing --recipe file is said before any output is checked or work done."""
    from .recipe import check_suffix

    if args.recipe is not None and not args.recipe.is_file():
        raise UsageError(f"--recipe {args.recipe}: " + ("a folder, not a recipe file" if args.recipe.is_dir()
                                                         else "no such file"))
    if args.recipe is not None:
        check_suffix(args.recipe, "--recipe")


def run_analyze(args) -> int:
    from . import api

    _checked_extra(args, args.json, args.emit_recipe)
    if args.emit_recipe is not None:
        from .recipe import check_suffix

        check_suffix(args.emit_recipe, "--emit-recipe")
    if args.emit_recipe is None and (args.fallback_budget is not None or args.target_cosine is not None):
        raise UsageError("analyze: --fallback-budget/--target-cosine choose the sites --emit-recipe writes; "
                         "add --emit-recipe FILE")
    text = dict(tokenizer=args.tokenizer, max_length=args.max_length, field=args.field)
    if args.emit_recipe is not None:
        from .recipe import write

        found = api.recommend(args.model, args.data, fallback_budget=args.fallback_budget,
                              target_cosine=args.target_cosine, samples=args.samples, providers=args.providers, **text)
        ranking = found.ranking
        write(found.recipe, args.emit_recipe)
    else:
        ranking = api.analyze(args.model, args.data, samples=args.samples, providers=args.providers,
                              quiet=args.quiet, **text)
    if args.json:
        _write_json(args.json, [s.to_json() for s in ranking])
    if not args.quiet:
        print(f"{'rank':>4}  {'only this site: cos':>19} {'SNR dB':>7}  {'all but this: cos':>17} {'SNR dB':>7}  tensor")
        for rank, site in enumerate(ranking, 1):
            print(f"{rank:>4}  {site.only_cosine:19.6f} {site.only_snr_db:7.1f}  {site.without_cosine:17.6f} "
                  f"{site.without_snr_db:7.1f}  {', '.join(site.sites) or site.tensor}")
        if args.emit_recipe is not None:
            print(f"{len(found.left_out)} site(s) to leave in float (mean cosine {found.cosine:.5f}); "
                  f"wrote {args.emit_recipe}")
    return 0


def _sweep(items: list[str]) -> list[tuple[int, int]]:
    axes = {"batch": [None], "seq": [None]}
    for item in items:
        key, _, values = item.partition("=")
        if key not in axes:
            raise UsageError(f"--sweep {item!r}: expected batch=... or seq=...")
        try:
            axes[key] = [int(v) for v in values.split(",")]
        except ValueError:
            raise UsageError(f"--sweep {item!r}: expected comma-separated integers") from None
        if min(axes[key]) < 1:
            raise UsageError(f"--sweep {item!r}: each {key} must be at least 1")
    return [(b, s) for b in axes["batch"] for s in axes["seq"]]


def run_bench(args) -> int:
    from dataclasses import replace

    from . import ir
    from .bench import BenchConfig, bench, format_summary, parse_shapes, plot
    from .cpu import host

    if args.data is not None and (args.seq is not None or any(i.startswith("seq=") for i in args.sweep)):
        raise UsageError(f"--seq / --sweep seq=: with --data {args.data} the data's own width is the sequence "
                         "(pad or cut the data instead)")
    sequence = args.seq if args.seq is not None else BenchConfig.sequence
    base = BenchConfig(args.provider, args.threads, args.warmup, args.iterations, args.duration, args.batch, sequence,
                       parse_shapes(args.shapes), args.runtime, args.ov_precision, args.spin)
    models = list(args.models) + list(args.compare)
    if not models:
        raise UsageError("bench needs at least one model")
    _checked_extra(args, args.json, args.plot)
    data = args.data
    results = []
    for batch, seq in _sweep(args.sweep):
        config = replace(base, batch=batch or base.batch, sequence=seq or base.sequence)
        summaries = bench(models, config, data)
        if len(_sweep(args.sweep)) > 1:   # with --data, the data's own width is the sequence
            print(f"\n--- batch {config.batch}" + (f", seq {config.sequence}" if data is None else ""))
        print(format_summary(summaries, config))
        results += [dict(s.to_json(), sequence=config.sequence if data is None else None, inputs=s.inputs,
                         threads=config.threads, spin=config.spin, cpu=host().to_json()) for s in summaries]
        if args.plot:
            plot(summaries, args.plot)
    if args.json:
        ir.write_text_atomic(args.json, json.dumps(results, indent=1) + "\n")
    return 0


def run_build_engine(args) -> int:
    from . import ir
    from .bench import parse_shapes
    from .engine_build import EngineConfig, build_engine, profile_line, summary_line

    ir.check_output(args.output, inputs=[ir.check_input(args.model)])
    capabilities = tuple(c.strip() for c in args.compute_capability.split(",") if c.strip())
    config = EngineConfig(args.int8, args.fp16, parse_shapes(args.opt_shapes or args.shapes),
                          parse_shapes(args.min_shapes), parse_shapes(args.max_shapes), args.workspace,
                          args.timing_cache, args.opt_level, args.backend, capabilities, args.baseline)
    summary = build_engine(args.model, args.output, config)
    print(summary_line(summary))
    print(f"{profile_line(summary)}; backend {summary['backend']}: {summary['chosen_because']}; layers and "
          f"evidence in {args.output}.layers.json")
    return 0


def run_check(args) -> int:
    from . import ir
    from .check import check_graph

    _checked_extra(args, args.json)
    graph = ir.load(args.model)
    violations = check_graph(graph)
    for violation in violations:
        print(violation)
    if args.json:
        ir.write_text_atomic(args.json, json.dumps([vars(v) for v in violations], indent=1) + "\n")
    qdq = sum(n.op in ir.QDQ_OPS for n in graph.nodes)
    print(f"{args.model}: {qdq} Q/DQ nodes, {len(violations)} violation(s)")
    parsed_ok = True
    if args.parse:
        from .trt_parse import parse

        result = parse(args.model)
        for error in result.errors:
            print(f"parser: {error}")
        matmuls = {k.split(":")[1]: v for k, v in result.layers.items() if k.startswith("MATRIX_MULTIPLY:")}
        print(f"TensorRT parser: {'ok' if result.ok else 'FAILED'}; {sum(result.layers.values())} layers; "
              f"matrix multiplies by output type {matmuls}")
        parsed_ok = result.ok
    return 1 if violations or not parsed_ok else 0


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"qdqc: {'note' if issubclass(category, QdqcNote) else 'warning'}: {message}\n"


def main(argv: list[str] | None = None) -> int:
    import os
    import warnings

    from .errors import Interrupted, on_termination

    warnings.formatwarning = _one_line_warning
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("QDQC_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        with on_termination():
            if argv[:2] == ["calibrate", "merge"]:
                return run_merge(argv[2:])
            args = build_parser().parse_args(argv)
            return args.run(args)
    except QdqcError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"qdqc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (KeyboardInterrupt, Interrupted) as exc:
        print("qdqc: interrupted" if isinstance(exc, KeyboardInterrupt) else f"qdqc: {exc}", file=sys.stderr)
        return 130 if isinstance(exc, KeyboardInterrupt) else exc.exit_code
    except BrokenPipeError:  # `qdqc analyze ... | head`
        sys.stderr.close()
        return 0
    except MemoryError:
        print("qdqc: error: out of memory", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug in qdqc: one line, the traceback with --debug
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"qdqc: internal error: {type(exc).__name__}: {first} (rerun with --debug or QDQC_DEBUG=1 "
              "for the traceback, and report it)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())

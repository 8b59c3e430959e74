"""The `qdqc` command line: a thin shell over the library."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .errors import QdqcError, UsageError


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="input ONNX model")


def _output_args(parser: argparse.ArgumentParser, suffix: str) -> None:
    parser.add_argument("-o", "--output", type=Path, help=f"output model (default: <model>{suffix})")
    parser.add_argument("--overwrite", action="store_true", help="allow the output to replace the input model")
    parser.set_defaults(default_suffix=suffix)


def _calibration_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, help="npz (or folder of npz shards) keyed by model input name")
    parser.add_argument("--method", default="percentile", choices=["max", "percentile", "mse", "entropy", "auto"],
                        help="auto: per tensor, the candidate minimizing its layer's output error")
    parser.add_argument("--percentile", type=float, default=99.99)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-samples", type=int, help="use only the first N samples")
    parser.add_argument("--providers", default="CPUExecutionProvider",
                        help="onnxruntime execution providers, comma-separated")
    parser.add_argument("--no-trim", action="store_true",
                        help="keep trailing padding positions no sample in the batch attends to")
    parser.add_argument("--smooth", default="off",
                        help="SmoothQuant outlier migration before calibration: off, auto (alpha searched per site) "
                             "or an alpha in [0, 1] (0.85 works for BERT); needs --data")


def _calibration_config(args):
    from .calibrate import CalibrationConfig

    return CalibrationConfig(args.method, args.percentile, args.batch_size, args.num_samples,
                             tuple(p.strip() for p in args.providers.split(",") if p.strip()),
                             not args.no_trim, _shard(args.shard), not args.quiet)


def _compile_args(parser: argparse.ArgumentParser) -> None:
    _model_args(parser)
    _output_args(parser, ".int8.onnx")
    parser.add_argument("--mode", default="ft1", choices=["ft1", "ft2", "ft3", "trt", "generic"])
    _calibration_args(parser)
    parser.add_argument("--target", default="onnxruntime", choices=["onnxruntime", "tensorrt"])
    parser.add_argument("--keep-fp32", default="LayerNorm", help="tensorrt: LayerNorm,Softmax,Gelu kept in FP32")
    parser.add_argument("--report", type=Path, help="site report of the insert step (JSON)")
    parser.add_argument("--fallback-budget", type=int,
                        help="leave the K most sensitive activation sites in float (measured by `analyze`)")
    parser.add_argument("--target-cosine", type=float,
                        help="leave the fewest most-sensitive sites in float that reach this mean cosine to "
                             "the float model on the calibration samples (at most --fallback-budget)")
    parser.add_argument("--html", type=Path, help="also write the HTML report (histograms, sensitivity, fidelity)")
    parser.add_argument("--eval", type=Path, help="with --html: samples for the FP32-vs-INT8 cosine distribution")
    parser.add_argument("--quiet", action="store_true")
    parser.set_defaults(run=run_compile, stats=None, shard=None, report_command=False)


def _checked_output(args, *extra: Path | None) -> Path:
    """The output path, checked before any work (writable folder; the input only with --overwrite), and
    the command's other outputs (`extra`, e.g. --report), which may replace neither an input nor it."""
    from . import ir

    ir.check_input(args.model)
    output = ir.check_output(_output_path(args), inputs=[args.model], overwrite=args.overwrite)
    _checked_extra(args, *extra, output=output)
    return output


def _checked_extra(args, *paths: Path | None, output: Path | None = None) -> None:
    from . import ir

    inputs = [getattr(args, "model", None), getattr(args, "data", None), getattr(args, "eval", None)]
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
    parser = argparse.ArgumentParser(prog="qdqc", description="INT8 Q/DQ compiler for BERT-family ONNX models")
    parser.add_argument("--version", action="version", version=f"qdqc {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the full traceback (also QDQC_DEBUG=1), for bug reports")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    insert = sub.add_parser("insert", help="insert Q/DQ at the FasterTransformer BERT sites")
    _model_args(insert)
    _output_args(insert, ".qdq.onnx")
    insert.add_argument("--mode", default="ft1", choices=["ft1", "ft2", "ft3", "trt", "generic"],
                        help="FasterTransformer quantization mode (default ft1)")
    insert.add_argument("--report", type=Path, help="write the site report (JSON) here")
    insert.add_argument("--explain", action="store_true", help="say why each unmatched GEMM was not taken")
    insert.add_argument("--verify", action="store_true", help="run onnx.checker and qdqc invariants after every pass")
    insert.add_argument("--quiet", action="store_true", help="print nothing but errors")
    insert.set_defaults(run=run_insert)

    calibrate = sub.add_parser("calibrate", help="calibrate activation scales with onnxruntime over npz data",
                               description="calibrate MODEL --data D | calibrate MODEL --stats S (no rerun) | "
                                           "calibrate merge A.npz B.npz -o ALL.npz")
    _model_args(calibrate)
    _output_args(calibrate, ".calib.onnx")
    _calibration_args(calibrate)
    calibrate.add_argument("--stats", type=Path, help="collector states: written after --data, read without it")
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
    lower.add_argument("--target", default="onnxruntime", choices=["onnxruntime", "tensorrt"])
    lower.add_argument("--keep-fp32", default="LayerNorm",
                       help="tensorrt: comma-separated LayerNorm,Softmax,Gelu kept in FP32 (default LayerNorm)")
    lower.add_argument("--verify", action="store_true", help="run onnx.checker and qdqc invariants after every pass")
    lower.add_argument("--quiet", action="store_true")
    lower.set_defaults(run=run_lower)

    analyze = sub.add_parser("analyze", help="per-site sensitivity of a calibrated Q/DQ model (cosine, SNR)")
    _model_args(analyze)
    analyze.add_argument("--data", type=Path, required=True, help="npz keyed by model input name")
    analyze.add_argument("--samples", type=int, default=32, help="samples to measure on (default 32)")
    analyze.add_argument("--json", type=Path, help="write the ranking as JSON here")
    analyze.add_argument("--providers", default="CPUExecutionProvider")
    analyze.add_argument("--quiet", action="store_true")
    analyze.set_defaults(run=run_analyze)

    bench = sub.add_parser("bench", help="latency of ONNX models (onnxruntime) or TensorRT engines, interleaved")
    bench.add_argument("models", type=Path, nargs="*", help="one or more .onnx / .plan files (compared to the first)")
    bench.add_argument("--compare", type=Path, nargs="+", default=[], help="more models, run interleaved with them")
    bench.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"])
    bench.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--seq", type=int, default=128)
    bench.add_argument("--shapes", help="name:AxB,... for every input (overrides --batch/--seq)")
    bench.add_argument("--sweep", nargs="*", default=[], help="batch=1,8,32 seq=128,384: every combination")
    bench.add_argument("--data", type=Path, help="real inputs from an npz (first --batch samples)")
    bench.add_argument("--warmup", type=int, default=5)
    bench.add_argument("--iterations", type=int, default=50)
    bench.add_argument("--duration", type=float, help="seconds per model instead of --iterations")
    bench.add_argument("--json", type=Path, help="write every figure as JSON")
    bench.add_argument("--plot", type=Path, help="latency distribution per model (PNG, needs matplotlib)")
    bench.set_defaults(run=run_bench)

    build = sub.add_parser("build-engine", help="a strongly typed TensorRT engine from a `--target tensorrt` graph")
    _model_args(build)
    build.add_argument("-o", "--output", type=Path, required=True, help="the engine (.plan)")
    build.add_argument("--int8", action="store_true", help="require INT8 Q/DQ in the graph")
    build.add_argument("--fp16", action="store_true", help="require FP16 tensors in the graph")
    build.add_argument("--shapes", help="opt shapes name:1x128,... (default batch 1, sequence 128)")
    build.add_argument("--min-shapes", help="min shapes (default 1 for dynamic dims)")
    build.add_argument("--opt-shapes", help="same as --shapes")
    build.add_argument("--max-shapes", help="max shapes (default sequence 512)")
    build.add_argument("--workspace", type=int, help="workspace pool limit in MiB")
    build.add_argument("--timing-cache", type=Path, help="read and update this timing cache")
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
    from . import ir
    from .config import InsertConfig
    from .insert import insert, report, summary

    output = _checked_output(args, args.report)
    config = InsertConfig(args.mode)
    graph = ir.load(args.model)
    result = insert(graph, config, verify=args.verify)
    ir.save(graph, output, source=args.model, overwrite=args.overwrite)
    if args.report:
        ir.write_text_atomic(args.report, json.dumps(report(result, config), indent=1) + "\n")
    if not args.quiet:
        print(summary(result, config))
        if args.explain:
            for node, why in result.match.unmatched_gemms:
                print(f"  unmatched {ir.label(node)}: {why}")
        print(f"wrote {output}")
    elif result.plan.fallback:
        print(summary(result, config).splitlines()[0], file=sys.stderr)
    return 0


def _names(text: str) -> frozenset[str]:
    return frozenset(part.strip() for part in text.split(",") if part.strip())


def _smooth(text: str):
    from .smooth import SmoothConfig

    if text == "off":
        return None
    if text == "auto":
        return SmoothConfig(None)
    try:
        return SmoothConfig(float(text))
    except ValueError:
        raise UsageError(f"--smooth {text!r}: expected off, auto or an alpha such as 0.85") from None


def _shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected K/N, e.g. 0/4") from None
    return index, count


def run_calibrate(args) -> int:
    from . import ir
    from .calibrate import apply_scales, calibrate, model_inputs
    from .calibration import load_states, save_states
    from .data import Dataset

    if args.data is None and args.stats is None:
        raise UsageError("calibrate needs --data (to collect) or --stats (to recompute from saved statistics)")
    config = _calibration_config(args)
    smoothing = _smooth(args.smooth)
    if smoothing is not None and args.data is None:
        raise UsageError("--smooth needs --data (it measures per-channel activation maxima)")
    if args.method == "auto" and args.data is None:
        raise UsageError("--method auto needs --data (it measures each layer's error)")
    if args.stats is not None and args.data is None and not args.stats.exists():
        raise UsageError(f"{args.stats}: no such file")
    output = _checked_output(args, args.report, args.stats if args.data is not None else None)
    graph = ir.load(args.model)
    if args.data is not None:
        dataset = Dataset(args.data, model_inputs(graph))
        if smoothing is not None:
            from .smooth import smooth

            smooth(graph, dataset, config, smoothing)
        collectors, reports, samples, seconds = calibrate(graph, dataset, config)
        if args.stats is not None:
            save_states(args.stats, collectors)
    else:
        collectors = load_states(args.stats)
        samples, seconds = None, 0.0
        reports = apply_scales(graph, collectors, config)
    ir.save(graph, output, source=args.model, overwrite=args.overwrite)
    if args.report:
        from .calibrate import report_json

        ir.write_text_atomic(args.report, json.dumps(report_json(reports, config, samples, seconds), indent=1) + "\n")
    if not args.quiet:
        seen = f"{samples} samples in {seconds:.1f} s, " if samples is not None else "from saved statistics, "
        print(f"calibrated {len(reports)} activation tensors ({seen}method {config.method.value}"
              + (f" {config.percentile}" if config.method.value == "percentile" else "") + ")")
        print(f"wrote {output}")
    return 0


def run_merge(argv: list[str]) -> int:
    from . import ir
    from .calibration import merge_state_files, save_states

    parser = argparse.ArgumentParser(prog="qdqc calibrate merge",
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
    from . import ir
    from .lower import LowerConfig, lower

    config = LowerConfig(args.target, _names(args.keep_fp32))
    output = _checked_output(args)
    graph = ir.load(args.model)
    records = lower(graph, config, verify=args.verify)
    ir.save(graph, output, source=args.model, overwrite=args.overwrite)
    if not args.quiet:
        for record in records:
            print(f"{record.name}: " + ", ".join(f"{k} {v}" for k, v in record.stats.items()))
        print(f"wrote {output}")
    return 0


def run_compile(args) -> int:
    from . import ir
    from .calibrate import calibrate, model_inputs
    from .config import InsertConfig
    from .data import Dataset
    from .insert import insert, report, summary
    from .lower import LowerConfig, lower

    if args.data is None:
        raise UsageError("compile needs --data (calibration samples)")
    if args.report_command and args.html is None:
        raise UsageError("report needs --html FILE (where to write the report)")
    if args.eval is not None and args.html is None:
        raise UsageError("--eval only feeds the HTML report: add --html FILE")
    lower_config = LowerConfig(args.target, _names(args.keep_fp32))
    insert_config, calibration = InsertConfig(args.mode), _calibration_config(args)
    if args.fallback_budget is not None and args.fallback_budget < 0:
        raise UsageError(f"--fallback-budget must be at least 0, got {args.fallback_budget}")
    if args.target_cosine is not None and not 0 < args.target_cosine <= 1:
        raise UsageError(f"--target-cosine must be in (0, 1], got {args.target_cosine}")
    output = _checked_output(args, args.report, args.html)
    graph = ir.load(args.model)
    dataset = Dataset(args.data, model_inputs(graph))  # validated before any work
    if args.eval is not None:
        Dataset(args.eval, model_inputs(graph))
    smoothing = _smooth(args.smooth)
    inserted = insert(graph, insert_config)
    if smoothing is not None:
        from .smooth import smooth

        smooth(graph, dataset, calibration, smoothing)
    collectors, reports, samples, seconds = calibrate(graph, dataset, calibration)
    left_out, reached, ranking = [], None, None
    if args.fallback_budget is not None or args.target_cosine is not None:
        from .analyze import choose_fallback, float_gemm_share, leave_in_float

        left_out, reached, ranking = choose_fallback(graph, dataset, calibration, budget=args.fallback_budget,
                                                     target_cosine=args.target_cosine)
        float_gemms, share = float_gemm_share(graph, [s.node for s in left_out])
        leave_in_float(graph, [s.node for s in left_out])
    records = lower(graph, lower_config)
    ir.save(graph, output, source=args.model, overwrite=args.overwrite)
    if args.html is not None:
        _html_report(args, output, collectors, reports, calibration, left_out, ranking)
    if args.report:
        ir.write_text_atomic(args.report, json.dumps(report(inserted, insert_config), indent=1) + "\n")
    if not args.quiet:
        print(summary(inserted, insert_config))
        print(f"calibrated {len(reports)} activation tensors ({samples} samples in {seconds:.1f} s, "
              f"method {calibration.method.value})")
        for site in left_out:
            print(f"left in float: {site.tensor} (alone it costs cosine {1 - site.only_cosine:.2e}); the GEMMs "
                  "reading it run in float")
        if reached is not None:
            print(f"fallback: {len(left_out)} site(s) in float; mean cosine to the float model on the calibration "
                  f"samples {reached:.5f}; {float_gemms} weight GEMM(s) in float = {100 * share:.1f} % of the "
                  "weight-GEMM multiply-adds no longer integer")
        for record in records:
            print(f"{record.name}: " + ", ".join(f"{k} {v}" for k, v in record.stats.items()))
        print(f"wrote {output}")
    return 0


def run_analyze(args) -> int:
    from . import ir
    from .analyze import activation_sites, sensitivity
    from .calibrate import CalibrationConfig, model_inputs
    from .data import Dataset

    if args.samples < 1:
        raise UsageError(f"--samples must be at least 1, got {args.samples}")
    _checked_extra(args, args.json)
    graph = ir.load(args.model)
    if not activation_sites(graph):
        raise UsageError("the model has no activation QuantizeLinear: run `qdqc insert` and `qdqc calibrate` first")
    config = CalibrationConfig(providers=tuple(p.strip() for p in args.providers.split(",") if p.strip()),
                               progress=False)
    dataset = Dataset(args.data, model_inputs(graph))
    from tqdm import tqdm

    with tqdm(total=len(activation_sites(graph)), unit="site", desc="analyzing", file=sys.stderr,
              disable=args.quiet or not sys.stderr.isatty()) as bar:
        ranking = sensitivity(graph, dataset, config, args.samples, bar)
    if args.json:
        ir.write_text_atomic(args.json, json.dumps([s.to_json() for s in ranking], indent=1) + "\n")
    if not args.quiet:
        print(f"{'rank':>4}  {'only this site: cos':>19} {'SNR dB':>7}  {'all but this: cos':>17} {'SNR dB':>7}  tensor")
        for rank, site in enumerate(ranking, 1):
            print(f"{rank:>4}  {site.only_cosine:19.6f} {site.only_snr_db:7.1f}  {site.without_cosine:17.6f} "
                  f"{site.without_snr_db:7.1f}  {site.tensor}")
    return 0


def _html_report(args, output: Path, collectors, reports, calibration, left_out, ranking) -> None:
    from . import ir
    from .calibrate import model_inputs
    from .data import Dataset
    from .html_report import write_report

    cosines = None
    if args.eval is not None:
        import numpy as np

        from .evaluate import cosines as cosine_of, embeddings, open_session

        reference = ir.load(args.model)
        batches = list(Dataset(args.eval, model_inputs(reference)).batches(256, trim_padding=False))
        feeds = {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}
        ir.unique_node_names(reference)   # onnxruntime refuses repeated node names
        cosines = cosine_of(embeddings(open_session(ir.to_model(reference)), feeds),
                            embeddings(open_session(output), feeds))
    settings = {"model": args.model, "output": output, "mode": args.mode, "target": args.target,
                "method": calibration.method.value, "percentile": calibration.percentile, "smooth": args.smooth,
                "calibration samples": args.data, "left in float": ", ".join(s.tensor for s in left_out) or "none"}
    chosen = {r.tensor: r.chosen for r in reports}
    write_report(args.html, title=f"qdqc report: {args.model.name}", settings=settings, collectors=collectors,
                 chosen=chosen, percentile=calibration.percentile, ranking=ranking, cosines=cosines)
    if not args.quiet:
        print(f"wrote {args.html}")


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
    return [(b, s) for b in axes["batch"] for s in axes["seq"]]


def run_bench(args) -> int:
    from dataclasses import replace

    from . import ir
    from .bench import BenchConfig, bench, format_summary, parse_shapes, plot

    base = BenchConfig(args.provider, args.threads, args.warmup, args.iterations, args.duration, args.batch, args.seq,
                       parse_shapes(args.shapes))
    models = list(args.models) + list(args.compare)
    if not models:
        raise UsageError("bench needs at least one model")
    _checked_extra(args, args.json, args.plot)
    data = args.data
    results = []
    for batch, seq in _sweep(args.sweep):
        config = replace(base, batch=batch or base.batch, sequence=seq or base.sequence)
        summaries = bench(models, config, data)
        if len(_sweep(args.sweep)) > 1:
            print(f"\n--- batch {config.batch}, seq {config.sequence}")
        print(format_summary(summaries, config))
        results += [dict(s.to_json(), sequence=config.sequence) for s in summaries]
        if args.plot:
            plot(summaries, args.plot)
    if args.json:
        ir.write_text_atomic(args.json, json.dumps(results, indent=1) + "\n")
    return 0


def run_build_engine(args) -> int:
    from . import ir
    from .bench import parse_shapes
    from .engine_build import EngineConfig, build_engine

    ir.check_output(args.output, inputs=[ir.check_input(args.model)])
    config = EngineConfig(args.int8, args.fp16, parse_shapes(args.opt_shapes or args.shapes),
                          parse_shapes(args.min_shapes), parse_shapes(args.max_shapes), args.workspace,
                          args.timing_cache, args.opt_level)
    summary = build_engine(args.model, args.output, config)
    print(f"wrote {args.output}: {summary['layers']} layers {summary['by_precision']}, "
          f"INT8 attention layers {summary['int8_attention_layers']} (details in {args.output}.layers.json)")
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
    return f"qdqc: warning: {message}\n"


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

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


def _output_path(args) -> Path:
    if args.output is not None:
        return args.output
    return args.model.with_name(args.model.name.removesuffix(".onnx") + args.default_suffix)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qdqc", description="INT8 Q/DQ compiler for BERT-family ONNX models")
    parser.add_argument("--version", action="version", version=f"qdqc {__version__}")
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

    check = sub.add_parser("check", help="lint a Q/DQ model against TensorRT's explicit-quantization rules")
    _model_args(check)
    check.add_argument("--json", type=Path, help="also write the violations as JSON here")
    check.set_defaults(run=run_check)
    return parser


def run_insert(args) -> int:
    from . import ir
    from .config import InsertConfig
    from .insert import insert, report, summary

    output = _output_path(args)
    if ir.same_file(output, args.model) and not args.overwrite:
        raise UsageError(f"{output}: output would overwrite the input model (pass --overwrite to allow it)")
    config = InsertConfig(args.mode)
    graph = ir.load(args.model)
    result = insert(graph, config, verify=args.verify)
    ir.save(graph, output, source=args.model, overwrite=args.overwrite)
    if args.report:
        ir.write_text_atomic(args.report, json.dumps(report(result, config), indent=1) + "\n")
    if not args.quiet:
        print(summary(result, config))
        if args.explain:
            for node, why in result.match.unmatched_gemms.items():
                print(f"  unmatched {node}: {why}")
        print(f"wrote {output}")
    elif result.plan.fallback:
        print(summary(result, config).splitlines()[0], file=sys.stderr)
    return 0


def run_check(args) -> int:
    from . import ir
    from .check import check_graph

    graph = ir.load(args.model)
    violations = check_graph(graph)
    for violation in violations:
        print(violation)
    if args.json:
        ir.write_text_atomic(args.json, json.dumps([vars(v) for v in violations], indent=1) + "\n")
    qdq = sum(n.op in ir.QDQ_OPS for n in graph.nodes)
    print(f"{args.model}: {qdq} Q/DQ nodes, {len(violations)} violation(s)")
    return 1 if violations else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except QdqcError as exc:
        print(f"qdqc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("qdqc: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("qdqc: error: out of memory", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

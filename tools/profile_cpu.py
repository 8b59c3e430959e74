"""Where CPU time goes, per model: onnxruntime's profiler summed by op type, or OpenVINO's per-layer
performance counters summed by layer type, kernel and execution precision.

    python tools/profile_cpu.py BEFORE.onnx AFTER.onnx [MODEL.xml ...] [--batch 8] [--seq 128]
        [--runs 20] [--threads 2] [--openvino] [--data calib.npz] [--top 12] [--by-node]

A .onnx runs in onnxruntime (CPU EP, ORT_ENABLE_ALL, intra-op threads --threads, spinning off)
unless --openvino; a .xml always runs in OpenVINO (--threads threads, one stream, its default
precision unless --ov-precision). Each model runs --runs times after two warm-up runs; the table
gives milliseconds per inference by op type (onnxruntime: kernel time of each node, summed over
nodes of that type) and its share of the model's summed kernel time, with the model's own wall
median, so two models (a lowering before and after a pass, say) can be read side by side.
--by-node (onnxruntime) rows by op type and node name with the layer index taken out
("MatMulIntegerToFloat /inner/encoder/layer.*/attention/self/MatMul"), summed over the layers.
Profiling costs time itself: compare the shares and the op times, and take latency from
`qdqc bench` / tools/bench_cpu.py.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from qdq_compiler.bench import BenchConfig, random_feeds
from qdq_compiler.errors import QdqcError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
LAYER = re.compile(r"layer[._]\d+")


def onnxruntime_profile(path: Path, feeds_for, runs: int, threads: int,
                        by_node: bool = False) -> tuple[dict, list[float]]:
    """{op type (or op type and layer-free node name): (ms per inference, node count)} from
    onnxruntime's profiler, and wall times."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="qdqc-profile-") as folder:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "ort")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = feeds_for([(i.name, np.int64, tuple(i.shape)) for i in session.get_inputs()])
        for _ in range(2):
            session.run(None, feeds)
        wall = []
        for _ in range(runs):
            start = time.perf_counter()
            session.run(None, feeds)
            wall.append((time.perf_counter() - start) * 1000)
        trace = json.loads(Path(session.end_profiling()).read_text())
    per_type: dict[str, float] = defaultdict(float)
    nodes: dict[str, set] = defaultdict(set)
    events = [e for e in trace if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    # the two warm-up runs are in the trace too: keep the last `runs` events of each node
    by_node: dict[str, list] = defaultdict(list)
    for event in events:
        by_node[event["name"]].append(event)
    for name, seen in by_node.items():
        for event in seen[-runs:]:
            op = event["args"].get("op_name", "?")
            if by_node:   # the node, its layer index and lowering suffixes taken out
                op = f"{op} {LAYER.sub('layer.*', name[:-len('_kernel_time')]).split('::')[0]}"
            per_type[op] += event["dur"] / 1000 / runs
            nodes[op].add(name)
    return {op: (ms, len(nodes[op])) for op, ms in per_type.items()}, wall


def openvino_profile(path: Path, feeds_for, runs: int, threads: int, precision: str) -> tuple[dict, list[float]]:
    """{(layer type, kernel, precision): (ms per inference, layer count)} from OpenVINO's counters."""
    from qdq_compiler.openvino_backend import OpenVinoRunner

    runner = OpenVinoRunner(path, threads=threads, precision=precision, profile=True)
    feeds = feeds_for(runner.inputs)
    for _ in range(2):
        runner(feeds)
    totals: dict[tuple, float] = defaultdict(float)
    counts: dict[tuple, set] = defaultdict(set)
    wall = []
    for _ in range(runs):
        start = time.perf_counter()
        runner(feeds)
        wall.append((time.perf_counter() - start) * 1000)
        for layer in runner.counters():
            key = (layer.type, layer.exec_type, layer.precision)
            totals[key] += layer.ms / runs
            counts[key].add(layer.name)
    return {key: (ms, len(counts[key])) for key, ms in totals.items()}, wall


def table(title: str, rows: dict, wall: list[float], top: int) -> str:
    total = sum(ms for ms, _ in rows.values()) or 1.0
    lines = [f"\n{title}: wall median {statistics.median(wall):.2f} ms, summed kernel time {total:.2f} ms",
             f"  {'op / layer (kernel, precision)':58} {'count':>5} {'ms':>8} {'share':>6}"]
    ordered = sorted(rows.items(), key=lambda item: -item[1][0])
    for key, (ms, count) in ordered[:top]:
        label = key if isinstance(key, str) else f"{key[0]} ({key[1]}, {key[2]})"
        lines.append(f"  {label:58} {count:5d} {ms:8.2f} {100 * ms / total:5.1f}%")
    rest = ordered[top:]
    if rest:
        ms = sum(v for v, _ in (r[1] for r in rest))
        lines.append(f"  {'(' + str(len(rest)) + ' more)':58} {sum(c for _, c in (r[1] for r in rest)):5d} "
                     f"{ms:8.2f} {100 * ms / total:5.1f}%")
    return "\n".join(lines)


def feeds_maker(args):
    data = None
    if args.data is not None:
        with np.load(args.data, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    config = BenchConfig(threads=args.threads, batch=args.batch, sequence=args.seq)

    def make(inputs) -> dict:
        if data is None:
            return random_feeds(inputs, config)
        missing = [name for name, _, _ in inputs if name not in data]
        if missing:
            raise QdqcError(f"--data has no {missing}")
        return {name: np.ascontiguousarray(np.resize(data[name][:, : args.seq], (args.batch, args.seq))
                                           .astype(dtype)) for name, dtype, _ in inputs}

    return make


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--openvino", action="store_true", help="run .onnx models in OpenVINO too")
    parser.add_argument("--ov-precision", default="default", choices=["default", "f32", "bf16"])
    parser.add_argument("--data", type=Path, help="real inputs (npz); default: random ids, full attention mask")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--by-node", action="store_true",
                        help="onnxruntime: one row per node name (layer index taken out) instead of per op type")
    args = parser.parse_args(argv)
    try:
        for value, name in ((args.batch, "--batch"), (args.seq, "--seq"), (args.runs, "--runs"),
                            (args.threads, "--threads"), (args.top, "--top")):
            if value < 1:
                raise QdqcError(f"{name} must be at least 1, got {value}")
        for path in args.models + ([args.data] if args.data else []):
            if not path.exists():
                raise QdqcError(f"{path}: no such file")
        feeds_for = feeds_maker(args)
        print(f"batch {args.batch}, seq {args.seq}, {args.runs} profiled runs, threads {args.threads}")
        for path in args.models:
            if path.suffix == ".xml" or args.openvino:
                rows, wall = openvino_profile(path, feeds_for, args.runs, args.threads, args.ov_precision)
                print(table(f"{path} (OpenVINO, precision {args.ov_precision})", rows, wall, args.top), flush=True)
            else:
                rows, wall = onnxruntime_profile(path, feeds_for, args.runs, args.threads, args.by_node)
                print(table(f"{path} (onnxruntime)", rows, wall, args.top), flush=True)
    except QdqcError as exc:
        print(f"profile_cpu: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

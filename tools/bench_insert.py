"""Time `qdqc insert` on a BERT-large-shaped model (24 layers, hidden 1024, 16 heads).

    python tools/bench_insert.py [--layers 24 --hidden 1024 --heads 16 --repeat 3 --mode ft1]

Prints median and p90 over the repeats for each stage (load, insert pipeline,
save) and the total, and the ratio of the total to the 3 s target.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import onnx

from qdq_compiler import ir
from qdq_compiler.bench import p90
from qdq_compiler.config import InsertConfig
from qdq_compiler.insert import insert
from qdq_compiler.synthetic import BertSpec, build_bert

TARGET_SECONDS = 3.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--mode", default="ft1")
    args = parser.parse_args()
    spec = BertSpec(layers=args.layers, hidden=args.hidden, heads=args.heads, vocab=args.vocab,
                    max_positions=512, opset=17)
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "bert.onnx", Path(tmp) / "bert.qdq.onnx"
        onnx.save(build_bert(spec), source)
        print(f"model: {args.layers} layers, hidden {args.hidden}, {source.stat().st_size / 2**20:.0f} MiB, "
              f"mode {args.mode}")
        stages: dict[str, list[float]] = {"load": [], "insert": [], "save": [], "total": []}
        for _ in range(args.repeat):
            start = time.perf_counter()
            graph = ir.load(source)
            loaded = time.perf_counter()
            result = insert(graph, InsertConfig(args.mode))
            inserted = time.perf_counter()
            ir.save(graph, target)
            saved = time.perf_counter()
            for name, value in (("load", loaded - start), ("insert", inserted - loaded), ("save", saved - inserted),
                                ("total", saved - start)):
                stages[name].append(value)
        assert len(result.match.layers) == args.layers
        print(f"{'stage':8} {'median s':>9} {'p90 s':>7}")
        for name, values in stages.items():
            print(f"{name:8} {statistics.median(values):9.2f} {p90(values):7.2f}")
        total = statistics.median(stages["total"])
        print(f"total / target ({TARGET_SECONDS:.0f} s): {total / TARGET_SECONDS:.2f}")


if __name__ == "__main__":
    main()

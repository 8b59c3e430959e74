"""Does `qdqc lower --target onnxruntime` compute the function of the fake-quant model it lowers?

    python tools/agreement.py [--folder artifacts] [--samples 1000]

Runs on the main job's real all-MiniLM-L6-v2 models (`bash tools/run_main.sh` writes them): every
calibrated fake-quant model in the folder (minilm.calib.*.onnx, minilm.smooth.calib.onnx) is lowered
here and compared on the held-out sentences (eval.npz), by mean / min cosine of mean-pooled
embeddings, in five pairs:

  ort opt~unopt     onnxruntime's optimized vs unoptimized run of the fake-quant model: the yardstick
  low~fake opt      the lowered model vs the fake-quant model as onnxruntime runs it by default
  low~fake unopt    ... vs the fake-quant model with graph optimizations off
  low~exact         ... vs the fake-quant model with its quantized GEMMs accumulated exactly
                    (float64, rounded once: what the int32 accumulator computes)
  exact~fake unopt  how far float32 accumulation alone moves the fake-quant model

Every quantizer downstream of a difference can land on the neighbouring level, and the next layer
amplifies it, so two runs that differ only in float32 rounding already disagree (the yardstick).
Agreement holds when low~exact is at least the yardstick in the mean and the 1st percentile over
sentences (exit status 1 otherwise); the min, one sentence's draw of that amplification, is
printed beside them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

PAIRS = (("ort opt~unopt", "fake opt", "fake unopt"), ("low~fake opt", "low", "fake opt"),
         ("low~fake unopt", "low", "fake unopt"), ("low~exact", "low", "exact"), ("low unopt~exact", "low unopt", "exact"),
         ("exact~fake unopt", "exact", "fake unopt"))


def runs(calibrated: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from qdq_compiler import ir
    from qdq_compiler.evaluate import embeddings, exact_accumulation, open_session
    from qdq_compiler.lower import LowerConfig, lower

    graph = ir.load(calibrated)
    exact = ir.to_model(exact_accumulation(graph))
    lower(graph, LowerConfig("onnxruntime"))
    lowered = ir.to_model(graph)
    return {"fake opt": embeddings(open_session(calibrated), feeds),
            "fake unopt": embeddings(open_session(calibrated, optimize=False), feeds),
            "exact": embeddings(open_session(exact, optimize=False), feeds),
            "low": embeddings(open_session(lowered), feeds),
            "low unopt": embeddings(open_session(lowered, optimize=False), feeds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("artifacts"))
    parser.add_argument("--samples", type=int, default=1000)
    args = parser.parse_args()
    from qdq_compiler.evaluate import cosines

    models = sorted(args.folder.glob("minilm.calib.*.onnx")) + sorted(args.folder.glob("minilm.smooth.calib.onnx"))
    evaluation = args.folder / "eval.npz"
    if not models or not evaluation.exists():
        sys.exit(f"agreement: no minilm.calib.*.onnx / eval.npz in {args.folder}: run `bash tools/run_main.sh` first")
    feeds = {k: v[:args.samples] for k, v in np.load(evaluation).items()}
    print(f"cosine of mean-pooled embeddings over {len(feeds['input_ids'])} held-out sentences: mean, "
          "1st percentile, min (one sentence)")
    verdicts = []
    for model in models:
        found = runs(model, feeds)
        print(f"\n{model.name}")
        stats = {}
        for label, a, b in PAIRS:
            values = cosines(found[a].astype(np.float64), found[b].astype(np.float64))
            stats[label] = (values.mean(), np.percentile(values, 1), values.min())
            print(f"  {label:18} {stats[label][0]:.6f}  {stats[label][1]:.5f}  {stats[label][2]:.5f}")
        verdicts.append([low >= yardstick for low, yardstick in zip(stats["low~exact"], stats["ort opt~unopt"])])
        print("  low~exact >= ort opt~unopt: " + ", ".join(
            f"{name} {'yes' if held else 'no'}" for name, held in zip(("mean", "p1", "min"), verdicts[-1])))
    totals = np.sum(verdicts, axis=0)
    print(f"\nlow~exact at least the yardstick in {len(models)} models: mean {totals[0]}, p1 {totals[1]}, "
          f"min {totals[2]}")
    sys.exit(0 if totals[0] == totals[1] == len(models) else 1)


if __name__ == "__main__":
    main()

"""What end-to-end tuning can train, measured on all-MiniLM-L6-v2: README "End-to-end tuning".

    python tools/tune_variants.py --folder artifacts [--calibrated minilm.calib.onnx] [--train scales,vectors]
                                  [--epochs 3] [--seed 0] [--batch 16] [--weight-lr 1e-5] [--scale-lr 1e-2] [--vector-lr 3e-4]

The default compile's calibrated Q/DQ graph (smooth auto, percentile 99.999, GPTQ; built from
<folder>/minilm.onnx and <folder>/calib.npz unless --calibrated gives it) runs in torch
(qdq_compiler/torch_graph.py) and Adam trains what --train names for --epochs passes over the 256
calibration sentences (batches of 16 of similar length), minimizing the relative squared error of
last_hidden_state over attended tokens against FP32:

  scales   every activation scale, as a gain (LSQ gradient)
  vectors  GEMM biases and LayerNorm scale/shift
  smooth   the per-channel 1/s vectors SmoothQuant multiplies GEMM inputs by
  weights  the INT8 weights (float shadows, straight-through), re-quantized on their own per-channel scales

The tuned graph is lowered for onnxruntime and compared with FP32 on <folder>/eval.npz (1000 sentences
never trained on): cosine of mean-pooled embeddings (mean / p1 / min) and recall@10. `--train none`
gives the baseline row. `qdqc compile --tune 3` is `--train scales,vectors --epochs 3 --seed 0`.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
KINDS = ("scales", "vectors", "smooth", "weights")


def main() -> None:
    import onnx_graphsurgeon as gs
    import torch

    import qdq_compiler
    from qdq_compiler import ir
    from qdq_compiler.calibrate import CalibrationConfig
    from qdq_compiler.data import open_data
    from qdq_compiler.evaluate import cosines, embeddings, open_session, recall_at_k
    from qdq_compiler.quant import QMAX
    from qdq_compiler.torch_graph import TorchGraph
    from qdq_compiler.tune import TuneConfig, _relative_error, float_outputs, training_batches, tuned_vectors

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("artifacts"))
    parser.add_argument("--calibrated", type=Path, help="the default compile's calibrated Q/DQ model (else built)")
    parser.add_argument("--train", default="scales,vectors", help=f"comma-separated, of {', '.join(KINDS)}; or none")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16, help="sentences per step")
    parser.add_argument("--scale-lr", type=float, default=1e-2)
    parser.add_argument("--vector-lr", type=float, default=3e-4)
    parser.add_argument("--weight-lr", type=float, default=1e-5)
    args = parser.parse_args()
    kinds = [] if args.train == "none" else args.train.split(",")
    if any(kind not in KINDS for kind in kinds):
        parser.error(f"--train: expected some of {', '.join(KINDS)} or none")
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    model, data = args.folder / "minilm.onnx", args.folder / "calib.npz"
    evaluation = dict(np.load(args.folder / "eval.npz"))
    reference = embeddings(open_session(model), evaluation)
    if args.calibrated:
        graph = ir.load(args.calibrated)
    else:
        graph = qdq_compiler.calibrate(qdq_compiler.insert(model), data, quiet=True).graph
    # the float targets: FP32 itself (the calibrated graph's weights are already rounded)
    plain = ir.load(model)
    tune = TuneConfig(epochs=args.epochs, batch_size=args.batch)
    config = CalibrationConfig(progress=False)
    batches = training_batches(plain, open_data(data, plain), config, tune)
    targets = float_outputs(plain, batches, config.providers)

    net = TorchGraph(graph)
    for parameter in net.weights.values():
        parameter.requires_grad_("weights" in kinds)
    groups = []
    if "weights" in kinds:
        groups.append({"params": list(net.weights.values()), "lr": args.weight_lr})
    gains = net.train_scales() if "scales" in kinds else {}
    if gains:
        groups.append({"params": list(gains.values()), "lr": args.scale_lr})
    vectors = [v.name for v in tuned_vectors(graph)] if "vectors" in kinds else []
    if "smooth" in kinds:
        vectors += [t.name for n in graph.nodes if n.op == "Mul" for t in n.inputs
                    if isinstance(t, gs.Constant) and t.name.endswith("::smooth_inverse")]
    if vectors:
        groups.append({"params": net.train_constants(vectors), "lr": args.vector_lr})
    feeds = [{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items()} for b in batches]
    wanted = [[torch.from_numpy(t) for t in outs] for outs in targets]

    def mean_loss() -> float:
        with torch.no_grad():
            return float(np.mean([_relative_error(net(f), w, f["attention_mask"]).item() for f, w in zip(feeds, wanted)]))

    before, started = mean_loss(), time.perf_counter()
    if groups:
        optimizer, order = torch.optim.Adam(groups), np.random.default_rng(args.seed)
        for _ in range(args.epochs):
            for index in order.permutation(len(feeds)):
                optimizer.zero_grad()
                _relative_error(net(feeds[index]), wanted[index], feeds[index]["attention_mask"]).backward()
                optimizer.step()
    seconds, after = time.perf_counter() - started, mean_loss()

    tensors = graph.tensors()
    for name in net.weight_names if "weights" in kinds else ():
        quantizer = next(n for n in tensors[name].outputs if n.op == "QuantizeLinear")
        scale = quantizer.inputs[1].values.reshape(1, -1)   # per output column ([K, N] MatMul weights)
        old = np.rint(tensors[name].values / scale)
        new = np.clip(np.rint(net.weight(name).detach().numpy() / scale), -QMAX, QMAX)
        lost = (np.abs(new).max(axis=0) < QMAX) & (np.abs(old).max(axis=0) >= QMAX)   # keep the scales a fixed point
        new = np.where((np.abs(old) >= QMAX) & lost, old, new)
        tensors[name].values = (new * scale).astype(np.float32)
    for name, gain in gains.items():
        tensors[name].values = np.asarray(tensors[name].values * np.exp(gain.item()), np.float32)
    for name in vectors:
        tensors[name].values = net.constant(name).detach().numpy().astype(np.float32)

    found = embeddings(open_session(qdq_compiler.lower(ir.to_model(graph)).model), evaluation)
    values = cosines(reference, found)
    print(f"train {args.train} epochs {args.epochs} seed {args.seed}: loss {before:.5f} -> {after:.5f} "
          f"({seconds:.1f} s) | mean {values.mean():.5f} p1 {np.percentile(values, 1):.5f} min {values.min():.5f} "
          f"recall@10 {recall_at_k(reference, found, 10):.4f}", flush=True)


if __name__ == "__main__":
    main()

"""A QAT-style ONNX export of a Hugging Face encoder, as quantization-aware-training toolkits write
them (needs the `dev` extra): the fixture for qdqc's QAT path, and a way to bring one's own.

Every `nn.Linear` gets a per-tensor input fake-quantizer and a per-output-channel weight
fake-quantizer (pytorch-quantization's `QuantLinear`); with `norm_inputs` every `nn.LayerNorm` an input
fake-quantizer too (what NVIDIA ModelOpt's INT8 default places in front of the residual-sum
LayerNorms; untrained, quantizing the residual stream this way costs MiniLM most of its fidelity);
all symmetric INT8, zero point 0, amax from a short max calibration. Two producers' module styles:

- `torch`: `torch.fake_quantize_per_tensor_affine` / `_per_channel_affine` with the scale computed in
  `forward` (pytorch-quantization's `TensorQuantizer` export path): the TorchScript exporter writes the
  scales and zero points as `Constant` nodes and each weight as weight -> Q -> DQ -> Transpose -> MatMul.
- `torch-ao`: `torch.ao.quantization.FakeQuantize` modules (per-tensor symmetric activations,
  per-channel symmetric weights, observers frozen after calibration): scales as initializers.

    python -m qdq_compiler.qat_export minilm -o minilm.qat.onnx [--style torch-ao|modelopt] [--attn sdpa]
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

STYLES = ("torch", "torch-ao")
INT8_MIN, INT8_MAX = -128, 127


def _quant_modules(style: str):
    import torch

    class MaxQuantizer(torch.nn.Module):
        """Fake-quantizes with scale amax/127; while calibrating it records amax and passes x through."""

        def __init__(self, axis: int | None = None):
            super().__init__()
            self.axis = axis
            self.calibrating = True
            self.register_buffer("amax", torch.zeros(()))

        def forward(self, x):
            if self.calibrating:
                if self.axis is None:
                    self.amax = torch.maximum(self.amax, x.detach().abs().amax())
                else:
                    dims = [d for d in range(x.dim()) if d != self.axis]
                    self.amax = torch.maximum(self.amax, x.detach().abs().amax(dim=dims))
                return x
            scale = torch.clamp(self.amax, min=1e-8) / INT8_MAX
            if self.axis is None:
                return torch.fake_quantize_per_tensor_affine(x, float(scale), 0, INT8_MIN, INT8_MAX)
            zero = torch.zeros(scale.shape, dtype=torch.int32)
            return torch.fake_quantize_per_channel_affine(x, scale, zero, self.axis, INT8_MIN, INT8_MAX)

    def ao_quantizer(axis: int | None):
        from torch.ao.quantization import (FakeQuantize, MovingAverageMinMaxObserver,
                                           MovingAveragePerChannelMinMaxObserver)

        if axis is None:
            return FakeQuantize(MovingAverageMinMaxObserver, quant_min=INT8_MIN, quant_max=INT8_MAX,
                                dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, averaging_constant=1.0)
        return FakeQuantize(MovingAveragePerChannelMinMaxObserver, quant_min=INT8_MIN, quant_max=INT8_MAX,
                            dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=axis,
                            averaging_constant=1.0)

    make = MaxQuantizer if style == "torch" else ao_quantizer

    class QuantLinear(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.linear = linear
            self.input_quantizer = make(None)
            self.weight_quantizer = make(0)   # nn.Linear's weight is [out, in]: output channels on axis 0

        def forward(self, x):
            weight = self.weight_quantizer(self.linear.weight)
            return torch.nn.functional.linear(self.input_quantizer(x), weight, self.linear.bias)

    class QuantLayerNorm(torch.nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.norm = norm
            self.input_quantizer = make(None)

        def forward(self, x):
            return self.norm(self.input_quantizer(x))

    return QuantLinear, QuantLayerNorm


def fake_quantize(model, style: str = "torch", norm_inputs: bool = False):
    """Wrap every Linear (and with `norm_inputs` every LayerNorm) of `model` in place with fake-quantizers;
    returns the quantizers."""
    import torch

    if style not in STYLES:
        raise ValueError(f"style {style!r}: expected one of {STYLES}")
    QuantLinear, QuantLayerNorm = _quant_modules(style)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, QuantLinear(child))
            elif norm_inputs and isinstance(child, torch.nn.LayerNorm):
                setattr(parent, name, QuantLayerNorm(child))
    return [m for m in model.modules() if m.__class__.__name__ in ("MaxQuantizer", "FakeQuantize")]


def calibrate(model, quantizers, batches, style: str = "torch") -> None:
    """Max calibration over `batches` (keyword feeds), then quantization on and statistics frozen."""
    import torch

    with torch.no_grad():
        if style == "torch-ao":
            for q in quantizers:
                q.enable_observer()
                q.disable_fake_quant()
        for feeds in batches:
            model(**feeds)
        for q in quantizers:
            if style == "torch":
                q.calibrating = False
            else:
                q.disable_observer()
                q.enable_fake_quant()


def export_qat(family: str, out: Path, *, style: str = "torch", sentences: list[str] | None = None,
               attn: str = "eager", opset: int = 17, seq: int = 32, samples: int = 16,
               norm_inputs: bool = False) -> Path:
    """Fake-quantize `family` (hf_export's models), calibrate on `samples` of `sentences` (the shipped
    calibration sentences by default; random token ids for the small random-weight families), export."""
    from .hf_export import build_model

    model = build_model(family, attn)
    tensors = _calibration_tensors(family, model, sentences, seq, samples)
    quantizers = fake_quantize(model, style, norm_inputs)
    batches = [{n: t[i:i + 8] for n, t in tensors.items()} for i in range(0, samples, 8)]
    calibrate(model, quantizers, batches, style)
    return _export(model, tensors, Path(out), opset)


def _calibration_tensors(family: str, model, sentences, seq: int, samples: int) -> dict:
    import torch

    from .hf_export import corpus, encode

    names = ["input_ids", "attention_mask", "token_type_ids"]
    if family == "minilm":
        feeds = encode((sentences or corpus("calibration"))[:samples], seq=seq)
        return {n: torch.from_numpy(feeds[n]) for n in names}
    ids = torch.randint(5, model.config.vocab_size, (samples, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def _export(model, tensors: dict, out: Path, opset: int) -> Path:
    import torch

    from .hf_export import positional_encoder

    names = list(tensors)
    axes = {n: {0: "batch", 1: "sequence"} for n in names + ["last_hidden_state"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(positional_encoder(model, names), tuple(t[:2] for t in tensors.values()), str(out),
                          dynamo=False, opset_version=opset, input_names=names, output_names=["last_hidden_state"],
                          dynamic_axes=axes, do_constant_folding=True)
    return out


def export_modelopt(family: str, out: Path, *, sentences: list[str] | None = None, attn: str = "sdpa",
                    opset: int = 17, seq: int = 32, samples: int = 16) -> Path:
    """NVIDIA ModelOpt's INT8 QAT/PTQ export as its users write it: `mtq.quantize(model, mtq.INT8_DEFAULT_CFG,
    loop)` then `torch.onnx.export(dynamo=False)` (needs `nvidia-modelopt`, the `qat` extra)."""
    import torch
    import modelopt.torch.quantization as mtq

    from .hf_export import build_model

    model = build_model(family, attn)
    tensors = _calibration_tensors(family, model, sentences, seq, samples)

    def loop(module):
        with torch.no_grad():
            for i in range(0, samples, 8):
                module(**{n: t[i:i + 8] for n, t in tensors.items()})

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = mtq.quantize(model, mtq.INT8_DEFAULT_CFG, loop)
    return _export(model, tensors, Path(out), opset)


def main(argv=None) -> int:
    from .hf_export import FAMILIES, VISION

    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))   # first paragraph
    parser.add_argument("family", choices=[f for f in FAMILIES if f not in VISION])
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--style", choices=STYLES + ("modelopt",), default="torch",
                        help="modelopt: NVIDIA ModelOpt's INT8_DEFAULT_CFG (needs nvidia-modelopt)")
    parser.add_argument("--attn", choices=("eager", "sdpa"), default="eager")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--samples", type=int, default=16, help="calibration sentences (max calibration)")
    parser.add_argument("--seq", type=int, default=32, help="calibration sequence length")
    parser.add_argument("--norm-inputs", action="store_true", help="torch styles: quantize every LayerNorm input too")
    args = parser.parse_args(argv)
    if args.style == "modelopt":
        path = export_modelopt(args.family, args.output, attn=args.attn, opset=args.opset, samples=args.samples,
                               seq=args.seq)
    else:
        path = export_qat(args.family, args.output, style=args.style, attn=args.attn, opset=args.opset,
                          samples=args.samples, seq=args.seq, norm_inputs=args.norm_inputs)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

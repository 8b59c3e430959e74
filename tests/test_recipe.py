"""Per-site control: site names, --include/--exclude, recipes (JSON/TOML), emit -> replay, carried settings."""
import json

import numpy as np
import onnx
import pytest

import qdq_compiler
from qdq_compiler import carried, ir
from qdq_compiler.errors import UsageError
from qdq_compiler.recipe import write
from qdq_compiler.synthetic import BertSpec, build_bert, example_inputs

from conftest import cosine, qdqc, run_model

SPEC = BertSpec()   # 2 layers
SITES = ("qkv.input", "q", "k", "v", "softmax.output", "attention_output.input", "ffn1.input", "ffn2.input")
QUICK = dict(smooth="off", method="max", weights="nearest", quiet=True)   # fast, deterministic compiles


@pytest.fixture(scope="module")
def model():
    return build_bert(SPEC)


@pytest.fixture(scope="module")
def feeds():
    return example_inputs(SPEC, batch=8, seq=16, seed=3)


def dequantized(graph, tensor) -> bool:
    """Whether `tensor` comes from a DequantizeLinear (through the Reshapes that only flatten a GEMM input)."""
    producer = ir.producer(tensor)
    while producer is not None and producer.op == "Reshape":
        producer = ir.producer(producer.inputs[0])
    return producer is not None and producer.op == "DequantizeLinear"


def test_every_layer_exposes_the_fasterTransformer_site_names(model):
    names = qdq_compiler.insert(model, mode="trt").report["sites"]["site_names"]
    for index in range(SPEC.layers):
        for site in SITES + ("residual1", "residual2", "ffn2.weight", "query.weight"):
            assert f"layer.{index}.{site}" in names
    assert f"layer.{SPEC.layers - 1}.output" in names and "layer.0.output" not in names   # only the model's output


def test_excluding_ffn2_input_leaves_exactly_those_gemms_in_float(model, feeds):
    result = qdq_compiler.insert(model, exclude=["layer.*.ffn2.input"])
    graph = result.graph
    layers = result.inserted.match.layers
    for layer in layers:
        for role, linear in layer.linears().items():
            activation = linear.node.inputs[0]
            assert dequantized(graph, activation) is (role != "ffn2"), role
            assert dequantized(graph, linear.node.inputs[1])   # every weight still INT8
    assert {s["site"] for s in result.report["sites"]["disabled_sites"]} == {"layer.0.ffn2.input", "layer.1.ffn2.input"}
    # lowered for onnxruntime: every other GEMM integer, the two FFN2 GEMMs float MatMuls
    compiled = qdq_compiler.compile(model, feeds, exclude=["layer.*.ffn2.input"], **QUICK)
    ops = [n.op for n in compiled.graph.nodes]
    assert ops.count("MatMulIntegerToFloat") == 16 - 2
    floats = [n for n in compiled.graph.nodes if n.op == "MatMul" and dequantized(compiled.graph, n.inputs[1])]
    assert sorted(n.name for n in floats) == sorted(ir.label(layer.ffn2.node) for layer in layers)
    assert all(not dequantized(compiled.graph, n.inputs[0]) for n in floats)   # float input, INT8-stored weight
    test = example_inputs(SPEC, batch=2, seq=16, seed=9)
    assert cosine(run_model(compiled.model, test)[0], run_model(model, test)[0]) > 0.99


def test_fallback_equals_excluding_the_sites_it_chose(model, feeds, tmp_path):
    fallback = qdq_compiler.compile(model, feeds, fallback_budget=2, **QUICK)
    chosen = [site for s in fallback.left_out for site in s.sites]
    assert len(fallback.left_out) == 2 and chosen and all(site.startswith("layer.") for site in chosen)
    excluded = qdq_compiler.compile(model, feeds, exclude=chosen, **QUICK)
    assert excluded.model.SerializeToString() == fallback.model.SerializeToString()
    disabled = fallback.report["sites"]["disabled_sites"]
    assert {d["site"] for d in disabled} == set(chosen)
    assert all(d["by"].startswith("the fallback") for d in disabled)
    # the emitted decision names them, and replaying it gives the same bytes again
    disabled = [e["match"] for e in fallback.recipe["sites"] if e.get("enabled") is False]
    assert disabled == chosen
    path = tmp_path / "decided.toml"
    write(fallback.recipe, path)
    replayed = qdq_compiler.compile(model, feeds, recipe=path, **QUICK)
    assert replayed.model.SerializeToString() == fallback.model.SerializeToString()


def test_emit_and_replay_reproduce_a_fallback_with_auto_methods_bit_for_bit(bert_file, tmp_path, feeds):
    data = tmp_path / "calib.npz"
    np.savez(data, **feeds)
    first, emitted = tmp_path / "first.onnx", tmp_path / "decided.json"
    options = ["--smooth", "off", "--weights", "nearest", "--method", "auto", "--quiet"]
    proc = qdqc("compile", bert_file, "--data", data, "-o", first, "--fallback-budget", "1", "--exclude", "layer.0.v", "--emit-recipe", emitted, *options)
    assert proc.returncode == 0, proc.stderr
    recipe = json.loads(emitted.read_text())
    entries = recipe["sites"]
    assert entries[0] == {"match": "layer.0.v", "enabled": False}          # the rules in force come first
    assert sum(e.get("enabled") is False for e in entries) == 2             # and the site the fallback chose
    methods = [e for e in entries if "method" in e]
    assert methods and all(e["match"].startswith("layer.") for e in methods)
    second = tmp_path / "second.onnx"
    proc = qdqc("compile", bert_file, "--data", data, "-o", second, "--recipe", emitted, *options)
    assert proc.returncode == 0, proc.stderr
    assert second.read_bytes() == first.read_bytes()
    stored = carried.read(ir.load(second))
    assert stored.recipe == recipe                                            # the recipe in force, in the model


def _scale_of(graph, tensor: str) -> float:
    q = next(n for n in graph.nodes if n.op == "QuantizeLinear" and n.inputs[0].name == tensor)
    return float(ir.constant(q.inputs[1]).reshape(()))


def test_per_site_methods_land_in_the_right_scales(model, feeds, tmp_path):
    from qdq_compiler.calibration import HistogramCollector, compute_amax

    recipe = {"sites": [{"match": "layer.*.softmax.output", "method": "mse"},
                        {"match": "layer.1.ffn1.input", "method": "percentile", "percentile": 99.0}]}
    inserted = qdq_compiler.insert(model, recipe=recipe)
    result = qdq_compiler.calibrate(inserted, feeds, smooth="off", method="max", weights="nearest", quiet=True)
    graph, layers = result.graph, inserted.inserted.match.layers
    names = [layers[i].attention.probs for i in (0, 1)] + [layers[1].ffn1.input, layers[0].ffn1.input]
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    reference.graph.output.extend([onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names])
    outputs = run_model(reference, feeds)[-len(names):]
    float_values = dict(zip(names, outputs))
    for name in names[:2]:   # mse on the softmax outputs, from a histogram of the same float values
        collector = HistogramCollector()
        collector.collect(float_values[name])
        mse = compute_amax(collector.counts, collector.edges, "mse")
        assert _scale_of(graph, name) == pytest.approx(mse / 127, rel=1e-5)
        assert _scale_of(graph, name) < np.abs(float_values[name]).max() / 127   # not the max a plain run gives
    ffn1 = float_values[names[2]]
    assert _scale_of(graph, names[2]) == pytest.approx(np.percentile(np.abs(ffn1), 99.0) / 127, rel=0.05)
    assert _scale_of(graph, names[3]) == pytest.approx(np.abs(float_values[names[3]]).max() / 127, rel=1e-6)
    labels = {t["tensor"]: t["amax"].get("recipe") for t in result.report["calibration"]["tensors"]}
    assert labels[names[0]].startswith("mse") and labels[names[2]].startswith("percentile 99")
    assert labels[names[3]] is None


def test_weight_granularity_and_smoothing_per_site(model, feeds):
    recipe = {"sites": [{"match": "layer.0.*.weight", "weights": "per-tensor"},
                        {"match": "layer.*.ffn1.input", "smooth": 0.5},
                        {"match": "layer.1.ffn2.input", "smooth": "off"}]}
    result = qdq_compiler.compile(model, feeds, recipe=recipe, smooth="auto", method="max", weights="nearest",
                                  target="tensorrt", quiet=True)
    by_site = result.inserted.plan.by_site()
    for role in ("query", "key", "value", "attention_output", "ffn1", "ffn2"):
        assert by_site[f"layer.0.{role}.weight"].axis is None
        assert by_site[f"layer.1.{role}.weight"].axis is not None
    smoothing = result.report["smoothing"]
    assert smoothing["sites_smoothed"] == 6 - 1 and 0.5 in smoothing["alphas"]
    smoothed = {n.inputs[0].name for n in result.graph.nodes if n.op == "Mul" and "::smooth" in n.name}
    layers = result.inserted.match.layers
    assert layers[1].ffn2.input not in smoothed and layers[0].ffn2.input in smoothed


def test_include_keeps_only_what_it_names_and_node_names_and_op_types_match(model):
    only = qdq_compiler.insert(model, include=["layer.1.*"]).inserted.plan
    assert only.quantizers and all(site.startswith("layer.1.") for q in only.quantizers for site in q.sites)
    graph = ir.from_model(model)
    ffn2 = next(n.name for n in graph.nodes if n.op == "MatMul" and n.name.startswith("layer.0/ffn/output/"))
    by_node = qdq_compiler.insert(model, exclude=[ffn2]).inserted.plan
    assert {s for s, _ in by_node.disabled} == {"layer.0.ffn2.input", "layer.0.ffn2.weight"}
    trt = qdq_compiler.insert(model, mode="trt", exclude=["Add"]).inserted.plan   # the residual Adds
    assert all("residual" in site for site, _ in trt.disabled) and len(trt.disabled) == 4 * SPEC.layers


def test_recipe_dict_file_and_mode(model, tmp_path):
    toml = tmp_path / "r.toml"
    toml.write_text('mode = "ft2"\n\n[[sites]]\nmatch = "layer.*.ffn2.input"\nenabled = false\n')
    from_file = qdq_compiler.insert(model, recipe=toml)
    from_dict = qdq_compiler.insert(model, recipe={"mode": "ft2", "sites": [{"match": "layer.*.ffn2.input",
                                                                             "enabled": False}]})
    assert from_file.inserted.plan.mode.value == "ft2"
    assert from_file.model.SerializeToString() == from_dict.model.SerializeToString()
    with pytest.raises(UsageError, match="says mode ft2"):
        qdq_compiler.insert(model, recipe=toml, mode="ft1")
    with pytest.raises(UsageError, match=r"recipe sites\[0\]: unknown key 'enable'"):
        qdq_compiler.insert(model, recipe={"sites": [{"match": "layer.0.*", "enable": False}]})
    # later rules win: on again after off
    plan = qdq_compiler.insert(model, recipe={"sites": [{"match": "layer.*.ffn2.*", "enabled": False},
                                                        {"match": "layer.1.ffn2.input", "enabled": True}]}).inserted.plan
    assert {s for s, _ in plan.disabled} == {"layer.0.ffn2.input", "layer.0.ffn2.weight", "layer.1.ffn2.weight"}


def test_analyze_lists_site_names_and_emits_a_recipe(tmp_path):
    from conftest import calibrated_bert

    graph, data = calibrated_bert(tmp_path)
    path = ir.save(graph, tmp_path / "calib.onnx")
    ranking, emitted = tmp_path / "rank.json", tmp_path / "float.toml"
    proc = qdqc("analyze", path, "--data", data, "--samples", "8", "--json", ranking, "--fallback-budget", "2",
                "--emit-recipe", emitted, "--quiet")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(ranking.read_text())
    assert all(row["sites"] and row["sites"][0].startswith("layer.") for row in rows)
    import tomllib

    recipe = tomllib.loads(emitted.read_text())
    worst = [site for row in rows[:2] for site in row["sites"]]
    assert recipe["mode"] == "ft1" and [e["match"] for e in recipe["sites"]] == worst
    assert all(e["enabled"] is False for e in recipe["sites"])


def test_a_node_path_glob_selects_the_sites_of_the_nodes_it_names_not_what_they_produce(model):
    # layer 1's Q/K/V GEMMs read `layer.0/ffn/LayerNorm_..._out`, a tensor named after its layer-0 producer
    layer0 = qdq_compiler.insert(model, exclude=["layer.0/*"]).inserted.plan
    off = {site for site, _ in layer0.disabled}
    assert off and all(site.startswith("layer.0.") for site in off)
    assert "layer.1.qkv.input" in layer0.by_site()
    generic = qdq_compiler.insert(model, mode="generic", exclude=["layer.0/ffn/*"]).inserted.plan
    graph = ir.from_model(model)
    readers = {n.name for n in graph.nodes if n.name.startswith("layer.0/ffn/") and n.op == "MatMul"}
    assert {site for site, _ in generic.disabled} == {f"{name}.input{i}" for name in readers for i in (0, 1)}
    # a tensor is still named by its exact name: every site that quantizes it
    tensor = layer0.by_site()["layer.1.qkv.input"].tensor
    exact = qdq_compiler.insert(model, exclude=[tensor]).inserted.plan
    assert [site for site, _ in exact.disabled] == ["layer.1.qkv.input"]


def test_empty_patterns_are_refused_and_insert_returns_the_recipe_in_force(model):
    for exclude in ([""], ["  "], "layer.0.q,,"):
        with pytest.raises(UsageError, match="--exclude '': an empty pattern"):
            qdq_compiler.insert(model, exclude=exclude)
    result = qdq_compiler.insert(model, exclude=["layer.*.ffn2.input"])
    assert result.recipe == {"format": 1, "sites": [{"match": "layer.*.ffn2.input", "enabled": False}]}
    assert qdq_compiler.insert(model).recipe is None


def test_a_weight_granularity_change_takes_a_whole_scale_group(model):
    with pytest.raises(UsageError, match=r"sites\[0\] \('layer\.\*\.query\.weight'\): weights per-channel would split"):
        qdq_compiler.insert(model, mode="trt", recipe={"sites": [{"match": "layer.*.query.weight",
                                                                  "weights": "per-channel"}]})
    plan = qdq_compiler.insert(model, mode="trt", recipe={"sites": [{"match": "layer.*.[qkv]*.weight",
                                                                     "weights": "per-channel"}]}).inserted.plan
    by_site = plan.by_site()
    for layer in range(SPEC.layers):
        for role in ("query", "key", "value"):
            assert by_site[f"layer.{layer}.{role}.weight"].axis is not None   # each its own per-channel scale
        assert by_site[f"layer.{layer}.ffn1.weight"].axis is None            # the others as the mode has them
    # per-tensor in ft1 has no group to split: allowed on the query weight alone
    ft1 = qdq_compiler.insert(model, recipe={"sites": [{"match": "layer.0.query.weight", "weights": "per-tensor"}]})
    assert ft1.inserted.plan.by_site()["layer.0.query.weight"].axis is None


def test_lower_notes_what_the_recipe_left_in_float_and_strict_fails_only_on_accidents(model, feeds, tmp_path):
    inserted = qdq_compiler.insert(model, exclude=["layer.*.ffn2.input"])
    calibrated = qdq_compiler.calibrate(inserted, feeds, **QUICK)
    lowered = qdq_compiler.lower(calibrated, strict=True)
    report = next(r for r in lowered.records if r.name == "report-float-gemms")
    assert report.stats == {"quantized_gemms_left_float": 0, "left_float_by_recipe": SPEC.layers}
    assert [d.level for d in report.diagnostics] == ["info"] * SPEC.layers
    assert all("leaves layer." in d.message and "ffn2.input in float" in d.message for d in report.diagnostics)
    # the same graph without the record: the float GEMMs are accidents as far as lower can tell
    path = tmp_path / "nometa.onnx"
    proto = calibrated.model
    del proto.metadata_props[:]
    onnx.save(proto, path)
    with pytest.raises(qdq_compiler.errors.ModelError, match=r"--strict: 2 quantized GEMM\(s\) left in float"):
        qdq_compiler.lower(path, strict=True)
    # compile --strict: a note on stderr, success
    data = tmp_path / "calib.npz"
    np.savez(data, **feeds)
    proc = qdqc("compile", _float_file(model, tmp_path), "--data", data,
                "-o", tmp_path / "c.onnx", "--exclude", "layer.*.ffn2.input", "--strict", "--smooth", "off",
                "--weights", "nearest", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""   # --quiet: notes are not printed, and there is no warning


def _float_file(model, tmp_path):
    path = tmp_path / "bert.onnx"
    onnx.save(model, path)
    return path


def test_a_model_without_a_plan_is_named_by_matching_and_its_recipe_replays(model, feeds, tmp_path):
    import tomllib

    calibrated = qdq_compiler.calibrate(qdq_compiler.insert(model), feeds, **QUICK).model
    del calibrated.metadata_props[:]   # as an older qdqc wrote it
    path, data = tmp_path / "nometa.onnx", tmp_path / "calib.npz"
    onnx.save(calibrated, path)
    np.savez(data, **feeds)
    ranking, emitted = tmp_path / "rank.json", tmp_path / "float.toml"
    proc = qdqc("analyze", path, "--data", data, "--samples", "4", "--json", ranking, "--fallback-budget", "1",
                "--emit-recipe", emitted, "--quiet")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(ranking.read_text())
    named = {site for row in rows for site in row["sites"]}
    assert named == {f"layer.{i}.{s}" for i in range(SPEC.layers) for s in SITES}   # every activation site, once
    recipe = tomllib.loads(emitted.read_text())   # valid TOML: no `mode = None`
    assert "mode" not in recipe and recipe["sites"] == [{"match": rows[0]["sites"][0], "enabled": False}]
    replayed = qdq_compiler.insert(model, recipe=emitted)
    assert [site for site, _ in replayed.inserted.plan.disabled] == rows[0]["sites"]


def test_include_never_turns_back_on_what_the_recipe_leaves_in_float():
    recipe = {"sites": [{"match": "layer.0.ffn2.input", "enabled": False}]}
    result = qdq_compiler.insert(build_bert(BertSpec(layers=2)), recipe=recipe, include=["layer.0.*"])
    disabled = {entry["site"] for entry in result.report["sites"]["disabled_sites"]}
    assert "layer.0.ffn2.input" in disabled and "layer.1.ffn1.input" in disabled
    assert "layer.0.ffn1.input" in result.report["sites"]["site_names"]

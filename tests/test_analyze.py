import json

import numpy as np

from qdq_compiler import ir
from qdq_compiler.analyze import activation_sites, leave_in_float, sensitivity
from qdq_compiler.calibrate import CalibrationConfig, model_inputs
from qdq_compiler.data import Dataset
from qdq_compiler.synthetic import BertSpec, build_bert, example_inputs

from conftest import calibrated_bert, cosine, qdqc, run_model

SPEC = BertSpec(layers=1)


def calibrated(tmp_path):
    return calibrated_bert(tmp_path, SPEC, batch=12, seed=3)


def test_ranking_covers_every_activation_site_and_is_sorted(tmp_path):
    graph, data = calibrated(tmp_path)
    # make one site clearly bad: a scale 50x too large crushes that tensor to a few levels
    victim = activation_sites(graph)[2]
    victim.inputs[1].values = np.asarray(victim.inputs[1].values * 50)
    ranking = sensitivity(graph, Dataset(data, model_inputs(graph)), CalibrationConfig(progress=False), 8)
    assert len(ranking) == len(activation_sites(graph)) == 8
    assert [s.only_cosine for s in ranking] == sorted(s.only_cosine for s in ranking)
    assert ranking[0].quantizer == victim.name and ranking[0].node is victim
    worst = ranking[0]
    assert worst.without_cosine > min(s.without_cosine for s in ranking[1:])  # removing it helps most
    assert all(s.only_cosine <= 1.0 + 1e-9 and s.only_snr_db > 0 for s in ranking)


def test_leave_in_float_bypasses_exactly_those_sites(tmp_path):
    graph, _ = calibrated(tmp_path)
    feeds = example_inputs(SPEC, batch=2, seq=16, seed=5)
    reference = run_model(build_bert(SPEC), feeds)[0]
    before = cosine(run_model(graph, feeds)[0], reference)
    sites = activation_sites(graph)
    assert leave_in_float(graph, sites[:3]) == 3
    assert [id(q) for q in activation_sites(graph)] == [id(q) for q in sites[3:]]
    assert cosine(run_model(graph, feeds)[0], reference) >= before - 1e-6


def test_cli_analyze_and_compile_fallback(tmp_path):
    graph, data = calibrated(tmp_path)
    model = ir.save(graph, tmp_path / "m.calib.onnx")
    out = tmp_path / "rank.json"
    proc = qdqc("analyze", model, "--data", data, "--samples", "4", "--json", out)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(out.read_text())) == 8 and "only this site" in proc.stdout
    source = tmp_path / "bert.onnx"
    import onnx

    onnx.save(build_bert(SPEC), source)
    proc = qdqc("compile", source, "--data", data, "--fallback-budget", "2", "-o", tmp_path / "fb.onnx")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("left in float:") == 2
    assert "% of the weight-GEMM multiply-adds" in proc.stdout
    ops = [n.op_type for n in onnx.load(tmp_path / "fb.onnx").graph.node]
    assert ops.count("MatMulIntegerToFloat") < 8


def test_target_cosine_takes_the_fewest_sites(tmp_path):
    from qdq_compiler.analyze import choose_fallback

    graph, data = calibrated(tmp_path)
    victim = activation_sites(graph)[2]
    victim.inputs[1].values = np.asarray(victim.inputs[1].values * 50)
    dataset = Dataset(data, model_inputs(graph))
    config = CalibrationConfig(progress=False)
    none, base, _ = choose_fallback(graph, dataset, config, target_cosine=0.0, samples=8)
    assert none == []
    chosen, reached, ranking = choose_fallback(graph, dataset, config, target_cosine=base + (1 - base) / 2, samples=8)
    assert chosen and chosen[0].quantizer == victim.name and reached > base and len(ranking) == 8
    capped, _, _ = choose_fallback(graph, dataset, config, target_cosine=1.0, budget=2, samples=8)
    assert len(capped) == 2


def test_html_report_is_self_contained(tmp_path):
    import onnx
    import pytest

    pytest.importorskip("matplotlib")
    source = tmp_path / "bert.onnx"
    onnx.save(build_bert(SPEC), source)
    data, evaluation = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(data, **example_inputs(SPEC, batch=12, seq=16, seed=3))
    np.savez(evaluation, **example_inputs(SPEC, batch=10, seq=16, seed=4))
    html = tmp_path / "report.html"
    proc = qdqc("report", source, "--data", data, "--eval", evaluation, "--fallback-budget", "1", "--html", html)
    assert proc.returncode == 0, proc.stderr
    text = html.read_text()
    assert "Settings" in text and "Sensitivity (worst first)" in text and "Fidelity on 10 evaluation samples" in text
    # cosine histogram + one per activation site of the output (the fallback excluded one of the 8)
    assert text.count("data:image/png;base64,") == 1 + 7
    assert "src=\"http" not in text and "<script" not in text  # nothing fetched from elsewhere
    proc = qdqc("report", source, "--data", data)
    assert proc.returncode == 2 and "--html" in proc.stderr
    proc = qdqc("compile", source, "--data", data, "--eval", evaluation)
    assert proc.returncode == 2 and "--html" in proc.stderr


def test_float_gemm_share(tmp_path):
    from qdq_compiler.analyze import float_gemm_share

    graph, _ = calibrated(tmp_path)
    sites = activation_sites(graph)
    qkv = next(q for q in sites if len(q.outputs[0].outputs[0].outputs[0].outputs) == 3)
    count, share = float_gemm_share(graph, [qkv])
    # hidden 64, FFN 256: Q, K, V are 3 * 64*64 of 4*64*64 + 2*64*256 multiply-adds
    assert count == 3 and abs(share - 3 * 64 * 64 / (4 * 64 * 64 + 2 * 64 * 256)) < 1e-9

import json

import numpy as np
import onnx

from qdq_compiler.bench import BenchConfig, Summary, interleaved, p90, parse_shapes, random_feeds
from qdq_compiler.synthetic import BertSpec, build_bert, example_inputs

from conftest import qdqc


def test_summary_statistics():
    summary = Summary("m", tuple(float(v) for v in range(1, 101)), batch=8)
    assert summary.stat("min") == 1 and summary.stat("max") == 100 and summary.stat("median") == 50.5
    assert abs(summary.stat("p90") - 90.1) < 1e-9 and abs(summary.throughput - 8000 / 50.5) < 1e-9
    assert p90(summary.latencies_ms) == summary.stat("p90")  # the tools report the same p90 as `qdqc bench`


def test_interleaved_runs_round_by_round_after_one_warm_up():
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3)
    assert calls == ["a", "b"] * 4  # warm-up, then three rounds
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for values in times.values() for t in values)


def test_shapes_and_random_feeds():
    assert parse_shapes("input_ids:2x16,attention_mask:2x16") == {"input_ids": (2, 16), "attention_mask": (2, 16)}
    inputs = [("input_ids", np.dtype(np.int64), ("batch", "sequence")),
              ("attention_mask", np.dtype(np.int64), ("batch", "sequence")),
              ("x", np.dtype(np.float32), (3, "n"))]
    feeds = random_feeds(inputs, BenchConfig(batch=4, sequence=16))
    assert feeds["input_ids"].shape == (4, 16) and feeds["attention_mask"].all()
    assert feeds["x"].shape == (3, 4) and feeds["x"].dtype == np.float32


def test_cli_compares_models_interleaved(tmp_path):
    spec = BertSpec(layers=1)
    small, big = tmp_path / "small.onnx", tmp_path / "big.onnx"
    onnx.save(build_bert(spec), small)
    onnx.save(build_bert(BertSpec(layers=3)), big)
    out = tmp_path / "bench.json"
    proc = qdqc("bench", small, big, "--iterations", "5", "--warmup", "1", "--seq", "16",
                "--sweep", "batch=1,2", "--json", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Throughput:") == 4 and proc.stdout.count("Median vs first model") == 2
    assert "percentile(99%)" in proc.stdout and "intra-op threads 2" in proc.stdout
    assert "Inputs: input_ids 2x16, attention_mask 2x16, token_type_ids 2x16" in proc.stdout  # what ran
    rows = json.loads(out.read_text())
    assert [(r["batch"], r["iterations"]) for r in rows] == [(1, 5), (1, 5), (2, 5), (2, 5)]
    data = tmp_path / "d.npz"
    np.savez(data, **example_inputs(spec, batch=2, seq=8))
    assert qdqc("bench", small, "--data", data, "--iterations", "3", "--batch", "2").returncode == 0
    proc = qdqc("bench", "--compare", small, big, "--iterations", "2", "--seq", "8")
    assert proc.returncode == 0 and proc.stdout.count("Throughput:") == 2
    assert "spinning off" in proc.stdout


def test_spin_lets_onnxruntime_threads_spin_within_a_run_only(bert_file):
    from qdq_compiler.bench import OrtRunner

    def entries(config):
        options = OrtRunner(bert_file, config).session.get_session_options()

        def entry(key):
            try:
                return options.get_session_config_entry(key)
            except Exception:   # onnxruntime raises for a key never set
                return None
        return {key: entry(key) for key in ("session.intra_op.allow_spinning", "session.force_spinning_stop")}

    assert entries(BenchConfig()) == {"session.intra_op.allow_spinning": "0", "session.force_spinning_stop": None}
    assert entries(BenchConfig(spin=True)) == {"session.intra_op.allow_spinning": "1",
                                               "session.force_spinning_stop": "1"}
    proc = qdqc("bench", bert_file, "--spin", "--iterations", "2", "--seq", "8")
    assert proc.returncode == 0 and "spinning within each run" in proc.stdout, proc.stderr


def test_cli_errors(tmp_path, bert_file):
    fake_engine = tmp_path / "model.plan"
    fake_engine.write_bytes(b"not an engine")
    proc = qdqc("bench", fake_engine)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and proc.stderr.startswith("qdqc: error:")
    proc = qdqc("bench", bert_file, "--shapes", "input_ids:axb")
    assert proc.returncode == 2 and "--shapes" in proc.stderr
    proc = qdqc("bench", bert_file, "--sweep", "threads=1")
    assert proc.returncode == 2 and "--sweep" in proc.stderr
    proc = qdqc("bench", bert_file, "--provider", "cuda", "--iterations", "1")
    assert proc.returncode == 2 and "onnxruntime here has only" in proc.stderr and "CPUExecutionProvider" in proc.stderr


def test_data_with_fewer_samples_than_the_batch_reports_the_batch_that_ran(tmp_path, bert_file):
    import pytest

    from qdq_compiler.bench import bench

    data = tmp_path / "d.npz"
    np.savez(data, **example_inputs(BertSpec(), batch=3, seq=8))
    with pytest.warns(UserWarning, match="holds only 3 samples"):
        (summary,) = bench([bert_file], BenchConfig(batch=64, iterations=2, warmup=0), data)
    assert summary.batch == 3
    assert abs(summary.throughput - 3000 / summary.stat("median")) < 1e-9   # 3 samples per run, not 64
    bad = tmp_path / "neg.npz"
    feeds = example_inputs(BertSpec(), batch=3, seq=8)
    feeds["input_ids"][1, 2] = -1
    np.savez(bad, **feeds)
    with pytest.raises(Exception, match="sample 1 has id -1"):   # the calibration data checks, not a bypass
        bench([bert_file], BenchConfig(batch=2, iterations=1, warmup=0), bad)


def test_a_slower_model_is_called_slower():
    from qdq_compiler.bench import _versus

    assert _versus(10.0, 8.0) == "Median vs first model: 1.25x faster"
    assert _versus(8.0, 10.0) == "Median vs first model: 1.25x slower"
    assert _versus(10.0, 10.04) == "Median vs first model: same speed (within 0.5%)"   # not "1.00x slower"
    assert _versus(10.0, 9.97) == "Median vs first model: same speed (within 0.5%)"
    assert _versus(10.0, 10.06) == "Median vs first model: 1.01x slower"

import hashlib
import json
import os

import onnx
import pytest

from qdq_compiler.synthetic import BertSpec, build_bert

from conftest import qdqc


def one_line_error(proc, code):
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qdqc: error:"), proc.stderr
    return lines[0]


def test_insert_writes_model_report_and_explains(tmp_path, bert_file):
    report = tmp_path / "sites.json"
    proc = qdqc("insert", bert_file, "--mode", "ft2", "--report", report, "--explain", "--verify")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "bert.qdq.onnx"
    assert out.exists() and "matched 2 encoder layers" in proc.stdout
    data = json.loads(report.read_text())
    assert data["mode"] == "ft2" and len(data["layers"]) == 2
    site = data["layers"][0]["sites"]["query.weight"]
    assert site["granularity"] == "per-tensor" and site["scale_group"] == "layer.0.qkv.weight"
    assert data["unmatched_gemms"] == []
    assert [p["pass"] for p in data["passes"]] == ["canonicalize", "decompose-fused", "split-gemm-bias",
                                                   "match-bert", "place-quantizers", "release-quantizers",
                                                   "insert-qdq", "record-plan"]
    created = data["created_nodes"]
    assert all(v["pass"] == "insert-qdq" for v in created.values()) and len(created) == 2 * 40
    assert qdqc("check", out).returncode == 0


def test_explain_prints_unmatched_gemms(tmp_path):
    import numpy as np
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(build_bert(BertSpec()))
    pooled = gs.Variable("pooled", dtype=np.float32)
    graph.nodes.append(gs.Node("MatMul", "head/MatMul", inputs=[graph.outputs[0], gs.Constant(
        "head.w", np.ones((64, 2), np.float32))], outputs=[pooled]))
    graph.outputs.append(pooled)
    path = tmp_path / "with_head.onnx"
    onnx.save(gs.export_onnx(graph), path)
    proc = qdqc("insert", path, "--explain")
    assert proc.returncode == 0, proc.stderr
    assert "unmatched head/MatMul: linear layer outside every matched encoder layer" in proc.stdout


def test_missing_file_is_a_usage_error(tmp_path):
    line = one_line_error(qdqc("insert", tmp_path / "nope.onnx"), 2)
    assert "nope.onnx" in line and "no such file" in line


def test_not_onnx_and_truncated_files_fail_cleanly(tmp_path, bert_file):
    text = tmp_path / "notes.onnx"
    text.write_text("hello\n" * 100)
    assert "notes.onnx" in one_line_error(qdqc("insert", text), 1)
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(bert_file.read_bytes()[:4000])
    assert "truncated" in one_line_error(qdqc("insert", truncated), 1)


def test_unsupported_opset(tmp_path):
    model = build_bert(BertSpec(norm="decomposed", opset=13))
    model.opset_import[0].version = 12
    path = tmp_path / "old.onnx"
    onnx.save(model, path)
    assert "opset 12" in one_line_error(qdqc("insert", path), 1)


def test_output_equal_to_input_is_refused_and_the_input_untouched(bert_file):
    digest = hashlib.sha256(bert_file.read_bytes()).hexdigest()
    assert "--overwrite" in one_line_error(qdqc("insert", bert_file, "-o", bert_file), 2)
    assert hashlib.sha256(bert_file.read_bytes()).hexdigest() == digest
    proc = qdqc("insert", bert_file, "-o", bert_file, "--overwrite")
    assert proc.returncode == 0
    assert sum(n.op_type == "QuantizeLinear" for n in onnx.load(bert_file).graph.node) == 28


def test_unwritable_output(tmp_path, bert_file):
    line = one_line_error(qdqc("insert", bert_file, "-o", tmp_path / "no" / "such" / "dir.onnx"), 1)
    assert "does not exist" in line
    if os.geteuid() != 0:  # root ignores directory permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "cannot write" in one_line_error(qdqc("insert", bert_file, "-o", locked / "m.onnx"), 1)


def test_bad_mode_is_a_usage_error(bert_file):
    proc = qdqc("insert", bert_file, "--mode", "ft9")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr


def test_check_exits_non_zero_on_violations(tmp_path, bert_file):
    import numpy as np
    import onnx_graphsurgeon as gs

    assert qdqc("insert", bert_file).returncode == 0
    graph = gs.import_onnx(onnx.load(tmp_path / "bert.qdq.onnx"))
    q = next(n for n in graph.nodes if n.op == "QuantizeLinear")
    q.inputs[2] = gs.Constant("bad", np.array(5, np.int8))
    bad = tmp_path / "bad.onnx"
    onnx.save(gs.export_onnx(graph), bad)
    proc = qdqc("check", bad, "--json", tmp_path / "v.json")
    assert proc.returncode == 1
    assert f"{q.name}: [zero-point]" in proc.stdout
    assert json.loads((tmp_path / "v.json").read_text())[0]["rule"] == "zero-point"


@pytest.mark.parametrize("argv,word", [(["compile", "m.onnx", "--percentile", "abc"], "--percentile"),
                                       (["bogus"], "invalid choice"), ([], "COMMAND"),
                                       (["calibrate", "merge"], "states")])
def test_a_bad_command_line_is_one_line(argv, word):
    proc = qdqc(*argv)
    assert proc.returncode == 2 and word in proc.stderr and "usage:" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1

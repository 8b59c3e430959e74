"""The default recipe on the real all-MiniLM-L6-v2: text -> calibration_data -> compile with no options
beats every other row of the README's calibration table and measures what its default compile row
says, on the shipped evaluation sentences."""
import re

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import qdq_compiler  # noqa: E402
from qdq_compiler.cpu import host  # noqa: E402
from qdq_compiler.evaluate import cosines, embeddings, exact_integer_kernels, open_session  # noqa: E402
from qdq_compiler.hf_export import corpus, export, minilm_dir  # noqa: E402

from conftest import ROOT  # noqa: E402


def readme_rows() -> dict[str, tuple[float, float]]:
    """The README's calibration table (`### Measured`): label -> (cos mean, cos min)."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| calibration | cos mean | cos min |"):]
    table = table[:table.index("\n\n")]
    rows = {}
    for line in table.splitlines()[2:]:
        label, mean, low = (cell.strip().strip("*") for cell in line.strip("|").split("|"))
        rows[label] = (float(mean), float(low))
    return rows


@pytest.mark.slow
def test_default_compile_reaches_the_best_row_of_the_readme(tmp_path, capsys):
    model = export("minilm", tmp_path / "minilm.onnx", exporter="torchscript", opset=17)
    tokenizer = minilm_dir()
    evaluation = qdq_compiler.calibration_data(corpus("evaluation"), tokenizer)
    data = qdq_compiler.calibration_data(corpus("calibration"), tokenizer)
    reference = embeddings(open_session(model), evaluation)

    def fidelity(result):
        model = result.model   # the VNNI form on a CPU without VNNI: its exact-kernel model, as a VNNI CPU runs it
        if result.report["options"]["isa"] == "vnni" and not host().vnni:
            model = exact_integer_kernels(model)
        found = cosines(reference, embeddings(open_session(model), evaluation))
        return round(float(found.mean()), 4), round(float(found.min()), 4)

    default = qdq_compiler.compile(model, data, quiet=True)
    assert default.report["options"] == {"mode": "ft1", "target": "onnxruntime", "method": "percentile",
                                         "percentile": 99.999, "smooth": "auto", "weights": "gptq",
                                         "split": True, "weight_bits": 7, "isa": "portable"}
    assert default.report["check"]["passed"]
    vnni = qdq_compiler.compile(model, data, isa="vnni", quiet=True, check=host().vnni)   # the 8-bit grid
    pytorch_quantization = qdq_compiler.compile(model, data, smooth="off", method="percentile", percentile=99.99,
                                                weights="nearest", split=False, quiet=True)
    measured = {"default": fidelity(default), "vnni": fidelity(vnni),
                "pytorch-quantization": fidelity(pytorch_quantization)}
    with capsys.disabled():
        print(f"\nMiniLM, 1000 evaluation sentences (cos mean, cos min): {measured}")
    rows = readme_rows()
    others = [row for label, row in rows.items() if not re.search(r"\bdefault\b", label)]
    best = max(others)   # the highest mean cosine of a recipe other than the default
    # the recipe beats every other on the same (8-bit) grid; the portable compile pays for its 7-bit weights
    assert measured["vnni"][0] >= best[0] and measured["vnni"][1] >= best[1], (measured, rows)
    assert measured["default"][0] > measured["pytorch-quantization"][0]
    label = next(label for label, row in rows.items() if row == max(rows.values()))
    assert re.search(r"\bdefault\b", label), f"the README's best row '{label}' is not marked as the default"
    printed = next(row for label, row in rows.items() if label.startswith("default compile ("))
    assert measured["default"] == pytest.approx(printed, abs=3e-4), "the README's default compile row is stale"
    printed = next(row for label, row in rows.items() if label.startswith("default compile --isa vnni"))
    assert measured["vnni"] == pytest.approx(printed, abs=3e-4), "the README's --isa vnni row is stale"

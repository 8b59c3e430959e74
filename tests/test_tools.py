"""The measurement tools' own model surgery (tools/ is not a package: imported by path)."""
import sys

import numpy as np

from qdq_compiler import ir
from qdq_compiler.synthetic import BertSpec, build_bert, example_inputs

from conftest import ROOT, calibrated_bert, cosine, run_model

sys.path.insert(0, str(ROOT / "tools"))


def test_finer_activation_quantizers_keep_the_range_and_lower_the_error(tmp_path):
    from eval_bits import finer

    spec = BertSpec(layers=2)
    graph, _ = calibrated_bert(tmp_path, spec)
    model = ir.to_model(graph)
    feeds = example_inputs(spec, batch=4, seq=16, seed=9)
    reference = run_model(build_bert(spec), feeds)[0]
    activations = sum(n.op == "QuantizeLinear" and not ir.is_constant(n.inputs[0]) for n in graph.nodes)
    errors = {}
    for bits in (1, 3):
        finer_model, changed = finer(model, bits, None)
        assert changed == activations   # every per-tensor activation quantizer, the weights' untouched
        errors[bits] = 1 - cosine(run_model(finer_model, feeds)[0], reference)
    assert errors[3] < errors[1] < 1 - cosine(run_model(model, feeds)[0], reference)
    only, changed = finer(model, 1, {"softmax.output"})
    assert changed == spec.layers
    fine = [n for n in ir.from_model(only).nodes if n.op == "QuantizeLinear" and n.outputs[0].dtype == np.int16]
    assert len(fine) == spec.layers and all(ir.producer(n.inputs[0]).op == "Clip" for n in fine)

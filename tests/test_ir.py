import hashlib
import random

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from qdq_compiler import ir
from qdq_compiler.errors import ModelError, QdqcError, UsageError
from qdq_compiler.synthetic import BertSpec, build_bert, example_inputs

from conftest import run_model


def chain(length: int) -> gs.Graph:
    x = gs.Variable("x", dtype=np.float32, shape=[1, 4])
    tensors = [x]
    nodes = []
    for i in range(length):
        out = gs.Variable(f"t{i}", dtype=np.float32, shape=[1, 4])
        nodes.append(gs.Node("Relu", f"relu{i}", inputs=[tensors[-1]], outputs=[out]))
        tensors.append(out)
    return gs.Graph(nodes=nodes, inputs=[x], outputs=[tensors[-1]], opset=17)


def test_toposort_is_iterative_and_sorts_a_deep_shuffled_chain():
    graph = chain(3000)  # gs.Graph.toposort recurses and overflows near 500
    random.Random(0).shuffle(graph.nodes)
    ir.toposort(graph)
    assert [n.name for n in graph.nodes] == [f"relu{i}" for i in range(3000)]


def test_toposort_keeps_the_original_order_of_independent_nodes():
    x = gs.Variable("x", dtype=np.float32, shape=[2])
    outs = [gs.Variable(f"o{i}", dtype=np.float32, shape=[2]) for i in range(5)]
    nodes = [gs.Node("Relu", f"n{i}", inputs=[x], outputs=[outs[i]]) for i in (3, 1, 4, 0, 2)]
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=outs, opset=17)
    ir.toposort(graph)
    assert [n.name for n in graph.nodes] == ["n3", "n1", "n4", "n0", "n2"]


def test_toposort_reports_a_cycle():
    a, b = gs.Variable("a", dtype=np.float32), gs.Variable("b", dtype=np.float32)
    graph = gs.Graph(nodes=[gs.Node("Relu", "r1", inputs=[a], outputs=[b]),
                            gs.Node("Relu", "r2", inputs=[b], outputs=[a])], opset=17)
    with pytest.raises(QdqcError, match="cycle"):
        ir.toposort(graph)


def test_names_are_unique_and_deterministic():
    graph = chain(2)
    names = ir.Names(graph)
    assert [names.fresh("t0"), names.fresh("t0"), names.fresh("new")] == ["t0_1", "t0_2", "new"]


def test_save_round_trip_is_atomic_and_leaves_no_temp_files(tmp_path):
    model = build_bert(BertSpec())
    graph = gs.import_onnx(model)
    out = ir.save(graph, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    written = onnx.load(out)
    onnx.checker.check_model(written, full_check=True)
    values = {t.name: onnx.numpy_helper.to_array(t) for t in written.graph.initializer}
    for tensor in model.graph.initializer:
        np.testing.assert_array_equal(values[tensor.name], onnx.numpy_helper.to_array(tensor))
    feeds = example_inputs(BertSpec())
    np.testing.assert_allclose(run_model(out, feeds)[0], run_model(model, feeds)[0], rtol=1e-6, atol=1e-6)


def test_models_past_the_threshold_are_saved_with_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(ir, "EXTERNAL_DATA_THRESHOLD", 1024)
    model = build_bert(BertSpec())
    out = ir.save(gs.import_onnx(model), tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size > (tmp_path / "big.onnx").stat().st_size
    feeds = example_inputs(BertSpec())
    reloaded = ir.load(out)
    np.testing.assert_allclose(run_model(reloaded, feeds)[0], run_model(model, feeds)[0], rtol=1e-6, atol=1e-6)


def test_save_refuses_to_overwrite_the_input(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(build_bert(BertSpec()), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(UsageError, match="overwrite"):
        ir.save(ir.load(path), path, source=path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        ir.load(tmp_path / "missing.onnx")
    text = tmp_path / "text.onnx"
    text.write_text("this is not a protobuf at all, just words\n" * 10)
    with pytest.raises(ModelError, match="text.onnx"):
        ir.load(text)
    good = tmp_path / "good.onnx"
    onnx.save(build_bert(BertSpec()), good)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ModelError, match="truncated"):
        ir.load(truncated)


def test_load_rejects_old_opsets(tmp_path):
    node = helper.make_node("Relu", ["x"], ["y"], name="r")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "old.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), path)
    with pytest.raises(ModelError, match="opset 11"):
        ir.load(path)


def test_annotate_shapes_types_intermediate_tensors_without_touching_weights():
    graph = gs.import_onnx(build_bert(BertSpec()))
    weights_before = {n: t.values.copy() for n, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    typed = ir.annotate_shapes(graph)
    assert typed > 20
    tensors = graph.tensors()
    for name, values in weights_before.items():
        assert isinstance(tensors[name], gs.Constant)
        np.testing.assert_array_equal(tensors[name].values, values)
    softmax = next(n for n in graph.nodes if n.op == "Softmax")
    assert softmax.outputs[0].dtype == np.float32 and len(softmax.outputs[0].shape) == 4

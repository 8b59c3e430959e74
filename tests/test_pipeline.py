import numpy as np
import onnx_graphsurgeon as gs
import pytest

from qdq_compiler import pipeline
from qdq_compiler.errors import PassError
from qdq_compiler.pipeline import PassContext, PassResult, register, run_pipeline

from conftest import graph_of


def test_registration_refuses_duplicates_and_returns_the_function():
    def noop(graph, ctx):
        return PassResult(False)

    assert register("test-noop-unique")(noop) is noop
    with pytest.raises(ValueError, match="already registered"):
        register("test-noop-unique")(noop)


def test_unknown_pass_names_the_known_ones():
    with pytest.raises(Exception, match="unknown pass 'nope'.*canonicalize"):
        run_pipeline(graph_of(), ("nope",), PassContext(None))


def test_records_summarise_each_pass():
    graph = graph_of()
    records = run_pipeline(graph, pipeline.PIPELINES["canonicalize"], PassContext(None), verify=True)
    assert [r.name for r in records] == ["canonicalize"]
    assert records[0].stats["identities_removed"] == 1  # the Identity naming the graph output
    assert graph.outputs[0].name == "last_hidden_state" and graph.outputs[0].inputs[0].op == "LayerNormalization"
    assert records[0].stats["tensors_typed"] > 0
    assert records[0].to_json()["pass"] == "canonicalize"


@register("test-break-graph")
def _break(graph: gs.Graph, ctx):
    dangling = gs.Variable("dangling", dtype=np.float32, shape=[1])
    graph.nodes.append(gs.Node("Relu", "reads_nothing_produced", inputs=[dangling],
                               outputs=[gs.Variable("y_broken", dtype=np.float32)]))
    return PassResult(True)


@register("test-raise")
def _raise(graph, ctx):
    raise KeyError("boom")


def test_verify_names_the_failing_pass_and_the_ones_before():
    with pytest.raises(PassError, match=r"after pass 'test-break-graph'.*before it: canonicalize"):
        run_pipeline(graph_of(), ("canonicalize", "test-break-graph"), PassContext(None), verify=True)


def test_an_exception_inside_a_pass_is_reported_with_its_name():
    with pytest.raises(PassError, match=r"pass 'test-raise' failed \(KeyError"):
        run_pipeline(graph_of(), ("test-raise",), PassContext(None))

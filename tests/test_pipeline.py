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


# ---------------------------------------------------------------- the pass contract

def test_a_pass_run_before_what_it_needs_names_the_pass_that_provides_it():
    from qdq_compiler.config import InsertConfig

    with pytest.raises(PassError, match=r"^place-quantizers needs match-bert; passes run before it: canonicalize$"):
        run_pipeline(graph_of(), ("canonicalize", "place-quantizers"), PassContext(InsertConfig()))
    with pytest.raises(PassError, match=r"^insert-qdq needs place-quantizers"):
        run_pipeline(graph_of(), ("match-bert", "insert-qdq"), PassContext(InsertConfig()))


def test_a_graph_property_is_checked_on_the_graph_itself():
    from qdq_compiler.lower import LowerConfig

    with pytest.raises(PassError, match=r"^lower-onnxruntime needs Q/DQ pairs in the graph \(run qdqc insert"):
        run_pipeline(graph_of(), ("lower-onnxruntime",), PassContext(LowerConfig()))


def test_analyses_computed_outside_passes_are_named():
    with pytest.raises(PassError, match=r"^smooth-gemm-inputs needs per-channel activation maxima"):
        run_pipeline(graph_of(), ("smooth-gemm-inputs",), PassContext(None))


def test_every_registered_requirement_has_a_provider():
    from qdq_compiler.pipeline import EXTERNAL_ANALYSES, PROPERTIES, get_spec

    get_spec("canonicalize")   # imports every pass
    provided = {p for spec in pipeline._REGISTRY.values() for p in spec.provides}
    for spec in pipeline._REGISTRY.values():
        for requirement in spec.requires:
            assert requirement in provided | set(PROPERTIES) | set(EXTERNAL_ANALYSES), (spec.name, requirement)


def test_the_named_pipelines_satisfy_their_own_contracts():
    """Each pipeline's analyses are provided by an earlier pass of the same pipeline."""
    from qdq_compiler.pipeline import PIPELINES, PROPERTIES, get_spec

    for name, passes in PIPELINES.items():
        available: set[str] = set()
        for pass_name in passes:
            spec = get_spec(pass_name)
            assert set(spec.requires) - set(PROPERTIES) <= available, (name, pass_name)
            available |= set(spec.provides)


def test_settings_belong_to_the_pass():
    from qdq_compiler.config import InsertConfig
    from qdq_compiler.lower import LowerConfig
    from qdq_compiler.passes.split_gemm_bias import SplitGemmBiasSettings
    from qdq_compiler.passes.to_fp16 import Fp16Settings

    assert PassContext(InsertConfig("ft2")).settings(SplitGemmBiasSettings).split
    assert not PassContext(InsertConfig("ft1")).settings(SplitGemmBiasSettings).split
    assert PassContext(LowerConfig("tensorrt", keep_fp32="Softmax")).settings(Fp16Settings).keep_fp32 == {"Softmax"}
    assert LowerConfig("onnxruntime", keep_fp32=[]).keep_fp32 == frozenset()   # nothing asked: nothing refused
    assert PassContext(Fp16Settings(frozenset())).settings(Fp16Settings).keep_fp32 == frozenset()
    assert PassContext(None).settings(Fp16Settings) == Fp16Settings()


def test_modified_is_false_when_an_analysis_or_a_rewrite_changes_nothing(tmp_path):
    """report-mha and to-fp16 said True whatever happened."""
    import onnx

    from conftest import calibrated_bert
    from qdq_compiler.lower import LowerConfig

    graph, _ = calibrated_bert(tmp_path)
    ctx = PassContext(LowerConfig("tensorrt"))
    run_pipeline(graph, ("canonicalize",), ctx)
    records = run_pipeline(graph, ("report-mha", "report-mha", "to-fp16"), ctx, verify=True)
    assert [r.modified for r in records] == [False, False, True]
    assert records[0].stats["attention_blocks_quantized"] == 2
    # nothing in float: to-fp16 has nothing to convert
    integers = gs.import_onnx(onnx.parser.parse_model(
        '<ir_version: 9, opset_import: ["" : 19]> g (int64[2] x) => (int64[2] y) { y = Add(x, x) }'))
    (record,) = run_pipeline(integers, ("to-fp16",), PassContext(LowerConfig("tensorrt")), verify=True)
    assert not record.modified and record.stats["fp16_nodes"] == 0

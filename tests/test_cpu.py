"""Integer kernels on every CPU: the pair bound, the numpy models of x86's kernels, and the real
non-VNNI kernels under `qemu-x86_64 -cpu Haswell` (AVX2, no AVX-512, no VNNI) whatever the host."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from qdq_compiler.cpu import (PAIR_LIMIT, HostCpu, Isa, arrange_rows, arranged, matmul_u8s8, overflowing_pairs,
                              parse_cpuinfo)

SCRIPTS = Path(__file__).parent / "isa_scripts"
QEMU = shutil.which("qemu-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None or sys.platform != "linux",
                                reason="qemu-user (Debian's qemu-user; tools/run_tests.sh installs it)")

int8_weights = arrays(np.int8, st.tuples(st.integers(1, 9), st.integers(1, 5)), elements=st.integers(-128, 127))


def fitted(q):
    """q's rows arranged (and split) by `arrange_rows`, or q itself when its order fits."""
    plan = arrange_rows(q)
    return (q, np.arange(len(q))) if plan is None else (arranged(q, *plan), plan[0])


@given(int8_weights)
@settings(max_examples=300, deadline=None)
def test_arranged_rows_never_overflow_and_sum_to_the_same_products(q):
    weights, rows = fitted(q)
    assert weights.dtype == np.int8 and not overflowing_pairs(weights, 0).any()
    assert len(rows) <= 2 * len(q) and set(rows.tolist()) == set(range(len(q)))
    a = np.random.default_rng(0).integers(0, 256, (3, len(q)))
    np.testing.assert_array_equal(a[:, rows] @ weights.astype(np.int64), a @ q.astype(np.int64))


@given(st.integers(1, 6), st.integers(1, 40), st.integers(1, 4), st.integers(0, 2**31))
@settings(max_examples=60, deadline=None)
def test_the_saturating_model_is_exact_for_arranged_rows(rows, depth, width, seed):
    rng = np.random.default_rng(seed)
    a = rng.choice(np.array([0, 1, 254, 255], np.uint8), (rows, depth))   # the extremes, where sums saturate
    q = rng.integers(-128, 128, (depth, width)).astype(np.int8)
    weights, order = fitted(q)
    np.testing.assert_array_equal(matmul_u8s8(a[:, order], weights, saturating=True),
                                  matmul_u8s8(a, q, saturating=False))


def test_the_saturating_model_clips_each_pair_at_int16():
    a = np.full((1, 4), 255, np.uint8)
    b = np.array([[127], [127], [-128], [-128]], np.int8)   # pairs (127, 127) and (-128, -128)
    assert matmul_u8s8(a, b, saturating=False)[0, 0] == 255 * (254 - 256)
    assert matmul_u8s8(a, b, saturating=True)[0, 0] == 32767 - 32768
    assert overflowing_pairs(b, 0).tolist() == [[True], [True]]
    assert overflowing_pairs(np.array([[127], [1]], np.int8), 0).tolist() == [[False]]   # 128: the bound itself
    assert overflowing_pairs(np.array([[127], [-128]], np.int8), 0).tolist() == [[False]]   # opposite signs
    assert PAIR_LIMIT * 255 <= 32767 < (PAIR_LIMIT + 1) * 255


@pytest.mark.parametrize("text, arch, vnni, shown", [
    ("model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx avx2 fma\n", "x86_64", False, "avx2"),
    ("model name\t: AMD EPYC\nflags\t\t: avx2 avx512f avx512bw avx512_vnni avx512_bf16\n", "x86_64", True,
     "avx2 avx512 vnni bf16"),
    ("model name\t: Intel Xeon\nflags\t\t: avx2 avx512f avx512bw avx512_vnni amx_int8 amx_bf16\n", "x86_64", True,
     "avx2 avx512 vnni amx bf16"),
    ("model name\t: Intel Core\nflags\t\t: avx2 avx_vnni\n", "x86_64", True, "avx2 vnni"),
    ("processor\t: 0\nFeatures\t: fp asimd asimddp i8mm bf16\nCPU part\t: 0xd0c\n", "aarch64", True,
     "neon dotprod i8mm bf16"),
    ("processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\nCPU part\t: 0xd08\n", "aarch64", False, "neon"),
])
def test_the_host_cpu_and_its_features_are_read_from_cpuinfo(text, arch, vnni, shown):
    cpu = parse_cpuinfo(text, arch)
    assert cpu.vnni is vnni and cpu.supports(Isa.VNNI) is vnni and cpu.supports(Isa.PORTABLE)
    assert cpu.describe().endswith(f"({arch}: {shown})")
    assert cpu.to_json()["arch"] == arch


def haswell(script: str, *args) -> subprocess.CompletedProcess:
    """`script` run by this Python under qemu's Haswell: AVX2 and FMA, no AVX-512, no VNNI."""
    return subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, str(SCRIPTS / script), *map(str, args)],
                          capture_output=True, text=True, timeout=900)


@needs_qemu
def test_haswell_kernels_saturate_full_pairs_and_compute_the_portable_forms_exactly(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.choice(np.array([0, 1, 2, 253, 254, 255], np.uint8), (48, 64))   # |x| near 128: the worst case
    full = rng.integers(-128, 128, (64, 32)).astype(np.int8)
    key = rng.integers(-128, 128, (64, 40)).astype(np.int8)
    paired, order = fitted(full)
    assert len(order) > len(full)   # full-range random weights: some rows split
    np.savez(tmp_path / "in.npz", a=a, full=full, paired=paired, order=order, key=key)
    done = haswell("kernels.py", tmp_path / "in.npz", tmp_path / "out.npz")
    assert done.returncode == 0, done.stderr[-2000:]
    got = dict(np.load(tmp_path / "out.npz"))
    centred = a.astype(np.int64) - 128

    def exact(b):
        return centred @ b.astype(np.int64)

    # onnxruntime's U8S8 kernel on AVX2 is the saturating model bit for bit (MLAS subtracts the zero point
    # after the int16 pair sums): wrong for full-range pairs, exact for arranged ones
    saturated = matmul_u8s8(a, full, saturating=True) - 128 * full.astype(np.int64).sum(axis=0)
    np.testing.assert_array_equal(got["ort_linear_0"], saturated)
    assert np.abs(got["ort_linear_0"] - exact(full)).max() > 1000
    np.testing.assert_array_equal(got["ort_linear_1"], exact(full))
    assert np.abs(got["ort_attention_s8"] - exact(key)).max() > 1000    # the VNNI form's attention
    np.testing.assert_array_equal(got["ort_attention_u8"], exact(key))   # U8U8: the portable form's
    if "ov_linear_0" in got:   # OpenVINO (oneDNN) pairs the same reduction indices
        assert np.abs(got["ov_linear_0"] - exact(full)).max() > 1000
        np.testing.assert_array_equal(got["ov_linear_1"], exact(full))
        assert np.abs(got["ov_attention_s8"] - exact(key)).max() > 1000   # int8 x int8: the VNNI form
        np.testing.assert_array_equal(got["ov_attention_u8"], exact(key))  # uint8 x int8: the portable form


def test_a_vnni_model_is_refused_on_a_cpu_without_vnni(monkeypatch):
    import onnx

    from qdq_compiler import cpu, lowered_check
    from qdq_compiler.errors import UsageError

    model = onnx.ModelProto()
    model.metadata_props.add(key=cpu.ISA_KEY, value="vnni")
    avx2 = HostCpu("AMD EPYC 7B13", "x86_64", frozenset({"avx2", "fma"}))
    monkeypatch.setattr(lowered_check, "host", lambda: avx2)
    with pytest.raises(UsageError, match=r"lowered with --isa vnni, which this CPU lacks \(AMD EPYC 7B13 "
                                         r"\(x86_64: avx2\)\)"):
        lowered_check.require_host_isa(model, "m.onnx")
    monkeypatch.setattr(lowered_check, "host", lambda: HostCpu("Xeon", "x86_64", frozenset({"avx512_vnni"})))
    lowered_check.require_host_isa(model, "m.onnx")   # accepted where the kernels are exact


def calibrated_on(tmp_path, spec, bits: int):
    """A synthetic BERT inserted and max-calibrated on a `bits`-bit weight grid (7: compile's CPU default,
    attention's second operands 7-bit too)."""
    from qdq_compiler.calibrate import CalibrationConfig, calibrate, model_inputs, set_weight_bits
    from qdq_compiler.config import InsertConfig
    from qdq_compiler.data import Dataset
    from qdq_compiler.insert import insert
    from qdq_compiler.synthetic import example_inputs

    from conftest import graph_of

    graph = graph_of(spec)
    insert(graph, InsertConfig("ft1"))
    set_weight_bits(graph, bits)
    np.savez(tmp_path / "calib.npz", **example_inputs(spec, batch=16, seq=16, seed=4))
    calibrate(graph, Dataset(tmp_path / "calib.npz", model_inputs(graph)), CalibrationConfig("max", progress=False))
    return graph


@needs_qemu
@pytest.mark.parametrize("bits", [7, 8])
@pytest.mark.parametrize("target", ["onnxruntime", "openvino"])
def test_the_portable_lowering_is_the_fake_quant_model_on_haswell_and_the_vnni_form_is_not(tmp_path, target, bits):
    """A BERT with full-range random weights (many overflowing pairs at 8 bits) and padded keys, lowered
    both ways and run under qemu's Haswell: the portable form computes the fake-quant model (7-bit grids
    as they are; 8-bit weights rearranged, 8-bit attention operands as uint8), the VNNI form does not."""
    from qdq_compiler import ir
    from qdq_compiler.api import Result
    from qdq_compiler.evaluate import open_session
    from qdq_compiler.lower import LowerConfig, lower
    from qdq_compiler.synthetic import BertSpec, example_inputs

    from conftest import calibrated_bert, cosine

    pytest.importorskip("openvino") if target == "openvino" else None
    spec = BertSpec(layers=2)
    graph = calibrated_bert(tmp_path, spec)[0] if bits == 8 else calibrated_on(tmp_path, spec, bits)
    feeds = example_inputs(spec, batch=4, seq=16, seed=3)
    feeds["attention_mask"][1:, 9:] = 0
    np.savez(tmp_path / "feeds.npz", **feeds)
    session = open_session(ir.to_model(graph), optimize=False)   # Q/DQ as float arithmetic
    reference = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]
    keep = feeds["attention_mask"].astype(bool)
    found = {}
    for isa in ("portable", "vnni") if bits == 8 else ("portable",):   # 7-bit grids fit either way
        lowered = graph.copy()
        lower(lowered, LowerConfig(target, isa=isa))
        path = tmp_path / f"{isa}.{'xml' if target == 'openvino' else 'onnx'}"
        Result(lowered, {}).save(path)
        done = haswell("run_model.py", path, tmp_path / "feeds.npz", tmp_path / f"{isa}.npz")
        assert done.returncode == 0, done.stderr[-2000:]
        output = np.load(tmp_path / f"{isa}.npz")["output"]
        found[isa] = min(cosine(output[i][keep[i]], reference[i][keep[i]]) for i in range(len(keep)))
    if target == "onnxruntime":   # integer GEMMs and float ops alike as on the host
        assert found["portable"] >= 0.9999 and found.get("vnni", 0) < 0.999, found
    else:   # OpenVINO's AVX2 erf differs from its AVX-512 one by an ulp, which flips a re-quantizer or two
        assert found["portable"] >= 0.9998, found
        assert bits == 7 or 1 - found["vnni"] > 5 * (1 - found["portable"]), found


ARM64 = Path(__file__).resolve().parents[1] / ".arm64" / "run"
needs_arm64 = pytest.mark.skipif(not ARM64.exists() or QEMU is None,
                                 reason="the aarch64 sandbox (tools/arm64_env.sh; tools/run_tests.sh builds it)")


@needs_arm64
@pytest.mark.parametrize("cpu", ["max", "cortex-a72"])   # with dot products (ARMv8.4+), and without (A72)
def test_the_portable_lowering_is_the_fake_quant_model_on_arm64(tmp_path, cpu):
    """onnxruntime's aarch64 build under qemu-aarch64: both ARM kernel paths compute the portable lowering
    (7-bit weights, uint8 attention operands) as the fake-quant model does."""
    import os

    from qdq_compiler import ir
    from qdq_compiler.api import Result
    from qdq_compiler.evaluate import open_session
    from qdq_compiler.lower import LowerConfig, lower
    from qdq_compiler.synthetic import BertSpec, example_inputs

    from conftest import cosine

    spec = BertSpec(layers=2)
    graph = calibrated_on(tmp_path, spec, 7)
    feeds = example_inputs(spec, batch=4, seq=16, seed=3)
    feeds["attention_mask"][1:, 9:] = 0
    np.savez(tmp_path / "feeds.npz", **feeds)
    session = open_session(ir.to_model(graph), optimize=False)
    reference = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]
    lowered = graph.copy()
    records = {r.name: dict(r.stats) for r in lower(lowered, LowerConfig("onnxruntime"))}
    assert records["pair-weight-rows"]["inputs_gathered"] == 0   # 7-bit pairs fit as they are
    Result(lowered, {}).save(tmp_path / "portable.onnx")
    done = subprocess.run([str(ARM64), str(SCRIPTS / "run_model.py"), str(tmp_path / "portable.onnx"),
                           str(tmp_path / "feeds.npz"), str(tmp_path / "out.npz")],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "QEMU_CPU": cpu})
    assert done.returncode == 0, done.stderr[-2000:]
    output = np.load(tmp_path / "out.npz")["output"]
    keep = feeds["attention_mask"].astype(bool)
    assert min(cosine(output[i][keep[i]], reference[i][keep[i]]) for i in range(len(keep))) >= 0.9999


def test_the_check_names_the_first_integer_gemm_a_kernel_got_wrong(tmp_path, monkeypatch):
    """A kernel that saturates (simulated: one GEMM's output off by a few steps) fails the check, which
    names that GEMM, while the same model with exact kernels passes."""
    from qdq_compiler import ir, lowered_check
    from qdq_compiler.errors import ModelError
    from qdq_compiler.lower import LowerConfig, lower
    from qdq_compiler.synthetic import BertSpec, example_inputs

    from conftest import calibrated_bert

    spec = BertSpec(layers=2)
    graph, _ = calibrated_bert(tmp_path, spec)
    fake = ir.to_model(graph)
    lower(graph, LowerConfig("onnxruntime"))
    lowered = ir.to_model(graph)
    feeds = example_inputs(spec, batch=4, seq=16, seed=3)
    feeds["attention_mask"][1:, 9:] = 0
    assert lowered_check.check(fake, lowered, "onnxruntime", feeds).passed
    target = [n for n in lowered.graph.node if n.op_type == "MatMulIntegerToFloat"][5]
    real = lowered_check._runner

    def saturating(model, runtime):
        run = real(model, runtime)

        def wrong(given):
            found = run(given)
            if target.output[0] in found:
                found[target.output[0]] = found[target.output[0]] * np.float32(0.9)
            return found
        return wrong

    monkeypatch.setattr(lowered_check, "_runner", saturating)
    result = lowered_check.check(fake, lowered, "onnxruntime", feeds)
    assert not result.passed and result.worst_gemm > 0.05
    assert result.first_divergence.startswith(f"integer GEMM {target.name} ")
    with pytest.raises(ModelError, match=f"it starts at integer GEMM {target.name}.*--no-check skips this check"):
        lowered_check.enforce(result)


def test_compile_prints_the_check_and_no_check_skips_it(tmp_path, bert_file):
    from conftest import qdqc

    data = tmp_path / "calib.npz"
    from qdq_compiler.synthetic import BertSpec, example_inputs

    np.savez(data, **example_inputs(BertSpec(), batch=8, seq=16, seed=1))
    done = qdqc("compile", bert_file, "--data", data, "-o", tmp_path / "out.onnx")
    assert done.returncode == 0, done.stderr
    line = next(l for l in done.stdout.splitlines() if l.startswith("check: "))
    assert "lowered vs fake-quant on 8 calibration samples, onnxruntime on " in line and line.endswith(": ok")
    done = qdqc("compile", bert_file, "--data", data, "-o", tmp_path / "quick.onnx", "--no-check")
    assert done.returncode == 0 and "check: " not in done.stdout
    done = qdqc("compile", bert_file, "--data", data, "-o", tmp_path / "x.onnx", "--isa", "vnni", "--target", "tensorrt")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--isa vnni picks CPU integer kernels" in done.stderr


@needs_qemu
def test_a_vnni_model_is_refused_by_bench_on_haswell_and_a_portable_one_runs(tmp_path):
    """The ISA is read as the executing CPU reports it (numpy's probe), so under qemu's Haswell too."""
    from qdq_compiler import ir
    from qdq_compiler.api import Result
    from qdq_compiler.lower import LowerConfig, lower
    from qdq_compiler.synthetic import BertSpec

    from conftest import calibrated_bert

    graph, _ = calibrated_bert(tmp_path, BertSpec(layers=1))
    for isa in ("vnni", "portable"):
        lowered = graph.copy()
        lower(lowered, LowerConfig("onnxruntime", isa=isa))
        Result(lowered, {}).save(tmp_path / f"{isa}.onnx")
    run = [QEMU, "-cpu", "Haswell", sys.executable, "-m", "qdq_compiler.cli", "bench", "--iterations", "1", "--seq", "8"]
    done = subprocess.run(run + [str(tmp_path / "vnni.onnx")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    error = [line for line in done.stderr.splitlines() if not line.startswith("qemu-x86_64: warning")]
    assert len(error) == 1 and "lowered with --isa vnni, which this CPU lacks" in error[0] and "(x86_64: avx2)" in error[0]
    done = subprocess.run(run + [str(tmp_path / "portable.onnx")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "CPU: " in done.stdout and "(x86_64: avx2)" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("bits", [6, 7.0, "7", True])
def test_weight_bits_other_than_7_or_8_are_refused_in_one_line(bits):
    import qdq_compiler
    from qdq_compiler.errors import UsageError
    from qdq_compiler.synthetic import BertSpec, build_bert, example_inputs

    spec = BertSpec(layers=1)
    with pytest.raises(UsageError, match=r"--weight-bits .*: expected 7 or 8"):
        qdq_compiler.compile(build_bert(spec), example_inputs(spec, batch=4, seq=8, seed=1), weight_bits=bits,
                             quiet=True)


def test_lower_without_data_checks_on_synthetic_samples_and_says_so(tmp_path):
    import qdq_compiler
    from qdq_compiler import ir
    from qdq_compiler.synthetic import BertSpec

    from conftest import calibrated_bert

    graph, _ = calibrated_bert(tmp_path, BertSpec(layers=1))
    result = qdq_compiler.lower(ir.to_model(graph))
    assert "on 8 synthetic padded samples, onnxruntime on" in result.report["check"]["line"]
    assert result.report["check"]["passed"]


def test_the_check_is_skipped_and_said_past_2_gb(monkeypatch):
    """The check runs models from memory (protobuf's 2 GB cap): a bigger model compiles without it, with a
    note (simulated: the threshold lowered below this model's weights)."""
    import qdq_compiler
    from qdq_compiler import ir
    from qdq_compiler.errors import QdqcNote
    from qdq_compiler.synthetic import BertSpec, build_bert, example_inputs

    spec = BertSpec(layers=1)
    monkeypatch.setattr(ir, "EXTERNAL_DATA_THRESHOLD", 1000)
    with pytest.warns(QdqcNote, match="check is skipped: the model's weights pass 2 GB"):
        result = qdq_compiler.compile(build_bert(spec), example_inputs(spec, batch=4, seq=8, seed=1), quiet=True)
    assert "check" not in result.report

"""Embedded export of int8 graphs (issue 15): quantized graphs export with
int8_t/int32_t const weights and tables, render every int8 op with the
runtime's templates, size the arena by bytes, and the harness matches the
reference interpreter bit for bit on integer outputs (exactly: one LSB off
fails it); they build with strict C99 on the host and for the Cortex-M4F;
``--int8`` quantizes through ``cc.quantize``; LeNet-5 int8 meets issue 15's
embedded targets (flash <= 70 000 bytes, arena <= 1/3 of the float one),
read from the size report.

The ARM checks skip when arm-none-eabi-gcc is missing, unless
CONVC_REQUIRE_ARM=1 (see tests/test_export.py).
"""
from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

import convc as cc
from convc import quant
from convc.cli import main as cli_main
from convc.export import (SizeComparison, export_c, int8_graph, random_inputs, size_comparison, size_report,
                          toolchain)
from convc.models import lenet5
from convc.ops.quantized import activation_clamp
from convc.codegen.c import generate
from convc.passes import run as run_passes
from convc.reference import evaluate
from test_export import ARM, STRICT, gcc, lib_sources, max_error, need_arm, sh

def need_quantize_pass():
    if getattr(cc.quantize, "__module__", "") == "convc.ops.quantized":
        pytest.skip("cc.quantize(graph, calibration) (the quantize_int8 pass) is not in this convc")


def main(argv) -> int:
    """``convc export ARGV...`` through the one command line."""
    return cli_main(["export", *argv])


FLASH_TARGET = 70_000       # issue 15: LeNet-5 int8 on the Cortex-M4F
ARENA_TARGET = 1 / 3        # ... and its arena at most a third of the float one


def _qparams(lo, hi, dtype="int8"):
    return quant.choose_qparams(lo, hi, dtype)


def conv_chain() -> cc.Graph:
    """int8 in, uint8 and int8 out: a strided padded qconv (x zero point 3,
    per-channel weights, int32 bias with values that saturate the sum, relu6
    folded) into a depthwise dilated qconv to uint8 (zero point 128), a 1D
    qconv on a reshape, an int8 max pool, qavg_pool and qglobal_avg_pool."""
    rng = np.random.default_rng(11)
    g = cc.Graph("qchain")
    x = g.input("x", (2, 3, 9, 9), "int8")
    w1 = g.param("w1", rng.integers(-127, 128, (6, 3, 3, 3)), "int8")
    b1 = g.param("b1", np.array([2**31 - 1, -2**31, 900, -900, 0, 12345]), "int32")
    s1, z1 = 0.08, -20
    h = cc.qconv(x, w1, b1, x_scale=0.05, x_zero_point=3, w_scale=tuple(0.004 + 0.001 * i for i in range(6)),
                 y_scale=s1, y_zero_point=z1, clamp=activation_clamp("relu6", s1, z1, "int8"), stride=2,
                 padding=1, name="conv_a")                                     # (2, 6, 5, 5)
    w2 = g.param("w2", rng.integers(-127, 128, (6, 1, 3, 3)), "int8")
    d = cc.qconv(h, w2, x_scale=s1, x_zero_point=z1, w_scale=0.01, y_scale=0.3, y_zero_point=128, dtype="uint8",
                 padding=2, dilation=2, groups=6, name="depthwise")            # (2, 6, 5, 5) uint8
    g.output(d, "dw")
    flat = cc.reshape(h, (2, 6, 25))
    w3 = g.param("w3", rng.integers(-127, 128, (4, 6, 5)), "int8")
    one = cc.qconv(flat, w3, x_scale=s1, x_zero_point=z1, w_scale=0.02, y_scale=0.25, y_zero_point=5, stride=3,
                   name="conv1d")                                               # (2, 4, 7)
    g.output(one, "c1d")
    g.output(cc.max_pool(h, 2, name="mp"), "mp")
    g.output(cc.qavg_pool(d, 3, stride=2, padding=1, x_scale=0.3, x_zero_point=128, name="ap"), "ap")
    g.output(cc.qglobal_avg_pool(h, x_scale=s1, x_zero_point=z1, y_scale=0.01, y_zero_point=-3, name="gap"), "gap")
    return g


def float_io() -> cc.Graph:
    """Float in, float out: quantize (uint8, zero point 128) -> qconv ->
    qadd of two branches -> qconcat -> a lookup-table sigmoid -> qdense ->
    dequantize; also the int8 logits as a second output."""
    rng = np.random.default_rng(12)
    g = cc.Graph("qfloat")
    x = g.input("x", (1, 2, 8, 8))
    xs, xz = 0.02, 128
    q = cc.quantize(x, xs, zero_point=xz, dtype="uint8", name="xq")
    wa = g.param("wa", rng.integers(-127, 128, (4, 2, 3, 3)), "int8")
    wb = g.param("wb", rng.integers(-127, 128, (4, 2, 1, 1)), "int8")
    a = cc.qconv(q, wa, x_scale=xs, x_zero_point=xz, w_scale=0.01, y_scale=0.05, y_zero_point=-7, padding=1,
                 name="branch_a")
    b = cc.qconv(q, wb, x_scale=xs, x_zero_point=xz, w_scale=0.02, y_scale=0.03, y_zero_point=4, name="branch_b")
    s = cc.qadd(a, b, a_scale=0.05, a_zero_point=-7, b_scale=0.03, b_zero_point=4, y_scale=0.06, y_zero_point=0,
                name="sum")
    c = cc.qconcat([s, a], axis=1, x_scales=(0.06, 0.05), x_zero_points=(0, -7), y_scale=0.06, y_zero_point=0,
                   name="cat")                                                  # (1, 8, 8, 8)
    sig = cc.qlookup(c, cc.lookup_table("sigmoid", 0.06, 0, 1 / 256, -128), name="sig")
    flat = cc.flatten(cc.max_pool(sig, 4, name="pool"), name="flat")          # (1, 32)
    wd = g.param("wd", rng.integers(-127, 128, (5, 32)), "int8")
    bd = g.param("bd", rng.integers(-5000, 5000, 5), "int32")
    y = cc.qdense(flat, wd, bd, x_scale=1 / 256, x_zero_point=-128, w_scale=tuple(0.01 * (i + 1) for i in range(5)),
                  y_scale=0.02, y_zero_point=3, name="fc")
    g.output(cc.dequantize(y, 0.02, 3, name="logits"), "logits")
    g.output(y, "logits_q")
    return g


def fallback() -> cc.Graph:
    """A float op between quantized ones, as the quantize pass leaves an op
    without an int8 form: dequantize -> tanh -> quantize."""
    rng = np.random.default_rng(13)
    g = cc.Graph("qfallback")
    x = g.input("x", (1, 3, 6, 6))
    q = cc.quantize(x, 0.03, zero_point=-2, name="xq")
    h = cc.qconv(q, g.param("w", rng.integers(-127, 128, (4, 3, 3, 3)), "int8"), x_scale=0.03, x_zero_point=-2,
                 w_scale=0.01, y_scale=0.04, y_zero_point=1, padding=1, name="conv")
    t = cc.tanh(cc.dequantize(h, 0.04, 1, name="dq"), name="tanh")
    g.output(cc.quantize(t, 1 / 128, zero_point=0, name="tq"), "y")
    return g


GRAPHS = {"conv_chain": conv_chain, "float_io": float_io, "fallback": fallback}


@pytest.fixture(scope="module", params=list(GRAPHS))
def exported(request, tmp_path_factory):
    g = GRAPHS[request.param]()
    out = tmp_path_factory.mktemp(f"export-{request.param}")
    return g, export_c(g, out, name=request.param, weights_file=request.param == "float_io", tests=3)


def test_quantized_graph_harness_is_bit_exact(exported):
    g, exp = exported
    sh([gcc(), *STRICT, "-O2", "-o", "harness", f"{exp.name}_test.c", *lib_sources(exp), "-lm"], exp.dir)
    run = sh(["./harness"], exp.dir)
    assert "OK" in run.stdout and len(re.findall(r"^vector \d+, \w+: max error", run.stdout, re.M)) == 6
    ints = [o for o, n in g.outputs.items() if g.node(n)["type"].dtype != "float32"]
    if ints:
        assert re.search(r"^integer_mismatches 0$", run.stdout, re.M), run.stdout
    assert max_error(run.stdout) == 0.0, run.stdout        # the float outputs are dequantized integers: exact
    # the vectors the harness checks are the reference's, and draw the int8 input's saturation edges
    text = (exp.dir / f"{exp.name}_test.c").read_text()
    feeds = random_inputs(g, 3)
    if g.node("x")["type"].dtype == "int8":
        assert feeds[0]["x"].min() == -128 and feeds[0]["x"].max() == 127
    want = evaluate(g, feeds[0])
    for label, arr in want.items():
        if arr.dtype.kind in "iu":
            block = re.search(rf"want_{label}\[TESTS\]\[\w+\] = \{{[^\n]*\n    \{{\n(.*?)\n    \}}", text, re.S)
            got = np.array([int(v) for v in re.findall(r"-?\d+", block.group(1))])
            assert np.array_equal(got, arr.ravel()), label


def test_library_types_and_tables(exported):
    """int8_t weights, int32_t biases, the node's requantization tables const,
    the API in the inputs' and outputs' own types."""
    g, exp = exported
    lib = "".join((exp.dir / f).read_text() for f in lib_sources(exp))
    header = (exp.dir / f"{exp.name}.h").read_text()
    for p in exp.plan.params:
        t = g.node(p)["type"] if p in g.nx else None
        if t is not None and t.dtype in ("int8", "int32"):
            # the const array itself, or (weight_format="bytes") its typed member in a union with its bytes
            typed = rf"const {t.dtype}_t \w*{p}\w*\[{t.size}\]"
            packed = (rf"const union {{ unsigned char bytes\[{t.nbytes}\]; {t.dtype}_t v\[{t.size}\]; }} "
                      rf"\w*{p}\w*")
            assert re.search(typed, lib) or re.search(packed, lib), p
    for label, n in g.outputs.items():
        T = {"float32": "float", "int8": "int8_t", "uint8": "uint8_t"}[g.node(n)["type"].dtype]
        assert re.search(rf"\b{T} \*{label}\b", header), (label, T)
    assert "#include <stdint.h>" in header
    if any(exp.graph.node(n)["op"] in ("qconv", "qdense", "qadd") for n in exp.plan.order):
        assert lib.count("static inline int32_t convc_requant(") == 1        # the prelude's, once
    # the arena holds each buffer in its dtype's bytes: an int8 buffer is one byte an element
    assert any(exp.graph.node(b.node)["type"].dtype in ("int8", "uint8") for b in exp.plan.buffers)
    for b in exp.plan.buffers:
        t = exp.graph.node(b.node)["type"]
        assert b.nbytes == t.size * np.dtype(t.dtype).itemsize


def test_node_functions_are_the_runtime_ones(exported):
    """The int8 ops render in the export exactly as in cc.compile's module:
    every node function (and its tables) of the runtime source appears
    verbatim in the library."""
    g, exp = exported
    runtime = generate(run_passes(g, exp.passes)).text
    fns = re.findall(r"^(?:static const [^\n]*\n)*static void node_\w+\(.*?^}\n", runtime, re.M | re.S)
    assert len(fns) == len(exp.plan.order)
    lib = (exp.dir / f"{exp.name}.c").read_text()
    for f in fns:
        assert f in lib, f.splitlines()[0]
    assert any("_mult[" in f for f in fns)


def test_harness_fails_on_one_lsb(tmp_path):
    """The integer comparison is exact: one expected output one LSB off fails."""
    g = conv_chain()
    exp = export_c(g, tmp_path, name="qc", tests=1)
    test_c = tmp_path / "qc_test.c"
    text = test_c.read_text()
    m = re.search(r"want_dw\[TESTS\]\[\w+\] = \{[^\n]*\n    \{\n        (\d+)", text)
    v = int(m.group(1))
    test_c.write_text(text[:m.start(1)] + str(v + 1 if v < 255 else v - 1) + text[m.end(1):])
    sh([gcc(), *STRICT, "-O2", "-o", "harness", "qc_test.c", *lib_sources(exp), "-lm"], tmp_path)
    run = sh(["./harness"], tmp_path, check=False)
    assert run.returncode == 1 and "FAIL" in run.stdout, run.stdout
    assert re.search(r"^integer_mismatches 2$", run.stdout, re.M), run.stdout      # static and caller's arena
    assert "out_dw[0] = " in run.stdout or "dw[0] = " in run.stdout


def test_sanitizers_on_int8_lenet(tmp_path):
    """ASan + UBSan over the int8 LeNet harness: the requantization's shifts
    and the int8 arena stay defined and in bounds."""
    need_quantize_pass()
    export_c(lenet5(), tmp_path, name="q", int8=True)
    sh([gcc(), *STRICT, "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
        "-fno-omit-frame-pointer", "-o", "harness", "q_test.c", "q.c", "-lm"], tmp_path)
    run = sh(["./harness"], tmp_path)
    assert "OK" in run.stdout and "runtime error" not in run.stderr


def test_arm_build_and_size_report(exported, tmp_path):
    """Cortex-M4F: strict C99 builds; the size report agrees with
    arm-none-eabi-size and gives every quantized node its tables."""
    need_arm()
    g, exp = exported
    for src in lib_sources(exp):
        sh([*ARM, *STRICT, src, "-o", str(tmp_path / (src[:-2] + ".o"))], exp.dir)
    objs = sorted(str(p) for p in tmp_path.glob("*.o"))
    out = sh(["arm-none-eabi-size", "-B", *objs], tmp_path).stdout.splitlines()[1:]
    text, data, bss = (sum(int(line.split()[i]) for line in out) for i in range(3))
    rep = size_report(g, name=exp.name, tools=toolchain(prefer_arm=True))
    assert abs(rep.flash - (text + data)) <= 0.01 * (text + data), (rep.flash, text + data)
    assert bss + data == rep.static_ram == exp.arena_bytes
    # const per node: its weights plus its own tables (nm: the r symbols named after its function)
    # (GCC merges identical tables, e.g. two all-zero weight zero points: one address, counted once)
    syms = [s.split() for s in sh(["arm-none-eabi-nm", "-S", f"{exp.name}.o"], tmp_path).stdout.splitlines()]
    tables = {(s[0], s[1]) for s in syms if len(s) == 4 and s[2] in "rR" and s[3].startswith("node_")}
    assert sum(r.const for r in rep.rows) == exp.weight_bytes + sum(int(n, 16) for _, n in tables)
    assert rep.other_const >= 0
    per_channel = [r for r in rep.rows if r.op in ("qconv", "qdense")]
    assert per_channel and all(r.const > 0 and r.code > 0 for r in per_channel), rep.table()
    assert all(r.code > 0 for r in rep.rows), rep.table()


@pytest.fixture(scope="module")
def lenet_int8():
    """LeNet-5 quantized by ``convc export --int8`` (cc.quantize on 32 random inputs)."""
    need_quantize_pass()
    return int8_graph(lenet5())


def test_lenet_int8_meets_the_embedded_targets(lenet_int8, tmp_path, capsys):
    """Issue 15: flash <= 70 000 bytes and arena <= 1/3 of the float arena on
    the Cortex-M4F, read from --size's report (deterministic sizes); the
    export passes its harness bit for bit on the host with strict flags."""
    need_arm()
    assert main(["lenet5", "--int8", "--size", "-o", str(tmp_path), "--name", "qlenet"]) == 0
    out = capsys.readouterr().out
    flash = re.search(r"^flash +float +([\d,]+) +int8 +([\d,]+)", out, re.M)
    arena = re.search(r"^arena +float +([\d,]+) +int8 +([\d,]+)", out, re.M)
    assert flash and arena, out
    (ff, qf), (fa, qa) = [[int(v.replace(",", "")) for v in m.groups()] for m in (flash, arena)]
    assert qf <= FLASH_TARGET, out
    assert qa <= ARENA_TARGET * fa, out
    # the table lists the nodes side by side and the figures are those of the two size reports
    comp = size_comparison(lenet5(), lenet_int8, name="qlenet", tools=toolchain(prefer_arm=True))
    assert isinstance(comp, SizeComparison)
    assert (comp.float.flash, comp.int8.flash, comp.float.arena, comp.int8.arena) == (ff, qf, fa, qa)
    assert re.search(r"^conv1\.relu +conv +[\d,]+ +[\d,]+ +qconv ", out, re.M), out
    assert re.search(r"^fc1\.relu +dense +[\d,]+ +[\d,]+ +qdense ", out, re.M), out
    assert comp.int8.arena == max(r.live for r in comp.int8.rows)
    sh([gcc(), *STRICT, "-O2", "-o", "harness", "qlenet_test.c", "qlenet.c", "-lm"], tmp_path)
    run = sh(["./harness"], tmp_path)
    assert "OK" in run.stdout and max_error(run.stdout) == 0.0, run.stdout
    assert re.search(r"const union \{ unsigned char bytes\[\d+\]; int8_t v\[\d+\]; \} qlenet_p_fc1_w",
                     (tmp_path / "qlenet.c").read_text())


def test_int8_with_a_calibration_file(tmp_path):
    """--calibration FILE.npz: the input's scale is the calibration data's
    range (min/max observer), not that of the random default."""
    need_quantize_pass()
    data = np.random.default_rng(3).random((6, 1, 28, 28)).astype(np.float32) * 4 - 1     # [-1, 3)
    np.savez(tmp_path / "cal.npz", x=data)
    assert main(["lenet5", "--int8", "--calibration", str(tmp_path / "cal.npz"), "-o", str(tmp_path / "o")]) == 0
    g8 = int8_graph(lenet5(), str(tmp_path / "cal.npz"))
    quantize = [n for n in g8.topological_order() if g8.node(n)["op"] == "quantize"]
    assert g8.node(quantize[0])["attrs"]["scale"][0] == _qparams(data.min(), data.max())[0]
    assert int8_graph(lenet5()).node(quantize[0])["attrs"]["scale"] != g8.node(quantize[0])["attrs"]["scale"]
    lib = (tmp_path / "o" / "model.c").read_text()
    scale = g8.node(quantize[0])["attrs"]["scale"][0]
    assert f"x[i] / {cc.codegen.env.cfloat(scale, 'float')}" in lib.replace("(float)", "")


def test_int8_falls_back_to_float_for_ops_without_an_int8_form(tmp_path):
    """An op the quantize pass has no int8 form for (here softmax) stays float
    between a dequantize and a quantize; the export builds and matches."""
    need_quantize_pass()
    rng = np.random.default_rng(4)
    g = cc.Graph("soft")
    x = g.input("x", (1, 2, 6, 6))
    h = cc.relu(cc.conv(x, g.param("w", rng.standard_normal((3, 2, 3, 3)) * 0.3, "float32"), padding=1))
    y = cc.dense(cc.softmax(cc.flatten(h)), g.param("fc", rng.standard_normal((4, 108)) * 0.3, "float32"))
    g.output(y, "y")
    exp = export_c(g, tmp_path, name="soft", int8=True)
    ops = [exp.graph.node(n)["op"] for n in exp.plan.order]
    assert "softmax" in ops and "qconv" in ops, ops
    soft = ops.index("softmax")
    assert ops[soft - 1] == "dequantize" and ops[soft + 1] == "quantize", ops
    sh([gcc(), *STRICT, "-O2", "-o", "harness", "soft_test.c", "soft.c", "-lm"], tmp_path)
    assert "OK" in sh(["./harness"], tmp_path).stdout


def test_int8_errors(tmp_path, capsys):
    g = conv_chain()
    with pytest.raises(cc.ConvcError, match=r"already quantized \(node 'x' \(input\) is int8"):
        export_c(g, tmp_path, int8=True)
    with pytest.raises(cc.ConvcError, match="calibration data is for int8=True"):
        export_c(lenet5(), tmp_path, calibration=np.zeros((1, 1, 28, 28), np.float32))
    assert main(["lenet5", "--calibration", "x.npz", "-o", str(tmp_path)]) == 2
    assert "--calibration is for --int8" in capsys.readouterr().err
    if shutil.which("gcc") is None:
        return
    need_quantize_pass()
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 1, 27, 28), np.float32))
    assert main(["lenet5", "--int8", "--calibration", str(tmp_path / "bad.npz"), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'x'" in err and "(3, 1, 27, 28)" in err, err
    assert main(["lenet5", "--int8", "--calibration", str(tmp_path / "missing.npz"), "--size"]) == 2
    assert "missing.npz" in capsys.readouterr().err

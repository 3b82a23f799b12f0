"""The int8 GEMM path of quantized convolution (convc/ops/qgemm.py, pass
``qconv_to_gemm``, an implicit GEMM on the padded image's stride phases):
bit for bit the integers of the reference qconv on C
with each kernel (AVX-512 VNNI, AVX-VNNI, plain C; ``CONVC_VNNI`` forces
one, and a kernel the compiler does not target falls back to plain C) and
on OpenCL; the pass's choice of which qconvs it takes; the int32 bound at
its limit; and, as an independent oracle, PyTorch's quantized conv (fbgemm),
which requantizes in float: within 1 LSB."""
from __future__ import annotations

import os

import numpy as np
import pytest

import convc as cc
from convc import quant
from convc.errors import ConvcError, ValidationError
from convc.host import probe
from convc.ops import qgemm as Q
from convc.ops.quantized import activation_clamp
from convc.passes import run as run_passes

import helpers

LONG = os.environ.get("CONVC_LONG_TESTS", "") not in ("", "0")

# (x shape, w shape, stride, padding, dilation, x dtype, bias, activation, per-channel scales)
CASES = [
    ((1, 16, 12, 12), (24, 16, 3, 3), 1, 1, 1, "int8", True, None, True),          # 3x3 "same"
    ((1, 16, 13, 11), (20, 16, 3, 3), 2, 1, 1, "uint8", True, "relu", True),       # stride 2, odd sizes
    ((2, 32, 9, 9), (40, 32, 1, 1), 1, 0, 1, "int8", False, None, False),          # 1x1, batch 2
    ((1, 24, 28, 28), (17, 24, 1, 1), 2, 0, 1, "uint8", True, None, True),         # 1x1 stride 2, M % MR
    ((1, 3, 20, 20), (16, 3, 3, 3), 1, 0, 1, "uint8", True, "relu6", True),        # K = 27: not a multiple of 4
    ((1, 8, 15, 15), (12, 8, 5, 5), 1, 4, 2, "int8", True, None, True),            # dilation 2
    ((1, 10, 11, 16), (24, 10, 3, 2), (1, 2), ((2, 0), (1, 1)), 1, "int8", True, "relu", False),  # asymmetric
    ((1, 64, 7, 7), (48, 64, 3, 3), 1, 1, 1, "int8", True, None, True),            # P = 49 < one tile row
    ((1, 10, 11, 16), (24, 10, 3, 2), 1, ((2, 0), (1, 1)), 1, "uint8", False, None, True),  # asymmetric
    ((1, 5, 23, 20), (16, 5, 5, 3), (3, 2), (2, 1), (1, 2), "int8", True, None, True),  # 6 phases, dilation
]
if LONG:
    CASES += [
        ((2, 5, 31, 17), (33, 5, 3, 3), 1, 1, 1, "uint8", True, None, True),
        ((1, 96, 12, 12), (70, 96, 3, 3), 1, 1, 1, "int8", True, "relu", True),
        ((3, 12, 10, 10), (9, 12, 7, 7), 2, 3, 1, "int8", False, None, True),
    ]

KERNELS = ("vnni512", "vnni256", "portable")


def qconv_graph(case, rng, x_zp=None, y_zp=None, scales=None, bias_range=3000):
    """A one-qconv graph and an input for it (what the reference and every
    target run)."""
    xs, ws, stride, padding, dilation, xdt, bias, act, per_channel = case
    lo, hi = quant.qrange(xdt)
    g = cc.Graph("qg")
    x = g.input("x", xs, xdt)
    w = g.param("w", rng.integers(-127, 128, ws), "int8")
    b = g.param("b", rng.integers(-bias_range, bias_range, ws[0]), "int32") if bias else None
    x_scale, w_scale, y_scale = scales or (0.02, (rng.uniform(0.002, 0.02, ws[0]) if per_channel
                                                  else np.array([0.01])).tolist(), 0.05 * np.sqrt(ws[1]))
    x_zp = (7 if xdt == "int8" else 131) if x_zp is None else x_zp
    y_zp = (-3 if xdt == "int8" else 120) if y_zp is None else y_zp
    clamp = activation_clamp(act, y_scale, y_zp, xdt) if act else None
    y = cc.qconv(x, w, b, x_scale=x_scale, x_zero_point=x_zp, w_scale=w_scale, y_scale=y_scale,
                 y_zero_point=y_zp, dtype=xdt, clamp=clamp, stride=stride, padding=padding, dilation=dilation)
    g.output(y, "y")
    return g, rng.integers(lo, hi + 1, xs).astype(xdt)


def ops_after(g, pipeline="default"):
    new = run_passes(g, pipeline)
    return [new.node(n)["op"] for n in new.topological_order()], new


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch):
    monkeypatch.setenv("CONVC_VNNI", request.param)
    return request.param


@pytest.mark.parametrize("case", CASES, ids=range(len(CASES)))
def test_gemm_is_bit_exact_on_c_with_every_kernel(case, kernel):
    rng = np.random.default_rng(11)
    g, x = qconv_graph(case, rng)
    ops, lowered = ops_after(g)
    assert "qgemm" in ops and "qconv" not in ops
    assert "qgemm_planes" in ops and "im2col" not in ops   # the implicit GEMM on the image's stride phases
    q = next(n for n in lowered.topological_order() if lowered.node(n)["op"] == "qgemm")
    assert lowered.node(q)["attrs"]["kernel"] == kernel
    assert "qgemm_weights" not in ops and "qgemm_bias" not in ops        # folded at compile time
    want = cc.compile(g, target="numpy")(x=x)
    mod = cc.compile(g, target="c")
    got = mod(x=x)
    assert got.dtype == want.dtype and np.array_equal(got, want), \
        f"{np.count_nonzero(got != want)} of {want.size} outputs differ"
    assert len(np.unique(want)) > 20                     # not all saturated: the requantization is seen
    if kernel != "portable":
        assert "vpdpbusd" in mod.source                  # the intrinsics path is in the source...
        assert "#else" in mod.source                     # ...with plain C for compilers without it


def test_the_host_probe_selects_the_instructions_it_has(monkeypatch):
    """Without CONVC_VNNI the pass takes what host.probe() found, which is
    what both the CPU and the compiler's macros have."""
    from convc.passes.qgemm import kernel_choice

    monkeypatch.delenv("CONVC_VNNI", raising=False)
    dot = probe().int8_dot
    assert dot in ("vnni512", "vnni256", "none")
    assert kernel_choice() == (dot if dot != "none" else "portable")
    if dot == "vnni512":
        assert "avx512_vnni" in probe().flags
    monkeypatch.setenv("CONVC_VNNI", "sometimes")
    with pytest.raises(ConvcError, match="CONVC_VNNI"):
        kernel_choice()


@pytest.mark.skipif(helpers.__getattr__("OPENCL_MISSING") is not None and not helpers.OPENCL_REQUIRED,
                    reason="no OpenCL device")
@pytest.mark.parametrize("case", CASES[:6], ids=range(6))
def test_gemm_is_bit_exact_on_opencl(case, monkeypatch):
    """OpenCL renders the plain-C kernel whatever the pass chose."""
    monkeypatch.setenv("CONVC_VNNI", "512")
    rng = np.random.default_rng(12)
    g, x = qconv_graph(case, rng)
    want = cc.compile(g, target="numpy")(x=x)
    mod = cc.compile(g, target="opencl")
    got = mod(x=x)
    assert np.array_equal(got, want)
    assert "vpdpbusd" not in mod.source and "qgemm" in mod.source


@pytest.mark.parametrize("xdt, x_zp, y_zp", [("int8", -128, 127), ("int8", 127, -128), ("uint8", 0, 255),
                                             ("uint8", 255, 0)])
def test_zero_point_extremes(xdt, x_zp, y_zp, kernel):
    """Zero points at the ends of the range: the padding fill (x_zp + 128
    for int8) reaches 0 and 255, and the output saturates at both ends."""
    rng = np.random.default_rng(13)
    g, x = qconv_graph(((1, 12, 10, 10), (20, 12, 3, 3), 1, 2, 1, xdt, True, None, True), rng, x_zp=x_zp,
                       y_zp=y_zp)
    want = cc.compile(g, target="numpy")(x=x)
    got = cc.compile(g, target="c")(x=x)
    assert np.array_equal(got, want)
    lo, hi = quant.qrange(xdt)
    assert (want == lo).any() or (want == hi).any()


def test_rounding_ties_and_saturating_shifts(kernel):
    """Power-of-two scales make the requantization land on exact ties
    (x_scale * w_scale / y_scale = 1/8: a right shift by 3 of integers, half
    of them ties at .5), and a multiplier of 2 (a left shift) with a bias
    near the int32 limits saturates both the bias sum and the shift."""
    rng = np.random.default_rng(14)
    case = ((1, 16, 9, 9), (16, 16, 3, 3), 1, 1, 1, "int8", True, None, False)
    for scales, bias_range in (((0.5, [2.0**-6], 0.25), 3000), ((0.5, [2.0**-2], 0.0625), 2**31 - 1)):
        g, x = qconv_graph(case, rng, x_zp=0, y_zp=0, scales=scales, bias_range=bias_range)
        q = next(n for n in g.topological_order() if g.node(n)["op"] == "qconv")
        real = scales[0] * scales[1][0] / scales[2]
        assert quant.quantize_multiplier(real) == tuple(v[0] for v in (g.node(q)["attrs"]["multiplier"],
                                                                        g.node(q)["attrs"]["shift"]))
        want = cc.compile(g, target="numpy")(x=x)
        got = cc.compile(g, target="c")(x=x)
        assert np.array_equal(got, want)
        assert (want == 127).any() and (want == -128).any()


def test_the_int32_bound_at_its_limit(kernel):
    """K = 65792 taps, every product at its extreme (u = 255 times w = -128
    in one channel, 255 * 127 in another): 65792 * 255 * 128 = 2**31 - 32768
    is the largest sum the bound allows, computed exactly (vpdpbusd wraps,
    so an overflow anywhere would show); one more group of 4 taps and the
    pass leaves the qconv on the direct loop."""
    c = 65792
    g = cc.Graph("bound")
    x = g.input("x", (1, c, 2, 2), "int8")
    w = np.full((8, c, 1, 1), -128, np.int8)
    w[1::2] = 127
    wv = g.param("w", w, "int8")
    y = cc.qconv(x, wv, x_scale=1.0, x_zero_point=-128, w_scale=1.0, y_scale=2.0**25, y_zero_point=0, dtype="int8")
    g.output(y, "y")
    assert Q.acc_fits(c) and not Q.acc_fits(c + 4)
    assert "qgemm" in ops_after(g)[0]
    xv = np.full((1, c, 2, 2), 127, np.int8)
    want = cc.compile(g, target="numpy")(x=xv)
    got = cc.compile(g, target="c")(x=xv)
    assert np.array_equal(got, want)
    m, shift = quant.quantize_multiplier(2.0**-25)
    sums = np.array([-c * 255 * 128, c * 255 * 127])          # the exact sums, in Python integers
    assert want[0, :2, 0, 0].tolist() == quant.requantize(sums, m, shift).tolist() == [-64, 63]

    big = cc.Graph("too_big")
    xb = big.input("x", (1, c + 4, 2, 2), "int8")          # a valid qconv: |x - 0| <= 128, |w| <= 128
    yb = cc.qconv(xb, big.param("w", np.ones((8, c + 4, 1, 1), np.int8), "int8"), x_scale=1.0,
                  x_zero_point=0, w_scale=1.0, y_scale=2.0**20, dtype="int8")
    big.output(yb, "y")
    assert "qgemm" not in ops_after(big)[0]


@pytest.mark.parametrize("what", ["grouped", "depthwise", "1d", "3d", "weight zero point", "small"])
def test_what_stays_on_the_direct_loop(what):
    rng = np.random.default_rng(15)
    g = cc.Graph("direct")
    shapes = {"1d": ((1, 16, 40), (16, 16, 3)), "3d": ((1, 8, 6, 6, 6), (8, 8, 3, 3, 3)),
              "grouped": ((1, 16, 12, 12), (32, 8, 3, 3)), "depthwise": ((1, 16, 12, 12), (16, 1, 3, 3)),
              "weight zero point": ((1, 16, 12, 12), (24, 16, 3, 3)), "small": ((1, 4, 6, 6), (4, 4, 3, 3))}
    xs, ws = shapes[what]
    x = g.input("x", xs, "int8")
    w = g.param("w", rng.integers(-100, 100, ws), "int8")
    groups = {"grouped": 2, "depthwise": 16}.get(what, 1)
    y = cc.qconv(x, w, x_scale=0.02, x_zero_point=3, w_scale=0.01, w_zero_point=5 if what == "weight zero point"
                 else 0, y_scale=0.1, dtype="int8", padding=1, groups=groups)
    g.output(y, "y")
    from convc.passes import report
    _, (rep,) = report(g, ["qconv_to_gemm"])
    why = {"grouped": "groups=2;", "depthwise": "groups=16;", "1d": "1D; the int8 GEMM is 2D only",
           "3d": "3D; the int8 GEMM is 2D only", "weight zero point": "zero points [5]",
           "small": "< MIN_MACS=65536"}[what]
    assert rep.declines == [(y.name, rep.declines[0][1])] and why in rep.declines[0][1]
    ops, _ = ops_after(g)
    assert "qconv" in ops and "qgemm" not in ops
    xv = rng.integers(-128, 128, xs).astype(np.int8)
    assert np.array_equal(cc.compile(g, target="c")(x=xv), cc.compile(g, target="numpy")(x=xv))


def test_set_params_recomputes_the_folded_weight_matrix_and_bias():
    rng = np.random.default_rng(16)
    g, x = qconv_graph(CASES[0], rng)
    mod = cc.compile(g, target="c")
    w2 = rng.integers(-127, 128, (24, 16, 3, 3)).astype(np.int8)
    b2 = rng.integers(-3000, 3000, 24).astype(np.int32)
    mod.set_params({"w": w2, "b": b2})
    ref = cc.compile(g, target="numpy")
    ref.set_params({"w": w2, "b": b2})
    assert np.array_equal(mod(x=x), ref(x=x))


def test_bad_qgemm_attributes_name_the_node_and_rule():
    g = cc.Graph("bad")
    cols = g.input("cols", (1, 128, 4), "uint8")
    w = g.param("w", np.zeros((14, 16), np.int8), "int8")
    b = g.param("b", np.zeros(10, np.int64), "int64")
    base = dict(channels=10, spatial=(4, 8), offsets=(0, 32, 64, 96), multiplier=[2**30] * 10, shift=[0] * 10,
                y_zero_point=0, dtype="int8", clamp=(-128, 127), kernel="portable", mr=14, nr=32)
    assert g.add("qgemm", [cols, w, b], base, "q0").shape == (1, 10, 4, 8)
    with pytest.raises(ValidationError, match="kernel must be one of"):
        g.add("qgemm", [cols, w, b], dict(base, kernel="avx9000"), "q1")
    with pytest.raises(ValidationError, match="multiple of mr=8"):
        g.add("qgemm", [cols, w, b], dict(base, mr=8), "q2")
    with pytest.raises(ValidationError, match="one entry per channel"):
        g.add("qgemm", [cols, w, b], dict(base, shift=[0] * 3), "q3")
    with pytest.raises(ValidationError, match="node 'q4'.*read past them"):
        g.add("qgemm", [cols, w, b], dict(base, spatial=(8, 8)), "q4")
    with pytest.raises(ValidationError, match="width 6 < the output width 8"):
        g.add("qgemm", [cols, w, b], dict(base, width=6), "q5")
    with pytest.raises(ValidationError, match="overflow the int32 accumulator"):
        g.add("qgemm", [cols, g.param("w2", np.zeros((14, 65796), np.int8), "int8"), b],
              dict(base, offsets=(0,) * 16449), "q6")


@pytest.mark.parametrize("shape", [((1, 32, 14, 14), (48, 32, 3, 3), 1, 1), ((1, 64, 14, 14), (64, 64, 1, 1), 2, 0),
                                   ((2, 16, 9, 9), (24, 16, 3, 3), 2, 1)])
def test_close_to_pytorch_quantized_conv(shape):
    """PyTorch's fbgemm conv (per-channel int8 weights, quint8 activations)
    requantizes in float: the same layer agrees within 1 LSB."""
    torch = pytest.importorskip("torch")
    import torch.ao.nn.quantized.functional as qF

    torch.backends.quantized.engine = "fbgemm"
    xs, ws, stride, pad = shape
    rng = np.random.default_rng(17)
    w_scale = rng.uniform(0.002, 0.02, ws[0]).astype(np.float32)
    x_scale, x_zp, y_scale, y_zp = 0.03, 120, 0.2, 100
    wq = rng.integers(-127, 128, ws).astype(np.int8)
    bq = rng.integers(-3000, 3000, ws[0]).astype(np.int32)
    xq = rng.integers(0, 256, xs).astype(np.uint8)
    g = cc.Graph("vs_torch")
    x = g.input("x", xs, "uint8")
    y = cc.qconv(x, g.param("w", wq, "int8"), g.param("b", bq, "int32"), x_scale=x_scale, x_zero_point=x_zp,
                 w_scale=w_scale.tolist(), y_scale=y_scale, y_zero_point=y_zp, dtype="uint8", stride=stride,
                 padding=pad)
    g.output(y, "y")
    assert "qgemm" in ops_after(g)[0]
    got = cc.compile(g, target="c")(x=xq).astype(np.int32)

    tx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(xq), x_scale, x_zp)
    tw = torch._make_per_channel_quantized_tensor(torch.from_numpy(wq), torch.from_numpy(w_scale.astype(np.float64)),
                                                  torch.zeros(ws[0], dtype=torch.long), 0)
    tb = torch.from_numpy((bq * (np.float32(x_scale) * w_scale)).astype(np.float32))
    want = qF.conv2d(tx, tw, tb, stride=stride, padding=pad, scale=y_scale, zero_point=y_zp).int_repr().numpy()
    diff = np.abs(got - want.astype(np.int32))
    assert diff.max() <= 1, f"max difference {diff.max()} LSB"
    assert (diff == 0).mean() > 0.9


def test_bench_int8_rows():
    """``convc bench --int8``: each row checked (bit for bit against the
    reference, PyTorch within 1 LSB) before it is timed, with the kernel
    the host selected and the ratios to convc float32 and PyTorch."""
    from convc import bench

    rep = bench.run(cases="r18_3x3_64_b1,r18_3x3s2*", threads=[1], quick=True, int8=True, repeat_seconds=0,
                    min_runs=1)
    rows = {r["case"]: r for r in rep.int8}
    assert set(rows) == {"r18_3x3_64_b1", "r18_3x3s2_64_128_b1"}
    for r in rows.values():
        assert r["status"] == "ok" and r["int8_ms"] > 0 and r["f32_ms"] > 0 and r["x_f32"] > 0
        assert r["path"] == "qgemm" and r["kernel"] == bench_kernel()
        if r.get("torch_ms") is not None:
            assert r["torch_lsb"] <= 1
    text = rep.table()
    assert "int8 case" in text and "r18_3x3s2_64_128_b1" in text
    assert "avx512_vnni" in text or "vnni" not in probe().int8_dot     # the header names the ISA


def bench_kernel():
    from convc.passes.qgemm import kernel_choice
    return kernel_choice()


def test_the_vnni_source_builds_for_a_cortex_m4(tmp_path, monkeypatch):
    """The AVX-512 kernel's source keeps its plain-C #else: the same module
    compiles for a microcontroller (arm-none-eabi-gcc, strict C99 warnings
    as errors) with no x86 code in it."""
    import shutil
    import subprocess

    gcc = shutil.which("arm-none-eabi-gcc")
    if gcc is None:
        pytest.skip("arm-none-eabi-gcc is not installed (apt-get install gcc-arm-none-eabi)")
    monkeypatch.setenv("CONVC_VNNI", "512")
    g, _ = qconv_graph(CASES[0], np.random.default_rng(18))
    src = tmp_path / "module.c"
    src.write_text(cc.compile(g, target="c").source)
    out = tmp_path / "module.o"
    r = subprocess.run([gcc, "-std=c99", "-O2", "-mcpu=cortex-m4", "-mthumb", "-Wall", "-Wextra", "-Werror", "-c",
                        str(src), "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    objdump = shutil.which("arm-none-eabi-objdump")
    if objdump:
        assert "vpdpbusd" not in subprocess.run([objdump, "-d", str(out)], capture_output=True, text=True).stdout


@pytest.mark.parametrize("target", helpers.__getattr__("TARGETS")[1:])
def test_weight_ops_run_unfolded(target):
    """Without fold_params (a custom pass list, the explain page's steps)
    qgemm_weights and qgemm_bias run as nodes in the generated code."""
    rng = np.random.default_rng(12)
    g, x = qconv_graph(CASES[0], rng)
    lowered = run_passes(g, ["qconv_to_gemm"])
    ops = [lowered.node(n)["op"] for n in lowered.topological_order()]
    assert "qgemm_weights" in ops and "qgemm_bias" in ops
    want = cc.compile(g, target="numpy")(x=x)
    assert np.array_equal(cc.compile(lowered, target=target, passes="none")(x=x), want)

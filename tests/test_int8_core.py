"""The int8 foundation: convc/quant.py's arithmetic against an independent
implementation in Python integers, and the ops quantize, dequantize and
qconv bit for bit on every target against the reference (and the reference's
integer sums against torch's convolution of the same integers)."""
from __future__ import annotations

import math

import numpy as np
import pytest

import convc as cc
from convc import quant
from convc.errors import RuleError, ValidationError

import helpers


# -- the arithmetic ----------------------------------------------------------
def _tflite_requant(acc: int, m: int, shift: int) -> int:
    """TensorFlow Lite's MultiplyByQuantizedMultiplier written out on Python
    integers, step by step as its reference kernels define it."""
    left, right = max(shift, 0), max(-shift, 0)
    x = max(-2**31, min(2**31 - 1, acc * 2**left))
    ab = x * m
    nudge = 2**30 if ab >= 0 else 1 - 2**30
    high = int((ab + nudge) / 2**31) if abs(ab + nudge) < 2**52 else \
        (abs(ab + nudge) // 2**31) * (1 if ab + nudge >= 0 else -1)           # truncation toward zero
    mask = 2**right - 1
    rem = high & mask
    threshold = (mask >> 1) + (1 if high < 0 else 0)
    return (high >> right) + (1 if rem > threshold else 0)


@pytest.mark.parametrize("real", [0.5, 0.25, 1.0, 0.0123, 1.7e-5, 3.75, 1e-10, 2**-31 * 1.5, 0.999999999])
def test_quantize_multiplier_reconstructs_the_real_multiplier(real):
    m, shift = quant.quantize_multiplier(real)
    if m == 0:
        assert real < 2**-31
        return
    assert 2**30 <= m < 2**31
    assert math.isclose(m * 2.0**(shift - 31), real, rel_tol=2**-30)


def test_quantize_multiplier_refuses_what_it_cannot_represent():
    for bad in (-1.0, float("nan"), float("inf"), 2.0**31):
        with pytest.raises(RuleError):
            quant.quantize_multiplier(bad)
    assert quant.quantize_multiplier(0.0) == (0, 0)


def test_requantize_matches_tflite_on_ties_negatives_and_saturation():
    rng = np.random.default_rng(0)
    accs = [0, 1, -1, 2, -2, 3, -3, 5, -5, 7, -7, 64, -64, 2**31 - 1, -2**31, 2**30, -2**30]
    accs += rng.integers(-2**31, 2**31, 200).tolist()
    for real in (0.5, 0.25, 0.125, 0.75, 0.0123, 3.0, 1.5e-6, 1.0):
        m, shift = quant.quantize_multiplier(real)
        got = quant.requantize(np.array(accs), m, shift)
        want = [_tflite_requant(a, m, shift) for a in accs]
        assert got.tolist() == want, real
    # ties: 0.25 * odd multiples of 2 -> exact halves; rounding by the power of two is half away from zero
    m, shift = quant.quantize_multiplier(0.25)
    assert quant.requantize(np.array([2, -2, 6, -6]), m, shift).tolist() == [1, -1, 2, -2]


def test_choose_qparams_keeps_zero_exact_and_covers_the_range():
    for lo, hi, dtype in ((-1.0, 3.0, "uint8"), (-2.5, 0.7, "int8"), (0.0, 6.0, "int8"), (0.5, 2.0, "uint8")):
        s, z = quant.choose_qparams(lo, hi, dtype)
        qlo, qhi = quant.qrange(dtype)
        assert qlo <= z <= qhi
        assert quant.dequantize_array(quant.quantize_array(np.float32(0), s, z, dtype), s, z) == 0
        assert s * (qlo - z) <= min(lo, 0) + s and s * (qhi - z) >= hi - s
    s, z = quant.choose_qparams(-3.0, 1.0, "int8", symmetric=True)
    assert z == 0 and math.isclose(s, 3.0 / 127.5, rel_tol=1e-6)
    assert quant.choose_qparams(0.0, 0.0) == (1.0, 0)


def test_weight_and_bias_quantization_round_trip():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    w[2] = 0.0
    q, scales = quant.quantize_weights(w)
    assert q.dtype == np.int8 and np.abs(q).max() == 127 and scales[2] == 1.0
    back = q.astype(np.float64) * np.asarray(scales).reshape(-1, 1, 1, 1)
    assert np.abs(back - w).max() <= max(scales) / 2 + 1e-7
    b = quant.quantize_bias(np.array([1.0, -2.0, 2.0**40, 0, 0, 0]), 0.01, scales)
    assert b.dtype == np.int32 and b[2] == 2**31 - 1


# -- quantize / dequantize ----------------------------------------------------
def _edge_values(scale, zp, rng, n=64):
    """Rounding ties (x / scale = k + 1/2 exactly), saturation, NaN, inf."""
    ties = (np.arange(-8, 8) + 0.5) * scale
    return np.concatenate([ties, [0.0, -0.0, 1e9, -1e9, np.inf, -np.inf, np.nan],
                           rng.standard_normal(n - 23) * 40 * scale]).astype(np.float32)


@pytest.mark.parametrize("target", helpers.__getattr__("TARGETS")[1:])
@pytest.mark.parametrize("dtype, scale, zp", [("int8", 0.5, 0), ("int8", 0.03125, -7), ("uint8", 0.25, 128),
                                              ("uint8", 0.1, 3)])
def test_quantize_dequantize_bit_exact(target, dtype, scale, zp):
    rng = np.random.default_rng(2)
    x = _edge_values(scale, zp, rng).reshape(1, 4, 4, 4)
    g = cc.Graph("qdq")
    xi = g.input("x", x.shape)
    q = cc.quantize(xi, scale, zp, dtype)
    g.output(q, "q")
    g.output(cc.dequantize(q, scale, zp), "back")
    got = cc.compile(g, target=target).run({"x": x})
    want = cc.compile(g, target="numpy").run({"x": x})
    assert np.array_equal(got["q"], want["q"]) and np.array_equal(got["back"], want["back"])
    # ONNX QuantizeLinear, written out independently: ties to even, saturate, NaN -> zero point
    lo, hi = quant.qrange(dtype)
    with np.errstate(invalid="ignore"):
        onnx = np.clip(np.rint(x / np.float32(scale)) + zp, lo, hi)
    onnx = np.where(np.isnan(x), zp, onnx).astype(dtype)
    assert np.array_equal(want["q"], onnx)
    assert np.array_equal(want["back"], (onnx.astype(np.float32) - zp) * np.float32(scale))


@pytest.mark.parametrize("target", helpers.__getattr__("TARGETS")[1:])
def test_per_axis_quantize_dequantize(target):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2, 3, 5)) * 4).astype(np.float32)
    g = cc.Graph("qdq_axis")
    xi = g.input("x", x.shape)
    q = cc.quantize(xi, [0.1, 0.02, 0.5], [1, -3, 0], "int8", axis=1)
    g.output(q, "q")
    g.output(cc.dequantize(q, [0.1, 0.02, 0.5], [1, -3, 0], axis=1), "back")
    got, want = cc.compile(g, target=target).run({"x": x}), cc.compile(g, target="numpy").run({"x": x})
    assert np.array_equal(got["q"], want["q"]) and np.array_equal(got["back"], want["back"])
    assert np.array_equal(want["q"][:, 1], quant.quantize_array(x[:, 1], 0.02, -3, "int8"))


# -- qconv ---------------------------------------------------------------------
# (x shape, w shape, stride, padding, dilation, groups, x dtype, per-channel, bias, clamp)
QCONV_CASES = [
    ((1, 3, 8, 8), (4, 3, 3, 3), 1, 1, 1, 1, "int8", True, True, None),
    ((2, 4, 9, 7), (6, 2, 3, 2), (2, 1), ((1, 0), (2, 1)), 1, 2, "uint8", True, True, None),
    ((1, 4, 10, 10), (4, 1, 3, 3), 2, 1, 1, 4, "int8", True, False, "relu"),        # depthwise
    ((1, 2, 11, 11), (3, 2, 3, 3), 1, 2, 2, 1, "uint8", False, True, "relu6"),      # dilated
    ((1, 3, 17), (5, 3, 4), 3, 2, 1, 1, "int8", True, True, None),                   # 1D
    ((1, 2, 5, 6, 4), (3, 2, 2, 3, 2), 1, 1, 1, 1, "uint8", True, True, None),       # 3D
    ((1, 8, 6, 6), (16, 8, 1, 1), 1, 0, 1, 1, "int8", True, True, "relu"),           # pointwise
    ((1, 16, 5, 5), (8, 16, 3, 3), 1, 1, 1, 1, "uint8", True, True, None),           # uint8, zero point 128
]


def _qconv_graph(case, rng, w_zero_point=0, bias_scale=2000):
    xs, ws, stride, padding, dilation, groups, xdt, per_channel, bias, act = case
    lo, hi = quant.qrange(xdt)
    g = cc.Graph("qc")
    x = g.input("x", xs, xdt)
    w = g.param("w", rng.integers(-127, 128, ws), "int8")
    b = g.param("b", rng.integers(-bias_scale, bias_scale, ws[0]), "int32") if bias else None
    w_scale = (rng.uniform(0.002, 0.02, ws[0]) if per_channel else np.array([0.01])).tolist()
    y_scale, y_zp = 0.05, (-3 if xdt == "int8" else 120)
    x_zp = 5 if xdt == "int8" else (128 if xs[1] == 16 else 131)     # 128: see qmacros.product
    clamp = quant_clamp(act, y_scale, y_zp, xdt)
    y = cc.qconv(x, w, b, x_scale=0.02, x_zero_point=x_zp, w_scale=w_scale, w_zero_point=w_zero_point,
                 y_scale=y_scale, y_zero_point=y_zp, dtype=xdt, clamp=clamp, stride=stride, padding=padding,
                 dilation=dilation, groups=groups)
    g.output(y, "y")
    return g, rng.integers(lo, hi + 1, xs).astype(xdt)


def quant_clamp(act, y_scale, y_zp, dtype):
    from convc.ops.quantized import activation_clamp
    return activation_clamp(act, y_scale, y_zp, dtype) if act else None


@pytest.mark.parametrize("target", helpers.__getattr__("TARGETS")[1:])
@pytest.mark.parametrize("case", QCONV_CASES, ids=range(len(QCONV_CASES)))
def test_qconv_bit_exact_against_the_reference(target, case):
    rng = np.random.default_rng(4)
    g, x = _qconv_graph(case, rng)
    want = cc.compile(g, target="numpy")(x=x)
    got = cc.compile(g, target=target)(x=x)
    assert got.dtype == case[6] and np.array_equal(got, want)
    assert len(np.unique(want)) > 10                 # not all saturated: the test sees the requantization


def test_qconv_reference_integer_sum_matches_torch():
    """The reference's int32 sums, requantized, equal torch's float64
    convolution of the same integers (exact: every sum is below 2**53),
    requantized by quant.requantize: an independent check of the
    convolution geometry and the zero-point arithmetic."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    rng = np.random.default_rng(5)
    for case in QCONV_CASES[:4]:
        g, x = _qconv_graph(case, rng)
        node = g.node(g.outputs["y"])
        a = node["attrs"]
        w = g.node("w")["value"]
        b = g.node("b")["value"] if "b" in g.nx else None
        xi = torch.tensor(x.astype(np.float64) - a["x_zero_point"])
        pads = [p for pair in reversed(a["padding"]) for p in pair]
        xi = F.pad(xi, pads)
        acc = F.conv2d(xi, torch.tensor(w.astype(np.float64)), None, a["stride"], 0, a["dilation"], a["groups"])
        acc = acc.numpy().astype(np.int64)
        if b is not None:
            acc = acc + b.reshape(1, -1, 1, 1)
        m = np.asarray(a["multiplier"]).reshape(1, -1, 1, 1)
        s = np.asarray(a["shift"]).reshape(1, -1, 1, 1)
        lo, hi = a["clamp"]
        want = np.clip(quant.requantize(acc, m, s) + a["y_zero_point"], lo, hi).astype(a["dtype"])
        assert np.array_equal(cc.compile(g, target="numpy")(x=x), want)


@pytest.mark.parametrize("target", helpers.__getattr__("TARGETS")[1:])
def test_qconv_weight_zero_point_and_bias_saturation(target):
    rng = np.random.default_rng(6)
    case = ((1, 2, 6, 6), (3, 2, 3, 3), 1, 1, 1, 1, "uint8", True, True, None)
    g, x = _qconv_graph(case, rng, w_zero_point=[3, -2, 0], bias_scale=2**31 - 1)
    assert np.array_equal(cc.compile(g, target=target)(x=x), cc.compile(g, target="numpy")(x=x))


def test_qconv_is_close_to_the_float_convolution():
    """Quantize -> qconv -> dequantize approximates conv on real numbers
    within the output's quantization step (plus the input's error times the
    weights)."""
    rng = np.random.default_rng(7)
    xf = rng.uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32)
    wf = (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32)
    bf = rng.standard_normal(4).astype(np.float32) * 0.1
    wq, w_scale = quant.quantize_weights(wf)
    x_scale, x_zp = quant.choose_qparams(-1, 1, "int8")
    y_scale, y_zp = quant.choose_qparams(-4, 4, "int8")
    g = cc.Graph("qf")
    x = g.input("x", xf.shape)
    q = cc.quantize(x, x_scale, x_zp)
    y = cc.qconv(q, g.param("w", wq, "int8"), g.param("b", quant.quantize_bias(bf, x_scale, w_scale), "int32"),
                 x_scale=x_scale, x_zero_point=x_zp, w_scale=w_scale, y_scale=y_scale, y_zero_point=y_zp, padding=1)
    g.output(cc.dequantize(y, y_scale, y_zp), "y")
    got = cc.compile(g)(x=xf)
    gf = cc.Graph("f")
    want = cc.compile(gf, target="numpy")(x=xf) if gf.output(cc.conv(gf.input("x", xf.shape), wf, bf, padding=1),
                                                              "y") else None
    bound = y_scale + x_scale / 2 * np.abs(wf).sum(axis=(1, 2, 3)).max() + max(w_scale) / 2 * 27
    assert np.abs(got - want).max() <= bound


@pytest.mark.parametrize("build, rule", [
    (lambda g, x, w: cc.qconv(x, w, x_scale=0, w_scale=0.1, y_scale=0.1), "x_scale must be positive"),
    (lambda g, x, w: cc.qconv(x, w, x_scale=0.1, w_scale=[0.1, 0.2], y_scale=0.1), "w_scale has 2 entries"),
    (lambda g, x, w: cc.qconv(x, w, x_scale=0.1, x_zero_point=200, w_scale=0.1, y_scale=0.1),
     r"x_zero_point must be integers in \[-128, 127\]"),
    (lambda g, x, w: cc.qconv(x, w, x_scale=0.1, w_scale=0.1, y_scale=0.1, clamp=(5, 300)), "clamp must be"),
    (lambda g, x, w: cc.qconv(x, w, x_scale=0.1, w_scale=0.1, y_scale=1e-12), "too large"),
    (lambda g, x, w: cc.qconv(x, w, g.param("b", np.zeros(3), "float32"), x_scale=0.1, w_scale=0.1, y_scale=0.1),
     "bias must be int32"),
    (lambda g, x, w: cc.qconv(g.input("f", (1, 2, 5, 5)), w, x_scale=0.1, w_scale=0.1, y_scale=0.1),
     "must be int8 or uint8, got float32"),
    (lambda g, x, w: cc.quantize(x, 0.1), "float32 or float64"),
    (lambda g, x, w: cc.dequantize(g.input("f", (2,)), 0.1), "int8 or uint8, got float32"),
    (lambda g, x, w: cc.quantize(g.input("f", (2, 3)), [0.1, 0.2], 0, axis=1), "scale has 2 entries"),
])
def test_bad_quantization_attributes_name_the_rule(build, rule):
    g = cc.Graph("bad")
    x = g.input("x", (1, 2, 5, 5), "int8")
    w = g.param("w", np.ones((3, 2, 3, 3)), "int8")
    with pytest.raises(ValidationError, match=rule):
        build(g, x, w)


def test_qconv_refuses_an_accumulator_that_could_overflow_int32():
    g = cc.Graph("big")
    x = g.input("x", (1, 70000, 1, 1), "uint8")
    w = g.param("w", np.ones((1, 70000, 1, 1)), "int8")
    with pytest.raises(ValidationError, match="overflow the int32 accumulator"):
        cc.qconv(x, w, x_scale=0.1, w_scale=0.1, y_scale=0.1)


@pytest.mark.parametrize("target", helpers.__getattr__("TARGETS")[1:])
def test_qconv_int32_output_is_the_raw_sum(target):
    """dtype="int32" (ONNX's ConvInteger): the int32 sums themselves, bias
    included; no scales needed. Checked against torch's float64 conv of the
    same integers (exact below 2**53)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    g = cc.Graph("raw")
    x = g.input("x", (1, 3, 7, 6), "uint8")
    w = rng.integers(-128, 128, (4, 3, 3, 3))
    y = cc.qconv(x, g.param("w", w, "int8"), g.param("b", [5, -7, 2**31 - 1, 0], "int32"), x_zero_point=128,
                 w_zero_point=[0, 3, -2, 1], dtype="int32", padding=1, stride=(2, 1))
    g.output(y, "y")
    xa = rng.integers(0, 256, (1, 3, 7, 6)).astype(np.uint8)
    got = cc.compile(g, target=target)(x=xa)
    want = cc.compile(g, target="numpy")(x=xa)
    assert got.dtype == np.int32 and np.array_equal(got, want)
    xt = torch.tensor(xa.astype(np.float64) - 128)
    wt = torch.tensor(w.astype(np.float64) - np.array([0, 3, -2, 1]).reshape(-1, 1, 1, 1))
    acc = torch.nn.functional.conv2d(xt, wt, None, (2, 1), 1).numpy().astype(np.int64)
    acc += np.array([5, -7, 2**31 - 1, 0]).reshape(1, -1, 1, 1)
    assert np.array_equal(want, np.clip(acc, -2**31, 2**31 - 1))
    with pytest.raises(ValidationError, match="raw accumulator"):
        cc.qconv(x, g.param("w2", w, "int8"), dtype="int32", y_scale=0.5)
    with pytest.raises(ValidationError, match="x_scale is required"):
        cc.qconv(x, g.param("w3", w, "int8"), dtype="int8", y_scale=0.5)

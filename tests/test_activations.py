"""The activation table (convc/ops/activations.py) drives these tests: every
record, with default and non-default params, as an elementwise op and fused
into a producer's epilogue, value and gradient in float64, on the numpy
reference, C and OpenCL, against torch (and finite differences)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convc as cc
from convc.ops.activations import ACTIVATIONS, TABLE
from helpers import TARGETS, assert_close, torch_activation

# (kind, params): every record with its defaults, plus the params that change its form
VARIANTS = [(k, {}) for k in ACTIVATIONS] + [
    ("leaky_relu", {"negative_slope": 0.2}),
    ("leaky_relu", {"negative_slope": -0.5}),            # derivative from x, not y
    ("clip", {"min": 0.0, "max": 6.0}),                  # relu6
    ("clip", {"min": -1.0, "max": 0.5}),
    ("clip", {"min": 1.0, "max": -1.0}),                 # min > max gives max
    ("hardsigmoid", {"alpha": 0.2, "beta": 0.5}),        # ONNX's default
    ("elu", {"alpha": 0.5}),                             # a jump in the derivative at 0
    ("thresholded_relu", {"alpha": -0.5}),               # y < 0 between alpha and 0
]
IDS = [k + "".join(f"-{p}={v:g}" for p, v in ps.items()) for k, ps in VARIANTS]
LONG = os.environ.get("CONVC_LONG_TESTS", "") not in ("", "0")
# Fused into a conv's epilogue (a conv function per variant: the costly part of the compile): every
# variant with CONVC_LONG_TESTS=1; by default the first ten records and their variants, and of the
# records of issue 20 one per way of differentiating: from x with a param (elu), from y (softplus,
# sqrt on x > 0) and from x through libm (erf)
FUSED = [i for i, (k, ps) in enumerate(VARIANTS)
         if LONG or k in ACTIVATIONS[:10] or (k in ("elu", "softplus", "sqrt", "erf") and not ps)]


torch_fn = torch_activation


KINKS = {"relu": [0], "leaky_relu": [0], "clip": [-1, 0, 0.5, 1, 6], "hardswish": [-3, 3],
         "hardsigmoid": [-3, 3, -2.5, 2.5], "elu": [0], "selu": [0], "thresholded_relu": [1, -0.5],
         "abs": [0], "reciprocal": [0], "sqrt": [0]}
POSITIVE = ("sqrt", "log")      # defined on x > 0 only: sampled there


def sample(shape, kind, seed):
    """float64 values over [-5, 5] (over [0.1, 5.1] for POSITIVE), none within 0.05 of a kink
    (where the one-sided derivatives differ and finite differences mean nothing)."""
    x = np.random.default_rng(seed).uniform(-5, 5, shape)
    if kind in POSITIVE:
        x = np.abs(x) + 0.1
    for k in KINKS.get(kind, []):
        near = np.abs(x - k) < 0.05
        x[near] = k + 0.1
    return x


def apply(x, kind, params, name=None):
    return x.graph.add(kind, [x], dict(params), name)


def fused_conv(g, x, w, b, kind, params, name):
    """A conv with the activation in its epilogue (what fuse_epilogues makes)."""
    attrs = dict(stride=1, padding=1, dilation=1, groups=1, flip=False, activation=kind, **params)
    return g.add("conv", [x, w, b], attrs, name)


@pytest.fixture(scope="module")
def table_runs():
    """One graph holding every variant (unfused op and fused conv, value and
    gradients), compiled once per target; the feeds and torch's answers."""
    g = cc.Graph("activation_table")
    feeds, want = {}, {}
    for i, (kind, params) in enumerate(VARIANTS):
        fn = torch_fn(kind, params)
        xa = sample((2, 3, 5, 4), kind, i)
        ga = np.random.default_rng(100 + i).standard_normal(xa.shape)
        x = g.input(f"x{i}", xa.shape, "float64")
        gy = g.input(f"g{i}", ga.shape, "float64")
        feeds.update({f"x{i}": xa, f"g{i}": ga})
        y = apply(x, kind, params, f"act{i}")
        g.output(y, f"y{i}")
        g.output(cc.grad(y, x, grad_output=gy), f"dx{i}")
        tx = torch.tensor(xa, requires_grad=True)
        ty = fn(tx)
        ty.backward(torch.tensor(ga))
        want[f"y{i}"], want[f"dx{i}"] = ty.detach().numpy(), tx.grad.numpy()

        # fused into a conv's epilogue: value and the gradients of x, w, b
        if i not in FUSED:
            continue
        rng = np.random.default_rng(200 + i)
        ca, wa, ba = rng.standard_normal((1, 2, 5, 5)), rng.standard_normal((3, 2, 3, 3)), rng.standard_normal(3)
        if kind in POSITIVE or kind == "reciprocal":      # a conv output > 0.1 (1 / x: away from its pole)
            ca, wa, ba = np.abs(ca), np.abs(wa), np.abs(ba) + 0.1
        cx = g.input(f"cx{i}", ca.shape, "float64")
        w, b = g.param(f"w{i}", wa), g.param(f"b{i}", ba)
        cg = g.input(f"cg{i}", (1, 3, 5, 5), "float64")
        cga = rng.standard_normal((1, 3, 5, 5))
        feeds.update({f"cx{i}": ca, f"cg{i}": cga})
        z = fused_conv(g, cx, w, b, kind, params, f"conv{i}")
        g.output(z, f"z{i}")
        for name, d in zip(("dcx", "dw", "db"), cc.grad(z, [cx, w, b], grad_output=cg)):
            g.output(d, f"{name}{i}")
        tc, tw, tb = (torch.tensor(a, requires_grad=True) for a in (ca, wa, ba))
        tz = fn(F.conv2d(tc, tw, tb, padding=1))
        tz.backward(torch.tensor(cga))
        want[f"z{i}"] = tz.detach().numpy()
        want.update({f"dcx{i}": tc.grad.numpy(), f"dw{i}": tw.grad.numpy(), f"db{i}": tb.grad.numpy()})
    got = {t: cc.compile(g, target=t, passes="none").run(feeds) for t in TARGETS}
    return got, want


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("i", range(len(VARIANTS)), ids=IDS)
def test_activation_value_and_gradient_match_torch(table_runs, i, target):
    got, want = table_runs
    for key in ("y", "dx"):
        assert_close(got[target][f"{key}{i}"], want[f"{key}{i}"], rtol=1e-10, atol=1e-12,
                     what=f"{IDS[i]} {key} [{target}]")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("i", FUSED, ids=[IDS[i] for i in FUSED])
def test_fused_activation_value_and_gradients_match_torch(table_runs, i, target):
    got, want = table_runs
    for key in ("z", "dcx", "dw", "db"):
        assert_close(got[target][f"{key}{i}"], want[f"{key}{i}"], rtol=1e-9, atol=1e-11,
                     what=f"{IDS[i]} fused {key} [{target}]")


@pytest.mark.parametrize("i", range(len(VARIANTS)), ids=IDS)
def test_activation_derivative_matches_finite_differences(i):
    kind, params = VARIANTS[i]
    act = TABLE[kind]
    p = act.normalize(params)
    x = sample((64,), kind, 7 + i)
    gy = np.ones_like(x)
    eps = 1e-6
    fd = (act.apply(x + eps, p) - act.apply(x - eps, p)) / (2 * eps)
    t = act.apply(x, p) if act.grad_input(p) == "y" else x
    assert_close(act.derivative(t, gy, p), fd, rtol=1e-6, atol=1e-7, what=f"{IDS[i]} derivative")


def test_derivative_from_y_is_only_claimed_where_y_determines_it():
    """An activation whose derivative reads y must have the same derivative
    at any two inputs with the same output."""
    for kind, params in VARIANTS:
        act = TABLE[kind]
        p = act.normalize(params)
        if act.grad_input(p) != "y":
            continue
        x = np.linspace(-8, 8, 4001)
        y = act.apply(x, p)
        d = act.derivative(y, np.ones_like(x), p)
        fd = (act.apply(x + 1e-6, p) - act.apply(x - 1e-6, p)) / 2e-6
        far = np.all(np.abs(x[:, None] - np.array(KINKS.get(kind, [1e9]))[None, :]) > 1e-3, axis=1)
        assert_close(d[far], fd[far], rtol=1e-5, atol=1e-6, what=f"{kind} {params} derivative from y")


def test_float32_c_expression_matches_reference():
    g = cc.Graph("f32")
    feeds = {}
    for i, (kind, params) in enumerate(VARIANTS):
        x = g.input(f"x{i}", (257,))
        feeds[f"x{i}"] = sample((257,), kind, i).astype(np.float32)
        g.output(apply(x, kind, params), f"y{i}")
    ref = cc.compile(g, target="numpy").run(feeds)
    got = cc.compile(g, target="c").run(feeds)
    for i in range(len(VARIANTS)):
        assert got[f"y{i}"].dtype == np.float32
        assert_close(got[f"y{i}"], ref[f"y{i}"], rtol=2e-6, atol=2e-6, what=IDS[i])


def test_builders_cover_the_table():
    x = cc.Graph("b").input("x", (4,))
    made = {cc.relu(x).op, cc.leaky_relu(x).op, cc.clip(x, 0, 1).op, cc.relu6(x).op, cc.sigmoid(x).op,
            cc.tanh(x).op, cc.silu(x).op, cc.hardswish(x).op, cc.hardsigmoid(x).op, cc.gelu(x).op,
            cc.gelu(x, approximate="tanh").op, cc.elu(x).op, cc.selu(x).op, cc.softplus(x).op, cc.softsign(x).op,
            cc.thresholded_relu(x).op, cc.mish(x).op, cc.sqrt(x).op, cc.exp(x).op, cc.log(x).op, cc.neg(x).op,
            cc.abs(x).op, cc.reciprocal(x).op, cc.erf(x).op}
    assert made == set(ACTIVATIONS)
    with pytest.raises(cc.ConvcError, match="approximate"):
        cc.gelu(x, approximate="erf")
    with pytest.raises(cc.ConvcError, match="negative_slope must be a number"):
        cc.leaky_relu(x, "steep")
    with pytest.raises(cc.ConvcError, match="must not be NaN"):
        cc.clip(x, float("nan"), 1.0)


def test_clip_keeps_nan_and_min_above_max_gives_max():
    g = cc.Graph("clip")
    x = g.input("x", (4,))
    g.output(cc.clip(x, 2.0, 1.0), "inverted")
    g.output(cc.clip(x, 0.0, 6.0), "relu6")
    a = np.array([np.nan, -3.0, 1.5, 9.0], np.float32)
    for t in TARGETS:
        r = cc.compile(g, target=t).run({"x": a})
        np.testing.assert_array_equal(r["inverted"], [np.nan, 1.0, 1.0, 1.0])
        np.testing.assert_array_equal(r["relu6"], [np.nan, 0.0, 1.5, 6.0])


@pytest.mark.parametrize("target", [t for t in TARGETS if t != "numpy"])
def test_extreme_inputs_give_what_torch_gives(target):
    """Saturated inputs (exp overflows in a naive form) stay finite where torch's are."""
    a = np.array([-1e4, -100.0, -30.0, 30.0, 100.0, 1e4], np.float32)
    g = cc.Graph("extremes")
    x = g.input("x", a.shape)
    for i, (kind, params) in enumerate(VARIANTS):
        y = apply(x, kind, params)
        g.output(y, f"y{i}")
        g.output(cc.grad(y, x, grad_output=g.const(np.ones(a.shape, np.float32))), f"d{i}")
    got = cc.compile(g, target=target).run({"x": a})
    for i, (kind, params) in enumerate(VARIANTS):
        t = torch.tensor(a, requires_grad=True)
        y = torch_fn(kind, params)(t)
        y.backward(torch.ones_like(t))
        # (float32 tanh / exp round differently near saturation: 1 + tanh(-1e4) is a few ulp of 1, times 1e4)
        assert_close(got[f"y{i}"], y.detach().numpy(), rtol=1e-5, atol=1e-3, what=f"{IDS[i]} value")
        assert_close(got[f"d{i}"], t.grad.numpy(), rtol=1e-5, atol=1e-5, what=f"{IDS[i]} derivative")


def test_float32_exp_in_the_generated_c_is_accurate_over_its_whole_range():
    """Float activations use the prelude's vectorisable convc_expf: within a
    few ulp of exp everywhere, exact at the limits (0, inf, NaN)."""
    x = np.concatenate([np.linspace(-87, 88.5, 200001), [-1e4, -88.0, 89.0, 1e4, np.inf, -np.inf, np.nan]])
    x = x.astype(np.float32)
    g = cc.Graph("exp")
    v = g.input("x", x.shape)
    g.output(cc.sigmoid(cc.mul(v, -1.0)), "s")         # 1 / (1 + exp(x))
    got = cc.compile(g).run({"x": x})["s"].astype(np.float64)
    with np.errstate(over="ignore"):
        want = 1 / (1 + np.exp(x.astype(np.float64)))
    finite = np.isfinite(x) & (want > 1e-37)          # (float32's normal range)
    rel = np.abs(got[finite] - want[finite]) / want[finite]
    assert rel.max() < 1e-6, f"worst relative error {rel.max():.3g} at x = {x[finite][np.argmax(rel)]}"
    np.testing.assert_array_equal(got[-7:], [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, np.nan])

"""Issue 16, item 5: NaN, +-inf, huge finite values and -0.0 go through every
activation (value and gradient), clip, pool, softmax and cross-entropy
exactly as PyTorch takes them, on the numpy reference, C and OpenCL, both as
separate nodes and fused into a producer's epilogue (direct conv, GEMM via
im2col and 1x1, Winograd, NCHWc, col2im, dense, matmul).

Each table below goes into one graph per dtype, compiled once per target, so
the whole file costs a handful of compiles."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convc as cc
from convc.ops import blocked as nb
from convc.ops.activations import ACTIVATIONS, TABLE
from convc.passes import run as run_passes
from helpers import TARGETS

DTYPES = ("float32", "float64")
INF, NAN = float("inf"), float("nan")


def special_values(dtype: str) -> np.ndarray:
    """NaN, +-inf, the largest finite values of the type and around where
    exp overflows or underflows (float32 near 88.7, float64 near 709.8),
    the kinks of relu/clip/hardswish/hardsigmoid, signed zeros and tiny values."""
    huge = [3e38, -3e38] + ([1e308, -1e308, 710.0, -710.0, 745.5, -745.5] if dtype == "float64" else [])
    v = [NAN, INF, -INF, *huge, 100.0, -100.0, 89.0, -89.0, 88.5, -88.5, 87.0, -87.0, 30.0, -30.0,
         6.0, -6.0, 3.0, -3.0, 1.0, -1.0, 0.5, 0.0, -0.0, 1e-30, -1e-30, 1e-40, -1e-40]
    return np.array(v, dtype)


def tiled(v: np.ndarray, n: int = 64) -> np.ndarray:
    """``v`` repeated to a multiple of ``n`` elements: torch runs every element
    through its vectorised kernel (its scalar tail loop treats NaN differently in
    some backward kernels, e.g. hardswish's, so its answer would depend on the
    position)."""
    reps = -(-len(v) // n) * n
    return np.resize(v, reps)


def torch_answer(fn, xa: np.ndarray, ga: np.ndarray, kind: str):
    """torch's value and input gradient of ``fn`` at ``xa`` for output
    gradient ``ga``, in ``xa``'s dtype: the same overflow of intermediates
    (hardswish(3e38) is inf in float32 as in torch). One exception: torch's
    vectorised float32 gelu gives gelu(+inf) = NaN (its erf) and gelu(3e38) =
    inf (its order of operations), where its float64 kernel, the math and
    convc give +inf and 3e38: float32 gelu values are checked against torch's
    float64 gelu rounded to float32."""
    tx = torch.tensor(xa, requires_grad=True)
    ty = fn(tx)
    ty.backward(torch.tensor(ga))
    y, dx = ty.detach().numpy(), tx.grad.numpy()
    if kind == "gelu" and xa.dtype == np.float32:
        y = fn(torch.tensor(xa, dtype=torch.float64)).numpy().astype(np.float32)
    return y, dx


# finite inputs where a derivative has a kink and convc's one-sided choice differs from
# torch's: clip and hardsigmoid take their derivative from y, which cannot tell x == bound
# from x beyond it (torch gives gy at x == bound for clip, 0 for hardsigmoid at +-3)
GRAD_KINKS = {"clip": lambda p: [p["min"], p["max"]], "hardsigmoid": lambda p: [-3.0, 3.0]}


# (kind, params): every record with its defaults and the params that change its form
VARIANTS = [(k, {}) for k in ACTIVATIONS] + [
    ("leaky_relu", {"negative_slope": -0.5}),
    ("clip", {"min": 0.0, "max": 6.0}),
    ("clip", {"min": 1.0, "max": -1.0}),
]
IDS = [k + "".join(f"-{p}={v:g}" for p, v in ps.items()) for k, ps in VARIANTS]


def torch_act(kind, params):
    p = TABLE[kind].normalize(params)
    return {
        "relu": F.relu,
        "leaky_relu": lambda x: F.leaky_relu(x, p.get("negative_slope", 0.01)),
        "clip": lambda x: torch.clamp(torch.clamp(x, min=p["min"]), max=p["max"]),
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "silu": F.silu,
        "hardswish": F.hardswish,
        "hardsigmoid": F.hardsigmoid,
        "gelu": lambda x: F.gelu(x, approximate="none"),
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    }[kind]


def assert_same(got, want, what, rtol=None, zero_sign=True):
    """NaN exactly where ``want`` has NaN, +-inf exactly where it has them,
    finite values close, and with ``zero_sign`` a zero's sign as in ``want``
    (PyTorch keeps -0.0 through relu and clip)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    rtol = rtol if rtol is not None else (1e-5 if want.dtype == np.float32 else 1e-7)
    # (torch's float64 hardsigmoid derivative is the float32 1/6); atol: cancellation near 0
    # (1 + erf, 1 - y^2) and libm differences
    atol = 1e-6 if want.dtype == np.float32 else 1e-12
    bad = np.isnan(got) != np.isnan(want)
    inf = np.isinf(want) | np.isinf(got)
    bad |= inf & (got != want)
    fin = np.isfinite(want) & np.isfinite(got)
    g, w = np.where(fin, got, 0).astype(np.float64), np.where(fin, want, 0).astype(np.float64)
    bad |= fin & ~(np.abs(g - w) <= rtol * np.abs(w) + atol)
    if zero_sign:
        bad |= (want == 0) & (got == 0) & (np.signbit(got) != np.signbit(want))
    if bad.any():
        idx = np.flatnonzero(bad)
        lines = [f"  [{i}] got {got.flat[i]!r} want {want.flat[i]!r}" for i in idx[:12]]
        raise AssertionError(f"{what}: {idx.size} of {got.size} differ from torch\n" + "\n".join(lines))


def check_all(cases):
    """assert_same on every (got, want, what) of ``cases``; one failure lists them all."""
    errors = []
    for got, want, what in cases:
        try:
            assert_same(got, want, what)
        except AssertionError as e:
            errors.append(str(e))
    assert not errors, "\n".join(errors)


def _compile_all(g, feeds):
    return {t: cc.compile(g, target=t, passes="none").run(feeds) for t in TARGETS}


# -- activations as separate nodes: value and gradient -------------------------------------
@pytest.fixture(scope="module", params=DTYPES)
def activation_runs(request):
    dtype = request.param
    xa = tiled(special_values(dtype))
    g, want = cc.Graph(f"nan_acts_{dtype[-2:]}"), {}
    x = g.input("x", xa.shape, dtype)
    gy = g.input("gy", xa.shape, dtype)
    ga = np.ones_like(xa)
    for i, (kind, params) in enumerate(VARIANTS):
        y = g.add(kind, [x], dict(params), f"act{i}")
        g.output(y, f"y{i}")
        g.output(cc.grad(y, x, grad_output=gy), f"dx{i}")
        want[f"y{i}"], want[f"dx{i}"] = torch_answer(torch_act(kind, params), xa, ga, kind)
        kinks = GRAD_KINKS.get(kind, lambda p: [])(TABLE[kind].normalize(params))
        want[f"kink{i}"] = np.isin(xa, kinks)
    return dtype, _compile_all(g, {"x": xa, "gy": ga}), want


@pytest.mark.parametrize("i", range(len(VARIANTS)), ids=IDS)
def test_item5_activation_nan_inf_as_torch(activation_runs, i):
    """Issue 16 item 5: every activation's value and gradient on NaN, +-inf,
    huge finite values and -0.0, on every target, equals torch's."""
    dtype, got, want = activation_runs
    keep = ~want[f"kink{i}"]
    check_all([(got[t][f"{k}{i}"][keep], want[f"{k}{i}"][keep], f"{IDS[i]} {dtype} {what} [{t}]")
               for t in TARGETS for k, what in (("y", "value"), ("dx", "gradient"))])

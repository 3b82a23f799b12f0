"""Integer dtypes in add, sub, mul, div, clip and max_pool (issue 15 item 3).

Every integer dtype of the IR, through the numpy reference, the generated C
and OpenCL, bit for bit; the reference against independent oracles: torch's
integer arithmetic (which wraps as C's unsigned arithmetic does, and divides
with ``rounding_mode="trunc"``), Python's arbitrary-precision integers
reduced modulo 2**bits, and float64 (exact for these integers) for clip and
max_pool. The edge cases: wrap-around at both ends, MIN / -1, x / 0 (defined
as 0), negative dividends (truncation toward zero), clip bounds at and inside
the dtype's ends, min > max, max_pool with padding and ceil_mode.
``CONVC_LONG_TESTS=1`` adds random shapes.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from helpers import TARGETS

import convc as cc

LONG = os.environ.get("CONVC_LONG_TESTS", "") not in ("", "0")
DTYPES = ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64")
TORCH = {"int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32,
         "int64": torch.int64}      # (torch's uint16/32/64 have no CPU arithmetic)
SHAPES = [((3, 5), (3, 5)), ((2, 3, 4), (4,)), ((2, 1, 4), (3, 1)), ((5,), ())]
if LONG:
    SHAPES += [((2, 3, 4, 5), (1, 3, 1, 5)), ((7, 1), (1, 9)), ((1,), (4, 3))]
POOLS = [((2, 3, 7, 7), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
         ((1, 2, 9), dict(kernel_size=2, stride=1, padding=1)),
         ((1, 2, 5, 6, 4), dict(kernel_size=(2, 3, 2), padding=(1, 1, 0))),
         ((1, 1, 8, 8), dict(kernel_size=3, dilation=2))]


def _edges(dtype: str) -> np.ndarray:
    """The values where integer arithmetic breaks: both ends, their
    neighbours, 0, +-1, -1 (when signed) and a few in between."""
    info = np.iinfo(dtype)
    lo, hi = int(info.min), int(info.max)
    vals = {lo, lo + 1, hi, hi - 1, 0, 1, 2, 3, 7, hi // 2, hi // 2 + 1}
    if lo < 0:
        vals |= {-1, -2, -3, -7, lo // 2}
    return np.array(sorted(vals), dtype)


def _operands(dtype: str, sa, sb, rng) -> tuple[np.ndarray, np.ndarray]:
    """Random values with the edge values planted in both operands (so
    every pair of edges meets somewhere when the shapes allow)."""
    info = np.iinfo(dtype)
    a = rng.integers(int(info.min), int(info.max), sa, dtype=dtype, endpoint=True)
    b = rng.integers(int(info.min), int(info.max), sb, dtype=dtype, endpoint=True)
    e = _edges(dtype)
    a.reshape(-1)[:min(a.size, e.size)] = e[:a.size]
    b.reshape(-1)[:min(b.size, e.size)] = e[::-1][:b.size]
    if b.size > 1:
        b.reshape(-1)[-1] = 0                   # a division by zero in every case
    return a, b


def _wrap(v: int, dtype: str) -> int:
    """An exact integer reduced to the dtype, modulo 2**bits."""
    bits = np.iinfo(dtype).bits
    v %= 1 << bits
    return v - (1 << bits) if np.iinfo(dtype).min < 0 and v >= 1 << (bits - 1) else v


def _python_oracle(op: str, a: np.ndarray, b: np.ndarray, dtype: str) -> np.ndarray:
    """The meaning of the op on Python ints: exact, then wrapped; division
    truncated toward zero, with x / 0 = 0."""
    a, b = np.broadcast_arrays(a, b)
    out = []
    for x, y in zip(a.reshape(-1).tolist(), b.reshape(-1).tolist()):
        if op == "add":
            r = x + y
        elif op == "sub":
            r = x - y
        elif op == "mul":
            r = x * y
        else:
            r = 0 if y == 0 else (abs(x) // abs(y)) * (1 if (x < 0) == (y < 0) else -1)
        out.append(_wrap(r, dtype))
    return np.array(out, dtype).reshape(a.shape)


@pytest.fixture(scope="module", params=DTYPES)
def modules(request):
    """One graph per dtype: every op on every shape pair, compiled once per target."""
    dtype = request.param
    g = cc.Graph(f"int_{dtype}")
    feeds, rng = {}, np.random.default_rng(DTYPES.index(dtype))
    for k, (sa, sb) in enumerate(SHAPES):
        a, b = g.input(f"a{k}", sa, dtype), g.input(f"b{k}", sb, dtype)
        feeds[f"a{k}"], feeds[f"b{k}"] = _operands(dtype, sa, sb, rng)
        for op in ("add", "sub", "mul", "div"):
            g.output(getattr(cc, op)(a, b), f"{op}{k}")
    info = np.iinfo(dtype)
    x = g.input("x", (4, 16), dtype)
    feeds["x"] = np.resize(_edges(dtype), (4, 16))
    lo, hi = int(info.min), int(info.max)
    bounds = [(0, None), (None, 0), (lo, hi), (lo + 1, hi - 1), (3, 2)]       # min > max gives max
    if lo < 0:
        bounds += [(-5, 5), (-1, None)]
    for k, (mn, mx) in enumerate(bounds):
        g.output(cc.clip(x, mn, mx), f"clip{k}")
    for k, (shape, kw) in enumerate(POOLS):
        p = g.input(f"p{k}", shape, dtype)
        feeds[f"p{k}"] = rng.integers(lo, hi, shape, dtype=dtype, endpoint=True)
        g.output(cc.max_pool(p, **kw), f"pool{k}")
    results = {t: cc.compile(g, target=t).run(feeds) for t in TARGETS}
    return dtype, feeds, bounds, results


def test_targets_agree_bit_for_bit(modules):
    dtype, feeds, _, results = modules
    ref = results["numpy"]
    for target, res in results.items():
        for name, want in ref.items():
            assert res[name].dtype == np.dtype(dtype), (target, name)
            assert np.array_equal(res[name], want), (target, name, feeds.get("a0"), res[name], want)


def test_arithmetic_against_exact_integers(modules):
    dtype, feeds, _, results = modules
    for k in range(len(SHAPES)):
        a, b = feeds[f"a{k}"], feeds[f"b{k}"]
        for op in ("add", "sub", "mul", "div"):
            want = _python_oracle(op, a, b, dtype)
            assert np.array_equal(results["c"][f"{op}{k}"], want), (op, k, a, b)


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
def test_arithmetic_against_torch(modules, op):
    dtype, feeds, _, results = modules
    if dtype not in TORCH:
        pytest.skip(f"torch has no CPU arithmetic for {dtype}")
    for k in range(len(SHAPES)):
        a, b = (torch.from_numpy(np.ascontiguousarray(feeds[f"{s}{k}"])) for s in "ab")
        if op == "div":             # torch raises on integer division by zero; -1 with MIN is what C cannot do
            keep = torch.broadcast_tensors(a, b)
            ok = (keep[1] != 0) & ~((keep[1] == -1) & (keep[0] == np.iinfo(dtype).min))
            want = torch.div(keep[0], torch.where(ok, keep[1], torch.ones_like(keep[1])), rounding_mode="trunc")
            got = torch.from_numpy(results["c"][f"div{k}"])
            assert torch.equal(got[ok], want[ok]), (k, a, b)
        else:
            want = getattr(torch, op)(a, b)
            assert torch.equal(torch.from_numpy(results["c"][f"{op}{k}"]), want), (op, k)


def test_division_rules(modules):
    """x / 0 is 0 and MIN / -1 is MIN (the one quotient that overflows),
    defined alike on every target instead of trapping."""
    dtype, _, _, _ = modules
    info = np.iinfo(dtype)
    g = cc.Graph("divrules")
    a, b = g.input("a", (4,), dtype), g.input("b", (4,), dtype)
    g.output(cc.div(a, b), "y")
    signed = info.min < 0
    av = np.array([info.min, info.max, 7, info.min if signed else 9], dtype)
    bv = np.array([0, 0, 0, -1 if signed else 4], dtype)
    for t in TARGETS:
        y = cc.compile(g, target=t)(a=av, b=bv)
        assert y[:3].tolist() == [0, 0, 0], (t, y)
        assert y[3] == (info.min if signed else 2), (t, y)


def test_clip_and_max_pool_against_float64(modules):
    """float64 holds these integers exactly (int64/uint64 values are
    compared where they fit 2**53), an oracle outside the integer code."""
    dtype, feeds, bounds, results = modules
    x = feeds["x"]
    small = np.abs(x.astype(np.float64)) < 2**53
    for k, (mn, mx) in enumerate(bounds):
        want = np.minimum(np.maximum(x.astype(np.float64), -np.inf if mn is None else mn), np.inf if mx is None else mx)
        got = results["c"][f"clip{k}"]
        assert np.array_equal(got.astype(np.float64)[small], want[small]), (k, mn, mx)
    for k, (shape, kw) in enumerate(POOLS):
        p = feeds[f"p{k}"]
        if np.iinfo(dtype).bits > 32:
            continue                    # float64 cannot hold every int64 value
        rank = len(shape) - 2
        F = torch.nn.functional
        pool = [F.max_pool1d, F.max_pool2d, F.max_pool3d][rank - 1]
        want = pool(torch.from_numpy(p.astype(np.float64)), **kw).numpy()
        assert np.array_equal(results["c"][f"pool{k}"].astype(np.float64), want), k


def test_rules():
    g = cc.Graph("bad")
    x = g.input("x", (3,), "int8")
    with pytest.raises(cc.ValidationError, match=r"clip of a int8 tensor: max 300 is outside the dtype's range"):
        cc.clip(x, 0, 300)
    with pytest.raises(cc.ValidationError, match="min must be an integer"):
        cc.clip(x, 0.5, None)
    y = g.input("y", (3,), "int16")
    with pytest.raises(cc.ValidationError, match="operands must share one dtype, got int8, int16"):
        cc.add(x, y)
    with pytest.raises(cc.ValidationError, match="float32 or float64"):
        cc.sigmoid(x)
    with pytest.raises(cc.ValidationError, match="float32 or float64"):
        cc.avg_pool(g.input("p", (1, 1, 4, 4), "uint8"), 2)

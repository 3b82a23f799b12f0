"""``cc.max_pool`` / ``cc.avg_pool`` / ``cc.global_avg_pool`` against PyTorch.

Every configuration of a seeded grid (1D/2D/3D, kernel, stride including the
default ``None`` = kernel, padding up to k/2 as torch allows, dilation for
max_pool, ceil_mode, count_include_pad, batch > 1, non-square windows and
inputs, float32 and float64) is one input and one output of ONE graph, so the
C compiler runs once; each configuration is still its own test item and its
failure message names it. The oracle is torch.nn.functional.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convc as cc
import helpers
from convc.ops import get_op
from convc.ops.pool import interior

assert_close = partial(helpers.assert_close, check_dtype=True)   # results keep their dtype too

SEED = 1234
N_RANDOM = 110
TARGETS = helpers.TARGETS


# -- local helpers -------------------------------------------------------------

def tup(v, r):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * r


@dataclass(frozen=True)
class PoolCfg:
    kind: str            # "max" | "avg"
    shape: tuple         # (N, C, *spatial)
    kernel: object       # int or tuple, passed as is
    stride: object       # None, int or tuple
    padding: object      # int or tuple
    dilation: object = 1  # max only
    ceil_mode: bool = False
    count_include_pad: bool = True  # avg only
    dtype: str = "float32"

    @property
    def rank(self):
        return len(self.shape) - 2

    @property
    def id(self):
        f = lambda v: str(v).replace(" ", "")  # noqa: E731
        parts = [f"{self.kind}{self.rank}d", "x" + "x".join(map(str, self.shape)), f"k{f(self.kernel)}",
                 f"s{f(self.stride)}", f"p{f(self.padding)}"]
        if self.kind == "max":
            parts.append(f"d{f(self.dilation)}")
        if self.ceil_mode:
            parts.append("ceil")
        if self.kind == "avg" and not self.count_include_pad:
            parts.append("nopad")
        if self.dtype != "float32":
            parts.append("f64")
        return "-".join(parts)

    def build(self, x):
        if self.kind == "max":
            return cc.max_pool(x, self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode)
        return cc.avg_pool(x, self.kernel, self.stride, self.padding, self.ceil_mode, self.count_include_pad)

    def torch(self, a):
        t = torch.from_numpy(a)
        if self.kind == "max":
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[self.rank]
            return fn(t, self.kernel, self.stride, self.padding, self.dilation, ceil_mode=self.ceil_mode).numpy()
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[self.rank]
        return fn(t, self.kernel, self.stride, self.padding, ceil_mode=self.ceil_mode,
                  count_include_pad=self.count_include_pad).numpy()


def random_configs():
    rnd = random.Random(SEED)
    out = []
    while len(out) < N_RANDOM:
        r = rnd.choice((1, 2, 2, 3))
        kind = rnd.choice(("max", "avg"))
        k = tuple(rnd.randint(1, 4) for _ in range(r))
        stride = rnd.choice((None, "int", "tuple", "tuple"))
        if stride == "int":
            stride = rnd.randint(1, 3)
        elif stride == "tuple":
            stride = tuple(rnd.randint(1, 3) for _ in range(r))
        pad = tuple(rnd.randint(0, kk // 2) for kk in k)          # torch: pad <= k/2
        dil = tuple(rnd.randint(1, 2) for _ in range(r)) if kind == "max" else 1
        d = tup(dil, r)
        hi = {1: 11, 2: 9, 3: 6}[r]
        sizes = tuple(rnd.randint(max(2, dd * (kk - 1) + 1), max(hi, dd * (kk - 1) + 1))
                      for kk, dd in zip(k, d))
        shape = (rnd.randint(1, 3), rnd.randint(1, 3)) + sizes
        cfg = PoolCfg(kind, shape, k if rnd.random() < 0.7 or len(set(k)) > 1 else k[0], stride,
                      pad if len(set(pad)) > 1 or rnd.random() < 0.5 else pad[0], dil,
                      rnd.random() < 0.5, rnd.random() < 0.5,
                      "float64" if rnd.random() < 0.15 else "float32")
        try:   # keep only what torch itself accepts
            cfg.torch(np.zeros(shape, cfg.dtype))
        except RuntimeError:
            continue
        out.append(cfg)
    return out


HANDPICKED = [
    # default stride (None -> kernel), square and non-square
    PoolCfg("max", (2, 3, 8, 8), 2, None, 0),
    PoolCfg("avg", (2, 3, 8, 8), 2, None, 0),
    PoolCfg("max", (1, 2, 9, 7), (3, 2), None, (1, 0)),
    PoolCfg("avg", (1, 2, 9, 7), (3, 2), None, (1, 1), count_include_pad=False),
    PoolCfg("max", (3, 1, 10), 3, None, 1),
    PoolCfg("avg", (3, 1, 10), 3, None, 1),
    PoolCfg("max", (2, 2, 5, 6, 7), (2, 3, 2), None, (1, 1, 0)),
    PoolCfg("avg", (2, 2, 5, 6, 7), (2, 3, 2), None, (1, 1, 0)),
    # ceil_mode where the last window hangs over the padded edge
    PoolCfg("max", (1, 1, 6, 6), 3, 2, 1, ceil_mode=True),
    PoolCfg("avg", (1, 1, 6, 6), 3, 2, 1, ceil_mode=True, count_include_pad=True),
    PoolCfg("avg", (1, 1, 6, 6), 3, 2, 1, ceil_mode=True, count_include_pad=False),
    PoolCfg("avg", (2, 3, 7), 2, 2, 1, ceil_mode=True, count_include_pad=True),
    PoolCfg("avg", (2, 3, 7), 2, 2, 0, ceil_mode=True, count_include_pad=True),
    PoolCfg("max", (2, 3, 5, 8), (2, 4), (3, 3), (1, 2), ceil_mode=True),
    # ceil_mode that torch rounds back down (window would start in right padding)
    PoolCfg("max", (1, 1, 5), 2, 2, 1, ceil_mode=True),
    PoolCfg("avg", (1, 1, 5), 2, 2, 1, ceil_mode=True, count_include_pad=True),
    # dilation
    PoolCfg("max", (2, 2, 9, 9), 3, 1, 1, dilation=2),
    PoolCfg("max", (1, 3, 11), 3, 2, 1, dilation=3, ceil_mode=True),
    PoolCfg("max", (1, 2, 6, 7, 8), 2, 1, 1, dilation=(1, 2, 3)),
    # stride 1 overlapping windows, kernel 1
    PoolCfg("avg", (2, 2, 5, 5), 3, 1, 1, count_include_pad=False),
    PoolCfg("max", (2, 2, 4, 5), 1, 1, 0),
    PoolCfg("avg", (2, 2, 4, 5), 1, 2, 0),
    # window as large as the input
    PoolCfg("max", (2, 3, 4, 4), 4, None, 0),
    PoolCfg("avg", (2, 3, 4, 6), (4, 6), None, 0),
    # float64
    PoolCfg("max", (2, 2, 7, 7), 3, 2, 1, dtype="float64"),
    PoolCfg("avg", (2, 2, 7, 7), 3, 2, 1, ceil_mode=True, count_include_pad=False, dtype="float64"),
    PoolCfg("avg", (1, 2, 5, 4, 6), 2, 2, 1, ceil_mode=True, dtype="float64"),
]

# The generated code splits every output axis into the interior (windows inside
# the input: no bounds checks, vectorised) and the border around it (checked).
# These exercise each side of that split; test_grid_covers_the_split says which.
SPLIT = [
    # no interior at all: every window reaches into padding or past the end
    PoolCfg("max", (2, 2, 3, 3), 3, 2, 1),
    PoolCfg("avg", (2, 2, 3, 3), 3, 2, 1, count_include_pad=False),
    # an interior along y only (x has none): every row is border
    PoolCfg("max", (1, 3, 9, 2), 3, (2, 1), 1),
    # the whole output is interior (no padding, no overhang)
    PoolCfg("max", (2, 3, 9, 12), 3, 2, 0),
    PoolCfg("avg", (2, 3, 9, 12), (3, 2), (2, 2), 0),
    PoolCfg("avg", (1, 2, 8, 8, 8), 2, None, 0),
    # resnet's first pool, small: one border output per axis, long interior rows
    PoolCfg("max", (1, 4, 40, 46), 3, 2, 1),
    PoolCfg("avg", (1, 4, 40, 46), 3, 2, 1),
    PoolCfg("avg", (1, 4, 40, 46), 3, 2, 1, count_include_pad=False),
    # interior rows of 16, 17 and 33 outputs (vector loop and its remainder)
    PoolCfg("max", (1, 2, 4, 34), 3, 2, 1),
    PoolCfg("max", (1, 2, 4, 36), 3, 2, 1),
    PoolCfg("avg", (1, 2, 4, 68), 3, 2, 1),
    PoolCfg("max", (1, 2, 5, 35), 3, 1, 1),
    # ceil_mode: the last windows run past the input, on both sides of a long interior
    PoolCfg("max", (1, 3, 20, 24), 3, 2, 0, ceil_mode=True),
    PoolCfg("avg", (1, 3, 20, 24), 3, 2, 0, ceil_mode=True),
    PoolCfg("avg", (1, 3, 21, 24), 3, 2, 1, ceil_mode=True, count_include_pad=False),
    PoolCfg("max", (2, 2, 31), 4, 3, 1, ceil_mode=True),
    # dilation inside the interior
    PoolCfg("max", (1, 2, 14, 30), 3, 1, 1, dilation=2),
    PoolCfg("max", (1, 2, 15, 33), (2, 3), (1, 2), (1, 1), dilation=(3, 2), ceil_mode=True),
    # 1D and 3D, interior and border
    PoolCfg("max", (2, 3, 50), 3, 2, 1),
    PoolCfg("avg", (2, 3, 50), 5, 2, 2, count_include_pad=False),
    PoolCfg("max", (1, 2, 9, 10, 23), 3, 2, 1, dilation=(2, 1, 1)),
    PoolCfg("avg", (1, 2, 9, 10, 23), 3, 2, 1, ceil_mode=True),
    # float64
    PoolCfg("max", (1, 3, 17, 30), 3, 2, 1, dtype="float64"),
    PoolCfg("avg", (1, 3, 17, 30), 3, 2, 1, dtype="float64"),
    PoolCfg("max", (2, 2, 41), 2, 2, 0, dtype="float64"),
]

CONFIGS = HANDPICKED + SPLIT + random_configs()
assert len({c.id for c in CONFIGS}) >= 60

GLOBAL_SHAPES = [((2, 3, 7), "float32"), ((3, 2, 5, 6), "float32"), ((1, 4, 3, 4, 5), "float32"),
                 ((2, 5, 9, 9), "float64"), ((2, 1, 1, 1), "float32")]


def _unique(cfgs):
    seen, out = set(), []
    for c in cfgs:
        if c.id not in seen:
            seen.add(c.id)
            out.append(c)
    return out


CONFIGS = _unique(CONFIGS)


# -- one graph holding every configuration --------------------------------------
@pytest.fixture(scope="module")
def suite():
    rng = np.random.default_rng(SEED)
    g = cc.Graph("pools")
    feeds, expected = {}, {}
    for i, cfg in enumerate(CONFIGS):
        x = g.input(f"x{i}", cfg.shape, cfg.dtype)
        a = rng.standard_normal(cfg.shape).astype(cfg.dtype)
        feeds[f"x{i}"] = a
        g.output(cfg.build(x), f"y{i}")
        expected[f"y{i}"] = cfg.torch(a)
    for j, (shape, dt) in enumerate(GLOBAL_SHAPES):
        x = g.input(f"gx{j}", shape, dt)
        a = rng.standard_normal(shape).astype(dt)
        feeds[f"gx{j}"] = a
        g.output(cc.global_avg_pool(x), f"gy{j}")
        expected[f"gy{j}"] = torch.from_numpy(a).mean(dim=tuple(range(2, len(shape))), keepdim=True).numpy()
    results = {t: cc.compile(g, target=t).run(feeds) for t in TARGETS}
    return results, expected


def _tol(dtype):
    return (1e-5, 1e-6) if dtype == "float32" else (1e-12, 1e-13)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("idx", range(len(CONFIGS)), ids=[c.id for c in CONFIGS])
def test_pool_matches_torch(suite, target, idx):
    results, expected = suite
    cfg = CONFIGS[idx]
    rtol, atol = _tol(cfg.dtype)
    assert_close(results[target][f"y{idx}"], expected[f"y{idx}"], rtol, atol, f"{cfg.id} on target {target}")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("j", range(len(GLOBAL_SHAPES)),
                         ids=[f"gap-{'x'.join(map(str, s))}-{d}" for s, d in GLOBAL_SHAPES])
def test_global_avg_pool_matches_torch_mean(suite, target, j):
    results, expected = suite
    shape, dt = GLOBAL_SHAPES[j]
    assert expected[f"gy{j}"].shape == shape[:2] + (1,) * (len(shape) - 2)
    rtol, atol = _tol(dt)
    assert_close(results[target][f"gy{j}"], expected[f"gy{j}"], rtol, atol,
                 f"global_avg_pool {shape} {dt} on target {target}")


def test_grid_covers_the_brief():
    """The grid really contains every feature the tests claim to cover."""
    kinds = {(c.kind, c.rank) for c in CONFIGS}
    assert kinds == {(k, r) for k in ("max", "avg") for r in (1, 2, 3)}
    assert any(c.stride is None for c in CONFIGS)
    assert any(c.ceil_mode for c in CONFIGS) and any(not c.ceil_mode for c in CONFIGS)
    assert any(c.kind == "avg" and not c.count_include_pad and tup(c.padding, c.rank) != (0,) * c.rank
               for c in CONFIGS)
    assert any(c.kind == "max" and tup(c.dilation, c.rank) != (1,) * c.rank for c in CONFIGS)
    assert any(c.shape[0] > 1 for c in CONFIGS)
    assert any(len(set(tup(c.kernel, c.rank))) > 1 for c in CONFIGS)
    assert any(c.dtype == "float64" for c in CONFIGS)


def split_axes(cfg):
    """The per-axis template context of cfg's node: i, o, k, s, d, p (low
    padding), hi (high padding) and the interior [first, end) Python chose."""
    g = cc.Graph("split")
    x = g.input("x", cfg.shape, cfg.dtype)
    d = g.node(cfg.build(x).name)
    return get_op(d["op"]).context(d["attrs"], [x.type], d["type"])["axes"]


def test_interior_is_exactly_the_windows_inside_the_input():
    """Brute force: per axis, the interior is every output whose window lies in
    [0, n) (contiguous), the border all the others; empty is (out, out)."""
    for cfg in CONFIGS:
        for a in split_axes(cfg):
            inside = [o for o in range(a["o"])
                      if o * a["s"] - a["p"] >= 0 and o * a["s"] - a["p"] + a["d"] * (a["k"] - 1) < a["i"]]
            want = (inside[0], inside[-1] + 1) if inside else (a["o"], a["o"])
            assert (a["first"], a["end"]) == want, f"{cfg.id} axis {a['l']}: {a}"
            assert inside == list(range(*want)), f"{cfg.id} axis {a['l']}: interior not contiguous"
    assert interior(112, 56, 3, 2, 1, 1) == (1, 56)        # resnet's first pool


def test_grid_covers_the_split():
    """Every side of the interior/border split is on the grid, for both pools."""
    axes = {c.id: split_axes(c) for c in CONFIGS}
    empty = lambda c: any(a["first"] == a["end"] for a in axes[c.id])                    # noqa: E731
    full = lambda c: all((a["first"], a["end"]) == (0, a["o"]) for a in axes[c.id])      # noqa: E731
    mixed = lambda c: not empty(c) and not full(c)                                       # noqa: E731
    past_end = lambda c: any((a["o"] - 1) * a["s"] - a["p"] + a["d"] * (a["k"] - 1) >= a["i"] + a["hi"]
                             for a in axes[c.id])                                        # noqa: E731
    for kind in ("max", "avg"):
        cfgs = [c for c in CONFIGS if c.kind == kind]
        assert any(empty(c) for c in cfgs) and any(full(c) for c in cfgs), kind
        assert any(all(a["first"] == a["end"] for a in axes[c.id]) for c in cfgs), kind
        assert any(mixed(c) and c.ceil_mode and past_end(c) for c in cfgs), kind
        assert {c.rank for c in cfgs if mixed(c)} == {1, 2, 3}, kind
        assert any(mixed(c) and c.dtype == "float64" for c in cfgs), kind
        assert any(not empty(c) and axes[c.id][-1]["end"] - axes[c.id][-1]["first"] >= 17 for c in cfgs), kind
    assert any(mixed(c) and any(a["d"] > 1 and a["first"] < a["end"] for a in axes[c.id]) for c in CONFIGS)
    assert any([a["first"] < a["end"] for a in axes[c.id]] == [True, False] for c in CONFIGS)   # y only


# -- NaN and infinities: max_pool propagates NaN (PyTorch), the interior skips the check --
NAN_CONFIGS = [
    PoolCfg("max", (1, 3, 20, 22), 3, 2, 1),
    PoolCfg("max", (2, 2, 9, 40), 3, 2, 1, dtype="float64"),
    PoolCfg("max", (1, 2, 12, 33), 2, 2, 0, ceil_mode=True),
    PoolCfg("max", (1, 2, 14, 30), 3, 1, 1, dilation=2),
    PoolCfg("max", (2, 3, 60), 3, 2, 1),
    PoolCfg("max", (1, 2, 9, 10, 23), 3, 2, 1, dilation=(2, 1, 1), ceil_mode=True),
    PoolCfg("max", (1, 2, 7, 6, 9), 2, 1, 0, dtype="float64"),
]
NAN_PATTERNS = {
    "sparse": "a few NaN anywhere (and some infinities)",
    "edges": "NaN only on the first and last row/column: border windows",
    "one": "one NaN in the middle: one interior row falls back",
    "all": "every element NaN",
    "inf": "infinities, no NaN: the interior keeps them exact",
}


def nan_input(cfg, pattern, rng):
    shape = cfg.shape
    a = rng.standard_normal(shape).astype(cfg.dtype)
    if pattern == "sparse":
        a[rng.random(shape) < 0.02] = np.nan
        a[rng.random(shape) < 0.01] = np.inf
        a[rng.random(shape) < 0.01] = -np.inf
    elif pattern == "edges":
        for ax in range(2, len(shape)):
            idx = [slice(None)] * len(shape)
            idx[ax] = [0, -1]
            a[tuple(idx)] = np.nan
    elif pattern == "one":       # the first tap of the middle interior window
        mid = [(ax["first"] + ax["end"]) // 2 for ax in split_axes(cfg)]
        a[(0, 0) + tuple(o * ax["s"] - ax["p"] for o, ax in zip(mid, split_axes(cfg)))] = np.nan
    elif pattern == "all":
        a[...] = np.nan
    else:
        a[rng.random(shape) < 0.05] = np.inf
        a[rng.random(shape) < 0.05] = -np.inf
    return a


NAN_CASES = [(cfg, pat) for cfg in NAN_CONFIGS for pat in NAN_PATTERNS]


@pytest.fixture(scope="module")
def nan_suite():
    rng = np.random.default_rng(SEED + 1)
    g = cc.Graph("pool_nan")
    feeds, expected = {}, {}
    for i, (cfg, pat) in enumerate(NAN_CASES):
        feeds[f"x{i}"] = nan_input(cfg, pat, rng)
        g.output(cfg.build(g.input(f"x{i}", cfg.shape, cfg.dtype)), f"y{i}")
        expected[f"y{i}"] = cfg.torch(feeds[f"x{i}"])
    return {t: cc.compile(g, target=t).run(feeds) for t in TARGETS}, expected


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("idx", range(len(NAN_CASES)), ids=[f"{c.id}-{p}" for c, p in NAN_CASES])
def test_max_pool_nan_and_inf_match_torch_and_reference(nan_suite, target, idx):
    results, expected = nan_suite
    cfg, pat = NAN_CASES[idx]
    got, want, ref = results[target][f"y{idx}"], expected[f"y{idx}"], results["numpy"][f"y{idx}"]
    if pat in ("sparse", "edges", "one", "all"):
        assert np.isnan(want).any(), f"{cfg.id}-{pat}: the case should put a NaN in some window"
    assert got.dtype == want.dtype, f"{cfg.id}-{pat} on {target}: dtype {got.dtype}"
    # a max copies one of its inputs: compare exactly (NaN matches NaN, inf matches inf)
    np.testing.assert_array_equal(ref, want, f"{cfg.id} with {NAN_PATTERNS[pat]}: numpy reference vs torch")
    np.testing.assert_array_equal(got, want, f"{cfg.id} with {NAN_PATTERNS[pat]} on target {target}")


def test_pool_output_shapes_by_hand():
    """Output sizes from PyTorch's formula worked out by hand."""
    g = cc.Graph("shapes")
    x = g.input("x", (2, 3, 6, 7))
    assert cc.max_pool(x, 2).shape == (2, 3, 3, 3)                      # floor(5/2)+1, floor(6/2)+1
    assert cc.max_pool(x, 3, 2, 1, ceil_mode=True).shape == (2, 3, 4, 4)  # ceil(5/2)+1=4; ceil(6/2)+1=4
    assert cc.max_pool(x, 3, 2, 1).shape == (2, 3, 3, 4)
    assert cc.avg_pool(x, (2, 3), (1, 2)).shape == (2, 3, 5, 3)
    assert cc.max_pool(x, 2, 1, 0, dilation=2).shape == (2, 3, 4, 5)
    assert cc.global_avg_pool(x).shape == (2, 3, 1, 1)
    y = g.input("y", (1, 1, 5))
    # ceil would give 4 windows, but the 4th would start at 6 >= 5 + 1: dropped (torch rule)
    assert cc.max_pool(y, 2, 2, 1, ceil_mode=True).shape == (1, 1, 3)


# -- padding convc allows beyond torch's k/2: compare with explicit padding -------
@pytest.mark.parametrize("target", TARGETS)
def test_padding_beyond_half_the_kernel_is_rejected(target):
    """convc follows PyTorch's rule pad <= k/2 (wider padding could leave a
    window holding nothing but padding)."""
    g = cc.Graph("widepad")
    x, y = g.input("x", (2, 2, 6, 5)), g.input("y", (1, 2, 9))
    with pytest.raises(cc.ValidationError, match=r"node 'p' \(max_pool\).*at most half the kernel"):
        cc.max_pool(x, 3, 2, (2, 1), name="p")
    with pytest.raises(cc.ValidationError, match=r"node 'q' \(avg_pool\).*at most half the kernel"):
        cc.avg_pool(y, 3, 1, 2, count_include_pad=True, name="q")
    cc.max_pool(x, 3, 2, (1, 1), name="ok")          # the boundary is allowed


@pytest.mark.parametrize("target", TARGETS)
def test_asymmetric_lo_hi_padding_equals_explicit_padding(target):
    """(lo, hi) pairs are convc's own extension: compare with F.pad + unpadded torch pools.
    count_include_pad=False divides by the number of real elements, i.e. the pooled
    padded input over the pooled padded mask of ones."""
    rng = np.random.default_rng(11)
    a = rng.standard_normal((2, 2, 7, 6)).astype(np.float32)
    g = cc.Graph("asym")
    x = g.input("x", a.shape)
    pads = ((0, 1), (1, 0))                       # H: lo 0 hi 1; W: lo 1 hi 0
    g.output(cc.max_pool(x, 3, 2, pads), "m")
    g.output(cc.avg_pool(x, 3, 2, pads, count_include_pad=True), "a_inc")
    g.output(cc.avg_pool(x, 3, 2, pads, count_include_pad=False), "a_exc")
    g.output(cc.max_pool(x, 3, 1, "same"), "m_same")
    g.output(cc.avg_pool(x, 2, 1, "same"), "a_same")    # total pad 1: on the high side
    res = cc.compile(g, target=target).run({"x": a})
    t = torch.from_numpy(a)
    torch_pad = (1, 0, 0, 1)                      # F.pad order: W lo, W hi, H lo, H hi
    ones = F.pad(torch.ones_like(t), torch_pad)
    want = {
        "m": F.max_pool2d(F.pad(t, torch_pad, value=-float("inf")), 3, 2),
        "a_inc": F.avg_pool2d(F.pad(t, torch_pad), 3, 2),
        "a_exc": F.avg_pool2d(F.pad(t, torch_pad), 3, 2) / F.avg_pool2d(ones, 3, 2),
        "m_same": F.max_pool2d(t, 3, 1, 1),
        "a_same": F.avg_pool2d(F.pad(t, (0, 1, 0, 1)), 2, 1),
    }
    for k, w in want.items():
        assert_close(res[k], w.numpy(), 1e-5, 1e-6, f"{k} on {target}")


# -- validation ------------------------------------------------------------------
@pytest.mark.parametrize("builder, node, op", [
    (lambda x: cc.max_pool(x, 2, padding=2, name="mp_bad"), "mp_bad", "max_pool"),          # extent 2
    (lambda x: cc.avg_pool(x, 3, padding=3, name="ap_bad"), "ap_bad", "avg_pool"),          # extent 3
    (lambda x: cc.max_pool(x, (3, 1), padding=(1, 1), name="mp_axis"), "mp_axis", "max_pool"),  # axis 1: k=1
    (lambda x: cc.max_pool(x, 2, 1, padding=3, dilation=2, name="mp_dil"), "mp_dil", "max_pool"),  # extent 3
    (lambda x: cc.avg_pool(x, 2, padding=((0, 2), (0, 0)), name="ap_hi"), "ap_hi", "avg_pool"),  # high side
])
def test_padding_larger_than_window_is_rejected(builder, node, op):
    g = cc.Graph("bad")
    x = g.input("x", (1, 2, 8, 8))
    with pytest.raises(cc.ValidationError) as ei:
        builder(x)
    msg = str(ei.value)
    assert f"'{node}'" in msg and op in msg, msg
    assert "padding" in msg and "window" in msg, msg
    assert node not in g.nx, "a rejected node must not be added to the graph"


def test_padding_of_half_the_kernel_is_allowed_with_dilation():
    g = cc.Graph("ok")
    x = g.input("x", (1, 1, 8, 8))
    # k // 2 = 1 is the limit whatever the dilation: (8 + 2 - 2*(2-1) - 1) // 1 + 1 = 8
    assert cc.max_pool(x, 2, 1, padding=1, dilation=2).shape == (1, 1, 8, 8)
    with pytest.raises(cc.ValidationError, match="at most half the kernel"):
        cc.max_pool(x, 2, 1, padding=2, dilation=2)


@pytest.mark.parametrize("target", TARGETS)
def test_no_accepted_max_pool_window_is_all_padding(target):
    """Either reject the config (torch: pad <= k/2) or never emit -inf for finite input.
    Window 0 covers positions -2 and 1, window 1 covers -1 and 2: none is in [0, 1)."""
    g = cc.Graph("allpad")
    x = g.input("x", (1, 1, 1))
    try:
        y = cc.max_pool(x, 2, 1, 2, dilation=3)
    except cc.ValidationError:
        return
    g.output(y, "y")
    out = cc.compile(g, target=target).run({"x": np.ones((1, 1, 1), np.float32)})["y"]
    assert np.isfinite(out).all(), f"max_pool window made only of padding gave {out.ravel()}"


@pytest.mark.parametrize("builder, words", [
    (lambda x: cc.max_pool(x, 9, name="too_big"), ("'too_big'", "larger than the padded input")),
    (lambda x: cc.max_pool(x, 0, name="k0"), ("'k0'", "kernel_size", ">= 1")),
    (lambda x: cc.avg_pool(x, 2, stride=0, name="s0"), ("'s0'", "stride", ">= 1")),
    (lambda x: cc.max_pool(x, (2, 2, 2), name="rank"), ("'rank'", "kernel_size")),
])
def test_bad_pool_attributes_are_rejected(builder, words):
    g = cc.Graph("bad")
    x = g.input("x", (1, 2, 8, 8))
    with pytest.raises(cc.ValidationError) as ei:
        builder(x)
    for w in words:
        assert w in str(ei.value), str(ei.value)


def test_pool_rejects_bad_rank_and_dtype():
    g = cc.Graph("bad")
    with pytest.raises(cc.ValidationError, match=r"'p2'.*rank"):
        cc.max_pool(g.input("v", (4, 4)), 2, name="p2")
    with pytest.raises(cc.ValidationError, match=r"'gap'.*rank"):
        cc.global_avg_pool(g.input("w", (1, 1, 2, 2, 2, 2)), name="gap")
    with pytest.raises(cc.ValidationError, match=r"'pi'.*float"):
        cc.avg_pool(g.input("i", (1, 1, 4, 4), "int64"), 2, name="pi")

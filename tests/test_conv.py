"""``cc.conv`` against PyTorch on a seeded grid of configurations.

Every configuration (rank 1/2/3, batch, per-axis stride and dilation, every
padding form, groups/depthwise, flip, tied/untied bias, float32/float64) is
one input and one output of a few big graphs, so the C compiler runs once per
graph; each configuration is still its own test item, named after it.

The oracle is torch in float64 on the same float32 values. Padding is turned
into explicit (lo, hi) pairs *here*, from DESIGN.md's rules, and applied with
``np.pad`` (or torch's own ``padding=`` where torch has the same form), so the
test does not reuse convc's padding code.
"""
from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convc as cc
import helpers
from helpers import assert_close, per_axis, run_both

TORCH_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
SEED = 20240917
N_RANDOM = 240


@dataclass(frozen=True)
class Cfg:
    rank: int
    n: int
    c_in: int
    c_out: int
    groups: int
    sizes: tuple
    kernel: tuple
    stride: object          # as passed to cc.conv: int or tuple
    dilation: object
    padding: object         # int, tuple, pairs, or a word
    flip: bool = False
    bias: str = "none"      # "none" | "tied" | "untied"
    dtype: str = "float32"
    tag: str = ""

    @property
    def id(self) -> str:
        pad = self.padding if isinstance(self.padding, str) else str(self.padding).replace(" ", "")
        parts = [f"{self.rank}d", f"n{self.n}", f"ci{self.c_in}", f"co{self.c_out}", f"g{self.groups}",
                 "in" + "x".join(map(str, self.sizes)), "k" + "x".join(map(str, self.kernel)),
                 f"s{_short(self.stride)}", f"d{_short(self.dilation)}", f"p{pad}"]
        if self.flip:
            parts.append("flip")
        if self.bias != "none":
            parts.append(self.bias)
        if self.dtype != "float32":
            parts.append("f64")
        if self.tag:
            parts.insert(0, self.tag)
        return "-".join(parts)


def _short(v):
    return str(v).replace(" ", "") if isinstance(v, tuple) else str(v)


def expected_pads(cfg: Cfg):
    """Explicit ((lo, hi), ...) pairs from the rules in DESIGN.md."""
    return helpers.expected_pads(cfg.padding, cfg.sizes, cfg.kernel, cfg.stride, cfg.dilation)


def expected_out(cfg: Cfg):
    return helpers.expected_out(cfg.sizes, cfg.kernel, cfg.stride, cfg.dilation, expected_pads(cfg))


def fits(cfg: Cfg) -> bool:
    r = cfg.rank
    d = per_axis(cfg.dilation, r)
    return all(n + lo + hi >= dd * (k - 1) + 1
               for n, k, dd, (lo, hi) in zip(cfg.sizes, cfg.kernel, d, expected_pads(cfg)))


# -- the configurations ---------------------------------------------------------

def _axis_tuple_or_int(rng, rank, choices):
    vals = tuple(rng.choice(choices) for _ in range(rank))
    if len(set(vals)) == 1 and rng.random() < 0.5:
        return vals[0]
    return vals


def random_cfg(rng: random.Random) -> Cfg:
    rank = rng.choices([1, 2, 3], weights=[3, 5, 2])[0]
    n = rng.choice([1, 1, 2, 3])
    kind = rng.choice(["plain", "plain", "plain", "grouped", "grouped", "depthwise"])
    if kind == "depthwise":
        c_in = rng.randint(1, 4)
        groups, c_out = c_in, c_in * rng.randint(1, 2)
    elif kind == "grouped":
        groups = rng.randint(2, 4)
        c_in, c_out = groups * rng.randint(1, 2), groups * rng.randint(1, 2)
    else:
        groups, c_in, c_out = 1, rng.randint(1, 4), rng.randint(1, 4)
    kmax, dil, nmax = {1: (5, [1, 1, 2, 3], 20), 2: (4, [1, 1, 2, 3], 11), 3: (3, [1, 1, 2], 7)}[rank]
    kernel = tuple(rng.randint(1, kmax) for _ in range(rank))
    stride = _axis_tuple_or_int(rng, rank, [1, 1, 2, 3])
    dilation = _axis_tuple_or_int(rng, rank, dil)
    form = rng.choice(["int", "tuple", "pairs", "pairs", "valid", "same", "same", "full"])
    if form == "int":
        padding = rng.randint(0, 3)
    elif form == "tuple":
        padding = tuple(rng.randint(0, 3) for _ in range(rank))
    elif form == "pairs":
        padding = tuple((rng.randint(0, 3), rng.randint(0, 3)) for _ in range(rank))
        if all(lo == hi for lo, hi in padding):           # make at least one axis asymmetric
            lo, hi = padding[0]
            padding = ((lo, hi + 1),) + padding[1:]
    else:
        padding = form
    flip = rng.random() < 0.25
    bias = rng.choices(["none", "tied", "untied"], weights=[4, 3, 3])[0]
    dtype = "float64" if rng.random() < 0.1 else "float32"
    while True:
        sizes = tuple(rng.randint(1, nmax) for _ in range(rank))
        cfg = Cfg(rank, n, c_in, c_out, groups, sizes, kernel, stride, dilation, padding, flip, bias, dtype)
        if fits(cfg):
            return cfg


def hand_picked():
    C = Cfg
    return [
        # "same" at stride 2 and 3 with odd total padding (extra on the high side)
        C(1, 2, 3, 4, 1, (7,), (4,), 2, 1, "same", tag="same_s2"),
        C(1, 1, 2, 2, 1, (10,), (3,), 3, 1, "same", tag="same_s3"),
        C(1, 1, 1, 1, 1, (11,), (2,), 3, 2, "same", tag="same_s3_d2"),
        C(2, 2, 2, 3, 1, (7, 9), (4, 2), (2, 3), 1, "same", bias="tied", tag="same_s23"),
        C(2, 1, 4, 4, 4, (8, 5), (3, 3), 2, (2, 1), "same", bias="untied", tag="same_dw"),
        C(3, 1, 2, 2, 1, (5, 6, 7), (2, 3, 2), (2, 3, 1), 1, "same", tag="same_3d"),
        C(2, 1, 2, 2, 1, (6, 6), (2, 2), 1, 1, "same", tag="same_s1_even"),
        # "full" with dilation: output n + d*(k-1) at stride 1
        C(1, 1, 2, 3, 1, (6,), (3,), 1, 2, "full", tag="full_d2"),
        C(2, 2, 2, 2, 2, (5, 4), (3, 2), 1, (2, 3), "full", bias="untied", tag="full_d23"),
        C(3, 1, 1, 2, 1, (4, 3, 5), (2, 2, 3), 1, (1, 2, 2), "full", tag="full_3d"),
        C(2, 1, 1, 1, 1, (5, 5), (3, 3), 2, 1, "full", flip=True, tag="full_s2"),
        # explicit asymmetric (lo, hi) pairs
        C(2, 2, 3, 2, 1, (6, 5), (3, 2), 1, 1, ((0, 2), (3, 0)), tag="pairs"),
        C(1, 1, 2, 2, 2, (9,), (3,), 2, 2, ((4, 1),), bias="tied", tag="pairs_big_lo"),
        C(3, 1, 2, 1, 1, (4, 5, 3), (2, 2, 2), (1, 2, 1), 1, ((1, 0), (0, 2), (2, 1)), tag="pairs_3d"),
        # padding wider than the kernel: border outputs are pure padding (+ bias)
        C(2, 1, 1, 2, 1, (3, 3), (2, 2), 1, 1, 3, bias="tied", tag="pad_gt_k"),
        # kernel as large as the input: one output per axis
        C(2, 1, 3, 2, 1, (4, 5), (4, 5), 1, 1, 0, bias="untied", tag="k_eq_in"),
        C(1, 2, 1, 1, 1, (1,), (1,), 1, 1, "valid", tag="size1"),
        # depthwise with a channel multiplier, and groups == C_in == C_out
        C(2, 3, 3, 6, 3, (7, 6), (3, 3), 1, 1, 1, bias="tied", tag="dw_mult2"),
        C(2, 1, 5, 5, 5, (6, 6), (3, 3), 2, 1, "same", flip=True, tag="dw"),
        C(1, 2, 4, 4, 4, (12,), (5,), 1, 2, "full", tag="dw_1d"),
        C(3, 2, 3, 3, 3, (4, 4, 4), (3, 3, 3), 1, 1, 1, bias="untied", tag="dw_3d"),
        # flip with an asymmetric kernel, per-axis stride/dilation
        C(2, 1, 2, 3, 1, (9, 8), (3, 2), (2, 1), (1, 3), (1, 2), flip=True, tag="flip"),
        C(1, 4, 3, 2, 1, (15,), (4,), 3, 2, "valid", flip=True, bias="untied", tag="batch4"),
        C(3, 2, 2, 4, 2, (5, 6, 4), (2, 3, 2), (1, 2, 2), (2, 1, 1), ((1, 1), (0, 1), (1, 0)),
          flip=True, bias="tied", tag="grp3d"),
        # float64 graphs
        C(2, 2, 3, 4, 1, (7, 6), (3, 3), 2, 1, "same", bias="tied", dtype="float64", tag="f64"),
        C(1, 1, 2, 2, 2, (10,), (4,), 1, 3, "full", flip=True, dtype="float64", tag="f64_full"),
    ]


def all_cfgs():
    rng = random.Random(SEED)
    cfgs = hand_picked() + [random_cfg(rng) for _ in range(N_RANDOM)]
    ids = [c.id for c in cfgs]
    # make ids unique (the random grid may repeat a configuration)
    seen = {}
    out = []
    for c, i in zip(cfgs, ids):
        seen[i] = seen.get(i, 0) + 1
        out.append((c, i if seen[i] == 1 else f"{i}#{seen[i]}"))
    return out


CFGS = all_cfgs()


def test_grid_covers_the_parameter_space():
    cfgs = [c for c, _ in CFGS]
    assert len(cfgs) >= 200
    r = lambda c: c.rank  # noqa: E731
    assert {r(c) for c in cfgs} == {1, 2, 3}
    assert any(c.n > 1 for c in cfgs)
    assert any(isinstance(c.stride, tuple) and len(set(c.stride)) > 1 for c in cfgs)
    assert any(isinstance(c.dilation, tuple) and len(set(c.dilation)) > 1 for c in cfgs)
    assert any(isinstance(c.padding, int) and c.padding > 0 for c in cfgs)
    assert any(isinstance(c.padding, tuple) and all(isinstance(p, int) for p in c.padding) for c in cfgs)
    assert any(isinstance(c.padding, tuple) and any(isinstance(p, tuple) and p[0] != p[1] for p in c.padding)
               for c in cfgs)
    for word in ("valid", "same", "full"):
        assert any(c.padding == word for c in cfgs), word
    assert any(c.padding == "same" and 2 in per_axis(c.stride, c.rank) for c in cfgs)
    assert any(c.padding == "same" and 3 in per_axis(c.stride, c.rank) for c in cfgs)
    assert any(c.padding == "full" and max(per_axis(c.dilation, c.rank)) > 1 for c in cfgs)
    assert any(1 < c.groups < c.c_in for c in cfgs)
    assert any(c.groups == c.c_in > 1 for c in cfgs)
    assert any(c.flip for c in cfgs)
    assert {c.bias for c in cfgs} == {"none", "tied", "untied"}
    assert {c.dtype for c in cfgs} == {"float32", "float64"}


# -- data, oracle, and the compiled graphs -----------------------------------------

def make_arrays(cfg: Cfg, index: int):
    """Deterministic input, weight and bias for one configuration."""
    rng = np.random.default_rng([SEED, index])
    x = rng.standard_normal((cfg.n, cfg.c_in) + cfg.sizes).astype(cfg.dtype)
    c_in_g = cfg.c_in // cfg.groups
    fan_in = c_in_g * math.prod(cfg.kernel)
    w = (rng.standard_normal((cfg.c_out, c_in_g) + cfg.kernel) / math.sqrt(fan_in)).astype(cfg.dtype)
    if cfg.bias == "tied":
        b = rng.standard_normal((cfg.c_out,)).astype(cfg.dtype)
    elif cfg.bias == "untied":
        b = rng.standard_normal((cfg.c_out,) + expected_out(cfg)).astype(cfg.dtype)
    else:
        b = None
    return x, w, b


def torch_conv(cfg: Cfg, x, w, b):
    """The oracle, in float64."""
    r = cfg.rank
    tx, tw = torch.from_numpy(x.astype(np.float64)), torch.from_numpy(w.astype(np.float64))
    if cfg.flip:
        tw = tw.flip(list(range(2, 2 + r)))
    stride, dilation = per_axis(cfg.stride, r), per_axis(cfg.dilation, r)
    tied = torch.from_numpy(b.astype(np.float64)) if cfg.bias == "tied" else None
    p = cfg.padding
    if p == "valid" or isinstance(p, int) or (isinstance(p, tuple) and all(isinstance(q, int) for q in p)):
        torch_pad = p                       # torch has these forms itself
    elif p == "same" and all(s == 1 for s in stride):
        torch_pad = "same"                  # torch: stride 1 only, extra on the high side
    else:
        pads = expected_pads(cfg)
        tx = torch.from_numpy(np.pad(x.astype(np.float64), [(0, 0), (0, 0)] + list(pads)))
        torch_pad = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = TORCH_CONV[r](tx, tw, tied, stride=stride, padding=torch_pad, dilation=dilation, groups=cfg.groups)
    y = y.numpy()
    if cfg.bias == "untied":
        y = y + b.astype(np.float64)[None]
    return y


@pytest.fixture(scope="module")
def grid():
    """Build the grid graphs (one per dtype), compile them for both targets and
    run them once. Returns (built configs, {config id: error convc raised while
    building it}, {target: {output name: array}}, {dtype: graph})."""
    built = {}
    errors = {}
    graphs = {}
    feeds = {}
    for index, (cfg, cid) in enumerate(CFGS):
        g = graphs.setdefault(cfg.dtype, cc.Graph(f"conv_grid_{cfg.dtype}"))
        x, w, b = make_arrays(cfg, index)
        name = f"c{index:03d}"
        try:
            xv = g.input(f"x{index:03d}", x.shape, cfg.dtype)
            feeds.setdefault(cfg.dtype, {})[xv.name] = x     # fed even if the conv below is rejected
            wv = g.param(f"w{index:03d}", w)
            bv = g.param(f"b{index:03d}", b) if b is not None else None
            y = cc.conv(xv, wv, bias=bv, stride=cfg.stride, padding=cfg.padding, dilation=cfg.dilation,
                        groups=cfg.groups, flip=cfg.flip, name=name)
            g.output(y, f"y{index:03d}")
        except cc.ConvcError as e:          # a valid config convc rejects: fail only that config
            errors[cid] = e
            continue
        built[cid] = dict(index=index, x=x, w=w, b=b, node=name, dtype=cfg.dtype)
    results = {t: {} for t in helpers.TARGETS}
    for dtype, g in graphs.items():
        for target in results:
            results[target].update(cc.compile(g, target=target).run(feeds[dtype]))
    return built, errors, results, graphs


@pytest.mark.parametrize("cfg", [c for c, _ in CFGS], ids=[i for _, i in CFGS])
def test_conv_matches_torch(grid, cfg):
    built, errors, results, graphs = grid
    cid = dict((c, i) for c, i in CFGS)[cfg]
    if cid in errors:
        raise AssertionError(f"convc rejected a valid configuration {cfg}: {errors[cid]}")
    info = built[cid]
    out_name = f"y{info['index']:03d}"
    node = graphs[cfg.dtype].node(info["node"])
    assert node["attrs"]["padding"] == expected_pads(cfg), f"{cid}: normalised padding"
    assert node["type"].shape == (cfg.n, cfg.c_out) + expected_out(cfg), f"{cid}: inferred shape"
    want = torch_conv(cfg, info["x"], info["w"], info["b"])
    tol = dict(rtol=1e-4, atol=1e-5) if cfg.dtype == "float32" else dict(rtol=1e-10, atol=1e-12)
    for target in helpers.TARGETS:
        got = results[target][out_name]
        assert got.dtype == np.dtype(cfg.dtype), f"{cid} [{target}]: dtype {got.dtype}"
        assert_close(got, want, what=f"conv {cid} [{target}] vs torch", **tol)


# -- "same" and "full" geometry, from hand-computed numbers ---------------------------

@pytest.mark.parametrize("n, k, s, d, pads, out", [
    # out = ceil(n/s); total = (out-1)*s + d*(k-1) + 1 - n; an odd total puts the extra high
    (7, 4, 2, 1, (1, 2), 4),     # total 3
    (10, 3, 3, 1, (1, 1), 4),    # total 2
    (10, 2, 3, 1, (0, 1), 4),    # total 9 + 2 - 10 = 1
    (11, 2, 3, 1, (0, 0), 4),    # total 9 + 2 - 11 = 0
    (8, 4, 3, 1, (1, 1), 3),     # total 6 + 4 - 8 = 2
    (8, 5, 3, 1, (1, 2), 3),     # total 6 + 5 - 8 = 3
    (9, 3, 3, 1, (0, 0), 3),     # total 0
    (5, 1, 2, 1, (0, 0), 3),     # 1x1 kernel never needs padding
    (6, 2, 2, 1, (0, 0), 3),     # total 0
    (12, 3, 2, 2, (1, 2), 6),    # total 10 + 5 - 12 = 3
    (7, 3, 1, 3, (3, 3), 7),     # stride 1: total d*(k-1) = 6
    (4, 2, 1, 1, (0, 1), 4),     # stride 1, even kernel
])
def test_same_padding_geometry(n, k, s, d, pads, out):
    for rank in (1, 2, 3):
        g = cc.Graph("same_geom")
        x = g.input("x", (1, 1) + (n,) * rank)
        y = cc.conv(x, np.ones((1, 1) + (k,) * rank, np.float32), stride=s, dilation=d, padding="same",
                    name="sameconv")
        assert y.shape == (1, 1) + (out,) * rank
        assert g.node("sameconv")["attrs"]["padding"] == (pads,) * rank


def test_same_padding_extra_goes_high_numbers():
    # n=7, k=4, s=2: pads (1, 2). Windows start at -1, 1, 3, 5 over x = 1..7:
    # 0+1+2+3, 2+3+4+5, 4+5+6+7, 6+7+0+0. (Extra padding low would give 0+0+1+2 first.)
    g = cc.Graph("same_high")
    x = g.input("x", (1, 1, 7))
    g.output(cc.conv(x, np.ones((1, 1, 4), np.float32), stride=2, padding="same"), "y")
    for target, res in zip(("numpy", "c"), run_both(g, {"x": np.arange(1, 8, dtype=np.float32).reshape(1, 1, 7)})):
        np.testing.assert_array_equal(res["y"], np.array([[[6, 14, 22, 13]]], np.float32), err_msg=target)


@pytest.mark.parametrize("n, k, d, out", [(6, 3, 2, 10), (5, 1, 3, 5), (4, 4, 1, 7), (3, 2, 3, 6)])
def test_full_padding_geometry(n, k, d, out):
    for rank in (1, 2, 3):
        g = cc.Graph("full_geom")
        x = g.input("x", (2, 1) + (n,) * rank)
        y = cc.conv(x, np.ones((3, 1) + (k,) * rank, np.float32), dilation=d, padding="full", name="fullconv")
        assert y.shape == (2, 3) + (out,) * rank
        assert g.node("fullconv")["attrs"]["padding"] == ((d * (k - 1),) * 2,) * rank

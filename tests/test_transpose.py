"""The gradient family of convolution: ``cc.conv_transpose`` (the book's h with
PyTorch's parameters), ``cc.conv_grad_input`` (Eq 6) and
``cc.conv_grad_kernel`` (Eq 5).

* ``conv_transpose`` against ``torch.nn.functional.conv_transpose{1,2,3}d`` on
  a seeded grid; (lo, hi) padding pairs (which torch lacks) are checked by
  cropping torch's padding=0 result.
* ``output_size`` against ``torch.nn.ConvTranspose2d(...)(x, output_size=...)``.
* ``conv_grad_input`` / ``conv_grad_kernel`` against torch autograd of the
  forward conv (x.grad and w.grad for a random upstream gradient G).
* Eq 5 and Eq 6 against literal loops written here.

Every configuration is one input/output pair of a few big graphs, so gcc runs
once per graph; every configuration is still its own test item.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convc as cc
import opinfo
from helpers import assert_close as close, expected_out, expected_pads, per_axis

SEED = 7351
from helpers import TARGETS


# -- small local helpers ---------------------------------------------------------------


def tol_for(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == "float32" else dict(rtol=1e-10, atol=1e-12)



def run_targets(g, feeds):
    """{target: {output name: array}} for both targets."""
    return {t: cc.compile(g, target=t).run(feeds) for t in TARGETS}


def short(v):
    return str(v).replace(" ", "")


# =====================================================================================
# conv_transpose vs torch
# =====================================================================================

@dataclass(frozen=True)
class TCfg:
    rank: int
    n: int
    c_in: int
    c_out: int
    groups: int
    sizes: tuple
    kernel: tuple
    stride: object
    padding: object          # int, per-axis tuple, or per-axis (lo, hi) pairs
    output_padding: object
    dilation: object
    bias: str = "none"       # none | tied | untied
    dtype: str = "float32"
    tag: str = ""

    def pads(self):
        p = self.padding
        if isinstance(p, int):
            return ((p, p),) * self.rank
        return tuple((q, q) if isinstance(q, int) else tuple(q) for q in p)

    def out(self):
        """(n-1)*s - lo - hi + d*(k-1) + output_padding + 1, per axis."""
        r = self.rank
        return tuple((n - 1) * s - lo - hi + d * (k - 1) + op + 1
                     for n, s, (lo, hi), d, k, op in zip(self.sizes, per_axis(self.stride, r), self.pads(),
                                                         per_axis(self.dilation, r), self.kernel,
                                                         per_axis(self.output_padding, r)))

    @property
    def id(self):
        parts = [f"{self.rank}d", f"n{self.n}", f"ci{self.c_in}", f"co{self.c_out}", f"g{self.groups}",
                 "in" + "x".join(map(str, self.sizes)), "k" + "x".join(map(str, self.kernel)),
                 f"s{short(self.stride)}", f"p{short(self.padding)}", f"op{short(self.output_padding)}",
                 f"d{short(self.dilation)}"]
        if self.bias != "none":
            parts.append(self.bias)
        if self.dtype != "float32":
            parts.append("f64")
        if self.tag:
            parts.insert(0, self.tag)
        return "-".join(parts)


def _int_or_tuple(rng, rank, choices):
    vals = tuple(rng.choice(choices) for _ in range(rank))
    return vals[0] if len(set(vals)) == 1 and rng.random() < 0.5 else vals


def random_tcfg(rng: random.Random) -> TCfg:
    rank = rng.choices([1, 2, 3], weights=[3, 5, 2])[0]
    n = rng.choice([1, 1, 2, 3])
    kind = rng.choice(["plain", "plain", "grouped", "depthwise"])
    if kind == "grouped":
        groups = rng.randint(2, 3)
        c_in, c_out = groups * rng.randint(1, 2), groups * rng.randint(1, 2)
    elif kind == "depthwise":
        c_in = rng.randint(2, 4)
        groups, c_out = c_in, c_in * rng.randint(1, 2)
    else:
        groups, c_in, c_out = 1, rng.randint(1, 4), rng.randint(1, 4)
    kmax, nmax = {1: (5, 9), 2: (4, 6), 3: (3, 4)}[rank]
    while True:
        kernel = tuple(rng.randint(1, kmax) for _ in range(rank))
        sizes = tuple(rng.randint(1, nmax) for _ in range(rank))
        stride = _int_or_tuple(rng, rank, [1, 1, 2, 3])
        dilation = _int_or_tuple(rng, rank, [1, 1, 2, 3] if rank < 3 else [1, 2])
        s, d = per_axis(stride, rank), per_axis(dilation, rank)
        ops = tuple(rng.randrange(max(ss, dd)) for ss, dd in zip(s, d))
        output_padding = ops[0] if len(set(ops)) == 1 and rng.random() < 0.5 else ops
        form = rng.choice(["int", "tuple", "pairs", "pairs"])
        if form == "int":
            padding = rng.randint(0, 2)
        elif form == "tuple":
            padding = tuple(rng.randint(0, 2) for _ in range(rank))
        else:
            padding = tuple((rng.randint(0, 3), rng.randint(0, 3)) for _ in range(rank))
            if all(lo == hi for lo, hi in padding):
                lo, hi = padding[0]
                padding = ((lo, hi + 1),) + padding[1:]
        bias = rng.choices(["none", "tied", "untied"], weights=[3, 3, 2])[0]
        dtype = "float64" if rng.random() < 0.15 else "float32"
        cfg = TCfg(rank, n, c_in, c_out, groups, sizes, kernel, stride, padding, output_padding, dilation,
                   bias, dtype)
        if all(o >= 1 for o in cfg.out()):
            return cfg


def hand_tcfgs():
    C = TCfg
    return [
        # the upsampler: stride 2, k 4, p 1 doubles the size
        C(2, 1, 3, 2, 1, (4, 4), (4, 4), 2, 1, 0, 1, "tied", tag="up2"),
        # output_padding smaller than dilation (stride 1) is legal in torch
        C(1, 2, 2, 3, 1, (5,), (3,), 1, 0, 1, 2, tag="op_lt_dil"),
        C(2, 1, 2, 2, 1, (3, 4), (2, 3), (1, 2), 1, (2, 1), (3, 1), tag="op_lt_dil2"),
        # output_padding at its largest: stride - 1
        C(1, 1, 1, 1, 1, (4,), (3,), 3, 1, 2, 1, "untied", tag="op_max"),
        C(3, 1, 2, 2, 2, (2, 3, 2), (2, 2, 3), (2, 3, 2), ((0, 1), (1, 0), (2, 0)), (1, 2, 0), 1, "tied",
          tag="grp3d_pairs"),
        # big asymmetric pairs that crop more than the kernel overlap
        C(2, 2, 2, 4, 2, (5, 3), (3, 2), 2, ((3, 0), (0, 2)), (1, 0), (1, 2), "untied", tag="pairs_big"),
        C(1, 1, 3, 2, 1, (6,), (4,), 2, ((0, 4),), 1, 1, tag="pairs_hi"),
        # output_padding larger than hi: torch's padding=0 result needs zeros past its end
        C(1, 1, 2, 2, 1, (3,), (2,), 3, ((1, 0),), 2, 1, "tied", tag="op_gt_hi"),
        # 1x1 kernels, size-1 input, depthwise
        C(2, 3, 4, 4, 4, (1, 1), (1, 1), 3, 0, (2, 1), 1, "tied", tag="size1"),
        C(2, 2, 3, 6, 3, (4, 5), (3, 3), (2, 1), (1, 0), (1, 0), 1, "untied", tag="dw_mult"),
        C(3, 2, 2, 3, 1, (3, 2, 3), (2, 3, 2), 2, 1, 1, (1, 2, 1), "none", "float64", tag="f64_3d"),
        C(2, 1, 2, 2, 1, (5, 4), (3, 3), 2, ((2, 1), (0, 3)), (1, 1), 2, "tied", "float64", tag="f64_pairs"),
    ]


def transpose_cfgs():
    rng = random.Random(SEED)
    cfgs = hand_tcfgs() + [random_tcfg(rng) for _ in range(170)]
    out, seen = [], {}
    for c in cfgs:
        seen[c.id] = seen.get(c.id, 0) + 1
        out.append((c, c.id if seen[c.id] == 1 else f"{c.id}#{seen[c.id]}"))
    return out


TCFGS = transpose_cfgs()


def tarrays(cfg: TCfg, index: int):
    rng = np.random.default_rng([SEED, index])
    x = rng.standard_normal((cfg.n, cfg.c_in) + cfg.sizes).astype(cfg.dtype)
    w = (rng.standard_normal((cfg.c_in, cfg.c_out // cfg.groups) + cfg.kernel)
         / math.sqrt(max(1, math.prod(cfg.kernel)))).astype(cfg.dtype)
    b = None
    if cfg.bias == "tied":
        b = rng.standard_normal(cfg.c_out).astype(cfg.dtype)
    elif cfg.bias == "untied":
        b = rng.standard_normal((cfg.c_out,) + cfg.out()).astype(cfg.dtype)
    return x, w, b


def as_config(cfg) -> opinfo.Config:
    """This file's TCfg / GCfg as an op-info Config (explicit per-axis values)."""
    r = cfg.rank
    extra = dict(output_padding=per_axis(cfg.output_padding, r), bias=cfg.bias) if isinstance(cfg, TCfg) \
        else dict(flip=cfg.flip)
    return opinfo.C(r, cfg.n, cfg.c_in, cfg.c_out, cfg.groups, cfg.sizes, cfg.kernel, per_axis(cfg.stride, r),
                    cfg.pads(), per_axis(cfg.dilation, r), **extra)


def torch_transpose(cfg: TCfg, x, w, b):
    """Oracle in float64: the transposed conv's op-info twin (tests/opinfo.py;
    torch's own padding where symmetric, (lo, hi) pairs by cropping torch's
    padding=0 result, zero-extended where output_padding asks for more)."""
    return opinfo.TRANSPOSED.torch(as_config(cfg), dict(x=x, w=w, b=b))


def test_transpose_grid_covers_the_space():
    cfgs = [c for c, _ in TCFGS]
    assert len(cfgs) >= 150
    assert {c.rank for c in cfgs} == {1, 2, 3}
    assert any(c.n > 1 for c in cfgs)
    assert any(isinstance(c.stride, tuple) and len(set(c.stride)) > 1 for c in cfgs)
    assert any(isinstance(c.padding, tuple) and any(isinstance(p, int) for p in c.padding) for c in cfgs)
    assert any(isinstance(c.padding, tuple) and any(isinstance(p, tuple) and p[0] != p[1] for p in c.padding)
               for c in cfgs)
    assert any(max(per_axis(c.output_padding, c.rank)) > 0 for c in cfgs)
    assert any(any(op >= s for op, s in zip(per_axis(c.output_padding, c.rank), per_axis(c.stride, c.rank)))
               for c in cfgs), "output_padding that only dilation allows"
    assert any(max(per_axis(c.dilation, c.rank)) > 1 for c in cfgs)
    assert any(1 < c.groups < c.c_in for c in cfgs) and any(c.groups == c.c_in > 1 for c in cfgs)
    assert {c.bias for c in cfgs} == {"none", "tied", "untied"}
    assert {c.dtype for c in cfgs} == {"float32", "float64"}


@pytest.fixture(scope="module")
def transpose_grid():
    graphs, feeds, built, errors = {}, {}, {}, {}
    for index, (cfg, cid) in enumerate(TCFGS):
        g = graphs.setdefault(cfg.dtype, cc.Graph(f"ct_grid_{cfg.dtype}"))
        x, w, b = tarrays(cfg, index)
        xv = g.input(f"x{index:03d}", x.shape, cfg.dtype)
        feeds.setdefault(cfg.dtype, {})[xv.name] = x
        try:
            y = cc.conv_transpose(xv, g.param(f"w{index:03d}", w),
                                  bias=g.param(f"b{index:03d}", b) if b is not None else None,
                                  stride=cfg.stride, padding=cfg.padding, output_padding=cfg.output_padding,
                                  dilation=cfg.dilation, groups=cfg.groups, name=f"ct{index:03d}")
            g.output(y, f"y{index:03d}")
        except cc.ConvcError as e:
            errors[cid] = e
            continue
        built[cid] = dict(index=index, x=x, w=w, b=b)
    results = {t: {} for t in TARGETS}
    for dtype, g in graphs.items():
        for t, res in run_targets(g, feeds[dtype]).items():
            results[t].update(res)
    return built, errors, results


@pytest.mark.parametrize("cfg", [c for c, _ in TCFGS], ids=[i for _, i in TCFGS])
def test_conv_transpose_matches_torch(transpose_grid, cfg):
    built, errors, results = transpose_grid
    cid = dict(TCFGS)[cfg]
    assert cid not in errors, f"convc rejected valid conv_transpose {cid}: {errors.get(cid)}"
    info = built[cid]
    want = torch_transpose(cfg, info["x"], info["w"], info["b"])
    assert want.shape == (cfg.n, cfg.c_out) + cfg.out()
    for t in TARGETS:
        got = results[t][f"y{info['index']:03d}"]
        assert got.dtype == np.dtype(cfg.dtype), f"{cid} [{t}]: dtype {got.dtype}"
        close(got, want, what=f"conv_transpose {cid} [{t}] vs torch", **tol_for(cfg.dtype))


# -- output_size ----------------------------------------------------------------------

def test_output_size_picks_output_padding():
    """Stride 2, k 3, p 1 from 4x4: 7x7 (output_padding 0) or 8x8 (1), per axis."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    b = rng.standard_normal(2).astype(np.float32)
    sizes = {"o77": (7, 7), "o88": (8, 8), "o78": (7, 8), "full": (2, 2, 8, 7)}
    g = cc.Graph("ct_outsize")
    xv = g.input("x", x.shape)
    wv, bv = g.param("w", w), g.param("b", b)
    for name, size in sizes.items():
        g.output(cc.conv_transpose(xv, wv, bv, stride=2, padding=1, output_size=size, name=f"ct_{name}"), name)
    # stride 1, dilation 3: output_padding up to 2 (reachable 10, 11, 12)
    g.output(cc.conv_transpose(xv, wv, bv, dilation=3, output_size=(12, 11), name="ct_dil"), "dil")
    res = run_targets(g, {"x": x})
    # (torch's output_size helper only knows stride; its functional form takes output_padding < dilation)
    want = F.conv_transpose2d(torch.from_numpy(x.astype(np.float64)), torch.from_numpy(w.astype(np.float64)),
                              torch.from_numpy(b.astype(np.float64)), dilation=3, output_padding=(2, 1)).numpy()
    assert want.shape == (2, 2, 12, 11)
    for t in TARGETS:
        close(res[t]["dil"], want, 1e-4, 1e-5, f"output_size=(12, 11) with dilation 3 [{t}]")
    layer = torch.nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1).double()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(w.astype(np.float64)))
        layer.bias.copy_(torch.from_numpy(b.astype(np.float64)))
        for name, size in sizes.items():
            want = layer(torch.from_numpy(x.astype(np.float64)), output_size=list(size[-2:])).numpy()
            assert want.shape[2:] == tuple(size[-2:])
            for t in TARGETS:
                close(res[t][name], want, 1e-4, 1e-5, f"output_size={size} [{t}]")


def test_output_size_unreachable_lists_reachable_sizes():
    g = cc.Graph("ct_unreach")
    x = g.input("x", (1, 3, 4, 4))
    w = np.ones((3, 2, 3, 3), np.float32)
    with pytest.raises(cc.ValidationError) as e:
        cc.conv_transpose(x, w, stride=2, padding=1, output_size=(9, 8), name="ct_far")
    msg = str(e.value)
    assert "ct_far" in msg and "output_size" in msg and "unreachable" in msg, msg
    assert "[7, 8]" in msg, f"reachable sizes 7 and 8 not listed: {msg}"
    with pytest.raises(cc.ValidationError) as e:
        cc.conv_transpose(x, w, stride=2, padding=1, output_size=(7, 6), name="ct_short")
    assert "[7, 8]" in str(e.value) and "axis 1" in str(e.value), str(e.value)
    # stride 3, dilation 1: three reachable sizes (3*3 - 2 + 2 + 1 = 10 .. 12)
    with pytest.raises(cc.ValidationError) as e:
        cc.conv_transpose(x, w, stride=3, padding=1, output_size=(13, 10), name="ct_s3")
    assert "[10, 11, 12]" in str(e.value), str(e.value)
    # stride 1, dilation 3: the dilation allows three sizes (3 + 3*2 + 1 = 10 .. 12)
    with pytest.raises(cc.ValidationError) as e:
        cc.conv_transpose(x, w, dilation=3, output_size=(13, 10), name="ct_d3")
    assert "[10, 11, 12]" in str(e.value), str(e.value)


def test_output_size_contradicting_output_padding_is_rejected():
    g = cc.Graph("ct_contra")
    x = g.input("x", (1, 3, 4, 4))
    with pytest.raises(cc.ValidationError) as e:
        cc.conv_transpose(x, np.ones((3, 2, 3, 3), np.float32), stride=2, padding=1, output_padding=1,
                          output_size=(7, 8), name="ct_contra")
    assert "ct_contra" in str(e.value) and "output_padding" in str(e.value)


# -- validation -------------------------------------------------------------------------

@pytest.mark.parametrize("xshape, wshape, kw, words", [
    ((1, 3, 4, 4), (4, 2, 3, 3), {}, ["weight dim 0", "3"]),
    ((1, 4, 4, 4), (4, 2, 3, 3), dict(groups=3), ["divisible", "groups"]),
    ((1, 2, 4), (2, 1, 3), dict(stride=2, output_padding=2), ["output_padding", "stride"]),
    ((1, 2, 4, 4), (2, 1, 3, 3), dict(stride=(2, 1), dilation=(1, 2), output_padding=(0, 2)),
     ["output_padding", "axis 1"]),
    ((1, 2, 4, 4), (2, 1, 3, 3), dict(stride=1, output_padding=1), ["output_padding"]),
    ((1, 2, 4, 4), (2, 1, 3), {}, ["weight", "rank"]),
    ((1, 2, 4, 4), (2, 1, 3, 3), dict(padding="same"), ["padding", "same"]),
    ((1, 2, 2, 2), (2, 1, 2, 2), dict(padding=3), ["output size", ">= 1"]),
], ids=["w_dim0_ne_cin", "groups_not_dividing", "op_eq_stride", "op_eq_dilation_axis1", "op_stride1",
        "weight_rank", "same_word", "pad_too_big"])
def test_conv_transpose_validation(xshape, wshape, kw, words):
    g = cc.Graph("ct_bad")
    x = g.input("x", xshape)
    with pytest.raises(cc.ConvcError) as e:
        cc.conv_transpose(x, np.ones(wshape, np.float32), name="ct_bad", **kw)
    msg = str(e.value)
    assert isinstance(e.value, cc.ValidationError)
    assert "ct_bad" in msg and "conv_transpose" in msg, msg
    for word in words:
        assert word in msg, f"{word!r} not in {msg!r}"


# =====================================================================================
# conv_grad_input / conv_grad_kernel vs torch autograd
# =====================================================================================

@dataclass(frozen=True)
class GCfg:
    rank: int
    n: int
    c_in: int
    c_out: int
    groups: int
    sizes: tuple
    kernel: tuple
    stride: object
    padding: object          # int, tuple, pairs, "same", "full", "valid"
    dilation: object
    flip: bool = False
    tag: str = ""

    def pads(self):
        return expected_pads(self.padding, self.sizes, self.kernel, self.stride, self.dilation)

    def out(self):
        return expected_out(self.sizes, self.kernel, self.stride, self.dilation, self.pads())

    @property
    def id(self):
        parts = [f"{self.rank}d", f"n{self.n}", f"ci{self.c_in}", f"co{self.c_out}", f"g{self.groups}",
                 "in" + "x".join(map(str, self.sizes)), "k" + "x".join(map(str, self.kernel)),
                 f"s{short(self.stride)}", f"p{short(self.padding)}", f"d{short(self.dilation)}"]
        if self.flip:
            parts.append("flip")
        if self.tag:
            parts.insert(0, self.tag)
        return "-".join(parts)


def random_gcfg(rng: random.Random) -> GCfg:
    rank = rng.choices([1, 2, 3], weights=[3, 5, 2])[0]
    n = rng.choice([1, 2, 3])
    kind = rng.choice(["plain", "plain", "grouped", "depthwise"])
    if kind == "grouped":
        groups = rng.randint(2, 3)
        c_in, c_out = groups * rng.randint(1, 2), groups * rng.randint(1, 2)
    elif kind == "depthwise":
        c_in = rng.randint(2, 4)
        groups, c_out = c_in, c_in * rng.randint(1, 2)
    else:
        groups, c_in, c_out = 1, rng.randint(1, 3), rng.randint(1, 3)
    kmax, nmax = {1: (5, 14), 2: (4, 9), 3: (3, 5)}[rank]
    while True:
        kernel = tuple(rng.randint(1, kmax) for _ in range(rank))
        sizes = tuple(rng.randint(1, nmax) for _ in range(rank))
        stride = _int_or_tuple(rng, rank, [1, 1, 2, 3])
        dilation = _int_or_tuple(rng, rank, [1, 1, 2] if rank == 3 else [1, 1, 2, 3])
        form = rng.choice(["int", "tuple", "pairs", "pairs", "same", "same", "full", "valid"])
        if form == "int":
            padding = rng.randint(0, 2)
        elif form == "tuple":
            padding = tuple(rng.randint(0, 2) for _ in range(rank))
        elif form == "pairs":
            padding = tuple((rng.randint(0, 2), rng.randint(0, 3)) for _ in range(rank))
            if all(lo == hi for lo, hi in padding):
                padding = ((padding[0][0], padding[0][1] + 1),) + padding[1:]
        else:
            padding = form
        cfg = GCfg(rank, n, c_in, c_out, groups, sizes, kernel, stride, padding, dilation,
                   flip=rng.random() < 0.15)
        d = per_axis(dilation, rank)
        if all(nn + lo + hi >= dd * (k - 1) + 1 for nn, k, dd, (lo, hi) in zip(sizes, kernel, d, cfg.pads())):
            return cfg


def hand_gcfgs():
    C = GCfg
    return [
        C(2, 2, 3, 4, 1, (7, 8), (3, 4), 2, "same", 1, tag="same_s2"),          # odd total padding
        C(1, 1, 2, 2, 1, (10,), (4,), 2, "same", 2, tag="same_s2_d2"),
        C(2, 1, 2, 3, 1, (9, 7), (3, 3), (2, 3), "same", (1, 2), tag="same_s23"),
        C(3, 1, 2, 2, 2, (5, 4, 6), (3, 2, 2), 2, "same", 1, tag="same_3d_s2"),
        C(2, 2, 2, 2, 1, (5, 4), (3, 2), 1, "full", (2, 1), tag="full_d2"),
        C(1, 1, 3, 2, 1, (6,), (3,), 2, "full", 1, tag="full_s2"),
        C(2, 1, 2, 2, 1, (8, 7), (3, 2), 3, "valid", 1, tag="valid_s3_unused_tail"),  # rows past the last window
        C(2, 2, 4, 4, 4, (6, 6), (3, 3), 2, ((0, 2), (1, 0)), 1, tag="dw_pairs"),
        C(2, 1, 4, 6, 2, (5, 6), (2, 3), (1, 2), 1, (2, 1), flip=True, tag="flip_grp"),
        C(3, 2, 2, 2, 1, (4, 5, 3), (2, 3, 2), (2, 1, 1), ((1, 0), (0, 2), (1, 1)), 1, tag="pairs_3d"),
    ]


def grad_cfgs():
    rng = random.Random(SEED + 1)
    cfgs = hand_gcfgs() + [random_gcfg(rng) for _ in range(110)]
    out, seen = [], {}
    for c in cfgs:
        seen[c.id] = seen.get(c.id, 0) + 1
        out.append((c, c.id if seen[c.id] == 1 else f"{c.id}#{seen[c.id]}"))
    return out


GCFGS = grad_cfgs()


def garrays(cfg: GCfg, index: int):
    rng = np.random.default_rng([SEED, 99, index])
    v = rng.standard_normal((cfg.n, cfg.c_in) + cfg.sizes)
    k = rng.standard_normal((cfg.c_out, cfg.c_in // cfg.groups) + cfg.kernel)
    gy = rng.standard_normal((cfg.n, cfg.c_out) + cfg.out())
    return v, k, gy


def torch_grads(cfg: GCfg, v, k, gy):
    """(dV, dK) of sum(conv(V, K) * G) by torch autograd, float64: the op-info
    twins of h and g (tests/opinfo.py; padding applied explicitly with F.pad
    where asymmetric, so every padding form is covered)."""
    c = as_config(cfg)
    assert c.conv_out == gy.shape[2:], f"{cfg.id}: the conv gives {c.conv_out}, G is {gy.shape}"
    return opinfo.H.torch(c, dict(k=k, gy=gy)), opinfo.G.torch(c, dict(gy=gy, v=v))


def test_grad_grid_covers_the_space():
    cfgs = [c for c, _ in GCFGS]
    assert len(cfgs) >= 100
    assert {c.rank for c in cfgs} == {1, 2, 3}
    assert {"same", "full", "valid"} <= {c.padding for c in cfgs if isinstance(c.padding, str)}
    assert any(c.padding == "same" and 2 in per_axis(c.stride, c.rank) for c in cfgs)
    assert any(isinstance(c.padding, int) and c.padding > 0 for c in cfgs)
    assert any(isinstance(c.padding, tuple) and any(isinstance(p, tuple) and p[0] != p[1] for p in c.padding)
               for c in cfgs)
    assert any(max(per_axis(c.dilation, c.rank)) > 1 for c in cfgs)
    assert any(max(per_axis(c.stride, c.rank)) > 1 for c in cfgs)
    assert any(c.groups > 1 for c in cfgs) and any(c.n > 1 for c in cfgs)


@pytest.fixture(scope="module")
def grad_grid():
    g = cc.Graph("conv_grad_grid")
    feeds, built, errors = {}, {}, {}
    for index, (cfg, cid) in enumerate(GCFGS):
        v, k, gy = garrays(cfg, index)
        vv = g.input(f"v{index:03d}", v.shape, "float64")
        kv = g.input(f"k{index:03d}", k.shape, "float64")
        gv = g.input(f"g{index:03d}", gy.shape, "float64")
        feeds.update({vv.name: v, kv.name: k, gv.name: gy})
        try:
            common = dict(stride=cfg.stride, padding=cfg.padding, dilation=cfg.dilation, groups=cfg.groups,
                          flip=cfg.flip)
            dx = cc.conv_grad_input(kv, gv, cfg.sizes, name=f"gi{index:03d}", **common)
            dk = cc.conv_grad_kernel(gv, vv, cfg.kernel, name=f"gk{index:03d}", **common)
            g.output(dx, f"dx{index:03d}")
            g.output(dk, f"dk{index:03d}")
        except cc.ConvcError as e:
            errors[cid] = e
            continue
        built[cid] = dict(index=index, v=v, k=k, gy=gy)
    return built, errors, run_targets(g, feeds)


@pytest.mark.parametrize("cfg", [c for c, _ in GCFGS], ids=[i for _, i in GCFGS])
def test_conv_grads_match_torch_autograd(grad_grid, cfg):
    built, errors, results = grad_grid
    cid = dict(GCFGS)[cfg]
    assert cid not in errors, f"convc rejected valid conv_grad_* {cid}: {errors.get(cid)}"
    info = built[cid]
    want_dx, want_dk = torch_grads(cfg, info["v"], info["k"], info["gy"])
    for t in TARGETS:
        close(results[t][f"dx{info['index']:03d}"], want_dx, 1e-9, 1e-11, f"conv_grad_input {cid} [{t}]")
        close(results[t][f"dk{info['index']:03d}"], want_dk, 1e-9, 1e-11, f"conv_grad_kernel {cid} [{t}]")


# =====================================================================================
# Eq 5 and Eq 6 as literal loops
# =====================================================================================

def eq5_literal(G, V, s, kh, kw):
    """g(G, V, s)[i,j,k,l] = sum_{m,n} G[i,m,n] * V[j, m*s + k, n*s + l]."""
    ci_, mh, nw = G.shape
    cj = V.shape[0]
    out = np.zeros((ci_, cj, kh, kw))
    for i in range(ci_):
        for j in range(cj):
            for k in range(kh):
                for l in range(kw):
                    acc = 0.0
                    for m in range(mh):
                        for n in range(nw):
                            acc += G[i, m, n] * V[j, m * s + k, n * s + l]
                    out[i, j, k, l] = acc
    return out


def eq6_literal(K, G, s, H, W):
    """h(K, G, s)[i,j,k] = sum over (l,m) with l*s + m = j, (n,p) with
    n*s + p = k, and q, of K[q,i,m,p] * G[q,l,n]."""
    cq, ci_, kh, kw = K.shape
    _, gl, gn = G.shape
    out = np.zeros((ci_, H, W))
    for i in range(ci_):
        for j in range(H):
            for k in range(W):
                acc = 0.0
                for l in range(gl):
                    m = j - l * s
                    if not 0 <= m < kh:
                        continue
                    for n in range(gn):
                        p = k - n * s
                        if not 0 <= p < kw:
                            continue
                        for q in range(cq):
                            acc += K[q, i, m, p] * G[q, l, n]
                out[i, j, k] = acc
    return out


EQ_CASES = [  # (C_out, C_in, H, W, kh, kw, s)
    (2, 3, 6, 7, 3, 2, 1),
    (3, 2, 7, 8, 3, 3, 2),      # (7-3) % 2 == 0, (8-3) % 2 == 1: the last column is never read
    (1, 2, 9, 8, 2, 4, 3),
    (2, 1, 5, 5, 5, 1, 2),
    (2, 2, 4, 6, 1, 1, 2),
]


@pytest.fixture(scope="module")
def eq_results():
    g = cc.Graph("eq56")
    feeds, cases = {}, []
    for idx, (co, ci_, H, W, kh, kw, s) in enumerate(EQ_CASES):
        rng = np.random.default_rng([5, idx])
        oh, ow = (H - kh) // s + 1, (W - kw) // s + 1
        V = rng.standard_normal((ci_, H, W))
        K = rng.standard_normal((co, ci_, kh, kw))
        G = rng.standard_normal((co, oh, ow))
        v = g.input(f"v{idx}", (1, ci_, H, W), "float64")
        k = g.input(f"k{idx}", K.shape, "float64")
        gg = g.input(f"g{idx}", (1, co, oh, ow), "float64")
        feeds.update({f"v{idx}": V[None], f"k{idx}": K, f"g{idx}": G[None]})
        g.output(cc.conv_grad_kernel(gg, v, (kh, kw), stride=s), f"gk{idx}")
        g.output(cc.conv_grad_input(k, gg, (H, W), stride=s), f"gi{idx}")
        cases.append((V, K, G))
    return cases, run_targets(g, feeds)


@pytest.mark.parametrize("idx", range(len(EQ_CASES)), ids=[f"co{c[0]}-ci{c[1]}-{c[2]}x{c[3]}-k{c[4]}x{c[5]}-s{c[6]}"
                                                          for c in EQ_CASES])
def test_eq5_kernel_gradient_literal(eq_results, idx):
    cases, res = eq_results
    V, K, G = cases[idx]
    co, ci_, H, W, kh, kw, s = EQ_CASES[idx]
    want = eq5_literal(G, V, s, kh, kw)
    for t in TARGETS:
        close(res[t][f"gk{idx}"], want, 1e-10, 1e-12, f"Eq 5 case {EQ_CASES[idx]} [{t}]")


@pytest.mark.parametrize("idx", range(len(EQ_CASES)), ids=[f"co{c[0]}-ci{c[1]}-{c[2]}x{c[3]}-k{c[4]}x{c[5]}-s{c[6]}"
                                                          for c in EQ_CASES])
def test_eq6_input_gradient_literal(eq_results, idx):
    cases, res = eq_results
    V, K, G = cases[idx]
    co, ci_, H, W, kh, kw, s = EQ_CASES[idx]
    want = eq6_literal(K, G, s, H, W)[None]
    for t in TARGETS:
        close(res[t][f"gi{idx}"], want, 1e-10, 1e-12, f"Eq 6 case {EQ_CASES[idx]} [{t}]")
    if (W - kw) % s:
        assert np.all(want[..., -1] == 0), "the literal Eq 6 leaves unread columns at zero"


# =====================================================================================
# conv_grad_input == conv_transpose with the same kernel
# =====================================================================================

IDENTITY_CASES = [  # (rank, n, c_in, c_out, groups, sizes, kernel, stride, padding, dilation)
    (2, 2, 3, 4, 1, (7, 8), (3, 3), 2, 1, 1),
    (2, 1, 4, 6, 2, (9, 6), (3, 2), (3, 2), ((1, 0), (2, 1)), (1, 2)),
    (1, 2, 2, 3, 1, (11,), (4,), 3, 2, 2),
    (3, 1, 2, 2, 2, (5, 6, 4), (2, 3, 2), (2, 1, 2), 0, 1),
    (2, 1, 3, 3, 3, (8, 8), (3, 3), 2, ((0, 1), (0, 1)), 1),
]


@pytest.mark.parametrize("case", IDENTITY_CASES, ids=[f"case{i}" for i in range(len(IDENTITY_CASES))])
def test_conv_grad_input_is_conv_transpose(case):
    rank, n, c_in, c_out, groups, sizes, kernel, stride, padding, dilation = case
    cfg = GCfg(rank, n, c_in, c_out, groups, sizes, kernel, stride, padding, dilation)
    rng = np.random.default_rng(list(sizes) + list(kernel))
    K = rng.standard_normal((c_out, c_in // groups) + kernel)
    G = rng.standard_normal((n, c_out) + cfg.out())
    g = cc.Graph("gi_vs_ct")
    kv, gv = g.input("k", K.shape, "float64"), g.input("g", G.shape, "float64")
    g.output(cc.conv_grad_input(kv, gv, sizes, stride=stride, padding=padding, dilation=dilation,
                                groups=groups), "gi")
    ct = cc.conv_transpose(gv, kv, stride=stride, padding=padding, dilation=dilation, groups=groups,
                           output_size=sizes, name="ct")
    g.output(ct, "ct")
    assert ct.shape == (n, c_in) + sizes
    res = run_targets(g, {"k": K, "g": G})
    want_dx, _ = torch_grads(cfg, np.zeros((n, c_in) + sizes), K, G)
    for t in TARGETS:
        close(res[t]["gi"], res[t]["ct"], 1e-12, 1e-12, f"grad_input vs conv_transpose {case} [{t}]")
        close(res[t]["ct"], want_dx, 1e-9, 1e-11, f"conv_transpose(output_size) vs torch grad {case} [{t}]")


# =====================================================================================
# conv_grad_* validation
# =====================================================================================

def test_conv_grad_input_rejects_g_of_wrong_shape():
    g = cc.Graph("gi_bad")
    k = g.input("k", (4, 3, 3, 3))
    gy = g.input("gy", (2, 4, 5, 5))          # conv of (2, 3, 8, 8) with k 3 gives (2, 4, 6, 6)
    with pytest.raises(cc.ValidationError) as e:
        cc.conv_grad_input(k, gy, (8, 8), name="gi_bad")
    msg = str(e.value)
    assert "gi_bad" in msg and "conv_grad_input" in msg and "output gradient" in msg, msg
    assert "(2, 4, 6, 6)" in msg, msg
    gy2 = g.input("gy2", (2, 5, 6, 6))        # wrong channel count
    with pytest.raises(cc.ValidationError) as e:
        cc.conv_grad_input(k, gy2, (8, 8), name="gi_bad2")
    assert "gi_bad2" in str(e.value)


def test_conv_grad_kernel_rejects_g_of_wrong_shape():
    g = cc.Graph("gk_bad")
    v = g.input("v", (2, 3, 8, 8))
    gy = g.input("gy", (2, 4, 3, 3))          # with stride 2, k 3 the output is 3x3; stride 1 gives 6x6
    with pytest.raises(cc.ValidationError) as e:
        cc.conv_grad_kernel(gy, v, (3, 3), stride=1, name="gk_bad")
    msg = str(e.value)
    assert "gk_bad" in msg and "conv_grad_kernel" in msg and "output gradient" in msg, msg
    gyb = g.input("gyb", (1, 4, 6, 6))        # batch differs from V's
    with pytest.raises(cc.ValidationError) as e:
        cc.conv_grad_kernel(gyb, v, (3, 3), name="gk_batch")
    assert "gk_batch" in str(e.value)
    with pytest.raises(cc.ValidationError) as e:
        cc.conv_grad_kernel(gy, v, (3, 3), stride=2, groups=2, name="gk_groups")
    assert "gk_groups" in str(e.value) and "groups" in str(e.value)


# =====================================================================================
# bad arguments must raise ConvcError, never a raw Python exception
# =====================================================================================

def test_conv_transpose_int_output_size_is_not_a_crash():
    g = cc.Graph("ct_int_size")
    x = g.input("x", (1, 2, 4))
    try:
        y = cc.conv_transpose(x, np.ones((2, 3, 3), np.float32), stride=2, output_size=10, name="ct_int")
    except cc.ConvcError:
        return                     # rejecting it with a proper error is fine too
    assert y.shape == (1, 3, 10)   # (4-1)*2 + 3 = 9, output_padding 1 -> 10


def test_conv_transpose_output_size_of_wrong_length_is_rejected():
    g = cc.Graph("ct_len_size")
    x = g.input("x", (1, 2, 4))
    with pytest.raises(cc.ValidationError) as e:
        cc.conv_transpose(x, np.ones((2, 3, 3), np.float32), stride=2, output_size=(99, 10), name="ct_len")
    assert "ct_len" in str(e.value) and "output_size" in str(e.value)


def test_conv_grad_input_none_input_size_is_a_validation_error():
    g = cc.Graph("gi_none")
    k, gy = g.input("k", (3, 2, 3)), g.input("g", (1, 3, 4))
    with pytest.raises(cc.ValidationError) as e:
        cc.conv_grad_input(k, gy, None, name="gi_none")
    assert "gi_none" in str(e.value) and "input_size" in str(e.value)


def test_conv_transpose_valid_padding_word():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 2, 5)).astype(np.float32)
    w = rng.standard_normal((2, 3, 3)).astype(np.float32)
    g = cc.Graph("ct_valid")
    g.output(cc.conv_transpose(g.input("x", x.shape), w, stride=2, padding="valid"), "y")
    want = F.conv_transpose1d(torch.from_numpy(x).double(), torch.from_numpy(w).double(), stride=2).numpy()
    for t, r in run_targets(g, {"x": x}).items():
        close(r["y"], want, 1e-4, 1e-5, f"conv_transpose padding='valid' [{t}]")

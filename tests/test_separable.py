"""The separable family and grouped/shuffled convs, against compositions of
torch convolutions: ``depthwise_conv``, ``separable_conv``,
``spatial_separable_conv``, ``flattened_conv``, pointwise grouped conv and
ShuffleNet's grouped conv -> ``channel_shuffle`` -> grouped conv.

Also: a rank-1 (Sobel) kernel through spatial_separable_conv equals cc.conv
with the full kernel, ``cc.cost`` worked examples, and validation errors.

All numeric cases live in one graph, compiled once per target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convc as cc
from helpers import TARGETS, expected_pads
from helpers import assert_close as close
RTOL, ATOL = 1e-4, 1e-5


def T(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def pair(v):
    return tuple(v) if isinstance(v, tuple) else (v, v)


def tpad(x, pads):
    (t, b), (l, r) = pads
    return F.pad(x, (l, r, t, b))


def add_bias(y, b):
    if b is None:
        return y
    b = T(b)
    return y + (b.reshape(1, -1, 1, 1) if b.ndim == 1 else b[None])


# =====================================================================================
# the numeric cases: (name, builder into the graph, torch oracle)
# =====================================================================================

CASES = {}


def case(name):
    def deco(fn):
        CASES[name] = fn
        return fn
    return deco


class Ctx:
    """Adds inputs/params to the shared graph with names prefixed by the case."""

    def __init__(self, g, name, feeds):
        self.g, self.name, self.feeds = g, name, feeds
        self.rng = np.random.default_rng([len(name), sum(map(ord, name))])
        self.k = 0

    def x(self, shape):
        a = self.rng.standard_normal(shape).astype(np.float32)
        v = self.g.input(f"{self.name}_x{self.k}", shape)
        self.feeds[v.name] = a
        self.k += 1
        return v, a

    def w(self, shape, scale=None):
        scale = scale or 1.0 / math.sqrt(max(1, math.prod(shape[1:])))
        a = (self.rng.standard_normal(shape) * scale).astype(np.float32)
        v = self.g.param(f"{self.name}_w{self.k}", a)
        self.k += 1
        return v, a


# -- depthwise ----------------------------------------------------------------------------

def _depthwise(name, xshape, mult, k, stride, padding, dilation, bias):
    @case(name)
    def _(c):
        x, xa = c.x(xshape)
        ch = xshape[1]
        w, wa = c.w((ch * mult, 1) + k)
        ba = c.rng.standard_normal(ch * mult).astype(np.float32) if bias else None
        y = cc.depthwise_conv(x, w, g_param(c, ba), stride=stride, padding=padding, dilation=dilation)
        rank = len(xshape) - 2
        conv = {1: F.conv1d, 2: F.conv2d}[rank]
        if rank == 2:
            p = expected_pads(padding, xshape[2:], k, pair(stride), pair(dilation))
            want = conv(tpad(T(xa), p), T(wa), T(ba) if bias else None, stride=stride, dilation=dilation,
                        groups=ch)
        else:
            want = conv(T(xa), T(wa), T(ba) if bias else None, stride=stride, padding=padding, dilation=dilation,
                        groups=ch)
        return y, want.numpy()


def g_param(c, a):
    if a is None:
        return None
    v = c.g.param(f"{c.name}_b{c.k}", a)
    c.k += 1
    return v


_depthwise("dw_basic", (2, 3, 8, 7), 1, (3, 3), 1, 1, 1, False)
_depthwise("dw_mult2_s2_same", (2, 3, 9, 8), 2, (3, 3), 2, "same", 1, True)
_depthwise("dw_dil_pairs", (1, 4, 10, 9), 1, (3, 2), (1, 2), ((2, 0), (1, 1)), (2, 1), True)
_depthwise("dw_1d", (2, 5, 12), 3, (4,), 2, 1, 2, True)


# -- separable (depthwise then 1x1) ---------------------------------------------------------

def _separable(name, xshape, mult, cout, k, stride, padding, dilation, bias):
    @case(name)
    def _(c):
        x, xa = c.x(xshape)
        ch = xshape[1]
        wd, wda = c.w((ch * mult, 1) + k)
        wp, wpa = c.w((cout, ch * mult, 1, 1))
        ba = c.rng.standard_normal(cout).astype(np.float32) if bias else None
        y = cc.separable_conv(x, wd, wp, g_param(c, ba), stride=stride, padding=padding, dilation=dilation)
        p = expected_pads(padding, xshape[2:], k, pair(stride), pair(dilation))
        h = F.conv2d(tpad(T(xa), p), T(wda), stride=stride, dilation=dilation, groups=ch)
        return y, F.conv2d(h, T(wpa), T(ba) if bias else None).numpy()


_separable("sep_basic", (2, 3, 7, 7), 1, 5, (3, 3), 1, 0, 1, True)
_separable("sep_same_s2", (1, 4, 9, 10), 2, 6, (3, 3), 2, "same", 1, False)
_separable("sep_dil_full", (2, 2, 6, 5), 1, 3, (2, 3), (1, 2), "full", (2, 1), True)


# -- spatial separable ------------------------------------------------------------------------

@dataclass(frozen=True)
class SS:
    name: str
    n: int
    c_in: int
    c_mid: int
    c_out: int
    groups: int
    sizes: tuple
    kernel: tuple
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    bias: str = "none"


SS_CASES = [
    SS("ss_basic", 2, 2, 3, 4, 1, (7, 8), (3, 3)),
    SS("ss_same_s1", 1, 3, 3, 3, 3, (6, 7), (3, 5), 1, "same", 1, "tied"),
    SS("ss_same_s2", 2, 2, 2, 2, 2, (9, 8), (3, 3), 2, "same", 1, "tied"),
    SS("ss_same_s21_d12", 1, 4, 4, 4, 4, (10, 9), (3, 2), (2, 1), "same", (1, 2), "untied"),
    SS("ss_same_s3_d2", 1, 2, 4, 2, 2, (11, 10), (2, 3), 3, "same", 2),
    SS("ss_pairs_dil", 2, 3, 2, 3, 1, (8, 9), (4, 2), (1, 2), ((1, 2), (0, 1)), (2, 3), "tied"),
    SS("ss_full", 1, 2, 2, 2, 2, (5, 6), (3, 2), 1, "full", (1, 2)),
    SS("ss_valid_s2", 1, 1, 2, 3, 1, (9, 9), (3, 3), 2, "valid", 1, "untied"),
    SS("ss_int_pad_grp2", 2, 4, 6, 4, 2, (6, 6), (3, 3), (1, 2), 1, 1, "tied"),
]


def ss_torch(s: SS, xa, wca, wra, ba):
    st, dl = pair(s.stride), pair(s.dilation)
    p = expected_pads(s.padding, s.sizes, s.kernel, st, dl)
    h = F.conv2d(tpad(T(xa), p), T(wca), stride=(st[0], 1), dilation=(dl[0], 1), groups=s.groups)
    return add_bias(F.conv2d(h, T(wra), stride=(1, st[1]), dilation=(1, dl[1]), groups=s.groups), ba), p


def ss_full_kernel(s: SS, wca, wra):
    """The kH x kW kernel the two halves make together: within each group,
    K[o, i] = sum over the group's mid channels m of col[m, i] (x) row[o, m]."""
    g = s.groups
    wca, wra = wca.astype(np.float64), wra.astype(np.float64)
    cig, cmg, cog = s.c_in // g, s.c_mid // g, s.c_out // g
    K = np.zeros((s.c_out, cig) + s.kernel)
    for o in range(s.c_out):
        grp = o // cog
        for i in range(cig):
            for mm in range(cmg):
                m = grp * cmg + mm
                K[o, i] += np.outer(wca[m, i, :, 0], wra[o, mm, 0, :])
    return K


def _spatial(s: SS):
    @case(s.name)
    def _(c):
        x, xa = c.x((s.n, s.c_in) + s.sizes)
        wc, wca = c.w((s.c_mid, s.c_in // s.groups, s.kernel[0], 1))
        wr, wra = c.w((s.c_out, s.c_mid // s.groups, 1, s.kernel[1]))
        st, dl = pair(s.stride), pair(s.dilation)
        p = expected_pads(s.padding, s.sizes, s.kernel, st, dl)
        outs = tuple((n + lo + hi - d * (k - 1) - 1) // ss + 1 for n, k, ss, d, (lo, hi) in
                     zip(s.sizes, s.kernel, st, dl, p))
        ba = None
        if s.bias == "tied":
            ba = c.rng.standard_normal(s.c_out).astype(np.float32)
        elif s.bias == "untied":
            ba = c.rng.standard_normal((s.c_out,) + outs).astype(np.float32)
        y = cc.spatial_separable_conv(x, wc, wr, g_param(c, ba), stride=s.stride, padding=s.padding,
                                      dilation=s.dilation, groups=s.groups, name=s.name)
        want, _ = ss_torch(s, xa, wca, wra, ba)
        # independent second oracle: one conv with the composed kH x kW kernel
        full = add_bias(F.conv2d(tpad(T(xa), p), T(ss_full_kernel(s, wca, wra)), stride=st, dilation=dl,
                                 groups=s.groups), ba)
        np.testing.assert_allclose(full.numpy(), want.numpy(), rtol=1e-9, atol=1e-9,
                                   err_msg=f"{s.name}: oracle self-check (two halves vs composed kernel)")
        return y, want.numpy()


for _s in SS_CASES:
    _spatial(_s)


# -- flattened -----------------------------------------------------------------------------------

def _flattened(name, xshape, cout, k, stride, padding, dilation, bias):
    @case(name)
    def _(c):
        x, xa = c.x(xshape)
        wc, wca = c.w((cout, xshape[1], 1, 1))
        wv, wva = c.w((cout, 1, k[0], 1))
        wh, wha = c.w((cout, 1, 1, k[1]))
        ba = c.rng.standard_normal(cout).astype(np.float32) if bias else None
        y = cc.flattened_conv(x, wc, wv, wh, g_param(c, ba), stride=stride, padding=padding, dilation=dilation)
        st, dl = pair(stride), pair(dilation)
        p = expected_pads(padding, xshape[2:], k, st, dl)
        h = F.conv2d(T(xa), T(wca))                                   # 1x1 across channels
        h = F.conv2d(tpad(h, p), T(wva), stride=(st[0], 1), dilation=(dl[0], 1), groups=cout)   # vertical
        h = F.conv2d(h, T(wha), stride=(1, st[1]), dilation=(1, dl[1]), groups=cout)           # horizontal
        return y, add_bias(h, ba).numpy()


_flattened("flat_basic", (2, 3, 7, 7), 4, (3, 3), 1, 0, 1, True)
_flattened("flat_same_s2", (1, 5, 9, 8), 3, (3, 5), 2, "same", 1, False)
_flattened("flat_dil", (2, 2, 8, 9), 2, (2, 3), (1, 2), ((1, 0), (2, 2)), (3, 1), True)


# -- grouped pointwise, and the ShuffleNet unit ------------------------------------------------------

def _pointwise(name, xshape, cout, groups, stride):
    @case(name)
    def _(c):
        x, xa = c.x(xshape)
        w, wa = c.w((cout, xshape[1] // groups, 1, 1))
        y = cc.conv(x, w, groups=groups, stride=stride)
        return y, F.conv2d(T(xa), T(wa), stride=stride, groups=groups).numpy()


_pointwise("pw_g2", (2, 6, 5, 4), 4, 2, 1)
_pointwise("pw_g3_s2", (1, 9, 7, 6), 6, 3, 2)


def _shuffle_unit(name, xshape, mid, cout, groups, k, reshape_oracle):
    @case(name)
    def _(c):
        x, xa = c.x(xshape)
        w1, w1a = c.w((mid, xshape[1] // groups) + k)
        w2, w2a = c.w((cout, mid // groups, 1, 1))
        h = cc.conv(x, w1, groups=groups, padding="same")
        h = cc.channel_shuffle(h, groups)
        y = cc.conv(h, w2, groups=groups)
        p = expected_pads("same", xshape[2:], k, (1, 1), (1, 1))
        t = F.conv2d(tpad(T(xa), p), T(w1a), groups=groups)
        if reshape_oracle:          # view as (groups, C/groups), transpose, flatten
            n, ch, hh, ww = t.shape
            t = t.reshape(n, groups, ch // groups, hh, ww).transpose(1, 2).reshape(n, ch, hh, ww)
        else:
            t = F.channel_shuffle(t, groups)
        return y, F.conv2d(t, T(w2a), groups=groups).numpy()


_shuffle_unit("shuffle_g3", (2, 6, 6, 5), 9, 6, 3, (3, 3), False)
_shuffle_unit("shuffle_g2_reshape", (1, 4, 5, 7), 8, 4, 2, (1, 3), True)
_shuffle_unit("shuffle_g4", (1, 8, 4, 4), 8, 8, 4, (1, 1), False)


# -- Sobel: a rank-1 kernel --------------------------------------------------------------------------

SOBEL_COL = np.array([1.0, 2.0, 1.0])
SOBEL_ROW = np.array([1.0, 0.0, -1.0])


def _sobel(name, stride, padding, dilation):
    @case(name)
    def _(c):
        x, xa = c.x((2, 1, 9, 10))
        col = c.g.param(f"{name}_col", SOBEL_COL.reshape(1, 1, 3, 1).astype(np.float32))
        row = c.g.param(f"{name}_row", SOBEL_ROW.reshape(1, 1, 1, 3).astype(np.float32))
        full = np.outer(SOBEL_COL, SOBEL_ROW).reshape(1, 1, 3, 3).astype(np.float32)
        assert full[0, 0].tolist() == [[1, 0, -1], [2, 0, -2], [1, 0, -1]]
        y = cc.spatial_separable_conv(x, col, row, stride=stride, padding=padding, dilation=dilation)
        y_full = cc.conv(x, c.g.param(f"{name}_full", full), stride=stride, padding=padding, dilation=dilation)
        c.g.output(y_full, f"{name}_convfull")
        p = expected_pads(padding, (9, 10), (3, 3), pair(stride), pair(dilation))
        want = F.conv2d(tpad(T(xa), p), T(full), stride=stride, dilation=dilation).numpy()
        return y, want


_sobel("sobel_valid", 1, 0, 1)
_sobel("sobel_same", 1, "same", 1)
_sobel("sobel_same_s2_d2", 2, "same", 2)


# -- build, compile once, run ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sep_results():
    g = cc.Graph("separable_family")
    feeds, wants, errors = {}, {}, {}
    for name, fn in CASES.items():
        try:
            y, want = fn(Ctx(g, name, feeds))
            g.output(y, name)
            wants[name] = want
        except cc.ConvcError as e:
            errors[name] = e
    results = {t: cc.compile(g, target=t).run(feeds) for t in TARGETS}
    return wants, errors, results


@pytest.mark.parametrize("name", list(CASES))
def test_against_torch_composition(sep_results, name):
    wants, errors, results = sep_results
    assert name not in errors, f"convc rejected valid case {name}: {errors.get(name)}"
    for t in TARGETS:
        close(results[t][name], wants[name], RTOL, ATOL, f"{name} [{t}] vs torch")


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("sobel")])
def test_sobel_separable_equals_full_conv(sep_results, name):
    _, errors, results = sep_results
    assert name not in errors
    for t in TARGETS:
        close(results[t][name], results[t][f"{name}_convfull"], 1e-5, 1e-5,
              f"{name}: spatial_separable_conv vs cc.conv with the full Sobel kernel [{t}]")
    assert np.abs(results["numpy"][name]).max() > 1.0, "Sobel of a random image should not be ~0"


def test_shuffle_matters():
    """Guard: without the shuffle the ShuffleNet unit computes something else,
    so the shuffle cases really test channel_shuffle."""
    rng = np.random.default_rng(3)
    x = T(rng.standard_normal((1, 6, 4, 4)))
    w1, w2 = T(rng.standard_normal((6, 2, 1, 1))), T(rng.standard_normal((6, 2, 1, 1)))
    a = F.conv2d(F.channel_shuffle(F.conv2d(x, w1, groups=3), 3), w2, groups=3)
    b = F.conv2d(F.conv2d(x, w1, groups=3), w2, groups=3)
    assert not torch.allclose(a, b)


# =====================================================================================
# cc.cost worked examples
# =====================================================================================

def test_cost_spatial_separable_3x3_on_5x5():
    g = cc.Graph("cost_ss")
    x = g.input("x", (1, 1, 5, 5))
    g.output(cc.conv(x, np.ones((1, 1, 3, 3), np.float32), name="full3x3"), "full")
    rep_conv = cc.cost(g)
    assert rep_conv.macs == 81, rep_conv.table()
    assert rep_conv.nodes["full3x3"].macs == 81

    g2 = cc.Graph("cost_ss2")
    x2 = g2.input("x", (1, 1, 5, 5))
    y = cc.spatial_separable_conv(x2, np.ones((1, 1, 3, 1), np.float32), np.ones((1, 1, 1, 3), np.float32),
                                  name="ss")
    assert y.shape == (1, 1, 3, 3)
    g2.output(y, "y")
    rep = cc.cost(g2)
    assert rep.nodes["ss.col"].macs == 45, rep.table()       # 3x5 outputs x 3 taps
    assert rep.nodes["ss.row"].macs == 27, rep.table()       # 3x3 outputs x 3 taps
    assert rep.macs == 72, rep.table()


def test_cost_separable_vs_standard_7x7x3_to_5x5x128():
    g = cc.Graph("cost_std")
    x = g.input("x", (1, 3, 7, 7))
    y = cc.conv(x, g.param("w", np.ones((128, 3, 3, 3), np.float32)), name="std")
    assert y.shape == (1, 128, 5, 5)
    g.output(y)
    rep = cc.cost(g)
    assert rep.macs == 86400 and rep.nodes["std"].macs == 86400, rep.table()
    assert rep.params == 128 * 27

    g2 = cc.Graph("cost_sep")
    x2 = g2.input("x", (1, 3, 7, 7))
    y2 = cc.separable_conv(x2, g2.param("wd", np.ones((3, 1, 3, 3), np.float32)),
                           g2.param("wp", np.ones((128, 3, 1, 1), np.float32)), name="sep")
    assert y2.shape == (1, 128, 5, 5)
    g2.output(y2)
    rep2 = cc.cost(g2)
    assert rep2.nodes["sep.depthwise"].macs == 675, rep2.table()     # 5*5*3 outputs x 9 taps
    assert rep2.nodes["sep"].macs == 9600, rep2.table()              # 5*5*128 outputs x 3 inputs
    assert rep2.macs == 10275, rep2.table()
    assert rep2.params == 27 + 384


# =====================================================================================
# validation
# =====================================================================================

@pytest.mark.parametrize("xshape, wc, wr, kw, words", [
    ((1, 2, 8, 8), (2, 2, 3, 3), (2, 2, 1, 3), {}, ["w_col", "(C_mid, C_in/groups, kH, 1)"]),
    ((1, 2, 8, 8), (2, 2, 3, 1), (2, 2, 3, 3), {}, ["w_row", "(C_out, C_mid/groups, 1, kW)"]),
    ((1, 2, 8, 8), (2, 2, 1, 3), (2, 2, 3, 1), {}, ["w_col", "kH, 1"]),          # halves swapped
    ((1, 2, 8), (2, 2, 3), (2, 2, 3), {}, ["2D", "rank 4"]),
    ((1, 2, 8, 8), (2, 2, 3), (2, 2, 1, 3), {}, ["rank 4"]),
    ((1, 2, 8, 8), (2, 2, 3, 1), (2, 2, 1, 3), dict(padding="sane"), ["padding", "sane"]),
    ((1, 2, 8, 8), (2, 2, 3, 1), (2, 2, 1, 3), dict(stride=(1, 0)), ["stride", ">= 1"]),
], ids=["w_col_not_kx1", "w_row_not_1xk", "swapped", "input_1d", "w_col_rank", "padding_word", "stride0"])
def test_spatial_separable_validation(xshape, wc, wr, kw, words):
    g = cc.Graph("ss_bad")
    x = g.input("x", xshape)
    with pytest.raises(cc.ValidationError) as e:
        cc.spatial_separable_conv(x, np.ones(wc, np.float32), np.ones(wr, np.float32), name="ss_bad", **kw)
    msg = str(e.value)
    assert "ss_bad" in msg and "spatial_separable_conv" in msg, msg
    for word in words:
        assert word in msg, f"{word!r} not in {msg!r}"


def test_spatial_separable_channel_mismatch_names_the_half():
    g = cc.Graph("ss_bad_ch")
    x = g.input("x", (1, 2, 8, 8))
    with pytest.raises(cc.ValidationError) as e:       # w_row expects 4 mid channels, w_col makes 3
        cc.spatial_separable_conv(x, np.ones((3, 2, 3, 1), np.float32), np.ones((2, 4, 1, 3), np.float32),
                                  name="ssch")
    assert "ssch.row" in str(e.value) and "weight" in str(e.value), str(e.value)


def test_separable_and_flattened_validation():
    g = cc.Graph("sep_bad")
    x = g.input("x", (1, 3, 8, 8))
    with pytest.raises(cc.ValidationError) as e:
        cc.separable_conv(x, np.ones((3, 1, 3, 3), np.float32), np.ones((4, 3, 1, 1), np.float32),
                          padding="sam", name="sepbad")
    assert "sepbad" in str(e.value) and "padding" in str(e.value) and "sam" in str(e.value), str(e.value)
    with pytest.raises(cc.ValidationError) as e:        # depthwise weight must be (C*m, 1, k, k)
        cc.depthwise_conv(x, np.ones((3, 3, 3, 3), np.float32), name="dwbad")
    assert "dwbad" in str(e.value) and "groups" in str(e.value), str(e.value)
    with pytest.raises(cc.ValidationError) as e:        # w_vertical is 1xk, not kx1
        cc.flattened_conv(x, np.ones((4, 3, 1, 1), np.float32), np.ones((4, 1, 1, 3), np.float32),
                          np.ones((4, 1, 1, 3), np.float32), name="flatbad")
    assert "flatbad" in str(e.value) and "w_col" in str(e.value), str(e.value)

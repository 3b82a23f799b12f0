"""``cc.conv``'s padding forms and geometry, from DESIGN.md's rules.

The numerics of conv against PyTorch (every config of ``opinfo.CONV``,
including the padding-word configs that used to be this file's grid, under
the direct loops, the default pipeline and every lowering, float32 and
float64, C, numpy and OpenCL) run in tests/test_lowerings.py. What is left
here is what only the padding forms have: that each form (an int, per-axis
ints, asymmetric pairs, "valid", "same", "full") normalises to the explicit
(lo, hi) pairs helpers.expected_pads derives independently of convc, with
the output shape that follows, over the default grid and the long grid
(building a node is cheap: no compile), plus hand-computed "same"/"full"
numbers.
"""
from __future__ import annotations

import numpy as np
import pytest

import convc as cc
from helpers import run_both
from opinfo import CONV, Config, build_conv

GRID = CONV.grid(long=True)     # the long grid too: only graphs are built here


@pytest.mark.parametrize("cfg", GRID, ids=[f"{i:03d}-{c.id}" for i, c in enumerate(GRID)])
def test_padding_normalised(cfg: Config):
    """The node's padding attribute is the pairs of DESIGN.md's rules, its
    shape the conv formula's, whatever form the padding was written in."""
    g = cc.Graph("padding_form")
    a = CONV.arrays(cfg, "float32")
    y = build_conv(g, cfg, "conv", a, {})
    node = g.node("conv")
    assert node["attrs"]["padding"] == cfg.padding, f"{cfg.id}: padding {cfg.written!r} normalised"
    assert y.shape == node["type"].shape == (cfg.n, cfg.c_out) + cfg.conv_out, f"{cfg.id}: inferred shape"


def test_grid_covers_the_padding_forms():
    """The default grid writes every padding form (so test_lowerings runs
    each through every lowering); the long grid (test_conv's former random
    part) varies them with every other axis."""
    default = [c for c in CONV.grid() if c.written is not None]
    for word in ("valid", "same", "full"):
        assert any(c.written == word for c in default), word
    assert any(isinstance(c.written, int) and c.written > 0 for c in default)
    assert any(c.written == "same" and 2 in c.stride for c in default)
    assert any(c.written == "same" and 3 in c.stride for c in default)
    assert any(c.written == "full" and max(c.dilation) > 1 for c in default)
    assert {c.rank for c in default} == {1, 2, 3} and {c.bias for c in default} == {"none", "tied", "untied"}
    assert any(c.depthwise and c.c_out > c.c_in for c in default)
    cfgs = [c for c in GRID if c.written is not None]
    assert len(cfgs) >= 200
    assert any(isinstance(c.written, tuple) and all(isinstance(p, int) for p in c.written) for c in cfgs)
    assert any(isinstance(c.written, tuple) and any(isinstance(p, tuple) and p[0] != p[1] for p in c.written)
               for c in cfgs)
    assert any(len(set(c.stride)) > 1 for c in cfgs) and any(len(set(c.dilation)) > 1 for c in cfgs)
    assert any(c.flip for c in cfgs) and any(c.n > 1 for c in cfgs) and any(1 < c.groups < c.c_in for c in cfgs)


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

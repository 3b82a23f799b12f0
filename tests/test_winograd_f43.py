"""Winograd F(4×4, 3×3): ``winograd_conv(..., tile=4)``'s fused grid, its
numpy algorithm, the pass's choice of tile, gradients, validation and cost.

The grid's cases are part of opinfo.WINOGRAD_CASES: tests/test_lowerings.py
runs all of them under F(4×4) with the epilogue fused against torch, on C,
OpenCL and the numpy reference. Oracles here: torch conv2d in float64, the
algorithm written out in numpy (``winograd_reference``) and central finite
differences.

float32 tolerance. F(4×4, 3×3) rounds more than F(2×2): Bᵀ has entries up to
5, Aᵀ up to 8 and G has 1/6 and 1/24. Measured with the C target on N(0, 1)
inputs and He-initialised weights (std sqrt(2 / (9 C_in))), padding 1, |y|
up to about 6 (max abs error vs float64 torch; F(2×2) and torch's float32
conv for comparison):

    64→64 at 56²    F(4×4) 5.0e-5   F(2×2) 2.2e-6   torch 2.0e-6
    128→128 at 28²  F(4×4) 5.2e-5   F(2×2) 2.9e-6   torch 2.0e-6
    256→256 at 14²  F(4×4) 6.7e-5   F(2×2) 3.5e-6   torch 1.4e-6
    256→256 at 7²   F(4×4) 4.4e-5   F(2×2) 4.0e-6   torch 2.9e-6

i.e. about 1e-5 of max |y| (RMS 2-4e-6). The tolerance below, 3e-5 · max(1,
max |y|) + 1e-4 · |y|, leaves a margin of about 2.5× over the worst of these
(6.7e-5 against 1.9e-4 at max |y| = 6.2), checked again by
``test_float32_error_on_realistic_layers``. float64: errors of 1e-14 of
max |y| were measured; 1e-11 is the bound.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convc as cc
import helpers
from convc.ir import TensorType
from convc.ops.winograd import (TRANSFORMS, WinogradConv, blocking, combination, winograd_conv,
                                winograd_reference)
from convc.passes.winograd import winograd_tile
from helpers import assert_close
from opinfo import TORCH_ACTIVATIONS, WINOGRAD_CASES, WinogradCase

TOL = {"float32": dict(rtol=1e-4, atol=3e-5), "float64": dict(rtol=1e-11, atol=1e-11)}
"""atol is scaled by max(1, max |y|); see the module docstring for the measurement."""

ACTS = TORCH_ACTIVATIONS
Case = WinogradCase     # shared with tests/test_winograd.py


# opinfo's Winograd grid, this file's part of it in its order (its 4th case
# had batch 2, the shared one batch 3)
CASES = [WINOGRAD_CASES[i] for i in (0, 1, 2, 3, 4, 9, 10, 7, 11, 12, 13)]


def arrays(case: Case, dtype: str, index: int):
    """(x, w, b, r) of case ``index``; He-initialised w (the measurement's)."""
    return case.arrays(dtype, 43, index, gain=2.0)


def f43_graph(name, cases, dtype):
    """One graph holding every case as a tile-4 winograd_conv (then residual
    add and activation); returns (graph after fuse_epilogues, graph)."""
    g = cc.Graph(name)
    for i, case in enumerate(cases):
        x, w, b, r = arrays(case, dtype, i)
        xv = g.input(f"x{i}", x.shape, dtype)
        bv = g.param(f"b{i}", b) if b is not None else None
        y = winograd_conv(xv, g.param(f"w{i}", w), bv, padding=case.padding, flip=case.flip, tile=4, name=f"wc{i}")
        if case.residual:
            y = cc.add(y, g.input(f"r{i}", r.shape, dtype))
        if case.act:
            y = getattr(cc, case.act)(y)
        g.output(y, f"y{i}")
    return cc.passes.run(g, ["fuse_epilogues"]), g


def tol(dtype, want):
    return dict(rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * max(1.0, float(np.abs(want).max())))


# ---------------------------------------------------------------------------
# the grid: built as tile-4 winograd_conv nodes, the epilogue fuses into them
# (the numerics, against torch, of the whole grid under F(4x4) with the
# epilogue fused, on C, OpenCL and the numpy reference of the lowered graph:
# opinfo.WINOGRAD in tests/test_lowerings.py)
# ---------------------------------------------------------------------------
def test_grid_is_fused_tile4():
    for dtype in ("float32", "float64"):
        g2 = f43_graph(f"f43_{dtype}", CASES, dtype)[0]
        nodes = [g2.node(n) for n in g2.nx.nodes if g2.node(n)["op"] == "winograd_conv"]
        assert len(nodes) == len(CASES) and all(d["attrs"]["tile"] == 4 for d in nodes)
        ops = [g2.node(n)["op"] for n in g2.nx.nodes]
        assert "add" not in ops and not set(ACTS) & set(ops), "the residual and activations are fused"
        assert sum(bool(d["attrs"].get("residual")) for d in nodes) == sum(c.residual for c in CASES)
        kernels = [g2.node(n) for n in g2.nx.nodes if g2.node(n)["op"] == "winograd_kernel"]
        assert all(d["attrs"]["tile"] == 4 and d["type"].shape[:2] == (6, 6) for d in kernels)


def test_grid_covers_the_cases():
    outs = [c.out() for c in CASES]
    assert any(o[0] % 4 and o[1] % 4 for o in outs), "outputs that are not a multiple of the tile"
    assert {o[0] % 4 for o in outs} >= {0, 1, 2, 3} and {o[1] % 4 for o in outs} >= {0, 1, 2, 3}
    assert {c.bias for c in CASES} == {"none", "tied", "untied"} and {c.n for c in CASES} >= {1, 2, 3}
    assert {p for c in CASES for pp in c.pads() for p in pp} >= {0, 1, 2}
    assert any(lo != hi for c in CASES for lo, hi in c.pads())
    assert any(c.flip for c in CASES) and any(c.residual and c.act for c in CASES)
    assert any(c.c_in % 8 and c.c_out % 8 for c in CASES) and any(c.c_out < 8 for c in CASES)
    assert any(blocking(*c.out(), c.c_out, 4)["BLOCKS_X"] > 1 for c in CASES)
    assert any(blocking(*c.out(), c.c_out, 4)["BLOCKS_Y"] > 1 for c in CASES)


# ---------------------------------------------------------------------------
# the algorithm in numpy, the transform table and its printed form
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("tile", [2, 4])
def test_numpy_algorithm_equals_direct_conv(tile):
    """winograd_kernel's reference and winograd_reference (the layout of U
    the templates read) give the direct conv in float64 to 1e-10."""
    for i, case in enumerate(CASES[:5] + CASES[7:]):
        x, w, _, _ = arrays(case, "float64", i)
        u = cc.ops.get_op("winograd_kernel").reference(dict(flip=case.flip, tile=tile), w)
        assert u.shape == (tile + 2, tile + 2, case.c_out, case.c_in)
        plain = replace(case, bias="none", act=None, residual=False)
        got = winograd_reference(x, u, case.pads(), case.out())
        assert_close(got, plain.torch(x, w), rtol=1e-10, atol=1e-10, what=f"tile {tile} {case.id}")


def test_transform_table_is_exact_in_one_dimension():
    """Aᵀ [(G g) ⊙ (Bᵀ d)] is the correlation of d with g at the tile's
    outputs, for every tile of the table, on the unit vectors (so exactly)."""
    for m, tr in TRANSFORMS.items():
        n = tr.size
        assert tr.g.shape == (n, 3) and tr.bt.shape == (n, n) and tr.at.shape == (m, n)
        for a in range(n):
            for k in range(3):
                d, g = np.eye(n)[a], np.eye(3)[k]
                want = [d[i:i + 3] @ g for i in range(m)]
                np.testing.assert_allclose(tr.at @ ((tr.g @ g) * (tr.bt @ d)), want, atol=1e-15)


def test_combination_prints_the_nonzero_terms():
    assert combination([4, 0, -5, 0, 1, 0], [f"d{k}" for k in range(6)]) == ("4.0f * d0 - 5.0f * d2 + d4", 2)
    assert combination([-1 / 6, 1 / 6, -1 / 6], ["g0", "g1", "g2"], "double") == \
        ("-0.16666666666666666 * (g0 - g1 + g2)", 1)
    assert combination([0, 1, -1, 0], ["a", "b", "c", "e"]) == ("b - c", 0)
    assert combination([0, 0, 0], ["a", "b", "c"]) == ("0.0f", 0)


def test_generated_code_names_the_transform():
    g = cc.Graph("phases4")
    x = g.input("x", (1, 8, 9, 9))
    g.output(winograd_conv(x, g.param("w", np.ones((8, 8, 3, 3), np.float32)), padding=1, tile=4), "y")
    src = cc.compile(g, "c", passes="none").source
    for phrase in ("Winograd F(4x4, 3x3) kernel transform U = G g G^T", "interpolation points 0, 1, -1, 2, -2",
                   "|   1/4     0     0 |", "|  1/24 -1/12   1/6 |", "B^T = |  4  0 -5  0  1  0 |",
                   "A^T = |  1  1  1  1  1  0 |",
                   "Winograd F(4x4, 3x3) convolution", "2. The 36 products",
                   "db[k][0][t] = 4.0f * ph[k][0][t] - 5.0f * ph[k][2][t] + ph[k][0][t + 1];"):
        assert phrase in src, phrase


# ---------------------------------------------------------------------------
# the choice of tile
# ---------------------------------------------------------------------------
def conv_types(c_in, c_out, size, padding=1, stride=1):
    attrs = dict(stride=(stride, stride), dilation=(1, 1), groups=1, flip=False,
                 padding=((padding, padding), (padding, padding)))
    return TensorType((1, c_in, size, size), "float32"), TensorType((c_out, c_in, 3, 3), "float32"), attrs


@pytest.mark.parametrize("c, size, tile", [
    (64, 56, 4), (128, 28, 4), (256, 14, 4),  # the ResNet 3x3 layers: F(4x4) fills its register tiles
    (512, 7, 2),                              # 2x2 tiles of 4x4 would pad a 16-slot register tile to 4x
    (8, 56, 2),                               # thin: by the count, the bigger transforms cost more than they save
    (16, 56, 4), (32, 8, 2), (64, 4, 2),
])
def test_winograd_tile_rule(c, size, tile):
    assert winograd_tile(*conv_types(c, c, size)) == tile


def test_winograd_tile_none_outside_winograd():
    assert winograd_tile(*conv_types(4, 64, 56)) is None          # fewer than MIN_CHANNELS inputs
    assert winograd_tile(*conv_types(64, 7, 56)) is None          # ... outputs
    assert winograd_tile(*conv_types(64, 64, 56, stride=2)) is None


def test_pass_picks_tile_end_to_end():
    """cc.compile's default pipeline: the 32->32 conv at 24x24 becomes
    F(4x4), the 16->16 one at 6x6 F(2x2); both right against torch."""
    rng = np.random.default_rng(2024)
    g = cc.Graph("choice")
    x = rng.standard_normal((2, 32, 24, 24)).astype(np.float32)
    w1 = (rng.standard_normal((32, 32, 3, 3)) * math.sqrt(2 / 288)).astype(np.float32)
    b1 = rng.standard_normal(32).astype(np.float32)
    z = rng.standard_normal((1, 16, 6, 6)).astype(np.float32)
    w2 = (rng.standard_normal((16, 16, 3, 3)) * math.sqrt(2 / 144)).astype(np.float32)
    xv, zv = g.input("x", x.shape), g.input("z", z.shape)
    g.output(cc.relu(cc.conv(xv, g.param("w1", w1), g.param("b1", b1), padding=1, name="big")), "y1")
    g.output(cc.conv(zv, g.param("w2", w2), padding=1, name="small"), "y2")

    g2 = cc.passes.run(g, ["conv_to_winograd"])
    tiles = {n: g2.node(n)["attrs"]["tile"] for n in g2.nx.nodes if g2.node(n)["op"] == "winograd_conv"}
    assert tiles == {"big.winograd": 4, "small.winograd": 2}
    mod = cc.compile(g, "c")
    assert "Winograd F(4x4, 3x3) convolution" in mod.source and "Winograd F(2x2, 3x3) convolution" in mod.source
    got = mod.run({"x": x, "z": z})
    y1 = F.relu(F.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w1).double(),
                         torch.from_numpy(b1).double(), padding=1)).numpy()
    y2 = F.conv2d(torch.from_numpy(z).double(), torch.from_numpy(w2).double(), padding=1).numpy()
    assert_close(got["y1"], y1, **tol("float32", y1), what="F(4x4) through cc.compile")
    assert_close(got["y2"], y2, **tol("float32", y2), what="F(2x2) through cc.compile")


def test_float32_error_on_realistic_layers():
    """The measurement behind TOL: He-initialised 64-channel layers on N(0, 1)
    inputs stay inside it; F(4x4) rounds 10-20x more than F(2x2) there (as
    measured), so the wider tolerance is needed, not slack."""
    rng = np.random.default_rng(56)
    x = rng.standard_normal((1, 64, 28, 28)).astype(np.float32)
    w = (rng.standard_normal((64, 64, 3, 3)) * math.sqrt(2 / 576)).astype(np.float32)
    want = F.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(), padding=1).numpy()
    errs = {}
    for tile in (2, 4):
        g = cc.Graph(f"he{tile}")
        g.output(winograd_conv(g.input("x", x.shape), g.param("w", w), padding=1, tile=tile), "y")
        y = cc.compile(g, "c").run({"x": x})["y"]
        assert_close(y, want, **tol("float32", want), what=f"tile {tile}")
        errs[tile] = float(np.abs(y - want).max())
    assert errs[4] > 3 * errs[2], errs


# ---------------------------------------------------------------------------
# gradients of a graph with a tile-4 node, against finite differences
# ---------------------------------------------------------------------------
def test_gradients_match_finite_differences():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 5, 9, 7))
    w = rng.standard_normal((6, 5, 3, 3)) / 4
    b = rng.standard_normal(6)
    t = rng.standard_normal((2, 6, 9, 8))
    pads = ((1, 1), (2, 1))

    def forward(g):
        xv, wv, bv = (g.input(k, v.shape, "float64") for k, v in (("x", x), ("w", w), ("b", b)))
        y = cc.tanh(winograd_conv(xv, wv, bv, padding=pads, tile=4, name="wc"))
        return (xv, wv, bv), cc.mse_loss(y, g.const(t, "float64"))

    g = cc.Graph("f43_grad")
    vs, loss = forward(g)
    g.output(loss, "loss")
    for v, name in zip(cc.grad(loss, list(vs)), ("dx", "dw", "db")):
        g.output(v, name)
    g = cc.passes.run(g, ["fuse_epilogues"])
    assert [g.node(n)["attrs"]["tile"] for n in g.nx.nodes if g.node(n)["op"] == "winograd_conv"] == [4]

    f = cc.Graph("f43_loss")
    f.output(forward(f)[1], "loss")
    loss_of = cc.compile(f, "c", passes="none")
    feeds = dict(x=x, w=w, b=b)
    eps = 1e-6
    for target in helpers.TARGETS:
        res = cc.compile(g, target=target, passes="none").run(feeds)
        for name, key in (("x", "dx"), ("w", "dw"), ("b", "db")):
            idx = [np.unravel_index(k, feeds[name].shape)
                   for k in rng.choice(feeds[name].size, size=min(12, feeds[name].size), replace=False)]
            for i in idx:
                up, down = ({**feeds, name: feeds[name].copy()} for _ in range(2))
                up[name][i] += eps
                down[name][i] -= eps
                fd = (float(loss_of.run(up)["loss"]) - float(loss_of.run(down)["loss"])) / (2 * eps)
                assert abs(res[key][i] - fd) <= 1e-6 * abs(fd) + 1e-8, (target, key, i, res[key][i], fd)


# ---------------------------------------------------------------------------
# validation and cost
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("tile", [3, 0, "4", 4.0, True])
def test_builder_rejects_bad_tile(tile):
    g = cc.Graph("bad_tile")
    x = g.input("x", (1, 8, 9, 9))
    nodes = set(g.nx.nodes)
    with pytest.raises(cc.ValidationError, match="tile must be one of 2, 4") as e:
        winograd_conv(x, g.param("w", np.zeros((8, 8, 3, 3), np.float32)), tile=tile, name="wc")
    assert "'wc' (winograd_conv)" in str(e.value)
    assert set(g.nx.nodes) - nodes == {"w"}, "a rejected builder call adds no node"


def test_direct_add_checks_u_against_tile():
    g = cc.Graph("bad_u")
    x = g.input("x", (1, 8, 9, 9))
    w = g.param("w", np.zeros((8, 8, 3, 3), np.float32))
    u2 = g.add("winograd_kernel", [w])
    u4 = g.add("winograd_kernel", [w], dict(tile=4))
    assert u2.shape == (4, 4, 8, 8) and u4.shape == (6, 6, 8, 8)
    attrs = dict(stride=1, padding=1, dilation=1, groups=1, flip=False)
    with pytest.raises(cc.ConvcError, match=r"u must be winograd_kernel\(w\) with tile=4, shape \(6, 6, 8, 8\)"):
        g.add("winograd_conv", [x, w, u2], dict(attrs, tile=4))
    with pytest.raises(cc.ConvcError, match="tile=2"):
        g.add("winograd_conv", [x, w, u4], attrs)
    with pytest.raises(cc.ConvcError, match="tile must be one of"):
        g.add("winograd_kernel", [w], dict(tile=6))
    assert g.add("winograd_conv", [x, w, u4], dict(attrs, tile=4)).shape == (1, 8, 9, 9)


def test_workspace_of_a_tile4_node_is_planned():
    g = cc.Graph("ws4")
    x = g.input("x", (2, 16, 21, 22))
    y = winograd_conv(x, g.param("w", np.zeros((24, 16, 3, 3), np.float32)), padding=1, tile=4)
    g.output(y, "y")
    d = g.node(y.name)
    types = [g.node(i)["type"] for i in g.inputs_of(y.name)]
    ctx = WinogradConv().context(d["attrs"], types, d["type"])
    assert (ctx["TILES_Y"], ctx["TILES_X"], ctx["TIN"]) == (6, 6, 6)
    assert WinogradConv().workspace(d["attrs"], types, d["type"]) == \
        2 * ctx["BLOCKS_Y"] * ctx["BLOCKS_X"] * 36 * ctx["TB"] * (16 + ctx["CB"])
    assert y.name in cc.schedule.plan(g).workspace

"""Winograd F(2×2, 3×3) (and the pass's choice between it and F(4×4, 3×3)):
the ``winograd_kernel`` / ``winograd_conv`` ops and the ``conv_to_winograd``
pass. F(4×4, 3×3) on its own: tests/test_winograd_f43.py.

The grid's cases are opinfo.WINOGRAD_CASES (this file's nine come first):
tests/test_lowerings.py runs the whole grid under F(2x2) and F(4x4) with the
epilogue fused against torch, on C, OpenCL and the numpy reference. Here:
the pass rewrites them (and its choice of tile), the Winograd algorithm
written out in numpy, gradients against torch autograd, eligibility,
validation, cost and the generated source.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convc as cc
import helpers
from convc.ops.winograd import WinogradConv, blocking, winograd_conv, winograd_reference
from convc.passes import PASSES
from convc.reference import evaluate
from convc.schedule import plan
from helpers import assert_close
from opinfo import WINOGRAD_CASES, WinogradCase

PASS = "conv_to_winograd"


Case = WinogradCase     # shared with tests/test_winograd_f43.py


CASES = list(WINOGRAD_CASES[:9])     # opinfo's Winograd grid: this file's part of it


def arrays(case: Case, dtype: str, index: int):
    """(x, w, b) of case ``index``; w ~ N(0, 1 / (9 C_in))."""
    return case.arrays(dtype, 2016, index)[:3]


def conv_graph(name, cases, dtype):
    """One graph holding every case (conv, then its activation); returns
    (graph, feeds)."""
    g = cc.Graph(name)
    feeds = {}
    for i, case in enumerate(cases):
        x, w, b = arrays(case, dtype, i)
        xv = g.input(f"x{i}", x.shape, dtype)
        bv = g.param(f"b{i}", b) if b is not None else None
        y = cc.conv(xv, g.param(f"w{i}", w), bv, padding=case.padding, flip=case.flip, name=f"conv{i}")
        if case.act:
            y = getattr(cc, case.act)(y)
        g.output(y, f"y{i}")
        feeds[f"x{i}"] = x
    return g, feeds


def ops(g):
    out = {}
    for n in g.nx.nodes:
        out[g.node(n)["op"]] = out.get(g.node(n)["op"], 0) + 1
    return out


def snapshot(g):
    return str(g), {n: g.node(n)["value"].copy() for n in g.param_names}


def same_snapshot(a, b):
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(np.array_equal(a[1][k], b[1][k]) for k in a[1])


# ---------------------------------------------------------------------------
# the grid: the pass rewrites every case (the numerics, against torch, of the
# whole grid under F(2x2) and F(4x4) with the epilogue fused, on C, OpenCL
# and the numpy reference: opinfo.WINOGRAD in tests/test_lowerings.py)
# ---------------------------------------------------------------------------
def test_grid_is_all_winograd():
    """Every conv is rewritten; the pass picks F(2x2) for some and F(4x4) for
    others, fuses the activations, and leaves its argument unchanged."""
    for dtype in ("float32", "float64"):
        g = conv_graph(f"winograd_{dtype}", CASES, dtype)[0]
        before = snapshot(g)
        g2 = cc.passes.run(g, ["fuse_epilogues", PASS])
        assert same_snapshot(before, snapshot(g)), "the passes changed their argument"
        tiles = {g2.node(n)["attrs"]["tile"] for n in g2.nx.nodes if g2.node(n)["op"] == "winograd_conv"}
        assert dtype == "float64" or tiles == {2, 4}, f"{dtype}: tiles {tiles}"
        assert ops(g2).get("conv", 0) == 0, f"{dtype}: every conv is eligible"
        assert ops(g2)["winograd_conv"] == len(CASES)
        assert ops(g2)["winograd_kernel"] == len(CASES)
        acts = sorted(str(g2.node(n)["attrs"].get("activation")) for n in g2.nx.nodes
                      if g2.node(n)["op"] == "winograd_conv")
        assert acts == sorted(str(c.act) for c in CASES), "the activations are fused into winograd_conv"


def test_grid_covers_the_cases():
    outs = [c.out() for c in CASES]
    assert any(o[0] % 2 and o[1] % 2 for o in outs) and any(not o[0] % 2 and not o[1] % 2 for o in outs)
    assert {c.bias for c in CASES} == {"none", "tied", "untied"} and {c.n for c in CASES} >= {1, 3}
    assert any(lo != hi for c in CASES for lo, hi in c.pads())
    assert {p for c in CASES for pp in c.pads() for p in pp} >= {0, 1, 2}
    assert any(c.c_in % 8 and c.c_out % 8 for c in CASES)
    assert any(blocking(*c.out(), c.c_out)["BLOCKS_X"] > 1 for c in CASES)
    assert any(blocking(*c.out(), c.c_out)["BLOCKS_Y"] > 1 for c in CASES)


def test_numpy_algorithm_matches_conv():
    """winograd_kernel's reference and the algorithm in numpy (the layout of
    U the template reads) give conv's result."""
    for i, case in enumerate(CASES[:4]):
        x, w, _ = arrays(case, "float64", i)
        u = cc.ops.get_op("winograd_kernel").reference(dict(flip=case.flip, tile=2), w)
        assert u.shape == (4, 4, case.c_out, case.c_in)
        plain = replace(case, bias="none", act=None)
        got = winograd_reference(x, u, case.pads(), case.out())
        assert_close(got, plain.torch(x, w), rtol=1e-12, atol=1e-12, what=case.id)


# ---------------------------------------------------------------------------
# gradients: cc.grad through winograd_conv equals torch autograd
# ---------------------------------------------------------------------------
def test_gradient_matches_torch_autograd():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 8, 6, 7))
    w = rng.standard_normal((9, 8, 3, 3)) / 8
    b = rng.standard_normal(9)
    t = rng.standard_normal((2, 9, 7, 6))
    pads = ((1, 2), (0, 1))
    g = cc.Graph("winograd_grad")
    xv, wv, bv = g.input("x", x.shape, "float64"), g.param("w", w), g.param("b", b)
    g.output(cc.relu(cc.conv(xv, wv, bv, padding=pads, name="c")), "y")
    g = cc.passes.run(g, ["fuse_epilogues", PASS])
    assert ops(g)["winograd_conv"] == 1
    y = g.value(g.outputs["y"])
    loss = cc.mse_loss(y, g.const(t, "float64"))
    dx, dw, db = cc.grad(loss, [g.value("x"), g.value("w"), g.value("b")])
    for v, name in ((loss, "loss"), (dx, "dx"), (dw, "dw"), (db, "db")):
        g.output(v, name)

    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    ty = F.relu(F.conv2d(F.pad(tx, (0, 1, 1, 2)), tw, tb))
    tl = F.mse_loss(ty, torch.from_numpy(t))
    tl.backward()
    want = dict(loss=tl.detach().numpy(), dx=tx.grad.numpy(), dw=tw.grad.numpy(), db=tb.grad.numpy())
    for target in helpers.TARGETS:
        res = cc.compile(g, target=target, passes="none").run({"x": x})
        for k, v in want.items():
            assert_close(res[k], v, rtol=1e-10, atol=1e-12, what=f"{k} [{target}]")


def test_grad_rule_is_conv_rule():
    """No gradient flows into u; x, w and bias get conv's."""
    g = cc.Graph("rule")
    x = g.input("x", (1, 8, 5, 5), "float64")
    y = winograd_conv(x, g.param("w", np.ones((8, 8, 3, 3))), g.param("b", np.ones(8)), padding=1, name="wc")
    xs = [g.value(n) for n in g.inputs_of(y.name)]
    gy = g.input("gy", y.shape, "float64")
    grads = cc.ops.get_op("winograd_conv").grad(g.node(y.name)["attrs"], xs, y, gy, [True] * 4)
    assert grads[2] is None
    assert [v.op for v in (grads[0], grads[1])] == ["conv_grad_input", "conv_grad_kernel"]
    assert grads[3].shape == (8,)


# ---------------------------------------------------------------------------
# the pass fires only where eligible, and never changes its argument
# ---------------------------------------------------------------------------
def ineligible(g, rng):
    """Convs the pass must leave alone, each on its own input."""
    def conv(name, xshape, wshape, **kw):
        x = g.input(f"x_{name}", xshape, "float64")
        g.output(cc.conv(x, g.param(f"w_{name}", rng.standard_normal(wshape)), name=name, **kw), f"y_{name}")
    conv("stride2", (1, 8, 9, 9), (8, 8, 3, 3), stride=2, padding=1)
    conv("stride_y", (1, 8, 9, 9), (8, 8, 3, 3), stride=(2, 1))
    conv("dilation2", (1, 8, 9, 9), (8, 8, 3, 3), dilation=2)
    conv("k5", (1, 8, 9, 9), (8, 8, 5, 5), padding=2)
    conv("k3x1", (1, 8, 9, 9), (8, 8, 3, 1))
    conv("groups2", (1, 16, 9, 9), (16, 8, 3, 3), groups=2, padding=1)
    conv("few_in", (1, 4, 9, 9), (16, 4, 3, 3), padding=1)
    conv("few_out", (1, 16, 9, 9), (7, 16, 3, 3), padding=1)
    conv("conv1d", (1, 8, 9), (8, 8, 3))
    conv("conv3d", (1, 8, 5, 5, 5), (8, 8, 3, 3, 3))


def test_pass_fires_only_where_eligible():
    rng = np.random.default_rng(3)
    g = cc.Graph("mixed")
    ineligible(g, rng)
    x = g.input("x", (1, 8, 9, 9), "float64")
    g.output(cc.conv(x, g.param("w", rng.standard_normal((8, 8, 3, 3))), padding=1, name="eligible"), "y")
    before = snapshot(g)
    g2 = PASSES[PASS](g)
    assert same_snapshot(before, snapshot(g)), "conv_to_winograd changed its argument"
    g2.verify()
    assert ops(g2)["winograd_conv"] == 1 and ops(g2)["winograd_kernel"] == 1
    assert "eligible" not in g2.nx
    convs = {n for n in g2.nx.nodes if g2.node(n)["op"] == "conv"}
    assert convs == {n for n in g.nx.nodes if g.node(n)["op"] == "conv"} - {"eligible"}
    for n in convs:
        assert g2.node(n)["attrs"] == g.node(n)["attrs"] and g2.inputs_of(n) == g.inputs_of(n)
    feeds = {n: rng.standard_normal(g.node(n)["type"].shape) for n in g.input_names}
    want, got = evaluate(g, feeds), evaluate(g2, feeds)
    for k in want:
        assert_close(got[k], want[k], rtol=1e-12, atol=1e-12, what=k)


def test_pass_leaves_ineligible_graph_equal():
    g = cc.Graph("noop")
    ineligible(g, np.random.default_rng(4))
    before = snapshot(g)
    g2 = PASSES[PASS](g)
    assert same_snapshot(before, snapshot(g)) and same_snapshot(before, snapshot(g2))
    assert cc.passes.run(g, [PASS]).structure_hash() == g.structure_hash()


def test_pass_keeps_attributes_and_shares_kernel_transform():
    """flip, padding, bias and a leaky_relu's slope survive; two convs on one
    weight share one kernel transform after CSE."""
    g = cc.Graph("attrs")
    x = g.input("x", (1, 8, 6, 6), "float64")
    w = g.param("w", np.random.default_rng(5).standard_normal((8, 8, 3, 3)))
    y1 = cc.leaky_relu(cc.conv(x, w, g.param("b", np.ones(8)), padding=((0, 1), (2, 0)), flip=True), 0.2)
    y2 = cc.conv(x, w, padding=1)
    g.output(y1, "y1")
    g.output(y2, "y2")
    g2 = cc.passes.run(g, ["fuse_epilogues", PASS, "eliminate_common_subexpressions"])
    wc = [n for n in g2.nx.nodes if g2.node(n)["op"] == "winograd_conv"]
    kernels = [n for n in g2.nx.nodes if g2.node(n)["op"] == "winograd_kernel"]
    assert len(wc) == 2 and len(kernels) == 2, "flip=True and flip=False need their own U"
    a = g2.node(g2.outputs["y1"])["attrs"]
    assert a["flip"] and a["padding"] == ((0, 1), (2, 0)) and a["activation"] == "leaky_relu"
    assert a["negative_slope"] == 0.2
    assert g2.node(g2.inputs_of(g2.outputs["y1"])[2])["attrs"] == {"flip": True, "tile": a["tile"]}


# ---------------------------------------------------------------------------
# validation: winograd_conv used directly outside its domain
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("xshape, wshape, kw, rule", [
    ((1, 8, 9, 9), (8, 8, 3, 3), dict(stride=2), "stride 1"),
    ((1, 8, 9, 9), (8, 8, 3, 3), dict(dilation=(1, 2)), "dilation 1"),
    ((1, 8, 9, 9), (8, 4, 3, 3), dict(groups=2), "groups=1"),
    ((1, 8, 9, 9), (8, 8, 5, 5), {}, "3×3 kernel"),
    ((1, 8, 9), (8, 8, 3), {}, "2D"),
    ((1, 8, 9, 9), (8, 8, 3), {}, "weight must have rank 4"),
    ((1, 8, 9, 9), (8, 6, 3, 3), {}, "weight channels"),
    ((1, 8, 2, 9), (8, 8, 3, 3), {}, "larger than the padded input"),
])
def test_builder_rejects_ineligible(xshape, wshape, kw, rule):
    g = cc.Graph("bad")
    x = g.input("x", xshape)
    w = g.param("w", np.zeros(wshape, np.float32))
    nodes = set(g.nx.nodes)
    with pytest.raises(cc.ValidationError, match=rule) as e:
        winograd_conv(x, w, name="wc", **kw)
    assert "'wc' (winograd_conv)" in str(e.value)
    assert set(g.nx.nodes) == nodes, "a rejected builder call adds no node"


def test_direct_add_is_validated():
    g = cc.Graph("bad_add")
    x = g.input("x", (1, 8, 6, 6))
    w = g.param("w", np.zeros((8, 8, 3, 3), np.float32))
    u = g.add("winograd_kernel", [w])
    assert u.shape == (4, 4, 8, 8)
    with pytest.raises(cc.ConvcError, match="3 to 5 inputs"):
        g.add("winograd_conv", [x, w], dict(stride=1, padding=0, dilation=1, groups=1, flip=False))
    bad_u = g.param("u", np.zeros((4, 4, 8, 7), np.float32))
    with pytest.raises(cc.ConvcError, match="u must be winograd_kernel"):
        g.add("winograd_conv", [x, w, bad_u], dict(stride=1, padding=0, dilation=1, groups=1, flip=False))
    with pytest.raises(cc.ConvcError, match="stride 1"):
        g.add("winograd_conv", [x, w, u], dict(stride=2, padding=0, dilation=1, groups=1, flip=False))
    with pytest.raises(cc.ConvcError, match="activation must be one of"):
        g.add("winograd_conv", [x, w, u], dict(stride=1, padding=0, dilation=1, groups=1, flip=False,
                                               activation="swishy"))
    with pytest.raises(cc.ConvcError, match=r"\(C_out, C_in, 3, 3\)"):
        g.add("winograd_kernel", [g.param("w5", np.zeros((8, 8, 5, 5), np.float32))])
    with pytest.raises(cc.ConvcError, match="flip must be"):
        g.add("winograd_kernel", [w], dict(flip="yes"))
    with pytest.raises(cc.ConvcError, match="share one dtype"):
        g.add("winograd_conv", [x, w, g.param("u64", np.zeros((4, 4, 8, 8)))],
              dict(stride=1, padding=0, dilation=1, groups=1, flip=False))


# ---------------------------------------------------------------------------
# cost, workspace, readable source
# ---------------------------------------------------------------------------
# (tile, tiles of the 14x13 output, multiplications of one kernel's transform: G's rows on the 3
#  columns of g, then on the T rows of G g; F(2x2): 2 per column (1/2 (g0 + g1 + g2), 1/2 (g0 - g1 + g2)),
#  F(4x4): 1 + 1 + 1 + 3 + 3 per column (1/4 g0, -1/6 (...) twice, 1/24 g0 + 1/12 g1 + 1/6 g2 twice))
@pytest.mark.parametrize("tile, tiles, kernel_muls", [(2, 7 * 7, 2 * (3 + 4)), (4, 4 * 4, 9 * (3 + 6))])
def test_macs_and_workspace(tile, tiles, kernel_muls):
    g = cc.Graph("resnet_block")
    x = g.input("x", (2, 64, 14, 13))
    w = g.param("w", np.zeros((32, 64, 3, 3), np.float32))
    g.output(cc.conv(x, w, padding=1, name="c"), "y")
    rep = cc.cost(g)
    g2 = cc.Graph("resnet_block_winograd")
    x2 = g2.input("x", (2, 64, 14, 13))
    g2.output(winograd_conv(x2, g2.param("w", np.zeros((32, 64, 3, 3), np.float32)), padding=1, name="c",
                            tile=tile), "y")
    rep2 = cc.cost(g2)
    t = tile + 2
    wc = next(n for n in g2.nx.nodes if g2.node(n)["op"] == "winograd_conv")
    wk = next(n for n in g2.nx.nodes if g2.node(n)["op"] == "winograd_kernel")
    assert rep2.nodes[wc].macs == 2 * tiles * t * t * 32 * 64
    assert rep2.nodes[wk].macs == kernel_muls * 32 * 64
    assert rep.macs == 2 * 14 * 13 * 32 * 64 * 9
    assert rep2.macs < rep.macs / 2
    d = g2.node(wc)
    types = [g2.node(i)["type"] for i in g2.inputs_of(wc)]
    ctx = WinogradConv().context(d["attrs"], types, d["type"])
    per_item = t * t * ctx["TB"] * (64 + ctx["CB"])
    assert WinogradConv().workspace(d["attrs"], types, d["type"]) == 2 * ctx["BLOCKS_Y"] * ctx["BLOCKS_X"] * per_item
    assert wc in plan(g2).workspace


def test_generated_code_shows_the_phases():
    g = cc.Graph("phases")
    x = g.input("x", (1, 8, 6, 6))
    g.output(cc.conv(x, g.param("w", np.ones((8, 8, 3, 3), np.float32)), padding=1), "y")
    src = cc.compile(g, "c", passes=[PASS]).source
    for phrase in ("U = G g G^T", "1. Input transform V = B^T d B", "2. The 16 products",
                   "3. Output transform Y = A^T M A"):
        assert phrase in src, phrase

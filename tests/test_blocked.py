"""The blocked layout NCHWc (convc/ops/blocked.py, templates/c/conv_nchwc*.c.j2,
blocked_*.c.j2, pool_blocked.c.j2) and the ``to_blocked_layout`` pass: every
op against its numpy reference and torch through generated C (and OpenCL
where a device is present), whole nets through ``passes="blocked"`` against
the default pipeline, the pass's structure and the rules' errors."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convc as cc
from convc.models import mobilenet_tiny
from convc.ops import blocked as nb
from convc.ops.elementwise import add, relu
from convc.passes import run as run_passes
from convc.passes.blocked import blocked_eligible
from helpers import TARGETS, assert_close

TOL = {"float32": 1e-4, "float64": 1e-11}


# -- references of the reorders, against index-by-index loops ----------------------
def test_to_from_blocked_reference_by_index():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 3, 4))
    b = nb.block_array(x, 4)
    assert b.shape == (2, 2, 3, 4, 4)
    want = np.zeros(b.shape)
    for n, k, h, w in np.ndindex(*x.shape):
        want[n, k // 4, h, w, k % 4] = x[n, k, h, w]
    assert np.array_equal(b, want)                       # channels 5..7 of block 1 are zero
    assert np.array_equal(nb.unblock_array(b, 5), x)


def test_block_weights_reference_by_index():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((5, 3, 2, 3))
    got = nb.BlockWeights().reference(dict(kind="conv", ci=2, co=4, flip=True), w)
    assert got.shape == (2, 2, 2, 3, 2, 4)
    want = np.zeros(got.shape)
    for o, i, ky, kx in np.ndindex(*w.shape):
        want[o // 4, i // 2, ky, kx, i % 2, o % 4] = w[o, i, 1 - ky, 2 - kx]
    assert np.array_equal(got, want)
    dw = rng.standard_normal((5, 1, 3, 3))
    got = nb.BlockWeights().reference(dict(kind="depthwise", ci=1, co=4, flip=False), dw)
    want = np.zeros((2, 3, 3, 4))
    for c, _, ky, kx in np.ndindex(*dw.shape):
        want[c // 4, ky, kx, c % 4] = dw[c, 0, ky, kx]
    assert np.array_equal(got, want)
    bias = rng.standard_normal(5)
    got = nb.BlockWeights().reference(dict(kind="bias", ci=1, co=4, flip=False), bias)
    assert np.array_equal(got.reshape(-1), np.concatenate([bias, np.zeros(3)]))


# -- every conv kernel against torch, through generated code ----------------------
# name: (C_in, C_out, (H, W), k, stride, padding ((top, bottom), (left, right)), dilation, kind, bias,
#        residual, activation, blocking, flip); kind: "dense" (blocked input), "stem" (NCHW input), "dw"
CASES = {
    "3x3_s1": (20, 36, (9, 13), 3, 1, ((1, 1), (1, 1)), 1, "dense", True, True, "relu", None, False),
    "3x3_s2": (36, 20, (11, 17), 3, 2, ((1, 1), (1, 1)), 1, "dense", True, False, "relu", None, False),
    "1x1_s1": (20, 36, (7, 30), 1, 1, ((0, 0), (0, 0)), 1, "dense", False, True, None, None, False),
    "1x1_s2": (36, 36, (8, 29), 1, 2, ((0, 0), (0, 0)), 1, "dense", True, True, "relu", None, False),
    "stem_7x7_s2": (3, 20, (23, 37), 7, 2, ((3, 3), (3, 3)), 1, "stem", True, False, "relu", None, False),
    "stem_1ch_tile": (1, 36, (17, 19), 5, 1, ((2, 2), (2, 2)), 1, "stem", False, True, None,
                      {"ur_w": 4, "oc_blocks": 2}, False),
    "stem_dilated_asym": (3, 20, (14, 21), 3, (2, 1), ((1, 0), (2, 3)), 2, "stem", True, False, "clip", None, True),
    "blocked_3ch": (3, 20, (6, 11), 3, 1, ((1, 1), (1, 1)), 1, "dense", True, False, None, None, False),
    "dw_s1": (20, 20, (9, 31), 3, 1, ((1, 1), (1, 1)), 1, "dw", True, True, "relu", None, False),
    "dw_s2": (36, 36, (10, 33), 3, 2, ((1, 1), (1, 1)), 1, "dw", True, False, "relu", None, False),
    "dw_3ch_flip": (3, 3, (5, 6), 3, 1, ((1, 1), (1, 1)), 1, "dw", False, False, None, None, True),
    "dw_5x5_dilated": (20, 20, (12, 14), 5, 1, ((4, 4), (3, 5)), 2, "dw", True, False, "clip", {"ur_w": 3}, False),
    "dilated_asym": (20, 20, (12, 19), 3, (1, 2), ((2, 0), (1, 3)), 2, "dense", False, False, "clip", None, True),
    "tile_3x2_last": (36, 36, (6, 23), 3, 1, ((1, 1), (1, 1)), 1, "dense", True, True, "relu",
                      {"ur_w": 5, "oc_blocks": 2}, False),
    "no_interior": (20, 20, (4, 3), 5, 1, ((2, 2), (2, 2)), 1, "dense", True, False, None, None, False),
}


def torch_conv(xa, wa, ba, ra, stride, pads, dilation, groups, act, flip):
    (t, bo), (le, r) = pads
    w = torch.tensor(wa)
    if flip:
        w = torch.flip(w, (2, 3))
    y = F.conv2d(F.pad(torch.tensor(xa), (le, r, t, bo)), w, None if ba is None else torch.tensor(ba),
                 stride=stride, dilation=dilation, groups=groups)
    if ra is not None:
        y = y + torch.tensor(ra)
    if act == "relu":
        y = torch.relu(y)
    elif act == "clip":
        y = torch.clamp(y, -0.5, 0.5)
    return y.numpy()


def conv_graph(dtype: str):
    """All CASES in one graph (one compile per target): NCHW input ->
    to_blocked (or none, a stem) -> conv_nchwc -> from_blocked."""
    c = nb.block_size(dtype)
    rng = np.random.default_rng(3)
    g, feeds, want = cc.Graph(f"nchwc_{dtype[-2:]}"), {}, {}
    for name, (ci, co, size, k, s, pads, d, kind, bias, res, act, blocking, flip) in CASES.items():
        xa = rng.standard_normal((2, ci) + size).astype(dtype)
        wa = (rng.standard_normal((co, 1 if kind == "dw" else ci, k, k)) / 3).astype(dtype)
        ba = rng.standard_normal(co).astype(dtype) if bias else None
        x = g.input(f"x_{name}", xa.shape, dtype)
        feeds[x.name] = xa
        xb = x if kind == "stem" else nb.to_blocked(x, c)
        wkind = "depthwise" if kind == "dw" else "conv"
        ins = [xb, nb.block_weights(g.param(f"w_{name}", wa), wkind, 1 if kind == "stem" else c, c, flip)]
        if bias:
            ins.append(nb.block_weights(g.param(f"b_{name}", ba), "bias", co=c))
        out = torch_conv(xa, wa, ba, None, s, pads, d, ci if kind == "dw" else 1, None, flip)
        ra = None
        if res:
            ra = rng.standard_normal(out.shape).astype(dtype)
            r = g.input(f"r_{name}", ra.shape, dtype)
            feeds[r.name] = ra
            ins.append(nb.to_blocked(r, c))
        attrs = dict(stride=s, padding=pads, dilation=d, residual=res)
        if act:
            attrs.update(activation=act, **({"min": -0.5, "max": 0.5} if act == "clip" else {}))
        if blocking:
            attrs["blocking"] = blocking
        y = g.add("conv_nchwc", ins, attrs, name=f"conv_{name}")
        g.output(nb.from_blocked(y, co), f"y_{name}")
        want[name] = torch_conv(xa, wa, ba, ra, s, pads, d, ci if kind == "dw" else 1, act, flip)
    return g, feeds, want


@pytest.fixture(scope="module", params=["float32", "float64"])
def conv_runs(request):
    g, feeds, want = conv_graph(request.param)
    got = {t: cc.compile(g, target=t, passes="none").run(feeds) for t in TARGETS}
    return request.param, got, want


@pytest.mark.parametrize("target", TARGETS)
def test_conv_nchwc_matches_torch(conv_runs, target):
    dtype, got, want = conv_runs
    for name in CASES:
        assert_close(got[target][f"y_{name}"], want[name], rtol=TOL[dtype], atol=TOL[dtype],
                     what=f"conv_nchwc {name} {dtype} [{target}]")


def test_kernels_use_vectors_and_tiles():
    """The C kernels are the register-tiled ones, with the border columns
    split off; the tile the context picked is the one the source shows."""
    g, _, _ = conv_graph("float32")
    from convc.codegen.c import generate
    src = generate(g).text
    head = re.search(r"node_conv_tile_3x2_last\([^;{]*\)\n\{", src)      # the definition (not a prototype)
    tile = src[head.start():]
    tile = tile[:tile.index("\n}\n")]
    assert "vector_size(" in src and "enum { UR = 5 };" in src
    assert "_tile(xn, wg, bg, yg, rg, oy, ox, 5, NB, 0)" in tile          # the interior, 2 blocks of 3
    assert "_tile(xn, wg, bg, yg, rg, oy, ox, 5, 1, 0)" in tile           # the last group: 1 block
    assert "border columns: taps checked" in src and "interior columns" in src


# -- pools and reorders on blocked data ------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_blocked_pools_match_torch(dtype):
    c = nb.block_size(dtype)
    rng = np.random.default_rng(5)
    xa = rng.standard_normal((2, 20, 13, 14)).astype(dtype)
    xa[1, 17, 4, 5] = np.nan                        # max_pool propagates NaN, as PyTorch
    g = cc.Graph(f"pools_{dtype[-2:]}")
    x = g.input("x", xa.shape, dtype)
    xb = nb.to_blocked(x, c)
    pools = {"mp": (3, 2, 1, 1, False), "mp_ceil": (3, 2, 0, 1, True), "mp_dil": (2, 1, 1, 2, False)}
    want = {}
    for key, (k, s, p, d, ceil) in pools.items():
        g.output(nb.from_blocked(nb.max_pool_nchwc(xb, k, s, p, d, ceil), 20), key)
        want[key] = F.max_pool2d(torch.tensor(xa), k, s, p, d, ceil_mode=ceil).numpy()
    g.output(nb.from_blocked(nb.global_avg_pool_nchwc(xb), 20), "gap")
    want["gap"] = xa.mean(axis=(2, 3), keepdims=True)
    g.output(xb, "blocked")                          # to_blocked itself, padding lanes zero
    want["blocked"] = nb.block_array(xa, c)
    for t in TARGETS:
        got = cc.compile(g, target=t, passes="none").run({"x": xa})
        for key, w in want.items():
            assert_close(got[key], w, rtol=TOL[dtype], atol=TOL[dtype], what=f"{key} {dtype} [{t}]")


# name: ((H, W), kernel, stride, padding ((top, bottom), (left, right)), dilation, ceil_mode); 20 channels
# (a block of padding lanes), batch 2
MAX_POOLS = {
    "resnet_3x3_s2": ((15, 17), 3, 2, ((1, 1), (1, 1)), 1, False),     # border column on both sides, odd sizes
    "ceil_overhang": ((13, 14), 3, 2, ((0, 0), (0, 0)), 1, True),      # the last window runs past the input
    "ceil_padded": ((12, 11), 3, 2, ((1, 1), (1, 1)), 1, True),
    "k2_s2": ((10, 12), 2, 2, ((0, 0), (0, 0)), 1, False),            # interior only: no border column
    "stride_gaps": ((11, 13), 2, 3, ((1, 1), (1, 1)), 1, False),       # stride > kernel
    "dilated": ((9, 16), 3, 1, ((1, 1), (1, 1)), 2, False),
    "asym_pad": ((8, 9), 5, 1, ((0, 2), (2, 1)), 1, False),
    "no_interior": ((3, 4), 5, 1, ((2, 2), (2, 2)), 1, False),         # every window reaches into padding
    "rect_1x5": ((6, 15), (1, 5), (1, 2), ((0, 0), (2, 2)), 1, False),
}


def torch_max_pool(xa, k, s, pads, d, ceil):
    (t, b), (le, r) = pads
    if t == b and le == r:
        return F.max_pool2d(torch.tensor(xa), k, s, (t, le), d, ceil_mode=ceil).numpy()
    assert not ceil
    return F.max_pool2d(F.pad(torch.tensor(xa), (le, r, t, b), value=-np.inf), k, s, 0, d).numpy()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_blocked_max_pool_windows_match_torch(dtype):
    """max_pool_nchwc against torch over interior and border windows, with
    NaN (it wins, as in torch) and -inf in interior, first- and last-column
    pixels, and whole channels of -inf."""
    c = nb.block_size(dtype)
    rng = np.random.default_rng(11)
    g, feeds, want = cc.Graph(f"max_pools_{dtype[-2:]}"), {}, {}
    for name, (size, k, s, pads, d, ceil) in MAX_POOLS.items():
        xa = rng.standard_normal((2, 20) + size).astype(dtype)
        h, w = size
        xa[0, 3, h // 2, w // 2] = np.nan                   # interior
        xa[1, 17, 0, 0] = np.nan                            # first column (a border window when padded)
        xa[1, 5, h - 1, w - 1] = np.nan                     # last column
        xa[0, 19, :, w - 1] = -np.inf                       # the last lane of the last block
        xa[1, 8] = -np.inf                                  # every tap -inf
        x = g.input(f"x_{name}", xa.shape, dtype)
        feeds[x.name] = xa
        g.output(nb.from_blocked(nb.max_pool_nchwc(nb.to_blocked(x, c), k, s, pads, d, ceil), 20), name)
        want[name] = torch_max_pool(xa, k, s, pads, d, ceil)
    for t in TARGETS:
        got = cc.compile(g, target=t, passes="none").run(feeds)
        for name in MAX_POOLS:
            # a max is exact; NaN and -inf must sit where torch has them
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"max_pool_nchwc {name} {dtype} [{t}]")


def test_blocked_max_pool_kernel_is_vector_and_split():
    """The C max pool is the vector one: interior columns without tap checks
    (a constant tap count), border columns over a clipped tap range."""
    g = cc.Graph("mp_src")
    x = g.input("x", (1, 2, 15, 17, nb.block_size("float32")))
    g.output(nb.max_pool_nchwc(x, 3, 2, 1), "y")
    from convc.codegen.c import generate
    src = generate(g).text
    assert "vector_size(" in src and "enum { X_FIRST = 1, X_END = 8 };" in src
    assert "_window(xc, iy0, ky_lo, ky_hi, ox * S_X - P_X, 0, K_X)" in src


# -- gradients -----------------------------------------------------------------------
def test_reorder_gradients_and_inference_only_ops():
    c = nb.block_size("float32")
    rng = np.random.default_rng(6)
    g = cc.Graph("reorder_grad")
    x = g.input("x", (2, 5, 3, 4))
    gb = g.input("gb", (2, 1, 3, 4, c))
    (dx,) = cc.grad(nb.to_blocked(x, c), [x], grad_output=gb)
    g.output(dx, "dx")
    gba = rng.standard_normal((2, 1, 3, 4, c)).astype(np.float32)
    got = cc.compile(g).run({"x": np.zeros((2, 5, 3, 4), np.float32), "gb": gba})["dx"]
    assert_close(got, nb.unblock_array(gba, 5), what="d to_blocked")     # the adjoint drops the padding

    g2 = cc.Graph("conv_nchwc_grad")
    x2 = g2.input("x", (1, 1, 3, 3, c))
    w2 = nb.block_weights(g2.param("w", np.ones((c, c, 1, 1), np.float32)), "conv", c, c)
    with pytest.raises(cc.ConvcError, match="not differentiable.*train pipeline"):
        cc.grad(nb.conv_nchwc(x2, w2), [x2], grad_output=g2.input("gy", (1, 1, 3, 3, c)))


# -- whole nets through passes="blocked" --------------------------------------------------
def resnet_like(dtype="float32", batch=2, seed=0):
    """A ResNet-18-like trunk: 7x7/2 stem from 3 channels + BN + ReLU, 3x3/2
    max pool, a basic block (two 3x3 convs, residual add, ReLU), a
    downsampling block (3x3/2 and a 1x1/2 shortcut), a concat (NCHW-only),
    global average pool, dense."""
    rng = np.random.default_rng(seed)
    g = cc.Graph("resnet_like")

    def p(name, shape, scale=None):
        s = scale if scale is not None else np.sqrt(2.0 / np.prod(shape[1:]))
        return g.param(name, rng.standard_normal(shape) * s, dtype)

    x = g.input("x", (batch, 3, 40, 44), dtype)
    h = cc.conv(x, p("stem_w", (32, 3, 7, 7)), stride=2, padding=3, name="stem")
    h = relu(cc.batch_norm(h, p("bn_mean", (32,), 0.1), g.param("bn_var", rng.uniform(0.5, 2, 32), dtype),
                           p("bn_gamma", (32,), 1.0), p("bn_beta", (32,), 0.1), name="stem_bn"), name="stem_relu")
    h = cc.max_pool(h, 3, 2, 1, name="pool")
    a = relu(cc.conv(h, p("b1_w1", (32, 32, 3, 3)), p("b1_b1", (32,), 0.1), padding=1, name="b1_conv1"))
    a = cc.conv(a, p("b1_w2", (32, 32, 3, 3)), p("b1_b2", (32,), 0.1), padding=1, name="b1_conv2")
    h = relu(add(a, h, name="b1_add"), name="b1_relu")
    a = relu(cc.conv(h, p("b2_w1", (48, 32, 3, 3)), p("b2_b1", (48,), 0.1), stride=2, padding=1, name="b2_conv1"))
    a = cc.conv(a, p("b2_w2", (48, 48, 3, 3)), p("b2_b2", (48,), 0.1), padding=1, name="b2_conv2")
    sc = cc.conv(h, p("b2_ws", (48, 32, 1, 1)), stride=2, name="b2_shortcut")
    h = relu(add(a, sc, name="b2_add"), name="b2_relu")
    h = cc.concat([h, cc.conv(h, p("side_w", (16, 48, 1, 1)), name="side")], axis=1, name="cat")
    h = cc.conv(h, p("after_w", (32, 64, 3, 3)), padding=1, name="after_cat")
    h = cc.flatten(cc.global_avg_pool(h, name="gap"), name="flatten")
    g.output(cc.dense(h, p("fc_w", (10, 32)), p("fc_b", (10,), 0.1), name="fc"), "logits")
    return g


@pytest.mark.parametrize("net,dtype", [("mobilenet_tiny", "float32"), ("resnet_like", "float32"),
                                       ("resnet_like", "float64")])
def test_blocked_pipeline_equals_default(net, dtype):
    g = mobilenet_tiny(batch=2, dtype=dtype) if net == "mobilenet_tiny" else resnet_like(dtype)
    shape = g.node("x")["type"].shape
    xa = np.random.default_rng(9).standard_normal(shape).astype(dtype)
    blocked = run_passes(g, "blocked")
    assert sum(blocked.node(n)["op"] == "conv_nchwc" for n in blocked.nx.nodes) >= 6
    want = cc.compile(g, passes="default").run({"x": xa})["logits"]
    got = cc.compile(g, passes="blocked").run({"x": xa})["logits"]
    assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype], what=f"{net} {dtype}: blocked vs default")


NCHW_ONLY = {"concat", "flatten", "reshape", "dense"}


def test_reorders_only_where_the_layout_changes():
    g = run_passes(resnet_like(), ["fold_batch_norm", "fuse_epilogues", "to_blocked_layout"])
    ops = {n: g.node(n)["op"] for n in g.nx.nodes}
    outputs = set(g.outputs.values())
    for n, op in ops.items():
        if op == "from_blocked":             # blocked -> NCHW only before an NCHW-only op or an output
            assert all(ops[u] in NCHW_ONLY for u in g.users_of(n)) or n in outputs, (n, g.users_of(n))
        if op == "to_blocked":               # NCHW -> blocked only after a graph input or an NCHW-only op
            (src,) = g.inputs_of(n)
            assert ops[src] in NCHW_ONLY | {"input"}, (n, src)
        if op == "conv_nchwc":               # consecutive convs: no reorder between them
            x = g.inputs_of(n)[0]
            assert ops[x] in {"conv_nchwc", "max_pool_nchwc", "input", "to_blocked"}, (n, ops[x])
    count = lambda op: sum(o == op for o in ops.values())  # noqa: E731
    # around the concat (out of the two producers; back in after it), before global pooling's flatten
    assert count("from_blocked") == 3 and count("to_blocked") == 1
    assert count("conv") == 0 and count("conv_nchwc") == 8
    stem = next(n for n, op in ops.items() if op == "conv_nchwc" and g.inputs_of(n)[0] == "x")
    assert len(g.node(stem)["type"].shape) == 5                   # the stem reads the NCHW image
    b1 = next(n for n in ops if n.startswith("b1_conv2") and ops[n] == "conv_nchwc")
    assert g.node(b1)["attrs"].get("residual") and g.node(b1)["attrs"].get("activation") == "relu"


def test_pass_report_and_explicit_pass_list():
    g = mobilenet_tiny()
    _, reps = cc.passes.report(g, ["fuse_epilogues", "to_blocked_layout", "fold_params"])
    rep = reps[1]
    assert rep.name == "to_blocked_layout" and rep.changed
    assert any(n.endswith(".nchwc") for n in rep.added) and "stem.relu" in rep.removed
    assert "pass to_blocked_layout" in rep.table()
    xa = np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype(np.float32)
    got = cc.compile(g, passes=["fuse_epilogues", "to_blocked_layout", "fold_params"]).run({"x": xa})["logits"]
    assert_close(got, cc.compile(g, target="numpy").run({"x": xa})["logits"], what="explicit pass list")


def test_eligibility_rule():
    g = cc.Graph("elig")
    x = g.input("x", (1, 32, 8, 8))
    x1 = g.input("x1", (1, 32, 8))
    w = np.ones((32, 16, 3, 3), np.float32)
    grouped = cc.conv(x, w, groups=2, name="grouped")
    plain = cc.conv(x, np.ones((32, 32, 3, 3), np.float32), name="plain")
    dw = cc.conv(x, np.ones((32, 1, 3, 3), np.float32), groups=32, name="dw")
    mult = cc.conv(x, np.ones((64, 1, 3, 3), np.float32), groups=32, name="multiplier")
    untied = cc.conv(x, np.ones((32, 32, 1, 1), np.float32), np.ones((32, 8, 8), np.float32), name="untied")
    few = cc.conv(x, np.ones((1, 32, 1, 1), np.float32), name="one_channel")
    one_d = cc.conv(x1, np.ones((32, 32, 3), np.float32), name="conv1d")
    for v in (grouped, plain, dw, mult, untied, few, one_d):
        g.output(v)
    assert [n for n in ("grouped", "plain", "dw", "multiplier", "untied", "one_channel", "conv1d")
            if blocked_eligible(g, n)] == ["plain", "dw"]


def test_default_blocking_fits_the_registers():
    for regs in (16, 32):
        for ow in (1, 3, 7, 28, 56, 112):
            for ob in (1, 3, 4, 8):
                t = nb.default_blocking(ow, ob, regs)
                assert t["ur_w"] * t["oc_blocks"] + t["oc_blocks"] + 1 <= regs and t["ur_w"] <= ow
    segs = nb.row_segments(56, 1, 55, 14)
    cols = [c for s in segs for c in range(s["start"], s["end"])]
    assert cols == list(range(56)) and all((s["end"] - s["start"]) % s["ur"] == 0 for s in segs)
    assert [s["edge"] for s in segs] == [1, 0, 0, 1]


# -- broken rules ------------------------------------------------------------------------
def test_bad_attributes_raise_rule_errors():
    g = cc.Graph("bad")
    x = g.input("x", (1, 20, 8, 8))
    xb = nb.to_blocked(x, 16)
    w = g.param("w", np.ones((20, 20, 3, 3), np.float32))
    wb = nb.block_weights(w, "conv", 16, 16)
    cases = [
        (lambda: nb.to_blocked(x, 0), "c must be an int >= 1"),
        (lambda: nb.to_blocked(xb, 16), "must be NCHW"),
        (lambda: nb.from_blocked(xb, 40), r"channels=40 does not fit 2 blocks of 16"),
        (lambda: nb.from_blocked(x, 20), "must be blocked"),
        (lambda: nb.block_weights(w, "winograd", 16, 16), "kind must be one of"),
        (lambda: nb.block_weights(w, "depthwise", 1, 16), r"depthwise weights must be \(C, 1, KH, KW\)"),
        (lambda: nb.conv_nchwc(xb, nb.block_weights(w, "conv", 8, 16)), r"weight blocks .* must match"),
        (lambda: nb.conv_nchwc(x, wb), r"weight blocks .* must match"),
        (lambda: nb.conv_nchwc(xb, wb, nb.block_weights(g.param("b", np.ones(40, np.float32)), "bias", co=16)),
         r"bias must be blocked \(2, 16\)"),
        (lambda: nb.conv_nchwc(xb, wb, blocking={"ur_w": 4}), "blocking must be a dict with keys"),
        (lambda: nb.conv_nchwc(xb, wb, blocking={"ur_w": 0, "oc_blocks": 1}), "ur_w must be an int >= 1"),
        (lambda: nb.conv_nchwc(xb, wb, stride=0), "stride"),
        (lambda: g.add("conv_nchwc", [xb, wb, xb], dict(stride=1, padding=0, dilation=1, residual=True)),
         "residual must be"),
        (lambda: nb.max_pool_nchwc(x, 3), "must be blocked"),
    ]
    for build, rule in cases:
        with pytest.raises(cc.ValidationError, match=rule) as e:
            build()
        assert "node '" in str(e.value) and "[inputs:" in str(e.value)
    # geometry left out takes conv's defaults (stride 1, no padding, dilation 1), not a KeyError
    y = g.add("conv_nchwc", [xb, wb], {})
    assert y.shape == (1, 2, 6, 6, 16)
    assert g.node(y.name)["attrs"]["dilation"] == (1, 1) and g.node(y.name)["attrs"]["stride"] == (1, 1)


def test_tuning_database_overrides_the_rule():
    """A tuned entry for a conv decides: "blocked" takes it into NCHWc, another
    algorithm leaves it to its pass; the choice is noted in the pass report."""
    from convc import tuner, tuning
    from convc.host import probe
    from convc.runtime.threads import get_num_threads

    g = cc.Graph("tuned")
    x = g.input("x", (1, 32, 10, 10))
    g.output(cc.conv(x, np.ones((32, 32, 3, 3), np.float32) / 100, padding=1, name="c3"), "y")
    sig = tuning.signature(g, "c3")
    algorithms = {c.algorithm for c in tuner.candidates(g, "c3", cc.passes.resolve("blocked"))}
    assert "blocked" in algorithms
    made = {}
    for algo in ("blocked", "direct", "gemm"):
        entry = next(c for c in tuner.candidates(g, "c3") if c.algorithm == algo).entry()
        db = tuning.Database(probe(), None, {tuning.entry_key(sig, get_num_threads()): entry})
        with tuning.using(db):
            out, reps = cc.passes.report(g, "blocked")
        made[algo] = {out.node(n)["op"] for n in out.nx.nodes}
        if algo == "blocked":
            assert any("tuned -> blocked" in t for r in reps if r.name == "to_blocked_layout" for t in r.notes)
    assert "conv_nchwc" in made["blocked"]
    assert "conv_nchwc" not in made["direct"] and "conv" in made["direct"]
    assert "conv_nchwc" not in made["gemm"] and "matmul" in made["gemm"]


def test_default_pipeline_blocks_stems_only_and_matches_the_reference():
    """choose_blocked_layout (default pipeline): a stem (fewer input channels
    than a block) runs as conv_nchwc with its epilogue, through the max pool
    in NCHWc, and the layout goes back to NCHW before the next conv, which
    the default rules keep (Winograd here); the output is the reference's."""
    import convc as cc
    from convc.passes import run
    from convc.passes.blocked import block_size
    from convc.reference import evaluate

    rng = np.random.default_rng(7)
    g = cc.Graph("stemnet")
    x = g.input("x", (1, 3, 30, 30))
    w1 = g.param("w1", (rng.standard_normal((32, 3, 7, 7)) * 0.1).astype(np.float32))
    b1 = g.param("b1", rng.standard_normal(32).astype(np.float32))
    w2 = g.param("w2", (rng.standard_normal((32, 32, 3, 3)) * 0.1).astype(np.float32))
    h = cc.max_pool(cc.relu(cc.conv(x, w1, b1, stride=2, padding=3)), 3, stride=2, padding=1)
    g.output(cc.conv(h, w2, None, padding=1), "y")
    out = run(g, "default")
    ops = [out.node(n)["op"] for n in out.topological_order() if out.node(n)["op"] not in ("input", "param")]
    assert ops.index("conv_nchwc") < ops.index("max_pool_nchwc") < ops.index("from_blocked") < ops.index("winograd_conv")
    assert ops.count("conv_nchwc") == 1 and "to_blocked" not in ops
    (stem,) = [n for n in out.topological_order() if out.node(n)["op"] == "conv_nchwc"]
    assert out.node(stem)["attrs"]["activation"] == "relu" and block_size("float32") > 3
    feeds = {"x": rng.standard_normal((1, 3, 30, 30)).astype(np.float32)}
    want = evaluate(g, feeds)["y"]
    got = cc.compile(g).run(feeds)["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(want))))

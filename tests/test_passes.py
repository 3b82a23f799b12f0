"""The lowering passes (``convc.passes``): every pass fires where it applies
and keeps what the graph computes, leaves graphs where it does not apply
equal, never changes its argument; the pass manager's debug check and
reports; the ``default`` pipeline on LeNet and MobileNet-style nets; the
``study`` pipeline on every conv kind; ``cc.conv_matrix``.

Oracles: the reference interpreter on the UNPASSED graph, torch and hand
arithmetic. Each pass gets one graph holding a seeded grid of random
configurations (one input/output pair per configuration), so each pass
costs two C builds (before and after, both with ``passes="none"``).
"""
from __future__ import annotations

import zlib
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convc as cc
from convc.passes import PASSES, PIPELINES
from convc.reference import evaluate
from helpers import assert_close, per_axis

TOL64 = 1e-10
ALL_PASSES = ("strided_to_downsampled", "fuse_downsample", "transposed_to_conv", "transposed_to_matmul",
              "conv_to_im2col", "local_to_matmul", "grouped_to_split", "dilated_to_dense", "tiled_to_convs",
              "fuse_separable", "factor_spatial_separable", "conv_to_fft", "fold_batch_norm",
              "fuse_epilogues", "fold_constants", "eliminate_dead_code", "eliminate_common_subexpressions",
              "conv_to_gemm", "conv_to_winograd", "fold_params", "to_blocked_layout", "choose_blocked_layout",
              # int8 (tests/test_quantize.py, test_onnx_int8.py, test_int8_gemm.py test what they do)
              "fold_qdq", "split_int8_epilogues", "qconv_to_gemm", "cancel_requantize", "quantize_int8",
              # memory (tests/test_memory_budget.py tests what they do)
              "inplace_elementwise", "inplace_depthwise", "inplace_pointwise", "patch_first_stages")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def rng_for(tag: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(tag.encode()))


def pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def ints(rng, lo, hi, n):
    """n ints in [lo, hi]."""
    return tuple(int(v) for v in rng.integers(lo, hi + 1, n))


def ops(g) -> Counter:
    return Counter(g.node(n)["op"] for n in g.nx.nodes)


def nodes_of(g, op) -> list[str]:
    return [n for n in g.topological_order() if g.node(n)["op"] == op]


def snapshot(g):
    """What must not change: the printed IR and every param value."""
    return str(g), {n: g.node(n)["value"].copy() for n in g.param_names}


def assert_same_snapshot(a, b, what):
    assert a[0] == b[0], f"{what}: IR changed:\n--- before\n{a[0]}\n--- after\n{b[0]}"
    assert a[1].keys() == b[1].keys(), f"{what}: params {sorted(a[1])} -> {sorted(b[1])}"
    for n in a[1]:
        assert a[1][n].dtype == b[1][n].dtype and np.array_equal(a[1][n], b[1][n]), f"{what}: param {n} changed"


def feeds_for(g, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for n in g.input_names:
        t = g.node(n)["type"]
        out[n] = rng.standard_normal(t.shape).astype(t.dtype)
    return out


def compare(got: dict, want: dict, what: str, rtol: float, atol_rel: float):
    assert set(got) == set(want), f"{what}: outputs {sorted(got)} != {sorted(want)}"
    for o in want:
        w = np.asarray(want[o])
        scale = max(1.0, float(np.max(np.abs(w)))) if w.size else 1.0
        assert_close(got[o], w, rtol=rtol, atol=atol_rel * scale, what=f"{what}, output {o}")


def check_pass(name, g, fired=None, rtol=TOL64, atol_rel=TOL64, compile_c=True):
    """Run pass ``name`` on ``g``: the argument is unchanged, ``fired(g2)``
    holds, and the reference and the C build of the rewritten graph give the
    unpassed graph's reference outputs (the unpassed C build too)."""
    before = snapshot(g)
    g2 = PASSES[name](g)
    assert_same_snapshot(before, snapshot(g), f"{name} changed its argument")
    g2.verify()
    if fired is not None:
        fired(g2)
    feeds = feeds_for(g)
    want = evaluate(g, feeds)
    compare(evaluate(g2, feeds), want, f"{name}: reference after", rtol, atol_rel)
    if compile_c:
        compare(cc.compile(g, "c", passes="none").run(feeds), want, f"{name}: C before", rtol, atol_rel)
        mod = cc.compile(g2, "c", passes="none")
        assert str(mod.graph) == str(g2), "passes='none' must compile the graph as given"
        compare(mod.run(feeds), want, f"{name}: C after", rtol, atol_rel)
    return g2


def check_noop(name, g):
    """Pass ``name`` does not apply to ``g``: it returns an equal graph."""
    before = snapshot(g)
    g2 = PASSES[name](g)
    assert_same_snapshot(before, snapshot(g), f"{name} changed its argument")
    assert_same_snapshot(before, snapshot(g2), f"{name} rewrote a graph it does not apply to")
    assert cc.passes.run(g, [name]).structure_hash() == g.structure_hash()


def rand_padding(rng, rank, kinds=("int", "axes", "pairs", "same", "valid", "full")):
    kind = pick(rng, kinds)
    if kind == "int":
        return int(rng.integers(0, 3))
    if kind == "axes":
        return ints(rng, 0, 2, rank)
    if kind == "pairs":
        return tuple((int(a), int(b)) for a, b in rng.integers(0, 3, (rank, 2)))
    return kind


def conv_out_shape(x_shape, w_shape, dtype, **geo):
    s = cc.Graph("scratch")
    return cc.conv(s.input("x", x_shape, dtype), s.param("w", np.zeros(w_shape), dtype), **geo).shape


def rand_bias(g, rng, name, kind, c_out, out_shape, dtype):
    if kind == "none":
        return None
    shape = (c_out,) if kind == "tied" else tuple(out_shape[1:])
    return g.param(name, rng.standard_normal(shape), dtype)


def add_conv(g, rng, i, rank, *, stride=None, dilation=None, groups=None, flip=None, bias=None, padding=None,
             kernel=None, c_in_g=None, c_out_g=None, batch=None, dtype="float64", extra=(0, 4),
             pad_kinds=("int", "axes", "pairs", "same", "valid", "full")):
    """A random conv on a fresh input ``x{i}``; returns (Value, description)."""
    stride = stride if stride is not None else ints(rng, 1, 2, rank)
    dilation = dilation if dilation is not None else ints(rng, 1, 2, rank)
    groups = groups if groups is not None else pick(rng, (1, 1, 2, 3))
    flip = flip if flip is not None else bool(rng.integers(2))
    padding = padding if padding is not None else rand_padding(rng, rank, pad_kinds)
    kernel = kernel or ints(rng, 1, 3, rank)
    c_in = groups * (c_in_g or int(rng.integers(1, 3)))
    c_out = groups * (c_out_g or int(rng.integers(1, 3)))
    batch = batch or int(rng.integers(1, 3))
    sizes = tuple(d * (k - 1) + 1 + int(rng.integers(extra[0], extra[1] + 1))
                  for k, d in zip(kernel, per_axis(dilation, rank)))
    x = g.input(f"x{i}", (batch, c_in, *sizes), dtype)
    wshape = (c_out, c_in // groups, *kernel)
    geo = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, flip=flip)
    out = conv_out_shape(x.shape, wshape, dtype, **geo)
    bias = bias or pick(rng, ("none", "tied", "untied"))
    w = g.param(f"w{i}", rng.standard_normal(wshape), dtype)
    b = rand_bias(g, rng, f"b{i}", bias, c_out, out, dtype)
    y = cc.conv(x, w, b, name=f"conv{i}", **geo)
    return y, f"conv{i}: x{x.shape} w{wshape} {geo} bias={bias}"


# ---------------------------------------------------------------------------
# (1) every pass fires where it applies and keeps the outputs
# ---------------------------------------------------------------------------
RANKS = (1, 2, 3, 2, 1, 2, 3, 2, 2)


def test_strided_to_downsampled_fires_and_keeps_outputs():
    rng = rng_for("strided")
    g = cc.Graph("strided")
    strided = []
    for i, rank in enumerate(RANKS):
        stride = ints(rng, 1, 3, rank)
        if all(s == 1 for s in stride):
            stride = stride[:-1] + (2,)
        y, _ = add_conv(g, rng, i, rank, stride=stride, bias=("none", "tied", "untied")[i % 3])
        strided.append((y.name, stride, y.shape))
        g.output(y, f"y{i}")

    def fired(g2):
        assert not any(n in g2.nx for n, _, _ in strided), "the strided convs must be gone"
        convs = nodes_of(g2, "conv")
        assert len(convs) == len(strided)
        assert all(set(g2.node(n)["attrs"]["stride"]) == {1} for n in convs), "every conv is unit-stride"
        downs = nodes_of(g2, "downsample")
        assert len(downs) == len(strided)
        for d, (_, stride, shape) in zip(downs, strided):
            assert g2.node(d)["attrs"]["stride"] == stride
            (src,) = g2.inputs_of(d)
            assert g2.node(src)["op"] == "conv" and g2.node(src)["attrs"]["stride"] == (1,) * len(stride)
        assert ops(g2)["add"] == sum(1 for i in range(len(RANKS)) if i % 3 == 2), "untied biases added after"

    check_pass("strided_to_downsampled", g, fired)


def test_fuse_downsample_fires_and_keeps_outputs():
    rng = rng_for("fuse_downsample")
    g = cc.Graph("fuse_down")
    want_strides = []
    for i, rank in enumerate(RANKS):
        s1 = ints(rng, 1, 2, rank)
        s2 = ints(rng, 1, 3, rank)
        if all(s == 1 for s in s2):
            s2 = (2,) + s2[1:]
        y, _ = add_conv(g, rng, i, rank, stride=s1, bias=pick(rng, ("none", "tied")), extra=(2, 6))
        g.output(cc.downsample(y, s2, name=f"down{i}"), f"y{i}")
        want_strides.append(tuple(a * b for a, b in zip(s1, s2)))

    def fired(g2):
        assert ops(g2)["downsample"] == 0
        convs = nodes_of(g2, "conv")
        assert sorted(g2.node(n)["attrs"]["stride"] for n in convs) == sorted(want_strides)
        assert len(convs) == len(RANKS)

    check_pass("fuse_downsample", g, fired)


def test_strided_then_fused_is_the_original_graph():
    rng = rng_for("roundtrip")
    g = cc.Graph("roundtrip")
    for i, rank in enumerate((1, 2, 3)):
        y, _ = add_conv(g, rng, i, rank, stride=(2,) * rank, bias="tied")
        g.output(cc.relu(y, name=f"act{i}"), f"y{i}")
    g2 = cc.passes.run(g, ["strided_to_downsampled", "fuse_downsample"])
    assert ops(g2) == ops(g)
    for n in nodes_of(g, "conv"):
        assert g2.node(n)["attrs"] == g.node(n)["attrs"]          # same name, same attributes
        assert g2.inputs_of(n) == g.inputs_of(n)


def transposed_graph(tag, allow_big_output_padding):
    rng = rng_for(tag)
    g = cc.Graph(tag)
    cases = []
    for i, rank in enumerate(RANKS):
        groups = pick(rng, (1, 2, 3))
        stride = ints(rng, 1, 3, rank)
        dilation = ints(rng, 1, 2, rank)
        k = ints(rng, 1, 3, rank)
        pk = pick(rng, ("int", "axes", "pairs", "valid"))
        padding = (int(rng.integers(0, 2)) if pk == "int" else ints(rng, 0, 2, rank) if pk == "axes" else
                   tuple((int(a), int(b)) for a, b in rng.integers(0, 2, (rank, 2))) if pk == "pairs" else "valid")
        limit = [max(s, d) if allow_big_output_padding else s for s, d in zip(stride, dilation)]
        opad = tuple(int(rng.integers(0, m)) for m in limit)
        c_in, c_out_g = groups * int(rng.integers(1, 3)), int(rng.integers(1, 3))
        n = ints(rng, 2, 4, rank)
        batch = int(rng.integers(1, 3))
        x = g.input(f"x{i}", (batch, c_in, *n), "float64")
        w = g.param(f"w{i}", rng.standard_normal((c_in, c_out_g, *k)))
        try:
            s = cc.Graph("s")
            out = cc.conv_transpose(s.input("x", x.shape, "float64"), s.param("w", np.zeros(w.shape)),
                                    stride=stride, padding=padding, output_padding=opad, dilation=dilation,
                                    groups=groups).shape
        except cc.ValidationError:          # padding too large for this small input: drop the padding
            padding = 0
            out = None
        bias_kind = ("none", "tied", "untied")[i % 3]
        if out is None:
            s = cc.Graph("s")
            out = cc.conv_transpose(s.input("x", x.shape, "float64"), s.param("w", np.zeros(w.shape)),
                                    stride=stride, padding=padding, output_padding=opad, dilation=dilation,
                                    groups=groups).shape
        b = rand_bias(g, rng, f"b{i}", bias_kind, out[1], out, "float64")
        y = cc.conv_transpose(x, w, b, stride=stride, padding=padding, output_padding=opad, dilation=dilation,
                              groups=groups, name=f"convT{i}")
        cases.append(dict(stride=stride, groups=groups, y=y.name))
        g.output(y, f"y{i}")
    # a padding larger than d*(k-1): the lowering must crop, not pad
    x = g.input("xcrop", (1, 2, 6, 5), "float64")
    y = cc.conv_transpose(x, g.param("wcrop", rng.standard_normal((2, 2, 2, 3))), stride=3, padding=(2, 3),
                          name="convTcrop")
    cases.append(dict(stride=(3, 3), groups=1, y=y.name))
    g.output(y, "ycrop")
    return g, cases


def test_transposed_to_conv_fires_and_keeps_outputs():
    g, cases = transposed_graph("transposed_conv", allow_big_output_padding=True)

    def fired(g2):
        assert ops(g2)["conv_transpose"] == 0
        convs = nodes_of(g2, "conv")
        assert len(convs) == len(cases)
        assert all(g2.node(n)["attrs"]["flip"] is True for n in convs), "true convolutions (flipped kernel)"
        assert all(set(g2.node(n)["attrs"]["stride"]) == {1} for n in convs)
        assert sorted(g2.node(n)["attrs"]["groups"] for n in convs) == sorted(c["groups"] for c in cases)
        assert ops(g2)["dilate"] == sum(1 for c in cases if max(c["stride"]) > 1)
        assert ops(g2)["pad"] >= 1

    check_pass("transposed_to_conv", g, fired)


def test_transposed_to_matmul_fires_and_keeps_outputs():
    g, cases = transposed_graph("transposed_matmul", allow_big_output_padding=False)

    def fired(g2):
        assert ops(g2)["conv_transpose"] == 0
        assert ops(g2)["matmul"] == len(cases)
        assert ops(g2)["col2im"] == len(cases)
        assert ops(g2)["conv"] == 0

    check_pass("transposed_to_matmul", g, fired)


def test_transposed_to_matmul_output_padding_beyond_stride():
    rng = rng_for("opad")
    g = cc.Graph("opad")
    x = g.input("x", (1, 2, 5, 5), "float64")
    g.output(cc.conv_transpose(x, g.param("w", rng.standard_normal((2, 3, 3, 3))), stride=1, dilation=2,
                               output_padding=1), "y")
    # col2im only covers the positions a strided conv of the output reaches, so
    # output_padding >= stride (legal when dilation > stride) is left alone
    g2 = PASSES["transposed_to_matmul"](g)
    assert str(g2) == str(g)
    assert ops(g2)["col2im"] == 0 and ops(g2)["conv_transpose"] == 1


def test_conv_to_im2col_fires_and_keeps_outputs():
    rng = rng_for("im2col")
    g = cc.Graph("im2col")
    for i, rank in enumerate(RANKS):
        y, _ = add_conv(g, rng, i, rank, stride=ints(rng, 1, 3, rank), groups=pick(rng, (1, 2, 3)),
                        bias=("none", "tied", "untied")[i % 3])
        g.output(y, f"y{i}")

    def fired(g2):
        assert ops(g2)["conv"] == 0
        assert ops(g2)["im2col"] == len(RANKS)
        assert ops(g2)["matmul"] == len(RANKS)
        flips = sorted(g2.node(n)["attrs"]["flip"] for n in nodes_of(g2, "im2col"))
        assert flips == sorted(g.node(n)["attrs"]["flip"] for n in nodes_of(g, "conv"))

    check_pass("conv_to_im2col", g, fired)


def test_conv_to_gemm_fires_on_convs_and_both_gradients(monkeypatch):
    import convc.passes.gemm as gemm

    monkeypatch.setattr(gemm, "MIN_MACS", 0)        # the random convs are small; the rule is tested below
    rng = rng_for("gemm")
    g = cc.Graph("gemm")
    outs, flips = [], 0
    for i, rank in enumerate(RANKS):
        y, _ = add_conv(g, rng, i, rank, stride=ints(rng, 1, 3, rank), groups=pick(rng, (1, 2, 3)), c_in_g=2,
                        c_out_g=2, bias=("none", "tied", "untied")[i % 3])
        outs.append(y)
        g.output(y, f"y{i}")
        flips += g.node(y.name)["attrs"]["flip"]
    loss = outs[0]
    for y in outs:
        loss = cc.add(cc.reduce_sum(cc.mul(y, y), tuple(range(len(y.shape)))), loss) if y is not outs[0] else \
            cc.reduce_sum(cc.mul(y, y), tuple(range(len(y.shape))))
    xs = [g.value(f"x{i}") for i in range(len(RANKS))]
    ws = [g.value(g.inputs_of(y.name)[1]) for y in outs]
    for i, d in enumerate(cc.grad(loss, xs + ws)):
        g.output(d, f"d{i}")
    n_conv = len(RANKS)
    assert ops(g)["conv_grad_kernel"] == n_conv and ops(g)["conv_grad_input"] == n_conv
    ungrouped = sum(g.node(y.name)["attrs"]["groups"] == 1 for y in outs)
    assert 0 < ungrouped < n_conv and all(y.shape[1] < gemm.NARROW for y in outs)

    def fired(g2):
        assert ops(g2)["conv"] == 0 and ops(g2)["conv_grad_kernel"] == 0
        assert ops(g2)["conv_grad_input"] == flips, "h of a flipped conv stays (col2im has no flip)"
        assert ops(g2)["im2col"] == 2 * n_conv and ops(g2)["col2im"] == n_conv - flips
        # g of an ungrouped conv with fewer than NARROW output channels (all of these) is dot products
        assert ops(g2)["dense"] == ungrouped
        assert ops(g2)["matmul"] == 3 * n_conv - flips - ungrouped

    check_pass("conv_to_gemm", g, fired)


def test_conv_to_gemm_pointwise_needs_no_im2col_and_small_convs_stay():
    rng = rng_for("gemm_rule")
    g = cc.Graph("gemm_rule")
    x = g.input("x", (2, 16, 20, 20), "float64")
    pw = cc.relu(cc.conv(x, g.param("pw", rng.standard_normal((32, 16, 1, 1))), g.param("b", rng.standard_normal(32))))
    g.output(pw, "pointwise")
    s = g.input("s", (1, 4, 5, 5), "float64")
    g.output(cc.conv(s, g.param("w", rng.standard_normal((4, 4, 3, 3)))), "small")    # 576 MACs
    big = g.input("xbig", (1, 16, 20, 20), "float64")
    g.output(cc.conv(big, g.param("w3", rng.standard_normal((16, 16, 3, 3))), padding=1), "big")
    import convc.passes.gemm as gemm

    assert cc.cost(g).macs > gemm.MIN_MACS

    def fired(g2):
        assert ops(g2)["conv"] == 1, "the small conv stays direct"
        assert ops(g2)["im2col"] == 1 and ops(g2)["matmul"] == 2, "the 1x1 conv multiplies x as it is"
        assert ops(g2)["relu"] == 1 and ops(g2)["add"] == 1, "bias and activation follow the GEMM"

    check_pass("conv_to_gemm", g, fired)


def test_conv_to_gemm_wide_kernel_gradient_is_a_gemm():
    import convc.passes.gemm as gemm

    rng = rng_for("gemm_wide")
    g = cc.Graph("gemm_wide")
    x = g.input("x", (2, 8, 12, 12), "float64")
    w = g.param("w", rng.standard_normal((gemm.NARROW, 8, 3, 3)))
    y = cc.conv(x, w, padding=1)
    dx, dw = cc.grad(cc.reduce_sum(cc.mul(y, y), (0, 1, 2, 3)), [x, w])
    g.output(dw, "dw")
    g.output(dx, "dx")

    def fired(g2):
        assert ops(g2)["conv_grad_kernel"] == 0 and ops(g2)["conv_grad_input"] == 0
        assert ops(g2)["dense"] == 0 and ops(g2)["matmul"] == 3, "forward, g and h are GEMMs"
        assert ops(g2)["im2col"] == 2, "(shared after eliminate_common_subexpressions)"

    check_pass("conv_to_gemm", g, fired)


def test_conv_to_winograd_fires_and_keeps_outputs():
    rng = rng_for("winograd_pass")
    g = cc.Graph("winograd_pass")
    for i, (pad, flip, bias) in enumerate([(1, False, True), (0, True, False), ((2, 0), False, True)]):
        x = g.input(f"x{i}", (2, 8, 9, 7), "float64")
        b = g.param(f"b{i}", rng.standard_normal(10)) if bias else None
        y = cc.conv(x, g.param(f"w{i}", rng.standard_normal((10, 8, 3, 3))), b, padding=pad, flip=flip)
        g.output(cc.relu(y) if i == 0 else y, f"y{i}")

    def fired(g2):
        assert ops(g2)["conv"] == 0 and ops(g2)["winograd_conv"] == 3 and ops(g2)["winograd_kernel"] == 3

    check_pass("conv_to_winograd", g, fired)


def test_local_to_matmul_fires_and_keeps_outputs():
    rng = rng_for("local")
    g = cc.Graph("local")
    for i, rank in enumerate(RANKS[:8]):
        stride, dilation = ints(rng, 1, 2, rank), ints(rng, 1, 2, rank)
        k = ints(rng, 1, 3, rank)
        padding = rand_padding(rng, rank, ("int", "axes", "pairs", "valid"))
        c_in, c_out, batch = int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(1, 3))
        n = tuple(d * (kk - 1) + 1 + int(rng.integers(0, 3)) for kk, d in zip(k, dilation))
        out = conv_out_shape((batch, c_in, *n), (c_out, c_in, *k), "float64", stride=stride, padding=padding,
                             dilation=dilation)
        x = g.input(f"x{i}", (batch, c_in, *n), "float64")
        w = g.param(f"w{i}", rng.standard_normal((c_out, *out[2:], c_in, *k)))
        b = rand_bias(g, rng, f"b{i}", ("none", "tied", "untied")[i % 3], c_out, out, "float64")
        g.output(cc.local_conv(x, w, b, stride=stride, padding=padding, dilation=dilation, name=f"local{i}"),
                 f"y{i}")

    def fired(g2):
        assert ops(g2)["local_conv"] == 0
        assert ops(g2)["im2col"] == 8 and ops(g2)["matmul"] == 8

    check_pass("local_to_matmul", g, fired)


def test_grouped_to_split_fires_and_keeps_outputs():
    rng = rng_for("grouped")
    g = cc.Graph("grouped")
    groups = []
    for i, rank in enumerate(RANKS):
        gr = pick(rng, (2, 3, 4))
        y, _ = add_conv(g, rng, i, rank, groups=gr, c_in_g=1 if i % 4 == 0 else None,   # some depthwise
                        bias=("none", "tied", "untied")[i % 3])
        groups.append(gr)
        g.output(y, f"y{i}")

    def fired(g2):
        convs = nodes_of(g2, "conv")
        assert all(g2.node(n)["attrs"]["groups"] == 1 for n in convs)
        assert len(convs) == sum(groups)
        assert ops(g2)["concat"] == len(groups)

    check_pass("grouped_to_split", g, fired)


def test_dilated_to_dense_fires_and_keeps_outputs():
    rng = rng_for("dilated")
    g = cc.Graph("dilated")
    dil = []
    for i, rank in enumerate(RANKS):
        d = ints(rng, 1, 3, rank)
        if all(v == 1 for v in d):
            d = (2,) + d[1:]
        y, _ = add_conv(g, rng, i, rank, dilation=d, kernel=ints(rng, 2, 3, rank),
                        bias=("none", "tied", "untied")[i % 3])
        dil.append((d, g.node(f"w{i}")["type"].shape[2:]))
        g.output(y, f"y{i}")

    def fired(g2):
        convs = nodes_of(g2, "conv")
        assert len(convs) == len(dil)
        assert all(set(g2.node(n)["attrs"]["dilation"]) == {1} for n in convs)
        got = sorted(g2.node(g2.inputs_of(n)[1])["type"].shape[2:] for n in convs)
        assert got == sorted(tuple(dd * (k - 1) + 1 for dd, k in zip(d, ks)) for d, ks in dil)
        assert ops(g2)["dilate"] == len(dil)

    check_pass("dilated_to_dense", g, fired)


def test_tiled_to_convs_fires_and_keeps_outputs():
    rng = rng_for("tiled")
    g = cc.Graph("tiled")
    pieces = 0
    for i, rank in enumerate(RANKS[:8]):
        stride, dilation = ints(rng, 1, 2, rank), ints(rng, 1, 2, rank)
        k = ints(rng, 1, 3, rank)
        tile = ints(rng, 1, 3 if rank < 3 else 2, rank)
        padding = rand_padding(rng, rank, ("int", "axes", "pairs", "valid"))
        c_in, c_out, batch = int(rng.integers(1, 3)), int(rng.integers(1, 3)), int(rng.integers(1, 3))
        n = tuple(d * (kk - 1) + 1 + int(rng.integers(0, 4)) for kk, d in zip(k, dilation))
        out = conv_out_shape((batch, c_in, *n), (c_out, c_in, *k), "float64", stride=stride, padding=padding,
                             dilation=dilation)
        x = g.input(f"x{i}", (batch, c_in, *n), "float64")
        w = g.param(f"w{i}", rng.standard_normal((c_out, c_in, *k, *tile)))
        b = rand_bias(g, rng, f"b{i}", ("none", "tied", "untied")[i % 3], c_out, out, "float64")
        g.output(cc.tiled_conv(x, w, b, stride=stride, padding=padding, dilation=dilation, name=f"tiled{i}"),
                 f"y{i}")
        p = 1
        for t, o in zip(tile, out[2:]):
            p *= min(t, o)
        pieces += p

    def fired(g2):
        assert ops(g2)["tiled_conv"] == 0
        assert ops(g2)["conv"] == pieces

    check_pass("tiled_to_convs", g, fired)


def conv_with_activation(g, x, w, b=None, activation=None, slope=0.01, name=None, **geo):
    """A conv node with a fused activation attribute (what fuse_epilogues makes)."""
    attrs = dict(stride=1, padding=0, dilation=1, groups=1, flip=False)
    attrs.update(geo)
    if activation:
        attrs["activation"] = activation
        if activation == "leaky_relu":
            attrs["negative_slope"] = slope
    return g.add("conv", [x, w] + ([b] if b is not None else []), attrs, name)


ACTS = (None, "relu", "leaky_relu", "sigmoid", "tanh")


def apply_act(v, kind, slope, name):
    if kind is None:
        return v
    if kind == "leaky_relu":
        return cc.leaky_relu(v, slope, name=name)
    return getattr(cc, kind)(v, name=name)


def test_fuse_separable_fires_and_keeps_outputs():
    rng = rng_for("separable")
    g = cc.Graph("separable")
    n_cases = 10
    for i in range(n_cases):
        c, mult, c_out = int(rng.integers(1, 4)), pick(rng, (1, 1, 2)), int(rng.integers(1, 5))
        k = ints(rng, 1, 3, 2)
        stride, dilation = ints(rng, 1, 2, 2), ints(rng, 1, 2, 2)
        padding = rand_padding(rng, 2)
        batch = int(rng.integers(1, 3))
        n = tuple(d * (kk - 1) + 1 + int(rng.integers(1, 6)) for kk, d in zip(k, dilation))
        x = g.input(f"x{i}", (batch, c, *n), "float64")
        w_dw = g.param(f"wd{i}", rng.standard_normal((c * mult, 1, *k)))
        b_dw = g.param(f"bd{i}", rng.standard_normal(c * mult)) if rng.integers(2) else None
        flip = bool(rng.integers(2))
        act, slope = pick(rng, ACTS), float(rng.uniform(0.05, 0.5))
        fused_dw_act = i % 4 == 3 and act is not None          # the activation already inside the depthwise conv
        h = conv_with_activation(g, x, w_dw, b_dw, act if fused_dw_act else None, slope, name=f"dw{i}",
                                 stride=stride, padding=padding, dilation=dilation, groups=c, flip=flip)
        if not fused_dw_act:
            h = apply_act(h, act, slope, f"act{i}")
        w_pw = g.param(f"wp{i}", rng.standard_normal((c_out, c * mult, 1, 1)))
        b_pw = g.param(f"bp{i}", rng.standard_normal(c_out)) if rng.integers(2) else None
        pw_act = pick(rng, ACTS)
        y = conv_with_activation(g, h, w_pw, b_pw, pw_act, float(rng.uniform(0.05, 0.5)), name=f"pw{i}")
        g.output(y, f"y{i}")

    def fired(g2):
        assert ops(g2)["fused_separable"] == n_cases
        assert ops(g2)["conv"] == 0, "neither the depthwise nor the pointwise conv is left"
        assert not any(ops(g2)[a] for a in ACTS[1:]), "activations are inside the fused op"

    check_pass("fuse_separable", g, fired)


@pytest.mark.parametrize("which", ["depthwise", "pointwise"])
def test_fuse_separable_untied_bias(which):
    rng = rng_for("sep_untied")
    g = cc.Graph("sep_untied")
    x = g.input("x", (1, 2, 6, 6), "float64")
    b_dw = g.param("bd", rng.standard_normal((2, 4, 4))) if which == "depthwise" else None
    h = cc.conv(x, g.param("wd", rng.standard_normal((2, 1, 3, 3))), b_dw, groups=2)
    b_pw = g.param("bp", rng.standard_normal((3, 4, 4))) if which == "pointwise" else None
    g.output(cc.conv(h, g.param("wp", rng.standard_normal((3, 2, 1, 1))), b_pw), "y")
    feeds = feeds_for(g)
    g2 = PASSES["fuse_separable"](g)          # fusing or not are both fine; crashing is not
    compare(evaluate(g2, feeds), evaluate(g, feeds), "fuse_separable with untied bias", TOL64, TOL64)


def test_factor_spatial_separable_sobel():
    g = cc.Graph("sobel")
    x = g.input("x", (2, 1, 9, 7), "float64")
    sobel = np.array([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]])
    g.output(cc.conv(x, g.param("sobel", sobel[None, None]), padding=1, name="edges"), "y")

    def fired(g2):
        convs = nodes_of(g2, "conv")
        assert len(convs) == 2
        kernels = [g2.node(g2.inputs_of(n)[1])["type"].shape[2:] for n in convs]
        assert kernels == [(3, 1), (1, 3)]
        col = g2.node(g2.inputs_of(convs[0])[1])["value"].reshape(3)
        row = g2.node(g2.inputs_of(convs[1])[1])["value"].reshape(3)
        np.testing.assert_allclose(np.outer(col, row), sobel, atol=1e-12)
        assert np.allclose(col / col[0], [1, 2, 1]) and np.allclose(row / row[0], [1, 0, -1])

    g2 = check_pass("factor_spatial_separable", g, fired)
    # 9 multiplications per output become 3 + 3 (the column conv pads only the
    # rows, the row conv only the columns: both give 9x7 outputs)
    assert cc.cost(g).macs == 2 * 9 * 7 * 9
    assert cc.cost(g2).macs == 2 * 9 * 7 * 3 + 2 * 9 * 7 * 3


def test_factor_spatial_separable_fires_and_keeps_outputs():
    rng = rng_for("factor")
    g = cc.Graph("factor")
    n_cases = 9
    for i in range(n_cases):
        c = pick(rng, (1, 2, 3))
        k = ints(rng, 2, 5, 2)
        stride, dilation = ints(rng, 1, 2, 2), ints(rng, 1, 2, 2)
        padding = rand_padding(rng, 2)
        batch = int(rng.integers(1, 3))
        n = tuple(d * (kk - 1) + 1 + int(rng.integers(0, 4)) for kk, d in zip(k, dilation))
        kernels = np.stack([np.outer(rng.standard_normal(k[0]), rng.standard_normal(k[1]))[None]
                            for _ in range(c)])
        x = g.input(f"x{i}", (batch, c, *n), "float64")
        geo = dict(stride=stride, padding=padding, dilation=dilation, groups=c, flip=bool(rng.integers(2)))
        out = conv_out_shape(x.shape, kernels.shape, "float64", **geo)
        b = rand_bias(g, rng, f"b{i}", ("none", "tied", "untied")[i % 3], c, out, "float64")
        act = ACTS[i % 5] if i % 2 else None
        y = conv_with_activation(g, x, g.param(f"w{i}", kernels), b, act, 0.2, name=f"conv{i}", **geo)
        g.output(y, f"y{i}")

    def fired(g2):
        convs = nodes_of(g2, "conv")
        assert len(convs) == 2 * n_cases
        for n in convs:
            kh, kw = g2.node(g2.inputs_of(n)[1])["type"].shape[2:]
            assert kh == 1 or kw == 1, f"%{n} still has a {kh}x{kw} kernel"

    check_pass("factor_spatial_separable", g, fired)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_conv_to_fft_fires_and_keeps_outputs(dtype):
    rng = rng_for("fft" + dtype)
    g = cc.Graph("fft")
    ranks = (1, 2, 1, 2, 2, 1, 2, 2)
    for i, rank in enumerate(ranks):
        y, _ = add_conv(g, rng, i, rank, stride=(1,) * rank, kernel=ints(rng, 1, 5, rank), dtype=dtype,
                        bias=("none", "tied", "untied")[i % 3], extra=(0, 6))
        g.output(y, f"y{i}")

    def fired(g2):
        assert ops(g2)["conv"] == 0
        assert ops(g2)["fft_conv"] == len(ranks)

    tol = 1e-4 if dtype == "float32" else TOL64
    check_pass("conv_to_fft", g, fired, rtol=tol, atol_rel=tol)


def test_fold_batch_norm_fires_and_keeps_outputs():
    rng = rng_for("bn")
    g = cc.Graph("bn")
    for i, rank in enumerate(RANKS):
        y, _ = add_conv(g, rng, i, rank, bias=("none", "tied", "untied")[i % 3])
        c = y.shape[1]
        mean, var = rng.standard_normal(c), rng.uniform(0.2, 3.0, c)
        gamma, beta = rng.standard_normal(c), rng.standard_normal(c)
        if i % 2:
            mean, var, gamma, beta = (g.param(f"{p}{i}", v) for p, v in
                                      zip(("mean", "var", "gamma", "beta"), (mean, var, gamma, beta)))
        g.output(cc.batch_norm(y, mean, var, gamma, beta, eps=float(rng.uniform(1e-5, 0.1)), name=f"bn{i}"),
                 f"y{i}")

    def fired(g2):
        assert ops(g2)["batch_norm"] == 0
        assert ops(g2)["conv"] == len(RANKS)
        assert all(len(g2.inputs_of(n)) == 3 for n in nodes_of(g2, "conv")), "every folded conv has a bias"

    check_pass("fold_batch_norm", g, fired)


def test_fuse_epilogues_fires_and_keeps_outputs():
    rng = rng_for("bias_act")
    g = cc.Graph("bias_act")
    want_acts = []
    n_cases = 10
    for i in range(n_cases):
        rank = RANKS[i % len(RANKS)]
        with_add = i % 3 != 2
        y, _ = add_conv(g, rng, i, rank, bias="none" if with_add else pick(rng, ("tied", "untied")))
        c = y.shape[1]
        if with_add:
            shape = pick(rng, ((c,) + (1,) * rank, (1, c) + (1,) * rank))
            b = g.param(f"cb{i}", rng.standard_normal(shape))
            y = cc.add(b, y, name=f"add{i}") if i % 2 else cc.add(y, b, name=f"add{i}")
        act = ACTS[1 + i % 4] if (i % 5) else None
        slope = float(rng.uniform(0.05, 0.5))
        y = apply_act(y, act, slope, f"act{i}")
        want_acts.append(act)
        g.output(y, f"y{i}")

    def fired(g2):
        assert ops(g2)["add"] == 0, "per-channel adds become conv biases"
        assert not any(ops(g2)[a] for a in ACTS[1:]), "activations are inside the convs"
        convs = nodes_of(g2, "conv")
        assert len(convs) == n_cases
        assert all(len(g2.inputs_of(n)) == 3 for n in convs)
        assert sorted(str(g2.node(n)["attrs"].get("activation")) for n in convs) == sorted(map(str, want_acts))
        for n in convs:
            if g2.node(n)["attrs"].get("activation") == "leaky_relu":
                assert 0.05 <= g2.node(n)["attrs"]["negative_slope"] <= 0.5

    check_pass("fuse_epilogues", g, fired)


def test_fold_constants_fires_and_keeps_outputs():
    rng = rng_for("fold")
    g = cc.Graph("fold")
    n_cases = 8
    folded = []
    for i in range(n_cases):
        rank = RANKS[i]
        y, _ = add_conv(g, rng, i, rank, bias="none")
        c = y.shape[1]
        a = g.const(rng.standard_normal((c,) + (1,) * rank), "float64")
        b = g.const(rng.standard_normal((c,) + (1,) * rank), "float64")
        k = cc.mul(cc.add(a, b, name=f"cadd{i}"), g.const(rng.standard_normal(1), "float64"), name=f"cmul{i}")
        if i % 2:
            k = cc.sub(k, g.const(rng.standard_normal((c,) + (1,) * rank), "float64"), name=f"csub{i}")
        folded += [f"cadd{i}", k.name]
        g.output(cc.add(y, k, name=f"out{i}"), f"y{i}")

    def fired(g2):
        assert not any(n in g2.nx for n in folded), "all-constant nodes are folded"
        assert ops(g2)["mul"] == 0 and ops(g2)["sub"] == 0
        assert ops(g2)["add"] == n_cases, "the adds of a conv output stay"
        for n in nodes_of(g2, "add"):
            src = g2.inputs_of(n)[1]
            assert g2.node(src)["op"] == "param" and g2.node(src).get("const")

    check_pass("fold_constants", g, fired)


def test_eliminate_dead_code_fires_and_keeps_outputs():
    rng = rng_for("dce")
    g = cc.Graph("dce")
    dead = []
    for i, rank in enumerate(RANKS[:8]):
        y, _ = add_conv(g, rng, i, rank)
        d1 = cc.relu(y, name=f"dead_relu{i}")
        d2 = cc.conv(d1, g.param(f"dead_w{i}", rng.standard_normal((2, y.shape[1]) + (1,) * rank)),
                     name=f"dead_conv{i}")
        dead += [d1.name, d2.name, f"dead_w{i}"]
        g.output(cc.tanh(y, name=f"live{i}"), f"y{i}")
    g.input("unused", (1, 2, 3), "float64")             # graph inputs stay, used or not

    def fired(g2):
        assert not any(n in g2.nx for n in dead)
        assert set(g2.nx.nodes) == set(g.nx.nodes) - set(dead)
        assert g2.input_names == g.input_names

    check_pass("eliminate_dead_code", g, fired)


def test_eliminate_common_subexpressions_fires_and_keeps_outputs():
    rng = rng_for("cse")
    g = cc.Graph("cse")
    const_shapes = set()
    for i, rank in enumerate(RANKS[:8]):
        y, desc = add_conv(g, rng, i, rank)
        x, w, *b = (g.value(n) for n in g.inputs_of(y.name))
        a = g.node(y.name)["attrs"]
        y2 = cc.conv(x, w, *b, stride=a["stride"], padding=a["padding"], dilation=a["dilation"],
                     groups=a["groups"], flip=a["flip"], name=f"twin{i}")
        c1 = g.const(np.full((y.shape[1],) + (1,) * rank, 0.5), "float64")
        c2 = g.const(np.full((y.shape[1],) + (1,) * rank, 0.5), "float64")
        const_shapes.add(c1.shape)
        g.output(cc.sub(cc.add(y, c1, name=f"p{i}"), cc.mul(y2, c2, name=f"q{i}"), name=f"d{i}"), f"y{i}")

    def fired(g2):
        assert ops(g2)["conv"] == 8, "each twin conv is merged into its original"
        assert not any(f"twin{i}" in g2.nx for i in range(8))
        assert len(const_shapes) < 8
        assert sum(1 for n in g2.param_names if g2.node(n).get("const")) == len(const_shapes), "equal constants merge"

    check_pass("eliminate_common_subexpressions", g, fired)


# -- passes must keep a conv's fused activation ------------------------------
@pytest.mark.parametrize("name", [
    p for p in ["strided_to_downsampled", "fuse_downsample", "grouped_to_split", "dilated_to_dense",
                "conv_to_im2col"]
] + ["factor_spatial_separable", "conv_to_fft", "fold_batch_norm", "fuse_separable"])
def test_fused_activation_survives(name):
    """cc.compile(g, passes=["fuse_epilogues", name]) must keep the
    relu that fuse_epilogues moved into the conv."""
    g = cc.Graph("fused_act")
    x = g.input("x", (1, 2, 8, 8), "float64")
    w = g.param("w", np.outer([1.0, 2, 1], [1.0, 0, -1])[None, None].repeat(2, 0))
    y = cc.conv(x, w, stride=2 if name == "strided_to_downsampled" else 1,
                dilation=2 if name == "dilated_to_dense" else 1, groups=2)
    y = cc.relu(y)
    if name == "fuse_downsample":
        y = cc.downsample(y, 2)
    if name == "fold_batch_norm":
        y = cc.batch_norm(y, np.zeros(2), np.ones(2), np.full(2, 2.0), np.ones(2))
    if name == "fuse_separable":
        y = cc.conv(y, g.param("wp", np.ones((3, 2, 1, 1))))
    g.output(y, "y")
    g1 = cc.passes.run(g, ["fuse_epilogues"])
    assert nodes_of(g1, "conv")[0] and any(g1.node(n)["attrs"].get("activation") == "relu"
                                           for n in nodes_of(g1, "conv"))
    feeds = feeds_for(g)
    compare(evaluate(PASSES[name](g1), feeds), evaluate(g, feeds), f"{name} after fuse_epilogues",
            TOL64, TOL64)


# ---------------------------------------------------------------------------
# (2) where a pass does not apply it returns an equal graph
# ---------------------------------------------------------------------------
def noop_strided_to_downsampled():
    rng = rng_for("noop_strided")
    g = cc.Graph("noop")
    for i, rank in enumerate((1, 2, 3)):
        y, _ = add_conv(g, rng, i, rank, stride=(1,) * rank)
        g.output(y, f"y{i}")
    x = g.input("xt", (1, 2, 4, 4), "float64")
    g.output(cc.max_pool(cc.conv_transpose(x, g.param("wt", rng.standard_normal((2, 2, 3, 3))), stride=2), 2,
                         stride=2), "yt")
    return g


def noop_fuse_downsample():
    rng = rng_for("noop_fuse_down")
    g = cc.Graph("noop")
    x = g.input("x", (1, 2, 9, 9), "float64")
    y = cc.conv(x, g.param("w", rng.standard_normal((3, 2, 3, 3))))
    g.output(cc.downsample(y, 2), "down")            # the conv output has a second user
    g.output(cc.relu(y), "relu")
    g.output(cc.downsample(cc.max_pool(x, 2), 2), "pool")        # not a conv
    y = cc.conv(x, g.param("w2", rng.standard_normal((3, 2, 3, 3))), g.param("b2", rng.standard_normal((3, 7, 7))))
    g.output(cc.downsample(y, 2), "untied")          # an untied bias cannot take a stride
    return g


def noop_transposed():
    rng = rng_for("noop_transposed")
    g = cc.Graph("noop")
    x = g.input("x", (1, 2, 6, 6), "float64")
    y = cc.conv(x, g.param("w", rng.standard_normal((2, 1, 3, 3))), stride=2, dilation=1, groups=2)
    gi = cc.conv_grad_input(g.param("k", rng.standard_normal((2, 2, 3, 3))), y, (6, 6), stride=2)
    g.output(gi, "y")
    return g


def noop_im2col():
    rng = rng_for("noop_im2col")
    g = cc.Graph("noop")
    x = g.input("x", (2, 2, 6, 6), "float64")
    h = cc.conv_transpose(x, g.param("wt", rng.standard_normal((2, 3, 3, 3))), stride=2)
    h = cc.max_pool(h, 2)
    g.output(cc.dense(cc.flatten(h), g.param("wd", rng.standard_normal((4, 3 * 6 * 6)))), "y")
    return g


def noop_local():
    rng = rng_for("noop_local")
    g = cc.Graph("noop")
    x = g.input("x", (1, 2, 6, 6), "float64")
    h = cc.tiled_conv(x, g.param("wt", rng.standard_normal((2, 2, 3, 3, 2, 2))))
    g.output(cc.conv(h, g.param("w", rng.standard_normal((2, 2, 3, 3)))), "y")
    return g


def noop_grouped():
    rng = rng_for("noop_grouped")
    g = cc.Graph("noop")
    for i, rank in enumerate((1, 2, 3)):
        y, _ = add_conv(g, rng, i, rank, groups=1)
        g.output(y, f"y{i}")
    x = g.input("xt", (1, 4, 4, 4), "float64")
    g.output(cc.conv_transpose(x, g.param("wt", rng.standard_normal((4, 1, 3, 3))), groups=4), "yt")
    return g


def noop_dilated():
    rng = rng_for("noop_dilated")
    g = cc.Graph("noop")
    for i, rank in enumerate((1, 2, 3)):
        y, _ = add_conv(g, rng, i, rank, dilation=(1,) * rank)
        g.output(y, f"y{i}")
    x = g.input("xt", (1, 2, 4, 4), "float64")
    g.output(cc.conv_transpose(x, g.param("wt", rng.standard_normal((2, 2, 3, 3))), dilation=2), "yt")
    return g


def noop_tiled():
    rng = rng_for("noop_tiled")
    g = cc.Graph("noop")
    x = g.input("x", (1, 1, 12, 12), "float64")
    # a 9x8 tile over a 10x10 output is 72 > MAX_PIECES convs: left alone
    g.output(cc.tiled_conv(x, g.param("w", rng.standard_normal((1, 1, 3, 3, 9, 8)))), "y")
    g.output(cc.local_conv(x, g.param("wl", rng.standard_normal((1, 11, 11, 1, 2, 2)))), "yl")
    return g


def noop_fuse_separable():
    rng = rng_for("noop_sep")
    g = cc.Graph("noop")
    x = g.input("x", (1, 3, 7, 7), "float64")
    dw = cc.conv(x, g.param("wd", rng.standard_normal((3, 1, 3, 3))), groups=3, name="dw")
    g.output(cc.conv(dw, g.param("wp", rng.standard_normal((4, 3, 1, 1))), name="pw"), "y")
    g.output(dw, "depthwise")                        # the depthwise output has a second user
    a = cc.relu(cc.conv(x, g.param("wd2", rng.standard_normal((3, 1, 3, 3))), groups=3, name="dw2"))
    g.output(cc.conv(a, g.param("wp2", rng.standard_normal((4, 3, 1, 1))), name="pw2"), "y2")
    g.output(cc.sigmoid(a), "act_second_user")       # the activation has a second user
    dw3 = cc.conv(x, g.param("wd3", rng.standard_normal((3, 1, 3, 3))), groups=3, name="dw3")
    g.output(cc.conv(dw3, g.param("wp3", rng.standard_normal((4, 3, 1, 1))), stride=2, name="pw_strided"), "y3")
    dw4 = cc.conv(x, g.param("wd4", rng.standard_normal((3, 3, 3, 3))), name="dense")
    g.output(cc.conv(dw4, g.param("wp4", rng.standard_normal((4, 3, 1, 1))), name="pw4"), "y4")
    x1 = g.input("x1", (1, 3, 9), "float64")     # 1D: the fused kernel is 2D
    dw5 = cc.conv(x1, g.param("wd5", rng.standard_normal((3, 1, 3))), groups=3, name="dw1d")
    g.output(cc.conv(dw5, g.param("wp5", rng.standard_normal((2, 3, 1))), name="pw1d"), "y5")
    return g


def noop_factor():
    rng = rng_for("noop_factor")
    g = cc.Graph("noop")
    x = g.input("x", (1, 1, 8, 8), "float64")
    k = rng.standard_normal((3, 3))
    assert np.linalg.matrix_rank(k) == 3
    g.output(cc.conv(x, g.param("w", k[None, None]), name="rank3"), "y")
    x2 = g.input("x2", (1, 2, 8, 8), "float64")
    sob = np.outer([1.0, 2, 1], [1.0, 0, -1])
    g.output(cc.conv(x2, g.param("w2", np.stack([sob, sob])[None]), name="mixes_channels"), "y2")  # groups 1, C 2
    wk = g.input("wk", (1, 1, 3, 3), "float64")                  # a kernel that is not a constant
    g.output(cc.conv(x, wk, name="runtime_kernel"), "y3")
    x1 = g.input("x1", (1, 1, 9), "float64")
    g.output(cc.conv(x1, g.param("w1", np.array([[[1.0, 2, 1]]])), name="conv1d"), "y4")
    g.output(cc.conv(x, g.param("zero", np.zeros((1, 1, 3, 3))), name="zero_kernel"), "y5")
    g.output(cc.conv(x, g.param("row", np.array([[[[1.0, 2, 1]]]])), name="one_row"), "y6")     # already 1xk
    return g


def noop_fft():
    rng = rng_for("noop_fft")
    g = cc.Graph("noop")
    x = g.input("x", (1, 2, 8, 8), "float64")
    g.output(cc.conv(x, g.param("w", rng.standard_normal((2, 2, 3, 3))), stride=2), "strided")
    x3 = g.input("x3", (1, 1, 4, 4, 4), "float64")
    g.output(cc.conv(x3, g.param("w3", rng.standard_normal((1, 1, 2, 2, 2)))), "conv3d")
    g.output(conv_with_activation(g, x, g.param("wa", rng.standard_normal((2, 2, 3, 3))), activation="relu"),
             "fused_act")
    big = g.input("big", (1, 64, 512, 512), "float32")     # its spectra would exceed MAX_SPECTRA_BYTES
    g.output(cc.conv(big, g.param("wbig", np.ones((1, 64, 3, 3)), "float32")), "big_conv")
    return g


def noop_fold_bn():
    rng = rng_for("noop_bn")
    g = cc.Graph("noop")
    x = g.input("x", (1, 2, 6, 6), "float64")
    c = cc.conv(x, g.param("w", rng.standard_normal((3, 2, 3, 3))), name="conv")
    g.output(cc.batch_norm(c, np.zeros(3), np.ones(3), np.ones(3), np.zeros(3), name="bn"), "y")
    g.output(cc.relu(c), "second_user")              # the conv output feeds two nodes
    p = cc.max_pool(x, 2)
    g.output(cc.batch_norm(p, np.zeros(2), np.ones(2), name="bn_pool"), "pool")          # not after a conv
    mean = g.input("mean", (3,), "float64")                                               # statistics not constant
    c2 = cc.conv(x, g.param("w2", rng.standard_normal((3, 2, 3, 3))), name="conv2")
    g.output(cc.batch_norm(c2, mean, np.ones(3), name="bn_input"), "y2")
    c3 = conv_with_activation(g, x, g.param("w3", rng.standard_normal((3, 2, 3, 3))), activation="tanh")
    g.output(cc.batch_norm(c3, np.zeros(3), np.ones(3), name="bn_after_act"), "y3")
    return g


def noop_bias_act():
    rng = rng_for("noop_bias_act")
    g = cc.Graph("noop")
    x = g.input("x", (1, 2, 6, 6), "float64")
    c = cc.conv(x, g.param("w", rng.standard_normal((3, 2, 3, 3))), name="conv")
    g.output(cc.relu(c), "y")
    g.output(cc.tanh(c), "second_user")                                  # two users
    c2 = cc.conv(x, g.param("w2", rng.standard_normal((3, 2, 3, 3))), name="conv2")
    g.output(cc.add(c2, g.param("full", rng.standard_normal((3, 4, 4)))), "not_per_channel")
    c3 = cc.conv(x, g.param("w3", rng.standard_normal((3, 2, 3, 3))), g.param("b3", rng.standard_normal(3)))
    g.output(cc.add(c3, g.param("cb3", rng.standard_normal((3, 1, 1)))), "has_bias")
    g.output(cc.relu(cc.max_pool(x, 2)), "not_conv")
    c4 = cc.conv(x, g.param("w4", rng.standard_normal((3, 2, 3, 3))), name="conv4")
    g.output(cc.add(c4, c4), "residual_of_itself")
    c5 = conv_with_activation(g, x, g.param("w5", rng.standard_normal((3, 2, 3, 3))), activation="tanh")
    g.output(cc.relu(cc.add(c5, g.param("cb5", rng.standard_normal((3, 1, 1))))), "already_activated")
    return g


def noop_fold_constants():
    rng = rng_for("noop_fold")
    g = cc.Graph("noop")
    x = g.input("x", (1, 2, 6, 6), "float64")
    a = g.param("a", rng.standard_normal((2, 1, 1)))
    b = g.param("b", rng.standard_normal((2, 1, 1)))                    # trainable: not folded
    g.output(cc.add(x, cc.mul(a, b)), "y")
    return g


def noop_fold_params():
    rng = rng_for("noop_fold_params")
    g = cc.Graph("noop")
    x = g.input("x", (1, 2, 6, 6), "float64")
    w = g.param("w", rng.standard_normal((3, 2, 3, 3)))
    g.output(cc.conv(x, cc.reshape(w, (3, 2, 3, 3))), "y")            # a reshape of a param is an alias
    g.output(w, "w_itself")
    return g


def noop_float_conv():
    g = cc.Graph("noop")
    x = g.input("x", (1, 2, 6, 6))
    g.output(cc.relu(cc.conv(x, rng_for("noop_float_conv").standard_normal((3, 2, 3, 3)).astype(np.float32))), "y")
    return g


def noop_quantize_dequantize():
    """quantize then dequantize loses precision: it is not a no-op to cancel
    (dequantize then quantize with the same params is)."""
    g = cc.Graph("noop")
    x = g.input("x", (1, 2, 6, 6))
    g.output(cc.dequantize(cc.quantize(x, 0.1, 3), 0.1, 3), "y")
    return g


def noop_int8_only():
    g = cc.Graph("noop")
    x = g.input("x", (1, 2, 6, 6), "int8")
    w = g.param("w", rng_for("noop_int8_only").integers(-127, 128, (3, 2, 3, 3)), "int8")
    g.output(cc.qconv(x, w, x_scale=0.1, w_scale=0.01, y_scale=0.2), "y")
    return g


def noop_dce():
    rng = rng_for("noop_dce")
    g = cc.Graph("noop")
    for i, rank in enumerate((1, 2, 3)):
        y, _ = add_conv(g, rng, i, rank)
        g.output(cc.relu(y), f"y{i}")
    return g


def noop_cse():
    rng = rng_for("noop_cse")
    g = cc.Graph("noop")
    x = g.input("x", (1, 2, 6, 6), "float64")
    v = rng.standard_normal((3, 2, 3, 3))
    y1 = cc.conv(x, g.param("w1", v))
    y2 = cc.conv(x, g.param("w2", v))                # equal today, but trainable: distinct
    y3 = cc.conv(x, g.param("w3", rng.standard_normal((3, 2, 3, 3))), padding=1)
    y4 = cc.conv(x, g.value("w3"), padding=2)        # same inputs, other attributes
    g.output(cc.add(cc.add(y1, y2), cc.add(cc.global_avg_pool(y3), cc.global_avg_pool(y4))), "y")
    return g


def noop_gemm():
    """Left direct: a depthwise conv, a conv below MIN_MACS, and h of a flipped conv."""
    rng = rng_for("noop_gemm")
    g = cc.Graph("noop")
    x = g.input("x", (2, 16, 40, 40), "float64")
    g.output(cc.conv(x, g.param("dw", rng.standard_normal((16, 1, 3, 3))), groups=16, padding=1), "depthwise")
    s = g.input("s", (1, 2, 6, 6), "float64")
    g.output(cc.conv(s, g.param("w", rng.standard_normal((3, 2, 3, 3)))), "small")
    gy = g.input("gy", (2, 8, 38, 38), "float64")
    g.output(cc.conv_grad_input(g.param("wf", rng.standard_normal((8, 16, 3, 3))), gy, (40, 40), flip=True), "h_flip")
    return g


def noop_winograd():
    rng = rng_for("noop_winograd")
    g = cc.Graph("noop")
    x = g.input("x", (1, 8, 9, 9), "float64")
    g.output(cc.conv(x, g.param("w", rng.standard_normal((8, 8, 3, 3))), stride=2), "strided")
    g.output(cc.conv(x, g.param("wd", rng.standard_normal((8, 8, 3, 3))), dilation=2), "dilated")
    g.output(cc.conv(x, g.param("w5", rng.standard_normal((8, 8, 5, 5)))), "k5")
    g.output(cc.conv(x, g.param("wg", rng.standard_normal((8, 4, 3, 3))), groups=2), "grouped")
    g.output(cc.conv(x, g.param("wf", rng.standard_normal((4, 8, 3, 3)))), "few_out")
    return g


def noop_blocked():
    """Convs the NCHWc layout does not take (passes/blocked.py blocked_eligible):
    1D and 3D, grouped but not depthwise, an untied bias, and so few output
    channels that most lanes of a block would be padding."""
    rng = rng_for("noop_blocked")
    g = cc.Graph("noop")
    x = g.input("x", (1, 8, 9, 9), "float64")
    g.output(cc.conv(x, g.param("wg", rng.standard_normal((8, 4, 3, 3))), groups=2), "grouped")
    g.output(cc.conv(x, g.param("wu", rng.standard_normal((32, 8, 3, 3))), g.param("bu", rng.standard_normal((32, 7, 7)))),
             "untied")
    g.output(cc.conv(x, g.param("wf", rng.standard_normal((3, 8, 3, 3)))), "few_out")
    x1 = g.input("x1", (1, 8, 20), "float64")
    g.output(cc.conv(x1, g.param("w1", rng.standard_normal((32, 8, 3)))), "conv1d")
    x3 = g.input("x3", (1, 8, 5, 5, 5), "float64")
    g.output(cc.conv(x3, g.param("w3", rng.standard_normal((32, 8, 3, 3, 3)))), "conv3d")
    return g


NOOP_GRAPHS = {
    "to_blocked_layout": noop_blocked,
    "choose_blocked_layout": noop_blocked,
    "conv_to_gemm": noop_gemm,
    "conv_to_winograd": noop_winograd,
    "strided_to_downsampled": noop_strided_to_downsampled,
    "fuse_downsample": noop_fuse_downsample,
    "transposed_to_conv": noop_transposed,
    "transposed_to_matmul": noop_transposed,
    "conv_to_im2col": noop_im2col,
    "local_to_matmul": noop_local,
    "grouped_to_split": noop_grouped,
    "dilated_to_dense": noop_dilated,
    "tiled_to_convs": noop_tiled,
    "fuse_separable": noop_fuse_separable,
    "factor_spatial_separable": noop_factor,
    "conv_to_fft": noop_fft,
    "fold_batch_norm": noop_fold_bn,
    "fuse_epilogues": noop_bias_act,
    "fold_constants": noop_fold_constants,
    "fold_params": noop_fold_params,
    "eliminate_dead_code": noop_dce,
    "eliminate_common_subexpressions": noop_cse,
    "fold_qdq": noop_float_conv,                 # no dequantize -> op -> quantize
    "split_int8_epilogues": noop_float_conv,     # relu folds into a qconv's clamp: nothing to split
    "qconv_to_gemm": noop_float_conv,            # no qconv
    "cancel_requantize": noop_quantize_dequantize,
    "quantize_int8": noop_int8_only,             # nothing float left to quantize
    "inplace_elementwise": noop_float_conv,      # the relu is the graph output: its own buffer
    "inplace_depthwise": noop_float_conv,        # no depthwise conv
    "inplace_pointwise": noop_float_conv,        # no 1x1 conv
    "patch_first_stages": noop_float_conv,       # tiles of a 4x4 output need more arena than it
}


def test_every_pass_is_tested():
    assert set(PASSES) == set(ALL_PASSES) == set(NOOP_GRAPHS)


@pytest.mark.parametrize("name", ALL_PASSES)
def test_pass_does_not_apply_returns_equal_graph(name):
    check_noop(name, NOOP_GRAPHS[name]())


# ---------------------------------------------------------------------------
# a graph with every conv kind: purity of every pass, the study pipeline
# ---------------------------------------------------------------------------
def every_kind_graph(dtype="float64"):
    rng = rng_for("every_kind")
    g = cc.Graph("every_kind")
    x = g.input("x", (2, 3, 10, 9), dtype)

    def p(name, shape):
        return g.param(name, rng.standard_normal(shape) * 0.5, dtype)

    h = cc.relu(cc.conv(x, p("stem_w", (4, 3, 3, 3)), p("stem_b", (4,)), stride=2, padding="same", name="stem"))
    h = cc.batch_norm(cc.conv(h, p("dil_w", (4, 2, 2, 2)), None, dilation=2, padding="full", groups=2, flip=True,
                              name="dilated"), rng.standard_normal(4), rng.uniform(0.5, 2, 4), name="bn")
    d = cc.relu(cc.conv(h, p("dw_w", (4, 1, 3, 3)), p("dw_b", (4,)), padding=1, groups=4, name="dw"))
    h = cc.conv(d, p("pw_w", (6, 4, 1, 1)), p("pw_b", (6,)), name="pw")
    h = cc.conv_transpose(h, p("t_w", (6, 2, 3, 3)), p("t_b", (4,)), stride=2, padding=1, output_padding=1,
                          groups=2, name="up")
    sob = np.outer([1.0, 2, 1], [1.0, 0, -1])
    h = cc.conv(h, g.param("sobel_w", np.stack([sob] * 4)[:, None], dtype), groups=4, padding=1, name="sobel")
    h = cc.tiled_conv(h, p("tile_w", (3, 4, 2, 2, 2, 3)), p("tile_b", (3,)), stride=2, name="tiled")
    out = h.shape[2:]
    h = cc.local_conv(h, p("loc_w", (2, out[0] - 1, out[1] - 1, 3, 2, 2)), name="local")
    h = cc.add(h, g.param("shift_c", rng.standard_normal((2, 1, 1)), dtype), name="shift")
    g.output(cc.sigmoid(h, name="act"), "y")
    x1 = g.input("x1", (2, 2, 12), dtype)
    g.output(cc.conv(x1, p("w1d", (3, 2, 3)), p("b1d", (3,)), stride=2, dilation=2, padding=((1, 2),), name="c1d"),
             "y1")
    x3 = g.input("x3", (1, 2, 5, 4, 4), dtype)
    h3 = cc.conv(x3, p("w3d", (2, 1, 2, 2, 2)), None, stride=(2, 1, 1), groups=2, padding="same", name="c3d")
    g.output(cc.conv_transpose(h3, p("t3d", (2, 1, 2, 2, 2)), None, stride=2, name="up3d"), "y3")
    g.output(cc.tiled_conv(x1, p("tile1d", (1, 2, 3, 2)), None, padding=1, name="tiled1d"), "yt")
    return g


@pytest.mark.parametrize("name", ALL_PASSES)
def test_pass_does_not_change_its_argument(name):
    g = every_kind_graph()
    if name == "quantize_int8":                  # it needs calibrated ranges, and float32
        g32 = every_kind_graph("float32")
        g = cc.calibrate(g32, {n: np.random.default_rng(0).standard_normal(g32.node(n)["type"].shape
                                                                           ).astype(np.float32)
                               for n in g32.input_names}, engine="reference")
    before = snapshot(g)
    counter = dict(g._counter)
    g2 = PASSES[name](g)
    assert_same_snapshot(before, snapshot(g), name)
    assert g._counter == counter and g2 is not g
    assert g2.nx is not g.nx
    for n in g2.param_names:                 # a value shared with the argument is immutable (ir.frozen)
        if n in g.nx and np.shares_memory(g2.node(n)["value"], g.node(n)["value"]):
            assert not g2.node(n)["value"].flags.writeable and not g.node(n)["value"].flags.writeable
            with pytest.raises(ValueError):
                g2.node(n)["value"][...] = 0


def test_study_pipeline_on_every_conv_kind():
    g = every_kind_graph()
    assert {"conv", "conv_transpose", "tiled_conv", "local_conv", "batch_norm"} <= set(ops(g))
    before = snapshot(g)
    g2 = cc.passes.run(g, "study", debug=True)
    assert_same_snapshot(before, snapshot(g), "study")
    lowered = ops(g2)
    for gone in ("conv", "conv_transpose", "tiled_conv", "local_conv"):
        assert lowered[gone] == 0, f"study leaves {lowered[gone]} {gone} nodes"
    assert lowered["im2col"] > 0 and lowered["matmul"] > 0 and lowered["downsample"] > 0
    feeds = feeds_for(g)
    want = evaluate(g, feeds)
    compare(evaluate(g2, feeds), want, "study (reference)", TOL64, TOL64)
    mod = cc.compile(g, "c", passes="study")
    assert str(mod.graph) == str(g2)
    compare(mod.run(feeds), want, "study (C)", TOL64, TOL64)


def test_default_pipeline_on_every_conv_kind():
    g = every_kind_graph()
    feeds = feeds_for(g)
    mod = cc.compile(g, "c")
    assert ops(mod.graph)["batch_norm"] == 0 and ops(mod.graph)["fused_separable"] == 1
    compare(mod.run(feeds), evaluate(g, feeds), "default (C)", TOL64, TOL64)


# ---------------------------------------------------------------------------
# the pass manager: debug check, reports, pipelines
# ---------------------------------------------------------------------------
def small_graph():
    rng = rng_for("small")
    g = cc.Graph("small")
    x = g.input("x", (1, 2, 8, 8), "float64")
    y = cc.relu(cc.conv(x, g.param("w", rng.standard_normal((3, 2, 3, 3))), g.param("b", rng.standard_normal(3)),
                        stride=2, padding=1, name="conv"))
    g.output(y, "y")
    g.output(cc.conv(x, g.param("w_other", rng.standard_normal((1, 2, 1, 1))), name="other"), "z")
    return g


def test_debug_mode_catches_a_broken_pass():
    def perturb_weights(g):
        """A broken pass: changes a param value (a new array: values are read-only)."""
        out = g.copy()
        out.node("w")["value"] = out.node("w")["value"] + 1e-3
        return out

    assert "perturb_weights" not in PASSES
    cc.passes.register(perturb_weights)
    try:
        g = small_graph()
        with pytest.raises(cc.passes.PassError) as err:
            cc.passes.run(g, ["strided_to_downsampled", "perturb_weights", "conv_to_im2col"], debug=True)
        msg = str(err.value)
        assert "perturb_weights" in msg and "'y'" in msg and "small" in msg
        assert "'z'" not in msg
        assert isinstance(err.value, cc.ConvcError)
        # without debug the manager runs it (nothing checks), with CONVC_DEBUG_PASSES=1 it checks
        cc.passes.run(g, ["perturb_weights"], debug=False)
        with pytest.raises(cc.passes.PassError, match="perturb_weights"):
            cc.compile(g, "c", passes=["perturb_weights"], debug=True)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CONVC_DEBUG_PASSES", "1")
            with pytest.raises(cc.passes.PassError, match="perturb_weights"):
                cc.passes.run(g, ["perturb_weights"])
            with pytest.raises(cc.passes.PassError, match="perturb_weights"):
                cc.compile(g, "c", passes=["perturb_weights"])
    finally:
        PASSES.pop("perturb_weights", None)
    assert "perturb_weights" not in PASSES
    # the correct passes pass the same check
    g = small_graph()
    for name in ALL_PASSES:
        if name != "quantize_int8":              # approximates by design (and needs calibration)
            cc.passes.run(g, [name], debug=True)
    for pipeline in PIPELINES:
        cc.passes.run(g, pipeline, debug=True)


def test_debug_mode_catches_a_removed_output():
    def drop_output(g):
        out = g.copy()
        out.outputs.pop("z")
        return out

    cc.passes.register(drop_output)
    try:
        with pytest.raises(cc.passes.PassError, match=r"drop_output.*'z'"):
            cc.passes.run(small_graph(), ["drop_output"], debug=True)
    finally:
        PASSES.pop("drop_output", None)


def test_check_same_tolerates_only_rounding():
    g = small_graph()
    g2 = g.copy()
    g2.node("w")["value"] = g2.node("w")["value"] * (1 + 1e-12)
    cc.passes.manager.check_same(g, g2, "rounding")
    g2.node("w")["value"] = g2.node("w")["value"] * 1.01
    with pytest.raises(cc.passes.PassError, match="rounding"):
        cc.passes.manager.check_same(g, g2, "rounding")


def test_unknown_pass_names():
    g = small_graph()
    with pytest.raises(cc.ConvcError, match="no_such_pass"):
        cc.passes.run(g, ["strided_to_downsampled", "no_such_pass"])
    with pytest.raises(cc.ConvcError, match="no_such_pipeline"):
        cc.passes.run(g, "no_such_pipeline")
    with pytest.raises(cc.ConvcError, match="no_such_pass"):
        cc.compile(g, "c", passes=["no_such_pass"])
    assert cc.passes.resolve("conv_to_im2col") == ["conv_to_im2col"]
    assert cc.passes.resolve(None) == [] and cc.passes.resolve("none") == []
    with pytest.raises(RuntimeError, match="twice"):
        cc.passes.register(PASSES["conv_to_im2col"])


def test_pipelines_name_known_passes():
    assert {"default", "train", "study", "none"} <= set(PIPELINES)
    for name, names in PIPELINES.items():
        assert all(n in PASSES for n in names), name
    assert "fold_batch_norm" not in PIPELINES["train"], "train keeps every param settable"


def test_report_strided_macs_by_hand():
    n, c_in, c_out, size, k, s = 2, 3, 5, 8, 3, 2
    rng = rng_for("report")
    g = cc.Graph("report")
    x = g.input("x", (n, c_in, size, size), "float64")
    g.output(cc.conv(x, g.param("w", rng.standard_normal((c_out, c_in, k, k))), stride=s, padding=1, name="conv"),
             "y")
    # stride 2, pad 1: 4x4 outputs; unit stride: 8x8 outputs, each c_in*k*k multiplications
    strided_macs = n * c_out * 4 * 4 * c_in * k * k
    assert strided_macs == 4320
    g2, reps = cc.passes.report(g, ["strided_to_downsampled", "fuse_downsample"])
    assert [r.name for r in reps] == ["strided_to_downsampled", "fuse_downsample"]
    assert all(isinstance(r, cc.passes.PassReport) for r in reps)
    r1, r2 = reps
    assert r1.before["macs"] == strided_macs
    assert r1.after["macs"] == s * s * strided_macs == 17280
    assert r1.added == ["conv.unit_stride", "conv.downsample"] and r1.removed == ["conv"]
    assert r1.changed
    assert r2.before["macs"] == 17280 and r2.after["macs"] == strided_macs
    assert r2.removed == ["conv.unit_stride", "conv.downsample"] and r2.added == ["conv"]
    assert r1.before["params"] == r1.after["params"] == c_out * c_in * k * k
    assert r1.before["nodes"] == 1 and r1.after["nodes"] == 2
    table = r1.table()
    assert "strided_to_downsampled" in table and "4,320" in table and "17,280" in table
    assert str(g2) == str(g)
    # a pass that does not apply: an unchanged report
    _, (r,) = cc.passes.report(g, ["conv_to_fft"])
    assert not r.changed and r.added == r.removed == r.rewritten == [] and r.before == r.after


def test_report_rewritten_and_other_passes():
    g = small_graph()
    g2, reps = cc.passes.report(g, ["fuse_epilogues", "conv_to_im2col"])
    fb, im = reps
    assert fb.removed == ["conv", "relu_1"] and fb.added == ["conv.relu"] and fb.rewritten == []
    assert fb.before["nodes"] == 3 and fb.after["nodes"] == 2 and fb.before["macs"] == fb.after["macs"]
    assert im.before["macs"] == cc.cost(cc.passes.run(g, ["fuse_epilogues"])).macs
    assert im.after["macs"] == cc.cost(g2).macs
    assert "conv.relu.im2col" in im.added and "other.im2col" in im.added
    assert set(im.removed) == {"conv.relu", "other"}
    # the consumer of a replaced node keeps its name: reported as rewritten
    _, (r,) = cc.passes.report(g, ["strided_to_downsampled"])
    assert r.rewritten == ["relu_1"] and r.removed == ["conv"]
    # dilated_to_dense: more multiplications, by hand
    rng = rng_for("report2")
    g = cc.Graph("dil")
    x = g.input("x", (1, 1, 9, 9), "float64")
    g.output(cc.conv(x, g.param("w", rng.standard_normal((1, 1, 3, 3))), dilation=2, name="c"), "y")
    _, (r,) = cc.passes.report(g, ["dilated_to_dense"])
    assert r.before["macs"] == 5 * 5 * 9 and r.after["macs"] == 5 * 5 * 25


# ---------------------------------------------------------------------------
# the default pipeline on real networks
# ---------------------------------------------------------------------------
def test_default_pipeline_lenet():
    from convc.models import lenet5

    g = lenet5(batch=2)
    before = snapshot(g)
    mod = cc.compile(g, "c")
    assert_same_snapshot(before, snapshot(g), "compile")
    lowered = ops(mod.graph)
    assert lowered["conv"] == 0 and lowered["im2col"] == 2 and lowered["matmul"] == 2, "both convs become GEMMs"
    fused = cc.passes.run(g, "embedded")
    assert ops(fused)["relu"] < ops(g)["relu"], "relus after the convs are fused"
    acts = [fused.node(n)["attrs"].get("activation") for n in nodes_of(fused, "conv")]
    assert acts == ["relu", "relu"]
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 1, 28, 28)).astype(np.float32)}
    compare(mod.run(feeds), evaluate(g, feeds), "lenet default", 1e-4, 1e-5)


def mobilenet_block():
    rng = rng_for("mobile_block")
    g = cc.Graph("mobile_block")

    def p(name, shape, scale=1.0):
        return g.param(name, rng.standard_normal(shape) * scale * np.sqrt(2 / np.prod(shape[1:])), "float32")

    x = g.input("x", (2, 3, 16, 16))
    h = cc.conv(x, p("stem_w", (8, 3, 3, 3)), p("stem_b", (8,)), stride=2, padding=1, name="stem")
    h = cc.relu(cc.batch_norm(h, rng.standard_normal(8) * 0.1, rng.uniform(0.5, 2, 8), rng.uniform(0.5, 1.5, 8),
                              rng.standard_normal(8) * 0.1, name="stem_bn"))
    h = cc.relu(cc.conv(h, p("dw_w", (8, 1, 3, 3)), p("dw_b", (8,)), padding=1, groups=8, name="dw"))
    h = cc.relu(cc.conv(h, p("pw_w", (16, 8, 1, 1)), p("pw_b", (16,)), name="pw"))
    h = cc.batch_norm(h, rng.standard_normal(16) * 0.1, rng.uniform(0.5, 2, 16), name="bn")
    h = cc.flatten(cc.global_avg_pool(h))
    g.output(cc.dense(h, p("fc_w", (10, 16)), p("fc_b", (10,))), "logits")
    return g


def test_default_pipeline_mobilenet_block():
    g = mobilenet_block()
    mod = cc.compile(g, "c")
    lowered = ops(mod.graph)
    assert lowered["fused_separable"] == 1, "depthwise + relu + pointwise + relu become one op"
    assert lowered["batch_norm"] == 1, "the stem's batch_norm is folded; the one after the relu stays"
    fs = nodes_of(mod.graph, "fused_separable")[0]
    assert mod.graph.node(fs)["attrs"]["dw_activation"] == "relu"
    assert mod.graph.node(fs)["attrs"]["pw_activation"] == "relu"
    # the stem reads the 3-channel image as it is, in the NCHWc kernel (choose_blocked_layout), its relu fused
    (stem,) = nodes_of(mod.graph, "conv_nchwc")
    assert mod.graph.node(stem)["attrs"]["activation"] == "relu" and mod.graph.node(stem)["attrs"]["stride"] == (2, 2)
    assert lowered["conv"] == 0 and lowered["from_blocked"] == 1 and lowered["to_blocked"] == 0
    assert lowered["relu"] == 0
    feeds = {"x": np.random.default_rng(4).standard_normal((2, 3, 16, 16)).astype(np.float32)}
    compare(mod.run(feeds), evaluate(g, feeds), "mobilenet block default", 1e-4, 1e-5)


def test_train_pipeline_keeps_every_param():
    g = mobilenet_block()
    mod = cc.compile(g, "c", passes="train")
    assert set(g.param_names) - {n for n in g.param_names if g.node(n).get("const")} <= set(mod.graph.param_names)
    assert ops(mod.graph)["batch_norm"] == 2 and ops(mod.graph)["fused_separable"] == 1
    feeds = {"x": np.random.default_rng(6).standard_normal((2, 3, 16, 16)).astype(np.float32)}
    compare(mod.run(feeds), evaluate(g, feeds), "mobilenet block train", 1e-4, 1e-5)


def test_numpy_target_runs_the_graph_as_given():
    g = every_kind_graph()
    mod = cc.compile(g, "numpy", passes="study")
    assert str(mod.graph) == str(g)


def test_default_pipeline_mobilenet_tiny():
    from convc.models import mobilenet_tiny

    g = mobilenet_tiny(batch=2)
    mod = cc.compile(g, "c")
    lowered = ops(mod.graph)
    # at batch 2 every pointwise conv passes MIN_MACS: GEMMs, chosen before fuse_separable; the
    # stem reads the image in the NCHWc kernel (choose_blocked_layout); the four depthwise convs stay direct
    assert lowered["fused_separable"] == 0 and lowered["matmul"] == 4 and lowered["conv_nchwc"] == 1
    assert sum(1 for n in nodes_of(g, "conv") if g.node(n)["attrs"]["groups"] > 1) == 4
    assert len(nodes_of(mod.graph, "conv")) == 4
    assert all(mod.graph.node(n)["attrs"]["groups"] > 1 for n in nodes_of(mod.graph, "conv"))
    emb = cc.passes.run(g, "embedded")           # the export's pipeline still fuses every block
    assert ops(emb)["fused_separable"] == 4 and ops(emb)["relu"] == 0
    assert cc.cost(mod.graph).macs == cc.cost(g).macs, "fusion does not change the multiplications"
    feeds = {"x": np.random.default_rng(5).standard_normal((2, 3, 32, 32)).astype(np.float32)}
    compare(mod.run(feeds), evaluate(g, feeds), "mobilenet_tiny default", 1e-4, 1e-5)


# ---------------------------------------------------------------------------
# cc.conv_matrix
# ---------------------------------------------------------------------------
def T(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def test_conv_matrix_4x16_by_hand():
    w = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    C = cc.conv_matrix((1, 4, 4), w)
    want = np.array([
        [1, 2, 3, 0, 4, 5, 6, 0, 7, 8, 9, 0, 0, 0, 0, 0],
        [0, 1, 2, 3, 0, 4, 5, 6, 0, 7, 8, 9, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 2, 3, 0, 4, 5, 6, 0, 7, 8, 9, 0],
        [0, 0, 0, 0, 0, 1, 2, 3, 0, 4, 5, 6, 0, 7, 8, 9],
    ], dtype=float)
    assert C.shape == (4, 16)
    np.testing.assert_array_equal(C, want)
    assert all(sorted(row[row != 0]) == list(range(1, 10)) for row in C)
    assert np.array_equal(cc.conv_matrix((1, 1, 4, 4), w), C), "a leading batch of 1 is allowed"
    rng = np.random.default_rng(0)
    V = rng.standard_normal((4, 4))
    np.testing.assert_allclose(C @ V.ravel(), F.conv2d(T(V)[None, None], T(w)).numpy().ravel(), atol=1e-12)
    G = rng.standard_normal((2, 2))
    np.testing.assert_allclose(C.T @ G.ravel(), F.conv_transpose2d(T(G)[None, None], T(w)).numpy().ravel(),
                               atol=1e-12)
    # flip: the true convolution's matrix holds the kernel reversed
    np.testing.assert_array_equal(cc.conv_matrix((1, 4, 4), w, flip=True)[0, [0, 1, 2, 4, 5, 6, 8, 9, 10]],
                                  np.arange(9.0, 0.0, -1))


@pytest.mark.parametrize("case", [
    dict(c_in=1, c_out=1, n=(5, 6), k=(3, 3), stride=2, padding=1, groups=1),
    dict(c_in=2, c_out=3, n=(5, 5), k=(3, 2), stride=1, padding=0, groups=1),
    dict(c_in=2, c_out=2, n=(6, 5), k=(3, 3), stride=2, padding=1, groups=2),
    dict(c_in=4, c_out=2, n=(7, 6), k=(2, 3), stride=(2, 1), padding=(1, 0), groups=2, dilation=(1, 2)),
])
def test_conv_matrix_against_torch(case):
    rng = np.random.default_rng(1)
    case = dict(case)
    c_in, c_out, n, k, groups = (case.pop(key) for key in ("c_in", "c_out", "n", "k", "groups"))
    w = rng.standard_normal((c_out, c_in // groups, *k))
    C = cc.conv_matrix((c_in, *n), w, groups=groups, **case)
    V = rng.standard_normal((c_in, *n))
    Z = F.conv2d(T(V)[None], T(w), groups=groups, **case).numpy()[0]
    assert C.shape == (Z.size, V.size)
    np.testing.assert_allclose(C @ V.ravel(), Z.ravel(), atol=1e-12)
    G = rng.standard_normal(Z.shape)
    stride = case["stride"] if isinstance(case["stride"], tuple) else (case["stride"],) * 2
    dil = case.get("dilation", 1)
    dil = dil if isinstance(dil, tuple) else (dil, dil)
    pad = case["padding"] if isinstance(case["padding"], tuple) else (case["padding"],) * 2
    opad = tuple(nn + 2 * p - (dd * (kk - 1) + 1) - (z - 1) * s
                 for nn, p, dd, kk, z, s in zip(n, pad, dil, k, Z.shape[1:], stride))
    H = F.conv_transpose2d(T(G)[None], T(w), groups=groups, output_padding=opad, **case).numpy()[0]
    assert H.shape == V.shape
    np.testing.assert_allclose(C.T @ G.ravel(), H.ravel(), atol=1e-12)
    # and the compiler's conv agrees with the matrix
    g = cc.Graph("cm")
    x = g.input("x", (1, c_in, *n), "float64")
    g.output(cc.conv(x, g.param("w", w), groups=groups, **case), "y")
    np.testing.assert_allclose(evaluate(g, {"x": V[None]})["y"].ravel(), C @ V.ravel(), atol=1e-12)


def test_conv_matrix_errors():
    w = np.ones((1, 1, 3, 3))
    with pytest.raises(cc.ValidationError, match="one image"):
        cc.conv_matrix((2, 1, 4, 4), w)
    with pytest.raises(cc.ValidationError, match="groups"):
        cc.conv_matrix((3, 4, 4), np.ones((2, 1, 3, 3)), groups=2)
    with pytest.raises(cc.ValidationError):
        cc.conv_matrix((1, 4), w)

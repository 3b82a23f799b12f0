"""Convolutions whose kernel depends on the output position:
``cc.local_conv`` (Eq 3, unshared) and ``cc.tiled_conv`` (Eq 4).

The oracles are literal loops over output positions, input channels and kernel
offsets written here (zero padding by an explicit bounds check, not np.pad),
in float64. All configurations go into one graph compiled once per target.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convc as cc
from helpers import assert_close as close, per_axis
from helpers import expected_out as out_sizes, expected_pads as pads_of

from helpers import TARGETS


def tol_for(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == "float32" else dict(rtol=1e-10, atol=1e-12)


def run_targets(g, feeds):
    return {t: cc.compile(g, target=t).run(feeds) for t in TARGETS}


# -- literal Eq 3 / Eq 4 -------------------------------------------------------------------

def literal_unshared(x, kernel_at, c_out, kernel, stride, dilation, pads, outs, bias):
    """Z[b, i, o...] = sum_{l, m...} V[b, l, o*s - lo + m*d] * kernel_at(i, o, l, m) (+ bias),
    with V zero outside its bounds. kernel_at(i, o, l, m) reads the weight of
    output channel i at output position o, input channel l, kernel offset m."""
    n, c_in, *sizes = x.shape
    y = np.zeros((n, c_out) + tuple(outs))
    for b in range(n):
        for i in range(c_out):
            for o in itertools.product(*[range(v) for v in outs]):
                acc = 0.0
                for l in range(c_in):
                    for m in itertools.product(*[range(k) for k in kernel]):
                        idx = tuple(oo * s - lo + mm * d for oo, s, (lo, _), mm, d in
                                    zip(o, stride, pads, m, dilation))
                        if all(0 <= v < size for v, size in zip(idx, sizes)):
                            acc += float(x[(b, l) + idx]) * float(kernel_at(i, o, l, m))
                if bias is not None:
                    acc += float(bias[i]) if bias.ndim == 1 else float(bias[(i,) + o])
                y[(b, i) + o] = acc
    return y


def literal_local(x, w, bias, stride, dilation, pads):
    """Eq 3: Z[i, j, k] = sum_{l,m,n} V[l, j*s + m*d, k*s + n*d] * W[i, j, k, l, m, n]."""
    r = x.ndim - 2
    outs, kernel = w.shape[1:1 + r], w.shape[2 + r:]
    return literal_unshared(x, lambda i, o, l, m: w[(i,) + o + (l,) + m], w.shape[0], kernel, stride, dilation,
                            pads, outs, bias)


def literal_tiled(x, w, bias, stride, dilation, pads, outs):
    """Eq 4: Z[i, j, k] = sum_{l,m,n} V[l, j*s + m*d, k*s + n*d] * K[i, l, m, n, j mod tH, k mod tW]."""
    r = x.ndim - 2
    kernel, tile = w.shape[2:2 + r], w.shape[2 + r:]
    return literal_unshared(x, lambda i, o, l, m: w[(i, l) + m + tuple(oo % t for oo, t in zip(o, tile))],
                            w.shape[0], kernel, stride, dilation, pads, outs, bias)


def test_literal_loops_agree_with_torch_for_shared_weights():
    """Guard on the oracle itself: with the same kernel at every position,
    the literal Eq 3 loop is an ordinary conv."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 6))
    k = rng.standard_normal((2, 3, 3, 2))
    pads = ((1, 2), (0, 1))
    outs = out_sizes((7, 6), (3, 2), (2, 1), (1, 2), pads)
    w = np.broadcast_to(k[:, None, None], (2,) + outs + (3, 3, 2))
    want = F.conv2d(F.pad(torch.from_numpy(x), (0, 1, 1, 2)), torch.from_numpy(k), stride=(2, 1),
                    dilation=(1, 2)).numpy()
    close(literal_local(x, w, None, (2, 1), (1, 2), pads), want, 1e-12, 1e-12, "literal local vs torch")


# -- configurations ----------------------------------------------------------------------

@dataclass(frozen=True)
class UCfg:
    kind: str               # local | tiled
    n: int
    c_in: int
    c_out: int
    sizes: tuple
    kernel: tuple
    stride: object
    padding: object
    dilation: object
    tile: tuple = ()        # tiled only
    bias: str = "none"
    dtype: str = "float32"

    @property
    def rank(self):
        return len(self.sizes)

    def geometry(self):
        r = self.rank
        s, d = per_axis(self.stride, r), per_axis(self.dilation, r)
        pads = pads_of(self.padding, self.sizes, self.kernel, s, d)
        return s, d, pads, out_sizes(self.sizes, self.kernel, s, d, pads)

    @property
    def id(self):
        j = lambda v: str(v).replace(" ", "")  # noqa: E731
        parts = [self.kind, f"{self.rank}d", f"n{self.n}", f"ci{self.c_in}", f"co{self.c_out}",
                 "in" + "x".join(map(str, self.sizes)), "k" + "x".join(map(str, self.kernel)),
                 f"s{j(self.stride)}", f"p{j(self.padding)}", f"d{j(self.dilation)}"]
        if self.tile:
            parts.append("t" + "x".join(map(str, self.tile)))
        if self.bias != "none":
            parts.append(self.bias)
        if self.dtype != "float32":
            parts.append("f64")
        return "-".join(parts)


U = UCfg
UCFGS = [
    # local_conv, 2D
    U("local", 2, 3, 2, (6, 5), (3, 3), 1, 0, 1),
    U("local", 1, 2, 3, (7, 8), (3, 2), (2, 3), 1, 1, bias="tied"),
    U("local", 2, 2, 2, (7, 7), (2, 3), 1, ((1, 0), (0, 2)), (2, 1), bias="untied"),
    U("local", 1, 1, 4, (9, 6), (3, 2), 2, "same", (1, 2), bias="tied"),
    U("local", 3, 2, 1, (5, 5), (2, 2), (1, 2), (2, 1), 2, bias="untied", dtype="float64"),
    U("local", 1, 3, 3, (4, 4), (4, 4), 1, "valid", 1),                      # one output position
    # local_conv, 1D and 3D
    U("local", 2, 2, 3, (11,), (3,), 2, 1, 1, bias="tied"),
    U("local", 1, 3, 2, (10,), (2,), 1, ((0, 3),), 3, bias="untied"),
    U("local", 3, 1, 2, (9,), (4,), 3, "same", 1, dtype="float64"),
    U("local", 1, 2, 2, (4, 5, 3), (2, 2, 2), (1, 2, 1), ((1, 0), (0, 1), (1, 1)), 1, bias="tied"),
    # tiled_conv
    U("tiled", 2, 2, 3, (8, 7), (3, 2), 1, 0, 1, tile=(2, 3)),
    U("tiled", 1, 3, 2, (9, 9), (3, 3), 2, 1, 1, tile=(2, 2), bias="tied"),
    U("tiled", 2, 2, 2, (8, 9), (2, 3), (1, 2), ((0, 2), (1, 0)), (2, 1), tile=(3, 2), bias="untied"),
    U("tiled", 1, 1, 3, (7, 6), (3, 3), 1, "same", 1, tile=(4, 1), dtype="float64"),
    U("tiled", 1, 2, 2, (6, 6), (2, 2), 1, 0, 1, tile=(5, 5)),               # tile = output size
    U("tiled", 2, 2, 2, (12,), (3,), 1, 1, 2, tile=(3,), bias="tied"),
    U("tiled", 1, 3, 2, (13,), (2,), 2, ((2, 0),), 1, tile=(4,), bias="untied"),
    U("tiled", 1, 2, 1, (4, 5, 4), (2, 2, 2), 1, 0, 1, tile=(2, 1, 3), bias="tied"),
]


def uarrays(cfg: UCfg, index):
    rng = np.random.default_rng([31, index])
    _, _, _, outs = cfg.geometry()
    x = rng.standard_normal((cfg.n, cfg.c_in) + cfg.sizes).astype(cfg.dtype)
    if cfg.kind == "local":
        wshape = (cfg.c_out,) + outs + (cfg.c_in,) + cfg.kernel
    else:
        wshape = (cfg.c_out, cfg.c_in) + cfg.kernel + cfg.tile
    w = rng.standard_normal(wshape).astype(cfg.dtype)
    b = None
    if cfg.bias == "tied":
        b = rng.standard_normal(cfg.c_out).astype(cfg.dtype)
    elif cfg.bias == "untied":
        b = rng.standard_normal((cfg.c_out,) + outs).astype(cfg.dtype)
    return x, w, b


@pytest.fixture(scope="module")
def unshared_grid():
    graphs, feeds, built, errors = {}, {}, {}, {}
    for index, cfg in enumerate(UCFGS):
        g = graphs.setdefault(cfg.dtype, cc.Graph(f"unshared_{cfg.dtype}"))
        x, w, b = uarrays(cfg, index)
        xv = g.input(f"x{index}", x.shape, cfg.dtype)
        feeds.setdefault(cfg.dtype, {})[xv.name] = x
        op = cc.local_conv if cfg.kind == "local" else cc.tiled_conv
        try:
            y = op(xv, g.param(f"w{index}", w), bias=g.param(f"b{index}", b) if b is not None else None,
                   stride=cfg.stride, padding=cfg.padding, dilation=cfg.dilation, name=f"u{index}")
            g.output(y, f"y{index}")
        except cc.ConvcError as e:
            errors[cfg.id] = e
            continue
        built[cfg.id] = (index, x, w, b)
    results = {t: {} for t in TARGETS}
    for dtype, g in graphs.items():
        for t, r in run_targets(g, feeds[dtype]).items():
            results[t].update(r)
    return built, errors, results


@pytest.mark.parametrize("cfg", UCFGS, ids=[c.id for c in UCFGS])
def test_unshared_matches_literal_equation(unshared_grid, cfg):
    built, errors, results = unshared_grid
    assert cfg.id not in errors, f"convc rejected valid {cfg.id}: {errors.get(cfg.id)}"
    index, x, w, b = built[cfg.id]
    s, d, pads, outs = cfg.geometry()
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    b64 = None if b is None else b.astype(np.float64)
    if cfg.kind == "local":
        want = literal_local(x64, w64, b64, s, d, pads)
    else:
        want = literal_tiled(x64, w64, b64, s, d, pads, outs)
    for t in TARGETS:
        got = results[t][f"y{index}"]
        assert got.dtype == np.dtype(cfg.dtype)
        close(got, want, what=f"{cfg.id} [{t}] vs literal Eq {3 if cfg.kind == 'local' else 4}",
              **tol_for(cfg.dtype))


# -- identities -----------------------------------------------------------------------------

def test_tiled_identities():
    """t = 1 is conv with w[..., 0, 0]; t = output size is local_conv with
    W[i, j, k, l, m, n] = K[i, l, m, n, j, k]."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 8, 7)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    k1 = rng.standard_normal((4, 3, 3, 2, 1, 1)).astype(np.float32)
    # stride (2, 1), padding (1, (0, 1)), dilation (1, 2): output (4, 6)
    geo = dict(stride=(2, 1), padding=((1, 1), (0, 1)), dilation=(1, 2))
    kt = rng.standard_normal((4, 3, 3, 2, 4, 6)).astype(np.float32)
    local_w = np.ascontiguousarray(kt.transpose(0, 4, 5, 1, 2, 3))
    g = cc.Graph("tiled_ident")
    xv = g.input("x", x.shape)
    bv = g.param("b", b)
    g.output(cc.tiled_conv(xv, g.param("k1", k1), bv, **geo), "tiled1")
    g.output(cc.conv(xv, g.param("k1c", np.ascontiguousarray(k1[..., 0, 0])), bv, **geo), "conv")
    tt = cc.tiled_conv(xv, g.param("kt", kt), bv, **geo)
    assert tt.shape == (2, 4, 4, 6)
    g.output(tt, "tiledfull")
    g.output(cc.local_conv(xv, g.param("lw", local_w), bv, **geo), "local")
    res = run_targets(g, {"x": x})
    want_conv = F.conv2d(F.pad(torch.from_numpy(x.astype(np.float64)), (0, 1, 1, 1)),
                         torch.from_numpy(k1[..., 0, 0].astype(np.float64)), torch.from_numpy(b.astype(np.float64)),
                         stride=(2, 1), dilation=(1, 2)).numpy()
    for t in TARGETS:
        close(res[t]["tiled1"], res[t]["conv"], 1e-5, 1e-6, f"tiled t=1 vs conv [{t}]")
        close(res[t]["tiled1"], want_conv, 1e-4, 1e-5, f"tiled t=1 vs torch conv [{t}]")
        close(res[t]["tiledfull"], res[t]["local"], 1e-5, 1e-6, f"tiled t=out vs local [{t}]")


def test_local_conv_with_equal_kernels_is_conv():
    """A local_conv whose kernels are all the same equals cc.conv/torch."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 2, 9)).astype(np.float32)
    k = rng.standard_normal((3, 2, 3)).astype(np.float32)
    w = np.ascontiguousarray(np.broadcast_to(k[:, None], (3, 3, 2, 3)))      # out = (9 - 2*2 - 1)//2 + 1 = 3
    g = cc.Graph("local_shared")
    xv = g.input("x", x.shape)
    g.output(cc.local_conv(xv, w, stride=2, padding=(0,), dilation=2), "y")
    res = run_targets(g, {"x": x})
    want = F.conv1d(torch.from_numpy(x.astype(np.float64)), torch.from_numpy(k.astype(np.float64)), stride=2,
                    dilation=2).numpy()
    assert want.shape == (2, 3, 3), want.shape
    for t in TARGETS:
        close(res[t]["y"], want, 1e-4, 1e-5, f"local with shared kernels vs torch [{t}]")


# -- validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("op, xshape, wshape, kw, words", [
    ("local", (1, 2, 6, 6), (3, 5, 4, 2, 3, 3), {}, ["weight", "out_spatial", "(3, 4, 4, 2"]),
    ("local", (1, 2, 6, 6), (3, 4, 4, 3, 3, 3), {}, ["weight", "C_in"]),
    ("local", (1, 2, 6, 6), (3, 4, 4, 2, 3), {}, ["weight", "rank 6"]),
    ("local", (1, 2, 6, 6), (3, 4, 4, 2, 3, 3), dict(stride=2), ["weight", "out_spatial", "(3, 2, 2, 2"]),
    ("local", (1, 2, 8), (3, 6, 2, 3), dict(bias=np.zeros(4, np.float32)), ["bias"]),
    ("local", (1, 2, 8), (3, 6, 2, 3), dict(bias=np.zeros((3, 5), np.float32)), ["bias"]),
    ("tiled", (1, 2, 6, 6), (3, 3, 3, 3, 2, 2), {}, ["weight dim 1", "input channels 2"]),
    ("tiled", (1, 2, 6, 6), (3, 2, 3, 3, 2), {}, ["weight", "rank 6", "C_out, C_in, *k, *t"]),
    ("tiled", (1, 2, 6, 6), (3, 2, 7, 3, 2, 2), {}, ["kernel"]),
    ("tiled", (1, 2, 6, 6), (3, 2, 3, 3, 2, 2), dict(bias=np.zeros((3, 5, 4), np.float32)), ["bias"]),
], ids=["local_out_spatial", "local_c_in", "local_rank", "local_stride_changes_out", "local_bias_len",
        "local_bias_untied", "tiled_c_in", "tiled_rank", "tiled_kernel_too_big", "tiled_bias"])
def test_unshared_validation(op, xshape, wshape, kw, words):
    g = cc.Graph("unshared_bad")
    x = g.input("x", xshape)
    fn = cc.local_conv if op == "local" else cc.tiled_conv
    with pytest.raises(cc.ValidationError) as e:
        fn(x, np.ones(wshape, np.float32), name="ubad", **kw)
    msg = str(e.value)
    assert "ubad" in msg and f"{op}_conv" in msg, msg
    for word in words:
        assert word in msg, f"{word!r} not in {msg!r}"


# -- sizes of zero ---------------------------------------------------------------------------------

def test_tiled_conv_rejects_zero_tile():
    g = cc.Graph("tile0")
    x = g.input("x", (1, 2, 6))
    with pytest.raises(cc.ValidationError) as e:
        cc.tiled_conv(x, np.ones((1, 2, 3, 0), np.float32), name="tile0")
    assert "tile0" in str(e.value)


@pytest.mark.parametrize("op, wshape", [("local", (1, 7, 2, 0)), ("tiled", (1, 2, 0, 1))])
def test_unshared_rejects_zero_kernel(op, wshape):
    g = cc.Graph("k0")
    x = g.input("x", (1, 2, 6))
    fn = cc.local_conv if op == "local" else cc.tiled_conv
    with pytest.raises(cc.ValidationError):
        fn(x, np.ones(wshape, np.float32), name="k0")

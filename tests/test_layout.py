"""Spatial re-layout ops: ``downsample``, ``dilate``, ``pad`` (positive,
negative = crop, fill value) and ``channel_shuffle``, against numpy slicing,
per-element loops written here and torch, in 1D/2D/3D, on both targets.
All cases are outputs of one graph per dtype, compiled once per target."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convc as cc
from helpers import per_axis

from helpers import TARGETS


# -- oracles ----------------------------------------------------------------------------------

def oracle_downsample(x, stride):
    s = per_axis(stride, x.ndim - 2)
    return x[(slice(None), slice(None)) + tuple(slice(0, None, k) for k in s)]


def oracle_dilate(x, stride):
    """y[o] = x[o / s] where s divides o, else 0; element by element."""
    s = per_axis(stride, x.ndim - 2)
    out = tuple((n - 1) * k + 1 for n, k in zip(x.shape[2:], s))
    y = np.empty(x.shape[:2] + out, x.dtype)
    for o in np.ndindex(*out):
        if all(oo % k == 0 for oo, k in zip(o, s)):
            y[(Ellipsis,) + o] = x[(Ellipsis,) + tuple(oo // k for oo, k in zip(o, s))]
        else:
            y[(Ellipsis,) + o] = 0
    return y


def pad_pairs(pads, rank):
    if isinstance(pads, int):
        return ((pads, pads),) * rank
    return tuple((p, p) if isinstance(p, int) else tuple(p) for p in pads)


def oracle_pad(x, pads, value):
    """y[o] = x[o - lo] where that is inside x, else value; element by element."""
    pairs = pad_pairs(pads, x.ndim - 2)
    out = tuple(n + lo + hi for n, (lo, hi) in zip(x.shape[2:], pairs))
    y = np.empty(x.shape[:2] + out, x.dtype)
    for o in np.ndindex(*out):
        i = tuple(oo - lo for oo, (lo, _) in zip(o, pairs))
        inside = all(0 <= ii < n for ii, n in zip(i, x.shape[2:]))
        y[(Ellipsis,) + o] = x[(Ellipsis,) + i] if inside else value
    return y


def oracle_shuffle(x, groups):
    """torch's channel_shuffle, checked against the formula
    out channel j*groups + g = in channel g*(C/groups) + j."""
    y = F.channel_shuffle(torch.from_numpy(x.copy()), groups).numpy()
    c = x.shape[1]
    per = c // groups
    for g in range(groups):
        for j in range(per):
            np.testing.assert_array_equal(y[:, j * groups + g], x[:, g * per + j])
    return y


# -- cases -------------------------------------------------------------------------------------

CASES = [  # (id, op, x shape, arg, dtype)
    ("down_1d_s3", "downsample", (2, 3, 10), 3, "float32"),
    ("down_1d_s1", "downsample", (1, 2, 5), 1, "float32"),
    ("down_1d_s_gt_n", "downsample", (1, 1, 3), 5, "float32"),
    ("down_2d_s23", "downsample", (2, 2, 7, 9), (2, 3), "float32"),
    ("down_2d_s2_even", "downsample", (1, 3, 8, 6), 2, "float64"),
    ("down_3d", "downsample", (1, 2, 5, 6, 7), (2, 1, 3), "float32"),
    ("dil_1d_s2", "dilate", (2, 3, 6), 2, "float32"),
    ("dil_1d_size1", "dilate", (1, 2, 1), 4, "float32"),
    ("dil_2d_s31", "dilate", (2, 2, 4, 5), (3, 1), "float32"),
    ("dil_2d_s2", "dilate", (1, 1, 3, 3), 2, "float64"),
    ("dil_3d", "dilate", (1, 2, 3, 2, 4), (2, 3, 1), "float32"),
    ("pad_1d_int", "pad", (2, 3, 5), (2, 0.0), "float32"),
    ("pad_1d_crop", "pad", (1, 2, 8), (((-2, -3),), 0.0), "float32"),
    ("pad_1d_mixed_value", "pad", (1, 2, 6), (((-1, 3),), -2.5), "float32"),
    ("pad_2d_tuple", "pad", (2, 2, 4, 5), ((1, 2), 0.0), "float32"),
    ("pad_2d_pairs_value", "pad", (1, 3, 4, 4), (((0, 2), (3, 1)), 1.5), "float32"),
    ("pad_2d_crop", "pad", (2, 1, 6, 7), (((-1, -2), (-3, 0)), 9.0), "float32"),
    ("pad_2d_mixed", "pad", (1, 2, 5, 5), (((2, -1), (-2, 2)), -1.0), "float64"),
    ("pad_2d_negint", "pad", (1, 1, 6, 6), (-1, 0.0), "float32"),
    ("pad_3d", "pad", (1, 2, 3, 4, 2), (((1, 0), (-1, 2), (0, 1)), 0.25), "float32"),
    ("pad_3d_int", "pad", (2, 1, 2, 2, 2), (1, 7.0), "float64"),
    ("pad_2d_value_0p1", "pad", (1, 2, 3, 3), (((1, 0), (0, 2)), 0.1), "float32"),
    ("pad_1d_int64", "pad", (2, 3, 5), (((1, -2),), 3.0), "int64"),
    ("down_2d_int64", "downsample", (1, 2, 5, 4), (2, 3), "int64"),
    ("dil_1d_int64", "dilate", (1, 3, 4), 3, "int64"),
    ("shuf_1d_g2", "channel_shuffle", (2, 6, 5), 2, "float32"),
    ("shuf_2d_int64", "channel_shuffle", (1, 6, 2, 2), 3, "int64"),
    ("shuf_2d_g3", "channel_shuffle", (2, 6, 3, 4), 3, "float32"),
    ("shuf_2d_g4_c12", "channel_shuffle", (1, 12, 2, 2), 4, "float64"),
    ("shuf_2d_g1", "channel_shuffle", (1, 4, 2, 3), 1, "float32"),
    ("shuf_3d_g2", "channel_shuffle", (1, 8, 2, 3, 2), 2, "float32"),
]


def build(op, x, arg, name):
    if op == "pad":
        pads, value = arg
        return cc.pad(x, pads, value, name=name)
    return getattr(cc, op)(x, arg, name=name)


def oracle(op, x, arg):
    if op == "downsample":
        return oracle_downsample(x, arg)
    if op == "dilate":
        return oracle_dilate(x, arg)
    if op == "pad":
        return oracle_pad(x, *arg)
    return oracle_shuffle(x, arg)


@pytest.fixture(scope="module")
def layout_results():
    graphs, feeds, arrays, errors = {}, {}, {}, {}
    for i, (cid, op, shape, arg, dtype) in enumerate(CASES):
        g = graphs.setdefault(dtype, cc.Graph(f"layout_{dtype}"))
        x = (np.random.default_rng([17, i]).standard_normal(shape) * (10 if dtype == "int64" else 1)).astype(dtype)
        xv = g.input(f"x_{cid}", shape, dtype)
        feeds.setdefault(dtype, {})[xv.name] = x
        try:
            g.output(build(op, xv, arg, cid), f"y_{cid}")
        except cc.ConvcError as e:
            errors[cid] = e
            continue
        arrays[cid] = x
    results = {t: {} for t in TARGETS}
    for dtype, g in graphs.items():
        for t in TARGETS:
            results[t].update(cc.compile(g, target=t).run(feeds[dtype]))
    return arrays, errors, results


@pytest.mark.parametrize("cid, op, shape, arg, dtype", CASES, ids=[c[0] for c in CASES])
def test_layout_op(layout_results, cid, op, shape, arg, dtype):
    arrays, errors, results = layout_results
    assert cid not in errors, f"convc rejected valid {cid}: {errors.get(cid)}"
    want = oracle(op, arrays[cid], arg)
    for t in TARGETS:
        got = results[t][f"y_{cid}"]
        assert got.dtype == np.dtype(dtype), f"{cid} [{t}]: dtype {got.dtype}"
        assert got.shape == want.shape, f"{cid} [{t}]: shape {got.shape} != {want.shape}"
        np.testing.assert_array_equal(got, want, err_msg=f"{cid} [{t}]")   # pure data movement: exact


def test_oracles_are_not_trivial():
    """Guards on the oracles: the fill value shows up, cropping removes the
    border, and the shuffle actually permutes."""
    x = np.arange(1, 7, dtype=np.float32).reshape(1, 1, 6)
    np.testing.assert_array_equal(oracle_pad(x, ((-1, 2),), -2.5)[0, 0], [2, 3, 4, 5, 6, -2.5, -2.5])
    np.testing.assert_array_equal(oracle_dilate(x[..., :3], 3)[0, 0], [1, 0, 0, 2, 0, 0, 3])
    np.testing.assert_array_equal(oracle_downsample(x, 4)[0, 0], [1, 5])
    c = np.arange(6, dtype=np.float32).reshape(1, 6, 1)
    np.testing.assert_array_equal(oracle_shuffle(c, 2)[0, :, 0], [0, 3, 1, 4, 2, 5])


@pytest.mark.parametrize("target", TARGETS)
def test_round_trips(target):
    """dilate then downsample by the same stride is the identity; pad then
    crop by the same amounts is the identity; shuffle by g then by C/g too."""
    rng = np.random.default_rng(4)
    x2 = rng.standard_normal((2, 6, 4, 5)).astype(np.float32)
    g = cc.Graph("layout_roundtrip")
    xv = g.input("x", x2.shape)
    g.output(cc.downsample(cc.dilate(xv, (3, 2)), (3, 2)), "dd")
    g.output(cc.pad(cc.pad(xv, ((1, 2), (3, 0)), 4.0), ((-1, -2), (-3, 0))), "pp")
    g.output(cc.channel_shuffle(cc.channel_shuffle(xv, 2), 3), "ss")
    res = cc.compile(g, target=target).run({"x": x2})
    for k in ("dd", "pp", "ss"):
        np.testing.assert_array_equal(res[k], x2, err_msg=f"round trip {k} [{target}]")


# -- validation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("op, shape, arg, words", [
    ("channel_shuffle", (1, 6, 4, 4), 4, ["divisor", "6", "4"]),
    ("channel_shuffle", (1, 6, 4, 4), 0, ["groups"]),
    ("channel_shuffle", (1, 6, 4), -2, ["groups"]),
    ("pad", (1, 1, 4, 5), (((-2, -2), (0, 0)), 0.0), ["crop", "nothing"]),
    ("pad", (1, 1, 4), (((-5, 0),), 0.0), ["crop", "nothing"]),
    ("pad", (1, 1, 4, 4), ((1, 1, 1), 0.0), ["pads"]),
    ("pad", (1, 1, 4, 4), (1, "x"), ["value"]),
    ("downsample", (1, 1, 8, 8), 0, ["stride", ">= 1"]),
    ("downsample", (1, 1, 8, 8), (2, -1), ["stride", ">= 1"]),
    ("downsample", (1, 1, 8, 8), (2, 2, 2), ["stride"]),
    ("dilate", (1, 1, 8), -1, ["stride", ">= 1"]),
    ("dilate", (1, 1, 8, 8, 8), (1, 0, 1), ["stride", ">= 1"]),
    ("downsample", (1, 8), 2, ["rank"]),
], ids=["shuffle_not_divisible", "shuffle_zero", "shuffle_negative", "pad_crop_to_nothing",
        "pad_crop_beyond", "pad_wrong_axes", "pad_bad_value", "down_stride0", "down_stride_neg_axis",
        "down_stride_len", "dilate_stride_neg", "dilate_stride0_axis", "down_rank2"])
def test_layout_validation(op, shape, arg, words):
    g = cc.Graph("layout_bad")
    x = g.input("x", shape)
    with pytest.raises(cc.ValidationError) as e:
        build(op, x, arg, "lbad")
    msg = str(e.value)
    assert "lbad" in msg and op in msg, msg
    for word in words:
        assert word in msg, f"{word!r} not in {msg!r}"


def test_pad_rejects_entry_with_three_numbers():
    g = cc.Graph("layout_bad3")
    x = g.input("x", (1, 2, 6))
    with pytest.raises(cc.ValidationError) as e:
        cc.pad(x, ((1, 2, 3),), name="pad3")
    assert "pad3" in str(e.value) and "pads" in str(e.value)

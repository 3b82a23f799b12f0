"""``cc.clip`` (ONNX's Clip, ReLU6): numpy reference and C target against
torch, its gradient against autograd (F.hardtanh: gy where min < x < max),
and its rules."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_close, run_both

import convc as cc


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("lo,hi", [(0.0, 6.0), (-0.5, 0.25), (None, 0.3), (-0.2, None), (None, None), (1.0, -1.0)],
                         ids=["relu6", "narrow", "max_only", "min_only", "open", "min_above_max"])
def test_clip_matches_torch(lo, hi, dtype):
    g = cc.Graph("clip")
    x = g.input("x", (2, 3, 5, 4), dtype)
    g.output(cc.clip(x, lo, hi), "y")
    a = np.random.default_rng(0).standard_normal((2, 3, 5, 4)).astype(dtype) * 4
    a.flat[:4] = [lo or 0.0, hi or 0.0, np.nan, 6.0]          # bounds themselves, and NaN passes through
    want = torch.clamp(torch.tensor(a), lo, hi).numpy() if (lo, hi) != (None, None) else a
    ref, got = run_both(g, {"x": a})
    assert_close(ref["y"], want, 0, 0, what="numpy reference")
    assert_close(got["y"], want, 0, 0, what="C")
    assert np.isnan(got["y"].flat[2])


@pytest.mark.parametrize("lo,hi", [(0.0, 6.0), (-1.0, 0.5)])
def test_clip_gradient_matches_hardtanh(lo, hi):
    rng = np.random.default_rng(1)
    a = (rng.standard_normal((4, 10)) * 4).astype(np.float32)
    a[0, :2] = [lo, hi]                       # at the bounds: no gradient (strict, like hardtanh)
    gy = rng.standard_normal((4, 10)).astype(np.float32)
    g = cc.Graph("clip_grad")
    x = g.input("x", a.shape)
    gyv = g.input("gy", gy.shape)
    y = cc.clip(x, lo, hi)
    (dx,) = cc.grad(y, [x], grad_output=gyv)
    g.output(dx, "dx")
    xt = torch.tensor(a, requires_grad=True)
    torch.nn.functional.hardtanh(xt, lo, hi).backward(torch.tensor(gy))
    ref, got = run_both(g, {"x": a, "gy": gy})
    assert_close(ref["dx"], xt.grad.numpy(), 0, 0, what="numpy reference")
    assert_close(got["dx"], xt.grad.numpy(), 0, 0, what="C")


def test_clip_rules():
    g = cc.Graph("bad")
    x = g.input("x", (3,))
    with pytest.raises(cc.ValidationError, match="min must be a number, got .low."):
        cc.clip(x, "low", 1.0)
    with pytest.raises(cc.ValidationError, match="NaN"):
        cc.clip(x, float("nan"), 1.0)
    i = g.input("i", (3,), "int64")
    with pytest.raises(cc.ValidationError, match="min must be an integer"):     # integer clip: integer bounds
        cc.clip(i, 0.5, 1)
    y = cc.clip(x, 0, 6, name="relu6")
    assert "relu6 = clip(%x, min=0.0, max=6.0)" in str(g)
    assert y.shape == (3,)

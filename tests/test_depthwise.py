"""The depthwise row kernel (templates/c/depthwise.c.j2: 2D convs with one
input channel per group): a grid over every parameter it handles, in one
graph per target, against torch; rows whose window leaves the input, empty
interiors and long interiors included."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convc as cc
from convc.ops import get_op
from helpers import TARGETS, assert_close

# (channels, multiplier, size (h, w), kernel, stride, padding ((top, bottom), (left, right)), dilation, flip, bias)
GRID = [
    (2, 1, (5, 6), (3, 1), (1, 1), ((2, 2), (0, 0)), (1, 1), False, "none"),     # rows outside the input
    (2, 1, (7, 6), (1, 2), (1, 1), ((0, 0), (2, 2)), (1, 2), False, "tied"),     # columns outside, dilated
    (3, 2, (9, 9), (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), False, "tied"),     # MobileNet stride 2, multiplier
    (4, 1, (14, 14), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), True, "untied"),  # flip, untied bias
    (2, 1, (4, 5), (5, 5), (1, 1), ((2, 2), (2, 2)), (1, 1), False, "tied"),     # no interior column at all
    (3, 1, (33, 40), (3, 5), (1, 2), ((0, 2), (3, 1)), (2, 1), False, "none"),   # asymmetric, long rows
    (2, 3, (8, 7), (2, 3), (3, 2), ((1, 0), (0, 2)), (1, 1), True, "tied"),
    (1, 1, (3, 3), (3, 3), (1, 1), ((0, 0), (0, 0)), (1, 1), False, "tied"),     # one output
]


def torch_conv(x, w, b, stride, pads, dilation, groups, flip):
    (t, bo), (le, r) = pads
    if flip:
        w = torch.flip(w, (2, 3))
    y = F.conv2d(F.pad(x, (le, r, t, bo)), w, None, stride=stride, dilation=dilation, groups=groups)
    return y if b is None else y + (b.reshape(1, -1, 1, 1) if b.ndim == 1 else b)


@pytest.fixture(scope="module")
def runs():
    g, feeds, want = cc.Graph("dw_grid"), {}, {}
    rng = np.random.default_rng(7)
    for i, (c, mult, size, k, s, pads, d, flip, bias) in enumerate(GRID):
        for dtype in ("float32", "float64"):
            key = f"{i}_{dtype}"
            xa = rng.standard_normal((2, c) + size).astype(dtype)
            wa = rng.standard_normal((c * mult, 1) + k).astype(dtype)
            x = g.input(f"x{key}", xa.shape, dtype)
            feeds[f"x{key}"] = xa
            tb = None
            args = [x, g.param(f"w{key}", wa)]
            out = torch_conv(torch.tensor(xa), torch.tensor(wa), None, s, pads, d, c, flip)
            if bias != "none":
                ba = rng.standard_normal((c * mult,) if bias == "tied" else tuple(out.shape[1:])).astype(dtype)
                args.append(g.param(f"b{key}", ba))
                tb = torch.tensor(ba)
            y = g.add("conv", args, dict(stride=s, padding=pads, dilation=d, groups=c, flip=flip,
                                         activation="clip", min=-0.5, max=0.5))
            assert get_op("conv").template_of(g.node(y.name)["attrs"], [v.type for v in args]) == "depthwise"
            g.output(y, f"y{key}")
            want[key] = torch.clamp(torch_conv(torch.tensor(xa), torch.tensor(wa), tb, s, pads, d, c, flip),
                                    -0.5, 0.5).numpy()
    return {t: cc.compile(g, target=t, passes="none").run(feeds) for t in TARGETS}, want


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("i", range(len(GRID)))
def test_depthwise_row_kernel_matches_torch(runs, i, target):
    got, want = runs
    for dtype, tol in (("float32", 1e-5), ("float64", 1e-12)):
        key = f"{i}_{dtype}"
        assert_close(got[target][f"y{key}"], want[key], rtol=tol, atol=tol, what=f"depthwise {GRID[i]} {dtype} [{target}]")

"""``factor_spatial_separable``: a rank-1 constant kernel becomes k×1 then 1×k."""
from __future__ import annotations

import numpy as np

from ..ir import Graph
from ..ops.conv import spatial_separable_conv
from .manager import decline, register
from .rewrite import an, attrs, fresh, is_const, operands, reactivate, rewrite

RTOL = 1e-6      # second singular value / first below this counts as rank 1


def rank1_split(k2d: np.ndarray, rtol: float = RTOL):
    """((column, row), None) with column ⊗ row == k2d, or (None, why not):
    k2d is rank 1 when its second singular value is within ``rtol`` of the
    largest (by SVD)."""
    u, s, vt = np.linalg.svd(k2d.astype(np.float64))
    if s[0] == 0:
        return None, "is all zeros"
    if len(s) > 1 and s[1] > rtol * s[0]:
        return None, f"has rank > 1: singular values {s[0]:.3g}, {s[1]:.3g} (ratio {s[1] / s[0]:.2g} > {rtol:g})"
    root = np.sqrt(s[0])
    return (u[:, 0] * root, vt[0] * root), None


def rank1_factors(k2d: np.ndarray, rtol: float = RTOL):
    """(column, row) with column ⊗ row == k2d, or None if k2d is not rank 1
    (see :func:`rank1_split`)."""
    return rank1_split(k2d, rtol)[0]


def _factor(g: Graph, n: str):
    if g.node(n)["op"] != "conv":
        return None
    a = attrs(g, n)
    x, w, *b = operands(g, n)
    c_out = w.shape[0]
    if len(w.shape) != 4:
        return decline(n, f"{len(w.shape) - 2}D kernel; the factoring is 2D")
    if min(w.shape[2:]) < 2:
        return decline(n, f"kernel {w.shape[2:]}: nothing to factor")
    if w.shape[1] != 1 or not (a["groups"] == x.shape[1] == c_out):      # one kernel per channel (or 1 -> 1)
        return decline(n, f"groups {a['groups']} for {x.shape[1]} -> {c_out} channels: not one kernel per channel")
    if not is_const(g, w):
        return decline(n, f"kernel '{w.name}' is computed ({an(w.op)}), not a param")
    wv = g.node(w.name)["value"]
    if a["flip"]:
        wv = wv[:, :, ::-1, ::-1]
    cols, rows = [], []
    for c in range(c_out):
        f, why = rank1_split(wv[c, 0])
        if f is None:
            return decline(n, f"channel {c}'s kernel {why}")
        cols.append(f[0])
        rows.append(f[1])
    kh, kw = w.shape[2:]
    w_col = g.param(fresh(g, f"{w.name}.col"), np.array(cols).reshape(c_out, 1, kh, 1), w.dtype)
    w_row = g.param(fresh(g, f"{w.name}.row"), np.array(rows).reshape(c_out, 1, 1, kw), w.dtype)
    y = spatial_separable_conv(x, w_col, w_row, b[0] if b else None, a["stride"], a["padding"], a["dilation"],
                               groups=c_out, name=fresh(g, f"{n}.separable"))
    return reactivate(g, n, y)


@register
def factor_spatial_separable(g: Graph) -> Graph:
    """A conv with a constant kernel of rank 1 per channel (the SVD says so,
    within a tolerance), such as Sobel = [1,2,1]ᵀ ⊗ [1,0,−1], becomes a k×1
    conv then a 1×k conv: 2k instead of k² multiplications per output."""
    return rewrite(g, _factor)



"""``factor_spatial_separable``: a rank-1 constant kernel becomes k×1 then 1×k."""
from __future__ import annotations

import numpy as np

from ..ir import Graph
from ..ops.conv import spatial_separable_conv
from .manager import register
from .rewrite import attrs, fresh, ins, is_const, operands, reactivate, rewrite

RTOL = 1e-6      # second singular value / first below this counts as rank 1


def rank1_factors(k2d: np.ndarray, rtol: float = RTOL):
    """(column, row) with column ⊗ row == k2d, or None if k2d is not rank 1
    (by SVD, within ``rtol`` of the largest singular value)."""
    u, s, vt = np.linalg.svd(k2d.astype(np.float64))
    if s[0] == 0 or (len(s) > 1 and s[1] > rtol * s[0]):
        return None
    root = np.sqrt(s[0])
    return u[:, 0] * root, vt[0] * root


def _factor(g: Graph, n: str):
    if g.node(n)["op"] != "conv":
        return None
    a = attrs(g, n)
    x, w, *b = operands(g, n)
    if len(w.shape) != 4 or not is_const(g, w) or w.shape[1] != 1 or min(w.shape[2:]) < 2:
        return None
    c_out = w.shape[0]
    if not (a["groups"] == x.shape[1] == c_out):          # one kernel per channel (or 1 -> 1)
        return None
    wv = g.node(w.name)["value"]
    if a["flip"]:
        wv = wv[:, :, ::-1, ::-1]
    cols, rows = [], []
    for c in range(c_out):
        f = rank1_factors(wv[c, 0])
        if f is None:
            return None
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



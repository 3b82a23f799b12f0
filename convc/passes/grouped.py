"""``grouped_to_split`` and ``dilated_to_dense``."""
from __future__ import annotations

from ..ir import Graph
from ..ops.conv import conv
from ..ops.layout import dilate
from ..ops.tensor import concat, slice_axis
from .manager import decline, register
from .rewrite import attrs, fresh, operands, reactivate, rewrite


def _split(g: Graph, n: str):
    if g.node(n)["op"] != "conv":
        return None
    if attrs(g, n)["groups"] == 1:
        return decline(n, "groups 1: nothing to split")
    a = attrs(g, n)
    x, w, *b = operands(g, n)
    groups = a["groups"]
    cig, cog = x.shape[1] // groups, w.shape[0] // groups
    parts = []
    for i in range(groups):
        xi = slice_axis(x, 1, i * cig, (i + 1) * cig, name=fresh(g, f"{n}.x{i}"))
        wi = slice_axis(w, 0, i * cog, (i + 1) * cog, name=fresh(g, f"{n}.w{i}"))
        bi = slice_axis(b[0], 0, i * cog, (i + 1) * cog, name=fresh(g, f"{n}.b{i}")) if b else None
        parts.append(conv(xi, wi, bi, a["stride"], a["padding"], a["dilation"], 1, a["flip"],
                          name=fresh(g, f"{n}.group{i}")))
    return reactivate(g, n, concat(parts, 1, name=fresh(g, f"{n}.concat")))


@register
def grouped_to_split(g: Graph) -> Graph:
    """A grouped conv becomes one ordinary conv per group on its slice of the
    channels, joined by ``concat``: what groups mean, spelled out."""
    return rewrite(g, _split)


def _dense(g: Graph, n: str):
    if g.node(n)["op"] != "conv":
        return None
    if all(d == 1 for d in attrs(g, n)["dilation"]):
        return decline(n, f"dilation {attrs(g, n)['dilation']}: dense already")
    a = attrs(g, n)
    x, w, *b = operands(g, n)
    wd = dilate(w, a["dilation"], name=fresh(g, f"{n}.dilated_kernel"))   # zeros between the taps
    return reactivate(g, n, conv(x, wd, b[0] if b else None, a["stride"], a["padding"], 1, a["groups"], a["flip"],
                                 name=fresh(g, f"{n}.dense")))


@register
def dilated_to_dense(g: Graph) -> Graph:
    """A dilated conv becomes an undilated conv with a zero-inserted kernel of
    extent d·(k−1)+1: same result, more multiplications (by zeros)."""
    return rewrite(g, _dense)

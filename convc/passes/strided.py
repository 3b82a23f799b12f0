"""``strided_to_downsampled`` and its inverse ``fuse_downsample``."""
from __future__ import annotations

from ..ir import Graph
from ..ops.conv import conv
from ..ops.elementwise import add
from ..ops.layout import downsample
from .manager import decline, register
from .rewrite import an, attrs, fresh, ins, operands, reactivate, rewrite, shared


def _to_downsampled(g: Graph, n: str):
    if g.node(n)["op"] != "conv":
        return None
    a = attrs(g, n)
    if all(s == 1 for s in a["stride"]):
        return decline(n, f"stride {a['stride']}: nothing to split")
    x, w, *b = operands(g, n)
    untied = bool(b) and len(b[0].shape) > 1      # an untied bias has the strided output's shape
    full = conv(x, w, None if untied or not b else b[0], 1, a["padding"], a["dilation"], a["groups"], a["flip"],
                name=fresh(g, f"{n}.unit_stride"))
    y = downsample(full, a["stride"], name=fresh(g, f"{n}.downsample"))
    return reactivate(g, n, add(y, b[0], name=fresh(g, f"{n}.bias")) if untied else y)


@register
def strided_to_downsampled(g: Graph) -> Graph:
    """A stride-s conv becomes a unit-stride conv followed by ``downsample``:
    the book's two-step form (Eq 8's V[l, j·s + m, k·s + n] split in two),
    which computes every output and throws away all but one in s^d; compare
    the MACs before and after."""
    return rewrite(g, _to_downsampled)


def _fuse(g: Graph, n: str):
    d = g.node(n)
    if d["op"] != "downsample":
        return None
    (src,) = ins(g, n)
    if src.op != "conv":
        return decline(n, f"follows {an(src.op)} ('{src.name}'), not a conv")
    why = shared(g, src.name)
    if why:
        return decline(n, f"conv {why}")
    if attrs(g, src.name).get("residual"):
        return decline(n, f"conv '{src.name}' adds a residual of the unstrided shape")
    a = attrs(g, src.name)
    x, w, *b = operands(g, src.name)
    if b and len(b[0].shape) > 1:
        return decline(n, f"conv '{src.name}' has an untied bias {b[0].shape}, which cannot follow "
                          f"the stride change")
    stride = tuple(s1 * s2 for s1, s2 in zip(a["stride"], d["attrs"]["stride"]))
    return reactivate(g, src.name, conv(x, w, b[0] if b else None, stride, a["padding"], a["dilation"], a["groups"], a["flip"],
                name=fresh(g, src.name.replace(".unit_stride", "") if ".unit_stride" in src.name else f"{src.name}.strided")))


@register
def fuse_downsample(g: Graph) -> Graph:
    """A conv whose only use is a ``downsample`` becomes one strided conv
    (stride multiplied): the outputs that would be discarded are never computed."""
    return rewrite(g, _fuse)

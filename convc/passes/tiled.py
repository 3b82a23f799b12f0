"""``tiled_to_convs``: Eq 4 as a sum of plain convolutions."""
from __future__ import annotations

import itertools

from ..ir import Graph
from ..ops.conv import conv
from ..ops.elementwise import add
from ..ops.layout import dilate, downsample, pad
from ..ops.tensor import slice_axis, reshape
from .manager import decline, register
from .rewrite import attrs, fresh, ins, rewrite
from .transposed import _bias

MAX_PIECES = 64


def _tiled(g: Graph, n: str):
    if g.node(n)["op"] != "tiled_conv":
        return None
    a = attrs(g, n)
    x, w, *b = ins(g, n)
    rank = len(x.shape) - 2
    c_out, c_in, *rest = w.shape
    k, tile = rest[:rank], rest[rank:]
    out = g.node(n)["type"].shape[2:]
    pieces = list(itertools.product(*[range(min(t, o)) for t, o in zip(tile, out)]))
    if len(pieces) > MAX_PIECES:
        return decline(n, f"a tile of {len(pieces)} kernels, more than MAX_PIECES {MAX_PIECES} convs")
    total = None
    for offs in pieces:
        tag = "_".join(map(str, offs))
        # kernel number `offs` of the tile: w[..., offs] as an ordinary conv kernel
        wk = w
        for ax, o in enumerate(offs):
            wk = slice_axis(wk, 2 + rank + ax, o, o + 1, name=fresh(g, f"{n}.w{tag}.{ax}"))
        wk = reshape(wk, (c_out, c_in, *k), name=fresh(g, f"{n}.kernel{tag}"))
        y = conv(x, wk, None, a["stride"], a["padding"], a["dilation"], name=fresh(g, f"{n}.conv{tag}"))
        # keep the positions o ≡ offs (mod t) ...
        y = pad(y, [(-o, 0) for o in offs], name=fresh(g, f"{n}.shift{tag}"))
        y = downsample(y, tile, name=fresh(g, f"{n}.pick{tag}"))
        # ... and put them back in place, zeros elsewhere
        y = dilate(y, tile, name=fresh(g, f"{n}.spread{tag}"))
        y = pad(y, [(o, size - o - s) for o, size, s in zip(offs, out, y.shape[2:])], name=fresh(g, f"{n}.place{tag}"))
        total = y if total is None else add(total, y, name=fresh(g, f"{n}.sum{tag}"))
    return _bias(g, n, total, b)


@register
def tiled_to_convs(g: Graph) -> Graph:
    """A tiled conv (Eq 4) with a t-tile becomes t^d ordinary convolutions,
    one per kernel of the tile; each keeps the output positions that use its
    kernel (o ≡ offset mod t) and the pieces are summed back in place."""
    return rewrite(g, _tiled)

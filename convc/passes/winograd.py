"""``conv_to_winograd``: 3×3 unit-stride convolution by Winograd F(2×2, 3×3)."""
from __future__ import annotations

from ..ir import Graph
from ..ops.winograd import winograd_rule
from .manager import register
from .rewrite import attrs, fresh, ins, rewrite

MIN_CHANNELS = 8
"""Below this many input or output channels the direct conv is faster: the
transforms then cost more than the 36 → 16 multiplications save."""


def _winograd(g: Graph, n: str):
    if g.node(n)["op"] != "conv":
        return None
    a = attrs(g, n)
    x, w, *b = ins(g, n)
    if winograd_rule(x.type, w.type, a) or min(x.shape[1], w.shape[0]) < MIN_CHANNELS:
        return None
    u = g.add("winograd_kernel", [w], dict(flip=a["flip"]), fresh(g, f"{n}.winograd_kernel"))
    return g.add("winograd_conv", [x, w, u, *b], dict(a), fresh(g, f"{n}.winograd"))


@register
def conv_to_winograd(g: Graph) -> Graph:
    """A 2D 3×3 conv with stride 1, dilation 1, groups 1 and at least 8 input
    and output channels becomes ``winograd_kernel`` (U = G g Gᵀ from the
    weights, once per run) and ``winograd_conv`` (16 matrix products of
    transformed 2×2 tiles): 16 instead of 36 multiplications per output tile
    and channel pair. Any padding, flip, bias and fused activation are kept;
    float32 results carry a little more rounding error than the direct conv."""
    return rewrite(g, _winograd)

"""``conv_to_winograd``: 3×3 unit-stride convolution by Winograd F(2×2, 3×3)
or F(4×4, 3×3), the tile chosen per conv by :func:`winograd_tile`."""
from __future__ import annotations

from .. import shapes, tuning
from ..ir import Graph, TensorType
from ..ops.winograd import TILES, arithmetic, winograd_rule
from .manager import decline, register
from .rewrite import attrs, fresh, ins, rewrite

MIN_CHANNELS = 8
"""Below this many input or output channels the direct conv is faster: the
transforms then cost more than the 36 → 16 multiplications save."""


def winograd_declined(x: TensorType, w: TensorType, attrs: dict) -> str | None:
    """Why conv_to_winograd leaves a conv with (normalised) ``attrs`` on
    ``x`` and ``w`` direct (:func:`winograd_rule`'s reason, or fewer than
    MIN_CHANNELS input or output channels), or None if Winograd takes it."""
    why = winograd_rule(x, w, attrs)
    if why:
        return why
    for what, c in (("input", x.shape[1]), ("output", w.shape[0])):
        if c < MIN_CHANNELS:
            return (f"{c} {what} channels, below MIN_CHANNELS {MIN_CHANNELS}: the transforms "
                    f"would cost more than the products save")
    return None


def winograd_tile(x: TensorType, w: TensorType, attrs: dict) -> int | None:
    """The output tile m of Winograd F(m×m, 3×3) for a conv with (normalised)
    ``attrs`` on ``x`` and ``w``: 2 or 4, or None when the conv is not
    computed by Winograd (not a 2D 3×3 unit-stride ungrouped conv, or fewer
    than MIN_CHANNELS input or output channels).

    Between the tiles, the one whose generated code does fewer arithmetic
    operations (:func:`convc.ops.winograd.arithmetic`: the T² products over
    the V slots *with their padding to whole register tiles*, plus the input
    and output transforms counted from the matrices) wins. Nothing here is
    measured on one CPU; the counts follow from the transforms and the
    blocking. F(4×4) does 2.25 products per output and channel pair instead
    of 4, but its transforms cost about 2.3× more per output, and its tiles
    are 4× fewer, so a small output pads a register tile with empty slots:

    - 64→64 at 56², 128→128 at 28², 256→256 at 14²: F(4×4) counts 0.65,
      0.69 and 0.59× F(2×2)'s operations and ran 1.36-1.41, 1.04-1.06 and
      1.08-1.21× faster (one thread, Xeon AVX-512, medians of 41 interleaved
      runs, three repeats on a shared host): less than the counts say where
      a block row has few tiles (7 and 4 tiles: the transforms, which run
      across a block row, fill a vector only partly);
    - 512→512 at 7²: 4 tiles of 4×4 fill a 16-slot register tile a quarter,
      F(4×4) counts 2.25× more (and ran 2.2× slower); F(2×2) (16 tiles, one
      full register tile) stays; so do outputs of 8×8 and less (16→16 at 8²:
      F(4×4) 1.7× slower);
    - the counts are not a clock: 8→8 at 56² counts 1.07× for F(4×4), so
      F(2×2) stays, but F(4×4) ran 1.15× faster there. Such cases are for a
      measured choice (a tuning database consulted by the caller), not for
      a constant here.
    """
    if winograd_declined(x, w, attrs):
        return None
    out = shapes.window_out_sizes(x.shape[2:], (3, 3), attrs["stride"], attrs["dilation"], attrs["padding"])
    cost = {t: arithmetic(*out, x.shape[1], w.shape[0], t) for t in TILES}
    return min(TILES, key=lambda t: (cost[t], t))


def _chosen_tile(g: Graph, n: str, x: TensorType, w: TensorType, a: dict) -> tuple[int | None, str | None]:
    """(tile, None), or (None, why not Winograd): the tuning database's
    choice for node ``n`` where it has one (``winograd`` → 2, ``winograd4``
    → 4, another algorithm → None), else :func:`winograd_tile`'s rule."""
    e = tuning.choice(g, n, mine=("winograd", "winograd4"))
    tuned = e["algorithm"] if e else None
    if tuned is None:
        why = winograd_declined(x, w, a)
        return (None, why) if why else (winograd_tile(x, w, a), None)
    why = winograd_rule(x, w, a)              # what Winograd cannot do comes first, whatever the entry says
    if why or not tuned.startswith("winograd"):
        return None, why or tuning.chose_other(e)
    return 4 if tuned == "winograd4" else 2, None


def _winograd(g: Graph, n: str):
    if g.node(n)["op"] != "conv":
        return None
    a = attrs(g, n)
    x, w, *b = ins(g, n)
    tile, why = _chosen_tile(g, n, x.type, w.type, a)
    if tile is None:
        return decline(n, why)
    u = g.add("winograd_kernel", [w], dict(flip=a["flip"], tile=tile), fresh(g, f"{n}.winograd_kernel"))
    return g.add("winograd_conv", [x, w, u, *b], dict(a, tile=tile), fresh(g, f"{n}.winograd"))


@register
def conv_to_winograd(g: Graph) -> Graph:
    """A 2D 3×3 conv with stride 1, dilation 1, groups 1 and at least 8 input
    and output channels becomes ``winograd_kernel`` (U = G g Gᵀ from the
    weights, once per run) and ``winograd_conv`` (T² matrix products of
    transformed tiles): F(2×2, 3×3), 16 instead of 36 multiplications per 2×2
    output tile and channel pair, or F(4×4, 3×3), 36 instead of 144 per 4×4
    tile, whichever :func:`winograd_tile` picks. Any padding, flip, bias and
    fused activation are kept; float32 results carry more rounding error than
    the direct conv (F(4×4) more than F(2×2))."""
    return rewrite(g, _winograd)

"""Memory-saving rewrites for a small arena: ``inplace_elementwise``,
``inplace_depthwise``, ``inplace_pointwise``, ``patch_first_stages``.

None changes what the graph computes; each trades nothing (the in-place
passes: the same multiplications, a few rows of scratch) or some recomputed
halo (the patch-based schedule) for a smaller peak of live buffers.
``convc/budget.py`` picks among them the cheapest plan that fits a RAM budget.

In place: a pass marks a node with the node data ``schedule.INPLACE`` (the
input slot it may write over) and ``schedule.plan`` gives it that input's
buffer when nothing reads the input afterwards. Elementwise ops write each
element after reading it, so their templates work unchanged (the generated
function drops ``restrict`` on the shared pointers); convolutions need an
order that never overwrites an input element a later output reads, so they
become ``depthwise_inplace`` and ``pointwise_inplace`` (``ops/memory.py``).

Patch-based (MCUNetV2): the first stages of a net, where the resolution is
high, run tile by tile over the stage's output, each tile's chain computed
from a crop of the stage input with the halo its windows need; only one
tile's intermediates are live, and its result is pasted into the stage
output. It is a graph rewrite rather than an op: the tiles are ordinary
nodes (``crop``, a copy of every stage node with the tile's padding,
``paste``), so ``print(g)``, the reference interpreter, the cost model and
the other passes (in-place, fusion) see and check them, and the schedule's
tie-break by insertion order runs them tile by tile.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import RuleError
from ..ir import Graph
from ..ops import get_op
from ..ops.elementwise import ActivationOp, _Binary
from ..ops.memory import DepthwiseInPlace, PointwiseInPlace, crop, paste
from ..schedule import INPLACE, TILE
from ..tuning import note
from .manager import decline, declines, register
from .rewrite import an, fresh, replace_uses


# -- in place -------------------------------------------------------------------
def _dies_here(g: Graph, n: str, src: str, order: dict[str, int]) -> str | None:
    """Why ``n`` cannot write over input ``src``'s buffer (in schedule
    order ``order``), or None. The plan (``schedule.inplace_sources``)
    checks the same again on the final graph."""
    d = g.node(src)
    if d["op"] in ("input", "param"):
        return f"its input '{src}' is a graph {d['op']} (the caller's memory or the weights)"
    if src in g.outputs.values() or src in g.assigns.values():
        return f"its input '{src}' is a graph output"
    if n in g.outputs.values() or n in g.assigns.values():
        return "it is a graph output (its own buffer is the caller's)"
    if d["type"].dtype != g.node(n)["type"].dtype:
        return f"its input '{src}' is {d['type'].dtype}, its output {g.node(n)['type'].dtype}"
    later = [u for u in g.users_of(src) if order[u] > order[n]]
    if later:
        return f"'{later[0]}' reads its input '{src}' later"
    return None


def _resolved(g: Graph, n: str) -> str:
    """``n`` behind reshapes (which are names for their input's buffer)."""
    while g.node(n)["op"] in ("reshape", "flatten") and n not in g.outputs.values():
        (n,) = g.inputs_of(n)
    return n


@register
def inplace_elementwise(g: Graph) -> Graph:
    """An activation or an add/sub/mul/div whose input of the output's shape
    and dtype is read by nothing after it writes its result over that
    input's buffer (marked ``schedule.INPLACE``; the plan aliases them)."""
    out = g.copy()
    order = {n: i for i, n in enumerate(out.topological_order())}
    for n in out.topological_order():
        d = out.node(n)
        op = get_op(d["op"]) if d["op"] not in ("input", "param") else None
        if not isinstance(op, (ActivationOp, _Binary)):
            continue
        why = None
        for slot, i in enumerate(out.inputs_of(n)):
            if out.node(i)["type"] != d["type"]:
                why = why or f"its input '{i}' is {out.node(i)['type']}, its output {d['type']}"
                continue
            why = _dies_here(out, n, _resolved(out, i), order)
            if why is None:
                out.node(n)[INPLACE] = slot
                note(f"'{n}' ({d['op']}) writes over the buffer of its input '{i}'")     # the IR does not show it
                break
        if why is not None:
            decline(n, why)
    return out


def _conv_rule(g: Graph, n: str, order, kind: str) -> str | None:
    """Why conv ``n`` cannot become ``kind`` (an in-place conv op), or None."""
    d = g.node(n)
    ins = g.inputs_of(n)
    try:
        get_op(kind).normalize(dict(d["attrs"]), [g.node(i)["type"] for i in ins])
    except RuleError as e:         # the op's own rule says why
        return str(e)
    return _dies_here(g, n, _resolved(g, ins[0]), order)


def _candidate(g: Graph, n: str, kind: str) -> bool:
    """Whether conv ``n`` is the kind of conv pass ``kind`` looks at (a
    depthwise conv; a 1x1 conv): only those get a decline reason."""
    d = g.node(n)
    x, w = (g.node(i)["type"] for i in g.inputs_of(n)[:2])
    if kind == DepthwiseInPlace.name:
        return len(x.shape) == 4 and d["attrs"]["groups"] == x.shape[1] > 1
    return len(x.shape) == 4 and w.shape[2:] == (1, 1)


def _to_inplace(g: Graph, kind: str) -> Graph:
    """``g`` with each conv that qualifies turned into op ``kind`` (same
    name, inputs, attrs and type: the in-place ops are convs) and marked
    ``INPLACE`` on its input."""
    out = g.copy()
    order = {n: i for i, n in enumerate(out.topological_order())}
    for n in order:
        if out.node(n)["op"] != "conv" or not _candidate(out, n, kind):
            continue
        why = _conv_rule(out, n, order, kind)
        if why is not None:
            decline(n, why)
            continue
        out.node(n)["op"] = kind        # the copy's own node data: g keeps its conv
        out.node(n)[INPLACE] = 0
    return out


@register
def inplace_depthwise(g: Graph) -> Graph:
    """A 2D depthwise conv (one output channel per input channel, output
    plane no bigger than the input plane) whose input dies there becomes
    ``depthwise_inplace``: its output rows wait in a ring of a few rows
    (the scratch: (delay + 1) x OUT_X elements) until the input rows under
    them are read, then overwrite them."""
    return _to_inplace(g, DepthwiseInPlace.name)


@register
def inplace_pointwise(g: Graph) -> Graph:
    """A 1x1 conv (stride 1, no padding, one group) whose input dies there
    becomes ``pointwise_inplace``: each row of pixels is computed for every
    output channel into scratch (C_OUT x OUT_X elements), then written over
    the pixels just read (a wider output grows the shared buffer)."""
    return _to_inplace(g, PointwiseInPlace.name)


# -- patch-based ------------------------------------------------------------------
TILEABLE = ("conv", "fused_separable")
"""Window ops a stage may hold (besides activations): 2D, their window per
spatial axis read from their attrs (``_window``)."""


def _window(g: Graph, n: str):
    """Per spatial axis (kernel, stride, dilation, padding low) of node ``n``,
    ``()`` for an elementwise node (the identity window), or None if ``n``
    cannot be tiled, with the reason as second item."""
    d = g.node(n)
    a, t = d["attrs"], d["type"]
    ins = g.inputs_of(n)
    if len(t.shape) != 4:
        return None, f"its output {t} is not 2D (N, C, H, W)"
    if isinstance(get_op(d["op"]), ActivationOp):
        return (), None
    if d["op"] not in TILEABLE:
        return None, f"{an(d['op'])} is not a window op a tile can hold ({', '.join(TILEABLE)}, activations)"
    if a.get("residual"):
        return None, "it adds a residual (a second tensor the tile would have to crop)"
    if any(g.node(i)["op"] != "param" for i in ins[1:]):
        return None, "its weights are computed, not params"
    if any(len(g.node(i)["type"].shape) > 1 for i in ins[2 + (d["op"] == "fused_separable"):]):
        return None, "it has an untied bias (one value per output position)"
    pre = "dw_" if d["op"] == "fused_separable" else ""
    k = g.node(ins[1])["type"].shape[2:]
    return tuple((k[i], a[pre + "stride"][i], a[pre + "dilation"][i], a[pre + "padding"][i][0])
                 for i in range(2)), None


def stages(g: Graph) -> list[list[str]]:
    """The tileable chains of ``g``: from each 2D graph input, its single
    consumer and then each node's single consumer, while each is a window
    op or an activation reading the previous node (its other inputs
    params). A chain ends before a node that is not, and at a graph output."""
    out = []
    for x in g.input_names:
        if len(g.node(x)["type"].shape) != 4:
            continue
        chain, prev = [], x
        users = g.users_of(x)
        if len(users) > 1:
            decline(x, f"a tiled stage starts at an input read by one node; '{x}' has {len(users)} readers")
        while len(users) == 1:
            n = users[0]
            if g.inputs_of(n)[0] != prev or prev in g.inputs_of(n)[1:] or _window(g, n)[0] is None:
                if chain:
                    decline(n, f"the tiled stage from '{x}' ends before it: "
                               f"{_window(g, n)[1] or 'it reads the stage twice'}")
                break
            chain.append(n)
            if n in g.outputs.values() or n in g.assigns.values():
                break
            prev, users = n, g.users_of(n)
        if chain:
            out.append(chain)
    return out


@dataclass(frozen=True)
class Region:
    """One tile's window of a tensor per spatial axis: [lo, hi)."""
    lo: tuple[int, int]
    hi: tuple[int, int]


def _needed(window, sizes, region: Region):
    """The input window ``region`` of the output needs and the tile's
    padding: (input Region, ((lo, hi), (lo, hi))), or None if some tile
    would see nothing but padding."""
    lo, hi, pads = [], [], []
    for ax, (k, s, d, p) in enumerate(window):
        a, b = region.lo[ax], region.hi[ax]
        first, end = a * s - p, (b - 1) * s - p + (k - 1) * d + 1
        i_lo, i_hi = max(first, 0), min(end, sizes[ax])
        if i_lo >= i_hi:
            return None
        lo.append(i_lo)
        hi.append(i_hi)
        pads.append((i_lo - first, end - i_hi))
    return Region(tuple(lo), tuple(hi)), tuple(pads)


def _bounds(n: int, parts: int) -> list[int]:
    return [n * i // parts for i in range(parts + 1)]


def tile_plan(g: Graph, chain: list[str], grid: tuple[int, int]):
    """For each tile of ``grid`` (rows x columns of the last node's output),
    in row-major order: (the crop of the stage input, [(node, its output
    Region, its padding or None) for each node of ``chain``]); None if a
    tile would see nothing but padding or be empty."""
    t = g.node(chain[-1])["type"].shape[2:]
    if grid[0] > t[0] or grid[1] > t[1]:
        return None
    rows, cols = _bounds(t[0], grid[0]), _bounds(t[1], grid[1])
    tiles = []
    for r in range(grid[0]):
        for c in range(grid[1]):
            region = Region((rows[r], cols[c]), (rows[r + 1], cols[c + 1]))
            steps = []
            for n in reversed(chain):
                window, _ = _window(g, n)
                if window == ():
                    steps.append((n, region, None))
                    continue
                sizes = g.node(g.inputs_of(n)[0])["type"].shape[2:]
                got = _needed(window, sizes, region)
                if got is None:
                    return None
                steps.append((n, region, got[1]))
                region = got[0]
            tiles.append((region, steps[::-1]))
    return tiles


def _tile_node(g: Graph, n: str, x, pads, name: str):
    """A copy of stage node ``n`` on tile input ``x`` with the tile's padding."""
    d = g.node(n)
    a = dict(d["attrs"])
    if pads is not None:
        a["dw_padding" if d["op"] == "fused_separable" else "padding"] = pads
    return g.add(d["op"], [x] + [g.value(i) for i in g.inputs_of(n)[1:]], a, name)


def patch_stage(g: Graph, chain: list[str], grid: tuple[int, int]) -> Graph | None:
    """``g`` with the stage ``chain`` (from :func:`stages`) run in
    ``grid`` tiles of its last node's output: per tile, a ``crop`` of the
    stage input (the tile's window with its halo), a copy of each stage node
    (same weights, the tile's padding: the real padding at the image's
    border, none inside, where the halo holds real values) and a ``paste``
    of the result into the stage output, each paste writing over the
    previous one (in place). None if the grid does not fit."""
    tiles = tile_plan(g, chain, grid)
    if tiles is None:
        return None
    out = g.copy()
    x = out.value(out.inputs_of(chain[0])[0])
    last = out.node(chain[-1])["type"]
    canvas = None
    for k, (region, steps) in enumerate(tiles):
        tag = f"tile{k // grid[1]}_{k % grid[1]}"
        size = tuple(h - lo for lo, h in zip(region.lo, region.hi))
        made = []
        v = x if size == x.shape[2:] else crop(x, region.lo, size, name=fresh(out, f"{chain[0]}.{tag}.crop"))
        made.append(v)
        for n, _, pads in steps:
            v = _tile_node(out, n, v, pads, fresh(out, f"{n}.{tag}"))
            made.append(v)
        at = steps[-1][1].lo
        if canvas is None:
            canvas = paste(v, at, shape=last.shape, name=fresh(out, f"{chain[-1]}.{tag}.paste"))
        else:
            canvas = paste(v, at, canvas, name=fresh(out, f"{chain[-1]}.{tag}.paste"))
            out.node(canvas.name)[INPLACE] = 0
        for m in made[made[0] is x:] + [canvas]:
            out.node(m.name)[TILE] = k          # the schedule runs tile k's nodes after tile k - 1's
    replace_uses(out, chain[-1], canvas.name)
    out.nx.remove_nodes_from(chain)
    return out


def grids(g: Graph, chain: list[str]) -> list[tuple[int, int]]:
    """The square grids a stage can take: n x n for every n >= 2 that
    leaves each tile at least 2 x 2 positions of the stage's output (a
    smaller tile recomputes more halo than the output it holds)."""
    h, w = g.node(chain[-1])["type"].shape[2:]
    return [(k, k) for k in range(2, min(h, w) // 2 + 1)]


def patch_options(g: Graph):
    """Every patch-based rewrite of ``g`` that fits: (stage, grid, the
    multiplications the stage then performs) for each prefix of at least
    two nodes of each tileable chain (:func:`stages`) and each of its
    :func:`grids`; :func:`patch_stage` builds one."""
    from ..ops import get_op
    for chain in stages(g):
        for end in range(2, len(chain) + 1):
            for grid in grids(g, chain[:end]):
                tiles = tile_plan(g, chain[:end], grid)
                if tiles is None:
                    continue
                macs = 0            # a window op's multiplications are a fixed number per output position
                for _, steps in tiles:
                    for n, region, _ in steps:
                        d = g.node(n)
                        full = get_op(d["op"]).macs(d["attrs"], [g.node(i)["type"] for i in g.inputs_of(n)],
                                                    d["type"])
                        area = (region.hi[0] - region.lo[0]) * (region.hi[1] - region.lo[1])
                        macs += full // (d["type"].shape[2] * d["type"].shape[3]) * area
                yield chain[:end], grid, macs


class Stalls:
    """Finer grids of one stage stop paying once the arena stops shrinking:
    the halo grows with the number of tiles while the stage output (the
    canvas) stays. The searches (:func:`patch_first_stages`,
    ``budget.fit``) take a stage's grids from coarse to fine and leave the
    rest of a stage once two grids in a row did not make its arena smaller
    (one may not, where the tiles split the output unevenly)."""

    def __init__(self):
        self.best: dict[tuple, int] = {}
        self.misses: dict[tuple, int] = {}

    def stalled(self, chain) -> bool:
        return self.misses.get(tuple(chain), 0) >= 2

    def record(self, chain, arena: int) -> None:
        c = tuple(chain)
        if c in self.best and arena >= self.best[c]:
            self.misses[c] = self.misses.get(c, 0) + 1
        else:
            self.best[c], self.misses[c] = arena, 0


@register
def patch_first_stages(g: Graph) -> Graph:
    """Run the first stage from the graph input tile by tile (MCUNetV2's
    patch-based inference): of the options of :func:`patch_options`, the
    one whose memory plan, once ``inplace_depthwise`` and
    ``inplace_pointwise`` have run as in the ``memory`` pipeline, has the
    smallest arena (the fewest multiplications on a tie); ``g`` unchanged if
    none is smaller than without tiles. ``convc/budget.py`` takes the
    cheapest option that fits a RAM budget instead."""
    from ..schedule import plan

    def arena(x: Graph) -> int:
        with declines():                # theirs, not this pass's
            return plan(inplace_pointwise(inplace_depthwise(x))).arena_bytes

    best, key = g, (arena(g), 0)
    watch = Stalls()
    for chain, grid, macs in patch_options(g):
        if watch.stalled(chain):
            continue
        new = patch_stage(g, chain, grid)
        k = (arena(new), macs)
        watch.record(chain, k[0])
        if k < key:
            best, key = new, k
    if best is g:
        for chain in stages(g):
            decline(chain[0], f"no tiling of the stage from '{chain[0]}' makes the arena smaller "
                              f"than {key[0]:,} bytes")
        return g.copy()                 # a pass returns a new graph
    return best

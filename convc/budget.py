"""RAM and flash budgets for the embedded export (``convc export --ram BYTES
--flash BYTES``, ``export_c(..., ram=, flash=)``).

The export's plan is one of a few candidates, each the export pipeline with
some of the memory-saving rewrites of ``passes/memory.py``:

1. the pipeline as it is (``embedded``: cleanups and fusions);
2. in place: depthwise and 1x1 convs and elementwise ops write over their
   input where it dies (no extra multiplications; the fused
   depthwise + pointwise kernels give way to the in-place ones);
3. patch-based: the stage from the graph input (every prefix of its
   tileable chain) runs in n x n tiles (``passes.memory.patch_options``),
   in place as in 2; the halos are computed again for every tile, which
   costs multiplications.

:func:`fit` takes them cheapest first -- fewest multiplications, then
fewest nodes (less code) -- and returns the first whose arena fits ``ram``
and whose flash (measured by compiling, :func:`convc.export.size_report`)
fits ``flash`` (a stage's finer grids are left once they stop shrinking
the arena: ``passes.memory.Stalls``). If none does, a :class:`BudgetError` names the smallest
arena (or flash) reached, and for the arena the node and schedule step
where its live buffers peak.

>>> choice = fit(mobilenet_tiny(), ram=24 * 1024)     # doctest: +SKIP
>>> print(choice.table())                              # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConvcError
from .ir import Graph, require_graph
from .schedule import Plan, plan as make_plan

INPLACE_CONVS = ["inplace_depthwise", "inplace_pointwise"]
INPLACE_LAST = ["inplace_elementwise"]


class BudgetError(ConvcError):
    """No plan of the graph fits the RAM or flash budget."""


@dataclass
class Candidate:
    """One plan the budget search considers."""
    label: str                  # what it is, for tables and errors
    passes: list[str]           # the passes run, in order (the patch with its stage and grid)
    macs: int                   # multiplications of the rewritten graph
    nodes: int                  # compute nodes (a proxy for code size when flash is not measured)
    graph: Graph | None = None  # built on demand (``build``)
    plan: Plan | None = None
    flash: int | None = None    # bytes, when measured
    build: object = None        # () -> Graph
    stage: tuple | None = None  # a patch-based plan's stage (its nodes)

    def evaluate(self) -> "Candidate":
        """Build the graph and its memory plan (once)."""
        if self.graph is None:
            self.graph = self.build()
            self.plan = make_plan(self.graph)
        return self

    @property
    def arena(self) -> int:
        return self.evaluate().plan.arena_bytes

    def peak(self) -> tuple[int, str, int]:
        """(schedule step, node, bytes live) where the live buffers peak."""
        from .export import live_bytes
        p = self.evaluate().plan
        live = live_bytes(p)
        step = max(range(len(live)), key=live.__getitem__) if live else 0
        return step, (p.order[step] if p.order else ""), (live[step] if live else 0)


def _split(pipeline) -> tuple[list[str], list[str]]:
    """The pipeline's passes before the first ``fuse_separable`` and from
    there on: the memory rewrites go between (fuse_separable would fuse the
    depthwise and 1x1 convs the in-place passes take)."""
    from .passes import resolve
    names = resolve(pipeline)
    k = names.index("fuse_separable") if "fuse_separable" in names else len(names)
    return names[:k], names[k:]


def _run(g: Graph, names: list[str]) -> Graph:
    """Run passes without the manager's per-pass checks (the search builds
    many candidates; the chosen one is verified)."""
    from .passes import PASSES
    for n in names:
        g = PASSES[n](g)
    return g


def _node_macs(g: Graph, n: str) -> int:
    from .ops import get_op
    d = g.node(n)
    return get_op(d["op"]).macs(d["attrs"], [g.node(i)["type"] for i in g.inputs_of(n)], d["type"])


def _macs(g: Graph) -> int:
    from .schedule import live_nodes
    keep = live_nodes(g)
    return sum(_node_macs(g, n) for n in g.topological_order() if n in keep and g.node(n)["op"] not in ("input", "param"))


def candidates(graph: Graph, passes="embedded") -> list[Candidate]:
    """The plans :func:`fit` chooses from, cheapest first (fewest
    multiplications, then fewest nodes); each builds its graph when asked
    (``Candidate.evaluate``)."""
    from .passes.memory import patch_options, patch_stage

    head, tail = _split(passes)
    g0 = _run(graph, head)
    out = []

    def add(label, names, g):
        out.append(Candidate(label, names, _macs(g), _count(g), build=lambda: _run(g, names[len(head):])))

    base_macs = _macs(g0)
    base = _run(g0, tail)
    out.append(Candidate(f"the {passes if isinstance(passes, str) else 'given'} pipeline", head + tail,
                         _macs(base), _count(base), graph=base, plan=make_plan(base)))
    add("in place", head + INPLACE_CONVS + tail + INPLACE_LAST, g0)
    for chain, grid, stage_macs in patch_options(g0):
        macs = base_macs - sum(_node_macs(g0, n) for n in chain) + stage_macs
        tiles = grid[0] * grid[1]
        nodes = _count(g0) + (tiles - 1) * len(chain) + 2 * tiles      # a copy per tile, a crop and a paste each
        step = f"patch_stage({chain[0]}..{chain[-1]}, {grid[0]}x{grid[1]})"
        out.append(Candidate(f"patch-based {chain[0]}..{chain[-1]} in {grid[0]}x{grid[1]} tiles, in place",
                             head + [step] + INPLACE_CONVS + tail + INPLACE_LAST, macs, nodes,
                             build=(lambda c=chain, gr=grid: _run(patch_stage(g0, c, gr),
                                                                  INPLACE_CONVS + tail + INPLACE_LAST)),
                             stage=tuple(chain)))
    out.sort(key=lambda c: (c.macs, c.nodes))
    return out


def _count(g: Graph) -> int:
    return sum(1 for n in g.nx.nodes if g.node(n)["op"] not in ("input", "param"))


@dataclass
class Choice:
    """What :func:`fit` chose, and what it tried on the way."""
    chosen: Candidate
    tried: list[Candidate]
    base: Candidate                     # the pipeline without memory rewrites
    ram: int | None = None
    flash: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def graph(self) -> Graph:
        return self.chosen.graph

    def table(self) -> str:
        """One line per candidate tried: MACs (and the share added), arena,
        flash where measured, and which was chosen."""
        b = self.base.macs or 1
        rows = [("plan", "MACs", "added", "arena", "flash", "")]
        for c in self.tried:
            rows.append((c.label, f"{c.macs:,}", f"{(c.macs - self.base.macs) / b:+.1%}", f"{c.arena:,}",
                         "-" if c.flash is None else f"{c.flash:,}", "<- chosen" if c is self.chosen else ""))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(v.ljust(w) if i in (0, 5) else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
                 .rstrip() for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        budget = ", ".join(f"{k} {v:,} bytes" for k, v in (("RAM", self.ram), ("flash", self.flash)) if v)
        step, node, live = self.chosen.peak()
        lines.append(f"budget: {budget}; chosen: {self.chosen.label}: arena {self.chosen.arena:,} bytes "
                     f"(was {self.base.arena:,}), peak at step {step}, node '{node}'")
        return "\n".join(lines + self.notes)

    __str__ = table


def fit(graph: Graph, ram: int | None = None, flash: int | None = None, passes="embedded", name: str = "model",
        tools=None) -> Choice:
    """The cheapest candidate plan (:func:`candidates`) whose arena is at
    most ``ram`` bytes and whose flash (code + const data, measured by
    compiling with ``tools``, :func:`convc.export.toolchain` by default) is
    at most ``flash`` bytes; either budget may be None. Raises
    :class:`BudgetError` naming the smallest arena (and the node and
    schedule step of its peak) or the smallest flash reached."""
    from .passes.memory import Stalls
    from .schedule import parse_bytes

    require_graph(graph, "the memory budget")
    graph.verify()
    budgets = {}
    for what, v in (("ram", ram), ("flash", flash)):
        if v is not None:
            try:
                budgets[what] = parse_bytes(v)
            except ValueError as e:
                raise BudgetError(f"{what} budget: {e}") from None
    ram, flash = budgets.get("ram"), budgets.get("flash")
    weights = sum(graph.node(n)["type"].nbytes for n in graph.param_names)
    if flash is not None and flash < weights:     # const data: no rewrite here makes the weights smaller
        raise BudgetError(f"graph '{graph.name}': no plan fits the flash budget of {flash:,} bytes: its weights "
                          f"alone are {weights:,} bytes of const data (quantize them: --int8)")
    cands = candidates(graph, passes)
    base = next(c for c in cands if c.graph is not None and c.label.startswith("the "))
    tried: list[Candidate] = []
    fits_ram: list[Candidate] = []
    watch = Stalls()
    for c in cands:
        if c.stage is not None and watch.stalled(c.stage):
            continue                    # finer grids of this stage stopped shrinking the arena
        tried.append(c)
        if c.stage is not None:
            watch.record(c.stage, c.arena)
        if ram is not None and c.arena > ram:
            continue
        fits_ram.append(c)
        if flash is not None:
            c.flash = _flash(c.graph, name, tools)
            if c.flash > flash:
                continue
        c.graph.verify()
        return Choice(c, tried, base, ram, flash)
    if not fits_ram:
        best = min(tried, key=lambda c: (c.arena, c.macs))
        step, node, live = best.peak()
        d = best.graph.node(node) if node else {"op": "", "type": ""}
        raise BudgetError(
            f"graph '{graph.name}': no plan fits the RAM budget of {ram:,} bytes; the smallest arena reached is "
            f"{best.arena:,} bytes ({best.label}; {len(tried)} plans tried), whose live buffers peak at "
            f"{live:,} bytes at schedule step {step}, node '{node}' ({d['op']}, output {d['type']}). "
            f"The default plan needs {base.arena:,} bytes")
    best = min(fits_ram, key=lambda c: c.flash)
    raise BudgetError(
        f"graph '{graph.name}': no plan fits the flash budget of {flash:,} bytes"
        + (f" within the RAM budget of {ram:,} bytes" if ram is not None else "")
        + f"; the smallest flash reached is {best.flash:,} bytes ({best.label}, arena {best.arena:,} bytes; "
          f"{len(fits_ram)} plans measured)")


def _flash(g: Graph, name: str, tools) -> int:
    from .export import size_report
    return size_report(g, name=name, tools=tools, passes="none").flash

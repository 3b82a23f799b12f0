"""The pass table, named pipelines, the pass manager and its reports.

A pass is a plain function ``Graph -> Graph`` registered under its name; it
returns a new graph and never changes its argument. Pipelines are explicit
lists of pass names, per target, readable top to bottom.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import ConvcError
from ..ir import Graph, require_graph

PASSES: dict[str, Callable[[Graph], Graph]] = {}

PIPELINES: dict[str, dict[str, list[str]]] = {
    # What cc.compile runs unless told otherwise (inference): cleanups, then
    # the choice of algorithm per conv (the NCHWc direct kernel for stems,
    # Winograd for 3x3 unit-stride, GEMM where it pays; each pass's docstring
    # gives its rule; a tuning database entry overrides it), then the fusions
    # on what the lowerings made (bias, residual and activation into each
    # producer's epilogue; depthwise + pointwise pairs too small for a GEMM
    # into one kernel), then the weight-only work done once, at compile time.
    "default": [
        "eliminate_dead_code",
        "eliminate_common_subexpressions",
        "fold_constants",
        "fold_batch_norm",
        "fuse_epilogues",                      # so a conv that goes blocked keeps its bias and activation
        "choose_blocked_layout",               # NCHWc where it pays (stems, and what the tuner chose)
        "conv_to_winograd",
        "conv_to_gemm",
        "qconv_to_gemm",                       # int8: qconv as u8 x s8 GEMM (VNNI when the host has it)
        "transposed_to_matmul",
        "eliminate_common_subexpressions",     # a conv and its g share one im2col
        "fuse_epilogues",
        "fuse_separable",
        "fold_params",
        "eliminate_dead_code",
    ],
    # The default with the blocked layout NCHWc (passes/blocked.py): a first
    # fuse_epilogues attaches bias, residual and activation to each conv, so
    # that to_blocked_layout carries them into conv_nchwc; it runs before the
    # algorithm choice because it is one (blocked_eligible decides), so
    # Winograd and GEMM take only the convs it leaves; the second
    # fuse_epilogues fuses what those lowerings split off again.
    "blocked": [
        "eliminate_dead_code",
        "eliminate_common_subexpressions",
        "fold_constants",
        "fold_batch_norm",
        "fuse_epilogues",
        "to_blocked_layout",
        "conv_to_winograd",
        "conv_to_gemm",
        "qconv_to_gemm",
        "transposed_to_matmul",
        "eliminate_common_subexpressions",
        "fuse_epilogues",
        "fuse_separable",
        "fold_params",
        "eliminate_dead_code",
    ],
    # For the embedded export: the default's cleanups and fusions without the
    # algorithm choice, whose im2col columns and Winograd tiles need RAM.
    "embedded": [
        "eliminate_dead_code",
        "eliminate_common_subexpressions",
        "fold_constants",
        "fold_batch_norm",
        "fuse_epilogues",
        "fuse_separable",
        "eliminate_dead_code",
    ],
    # The embedded pipeline for a small arena (passes/memory.py): the stage
    # from the input runs tile by tile where that shrinks the arena, then
    # depthwise and 1x1 convs, and elementwise ops, write over their input
    # where it dies (before fuse_separable, which would fuse those convs).
    # convc/budget.py picks among these rewrites for --ram/--flash budgets.
    "memory": [
        "eliminate_dead_code",
        "eliminate_common_subexpressions",
        "fold_constants",
        "fold_batch_norm",
        "fuse_epilogues",
        "patch_first_stages",
        "inplace_depthwise",
        "inplace_pointwise",
        "fuse_separable",
        "inplace_elementwise",
        "eliminate_dead_code",
    ],
    # For training graphs: the default minus the passes that bake weights
    # into new constants (BN folding, fold_params), so every trained param
    # stays settable by name and weight transforms run on each step.
    "train": [
        "eliminate_dead_code",
        "eliminate_common_subexpressions",
        "fold_constants",
        "conv_to_winograd",
        "conv_to_gemm",
        "transposed_to_matmul",
        "eliminate_common_subexpressions",     # a conv and its g share one im2col
        "fuse_epilogues",
        "fuse_separable",
        "eliminate_dead_code",
    ],
    # The book's lowerings, one after another, to study what each rewrites.
    "study": [
        "strided_to_downsampled",
        "transposed_to_conv",
        "grouped_to_split",
        "dilated_to_dense",
        "tiled_to_convs",
        "local_to_matmul",
        "conv_to_im2col",
        "eliminate_dead_code",
    ],
    "none": [],
}


class PassError(ConvcError):
    """A pass changed what a graph computes (found in debug mode)."""


def register(fn: Callable[[Graph], Graph]) -> Callable[[Graph], Graph]:
    """Register a pass under its function name."""
    if fn.__name__ in PASSES:
        raise RuntimeError(f"pass {fn.__name__!r} registered twice")
    PASSES[fn.__name__] = fn
    return fn


def resolve(pipeline) -> list[str]:
    """A pipeline name or a list of pass names -> list of pass names."""
    if pipeline is None:
        return []
    if isinstance(pipeline, str):
        if pipeline in PIPELINES:
            return list(PIPELINES[pipeline])
        if pipeline in PASSES:
            return [pipeline]
        raise ConvcError(f"unknown pipeline or pass {pipeline!r}; pipelines: {', '.join(PIPELINES)}; "
                         f"passes: {', '.join(sorted(PASSES))}")
    try:
        names = list(pipeline)
    except TypeError:
        raise ConvcError(f"passes must be a pipeline name or a list of pass names, got {pipeline!r}") from None
    unknown = [n for n in names if not isinstance(n, str) or n not in PASSES]
    if unknown:
        raise ConvcError(f"unknown pass(es) {unknown}; known: {', '.join(sorted(PASSES))}")
    return names


@dataclass
class PassReport:
    """What one pass did: node names added / removed / rewritten (same name,
    other op, attributes or inputs) and the cost before and after."""
    name: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)     # e.g. the tuning entries the pass used
    declines: list[tuple[str, str]] = field(default_factory=list)   # (node, why the pass left it), see decline()

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.rewritten)

    def table(self, declines: bool = True) -> str:
        """The counts, the cost before and after, the notes and (unless
        ``declines=False``) one ``left 'node': reason`` line per decline."""
        rows = [f"pass {self.name}: +{len(self.added)} nodes, -{len(self.removed)} nodes, "
                f"{len(self.rewritten)} rewritten"]
        rows.append(f"  {'':14}{'before':>14}{'after':>14}")
        for k in ("macs", "params", "bytes", "arena_bytes", "nodes"):
            rows.append(f"  {k:14}{self.before[k]:>14,}{self.after[k]:>14,}")
        rows += [f"  note: {t}" for t in self.notes]
        rows += [f"  left '{n}': {why}" for n, why in self.declines] if declines else []
        return "\n".join(rows)

    __str__ = table


_DECLINES: contextvars.ContextVar = contextvars.ContextVar("convc_pass_declines", default=None)


def decline(node: str, reason: str) -> None:
    """Record why the running pass examined ``node`` and left it alone: a
    short reason with the numbers that decided ("stride (2, 2); Winograd
    needs stride 1"). :func:`run` puts the reasons in ``PassReport.declines`` (the
    last one given for a node, if a rewrite sweeps several times; none for a
    node the pass did rewrite in the end) and ``CONVC_DEBUG=1`` prints them.
    Outside a pass run it does nothing, so passes stay plain functions.
    Returns None, so a rewrite rule can ``return decline(n, why)``."""
    sink = _DECLINES.get()
    if sink is not None:
        sink[node] = reason


@contextlib.contextmanager
def declines():
    """Collect the :func:`decline` calls made while the block runs, as a
    dict node -> reason (the pass manager wraps each pass in this)."""
    got: dict[str, str] = {}
    token = _DECLINES.set(got)
    try:
        yield got
    finally:
        _DECLINES.reset(token)


def kept(before: Graph, after: Graph, got: dict[str, str]) -> list[tuple[str, str]]:
    """The declines of one pass that still hold: nodes of ``before`` that
    are in ``after`` too (not ones the pass made, nor ones it rewrote after
    declining them in an earlier sweep), in ``before``'s order."""
    return [(n, got[n]) for n in before.topological_order() if n in got and n in after.nx]


def summary(g: Graph) -> dict:
    from ..cost import cost

    rep = cost(g)
    return dict(macs=rep.macs, params=rep.params, bytes=rep.bytes, arena_bytes=rep.arena_bytes,
                nodes=len(rep.nodes))


def _signature(g: Graph, n: str):
    d = g.node(n)
    return (d["op"], repr(d["attrs"]), tuple(g.inputs_of(n)))


def diff(before: Graph, after: Graph, name: str) -> PassReport:
    b, a = set(before.nx.nodes), set(after.nx.nodes)
    rewritten = [n for n in after.topological_order() if n in b and _signature(before, n) != _signature(after, n)]
    return PassReport(name, [n for n in after.topological_order() if n not in b],
                      [n for n in before.topological_order() if n not in a], rewritten,
                      summary(before), summary(after))


def random_feeds(g: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for n in g.input_names:
        t = g.node(n)["type"]
        feeds[n] = (rng.integers(0, 2, t.shape) if t.dtype == "int64"
                    else rng.standard_normal(t.shape)).astype(t.dtype)
    return feeds


def check_same(before: Graph, after: Graph, name: str, seed: int = 0, rtol: float = 1e-4, atol: float = 1e-5):
    """Debug mode: the reference interpreter must give the same outputs."""
    from ..reference import evaluate

    feeds = random_feeds(before, seed)
    want, got = evaluate(before, feeds), evaluate(after, feeds)
    for out, w in want.items():
        if out not in got:
            raise PassError(f"pass {name} removed output {out!r}")
        gv = got[out]
        if gv.shape != w.shape or not np.allclose(gv, w, rtol=rtol, atol=atol, equal_nan=True):
            err = float(np.max(np.abs(gv - w))) if gv.shape == w.shape else float("nan")
            raise PassError(f"pass {name} changed output {out!r} of graph '{before.name}': "
                            f"shape {w.shape} -> {gv.shape}, max abs difference {err:.3g}")


def run(g: Graph, names, debug: bool | None = None, reports: list | None = None) -> Graph:
    """Run passes (a pipeline name or list of pass names) on ``g``; returns the
    rewritten graph. ``debug`` (default: ``CONVC_DEBUG_PASSES=1``) runs the
    reference interpreter before and after every pass on random inputs and
    raises :class:`PassError` naming the pass and the first differing output.
    ``reports``: a list that receives one :class:`PassReport` per pass.
    ``CONVC_DEBUG=1`` prints each pass's declines (:func:`decline`) to
    stderr as ``<pass>: '<node>' <reason>``."""
    if debug is None:
        debug = os.environ.get("CONVC_DEBUG_PASSES", "") not in ("", "0")
    from .. import tuning
    from ..api import debug_level

    require_graph(g, "passes.run()").verify()
    loud = debug_level() >= 1
    for name in resolve(names):
        with tuning.notes() as notes, declines() as got:
            new = PASSES[name](g)
        new.verify()
        left = kept(g, new, got) if got and (loud or reports is not None) else []
        for n, why in left if loud else ():
            print(f"{name}: '{n}' {why}", file=sys.stderr)
        if debug:
            check_same(g, new, name)
        if reports is not None:
            reports.append(diff(g, new, name))
            reports[-1].notes = notes
            reports[-1].declines = left
        g = new
    return g


def report(g: Graph, names) -> tuple[Graph, list[PassReport]]:
    """Run passes and return (rewritten graph, one report per pass)."""
    reps: list[PassReport] = []
    return run(g, names, reports=reps), reps

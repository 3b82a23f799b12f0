"""The pass table, named pipelines, the pass manager and its reports.

A pass is a plain function ``Graph -> Graph`` registered under its name; it
returns a new graph and never changes its argument. Pipelines are explicit
lists of pass names, per target, readable top to bottom.
"""
from __future__ import annotations

import os
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

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.rewritten)

    def table(self) -> str:
        rows = [f"pass {self.name}: +{len(self.added)} nodes, -{len(self.removed)} nodes, "
                f"{len(self.rewritten)} rewritten"]
        rows.append(f"  {'':14}{'before':>14}{'after':>14}")
        for k in ("macs", "params", "bytes", "arena_bytes", "nodes"):
            rows.append(f"  {k:14}{self.before[k]:>14,}{self.after[k]:>14,}")
        rows += [f"  note: {t}" for t in self.notes]
        return "\n".join(rows)

    __str__ = table


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
    ``reports``: a list that receives one :class:`PassReport` per pass."""
    if debug is None:
        debug = os.environ.get("CONVC_DEBUG_PASSES", "") not in ("", "0")
    from .. import tuning

    require_graph(g, "passes.run()").verify()
    for name in resolve(names):
        with tuning.notes() as notes:
            new = PASSES[name](g)
        new.verify()
        if debug:
            check_same(g, new, name)
        if reports is not None:
            reports.append(diff(g, new, name))
            reports[-1].notes = notes
        g = new
    return g


def report(g: Graph, names) -> tuple[Graph, list[PassReport]]:
    """Run passes and return (rewritten graph, one report per pass)."""
    reps: list[PassReport] = []
    return run(g, names, reports=reps), reps

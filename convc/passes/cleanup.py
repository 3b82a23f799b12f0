"""Clean-up passes: dead code, common subexpressions, constant folding."""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np

from ..ir import Graph
from .manager import decline, register
from .rewrite import fresh, prune, replace_uses


@register
def eliminate_dead_code(g: Graph) -> Graph:
    """Remove nodes that no output or assignment needs (graph inputs stay):
    they would only cost memory and time."""
    return prune(g.copy())


@register
def eliminate_common_subexpressions(g: Graph) -> Graph:
    """Merge nodes that compute the same thing: same op, attributes and
    inputs (and constants with equal values), so it is computed once."""
    out = g.copy()
    seen: dict = {}
    for n in g.topological_order():
        d = out.node(n)
        if d["op"] == "input":
            continue
        if d["op"] == "param":
            if not d.get("const"):
                continue          # trainable params are distinct even when equal today
            v = d["value"]
            key = ("const", v.dtype.str, v.shape, v.tobytes())
        else:
            key = (d["op"], repr(d["attrs"]), tuple(out.inputs_of(n)))
        if key in seen:
            replace_uses(out, n, seen[key])
        else:
            seen[key] = n
    return prune(out)


@register
def fold_constants(g: Graph) -> Graph:
    """Evaluate, at compile time, every node whose inputs are all constants
    (``g.const`` values) and replace it by a constant: the work is done once.
    Trainable params are not constants, so weights stay settable."""
    from ..reference import values

    out = g.copy()
    for n in g.topological_order():
        d = out.node(n)
        if d["op"] in ("input", "param"):
            continue
        srcs = out.inputs_of(n)
        if not srcs or not all(out.node(s)["op"] == "param" for s in srcs):
            continue
        trainable = [s for s in srcs if not out.node(s).get("const")]
        if trainable:
            decline(n, f"reads trainable param '{trainable[0]}', which must stay settable")
        else:
            value = values(out, {}, nodes=[n])[n]
            c = out.const(np.asarray(value), d["type"].dtype)
            replace_uses(out, n, c.name)
    return prune(out)


FOLD_ALIASES = ("reshape", "flatten")
"""Param-only nodes left alone: a reshape is an alias of its input's buffer
(no code), and a folded copy would only cost params bytes."""


@dataclass(frozen=True)
class Folded:
    """How a folded constant was computed: ``node`` of ``graph`` (the
    original nodes it depended on) from the trainable params ``roots``. A
    module recomputes it when ``set_params`` changes a root."""
    graph: Graph
    node: str
    roots: tuple[str, ...]

    def recompute(self, root_values: dict) -> np.ndarray:
        from ..reference import values
        return values(self.graph, {}, params=root_values, nodes=[self.node])[self.node]


def _ancestry(g: Graph, n: str) -> Graph:
    """The part of ``g`` that ``n`` depends on (param values shared, not copied)."""
    sub = Graph(g.name)
    sub.nx = g.nx.subgraph(nx.ancestors(g.nx, n) | {n}).copy()
    return sub


@register
def fold_params(g: Graph) -> Graph:
    """Inference: every node whose inputs are all params (weights included),
    such as the Winograd kernel transform, a transposed weight matrix or a
    reshape-and-transpose of weights, is evaluated once at compile time and
    stored as a constant in the params blob instead of running on every call.
    The folded constant remembers how it was made (``folded``): a compiled
    module's ``set_params`` recomputes it (on the host) when one of its
    source params changes. Not in the ``train`` pipeline, whose weights
    change every step."""
    from ..reference import values

    out = g.copy()
    assigned = set(g.assigns)
    for n in g.topological_order():
        d = out.node(n)
        srcs = out.inputs_of(n)
        if d["op"] in ("input", "param") or not srcs or not all(out.node(s)["op"] == "param" for s in srcs):
            continue
        why = (f"{d['op']} of params: an alias of their buffer, a folded copy would only cost bytes"
               if d["op"] in FOLD_ALIASES else
               "a graph output" if n in out.outputs.values() else
               next((f"reads '{s}', which the graph assigns (a training update)" for s in srcs if s in assigned), None))
        if why:
            decline(n, why)
            continue
        value = values(out, {}, nodes=[n])[n]
        c = out.param(fresh(out, f"{n}.folded"), np.asarray(value), d["type"].dtype)
        out.nx.nodes[c.name]["const"] = True
        source = _ancestry(g, n)          # the original nodes, not the constants folded before
        roots = tuple(p for p in source.param_names if not source.node(p).get("const"))
        out.nx.nodes[c.name]["folded"] = Folded(source, n, roots)
        replace_uses(out, n, c.name)
    return prune(out)

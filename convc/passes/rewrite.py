"""The one small rewrite driver, and graph surgery helpers for passes.

A rule is ``rule(g, node) -> Value | None``: it may add nodes to ``g`` (a
private copy made by :func:`rewrite`) and returns the Value that replaces
``node``, or None to leave it alone. The driver redirects every use of the
node (consumers, outputs, assignments) to the replacement, then removes what
became dead.
"""
from __future__ import annotations

import networkx as nx

from ..ir import Graph, Value
from ..schedule import live_nodes


def only_user(g: Graph, n: str) -> str | None:
    """The single consumer of ``n`` if it has exactly one and is no output."""
    us = g.users_of(n)
    if len(us) != 1 or n in g.outputs.values() or n in g.assigns.values() or len(list(g.nx.out_edges(n))) != 1:
        return None
    return us[0]


def replace_uses(g: Graph, old: str, new: str) -> None:
    for _, dst, key, data in list(g.nx.out_edges(old, keys=True, data=True)):
        if dst == new:
            continue
        g.nx.remove_edge(old, dst, key)
        g.nx.add_edge(new, dst, key=key, slot=data["slot"])
    g.outputs = {o: (new if n == old else n) for o, n in g.outputs.items()}
    g.assigns = {p: (new if n == old else n) for p, n in g.assigns.items()}


def prune(g: Graph) -> Graph:
    """Remove nodes nothing needs (graph inputs and assigned params stay)."""
    keep = live_nodes(g) | set(g.input_names) | set(g.assigns)
    g.nx.remove_nodes_from([n for n in list(g.nx.nodes) if n not in keep])
    return g


def rewrite(g: Graph, rule) -> Graph:
    """Apply ``rule`` to every node of a copy of ``g`` in topological order."""
    out = g.copy()
    for n in g.topological_order():
        if n not in out.nx or out.node(n)["op"] in ("input", "param"):
            continue
        new = rule(out, n)
        if new is not None and new.name != n:
            if new.type != out.node(n)["type"]:
                raise RuntimeError(f"rewrite of %{n}: replacement %{new.name} is {new.type}, "
                                   f"expected {out.node(n)['type']}")
            replace_uses(out, n, new.name)
    if not nx.is_directed_acyclic_graph(out.nx):
        raise RuntimeError("rewrite produced a cycle")
    return prune(out)


def ins(g: Graph, n: str) -> list[Value]:
    return [Value(g, i) for i in g.inputs_of(n)]


def is_const(g: Graph, v: Value) -> bool:
    """A param whose value the pass may read (compile-time constant)."""
    return g.node(v.name)["op"] == "param"


def fresh(g: Graph, base: str) -> str:
    """``base``, or ``base_2``, ``base_3``... whichever is free in ``g``."""
    name, i = base, 1
    while name in g.nx:
        i += 1
        name = f"{base}_{i}"
    return name


def attrs(g: Graph, n: str) -> dict:
    return g.node(n)["attrs"]


def reactivate(g: Graph, n: str, y: Value) -> Value:
    """``y`` followed by the activation fused into conv ``n`` (if any), for
    rewrites that rebuild a conv from plain parts."""
    a = attrs(g, n)
    kind = a.get("activation")
    if not kind:
        return y
    extra = {"negative_slope": a["negative_slope"]} if kind == "leaky_relu" else {}
    return g.add(kind, [y], extra, fresh(g, f"{n}.{kind}"))

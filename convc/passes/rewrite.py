"""The one small rewrite driver, and graph surgery helpers for passes.

A rule is ``rule(g, node) -> Value | None``: it may add nodes to ``g`` (a
private copy made by :func:`rewrite`) and returns the Value that replaces
``node``, or None to leave it alone. The driver redirects every use of the
node (consumers, outputs, assignments) to the replacement, then removes what
became dead. Rules can be one function for every node or a dict from op name
to rule (dispatched by the node's op); the driver sweeps the graph until no
rule fires (a fixed point), so a rewrite may enable another.
"""
from __future__ import annotations

import networkx as nx

from ..ir import Graph, Value
from ..schedule import live_nodes


def shared(g: Graph, n: str) -> str | None:
    """Why ``n`` is not used once by a single consumer (it is a graph
    output, assigned to a param, or has several uses or none), or None: a
    reason a fusion gives when it leaves ``n`` alone."""
    if n in g.outputs.values():
        return f"'{n}' is a graph output"
    if n in g.assigns.values():
        return f"'{n}' is assigned to a param"
    uses = len(list(g.nx.out_edges(n)))
    if uses != 1:
        return f"'{n}' has {uses} uses"
    return None


def an(op: str) -> str:
    """``op`` with its indefinite article, for decline reasons: "an add", "a conv"."""
    return f"{'an' if op[:1] in 'aeiou' else 'a'} {op}"


def only_user(g: Graph, n: str) -> str | None:
    """The single consumer of ``n`` if it has exactly one and is no output."""
    return None if shared(g, n) else g.users_of(n)[0]


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


MAX_SWEEPS = 100
"""A guard against rules that keep firing on their own output."""


def rewrite(g: Graph, rules, fixed_point: bool = True) -> Graph:
    """Apply ``rules`` (one rule, or a dict op name -> rule) to the nodes of a
    copy of ``g`` in topological order, sweep after sweep until none fires
    (``fixed_point=False``: one sweep)."""
    dispatch = rules.get if isinstance(rules, dict) else (lambda op: rules)
    out = g.copy()
    for _ in range(MAX_SWEEPS):
        fired = False
        for n in out.topological_order():
            if n not in out.nx or out.node(n)["op"] in ("input", "param"):
                continue
            rule = dispatch(out.node(n)["op"])
            new = rule(out, n) if rule else None
            if new is not None and new.name != n:
                if new.type != out.node(n)["type"]:
                    raise RuntimeError(f"rewrite of %{n}: replacement %{new.name} is {new.type}, "
                                       f"expected {out.node(n)['type']}")
                replace_uses(out, n, new.name)
                fired = True
        if not nx.is_directed_acyclic_graph(out.nx):
            raise RuntimeError("rewrite produced a cycle")
        out = prune(out)
        if not fired or not fixed_point:
            return out
    raise RuntimeError(f"rewrite did not reach a fixed point in {MAX_SWEEPS} sweeps")


def ins(g: Graph, n: str) -> list[Value]:
    return [Value(g, i) for i in g.inputs_of(n)]


def operands(g: Graph, n: str) -> list[Value]:
    """The inputs of producer ``n`` without its epilogue's residual (see
    :func:`reactivate`, which adds that back)."""
    from ..ops import epilogue
    return epilogue.split(attrs(g, n), ins(g, n))[0]


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
    """``y`` followed by the epilogue of producer ``n`` (its residual add and
    activation, if any) as separate nodes, for rewrites that rebuild a
    producer from plain parts; fuse_epilogues fuses them again afterwards."""
    from ..ops import activations
    from ..ops.elementwise import add
    a = attrs(g, n)
    if a.get("residual"):
        y = add(y, ins(g, n)[-1], name=fresh(g, f"{n}.residual"))
    f = activations.fused(a)
    if f is None:
        return y
    act, params = f
    return g.add(act.name, [y], params, fresh(g, f"{n}.{act.name}"))

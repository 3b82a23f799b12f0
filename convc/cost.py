"""``cc.cost(graph)``: multiplications, parameters and bytes moved, per node
and in total."""
from __future__ import annotations

from dataclasses import dataclass, field

from .ir import Graph, require_graph
from .ops import get_op
from .schedule import live_nodes, plan


@dataclass
class NodeCost:
    node: str
    op: str
    macs: int           # multiplications (multiply-accumulates)
    params: int         # elements of param inputs read by this node
    bytes: int          # bytes read from inputs + bytes written


@dataclass
class CostReport:
    graph: str
    nodes: dict[str, NodeCost] = field(default_factory=dict)
    params: int = 0              # elements in all params of the graph
    arena_bytes: int = 0         # peak scratch memory after buffer reuse

    @property
    def macs(self) -> int:
        return sum(c.macs for c in self.nodes.values())

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.nodes.values())

    def table(self) -> str:
        rows = [("node", "op", "MACs", "params", "bytes")]
        rows += [(c.node, c.op, f"{c.macs:,}", f"{c.params:,}", f"{c.bytes:,}") for c in self.nodes.values()]
        rows.append(("total", "", f"{self.macs:,}", f"{self.params:,}", f"{self.bytes:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        fmt = lambda r: "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa
        lines = [fmt(r) for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(-1, "-" * len(lines[0]))
        lines.append(f"peak arena: {self.arena_bytes:,} bytes")
        return "\n".join(lines)

    __str__ = table


def cost(g: Graph) -> CostReport:
    """Cost of every live compute node of ``g``.

    >>> cc.cost(g).macs          # doctest: +SKIP
    """
    require_graph(g, "cost()").verify()
    live = live_nodes(g)
    rep = CostReport(g.name, params=sum(g.node(n)["type"].size for n in g.param_names if n in live),
                     arena_bytes=plan(g).arena_bytes)
    for n in g.topological_order():
        d = g.node(n)
        if n not in live or d["op"] in ("input", "param"):
            continue
        ins = g.inputs_of(n)
        types = [g.node(i)["type"] for i in ins]
        rep.nodes[n] = NodeCost(
            n, d["op"], get_op(d["op"]).macs(d["attrs"], types, d["type"]),
            sum(t.size for i, t in zip(ins, types) if g.node(i)["op"] == "param"),
            sum(t.nbytes for t in types) + d["type"].nbytes)
    return rep

"""Schedule (topological order) and memory plan.

Graph inputs and outputs live in caller buffers, params in one read-only blob,
every other node's result in one arena. Arena offsets are planned by
liveness: a buffer becomes free once its last reader has run. Buffers are
placed biggest first, each at the lowest offset that overlaps no buffer
alive at the same time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from .ir import Graph

ALIGN = 64
ALIAS_OPS = ("reshape", "flatten")      # ops that only rename their input's elements


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class Buffer:
    node: str
    nbytes: int
    start: int        # schedule step that writes it
    end: int          # last schedule step that reads it
    offset: int = -1


@dataclass
class Plan:
    order: list[str]                       # compute nodes in execution order
    storage: dict[str, tuple[str, object]]  # node -> ("input"|"output"|"param"|"arena", name/offset)
    arena_bytes: int
    params: dict[str, int]                 # param node -> byte offset in the param blob
    params_bytes: int
    buffers: list[Buffer] = field(default_factory=list)
    workspace: dict[str, int] = field(default_factory=dict)   # node -> arena offset of its scratch
    aliases: dict[str, str] = field(default_factory=dict)     # reshape node -> node whose buffer it names (no code)

    @property
    def intermediate_bytes(self) -> int:
        """What the arena would need without reuse (sum of all buffers)."""
        return sum(_align(b.nbytes) for b in self.buffers)


def live_nodes(g: Graph) -> set[str]:
    """Nodes some output depends on (everything else is dead code)."""
    keep = set()
    for n in list(g.outputs.values()) + list(g.assigns.values()):
        keep.add(n)
        keep |= nx.ancestors(g.nx, n)
    return keep


def plan(g: Graph, target: str = "c") -> Plan:
    """Schedule and memory plan of ``g``; ``target`` decides which ops need
    scratch (``Op.workspace``), which lives in the arena while its node runs."""
    from .ops import get_op

    keep = live_nodes(g)
    topo = [n for n in g.topological_order() if n in keep]
    order = [n for n in topo if g.node(n)["op"] not in ("input", "param")]
    # A reshape is the same elements in the same order: unless it is itself an
    # output, it becomes a second name for its input's buffer (an intermediate,
    # a graph input, a param or an output), with no code.
    final = set(g.outputs.values()) | set(g.assigns.values())
    aliases: dict[str, str] = {}
    for n in order:
        if g.node(n)["op"] in ALIAS_OPS and n not in final:
            src = g.inputs_of(n)[0]
            aliases[n] = aliases.get(src, src)
    order = [n for n in order if n not in aliases]
    views: dict[str, list[str]] = {}        # buffer -> its aliases, whose readers keep it alive
    for a, src in aliases.items():
        views.setdefault(src, []).append(a)
    step = {n: i for i, n in enumerate(order)}
    storage: dict[str, tuple[str, object]] = {}
    params, pbytes = {}, 0
    for n in topo:
        op = g.node(n)["op"]
        if op == "input":
            storage[n] = ("input", n)
        elif op == "param":
            params[n] = pbytes
            storage[n] = ("param", pbytes)
            pbytes += _align(g.node(n)["type"].nbytes)
    for out, n in g.outputs.items():
        if n not in storage:                # first output name that names a node owns it
            storage[n] = ("output", out)
    buffers = []
    for n in order:
        if n in storage:
            continue
        readers = [step[u] for v in [n, *views.get(n, ())] for u in g.nx.successors(v) if u in step]
        if n in g.assigns.values():          # copied into its param after the last node
            readers.append(len(order))
        buffers.append(Buffer(n, g.node(n)["type"].nbytes, step[n], max(readers, default=step[n])))
    scratch: dict[int, str] = {}          # id(Buffer) -> node whose workspace it is
    for n in order:
        d = g.node(n)
        t = d["type"]
        elems = get_op(d["op"]).workspace(d["attrs"], [g.node(i)["type"] for i in g.inputs_of(n)], t, target)
        if elems:
            b = Buffer(f"{n} workspace", elems * np.dtype(t.dtype).itemsize, step[n], step[n])
            scratch[id(b)] = n
            buffers.append(b)
    # Greedy by size: the biggest buffers are placed first, each at the lowest
    # offset that overlaps no placed buffer alive at the same time.
    arena = 0
    placed: list[Buffer] = []
    workspace: dict[str, int] = {}
    for b in sorted(buffers, key=lambda b: (-b.nbytes, b.start)):
        alive = sorted((p for p in placed if p.start <= b.end and b.start <= p.end), key=lambda p: p.offset)
        offset = 0
        for p in alive:
            if offset + b.nbytes <= p.offset:
                break
            offset = max(offset, _align(p.offset + p.nbytes))
        b.offset = offset
        placed.append(b)
        if id(b) in scratch:
            workspace[scratch[id(b)]] = offset
        else:
            storage[b.node] = ("arena", offset)
        arena = max(arena, _align(offset + b.nbytes))
    buffers.sort(key=lambda b: b.start)
    for a, src in aliases.items():
        storage[a] = storage[src]
    return Plan(order, storage, arena, params, pbytes, buffers, workspace, aliases)

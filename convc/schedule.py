"""Schedule (topological order) and memory plan.

Graph inputs and outputs live in caller buffers, params in one read-only blob,
every other node's result in one arena. Arena offsets are planned by
liveness: a buffer becomes free once its last reader has run. Buffers are
placed biggest first, each at the lowest offset that overlaps no buffer
alive at the same time.

Two kinds of node emit no code and own no buffer of their own: a reshape is
a second name for its input's buffer (``Plan.aliases``), and a concat whose
inputs can all be written straight into their slices of its output
(``Plan.joins``; the rule is ``concat_slices``) leaves its producers writing
there (``Plan.views``).

A node may also write over one of its inputs (``Plan.inplace``): the
memory passes (``passes/memory.py``) mark such a node with the node data
``INPLACE`` (the input slot), and the plan gives it that input's buffer
when nothing reads the input afterwards (the rule is ``inplace_sources``);
otherwise it gets a buffer of its own, as any node.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from . import shapes
from .errors import ConvcError, ValidationError
from .ir import Graph

ALIGN = 64
ALIAS_OPS = ("reshape", "flatten")      # ops that only rename their input's elements
INPLACE = "inplace"     # node data: the input slot whose buffer the node may write over (set by a pass)
TILE = "tile"           # node data: the tile of a patch-based stage a node computes (set by a pass)


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
    # A node written straight into its slice of a concat's output (or a
    # reshape of one) -> (host, byte offset): the host is the node that owns
    # the buffer (an arena buffer or a graph output's caller array). In the
    # arena the offset is already in ``storage`` (("arena", host's + offset));
    # in an output, ``storage`` is the host's ("output", name) and the view
    # starts ``offset`` bytes into the caller's array.
    views: dict[str, tuple[str, int]] = field(default_factory=dict)
    joins: list[str] = field(default_factory=list)            # concats that emit no code (all inputs are views)
    # A node that writes over its input's buffer -> that input (resolved through
    # reshapes); it is in ``views`` too, at offset 0 of the buffer's owner.
    inplace: dict[str, str] = field(default_factory=dict)

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


def schedule_order(g: Graph) -> list[str]:
    """The graph's topological order (ties broken by insertion order), but
    the nodes of a patch-based stage (node data ``TILE``: the tile's index,
    ``passes/memory.py``) run tile by tile: among the nodes ready to run,
    any other node first, then those of the lowest tile. So one tile's
    chain finishes before the next one's starts, whatever order later
    passes added its nodes in (an in-place or fused copy of a tile's node
    is added last)."""
    if not any(TILE in d for _, d in g.nx.nodes(data=True)):
        return g.topological_order()
    index = {n: i for i, n in enumerate(g.nx.nodes)}
    return list(nx.lexicographical_topological_sort(g.nx, key=lambda n: (g.node(n).get(TILE, -1), index[n])))


def concat_slices(g: Graph, order: list[str], aliases: dict[str, str], final: set[str]) -> dict[str, tuple[str, int]]:
    """The concats of ``order`` whose inputs are computed straight into their
    slices of the concat's output: {input node: (concat, byte offset of its
    slice)}. An input read through a reshape is placed as the reshape's
    source (``aliases``: same bytes, in the same order).

    A concat qualifies when every output axis before its axis has extent 1
    (batch 1 and a channel concat; or axis 0): each input's slice is then one
    contiguous block (with N > 1 the slices interleave: the concat stays a
    copy). And each input, as its reshape source ``r``:

    - is computed by a node of this graph (every op writes its whole output
      and nothing else): not a graph input or a param, whose memory is the
      caller's or the weight blob;
    - is not a graph output nor assigned to a param: those have their own
      buffer (a caller's array, or a copy made after the last node);
    - is not placed in another concat already (a node has one buffer: the
      first concat in schedule order takes it, a later one copies from it);
    - appears once among the concat's inputs (one buffer, one slice).

    ``r`` may be a concat placed itself (its producers' slices then nest in
    the outer concat's buffer). Other readers of ``r`` are no obstacle: no op
    writes in place, so nothing but ``r``'s node writes the bytes of its
    slice, and they read the same values there as from a buffer of its own;
    ``plan`` keeps the concat's buffer alive until the last reader of any of
    its slices. It is all or nothing: if one input does not qualify, the
    concat runs and copies every input, as before."""
    slices: dict[str, tuple[str, int]] = {}
    for c in order:
        d = g.node(c)
        if d["op"] != "concat":
            continue
        ax, out = d["attrs"]["axis"], d["type"]
        srcs = [aliases.get(i, i) for i in g.inputs_of(c)]
        if any(e != 1 for e in out.shape[:ax]) or len(set(srcs)) < len(srcs):
            continue
        if any(g.node(r)["op"] in ("input", "param") or r in final or r in slices for r in srcs):
            continue
        offset = 0
        for r in srcs:
            slices[r] = (c, offset)
            offset += g.node(r)["type"].nbytes
    return slices


def plan(g: Graph, target: str = "c") -> Plan:
    """Schedule and memory plan of ``g``; ``target`` decides which ops need
    scratch (``Op.workspace``), which lives in the arena while its node runs."""
    from .ops import get_op

    keep = live_nodes(g)
    topo = [n for n in schedule_order(g) if n in keep]
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
    slices = concat_slices(g, order, aliases, final)
    hosts = {c for c, _ in slices.values()}
    joins = [c for c in order if c in hosts]
    order = [n for n in order if n not in joins]

    def host(n: str) -> tuple[str, int]:        # the node owning n's buffer, and n's byte offset in it
        at = 0
        while n in slices:
            n, off = slices[n]
            at += off
        return n, at
    views = {n: host(n) for n in slices}
    names: dict[str, list[str]] = {}        # buffer -> its aliases, whose readers keep it alive
    for a, src in aliases.items():
        names.setdefault(src, []).append(a)
    step = {n: i for i, n in enumerate(order)}
    inplace = inplace_sources(g, order, step, aliases, names, views, final)
    for n, src in inplace.items():
        views[n] = (views[src][0] if src in views else src, 0)
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
    # A joined concat's buffer is written by its first producer and read up
    # to the last reader of the concat or of any slice (or a reshape of one).
    members: dict[str, list[str]] = {}
    for n in order + joins:
        members.setdefault(views.get(n, (n, 0))[0], []).append(n)
    buffers = []
    for n in order + joins:
        if n in storage or n in views:
            continue
        ms = members[n]
        readers = [step[u] for m in ms for v in [m, *names.get(m, ())] for u in g.nx.successors(v) if u in step]
        if n in g.assigns.values():          # copied into its param after the last node
            readers.append(len(order))
        start = min(step[m] for m in ms if m in step)
        nbytes = max(g.node(m)["type"].nbytes for m in ms)     # a node written in place may be the widest
        buffers.append(Buffer(n, nbytes, start, max(readers, default=start)))
    scratch: dict[int, str] = {}          # id(Buffer) -> node whose workspace it is
    for n in order:
        d = g.node(n)
        t = d["type"]
        elems = get_op(d["op"]).workspace(d["attrs"], [g.node(i)["type"] for i in g.inputs_of(n)], t, target)
        if elems > shapes.INDEX_MAX:          # the template indexes its scratch with int, like a tensor
            raise ValidationError(f"node '{n}' ({d['op']}): its scratch of {elems} elements is beyond "
                                  f"{shapes.INDEX_MAX} (2**31 - 1), the largest count the generated code "
                                  f"indexes with an int [output {t}]")
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
    for n, (h, at) in views.items():
        kind, where = storage[h]
        storage[n] = ("arena", where + at) if kind == "arena" else (kind, where)
    for a, src in aliases.items():
        storage[a] = storage[src]
        if src in views:
            views[a] = views[src]
    return Plan(order, storage, arena, params, pbytes, buffers, workspace, aliases, views, joins, inplace)


def inplace_sources(g: Graph, order: list[str], step: dict[str, int], aliases: dict[str, str],
                    names: dict[str, list[str]], views: dict[str, tuple[str, int]], final: set[str]) -> dict[str, str]:
    """The nodes of ``order`` marked ``INPLACE`` (node data: an input slot)
    that write over that input's buffer: {node: input}, the input resolved
    through reshapes (``aliases``). A marked node qualifies when

    - it is computed into the arena: not a graph output or assigned (those
      have buffers of their own), not a slice of a concat (``views``);
    - its input is computed into the arena too (not a graph input, param or
      output, whose memory is the caller's or the weights'), and is not a
      slice of a concat (writing there would change the concat's value);
      it may itself write over an earlier node's buffer (a chain);
    - nothing reads the buffer after it: every reader of every node that
      lived in that buffer (and of their reshapes) runs at its step or
      before, and it reads no other node of that buffer;
    - its output has the input's dtype.

    The buffer then holds the widest of its nodes (an in-place 1x1 conv may
    widen it). Marked nodes that do not qualify get a buffer of their own:
    the ops compute the same values either way."""
    owner: dict[str, str] = {}              # node written in place -> the node owning the buffer
    members: dict[str, list[str]] = {}      # buffer owner -> the nodes that lived in it, in order
    out: dict[str, str] = {}
    for n in order:
        slot = g.node(n).get(INPLACE)
        ins = g.inputs_of(n)
        if slot is None or not 0 <= slot < len(ins) or n in final or n in views:
            continue
        src = aliases.get(ins[slot], ins[slot])
        if src not in step or src in final or src in views:
            continue
        if g.node(src)["type"].dtype != g.node(n)["type"].dtype:
            continue
        host = owner.get(src, src)
        lived = members.get(host, [host])
        readers = [step[u] for m in lived for v in [m, *names.get(m, ())] for u in g.nx.successors(v) if u in step]
        others = {aliases.get(i, i) for i in ins} - {src}
        if max(readers) > step[n] or others & set(lived):
            continue
        out[n] = src
        owner[n] = host
        members[host] = lived + [n]
    return out


# -- the memory cap -------------------------------------------------------------
MEMORY_ENV = "CONVC_MAX_MEMORY"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text) -> int:
    """Bytes from an int or a string such as ``"512M"``, ``"8G"``, ``"1.5G"``
    or ``"4096"`` (K, M, G, T are powers of 1024; a trailing ``B``/``iB`` is
    allowed). A ValueError names what cannot be read."""
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        value = int(text)
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
        if not m:
            raise ValueError(f"{text!r} is not a size in bytes (an integer, optionally with K, M, G or T)")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value < 1:
        raise ValueError(f"{text!r}: a memory cap must be at least 1 byte")
    return value


def available_memory() -> int | None:
    """Bytes the system can give a new allocation without swapping:
    ``MemAvailable`` from /proc/meminfo (Linux), else free physical pages
    times the page size (``sysconf``), else total physical memory; None
    where none of these can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        try:
            n, size = os.sysconf(pages), os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            continue
        if n > 0 and size > 0:
            return n * size
    return None


def memory_cap(max_memory=None) -> tuple[int | None, str]:
    """The cap on what one compiled module may allocate, and where it comes
    from: ``max_memory`` (an int or a string like ``"8G"``) if given, else
    ``$CONVC_MAX_MEMORY``, else the memory available on this machine (None
    if unknown: no cap)."""
    for value, source in ((max_memory, "max_memory"), (os.environ.get(MEMORY_ENV), f"${MEMORY_ENV}")):
        if value is None or value == "":
            continue
        try:
            return parse_bytes(value), f"{source}={value}"
        except ValueError as e:
            raise ConvcError(f"{source}: {e}") from None
    avail = available_memory()
    return avail, "the memory available on this machine (MemAvailable)"


def memory_needed(g: Graph, p: Plan, target: str = "c") -> list[tuple[str, int]]:
    """What a module of ``g`` compiled with plan ``p`` allocates, as (what,
    bytes) pairs: the arena, the param blob, each graph input's and output's
    array. The numpy target keeps every node's result (no arena reuse); the
    OpenCL target holds the arena on the device and a device copy of the
    params, inputs and outputs beside the host's (on a CPU device such as
    PoCL, the same memory: counted twice)."""
    twice = 2 if target == "opencl" else 1
    both = ", host and device copies" if twice == 2 else ""
    arena = ("every node's result (the interpreter keeps them all)", p.intermediate_bytes) if target == "numpy" \
        else ("the arena (intermediate results)", p.arena_bytes)
    items = [arena, (f"the params blob (weights){both}", twice * p.params_bytes)]
    items += [(f"input '{n}' {g.node(n)['type']}{both}", twice * g.node(n)["type"].nbytes)
              for n in g.input_names if n in p.storage]
    items += [(f"output '{o}' {g.node(n)['type']}{both}", twice * g.node(n)["type"].nbytes)
              for o, n in g.outputs.items()]
    return items


def check_memory(g: Graph, p: Plan, target: str = "c", max_memory=None) -> None:
    """Refuse, before any code is generated or memory allocated, a module
    that needs more than the cap (``memory_cap``): a ValidationError naming
    the total, its largest parts (the biggest arena buffer by node) and the
    cap, and how to raise it."""
    big = max(p.buffers, key=lambda b: b.nbytes, default=None)
    biggest = (f"; the biggest arena buffer is node '{big.node.split(' ')[0]}' "
               f"({g.node(big.node.split(' ')[0])['op']}{', its scratch' if ' ' in big.node else ''}), "
               f"{big.nbytes:,} bytes" if big is not None else "")
    refuse_over_cap(f"graph '{g.name}' on the {target} target", memory_needed(g, p, target), max_memory, biggest)


def refuse_over_cap(subject: str, items: list[tuple[str, int]], max_memory=None, detail: str = "") -> None:
    """A ValidationError if the (what, bytes) ``items`` add up to more than
    the memory cap: it names ``subject``, the total, the four largest items,
    ``detail``, the cap and where it comes from, and how to raise it."""
    cap, source = memory_cap(max_memory)
    total = sum(b for _, b in items)
    if cap is None or total <= cap:
        return
    parts = "; ".join(f"{what}: {b:,} bytes" for what, b in sorted(items, key=lambda i: -i[1])[:4] if b)
    raise ValidationError(
        f"{subject} needs {total:,} bytes ({total / 2**30:.2f} GiB), more than the cap of {cap:,} bytes "
        f"({cap / 2**30:.2f} GiB) from {source}: {parts}{detail}. Shrink the shapes, or raise the cap with "
        f"{MEMORY_ENV}=BYTES (K/M/G suffixes allowed) or, for cc.compile, max_memory=BYTES")

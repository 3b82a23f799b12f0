"""Reverse-mode graph building: ``cc.grad`` adds gradient nodes to the same
graph, so gradients compile to C like everything else.

Walk the nodes between ``wrt`` and ``y`` in reverse topological order; each
op's ``grad`` rule (next to its definition in ``convc/ops``) turns dL/d(out)
into dL/d(inputs); contributions from several users are summed with ``add``.
A conv emits ``conv_grad_kernel`` (g, Eq 5) and ``conv_grad_input`` (h, Eq 6).
"""
from __future__ import annotations

import networkx as nx
import numpy as np

from .errors import GraphError
from .ir import Value
from .ops import get_op
from .ops.elementwise import add


def grad(y: Value, wrt, grad_output: Value | None = None):
    """Gradients of ``y`` with respect to each Value in ``wrt``.

    ``y`` must be a scalar (one element) unless ``grad_output`` (the book's
    G, a Value of y's shape) is given. Returns one Value per entry of ``wrt``
    (a list when ``wrt`` is a list, else a single Value); an entry that does
    not influence ``y`` gets zeros.

    >>> dw, dx = cc.grad(loss, [w, x])            # doctest: +SKIP
    """
    if not isinstance(y, Value):
        raise GraphError(f"grad: y must be a convc Value, got {type(y).__name__}")
    single = isinstance(wrt, Value)
    if not single and not isinstance(wrt, (list, tuple)):
        raise GraphError(f"grad: wrt must be a Value or a list of Values, got {type(wrt).__name__}")
    wrt = [wrt] if single else list(wrt)
    g = y.graph
    for w in wrt:
        if not isinstance(w, Value) or w.graph is not g or w.name not in g.nx:
            what = f"%{w.name} of graph '{w.graph.name}'" if isinstance(w, Value) else type(w).__name__
            raise GraphError(f"grad: wrt entry {what} is not a value of graph '{g.name}'")
        if w.dtype == "int64":
            raise GraphError(f"grad: %{w.name} is int64 and not differentiable")
    if grad_output is None:
        if y.type.size != 1:
            raise GraphError(f"grad: y %{y.name} has shape {y.shape}; pass grad_output (a Value of that shape) "
                             f"for a non-scalar y")
        seed = g.const(np.ones(y.shape), y.dtype)
    else:
        if not isinstance(grad_output, Value) or grad_output.graph is not g:
            raise GraphError("grad: grad_output must be a Value of the same graph")
        if grad_output.shape != y.shape or grad_output.dtype != y.dtype:
            raise GraphError(f"grad: grad_output {grad_output.type} must match y %{y.name} {y.type}")
        seed = grad_output

    # Only nodes on a path wrt -> y matter.
    upstream = nx.ancestors(g.nx, y.name) | {y.name}
    downstream = set()
    for w in wrt:
        downstream |= nx.descendants(g.nx, w.name) | {w.name}
    relevant = upstream & downstream

    pending: dict[str, list[Value]] = {y.name: [seed]}
    total: dict[str, Value] = {}
    for n in reversed(g.topological_order()):
        if n not in relevant or n not in pending:
            continue
        parts = pending.pop(n)
        acc = parts[0]
        for p in parts[1:]:
            acc = add(acc, p)
        total[n] = acc
        d = g.node(n)
        if d["op"] in ("input", "param"):
            continue
        ins = g.inputs_of(n)
        needs = [i in relevant for i in ins]
        if not any(needs):
            continue
        contributions = get_op(d["op"]).grad(d["attrs"], [Value(g, i) for i in ins], Value(g, n), acc, needs)
        for i, need, c in zip(ins, needs, contributions):
            if need and c is not None:
                if c.shape != g.node(i)["type"].shape:
                    raise GraphError(f"internal: gradient rule of {d['op']} gave {c.shape} for %{i} "
                                     f"{g.node(i)['type'].shape}")
                pending.setdefault(i, []).append(c)

    out = [total.get(w.name) or g.const(np.zeros(w.shape), w.dtype) for w in wrt]
    return out[0] if single else out

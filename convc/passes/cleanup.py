"""Clean-up passes: dead code, common subexpressions, constant folding."""
from __future__ import annotations

import numpy as np

from ..ir import Graph
from .manager import register
from .rewrite import prune, replace_uses


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
        if srcs and all(out.node(s)["op"] == "param" and out.node(s).get("const") for s in srcs):
            value = values(out, {}, nodes=[n])[n]
            c = out.const(np.asarray(value), d["type"].dtype)
            replace_uses(out, n, c.name)
    return prune(out)

"""The numpy reference interpreter: the meaning of every op, and the oracle
every target and pass is checked against."""
from __future__ import annotations

import numpy as np

from .ir import Graph
from .ops import get_op
from .schedule import live_nodes


def evaluate(g: Graph, feeds: dict[str, np.ndarray], keep_all: bool = False,
             params: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Run ``g`` on ``feeds`` (input name -> array); returns output name -> array
    (or node name -> array for every node when ``keep_all``). ``params``
    overrides param values by node name. Assignments (``g.assign``) are not
    applied here; see :func:`run_step`."""
    live = set(g.nx.nodes) if keep_all else live_nodes(g)
    values: dict[str, np.ndarray] = {}
    for n in g.topological_order():
        if n not in live:
            continue
        d = g.node(n)
        if d["op"] == "input":
            values[n] = np.asarray(feeds[n], dtype=d["type"].dtype)
        elif d["op"] == "param":
            values[n] = d["value"] if params is None or n not in params else params[n]
        else:
            args = [values[i] for i in g.inputs_of(n)]
            out = get_op(d["op"]).reference(d["attrs"], *args)
            values[n] = np.array(out, dtype=d["type"].dtype, order="C").reshape(d["type"].shape)
    if keep_all:
        return values
    return {o: values[n].copy() for o, n in g.outputs.items()}


def run_step(g: Graph, feeds, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One run with state: outputs from ``params``, then every ``g.assign``
    target in ``params`` takes its new value (what the C entry point does)."""
    values = evaluate(g, feeds, keep_all=True, params=params)
    for p, n in g.assigns.items():
        params[p] = values[n].copy()
    return {o: values[n].copy() for o, n in g.outputs.items()}

"""The numpy reference interpreter: the meaning of every op, and the oracle
every target and pass is checked against."""
from __future__ import annotations

import numpy as np

from .ir import Graph
from .ops import get_op
from .schedule import live_nodes


def evaluate(g: Graph, feeds: dict[str, np.ndarray], keep_all: bool = False) -> dict[str, np.ndarray]:
    """Run ``g`` on ``feeds`` (input name -> array); returns output name -> array
    (or node name -> array for every node when ``keep_all``)."""
    live = set(g.nx.nodes) if keep_all else live_nodes(g)
    values: dict[str, np.ndarray] = {}
    for n in g.topological_order():
        if n not in live:
            continue
        d = g.node(n)
        if d["op"] == "input":
            values[n] = np.asarray(feeds[n], dtype=d["type"].dtype)
        elif d["op"] == "param":
            values[n] = d["value"]
        else:
            args = [values[i] for i in g.inputs_of(n)]
            out = get_op(d["op"]).reference(d["attrs"], *args)
            values[n] = np.array(out, dtype=d["type"].dtype, order="C").reshape(d["type"].shape)
    if keep_all:
        return values
    return {o: values[n].copy() for o, n in g.outputs.items()}

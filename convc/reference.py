"""The numpy reference interpreter: the meaning of every op, and the oracle
every target and pass is checked against."""
from __future__ import annotations

import networkx as nx
import numpy as np

from .errors import InputError
from .ir import Graph
from .ops import get_op
from .schedule import live_nodes


def values(g: Graph, feeds: dict[str, np.ndarray], params: dict[str, np.ndarray] | None = None,
           nodes=None) -> dict[str, np.ndarray]:
    """Value of every node some output or assignment needs (or of ``nodes``
    and what they need). ``params`` overrides param values by node name."""
    need = live_nodes(g) if nodes is None else set(nodes).union(*(nx.ancestors(g.nx, n) for n in nodes))
    vals: dict[str, np.ndarray] = {}
    for n in g.topological_order():
        if n not in need:
            continue
        d = g.node(n)
        if d["op"] == "input":
            vals[n] = np.asarray(feeds[n], dtype=d["type"].dtype)
        elif d["op"] == "param":
            vals[n] = d["value"] if params is None or n not in params else params[n]
        else:
            args = [vals[i] for i in g.inputs_of(n)]
            try:
                # IEEE arithmetic is the meaning (NaN and inf propagate as in C and PyTorch), not a warning
                with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                    out = get_op(d["op"]).reference(d["attrs"], *args)
            except InputError as e:         # invalid input values (a label out of range): name the node
                raise node_input_error(g, n, str(e)) from None
            vals[n] = np.array(out, dtype=d["type"].dtype, order="C").reshape(d["type"].shape)
    return vals


def node_input_error(g: Graph, n: str, what: str) -> InputError:
    """The InputError for invalid input values that node ``n`` found."""
    d = g.node(n)
    shapes = ", ".join(f"{i} {g.node(i)['type']}" for i in g.inputs_of(n))
    return InputError(f"graph '{g.name}': node '{n}' ({d['op']}, inputs {shapes}): {what}")


def invalid_input(g: Graph, n: str, feeds: dict[str, np.ndarray], params: dict[str, np.ndarray] | None = None
                  ) -> InputError:
    """Why node ``n`` (an op with ``value_ranges``) rejected its input values
    in a compiled module's run on ``feeds``: the values its checked inputs
    had, computed here (only those inputs and what they need), and the op's
    rule. Called after generated code returned that node's status."""
    d = g.node(n)
    op = get_op(d["op"])
    ins = g.inputs_of(n)
    types = [g.node(i)["type"] for i in ins]
    checked = op.value_ranges(d["attrs"], types)
    vals = values(g, feeds, params, nodes=[ins[k] for k in checked])
    try:
        op.check_values(d["attrs"], types, {k: vals[ins[k]] for k in checked})
    except InputError as e:
        return node_input_error(g, n, str(e))
    ranges = ", ".join(f"{ins[k]} in [{lo}, {hi})" for k, (lo, hi) in checked.items())
    return node_input_error(g, n, f"the generated code found input values out of range ({ranges})")


def evaluate(g: Graph, feeds: dict[str, np.ndarray], params: dict[str, np.ndarray] | None = None
             ) -> dict[str, np.ndarray]:
    """Run ``g`` on ``feeds`` (input name -> array); returns output name ->
    array. Assignments (``g.assign``) are not applied; see :func:`run_step`."""
    vals = values(g, feeds, params)
    return {o: vals[n].copy() for o, n in g.outputs.items()}


def run_step(g: Graph, feeds, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One run with state: outputs from ``params``, then every ``g.assign``
    target in ``params`` takes its new value (what the C entry point does)."""
    vals = values(g, feeds, params)
    for p, n in g.assigns.items():
        params[p] = vals[n].copy()
    return {o: vals[n].copy() for o, n in g.outputs.items()}

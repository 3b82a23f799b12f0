"""``convc.compile``: graph -> runnable module for a target."""
from __future__ import annotations

import os

from .errors import ConvcError
from .ir import Graph

TARGETS = ("c", "numpy")


def compile(graph: Graph, target: str = "c", passes="default", native: bool = True,  # noqa: A001
            profile: bool | None = None, debug: bool | None = None):
    """Compile ``graph`` for ``target`` ("c" or "numpy") and return a Module.

    ``passes``: a pipeline name ("default", "train", "study", "none"; see
    ``cc.passes.PIPELINES``) or a list of pass names, applied first (the
    numpy target runs the graph as given: it is the oracle). ``debug``: check
    every pass against the reference interpreter (``CONVC_DEBUG_PASSES=1``).
    ``native``: tune for this machine (``-march=native``). ``profile``: time
    every node (``Module.profile()``); default from ``CONVC_PROFILE=1``.

    >>> mod = cc.compile(g, target="c")          # doctest: +SKIP
    >>> y = mod(x=np.zeros((1, 1, 28, 28), np.float32))   # doctest: +SKIP
    """
    from .runtime.module import CModule, NumpyModule

    if not isinstance(graph, Graph):
        raise ConvcError(f"compile() takes a convc.Graph, got {type(graph).__name__}")
    graph.verify()
    if target == "numpy":
        return NumpyModule(graph)
    if target == "c":
        from .codegen.c import generate
        from .passes import run as run_passes

        graph = run_passes(graph, passes, debug=debug)
        from .runtime.build import build

        if profile is None:
            profile = os.environ.get("CONVC_PROFILE", "") not in ("", "0")
        csrc = generate(graph, profile=profile)
        return CModule(graph, csrc, build(csrc.text, native=native))
    raise ConvcError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")

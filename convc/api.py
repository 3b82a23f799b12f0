"""``convc.compile``: graph -> runnable module for a target."""
from __future__ import annotations

import os
import sys
import time

from .errors import ConvcError
from .ir import Graph, require_graph

TARGETS = ("c", "opencl", "numpy")


def debug_level() -> int:
    """``CONVC_DEBUG``: 1 prints each pass's report and the nodes each pass
    left alone and why (``<pass>: '<node>' <reason>``), 2 also the final IR and
    where the generated source is cached, 3 also the compile timings."""
    try:
        return int(os.environ.get("CONVC_DEBUG", "0"))
    except ValueError:
        return 0


def compile(graph: Graph, target: str = "c", passes="default", native: bool = True,  # noqa: A001
            profile: bool | None = None, debug: bool | None = None, max_memory=None, quiet: bool = False):
    """Compile ``graph`` for ``target`` ("c", "opencl" or "numpy") and return a Module.

    ``passes``: a pipeline name ("default", "train", "study", "none"; see
    ``cc.passes.PIPELINES``) or a list of pass names, applied first (the
    numpy target runs the graph as given: it is the oracle). ``debug``: check
    every pass against the reference interpreter (``CONVC_DEBUG_PASSES=1``).
    ``native``: tune for this machine (``-march=native``). ``profile``: time
    every node (``Module.profile()``); default from ``CONVC_PROFILE=1``.
    ``max_memory``: the most bytes the module may allocate (arena, params,
    inputs, outputs; an int or a string like ``"8G"``); default
    ``$CONVC_MAX_MEMORY``, else the memory available on this machine. A graph
    that needs more is a ValidationError before any code is generated.
    ``quiet``: no progress line (one line on stderr, shown when a compile
    takes more than a second and stderr is a terminal; see
    ``convc.progress``).

    A graph compiled before (the same structure, param dtypes and shapes,
    pipeline, options, host and tuning database; see
    ``convc.runtime.module_cache``) skips the passes and code generation:
    its module is rebuilt from the cache with this graph's param values.

    >>> mod = cc.compile(g, target="c")          # doctest: +SKIP
    >>> y = mod(x=np.zeros((1, 1, 28, 28), np.float32))   # doctest: +SKIP
    """
    from .runtime.module import CModule, NumpyModule
    from .schedule import check_memory, plan as make_plan

    require_graph(graph, "compile()").verify()
    given = graph                       # what a pickled module carries, with these options (Module._remember)
    options = dict(passes=passes, native=native, profile=profile, debug=debug, max_memory=max_memory)
    if target == "numpy":
        check_memory(graph, make_plan(graph), "numpy", max_memory)     # the interpreter's arrays, roughly
        return NumpyModule(graph)._remember(given, options)
    if target not in TARGETS:
        raise ConvcError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")

    from .codegen.c import generate
    from .passes import resolve, run as run_passes
    from .progress import Progress
    from .runtime import module_cache
    from .runtime.build import build

    level, t0 = debug_level(), time.perf_counter()
    if profile is None:
        profile = os.environ.get("CONVC_PROFILE", "") not in ("", "0")
    cache_key = None
    checked = debug if debug is not None else os.environ.get("CONVC_DEBUG_PASSES", "") not in ("", "0")
    if target == "c" and not checked and level < 1:     # a debug run wants to see the passes run
        cache_key = module_cache.key(graph, target, resolve(passes), {**options, "profile": profile})
        mod = module_cache.load(cache_key, graph)
        if mod is not None:
            check_memory(mod.graph, mod.plan, "c", max_memory)
            if level >= 3:
                print(f"[convc] graph '{graph.name}': from the module cache in "
                      f"{1e3 * (time.perf_counter() - t0):.1f} ms", file=sys.stderr)
            return mod._remember(given, {**options, "profile": profile})
    with Progress(f"compile '{graph.name}'", quiet=quiet) as progress:
        progress.update("passes")
        reports: list | None = [] if level >= 1 else None      # reports cost a cost() per pass: only on request
        graph = run_passes(graph, passes, debug=debug, reports=reports)
        for rep in reports or ():
            print(f"[convc] {rep.table(declines=False)}", file=sys.stderr)      # passes.run printed the declines
            if level >= 2:
                print(graph if rep is reports[-1] else "", file=sys.stderr, end="")
        t1 = time.perf_counter()
        progress.update("code generation")
        if target == "opencl":
            from .codegen.opencl import generate as generate_opencl
            from .runtime.opencl import OpenCLModule, _check_toolchain

            if profile:
                raise ConvcError("profile=True is not available on the opencl target")
            _check_toolchain()
            plan = make_plan(graph, target="opencl")
            check_memory(graph, plan, "opencl", max_memory)
            src = generate_opencl(graph, plan)
            t2 = time.perf_counter()
            progress.update("C compiler")
            mod = OpenCLModule(graph, src, build(src.host, native=native, libs=("-lOpenCL",),
                                                 extra_files={"kernels.cl": src.kernels}, what="OpenCL host program",
                                                 progress=progress))
        else:
            plan = make_plan(graph)
            check_memory(graph, plan, "c", max_memory)
            csrc = generate(graph, plan, profile=profile)
            t2 = time.perf_counter()
            progress.update("C compiler" + (f", {len(csrc.units)} units" if len(csrc.units) > 1 else ""))
            lib = build(csrc.units, native=native, progress=progress)
            progress.update("loading")
            mod = CModule(graph, csrc, lib)
            if cache_key is not None:
                module_cache.store(cache_key, given, graph, csrc, lib)
    mod._remember(given, {**options, "profile": profile})
    if level >= 2:
        print(f"\n[convc] graph '{graph.name}': library {mod.library_path} "
              f"(source beside it: module.c)", file=sys.stderr)
    if level >= 3:
        print(f"[convc] passes {1e3 * (t1 - t0):.1f} ms, codegen {1e3 * (t2 - t1):.1f} ms, "
              f"build/load {1e3 * (time.perf_counter() - t2):.1f} ms", file=sys.stderr)
    return mod

"""How long ``cc.compile`` of a model takes, cold and from the caches, and
its peak memory: each measured in a fresh Python process (the bench rows of
issue 17, item 4)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, resource, sys, time
import convc as cc
from convc.runtime import cache, module_cache

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))

g = cc.from_onnx(sys.argv[1])
before = rss()
t = time.perf_counter()
cc.compile(g, quiet=True)
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
weights = sum(g.node(n)["value"].nbytes for n in g.param_names)
print(json.dumps(dict(seconds=seconds, peak_rss=peak, rss_before=before, weights=weights,
                      module_cache_hit=module_cache.STATS["hits"] > 0, compiler_runs=cache.STATS["compiles"])))
"""


def compile_timings(model: str, timeout: float = 1800) -> dict:
    """Compile the ONNX file ``model`` in a fresh process with an empty
    cache (cold: passes, code generation, the C compiler), then again in
    another fresh process on that cache (the pre-pass module cache). Returns
    ``{"cold": row, "cached": row}``, each row ``seconds`` (``cc.compile``
    alone, not the ONNX import), ``peak_rss`` and ``rss_before`` (bytes:
    the process's peak, and its size before ``cc.compile``), ``weights``
    (bytes), ``module_cache_hit`` and ``compiler_runs``. The temporary cache
    is removed afterwards.

    >>> rows = compile_timings("/tmp/vgg11.onnx")        # doctest: +SKIP
    >>> rows["cached"]["seconds"]                         # doctest: +SKIP
    """
    root = tempfile.mkdtemp(prefix="convc-compile-timing-")
    env = dict(os.environ, CONVC_CACHE_DIR=os.path.join(root, "cache"))
    env.pop("CONVC_DEBUG", None)
    try:
        rows = {}
        for kind in ("cold", "cached"):
            out = subprocess.run([sys.executable, "-c", _CHILD, str(model)], capture_output=True, text=True,
                                 env=env, timeout=timeout)
            if out.returncode != 0:
                raise RuntimeError(f"compiling {model} ({kind}) failed:\n{out.stderr[-4000:]}")
            rows[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)

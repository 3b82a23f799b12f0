"""Shared test helpers: run a graph on every target and compare arrays with
messages that say where and by how much two results differ."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np

import convc as cc

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def opencl_status() -> str | None:
    """None when an OpenCL device can run convc's kernels here, else why not
    (which names what to install)."""
    from convc.runtime.opencl import devices

    try:
        devices()
    except cc.ConvcError as e:
        return str(e)
    return None


OPENCL_REQUIRED = os.environ.get("CONVC_REQUIRE_OPENCL", "") not in ("", "0")


def __getattr__(name):
    """``OPENCL_MISSING`` (opencl_status()) and ``TARGETS``, the targets every
    op matrix runs on, computed on first use (probing OpenCL builds a small
    library; child processes that import helpers for other reasons skip it).
    Without an OpenCL device the opencl target drops out (tests/test_opencl.py
    says why, as a skip), unless CONVC_REQUIRE_OPENCL=1 keeps it so that every
    opencl case fails loudly."""
    if name == "OPENCL_MISSING":
        globals()[name] = opencl_status()
    elif name == "TARGETS":
        missing = __getattr__("OPENCL_MISSING")
        globals()[name] = ("numpy", "c") + (("opencl",) if missing is None or OPENCL_REQUIRED else ())
    else:
        raise AttributeError(f"module 'helpers' has no attribute {name!r}")
    return globals()[name]


def forcing_database(g, algorithm: str | None):
    """A tuning database whose entry for every tuned node of ``g`` (conv,
    g, h, conv_transpose) is ``algorithm`` ("direct", "gemm", "winograd",
    "winograd4", "blocked"): the tuner's own way to make the passes take a
    lowering whatever their size rules say. None for ``algorithm`` None
    (compile under ``tuning.using(None)``: the rules alone, never this
    host's database)."""
    from convc import tuning
    from convc.host import probe
    from convc.runtime.threads import get_num_threads

    if algorithm is None:
        return None
    entries = {tuning.entry_key(tuning.signature(g, n), get_num_threads()): {"algorithm": algorithm}
               for n in g.nx.nodes if g.node(n)["op"] in tuning.TUNED_OPS}
    return tuning.Database(probe(), None, entries)


def run_both(graph, feeds, native: bool = True):
    """Compile ``graph`` for target "numpy" and "c", run both on ``feeds``;
    returns ``(numpy_results, c_results)`` (dicts output name -> array)."""
    ref = cc.compile(graph, target="numpy").run(feeds)
    got = cc.compile(graph, target="c", native=native).run(feeds)
    return ref, got


def assert_close(actual, expected, rtol: float = 1e-4, atol: float = 1e-5, what: str = "result",
                 check_dtype: bool = False):
    """``np.allclose`` with a message naming ``what``, the shapes, the worst
    element (index, both values, abs and rel error) and how many are off.
    NaN matches NaN; ``check_dtype`` also requires equal dtypes."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (
        f"{what}: shape {actual.shape} != expected {expected.shape}")
    if check_dtype:
        assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != expected {expected.dtype}"
    if actual.size == 0:
        return
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    with np.errstate(invalid="ignore"):     # (inf - inf)
        err = np.abs(a - e)
    tol = atol + rtol * np.abs(e)
    both_nan = np.isnan(a) & np.isnan(e)
    bad = ~(err <= tol) & ~both_nan & ~(a == e)     # a NaN where a number is expected is bad; inf == inf is not
    if bad.any():
        excess = np.where(bad, np.where(np.isfinite(err), err - tol, np.inf), -np.inf)
        i = np.unravel_index(int(np.argmax(excess)), a.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.size} elements differ beyond rtol={rtol}, atol={atol}; "
            f"worst at index {tuple(int(v) for v in i)}: got {float(a[i])!r}, expected {float(e[i])!r}, "
            f"abs err {err[i]:.3g}, rel err {err[i] / max(abs(e[i]), 1e-300):.3g}; "
            f"max abs err {np.nanmax(err):.3g}, max |expected| {np.nanmax(np.abs(e)):.3g}")


def per_axis(v, rank):
    """An int (or per-axis sequence) as a tuple of ``rank`` entries."""
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * rank


def expected_pads(padding, sizes, kernel, stride, dilation):
    """Explicit ((lo, hi), ...) pairs by DESIGN.md's rules, written out
    independently of convc: an int, per-axis ints or pairs, "valid", "same"
    (output ceil(n / s), the odd element on the high side), "full"."""
    r = len(sizes)
    stride, dilation = per_axis(stride, r), per_axis(dilation, r)
    if padding == "valid":
        return ((0, 0),) * r
    if padding == "full":
        return tuple((d * (k - 1),) * 2 for k, d in zip(kernel, dilation))
    if padding == "same":
        pairs = []
        for n, k, s, d in zip(sizes, kernel, stride, dilation):
            total = max(0, (math.ceil(n / s) - 1) * s + d * (k - 1) + 1 - n)
            pairs.append((total // 2, total - total // 2))
        return tuple(pairs)
    if isinstance(padding, int):
        return ((padding, padding),) * r
    return tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)


def expected_out(sizes, kernel, stride, dilation, pads):
    """floor((n + lo + hi - d*(k - 1) - 1) / s) + 1 per axis."""
    r = len(sizes)
    return tuple((n + lo + hi - d * (k - 1) - 1) // s + 1 for n, k, s, d, (lo, hi) in
                 zip(sizes, kernel, per_axis(stride, r), per_axis(dilation, r), pads))


def subprocess_env(**extra) -> dict:
    """Environment for a child Python that must import convc from this checkout
    and see the same CONVC_* settings as the test process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update({k: str(v) for k, v in extra.items()})
    return env


PYTHON = sys.executable


def chain_graph(name: str, seed: int = 0, depth: int = 3, size: int = 12):
    """A small deterministic conv chain (2D, 4 channels, "same" padding) used by
    the cache tests, also from child processes. Returns (graph, feeds, weights)."""
    rng = np.random.default_rng(seed)
    g = cc.Graph(name)
    x = g.input("x", (2, 4, size, size))
    h = x
    weights = []
    for i in range(depth):
        w = (rng.standard_normal((4, 4, 3, 3)) / 6).astype(np.float32)
        b = rng.standard_normal(4).astype(np.float32)
        weights.append((w, b))
        h = cc.conv(h, g.param(f"w{i}", w), bias=g.param(f"b{i}", b), padding="same", name=f"conv{i}")
    g.output(h, "y")
    feeds = {"x": rng.standard_normal((2, 4, size, size)).astype(np.float32)}
    return g, feeds, weights


# A child process: build chain_graph(name, seed, depth), compile for C, save the
# output to OUT.npy and print the cache STATS and library path as JSON. With a
# BARRIER directory, wait until NPROCS children are ready before compiling.
CHILD = r"""
import json, os, sys, time
import numpy as np
import convc as cc
from convc.runtime import cache
from helpers import chain_graph
name, seed, depth, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
g, feeds, _ = chain_graph(name, seed, depth)
barrier = os.environ.get("BARRIER")
if barrier:
    open(os.path.join(barrier, str(os.getpid())), "w").close()
    deadline = time.time() + 60
    while len(os.listdir(barrier)) < int(os.environ["NPROCS"]) and time.time() < deadline:
        time.sleep(0.005)
mod = cc.compile(g, target="c")
np.save(out, mod.run(feeds)["y"])
print(json.dumps(dict(cache.STATS, library=str(mod.library_path))))
"""


def child_args(name: str, seed: int, depth: int, out) -> list:
    return [PYTHON, "-c", CHILD, name, str(seed), str(depth), str(out)]


def torch_activation(kind: str, params: dict | None = None):
    """The PyTorch twin of convc's activation ``kind`` (``convc.ops.activations.TABLE``)
    with ``params`` (normalised as convc does): one oracle for the activation
    tests and the NaN/inf tests. hardsigmoid is the clamp formula at convc's
    alpha and beta (torch's own F.hardsigmoid fixes alpha 1/6 and, in float64,
    differentiates with the float32 1/6)."""
    import torch
    import torch.nn.functional as F
    from convc.ops.activations import TABLE

    p = dict(TABLE[kind].normalize(params or {}))
    return {
        "relu": F.relu,
        "leaky_relu": lambda x: F.leaky_relu(x, p.get("negative_slope", 0.01)),
        "clip": lambda x: torch.clamp(torch.clamp(x, min=p["min"]), max=p["max"]),
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "silu": F.silu,
        "hardswish": F.hardswish,
        "hardsigmoid": lambda x: torch.clamp(p["alpha"] * x + p["beta"], 0, 1),
        "gelu": lambda x: F.gelu(x, approximate="none"),
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "elu": lambda x: F.elu(x, p["alpha"]),
        "selu": lambda x: p["gamma"] * F.elu(x, p["alpha"]),      # (torch.selu fixes its own constants)
        "softplus": F.softplus,
        "softsign": F.softsign,
        "thresholded_relu": lambda x: F.threshold(x, p["alpha"], 0.0),
        "mish": F.mish,
        "sqrt": torch.sqrt,
        "exp": torch.exp,
        "log": torch.log,
        "neg": torch.neg,
        "abs": torch.abs,
        "reciprocal": torch.reciprocal,
        "erf": torch.erf,
    }[kind]

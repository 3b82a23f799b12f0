"""Shared test helpers: run a graph on every target and compare arrays with
messages that say where and by how much two results differ."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

import convc as cc

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def run_both(graph, feeds, native: bool = True):
    """Compile ``graph`` for target "numpy" and "c", run both on ``feeds``;
    returns ``(numpy_results, c_results)`` (dicts output name -> array)."""
    ref = cc.compile(graph, target="numpy").run(feeds)
    got = cc.compile(graph, target="c", native=native).run(feeds)
    return ref, got


def assert_close(actual, expected, rtol: float = 1e-4, atol: float = 1e-5, what: str = "result"):
    """``np.allclose`` with a message naming ``what``, the shapes, the worst
    element (index, both values, abs and rel error) and how many are off."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (
        f"{what}: shape {actual.shape} != expected {expected.shape}")
    if actual.size == 0:
        return
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    err = np.abs(a - e)
    tol = atol + rtol * np.abs(e)
    both_nan = np.isnan(a) & np.isnan(e)
    bad = ~(err <= tol) & ~both_nan          # a NaN where a number is expected is bad
    if bad.any():
        excess = np.where(np.isfinite(err), err - tol, np.inf)
        i = np.unravel_index(int(np.argmax(excess)), a.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.size} elements differ beyond rtol={rtol}, atol={atol}; "
            f"worst at index {tuple(int(v) for v in i)}: got {a[i]!r}, expected {e[i]!r}, "
            f"abs err {err[i]:.3g}, rel err {err[i] / max(abs(e[i]), 1e-300):.3g}; "
            f"max abs err {np.nanmax(err):.3g}, max |expected| {np.abs(e).max():.3g}")


def subprocess_env(**extra) -> dict:
    """Environment for a child Python that must import convc from this checkout
    and see the same CONVC_* settings as the test process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update({k: str(v) for k, v in extra.items()})
    return env


PYTHON = sys.executable

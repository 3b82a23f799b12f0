"""Every lowering of the conv family against torch, driven by tests/opinfo.py.

For each lowering (direct, im2col, GEMM with im2col and 1x1, Winograd
F(2x2) and F(4x4), FFT, NCHWc, the study pipeline, the default pipeline
under its own size rules (cc.compile's default), transposed-to-matmul,
transposed-to-conv, fused separable; and direct, GEMM, Winograd and NCHWc
with a fused residual + activation epilogue) and each dtype, every config of every
op-info record that the lowering can take is one node of ONE graph, compiled
once with only that lowering's passes (and a tuning database that forces it,
never the host's). Each config is its own test item: it checks that the
compiled graph really computes the node that way (the node became the
im2col + matmul / winograd_conv / fft_conv ... ops), then compares the result
with the op's torch twin within the error bound of opinfo.tolerance. The
direct lowering, the default pipeline, the depthwise row kernel (a
depthwise conv with a clip fused in its attributes) and the Winograd
epilogue lowerings also run, where an OpenCL device exists, on the OpenCL
target, and on convc's numpy reference of the lowered graph.
Conv configs whose padding is written as a word ("same", "full", "valid") or
an int build their node that way (tests/test_conv.py checks the
normalisation against DESIGN.md's rules).

``CONVC_LONG_TESTS=1`` adds random configs (opinfo's long grids) and runs
every lowering on OpenCL too.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import convc as cc
import helpers
from opinfo import LOWERINGS, OPINFOS, Config, compile_lowered, tolerance

LONG = os.environ.get("CONVC_LONG_TESTS", "") not in ("", "0")
DTYPES = ("float32", "float64")

# The default run's budget (~90 s on a loaded 2-core machine; every node of a
# lowered graph is one more GEMM or Winograd kernel for gcc to compile): the
# direct lowering takes the whole grid (it is the numpy/OpenCL cross-check
# too), the others the first DEFAULT_CAP configs of each op that they can take
# (the grids in opinfo.py are ordered so those cover the axes), Winograd, whose
# kernels cost gcc the most, WINOGRAD_CAP. im2col (conv_to_gemm runs the same
# rewrite for every non-1x1 conv) and the study pipeline (also in
# test_passes.py) run with CONVC_LONG_TESTS=1 only.
DEFAULT_CAP, WINOGRAD_CAP = 5, 3
LONG_ONLY = ("im2col", "study")
# The direct lowering, the default pipeline (what cc.compile does unasked;
# it was tests/test_conv.py's grid, conv only) and the depthwise row kernel
# (tests/test_depthwise.py's grid) take the whole default grid; they and the
# Winograd epilogue lowerings (which take the whole Winograd record, the grid
# of tests/test_winograd*.py) also run on OpenCL and on convc's numpy
# reference of the lowered graph (the references of the ops a pass made).
FULL_GRID = ("direct", "default", "depthwise_rows")
OPENCL = FULL_GRID + ("winograd2_epilogue", "winograd4_epilogue")


def _cap(lowering: str):
    if LONG or lowering in FULL_GRID:
        return None
    return 0 if lowering in LONG_ONLY else WINOGRAD_CAP if lowering.startswith("winograd") else DEFAULT_CAP


def _cases() -> dict:
    """(lowering, dtype) -> [(op-info name, config, node tag)]."""
    out: dict = {}
    for info in OPINFOS.values():
        taken: dict = {}
        grid = info.grid(LONG)
        extra = [] if LONG else list(info.default_run)      # (in the long grid already)
        for i, cfg in enumerate(grid + extra):
            for dtype in DTYPES:
                lowerings = sorted(info.takes(cfg, dtype))
                if i >= len(grid):                          # a default-run extra: default pipeline, float32
                    lowerings = [lw for lw in lowerings if lw == "default" and dtype == "float32"]
                for lw in lowerings:
                    n = taken[lw, dtype] = taken.get((lw, dtype), 0) + 1
                    if info.uncapped or _cap(lw) is None or n <= _cap(lw):
                        out.setdefault((lw, dtype), []).append((info.name, cfg, f"{info.name}{i:03d}"))
    return out


CASES = _cases()
PARAMS = [pytest.param(lw, dtype, name, cfg, tag, id=f"{lw}-{dtype[-2:]}-{name}-{cfg.id}")
          for (lw, dtype), items in sorted(CASES.items()) for name, cfg, tag in items]

_BUILT: dict = {}


def _targets(lowering: str) -> tuple:
    cl = tuple(t for t in helpers.TARGETS if t == "opencl")
    return ("c",) + (cl if lowering in OPENCL or LONG else ())


def built(lowering: str, dtype: str) -> dict:
    """Build, compile and run the graph of (lowering, dtype) once per session:
    {"arrays": {tag: arrays}, "lowered": compiled graph, "errors": {tag: error
    convc raised building it}, target: {output name: array}}."""
    key = (lowering, dtype)
    if key in _BUILT:
        return _BUILT[key]
    g = cc.Graph(f"lowering_{lowering}_{dtype}")
    feeds, arrays, errors = {}, {}, {}
    for name, cfg, tag in CASES[key]:
        info = OPINFOS[name]
        a = arrays[tag] = info.arrays(cfg, dtype)
        try:
            g.output(info.build(g, cfg, tag, a, feeds), f"y_{tag}")
        except cc.ConvcError as e:          # a valid config convc rejects fails that config only
            errors[tag] = e
    res = dict(arrays=arrays, errors=errors)
    mods = {t: compile_lowered(g, LOWERINGS[lowering], target=t) for t in _targets(lowering)}
    res["lowered"] = mods["c"].graph
    for t, mod in mods.items():
        res[t] = mod.run(feeds)
    if lowering in OPENCL:          # the interpreter runs the lowered graph as given: the made ops' references
        res["numpy"] = cc.compile(res["lowered"], target="numpy").run(feeds)
    _BUILT[key] = res
    return res


def close(got: np.ndarray, want: np.ndarray, bound: np.ndarray, what: str):
    """|got - want| <= bound elementwise, with a message naming the worst element."""
    assert got.shape == want.shape, f"{what}: shape {got.shape} != expected {want.shape}"
    err = np.abs(got.astype(np.float64) - want)
    bad = ~(err <= bound)
    if bad.any():
        i = np.unravel_index(int(np.argmax(np.where(bad, err / bound, -np.inf))), got.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {got.size} elements beyond the bound; worst at {tuple(map(int, i))}: "
            f"got {float(got[i])!r}, expected {float(want[i])!r}, abs err {err[i]:.3g} > bound {bound[i]:.3g} "
            f"({err[i] / bound[i]:.3g}x); max |expected| {np.abs(want).max():.3g}")


# Cases whose lowering disagrees with torch for a cause not fixed here: {test id substring: reason}.
KNOWN = {}


@pytest.mark.parametrize("lowering, dtype, name, cfg, tag", PARAMS)
def test_lowering_matches_torch(lowering: str, dtype: str, name: str, cfg: Config, tag: str):
    res = built(lowering, dtype)
    info = OPINFOS[name]
    if tag in res["errors"]:
        raise AssertionError(f"convc rejected a valid {name} config {cfg}: {res['errors'][tag]}")
    why = LOWERINGS[lowering].check(res["lowered"], tag, info.op)
    assert why is None, f"{lowering} did not take {name} {cfg.id}: {why}"
    a = res["arrays"][tag]
    want = info.torch(cfg, a)
    bound = tolerance(LOWERINGS[lowering], dtype, info.reduction(cfg), info.magnitude(cfg, a), info.plane(cfg))
    for target in ("numpy", *_targets(lowering)):
        if target not in res:
            continue
        got = res[target][f"y_{tag}"]
        assert got.dtype == np.dtype(dtype), f"{target}: dtype {got.dtype}, expected {dtype}"
        close(got, want, bound, f"{name} {cfg.id} under {lowering} [{target}, {dtype}] vs torch")


def test_every_lowering_has_cases():
    """Each lowering runs a real grid in both dtypes, and the grids cover the
    axes of the conv family (so a lowering cannot pass by receiving nothing)."""
    for lw in LOWERINGS:
        if _cap(lw) == 0:
            continue
        for dtype in DTYPES:
            n = len(CASES.get((lw, dtype), []))
            assert n >= 3, f"lowering {lw} [{dtype}] takes only {n} configs of the grid"
    gemm = {name for name, _, _ in CASES[("gemm", "float32")]}
    assert gemm == {"conv", "g", "h"}, gemm
    conv = [c for c in OPINFOS["conv"].grid()]
    assert {c.rank for c in conv} == {1, 2, 3}
    assert any(c.n > 1 for c in conv)
    assert any(max(c.stride) > 1 for c in conv) and any(max(c.dilation) > 1 for c in conv)
    assert any(lo != hi for c in conv for lo, hi in c.padding)
    assert any(1 < c.groups < c.c_in for c in conv) and any(c.depthwise and c.c_out > c.c_in for c in conv)
    assert any(c.flip for c in conv) and {c.bias for c in conv} == {"none", "tied", "untied"}
    assert any(any(c.output_padding) for c in OPINFOS["transposed"].grid())
    # the Winograd grid has outputs that are not whole tiles, and one smaller than a tile
    wino = [c for _, c, _ in CASES[("winograd4", "float32")]]
    assert any(o % 4 for c in wino for o in c.conv_out) and any(max(c.conv_out) < 4 for c in wino)


def test_forcing_is_needed():
    """Without the forcing database, the default rules keep these small convs
    direct: the grids above would otherwise prove nothing about the GEMM and
    Winograd code (the review's finding behind issue 16)."""
    from convc import tuning

    info = OPINFOS["conv"]
    cfg = next(c for c in info.grid() if c.tag == "w3x3")
    g = cc.Graph("unforced")
    feeds: dict = {}
    g.output(info.build(g, cfg, "conv000", info.arrays(cfg, "float32"), feeds), "y")
    with tuning.using(None):
        lg = cc.passes.run(g, ["conv_to_winograd", "conv_to_gemm"])
    assert lg.node("conv000")["op"] == "conv"

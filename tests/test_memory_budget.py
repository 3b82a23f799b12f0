"""Memory budgets for the embedded export: the memory-saving passes
(convc/passes/memory.py) against the reference interpreter and through the
exported harness built with the strict flags, the plan's in-place aliasing,
the patch-based schedule at the image borders, and convc/budget.py's choice
under --ram / --flash."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

import convc as cc
from convc.budget import BudgetError, fit
from convc.cli import main as cli_main
from convc.export import export_c, live_bytes, size_report, toolchain
from convc.models import mobilenet_tiny
from convc.ops.memory import inplace_delay
from convc.passes import report, run as run_passes
from convc.passes.memory import patch_stage, stages
from convc.reference import evaluate
from convc.schedule import INPLACE, plan as make_plan

from helpers import TARGETS

STRICT = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic"]
SANITIZE = ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
TOLERANCE = 1e-5
MOBILENET_ARENA = 49_152           # mobilenet_tiny's arena with the embedded pipeline (README)


def harness(exp, sanitize: bool = False) -> float:
    """Build the export's harness with the strict flags (and ASan/UBSan),
    run it, and return its max error; it must print OK."""
    cc_ = shutil.which("gcc") or pytest.skip("gcc is not installed")
    srcs = [f.name for f in exp.files if f.suffix == ".c"]
    flags = SANITIZE if sanitize else ["-O2"]
    subprocess.run([cc_, *STRICT, *flags, "-o", "harness", *srcs, "-lm"], cwd=exp.dir, check=True,
                   capture_output=True, text=True, timeout=300)
    run = subprocess.run(["./harness"], cwd=exp.dir, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]
    assert "runtime error" not in run.stderr, run.stderr[-2000:]
    return float(re.search(r"^max_error (\S+)$", run.stdout, re.M).group(1))


def feeds(g, seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(g.node(n)["type"].shape).astype(g.node(n)["type"].dtype) for n in g.input_names}


def same_as_reference(before, after, targets=("numpy",)):
    """``after`` (rewritten) computes ``before``'s outputs on the given targets."""
    f = feeds(before)
    want = evaluate(before, f)
    for target in targets:
        got = evaluate(after, f) if target == "numpy" else cc.compile(after, target=target, passes="none").run(f)
        for k, w in want.items():
            np.testing.assert_allclose(got[k], w, rtol=TOLERANCE, atol=TOLERANCE, err_msg=f"{k} on {target}")


def arena(g, passes) -> int:
    return make_plan(run_passes(g, passes)).arena_bytes


# -- (a) in-place elementwise ----------------------------------------------------
def elementwise_net():
    rng = np.random.default_rng(1)
    g = cc.Graph("elementwise")
    x = g.input("x", (1, 4, 9, 7))
    h = cc.conv(x, rng.standard_normal((6, 4, 3, 3)) * 0.3, padding=1, name="c1")
    r = cc.relu(h, name="r1")
    s = cc.add(r, rng.standard_normal((6, 1, 1)), name="shift")            # broadcast: writes over r1
    t = cc.sigmoid(s, name="sig")
    u = cc.mul(t, h, name="gate")       # h is read here, long after c1: r1 may not write over it
    g.output(cc.tanh(u, name="th"), "y")
    return g


def test_inplace_elementwise_matches_reference_and_harness(tmp_path):
    g = elementwise_net()
    out, (rep,) = report(g, ["inplace_elementwise"])
    p = make_plan(out)
    assert {out.node(n).get(INPLACE) for n in ("shift", "sig")} == {0}
    assert p.inplace == {"shift": "r1", "sig": "shift", "gate": "sig"}
    # r1 reads c1, which 'gate' reads later; th is the output (the caller's buffer)
    assert "'gate' reads its input 'c1' later" in dict(rep.declines)["r1"]
    assert "graph output" in dict(rep.declines)["th"]
    assert p.arena_bytes < make_plan(g).arena_bytes
    same_as_reference(g, out)
    exp = export_c(g, tmp_path, name="ew", passes=["inplace_elementwise"])
    # the shared pointers lose restrict, the others keep it
    src = (tmp_path / "ew.c").read_text()
    assert re.search(r"static void node_sig\(const float \*x, float \*y\)", src), src[:3000]
    assert re.search(r"static void node_r1\(const float \*restrict x, float \*restrict y\)", src)
    assert exp.arena_bytes == p.arena_bytes and harness(exp, sanitize=True) <= TOLERANCE


# -- (b) in-place depthwise and pointwise ----------------------------------------
def conv_net(batch=1):
    """Depthwise convs of several geometries, each followed by a 1x1 conv:
    stride 1 'same' (a ring of 2 rows), stride 2, dilation 2, a padding that
    grows the plane a little less than the kernel shrinks it, a true
    convolution; 1x1 convs that widen (batch 1) and narrow."""
    rng = np.random.default_rng(2)
    g = cc.Graph("convs")
    x = g.input("x", (batch, 5, 12, 10))
    h = cc.conv(x, rng.standard_normal((8, 5, 1, 1)) * 0.4, rng.standard_normal(8) * 0.1, name="pw0")
    w = lambda c, k: rng.standard_normal((c, 1, k, k)) * 0.4      # noqa: E731
    h = cc.relu(cc.depthwise_conv(h, w(8, 3), rng.standard_normal(8) * 0.1, padding=1, name="dw1"))
    h = cc.conv(h, rng.standard_normal((12 if batch == 1 else 6, 8, 1, 1)) * 0.4, name="pw1")
    c = h.shape[1]
    h = cc.depthwise_conv(h, w(c, 3), stride=2, padding=((1, 0), (0, 1)), name="dw2")
    h = cc.depthwise_conv(h, w(c, 3), dilation=2, padding=2, name="dw3")
    h = cc.conv(h, w(c, 5), padding=((2, 1), (1, 2)), groups=c, flip=True, name="dw4")
    h = cc.conv(h, rng.standard_normal((4, c, 1, 1)) * 0.4, name="pw2")
    g.output(cc.global_avg_pool(h), "y")
    return g


@pytest.mark.parametrize("batch", [1, 2])
def test_inplace_convs_match_reference_and_harness(batch, tmp_path):
    g = run_passes(conv_net(batch), ["fuse_epilogues"])
    passes = ["inplace_depthwise", "inplace_pointwise"]
    out = run_passes(g, passes)
    p = make_plan(out)
    ops = {out.node(n)["op"] for n in p.inplace}
    assert ops == {"depthwise_inplace", "pointwise_inplace"}, p.inplace
    dws = [n for n in out.nx.nodes if out.node(n)["op"] == "depthwise_inplace"]
    assert len(dws) == 4 and all(n in p.inplace for n in dws)
    assert arena(g, passes) < make_plan(g).arena_bytes
    same_as_reference(g, out, TARGETS if batch == 1 else ("numpy",))     # the new ops render for OpenCL too
    exp = export_c(g, tmp_path, name="convs", passes=passes)
    assert harness(exp, sanitize=batch == 2) <= TOLERANCE


def test_inplace_pointwise_declines_a_wider_output_with_a_batch():
    rng = np.random.default_rng(3)
    g = cc.Graph("wide")
    x = g.input("x", (2, 3, 4, 4))
    h = cc.relu(cc.conv(x, rng.standard_normal((4, 3, 3, 3)), padding=1, name="c"))
    g.output(cc.global_avg_pool(cc.conv(h, rng.standard_normal((8, 4, 1, 1)), name="pw")), "y")
    out, reps = report(run_passes(g, ["fuse_epilogues"]), ["inplace_pointwise"])
    assert "C_out 8 must be <= C_in 4" in dict(reps[0].declines)["pw"]
    assert not any(out.node(n)["op"] == "pointwise_inplace" for n in out.nx.nodes)


def _clobbers(delay, hw, k, s, d, p) -> bool:
    """Run the in-place depthwise order on 3 planes of ``hw`` with output
    rows held back ``delay`` rows: does an output row read an input element
    already overwritten?"""
    oh, ow = ((n + 2 * p - d * (k - 1) - 1) // s + 1 for n in hw)
    plane = hw[0] * hw[1]
    gone = set()                            # (plane, input row) with an element overwritten
    for q in range(3):
        for r in range(oh):
            rows = {r * s - p + m * d for m in range(k)} & set(range(hw[0]))
            if {(q, i) for i in rows} & gone:
                return True
            if r >= delay:
                start = q * oh * ow + (r - delay) * ow
                gone |= {(e // plane, e % plane // hw[1]) for e in range(start, start + ow)}
    return False


def test_inplace_delay_is_the_rows_a_row_waits():
    """The ring's delay against a direct simulation of the order: no row
    reads an overwritten input element, and one row less would."""
    from convc.ir import TensorType
    for (hw, k, s, d, p) in [((8, 8), 3, 1, 1, 1), ((9, 7), 3, 2, 1, 1), ((10, 10), 3, 1, 2, 2),
                             ((7, 7), 3, 1, 1, 0), ((6, 9), 5, 1, 1, 2)]:
        oh, ow = ((n + 2 * p - d * (k - 1) - 1) // s + 1 for n in hw)
        attrs = dict(stride=(s, s), dilation=(d, d), padding=((p, p), (p, p)))
        delay = inplace_delay(attrs, TensorType((1, 3) + hw), TensorType((3, 1, k, k)), TensorType((1, 3, oh, ow)))
        assert not _clobbers(delay, hw, k, s, d, p), (hw, k, s, d, p, delay)
        assert delay == 0 or _clobbers(delay - 1, hw, k, s, d, p), (hw, k, s, d, p, delay)


# -- (d) patch-based -------------------------------------------------------------
def edge_net():
    """Odd sizes, a stride-2 conv with asymmetric padding, a dilated
    depthwise conv and a fused separable block: the halos at the borders
    and between tiles are all different."""
    rng = np.random.default_rng(4)
    g = cc.Graph("edges")
    x = g.input("x", (1, 3, 23, 19))
    h = cc.relu(cc.conv(x, rng.standard_normal((8, 3, 3, 3)) * 0.3, rng.standard_normal(8) * 0.1, stride=2,
                        padding=((1, 2), (0, 1)), name="stem"))
    h = cc.depthwise_conv(h, rng.standard_normal((8, 1, 3, 3)) * 0.3, dilation=2, padding=((2, 1), (1, 2)),
                          name="dw")
    h = cc.relu(cc.conv(h, rng.standard_normal((12, 8, 1, 1)) * 0.3, name="pw"))
    h = cc.relu(cc.depthwise_conv(h, rng.standard_normal((12, 1, 3, 3)) * 0.3, stride=2, padding=1, name="dw2"))
    h = cc.conv(h, rng.standard_normal((16, 12, 1, 1)) * 0.3, name="pw2")
    g.output(cc.global_avg_pool(h), "y")
    return g


@pytest.mark.parametrize("grid", [(2, 2), (3, 2), (4, 3)])
def test_patch_stage_matches_reference_at_borders(grid):
    g = run_passes(edge_net(), ["fuse_epilogues", "fuse_separable"])
    (chain,) = stages(g)
    assert [g.node(n)["op"] for n in chain] == ["conv", "fused_separable", "fused_separable"], chain
    out = patch_stage(g, chain, grid)
    tiles = [n for n in out.nx.nodes if out.node(n)["op"] == "paste"]
    assert len(tiles) == grid[0] * grid[1]
    # the first tile is padded only on its top/left, the last only on its bottom/right
    stem = [n for n in out.nx.nodes if n.startswith("stem.") and out.node(n)["op"] == "conv"]
    first, last = out.node(stem[0])["attrs"]["padding"], out.node(stem[-1])["attrs"]["padding"]
    assert first[0][0] == 1 and first[0][1] == 0 and last[0][0] == 0 and last[0][1] > 0, (first, last)
    same_as_reference(g, out)           # the C of crop, paste and the tiles: the harness test below


def test_crop_and_paste_on_every_target():
    """A small stage in 2 x 2 tiles, compiled: crop, paste (the first from
    zeros, the next in place) and the tiles' convs on C and OpenCL."""
    rng = np.random.default_rng(5)
    g = cc.Graph("small")
    x = g.input("x", (1, 2, 7, 6))
    h = cc.relu(cc.conv(x, rng.standard_normal((3, 2, 3, 3)), stride=(2, 1), padding=1, name="c"))
    g.output(cc.global_avg_pool(h), "y")
    g = run_passes(g, ["fuse_epilogues"])
    out = patch_stage(g, stages(g)[0], (2, 2))
    assert out is not None and make_plan(out).inplace       # pastes after the first write over the canvas
    same_as_reference(g, out, TARGETS)


def test_patch_edge_case_through_the_harness(tmp_path):
    g = edge_net()
    exp = export_c(g, tmp_path, name="edges", passes=["fuse_epilogues", "fuse_separable", "patch_first_stages",
                                                      "inplace_depthwise", "inplace_pointwise"])
    assert any(exp.graph.node(n)["op"] == "paste" for n in exp.graph.nx.nodes)
    assert harness(exp, sanitize=True) <= TOLERANCE


def test_patch_mobilenet_matches_reference_and_runs_tile_by_tile():
    g = run_passes(mobilenet_tiny(), ["fuse_epilogues"])
    (chain,) = stages(g)
    out = patch_stage(g, chain[:4], (4, 4))
    same_as_reference(g, out)
    order = make_plan(out).order
    tile_of = [int(m.group(1)) * 4 + int(m.group(2)) for n in order for m in [re.search(r"tile(\d)_(\d)", n)] if m]
    assert tile_of == sorted(tile_of), "the schedule interleaves tiles"


# -- the budget ------------------------------------------------------------------
def test_rewrites_arena_before_after(capsys):
    """The arena of mobilenet_tiny after each rewrite (printed: pytest -s)."""
    g = mobilenet_tiny()
    base = ["eliminate_dead_code", "fold_constants", "fuse_epilogues"]
    steps = [("embedded pipeline", "embedded"),
             ("+ inplace_elementwise", base + ["fuse_separable", "inplace_elementwise"]),
             ("+ inplace_depthwise", base + ["inplace_depthwise", "fuse_separable"]),
             ("+ inplace_depthwise, inplace_pointwise", base + ["inplace_depthwise", "inplace_pointwise"]),
             ("memory pipeline (+ patch_first_stages)", "memory")]
    sizes = [(label, arena(g, p)) for label, p in steps]
    with capsys.disabled():
        print("\nmobilenet_tiny arena per rewrite:\n" + "\n".join(f"  {lab:42} {a:>7,} bytes" for lab, a in sizes))
    got = dict(sizes)
    assert got["embedded pipeline"] == MOBILENET_ARENA == got["+ inplace_elementwise"]   # nothing left unfused
    assert got["+ inplace_depthwise, inplace_pointwise"] < MOBILENET_ARENA
    assert got["memory pipeline (+ patch_first_stages)"] <= MOBILENET_ARENA // 2


def test_budget_the_default_misses_is_met(tmp_path, capsys):
    g = mobilenet_tiny()
    budget = MOBILENET_ARENA // 2
    assert cli_main(["export", "mobilenet_tiny", "--ram", str(budget)]) == 0       # the choice, nothing written
    printed = capsys.readouterr().out
    assert "<- chosen" in printed and "patch-based" in printed, printed
    m = re.search(r"arena (\d[\d,]*) bytes \(was 49,152\)", printed)
    assert m and int(m.group(1).replace(",", "")) <= budget, printed
    exp = export_c(g, tmp_path / "api", name="mnet", ram="24K")
    assert exp.budget.base.arena == MOBILENET_ARENA and exp.arena_bytes <= budget
    assert exp.budget.chosen.macs > exp.budget.base.macs        # the halos cost multiplications
    # what fits without recomputing anything takes nothing of the kind: in place only
    assert fit(g, ram=36 * 1024).chosen.label == "in place"
    assert fit(g, ram=MOBILENET_ARENA).chosen.label.startswith("the embedded")
    assert harness(exp) <= TOLERANCE


def test_impossible_budgets_fail_clearly():
    g = mobilenet_tiny()
    with pytest.raises(BudgetError) as e:
        fit(g, ram=8000)
    msg = str(e.value)
    assert "no plan fits the RAM budget of 8,000 bytes" in msg and "schedule step" in msg
    best = re.search(r"smallest arena reached is ([\d,]+) bytes", msg)
    assert best and int(best.group(1).replace(",", "")) <= MOBILENET_ARENA // 2
    assert re.search(r"node '[^']+' \(\w+, output float32\[", msg), msg
    with pytest.raises(BudgetError, match=r"weights alone are 74,536 bytes"):
        fit(g, flash=10_000)
    with pytest.raises(BudgetError, match="not a size"):
        fit(g, ram="lots")


def test_flash_budget_is_measured_and_the_size_table_marks_the_peak():
    g = elementwise_net()
    tools = toolchain()
    choice = fit(g, ram=make_plan(run_passes(g, "embedded")).arena_bytes, flash=200_000, tools=tools)
    assert choice.chosen.flash is not None and choice.chosen.flash <= 200_000
    rep = size_report(choice.graph, name="ew", tools=tools, passes="none")
    assert rep.flash == choice.chosen.flash
    live = live_bytes(make_plan(choice.graph))
    peak = max(range(len(live)), key=live.__getitem__)
    table = rep.table()
    row = next(line for line in table.splitlines() if line.startswith(rep.rows[peak].node + " "))
    assert f"{live[peak]:,} *" in row and f"step {peak} of the schedule" in table, table


@pytest.mark.skipif(os.environ.get("CONVC_LONG_TESTS") != "1", reason="a QEMU run (CONVC_LONG_TESTS=1)")
def test_budget_export_runs_on_the_emulated_cortex_m4(tmp_path):
    """The 24 KiB plan's harness on QEMU's MPS2 AN386 (convc/qemu.py)."""
    from convc import qemu
    missing = qemu.missing_tools()
    if missing:
        if os.environ.get("CONVC_REQUIRE_QEMU") == "1":
            pytest.fail(f"CONVC_REQUIRE_QEMU=1 but {', '.join(missing)} missing")
        pytest.skip(f"{', '.join(missing)} missing")
    exp = export_c(mobilenet_tiny(), tmp_path, name="mnet", ram="24K")
    run = qemu.run(exp.dir, "mnet", timeout=300)
    assert run.output.strip().splitlines()[-1] == "OK" and run.instructions("mnet_run")

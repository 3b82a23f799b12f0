"""``convc passes MODEL``: the IR and the cost table after every pass,
Graphviz files per step with the rewritten nodes highlighted, models from
Python files, and clear errors (exit status, no traceback).

Every command runs as ``python -m convc`` in a child process with a private
CONVC_CACHE_DIR; the expected text comes from running the same passes in
this process.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import textwrap

import pytest

import convc as cc
from convc.models import lenet5
from convc.passes import PIPELINES
from helpers import PYTHON, subprocess_env

STUDY = PIPELINES["study"]


def convc_cli(tmp_path, *args, timeout=120):
    env = subprocess_env(CONVC_CACHE_DIR=tmp_path / "cache")
    env.pop("CONVC_DEBUG_PASSES", None)
    return subprocess.run([PYTHON, "-m", "convc", "passes", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=timeout)


def steps(stdout: str) -> list[tuple[str, str]]:
    """[(header, body)] for every '== NN ... ==' block."""
    parts = re.split(r"^(== \d\d .* ==)$", stdout, flags=re.M)
    return [(parts[i], parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


def ir_of(body: str) -> str:
    """The printed graph at the start of a step's body."""
    m = re.search(r"^graph \w+ \{$.*?^\}$", body, flags=re.M | re.S)
    assert m, f"no IR in:\n{body}"
    return m.group(0)


def table_row(body: str, key: str) -> tuple[int, int]:
    m = re.search(rf"^\s+{key}\s+([\d,]+)\s+([\d,]+)$", body, flags=re.M)
    assert m, f"no {key} row in:\n{body}"
    return int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))


def test_study_pipeline_prints_ir_and_cost_after_every_pass(tmp_path):
    r = convc_cli(tmp_path, "lenet5", "--pipeline", "study")
    assert r.returncode == 0, r.stderr
    got = steps(r.stdout)
    assert [h for h, _ in got] == ["== 00 input graph =="] + [f"== {i:02d} after {n} ==" for i, n in
                                                             enumerate(STUDY, 1)]
    g = lenet5()
    graphs = [g]
    for name in STUDY:
        graphs.append(cc.passes.run(graphs[-1], [name]))
    for i, ((header, body), graph) in enumerate(zip(got, graphs)):
        assert ir_of(body) == str(graph), f"step {header}: printed IR differs"
        if i == 0:
            assert "pass " not in body, "the input step has no cost table"
            continue
        name = STUDY[i - 1]
        assert re.search(rf"^pass {name}: \+\d+ nodes, -\d+ nodes, \d+ rewritten$", body, flags=re.M), body
        for key, attr in (("macs", "macs"), ("params", "params"), ("bytes", "bytes")):
            before, after = table_row(body, key)
            assert before == getattr(cc.cost(graphs[i - 1]), attr), f"{header}: {key} before"
            assert after == getattr(cc.cost(graph), attr), f"{header}: {key} after"
    # LeNet has no strided/transposed/grouped/dilated/tiled/local convs: those steps
    # change nothing; conv_to_im2col rewrites both convs
    for header, body in got[1:7]:
        assert "added:" not in body, header
    im2col = dict(got)[f"== {STUDY.index('conv_to_im2col') + 1:02d} after conv_to_im2col =="]
    assert re.search(r"^  added: .*conv1\.im2col.*conv2\.im2col", im2col, flags=re.M)
    assert re.search(r"^  removed: conv1, conv2$", im2col, flags=re.M)
    assert "im2col(" in im2col and "im2col(" not in got[0][1]
    assert r.stderr == ""


def test_passes_option_overrides_the_pipeline(tmp_path):
    r = convc_cli(tmp_path, "lenet5", "--pipeline", "study", "--passes",
                  "fuse_epilogues,eliminate_dead_code")
    assert r.returncode == 0, r.stderr
    got = steps(r.stdout)
    assert [h for h, _ in got] == ["== 00 input graph ==", "== 01 after fuse_epilogues ==",
                                   "== 02 after eliminate_dead_code =="]
    assert ") then relu :" in ir_of(got[1][1]) and ") then relu :" not in ir_of(got[0][1])


def test_default_pipeline_is_the_default(tmp_path):
    r = convc_cli(tmp_path, "mobilenet_tiny")
    assert r.returncode == 0, r.stderr
    got = steps(r.stdout)
    assert [h.split(" after ")[-1].rstrip(" =") for h, _ in got[1:]] == PIPELINES["default"]
    final = ir_of(got[-1][1])
    assert "conv_nchwc(%x," in final, "the stem reads the image in the NCHWc kernel"
    assert "matmul(" in final and "im2col(" not in final, "the pointwise convs are GEMMs, with no im2col"
    assert " conv(" in final, "the depthwise convs stay direct"


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz `dot` is not installed")
def test_dot_files_per_step_with_highlighted_rewrites(tmp_path):
    out = tmp_path / "dot"
    r = convc_cli(tmp_path, "lenet5", "--pipeline", "study", "--dot", out)
    assert r.returncode == 0, r.stderr
    stems = ["00_input"] + [f"{i:02d}_{n}" for i, n in enumerate(STUDY, 1)]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}.{ext}" for s in stems for ext in ("dot", "svg", "png"))
    for s in stems:
        assert (out / f"{s}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "<svg" in (out / f"{s}.svg").read_text()
        assert (out / f"{s}.dot").read_text().startswith('digraph "lenet5"')
    assert f"wrote {len(stems)} steps" in r.stdout

    def node_line(dot_text, node):
        (line,) = [ln for ln in dot_text.splitlines() if ln.strip().startswith(f'"{node}" [')]
        return line

    assert "fillcolor" not in (out / "00_input.dot").read_text()
    assert "fillcolor" not in (out / "01_strided_to_downsampled.dot").read_text(), "nothing rewritten"
    i = STUDY.index("conv_to_im2col") + 1
    dot = (out / f"{i:02d}_conv_to_im2col.dot").read_text()
    for added in ("conv1.im2col", "conv1.gemm", "conv2.im2col"):
        assert "fillcolor" in node_line(dot, added), added
    assert "fillcolor" in node_line(dot, "relu_1"), "a rewritten node (new input) is highlighted too"
    for kept in ("x", "pool1", "fc1", "conv1_w"):
        assert "fillcolor" not in node_line(dot, kept), kept
    assert "conv1.im2col" in (out / f"{i:02d}_conv_to_im2col.svg").read_text()


MODEL = """
import numpy as np
import convc as cc


def build():
    rng = np.random.default_rng(0)
    g = cc.Graph("user_model")
    x = g.input("x", (1, 2, 9, 9))
    y = cc.conv(x, g.param("w", rng.standard_normal((3, 2, 3, 3)), "float32"), stride=2, padding=1, name="c")
    g.output(cc.relu(y, name="act"), "y")
    return g
"""


def test_model_from_python_file(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(MODEL)
    r = convc_cli(tmp_path, path, "--passes", "strided_to_downsampled,fuse_downsample", "--debug")
    assert r.returncode == 0, r.stderr
    got = steps(r.stdout)
    ns: dict = {}
    exec(MODEL, ns)
    g = ns["build"]()
    g1 = cc.passes.run(g, ["strided_to_downsampled"])
    assert [ir_of(b) for _, b in got] == [str(g), str(g1), str(cc.passes.run(g1, ["fuse_downsample"]))]
    assert "c.downsample = downsample(" in got[1][1]
    assert table_row(got[1][1], "macs") == (3 * 5 * 5 * 18, 3 * 9 * 9 * 18)
    assert table_row(got[2][1], "macs") == (3 * 9 * 9 * 18, 3 * 5 * 5 * 18)
    # a module-level `graph` works too
    path2 = tmp_path / "model_graph.py"
    path2.write_text(MODEL + "\ngraph = build()\ndel build\n")
    r = convc_cli(tmp_path, path2, "--passes", "conv_to_im2col")
    assert r.returncode == 0, r.stderr
    assert "c.im2col = im2col(" in r.stdout


def test_debug_flag_catches_a_broken_pass(tmp_path):
    """A model file may register a pass; --debug checks it against the reference."""
    path = tmp_path / "broken.py"
    path.write_text(MODEL + textwrap.dedent("""
        @cc.passes.register
        def break_weights(g):
            out = g.copy()
            out.node("w")["value"] = out.node("w")["value"] * 2
            return out
    """))
    r = convc_cli(tmp_path, path, "--passes", "break_weights", "--debug")
    assert r.returncode != 0
    assert "break_weights" in r.stderr and "'y'" in r.stderr
    assert "Traceback" not in r.stderr
    r = convc_cli(tmp_path, path, "--passes", "break_weights")
    assert r.returncode == 0, "without --debug nothing checks the pass"


@pytest.mark.parametrize("args, words", [
    (["lenet5", "--passes", "conv_to_im2col,no_such_pass"], ["unknown pass", "no_such_pass", "conv_to_im2col"]),
    (["lenet5", "--pipeline", "no_such_pipeline"], ["unknown pipeline", "no_such_pipeline", "study"]),
    (["no_such_model"], ["no_such_model", "lenet5"]),
    (["missing.py"], ["missing.py", "no such file"]),
])
def test_errors_exit_nonzero_with_a_clear_message(tmp_path, args, words):
    r = convc_cli(tmp_path, *args)
    assert r.returncode != 0
    assert r.stderr.startswith("convc: error:"), r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)
    assert "Traceback" not in r.stderr
    assert "== 01" not in r.stdout


def test_broken_model_file_is_reported(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("import convc as cc\n\ndef build():\n    return 42\n")
    r = convc_cli(tmp_path, path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "build()" in r.stderr and "Graph" in r.stderr
    path.write_text("def build(:\n")
    r = convc_cli(tmp_path, path)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "SyntaxError" in r.stderr


def test_compare_shows_nchw_and_nchwc_side_by_side(tmp_path):
    from convc.models import mobilenet_tiny
    from convc.passes import run

    r = convc_cli(tmp_path, "mobilenet_tiny", "--compare", "default,blocked")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["pipeline", "default", "blocked"]
    def count(pipeline, *names):
        out = run(mobilenet_tiny(), pipeline)
        return sum(out.node(n)["op"] in names for n in out.topological_order())
    row = next(x for x in lines if x.strip().startswith("conv_nchwc"))
    want = [count("default", "conv_nchwc"), count("blocked", "conv_nchwc")]
    assert row.split()[1:] == [str(v) for v in want] and want[1] > want[0] >= 1    # the stem, then every conv
    reorders = next(x for x in lines if x.startswith("layout reorders")).split()[2:]
    assert reorders == [str(count(p, "to_blocked", "from_blocked")) for p in ("default", "blocked")]
    header = next(i for i, x in enumerate(lines) if x.split()[:2] == ["default", "blocked"])
    assert lines[header + 1].count("conv_nchwc -> float32[1,1,16,16,16]") == 2       # the stem, in both


def test_compare_with_an_unknown_pipeline_is_a_clear_error(tmp_path):
    r = convc_cli(tmp_path, "lenet5", "--compare", "default,nonesuch")
    assert r.returncode == 2 and "unknown pipeline or pass 'nonesuch'" in r.stderr and "Traceback" not in r.stderr

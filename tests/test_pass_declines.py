"""Decline reasons: every pass says, for each node of the kinds it handles
that it left alone, why (``passes.decline``), with the numbers that decided.

For each pass, a small graph on which it must decline; the reasons reach
``PassReport.declines``, the report table, ``convc passes`` and
``CONVC_DEBUG=1``, and recording them changes no pass's output graph.
Passes run under ``tuning.using(None)`` (the rules alone) unless a test
installs a database that forces a choice.
"""
from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest

import convc as cc
from convc import tuning
from convc.models import lenet5
from convc.ops.blocked import block_size
from convc.passes import PASSES
from convc.passes.manager import decline, declines
from helpers import PYTHON, forcing_database, subprocess_env

INT8_MODULES = ("convc.passes.quantize", "convc.passes.qgemm", "convc.passes.qdq")
"""Issue 15's passes, outside this file's scope (their authors add their own)."""

NEVER_DECLINE = {"eliminate_dead_code", "eliminate_common_subexpressions", "conv_to_im2col", "local_to_matmul",
                 "transposed_to_conv"}
"""Passes that rewrite every node they handle (or only clean up): nothing to decline."""


def rng():
    return np.random.default_rng(18)


def left(g, names, which: str | None = None, db=None) -> dict[str, str]:
    """Run ``names`` on ``g``; the declines of pass ``which`` (default: the last) as node -> reason."""
    names = [names] if isinstance(names, str) else names
    with tuning.using(db):
        _, reps = cc.passes.report(g, names)
    rep = next(r for r in reps if r.name == (which or names[-1]))
    return dict(rep.declines)


def param(g, name, shape):
    return g.param(name, rng().standard_normal(shape).astype(np.float32))


def conv_graph():
    """A stride-2 stem on 3 channels, a 3×3 conv with 3 inputs, a depthwise
    conv, then a 5×5 conv and a 1×1 conv."""
    g = cc.Graph("declines")
    x = g.input("x", (1, 3, 16, 16))
    stem = cc.conv(x, param(g, "w_stem", (16, 3, 3, 3)), stride=2, padding=1, name="stem")
    few = cc.conv(x, param(g, "w_few", (16, 3, 3, 3)), padding=1, name="few")
    dw = cc.conv(cc.relu(stem, name="r"), param(g, "w_dw", (16, 1, 3, 3)), padding=1, groups=16, name="dw")
    big = cc.conv(dw, param(g, "w_big", (16, 16, 5, 5)), padding=2, name="big")
    pw = cc.conv(big, param(g, "w_pw", (8, 16, 1, 1)), name="pw")
    g.output(pw, "y")
    g.output(few, "z")
    return g


def test_conv_to_winograd():
    why = left(conv_graph(), "conv_to_winograd")
    assert why["stem"] == "stride (2, 2); Winograd needs stride 1"
    assert why["few"].startswith("3 input channels, below MIN_CHANNELS 8")
    assert why["dw"] == "groups 16; Winograd needs groups=1"
    assert why["big"] == "kernel (5, 5); Winograd needs a 3×3 kernel"
    assert set(why) == {"stem", "few", "dw", "big", "pw"}          # convs only: not the relu
    g = cc.Graph("tuned")
    x = g.input("x", (1, 16, 8, 8))
    g.output(cc.conv(x, param(g, "w", (16, 16, 3, 3)), padding=1, name="ok"), "y")
    g.output(cc.conv(x, param(g, "w2", (16, 16, 3, 3)), stride=2, name="strided"), "z")
    assert left(g, "conv_to_winograd") == {"strided": "stride (2, 2); Winograd needs stride 1"}
    assert left(g, "conv_to_winograd", db=forcing_database(g, "gemm")) == \
        {"ok": "the tuning database chose 'gemm' for it", "strided": "stride (2, 2); Winograd needs stride 1"}


def test_conv_to_gemm():
    g = cc.Graph("gemm")
    x = g.input("x", (1, 3, 8, 8))
    small = cc.conv(x, param(g, "w", (4, 3, 3, 3)), padding=1, name="small")      # 4·64 outputs × 27 = 6,912
    h = g.input("h", (1, 32, 32, 32))
    dw = cc.conv(h, param(g, "wd", (32, 1, 3, 3)), padding=1, groups=32, name="dw")   # 294,912 MACs
    dx = cc.conv_grad_input(param(g, "k", (8, 8, 3, 3)), g.input("gy", (2, 8, 30, 30)), (32, 32), flip=True,
                            name="dx")
    for v, n in ((small, "a"), (dw, "b"), (dx, "c")):
        g.output(v, n)
    why = left(g, "conv_to_gemm")
    assert why["small"].startswith("6,912 MACs, below MIN_MACS 65,536")
    assert why["dw"].startswith("groups 32 of 1 input and 1 output channel(s)")
    assert why["dx"].startswith("flip=True")
    assert left(g, "conv_to_gemm", db=forcing_database(g, "direct"))["dw"] == \
        "the tuning database chose 'direct' for it"


def test_transposed_to_matmul():
    g = cc.Graph("tr")
    x = g.input("x", (1, 4, 6, 6))
    y = cc.conv_transpose(x, param(g, "w", (4, 2, 3, 3)), stride=1, dilation=2, output_padding=1, name="up")
    g.output(y, "y")
    why = left(g, "transposed_to_matmul")
    assert why["up"].startswith("output_padding (1, 1) not below stride (1, 1)")
    assert left(g, "transposed_to_matmul", db=forcing_database(g, "direct"))["up"] == \
        "the tuning database chose 'direct' for it"


def test_blocked_layouts():
    c = block_size("float32")
    c_out = max(1, c // 2 - 1)                   # more than half of a block is padding
    g = cc.Graph("blk")
    x = g.input("x", (1, 3, 12, 12))
    narrow = cc.conv(x, param(g, "w1", (c_out, 3, 3, 3)), padding=1, name="narrow")
    grouped = cc.conv(g.input("x2", (1, 4, 8, 8)), param(g, "w2", (2 * c, 2, 3, 3)), padding=1, groups=2,
                      name="grouped")
    v = cc.conv(g.input("x3", (1, 2, 4, 4, 4)), param(g, "w3", (c, 2, 3, 3, 3)), padding=1, name="vol")
    stem = cc.conv(x, param(g, "w4", (c, 3, 3, 3)), padding=1, name="stem")
    mixed = cc.add(stem, g.input("skip", (1, c, 12, 12)), name="mixed")       # blocked + NCHW
    for val, n in ((narrow, "a"), (grouped, "b"), (v, "c"), (mixed, "d")):
        g.output(val, n)
    why = left(g, "to_blocked_layout")
    assert why["narrow"] == f"{c_out} output channels in blocks of {c}: {c - c_out} of {c} lanes would be padding"
    assert why["grouped"].startswith("groups 2 of 2 input channel(s)")
    assert why["vol"].startswith("input rank 5")
    assert why["mixed"] == "input 'skip' is NCHW (an input): reordered back here"
    assert "stem" not in why

    g = cc.Graph("choose")
    x = g.input("x", (1, 3, 12, 12))
    stem = cc.conv(x, param(g, "w1", (c, 3, 3, 3)), padding=1, name="stem")
    inner = cc.conv(cc.relu(stem, name="r"), param(g, "w2", (c, c, 3, 3)), padding=1, name="inner")
    one = cc.conv(x, param(g, "w3", (c, 3, 1, 1)), name="one")
    wide = cc.conv(g.input("xw", (1, c, 12, 12)), param(g, "w4", (c, c, 3, 3)), padding=1, name="wide")
    for val, n in ((inner, "a"), (one, "b"), (wide, "c")):
        g.output(val, n)
    why = left(g, "choose_blocked_layout")
    assert "stem" not in why
    assert re.fullmatch(r"not a stem: its input 'r[\w.]*' is a from_blocked, not a graph input", why["inner"])
    assert why["one"] == "not a stem: a 1×1 kernel"
    assert why["wide"] == f"not a stem: {c} input channels, not fewer than a block of {c}"
    assert left(g, "choose_blocked_layout", db=forcing_database(g, "gemm"))["stem"] == \
        "the tuning database chose 'gemm' for it"


def test_fold_constants_and_fold_params():
    g = cc.Graph("fold")
    x = g.input("x", (2, 3))
    w = param(g, "w", (2, 3))
    t = cc.relu(w, name="t")                                # reads a trainable param
    flat = cc.reshape(w, (3, 2), name="flat")               # an alias
    p = param(g, "p", (2, 3))
    q = cc.relu(p, name="q")                                # p is assigned below
    g.output(cc.add(cc.add(x, t), q), "y")
    g.output(flat, "f")
    g.output(cc.sigmoid(w, name="out_s"), "s")              # a graph output
    g.assign(p, cc.add(x, p, name="step"))
    assert left(g, "fold_constants") == {"t": "reads trainable param 'w', which must stay settable",
                                         "flat": "reads trainable param 'w', which must stay settable",
                                         "q": "reads trainable param 'p', which must stay settable",
                                         "out_s": "reads trainable param 'w', which must stay settable"}
    why = left(g, "fold_params")
    assert why["flat"].startswith("reshape of params: an alias")
    assert why["out_s"] == "a graph output"
    assert why["q"] == "reads 'p', which the graph assigns (a training update)"
    assert "t" not in why                                   # folded


def bn(g, x, c, name):
    var = g.param(f"{name}_v", np.abs(rng().standard_normal(c)).astype(np.float32) + 0.5)
    return cc.batch_norm(x, param(g, f"{name}_m", (c,)), var, param(g, f"{name}_g", (c,)), param(g, f"{name}_b", (c,)),
                         name=name)


def test_fold_batch_norm():
    g = cc.Graph("bn")
    x = g.input("x", (1, 4, 6, 6))
    c1 = cc.conv(x, param(g, "w1", (4, 4, 3, 3)), padding=1, name="c1")
    s = cc.add(c1, x, name="s")
    c2 = cc.conv(x, param(g, "w2", (4, 4, 3, 3)), padding=1, name="c2")
    g.output(bn(g, s, 4, "bn1"), "a")
    g.output(bn(g, c2, 4, "bn2"), "b")
    g.output(c2, "c2_too")
    why = left(g, "fold_batch_norm")
    assert why == {"bn1": "follows an add ('s'), not a conv", "bn2": "conv 'c2' is a graph output"}


def test_fuse_epilogues():
    g = cc.Graph("epi")
    x = g.input("x", (1, 4, 6, 6))
    pool = cc.max_pool(x, 2, name="pool")
    c = cc.conv(x, param(g, "w", (4, 4, 3, 3)), padding=1, name="c")
    g.output(cc.relu(pool, name="r_pool"), "a")
    g.output(cc.relu(c, name="r_c"), "b")
    g.output(cc.sigmoid(c, name="s_c"), "c")                           # c has two uses
    g.output(cc.mul(x, cc.hardsigmoid(x, alpha=0.2, name="hs"), name="gate"), "d")
    x2 = g.input("x2", (1, 4, 6, 6))
    g.output(cc.add(x2, x2, name="twice"), "e")
    why = left(g, "fuse_epilogues")
    assert why["r_pool"] == "'pool' is a max_pool, which has no epilogue"
    assert why["r_c"] == why["s_c"] == "'c' has 2 uses"
    assert why["gate"] == "hardsigmoid 'hs' has alpha 0.2, beta 0.5, not hardswish's 1/6, 0.5"
    assert why["twice"] == "'x2' has 2 uses"


def test_fuse_separable():
    g = cc.Graph("sep")
    x = g.input("x", (1, 8, 6, 6))
    full = cc.conv(x, param(g, "w1", (8, 8, 3, 3)), padding=1, name="full")
    pw = cc.conv(full, param(g, "w2", (4, 8, 1, 1)), name="pw")            # after a dense conv
    wide = g.input("wide", (1, 64, 2, 300))
    dw = cc.conv(wide, param(g, "w3", (64, 1, 3, 3)), padding=1, groups=64, name="dw")
    pw2 = cc.conv(dw, param(g, "w4", (8, 64, 1, 1)), name="pw2")          # row tile 64 × 300 × 4 B
    dw2 = cc.conv(x, param(g, "w5", (8, 1, 3, 3)), padding=1, groups=8, name="dw2")
    for v, n in ((pw, "a"), (pw2, "b"), (cc.max_pool(dw2, 2, name="pool"), "c")):
        g.output(v, n)
    why = left(g, "fuse_separable")
    assert why["full"] == ("neither pointwise (kernel (3, 3), not (1, 1)) nor depthwise "
                           "(has groups 1 for 8 input channels)")
    assert why["pw"] == "its input 'full' has groups 1 for 8 input channels"
    assert why["pw2"] == ("row tile of 64 channels × 300 columns = 76,800 B, above MAX_TILE_BYTES 65,536 "
                          "(on the stack)")
    assert why["dw2"] == "depthwise, but 'pool' after it is a max_pool, not a 1×1 conv"
    assert "dw" not in why                                  # its pointwise gives the reason

    g = cc.Graph("sep_gemm")                                # the pointwise is big enough for the GEMM
    x = g.input("x", (1, 16, 16, 16))
    dw = cc.conv(x, param(g, "w1", (16, 1, 3, 3)), padding=1, groups=16, name="dw")
    g.output(cc.conv(cc.relu(dw, name="r"), param(g, "w2", (32, 16, 1, 1)), name="pw"), "y")   # 32·256·16 MACs
    assert left(g, ["conv_to_gemm", "fuse_separable"])["dw"] == \
        "depthwise, but it feeds the GEMM 'pw.gemm' (131,072 MACs) through a reshape, not a 1×1 conv"


def test_conv_to_fft():
    g = cc.Graph("fft")
    x = g.input("x", (1, 16, 128, 128))
    strided = cc.conv(x, param(g, "w1", (4, 16, 3, 3)), stride=2, name="strided")
    huge = cc.conv(x, param(g, "w2", (32, 16, 3, 3)), padding=1, name="huge")
    vol = cc.conv(g.input("v", (1, 2, 4, 4, 4)), param(g, "w3", (2, 2, 3, 3, 3)), name="vol")
    act = cc.relu(cc.conv(g.input("s", (1, 2, 8, 8)), param(g, "w4", (2, 2, 3, 3)), name="small"), name="act")
    for v, n in ((strided, "a"), (huge, "b"), (vol, "c"), (act, "d")):
        g.output(v, n)
    why = left(g, ["fuse_epilogues", "conv_to_fft"])
    assert why["strided"] == "stride (2, 2); fft_conv needs 1"
    assert re.fullmatch(r"spectra of [\d,]+ B, above MAX_SPECTRA_BYTES 67,108,864 \(static memory\)", why["huge"])
    assert why["vol"] == "3D; fft_conv is 1D or 2D"
    assert why["small.relu"] == "a fused relu; fft_conv has no epilogue"


def test_factor_spatial_separable():
    g = cc.Graph("factor")
    x = g.input("x", (1, 2, 8, 8))
    sobel = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float32)
    fine = cc.conv(x, g.param("ws", np.stack([sobel, sobel])[:, None]), groups=2, name="fine")
    rough = cc.conv(x, param(g, "wr", (2, 1, 3, 3)), groups=2, name="rough")
    zero = cc.conv(x, g.param("wz", np.zeros((2, 1, 3, 3), np.float32)), groups=2, name="zero")
    row = cc.conv(x, param(g, "w1", (2, 1, 1, 3)), groups=2, name="row")
    dense = cc.conv(x, param(g, "wd", (4, 2, 3, 3)), name="dense")
    made = cc.conv(x, cc.relu(param(g, "wm", (2, 1, 3, 3)), name="wm_relu"), groups=2, name="made")
    for i, v in enumerate((fine, rough, zero, row, dense, made)):
        g.output(v, f"y{i}")
    why = left(g, "factor_spatial_separable")
    assert "fine" not in why
    assert re.fullmatch(r"channel 0's kernel has rank > 1: singular values [\d.e+-]+, [\d.e+-]+ "
                        r"\(ratio [\d.e+-]+ > 1e-06\)", why["rough"]), why["rough"]
    assert why["zero"] == "channel 0's kernel is all zeros"
    assert why["row"] == "kernel (1, 3): nothing to factor"
    assert why["dense"] == "groups 1 for 2 -> 4 channels: not one kernel per channel"
    assert why["made"] == "kernel 'wm_relu' is computed (a relu), not a param"


def test_study_lowerings():
    g = cc.Graph("study")
    x = g.input("x", (1, 4, 10, 10))
    plain = cc.conv(x, param(g, "w", (4, 4, 3, 3)), name="plain")
    g.output(plain, "y")
    g.output(cc.downsample(x, 2, name="ds_input"), "d1")
    c2 = cc.conv(x, param(g, "w2", (4, 4, 3, 3)), name="c2")
    g.output(cc.downsample(c2, 2, name="ds_shared"), "d2")
    g.output(c2, "c2_out")
    assert left(g, "strided_to_downsampled") == {"plain": "stride (1, 1): nothing to split",
                                                 "c2": "stride (1, 1): nothing to split"}
    assert left(g, "grouped_to_split")["plain"] == "groups 1: nothing to split"
    assert left(g, "dilated_to_dense")["plain"] == "dilation (1, 1): dense already"
    assert left(g, "fuse_downsample") == {"ds_input": "follows an input ('x'), not a conv",
                                          "ds_shared": "conv 'c2' is a graph output"}


def test_tiled_to_convs():
    g = cc.Graph("tiled")
    x = g.input("x", (1, 1, 12, 12))
    g.output(cc.tiled_conv(x, param(g, "w", (1, 1, 2, 2, 9, 9)), name="t9"), "y")   # 11×11 outputs: 81 kernels
    g.output(cc.tiled_conv(x, param(g, "w2", (1, 1, 2, 2, 2, 2)), name="t2"), "z")
    assert left(g, "tiled_to_convs") == {"t9": "a tile of 81 kernels, more than MAX_PIECES 64 convs"}


def test_memory_passes():
    """passes/memory.py (tests/test_memory_budget.py tests what they do)."""
    g = conv_graph()
    assert left(g, "inplace_elementwise") == {}          # 'r' writes over the stem's buffer
    assert left(g, "inplace_depthwise") == {}            # 'dw' over r's
    assert left(g, "inplace_pointwise") == {"pw": "it is a graph output (its own buffer is the caller's)"}
    assert left(g, "patch_first_stages") == {"x": "a tiled stage starts at an input read by one node; 'x' has 2 "
                                                  "readers"}
    h = cc.Graph("pool")
    x = h.input("x", (1, 2, 8, 8))
    y = cc.conv(x, param(h, "w", (2, 2, 3, 3)), padding=1, name="c")
    h.output(cc.global_avg_pool(cc.relu(y, name="r"), name="gap"), "y")
    assert "not a window op a tile can hold" in left(h, "patch_first_stages")["gap"]


@pytest.mark.parametrize("name", sorted(NEVER_DECLINE))
def test_passes_that_never_decline(name):
    g = cc.Graph("never")
    x = g.input("x", (1, 2, 8, 8))
    g.output(cc.conv(x, param(g, "w", (2, 2, 3, 3)), stride=2, name="c"), "a")
    g.output(cc.conv_transpose(x, param(g, "wt", (2, 2, 3, 3)), name="t"), "b")
    g.output(cc.local_conv(x, param(g, "wl", (2, 6, 6, 2, 3, 3)), name="l"), "c")
    assert left(g, name) == {}


def test_every_pass_is_covered():
    """Each registered pass (issue 15's int8 passes aside) has a decline
    case above, or is one of NEVER_DECLINE."""
    import inspect

    tested = set(re.findall(r'left\([^,]+, (?:\[[^\]]*, )?"(\w+)"', inspect.getsource(inspect.getmodule(rng))))
    mine = {n for n, f in PASSES.items() if f.__module__ not in INT8_MODULES}
    assert NEVER_DECLINE <= mine and mine - NEVER_DECLINE <= tested, mine - NEVER_DECLINE - tested


def test_declines_change_no_output_graph():
    """The passes give the same graph inside a run (collecting declines) and
    called bare (decline() a no-op)."""
    graphs = [conv_graph(), lenet5()]
    with tuning.using(None):
        for name in sorted(n for n, f in PASSES.items() if f.__module__ not in INT8_MODULES):
            for g in graphs:
                reps = []
                assert str(cc.passes.run(g, [name], reports=reps)) == str(PASSES[name](g)), name


def test_collector():
    decline("x", "outside a run: ignored")                  # no error, nothing kept
    with declines() as got:
        decline("a", "first sweep")
        decline("a", "last sweep")
    assert got == {"a": "last sweep"}

    def decline_then_fuse(g):
        """A test pass: declines a node it then fuses away, one the fusion
        makes and one it keeps."""
        decline("c", "declined, then rewritten")
        decline("c.relu", "made by the pass")
        decline("x", "kept")
        return PASSES["fuse_epilogues"](g)
    cc.passes.register(decline_then_fuse)
    try:
        g = cc.Graph("coll")
        x = g.input("x", (1, 2, 4, 4))
        g.output(cc.relu(cc.conv(x, param(g, "w", (2, 2, 3, 3)), name="c"), name="r"), "y")
        assert left(g, "decline_then_fuse") == {"x": "kept"}
    finally:
        del PASSES["decline_then_fuse"]


def test_report_table():
    with tuning.using(None):
        _, (rep,) = cc.passes.report(conv_graph(), ["conv_to_winograd"])
    table = rep.table()
    assert "  left 'stem': stride (2, 2); Winograd needs stride 1" in table.splitlines()
    assert "left" not in rep.table(declines=False)


def test_convc_passes_cli_shows_declines(tmp_path):
    env = subprocess_env(CONVC_CACHE_DIR=tmp_path / "cache")
    r = subprocess.run([PYTHON, "-m", "convc", "passes", "lenet5", "--passes", "conv_to_winograd,fuse_separable"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    with tuning.using(None):
        _, reps = cc.passes.report(lenet5(), ["conv_to_winograd", "fuse_separable"])
    want = [f"  left '{n}': {why}" for rep in reps for n, why in rep.declines]
    assert "  left 'conv2': kernel (5, 5); Winograd needs a 3×3 kernel" in want
    assert [ln for ln in r.stdout.splitlines() if ln.startswith("  left ")] == want


def test_convc_debug_prints_declines(monkeypatch, capsys):
    g = conv_graph()
    monkeypatch.setenv("CONVC_DEBUG", "1")
    with tuning.using(None):
        mod = cc.compile(g)
    err = capsys.readouterr().err.splitlines()
    assert err.count("conv_to_winograd: 'big' kernel (5, 5); Winograd needs a 3×3 kernel") == 1
    assert any(ln.startswith("[convc] pass conv_to_winograd: ") for ln in err)
    assert not any(ln.startswith("  left ") for ln in err)          # the tables do not repeat them
    feeds = {"x": rng().standard_normal((1, 3, 16, 16)).astype(np.float32)}
    ref = cc.compile(g, target="numpy").run(feeds)
    got = mod.run(feeds)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-5 * np.abs(ref[k]).max())
    monkeypatch.setenv("CONVC_DEBUG", "0")
    with tuning.using(None):
        cc.compile(g)
    assert capsys.readouterr().err == ""

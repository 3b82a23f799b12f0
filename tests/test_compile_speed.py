"""Big models compile fast (issue 17, item 4): identical node functions
shared and big modules split into translation units compiled in parallel,
the pre-pass module cache (hit and miss rules, other weights give other
outputs), the progress line, and peak memory while compiling."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import convc as cc
import helpers
from convc import progress, tuning
from convc.codegen import c as codegen
from convc.runtime import build, cache, module_cache
from convc.runtime.module import CModule
from convc.schedule import plan as make_plan


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Every test compiles into its own empty cache."""
    d = tmp_path / "cache"
    monkeypatch.setenv("CONVC_CACHE_DIR", str(d))
    monkeypatch.delenv("CONVC_PROGRESS", raising=False)
    return d


def _net(seed: int = 0, bn: bool = False) -> cc.Graph:
    """Three 3x3 convs (the last two compile to one shared function), a dense layer, and
    optionally a batch norm right after the first conv (folded into its
    weights: values the passes compute, not params the module can set)."""
    rng = np.random.default_rng(seed)
    g = cc.Graph("speedy")
    x = g.input("x", (1, 8, 10, 10))

    def p(name, *shape, scale=0.2):
        return g.param(name, rng.standard_normal(shape) * scale, "float32")
    h = cc.conv(x, p("w1", 8, 8, 3, 3), p("b1", 8), padding=1)
    if bn:
        h = cc.batch_norm(h, p("mean", 8), g.param("var", rng.random(8) + 0.5, "float32"), p("gamma", 8), p("beta", 8))
    h = cc.relu(h)
    h = cc.relu(cc.conv(h, p("w2", 8, 8, 3, 3), p("b2", 8), padding=1))
    h = cc.relu(cc.conv(h, p("w3", 8, 8, 3, 3), p("b3", 8), padding=1))
    y = cc.dense(cc.flatten(cc.max_pool(h, 2)), p("fc", 4, 8 * 25, scale=0.05))
    g.output(y, "y")
    return g


def _x(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 8, 10, 10)).astype(np.float32)


def _expected(g: cc.Graph, x: np.ndarray) -> np.ndarray:
    return cc.compile(g, target="numpy")(x=x)


# -- shared functions, several translation units ---------------------------------------------
def _lowered():
    g = cc.passes.run(_net(), "default")
    return g, make_plan(g)


def test_identical_node_functions_are_shared():
    g, plan = _lowered()
    src = codegen.generate(g, plan, parts=1)
    convs = [n for n in plan.order if g.node(n)["op"] in ("winograd_conv", "conv", "conv_nchwc")]
    assert len(convs) == 3, plan.order
    assert src.files is None and src.units == {"module.c": src.text}
    assert "Also called for 1 other node(s) with the same code" in src.text
    # one definition, called for both convs
    called = re.findall(r"^    (node_\w+)\(", src.text, re.M)
    assert len(called) == len(plan.order)
    assert len(set(called)) == len(called) - 1
    assert len(re.findall(r"^static void node_\w+\(", src.text, re.M)) == len(called) - 1


@pytest.mark.parametrize("parts", [2, 3])
def test_several_translation_units_compute_what_one_does(parts):
    g, plan = _lowered()
    one = codegen.generate(g, plan, parts=1)
    many = codegen.generate(g, plan, parts=parts)
    assert list(many.units) == ["module.c"] + [f"module_part{k}.c" for k in range(1, parts + 1)]
    assert "CONVC_NODE" in many.units["module.c"] and "static void node_" not in many.units["module.c"]
    for name, text in list(many.units.items())[1:]:
        assert f"part {name[len('module_part'):-2]} of {parts}" in text
    mods = [CModule(g, s, build.build(s.units)) for s in (one, many)]
    assert mods[0].library_path != mods[1].library_path
    x = _x()
    got = [m(x=x) for m in mods]
    np.testing.assert_array_equal(got[0], got[1])          # the same C, split: the same bits
    helpers.assert_close(got[1], _expected(_net(), x))


def test_compile_splits_a_big_module(monkeypatch):
    """cc.compile splits by size, one unit per core at most (here forced
    by a tiny SPLIT_BYTES): the C compiler runs once per unit."""
    from convc.host import probe

    monkeypatch.setattr(codegen, "SPLIT_BYTES", 1)
    before = cache.STATS["compiles"]
    m = cc.compile(_net(), quiet=True)
    assert cache.STATS["compiles"] == before + 1
    units = sorted(p.name for p in m.library_path.parent.glob("module*.c"))
    assert len(units) == (1 if probe().cores == 1 else 1 + min(probe().cores, 3))
    assert not list(m.library_path.parent.glob(".build-*"))        # no object files left behind
    helpers.assert_close(m(x=_x()), _expected(_net(), _x()))


def test_a_unit_the_compiler_rejects_names_its_files():
    g, plan = _lowered()
    many = codegen.generate(g, plan, parts=2)
    units = dict(many.units)
    units["module_part2.c"] += "\nthis is not C;\n"
    with pytest.raises(cc.errors.CompileError, match=r"module_part2\.c"):
        build.build(units)


# -- the pre-pass module cache ---------------------------------------------------------------
def test_module_cache_hits_and_other_weights_give_other_outputs():
    x = _x()
    m0 = cc.compile(_net(0), quiet=True)
    stats = dict(module_cache.STATS)
    m1 = cc.compile(_net(1), quiet=True)                # same structure, other weights
    assert module_cache.STATS["hits"] == stats["hits"] + 1
    assert module_cache.STATS["stored"] == stats["stored"]
    assert m1.library_path == m0.library_path
    helpers.assert_close(m1(x=x), _expected(_net(1), x))
    helpers.assert_close(m0(x=x), _expected(_net(0), x))
    assert not np.allclose(m0(x=x), m1(x=x))
    # a folded Winograd kernel was recomputed from the new weights, and set_params still refolds
    assert any("folded" in m1.graph.node(n) for n in m1.graph.param_names)
    g0 = _net(0)
    m1.set_params({n: g0.node(n)["value"] for n in g0.param_names})
    helpers.assert_close(m1(x=x), _expected(_net(0), x))


def test_module_cache_in_another_process(fresh_cache):
    cc.compile(_net(0), quiet=True)
    code = textwrap.dedent("""
        import json, numpy as np, convc as cc, sys
        sys.path.insert(0, %r)
        from test_compile_speed import _net, _x
        from convc.runtime import module_cache
        cc.set_num_threads(%d)          # the key holds the thread count (what the passes consult)
        m = cc.compile(_net(2), quiet=True)
        print(json.dumps(dict(module_cache.STATS, y=m(x=_x()).tolist())))
    """ % (os.path.dirname(__file__), cc.get_num_threads()))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=helpers.subprocess_env(CONVC_CACHE_DIR=str(fresh_cache)))
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.splitlines()[-1])
    assert (got["hits"], got["misses"], got["stored"]) == (1, 0, 0)
    helpers.assert_close(np.array(got["y"], np.float32), _expected(_net(2), _x()))


def test_values_the_passes_computed_key_the_entry():
    """Batch norm folded into the conv's weights: those weights are values
    the passes computed, so the entry is only used with the same values."""
    x = _x()
    cc.compile(_net(0, bn=True), quiet=True)
    stats = dict(module_cache.STATS)
    m = cc.compile(_net(0, bn=True), quiet=True)
    assert module_cache.STATS["hits"] == stats["hits"] + 1
    helpers.assert_close(m(x=x), _expected(_net(0, bn=True), x))
    m = cc.compile(_net(1, bn=True), quiet=True)
    assert module_cache.STATS["misses"] == stats["misses"] + 1
    helpers.assert_close(m(x=x), _expected(_net(1, bn=True), x))


def test_pipeline_options_and_tuning_database_miss():
    g = _net()
    cc.compile(g, quiet=True)
    for how in (dict(passes="none"), dict(native=False), dict(profile=True)):
        stats = dict(module_cache.STATS)
        cc.compile(g, quiet=True, **how)
        assert module_cache.STATS["misses"] == stats["misses"] + 1, how
    stats = dict(module_cache.STATS)
    with tuning.using(helpers.forcing_database(g, "direct")):
        m = cc.compile(g, quiet=True)
    assert module_cache.STATS["misses"] == stats["misses"] + 1
    assert not any(g2["op"] == "winograd_conv" for _, g2 in m.graph.nx.nodes(data=True))
    helpers.assert_close(m(x=_x()), _expected(g, _x()))
    stats = dict(module_cache.STATS)
    m = cc.compile(g, quiet=True)                    # the database gone again: the first entry's key
    assert module_cache.STATS["hits"] == stats["hits"] + 1
    assert any(d["op"] == "winograd_conv" for _, d in m.graph.nx.nodes(data=True))


def test_a_damaged_or_foreign_entry_is_a_miss(fresh_cache):
    g = _net()
    cc.compile(g, quiet=True)
    (js,) = (fresh_cache / "modules").glob("*.json")
    npz = js.with_suffix(".npz")
    npz.write_bytes(npz.read_bytes()[:-10])           # truncated: its sha256 no longer matches
    stats = dict(module_cache.STATS)
    m = cc.compile(g, quiet=True)
    assert module_cache.STATS["misses"] == stats["misses"] + 1
    helpers.assert_close(m(x=_x()), _expected(g, _x()))
    # an entry that is a symbolic link is never read
    target = fresh_cache / "elsewhere.json"
    target.write_bytes(js.read_bytes())
    js.unlink()
    js.symlink_to(target)
    stats = dict(module_cache.STATS)
    cc.compile(g, quiet=True)
    assert module_cache.STATS["misses"] == stats["misses"] + 1
    assert not js.is_symlink()                       # replaced by the compile that missed


def test_entry_holds_no_pickle(fresh_cache):
    cc.compile(_net(0, bn=True), quiet=True)
    (js,) = (fresh_cache / "modules").glob("*.json")
    entry = json.loads(js.read_text())
    assert entry["value_keyed"] and set(entry["value_keyed"]) >= {"w1", "mean", "var", "gamma", "beta"}
    with np.load(js.with_suffix(".npz"), allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)
    assert oct(js.stat().st_mode & 0o777) == "0o600"


# -- the progress line -------------------------------------------------------------------------
def test_progress_line_forced_on(monkeypatch, capsys):
    monkeypatch.setenv("CONVC_PROGRESS", "1")
    monkeypatch.setattr(progress, "DELAY", 0.0)
    cc.compile(_net(), passes="none")
    err = capsys.readouterr().err
    assert "\r[convc] compile 'speedy': passes" in err
    assert "C compiler" in err
    assert err.endswith("\r")                        # the line is cleared at the end
    assert "\n" not in err


@pytest.mark.parametrize("how", ["quiet", "env0", "not_a_tty"])
def test_progress_line_off(monkeypatch, capsys, how):
    monkeypatch.setattr(progress, "DELAY", 0.0)
    if how == "env0":
        monkeypatch.setenv("CONVC_PROGRESS", "0")
    elif how == "quiet":
        monkeypatch.setenv("CONVC_PROGRESS", "1")
    cc.compile(_net(), passes="none", quiet=how == "quiet")
    assert capsys.readouterr().err == ""


def test_short_work_shows_nothing(monkeypatch, capsys):
    monkeypatch.setenv("CONVC_PROGRESS", "1")
    with progress.Progress("work") as p:
        p.update("a step")
    assert capsys.readouterr().err == ""


def test_progress_say_keeps_lines_apart(monkeypatch, capsys):
    monkeypatch.setenv("CONVC_PROGRESS", "1")
    monkeypatch.setattr(progress, "DELAY", 0.0)
    with progress.Progress("tune 'n'") as p:
        p.update("[1/2] conv")
        p.say("  [1/2] conv: direct 1 ms")
    err = capsys.readouterr().err
    assert "\r[convc] tune 'n': [1/2] conv" in err
    assert "\n  [1/2] conv: direct 1 ms\n" in err.replace("\r", "\n")


# -- memory while compiling --------------------------------------------------------------------
def test_compile_peak_memory_is_at_most_twice_the_weights(fresh_cache):
    """A model with about 200 MB of weights (3x3 convs the default pipeline
    turns into Winograd, dense layers): peak RSS while compiling grows by
    at most twice the weights, cold and from the module cache."""
    code = textwrap.dedent("""
        import json, sys, numpy as np, convc as cc

        def status(key):     # VmHWM: this process image's peak (ru_maxrss would carry the parent's over fork)
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

        def rss():
            return status("VmRSS")

        rng = np.random.default_rng(0)
        g = cc.Graph("heavy")
        x = g.input("x", (1, 256, 6, 6))
        h = x
        for i in range(6):                                   # 6 x 2.4 MB
            h = cc.relu(cc.conv(h, g.param(f"c{i}", rng.standard_normal((256, 256, 3, 3), np.float32) * .02),
                                padding=1))
        h = cc.flatten(h)
        for i, (o, k) in enumerate([(3072, 9216), (3072, 3072), (3072, 3072), (1000, 3072)]):     # 200 MB
            h = cc.relu(cc.dense(h, g.param(f"d{i}", rng.standard_normal((o, k), np.float32) * .01)))
        g.output(h, "y")
        weights = sum(g.node(n)["value"].nbytes for n in g.param_names)
        before = rss()
        cc.compile(g, quiet=True)
        peak = status("VmHWM")
        print(json.dumps(dict(weights=weights, before=before, peak=peak)))
    """)
    for _ in range(2):                                       # cold, then from the module cache
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             env=helpers.subprocess_env(CONVC_CACHE_DIR=str(fresh_cache)))
        assert out.returncode == 0, out.stderr
        r = json.loads(out.stdout.splitlines()[-1])
        assert r["weights"] > 190e6
        assert r["peak"] - r["before"] <= 2 * r["weights"], r

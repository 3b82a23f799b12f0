"""The host probe, the tuning database and the tuner: every candidate the
tuner may pick computes the reference's numbers, a database is used when it
belongs to this host and ignored (with a warning) when it does not or is
damaged, and the untuned defaults derive from the probed machine."""
from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest

import convc as cc
from convc import tuner, tuning
from convc.host import Host, probe
from convc.passes import manager
from convc.reference import evaluate


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A fresh compile cache (and so a fresh tuning database) for one test."""
    monkeypatch.setenv("CONVC_CACHE_DIR", str(tmp_path))
    tuning._loaded.clear()
    yield tmp_path
    tuning._loaded.clear()


def _conv_graph(c_in, c_out, size, k, stride=1, padding=0, groups=1, batch=1, dtype="float32", bias=True,
                name="g"):
    rng = np.random.default_rng(0)
    g = cc.Graph(name)
    x = g.input("x", (batch, c_in, size, size), dtype)
    w = g.param("w", (rng.standard_normal((c_out, c_in // groups, k, k)) * 0.2).astype(dtype))
    b = g.param("b", rng.standard_normal(c_out).astype(dtype)) if bias else None
    g.output(cc.relu(cc.conv(x, w, b, stride=stride, padding=padding, groups=groups)), "y")
    return g


def _train_graph(dtype="float64"):
    """A conv whose gradients g and h are nodes of the graph."""
    rng = np.random.default_rng(1)
    g = cc.Graph("train")
    x = g.input("x", (2, 4, 9, 9), dtype)
    w = g.param("w", (rng.standard_normal((6, 4, 3, 3)) * 0.3).astype(dtype))
    y = cc.conv(x, w, None, stride=2, padding=1)
    loss = cc.reduce_sum(cc.mul(y, y))
    gw, gx = cc.grad(loss, [w, x])
    g.output(gw, "gw")
    g.output(gx, "gx")
    return g


def _lowered(g, pipeline="default"):
    with tuning.using(None):
        return manager.run(g, tuner._pipeline_prefix(manager.resolve(pipeline)))


def _tuned_nodes(lowered):
    return [n for n in lowered.topological_order() if lowered.node(n)["op"] in tuning.TUNED_OPS]


IMPLEMENTS = {"gemm": {"matmul", "dense"}, "winograd": {"winograd_conv"}, "winograd4": {"winograd_conv"},
              "blocked": {"conv_nchwc", "conv_nchwc_depthwise"}}


def _check_candidates(g, pipeline="default"):
    """Every candidate of every tuned node: compiles, computes the reference's
    numbers, and really is the algorithm it claims (its op is in the graph)."""
    lowered = _lowered(g, pipeline)
    nodes = _tuned_nodes(lowered)
    assert nodes
    seen = set()
    host = probe()
    for n in nodes:
        m = tuner.micro_graph(lowered, n)
        feeds = tuner._feeds(m)
        want = evaluate(m, feeds)["y"]
        sig = tuning.signature(lowered, n)
        for c in tuner.candidates(lowered, n, manager.resolve(pipeline)):
            mod = tuner._compile(m, pipeline, tuner._forcing(host, sig, c))
            got = mod.run(feeds)["y"]
            tol = 1e-9 if want.dtype == np.float64 else 2e-3
            err = float(np.max(np.abs(got - want))) / max(float(np.max(np.abs(want))), 1e-30)
            assert err <= tol, (n, c.label, err)
            ops = {mod.graph.node(v)["op"] for v in mod.graph.topological_order()}
            if c.algorithm == "direct":
                assert lowered.node(n)["op"] in ops or "conv" in ops, (n, c.label, ops)
            else:
                assert ops & IMPLEMENTS[c.algorithm], (n, c.label, ops)
            seen.add(c.algorithm)
    return seen


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [
    dict(c_in=8, c_out=16, size=10, k=3, padding=1),                # Winograd-able
    dict(c_in=8, c_out=12, size=9, k=3, stride=2, padding=1),
    dict(c_in=16, c_out=24, size=7, k=1),
    dict(c_in=3, c_out=16, size=15, k=7, stride=2, padding=3),       # a stem
    dict(c_in=16, c_out=16, size=8, k=3, padding=1, groups=16),      # depthwise
    dict(c_in=8, c_out=8, size=6, k=3, padding=1, batch=2),
])
def test_every_candidate_agrees_with_the_reference(shape, dtype):
    seen = _check_candidates(_conv_graph(**shape, dtype=dtype))
    assert "direct" in seen
    if shape.get("groups", 1) == 1:
        assert "gemm" in seen
    if shape["k"] == 3 and shape.get("stride", 1) == 1 and shape.get("groups", 1) == 1:
        assert "winograd" in seen


def test_gradient_candidates_agree_with_the_reference():
    g = _train_graph()
    lowered = _lowered(g, "train")
    assert {lowered.node(n)["op"] for n in _tuned_nodes(lowered)} >= {"conv_grad_kernel", "conv_grad_input"}
    assert "gemm" in _check_candidates(g, "train")


def test_transposed_candidates_agree_with_the_reference():
    rng = np.random.default_rng(2)
    g = cc.Graph("tconv")
    x = g.input("x", (1, 8, 5, 5))
    w = g.param("w", (rng.standard_normal((8, 4, 4, 4)) * 0.2).astype(np.float32))
    g.output(cc.conv_transpose(x, w, None, stride=2, padding=1), "y")
    assert _check_candidates(g) >= {"direct", "gemm"}


@pytest.mark.parametrize("mr", [2, 5, 7, 14, 16])
def test_any_register_tile_height_is_exact(mr):
    """The GEMM template with tile rows the tuner may pick, on products whose
    M is not a multiple of them and N leaves every edge case."""
    rng = np.random.default_rng(mr)
    g = cc.Graph("mm")
    a = g.input("a", (2, 23, 37), "float64")
    b = g.input("b", (2, 37, 45), "float64")
    g.output(cc.matmul(a, b, blocks=(mr, 3 * mr, 40, 16)), "y")
    feeds = {"a": rng.standard_normal((2, 23, 37)), "b": rng.standard_normal((2, 37, 45))}
    got = cc.compile(g, passes="none").run(feeds)["y"]
    np.testing.assert_allclose(got, feeds["a"] @ feeds["b"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("blocks", [(0, 8, 8, 8), (17, 8, 8, 8), (4, 8, 8), (4, 8, 8, 1 << 17), (4, 8.0, 8, 8), "4x8"])
def test_bad_gemm_blocks_are_a_clear_error(blocks):
    g = cc.Graph("mm")
    a = g.input("a", (4, 4))
    with pytest.raises(cc.ValidationError, match="blocks must be four positive ints"):
        cc.matmul(a, a, blocks=blocks)


def _fake_host(**kw):
    base = dict(cpu="test CPU", isa="avx2 fma", flags=("avx2", "fma"), vector_bytes=32, vector_registers=16,
                l1d=32 << 10, l2=1 << 20, l3=16 << 20, cores=4, compiler="cc 1.0")
    return Host(**{**base, **kw})


@pytest.mark.parametrize("host", [_fake_host(), _fake_host(vector_bytes=64, vector_registers=32, l1d=48 << 10,
                                                           l2=2 << 20, cores=2),
                                  _fake_host(vector_bytes=16, vector_registers=32, l1d=64 << 10, l2=512 << 10, cores=8)])
def test_default_gemm_schedule_follows_the_probed_host(host):
    mr = tuning.default_tile_rows(host)
    nv = tuning.GEMM_NV
    assert mr * nv + nv + 1 <= host.vector_registers < (mr + 2) * nv + nv + 1 or mr == tuning.MAX_TILE_ROWS
    for m, k, n in [(64, 576, 3136), (512, 4608, 49), (128, 128, 784), (1000, 512, 1)]:
        b = tuning.default_gemm_blocks(m, k, n, "float32", host=host)
        assert b["MR"] == mr and 1 <= b["MC"] <= m and 1 <= b["NC"] <= n and 1 <= b["KC"] <= k
        nr = nv * host.lanes("float32")
        assert (nr + mr) * b["KC"] * 4 <= host.l1d // 2                    # micro-panels in half the L1
        items = -(-m // b["MC"]) * -(-n // b["NC"])
        # split for the cores unless the blocks are already one register tile
        assert items >= tuning.WORK_ITEMS_PER_CORE * host.cores or (b["NC"] <= nr and b["MC"] <= mr) \
            or b["NC"] == n and b["MC"] <= mr or (n <= nr and b["MC"] <= mr)


def test_probe_reads_this_machine():
    h = probe()
    assert h.vector_bytes in (16, 32, 64) and h.vector_registers in (16, 32)
    assert h.l1d > 0 and h.l2 > 0 and h.cores >= 1 and h.compiler
    assert len(h.key) == 20 and h.key == dataclasses.replace(h).key
    assert dataclasses.replace(h, compiler="other cc").key != h.key
    assert dataclasses.replace(h, cpu="other CPU").key != h.key


# -- the database -----------------------------------------------------------------------------------
def _gemm_entry(mr=4, mc=24, nc=64, kc=32):
    return {"algorithm": "gemm", "gemm": {"MR": mr, "MC": mc, "NC": nc, "KC": kc}, "seconds": 1e-4}


def _entry_for(g, n, entry, threads=None):
    """A database entry for the first tuned node of ``g`` (``n`` its op)."""
    from convc.runtime.threads import get_num_threads

    lowered = _lowered(g)
    n = next(v for v in _tuned_nodes(lowered) if lowered.node(v)["op"] == n)
    return {tuning.entry_key(tuning.signature(lowered, n), threads or get_num_threads()): entry}


def _reports(g):
    reps = []
    out = manager.run(g, "default", reports=reps)
    return out, reps


def test_compile_uses_an_entry_and_says_so(private_cache):
    g = _conv_graph(8, 16, 6, 3, padding=1, name="small")      # below the GEMM threshold: direct by default
    with tuning.using(None):
        plain, _ = _reports(g)
    assert "matmul" not in {plain.node(n)["op"] for n in plain.topological_order()}
    db = tuning.Database(probe(), tuning.db_path(), _entry_for(g, "conv", _gemm_entry()))
    db.save()
    out, reps = _reports(g)
    mm = [n for n in out.topological_order() if out.node(n)["op"] == "matmul"]
    assert mm and out.node(mm[0])["attrs"]["blocks"] == (4, 24, 64, 32)
    notes = [t for r in reps for t in r.notes]
    assert any("tuned -> gemm with GEMM tile rows 4, blocks 24x64x32" in t for t in notes), notes
    assert "note: " in next(r for r in reps if r.name == "conv_to_gemm").table()
    feeds = tuner._feeds(g)
    np.testing.assert_allclose(cc.compile(g).run(feeds)["y"], evaluate(g, feeds)["y"], rtol=1e-4, atol=1e-5)
    # CONVC_TUNING=0 turns the database off
    import os
    os.environ["CONVC_TUNING"] = "0"
    try:
        off, _ = _reports(g)
    finally:
        del os.environ["CONVC_TUNING"]
    assert "matmul" not in {off.node(n)["op"] for n in off.topological_order()}


def test_entry_for_another_thread_count_is_used_when_no_closer_one_exists(private_cache):
    g = _conv_graph(8, 16, 6, 3, padding=1, name="small")
    tuning.Database(probe(), tuning.db_path(), _entry_for(g, "conv", _gemm_entry(), threads=64)).save()
    out, _ = _reports(g)
    assert any(out.node(n)["op"] == "matmul" for n in out.topological_order())


def test_database_of_another_host_is_ignored_with_a_warning(private_cache):
    g = _conv_graph(8, 16, 6, 3, padding=1, name="small")
    other = dataclasses.replace(probe(), cpu="Some Other CPU")
    path = tuning.db_path()                                   # planted where this host looks
    tuning.Database(other, path, _entry_for(g, "conv", _gemm_entry())).save()
    with pytest.warns(tuning.TuningWarning, match="another CPU"):
        out, _ = _reports(g)
    assert "matmul" not in {out.node(n)["op"] for n in out.topological_order()}
    newer = dataclasses.replace(probe(), compiler="gcc 99")
    tuning.Database(newer, path, _entry_for(g, "conv", _gemm_entry())).save()
    tuning._loaded.clear()
    with pytest.warns(tuning.TuningWarning, match="another compiler"):
        _reports(g)


@pytest.mark.parametrize("text", ["{not json", "[]", json.dumps({"schema": 99, "entries": {}}),
                                  json.dumps({"schema": 1, "host": {}, "entries": {}})])
def test_corrupt_database_is_ignored_with_a_warning(private_cache, text):
    g = _conv_graph(8, 16, 6, 3, padding=1, name="small")
    path = tuning.db_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    with pytest.warns(tuning.TuningWarning):
        out, _ = _reports(g)
    feeds = tuner._feeds(g)
    np.testing.assert_allclose(cc.compile(g).run(feeds)["y"], evaluate(g, feeds)["y"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", [{"algorithm": "quantum"}, {"algorithm": "gemm", "gemm": {"MR": 99, "MC": 1, "NC": 1,
                                                                                          "KC": 1}},
                                 {"algorithm": "gemm", "gemm": {"MC": 8}}, "gemm", None])
def test_corrupt_entry_is_ignored_with_a_warning_and_the_others_used(private_cache, bad):
    g = _conv_graph(8, 16, 6, 3, padding=1, name="small")
    good = _entry_for(g, "conv", _gemm_entry())
    path = tuning.db_path()
    tuning.Database(probe(), path, good).save()
    data = json.loads(path.read_text())
    data["entries"]["conv float32[1,8,6,6] float32[16,8,3,3] @1 threads"] = bad
    path.write_text(json.dumps(data))
    tuning._loaded.clear()
    with pytest.warns(tuning.TuningWarning, match="is ignored"):
        out, _ = _reports(g)
    assert any(out.node(n)["op"] == "matmul" for n in out.topological_order())


def test_save_merges_with_what_another_process_saved(private_cache):
    path = tuning.db_path()
    a = tuning.Database(probe(), path, {"sig a @1 threads": _gemm_entry()})
    b = tuning.Database(probe(), path, {"sig b @1 threads": {"algorithm": "direct"}})
    a.save()
    b.save()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = tuning.Database.load()
    assert set(got.entries) == {"sig a @1 threads", "sig b @1 threads"}


# -- the tuner end to end ---------------------------------------------------------------------------
def test_tune_saves_winners_that_compile_then_uses(private_cache):
    rng = np.random.default_rng(3)
    g = cc.Graph("two")
    x = g.input("x", (1, 8, 12, 12))
    w1 = g.param("w1", (rng.standard_normal((16, 8, 3, 3)) * 0.2).astype(np.float32))
    w2 = g.param("w2", (rng.standard_normal((16, 16, 1, 1)) * 0.2).astype(np.float32))
    y = cc.conv(cc.relu(cc.conv(x, w1, None, padding=1)), w2, None)
    g.output(y, "y")
    rep = cc.tune(g, budget=60, progress=False)
    assert [t.op for t in rep.ops] == ["conv", "conv"] and all(t.best is not None for t in rep.ops)
    for t in rep.ops:
        assert t.best.seconds > 0 and t.default.seconds > 0
        assert all(r.failure is None for r in t.measured), [(r.candidate.label, r.failure) for r in t.measured]
    table = rep.table()
    assert "% peak" in table and str(tuning.db_path()) in table
    saved = json.loads(tuning.db_path().read_text())
    assert len(saved["entries"]) == 2 and saved["host"]["key"] == probe().key
    out, reps = _reports(g)
    chosen = [e for e in saved["entries"].values() if e["algorithm"] != "default"]
    assert sum("tuned ->" in t for r in reps for t in r.notes) == len(chosen)
    for t in rep.ops:                           # a stored choice beat the defaults in the final turn-by-turn timing
        assert t.best.candidate.algorithm == "default" or t.best.seconds < tuner.CLEAR_WIN * t.default.seconds
    feeds = tuner._feeds(g)
    np.testing.assert_allclose(cc.compile(g).run(feeds)["y"], evaluate(g, feeds)["y"], rtol=1e-3, atol=1e-4)


def test_tune_within_a_tiny_budget_reports_what_it_skipped(private_cache):
    g = _conv_graph(8, 16, 6, 3, padding=1)
    rep = cc.tune(g, budget=0.5, progress=False, save=False)
    assert rep.ops[0].skipped and "budget" in rep.ops[0].skipped
    assert not tuning.db_path().exists()


@pytest.mark.parametrize("budget", [0, -1, "60", float("nan")])
def test_tune_rejects_a_bad_budget(budget):
    with pytest.raises(cc.ConvcError, match="budget"):
        cc.tune(_conv_graph(4, 4, 5, 3), budget=budget)


def test_cli_tune(private_cache, capsys):
    from convc.cli import main

    assert main(["tune", "lenet5", "--budget", "60", "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    assert "conv1" in out and "% peak" in out and "[1/2]" in err
    assert json.loads(tuning.db_path().read_text())["entries"]


@pytest.mark.parametrize("shape", [dict(c_in=16, c_out=40, size=11, k=3, stride=2, padding=1),
                                   dict(c_in=3, c_out=16, size=15, k=7, stride=2, padding=3),
                                   dict(c_in=16, c_out=16, size=9, k=3, padding=1, groups=16)])
def test_blocked_candidates_and_their_register_tiles_agree_with_the_reference(shape):
    g = _conv_graph(**shape)
    assert "blocked" in _check_candidates(g, "blocked")
    lowered = _lowered(g, "blocked")
    (n,) = _tuned_nodes(lowered)
    m = tuner.micro_graph(lowered, n)
    feeds = tuner._feeds(m)
    want = evaluate(m, feeds)["y"]
    sig = tuning.signature(lowered, n)
    tiles = tuner._blocked_tiles(lowered, n, probe())
    assert len(tiles) >= 2
    for t in tiles:
        mod = tuner._compile(m, "blocked", tuner._forcing(probe(), sig, tuner.Candidate("blocked", blocking=t)))
        (conv,) = [v for v in mod.graph.topological_order() if mod.graph.node(v)["op"] == "conv_nchwc"]
        assert mod.graph.node(conv)["attrs"]["blocking"] == t
        np.testing.assert_allclose(mod.run(feeds)["y"], want, rtol=2e-3, atol=2e-3 * float(np.max(np.abs(want))))


def test_tune_the_blocked_pipeline_refines_the_register_tile(private_cache):
    g = _conv_graph(3, 16, 23, 7, stride=2, padding=3, name="stem")
    rep = cc.tune(g, budget=60, passes="blocked", progress=False)
    (t,) = rep.ops
    labels = [r.candidate.label for r in t.measured]
    assert "blocked" in labels and "direct" in labels
    winner = min((r for r in t.measured if r.seconds is not None), key=lambda r: r.seconds)
    if winner.candidate.algorithm == "blocked":
        assert any("ur_w=" in lb for lb in labels)            # the tile of the winning kernel was refined
    out, reps = manager.report(g, "blocked")
    notes = [x for r in reps for x in r.notes]
    if t.best.candidate.algorithm == "default":               # nothing beat the pipeline's own rule
        assert not notes
    else:
        assert any("tuned -> " + t.best.candidate.algorithm in x for x in notes)


def test_a_default_entry_keeps_the_rules_choice(private_cache):
    """An entry saying 'default' (the tuner found nothing faster than the
    passes' own rules) overrides nothing and is noted nowhere."""
    g = _conv_graph(8, 16, 6, 3, padding=1, name="small")
    with tuning.using(None):
        plain, _ = _reports(g)
    tuning.Database(probe(), tuning.db_path(), _entry_for(g, "conv", {"algorithm": "default"})).save()
    out, reps = _reports(g)
    assert out.structure_hash() == plain.structure_hash()
    assert not [t for r in reps for t in r.notes]

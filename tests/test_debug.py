"""CONVC_DEBUG levels and per-node profiling."""
import numpy as np

import convc as cc
from convc.models import lenet5


def test_debug_levels_print_reports_ir_and_timings(monkeypatch, capsys):
    g = lenet5()
    monkeypatch.setenv("CONVC_DEBUG", "1")
    cc.compile(g)
    err = capsys.readouterr().err
    assert "[convc] pass fuse_epilogues" in err and "output logits" not in err
    monkeypatch.setenv("CONVC_DEBUG", "3")
    mod = cc.compile(g)
    err = capsys.readouterr().err
    assert "output logits = %fc3" in err                 # the final IR
    assert str(mod.library_path) in err and "build/load" in err
    monkeypatch.setenv("CONVC_DEBUG", "0")
    cc.compile(g)
    assert capsys.readouterr().err == ""


def test_profile_times_every_node():
    g = lenet5()
    mod = cc.compile(g, profile=True)
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    for _ in range(3):
        mod(x=x)
    times = mod.profile()
    assert set(times) == set(mod.plan.order) and all(t > 0 for t in times.values())
    assert list(times.values()) == sorted(times.values(), reverse=True)
    plain = cc.compile(g)
    np.testing.assert_array_equal(plain(x=x), mod(x=x))      # timers change nothing
    try:
        plain.profile()
    except cc.InputError as e:
        assert "profile=True" in str(e)
    else:
        raise AssertionError("profile() without profile=True must raise")

"""Threads under load (convc/runtime/threads.py) and ``convc bench --under-load``:
how convc bounds libgomp's spin-wait and when it leaves it alone (checked in
child processes through libgomp's own report, ``omp_display_env``), the
thread count API, and the busy-process helper the bench uses, which must
always stop its processes. No timing is asserted."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import convc as cc
from convc import bench
from convc.errors import ConvcError
from convc.runtime import threads
from helpers import PYTHON, subprocess_env

# A child: optionally load libgomp (or torch) first, import convc, then print
# convc's wait policy, what the child's environment holds afterwards, and
# libgomp's own account of its settings (omp_display_env writes to stderr).
CHILD = r"""
import ctypes, json, os, sys
if sys.argv[1] == "gomp-first":
    ctypes.CDLL("libgomp.so.1")
from convc.runtime import threads
p = threads.wait_policy()
print(json.dumps(dict(source=p.source, spincount=p.spincount, spin_ns=p.spin_ns, round_trip_ns=p.round_trip_ns,
                      detail=p.detail, env={k: os.environ.get(k) for k in threads.WAIT_VARIABLES},
                      threads=threads.get_num_threads())), flush=True)
threads._gomp().omp_display_env(1)
"""


def _child(mode: str = "convc-first", **env) -> tuple[dict, dict]:
    """Run CHILD; return (its JSON line, libgomp's displayed settings)."""
    e = subprocess_env(**env)
    for k in threads.WAIT_VARIABLES + ("OMP_NUM_THREADS",):
        if k not in env:
            e.pop(k, None)
    proc = subprocess.run([PYTHON, "-c", CHILD, mode], capture_output=True, text=True, env=e, timeout=120)
    assert proc.returncode == 0, proc.stderr
    shown = {}
    for line in proc.stderr.splitlines():
        key, eq, value = line.strip().partition(" = ")
        if eq:
            shown[key] = value.strip("'")
    assert "GOMP_SPINCOUNT" in shown, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1]), shown


def test_convc_bounds_the_spin_before_libgomp_loads():
    info, shown = _child()
    assert info["source"] == "convc", info
    assert info["spin_ns"] > 0 and info["round_trip_ns"] > 0
    assert info["spincount"] == max(1, -(-info["round_trip_ns"] // info["spin_ns"]))    # ceil(trip / spin)
    assert shown["GOMP_SPINCOUNT"] == str(info["spincount"]), shown                  # libgomp took it
    assert info["env"] == {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None}          # and children do not inherit it
    assert f"GOMP_SPINCOUNT={info['spincount']}" in info["detail"]


@pytest.mark.parametrize("var,value,shown_key,shown_value", [
    ("OMP_WAIT_POLICY", "active", "OMP_WAIT_POLICY", "ACTIVE"),
    ("OMP_WAIT_POLICY", "passive", "GOMP_SPINCOUNT", "0"),
    ("GOMP_SPINCOUNT", "12345", "GOMP_SPINCOUNT", "12345"),
])
def test_a_users_wait_policy_is_not_overridden(var, value, shown_key, shown_value):
    info, shown = _child(**{var: value})
    assert info["source"] == "user" and info["spincount"] is None, info
    assert f"{var}={value}" in info["detail"]
    assert info["env"][var] == value
    assert shown[shown_key] == shown_value, shown


def test_libgomp_loaded_first_is_reported_and_left_alone():
    info, shown = _child("gomp-first")
    assert info["source"] == "preloaded" and info["spincount"] is None, info
    assert "import convc first" in info["detail"] and "libgomp" in info["detail"]
    assert shown["GOMP_SPINCOUNT"] == "300000", shown                                # libgomp's own default


def test_omp_num_threads_is_kept():
    info, shown = _child(OMP_NUM_THREADS="1")
    assert info["threads"] == 1 and shown["OMP_NUM_THREADS"] == "1"
    assert info["source"] == "convc"


def test_set_num_threads_changes_get_num_threads():
    before = cc.get_num_threads()
    try:
        for n in (1, 3, 2):
            cc.set_num_threads(n)
            assert cc.get_num_threads() == n
    finally:
        cc.set_num_threads(before)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ConvcError, match="positive int"):
            cc.set_num_threads(bad)


def test_loaded_libgomp_and_the_probe():
    assert threads.loaded_libgomp() is not None          # this process: convc or torch loaded it
    spin, trip = threads.measure(rounds=8)
    assert 0 < spin < 1e5 and 0 < trip < 1e9


# -- the busy processes -------------------------------------------------------------------------

def _state(pid: int) -> str | None:
    """The process's state letter (R, S, Z, ...), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])            # utime + stime


def _gone(pids, timeout=20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_state(p) in (None, "Z") for p in pids):
            return True
        time.sleep(0.05)
    return False


def test_busy_load_spins_then_stops():
    with bench.busy_load(2, seconds=120) as pids:
        assert len(pids) == 2 and len(set(pids)) == 2
        first = [_cpu_ticks(p) for p in pids]
        time.sleep(0.5)
        assert all(_state(p) in ("R", "S") for p in pids)
        assert all(_cpu_ticks(p) > t for p, t in zip(pids, first)), "the busy processes do not use the CPU"
    assert all(_state(p) is None for p in pids), [_state(p) for p in pids]      # stopped and reaped


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_busy_load_stops_its_processes_when_the_block_raises(error):
    with pytest.raises(error):
        with bench.busy_load(1, seconds=120) as pids:
            raise error("boom")
    assert all(_state(p) is None for p in pids)


def test_busy_processes_stop_by_themselves():
    with bench.busy_load(1, seconds=0.5) as pids:
        assert _gone(pids), "a busy process outlived its seconds"
    # a bench killed outright: its busy processes notice their parent is gone
    script = ("import sys, time\nfrom convc import bench\nwith bench.busy_load(2, seconds=120) as pids:\n"
              "    print(*pids, flush=True)\n    time.sleep(120)\n")
    proc = subprocess.Popen([PYTHON, "-c", script], stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        orphans = [int(p) for p in proc.stdout.readline().split()]
        assert len(orphans) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert _gone(orphans), [_state(p) for p in orphans]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_busy_load_arguments():
    for bad in ({"processes": 0}, {"processes": 1, "seconds": 0}, {"processes": 1.5}):
        with pytest.raises(ConvcError, match="busy_load"):
            with bench.busy_load(**bad):
                pass
    assert bench.load_processes() == len(os.sched_getaffinity(0))


# -- convc bench --under-load ---------------------------------------------------------------------

def test_under_load_stops_the_processes_when_the_bench_fails(monkeypatch):
    seen = []
    real = bench.busy_load

    def recording(*a, **k):
        cm = real(*a, **k)

        class Wrap:
            def __enter__(self):
                pids = cm.__enter__()
                seen.extend(pids)
                return pids

            def __exit__(self, *exc):
                return cm.__exit__(*exc)
        return Wrap()
    monkeypatch.setattr(bench, "busy_load", recording)

    def broken(self, case):
        raise RuntimeError("the bench broke")
    monkeypatch.setattr(bench.Runner, "run_case", broken)
    with pytest.raises(RuntimeError, match="the bench broke"):
        bench.run(cases="lenet5_b1", threads=[1, 2], quick=True, under_load=True)
    assert len(seen) == bench.load_processes() and all(_state(p) is None for p in seen)


def test_under_load_needs_more_than_one_thread():
    with pytest.raises(ConvcError, match="--under-load compares"):
        bench.run(cases="lenet5_b1", threads=[1], quick=True, under_load=True)


def test_cli_under_load_quick(tmp_path):
    out = tmp_path / "load.json"
    proc = subprocess.run([PYTHON, "-m", "convc", "bench", "--quick", "--under-load", "--cases", "r18_3x3_64_b1",
                           "--threads", "2", "--json", str(out)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "under load: " in proc.stdout and "busy processes" in proc.stdout and "OpenMP: " in proc.stdout
    assert "under load (time at N threads over time at 1 thread" in proc.stdout
    data = json.loads(out.read_text())
    one, two = data["rows"]
    assert (one["threads"], two["threads"]) == (1, 2) and one["status"] == two["status"] == "ok"
    (entry,) = data["under_load"]
    assert entry["case"] == "r18_3x3_64_b1" and entry["threads"] == 2
    assert entry["convc"] == pytest.approx(two["convc_ms"] / one["convc_ms"])
    assert entry["pass"] == (entry["convc"] <= bench.LOAD_TARGET)
    (target,) = [t for t in two["targets"] if t["target"].startswith("under load")]
    assert target["pass"] == entry["pass"]
    if two["torch_ms"] is not None:
        assert entry["torch"] == pytest.approx(two["torch_ms"] / one["torch_ms"])
    assert f"{data['header']['under_load']}".startswith(f"{bench.load_processes()} busy processes")


def test_load_summary_and_table_on_made_up_rows():
    rows = [bench.Row("a", "layer", 1, convc_ms=2.0, torch_ms=1.0, ort_ms=1.0),
            bench.Row("a", "layer", 2, convc_ms=2.4, torch_ms=3.0),
            bench.Row("b", "layer", 1, convc_ms=1.0),
            bench.Row("b", "layer", 2, convc_ms=1.5),
            bench.Row("c", "layer", 1, status="FAILED"),
            bench.Row("c", "layer", 2, status="FAILED"),
            bench.Row("lenet5_load_cached", "compile", None, convc_ms=1.0)]
    bench.judge_load(rows)
    assert [t["value"] for t in rows[1].targets] == ["1.20x"] and rows[1].targets[0]["pass"]
    assert rows[3].targets[0]["pass"] is False and rows[0].targets == [] and rows[5].targets == []
    a, b, c = bench.load_summary(rows)
    assert (a["convc"], a["torch"], a["ort"], a["pass"]) == (pytest.approx(1.2), pytest.approx(3.0), None, True)
    assert b["convc"] == pytest.approx(1.5) and not b["pass"]
    assert c["convc"] is None and c["status"] == "FAILED" and not c["pass"]
    header = dict(cpu="Test CPU", cores=2, load="0", compiler="cc", versions={}, fma_peak={}, fma_detail="",
                  openmp="GOMP_SPINCOUNT=100 set by convc", under_load="2 busy processes")
    text = bench.Report(header, rows, [], {}).table()
    assert "OpenMP: GOMP_SPINCOUNT=100" in text and "under load: 2 busy processes" in text
    load_table = text.split("under load (time at N threads")[1].splitlines()
    line = next(ln for ln in load_table if ln.startswith("b "))
    assert line.split()[2:] == ["1.00", "1.50", "1.50x", "n/a", "n/a", "miss", "<=1.3x"], line
    assert bench.Report(dict(header, under_load=None), rows, [], {}).to_json()["under_load"] is None


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))

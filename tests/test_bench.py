"""``convc bench`` in quick mode: the table, the numbers, the MAC count, the
correctness gate, missing peers, and the command line."""
from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pytest

from convc import bench
from convc.errors import ConvcError
from convc.runtime.module import CModule
from helpers import PYTHON, subprocess_env

COLUMNS = ["case", "threads", "MFLOP", "convc ms", "GFLOP/s", "% peak", "torch ms", "x torch", "ORT ms", "x ORT",
           "target"]
CASES = "resnet3x3_s2,resnet3x3_s2:dw,lenet5_b1,lenet5_load_cached"


@pytest.fixture(scope="module")
def report():
    return bench.run(cases=CASES, threads=[1], quick=True)


def _row(report, name):
    (row,) = [r for r in report.rows if r.case == name]
    return row


def test_table_has_the_columns_and_every_case(report):
    text = report.table()
    header = text.splitlines()[text.splitlines().index("") + 1]
    positions = [header.index(c) for c in COLUMNS]
    assert positions == sorted(positions), header
    for name in CASES.split(","):
        assert any(line.startswith(name + " ") for line in text.splitlines()), name
    assert "FMA peak:" in text and "machine:" in text and "versions:" in text
    md = report.table(markdown=True)
    assert "| " + " | ".join(COLUMNS) + " |" in md
    assert md.count("\n| resnet3x3_s2 |") == 1


def test_times_are_finite_and_positive(report):
    assert not report.failed, report.notes
    assert {r.case for r in report.rows} == set(CASES.split(","))
    for r in report.rows:
        assert r.status == "ok"
        assert math.isfinite(r.convc_ms) and r.convc_ms > 0, r
        assert r.error is not None and r.error <= bench.RTOL, r
        for peer in (r.torch_ms, r.ort_ms):
            assert peer is None or (math.isfinite(peer) and peer > 0), r
    peak = report.header["fma_peak"]["1"]
    assert 0.5 < peak < 1000, f"implausible FMA peak {peak} GFLOP/s"
    row = _row(report, "resnet3x3_s2")
    assert row.gflops == pytest.approx(2 * row.macs / (row.convc_ms / 1e3) / 1e9)
    assert row.pct_peak == pytest.approx(100 * row.gflops / peak)
    if row.torch_ms is not None:
        assert row.x_torch == pytest.approx(row.torch_ms / row.convc_ms)
    cached = _row(report, "lenet5_load_cached")
    assert cached.threads is None and cached.targets and cached.targets[0]["target"] == "<50 ms"


def test_macs_are_the_analytic_count(report):
    """ResNet 3x3 stride 2 (quick sizes): N * C_out * H_out * W_out * C_in * 9,
    with H_out by DESIGN.md's output-size formula; its kernel gradient does
    the same multiplications per batch element."""
    layer = next(la for la in bench.LAYERS if la.name == "resnet3x3_s2")
    c_in, c_out, (h, w), groups = layer.dims(quick=True)
    out = [(n + 2 * layer.padding - layer.dilation * (k - 1) - 1) // layer.stride + 1
           for n, k in zip((h, w), layer.kernel)]
    per_image = c_out * out[0] * out[1] * (c_in // groups) * layer.kernel[0] * layer.kernel[1]
    assert _row(report, "resnet3x3_s2").macs == 1 * per_image
    assert _row(report, "resnet3x3_s2:dw").macs == 2 * per_image      # quick gradient batch is 2
    assert _row(report, "resnet3x3_s2").mflop == pytest.approx(2 * per_image / 1e6)


def test_wrong_output_is_reported_failed_not_timed(monkeypatch):
    real_run = CModule.run

    def off_by_a_bit(self, feeds):
        return {k: v * 1.01 for k, v in real_run(self, feeds).items()}
    monkeypatch.setattr(CModule, "run", off_by_a_bit)
    rep = bench.run(cases="mbnet_pw1x1", threads=[1], quick=True)
    (row,) = rep.rows
    assert row.status == "FAILED" and row.convc_ms is None and row.gflops is None
    assert rep.failed == ["mbnet_pw1x1"]
    assert any("mbnet_pw1x1 FAILED" in n and "differs from the reference" in n for n in rep.notes), rep.notes
    line = next(ln for ln in rep.table().splitlines() if ln.startswith("mbnet_pw1x1"))
    assert "FAILED" in line


def test_missing_peers_are_na_with_a_note(monkeypatch):
    real = bench._try_import
    monkeypatch.setattr(bench, "_try_import", lambda name: None if name in ("torch", "onnxruntime") else real(name))
    rep = bench.run(cases="lenet5_b1", threads=[1], quick=True)
    (row,) = rep.rows
    assert row.status == "ok" and row.convc_ms > 0
    assert row.torch_ms is None and row.ort_ms is None and row.targets == []
    assert any("torch is not installed" in n for n in rep.notes)
    assert any("onnxruntime is not installed" in n for n in rep.notes)
    line = next(ln for ln in rep.table().splitlines() if ln.startswith("lenet5_b1"))
    assert line.split().count("n/a") == 4
    assert rep.header["versions"]["torch"] == "not installed"


def test_median_time_runs_warmup_then_enough_runs():
    calls = []
    s = bench.Settings(warmup=2, min_runs=4, repeat_seconds=0.0)
    t = bench.median_time(lambda: calls.append(1), s)
    assert len(calls) == 6 and t >= 0


def test_bad_arguments_are_convc_errors():
    with pytest.raises(ConvcError, match="no case matches 'nosuchcase'"):
        bench.select(bench.suite(), "nosuchcase")
    for bad in ("0", "a,2", ","):
        with pytest.raises(ConvcError, match="--threads"):
            bench.parse_threads(bad)
    assert bench.parse_threads("2,1,2") == [1, 2]
    assert [c.name for c in bench.select(bench.suite(), "conv1d*")] == ["conv1d_k5", "conv1d_k5:dw", "conv1d_k5:dx"]
    assert bench.check_close(np.ones(3), np.ones(3)) == 0
    with pytest.raises(bench.Mismatch):
        bench.check_close(np.array([1.0, np.nan]), np.ones(2))


def test_cli(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([PYTHON, "-m", "convc", "bench", "--quick", "--cases", "dilated3x3_d2", "--threads", "1",
                           "--json", str(out)], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "FMA peak:" in proc.stdout and "dilated3x3_d2" in proc.stdout
    for c in COLUMNS:
        assert c in proc.stdout
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert row["case"] == "dilated3x3_d2" and row["status"] == "ok" and row["convc_ms"] > 0

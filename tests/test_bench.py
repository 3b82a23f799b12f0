"""``convc bench`` in quick mode: the table, the numbers, the MAC count, the
correctness gate, missing peers, and the command line; the models section's
logic (targets, geometric means, tables, failure rows) on made-up rows, end
to end on tiny torch models, and on real torchvision models with
CONVC_BENCH_MODELS=1."""
from __future__ import annotations

import json
import math
import os
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


class BenchParser:
    """``convc bench``'s options, parsed by the one parser of convc.cli."""

    @staticmethod
    def parse_args(argv):
        from convc.cli import build_parser
        return build_parser().parse_args(["bench", *argv])


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


MODEL_LAYERS = {"r18": ["3x3_64", "3x3_128", "3x3s2_64_128", "1x1s2_64_128", "stem7x7"],
                "mbv2": ["dw3x3_144", "dw3x3s2_144", "pw1x1_24_144"]}


def test_model_layer_cases_are_listed_and_selected(capsys):
    full, quick = bench.suite(), bench.suite(quick=True)
    for prefix, layers in MODEL_LAYERS.items():
        want = [f"{prefix}_{n}_b{b}" for n in layers for b in bench.LAYER_BATCHES]
        assert [c.name for c in bench.select(full, prefix)] == want
        assert [c.name for c in bench.select(quick, prefix)] == want          # same names in the quick suite
    cases = {c.name: c for c in full}
    assert all(c.group == "layer" and ":" not in c.name for n, c in cases.items() if n.startswith(("r18", "mbv2")))
    assert cases["r18_3x3s2_64_128_b8"].description.endswith("64->128 channels at 56x56, stride 2, pad 1, batch 8")
    assert cases["r18_stem7x7_b1"].description.endswith("3->64 channels at 224x224, stride 2, pad 3, batch 1")
    assert cases["mbv2_dw3x3_144_b1"].description.endswith("144 channels at 56x56, stride 1, pad 1, batch 1")
    assert cases["mbv2_pw1x1_24_144_b8"].description.endswith("24->144 channels at 56x56, stride 1, pad 0, batch 8")
    assert {c.name: c for c in quick}["r18_3x3_64_b8"].description.endswith(f"batch {bench.QUICK_BATCH}")
    # the earlier cases keep their names, batches and gradients
    for name in ("resnet3x3_s1", "resnet3x3_s2:dw", "mbnet_dw3x3:dx", "grouped3x3_g8"):
        assert name in cases
    assert cases["resnet3x3_s1"].description.endswith(f"batch {bench.FORWARD_BATCH}")
    assert cases["resnet3x3_s1:dw"].description.endswith(f"batch {bench.GRAD_BATCH}")
    p = BenchParser()
    assert bench.cmd_bench(p.parse_args(["--list", "--cases", "r18"])) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 10 and out[0].startswith("r18_3x3_64_b1 ") and "batch 1" in out[0]


def test_model_layer_cases_run_against_torch():
    """Three new cases end to end (quick sizes): checked against their PyTorch
    twin before timing; MACs by the output-size formula at the case's batch."""
    names = ["r18_1x1s2_64_128_b8", "mbv2_dw3x3s2_144_b8", "r18_stem7x7_b1"]
    rep = bench.run(cases=",".join(names), threads=[1], quick=True)
    assert not rep.failed, rep.notes
    for name in names:
        row = _row(rep, name)
        layer = next(la for la in bench.LAYERS if la.name == name)
        c_in, c_out, size, groups = layer.dims(quick=True)
        out = [(n + 2 * layer.padding - layer.dilation * (k - 1) - 1) // layer.stride + 1
               for n, k in zip(size, layer.kernel)]
        batch = layer.batch_for("fwd", quick=True)
        assert batch == min(int(name[-1]), bench.QUICK_BATCH)
        assert row.macs == batch * c_out * math.prod(out) * (c_in // groups) * math.prod(layer.kernel), name
        assert row.status == "ok" and row.error <= bench.RTOL and row.convc_ms > 0
        if bench._try_import("torch") is not None:
            assert row.torch_ms > 0, name                    # the twin ran, so the check was against it


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


# -- the models section ------------------------------------------------------------------------------

def _model_row(name, threads, convc=None, ort=None, torch=None, status="ok", reason=None):
    r = bench.Row(name, "model", threads, macs=10**9, convc_ms=convc, ort_ms=ort, torch_ms=torch, status=status,
                  reason=reason)
    if convc and ort:
        r.x_ort = ort / convc
    if convc and torch:
        r.x_torch = torch / convc
    if status == "ok":
        bench.Runner.judge(bench.Case(name, "model", name), r)
    return r


def _model_report(rows, notes=()):
    header = dict(cpu="Test CPU", isa="avx2 fma", cores=2, load="0.00 at start", compiler="cc 12",
                  versions={"convc": "0.1.0"}, fma_peak={"1": 100.0, "2": 200.0}, fma_detail="avx2 fma kernel",
                  settings=None, models="float32, batch 1", quick=False)
    return bench.Report(header, rows, list(notes), {r.case: f"the {r.case} model" for r in rows})


MODEL_ROWS = [
    _model_row("a", 1, convc=2.0, ort=2.0, torch=4.0),            # 1.00x ORT
    _model_row("b", 1, convc=4.0, ort=2.0, torch=2.0),            # 2.00x ORT: worst
    _model_row("c", 1, status="unsupported", reason="import: 3 unsupported nodes: HardSwish x3"),
    _model_row("a", 2, convc=1.0, ort=1.25, torch=2.0),           # 0.80x
    _model_row("b", 2, convc=1.0, ort=1.0),                       # 1.00x, torch n/a
    _model_row("c", 2, status="unsupported", reason="import: 3 unsupported nodes: HardSwish x3"),
]


def test_geomean():
    assert bench.geomean([]) is None
    assert bench.geomean([2.0]) == pytest.approx(2.0)
    assert bench.geomean([1.0, 4.0]) == pytest.approx(2.0)
    assert bench.geomean([0.5, 2.0, 1.0]) == pytest.approx(1.0)


def test_model_rows_are_judged_against_ort():
    a, b = MODEL_ROWS[0], MODEL_ROWS[1]
    assert a.vs_ort == pytest.approx(1.0) and a.vs_torch == pytest.approx(0.5)
    assert [(t["target"], t["pass"]) for t in a.targets] == [("<=1.25x ORT", True), ("goal <=0.8x ORT", False)]
    assert [t["pass"] for t in b.targets] == [False, False] and b.targets[0]["value"] == "2.00x"
    fast = _model_row("f", 1, convc=0.7, ort=1.0)
    assert [t["pass"] for t in fast.targets] == [True, True]
    assert _model_row("n", 1, convc=1.0).targets == []             # ORT n/a: nothing to judge


def test_model_summary_geomean_worst_and_left_out():
    one, two = bench.model_summary(MODEL_ROWS)
    assert one["threads"] == 1 and one["models"] == 2 and one["of"] == 3
    assert one["geomean_ort"] == pytest.approx(2 ** 0.5)
    assert one["geomean_torch"] == pytest.approx(1.0)              # 0.5x and 2x
    assert (one["worst"], one["worst_ort"]) == ("b", pytest.approx(2.0))
    assert one["left_out"] == {"c": "unsupported"}
    assert [(t["target"], t["pass"]) for t in one["targets"]] == [
        ("geomean <=1x ORT", False), ("every model <=1.25x ORT", False), ("goal: every model <=0.8x ORT", False)]
    assert two["geomean_ort"] == pytest.approx(0.8 ** 0.5) and two["worst"] == "b"
    assert two["geomean_torch"] == pytest.approx(0.5)              # b has no torch time
    assert [t["pass"] for t in two["targets"]] == [True, True, False]
    # a model whose ORT time is missing is left out of the mean, and said so
    (only,) = bench.model_summary([_model_row("z", 1, convc=1.0)])
    assert only["geomean_ort"] is None and only["targets"] == [] and only["left_out"] == {"z": "ORT n/a"}
    assert bench.model_summary([bench.Row("x", "layer", 1)]) == []


def test_models_table_plain_and_markdown():
    rows = [bench.Row(r.case, r.group, r.threads, **{k: getattr(r, k) for k in (
        "macs", "convc_ms", "ort_ms", "torch_ms", "x_ort", "x_torch", "status", "reason", "targets")})
        for r in MODEL_ROWS]
    rows[0].profile = dict(total_ms=1.5, runs=7, count=12, nodes=[
        dict(node="conv1.relu.gemm", op="matmul", shape="1x64x56x56", ms=1.0, pct=66.7),
        dict(node="pool", op="max_pool", shape="1x64x28x28", ms=0.5, pct=33.3)])
    rep = _model_report(rows)
    text = rep.table()
    lines = text.splitlines()
    assert lines[0].startswith("machine: Test CPU") and "ISA: avx2 fma" in text and "FMA peak: 100.0" in text
    header = next(ln for ln in lines if ln.startswith("model "))
    cols = ["model", "threads", "GFLOP", "convc ms", "ORT ms", "torch ms", "convc/ORT", "convc/torch", "% peak",
            "target / status"]
    assert [header.index(c) for c in cols] == sorted(header.index(c) for c in cols)
    assert "case " not in text.split("models (")[0]                 # no empty cases table
    b1 = next(ln for ln in lines if ln.split()[:2] == ["b", "1"])
    assert "2.00x" in b1 and "miss <=1.25x ORT (2.00x)" in b1
    c_lines = [ln for ln in lines if ln.startswith("c ")]
    assert len(c_lines) == 2 and "unsupported: import: 3 unsupported nodes: HardSwish x3" in c_lines[0]
    assert c_lines[1].rstrip().endswith("unsupported (as above)")
    assert "models, 1 thread: miss geomean <=1x ORT (1.41x)" in text
    assert "left out: c (unsupported)" in text and "over 2 of 3 models" in text
    assert "models, 2 threads: pass geomean <=1x ORT (0.89x)" in text
    assert "conv1.relu.gemm" in text and "a, 1 thread: 1.500 ms in 12 nodes" in text
    assert not rep.failed                                          # unsupported is not a failure
    md = rep.table(markdown=True)
    assert "| " + " | ".join(cols) + " |" in md and "| a | 1 |" in md and "- models, 1 thread:" in md
    assert "| node | op | shape | ms | % |" in md
    data = json.loads(json.dumps(rep.to_json()))
    assert data["models"][0]["geomean_ort"] == pytest.approx(2 ** 0.5)
    assert data["rows"][2]["status"] == "unsupported" and data["rows"][0]["profile"]["nodes"][0]["op"] == "matmul"


def test_failed_model_fails_the_report():
    rep = _model_report([_model_row("m", 1, status="FAILED", reason="compile: CompileError: boom")])
    assert rep.failed == ["m"]
    line = next(ln for ln in rep.table().splitlines() if ln.startswith("m "))
    assert "FAILED" in line and "compile: CompileError: boom" in line


def test_choose_models_and_the_command_line(capsys):
    names = [m.name for m in bench.MODELS]
    assert names == ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "squeezenet1_1",
                     "shufflenet_v2_x0_5"]
    assert [c.name for c in bench.choose(models="*")] == names
    assert [c.name for c in bench.choose(models="all")] == names
    assert [c.name for c in bench.choose(models="resnet18,mobilenet*")] == names[:3]
    assert [c.name for c in bench.choose(models="mobilenet")] == names[1:3]
    assert [c.name for c in bench.choose("lenet5_b1", "squeeze")] == ["lenet5_b1", "squeezenet1_1"]
    assert all(c.group == "model" and c.rtol == bench.MODEL_RTOL for c in bench.choose(models="*"))
    assert "3x224x224" in bench.choose(models="resnet18")[0].description
    assert "3x64x64" in bench.choose(models="resnet18", quick=True)[0].description
    assert [c.name for c in bench.choose()] == [c.name for c in bench.suite()]
    with pytest.raises(ConvcError, match="no case matches 'nosuchnet'"):
        bench.choose(models="nosuchnet")
    p = BenchParser()
    args = p.parse_args(["--models", "--quick"])
    assert args.models == "*" and args.quick and args.profile == 0
    args = p.parse_args(["--models", "resnet18", "--profile"])
    assert args.models == "resnet18" and args.profile == 10
    assert p.parse_args(["--profile", "3"]).profile == 3 and p.parse_args([]).models is None
    assert bench.cmd_bench(p.parse_args(["--list", "--models", "resnet*"])) == 0
    out = capsys.readouterr().out
    assert out.startswith("resnet18 ") and len(out.splitlines()) == 1
    assert bench.cmd_bench(p.parse_args(["--list"])) == 0
    out = capsys.readouterr().out
    assert "lenet5_b1 " in out and "(--models) " in out and "shufflenet_v2_x0_5" in out


def test_import_summary():
    from convc.onnx import OnnxImportError
    e = OnnxImportError("m", [("Split", "s1", "op Split is not supported"), ("HardSwish", "h", "op HardSwish is "
                              "not supported"), ("Split", "s2", "op Split is not supported")])
    assert bench.import_summary(e) == "3 unsupported nodes: Split x2, HardSwish x1 (op Split is not supported)"


# End to end on tiny torch models (torch and onnxscript, from the test extra; ONNX Runtime if installed).

def _tiny_models():
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    nn = torch.nn

    class CumSum(nn.Module):                # an op convc does not import: the row says so
        def forward(self, x):
            return torch.cumsum(x, 3)

    def tiny_cnn():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(16, 10))
    return (bench.TorchModel("tiny_cnn", "two convs and a classifier", build=tiny_cnn, quick_size=(3, 16, 16)),
            bench.TorchModel("tiny_cumsum", "a cumulative sum", build=CumSum, quick_size=(3, 4, 4)))


@pytest.fixture(scope="module")
def tiny_models():
    return _tiny_models()


def test_models_section_end_to_end(monkeypatch, tiny_models):
    monkeypatch.setattr(bench, "MODELS", tiny_models)
    rep = bench.run(models="*", threads=[1], quick=True, profile=3)
    ok, unsupported = rep.rows
    assert ok.case == "tiny_cnn" and ok.status == "ok", (ok, rep.notes)
    assert ok.error is not None and ok.error <= bench.MODEL_RTOL
    assert ok.convc_ms > 0 and ok.torch_ms > 0 and ok.x_torch == pytest.approx(ok.torch_ms / ok.convc_ms)
    assert ok.macs > 0
    if bench._try_import("onnxruntime") is not None:
        assert ok.ort_ms > 0 and ok.vs_ort == pytest.approx(ok.convc_ms / ok.ort_ms)
        assert [t["target"] for t in ok.targets] == ["<=1.25x ORT", "goal <=0.8x ORT"]
        assert rep.models[0]["geomean_ort"] == pytest.approx(ok.vs_ort)
    assert len(ok.profile["nodes"]) <= 3 and ok.profile["count"] >= len(ok.profile["nodes"]) > 0
    assert sum(n["pct"] for n in ok.profile["nodes"]) <= 100.01 and ok.profile["total_ms"] > 0
    assert unsupported.status == "unsupported" and "CumSum" in unsupported.reason, unsupported
    assert unsupported.reason.startswith("import: ") and unsupported.convc_ms is None
    # without onnxruntime the model that ran is left out of the ORT summary too, and says why
    no_ort = {} if bench._try_import("onnxruntime") is not None else {"tiny_cnn": "ORT n/a"}
    assert not rep.failed and rep.models[0]["left_out"] == {"tiny_cumsum": "unsupported", **no_ort}
    text = rep.table()
    assert "models (time ratios" in text and "tiny_cnn, 1 thread:" in text and "machine:" in text
    assert "torch.onnx.export(dynamo=True" in text
    json.dumps(rep.to_json())
    # the export is cached: a second run does not export again
    msgs = []
    bench.run(models="tiny_cnn", threads=[1], quick=True, progress=msgs.append)
    assert not any("torch.onnx.export" in m for m in msgs), msgs


def test_model_mismatch_is_a_failed_row(monkeypatch, tiny_models):
    monkeypatch.setattr(bench, "MODELS", tiny_models[:1])
    real_run = CModule.run
    monkeypatch.setattr(CModule, "run", lambda self, feeds: {k: v * 1.001 for k, v in real_run(self, feeds).items()})
    rep = bench.run(models="tiny_cnn", threads=[1], quick=True)
    (row,) = rep.rows
    assert row.status == "FAILED" and row.convc_ms is None and rep.failed == ["tiny_cnn"]
    assert "Mismatch" in row.reason and "allowed 1e-04" in row.reason, row.reason


def test_missing_torch_makes_model_rows_na(monkeypatch, tiny_models):
    monkeypatch.setattr(bench, "MODELS", tiny_models[:1])
    real = bench._try_import
    monkeypatch.setattr(bench, "_try_import", lambda name: None if name == "torch" else real(name))
    (row,) = bench.run(models="*", threads=[1], quick=True).rows
    assert row.status == "n/a" and "torch is not installed" in row.reason


def test_without_onnxruntime_models_are_checked_against_torch(monkeypatch, tiny_models):
    monkeypatch.setattr(bench, "MODELS", tiny_models[:1])
    real = bench._try_import
    monkeypatch.setattr(bench, "_try_import", lambda name: None if name == "onnxruntime" else real(name))
    rep = bench.run(models="*", threads=[1], quick=True)
    (row,) = rep.rows
    assert row.status == "ok" and row.error <= bench.MODEL_RTOL and row.ort_ms is None and row.targets == []
    assert rep.models[0]["left_out"] == {"tiny_cnn": "ORT n/a"}
    assert "no model timed against ORT" in rep.table()


@pytest.mark.skipif(os.environ.get("CONVC_BENCH_MODELS", "") in ("", "0"),
                    reason="real torchvision models take minutes: set CONVC_BENCH_MODELS=1")
def test_real_models():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    try:
        bench.torchvision_models()
    except ImportError:
        pytest.skip("torchvision is not installed (pip install '.[bench]')")
    rep = bench.run(models="resnet18,mobilenet_v3_small", threads=[1], quick=True, profile=5)
    resnet, v3 = rep.rows
    assert resnet.status == "ok" and resnet.error <= bench.MODEL_RTOL and resnet.ort_ms > 0, (resnet, rep.notes)
    assert resnet.profile and resnet.profile["nodes"]
    assert v3.status == "ok" or (v3.status == "unsupported" and "Hard" in v3.reason), v3
    print(rep.table())


def test_tune_times_the_tuned_and_the_untuned_build(tmp_path, monkeypatch):
    """--tune: each case graph is tuned into the host's database first, and
    every row times the untuned build beside the tuned one and judges it."""
    from convc import tuning

    monkeypatch.setenv("CONVC_CACHE_DIR", str(tmp_path))
    tuning._loaded.clear()
    rep = bench.run(cases="resnet3x3_s2,resnet3x3_s2:dx", threads=[1], quick=True, tune=5)
    for r in rep.rows:
        assert r.status == "ok" and r.untuned_ms > 0 and r.convc_ms > 0
        assert any(t["target"] == f"untuned <={bench.UNTUNED_TARGET:g}x tuned" for t in r.targets)
    text = rep.table()
    assert "untuned ms" in text and "untuned/tuned" in text and "tuned by cc.tune" in text
    saved = json.loads(tuning.db_path().read_text())["entries"]
    assert any(k.startswith("conv ") for k in saved) and any(k.startswith("conv_grad_input ") for k in saved)
    tuning._loaded.clear()
    with pytest.raises(ConvcError, match="--tune"):
        bench.run(cases="resnet3x3_s2", threads=[1], quick=True, tune=0)

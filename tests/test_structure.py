"""How convc's command line and modules fit together (issue 17, item 5):
every module imports alone in a fresh interpreter (no import cycle between
the ONNX package, the export and model loading); one parser and one
``main`` (``convc.cli``); ``python -m convc.onnx.conformance`` runs; the
one timing helper (``convc.timing``) times functions in turn."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

import convc
from convc import timing
from convc.cli import build_parser, main
from convc.errors import ConvcError

MODULES = ["convc.onnx", "convc.onnx.importer", "convc.onnx.converters", "convc.onnx.quantized",
           "convc.onnx.exporter", "convc.onnx.validate", "convc.onnx.conformance", "convc.export", "convc.loading",
           "convc.cli", "convc.timing", "convc.bench"]


def test_each_module_imports_alone():
    """One fresh interpreter per module: an import cycle (a name used before
    its module finished) fails here whatever was imported first."""
    for m in MODULES:
        run = subprocess.run([sys.executable, "-c", f"import {m}"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, f"import {m}:\n{run.stderr[-2000:]}"


def test_onnx_package_keeps_its_public_api():
    import convc.onnx as onnx_pkg
    assert convc.from_onnx is onnx_pkg.from_onnx and convc.to_onnx is onnx_pkg.to_onnx
    for name in onnx_pkg.__all__:
        assert getattr(onnx_pkg, name) is not None
    # the converters register on import of the package: float, quantized and Resize ones
    conv = onnx_pkg.importer._CONVERTERS
    assert {"Conv", "QLinearConv", "Resize", "com.microsoft.QLinearAdd"} <= set(conv)
    assert {"conv", "qconv", "resize"} <= set(onnx_pkg.exporter._EXPORTERS)


def test_loading_does_not_import_onnx():
    """convc.loading imports the ONNX importer only inside load_model, for
    .onnx files (convc/__init__ imports the package for cc.from_onnx; loading
    itself must not need it at import time)."""
    src = pathlib.Path(convc.__file__).with_name("loading.py").read_text()
    top = [n for n in ast.parse(src).body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert top and not any("onnx" in (getattr(n, "module", "") or "") for n in top)


def test_one_main():
    """No command module but cli.py (and explain.py's hook, the lead's) defines
    main() or add_cli(); the conformance tool's -m entry is its own report."""
    pkg = pathlib.Path(convc.__file__).parent
    for f in sorted(pkg.rglob("*.py")):
        if f.name in ("cli.py", "explain.py", "__main__.py") or f.relative_to(pkg).as_posix() == "onnx/conformance.py":
            continue
        names = {n.name for n in ast.parse(f.read_text()).body if isinstance(n, ast.FunctionDef)}
        assert not names & {"main", "add_cli"}, f


def test_conformance_module_help():
    run = subprocess.run([sys.executable, "-m", "convc.onnx.conformance", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and "--target" in run.stdout, run.stderr


def test_every_command_is_in_the_one_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"demo", "run", "compile", "export", "bench", "passes", "tune", "quantize", "explain", "devices",
            "cache"} <= set(sub.choices)
    args = build_parser().parse_args(["bench", "--torch", "--repeats", "3", "--no-inductor", "--size", "32",
                                      "--net", "resnet18-style"])
    assert args.torch and args.repeats == 3 and args.no_inductor and args.size == 32


def test_bench_torch_options_are_checked(capsys):
    assert main(["bench", "--repeats", "3"]) == 2
    assert "--repeats is for --torch" in capsys.readouterr().err
    assert main(["bench", "--torch", "--net", "vgg"]) == 2
    assert "unknown --net vgg" in capsys.readouterr().err


def test_times_in_turn_interleaves():
    order = []
    times = timing.times_in_turn([lambda: order.append("a"), lambda: order.append("b")], min_rounds=4, seconds=0.0,
                                 warmup=2)
    assert order == ["a", "b"] * 6                      # 2 warm-up rounds, then 4 timed, one call of each per round
    assert [len(t) for t in times] == [4, 4] and all(x >= 0 for t in times for x in t)
    med, runs = timing.median_time(lambda: None, min_runs=7, seconds=0.0, warmup=0)
    assert runs == 7 and med >= 0
    assert timing.median_time(lambda: None, min_runs=3, seconds=10.0, max_runs=5)[1] == 5
    assert timing.median_iqr([1.0, 2.0, 3.0, 4.0, 100.0])[0] == 3.0


def test_error_is_convc_error():
    with pytest.raises(ConvcError):
        from convc.loading import load_model
        load_model("no_such_model_anywhere")

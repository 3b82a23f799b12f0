"""``convc run`` / ``convc compile`` (``convc.cli``) on an ONNX file
exported from PyTorch, ``convc export MODEL.onnx``, and -- in a brand-new
virtual environment with only ``pip install '.[onnx]'`` -- ``convc run`` end
to end."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
import torch
from helpers import REPO, assert_close, subprocess_env
from torch import nn

from convc.api import TARGETS
from convc.cli import main


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, 2, 1), nn.BatchNorm2d(6), nn.ReLU6(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(6 * 4 * 4, 5)).eval()


def _export(path, dynamic=False):
    net = _net()
    x = torch.randn(2, 3, 16, 16)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), buf, dynamo=False, input_names=["input.1"], output_names=["logits"],
                          dynamic_axes={"input.1": {0: "batch"}} if dynamic else None)
    path.write_bytes(buf.getvalue())
    with torch.no_grad():
        return x.numpy(), net(x).numpy()


@pytest.fixture
def model(tmp_path):
    x, want = _export(tmp_path / "net.onnx")
    np.save(tmp_path / "x.npy", x)
    return tmp_path, want


@pytest.mark.parametrize("target", ["c", "numpy"])
@pytest.mark.parametrize("form", ["path", "name=path"])
def test_run_writes_outputs_and_timings(model, capsys, target, form):
    d, want = model
    spec = str(d / "x.npy") if form == "path" else f"input.1={d / 'x.npy'}"
    assert main(["run", str(d / "net.onnx"), "--input", spec, "--target", target, "-o", str(d / "out")]) == 0
    out = capsys.readouterr().out
    assert_close(np.load(d / "out" / "logits.npy"), want, rtol=1e-4, atol=1e-5, what="logits.npy")
    assert f"wrote {d / 'out' / 'logits.npy'}  float32[2, 5]" in out
    assert f"target {target}: compile " in out and "(median of " in out


def test_run_dynamic_batch_takes_the_array_shape(tmp_path, capsys):
    x, want = _export(tmp_path / "dyn.onnx", dynamic=True)
    np.save(tmp_path / "x.npy", x)
    assert main(["run", str(tmp_path / "dyn.onnx"), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path)]) == 0
    assert_close(np.load(tmp_path / "logits.npy"), want, rtol=1e-4, atol=1e-5)


def test_run_errors(model, capsys):
    d, _ = model
    net = str(d / "net.onnx")
    cases = [(["--input", f"nope={d / 'x.npy'}"], "has no input 'nope'; its inputs are ['input.1']"),
             ([], "no array for input(s) ['input.1']"),
             (["--input", str(d / "missing.npy")], "cannot read"),
             (["--input", str(d / "x.npy"), "--target", "opencl"],
              None if "opencl" in TARGETS else "the opencl target is not available in this build")]
    np.save(d / "bad.npy", np.zeros((2, 3, 16, 16)))            # float64 where float32 is wanted
    cases.append((["--input", str(d / "bad.npy")], "has dtype float64, expected float32"))
    for extra, msg in cases:
        rc = main(["run", net, "-o", str(d / "o"), *extra])
        err = capsys.readouterr().err
        if msg is None:
            assert rc == 0, err
        else:
            assert rc == 2 and msg in err, (extra, err)


def test_run_bundled_model(tmp_path, capsys):
    # models that are not ONNX files load as `convc export` and `convc passes` load them
    import convc as cc
    from convc.models import lenet5
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["run", "lenet5", "-i", f"x={tmp_path / 'x.npy'}", "--target", "numpy", "-o", str(tmp_path)]) == 0
    assert_close(np.load(tmp_path / "logits.npy"), cc.compile(lenet5(), "numpy")(x=x), 0, 0)


def test_compile_prints_ir_and_cost(model, capsys):
    d, _ = model
    assert main(["compile", str(d / "net.onnx")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("graph main_graph {")
    for piece in ("= conv(%input.1", "= clip(", "= max_pool(", "= dense(", "output logits = %"):
        assert piece in out, piece
    assert "MACs" in out and "\ntotal " in out and "peak arena" in out and "compiled for c in" in out


def test_compile_symbolic_shape(tmp_path, capsys):
    _export(tmp_path / "dyn.onnx", dynamic=True)
    assert main(["compile", str(tmp_path / "dyn.onnx"), "--target", "none"]) == 2
    assert "--shape input.1=D0,D1,..." in capsys.readouterr().err
    assert main(["compile", str(tmp_path / "dyn.onnx"), "--shape", "input.1=4,3,16,16", "--target", "none"]) == 0
    assert "input() : float32[4,3,16,16]" in capsys.readouterr().out
    assert main(["compile", str(tmp_path / "dyn.onnx"), "--shape", "input.1=four"]) == 2


def test_convc_command(model):
    # through `python -m convc`: run, compile and export are subcommands of the one CLI
    d, want = model
    env = subprocess_env()
    run = subprocess.run([sys.executable, "-m", "convc", "run", str(d / "net.onnx"), "--input", str(d / "x.npy"),
                          "-o", str(d / "cli")], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert_close(np.load(d / "cli" / "logits.npy"), want, rtol=1e-4, atol=1e-5)
    comp = subprocess.run([sys.executable, "-m", "convc", "compile", str(d / "net.onnx"), "--target", "none"],
                          capture_output=True, text=True, env=env)
    assert comp.returncode == 0 and "= conv(" in comp.stdout, comp.stderr
    exp = subprocess.run([sys.executable, "-m", "convc", "export", str(d / "net.onnx"), "-o", str(d / "lib"),
                          "--name", "net"], capture_output=True, text=True, env=env)
    assert exp.returncode == 0, exp.stderr
    assert (d / "lib" / "net.c").exists() and (d / "lib" / "net.h").exists()


@pytest.mark.slow
def test_fresh_install_with_onnx_extra_runs_a_torch_model(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"{REPO}[onnx]"], capture_output=True,
                         text=True)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    x, want = _export(tmp_path / "net.onnx")
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, CONVC_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("PYTHONPATH", None)
    run = subprocess.run([str(venv / "bin" / "convc"), "run", "net.onnx", "--input", "x.npy", "-o", "out"],
                         capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert_close(np.load(tmp_path / "out" / "logits.npy"), want, rtol=1e-4, atol=1e-5, what="fresh install")
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import convc, onnx; print(convc.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env)
    assert str(venv) in where.stdout
    onnx.load(str(tmp_path / "net.onnx"))

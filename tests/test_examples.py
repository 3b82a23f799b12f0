"""Every script in examples/ runs from a clean directory and reports success."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run_example(name, tmp_path, *args):
    env = dict(os.environ, CONVC_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_quickstart(tmp_path):
    out = run_example("quickstart.py", tmp_path)
    err = float(out.split("max |C - reference| =")[1].split()[0])
    assert err < 1e-5


def test_sobel_writes_png_and_matches_full_kernel(tmp_path):
    out = run_example("sobel.py", tmp_path, str(tmp_path / "edges.png"))
    assert "max difference 0.0" in out or float(out.split("max difference")[1].split()[0]) < 1e-5
    assert (tmp_path / "edges.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_separable_cost_prints_the_worked_example(tmp_path):
    out = run_example("separable_cost.py", tmp_path)
    line = next(ln for ln in out.splitlines() if ln.startswith("multiplications"))
    assert line.split()[1:] == ["86,400", "10,275"]
    assert out.count("matches the reference: True") == 2


def test_upsampler_output_size(tmp_path):
    out = run_example("upsampler.py", tmp_path)
    assert "output_size=7x7: output_padding=(0, 0) -> y (1, 2, 7, 7)" in out
    assert "output_size=8x8: output_padding=(1, 1) -> y (1, 2, 8, 8)" in out
    assert "reachable sizes are [7, 8]" in out




def _need_sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        if os.environ.get("CONVC_REQUIRE_EXAMPLES") == "1":
            raise
        pytest.skip("scikit-learn missing: pip install '.[examples]'")


def test_train_digits_reaches_97_percent(tmp_path):
    _need_sklearn()
    out = run_example("train_digits.py", tmp_path)
    acc = float(out.split("test accuracy:")[1].split("%")[0])
    assert acc >= 97.0


def test_autoencoder_error_falls_and_png_written(tmp_path):
    _need_sklearn()
    out = run_example("autoencoder.py", tmp_path, str(tmp_path / "ae.png"))
    line = out.split("reconstruction error fell from")[1].splitlines()[0]
    first, last = (float(v) for v in line.split(" to "))
    assert last < first / 2
    assert (tmp_path / "ae.png").read_bytes()[:4] == b"\x89PNG"


def test_train_step_timing_runs(tmp_path):
    out = run_example("train_step_vs_torch.py", tmp_path)
    assert "convc (generated C, 1 thread)" in out and "PyTorch eager" in out

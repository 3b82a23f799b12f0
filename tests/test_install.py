"""A plain (non-editable) `pip install .` into a brand-new venv must carry the
templates inside the wheel and run `convc demo` end to end."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_fresh_venv_install_runs_demo(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = venv / "bin" / "pip"
    proc = subprocess.run([str(pip), "install", "-q", str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    env = dict(os.environ, CONVC_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("PYTHONPATH", None)
    # run from an unrelated directory so the source tree cannot be imported
    run = subprocess.run([str(venv / "bin" / "convc"), "demo"], capture_output=True, text=True,
                         cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "OK" in run.stdout.splitlines()[-1]
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import convc, convc.codegen.env as e; print(convc.__file__); print(e.template_dirs())"],
                           capture_output=True, text=True, cwd=tmp_path, env=env)
    assert str(venv) in where.stdout.splitlines()[0]          # the installed copy ran
    assert str(venv) in where.stdout.splitlines()[1]          # with templates from the wheel

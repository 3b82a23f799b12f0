"""examples/dask_batch_inference.py on a dask.distributed LocalCluster of
two worker processes: the module travels pickled, every file's logits are
the ones this process computes (issue 17, item 3). Needs the
``distributed`` extra; skipped without it unless CONVC_REQUIRE_DASK=1."""
from __future__ import annotations

import importlib.util
import os
import subprocess

import numpy as np
import pytest

import convc as cc
import helpers

EXAMPLE = helpers.REPO / "examples" / "dask_batch_inference.py"


def _need_dask():
    if importlib.util.find_spec("distributed") is None:
        if os.environ.get("CONVC_REQUIRE_DASK", "") not in ("", "0"):
            raise AssertionError('CONVC_REQUIRE_DASK=1 but Dask is not installed: pip install "convc[distributed]"')
        pytest.skip('Dask is not installed: pip install "convc[distributed]" (CONVC_REQUIRE_DASK=1 makes this fail)')


def _example():
    spec = importlib.util.spec_from_file_location("dask_batch_inference", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dask_example_writes_the_logits_this_process_computes(tmp_path):
    _need_dask()
    data, out = tmp_path / "images", tmp_path / "out"
    proc = subprocess.run([helpers.PYTHON, str(EXAMPLE), str(data), "--make", "45", "--file-size", "12", "--batch", "4",
                           "--workers", "2", "--out", str(out)],
                          capture_output=True, text=True, env=helpers.subprocess_env(), timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, f"the example failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "45 images in" in proc.stdout and "images/s" in proc.stdout, proc.stdout
    files = sorted(data.glob("*.npy"))
    assert len(files) > 1 and sorted(p.name for p in out.glob("*.npy")) == [p.name for p in files]
    # the same files through the same code in this process, with a module compiled here
    example, here = _example(), tmp_path / "here"
    here.mkdir()
    mod = cc.compile(example.mobilenet_tiny(batch=4))
    for f in files:
        example.predict_file(str(f), mod, str(here))
        got, want = np.load(out / f.name), np.load(here / f.name)
        n = 1 if np.load(f).ndim == 3 else len(np.load(f))
        assert got.shape == want.shape == (n, 10), f.name
        np.testing.assert_array_equal(got, want, err_msg=f"{f.name}: worker logits differ")

"""The opencl target beyond the op matrices (which run on every target in
helpers.TARGETS): availability, device choice, build errors, params and
training state on the device, the CLI, and oclgrind's memory checks."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import convc as cc
import helpers
from helpers import assert_close

pytestmark = pytest.mark.skipif(
    helpers.OPENCL_MISSING is not None and not helpers.OPENCL_REQUIRED,
    reason=f"no usable OpenCL device: {helpers.OPENCL_MISSING}")


def test_opencl_device_present():
    """Fails (rather than skips) under CONVC_REQUIRE_OPENCL=1 when OpenCL is missing."""
    assert helpers.OPENCL_MISSING is None, helpers.OPENCL_MISSING
    assert "opencl" in helpers.TARGETS


def _small_graph(name="small", dtype="float32"):
    rng = np.random.default_rng(3)
    g = cc.Graph(name)
    x = g.input("x", (2, 3, 8, 8), dtype)
    w = g.param("w", rng.standard_normal((4, 3, 3, 3)).astype(dtype))
    b = g.param("b", rng.standard_normal(4).astype(dtype))
    g.output(cc.sigmoid(cc.conv(x, w, bias=b, padding=1)), "y")
    return g, {"x": rng.standard_normal((2, 3, 8, 8)).astype(dtype)}


def test_devices_lists_one_chosen_device():
    from convc.runtime.opencl import devices

    found = devices()
    assert found and sum(d["chosen"] for d in found) == 1
    for d in found:
        assert re.fullmatch(r"\d+:\d+", d["index"]) and d["name"] and d["compute_units"] >= 1


def test_device_override_by_index_and_name(monkeypatch):
    from convc.runtime.opencl import devices

    chosen = next(d for d in devices() if d["chosen"])
    g, feeds = _small_graph()
    want = cc.compile(g, target="numpy").run(feeds)["y"]
    for spec in (chosen["index"], chosen["name"][:6].upper()):     # name match ignores case
        monkeypatch.setenv("CONVC_OPENCL_DEVICE", spec)
        mod = cc.compile(g, target="opencl")
        assert mod.device == chosen["name"]
        assert_close(mod.run(feeds)["y"], want, what=f"CONVC_OPENCL_DEVICE={spec}")


@pytest.mark.parametrize("spec", ["99:0", "no-such-device-name"])
def test_unknown_device_is_a_clear_error(monkeypatch, spec):
    monkeypatch.setenv("CONVC_OPENCL_DEVICE", spec)
    g, _ = _small_graph()
    with pytest.raises(cc.ConvcError, match=rf"CONVC_OPENCL_DEVICE={re.escape(spec)} matches no OpenCL device"):
        cc.compile(g, target="opencl")


def test_build_failure_shows_log_and_kernel_source(monkeypatch):
    """A kernel the OpenCL compiler rejects: the error carries the build log
    and the path of the kernel source, which holds the offending line."""
    from convc.codegen import opencl as ocl

    real = ocl.node_functions

    def broken(*args, **kwargs):
        functions, calls = real(*args, **kwargs)
        return functions + ["static void convc_broken(void) { this_is_not_declared = 1; }\n"], calls

    monkeypatch.setattr(ocl, "node_functions", broken)
    g, _ = _small_graph("broken")
    with pytest.raises(cc.CompileError) as e:
        cc.compile(g, target="opencl")
    msg = str(e.value)
    assert "build log" in msg and "this_is_not_declared" in msg
    path = re.search(r"kernel source: (\S+)", msg).group(1)
    assert "this_is_not_declared" in open(path).read()


def test_float64_runs_where_the_device_has_fp64():
    from convc.runtime.opencl import devices

    chosen = next(d for d in devices() if d["chosen"])
    g, feeds = _small_graph("f64", "float64")
    if not chosen["fp64"]:
        with pytest.raises(cc.ConvcError, match="cl_khr_fp64"):
            cc.compile(g, target="opencl")
        return
    got = cc.compile(g, target="opencl").run(feeds)["y"]
    assert got.dtype == np.float64
    assert_close(got, cc.compile(g, target="numpy").run(feeds)["y"], rtol=1e-12, atol=1e-14)


def test_params_live_on_the_device():
    g, feeds = _small_graph("params")
    mod = cc.compile(g, target="opencl")
    ref = cc.compile(g, target="numpy")
    assert_close(mod.get_params()["w"], g.node("w")["value"], rtol=0, atol=0)
    w2 = np.full((4, 3, 3, 3), 0.01, np.float32)
    mod.set_params({"w": w2})
    ref.set_params({"w": w2})
    assert_close(mod.get_params()["w"], w2, rtol=0, atol=0)
    assert_close(mod.get_params()["b"], g.node("b")["value"], rtol=0, atol=0)   # untouched neighbour
    assert_close(mod.run(feeds)["y"], ref.run(feeds)["y"], what="after set_params")


def test_training_state_stays_on_the_device():
    """Three SGD-momentum steps on opencl and on C give the same params: the
    updates (g.assign) and the momentum buffers run and live on the device."""
    rng = np.random.default_rng(5)
    g = cc.Graph("fit")
    x = g.input("x", (4, 2, 6, 6))
    t = g.input("t", (4, 3, 6, 6))
    w = g.param("w", rng.standard_normal((3, 2, 3, 3)).astype(np.float32) * 0.3)
    y = cc.relu(cc.conv(x, w, padding=1))
    g.output(y, "y")
    loss = cc.mse_loss(y, t)
    feeds = {"x": rng.standard_normal((4, 2, 6, 6)).astype(np.float32),
             "t": rng.standard_normal((4, 3, 6, 6)).astype(np.float32)}
    tr = {k: cc.Trainer(g, loss, optimizer=cc.SGD(lr=0.1, momentum=0.9), target=k) for k in ("opencl", "c")}
    for _ in range(3):
        losses = {k: v.step(feeds) for k, v in tr.items()}
        assert abs(losses["opencl"] - losses["c"]) <= 1e-5 * abs(losses["c"])
    assert_close(tr["opencl"].params["w"], tr["c"].params["w"], rtol=1e-4, atol=1e-6, what="w after 3 steps")
    assert_close(tr["opencl"].predict({"x": feeds["x"]})["y"], tr["c"].predict({"x": feeds["x"]})["y"],
                 rtol=1e-4, atol=1e-5, what="predict with trained weights")


def test_profile_is_refused_clearly():
    g, _ = _small_graph("prof")
    with pytest.raises(cc.ConvcError, match="profile"):
        cc.compile(g, target="opencl", profile=True)


def test_inputs_are_checked_before_the_device_runs():
    g, feeds = _small_graph("checked")
    mod = cc.compile(g, target="opencl")
    with pytest.raises(cc.InputError, match="shape"):
        mod.run({"x": np.zeros((1, 3, 8, 8), np.float32)})


def test_cli_devices_and_demo():
    env = helpers.subprocess_env()
    out = subprocess.run([sys.executable, "-m", "convc.cli", "devices"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^\* \d+:\d+ ", out.stdout, re.M)
    out = subprocess.run([sys.executable, "-m", "convc.cli", "demo", "--target", "opencl"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OpenCL device:" in out.stdout and out.stdout.rstrip().endswith("OK")


_OCLGRIND_ERRORS = re.compile(r"Invalid (read|write)|Uninitialized value|Data race|OCLGRIND FATAL|"
                              r"runtime error detected|out of bounds", re.I)


@pytest.mark.skipif(shutil.which("oclgrind") is None and not helpers.OPENCL_REQUIRED,
                    reason="oclgrind is not installed (Debian package oclgrind)")
def test_lenet_forward_and_training_step_clean_under_oclgrind():
    """oclgrind simulates the device and checks every memory access: no
    out-of-bounds access, no read of uninitialised memory, no data race.
    (-cl-opt-disable: oclgrind cannot interpret some intrinsics LLVM's
    optimiser emits; the checks apply to the unoptimised kernels.)"""
    cmd = ["oclgrind", "--build-options", "-cl-opt-disable", "--check-api", "--uninitialized", "--data-races",
           sys.executable, str(helpers.TESTS / "opencl_lenet_step.py"), "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=helpers.subprocess_env(), timeout=600)
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-4000:]
    assert "device Oclgrind Simulator" in out.stdout, report[-4000:]
    assert out.stdout.rstrip().endswith("OK"), report[-4000:]
    found = _OCLGRIND_ERRORS.findall(out.stderr)
    assert not found, out.stderr[-4000:]


def test_host_program_runs_without_python(tmp_path):
    """The generated host program is plain C: built with a small main() and
    -lOpenCL, it loads the params blob, runs LeNet-5 and prints outputs that
    match the reference."""
    from convc.models import lenet5

    g = lenet5()
    mod = cc.compile(g, target="opencl")
    p = mod.host_prefix
    (tmp_path / "host.c").write_text(mod.host_source)
    mod.params_blob().tofile(tmp_path / "params.bin")
    x = np.random.default_rng(9).standard_normal((1, 1, 28, 28)).astype(np.float32)
    x.tofile(tmp_path / "x.bin")
    (tmp_path / "main.c").write_text(f"""
#include <stdio.h>
#include <stdlib.h>
{mod.host_api}
int main(void)
{{
    static unsigned char params[{max(mod.plan.params_bytes, 1)}];
    static float x[784], y[10];
    FILE *f = fopen("params.bin", "rb");
    if (!f || fread(params, 1, sizeof params, f) != sizeof params) return 2;
    fclose(f);
    f = fopen("x.bin", "rb");
    if (!f || fread(x, sizeof x[0], 784, f) != 784) return 3;
    fclose(f);
    if ({p}_init(params) != 0) {{ fprintf(stderr, "%s\\n", {p}_error()); return 4; }}
    if ({p}_run(x, y) != 0) {{ fprintf(stderr, "%s\\n", {p}_error()); return 5; }}
    for (int i = 0; i < 10; i++) printf("%.9g\\n", y[i]);
    {p}_release();
    return 0;
}}
""")
    build = subprocess.run(["cc", "-std=c99", "-O2", "main.c", "host.c", "-o", "lenet_cl", "-lOpenCL"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    run = subprocess.run(["./lenet_cl"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    got = np.array([float(v) for v in run.stdout.split()], np.float32).reshape(1, 10)
    assert_close(got, cc.compile(g, target="numpy")(x=x), what="host program without Python")

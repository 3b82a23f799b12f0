"""`convc export --target opencl` (convc/export_opencl.py): the host program,
its header, kernels, params and harness, built with their Makefile under
strict flags and run on PoCL, in both kernel modes (read at run time,
embedded); the kernels clean under oclgrind; the CLI and the errors.
CONVC_REQUIRE_OPENCL=1 makes the device tests fail instead of skipping;
CONVC_LONG_TESTS=1 adds the MobileNet-style net on the device, and both models
under oclgrind."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

import convc as cc
import helpers
from convc.codegen.c import module_status
from convc.export_opencl import export_opencl
from convc.models import lenet5, mobilenet_tiny

LONG = os.environ.get("CONVC_LONG_TESTS", "") not in ("", "0")
STRICT = "-std=c99 -O2 -Wall -Wextra -Werror -pedantic"

needs_opencl = pytest.mark.skipif(helpers.OPENCL_MISSING is not None and not helpers.OPENCL_REQUIRED,
                                  reason=f"no usable OpenCL device: {helpers.OPENCL_MISSING}")
needs_oclgrind = pytest.mark.skipif(shutil.which("oclgrind") is None and not helpers.OPENCL_REQUIRED,
                                    reason="oclgrind is not installed (Debian package oclgrind)")


def branches():
    """Two branches joined by a concat, max and average pooling, an int64
    input (class labels, which the host checks) and three outputs."""
    rng = np.random.default_rng(11)
    g = cc.Graph("branches")
    x = g.input("x", (2, 3, 10, 10))
    a = cc.relu(cc.conv(x, g.param("wa", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)), padding=1))
    b = cc.sigmoid(cc.conv(x, g.param("wb", rng.standard_normal((2, 3, 1, 1)).astype(np.float32)),
                           bias=g.param("bb", rng.standard_normal(2).astype(np.float32))))
    c = cc.concat([a, b], axis=1)
    g.output(cc.max_pool(c, 2), "pooled")
    h = cc.flatten(cc.avg_pool(c, 5))
    scores = cc.dense(h, g.param("wd", rng.standard_normal((3, 24)).astype(np.float32)))
    g.output(scores, "scores")
    g.output(cc.cross_entropy(scores, g.input("labels", (2,), "int64")), "loss")
    return g


MODELS = {"lenet": lenet5, "mobilenet": mobilenet_tiny, "branches": branches}


def _make(out, *targets, timeout=300, **env):
    return subprocess.run(["make", f"CFLAGS={STRICT}", *targets], cwd=out, capture_output=True, text=True,
                          timeout=timeout, env=helpers.subprocess_env(**env))


def _passed(run) -> float:
    """The harness's max_error, after checking that it said OK."""
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-4000:]
    assert run.stdout.rstrip().endswith("OK"), report[-4000:]
    return float(re.search(r"^max_error (\S+)$", run.stdout, re.M).group(1))


@needs_opencl
@pytest.mark.parametrize("embed", [False, True], ids=["kernel-file", "embedded"])
@pytest.mark.parametrize("model", ["lenet", pytest.param("mobilenet", marks=pytest.mark.skipif(
    not LONG, reason="CONVC_LONG_TESTS=1: the MobileNet-style net too (PoCL builds its kernels in ~10 s)"))])
def test_export_builds_strictly_and_passes_on_the_device(tmp_path, model, embed):
    g = MODELS[model]()
    exp = cc.export_opencl(g, tmp_path, name=model, embed_kernels=embed)
    names = {f.name for f in exp.files}
    assert names == {f"{model}_host.c", f"{model}_host.h", f"{model}_params.bin", f"{model}_test.c", "Makefile"} | (
        set() if embed else {f"{model}_kernels.cl"})
    host = (tmp_path / f"{model}_host.c").read_text()
    assert ("__kernel void" in host) == embed         # the kernels live in the host source only when embedded
    header = (tmp_path / f"{model}_host.h").read_text()
    path_arg = ", const char *kernels_path" if not embed else ""
    assert f"int {model}_init(const unsigned char *params{path_arg});" in header
    # the params file is each param's bytes at the offset the header lists
    blob = (tmp_path / f"{model}_params.bin").read_bytes()
    assert len(blob) == exp.params_bytes
    for n, off in exp.plan.params.items():
        value = np.asarray(exp.graph.node(n)["value"])
        assert blob[off:off + value.nbytes] == value.astype(value.dtype.newbyteorder("<")).tobytes(), n
        assert re.search(rf"^ \* +{off}  {re.escape(n)}: ", header, re.M), n

    build = _make(tmp_path)                             # `make`: host and harness under -Werror -pedantic
    assert build.returncode == 0, build.stdout + build.stderr
    run = _make(tmp_path, "test")                      # `make test`: the harness on the device
    assert _passed(run) <= 1e-4
    assert re.search(r"^device \S", run.stdout, re.M) and "vector 1: max error" in run.stdout, run.stdout

    # the harness can fail: a params file with one weight changed gives outputs it rejects
    first = min(exp.plan.params.values())
    bad = bytearray(blob)
    bad[first:first + 4] = np.float32(1e3).tobytes()
    (tmp_path / "bad.bin").write_bytes(bytes(bad))
    args = [f"./{model}_test", "bad.bin"] + ([] if embed else [f"{model}_kernels.cl"])
    run = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=helpers.subprocess_env())
    assert run.returncode == 1 and run.stdout.rstrip().endswith("FAIL (tolerance 0.0001)"), run.stdout + run.stderr
    # a params file of the wrong size and a missing kernels file stop before the device runs
    (tmp_path / "short.bin").write_bytes(blob[:-1])
    run = subprocess.run([f"./{model}_test", "short.bin"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and f"is not {len(blob)} bytes" in run.stderr, run.stderr
    if not embed:
        run = subprocess.run([f"./{model}_test", f"{model}_params.bin", "missing.cl"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300, env=helpers.subprocess_env())
        assert run.returncode == 2, run.stdout + run.stderr
        assert f"{model}_init returned -4: cannot read the OpenCL kernels" in run.stderr and "missing.cl" in run.stderr

    clean = _make(tmp_path, "clean")
    assert clean.returncode == 0 and not (tmp_path / f"{model}_test").exists()


def _oclgrind(out, name, embed):
    """Run the built harness under oclgrind's checks: no out-of-bounds access,
    no read of uninitialised memory, no data race, no API misuse."""
    from test_opencl import _OCLGRIND_ERRORS

    cmd = ["oclgrind", "--build-options", "-cl-opt-disable", "--check-api", "--uninitialized", "--data-races",
           f"./{name}_test", f"{name}_params.bin"] + ([] if embed else [f"{name}_kernels.cl"])
    run = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=900, env=helpers.subprocess_env())
    assert "device Oclgrind Simulator" in run.stdout, (run.stdout + run.stderr)[-4000:]
    _passed(run)
    found = _OCLGRIND_ERRORS.findall(run.stderr)
    assert not found, run.stderr[-4000:]


@needs_opencl
@needs_oclgrind
def test_concat_and_pools_pass_on_the_device_and_under_oclgrind(tmp_path):
    """A graph with a concat, max and average pooling, class labels and three
    outputs: the harness passes on the device (every output checked, labels
    out of range rejected with the loss node's status) and under oclgrind."""
    g = branches()
    feeds = [{"x": np.random.default_rng(4).standard_normal((2, 3, 10, 10)).astype(np.float32),
              "labels": np.array([2, 0])}]
    exp = export_opencl(g, tmp_path, name="branches", test_inputs=feeds)
    assert set(exp.sizes()) == {"branches_host.c", "branches_host.h", "branches_kernels.cl", "branches_params.bin",
                                "branches_test.c", "Makefile"}
    header = (tmp_path / "branches_host.h").read_text()
    assert ("int branches_run(const float *in_x, const int64_t *in_labels, float *out_pooled, float *out_scores, "
            "float *out_loss);") in header
    assert "#define BRANCHES_POOLED_SIZE 300" in header and "#define BRANCHES_SCORES_SIZE 6" in header
    build = _make(tmp_path)
    assert build.returncode == 0, build.stdout + build.stderr
    run = _make(tmp_path, "test")
    assert _passed(run) <= 1e-4
    statuses = {int(v) for v in re.findall(r"^in_labels = (?:-1|3): returned (\d+)$", run.stdout, re.M)}
    assert len(statuses) == 1, run.stdout                # both sides rejected, by the loss node (module_status)
    assert exp.graph.node(module_status(exp.plan, statuses.pop()))["op"] == "cross_entropy"
    _oclgrind(tmp_path, "branches", embed=False)


@pytest.mark.skipif(not LONG, reason="CONVC_LONG_TESTS=1: LeNet-5 and MobileNet-style under oclgrind (~1 min each)")
@needs_opencl
@needs_oclgrind
@pytest.mark.parametrize("model", ["lenet", "mobilenet"])
def test_models_clean_under_oclgrind(tmp_path, model):
    export_opencl(MODELS[model](), tmp_path, name=model, embed_kernels=True, tests=1)
    build = _make(tmp_path)
    assert build.returncode == 0, build.stdout + build.stderr
    _oclgrind(tmp_path, model, embed=True)


@needs_opencl
def test_float64_graph_passes_to_1e_10_where_the_device_has_fp64(tmp_path):
    from convc.runtime.opencl import devices

    rng = np.random.default_rng(3)
    g = cc.Graph("f64")
    x = g.input("x", (2, 3, 8, 8), "float64")
    g.output(cc.tanh(cc.conv(x, g.param("w", rng.standard_normal((4, 3, 3, 3))), padding=1)), "y")
    export_opencl(g, tmp_path, name="f64")
    assert "#define F64_TEST_TOLERANCE 1e-10" in (tmp_path / "f64_test.c").read_text()
    build = _make(tmp_path)
    assert build.returncode == 0, build.stdout + build.stderr
    run = _make(tmp_path, "test")
    if not next(d for d in devices() if d["chosen"])["fp64"]:
        assert run.returncode != 0 and "cl_khr_fp64" in run.stderr, run.stdout + run.stderr
        return
    assert _passed(run) <= 1e-10


def test_cli_writes_the_export(tmp_path, capsys):
    """`convc export MODEL --target opencl` writes the files (no device
    needed to write them); options of the C library are refused."""
    from convc.cli import main

    out = tmp_path / "cl"
    assert main(["export", "lenet5", "--target", "opencl", "-o", str(out), "--name", "net",
                 "--embed-kernels"]) == 0
    said = capsys.readouterr().out
    assert "kernels embedded in the host" in said and f"make -C {out} test" in said
    assert sorted(p.name for p in out.iterdir()) == ["Makefile", "net_host.c", "net_host.h", "net_params.bin",
                                                      "net_test.c"]
    assert (out / "net_params.bin").stat().st_size == 247040
    assert main(["export", "lenet5", "--target", "opencl", "-o", str(tmp_path / "x"), "--size"]) == 2
    assert "--size is for the C library (--target c)" in capsys.readouterr().err
    assert main(["export", "lenet5", "--target", "opencl", "-o", str(tmp_path / "x"), "--train"]) == 2
    assert "cc.export_opencl(trainer_or_graph, DIR, train=True" in capsys.readouterr().err
    assert main(["export", "lenet5", "-o", str(tmp_path / "y"), "--embed-kernels"]) == 2
    assert "--embed-kernels is for --target opencl" in capsys.readouterr().err


@needs_opencl
def test_training_step_runs_and_updates_params_on_the_device(tmp_path):
    """A cc.Trainer (SGD with momentum, one step already taken in Python)
    exports as a host whose every run is a training step on the device: the
    harness checks each step's loss and, after three steps, the params and the
    momentum buffers against the reference's run_step; rejected labels update
    nothing (the final check runs after them)."""
    rng = np.random.default_rng(8)
    g = cc.Graph("fit")
    x = g.input("x", (2, 3, 6, 6))
    h = cc.relu(cc.conv(x, g.param("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3),
                        bias=g.param("b", np.zeros(4, np.float32)), stride=2))
    logits = cc.dense(cc.flatten(h), g.param("wd", rng.standard_normal((3, 16)).astype(np.float32) * 0.3))
    g.output(logits, "logits")
    loss = cc.cross_entropy(logits, g.input("labels", (2,), "int64"))
    trainer = cc.Trainer(g, loss, optimizer=cc.SGD(lr=0.05, momentum=0.9), target="numpy")
    trainer.step({"x": rng.standard_normal((2, 3, 6, 6)).astype(np.float32), "labels": np.array([1, 2])})
    feeds = [{"x": rng.standard_normal((2, 3, 6, 6)).astype(np.float32), "labels": np.array([k % 3, 2 - k % 3])}
             for k in range(3)]
    exp = export_opencl(trainer, tmp_path, name="fit", embed_kernels=True, test_inputs=feeds)
    assert set(exp.graph.assigns) >= {"w", "b", "wd"} and len(exp.graph.assigns) == 6      # params + momenta
    assert "int fit_run(const float *in_x, const int64_t *in_labels, float *out_loss);" in \
        (tmp_path / "fit_host.h").read_text()
    # the exported blob holds the values after the Python step, not the graph's initial ones
    off = exp.plan.params["w"]
    assert np.frombuffer((tmp_path / "fit_params.bin").read_bytes()[off:off + 432], np.float32).tolist() == \
        trainer.params["w"].reshape(-1).tolist()
    assert trainer.params["w"].tolist() != g.node("w")["value"].tolist()
    build = _make(tmp_path)
    assert build.returncode == 0, build.stdout + build.stderr
    run = _make(tmp_path, "test")
    assert _passed(run) <= 1e-4
    assert re.search(r"^step 2: max error \S+$", run.stdout, re.M), run.stdout
    assert re.search(r"^params after 3 steps: max error \S+$", run.stdout, re.M), run.stdout


def test_refuses_bad_names_and_options(tmp_path):
    with pytest.raises(cc.ConvcError, match="must be a C identifier"):
        export_opencl(lenet5(), tmp_path, name="le-net")
    with pytest.raises(cc.ConvcError, match="reserved"):
        export_opencl(lenet5(), tmp_path, name="int")
    with pytest.raises(cc.ConvcError, match="loss and optimizer are for train=True"):
        export_opencl(lenet5(), tmp_path, name="net", optimizer=cc.SGD())
    with pytest.raises(cc.ConvcError, match="has 3 outputs"):
        export_opencl(branches(), tmp_path, name="net", train=True)


def test_export_c_with_target_opencl_writes_the_same_project(tmp_path):
    """cc.export_c(..., target="opencl") is export_opencl (DESIGN's one entry
    point); the C library's options are refused by name."""
    a = cc.export_c(lenet5(), tmp_path / "a", name="net", target="opencl", embed_kernels=True)
    b = export_opencl(lenet5(), tmp_path / "b", name="net", embed_kernels=True)
    assert sorted(f.name for f in a.files) == sorted(f.name for f in b.files)
    for f in b.files:
        assert (tmp_path / "a" / f.name).read_bytes() == f.read_bytes(), f.name
    with pytest.raises(cc.ConvcError, match="int8, ram apply to the C library only"):
        cc.export_c(lenet5(), tmp_path / "c", name="net", target="opencl", int8=True, ram=1000)
    with pytest.raises(cc.ConvcError, match="target 'cuda'"):
        cc.export_c(lenet5(), tmp_path / "c", name="net", target="cuda")
    with pytest.raises(cc.ConvcError, match="embed_kernels is for target='opencl'"):
        cc.export_c(lenet5(), tmp_path / "c", name="net", embed_kernels=True)

"""Issue 16, item 6: class labels outside [0, C) are an InputError on every
target -- numpy, C (fast and checked call paths), OpenCL (labels from the
caller and labels computed on the device), the Trainer and the embedded
export (its run function returns the node's status; its harness checks it)
-- naming the node, the op, the label, its position and the valid range, and
nothing is updated: a training step with a bad label leaves the params as
they were."""
from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

import convc as cc
from helpers import TARGETS

N, C = 4, 5
BAD = [-1, C, 2**62, -2**63]           # negative, == C, huge, the most negative int64


def ce_graph(name="labels"):
    """loss = cross_entropy(x @ w, labels) and its gradient w.r.t. x."""
    g = cc.Graph(name)
    x = g.input("x", (N, 3))
    labels = g.input("labels", (N,), "int64")
    w = g.param("w", np.random.default_rng(0).standard_normal((3, C)).astype(np.float32))
    loss = cc.cross_entropy(cc.matmul(x, w), labels, name="ce")
    g.output(loss, "loss")
    g.output(cc.grad(loss, x), "dx")
    return g


def feeds(bad=None, at=2):
    lab = np.array([0, 1, 2, C - 1], np.int64)
    if bad is not None:
        lab[at] = bad
    return {"x": np.linspace(-1, 1, N * 3, dtype=np.float32).reshape(N, 3), "labels": lab}


def check_message(err, bad, at, node=None):
    """The InputError names the graph, the node, its op, the label, its position and [0, C)."""
    msg = str(err.value)
    assert isinstance(err.value, cc.InputError), f"{type(err.value).__name__}: {msg}"
    assert re.search(rf"node '{node or 'ce'}[^']*' \(cross_entropy", msg), msg
    assert f"label {bad} at position {at}" in msg and f"[0, {C})" in msg, msg


@pytest.fixture(scope="module")
def modules():
    g = ce_graph()
    return {t: cc.compile(g, target=t) for t in TARGETS}


@pytest.mark.parametrize("bad", BAD)
def test_item6_out_of_range_label_is_an_input_error_on_every_target(modules, bad):
    """Issue 16 item 6: a label < 0, == C or 2**62 raises InputError (was: C
    skipped it but divided by N, its gradient pushed every class down;
    numpy raised a bare ValueError), on the fast path (run, __call__), the
    checked path (a list input) and with out= arrays."""
    good = {t: m.run(feeds()) for t, m in modules.items()}
    for t, m in modules.items():
        np.testing.assert_allclose(good[t]["loss"], good["numpy"]["loss"], rtol=1e-5)
        for at in (0, N - 1):
            f = feeds(bad, at)
            with pytest.raises(cc.ConvcError) as err:
                m.run(f)
            check_message(err, bad, at)
            with pytest.raises(cc.ConvcError) as err:
                m(**f)
            check_message(err, bad, at)
            with pytest.raises(cc.ConvcError) as err:                   # checked path: labels as a list
                m.run({"x": f["x"], "labels": f["labels"].tolist()})
            check_message(err, bad, at)
            out = {"loss": np.full((), 7.0, np.float32), "dx": np.full((N, 3), 7.0, np.float32)}
            with pytest.raises(cc.ConvcError) as err:
                m.run(f, out=out)
            check_message(err, bad, at)
            # the loss is the first node to read the labels: it stops before writing its output
            assert out["loss"] == 7.0, f"[{t}] the loss output was written"
        # and the module still works
        np.testing.assert_allclose(m.run(feeds())["loss"], good[t]["loss"], rtol=0)


def test_item6_labels_computed_on_the_device_are_checked():
    """Issue 16 item 6: labels that are not a graph input (a concat of two
    int64 inputs, computed into the arena) are checked too: in the node on
    C, read back before the node's kernel on OpenCL."""
    g = cc.Graph("labels_concat")
    x = g.input("x", (N, C))
    a, b = g.input("a", (2,), "int64"), g.input("b", (N - 2,), "int64")
    g.output(cc.cross_entropy(x, cc.concat([a, b], axis=0), name="ce"), "loss")
    xa = np.zeros((N, C), np.float32)
    for t in TARGETS:
        m = cc.compile(g, target=t)
        if t == "opencl":
            assert "check_on_device" in m.host_source, "the host reads the labels back before the loss kernel"
        np.testing.assert_allclose(m.run({"x": xa, "a": np.array([0, 1]), "b": np.array([2, 3])})["loss"],
                                   np.log(C), rtol=1e-6)
        with pytest.raises(cc.ConvcError) as err:
            m.run({"x": xa, "a": np.array([0, 1]), "b": np.array([C, 3])})
        check_message(err, C, 2)


@pytest.mark.parametrize("target", TARGETS)
def test_item6_training_step_with_a_bad_label_updates_nothing(target):
    """Issue 16 item 6: Trainer.step with an out-of-range label raises the
    same InputError and leaves the params (and the step count) unchanged;
    the next good step trains as before."""
    g = cc.Graph("train_labels")
    x = g.input("x", (N, 3))
    labels = g.input("labels", (N,), "int64")
    w = g.param("w", np.random.default_rng(1).standard_normal((C, 3)).astype(np.float32))
    b = g.param("b", np.zeros(C, np.float32))
    logits = cc.dense(x, w, b, name="logits")
    g.output(logits, "logits")
    loss = cc.cross_entropy(logits, labels, name="ce")
    tr = cc.Trainer(g, loss, optimizer=cc.Adam(lr=0.1), target=target)
    before = tr.params
    for bad in BAD:
        f = feeds(bad, 1)
        with pytest.raises(cc.ConvcError) as err:
            tr.step(f)
        check_message(err, bad, 1, node="ce")
        after = tr.params
        for k in before:
            np.testing.assert_array_equal(after[k], before[k], err_msg=f"{k} changed by a rejected step [{target}]")
        assert tr.steps == 0
    tr.step(feeds())
    assert tr.steps == 1 and not np.array_equal(tr.params["w"], before["w"])


def test_item6_export_returns_the_status_and_its_harness_checks_it(tmp_path):
    """Issue 16 item 6: the exported run function returns the checking node's
    status (1 + its schedule position) for an out-of-range label, and the
    generated harness feeds one below and one above the range and checks it."""
    if not shutil.which("gcc"):
        pytest.skip("gcc is not installed")
    g = cc.Graph("ce_export")
    x = g.input("x", (N, 3))
    labels = g.input("labels", (N,), "int64")
    w = g.param("w", np.random.default_rng(2).standard_normal((C, 3)).astype(np.float32))
    g.output(cc.cross_entropy(cc.dense(x, w), labels, name="ce"), "loss")
    exp = cc.export_c(g, tmp_path, name="cex", test_inputs=[feeds(), feeds()])
    header = (tmp_path / "cex.h").read_text()
    assert "k > 0 when the k-th node" in header, "the header documents the status"
    cmd = ["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-O2", "-o", "harness", "cex_test.c", "cex.c", "-lm"]
    subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True, text=True, timeout=300)
    run = subprocess.run(["./harness"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    k = exp.plan.order.index("ce") + 1
    assert f"in_labels = -1: returned {k}" in run.stdout and f"in_labels = {C}: returned {k}" in run.stdout, run.stdout
    # the harness fails when the library does not reject the label (its check can fail)
    src = (tmp_path / "cex.c").read_text()
    assert f"return {k};" in src
    (tmp_path / "cex.c").write_text(src.replace(f"return {k};", "(void)0;"))
    subprocess.run(cmd[:4] + cmd[6:], cwd=tmp_path, check=True, capture_output=True, text=True, timeout=300)
    run = subprocess.run(["./harness"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "was not rejected" in run.stdout, run.stdout

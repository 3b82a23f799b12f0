"""torch.compile(model, backend="convc") (convc/torch_backend.py) against
PyTorch eager: inference on resnet18-style and mobilenet_v2-style nets, a
graph with an op convc lacks (partitioned: convc, PyTorch, convc), training
(forward and AOTAutograd's backward graph in convc; SGD steps match eager in
float64), and the entry point that makes the string "convc" work."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from convc import torch_backend  # noqa: E402
from convc.bench_torch import mobilenet_style, resnet_style  # noqa: E402
from helpers import TARGETS, assert_close  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch_backend.reports.clear()
    yield
    torch._dynamo.reset()


def close(got, want, rtol, what):
    want = want.detach().numpy()
    assert_close(got.detach().numpy(), want, rtol=rtol, atol=rtol * max(1.0, float(np.abs(want).max())), what=what,
                 check_dtype=True)


@pytest.mark.parametrize("make", [resnet_style, mobilenet_style], ids=["resnet18-style", "mobilenet_v2-style"])
def test_inference(make):
    torch.manual_seed(0)
    model = make(width=8, stages=2) if make is resnet_style else make(width=0.25, stages=4)
    x = torch.randn(1, 3, 32, 32)
    fast = torch.compile(model, backend="convc")
    with torch.no_grad():
        want = model(x)
        close(fast(x), want, 1e-5, "first call")
        close(fast(x), want, 1e-5, "second call")
        close(fast(2 * x), model(2 * x), 1e-5, "new input")
    (report,) = torch_backend.reports
    assert len(report.parts) == 1 and not report.eager and not report.refused, report    # all of it in convc


class Sorted(nn.Module):
    """A conv net with torch.sort (which convc lacks) in the middle."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 3, 3)

    def forward(self, x):
        h = F.relu(self.a(x))
        h = torch.sort(h, dim=-1).values
        return torch.sigmoid(self.b(h)).mean(dim=(2, 3))


@pytest.mark.parametrize("target", ["c", "opencl"])
def test_partitioned_graph(target):
    if target not in TARGETS:
        pytest.skip("no OpenCL device")
    torch.manual_seed(0)
    model = Sorted().eval()
    x = torch.randn(2, 2, 7, 7)
    fast = torch.compile(model, backend="convc", options={"target": target})
    with torch.no_grad():
        close(fast(x), model(x), 1e-5, "partitioned")
    (report,) = torch_backend.reports
    assert len(report.parts) == 2, report                          # before and after the sort
    assert set(report.eager) == {"aten.sort.default"}, report
    assert report.eager["aten.sort.default"][1] == "not mapped to a convc op"
    assert [m.target for m in report.modules] == [target, target]


def test_bad_options():
    with pytest.raises(Exception, match="unknown option"):
        torch.compile(nn.ReLU(), backend="convc", options={"targte": "c"})(torch.randn(3))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, groups=2)
        self.c3 = nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6 * 2 * 2, 5)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.c1(x)), 2)
        h = F.hardswish(self.c2(h))
        h = F.avg_pool2d(torch.sigmoid(self.c3(h)) + h, 2, ceil_mode=True)
        return self.fc(F.leaky_relu(h, 0.1).flatten(1))


def test_training_matches_eager_step_for_step():
    torch.manual_seed(0)
    eager = SmallCNN().double()
    model = copy.deepcopy(eager)
    fast = torch.compile(model, backend="convc")
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (eager, model)]
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(4, 1, 14, 14, generator=gen, dtype=torch.float64)
        labels = torch.randint(0, 5, (4,), generator=gen)
        for m, f, opt in ((eager, eager, opts[0]), (model, fast, opts[1])):
            opt.zero_grad()
            F.cross_entropy(f(x), labels).backward()
            opt.step()
        for (name, p), q in zip(eager.named_parameters(), model.parameters()):
            close(q, p, 1e-10, f"step {step}: {name}")
    forward, backward = torch_backend.reports
    assert len(backward.parts) == 1 and not backward.eager, backward      # loss.backward() runs convc's C
    assert len(forward.parts) == 1, forward
    # only the copy of the max pool that gives the backward its (unread) indices stays in PyTorch
    assert set(forward.eager) == {"aten.max_pool2d_with_indices.default"}, forward


def test_example_runs(tmp_path):
    """examples/from_torch.py in a fresh process: both ways match PyTorch, training takes steps, only the
    pool's index copy stays eager. The example imports convc.torch_backend only after its torch.compile
    calls, so this also proves the entry point (pyproject.toml) that makes backend="convc" work after
    pip install (run outside the checkout, whose stale convc.egg-info, if any, would shadow it)."""
    env = dict(os.environ, CONVC_CACHE_DIR=str(tmp_path / "cache"))
    res = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "..", "examples", "from_torch.py")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    errs = [float(line.split("=")[-1]) for line in res.stdout.splitlines() if "max |convc - torch|" in line]
    assert len(errs) == 2 and max(errs) < 1e-5, res.stdout
    assert res.stdout.count("loss") == 5
    assert "left to PyTorch: ['aten.max_pool2d_with_indices.default']" in res.stdout, res.stdout


def test_bench_rows():
    """convc/bench_torch.run (the `convc bench --torch` rows), small: eager and convc, no inductor."""
    from convc.bench_torch import format_rows, run
    rows = run(["resnet18-style"], repeats=3, inductor=False, size=32)
    assert [r["backend"] for r in rows] == ["eager", "convc"]
    convc = rows[1]
    assert convc["max_diff"] < 1e-4 and convc["ms"] > 0 and convc["first_call_s"] > 0
    assert (convc["convc_parts"], convc["left_eager"]) == (1, 0)
    assert "| resnet18-style | convc |" in format_rows(rows)

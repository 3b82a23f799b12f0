"""cc.from_torch for issue 20's ops (convc/torch_frontend.py): the ATen ops
torch.export produces for elu/selu/celu, softplus, mish, the unary math,
maximum/minimum/pow, prelu, the reductions and norms (amax, amin, prod,
logsumexp, vector norms, var/std/var_mean, layer and group norm),
pixel_shuffle/unshuffle, index_select/gather/where with constant indices or
masks, dtype casts and repeat -- each against PyTorch eager through
generated C, in float32 (1e-5) and float64 (1e-10).

* ``test_module``: one nn.Module using every forward op, per dtype (one
  export and one compile each).
* ``test_backward_ops``: the backward ATen ops (elu, softplus, mish, prelu)
  and the norms' mean/rstd outputs that AOTAutograd's training graphs read,
  in one hand-built FX graph, float64.
* ``test_refusals``: parameters convc cannot express are listed at once,
  each with its reason and source line.

``OPS`` names the converters these tests cover; tests/test_from_torch.py's
every-op table takes them from here, and ``test_ops_covered`` checks that the
graphs below do contain each of them.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import convc as cc  # noqa: E402
from convc.torch_frontend import TorchImportError, decompositions, fx_to_graph  # noqa: E402
from helpers import assert_close  # noqa: E402
from test_from_torch import Recorder  # noqa: E402  (one FX recorder for both op tables)

aten = torch.ops.aten
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")     # torch.export's own

LONG = os.environ.get("CONVC_LONG_TESTS", "") not in ("", "0")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}

OPS = {f"aten.{op}" for op in (
    "elu.default", "celu.default", "softplus.default", "mish.default", "sqrt.default", "rsqrt.default",
    "exp.default", "log.default", "neg.default", "abs.default", "reciprocal.default", "erf.default",
    "maximum.default", "minimum.default", "pow.Tensor_Tensor", "pow.Tensor_Scalar", "pow.Scalar",
    "prelu.default", "_prelu_kernel.default", "mean.default", "amax.default", "amin.default", "prod.dim_int", "prod.default",
    "logsumexp.default", "linalg_vector_norm.default", "var.correction", "std.correction",
    "var_mean.correction", "native_layer_norm.default", "native_group_norm.default", "pixel_shuffle.default",
    "pixel_unshuffle.default", "index_select.default", "gather.default", "where.self", "scalar_tensor.default",
    "_assert_tensor_metadata.default", "_to_copy.default", "repeat.default",
    "elu_backward.default", "softplus_backward.default", "mish_backward.default",
    "_prelu_kernel_backward.default")}


def check(got, want, dtype, what):
    want = want.detach().numpy()
    scale = max(1.0, float(np.abs(want).max())) if want.size else 1.0
    tol = TOL[dtype]
    assert_close(got, want, rtol=tol["rtol"], atol=tol["atol"] * scale, what=what, check_dtype=True)


class Ops(nn.Module):
    """Every forward op of this file; ``x`` (2, 4, 6, 6)."""

    def __init__(self, dtype):
        super().__init__()
        self.prelu = nn.PReLU(4)
        self.prelu1 = nn.PReLU()
        self.ln = nn.LayerNorm([6, 6])
        self.gn = nn.GroupNorm(2, 4)
        with torch.no_grad():
            for p in (self.prelu.weight, self.ln.weight, self.ln.bias, self.gn.weight, self.gn.bias):
                p.uniform_(-1.5, 1.5)
        g = torch.Generator().manual_seed(3)
        self.register_buffer("idx", torch.tensor([2, 0, 3, 3, 1]))
        self.register_buffer("gidx", torch.randint(0, 6, (2, 3, 5, 6), generator=g))
        self.register_buffer("mask", torch.rand(6, 6, generator=g) > 0.5)
        # float64's softplus must switch to x where its smooth value is the same number (see refusals)
        self.threshold = 20.0 if dtype == torch.float32 else 40.0
        self.other = torch.float64 if dtype == torch.float32 else torch.float32

    def forward(self, x):
        p = x.abs() + 0.5
        return {
            "elu": F.elu(x, 0.7), "selu": F.selu(x), "celu": F.celu(x, 1.3),
            "softplus": F.softplus(x * 12, threshold=self.threshold),
            "softplus beta": F.softplus(x, 2.0, self.threshold + 10), "mish": F.mish(x * 8),
            "sqrt": torch.sqrt(p), "rsqrt": torch.rsqrt(p), "exp": x.exp(), "log": p.log(), "neg": -x,
            "reciprocal": torch.reciprocal(x), "erf": torch.erf(x),
            "maximum": torch.maximum(x, x.transpose(2, 3)), "minimum": torch.minimum(x, torch.tensor(0.25)),
            "pow scalar": p ** 1.5, "pow tensor": p ** x, "scalar pow": 2 ** x,
            "prelu": self.prelu(x), "prelu shared": self.prelu1(x),
            "amax": x.amax((2, 3)), "amin": x.amin(1, keepdim=True), "prod": p.prod(3), "prod all": p[:1, :2].prod(),
            "mean all": x.mean(),
            "logsumexp": torch.logsumexp(x * 30, 1), "l2": torch.linalg.vector_norm(x, dim=(2, 3)),
            "l1": torch.linalg.vector_norm(x, 1, dim=1), "inf": torch.linalg.vector_norm(x, float("inf"), dim=3),
            "-inf": torch.linalg.vector_norm(x, -float("inf"), dim=2, keepdim=True), "norm": x.norm(dim=1),
            "var": torch.var(x, (2, 3), correction=0), "std": x.std(2), "var_mean": torch.var_mean(x, dim=1)[1],
            "layer_norm": self.ln(x), "group_norm": self.gn(x),
            "pixel_shuffle": F.pixel_shuffle(x, 2), "pixel_unshuffle": F.pixel_unshuffle(x, 2),
            "index_select": x.index_select(1, self.idx), "gather": torch.gather(x, 3, self.gidx),
            "where": torch.where(self.mask, x, 0.5), "cast": (x.to(self.other) * 3.1).to(x.dtype),
            "repeat": x.repeat(1, 2, 1, 3), "repeat new axis": x.sum(0).repeat(2, 1, 1, 1),
        }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_module(dtype):
    """float32 by default; float64 with CONVC_LONG_TESTS=1 (test_training
    checks the float64 values of the ops with transcendental functions)."""
    if dtype == torch.float64 and not LONG:
        pytest.skip("float64 module with CONVC_LONG_TESTS=1")
    torch.manual_seed(0)
    m = Ops(dtype).to(dtype).eval()
    x = torch.randn(2, 4, 6, 6, dtype=dtype)
    x[0, 0, 0, :4] = torch.tensor([0.0, 3.0, -4.0, 4.0], dtype=dtype)     # softplus(12 x) past 20 and 40
    g = cc.from_torch(m, (x,))
    assert not {"idx", "gidx", "mask"} & set(g.param_names)        # read as arrays, not left as params
    got = cc.compile(g, target="c").run({"x": x.numpy()})
    with torch.no_grad():
        want = m(x)
    assert len(got) == len(want)
    for (label, w), o in zip(want.items(), got.values()):
        check(o, w, dtype, label)


# -- backward ops (what AOTAutograd's training graphs hold), one hand-built FX graph ---------
def record_backward(dtype=torch.float64) -> Recorder:
    gen = torch.Generator().manual_seed(1)
    r = Recorder()
    xt = torch.randn(2, 4, 5, 5, generator=gen, dtype=dtype) * 3
    x, gy = r.input(xt), r.input(torch.randn(2, 4, 5, 5, generator=gen, dtype=dtype))
    out = r.outputs.append
    out(("elu_backward", r.call(aten.elu_backward.default, gy, 0.7, 1.0, 1.0, False, x)))
    out(("elu_backward (selu)", r.call(aten.elu_backward.default, gy, 1.6732632423543772, 1.0507009873554805,
                                       1.0, False, x)))
    out(("elu_backward (celu)", r.call(aten.elu_backward.default, gy, 1.3, 1.0, 1 / 1.3, False, x)))
    y = r.call(aten.elu.default, x, 0.7, 1.2, 0.5)
    out(("elu scale input_scale", y))
    out(("elu_backward from y", r.call(aten.elu_backward.default, gy, 0.7, 1.2, 0.5, True, y)))
    out(("softplus_backward", r.call(aten.softplus_backward.default, gy, x, 1.0, 40.0)))
    out(("softplus_backward beta", r.call(aten.softplus_backward.default, gy, x, 0.5, 50.0)))
    out(("mish_backward", r.call(aten.mish_backward.default, gy, x)))
    for what, w in (("per channel", torch.rand(4, 1, 1, generator=gen, dtype=dtype)),
                    ("shared", torch.rand(1, generator=gen, dtype=dtype))):
        pw = r.input(w)
        out((f"_prelu_kernel {what}", r.call(aten._prelu_kernel.default, x, pw)))
        pb = r.call(aten._prelu_kernel_backward.default, gy, x, pw)
        out((f"prelu grad x {what}", r.item(pb, 0)))
        out((f"prelu grad weight {what}", r.item(pb, 1)))
    lw, lb = r.input(torch.randn(5, 5, generator=gen, dtype=dtype)), r.input(torch.randn(5, 5, generator=gen,
                                                                                      dtype=dtype))
    ln = r.call(aten.native_layer_norm.default, x, [5, 5], lw, lb, 1e-5)
    gn = r.call(aten.native_group_norm.default, x, None, None, 2, 4, 25, 2, 1e-3)
    for what, node in (("layer_norm", ln), ("group_norm", gn)):
        for i, part in enumerate(("", " mean", " rstd")):
            out((what + part, r.item(node, i)))
    vm = r.call(aten.var_mean.correction, x, [0, 2], correction=2, keepdim=True)
    out(("var_mean var", r.item(vm, 0)))
    out(("prod of all", r.call(aten.prod.default, x)))
    r.graph.output(tuple(n for _, n in r.outputs))
    return r


def test_backward_ops():
    dtype = torch.float64
    r = record_backward(dtype)
    gm = torch.fx.GraphModule(torch.nn.Module(), r.graph)
    placeholders = {n: ("input", n.name, tuple(t.shape), "float64") for n, t in r.inputs.items()}
    g, outs = fx_to_graph(gm, placeholders, "backward_ops")
    res = cc.compile(g, target="c").run({n.name: t.numpy() for n, t in r.inputs.items()})
    for (label, node), o in zip(r.outputs, outs):
        check(res[o], node.meta["val"], dtype, label)


class Trained(nn.Module):
    """The differentiable ops whose backward graphs AOTAutograd builds from
    mapped ops only (the reductions' and maximum's read comparisons, which
    convc does not compute)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.prelu, self.ln, self.gn = nn.PReLU(4), nn.LayerNorm([6, 6]), nn.GroupNorm(2, 4)

    def forward(self, x):
        h = self.conv(x)
        q = h * h + 1
        h = F.elu(h, 0.7) + F.selu(h) + F.celu(h, 1.3) + F.softplus(h, 2.0, 40.0) + F.mish(h) + self.prelu(h)
        h = self.gn(self.ln(h)) * torch.sqrt(q) + torch.rsqrt(q) + h.exp() + q.log() + torch.erf(h) + 1 / q
        h = h + q ** 1.5 + F.pixel_unshuffle(F.pixel_shuffle(h, 2), 2) + torch.logsumexp(h, 1, True) + h.var(1, keepdim=True)
        return (h.repeat(1, 2, 1, 1) ** 2).mean()


def test_training():
    """torch.compile(backend='convc'): the forward and the whole backward
    graph run as convc's C; float64 gradients match eager's to 1e-10."""
    from convc import torch_backend
    torch.manual_seed(0)
    eager = Trained().double()
    model = copy.deepcopy(eager)
    fast = torch.compile(model, backend="convc")
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    n_reports = len(torch_backend.reports)
    losses = [f(x) for f in (eager, fast)]
    for loss in losses:
        loss.backward()
    check(losses[1].detach().numpy(), losses[0], torch.float64, "loss")
    for (name, p), q in zip(eager.named_parameters(), model.parameters()):
        check(q.grad.numpy(), p.grad, torch.float64, f"d loss / d {name}")
    forward, backward = torch_backend.reports[n_reports:]
    assert not forward.eager and not backward.eager, (forward, backward)      # nothing left to PyTorch
    assert len(forward.parts) == len(backward.parts) == 1


def exported_ops(module, x) -> set[str]:
    ep = torch.export.export(module, (x,)).run_decompositions(decompositions())
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}


def test_ops_covered():
    """OPS (which tests/test_from_torch.py's every-op check trusts) holds
    only ops the graphs here do contain."""
    seen = exported_ops(Ops(torch.float32).eval(), torch.randn(2, 4, 6, 6)) | record_backward().ops
    assert OPS <= seen, f"claimed but not exercised: {sorted(OPS - seen)}"


# -- refusals --------------------------------------------------------------------------
class Refused(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("idx", torch.tensor([1, 0]))

    def forward(self, x):
        a = F.softplus(x)                                    # float64 with torch's threshold 20
        b = torch.linalg.vector_norm(x, 3, dim=1)
        c = x.index_select(1, (x[:, :2, 0, 0] > 0).long().sum(0))   # indices from unmapped ops
        d = x.to(torch.int32).to(x.dtype)
        e = F.softplus(x, -1.0, 50.0)
        return a, b, c, d, e


def test_refusals():
    with pytest.raises(TorchImportError) as e:
        cc.from_torch(Refused(), (torch.randn(1, 3, 4, 4, dtype=torch.float64),))
    msg = str(e.value)
    why = {op: reason for op, _, reason, _ in e.value.problems}
    assert "threshold=20.0 on float64" in why["aten.softplus.default"] and "threshold >= 38" in msg, msg
    assert "ord=3" in why["aten.linalg_vector_norm.default"], msg
    assert "aten.gt.Scalar" in why, msg
    assert "a cast to torch.int32" in why["aten._to_copy.default"], msg
    assert "F.softplus(x)" in msg and "test_torch_frontend_ops.py" in msg       # the first softplus' line
    # softplus' first refusal (threshold) is listed; the second (beta < 0) says why on its own
    with pytest.raises(TorchImportError, match=r"beta=-1.0"):
        cc.from_torch(nn.Softplus(-1.0, 50.0), (torch.randn(1, 3),))
    # indices (or a mask) computed at run time: the FX graph's int64 input
    r = Recorder()
    x, idx = r.input(torch.randn(2, 3)), r.input(torch.tensor([1, 0]))
    r.graph.output((r.call(aten.index_select.default, x, 1, idx),))
    ph = {n: ("input", n.name, tuple(t.shape), str(t.dtype).split(".")[1]) for n, t in r.inputs.items()}
    with pytest.raises(TorchImportError, match="index must be a constant of the module"):
        fx_to_graph(torch.fx.GraphModule(torch.nn.Module(), r.graph), ph)

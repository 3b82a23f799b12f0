"""Normalisations (convc/ops/normalize.py): ``lrn``, ``instance_norm``,
``group_norm``, ``layer_norm``, ``lp_normalize`` and their gradients:

* forward against torch (``local_response_norm``, ``instance_norm``,
  ``group_norm``, ``layer_norm``, ``normalize``) on every target, all cases
  as outputs of one graph (one compile per target);
* gradients in float64 against torch autograd on every target, and the
  numpy reference's gradient against central finite differences (24
  entries per case; all with CONVC_LONG_TESTS=1);
* the ONNX converters (LRN, InstanceNormalization, GroupNormalization in
  its opset-18 and opset-21 forms, LayerNormalization, LpNormalization)
  against ONNX Runtime, all nodes of an opset in one model;
* bad attributes as clear ConvcErrors.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

import convc as cc
from convc.ops.normalize import group_norm, instance_norm, layer_norm, lp_normalize, lrn
from helpers import TARGETS, assert_close

RNG = np.random.default_rng(7)
LONG = os.environ.get("CONVC_LONG_TESTS", "") not in ("", "0")


def _run_cases(cases, shape_of, seed=0):
    """``cases``: [(id, build(x) -> Value, torch_fn(tensor) -> tensor)], all
    on inputs of the shape ``shape_of(id)``; returns nothing, asserts the
    forward results and gradients (float64) on every target against torch,
    and the numpy reference's gradient against finite differences."""
    rng = np.random.default_rng(seed)
    g = cc.Graph("norm_cases")
    feeds, want = {}, {}
    for cid, build, tfn in cases:
        shape = shape_of(cid)
        x = g.input(f"x_{cid}", shape, "float64")
        gy = g.input(f"gy_{cid}", shape if build is None else build(x).shape, "float64")
        y = build(x)
        g.output(y, f"y_{cid}")
        dx, = cc.grad(y, [x], grad_output=gy)
        g.output(dx, f"dx_{cid}")
        a, b = rng.standard_normal(shape), rng.standard_normal(y.shape)
        feeds[f"x_{cid}"], feeds[f"gy_{cid}"] = a, b
        t = torch.tensor(a, requires_grad=True)
        ty = tfn(t)
        ty.backward(torch.tensor(b))
        want[f"y_{cid}"], want[f"dx_{cid}"] = ty.detach().numpy(), t.grad.numpy()
    for target in TARGETS:
        got = cc.compile(g, target=target).run(feeds)
        for k, v in want.items():
            assert_close(got[k], v, rtol=1e-9, atol=1e-10, what=f"{k} on {target}")
    # finite differences of the numpy reference (one forward graph per case): d/dx of sum(y * gy)
    for cid, build, _ in cases:
        x0, gy0 = feeds[f"x_{cid}"], feeds[f"gy_{cid}"]
        fg = cc.Graph("fd")
        fg.output(build(fg.input("x", x0.shape, "float64")), "y")
        ref = cc.compile(fg, target="numpy")
        picked = [tuple(int(v) for v in np.unravel_index(i, x0.shape))      # 24 entries (all with LONG)
                  for i in (range(x0.size) if LONG else rng.choice(x0.size, min(24, x0.size), replace=False))]
        h = 1e-6
        for i in picked:
            up, dn = x0.copy(), x0.copy()
            up[i] += h
            dn[i] -= h
            fd = np.sum((ref.run({"x": up})["y"] - ref.run({"x": dn})["y"]) * gy0) / (2 * h)
            assert_close(want[f"dx_{cid}"][i], fd, rtol=1e-5, atol=1e-6, what=f"finite differences of {cid} at {i}")


# -- LRN -------------------------------------------------------------------------------
LRN_CASES = [  # (id, size, alpha, beta, bias)
    ("size5", 5, 1e-2, 0.75, 1.0),
    ("size3_bias2", 3, 0.3, 0.5, 2.0),
    ("size1", 1, 1e-1, 0.75, 1.0),
    ("size7_wide", 7, 0.5, 1.2, 1.5),       # wider than half the channels: clipped at both ends
]


def test_forward_special_cases():
    """In one graph: for an even size ONNX puts LRN's extra channel after
    c, PyTorch before it: convc's LRN of x equals torch's of x with the
    channels reversed, reversed back (and differs from torch's as it is);
    LRN in float32 on large values; lp_normalize of a zero vector is zero."""
    g = cc.Graph("special")
    x = g.input("x", (2, 6, 3, 3), "float64")
    g.output(lrn(x, 4, 0.5, 0.75, 1.0), "even")
    x32 = g.input("x32", (1, 8, 5, 5))
    g.output(lrn(x32, 5, 1e-4, 0.75, 1.0), "lrn32")
    z = g.input("z", (2, 3))
    g.output(lp_normalize(z, 2, 1), "lp")
    a = RNG.standard_normal((2, 6, 3, 3))
    a32 = (RNG.standard_normal((1, 8, 5, 5)) * 10).astype(np.float32)
    feeds = {"x": a, "x32": a32, "z": np.array([[0, 0, 0], [3, 0, 4]], np.float32)}
    flipped = F.local_response_norm(torch.tensor(a[:, ::-1].copy()), 4, 0.5, 0.75, 1.0).numpy()[:, ::-1]
    lrn32 = F.local_response_norm(torch.tensor(a32), 5, 1e-4, 0.75, 1.0).numpy()
    for target in TARGETS:
        got = cc.compile(g, target=target).run(feeds)
        assert_close(got["even"], flipped, rtol=1e-12, atol=1e-12, what=f"lrn size 4 on {target}")
        assert not np.allclose(got["even"], F.local_response_norm(torch.tensor(a), 4, 0.5, 0.75, 1.0).numpy())
        assert_close(got["lrn32"], lrn32, rtol=1e-5, atol=1e-6, what=f"lrn float32 on {target}")
        assert_close(got["lp"], [[0, 0, 0], [0.6, 0, 0.8]], what=f"lp_normalize on {target}")


@pytest.mark.parametrize("attrs, rule", [
    (dict(size=0), "size must be a positive integer"),
    (dict(size=2.5), "size must be a positive integer"),
    (dict(size=3, bias=0.0), "bias must be > 0"),
    (dict(size=3, alpha=float("nan")), "alpha must be a finite number"),
])
def test_lrn_bad_attributes(attrs, rule):
    g = cc.Graph("bad")
    x = g.input("x", (1, 4, 3, 3))
    with pytest.raises(cc.ConvcError, match=rule):
        lrn(x, **attrs)


# -- instance, group, layer norm; lp_normalize ---------------------------------------------------
W6, B6 = RNG.standard_normal(6), RNG.standard_normal(6)
WL, BL = RNG.standard_normal((3, 4)), RNG.standard_normal(4)
NORM_CASES = [  # (id, build, torch twin); x is (2, 6, 3, 4)
    ("instance", lambda x: instance_norm(x, W6, B6, 1e-3),
     lambda t: F.instance_norm(t, weight=torch.tensor(W6), bias=torch.tensor(B6), eps=1e-3)),
    ("instance_plain", lambda x: instance_norm(x), lambda t: F.instance_norm(t)),
    ("group3", lambda x: group_norm(x, 3, W6, B6), lambda t: F.group_norm(t, 3, torch.tensor(W6), torch.tensor(B6))),
    ("group1_plain", lambda x: group_norm(x, 1), lambda t: F.group_norm(t, 1)),
    ("layer_last2", lambda x: layer_norm(x, 2, WL, BL),
     lambda t: F.layer_norm(t, (3, 4), torch.tensor(WL), torch.tensor(BL).expand(3, 4))),
    ("layer_last", lambda x: layer_norm(x, -1, eps=1e-2), lambda t: F.layer_norm(t, (4,), eps=1e-2)),
    ("lp2_axis1", lambda x: lp_normalize(x, 2, 1), lambda t: F.normalize(t, 2, 1)),
    ("lp1_last", lambda x: lp_normalize(x, 1, -1), lambda t: F.normalize(t, 1, -1)),
]


def test_against_torch_and_gradients():
    """The LRN and norm cases in one graph (one compile per target); four
    more with CONVC_LONG_TESTS=1."""
    lrn_cases = [(f"lrn_{cid}", lambda x, s=s, a=a, b=b, k=k: lrn(x, s, a, b, k),
                  lambda t, s=s, a=a, b=b, k=k: F.local_response_norm(t, s, a, b, k))
                 for cid, s, a, b, k in LRN_CASES]
    lrn_cases.append(("lrn_rank3", lambda x: lrn(x, 3, 0.1, 0.75, 1.0),
                      lambda t: F.local_response_norm(t, 3, 0.1, 0.75, 1.0)))
    cases = lrn_cases + NORM_CASES
    if not LONG:        # by default one case of each way a norm is built
        cases = [c for c in cases if c[0] not in ("lrn_size3_bias2", "lrn_size1", "instance_plain", "layer_last")]
    _run_cases(cases,
               lambda cid: (2, 5, 3) if cid == "lrn_rank3" else (2, 6, 3, 2) if cid.startswith("lrn") else (2, 6, 3, 4),
               seed=1)


def test_norm_param_gradients():
    """weight and bias as graph inputs: their gradients (the broadcast mul
    and add's) against torch autograd, on every target."""
    rng = np.random.default_rng(2)
    g = cc.Graph("norm_params")
    x = g.input("x", (2, 6, 3), "float64")
    w, b = g.input("w", (6,), "float64"), g.input("b", (6,), "float64")
    y = group_norm(x, 2, w, b)
    gy = g.input("gy", y.shape, "float64")
    for name, v in zip(("dx", "dw", "db"), cc.grad(y, [x, w, b], grad_output=gy)):
        g.output(v, name)
    feeds = {k: rng.standard_normal(s) for k, s in (("x", (2, 6, 3)), ("w", (6,)), ("b", (6,)), ("gy", (2, 6, 3)))}
    ts = {k: torch.tensor(feeds[k], requires_grad=True) for k in ("x", "w", "b")}
    F.group_norm(ts["x"], 2, ts["w"], ts["b"]).backward(torch.tensor(feeds["gy"]))
    for target in TARGETS:
        got = cc.compile(g, target=target).run(feeds)
        for k in ("x", "w", "b"):
            assert_close(got[f"d{k}"], ts[k].grad.numpy(), rtol=1e-10, atol=1e-12, what=f"d{k} on {target}")


@pytest.mark.parametrize("build, rule", [
    (lambda x: group_norm(x, 4), "num_groups 4 must be a positive divisor of the 6 channels"),
    (lambda x: instance_norm(x, np.ones(5)), "weight must have 6 elements"),
    (lambda x: layer_norm(x, 2, np.ones((4, 3))), r"weight of shape \(4, 3\) does not broadcast"),
    (lambda x: lp_normalize(x, 3), "p must be 1 or 2"),
    (lambda x: layer_norm(x, 4), "axis 4 is out of range"),
])
def test_norm_bad_arguments(build, rule):
    g = cc.Graph("bad")
    x = g.input("x", (2, 6, 3, 4))
    with pytest.raises(cc.ConvcError, match=rule):
        build(x)


# -- ONNX against ONNX Runtime ---------------------------------------------------------------
def _one_node(op, inputs, attrs, opset, extra_inits=(), out_shape=None, outputs=("y",)):
    """A model of one node: ``inputs`` [(name, array)] the first a graph input,
    the rest initializers."""
    (xname, xa), rest = inputs[0], inputs[1:]
    node = helper.make_node(op, [n for n, _ in inputs], list(outputs), **attrs)
    inits = [onnx.numpy_helper.from_array(a, n) for n, a in rest]
    graph = helper.make_graph([node], f"one_{op}",
                              [helper.make_tensor_value_info(xname, TensorProto.FLOAT, xa.shape)],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def test_onnx_lrn_even_size_is_onnx_formula():
    """ONNX Runtime refuses even sizes, and onnx.reference's LRN loops over
    the batch instead of the channels: the import of an even-size LRN (the
    op's C is checked in test_forward_special_cases) against the formula of
    ONNX's LRN doc, written out here."""
    x = (RNG.standard_normal((1, 6, 4, 4)) * 3).astype(np.float32)
    size, c_n = 4, x.shape[1]
    model = _one_node("LRN", [("x", x)], dict(size=size, alpha=0.05, beta=0.6, bias=1.5), 13)
    square_sum = np.stack([np.sum(x[:, max(0, c - (size - 1) // 2):min(c_n - 1, c - (-(size - 1) // 2)) + 1] ** 2,
                                  axis=1) for c in range(c_n)], axis=1)
    want = x / (1.5 + 0.05 / size * square_sum) ** 0.6
    assert_close(cc.compile(cc.from_onnx(model), target="numpy").run({"x": x})["y"], want, rtol=1e-5, atol=1e-6)


def test_onnx_lrn_needs_size():
    x = np.ones((1, 3, 2, 2), np.float32)
    with pytest.raises(cc.ConvcError, match="size is required"):
        cc.from_onnx(_one_node("LRN", [("x", x)], {}, 13))


def _norm_model(opset):
    """LRN, InstanceNormalization, GroupNormalization (18: per-group scale
    and bias; 21: per channel), LayerNormalization (from 17; with its Mean
    and InvStdDev outputs) and LpNormalization in one model."""
    rng = np.random.default_rng(opset)
    c, groups = 6, 3
    arr = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = dict(s_c=arr(c), b_c=arr(c), s_g=arr(groups), b_g=arr(groups), s_l=arr(3, 4), b_l=arr(4))
    nodes = [helper.make_node("InstanceNormalization", ["x", "s_c", "b_c"], ["inst"], epsilon=1e-3),
             helper.make_node("LRN", ["x"], ["lrn3"], size=3, alpha=0.05, beta=0.6, bias=1.5),
             helper.make_node("LRN", ["x"], ["lrn5"], size=5),
             helper.make_node("LpNormalization", ["x"], ["lp2"], axis=1, p=2),
             helper.make_node("LpNormalization", ["x"], ["lp1"], p=1)]
    if opset >= 17:
        nodes.append(helper.make_node("LayerNormalization", ["x", "s_l", "b_l"], ["layer", "mean", "inv_std"],
                                      axis=-2, epsilon=1e-4))
    if opset >= 18:
        per = "c" if opset >= 21 else "g"
        nodes.append(helper.make_node("GroupNormalization", ["x", f"s_{per}", f"b_{per}"], ["group"],
                                      num_groups=groups, epsilon=1e-4))
    outs = [o for n in nodes for o in n.output]
    graph = helper.make_graph(nodes, f"norms_{opset}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, (2, c, 3, 4))],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
                              [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


@pytest.mark.parametrize("opset", [18, 21])
def test_onnx_norms_against_ort(opset):
    import onnxruntime as ort
    model = _norm_model(opset)
    x = RNG.standard_normal((2, 6, 3, 4)).astype(np.float32)
    x[1, :, 2, 3] = 0            # a zero vector for LpNormalization along the channels
    want = dict(zip([o.name for o in model.graph.output],
                    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
                        None, {"x": x})))
    got = list(cc.compile(cc.from_onnx(model)).run({"x": x}).values())     # (the ops' OpenCL: tests above)
    assert len(got) == len(want)
    for (name, w), v in zip(want.items(), got):
        assert v.shape == w.shape, f"{name}: shape {v.shape}, ONNX Runtime's {w.shape}"
        assert_close(v, w, rtol=1e-4, atol=1e-5, what=f"{name} (opset {opset})")


def test_onnx_group_norm_scale_shape_checked():
    """GroupNormalization-18 with a per-channel scale (21's form) is refused, naming the rule."""
    x = np.ones((1, 4, 2, 2), np.float32)
    model = _one_node("GroupNormalization", [("x", x), ("s", np.ones(4, np.float32)), ("b", np.ones(4, np.float32))],
                      dict(num_groups=2), 18)
    with pytest.raises(cc.ConvcError, match=r"GroupNormalization-18: scale must have shape \(2,\) \(one per group\)"):
        cc.from_onnx(model)

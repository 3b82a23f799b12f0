"""Reductions and the pools made of them (convc/ops/reduce.py, lp_pool in
convc/ops/pool.py) and their ONNX converters (convc/onnx/ops_reduce.py):

* ``reduce`` of every kind over several axis sets, with and without
  keepdims, against torch on every target (all cases outputs of one graph),
  with gradients in float64 against torch autograd (ties included: max and
  min split the gradient evenly, as torch.amax/amin) and finite differences;
* NaN propagation through max/min, log_sum_exp on huge and -inf inputs,
  prod's gradient with zeros;
* ``lp_pool`` and ``global_max_pool`` against torch, with gradients (in the
  same graph);
* ReduceSum/Mean/Max/Min/Prod/L1/L2/SumSquare/LogSumExp in the attribute
  form (opset 11 and 13) and the input form (13 for ReduceSum, 18 for the
  others), keepdims and noop_with_empty_axes, GlobalMaxPool and LpPool
  (opset 11, and 18 with ceil_mode and dilations) against ONNX Runtime:
  one model holding every node of a form, compiled for C (the ops' OpenCL
  is checked above);
* bad attributes and non-constant axes as clear ConvcErrors.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

import convc as cc
from convc.ops.pool import lp_pool
from convc.ops.reduce import global_max_pool, reduce
from helpers import TARGETS, assert_close

SHAPE = (3, 4, 5)
LONG = os.environ.get("CONVC_LONG_TESTS", "") not in ("", "0")


def torch_reduce(kind, t, axes, keep):
    if kind == "prod":          # torch.prod takes one dim: reduce one at a time, innermost first
        for a in sorted(axes, reverse=True):
            t = t.prod(a, keepdim=True)
        return t if keep else t.squeeze(tuple(axes))
    fn = {"sum": lambda: t.sum(axes, keepdim=keep), "mean": lambda: t.mean(axes, keepdim=keep),
          "max": lambda: t.amax(axes, keepdim=keep), "min": lambda: t.amin(axes, keepdim=keep),
          "l1": lambda: t.abs().sum(axes, keepdim=keep),
          "l2": lambda: torch.linalg.vector_norm(t, 2, axes, keepdim=keep),
          "sum_square": lambda: (t * t).sum(axes, keepdim=keep),
          "log_sum_exp": lambda: torch.logsumexp(t, axes, keepdim=keep)}
    return fn[kind]()


KINDS = ("sum", "mean", "max", "min", "prod", "l1", "l2", "sum_square", "log_sum_exp")
AXES = [((1,), True), ((0, 2), False), ((0, 1, 2), False), ((2,), False)]


def _input(rng):
    """Values with ties (for max/min), a zero (for prod) and signs (for l1)."""
    a = rng.standard_normal(SHAPE)
    a[1, :, 1] = 2.5            # ties along axis 1
    a[2, 1:3, 3] = -3.0         # ties for min
    a[0, 0, 0] = 0.0            # a zero in prod's and l1's rows
    return a


def test_reduce_against_torch_every_kind_and_target():
    """Each kind over one of the axis sets (all four with CONVC_LONG_TESTS=1),
    the special values and the pools, in one graph (one compile per target)."""
    rng = np.random.default_rng(3)
    g = cc.Graph("reduce_cases")
    feeds, want = {}, {}
    a = _input(rng)
    x = g.input("x", SHAPE, "float64")
    feeds["x"] = a
    for n, kind in enumerate(KINDS):
        for axes, keep in (AXES if LONG else [AXES[n % 4]]):
            cid = f"{kind}_{''.join(map(str, axes))}_{int(keep)}"
            y = reduce(x, kind, axes, keep)
            gy = g.input(f"gy_{cid}", y.shape, "float64")
            g.output(y, f"y_{cid}")
            g.output(cc.grad(y, [x], grad_output=gy)[0], f"dx_{cid}")
            feeds[f"gy_{cid}"] = rng.standard_normal(y.shape)
            t = torch.tensor(a, requires_grad=True)
            ty = torch_reduce(kind, t, axes, keep)
            ty.backward(torch.tensor(feeds[f"gy_{cid}"]))
            want[f"y_{cid}"], want[f"dx_{cid}"] = ty.detach().numpy(), t.grad.numpy()
    check_special = special_values(g, feeds, want)
    pools(g, feeds, want, rng)
    for target in TARGETS:
        got = cc.compile(g, target=target).run(feeds)
        for k, v in want.items():
            assert got[k].shape == v.shape, (k, got[k].shape, v.shape)
            assert_close(got[k], v, rtol=1e-10, atol=1e-12, what=f"{k} on {target}")
        check_special(got, target)


def special_values(g, feeds, want):
    """NaN propagates through max and min; log_sum_exp does not overflow on
    huge inputs, and is -inf for a row of -inf; prod's gradient with two
    zeros is zero, with one zero the product of the others there. Adds its
    nodes to ``g``; returns the check of a target's results."""
    x = g.input("special", (4, 3), "float32")
    for kind in ("max", "min", "log_sum_exp"):
        g.output(reduce(x, kind, 1), f"special_{kind}")
    a = np.array([[1, np.nan, 2], [1000, 1001, 999], [-np.inf, -np.inf, -np.inf], [0, 0, 5]], np.float32)
    feeds["special"] = a
    with np.errstate(all="ignore"):
        lse = torch.logsumexp(torch.tensor(a), 1).numpy()
    z = g.input("zeros", (3, 3), "float64")
    y = reduce(z, "prod", 1)
    g.output(cc.grad(y, [z], grad_output=g.input("gy_zeros", (3,), "float64"))[0], "dx_zeros")
    feeds["zeros"], feeds["gy_zeros"] = np.array([[0, 0, 5], [0, 2, 3], [1, 2, 3]], np.float64), np.ones(3)
    t = torch.tensor(feeds["zeros"], requires_grad=True)
    t.prod(1).backward(torch.ones(3, dtype=torch.float64))
    want["dx_zeros"] = t.grad.numpy()

    def check(got, target):
        assert np.isnan(got["special_max"][0]) and np.isnan(got["special_min"][0]), target
        assert_close(got["special_max"][1:], [1001, -np.inf, 5], what=f"max on {target}")
        assert_close(got["special_log_sum_exp"][1:], lse[1:], rtol=1e-6, what=f"log_sum_exp on {target}")
        assert np.isneginf(got["special_log_sum_exp"][2])
    return check


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in ("max", "min")])
def test_reduce_gradient_finite_differences(kind):
    """(max and min are not differentiable at ties; torch is their check.)"""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((2, 3, 4)) + (2.0 if kind == "prod" else 0.0)
    g = cc.Graph("fd")
    x = g.input("x", a.shape, "float64")
    y = reduce(x, kind, (0, 2), False)
    gy = g.input("gy", y.shape, "float64")
    g.output(y, "y")
    g.output(cc.grad(y, [x], grad_output=gy)[0], "dx")
    ref = cc.compile(g, target="numpy")
    b = rng.standard_normal(y.shape)
    dx = ref.run({"x": a, "gy": b})["dx"]
    fd, h = np.zeros_like(a), 1e-6
    for i in np.ndindex(a.shape):
        up, dn = a.copy(), a.copy()
        up[i] += h
        dn[i] -= h
        fd[i] = np.sum((ref.run({"x": up, "gy": b})["y"] - ref.run({"x": dn, "gy": b})["y"]) * b) / (2 * h)
    assert_close(dx, fd, rtol=1e-5, atol=1e-7, what=f"{kind}: gradient vs finite differences")


POOL_CASES = [  # (id, shape, p, kernel, stride, padding, dilation)
    ("p2_2d_pad", (2, 3, 7, 6), 2, 3, 2, 1, 1),
    ("p1_2d", (1, 2, 6, 6), 1, 2, 1, 0, 1),
    ("p3_1d_dil", (2, 2, 9), 3, 3, 1, 0, 2),
    ("p2_5_3d", (1, 2, 4, 5, 4), 2.5, 2, 1, 0, 1),
]


def pools(g, feeds, want, rng):
    """lp_pool and global_max_pool against torch, with gradients: torch's
    lp_pool sums x^p, so the inputs are positive (the same as |x|^p for odd
    p); its padding is applied first (zeros, as ONNX's). Adds the nodes to
    ``g``, the feeds and expected results to ``feeds`` and ``want``."""
    for cid, shape, p, k, s, pad, d in POOL_CASES:
        x = g.input(f"x_{cid}", shape, "float64")
        y = lp_pool(x, p, k, s, pad, d)
        gy = g.input(f"gy_{cid}", y.shape, "float64")
        g.output(y, f"y_{cid}")
        g.output(cc.grad(y, [x], grad_output=gy)[0], f"dx_{cid}")
        a, b = np.abs(rng.standard_normal(shape)) + 0.1, rng.standard_normal(y.shape)
        feeds[f"x_{cid}"], feeds[f"gy_{cid}"] = a, b
        t = torch.tensor(a, requires_grad=True)
        rank = len(shape) - 2
        tp = F.pad(t, (pad,) * (2 * rank)) if pad else t
        if d == 1:
            ty = {1: F.lp_pool1d, 2: F.lp_pool2d, 3: F.lp_pool3d}[rank](tp, p, k, s)
        else:   # torch's lp_pool has no dilation: the same sum through unfold
            ty = (tp.abs() ** p).unfold(2, d * (k - 1) + 1, s)[..., ::d].sum(-1) ** (1 / p)
        ty.backward(torch.tensor(b))
        want[f"y_{cid}"], want[f"dx_{cid}"] = ty.detach().numpy(), t.grad.numpy()
    x = g.input("x_gmp", (2, 3, 4, 5), "float64")
    y = global_max_pool(x)
    g.output(y, "y_gmp")
    g.output(cc.grad(y, [x], grad_output=g.input("gy_gmp", y.shape, "float64"))[0], "dx_gmp")
    a = rng.standard_normal((2, 3, 4, 5))
    a[0, 0, 1, 1] = a[0, 0, 2, 2] = 9.0         # a tie: the gradient splits
    feeds["x_gmp"], feeds["gy_gmp"] = a, rng.standard_normal(y.shape)
    t = torch.tensor(a, requires_grad=True)
    ty = t.amax((2, 3), keepdim=True)
    ty.backward(torch.tensor(feeds["gy_gmp"]))
    want["y_gmp"], want["dx_gmp"] = ty.detach().numpy(), t.grad.numpy()


@pytest.mark.parametrize("build, rule", [
    (lambda x: reduce(x, "median", 1), "kind must be one of"),
    (lambda x: reduce(x, "max", 4), "axis 4 is out of range"),
    (lambda x: lp_pool(x, 0.5, 2), "p must be a finite number >= 1"),
    (lambda x: global_max_pool(cc.reshape(x, (12, 5))), "global_max_pool: input must be"),
])
def test_bad_attributes(build, rule):
    g = cc.Graph("bad")
    x = g.input("x", (1, 3, 4, 5))
    with pytest.raises(cc.ConvcError, match=rule):
        build(x)


# -- ONNX against ONNX Runtime --------------------------------------------------------------------
ONNX_REDUCE = ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
               "ReduceSumSquare", "ReduceLogSumExp")
ONNX_AXES = [([1], 1), ([0, -1], 0), (None, 1), ([-3, 1, 2], 0)]     # (axes, keepdims); None: all


def _model(nodes, x_shape, outputs, opset, inits=()):
    graph = helper.make_graph(nodes, f"reduce_{opset}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                              list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _reduce_model(opset):
    """Every ReduceX with every axes choice, in the form of ``opset``, plus
    noop_with_empty_axes (where the opset has it) and a ReduceMean that is a
    global average pool."""
    nodes, outs, inits = [], [], []
    for op in ONNX_REDUCE:
        by_input = opset >= (13 if op == "ReduceSum" else 18)
        for i, (axes, keep) in enumerate(ONNX_AXES):
            out = f"{op}_{i}"
            if by_input:
                ins = ["x"] + ([f"{out}.axes"] if axes is not None else [])
                if axes is not None:
                    inits.append(onnx.numpy_helper.from_array(np.array(axes, np.int64), f"{out}.axes"))
                nodes.append(helper.make_node(op, ins, [out], keepdims=keep))
            else:
                nodes.append(helper.make_node(op, ["x"], [out], keepdims=keep,
                                              **({"axes": axes} if axes is not None else {})))
            outs.append(out)
        if by_input:      # no axes and noop_with_empty_axes: the identity
            nodes.append(helper.make_node(op, ["x"], [f"{op}_noop"], noop_with_empty_axes=1))
            outs.append(f"{op}_noop")
    nodes.append(helper.make_node("ReduceMean", ["x"], ["gap"], keepdims=0,
                                  **({"axes": [2]} if opset < 18 else {}), **({} if opset < 18 else {})))
    outs.append("gap")
    if opset >= 18:
        nodes[-1].input.append("gap.axes")
        inits.append(onnx.numpy_helper.from_array(np.array([2], np.int64), "gap.axes"))
    return _model(nodes, (2, 3, 4), outs, opset, inits)


def _against_ort(model, x, rtol=1e-5, atol=1e-6):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = dict(zip([o.name for o in model.graph.output], sess.run(None, {"x": x})))
    got = cc.compile(cc.from_onnx(model)).run({"x": x})      # (the ops' OpenCL: the tests above)
    assert len(got) == len(want)
    for (name, w), v in zip(want.items(), got.values()):
        assert v.shape == w.shape, f"{name}: shape {v.shape}, ONNX Runtime's {w.shape}"
        assert_close(v, w, rtol=rtol, atol=atol, what=f"{name} (opset {model.opset_import[0].version})")


def _pool_nodes(opset):
    nodes = [helper.make_node("GlobalMaxPool", ["x4"], ["gmp"]),
             helper.make_node("LpPool", ["x4"], ["lp2"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], p=2),
             helper.make_node("LpPool", ["x4"], ["lp3"], kernel_shape=[2, 3], p=3),
             helper.make_node("LpPool", ["x4"], ["lp_big_pad"], kernel_shape=[2, 2], pads=[1, 1, 1, 1], p=1)]
    if opset >= 18:
        nodes += [helper.make_node("LpPool", ["x4"], ["lp_ceil"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1, p=2),
                  helper.make_node("LpPool", ["x4"], ["lp_dil"], kernel_shape=[2, 2], dilations=[2, 1], p=2)]
    return nodes


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_onnx_reduce_forms_against_ort(opset):
    """11: every axes an attribute; 13: ReduceSum's an input, the others'
    attributes; 18: all inputs. GlobalMaxPool and LpPool (18: ceil_mode and
    dilations) in the same model, on x reshaped to (1, 2, 3, 4)."""
    x = np.random.default_rng(opset).standard_normal((2, 3, 4)).astype(np.float32)
    x[0, 1, 2] = 0.0
    model = _reduce_model(opset)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1, 2, 3, 4], np.int64), "x4.shape"))
    pools = [helper.make_node("Reshape", ["x", "x4.shape"], ["x4"])] + _pool_nodes(opset)
    model.graph.node.extend(pools)
    model.graph.output.extend(helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in pools[1:])
    _against_ort(model, x)


def test_onnx_reduce_bad_input():
    """Axes from a run-time tensor, an axis out of range: ConvcErrors that say so."""
    node = helper.make_node("ReduceMax", ["x", "axes"], ["y"])
    graph = helper.make_graph([node], "runtime_axes",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, (2, 3)),
                               helper.make_tensor_value_info("axes", TensorProto.INT64, (1,))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    with pytest.raises(cc.ConvcError, match="axes .* must be a constant"):
        cc.from_onnx(model)
    with pytest.raises(cc.ConvcError, match="axes entry 5 is out of range"):
        cc.from_onnx(_model([helper.make_node("ReduceL2", ["x"], ["y"], axes=[5])], (2, 3), ["y"], 13))


@pytest.mark.parametrize("opset", [13, 18])
def test_export_roundtrip(opset):
    """to_onnx of reduce (attribute axes at 13, input at 18), lrn, lp_pool,
    and the norms (standardize is LayerNormalization): valid ONNX that ONNX
    Runtime runs to convc's numbers, and that imports back to the same."""
    from convc.ops.normalize import instance_norm, layer_norm, lp_normalize, lrn
    rng = np.random.default_rng(opset)
    g = cc.Graph("export")
    x = g.input("x", (2, 6, 4, 5))
    for kind in KINDS[1:]:
        g.output(reduce(x, kind, (1, 3), kind in ("max", "l2")), f"r_{kind}")
    g.output(lp_pool(x, 2, 2, 1, 1), "lp")
    g.output(lrn(x, 5, 0.1, 0.75, 2.0), "lrn")
    g.output(lp_normalize(x, 2, 1), "lpn")
    if opset >= 17:
        g.output(instance_norm(x, rng.standard_normal(6), rng.standard_normal(6)), "inst")
        g.output(layer_norm(x, 2, rng.standard_normal((4, 5))), "layer")
        g.output(reduce(x, "sum_square", ()), "square")     # noop_with_empty_axes
    model = cc.to_onnx(g, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    a = rng.standard_normal((2, 6, 4, 5)).astype(np.float32)
    want = cc.compile(g, target="numpy").run({"x": a})
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": a})
    back = cc.compile(cc.from_onnx(model), target="numpy").run({"x": a})
    for (name, w), y, b in zip(want.items(), got, back.values()):
        assert_close(y, w, rtol=1e-5, atol=1e-5, what=f"ONNX Runtime {name} (opset {opset})")
        assert_close(b, w, rtol=1e-6, atol=1e-6, what=f"re-imported {name} (opset {opset})")


def test_export_refusals():
    g = cc.Graph("refused")
    x = g.input("x", (1, 2, 5, 5))
    g.output(lp_pool(x, 2, 2, ceil_mode=True), "y")
    with pytest.raises(cc.ConvcError, match="ceil_mode and dilations need opset >= 18"):
        cc.to_onnx(g, opset=17)

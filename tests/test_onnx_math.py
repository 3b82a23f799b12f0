"""ONNX's elementwise math: the binary ops maximum, minimum, pow and prelu
(value and gradients on every target vs torch and finite differences, the
integer and mixed-dtype powers exactly), and the ONNX converters of every
math op and new activation vs ONNX Runtime through merged one-node models
(one model per opset, one compile per target). The activations' own value
and gradient checks are tests/test_activations.py's (parametrized over the
table); the node cases of these ops run in the conformance suite."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import convc as cc
from convc.passes import run as run_passes
from helpers import TARGETS, assert_close

LONG = os.environ.get("CONVC_LONG_TESTS", "") not in ("", "0")
NATIVE = [t for t in TARGETS if t != "numpy"]


# -- maximum, minimum, pow, prelu: values and gradients ----------------------------------
def _binary_cases(rng):
    """(name, builder, torch function, a, b): broadcasting in every case, ties planted."""
    a = rng.standard_normal((2, 3, 4))
    b = rng.standard_normal((3, 1))
    b[1, 0] = a[0, 1, 2]                       # a tie: the gradient splits in two
    pos = np.abs(rng.standard_normal((2, 3, 4))) + 0.2
    return [
        ("maximum", cc.maximum, torch.maximum, a, b),
        ("minimum", cc.minimum, torch.minimum, a, b),
        ("pow", cc.pow, torch.pow, pos, b),
        ("prelu", cc.prelu, lambda x, w: torch.where(x > 0, x, w * x), a, rng.standard_normal((3, 1))),
    ]


@pytest.fixture(scope="module")
def binary_runs():
    rng = np.random.default_rng(0)
    g = cc.Graph("binary_math")
    feeds, want = {}, {}
    for name, build, tfn, aa, ba in _binary_cases(rng):
        a, b = g.input(f"{name}_a", aa.shape, "float64"), g.input(f"{name}_b", ba.shape, "float64")
        y = build(a, b)
        ga = rng.standard_normal(y.shape)
        gy = g.input(f"{name}_g", y.shape, "float64")
        g.output(y, name)
        da, db = cc.grad(y, [a, b], grad_output=gy)
        g.output(da, f"{name}_da")
        g.output(db, f"{name}_db")
        feeds.update({f"{name}_a": aa, f"{name}_b": ba, f"{name}_g": ga})
        ta, tb = torch.tensor(aa, requires_grad=True), torch.tensor(ba, requires_grad=True)
        ty = tfn(ta, tb)
        ty.backward(torch.tensor(ga))
        want.update({name: ty.detach().numpy(), f"{name}_da": ta.grad.numpy(), f"{name}_db": tb.grad.numpy()})
    got = {t: cc.compile(g, target=t).run(feeds) for t in TARGETS}
    return got, want, feeds


@pytest.mark.parametrize("target", TARGETS)
def test_binary_ops_and_gradients_match_torch(binary_runs, target):
    got, want, _ = binary_runs
    for k in want:
        assert_close(got[target][k], want[k], rtol=1e-11, atol=1e-12, what=f"{k} [{target}]")


def test_binary_gradients_match_finite_differences(binary_runs):
    """Away from ties (where the one-sided derivatives differ), the gradient
    is the derivative of the reference: central differences in float64."""
    got, _, feeds = binary_runs
    from convc.ops.elementwise import Maximum, Minimum, Pow, PRelu
    refs = {"maximum": Maximum(), "minimum": Minimum(), "pow": Pow(), "prelu": PRelu()}
    eps = 1e-6
    for name, op in refs.items():
        a, b, gy = feeds[f"{name}_a"], feeds[f"{name}_b"], feeds[f"{name}_g"]
        for wrt, x in ((0, a), (1, b)):
            fd = np.zeros_like(x)
            for i in np.ndindex(x.shape):
                d = np.zeros_like(x)
                d[i] = eps
                args = [(a + d, b), (a - d, b)] if wrt == 0 else [(a, b + d), (a, b - d)]
                hi, lo = (np.sum(op.reference({}, *p) * gy) for p in args)
                fd[i] = (hi - lo) / (2 * eps)
            key = f"{name}_{'ab'[wrt]}"
            mask = np.ones(x.shape, bool)
            if name in ("maximum", "minimum"):      # the tie's derivative is the average of the sides
                tie = np.broadcast_to(a == b, gy.shape).any(axis=tuple(range(gy.ndim - x.ndim)))
                tie = tie.any(axis=tuple(k for k, n in enumerate(x.shape) if n == 1), keepdims=True) \
                    if wrt == 1 else tie                # (the elements of b that meet a tie)
                mask = ~tie
            assert_close(got["numpy"][f"{name}_d{'ab'[wrt]}"][mask], fd[mask], rtol=1e-6, atol=1e-8, what=key)


def test_integer_pow_max_min_exact_and_nan_ties_as_torch():
    """Integer powers wrap modulo 2**bits exactly (Python ints are the
    oracle), negative exponents truncate 1 / a**-b; int ** float saturates;
    maximum/minimum of integers; of floats, NaN wins and a tie (-0.0 and
    0.0) gives a, as torch.maximum/minimum."""
    rng = np.random.default_rng(3)
    a32 = rng.integers(-9, 10, (3, 7)).astype(np.int32)
    e32 = rng.integers(-3, 40, (1, 7)).astype(np.int32)
    a8 = rng.integers(-128, 128, (2, 5)).astype(np.int8)
    e64 = rng.integers(0, 70, (2, 5)).astype(np.int64)
    u16 = rng.integers(0, 2**16, (9,)).astype(np.uint16)
    fexp = np.array([0.5, 1.5, 3.7, 40.0, -1.0, np.nan, 1e30, 0.0, 0.25], np.float32)   # (no exact results but 1)
    g = cc.Graph("ipow")
    va, ve, vb, vf, vu, vg = (g.input(n, x.shape, x.dtype.name) for n, x in
                              (("a32", a32), ("e32", e32), ("a8", a8), ("e64", e64), ("u16", u16), ("f", fexp)))
    g.output(cc.pow(va, ve), "p32")
    g.output(cc.pow(vb, vf), "p8")
    g.output(cc.pow(vu, vg), "pu")
    g.output(cc.maximum(va, np.full((1, 7), 3)), "mx")
    g.output(cc.minimum(vu, vu), "mn")
    fa = np.array([np.nan, 1.0, -0.0, 2.0], np.float32)
    fb = np.array([1.0, np.nan, 0.0, 3.0], np.float32)
    va, vb = g.input("fa", (4,)), g.input("fb", (4,))
    g.output(cc.maximum(va, vb), "fmx")
    g.output(cc.minimum(va, vb), "fmn")
    want_f = {"fmx": torch.maximum(torch.tensor(fa), torch.tensor(fb)).numpy(),
              "fmn": torch.minimum(torch.tensor(fa), torch.tensor(fb)).numpy()}

    def ipow(x, e, bits, signed):
        if e < 0:
            return 1 if x == 1 else ((-1) ** (-e) if x == -1 else 0)
        r = pow(int(x), int(e), 2**bits)
        return r - 2**bits if signed and r >= 2**(bits - 1) else r

    want32 = np.array([[ipow(x, e, 32, True) for x, e in zip(row, e32[0])] for row in a32], np.int32)
    want8 = np.array([[ipow(x, e, 8, True) for x, e in zip(ra, re)] for ra, re in zip(a8, e64)], np.int8)
    with np.errstate(all="ignore"):
        r = np.trunc(np.power(u16.astype(np.float32), fexp))
    wantu = np.where(np.isnan(r), 0, np.clip(np.nan_to_num(r, posinf=65535), 0, 65535)).astype(np.uint16)
    feeds = {"a32": a32, "e32": e32, "a8": a8, "e64": e64, "u16": u16, "f": fexp, "fa": fa, "fb": fb}
    for t in TARGETS:
        got = cc.compile(g, target=t).run(feeds)
        for k, w in want_f.items():
            np.testing.assert_array_equal(got[k], w, err_msg=f"{k} [{t}]")
            assert np.signbit(got[k][2]) == np.signbit(w[2]), f"{k} [{t}]: the tie of -0.0 and 0.0 gives a"
        np.testing.assert_array_equal(got["p32"], want32, err_msg=t)
        np.testing.assert_array_equal(got["p8"], want8, err_msg=t)
        np.testing.assert_array_equal(got["pu"], wantu, err_msg=t)
        np.testing.assert_array_equal(got["mx"], np.maximum(a32, 3), err_msg=t)
        np.testing.assert_array_equal(got["mn"], u16, err_msg=t)


def test_binary_ops_refuse_bad_operands():
    g = cc.Graph("bad")
    x, s = g.input("x", (2, 3, 4)), g.input("s", (2, 1, 3, 4))
    with pytest.raises(cc.ConvcError, match=r"prelu.*slope \(2, 1, 3, 4\) must broadcast to x's shape"):
        cc.prelu(x, s)
    with pytest.raises(cc.ConvcError, match="must share one dtype"):
        cc.maximum(x, g.input("i", (4,), "int32"))
    with pytest.raises(cc.ConvcError, match="do not broadcast"):
        cc.pow(x, g.input("e", (5,)))
    with pytest.raises(cc.ConvcError, match="kind must be one of"):
        g.add("binary_grad", [x, x, x], {"kind": "atan2", "wrt": 0})


def test_new_activations_fuse_into_a_conv_epilogue():
    """fuse_epilogues takes the new records like the old: conv -> selu / mish / sqrt
    each become one conv node with that activation in its epilogue."""
    for kind in ("selu", "mish", "sqrt", "thresholded_relu"):
        g = cc.Graph("fuse")
        x = g.input("x", (1, 2, 6, 6))
        w = g.param("w", np.random.default_rng(0).standard_normal((3, 2, 3, 3)).astype(np.float32))
        g.output(g.add(kind, [cc.conv(x, w, padding=1)], {}, "act"), "y")
        fused = run_passes(g, ["fuse_epilogues"])
        ops = [fused.node(n)["op"] for n in fused.nx.nodes if fused.node(n)["op"] not in ("input", "param")]
        assert ops == ["conv"], f"{kind}: {ops}"
        assert next(fused.node(n)["attrs"].get("activation") for n in fused.nx.nodes
                    if fused.node(n)["op"] == "conv") == kind


# -- ONNX: one model per opset, every node of it compared with ONNX Runtime ---------------
F32 = TensorProto.FLOAT


def _model(opset: int, nodes, inputs: dict, consts: dict | None = None):
    """An ONNX model of ``nodes`` whose outputs are every node's first output."""
    ins = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
           for n, a in inputs.items()]
    outs = [helper.make_empty_tensor_value_info(nd.output[0]) for nd in nodes]
    inits = [numpy_helper.from_array(a, n) for n, a in (consts or {}).items()]
    graph = helper.make_graph(nodes, f"math_opset{opset}", ins, outs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = min(m.ir_version, 8)            # (what the installed ONNX Runtime reads)
    typed = {v.name: v for v in onnx.shape_inference.infer_shapes(m).graph.value_info}   # the outputs' types
    del m.graph.output[:]
    m.graph.output.extend(typed.get(nd.output[0]) or helper.make_tensor_value_info(nd.output[0], F32, None)
                          for nd in nodes)         # (no type where inference fails: the models made to fail)
    if all(nd.output[0] in typed for nd in nodes):
        onnx.checker.check_model(m)
    return m


def _compare_with_ort(model, feeds, targets, rtol=2e-6, atol=2e-6):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in model.graph.output]
    want = dict(zip(names, sess.run(names, feeds)))
    g = cc.from_onnx(model)
    for t in targets:
        got = cc.compile(g, target=t).run(feeds)
        for n in names:
            assert got[n].dtype == want[n].dtype, f"{n} [{t}]: dtype {got[n].dtype}, ORT {want[n].dtype}"
            assert_close(got[n], want[n], rtol=rtol, atol=atol, what=f"{n} [{t}]")
    return g


def _unary(op, x, out, **attrs):
    return helper.make_node(op, [x], [out], name=out, **attrs)


def test_onnx_math_and_activations_match_onnxruntime():
    """Opset 18: every unary op of this issue (with ONNX's default attributes
    and with given ones, HardSigmoid's alpha and beta among them), Pow (15)
    with broadcasting, an integer exponent and the constant 2 and 3 that
    become products, PRelu with a per-channel slope, and the variadic ops
    with one and three inputs, on C (and OpenCL with CONVC_LONG_TESTS=1: the
    kernels themselves are test_activations' and the binary tests' above)."""
    rng = np.random.default_rng(1)
    x = rng.uniform(-4, 4, (2, 3, 4, 5)).astype(np.float32)
    p = np.abs(x) + np.float32(0.1)
    feeds = {"x": x, "p": p, "e": rng.uniform(-2, 2, (4, 1)).astype(np.float32),
             "ei": rng.integers(-3, 4, (5,)).astype(np.int64), "slope": rng.standard_normal((3, 1, 1)).astype(np.float32),
             "y": rng.standard_normal((3, 4, 1)).astype(np.float32), "z": rng.standard_normal((5,)).astype(np.float32)}
    consts = {"two": np.array(2.0, np.float32), "three": np.array([3.0], np.float32),
              "half": np.array(0.5, np.float32)}
    nodes = [
        _unary("Elu", "x", "elu"), _unary("Elu", "x", "elu_a", alpha=0.3),
        _unary("Selu", "x", "selu"), _unary("Selu", "x", "selu_ag", alpha=2.0, gamma=0.5),
        _unary("Softplus", "x", "softplus"), _unary("Softsign", "x", "softsign"),
        _unary("ThresholdedRelu", "x", "thr"), _unary("ThresholdedRelu", "x", "thr_a", alpha=-0.5),
        _unary("Mish", "x", "mish"),
        _unary("HardSigmoid", "x", "hsig"), _unary("HardSigmoid", "x", "hsig_ab", alpha=0.35, beta=0.4),
        _unary("HardSwish", "x", "hswish"),
        _unary("Sqrt", "p", "sqrt"), _unary("Exp", "x", "exp"), _unary("Log", "p", "log"),
        _unary("Neg", "x", "neg"), _unary("Abs", "x", "abs"), _unary("Reciprocal", "p", "recip"),
        _unary("Erf", "x", "erf"),
        helper.make_node("Pow", ["p", "e"], ["pow"], name="pow"),
        helper.make_node("Pow", ["x", "ei"], ["pow_int"], name="pow_int"),
        helper.make_node("Pow", ["x", "two"], ["pow_2"], name="pow_2"),
        helper.make_node("Pow", ["x", "three"], ["pow_3"], name="pow_3"),
        helper.make_node("Pow", ["p", "half"], ["pow_half"], name="pow_half"),
        helper.make_node("PRelu", ["x", "slope"], ["prelu"], name="prelu"),
        helper.make_node("Sum", ["x", "y", "z"], ["sum"], name="sum"),
        helper.make_node("Mean", ["x", "y", "z"], ["mean"], name="mean"),
        helper.make_node("Max", ["x", "y", "z"], ["max"], name="max"),
        helper.make_node("Min", ["x", "y", "z"], ["min"], name="min"),
        helper.make_node("Max", ["x"], ["max1"], name="max1"),
        helper.make_node("Mean", ["x"], ["mean1"], name="mean1"),
    ]
    g = _compare_with_ort(_model(18, nodes, feeds, consts), feeds, NATIVE if LONG else ["c"])
    ops = {g.node(n)["op"] for n in g.nx.nodes}
    assert "pow" in ops and {"elu", "selu", "mish", "erf", "maximum", "minimum", "prelu"} <= ops
    assert g.node("pow_2")["op"] == "mul" and g.node("pow_3")["op"] == "mul"     # ORT's x*x, x*x*x


def test_onnx_old_opsets_match_onnxruntime():
    """Pow at opset 7 (one float type, broadcasting) and 12 (integer bases and
    exponents of another type: int32 ** int32, int64 ** float, float ** int32),
    the variadic ops at opset 7 (equal shapes) and PRelu at 7, on C."""
    rng = np.random.default_rng(2)
    a = rng.uniform(0.2, 3, (3, 4)).astype(np.float32)
    b = rng.uniform(-2, 2, (4,)).astype(np.float32)
    c = rng.standard_normal((3, 4)).astype(np.float32)
    nodes7 = [helper.make_node("Pow", ["a", "b"], ["pow7"]), helper.make_node("Sum", ["a", "c"], ["sum7"]),
              helper.make_node("Max", ["a", "c", "a"], ["max7"]), helper.make_node("Mean", ["a", "c"], ["mean7"]),
              helper.make_node("PRelu", ["c", "b"], ["prelu7"]), _unary("Elu", "c", "elu6", alpha=0.7)]
    _compare_with_ort(_model(7, nodes7, {"a": a, "b": b, "c": c}), {"a": a, "b": b, "c": c}, ["c"])
    feeds = {"i": rng.integers(-6, 7, (3, 4)).astype(np.int32), "j": rng.integers(0, 9, (4,)).astype(np.int32),
             "l": rng.integers(0, 6, (3, 4)).astype(np.int64), "f": rng.uniform(0, 3, (4,)).astype(np.float32),
             "a": a}
    nodes12 = [helper.make_node("Pow", ["i", "j"], ["ii"]), helper.make_node("Pow", ["l", "f"], ["lf"]),
               helper.make_node("Pow", ["a", "j"], ["aj"])]
    _compare_with_ort(_model(12, nodes12, feeds), feeds, ["c"], rtol=1e-6, atol=0)


def test_onnx_refusals_name_the_rule():
    x = np.zeros((2, 3, 4), np.float32)
    bad_slope = _model(16, [helper.make_node("PRelu", ["x", "s"], ["y"], name="pr")],
                       {"x": x, "s": np.zeros((2, 1, 1, 1), np.float32)})
    with pytest.raises(cc.ConvcError, match=r"pr.*slope \(2, 1, 1, 1\) does not broadcast to X \(2, 3, 4\)"):
        cc.from_onnx(bad_slope)
    bad_sum = _model(13, [helper.make_node("Sum", ["x", "z"], ["y"], name="s")],
                     {"x": x, "z": np.zeros((5,), np.float32)})
    with pytest.raises(cc.ConvcError, match=r"Sum 's'.*do not broadcast"):
        cc.from_onnx(bad_sum)


def test_new_activations_export_to_onnx():
    """to_onnx writes the new records as their ONNX ops (params as attributes);
    onnx.reference agrees with convc's reference."""
    from onnx.reference import ReferenceEvaluator
    g = cc.Graph("export_math")
    x = g.input("x", (2, 7))
    g.output(cc.selu(cc.elu(x, 0.5)), "a")
    g.output(cc.thresholded_relu(cc.softsign(x), alpha=-0.2), "b")
    g.output(cc.erf(cc.neg(cc.abs(x))), "c")
    g.output(cc.prelu(cc.maximum(cc.minimum(x, 1.5), cc.pow(cc.abs(x), np.full((7,), 1.5, np.float32))),
                      np.full((2, 1), 0.25, np.float32)), "d")
    xa = np.linspace(-3, 3, 14, dtype=np.float32).reshape(2, 7)
    m = cc.to_onnx(g, opset=18)
    assert {n.op_type for n in m.graph.node} - {"Identity"} == {"Selu", "Elu", "ThresholdedRelu", "Softsign", "Erf",
                                                                 "Neg", "Abs", "Max", "Min", "Pow", "PRelu"}
    got = ReferenceEvaluator(m).run(None, {"x": xa})
    ref = cc.compile(g, target="numpy").run({"x": xa})
    for name, v in zip(("a", "b", "c", "d"), got):
        assert_close(v, ref[name], rtol=1e-6, atol=1e-6, what=name)

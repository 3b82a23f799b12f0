"""ONNX int8 (issue 15 item 3): import of QuantizeLinear, DequantizeLinear,
QLinearConv, QLinearMatMul, MatMulInteger and ONNX Runtime's QOperator
contrib ops; the ``fold_qdq`` pass; models from
``onnxruntime.quantization.quantize_static``; export of int8 graphs as QDQ.

Oracle: ONNX Runtime. QuantizeLinear / DequantizeLinear and MatMulInteger
are exact integer (or exactly rounded) definitions, compared bit for bit.
ONNX Runtime requantizes a QLinear op's int32 sum in float (``round(acc *
real_multiplier)``) where convc uses TensorFlow Lite's fixed point
(:mod:`convc.quant`), so there the outputs agree within one step of the
output's scale; the tests measure and bound the fraction that is exact.
C and OpenCL agree with convc's numpy reference bit for bit everywhere.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
from helpers import TARGETS
from onnx import TensorProto, helper, numpy_helper

import convc as cc
from convc.onnx import OnnxImportError, from_onnx

ort = pytest.importorskip("onnxruntime")
INT = {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8}
COMPILED = [t for t in TARGETS if t != "numpy"]


def _model(nodes, inputs, outputs, inits, opset=13):
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info(n, e, s) for n, e, s in inputs],
                          [helper.make_tensor_value_info(n, e, None) for n, e in outputs],
                          [numpy_helper.from_array(np.asarray(v), n) for n, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8 if opset < 21 else 10
    return m


def _ort(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _run_all(g, feeds):
    """Outputs of every compiled target, each checked bit-equal to the reference's."""
    ref = cc.compile(g, target="numpy").run(feeds)
    for t in COMPILED:
        got = cc.compile(g, target=t).run(feeds)
        for k in ref:
            assert got[k].dtype == ref[k].dtype and np.array_equal(got[k], ref[k]), (t, k, got[k], ref[k])
    return ref


def _lsb(got: np.ndarray, want: np.ndarray) -> tuple[int, float]:
    """(largest difference in steps, fraction exact) of two integer arrays."""
    d = np.abs(got.astype(np.int64) - want.astype(np.int64))
    return int(d.max()), float((d == 0).mean())


# -- QuantizeLinear / DequantizeLinear ------------------------------------------------
QDQ_CASES = [(opset, dtype, axis) for opset in (10, 13, 19, 21) for dtype in ("int8", "uint8")
             for axis in ((None, 1) if opset >= 13 else (None,))]


@pytest.mark.parametrize("opset,dtype,axis", QDQ_CASES)
def test_quantize_dequantize_linear_match_ort(opset, dtype, axis):
    """Ties (x / scale = k + 1/2: half to even), saturation at both ends,
    zero points off 0, per tensor and per axis: bit for bit."""
    c = 3
    scale = np.array([0.5, 0.25, 2.0], np.float32) if axis is not None else np.array(0.5, np.float32)
    lo, hi = np.iinfo(dtype).min, np.iinfo(dtype).max
    zp = (np.array([3, -7, 0], dtype) if dtype == "int8" else np.array([3, 200, 0], dtype)) if axis is not None \
        else np.array(5 if dtype == "int8" else 130, dtype)
    x = np.concatenate([np.arange(-8, 8, dtype=np.float32) * 0.25 + 0.125,        # ties at every scale
                        np.array([1e4, -1e4, 0.0, 0.75, -0.75, 63.5, -64.5, 0.3], np.float32)])
    x = np.stack([x * (k + 1) for k in range(c)]).reshape(1, c, 6, 4)
    kw = {"axis": axis} if axis is not None else {}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **kw),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **kw)]
    m = _model(nodes, [("x", TensorProto.FLOAT, x.shape)], [("q", INT[dtype]), ("y", TensorProto.FLOAT)],
               {"s": scale, "z": zp}, opset)
    want_q, want_y = _ort(m, {"x": x})
    g = from_onnx(m)
    assert sorted(g.node(n)["op"] for n in g.nx if g.node(n)["op"] in ("quantize", "dequantize")) == \
        ["dequantize", "quantize"]
    res = _run_all(g, {"x": x})
    assert np.array_equal(res["q"], want_q) and res["q"].dtype == np.dtype(dtype)
    assert np.array_equal(res["y"], want_y)
    assert want_q.min() == lo and want_q.max() == hi          # the data saturates at both ends


# -- QLinearConv, QLinearMatMul, MatMulInteger -------------------------------------------
def _qlinear_conv_model(dtype, per_channel, group, stride, pads, bias, rng):
    c_in, c_out, k = 4, 8, 3
    w = rng.integers(-127, 128, (c_out, c_in // group, k, k), dtype=np.int8)
    inits = {"xs": np.float32(0.05), "xz": np.array(7 if dtype == "int8" else 131, dtype),
             "w": w, "ws": (rng.uniform(0.002, 0.01, c_out) if per_channel else np.array(0.006)).astype(np.float32),
             "wz": np.zeros(c_out if per_channel else (), np.int8),
             "ys": np.float32(0.11), "yz": np.array(-3 if dtype == "int8" else 120, dtype)}
    ins = ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"]
    if bias:
        inits["b"] = rng.integers(-3000, 3000, c_out, dtype=np.int32)
        ins.append("b")
    node = helper.make_node("QLinearConv", ins, ["y"], strides=[stride] * 2, pads=pads, group=group,
                            kernel_shape=[k, k])
    return _model([node], [("x", INT[dtype], (2, c_in, 9, 8))], [("y", INT[dtype])], inits)


QCONV_CASES = [("uint8", True, 1, 1, [1, 1, 1, 1], True), ("int8", True, 2, 2, [0, 1, 1, 0], True),
               ("int8", False, 1, 1, [0, 0, 0, 0], False), ("uint8", False, 4, 2, [1, 1, 1, 1], True)]


@pytest.mark.parametrize("dtype,per_channel,group,stride,pads,bias", QCONV_CASES)
def test_qlinear_conv_matches_ort(dtype, per_channel, group, stride, pads, bias):
    rng = np.random.default_rng(group * 10 + stride)
    m = _qlinear_conv_model(dtype, per_channel, group, stride, pads, bias, rng)
    lo, hi = np.iinfo(dtype).min, np.iinfo(dtype).max
    x = rng.integers(lo, hi, (2, 4, 9, 8), dtype=dtype, endpoint=True)
    (want,) = _ort(m, {"x": x})
    g = from_onnx(m)
    assert [g.node(n)["op"] for n in g.topological_order() if g.node(n)["op"] not in ("input", "param")] == ["qconv"]
    got = _run_all(g, {"x": x})["y"]
    worst, exact = _lsb(got, want)
    assert worst <= 1 and exact >= 0.95, (worst, exact)        # ORT requantizes in float, convc in fixed point


def test_qlinear_matmul_and_matmul_integer_match_ort():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (2, 5, 12), dtype=np.uint8)
    b = rng.integers(-128, 128, (12, 7), dtype=np.int8)
    inits = {"as": np.float32(0.02), "az": np.uint8(128), "b": b, "bs": rng.uniform(0.01, 0.03, 7).astype(np.float32),
             "bz": np.zeros(7, np.int8), "ys": np.float32(0.3), "yz": np.uint8(100), "az2": np.uint8(3),
             "bz2": np.int8(-2)}
    nodes = [helper.make_node("QLinearMatMul", ["a", "as", "az", "b", "bs", "bz", "ys", "yz"], ["y"]),
             helper.make_node("MatMulInteger", ["a", "b", "az2", "bz2"], ["acc"])]
    m = _model(nodes, [("a", TensorProto.UINT8, a.shape)], [("y", TensorProto.UINT8), ("acc", TensorProto.INT32)],
               inits)
    want_y, want_acc = _ort(m, {"a": a})
    g = from_onnx(m)
    assert {g.node(n)["op"] for n in g.nx} == {"input", "param", "qmatmul"}
    res = _run_all(g, {"a": a})
    assert res["acc"].dtype == np.int32 and np.array_equal(res["acc"], want_acc)
    worst, exact = _lsb(res["y"], want_y)
    assert worst <= 1 and exact >= 0.9, (worst, exact)


# -- quantize_static models of a small torch conv net -------------------------------------
def _torch_net():
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = nn.Conv2d(8, 8, 3, padding=1)
            self.c3 = nn.Conv2d(8, 8, 1)
            self.fc = nn.Linear(8 * 4 * 4, 10)

        def forward(self, x):
            h = torch.relu(self.c1(x))
            h = nn.functional.max_pool2d(h, 2)
            h = torch.relu(self.c2(h) + self.c3(h))            # a residual add
            h = nn.functional.max_pool2d(h, 2)
            return self.fc(h.flatten(1))

    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    import torch
    path = tmp_path_factory.mktemp("ort") / "float.onnx"
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_torch_net(), (torch.randn(2, 3, 16, 16),), buf, dynamo=False, input_names=["x"],
                          output_names=["y"])
    path.write_bytes(buf.getvalue())
    return path


def _quantized(float_model, fmt: str, per_channel: bool, act: str):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Batches(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.it = iter([{"x": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.it, None)

    out = float_model.parent / f"q_{fmt}_{per_channel}_{act}.onnx"
    quantize_static(str(float_model), str(out), Batches(),
                    quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                    per_channel=per_channel, activation_type=QuantType.QUInt8 if act == "uint8" else QuantType.QInt8,
                    weight_type=QuantType.QInt8)
    return onnx.load(str(out))


STATIC = [(fmt, pc, act) for fmt in ("qdq", "qoperator") for pc in (True, False) for act in ("uint8", "int8")]


@pytest.mark.parametrize("fmt,per_channel,act", STATIC)
def test_quantize_static_models_match_ort(float_model, fmt, per_channel, act):
    """The whole net runs in integers (no float conv, dense or add left);
    its int8/uint8 output matches ONNX Runtime's within one step, most of it
    exactly."""
    m = _quantized(float_model, fmt, per_channel, act)
    g = from_onnx(m)
    ops = {g.node(n)["op"] for n in g.nx}
    assert not ops & {"conv", "dense", "add", "relu"}, ops
    assert {"qconv", "qadd", "qdense", "max_pool"} <= ops, ops
    assert all(g.node(n)["type"].dtype == act for n in g.nx if g.node(n)["op"] in ("qconv", "qadd", "max_pool"))
    out = g.outputs["y"]                        # the final DequantizeLinear: compare its integers
    (q_node,) = g.inputs_of(out)
    y_scale = g.node(out)["attrs"]["scale"][0]
    g.output(cc.Value(g, q_node), "yq")
    x = np.random.default_rng(7).standard_normal((2, 3, 16, 16)).astype(np.float32) * 1.5
    (want,) = _ort(m, {"x": x})
    res = _run_all(g, {"x": x}) if (fmt, per_channel, act) == ("qdq", True, "uint8") else \
        cc.compile(g, target="c").run({"x": x})
    z = g.node(out)["attrs"]["zero_point"][0]
    want_q = np.rint(want / y_scale).astype(np.int64) + z           # ORT's output back to its integers
    worst, exact = _lsb(res["yq"], want_q)
    assert worst <= 1 and exact >= 0.6, (worst, exact)
    assert np.allclose(res["y"], want, rtol=0, atol=1.01 * y_scale)


def test_fold_qdq_leaves_unmatched_ops_in_float(float_model):
    """An op without an integer rule (sigmoid) stays float between its
    dequantize and quantize -- still ORT's result within one step -- and
    from_onnx(fold_qdq=False) keeps the whole QDQ graph in float, which
    fold_qdq then folds to the same integers as the importer does."""
    rng = np.random.default_rng(1)
    w = rng.integers(-127, 128, (4, 3, 3, 3), dtype=np.int8)
    inits = {"s": np.float32(0.02), "z": np.uint8(128), "w": w, "ws": np.full(4, 0.004, np.float32),
             "wz": np.zeros(4, np.int8), "b": rng.uniform(-0.2, 0.2, 4).astype(np.float32),
             "s2": np.float32(0.01), "z2": np.uint8(0), "s3": np.float32(1 / 256), "z3": np.uint8(0)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xf"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wf"], axis=0),
             helper.make_node("Conv", ["xf", "wf", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "s2", "z2"], ["rq"]),
             helper.make_node("DequantizeLinear", ["rq", "s2", "z2"], ["rf"]),
             helper.make_node("Sigmoid", ["rf"], ["sg"]),
             helper.make_node("QuantizeLinear", ["sg", "s3", "z3"], ["y"])]
    m = _model(nodes, [("x", TensorProto.FLOAT, (1, 3, 8, 8))], [("rq", TensorProto.UINT8), ("y", TensorProto.UINT8)],
               inits)
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    want_rq, want_y = _ort(m, {"x": x})
    g = from_onnx(m)
    ops = [g.node(n)["op"] for n in g.topological_order() if g.node(n)["op"] not in ("input", "param")]
    assert ops == ["quantize", "qconv", "dequantize", "sigmoid", "quantize"], ops
    assert g.node(next(n for n in g.nx if g.node(n)["op"] == "qconv"))["attrs"]["clamp"] == (0, 255)   # relu
    res = _run_all(g, {"x": x})
    for got, want in ((res["rq"], want_rq), (res["y"], want_y)):
        worst, _ = _lsb(got, want)
        assert worst <= 1
    raw = from_onnx(m, fold_qdq=False)
    assert {"conv", "relu", "dequantize"} <= {raw.node(n)["op"] for n in raw.nx}
    from convc.passes.qdq import fold_qdq
    folded = fold_qdq(raw)
    assert sorted(folded.node(n)["op"] for n in folded.nx) == sorted(g.node(n)["op"] for n in g.nx)
    assert np.array_equal(cc.compile(folded, target="numpy").run({"x": x})["y"], res["y"])
    float_run = cc.compile(raw, target="numpy").run({"x": x})        # QDQ in float: the same model
    assert _lsb(float_run["rq"], res["rq"])[0] <= 1


# -- export ----------------------------------------------------------------------------
def test_export_int8_graph_runs_in_ort(float_model):
    """cc.to_onnx of int8 graphs (an imported quantize_static model, and one
    built by hand with a relu clamp, per-channel weights, qadd and the raw
    int32 qmatmul) passes onnx's checker and runs in ONNX Runtime within one
    step of convc."""
    g = from_onnx(_quantized(float_model, "qdq", True, "int8"))
    m = cc.to_onnx(g)
    onnx.checker.check_model(m, full_check=True)
    assert {"QLinearConv", "QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in m.graph.node}
    x = np.random.default_rng(2).standard_normal((2, 3, 16, 16)).astype(np.float32)
    (want,) = _ort(m, {"x": x})
    got = cc.compile(g, target="c")(x=x)
    step = g.node(g.outputs["y"])["attrs"]["scale"][0]
    assert np.abs(got - want).max() <= 1.01 * step

    rng = np.random.default_rng(4)
    h = cc.Graph("handmade")
    xi = h.input("x", (1, 3, 6, 6))
    q = cc.quantize(xi, 0.03, 10, "int8")
    w = h.param("w", rng.integers(-127, 128, (5, 3, 3, 3)), "int8")
    b = h.param("b", rng.integers(-500, 500, 5), "int32")
    y = cc.qconv(q, w, b, x_scale=0.03, x_zero_point=10, w_scale=tuple(rng.uniform(0.003, 0.006, 5)),
                 y_scale=0.05, y_zero_point=-20, clamp=(-20, 127), padding=1)
    s = cc.qadd(y, y, a_scale=0.05, a_zero_point=-20, b_scale=0.05, b_zero_point=-20, y_scale=0.08, y_zero_point=0)
    flat = cc.reshape(s, (1, 5 * 36))
    wm = h.param("wm", rng.integers(-127, 128, (180, 4)), "int8")
    h.output(cc.qmatmul(flat, wm, a_zero_point=0, b_zero_point=0, dtype="int32"), "acc")
    h.output(s, "s")
    h.output(cc.dequantize(cc.max_pool(s, 2), 0.08, 0), "y")
    m = cc.to_onnx(h)
    onnx.checker.check_model(m, full_check=True)
    assert {"QLinearConv", "Clip", "MatMulInteger", "MaxPool"} <= {n.op_type for n in m.graph.node}
    xv = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    want_acc, want_s, want_y = _ort(m, {"x": xv})
    res = _run_all(h, {"x": xv})
    assert _lsb(res["s"], want_s)[0] <= 2                   # qconv then qadd: each within one step
    assert np.abs(res["y"] - want_y).max() <= 2.01 * 0.08
    wv = h.node("wm")["value"].astype(np.int64)
    for acc, sv in ((want_acc, want_s), (res["acc"], res["s"])):      # MatMulInteger is qmatmul's int32 sum
        assert np.array_equal(acc, sv.reshape(1, -1).astype(np.int64) @ wv)


# -- errors ----------------------------------------------------------------------------
def test_import_errors_name_the_rule():
    x = ("x", TensorProto.FLOAT, (1, 4))
    blocked = _model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], axis=1, block_size=2)], [x],
                     [("y", TensorProto.INT8)], {"s": np.ones((1, 2), np.float32), "z": np.zeros((1, 2), np.int8)}, 21)
    int16 = _model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])], [x], [("y", TensorProto.INT16)],
                   {"s": np.float32(1), "z": np.int16(0)}, 21)
    runtime_scale = _model([helper.make_node("QuantizeLinear", ["x", "s"], ["y"])],
                           [x, ("s", TensorProto.FLOAT, ())], [("y", TensorProto.UINT8)], {}, 13)
    runtime_int32 = _model([helper.make_node("DequantizeLinear", ["x", "s"], ["y"])],
                           [("x", TensorProto.INT32, (1, 4))], [("y", TensorProto.FLOAT)], {"s": np.float32(1)}, 13)
    for m, pattern in ((blocked, "block_size=2 .blocked quantization. is not supported"),
                       (int16, "zero point .input 'z'. must be an int8 or uint8 scalar or 1-D tensor, got int16"),
                       (runtime_scale, "the output's scale .input 's'. must be a constant"),
                       (runtime_int32, "input 'x' is int32; convc dequantizes int8 and uint8 tensors at run time")):
        with pytest.raises(OnnxImportError, match=pattern):
            from_onnx(m)

"""ONNX import (``convc/onnx/``, ``from_onnx``).

* Conformance: every backend node test case of the onnx package for the ops
  convc claims (``convc.onnx.conformance.OPS``), on the C target and OpenCL
  when the build has it; the cases of one op and opset compile as one
  module. The cases that cannot pass must fail with the documented reason
  (``EXPECTED_FAILURES``), and README.md's conformance section must state the
  same numbers.
* Hand-made models for what those cases leave out (SAME_LOWER, pools padded
  past PyTorch's rule, ConvTranspose outputs beyond output_padding, opset < 13
  Softmax, legacy broadcasting, constant folding, old opsets against ONNX
  Runtime, ...), each against ``onnx.reference`` or ONNX Runtime.
* Split, a node with several outputs: each opset's form against
  ``onnx.reference``.
* Errors: every unsupported node listed at once, and none of the supported
  nodes behind them; symbolic input shapes; an op version newer than convc
  was checked against.
"""
from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from helpers import REPO, assert_close
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import convc as cc
from convc.api import TARGETS
from convc.onnx import OnnxImportError, from_onnx
from convc.onnx.conformance import (CONV_NET_OPS, EXPECTED_FAILURES, OPS, case_op, outcome, run_cases,
                                    run_group, select_cases)
from convc.onnx.fold import FOLDS
from convc.onnx.importer import _CONVERTERS

CASES = {c.name: c for c in select_cases()}
CONFORMANCE_TARGETS = ["c"] + (["opencl"] if "opencl" in TARGETS else [])
BY_OP: dict[str, list] = {}
for _c in CASES.values():
    BY_OP.setdefault(case_op(_c), []).append(_c)


@pytest.mark.parametrize("target", CONFORMANCE_TARGETS)
@pytest.mark.parametrize("op", sorted(BY_OP))
def test_conformance(op, target):
    """Every node case of a claimed op passes: the cases of one op and opset
    compiled as one module (a failing module is rerun case by case to name
    the failing case)."""
    cases = [c for c in BY_OP[op] if c.name not in EXPECTED_FAILURES]
    if not cases:
        pytest.skip(f"every case of {op} is an expected failure (test_conformance_expected_failures)")
    failed = {n: why for n, (ok, why) in run_cases(cases, target).items() if not ok}
    assert not failed, "\n".join(f"{n}: {why}" for n, why in failed.items())


@pytest.mark.parametrize("target", CONFORMANCE_TARGETS)
def test_conformance_expected_failures(target):
    """The cases that cannot pass fail, each for its documented reason."""
    wrong = {}
    for name, (why, pattern) in EXPECTED_FAILURES.items():
        ok, error = outcome(CASES[name], target)
        if ok or not re.search(pattern, error):
            wrong[name] = "passes" if ok else f"fails, but not for the documented reason {why!r}: {error}"
    assert not wrong, "\n".join(f"{n}: {w}" for n, w in wrong.items())


def test_conformance_selection():
    # every claimed op has cases and a converter or a fold rule; the known failures are real cases
    ops = {n.op_type for c in CASES.values() for n in c.model.graph.node}
    assert ops == set(OPS), set(OPS) - ops
    handled = set(_CONVERTERS) | set(FOLDS) | {"Shape", "Size"}
    assert set(OPS) <= handled, set(OPS) - handled
    assert len(CASES) >= 200
    assert set(EXPECTED_FAILURES) <= set(CASES), set(EXPECTED_FAILURES) - set(CASES)
    assert set(OPS) - {"Shape", "Size", "Constant", "ConstantOfShape", "Range"} <= CONV_NET_OPS | {
        "QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "CastLike"}


def test_merged_conformance_names_the_failing_case():
    # two Pad cases in one module: the one convc cannot take is named with its own reason
    cases = [CASES["test_constant_pad"], CASES["test_edge_pad"]]
    got = run_group(cases)
    assert got["test_constant_pad"] == (True, "")
    assert not got["test_edge_pad"][0] and "mode 'edge' is not supported" in got["test_edge_pad"][1]


def test_docs_state_the_numbers():
    readme = (REPO / "README.md").read_text()
    text = readme[readme.index("### Conformance"):]
    text = text[:text.index("\n## ", 1)] if "\n## " in text[1:] else text
    passing = len(CASES) - len(EXPECTED_FAILURES)
    assert f"**{passing} of {len(CASES)} pass**" in text
    failures = text.split("do not pass, and why:")[1].split("\n\n")[1]
    assert set(re.findall(r"`(test_\w+)`", failures)) == set(EXPECTED_FAILURES)


# -- hand-made models, checked against onnx.reference ------------------------------
def _model(nodes, inputs, outputs, initializers=(), opset=17, valid=True):
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
                          [numpy_helper.from_array(np.asarray(v), n) for n, v in initializers])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    if valid:
        m = onnx.shape_inference.infer_shapes(m, strict_mode=True)      # fills in the output shapes
        onnx.checker.check_model(m)
    return m


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def check(model, feeds, rtol=1e-4, atol=1e-5, want=None, targets=("c",), **kw):
    """convc's C target (or ``targets``) against onnx.reference on ``feeds``
    (or against the arrays ``want`` where onnx.reference is wrong); returns
    the graph."""
    want = ReferenceEvaluator(model).run(None, feeds) if want is None else want
    g = from_onnx(model, **kw)
    for target in targets:
        got = cc.compile(g, target=target).run(feeds)
        assert len(got) == len(want)
        for (name, y), w in zip(got.items(), want):
            assert_close(y, w, rtol, atol, what=f"{name} ({target})")
    return g


def _conv_model(op, x_shape, w_shape, bias=True, valid=True, **attrs):
    w = _rand(*w_shape, seed=1)
    b = _rand(w_shape[1] * attrs.get("group", 1) if op == "ConvTranspose" else w_shape[0], seed=2)
    node = helper.make_node(op, ["x", "w", "b"] if bias else ["x", "w"], ["y"], **attrs)
    return _model([node], [("x", x_shape)], ["y"], [("w", w)] + ([("b", b)] if bias else []), valid=valid)


@pytest.mark.parametrize("attrs", [
    dict(auto_pad="SAME_LOWER", strides=[2, 2]),
    dict(auto_pad="SAME_UPPER", strides=[2, 1], dilations=[2, 1]),
    dict(auto_pad="VALID", strides=[1, 2]),
    dict(pads=[0, 2, 1, 1], group=2, dilations=[1, 2]),
], ids=["same_lower", "same_upper_dilated", "valid", "grouped_asymmetric"])
def test_conv_attributes(attrs):
    g = check(_conv_model("Conv", (1, 4, 7, 8), (6, 4 // attrs.get("group", 1), 3, 3), **attrs),
              {"x": _rand(1, 4, 7, 8)})
    assert [g.node(n)["op"] for n in g.topological_order()].count("conv") == 1


@pytest.mark.parametrize("shape", [(2, 3, 9), (1, 2, 4, 5, 6)], ids=["1d", "3d"])
def test_conv_1d_3d(shape):
    k = (3,) * (len(shape) - 2)
    check(_conv_model("Conv", shape, (4, shape[1]) + k, auto_pad="SAME_UPPER"), {"x": _rand(*shape)})


@pytest.mark.parametrize("attrs", [
    dict(strides=[2, 2], output_shape=[8, 10]),
    dict(strides=[2, 2], auto_pad="SAME_LOWER"),
    dict(strides=[3, 2], output_shape=[6, 5], auto_pad="SAME_UPPER"),
    dict(strides=[2, 2], pads=[1, 0, 2, 1], output_padding=[1, 1]),
    dict(strides=[1, 1], dilations=[2, 2], pads=[1, 1, 1, 1]),
], ids=["output_shape", "same_lower", "same_upper_output_shape", "pads", "dilated"])
def test_conv_transpose_attributes(attrs):
    check(_conv_model("ConvTranspose", (1, 4, 3, 4), (4, 2, 3, 3), **attrs), {"x": _rand(1, 4, 3, 4)})


def test_conv_transpose_grouped_vs_torch():
    # (onnx.reference mixes up the groups' weights and biases)
    import torch
    x, w, b = _rand(1, 4, 3, 4), _rand(4, 3, 3, 3, seed=1), _rand(6, seed=2)
    m = _conv_model("ConvTranspose", (1, 4, 3, 4), (4, 3, 3, 3), strides=[2, 2], pads=[1, 1, 1, 1],
                    output_padding=[1, 0], group=2)
    want = torch.nn.functional.conv_transpose2d(torch.tensor(x), torch.tensor(w), torch.tensor(b), stride=2,
                                                padding=1, output_padding=(1, 0), groups=2).numpy()
    check(m, {"x": x}, want=[want])


@pytest.mark.parametrize("output_shape", [[10, 11], [4, 3]], ids=["grow", "shrink"])
def test_conv_transpose_past_output_padding(output_shape):
    # SAME_UPPER with an output_shape beyond the full result: output position
    # j is position j + lo of the full transposed conv (zero past its ends),
    # with lo = (full - output) // 2 negative here, plus the bias everywhere.
    import torch
    x, w, b = _rand(1, 4, 3, 4), _rand(4, 2, 3, 3, seed=1), _rand(2, seed=2)
    m = _conv_model("ConvTranspose", (1, 4, 3, 4), (4, 2, 3, 3), strides=[2, 2], output_shape=output_shape,
                    auto_pad="SAME_UPPER", valid=False)
    full = torch.nn.functional.conv_transpose2d(torch.tensor(x), torch.tensor(w), stride=2).numpy()
    want = np.zeros((1, 2, *output_shape), np.float32)
    for j in np.ndindex(*output_shape):
        src = tuple(jj + (f - o) // 2 for jj, f, o in zip(j, full.shape[2:], output_shape))
        if all(0 <= v < f for v, f in zip(src, full.shape[2:])):
            want[(0, slice(None)) + j] = full[(0, slice(None)) + src]
    g = check(m, {"x": x}, want=[want + b.reshape(2, 1, 1)])
    assert "pad" in {g.node(n)["op"] for n in g.nx} or output_shape == [4, 3]


@pytest.mark.parametrize("op,attrs", [
    ("MaxPool", dict(kernel_shape=[3, 3], pads=[2, 2, 2, 2], strides=[2, 2])),        # pads > kernel / 2
    ("MaxPool", dict(kernel_shape=[2, 3], strides=[2, 2], dilations=[2, 1], ceil_mode=1)),
    ("MaxPool", dict(kernel_shape=[2, 2], auto_pad="SAME_LOWER")),
    ("AveragePool", dict(kernel_shape=[3, 3], pads=[2, 0, 2, 1], strides=[2, 2], count_include_pad=1)),
    ("AveragePool", dict(kernel_shape=[3, 3], pads=[2, 0, 2, 1], strides=[2, 2], count_include_pad=0)),
    ("AveragePool", dict(kernel_shape=[2, 2], pads=[1, 1, 1, 1], strides=[2, 2], ceil_mode=1, count_include_pad=1)),
    ("AveragePool", dict(kernel_shape=[2, 2], strides=[1, 2], dilations=[2, 2], ceil_mode=1)),
    ("AveragePool", dict(kernel_shape=[3, 3], auto_pad="SAME_UPPER", strides=[2, 2])),
], ids=["max_big_pads", "max_dilated_ceil", "max_same_lower", "avg_big_pads_incl", "avg_big_pads_excl",
        "avg_ceil_incl", "avg_dilated_ceil", "avg_same_upper"])
def test_pool_attributes(op, attrs):
    m = _model([helper.make_node(op, ["x"], ["y"], **attrs)], [("x", (2, 3, 7, 8))], ["y"], opset=22)
    check(m, {"x": _rand(2, 3, 7, 8)})


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_softmax_opset11_coerces_to_2d(axis):
    # onnx.reference applies opset 13's per-axis rule to every opset
    x = _rand(2, 3, 4)
    flat = x.reshape(int(np.prod(x.shape[:axis])), -1)
    e = np.exp(flat - flat.max(axis=1, keepdims=True))
    want = (e / e.sum(axis=1, keepdims=True)).reshape(x.shape)
    m = _model([helper.make_node("Softmax", ["x"], ["y"], axis=axis)], [("x", (2, 3, 4))], ["y"], opset=11)
    check(m, {"x": x}, want=[want])


@pytest.mark.parametrize("pads", [[1, 0, 0, 2, 0, 2, 1, 0], [1, -1, -1, 2, 0, 2, 1, -1]], ids=["grow", "crop"])
def test_pad_batch_channel_axes(pads):
    x = _rand(1, 3, 4, 5)
    want = np.pad(x, [(max(lo, 0), max(hi, 0)) for lo, hi in zip(pads[:4], pads[4:])], constant_values=1.5)
    want = want[tuple(slice(max(-lo, 0), want.shape[i] - max(-hi, 0)) for i, (lo, hi) in
                      enumerate(zip(pads[:4], pads[4:])))]        # (onnx.reference cannot crop)
    m = _model([helper.make_node("Pad", ["x", "pads", "v"], ["y"])], [("x", x.shape)], ["y"],
               [("pads", np.array(pads, np.int64)), ("v", np.array(1.5, np.float32))])
    g = check(m, {"x": x}, want=[want])
    assert {"concat", "pad"} <= {g.node(n)["op"] for n in g.nx}


def test_pad_opset2_attributes_and_rank2():
    m = _model([helper.make_node("Pad", ["x"], ["y"], pads=[1, 0, 0, 2], value=-3.0)], [("x", (3, 4))], ["y"],
               opset=2)
    check(m, {"x": _rand(3, 4)})


def test_folded_reshape_chain_and_initializer_names():
    # what torch writes for x.view(x.size(0), -1): Shape -> Gather -> Unsqueeze -> Concat -> Reshape
    nodes = [helper.make_node("Conv", ["x", "conv.weight"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Shape", ["h"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
             helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
             helper.make_node("Reshape", ["h", "target"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["y"], transB=1)]
    inits = [("conv.weight", _rand(2, 3, 3, 3, seed=1)), ("zero", np.array(0, np.int64)),
             ("axes", np.array([0], np.int64)), ("minus1", np.array([-1], np.int64)),
             ("fc.weight", _rand(5, 2 * 4 * 4, seed=2)), ("fc.bias", _rand(5, seed=3))]
    g = check(_model(nodes, [("x", (2, 3, 4, 4))], ["y"], inits), {"x": _rand(2, 3, 4, 4)})
    assert sorted(g.param_names) == ["conv.weight", "fc.bias", "fc.weight"]      # folded away: the int64 chain
    assert [g.node(n)["op"] for n in g.topological_order() if g.node(n)["op"] not in ("input", "param")] == \
        ["conv", "reshape", "dense"]


@pytest.mark.parametrize("attrs", [dict(min=0.0, max=6.0), dict(max=0.5), dict()], ids=["relu6", "max", "none"])
def test_clip_opset6_attributes(attrs):
    m = _model([helper.make_node("Clip", ["x"], ["y"], **attrs)], [("x", (2, 5))], ["y"], opset=6)
    check(m, {"x": _rand(2, 5) * 4})


def test_gemm_all_attributes_constant_operands():
    node = helper.make_node("Gemm", ["a", "b", "c"], ["y"], alpha=0.5, beta=2.0, transA=1)
    m = _model([node], [("a", (4, 3))], ["y"], [("b", _rand(4, 5, seed=1)), ("c", _rand(1, 5, seed=2))])
    check(m, {"a": _rand(4, 3)})


@pytest.mark.parametrize("a,b", [((2, 3, 4), (4, 5)), ((4,), (2, 4, 3)), ((2, 3, 4), (4,))])
def test_matmul_constant_and_1d(a, b):
    m = _model([helper.make_node("MatMul", ["a", "b"], ["y"])], [("a", a)], ["y"], [("b", _rand(*b, seed=1))])
    check(m, {"a": _rand(*a)})


def test_legacy_broadcast_axis():
    # opset < 7: B lines up with A from `axis` (onnx.reference does not know this rule)
    x, b = _rand(2, 3, 4, 5), _rand(3, 4, seed=1)
    node = helper.make_node("Add", ["x", "b"], ["y"], broadcast=1, axis=1)
    m = _model([node], [("x", (2, 3, 4, 5))], ["y"], [("b", b)], opset=6)
    check(m, {"x": x}, want=[x + b[:, :, None]])


def test_flatten_identity_dropout_and_constant_output():
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=0),
             helper.make_node("Dropout", ["f"], ["d"]),
             helper.make_node("Identity", ["d"], ["y"]),
             helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(_rand(3, seed=4))),
             helper.make_node("Relu", ["k"], ["z"])]
    g = check(_model(nodes, [("x", (2, 3, 4))], ["y", "z"]), {"x": _rand(2, 3, 4)})
    assert g.node(g.outputs["z"])["op"] == "param"            # Relu of a constant: folded


def test_squeeze_unsqueeze_transpose():
    nodes = [helper.make_node("Unsqueeze", ["x", "ax"], ["u"]),
             helper.make_node("Transpose", ["u"], ["t"], perm=[3, 1, 0, 2]),
             helper.make_node("Squeeze", ["t", "sq"], ["y"])]
    m = _model(nodes, [("x", (3, 4, 5))], ["y"], [("ax", np.array([1], np.int64)), ("sq", np.array([1], np.int64))])
    check(m, {"x": _rand(3, 4, 5)})


def test_batch_norm_runtime_statistics():
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-3)
    m = _model([node], [("x", (2, 3, 4)), ("s", (3,)), ("b", (3,)), ("m", (3,)), ("v", (3,))], ["y"])
    check(m, {"x": _rand(2, 3, 4), "s": _rand(3, seed=1), "b": _rand(3, seed=2), "m": _rand(3, seed=3),
              "v": np.abs(_rand(3, seed=4)) + 0.5})


# -- every opset's form of the ops that changed, against ONNX Runtime -----------------------
def _i64(*v):
    return np.array(v, np.int64)


def _f32(*v):
    return np.array(v, np.float32)


def _scalar(v):
    return np.array(v, np.float32)


# name: (opset, op, x shape, static inputs (initializers, "" for an omitted one), attributes, number of outputs)
OPSET_FORMS = {
    "squeeze_11_attr": (11, "Squeeze", (2, 1, 3, 1), [], dict(axes=[1, -1]), 1),
    "squeeze_13_input": (13, "Squeeze", (2, 1, 3, 1), [_i64(1, 3)], {}, 1),
    "squeeze_13_all": (13, "Squeeze", (2, 1, 3, 1), [], {}, 1),
    "unsqueeze_9_attr": (9, "Unsqueeze", (2, 3), [], dict(axes=[0, 3]), 1),
    "unsqueeze_11_negative": (11, "Unsqueeze", (2, 3), [], dict(axes=[0, -1]), 1),
    "unsqueeze_13_input": (13, "Unsqueeze", (2, 3), [_i64(1, -1)], {}, 1),
    "split_7_attr": (7, "Split", (2, 3, 2), [], dict(axis=1, split=[1, 2]), 2),
    "split_11_equal": (11, "Split", (2, 4), [], dict(axis=-1), 2),
    "split_13_input": (13, "Split", (2, 3, 2), [_i64(2, 1)], dict(axis=1), 2),
    "split_18_num_outputs": (18, "Split", (2, 3), [], dict(axis=1, num_outputs=2), 2),
    "slice_7_attr": (7, "Slice", (4, 3, 5), [], dict(starts=[1, 0], ends=[3, -1], axes=[0, 2]), 1),
    "slice_10_steps": (10, "Slice", (1, 2, 6, 6), [_i64(1, 0), _i64(6, 5), _i64(2, 3), _i64(2, 1)], {}, 1),
    "slice_13_negative": (13, "Slice", (4, 3, 5), [_i64(-3), _i64(100), _i64(-1)], {}, 1),
    "pad_7_attr": (7, "Pad", (1, 2, 3, 3), [], dict(pads=[0, 0, 1, 2, 0, 0, 2, 1], value=1.5), 1),
    "pad_11_inputs": (11, "Pad", (1, 2, 3, 3), [_i64(0, 1, 1, 0, 0, 0, 2, 1), _scalar(-2.0)], {}, 1),
    "pad_18_axes": (18, "Pad", (1, 2, 3, 3), [_i64(1, 0, 0, 2), "", _i64(2, 3)], {}, 1),
    "clip_7_attr": (7, "Clip", (3, 4), [], dict(min=-0.5, max=0.7), 1),
    "clip_11_inputs": (11, "Clip", (3, 4), [_scalar(-0.5), _scalar(0.7)], {}, 1),
    "clip_13_max_only": (13, "Clip", (3, 4), ["", _scalar(0.2)], {}, 1),
    "upsample_7_attr": (7, "Upsample", (1, 2, 2, 3), [], dict(scales=[1.0, 1.0, 2.0, 3.0]), 1),
    "upsample_9_input": (9, "Upsample", (1, 2, 2, 3), [_f32(1, 1, 2, 2)], dict(mode="linear"), 1),
    "resize_10": (10, "Resize", (1, 2, 4, 4), [_f32(1, 1, 0.5, 1.5)], {}, 1),
    "resize_11_linear": (11, "Resize", (1, 2, 3, 4), [_f32(), _f32(1, 1, 2, 1.5)], dict(mode="linear"), 1),
    "resize_13_sizes": (13, "Resize", (1, 2, 3, 4), ["", "", _i64(1, 2, 5, 7)], {}, 1),
    "softmax_7_coerced": (7, "Softmax", (2, 3, 4), [], dict(axis=1), 1),
    "softmax_11_default": (11, "Softmax", (2, 3, 4), [], {}, 1),
    "softmax_13_axis": (13, "Softmax", (2, 3, 4), [], dict(axis=1), 1),
    "batchnorm_7_spatial": (7, "BatchNormalization", (2, 3, 4), [_f32(1, 2, 3), _f32(0, 1, -1), _f32(.1, .2, .3),
                                                                   _f32(1, 2, .5)], dict(spatial=1, epsilon=1e-3), 1),
    "batchnorm_9": (9, "BatchNormalization", (2, 3, 4), [_f32(1, 2, 3), _f32(0, 1, -1), _f32(.1, .2, .3),
                                                         _f32(1, 2, .5)], {}, 1),
    "batchnorm_15": (15, "BatchNormalization", (2, 3, 4), [_f32(1, 2, 3), _f32(0, 1, -1), _f32(.1, .2, .3),
                                                           _f32(1, 2, .5)], {}, 1),
    "dropout_7_attr": (7, "Dropout", (3, 4), [], dict(ratio=0.3), 1),
    "dropout_12_inputs": (12, "Dropout", (3, 4), [_scalar(0.3), np.array(False)], {}, 1),
    "gemm_7_broadcast": (7, "Gemm", (3, 4), [_rand(4, 5, seed=1), _rand(1, 5, seed=2)], dict(alpha=0.5, beta=2.0), 1),
    "gemm_11_no_c": (11, "Gemm", (3, 4), [_rand(5, 4, seed=1)], dict(transB=1), 1),
    "gemm_13_scalar_c": (13, "Gemm", (4, 3), [_rand(4, 5, seed=1), _f32(0.5)], dict(transA=1), 1),
    "flatten_9_axis0": (9, "Flatten", (2, 3, 4), [], dict(axis=0), 1),
    "reshape_5": (5, "Reshape", (2, 3, 4), [_i64(0, -1)], {}, 1),
}


def _opset_form_case(name):
    """A one-node model of ``OPSET_FORMS[name]`` with ONNX Runtime's outputs,
    in the form conformance.run_cases takes."""
    import types

    ort = pytest.importorskip("onnxruntime")
    opset, op, shape, static, attrs, n_out = OPSET_FORMS[name]
    names = [f"k{i}" if isinstance(a, np.ndarray) else "" for i, a in enumerate(static)]
    outs = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op, ["x"] + names, outs, **attrs)
    m = _model([node], [("x", shape)], outs, [(n, a) for n, a in zip(names, static) if n], opset=opset, valid=False)
    m.ir_version = 7
    x = _rand(*shape, seed=3)
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    return types.SimpleNamespace(name=name, model=m, data_sets=[([x], want)], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target", CONFORMANCE_TARGETS)
def test_old_and_new_opset_forms_vs_onnxruntime(target):
    """Each op whose form changed between opsets 7 and 18 (attributes that
    became inputs, changed defaults, Softmax's coercion to 2D before 13,
    BatchNormalization's spatial, Upsample and Resize-10's rounding, ...) in
    each form, against ONNX Runtime; the forms of one opset compile as one
    module."""
    cases = [_opset_form_case(n) for n in OPSET_FORMS]
    failed = {n: why for n, (ok, why) in run_cases(cases, target).items() if not ok}
    assert not failed, "\n".join(f"{n}: {why}" for n, why in failed.items())


def test_an_op_newer_than_convc_knows_is_refused(monkeypatch):
    """A converter checked through an older opset refuses a model whose
    opset gives its op a newer version, naming both."""
    from convc.onnx import importer

    entry = importer._CONVERTERS["Softmax"]
    monkeypatch.setitem(importer._CONVERTERS, "Softmax", entry._replace(checked=12))
    m = _model([helper.make_node("Softmax", ["x"], ["y"], name="sm")], [("x", (2, 3))], ["y"], opset=13)
    with pytest.raises(OnnxImportError, match=r"Softmax 'sm': opset 13 makes it Softmax-13, newer than the newest "
                                              r"convc knows \(Softmax-11, checked through opset 12\)"):
        from_onnx(m)
    from_onnx(_model([helper.make_node("Softmax", ["x"], ["y"])], [("x", (2, 3))], ["y"], opset=12))


def test_old_opset_folding_without_onnx_reference(monkeypatch):
    """Constant chains of old opsets (Unsqueeze-9's axes attribute, Slice-9,
    ConstantOfShape) fold with convc's own functions: onnx.reference is not
    called."""
    import onnx.reference

    def refuse(*a, **k):
        raise AssertionError("onnx.reference was called")
    monkeypatch.setattr(onnx.reference, "ReferenceEvaluator", refuse)
    nodes = [helper.make_node("ConstantOfShape", ["s"], ["k"], value=numpy_helper.from_array(_f32(0.25))),
             helper.make_node("Unsqueeze", ["k"], ["k1"], axes=[1, 2]),
             helper.make_node("Shape", ["x"], ["xs"]),
             helper.make_node("Slice", ["xs"], ["c"], starts=[1], ends=[2]),
             helper.make_node("Concat", ["one", "c", "one", "one"], ["ks"], axis=0),
             helper.make_node("Reshape", ["k1", "ks"], ["k2"]),
             helper.make_node("Relu", ["k2"], ["k3"]),
             helper.make_node("Mul", ["x", "k3"], ["y"])]
    m = _model(nodes, [("x", (2, 3, 4, 4))], ["y"], [("s", _i64(3)), ("one", _i64(1))], opset=9, valid=False)
    g = from_onnx(m)
    assert [g.node(n)["op"] for n in g.topological_order() if g.node(n)["op"] not in ("input", "param")] == ["mul"]
    x = _rand(2, 3, 4, 4)
    assert_close(cc.compile(g, "c")(x=x), x * 0.25, 1e-6, 1e-7)


# -- Split: a converter with several outputs -------------------------------------------
def _split_model(opset, x_shape, n_out, split_input=None, valid=True, **attrs):
    """x -> Split -> n_out outputs, each through a Relu (so every output is a
    node's input, as in a real model); ``split_input``: the sizes as an input."""
    outs = [f"s{i}" for i in range(n_out)]
    nodes = [helper.make_node("Split", ["x"] + (["split"] if split_input is not None else []), outs, **attrs)]
    nodes += [helper.make_node("Relu", [o], [f"y{i}"]) for i, o in enumerate(outs)]
    inits = [("split", np.array(split_input, np.int64))] if split_input is not None else []
    return _model(nodes, [("x", x_shape)], [f"y{i}" for i in range(n_out)], inits, opset=opset, valid=valid)


@pytest.mark.parametrize("opset,x_shape,n_out,split,attrs,sizes", [
    (2, (2, 5, 3), 2, None, dict(axis=1, split=[2, 3]), [2, 3]),
    (2, (6, 4), 3, None, dict(), [2, 2, 2]),                                 # equal parts of axis 0
    (11, (2, 3, 8), 3, None, dict(axis=-1, split=[1, 4, 3]), [1, 4, 3]),
    (13, (2, 6, 3), 2, [5, 1], dict(axis=1), [5, 1]),
    (13, (1, 4, 2, 2), 2, None, dict(axis=1), [2, 2]),                       # ShuffleNet's channel halves
    (18, (2, 7, 3), 3, None, dict(axis=1, num_outputs=3), [3, 3, 1]),        # the last part smaller
    (18, (2, 3, 8), 3, [4, 3, 1], dict(axis=-1), [4, 3, 1]),
    (18, (3, 5), 1, None, dict(axis=1, num_outputs=1), [5]),                 # the input itself
], ids=["opset2_attr", "opset2_equal", "opset11_negative_axis", "opset13_input", "opset13_equal",
        "opset18_num_outputs_uneven", "opset18_input", "opset18_one_output"])
def test_split(opset, x_shape, n_out, split, attrs, sizes):
    m = _split_model(opset, x_shape, n_out, split, valid=opset > 2, **attrs)   # (no shape inference for opset 2)
    g = check(m, {"x": _rand(*x_shape)}, targets=CONFORMANCE_TARGETS)
    slices = [g.node(n)["attrs"] for n in g.topological_order() if g.node(n)["op"] == "slice"]
    assert [s["stop"] - s["start"] for s in slices] == (sizes if n_out > 1 else [])


def test_split_feeds_a_shuffle_block_and_unused_outputs_are_left_out():
    # ShuffleNetV2's unit: split the channels, a branch on one half, concat, channel shuffle
    x, w = _rand(1, 9, 5, 5), _rand(4, 4, 1, 1, seed=1)
    nodes = [helper.make_node("Split", ["x", "sizes"], ["a", "b", "unused"], axis=1),
             helper.make_node("Split", ["a"], ["a0", "a1"], axis=1, num_outputs=2),
             helper.make_node("Concat", ["a1", "a0"], ["a10"], axis=1),
             helper.make_node("Conv", ["a10", "w"], ["c"]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Concat", ["b", "r"], ["cat"], axis=1),
             helper.make_node("Reshape", ["cat", "s1"], ["g"]),
             helper.make_node("Transpose", ["g"], ["t"], perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["t", "s2"], ["y"])]
    inits = [("sizes", np.array([4, 4, 1], np.int64)), ("w", w), ("s1", np.array([1, 2, 4, 5, 5], np.int64)),
             ("s2", np.array([1, 8, 5, 5], np.int64))]
    m = _model(nodes, [("x", x.shape)], ["y"], inits, opset=18)
    g = check(m, {"x": x}, targets=CONFORMANCE_TARGETS)
    assert sum(g.node(n)["op"] == "slice" for n in g.nx) == 4          # none for the unused output


def test_split_of_a_constant_is_folded():
    k = helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(_rand(6, seed=3)))
    nodes = [k, helper.make_node("Split", ["k"], ["k0", "k1"], num_outputs=2),
             helper.make_node("Add", ["x", "k1"], ["y"])]
    g = check(_model(nodes, [("x", (2, 3))], ["y"], opset=18), {"x": _rand(2, 3)})
    assert "slice" not in {g.node(n)["op"] for n in g.nx}


@pytest.mark.parametrize("opset,n,n_out,split,attrs,error", [
    (13, 7, 2, None, dict(), r"size 7 does not split into 2 equal parts"),
    (18, 5, 4, None, dict(num_outputs=4), r"split \[2, 2, 2, -1\] must be 4 sizes"),
    (18, 6, 3, None, dict(num_outputs=2), r"num_outputs 2 differs from the node's 3 outputs"),
    (13, 6, 3, [2, 0, 4], dict(), r"output 's1' is empty \(split size 0\)"),
    (13, 6, 2, [2, 3], dict(), r"split \[2, 3\] must be 2 sizes .* adding up to 6"),
    (13, 6, 2, None, dict(axis=2), r"axis 2 is not an axis of the input \(2, 6\)"),
], ids=["uneven_before_18", "last_part_negative", "num_outputs_mismatch", "empty_output", "wrong_sum", "bad_axis"])
def test_split_errors(opset, n, n_out, split, attrs, error):
    m = _split_model(opset, (2, n), n_out, split, valid=False, **dict(attrs, axis=attrs.get("axis", 1)))
    with pytest.raises(OnnxImportError, match=error):
        from_onnx(m)


def test_dropped_output_still_reported():
    # MaxPool's indices: the converter returns the first output only
    nodes = [helper.make_node("MaxPool", ["x"], ["y", "idx"], kernel_shape=[2, 2], name="pool"),
             helper.make_node("Cast", ["idx"], ["z"], to=TensorProto.FLOAT)]
    m = _model(nodes, [("x", (1, 1, 4, 4))], ["y", "z"], valid=False)
    with pytest.raises(OnnxImportError, match=r"'idx' \(the argmax indices\) is used; convc computes only the first "
                                              r"output"):
        from_onnx(m)


# -- errors ----------------------------------------------------------------------------
def test_every_unsupported_node_is_listed():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="ok"),
             helper.make_node("Round", ["a"], ["b"], name="round1"),
             helper.make_node("Pad", ["b", "pads"], ["c"], mode="reflect", name="reflect_pad"),  # after Erf
             helper.make_node("Conv", ["c", "w"], ["d"], name="conv_bad", foo=1),
             helper.make_node("Hardmax", ["d"], ["y"], name="hardmax")]
    m = _model(nodes, [("x", (1, 2, 5, 5))], ["y"], [("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
                                                     ("w", _rand(2, 2, 3, 3))], valid=False)
    with pytest.raises(OnnxImportError) as e:
        from_onnx(m)
    msg = str(e.value)
    assert "4 unsupported nodes" in msg
    assert [(op, name) for op, name, _ in e.value.problems] == [
        ("Round", "round1"), ("Pad", "reflect_pad"), ("Conv", "conv_bad"), ("Hardmax", "hardmax")]
    for piece in ("Round 'round1': op Round is not supported", "mode 'reflect'", "attribute 'foo'", "Hardmax"):
        assert piece in msg


def test_consequences_of_an_unsupported_node_are_not_listed():
    # Reshape's target comes from an unsupported node: only that node is the problem
    nodes = [helper.make_node("ArgMax", ["x"], ["idx"], axis=0, keepdims=0, name="argmax"),
             helper.make_node("Reshape", ["x", "idx"], ["y"], name="reshape")]
    m = _model(nodes, [("x", (2, 3))], ["y"], valid=False)
    with pytest.raises(OnnxImportError) as e:
        from_onnx(m)
    assert [(op, name) for op, name, _ in e.value.problems] == [("ArgMax", "argmax")]


def _with_domains(m):
    m.opset_import.extend([helper.make_opsetid("ai.onnx.ml", 3), helper.make_opsetid("com.example", 1)])
    return m


def test_supported_nodes_behind_an_unsupported_one_are_not_listed():
    # A node of an unknown domain (so no shape inference and no placeholder
    # for its output): the Shape -> Gather -> Unsqueeze -> Concat chain after it
    # would fold, the Reshape and Relu convert; only the unknown node is a problem.
    nodes = [helper.make_node("Mystery", ["x"], ["h"], domain="com.example", name="mystery"),
             helper.make_node("Shape", ["h"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "zero"], ["n"], axis=0, name="gather"),
             helper.make_node("Unsqueeze", ["n", "axes"], ["n1"], name="unsqueeze"),
             helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0, name="concat"),
             helper.make_node("Reshape", ["h", "target"], ["flat"], name="reshape"),
             helper.make_node("Relu", ["flat"], ["y"], name="relu")]
    inits = [("zero", np.array(0, np.int64)), ("axes", np.array([0], np.int64)), ("minus1", np.array([-1], np.int64))]
    m = _with_domains(_model(nodes, [("x", (2, 3, 4))], ["y"], inits, valid=False))
    with pytest.raises(OnnxImportError) as e:
        from_onnx(m)
    assert [(op, name) for op, name, _ in e.value.problems] == [("Mystery", "mystery")]
    assert "1 unsupported node:" in str(e.value)


def test_nodes_behind_an_unsupported_constant_are_not_listed():
    # An unsupported node on constants whose output ONNX can infer: the Cast
    # reading its placeholder would have been folded, so it is no problem; an
    # op convc has no converter for on a run-time tensor still is one.
    nodes = [helper.make_node("Binarizer", ["k"], ["b"], domain="ai.onnx.ml", name="binarize"),
             helper.make_node("Cast", ["b"], ["bi"], to=TensorProto.INT64, name="cast"),
             helper.make_node("Reshape", ["x", "bi"], ["r"], name="reshape"),
             helper.make_node("Hardmax", ["r"], ["y"], name="hardmax")]
    m = _with_domains(_model(nodes, [("x", (2, 3))], ["y"], [("k", np.array([3.0, 2.0], np.float32))], valid=False))
    with pytest.raises(OnnxImportError) as e:
        from_onnx(m)
    assert [(op, name) for op, name, _ in e.value.problems] == [("Binarizer", "binarize"), ("Hardmax", "hardmax")]


def test_symbolic_input_needs_a_shape():
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "m",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(OnnxImportError, match=r"shape \(batch, 3\) is not static.*input_shapes"):
        from_onnx(m)
    assert from_onnx(m, input_shapes={"x": (4, 3)}).value("x").shape == (4, 3)
    with pytest.raises(cc.ConvcError, match="does not fit"):
        from_onnx(m, input_shapes={"x": (4, 2)})
    with pytest.raises(cc.ConvcError, match="no input 'z'"):
        from_onnx(m, input_shapes={"z": (1,)})


def test_static_input_must_be_constant():
    m = _model([helper.make_node("Reshape", ["x", "s"], ["y"])], [("x", (2, 6))], ["y"], valid=False)
    m.graph.input.append(helper.make_tensor_value_info("s", TensorProto.INT64, [2]))
    with pytest.raises(OnnxImportError, match=r"shape \(input 's'\) must be a constant"):
        from_onnx(m)
    g = from_onnx(m, constants={"s": np.array([3, 4])})
    assert cc.compile(g, "c")(x=np.arange(12, dtype=np.float32).reshape(2, 6)).shape == (3, 4)


def test_bad_files(tmp_path):
    with pytest.raises(cc.ConvcError, match="no such file"):
        from_onnx(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a model")
    with pytest.raises(cc.ConvcError, match="cannot be read"):
        from_onnx(tmp_path / "junk.onnx")
    with pytest.raises(cc.ConvcError, match="takes a path"):
        from_onnx(42)


def test_import_only_op_of_a_run_time_tensor():
    # ConstantOfShape decides a shape: its input must be known at import
    m = _model([helper.make_node("ConstantOfShape", ["s"], ["y"], name="fill")], [], ["y"], valid=False)
    m.graph.input.append(helper.make_tensor_value_info("s", TensorProto.INT64, [2]))
    with pytest.raises(OnnxImportError, match=r"ConstantOfShape 'fill': convc computes ConstantOfShape at import "
                                              r"only .* input 's' is computed at run time"):
        from_onnx(m)
    g = from_onnx(m, constants={"s": np.array([2, 3])})
    np.testing.assert_array_equal(cc.compile(g, "numpy")(), np.zeros((2, 3), np.float32))


@pytest.mark.parametrize("case,opset,rule", [
    ("unsqueeze_repeat", 13, r"axes \[0, 0\] repeat an axis"),
    ("unsqueeze_repeat", 11, r"axes \[0, 0\] repeat an axis"),
    ("squeeze_wide", 13, r"axis 1 of the input \(2, 3\) has size 3; Squeeze removes size-1 axes only"),
    ("squeeze_wide", 11, r"axis 1 of the input \(2, 3\) has size 3"),
    ("split_neither", 18, r"neither split nor num_outputs is given; from opset 18"),
])
def test_shape_op_rules_onnx_runtime_enforces(case, opset, rule):
    """What ONNX Runtime refuses is refused at import with the rule (found by
    checking the converters against it): repeated Unsqueeze axes, Squeeze of
    an axis that is not 1, Split-18 without sizes or num_outputs."""
    axes_input = opset >= 13
    if case == "split_neither":
        m = _model([helper.make_node("Split", ["x"], ["p", "q"], axis=1)], [("x", (2, 4))], ["p", "q"],
                   opset=opset, valid=False)
    else:
        op, axes = ("Unsqueeze", [0, 0]) if case == "unsqueeze_repeat" else ("Squeeze", [1])
        node = (helper.make_node(op, ["x", "axes"], ["y"]) if axes_input else
                helper.make_node(op, ["x"], ["y"], axes=axes))
        m = _model([node], [("x", (2, 3))], ["y"], [("axes", np.array(axes, np.int64))] if axes_input else (),
                   opset=opset, valid=False)
    with pytest.raises(OnnxImportError, match=rule):
        from_onnx(m)


def test_refused_node_reports_once():
    """A node refused for a run-time bool (Greater) is the one error: Where,
    reading its placeholder, is not blamed for a type it never sees."""
    m = _model([helper.make_node("Greater", ["x", "y"], ["c"], name="gt"),
                helper.make_node("Where", ["c", "x", "y"], ["o"], name="wh")],
               [("x", (2, 3)), ("y", (2, 3))], ["o"], opset=13, valid=False)
    with pytest.raises(OnnxImportError) as e:
        from_onnx(m)
    assert "1 unsupported node" in str(e.value) and "Greater 'gt'" in str(e.value), str(e.value)
    assert "Where 'wh'" not in str(e.value), str(e.value)


def test_cast_folds_as_the_cast_op_compiles():
    """A constant Cast float -> int folds with convc's cast rule (saturate,
    NaN -> 0), the same the compiled cast computes, not numpy's astype."""
    from convc.onnx.fold import FOLDS
    from convc.ops.indexing import cast_array
    x = np.array([1e10, -1e10, np.nan, 2.7, -2.7, np.inf], np.float32)
    node = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.INT8)
    got = FOLDS["Cast"](node, {"to": TensorProto.INT8}, [x], 13)[0]
    assert got.dtype == np.int8 and got.tolist() == [127, -128, 0, 2, -2, 127]
    assert np.array_equal(got, cast_array(x, "int8"))

"""The nine model-zoo CNNs that ship with the onnx wheel
(``onnx/backend/test/data/light/*.onnx``): AlexNet, DenseNet-121, Inception
v1 and v2, ResNet-50, ShuffleNet, SqueezeNet, VGG-19, ZFNet-512, all opset 9
with their weights stripped (each weight is a ConstantOfShape of 0.02, so the
import folds ~1 GB of fills and, in DenseNet and Inception v2, the attribute
form of Unsqueeze).

Each imports, compiles to C and matches ONNX Runtime within 1e-4 of the
output's scale, on the input onnx's own runner feeds these models
(``arange(n) / n``), against the expected output the wheel ships as well.
With every weight equal, the classes' logits are equal and the softmax is
1/1000 everywhere, which a wrong network computes too; so the input of the
last Softmax (the logits, whose value depends on every layer) is checked as
a second output.

Compile time: convc compiles each distinct conv shape into its own function
(the GEMM and Winograd sizes are compile-time constants), and gcc -O3 on a
hundred of them is what DenseNet-121 and the Inceptions cost; those run with
``CONVC_LONG_TESTS=1`` (see LONG below).
"""
from __future__ import annotations

import os
import pathlib

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import convc as cc
from convc.onnx import from_onnx, node_name

ort = pytest.importorskip("onnxruntime")

LIGHT = pathlib.Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
MODELS = sorted(p.stem[len("light_"):] for p in LIGHT.glob("light_*.onnx"))

LONG = {"densenet121", "inception_v1", "inception_v2", "resnet50", "vgg19"}
"""Models whose cold compile takes more than ~15 s of one core (a hundred
distinct conv functions, or VGG-19's 548 MB of weights through fold_params):
run with CONVC_LONG_TESTS=1."""


def _param(name):
    if name in LONG and not os.environ.get("CONVC_LONG_TESTS"):
        return pytest.param(name, marks=pytest.mark.skip(reason="long: CONVC_LONG_TESTS=1"))
    return name


def _with_logits(model):
    """The model with the input of its last Softmax as a second output."""
    last = model.graph.node[-1]
    if last.op_type != "Softmax" or last.output[0] != model.graph.output[0].name:
        return model, False
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(helper.make_tensor_value_info(last.input[0], onnx.TensorProto.FLOAT, None))
    return m, True


def _dummy_input(model):
    """The input onnx's backend runner generates for these models."""
    inits = {t.name for t in model.graph.initializer}
    (x,) = [i for i in model.graph.input if i.name not in inits]
    shape = tuple(d.dim_value for d in x.type.tensor_type.shape.dim)
    n = int(np.prod(shape))
    return x.name, (np.arange(n).reshape(shape) / n).astype(np.float32)


def test_the_nine_models_are_there():
    assert MODELS == ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet",
                      "squeezenet", "vgg19", "zfnet512"]


@pytest.mark.parametrize("name", [_param(n) for n in MODELS])
def test_light_model(name):
    path = LIGHT / f"light_{name}.onnx"
    model, logits = _with_logits(onnx.load(path))
    x_name, x = _dummy_input(model)
    g = from_onnx(model)
    assert g.input_names == [node_name(x_name, "input")]         # the weights are folded constants
    got = list(cc.compile(g, "c").run({node_name(x_name, "input"): x}).values())
    opts = ort.SessionOptions()
    opts.log_severity_level = 3          # (ZFNet lists an unused initializer)
    want = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
        None, {x_name: x})
    assert len(got) == len(want) == 1 + logits
    for k, (y, w) in enumerate(zip(got, want)):
        assert y.shape == w.shape and y.dtype == w.dtype
        scale = float(np.abs(w).max())
        err = float(np.abs(y - w).max())
        assert err <= 1e-4 * scale, f"{name} output {k}: max error {err:.3g}, output scale {scale:.3g}"
    shipped = onnx.TensorProto()
    shipped.ParseFromString((LIGHT / f"light_{name}_output_0.pb").read_bytes())
    np.testing.assert_allclose(got[0], numpy_helper.to_array(shipped), rtol=1e-4, atol=1e-7)
    if logits:     # every weight is 0.02: the classes tie, and their logit carries the whole network
        assert np.ptp(want[1]) <= 1e-4 * abs(want[1]).max() and abs(want[1]).max() > 0

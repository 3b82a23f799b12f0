"""ONNX export (``cc.to_onnx``): every exportable op, written as ONNX, passes
``onnx.checker`` and gives convc's outputs in ``onnx.reference``; importing
the written model gives the same graph semantics back; ops with no ONNX form
are all listed in one error."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_close
from onnx.reference import ReferenceEvaluator

import convc as cc


def _rand(*shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def roundtrip(g: cc.Graph, feeds: dict, rtol=1e-5, atol=1e-6, opset=17, reimport=True):
    """to_onnx(g) is valid ONNX whose reference outputs equal convc's; its
    re-import computes the same on the C target. Returns the model."""
    model = cc.to_onnx(g, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    want = cc.compile(g, target="numpy").run(feeds)
    got = ReferenceEvaluator(model).run(None, feeds)
    assert [o.name for o in model.graph.output] == list(want)
    for (name, w), y in zip(want.items(), got):
        assert_close(y, w, rtol, atol, what=f"onnx.reference {name}")
    if not reimport:
        return model
    back = cc.compile(cc.from_onnx(model), target="c").run(feeds)
    for name, w in want.items():
        assert_close(back[name], w, rtol * 10, atol * 10, what=f"re-imported {name}")
    return model


def _graph(x_shape, build, dtype="float32"):
    g = cc.Graph("t")
    x = g.input("x", x_shape, dtype)
    g.output(build(g, x), "y")
    return g, {"x": _rand(*x_shape, dtype=dtype)}


CASES = {
    "conv_tied_fused_relu": lambda g, x: cc.conv(x, g.param("w", _rand(6, 4, 3, 3)), g.param("b", _rand(6)),
                                                 stride=2, padding=((1, 0), (2, 1)), dilation=(1, 2)),
    "conv_untied_grouped": lambda g, x: cc.conv(x, g.param("w", _rand(4, 2, 3, 3)), g.param("b", _rand(4, 6, 6)),
                                                groups=2, padding=1),
    "conv_flip": lambda g, x: cc.conv(x, g.param("w", _rand(2, 4, 3, 2)), flip=True, padding="same"),
    "conv_flip_runtime_weight": lambda g, x: cc.conv(x, cc.relu(g.param("w", _rand(2, 4, 2, 3))), flip=True),
    "conv_transpose": lambda g, x: cc.conv_transpose(x, g.param("w", _rand(4, 3, 3, 3)), g.param("b", _rand(3)),
                                                     stride=2, padding=1, output_padding=1),
    "conv_transpose_untied": lambda g, x: cc.conv_transpose(x, g.param("w", _rand(4, 2, 2, 2)),
                                                            g.param("b", _rand(2, 7, 7)), stride=1),
    "max_pool_ceil": lambda g, x: cc.max_pool(x, 3, 2, padding=1, dilation=1, ceil_mode=True),
    "avg_pool": lambda g, x: cc.avg_pool(x, 2, 2, padding=1, count_include_pad=False),
    "global_avg_pool": lambda g, x: cc.global_avg_pool(x),
    "activations": lambda g, x: cc.tanh(cc.sigmoid(cc.leaky_relu(cc.relu(x), 0.2))),
    "clip": lambda g, x: cc.add(cc.clip(x, -0.5, 0.5), cc.clip(x, None, 0.1)),
    "arith": lambda g, x: cc.div(cc.mul(cc.sub(cc.add(x, 1.0), g.param("p", _rand(6))), x), 3.0),
    "concat_reshape_flatten": lambda g, x: cc.flatten(cc.reshape(cc.concat([x, x], 1), (2, 8, 36))),
    "transpose_expand_slice": lambda g, x: cc.slice_axis(cc.expand(cc.transpose(x, (0, 2, 3, 1)), (2, 6, 6, 4)),
                                                         2, 1, 4),
    "reduce_sum": lambda g, x: cc.reduce_sum(x, (1, 3), keepdims=True),
    "dense_2d": lambda g, x: cc.dense(cc.flatten(x), g.param("w", _rand(5, 144)), g.param("b", _rand(5))),
    "dense_4d": lambda g, x: cc.dense(x, g.param("w", _rand(3, 6)), g.param("b", _rand(3))),
    "matmul_softmax": lambda g, x: cc.softmax(cc.matmul(x, g.param("w", _rand(6, 3))), axis=2),
    "batch_norm": lambda g, x: cc.batch_norm(x, g.param("m", _rand(4)), g.param("v", np.abs(_rand(4)) + 0.5),
                                             g.param("g", _rand(4)), g.param("b", _rand(4)), eps=1e-3),
    "pad_crop": lambda g, x: cc.pad(x, [(1, -2), (0, 3)], value=-1.0),
    "channel_shuffle": lambda g, x: cc.channel_shuffle(x, 2),
    "downsample_dilate": lambda g, x: cc.dilate(cc.downsample(x, (2, 3)), (3, 2)),
    "separable": lambda g, x: cc.separable_conv(x, g.param("dw", _rand(4, 1, 3, 3)), g.param("pw", _rand(5, 4, 1, 1)),
                                                padding=1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_roundtrip(case):
    g, feeds = _graph((2, 4, 6, 6), CASES[case])
    # (a flip of a run-time weight is a Slice with step -1, which convc imports only on constants)
    roundtrip(g, feeds, reimport=case != "conv_flip_runtime_weight")


def test_fused_activation_and_float64():
    # a pass fuses bias and activation into the conv; the export writes them back as nodes
    g, feeds = _graph((1, 3, 5, 5), lambda g, x: cc.leaky_relu(
        cc.conv(x, g.param("w", _rand(4, 3, 3, 3, dtype=np.float64)), g.param("b", _rand(4, dtype=np.float64))),
        0.1), dtype="float64")
    fused = cc.passes.run(g, ["fuse_epilogues"])
    conv = [n for n in fused.nx if fused.node(n)["op"] == "conv"][0]
    assert fused.node(conv)["attrs"].get("activation") == "leaky_relu"
    model = roundtrip(fused, feeds)
    assert [n.op_type for n in model.graph.node] == ["Conv", "LeakyRelu", "Identity"] or \
        [n.op_type for n in model.graph.node] == ["Conv", "LeakyRelu"]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE


def test_names_inputs_and_outputs():
    g = cc.Graph("names")
    x = g.input("x", (1, 2, 4, 4))
    unused = g.input("unused", (3,))
    w = g.param("conv.weight", _rand(2, 2, 1, 1))
    y = cc.relu(cc.conv(x, w, name="y_node"), name="out")
    g.output(y, "out")
    g.output(x, "echo")               # an input returned as is
    model = roundtrip(g, {"x": _rand(1, 2, 4, 4), "unused": _rand(3)})
    assert [i.name for i in model.graph.input] == ["x", "unused"]
    assert [i.name for i in model.graph.initializer] == ["conv.weight"]
    assert [o.name for o in model.graph.output] == ["out", "echo"]
    assert unused.name == "unused"


def test_save_to_path(tmp_path):
    g, feeds = _graph((1, 2, 3, 3), lambda g, x: cc.relu(x))
    cc.to_onnx(g, path=tmp_path / "m.onnx")
    m = onnx.load(str(tmp_path / "m.onnx"))
    assert m.opset_import[0].version == 17 and m.producer_name == "convc"
    assert_close(ReferenceEvaluator(m).run(None, feeds)[0], np.maximum(feeds["x"], 0))


def test_no_onnx_form_lists_every_node():
    g = cc.Graph("train")
    x = g.input("x", (1, 1, 6, 6))
    w = g.param("w", _rand(2, 1, 3, 3))
    y = cc.local_conv(x, g.param("lw", _rand(2, 4, 4, 1, 3, 3)), name="local")
    z = cc.tiled_conv(x, g.param("tw", _rand(2, 1, 3, 3, 2, 2)), name="tiled")
    loss = cc.mse_loss(cc.add(cc.conv(x, w), cc.add(y, z)), g.const(np.zeros((1, 2, 4, 4))))
    (dw,) = cc.grad(loss, [w])
    g.output(loss, "loss")
    g.output(dw, "dw")
    with pytest.raises(cc.ConvcError) as e:
        cc.to_onnx(g)
    msg = str(e.value)
    for piece in ("local_conv %local", "tiled_conv %tiled", "mse_loss", "conv_grad_kernel"):
        assert piece in msg
    with pytest.raises(cc.ConvcError, match="opsets 13 to"):
        cc.to_onnx(cc.Graph("g"), opset=11)

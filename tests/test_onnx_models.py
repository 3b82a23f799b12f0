"""Real architectures from PyTorch through ONNX: each net is exported with
``torch.onnx.export`` -- by both exporters, the TorchScript one
(``dynamo=False``) and torch's default, torch.export-based one (``dynamo=True``,
which needs onnxscript) -- imported with ``cc.from_onnx``, compiled to C and
checked against torch's own output; then written back with ``cc.to_onnx``,
which must pass ``onnx.checker`` and give convc's outputs in
``onnx.reference``."""
from __future__ import annotations

import io
import warnings

import onnx
import pytest
import torch
from helpers import assert_close
from onnx.reference import ReferenceEvaluator
from torch import nn

import convc as cc


def _bn(c, dims=2):
    return (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(c)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = _bn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = _bn(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return torch.relu(h + (x if self.down is None else self.down(x)))


class ResNetTiny(nn.Module):
    """ResNet-style: stem conv + BN + max pool, basic blocks with strided
    convs and 1x1 projection shortcuts, global average pool, linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), _bn(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.layers = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 16, 2), BasicBlock(16, 32, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def _dw_separable(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), _bn(cin), nn.ReLU6(),
                         nn.Conv2d(cin, cout, 1, bias=False), _bn(cout), nn.ReLU6())


class MobileNetTiny(nn.Module):
    """MobileNet-style: strided stem, depthwise-separable blocks with BN and
    ReLU6 (an ONNX Clip), global average pool, dropout, linear, softmax."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), _bn(8), nn.ReLU6(),
                                      _dw_separable(8, 16, 1), _dw_separable(16, 32, 2), _dw_separable(32, 32, 1))
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, 10))

    def forward(self, x):
        h = self.features(x).mean((2, 3))
        return torch.softmax(self.head(h), dim=1)


class DCGANGenerator(nn.Module):
    """DCGAN generator: a latent (N, nz, 1, 1) up to a 3x32x32 image through
    transposed convs (4x4, stride 2, padding 1), BN, ReLU, tanh."""

    def __init__(self, nz=16, ngf=8):
        super().__init__()
        self.net = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False), _bn(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), _bn(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), _bn(ngf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, 3, 4, 2, 1, bias=True), nn.Tanh())

    def forward(self, z):
        return self.net(z)


class AudioNet1d(nn.Module):
    """1D audio net (M5-style): a wide strided first conv on the raw
    waveform, BN, ReLU, max pools, a dilated conv, leaky ReLU, average pool,
    global average pool and a linear classifier with log-softmax-free logits."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(1, 8, 40, stride=8, padding=16), _bn(8, 1), nn.ReLU(), nn.MaxPool1d(4),
            nn.Conv1d(8, 16, 3, padding=2, dilation=2), _bn(16, 1), nn.LeakyReLU(0.1), nn.MaxPool1d(2, ceil_mode=True),
            nn.Conv1d(16, 16, 3, padding=1), nn.Sigmoid(), nn.AvgPool1d(3, 2, 1, count_include_pad=False),
            nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x):
        return self.net(x)


MODELS = {
    "resnet": (ResNetTiny, (2, 3, 16, 16)),
    "mobilenet": (MobileNetTiny, (2, 3, 16, 16)),
    "dcgan": (DCGANGenerator, (2, 16, 1, 1)),
    "audio1d": (AudioNet1d, (2, 1, 800)),
}


def _randomised(net: nn.Module) -> nn.Module:
    """Eval mode with batch-norm statistics that are not the identity."""
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return net.eval()


# Exported in eval mode, torch folds a batch norm that follows a conv into
# the conv's weights; PRESERVE keeps them as BatchNormalization nodes.
KEEP_BATCH_NORM = {"resnet", "mobilenet"}


def export(net: nn.Module, x: torch.Tensor, keep_batch_norm=False, dynamo=False, **kw) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # the TorchScript exporter's deprecation notice
        if dynamo:
            return torch.onnx.export(net, (x,), dynamo=True, input_names=["x"], output_names=["y"]).model_proto
        buf = io.BytesIO()
        mode = torch.onnx.TrainingMode.PRESERVE if keep_batch_norm else torch.onnx.TrainingMode.EVAL
        torch.onnx.export(net, (x,), buf, dynamo=False, input_names=["x"], output_names=["y"], training=mode, **kw)
    return onnx.load_from_string(buf.getvalue())


@pytest.fixture(scope="module", params=[(m, e) for m in MODELS for e in ("torchscript", "dynamo")],
                ids=lambda p: "-".join(p))
def exported(request):
    name, exporter = request.param
    torch.manual_seed(0)
    cls, shape = MODELS[name]
    net = _randomised(cls())
    x = torch.randn(*shape)
    with torch.no_grad():
        want = net(x).numpy()
    model = export(net, x, name in KEEP_BATCH_NORM, dynamo=exporter == "dynamo")
    assert [i.name for i in model.graph.input] == ["x"]
    return name, exporter, model, x.numpy(), want


def test_matches_torch_on_c(exported):
    name, exporter, model, x, want = exported
    g = cc.from_onnx(model)
    got = cc.compile(g, target="c")(x=x)
    assert_close(got, want, rtol=1e-4, atol=1e-5, what=f"{name} ({exporter}): convc C vs torch")
    ops = {g.node(n)["op"] for n in g.nx}
    expect = {"resnet": {"conv", "max_pool", "global_avg_pool", "add", "dense"},
              "mobilenet": {"conv", "clip", "softmax", "global_avg_pool"},
              "dcgan": {"conv_transpose", "relu", "tanh"},
              "audio1d": {"conv", "max_pool", "avg_pool", "leaky_relu", "sigmoid", "dense"}}[name]
    if exporter == "torchscript" and name in KEEP_BATCH_NORM | {"dcgan"}:
        expect = expect | {"batch_norm"}        # (the dynamo exporter folds every batch norm it can)
    assert expect <= ops, expect - ops
    depthwise = [n for n in g.nx if g.node(n)["op"] == "conv" and g.node(n)["attrs"]["groups"] > 1]
    assert bool(depthwise) == (name == "mobilenet")


def test_roundtrip_through_onnx(exported):
    name, exporter, model, x, want = exported
    g = cc.from_onnx(model)
    out = cc.to_onnx(g)
    onnx.checker.check_model(out, full_check=True)
    ours = cc.compile(g, target="numpy")(x=x)
    (theirs,) = ReferenceEvaluator(out).run(None, {"x": x})
    assert_close(theirs, ours, rtol=1e-4, atol=1e-5, what=f"{name} ({exporter}): onnx.reference of to_onnx")
    assert_close(ours, want, rtol=1e-4, atol=1e-5, what=f"{name} ({exporter}): convc numpy vs torch")


def test_dynamic_batch_needs_input_shapes():
    torch.manual_seed(1)
    net = _randomised(ResNetTiny())
    x = torch.randn(3, 3, 16, 16)
    model = export(net, x[:1], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    with pytest.raises(cc.ConvcError, match=r"\(batch, 3, 16, 16\) is not static"):
        cc.from_onnx(model)
    g = cc.from_onnx(model, input_shapes={"x": (3, 3, 16, 16)})
    with torch.no_grad():
        want = net(x).numpy()
    assert_close(cc.compile(g, target="c")(x=x.numpy()), want, rtol=1e-4, atol=1e-5, what="batch of 3")

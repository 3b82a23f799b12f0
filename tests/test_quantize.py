"""Post-training quantization: calibration, the quantize_int8 pass, cc.quantize's
report, the CLI, and the digits accuracy (a small run of examples/quantize_digits.py)."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import convc as cc
from convc import calibration as cal
from convc.calibration import CalibrationError
from convc.passes.quantize import quantize_int8

import helpers

ROOT = Path(__file__).resolve().parent.parent


def mapping_graph(batch: int = 2, seed: int = 0) -> cc.Graph:
    """One node of every op the pass maps (conv with relu and relu6, grouped
    and strided and dilated, flipped, 1-D through reshape; max/avg/global
    pools; add; concat; activations by table; dense) and one it cannot
    (softmax: a float fallback), ending in two outputs."""
    rng = np.random.default_rng(seed)
    g = cc.Graph("mapping")
    x = g.input("x", (batch, 3, 12, 12))

    def p(name, *shape, scale=0.3):
        return g.param(name, rng.standard_normal(shape) * scale, "float32")

    a = cc.relu(cc.conv(x, p("w1", 8, 3, 3, 3), p("b1", 8, scale=0.1), padding=1, name="conv1"))
    a = cc.max_pool(a, 2, name="pool")                                                    # 8 x 6 x 6
    b = cc.relu6(cc.conv(a, p("w2", 8, 4, 3, 3), p("b2", 8), padding=2, dilation=2, groups=2, name="conv2"))
    c = cc.conv(a, p("w3", 8, 8, 3, 3), padding=1, flip=True, name="conv3")              # no bias, flipped
    s = cc.hardswish(cc.add(b, c, name="add"), name="hswish")
    s = cc.avg_pool(s, 2, name="avg")                                                     # 8 x 3 x 3
    t = cc.sigmoid(cc.conv(s, p("w4", 4, 8, 1, 1), p("b4", 4), name="conv4"), name="sig")
    cat = cc.concat([s, t], axis=1, name="cat")                                           # 12 x 3 x 3
    gp = cc.flatten(cc.global_avg_pool(cat, name="gap"), name="flat")                     # 12
    h = cc.relu(cc.dense(gp, p("fw1", 16, 12), p("fb1", 16), name="fc1"))
    logits = cc.dense(h, p("fw2", 5, 16), p("fb2", 5), name="fc2")
    g.output(logits, "logits")
    g.output(cc.softmax(logits, name="probs"), "probs")
    return g


def data(n: int, seed: int = 1, shape=(3, 12, 12)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n,) + shape).astype(np.float32)


@pytest.fixture(scope="module")
def mapped():
    g = mapping_graph()
    gc = cc.calibrate(g, data(16), engine="reference")
    return g, gc, quantize_int8(gc)


def _form(g8, n):
    return g8.node(n).get("int8_form")


def test_each_op_mapped(mapped):
    _, gc, g8 = mapped
    ops = {n: gc.node(n)["op"] for n in gc.topological_order()}
    want = {"conv": "qconv", "dense": "qdense", "add": "qadd", "concat": "qconcat", "avg_pool": "qavg_pool",
            "global_avg_pool": "qglobal_avg_pool", "max_pool": "max_pool", "flatten": "flatten",
            "hardswish": "qlookup (hardswish)", "sigmoid": "qlookup (sigmoid)", "softmax": "float softmax"}
    seen = set()
    for n, op in ops.items():
        if op in want:
            assert _form(g8, n) == want[op], (n, op, _form(g8, n))
            seen.add(op)
    assert seen == set(want)
    # int8 where it maps: every layer but the softmax carries an int8 value and its qparams
    for n, op in ops.items():
        if op not in ("input", "param", "softmax"):
            assert g8.node(n)["type"].dtype == "int8" and "qparams" in g8.node(n), n
    # relu and relu6 folded into the clamps; float in, float out
    conv1 = next(n for n in ops if n.startswith("conv1"))
    conv2 = next(n for n in ops if n.startswith("conv2"))
    s1, z1 = g8.node(conv1)["qparams"]
    assert g8.node(conv1)["attrs"]["clamp"] == (max(-128, z1), 127)
    s2, z2 = g8.node(conv2)["qparams"]
    assert g8.node(conv2)["attrs"]["clamp"] == (max(-128, z2), min(127, z2 + round(6 / s2)))
    assert all(g8.node(g8.outputs[o])["type"].dtype == "float32" for o in g8.outputs)
    # one quantize per value a consumer needed, none after a dequantize of the same params
    ops8 = [g8.node(n)["op"] for n in g8.topological_order()]
    assert ops8.count("quantize") == 1            # the input x
    assert ops8.count("dequantize") == 1          # fc2, once, for both the logits output and the softmax


def test_weights_and_bias_follow_quant(mapped):
    """The int8 weights and int32 biases are convc.quant's functions of the float ones."""
    from convc import quant
    _, gc, g8 = mapped
    conv1 = next(n for n in gc.topological_order() if n.startswith("conv1"))
    x, w, b = gc.inputs_of(conv1)
    xq, wq, bq = g8.inputs_of(conv1)
    q, scales = quant.quantize_weights(gc.node(w)["value"])
    assert np.array_equal(g8.node(wq)["value"], q)
    assert g8.node(conv1)["attrs"]["w_scale"] == tuple(float(np.float32(s)) for s in scales)
    xs = g8.node(xq)["qparams"][0]
    assert np.array_equal(g8.node(bq)["value"], quant.quantize_bias(gc.node(b)["value"], xs, scales))
    # flip=True: the weights are flipped before quantization
    conv3 = next(n for n in gc.topological_order() if n.startswith("conv3"))
    w3 = gc.node(gc.inputs_of(conv3)[1])["value"]
    assert np.array_equal(g8.node(g8.inputs_of(conv3)[1])["value"], quant.quantize_weights(w3[..., ::-1, ::-1])[0])


@pytest.mark.parametrize("target", helpers.__getattr__("TARGETS")[1:])
def test_compiled_bit_exact(mapped, target):
    """Every int8 value of the compiled graph equals the reference interpreter's, bit for bit."""
    _, _, g8 = mapped
    nodes = [n for n in g8.topological_order() if g8.node(n)["op"] not in ("input", "param")]
    feeds = cal.batches(g8, data(6, seed=7) * 3)            # beyond the calibrated range too: saturation
    for got, want in zip(cal.node_values(g8, nodes, feeds, target), cal.node_values(g8, nodes, feeds, "reference")):
        for n in nodes:
            if g8.node(n)["type"].dtype == "int8":
                assert np.array_equal(got[n], want[n]), n
            else:
                np.testing.assert_allclose(got[n], want[n], rtol=1e-5, atol=1e-6, err_msg=n)


def snr_bound(g8) -> float:
    """The SNR (dB) the int8 graph can be expected to keep against the float one.

    Each quantization step rounds to its scale s: uniform noise of power
    s**2 / 12, against the signal power of the value it quantizes (here the
    calibrated range's: a value spread over [lo, hi] has power at least
    ((hi - lo) / 2)**2 / 3 for a uniform spread, ~ (hi - lo)**2 / 12).
    Relative noise powers of independent steps add, so the output's SNR is at
    least -10 log10(sum 10**(-SNR_i / 10)) over the L steps; each step's SNR
    with a range of 255 steps is 10 log10(255**2) = 48.1 dB. Real signals do
    not fill their range (crest factor) and layers amplify noise, so 20 dB are
    given away for that: the bound is 48.1 - 10 log10(L) - 20."""
    steps = sum(1 for n in g8.topological_order() if "qparams" in g8.node(n)) + \
        sum(1 for n in g8.param_names if g8.node(n)["type"].dtype == "int8")
    return 20 * math.log10(255) - 10 * math.log10(steps) - 20


def test_int8_close_to_float(mapped):
    g, gc, g8 = mapped
    feeds = cal.batches(g, data(16))
    rep = cal.measure(gc, g8, feeds, engine="reference")
    bound = snr_bound(g8)
    assert bound > 10
    for o, (err, snr) in rep.outputs.items():
        assert snr > bound, (o, snr, bound)
    # the first conv's error within its worst case: the input's rounding (s_x / 2 per value) through
    # the weights, the weights' rounding (s_w / 2 each) on inputs up to max |x|, the bias's rounding,
    # and 1 step s_y for the output's requantization (two roundings)
    first = rep.rows[0]
    x, w, b = gc.inputs_of(first.node)
    sx = g8.node(g8.inputs_of(first.node)[0])["qparams"][0]
    sw = np.asarray(g8.node(first.node)["attrs"]["w_scale"])
    wv = gc.node(w)["value"].reshape(len(sw), -1)
    xmax = float(np.abs(np.concatenate([f["x"] for f in feeds])).max())
    worst = first.scale + sx / 2 * np.abs(wv).sum(1) + wv.shape[1] * (xmax + sx / 2) * sw / 2 + sx * sw / 2
    assert first.int8_op == "qconv" and first.max_abs <= worst.max(), (first.max_abs, worst.max())


def test_quantize_report_and_observers():
    g = mapping_graph()
    g8, rep = cc.quantize(g, data(8), engine="reference", report=True)
    text = rep.table()
    assert "qconv" in text and "SNR dB" in text and "flash (params bytes)" in text
    assert rep.flash[1] < rep.flash[0] / 2 and rep.arena[1] < rep.arena[0]
    assert rep.samples == 8
    by = {r.node: r for r in rep.rows}
    probs = by["probs"]
    assert probs.int8_op == "float softmax" and probs.scale is None
    # percentile ranges lie inside the min/max ones
    gm = cc.calibrate(g, data(8), observer="minmax", engine="reference")
    gp = cc.calibrate(g, data(8), observer="percentile", percentile=99.0, engine="reference")
    for n in cal.observed(gm):
        (a, b), (c, d) = gm.node(n)["qrange"], gp.node(n)["qrange"]
        assert a <= c <= d <= b, n
    wide = [n for n in cal.observed(gm) if gp.node(n)["qrange"][1] < gm.node(n)["qrange"][1]]
    assert wide                     # some tails were clipped
    # per-tensor weights: one scale per conv
    gt = cc.quantize(g, data(8), per_channel=False, engine="reference")
    convs = [n for n in gt.topological_order() if gt.node(n)["op"] == "qconv"]
    assert convs and all(len(gt.node(n)["attrs"]["w_scale"]) == 1 for n in convs)


def test_calibration_engines_agree():
    """Ranges observed through compiled C equal the reference interpreter's (to float rounding)."""
    g = mapping_graph()
    a = cc.calibrate(g, data(4), engine="reference")
    b = cc.calibrate(g, data(4), engine="c")
    for n in cal.observed(a):
        np.testing.assert_allclose(a.node(n)["qrange"], b.node(n)["qrange"], rtol=1e-5, atol=1e-6, err_msg=n)


def test_calibration_forms(tmp_path):
    g = mapping_graph(batch=2)
    x = data(4)
    as_array = cal.batches(g, x)
    assert len(as_array) == 2 and as_array[1]["x"].shape == (2, 3, 12, 12)
    assert len(cal.batches(g, {"x": x})) == 2
    assert len(cal.batches(g, [{"x": x[:2]}, {"x": x[2:]}])) == 2
    np.savez(tmp_path / "c.npz", x=x)
    assert np.array_equal(cal.batches(g, tmp_path / "c.npz")[1]["x"], x[2:])
    np.savez(tmp_path / "one.npz", x)                                # arr_0 for a one-input graph
    assert len(cal.batches(g, str(tmp_path / "one.npz"))) == 2


@pytest.mark.parametrize("bad, rule", [
    (np.zeros((3, 3, 12, 12), np.float32), r"shape \(3, 3, 12, 12\); it must be \(k \* 2, 3, 12, 12\)"),
    (np.zeros((2, 3, 12, 11), np.float32), r"input 'x' float32\[2,3,12,12\] has shape \(2, 3, 12, 11\)"),
    (np.zeros((2, 3, 12, 12), np.int64), r"dtype int64; calibration takes float"),
    (np.full((2, 3, 12, 12), np.nan, np.float32), "NaN or infinite"),
    ({"y": np.zeros((2, 3, 12, 12), np.float32)}, r"missing \['x'\], unknown \['y'\]"),
    ([{"x": np.zeros((4, 3, 12, 12), np.float32)}], r"it must be exactly \(2, 3, 12, 12\)"),
    ([], "empty list"),
    ("/nonexistent/cal.npz", "does not exist"),
])
def test_calibration_errors(bad, rule):
    with pytest.raises(CalibrationError, match=rule):
        cc.calibrate(mapping_graph(), bad, engine="reference")


def test_errors():
    g = mapping_graph()
    # the pass on an uncalibrated graph names the first node without a range
    with pytest.raises(CalibrationError, match=r"node 'conv1' \(conv -> float32\[2,8,12,12\], inputs: x .*no calibration range"):
        quantize_int8(g)
    gc = cc.calibrate(g, data(2), engine="reference")
    n = next(n for n in gc.topological_order() if n.startswith("conv2"))
    del gc.nx.nodes[n]["qrange"]
    with pytest.raises(CalibrationError, match=rf"node '{n}' \(conv -> float32\[2,8,6,6\], inputs: pool.*"
                                               r"cc.calibrate"):
        quantize_int8(gc)
    with pytest.raises(cc.ConvcError, match="observer must be one of"):
        cc.calibrate(g, data(2), observer="kl")
    with pytest.raises(cc.ConvcError, match="percentile must be"):
        cc.calibrate(g, data(2), observer="percentile", percentile=20)
    with pytest.raises(CalibrationError, match="give calibration inputs"):
        cc.quantize(g)
    from convc.models import lenet5
    with pytest.raises(CalibrationError, match=r"node 'x' \(input\) is float64; quantize_int8 takes float32"):
        cc.quantize(lenet5(dtype="float64"), np.zeros((1, 1, 28, 28)), engine="reference")
    # cc.quantize on a Value is still the quantize op
    v = cc.quantize(g.value("x"), 0.5, 3)
    assert v.op == "quantize" and g.node(v.name)["attrs"]["zero_point"] == (3,)


def test_fallbacks_are_noted():
    """A conv with an untied bias (no int8 form) stays float, named in the pass notes; the tanh
    after it (split off its epilogue) runs as a table on int8."""
    rng = np.random.default_rng(0)
    g = cc.Graph("fallback")
    x = g.input("x", (1, 2, 6, 6))
    y = cc.tanh(cc.conv(x, g.param("w", rng.standard_normal((3, 2, 3, 3)), "float32"),
                        g.param("b", rng.standard_normal((3, 4, 4)), "float32"), name="c"))
    y = cc.conv(y, g.param("w2", rng.standard_normal((3, 3, 1, 1)), "float32"), name="c2")
    g.output(y, "y")
    gc = cc.calibrate(g, data(1, shape=(2, 6, 6)), engine="reference")
    g8, reps = cc.passes.report(gc, ["quantize_int8"])
    c = next(n for n in gc.topological_order() if gc.node(n)["op"] == "conv" and n.startswith("c."))
    assert g8.node(c)["op"] == "conv" and g8.node(c)["type"].dtype == "float32"
    notes = "\n".join(reps[0].notes)
    assert f"'{c}' (conv): stays float" in notes and "not one number per output channel" in notes
    assert "SNR" in notes and "scale" in notes
    assert [g8.node(n)["op"] for n in g8.topological_order()].count("quantize") == 1     # the float conv's output
    assert "qlookup" in [g8.node(n)["op"] for n in g8.topological_order()]


def test_accumulator_overflow_falls_back():
    """A dense layer with more products than int32 holds at worst (qdense refuses it) stays float."""
    g = cc.Graph("wide")
    x = g.input("x", (1, 140000))
    g.output(cc.dense(x, g.param("w", np.full((2, 140000), 0.01), "float32"), name="fc"), "y")
    g8, reps = cc.passes.report(cc.calibrate(g, data(1, shape=(140000,)), engine="reference"), ["quantize_int8"])
    assert g8.node("fc")["op"] == "dense" and "int32" in "\n".join(reps[0].notes)


def test_cancel_requantize():
    g = cc.Graph("qdq")
    x = g.input("x", (1, 4), "int8")
    y = cc.quantize(cc.dequantize(x, 0.5, 2), 0.5, 2)          # cancels
    z = cc.quantize(cc.dequantize(x, 0.5, 2), 0.25, 2)         # does not
    g.output(y, "y")
    g.output(z, "z")
    out = cc.passes.run(g, ["cancel_requantize"])
    assert out.outputs["y"] == "x"
    assert out.node(out.outputs["z"])["op"] == "quantize"


def test_cli(tmp_path):
    np.savez(tmp_path / "cal.npz", x=data(4, shape=(1, 28, 28)))
    r = subprocess.run([sys.executable, "-m", "convc", "quantize", "lenet5", "--calibration",
                        str(tmp_path / "cal.npz"), "--report", "--engine", "reference", "-o", str(tmp_path / "q.py")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "== float graph" in out and "== int8 graph" in out and "qconv(" in out and "SNR dB" in out
    # the written model loads back as the same int8 graph
    from convc.export import load_model
    g8 = load_model(str(tmp_path / "q.py"))
    from convc.models import lenet5
    want = cc.quantize(lenet5(), data(4, shape=(1, 28, 28)), engine="reference")
    assert str(g8) == str(want)
    feeds = {"x": data(1, seed=3, shape=(1, 28, 28))}
    assert np.array_equal(cc.compile(g8, "numpy").run(feeds)["logits"], cc.compile(want, "numpy").run(feeds)["logits"])
    bad = subprocess.run([sys.executable, "-m", "convc", "quantize", "lenet5", "--calibration",
                          str(tmp_path / "missing.npz")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_digits_accuracy():
    """A small run of examples/quantize_digits.py: int8 accuracy within 1 point of float."""
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import quantize_digits
    finally:
        sys.path.pop(0)
    res = quantize_digits.run(epochs=4, calibration=200)
    assert res["float"] > 0.9
    assert res["float"] - res["int8"][0] <= 0.01, res


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_against_torch_post_training_quantization():
    """An independent oracle of calibration + pass: PyTorch's eager post-training static
    quantization (fbgemm) of the same net with the same scheme -- min/max observers,
    activations asymmetric per tensor (quint8: the same real grid as our int8, zero point
    +128), weights symmetric per channel in [-127, 127], relu fused. The calibrated scales
    agree to float32 rounding (torch computes them in float32, convc in float64 then rounds)
    and the output integers within 1 step (fbgemm requantizes in float)."""
    torch = pytest.importorskip("torch")
    from torch import nn
    from torch.ao import quantization as tq
    torch.backends.quantized.engine = "fbgemm"

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.dq = tq.QuantStub(), tq.DeQuantStub()
            self.c1, self.r1 = nn.Conv2d(1, 8, 3, padding=1), nn.ReLU()
            self.c2, self.r2 = nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()
            self.f1, self.r3, self.f2 = nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)

        def forward(self, x):
            x = torch.max_pool2d(self.r1(self.c1(self.q(x))), 2)
            x = torch.flatten(torch.max_pool2d(self.r2(self.c2(x)), 2), 1)
            return self.dq(self.f2(self.r3(self.f1(x))))

    torch.manual_seed(0)
    m = Net().eval()
    g = cc.Graph("tnet")
    x = g.input("x", (4, 1, 8, 8))

    def wb(mod, name):
        return (g.param(f"{name}_w", mod.weight.detach().numpy(), "float32"),
                g.param(f"{name}_b", mod.bias.detach().numpy(), "float32"))
    h = cc.max_pool(cc.relu(cc.conv(x, *wb(m.c1, "c1"), padding=1, name="c1")), 2)
    h = cc.max_pool(cc.relu(cc.conv(h, *wb(m.c2, "c2"), padding=1, name="c2")), 2)
    h = cc.relu(cc.dense(cc.flatten(h), *wb(m.f1, "f1"), name="f1"))
    g.output(cc.dense(h, *wb(m.f2, "f2"), name="f2"), "y")
    calib = np.random.default_rng(1).random((64, 1, 8, 8)).astype(np.float32)
    g8 = cc.quantize(g, calib, engine="reference")

    m.qconfig = tq.QConfig(activation=tq.MinMaxObserver.with_args(dtype=torch.quint8),
                           weight=tq.PerChannelMinMaxObserver.with_args(
                               dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-127, quant_max=127))
    tq.fuse_modules(m, [["c1", "r1"], ["c2", "r2"], ["f1", "r3"]], inplace=True)
    prepared = tq.prepare(m)
    with torch.no_grad():
        prepared(torch.from_numpy(calib))
    tm = tq.convert(prepared)
    layers = {"c1": tm.c1, "c2": tm.c2, "f1": tm.f1, "f2": tm.f2}
    for n in g8.topological_order():
        base = n.split(".")[0]
        if base in layers and g8.node(n)["op"] in ("qconv", "qdense"):
            s, z = g8.node(n)["qparams"]
            assert s == pytest.approx(layers[base].scale, rel=1e-6) and z + 128 == layers[base].zero_point, n
            w = g8.node(g8.inputs_of(n)[1])["value"].reshape(layers[base].weight().shape)
            assert np.array_equal(w, layers[base].weight().int_repr().numpy()), n
    test = np.random.default_rng(2).random((4, 1, 8, 8)).astype(np.float32)
    want = tm(torch.from_numpy(test)).numpy()
    got = cc.compile(g8, "c")(x=test)
    step = g8.node(g8.inputs_of(g8.outputs["y"])[0])["qparams"][0]
    lsb = np.rint(np.abs(want - got) / step)
    assert lsb.max() <= 1 and np.mean(lsb == 0) >= 0.9, (lsb.max(), np.mean(lsb == 0))


def test_residual_block_with_batch_norm():
    """A ResNet block: batch norm folds into the convs, the residual add and the relu after it
    (fused into the second conv's epilogue by the cleanup) are split off again and run as one
    qadd with the relu in its clamp; compiled C equals the reference bit for bit."""
    rng = np.random.default_rng(3)
    g = cc.Graph("block")
    x = g.input("x", (2, 4, 6, 6))

    def bn(v, name):
        c = v.shape[1]
        return cc.batch_norm(v, *(g.param(f"{name}_{k}", a, "float32") for k, a in (
            ("mean", rng.standard_normal(c) * 0.1), ("var", rng.random(c) + 0.5),
            ("gamma", rng.random(c) + 0.5), ("beta", rng.standard_normal(c) * 0.1))), name=name)
    h = cc.relu(bn(cc.conv(x, g.param("w1", rng.standard_normal((4, 4, 3, 3)) * 0.3, "float32"), padding=1,
                           name="c1"), "bn1"))
    h = bn(cc.conv(h, g.param("w2", rng.standard_normal((4, 4, 3, 3)) * 0.3, "float32"), padding=1, name="c2"), "bn2")
    g.output(cc.relu(cc.add(h, x, name="skip")), "y")
    g8 = cc.quantize(g, data(8, shape=(4, 6, 6)), engine="reference")
    ops = [g8.node(n)["op"] for n in g8.topological_order() if g8.node(n)["op"] not in ("input", "param")]
    assert ops == ["quantize", "qconv", "qconv", "qadd", "dequantize"], ops
    (add,) = [n for n in g8.topological_order() if g8.node(n)["op"] == "qadd"]
    s, z = g8.node(add)["qparams"]
    assert g8.node(add)["int8_form"] == "qadd+relu" and g8.node(add)["attrs"]["clamp"] == (max(-128, z), 127)
    nodes = [n for n in g8.topological_order() if g8.node(n)["op"] not in ("input", "param")]
    feeds = cal.batches(g8, data(2, seed=5, shape=(4, 6, 6)))
    for got, want in zip(cal.node_values(g8, nodes, feeds, "c"), cal.node_values(g8, nodes, feeds, "reference")):
        for n in nodes:
            assert np.array_equal(got[n], want[n]), n
    rep = cal.measure(cc.calibrate(g, data(8, shape=(4, 6, 6)), engine="reference"), g8,
                      cal.batches(g, data(8, shape=(4, 6, 6))), "reference")
    assert rep.outputs["y"][1] > snr_bound(g8)

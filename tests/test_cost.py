"""``cc.cost``: multiplications (MACs), parameters and bytes, per node and in
total. Every expected number is worked out by hand in the test."""
from __future__ import annotations

import numpy as np
import pytest

import convc as cc


def f32(*shape):
    return np.ones(shape, np.float32)


def P(g, *shape):
    """A named param of ones (weights passed as plain arrays would become constants)."""
    return g.param(f"p{len(g.param_names)}", f32(*shape))


def test_3x3_conv_over_5x5_image_is_81_macs():
    g = cc.Graph("c")
    x = g.input("x", (1, 1, 5, 5))
    g.output(cc.conv(x, P(g, 1, 1, 3, 3), name="conv"))
    rep = cc.cost(g)
    # output 3x3 = 9 positions, each a 3x3 = 9-term dot product
    assert rep.macs == 81
    assert rep.nodes["conv"].macs == 81
    assert rep.params == 9 and rep.nodes["conv"].params == 9
    assert rep.nodes["conv"].op == "conv"
    # bytes: x 25*4 + w 9*4 read, y 9*4 written
    assert rep.nodes["conv"].bytes == 100 + 36 + 36


def test_128_filters_3x3x3_over_7x7x3_valid_is_86400_macs():
    g = cc.Graph("c")
    x = g.input("x", (1, 3, 7, 7))
    g.output(cc.conv(x, P(g, 128, 3, 3, 3), P(g, 128), padding="valid", name="conv"))
    rep = cc.cost(g)
    # output 5x5 positions * 128 filters * (3*3*3 = 27) terms = 25 * 128 * 27
    assert rep.macs == 86400
    assert rep.nodes["conv"].macs == 86400
    assert rep.params == 128 * 27 + 128 == 3584


@pytest.mark.parametrize("batch, n_in, n_out, bias", [(1, 20, 10, True), (4, 20, 10, False), (32, 784, 128, True)])
def test_dense_macs_are_batch_in_out(batch, n_in, n_out, bias):
    g = cc.Graph("d")
    x = g.input("x", (batch, n_in))
    g.output(cc.dense(x, P(g, n_out, n_in), P(g, n_out) if bias else None, name="fc"))
    rep = cc.cost(g)
    assert rep.nodes["fc"].macs == rep.macs == batch * n_in * n_out
    assert rep.params == n_in * n_out + (n_out if bias else 0)


def test_dense_on_rank3_input_counts_every_row():
    g = cc.Graph("d")
    x = g.input("x", (2, 5, 8))
    g.output(cc.dense(x, P(g, 3, 8), name="fc"))
    assert cc.cost(g).macs == 2 * 5 * 8 * 3


def test_conv_macs_scale_with_batch_stride_groups_and_dims():
    g = cc.Graph("c")
    x = g.input("x", (2, 4, 8, 8))
    # stride 2, pad 1, 3x3: out 4x4; 6 filters over 4 channels: 2*6*16*(4*9)
    g.output(cc.conv(x, P(g, 6, 4, 3, 3), stride=2, padding=1, name="strided"))
    # groups=2: each of 6 filters sees 2 channels; 'same' keeps 8x8: 2*6*64*(2*9)
    g.output(cc.conv(x, P(g, 6, 2, 3, 3), padding="same", groups=2, name="grouped"))
    # depthwise: groups=4, 4 filters of 1 channel, 5x5 'valid' -> 4x4: 2*4*16*25
    g.output(cc.conv(x, P(g, 4, 1, 5, 5), groups=4, name="depthwise"))
    v = g.input("v", (1, 2, 10))
    # 1D: 3 filters, k=4, dilation 2: out = 10 - 2*3 = 4: 3*4*(2*4)
    g.output(cc.conv(v, P(g, 3, 2, 4), dilation=2, name="conv1d"))
    u = g.input("u", (1, 1, 4, 4, 4))
    # 3D: 2 filters 2x2x2 valid -> 3x3x3: 2*27*8
    g.output(cc.conv(u, P(g, 2, 1, 2, 2, 2), name="conv3d"))
    rep = cc.cost(g)
    want = {"strided": 2 * 6 * 16 * 36, "grouped": 2 * 6 * 64 * 18, "depthwise": 2 * 4 * 16 * 25,
            "conv1d": 3 * 4 * 8, "conv3d": 2 * 27 * 8}
    assert {n: c.macs for n, c in rep.nodes.items()} == want
    assert rep.macs == sum(want.values())
    assert rep.params == 6 * 36 + 6 * 18 + 4 * 25 + 3 * 8 + 2 * 8


def test_matmul_and_elementwise_macs():
    g = cc.Graph("m")
    a = g.input("a", (2, 3, 4, 5))
    b = g.input("b", (5, 6))
    g.output(cc.matmul(a, b, name="mm"))          # 2*3 batches of (4x5)@(5x6): 6*4*6*5
    x = g.input("x", (2, 3, 4))
    g.output(cc.mul(x, x, name="prod"))           # one multiplication per element: 24
    g.output(cc.add(x, x, name="sum"))            # no multiplication
    g.output(cc.relu(x, name="r"))
    rep = cc.cost(g)
    assert rep.nodes["mm"].macs == 6 * 4 * 6 * 5
    assert rep.nodes["prod"].macs == 24
    assert rep.nodes["sum"].macs == 0 and rep.nodes["r"].macs == 0
    assert rep.params == 0
    assert rep.macs == 6 * 4 * 6 * 5 + 24


def test_lenet_per_node_and_totals():
    g = cc.Graph("lenet")
    x = g.input("x", (1, 1, 28, 28))
    h = cc.relu(cc.conv(x, P(g, 6, 1, 5, 5), P(g, 6), name="conv1"), name="relu1")
    h = cc.max_pool(h, 2, name="pool1")
    h = cc.relu(cc.conv(h, P(g, 16, 6, 5, 5), P(g, 16), name="conv2"), name="relu2")
    h = cc.flatten(cc.max_pool(h, 2, name="pool2"), name="flat")
    h = cc.relu(cc.dense(h, P(g, 120, 256), P(g, 120), name="fc1"), name="relu3")
    g.output(cc.dense(h, P(g, 10, 120), P(g, 10), name="fc2"), "logits")
    rep = cc.cost(g)
    want = {
        "conv1": 6 * 24 * 24 * 25,          # 86400
        "conv2": 16 * 8 * 8 * 6 * 25,       # 153600
        "fc1": 256 * 120,                   # 30720
        "fc2": 120 * 10,                    # 1200
    }
    assert set(rep.nodes) == {"conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "flat", "fc1", "relu3", "fc2"}
    for n, m in want.items():
        assert rep.nodes[n].macs == m, n
    for n in ("relu1", "pool1", "relu2", "pool2", "flat", "relu3"):
        assert rep.nodes[n].macs == 0, n
    assert rep.macs == 271920 == sum(want.values())
    assert rep.macs == sum(c.macs for c in rep.nodes.values())
    # params: 6*25+6 + 16*150+16 + 256*120+120 + 120*10+10
    assert rep.params == 156 + 2416 + 30840 + 1210 == 34622
    assert sum(c.params for c in rep.nodes.values()) == rep.params     # each param read by one node
    assert rep.nodes["fc1"].params == 256 * 120 + 120
    assert rep.bytes == sum(c.bytes for c in rep.nodes.values())
    # bytes of pool1: reads 6*24*24 floats, writes 6*12*12
    assert rep.nodes["pool1"].bytes == (6 * 24 * 24 + 6 * 12 * 12) * 4
    # the report renders as a table naming every node and the total
    text = rep.table()
    for n in rep.nodes:
        assert n in text
    assert "271,920" in text and "34,622" in text


def test_shared_param_counted_once_in_total():
    g = cc.Graph("shared")
    x = g.input("x", (1, 4))
    w = g.param("w", f32(4, 4))
    g.output(cc.dense(cc.dense(x, w, name="a"), w, name="b"))
    rep = cc.cost(g)
    assert rep.params == 16
    assert rep.nodes["a"].params == rep.nodes["b"].params == 16
    assert rep.macs == 2 * 16


def test_dead_nodes_are_not_costed():
    g = cc.Graph("dead")
    x = g.input("x", (1, 1, 5, 5))
    cc.conv(x, g.param("unused_w", f32(8, 1, 3, 3)), name="unused")
    g.output(cc.conv(x, P(g, 1, 1, 3, 3), name="used"))
    rep = cc.cost(g)
    assert set(rep.nodes) == {"used"}
    assert rep.macs == 81 and rep.params == 9

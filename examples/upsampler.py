"""A transposed-convolution upsampler, and how ``output_size`` resolves the
shape ambiguity: a stride-2, 3×3 conv maps both 7×7 and 8×8 inputs to 4×4,
so its transpose must be told which one to produce.

    python examples/upsampler.py
"""
import numpy as np

import convc as cc

rng = np.random.default_rng(0)
w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)       # (C_in, C_out, kH, kW)
features = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)

for n in (7, 8):
    probe = cc.Graph("probe")
    v = probe.input("v", (1, 2, n, n))
    probe.output(cc.conv(v, np.ones((4, 2, 3, 3), np.float32), stride=2, padding=1), "y")
    print(f"conv stride 2, padding 1: {n}x{n} -> {probe.node('conv_1')['type'].shape[2:]}")

for size in (7, 8):
    g = cc.Graph(f"up{size}")
    x = g.input("x", features.shape)
    up = cc.conv_transpose(x, w, stride=2, padding=1, output_size=(size, size), name="up")
    g.output(up, "y")
    y = cc.compile(g, target="c")(x=features)
    attrs = g.node("up")["attrs"]
    print(f"output_size={size}x{size}: output_padding={attrs['output_padding']} -> y {y.shape}")

try:
    g = cc.Graph("bad")
    cc.conv_transpose(g.input("x", features.shape), w, stride=2, padding=1, output_size=(9, 9), name="up")
except cc.ConvcError as e:
    print("output_size=9x9 is rejected:", e)

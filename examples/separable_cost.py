"""A depthwise separable block against a standard convolution: same output
shape, a fraction of the multiplications (the MobileNet trade).

    python examples/separable_cost.py
"""
import numpy as np

import convc as cc

rng = np.random.default_rng(0)
shape, c_out, k = (1, 3, 7, 7), 128, 3

std = cc.Graph("standard")
x = std.input("x", shape)
std.output(cc.conv(x, rng.standard_normal((c_out, 3, k, k)).astype(np.float32), name="conv"), "y")

sep = cc.Graph("separable")
x = sep.input("x", shape)
sep.output(cc.separable_conv(x, rng.standard_normal((3, 1, k, k)).astype(np.float32),
                             rng.standard_normal((c_out, 3, 1, 1)).astype(np.float32), name="block"), "y")

a, b = cc.cost(std), cc.cost(sep)
print(f"{'':24}{'standard':>12}{'separable':>12}")
print(f"{'output shape':24}{'x'.join(map(str, std.node('conv')['type'].shape)):>12}"
      f"{'x'.join(map(str, sep.node('block')['type'].shape)):>12}")
for node, c in b.nodes.items():
    print(f"{'  MACs of ' + node:24}{'':>12}{c.macs:>12,}")
print(f"{'multiplications':24}{a.macs:>12,}{b.macs:>12,}")
print(f"{'parameters':24}{a.params:>12,}{b.params:>12,}")
print(f"separable needs {b.macs / a.macs:.1%} of the multiplications")

xv = rng.standard_normal(shape).astype(np.float32)
for g in (std, sep):
    y = cc.compile(g, target="c")(x=xv)
    ref = cc.compile(g, target="numpy")(x=xv)
    print(f"{g.name}: compiled C matches the reference: {np.allclose(y, ref, rtol=1e-4, atol=1e-4)}")

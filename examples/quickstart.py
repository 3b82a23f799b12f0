"""Build a tiny conv net, compile it to C, check it against the numpy reference.

    python examples/quickstart.py
"""
import numpy as np

import convc as cc

rng = np.random.default_rng(0)
g = cc.Graph("quickstart")
x = g.input("x", (2, 3, 32, 32))
w1 = g.param("w1", rng.standard_normal((8, 3, 3, 3)) * 0.2, "float32")
w2 = g.param("w2", rng.standard_normal((8, 1, 3, 3)) * 0.2, "float32")       # depthwise: groups = 8
h = cc.relu(cc.conv(x, w1, stride=2, padding="same", name="stem"))
h = cc.relu(cc.conv(h, w2, padding=1, groups=8, name="depthwise"))
h = cc.global_avg_pool(h)
y = cc.dense(cc.flatten(h), g.param("fc", rng.standard_normal((10, 8)) * 0.3, "float32"))
g.output(cc.softmax(y), "probs")

print(g)                      # the IR, one node a line
print(cc.cost(g))             # multiplications, params, bytes per node

mod = cc.compile(g, target="c")
a = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
probs = mod(x=a)
ref = cc.compile(g, target="numpy")(x=a)
print("max |C - reference| =", float(np.abs(probs - ref).max()))
print(mod.source.splitlines()[0])

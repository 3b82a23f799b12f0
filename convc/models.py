"""Small reference networks used by the demo, examples, tests and benchmarks."""
from __future__ import annotations

import numpy as np

from .ir import Graph
from .ops.conv import conv
from .ops.elementwise import relu
from .ops.linear import dense
from .ops.pool import max_pool
from .ops.tensor import flatten


def lenet5(batch: int = 1, seed: int = 0, dtype: str = "float32") -> Graph:
    """LeNet-5: 1x28x28 -> conv5x5x6 (pad 2) -> pool -> conv5x5x16 -> pool
    -> 120 -> 84 -> 10, ReLU activations, He-initialised random weights."""
    rng = np.random.default_rng(seed)
    g = Graph("lenet5")

    def param(name, shape):
        fan_in = int(np.prod(shape[1:]))
        return g.param(name, rng.standard_normal(shape) * np.sqrt(2.0 / fan_in), dtype)

    x = g.input("x", (batch, 1, 28, 28), dtype)
    h = relu(conv(x, param("conv1_w", (6, 1, 5, 5)), param("conv1_b", (6,)), padding=2, name="conv1"))
    h = max_pool(h, 2, name="pool1")
    h = relu(conv(h, param("conv2_w", (16, 6, 5, 5)), param("conv2_b", (16,)), name="conv2"))
    h = max_pool(h, 2, name="pool2")
    h = flatten(h, name="flatten")
    h = relu(dense(h, param("fc1_w", (120, 400)), param("fc1_b", (120,)), name="fc1"))
    h = relu(dense(h, param("fc2_w", (84, 120)), param("fc2_b", (84,)), name="fc2"))
    g.output(dense(h, param("fc3_w", (10, 84)), param("fc3_b", (10,)), name="fc3"), "logits")
    return g

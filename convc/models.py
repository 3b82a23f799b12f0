"""Small reference networks used by the demo, examples, tests and benchmarks."""
from __future__ import annotations

import numpy as np

from .ir import Graph
from .ops.conv import conv, depthwise_conv
from .ops.elementwise import relu
from .ops.linear import dense
from .ops.pool import global_avg_pool, max_pool
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


def mobilenet_tiny(batch: int = 1, seed: int = 0, dtype: str = "float32") -> Graph:
    """A MobileNet-style net for 3x32x32 images: a 3x3 stem conv at stride 2
    (16 channels), four depthwise-separable blocks (3x3 depthwise + ReLU, 1x1
    pointwise + ReLU; strides 1, 2, 1, 2; 32, 64, 64, 128 channels), global
    average pooling and a dense layer to 10 logits. He-initialised random
    weights, small random biases."""
    rng = np.random.default_rng(seed)
    g = Graph("mobilenet_tiny")

    def param(name, shape):
        fan_in = int(np.prod(shape[1:]))
        return g.param(name, rng.standard_normal(shape) * np.sqrt(2.0 / fan_in), dtype)

    def bias(name, n):
        return g.param(name, rng.standard_normal(n) * 0.05, dtype)

    x = g.input("x", (batch, 3, 32, 32), dtype)
    h = relu(conv(x, param("stem_w", (16, 3, 3, 3)), bias("stem_b", 16), stride=2, padding=1, name="stem"))
    c = 16
    for i, (out, stride) in enumerate([(32, 1), (64, 2), (64, 1), (128, 2)], start=1):
        h = relu(depthwise_conv(h, param(f"block{i}_dw_w", (c, 1, 3, 3)), bias(f"block{i}_dw_b", c),
                                stride=stride, padding=1, name=f"block{i}_dw"))
        h = relu(conv(h, param(f"block{i}_pw_w", (out, c, 1, 1)), bias(f"block{i}_pw_b", out),
                      name=f"block{i}_pw"))
        c = out
    h = flatten(global_avg_pool(h, name="pool"), name="flatten")
    g.output(dense(h, param("fc_w", (10, c)), bias("fc_b", 10), name="fc"), "logits")
    return g

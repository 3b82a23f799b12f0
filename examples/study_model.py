"""A model file for `convc passes`: it defines build() -> Graph.

    convc passes examples/study_model.py --pipeline study --dot passes_out/
    convc passes examples/study_model.py --passes strided_to_downsampled,fuse_downsample
"""
import numpy as np

import convc as cc


def build() -> cc.Graph:
    rng = np.random.default_rng(0)
    g = cc.Graph("study")

    def param(name, shape):
        return g.param(name, rng.standard_normal(shape) * 0.2, "float32")

    x = g.input("x", (1, 3, 32, 32))
    h = cc.relu(cc.conv(x, param("stem_w", (16, 3, 3, 3)), param("stem_b", (16,)), stride=2, padding=1, name="stem"))
    h = cc.conv(h, param("dw_w", (16, 1, 3, 3)), param("dw_b", (16,)), padding=1, groups=16, name="depthwise")
    h = cc.conv(cc.relu(h), param("pw_w", (32, 16, 1, 1)), param("pw_b", (32,)), name="pointwise")
    h = cc.batch_norm(h, param("bn_mean", (32,)), np.abs(rng.standard_normal(32)).astype(np.float32) + 0.5,
                      param("bn_gamma", (32,)), param("bn_beta", (32,)), name="bn")
    h = cc.conv(cc.relu(h), param("dil_w", (32, 32, 3, 3)), padding=2, dilation=2, name="dilated")
    h = cc.conv_transpose(h, param("up_w", (32, 8, 4, 4)), stride=2, padding=1, name="upsample")
    g.output(h, "y")
    return g

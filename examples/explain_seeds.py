"""The worked examples of convc's lowering passes, one explain page each:
what the pass rewrites, what it costs or saves, the error it introduces.

    python examples/explain_seeds.py [OUT_DIR]       # default: explain_pages/

Writes strided.html (strided -> downsampled: s^2 more work), transposed.html
(transposed convolution as a matrix transpose), separable.html (a rank-1
3x3 kernel factored: 81 vs 72 multiplications; a depthwise separable block
fused: 10 275 where a standard conv needs 86 400), fft.html (convolution
through the convolution theorem: a real, nonzero error) and tiled.html
(a tiled convolution as one conv per tile position).
"""
import sys
from pathlib import Path

import numpy as np

import convc as cc

rng = np.random.default_rng(0)


def weights(*shape):
    return rng.standard_normal(shape).astype(np.float32) * 0.3


def strided():
    g = cc.Graph("strided")
    x = g.input("x", (1, 3, 16, 16))
    g.output(cc.conv(x, weights(8, 3, 3, 3), stride=2, padding=1, name="stem"), "y")
    return g, ["strided_to_downsampled"], [
        "A stride-2 conv computed as a stride-1 conv followed by keeping every 2nd row and column: the same "
        "output for s^2 = 4 times the multiplications (the MAC row of the cost table)."]


def transposed():
    g = cc.Graph("transposed")
    x = g.input("x", (1, 8, 6, 6))
    g.output(cc.conv_transpose(x, weights(8, 4, 4, 4), stride=2, padding=1, name="up"), "y")
    return g, ["transposed_to_matmul"], [
        "A transposed convolution is the book's h: multiply by the transpose of the conv's matrix. The pass "
        "computes it as a matrix product with the kernel followed by col2im."]


def separable():
    g = cc.Graph("separable")
    x = g.input("x", (1, 1, 5, 5))
    col, row = weights(1, 1, 3, 1), weights(1, 1, 1, 3)
    k = (col[:, :, :, 0:1] * row[:, :, 0:1, :])                      # a rank-1 3x3 kernel
    h = cc.conv(x, k, name="full3x3")
    x2 = g.input("x2", (1, 3, 7, 7))
    s = cc.separable_conv(x2, weights(3, 1, 3, 3), weights(128, 3, 1, 1), name="block")
    g.output(h, "y")
    g.output(s, "z")
    std = cc.Graph("standard")
    std.output(cc.conv(std.input("x2", (1, 3, 7, 7)), weights(128, 3, 3, 3)), "z")
    return g, ["factor_spatial_separable", "fuse_separable"], [
        "factor_spatial_separable: the 3x3 kernel over a 5x5 image is rank 1, so it becomes a 3x1 then a 1x3 "
        "conv: 81 multiplications become 45 + 27 = 72.",
        f"fuse_separable: the depthwise separable block 7x7x3 -> 5x5x128 needs 675 + 9 600 = 10 275 "
        f"multiplications, where a standard conv with the same output needs {cc.cost(std).macs:,}; the pass "
        f"runs both halves in one kernel, so the depthwise result never goes to memory."]


def fft():
    g = cc.Graph("fft")
    x = g.input("x", (1, 2, 12, 12))
    g.output(cc.conv(x, weights(4, 2, 5, 5), padding=2, name="conv5x5"), "y")
    return g, ["conv_to_fft"], [
        "The convolution theorem: transform input and kernel, multiply the spectra, transform back. The same "
        "result up to rounding in the transforms: the measured error is real and nonzero."]


def tiled():
    g = cc.Graph("tiled")
    x = g.input("x", (1, 2, 8, 8))
    g.output(cc.tiled_conv(x, weights(3, 2, 3, 3, 2, 2), name="tiled"), "y")
    return g, ["tiled_to_convs", "eliminate_dead_code"], [
        "A tiled convolution (the book's Eq 4: output (j, k) uses kernel (j mod t, k mod t)) as one ordinary "
        "strided conv per tile position, interleaved back."]


def main(out="explain_pages"):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for build in (strided, transposed, separable, fft, tiled):
        g, passes, notes = build()
        ex = cc.explain(g, passes, notes=notes, timing=False, progress=False)
        path = ex.save(out / f"{build.__name__}.html")
        step = ex.steps[-1]
        print(f"{path}: {', '.join(passes)}; MACs {cc.cost(g).macs:,} -> {cc.cost(ex.final).macs:,}; "
              f"max error {max(e.ref_abs for s in ex.steps[1:] for e in s.errors):.3g}"
              + (f" ({step.c_error})" if step.c_error else ""))


if __name__ == "__main__":
    main(*sys.argv[1:2])

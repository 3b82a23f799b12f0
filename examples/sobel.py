"""Sobel edge detection as a spatially separable convolution.

The Sobel kernel [[1,0,-1],[2,0,-2],[1,0,-1]] is the outer product of the
column [1,2,1] and the row [1,0,-1], so a 3×1 conv followed by a 1×3 conv
computes it with 6 instead of 9 multiplications per pixel.

    python examples/sobel.py [out.png]
"""
import sys

import numpy as np

import convc as cc
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from pngio import write_png  # noqa: E402

H = W = 128
yy, xx = np.mgrid[0:H, 0:W]
image = ((xx - 64) ** 2 + (yy - 64) ** 2 < 40 ** 2).astype(np.float32)      # a disc
image[20:50, 80:120] = 1.0                                                  # and a box

g = cc.Graph("sobel")
x = g.input("image", (1, 1, H, W))
col = np.array([1, 2, 1], np.float32).reshape(1, 1, 3, 1)
row = np.array([1, 0, -1], np.float32).reshape(1, 1, 1, 3)
gx = cc.spatial_separable_conv(x, col, row, padding="same", name="sobel_x")
gy = cc.spatial_separable_conv(x, row.reshape(1, 1, 3, 1), col.reshape(1, 1, 1, 3), padding="same", name="sobel_y")
g.output(gx, "gx")
g.output(gy, "gy")

full = cc.Graph("sobel_full")
xf = full.input("image", (1, 1, H, W))
full.output(cc.conv(xf, (col * row), padding="same"), "gx")

mod = cc.compile(g, target="c")
res = mod.run({"image": image[None, None]})
magnitude = np.hypot(res["gx"], res["gy"])[0, 0]
direct = cc.compile(full, target="c")(image=image[None, None])
print("separable vs full 3x3 kernel: max difference", float(np.abs(direct - res["gx"]).max()))
print(f"multiplications: full 3x3 {cc.cost(full).macs:,}, separable {cc.cost(g).macs // 2:,} per direction")
out = sys.argv[1] if len(sys.argv) > 1 else "sobel.png"
write_png(out, np.concatenate([image, magnitude / max(1e-6, magnitude.max())], axis=1))
print("wrote", out, "(input | edge magnitude)")

"""Winograd convolution F(2×2, 3×3) (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", 2016): the same function as a unit-stride,
undilated, ungrouped 2D ``conv`` with a 3×3 kernel, computed with 16
multiplications per 2×2 output tile and input channel instead of 36.

For one input channel, a 2×2 output tile Y comes from the 4×4 input tile d
(stride 2 between tiles, zero outside the input) and the 3×3 kernel g as

    Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A

        Bᵀ = | 1  0 -1  0 |    G = |  1    0    0  |    Aᵀ = | 1  1  1  0 |
             | 0  1  1  0 |        | 1/2  1/2  1/2 |         | 0  1 -1 -1 |
             | 0 -1  1  0 |        | 1/2 -1/2  1/2 |
             | 0  1  0 -1 |        |  0    0    1  |

Summed over input channels, the 16 elementwise products become 16 matrix
products, one per transform coefficient ξ = (i, j):

    M[ξ] (C_out × tiles) = U[ξ] (C_out × C_in) · V[ξ] (C_in × tiles)

Two ops, both made by the ``conv_to_winograd`` pass (or :func:`winograd_conv`):

- ``winograd_kernel(w)`` → U, shape (4, 4, C_out, C_in): the kernel transform
  G g Gᵀ of every (c_out, c_in) kernel. It is a node of its own because w is
  a param that training changes: U is recomputed once per run, not once per
  work-item of the convolution.
- ``winograd_conv(x, w, u[, b])``: the convolution. Its meaning (numpy
  reference, gradient) is ``conv(x, w, b)``; the generated code reads ``u``,
  which must be ``winograd_kernel(w)`` with the same ``flip`` (w itself is
  not read by the C code). A tied or untied bias and a fused activation are
  supported like in ``conv``; so is ``flip`` (handled by the kernel transform).
"""
from __future__ import annotations

import numpy as np

from ..errors import RuleError
from ..ir import TensorType, Value
from . import epilogue
from .conv import Conv
from .registry import OPS, Op, as_value, float_dtype, register, rules, same_dtype

G_MATRIX = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
BT_MATRIX = np.array([[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, -1.0, 1.0, 0.0], [0.0, 1.0, 0.0, -1.0]])
AT_MATRIX = np.array([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]])

KERNEL_TRANSFORM_MULS = 14
"""Multiplications of G g Gᵀ as the template computes it: (g0 + g2)/2 and
g1/2 per column of g (6), then the same per row of G g (8)."""

MICRO_TILE = 16
"""Tiles one register block of the products covers (one or two 512-bit
vectors); a block's tile count is rounded up to a multiple of it."""

MAX_BLOCK_TILES = 32
"""About how many tiles one work-item transforms and multiplies: V for the
block (16 · C_in · tiles elements) stays in the L2 cache."""

CO_BLOCK = 8
"""Output channels one register block of the products covers."""


def winograd_rule(x: TensorType, w: TensorType, attrs: dict) -> str | None:
    """Why a conv with (normalised) ``attrs`` on ``x`` and ``w`` is not a
    Winograd F(2×2, 3×3) case, or None if it is."""
    if len(x.shape) != 4:
        return f"winograd_conv is 2D (input rank 4), got input rank {len(x.shape)}"
    if tuple(w.shape[2:]) != (3, 3):
        return f"winograd_conv needs a 3×3 kernel, got {tuple(w.shape[2:])}"
    if tuple(attrs["stride"]) != (1, 1):
        return f"winograd_conv needs stride 1, got {attrs['stride']}"
    if tuple(attrs["dilation"]) != (1, 1):
        return f"winograd_conv needs dilation 1, got {attrs['dilation']}"
    if attrs["groups"] != 1:
        return f"winograd_conv needs groups=1, got {attrs['groups']}"
    return None


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def blocking(out_y: int, out_x: int, c_out: int) -> dict:
    """How the output tiles are split into work-items: blocks of BY tile rows
    × BX tile columns (balanced, about MAX_BLOCK_TILES tiles), whose V slots
    are padded to TB, a multiple of MICRO_TILE; CB output channels at once."""
    tiles_y, tiles_x = _ceil_div(out_y, 2), _ceil_div(out_x, 2)
    bx = _ceil_div(tiles_x, _ceil_div(tiles_x, MAX_BLOCK_TILES))
    by = max(1, min(tiles_y, MAX_BLOCK_TILES // bx))
    by = _ceil_div(tiles_y, _ceil_div(tiles_y, by))
    tb = _ceil_div(bx * by, MICRO_TILE) * MICRO_TILE
    return dict(TILES_Y=tiles_y, TILES_X=tiles_x, BY=by, BX=bx, TB=tb, MT=MICRO_TILE,
                BLOCKS_Y=_ceil_div(tiles_y, by), BLOCKS_X=_ceil_div(tiles_x, bx), CB=min(CO_BLOCK, c_out))


# -- the builder ----------------------------------------------------------------
def winograd_conv(x: Value, w, bias=None, stride=1, padding=0, dilation=1, groups=1, flip=False,
                  name=None) -> Value:
    """``conv(x, w, bias, ...)`` computed by Winograd F(2×2, 3×3): adds a
    ``winograd_kernel`` node (U from w) and the ``winograd_conv`` node. Only
    2D, 3×3, stride 1, dilation 1, groups 1 (any padding, flip, bias);
    anything else is a ValidationError naming the rule."""
    w = as_value(x, w, "winograd_conv weight")
    b = [as_value(x, bias, "winograd_conv bias")] if bias is not None else []
    attrs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, flip=flip)
    g = x.graph
    with rules("winograd_conv", name, x=x, w=w, **({"b": b[0]} if b else {})):    # before adding any node
        if len(w.shape) < 2:
            raise RuleError(f"weight must be (C_out, C_in, 3, 3), got {w.shape}")
        types = [x.type, w.type, TensorType((4, 4) + tuple(w.shape[:2]), w.dtype)] + [v.type for v in b]
        op = OPS["winograd_conv"]
        op.infer(op.normalize(dict(attrs), types), types)
    u = g.add("winograd_kernel", [w], dict(flip=flip), None if name is None else f"{name}.kernel")
    return g.add("winograd_conv", [x, w, u, *b], attrs, name)


# -- the ops --------------------------------------------------------------------
@register
class WinogradKernel(Op):
    """U[i, j, co, ci] = (G g Gᵀ)[i, j] for g = w[co, ci] (flipped if ``flip``)."""
    name = "winograd_kernel"
    inputs = ("w",)

    def normalize(self, attrs, types):
        flip = attrs.get("flip", False)
        if not isinstance(flip, (bool, np.bool_)):
            raise RuleError(f"flip must be True or False, got {flip!r}")
        return dict(flip=bool(flip))

    def infer(self, attrs, types):
        (w,) = types
        float_dtype(w, "weight")
        if len(w.shape) != 4 or tuple(w.shape[2:]) != (3, 3):
            raise RuleError(f"weight must be (C_out, C_in, 3, 3), got {w.shape}")
        return TensorType((4, 4) + tuple(w.shape[:2]), w.dtype)

    def reference(self, attrs, w):
        if attrs["flip"]:
            w = w[:, :, ::-1, ::-1]
        u = np.einsum("ik,ockl,jl->ijoc", G_MATRIX, w.astype(np.float64), G_MATRIX)
        return u.astype(w.dtype)

    def context(self, attrs, types, out):
        (w,) = types
        return dict(C_OUT=w.shape[0], C_IN=w.shape[1], flip=attrs["flip"], par=[("co", "C_OUT", w.shape[0])])

    def macs(self, attrs, types, out):
        (w,) = types
        return KERNEL_TRANSFORM_MULS * w.shape[0] * w.shape[1]


@register
class WinogradConv(Conv):
    """``conv`` by Winograd F(2×2, 3×3); inputs x, w, u = winograd_kernel(w), bias."""
    name = "winograd_conv"
    template = "winograd_conv"
    arity = (3, 5)
    inputs = ("x", "w", "u", "b")

    @staticmethod
    def _conv_inputs(items):
        """(x, w, u[, b][, r]) -> (x, w[, b][, r]): what ``conv`` takes."""
        return [items[0], items[1], *items[3:]]

    def normalize(self, attrs, types):
        if len(types) < 3:
            raise RuleError("takes x, w, u = winograd_kernel(w) and an optional bias")
        attrs = super().normalize(attrs, self._conv_inputs(types))
        why = winograd_rule(types[0], types[1], attrs)
        if why:
            raise RuleError(why)
        return attrs

    def infer(self, attrs, types):
        out = super().infer(attrs, self._conv_inputs(types))
        u, want = types[2], (4, 4) + tuple(types[1].shape[:2])
        same_dtype(types)
        if tuple(u.shape) != want:
            raise RuleError(f"u must be winograd_kernel(w), shape {want}, got {u.shape}")
        return out

    def reference(self, attrs, x, w, u, *rest):
        return super().reference(attrs, x, w, *rest)      # the meaning of conv; u is how C computes it

    def grad(self, attrs, xs, y, gy, needs):
        """conv's rule for x, w and the bias; none for u, which only
        restates w (its share of dL/dw is already in conv's dL/dw)."""
        gx, gw, *rest = Conv.grad(self, attrs, self._conv_inputs(xs), y, gy, self._conv_inputs(needs))
        return [gx, gw, None, *rest]

    def context(self, attrs, types, out):
        types = epilogue.split(attrs, types)[0]
        x, w = types[:2]
        bias = "none" if len(types) == 3 else ("tied" if len(types[3].shape) == 1 else "untied")
        (py, _), (px, _) = attrs["padding"]
        blk = blocking(out.shape[2], out.shape[3], w.shape[0])
        return dict(N=x.shape[0], C_IN=x.shape[1], C_OUT=w.shape[0], IN_Y=x.shape[2], IN_X=x.shape[3],
                    OUT_Y=out.shape[2], OUT_X=out.shape[3], P_Y=py, P_X=px, bias=bias,
                    par=[("n", "N", x.shape[0]), ("by", "BLOCKS_Y", blk["BLOCKS_Y"]), ("bx", "BLOCKS_X", blk["BLOCKS_X"])],
                    **blk)

    def workspace(self, attrs, types, out, target="c"):
        """One slice per work-item (image n, tile block): V for the block's
        tiles and every input channel (16 · C_in · TB) and M for one block
        of CB output channels (16 · CB · TB)."""
        ctx = self.context(attrs, types, out)
        per_item = 16 * ctx["TB"] * (ctx["C_IN"] + ctx["CB"])
        return ctx["N"] * ctx["BLOCKS_Y"] * ctx["BLOCKS_X"] * per_item

    def macs(self, attrs, types, out):
        """The 16 products per tile, output and input channel: N · tiles ·
        16 · C_out · C_in. The input (Bᵀ d B) and output (Aᵀ M A) transforms
        only add and subtract; the kernel transform's multiplications are
        counted by ``winograd_kernel``. (Direct conv: 36 per 2×2 tile.)"""
        x, w = types[:2]
        tiles = _ceil_div(out.shape[2], 2) * _ceil_div(out.shape[3], 2)
        return x.shape[0] * tiles * 16 * w.shape[0] * w.shape[1]


def winograd_reference(x: np.ndarray, u: np.ndarray, pads, out_sizes) -> np.ndarray:
    """The algorithm itself in numpy (float64), from U = winograd_kernel(w):
    for tests and for reading. Returns (N, C_out, *out_sizes), no bias."""
    (ply, phy), (plx, phx) = pads
    oy, ox = out_sizes
    ty, tx = _ceil_div(oy, 2), _ceil_div(ox, 2)
    n, c = x.shape[:2]
    xp = np.zeros((n, c, 2 * ty + 2, 2 * tx + 2))
    src = np.pad(x.astype(np.float64), [(0, 0), (0, 0), (ply, phy), (plx, phx)])[:, :, :2 * ty + 2, :2 * tx + 2]
    xp[:, :, :src.shape[2], :src.shape[3]] = src
    idx_y = 2 * np.arange(ty)[:, None] + np.arange(4)           # (ty, 4) rows of every tile
    idx_x = 2 * np.arange(tx)[:, None] + np.arange(4)
    d = xp[:, :, idx_y[:, :, None, None], idx_x[None, None, :, :]]   # (n, c, ty, 4, tx, 4)
    v = np.einsum("ik,ncakbl,jl->ijncab", BT_MATRIX, d, BT_MATRIX)      # (4, 4, n, c, ty, tx)
    m = np.einsum("ijoc,ijncab->ijnoab", u.astype(np.float64), v)       # the 16 products
    y = np.einsum("pi,ijnoab,qj->noapbq", AT_MATRIX, m, AT_MATRIX)      # (n, o, ty, 2, tx, 2)
    return y.reshape(n, u.shape[2], 2 * ty, 2 * tx)[:, :, :oy, :ox]


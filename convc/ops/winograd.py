"""Winograd convolution F(m×m, 3×3) for m = 2 and m = 4 (Lavin & Gray, "Fast
Algorithms for Convolutional Neural Networks", 2016): the same function as a
unit-stride, undilated, ungrouped 2D ``conv`` with a 3×3 kernel, computed with
T² = (m + 2)² multiplications per m×m output tile and input channel instead of
9 m²: F(2×2, 3×3) does 16 instead of 36 (2.25× fewer), F(4×4, 3×3) 36 instead
of 144 (4× fewer), at the price of bigger transforms and more float32 rounding.

For one input channel, an m×m output tile Y comes from the T×T input tile d
(stride m between tiles, zero outside the input) and the 3×3 kernel g as

    Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A

with the matrices of :data:`TRANSFORMS` (the attribute ``tile`` = m picks
one). F(2×2, 3×3) interpolates at the points 0, 1, -1 and ∞:

        Bᵀ = | 1  0 -1  0 |    G = |  1    0    0  |    Aᵀ = | 1  1  1  0 |
             | 0  1  1  0 |        | 1/2  1/2  1/2 |         | 0  1 -1 -1 |
             | 0 -1  1  0 |        | 1/2 -1/2  1/2 |
             | 0  1  0 -1 |        |  0    0    1  |

F(4×4, 3×3) at 0, 1, -1, 2, -2 and ∞ (6×6 input tiles, Bᵀ with entries up to
5, G with 1/6 and 1/24, Aᵀ with powers of two up to 8).

Summed over input channels, the T² elementwise products become T² matrix
products, one per transform coefficient ξ = (i, j):

    M[ξ] (C_out × tiles) = U[ξ] (C_out × C_in) · V[ξ] (C_in × tiles)

Two ops, both made by the ``conv_to_winograd`` pass (or :func:`winograd_conv`):

- ``winograd_kernel(w)`` → U, shape (T, T, C_out, C_in): the kernel transform
  G g Gᵀ of every (c_out, c_in) kernel. It is a node of its own because w is
  a param that training changes: U is recomputed once per run, not once per
  work-item of the convolution.
- ``winograd_conv(x, w, u[, b])``: the convolution. Its meaning (numpy
  reference, gradient) is ``conv(x, w, b)``; the generated code reads ``u``,
  which must be ``winograd_kernel(w)`` with the same ``flip`` and ``tile``
  (w itself is not read by the C code). A tied or untied bias and a fused
  activation are supported like in ``conv``; so is ``flip`` (handled by the
  kernel transform).

The transforms are straight-line code: :func:`transform_code` turns the rows
of the matrices into C expressions (their non-zero terms) that the templates
print.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..codegen.env import CTYPES, cfloat
from ..errors import RuleError
from ..ir import TensorType, Value
from . import epilogue
from .conv import Conv
from .registry import OPS, Op, as_value, float_dtype, register, rules, same_dtype


@dataclass(frozen=True)
class Transform:
    """The matrices of Winograd F(m×m, 3×3): ``g`` (T×3) for the kernel, ``bt``
    (T×T) for the input tile, ``at`` (m×T) for the output tile, T = m + 2."""
    tile: int
    points: str
    g: np.ndarray
    bt: np.ndarray
    at: np.ndarray

    @property
    def size(self) -> int:
        """T, the side of the input tile (and of U's first two axes)."""
        return self.tile + 2


TRANSFORMS = {
    2: Transform(2, "0, 1, -1, infinity",
                 g=np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]]),
                 bt=np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=float),
                 at=np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=float)),
    4: Transform(4, "0, 1, -1, 2, -2, infinity",
                 g=np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                             [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
                 bt=np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                              [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=float),
                 at=np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                              [0, 1, -1, 8, -8, 1]], dtype=float)),
}
"""The Winograd transforms by output tile size m (the ``tile`` attribute):
Lavin & Gray's choice of interpolation points for F(2×2, 3×3) and F(4×4, 3×3)."""

TILES = tuple(TRANSFORMS)


def combination(coefs, names, ctype: str = "float") -> tuple[str, int]:
    """The C expression Σ coefs[k] · names[k] over the non-zero coefficients
    and how many multiplications it does: ±1 multiplies nothing, a magnitude
    shared by every term is factored out (½ (g0 + g1 + g2) is one
    multiplication), ``ctype`` spells the literals.

    >>> combination([4, 0, -5, 0, 1], ["d0", "d1", "d2", "d3", "d4"])
    ('4.0f * d0 - 5.0f * d2 + d4', 2)
    """
    terms = [(float(c), n) for c, n in zip(coefs, names) if c != 0]
    if not terms:
        return cfloat(0.0, ctype), 0
    scale = terms[0][0]             # factored out when every term has its magnitude (and it is not 1)
    if len(terms) == 1 or abs(scale) == 1 or any(abs(c) != abs(scale) for c, _ in terms):
        scale = 1.0
    parts, muls = [], int(scale != 1)
    for c, n in terms:
        c /= scale
        muls += abs(c) != 1
        term = n if abs(c) == 1 else f"{cfloat(abs(c), ctype)} * {n}"
        parts.append(("-" if c < 0 else "") + term if not parts else (" - " if c < 0 else " + ") + term)
    text = "".join(parts)
    return (text if scale == 1 else f"{cfloat(scale, ctype)} * ({text})"), muls


def transform_code(tile: int, ctype: str = "float") -> dict:
    """The transforms of F(tile×tile, 3×3) as C expressions, one per row of
    the matrix, for the templates to print (T = tile + 2), each over the
    operands as the templates name them:

    - ``kernel_col``: row i of G g from a column g0, g1, g2 of g;
      ``kernel_row``: entry j of a row of (G g) Gᵀ from h0, h1, h2;
    - ``input_row``: entry j of row k of d B for tile t, from the input rows
      split by phase (tap q of tile t is ``ph[k][q % tile][t + q / tile]``);
      ``input_col``: row i of Bᵀ (d B) from ``db[k][j][t]``, k < T;
    - ``output_row``: entry a of row i of M A from ``mi[j * XS + t]``, j < T
      (coefficient xi = T i + j of tile t, coefficients XS apart);
      ``output_col``: row a' of Aᵀ (M A) from ``ma[i][a][t]``, i < T.

    Every operand is indexed by the tile t last, so each expression
    vectorises across the tiles of a block row.
    """
    tr = TRANSFORMS[tile]
    n = tr.size

    def rows(matrix, names):
        return [combination(r, names, ctype)[0] for r in matrix]

    phase = [f"ph[k][{q % tile}][t{f' + {q // tile}' if q // tile else ''}]" for q in range(n)]
    return dict(kernel_col=rows(tr.g, ["g0", "g1", "g2"]), kernel_row=rows(tr.g, ["h0", "h1", "h2"]),
                input_row=rows(tr.bt, phase), input_col=rows(tr.bt, [f"db[{k}][j][t]" for k in range(n)]),
                output_row=rows(tr.at, [f"mi[{j} * XS + t]" for j in range(n)]),
                output_col=rows(tr.at, [f"ma[{i}][a][t]" for i in range(n)]), TILE=tile, TIN=n)


def kernel_transform_muls(tile: int) -> int:
    """Multiplications of G g Gᵀ as the template computes it, per kernel: G's
    rows applied to the 3 columns of g, then to the T rows of G g."""
    tr = TRANSFORMS[tile]
    per_row = sum(combination(r, ["g0", "g1", "g2"])[1] for r in tr.g)
    return per_row * (3 + tr.size)


MICRO_TILE = 16
"""Tiles one register block of the products covers (one or two 512-bit
vectors); a block's tile count is rounded up to a multiple of it."""

MAX_BLOCK_TILES = 32
"""About how many tiles one work-item transforms and multiplies: V for the
block (T² · C_in · tiles elements) stays in the L2 cache."""

CO_BLOCK = 8
"""Output channels one register block of the products covers."""


def check_tile(tile) -> int:
    """``tile`` as an int, or a RuleError naming the choices."""
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or int(tile) not in TRANSFORMS:
        raise RuleError(f"tile must be one of {', '.join(map(str, TILES))} (F(m×m, 3×3) output tile), got {tile!r}")
    return int(tile)


def winograd_rule(x: TensorType, w: TensorType, attrs: dict) -> str | None:
    """Why a conv with (normalised) ``attrs`` on ``x`` and ``w`` is not a
    Winograd F(m×m, 3×3) case (for any tile m), or None if it is. The
    reason reads both as an op error and as conv_to_winograd's decline."""
    if len(x.shape) != 4:
        return f"input rank {len(x.shape)}; Winograd is 2D (input rank 4)"
    if tuple(w.shape[2:]) != (3, 3):
        return f"kernel {tuple(w.shape[2:])}; Winograd needs a 3×3 kernel"
    if tuple(attrs["stride"]) != (1, 1):
        return f"stride {tuple(attrs['stride'])}; Winograd needs stride 1"
    if tuple(attrs["dilation"]) != (1, 1):
        return f"dilation {tuple(attrs['dilation'])}; Winograd needs dilation 1"
    if attrs["groups"] != 1:
        return f"groups {attrs['groups']}; Winograd needs groups=1"
    return None


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def blocking(out_y: int, out_x: int, c_out: int, tile: int = 2) -> dict:
    """How the output tiles (tile × tile outputs each) are split into
    work-items: blocks of BY tile rows × BX tile columns (balanced, about
    MAX_BLOCK_TILES tiles), whose V slots are padded to TB, a multiple of
    MICRO_TILE; CB output channels at once."""
    tiles_y, tiles_x = _ceil_div(out_y, tile), _ceil_div(out_x, tile)
    bx = _ceil_div(tiles_x, _ceil_div(tiles_x, MAX_BLOCK_TILES))
    by = max(1, min(tiles_y, MAX_BLOCK_TILES // bx))
    by = _ceil_div(tiles_y, _ceil_div(tiles_y, by))
    tb = _ceil_div(bx * by, MICRO_TILE) * MICRO_TILE
    return dict(TILES_Y=tiles_y, TILES_X=tiles_x, BY=by, BX=bx, TB=tb, MT=MICRO_TILE,
                BLOCKS_Y=_ceil_div(tiles_y, by), BLOCKS_X=_ceil_div(tiles_x, bx), CB=min(CO_BLOCK, c_out))


def transform_ops(tile: int) -> tuple[int, int]:
    """Arithmetic operations (additions and multiplications, as
    :func:`combination` prints them) of the input transform Bᵀ d B of one
    tile and channel, and of the output transform Aᵀ M A of one tile and
    channel: d B and Bᵀ (d B) apply Bᵀ's rows T times each; M A applies Aᵀ's
    rows T times, Aᵀ (M A) m times."""
    tr = TRANSFORMS[tile]

    def ops(matrix):
        return sum(int(np.count_nonzero(r)) - 1 + combination(r, [f"x{k}" for k in range(len(r))])[1] for r in matrix)

    return 2 * tr.size * ops(tr.bt), (tr.size + tr.tile) * ops(tr.at)


def arithmetic(out_y: int, out_x: int, c_in: int, c_out: int, tile: int) -> int:
    """Arithmetic operations of one image of ``winograd_conv`` with ``tile``
    as the template runs it: the products (one multiply-add per coefficient,
    V slot and channel pair, with the padding of the register tiles: TB slots
    per block, output channels in blocks of CB: T² · TB · blocks · C_in ·
    ⌈C_out / CB⌉ · CB) plus the input transforms of every tile of the blocks
    and input channel and the output transforms of every tile and output
    channel. The kernel transform is left out (weights: folded at compile
    time, or once per run)."""
    b = blocking(out_y, out_x, c_out, tile)
    blocks = b["BLOCKS_Y"] * b["BLOCKS_X"]
    t_in, t_out = transform_ops(tile)
    products = (tile + 2) ** 2 * b["TB"] * blocks * c_in * _ceil_div(c_out, b["CB"]) * b["CB"]
    return products + b["BY"] * b["BX"] * blocks * c_in * t_in + b["TILES_Y"] * b["TILES_X"] * c_out * t_out


# -- the builder ----------------------------------------------------------------
def winograd_conv(x: Value, w, bias=None, stride=1, padding=0, dilation=1, groups=1, flip=False,
                  name=None, tile=2) -> Value:
    """``conv(x, w, bias, ...)`` computed by Winograd F(tile×tile, 3×3), tile 2
    (16 products per 2×2 output tile) or 4 (36 per 4×4 tile): adds a
    ``winograd_kernel`` node (U from w) and the ``winograd_conv`` node. Only
    2D, 3×3, stride 1, dilation 1, groups 1 (any padding, flip, bias);
    anything else is a ValidationError naming the rule.

    >>> y = winograd_conv(x, w, padding=1, tile=4)        # doctest: +SKIP
    """
    w = as_value(x, w, "winograd_conv weight")
    b = [as_value(x, bias, "winograd_conv bias")] if bias is not None else []
    attrs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, flip=flip, tile=tile)
    g = x.graph
    with rules("winograd_conv", name, x=x, w=w, **({"b": b[0]} if b else {})):    # before adding any node
        if len(w.shape) < 2:
            raise RuleError(f"weight must be (C_out, C_in, 3, 3), got {w.shape}")
        n = check_tile(tile) + 2
        types = [x.type, w.type, TensorType((n, n) + tuple(w.shape[:2]), w.dtype)] + [v.type for v in b]
        op = OPS["winograd_conv"]
        op.infer(op.normalize(dict(attrs), types), types)
    u = g.add("winograd_kernel", [w], dict(flip=flip, tile=tile), None if name is None else f"{name}.kernel")
    return g.add("winograd_conv", [x, w, u, *b], attrs, name)


# -- the ops --------------------------------------------------------------------
@register
class WinogradKernel(Op):
    """U[i, j, co, ci] = (G g Gᵀ)[i, j] for g = w[co, ci] (flipped if ``flip``),
    with the G of F(tile×tile, 3×3); U is (T, T, C_out, C_in), T = tile + 2."""
    name = "winograd_kernel"
    inputs = ("w",)

    def normalize(self, attrs, types):
        flip = attrs.get("flip", False)
        if not isinstance(flip, (bool, np.bool_)):
            raise RuleError(f"flip must be True or False, got {flip!r}")
        return dict(flip=bool(flip), tile=check_tile(attrs.get("tile", 2)))

    def infer(self, attrs, types):
        (w,) = types
        float_dtype(w, "weight")
        if len(w.shape) != 4 or tuple(w.shape[2:]) != (3, 3):
            raise RuleError(f"weight must be (C_out, C_in, 3, 3), got {w.shape}")
        n = attrs["tile"] + 2
        return TensorType((n, n) + tuple(w.shape[:2]), w.dtype)

    def reference(self, attrs, w):
        if attrs["flip"]:
            w = w[:, :, ::-1, ::-1]
        g = TRANSFORMS[attrs["tile"]].g
        # G w G^T of every (o, c) kernel as one matmul: u[(i, j)] = sum over (k, l) of
        # (G kron G)[(i, j), (k, l)] w[o, c, k, l], already in the (T, T, C_out, C_in) layout
        o, c, r, _ = w.shape
        u = np.kron(g, g) @ w.reshape(o * c, r * r).T.astype(np.float64)
        return u.reshape(g.shape[0], g.shape[0], o, c).astype(w.dtype)

    def context(self, attrs, types, out):
        (w,) = types
        code = transform_code(attrs["tile"], CTYPES[w.dtype])
        return dict(C_OUT=w.shape[0], C_IN=w.shape[1], flip=attrs["flip"], par=[("co", "C_OUT", w.shape[0])],
                    points=TRANSFORMS[attrs["tile"]].points, G_rows=_matrix_text(TRANSFORMS[attrs["tile"]].g),
                    **code)

    def macs(self, attrs, types, out):
        (w,) = types
        return kernel_transform_muls(attrs["tile"]) * w.shape[0] * w.shape[1]


def _matrix_text(a: np.ndarray) -> list[str]:
    """The rows of a small transform matrix as text for a C comment
    (fractions as 1/6, not 0.1666...)."""
    from fractions import Fraction

    cells = [[str(Fraction(float(v)).limit_denominator(64)) for v in row] for row in a]
    width = max(len(c) for row in cells for c in row)
    return ["| " + " ".join(c.rjust(width) for c in row) + " |" for row in cells]


@register
class WinogradConv(Conv):
    """``conv`` by Winograd F(tile×tile, 3×3); inputs x, w, u = winograd_kernel(w), bias."""
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
        attrs = super().normalize(dict(attrs, tile=check_tile(attrs.get("tile", 2))), self._conv_inputs(types))
        why = winograd_rule(types[0], types[1], attrs)
        if why:
            raise RuleError(why)
        return attrs

    def infer(self, attrs, types):
        out = super().infer(attrs, self._conv_inputs(types))
        n = attrs["tile"] + 2
        u, want = types[2], (n, n) + tuple(types[1].shape[:2])
        same_dtype(types)
        if tuple(u.shape) != want:
            raise RuleError(f"u must be winograd_kernel(w) with tile={attrs['tile']}, shape {want}, got {u.shape}")
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
        tile = attrs["tile"]
        bias = "none" if len(types) == 3 else ("tied" if len(types[3].shape) == 1 else "untied")
        (py, _), (px, _) = attrs["padding"]
        blk = blocking(out.shape[2], out.shape[3], w.shape[0], tile)
        tr = TRANSFORMS[tile]
        return dict(N=x.shape[0], C_IN=x.shape[1], C_OUT=w.shape[0], IN_Y=x.shape[2], IN_X=x.shape[3],
                    OUT_Y=out.shape[2], OUT_X=out.shape[3], P_Y=py, P_X=px, bias=bias,
                    par=[("n", "N", x.shape[0]), ("by", "BLOCKS_Y", blk["BLOCKS_Y"]), ("bx", "BLOCKS_X", blk["BLOCKS_X"])],
                    points=tr.points, BT_rows=_matrix_text(tr.bt), AT_rows=_matrix_text(tr.at),
                    **transform_code(tile, CTYPES[x.dtype]), **blk)

    def workspace(self, attrs, types, out, target="c"):
        """One slice per work-item (image n, tile block): V for the block's
        tiles and every input channel (T² · C_in · TB) and M for one block
        of CB output channels (T² · CB · TB), T = tile + 2."""
        ctx = self.context(attrs, types, out)
        per_item = ctx["TIN"] ** 2 * ctx["TB"] * (ctx["C_IN"] + ctx["CB"])
        return ctx["N"] * ctx["BLOCKS_Y"] * ctx["BLOCKS_X"] * per_item

    def macs(self, attrs, types, out):
        """The T² products per tile, output and input channel: N · tiles ·
        T² · C_out · C_in (T = tile + 2: 16 per 2×2 tile, 36 per 4×4 tile).
        The input (Bᵀ d B) and output (Aᵀ M A) transforms only add, subtract
        and scale by small constants; the kernel transform's multiplications
        are counted by ``winograd_kernel``. (Direct conv: 9 · tile² per tile.)"""
        x, w = types[:2]
        m = attrs["tile"]
        tiles = _ceil_div(out.shape[2], m) * _ceil_div(out.shape[3], m)
        return x.shape[0] * tiles * (m + 2) ** 2 * w.shape[0] * w.shape[1]


def winograd_reference(x: np.ndarray, u: np.ndarray, pads, out_sizes, tile: int | None = None) -> np.ndarray:
    """The algorithm itself in numpy (float64), from U = winograd_kernel(w)
    (its shape says the tile unless ``tile`` is given): for tests and for
    reading. Returns (N, C_out, *out_sizes), no bias."""
    n_in = u.shape[0]
    tr = TRANSFORMS[tile if tile is not None else n_in - 2]
    m = tr.tile
    if u.shape[:2] != (tr.size, tr.size):
        raise ValueError(f"u of shape {u.shape} is not the U of F({m}×{m}, 3×3)")
    (ply, phy), (plx, phx) = pads
    oy, ox = out_sizes
    ty, tx = _ceil_div(oy, m), _ceil_div(ox, m)
    n, c = x.shape[:2]
    xp = np.zeros((n, c, m * ty + 2, m * tx + 2))
    src = np.pad(x.astype(np.float64), [(0, 0), (0, 0), (ply, phy), (plx, phx)])[:, :, :m * ty + 2, :m * tx + 2]
    xp[:, :, :src.shape[2], :src.shape[3]] = src
    idx_y = m * np.arange(ty)[:, None] + np.arange(tr.size)        # (ty, T) rows of every tile
    idx_x = m * np.arange(tx)[:, None] + np.arange(tr.size)
    d = xp[:, :, idx_y[:, :, None, None], idx_x[None, None, :, :]]   # (n, c, ty, T, tx, T)
    v = np.einsum("ik,ncakbl,jl->ijncab", tr.bt, d, tr.bt)            # (T, T, n, c, ty, tx)
    mm = np.einsum("ijoc,ijncab->ijnoab", u.astype(np.float64), v)    # the T² products
    y = np.einsum("pi,ijnoab,qj->noapbq", tr.at, mm, tr.at)           # (n, o, ty, m, tx, m)
    return y.reshape(n, u.shape[2], m * ty, m * tx)[:, :, :oy, :ox]

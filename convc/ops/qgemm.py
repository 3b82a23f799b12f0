"""The int8 GEMM that a quantized 2D convolution (``qconv``) lowers to
(pass ``qconv_to_gemm``, convc/passes/qgemm.py): four ops whose numpy
references compute the same integers as ``qconv``'s, bit for bit.

- ``qgemm_columns``: im2col into the layout of the dot-product instructions.
  Column matrix row k (tap c, ky, kx), position p is stored at
  ``cols[n, k // 4, p, k % 4]``: four consecutive taps of one position are
  four adjacent bytes, the operand of one u8 x s8 -> s32 four-way dot product
  (AVX-512 VNNI ``vpdpbusd``), and a vector of them covers consecutive
  positions. Values are unsigned: an int8 input is shifted by ``OFFSET`` =
  128 (uint8: 0), a padded tap holds the shifted input zero point (it then
  adds nothing once the bias correction below is applied); rows past K and
  positions past P (up to a multiple of the register tile) are filled alike.
- ``qgemm_weights``: the int8 weights as a zero-padded (MP, KP) matrix, rows
  a multiple of the register tile, KP a multiple of 4 (folded at compile time
  by ``fold_params``).
- ``qgemm_bias``: the int64 per-channel constant that turns the unsigned
  product into the signed one: with ``u = x + OFFSET``,
  ``sum (x - x_zp) * w = sum u * w - (x_zp + OFFSET) * sum_k w``, so
  ``bias' = bias - (x_zp + OFFSET) * sum_k w[c, k]`` (also folded).
- ``qgemm``: ``acc = sum_k cols * w`` in int32, then
  ``saturate_int32(acc + bias')`` (int64 sum: exactly ``qconv``'s saturated
  ``sum + bias``), requantized per channel (:func:`convc.quant.requantize`),
  plus the output zero point, clamped.

Exactness: u is in [0, 255] and w in [-128, 127], so every partial sum of
``u * w`` over a subset of the K taps lies in [-255 * 128 * K, 255 * 128 * K];
:func:`acc_fits` (checked by ``qgemm``'s inference and by the pass) keeps that
inside int32, so neither the C accumulation nor ``vpdpbusd`` (which wraps,
never saturates) can overflow, whatever order the taps are summed in. The
kernel never uses ``vpmaddubsw``, whose int16 pair sums saturate.

The kernel (``kernel`` attribute, chosen by the pass): "vnni512" (AVX-512
VNNI intrinsics), "vnni256" (AVX-VNNI) or "portable" (plain C the compiler
vectorises). The intrinsics are guarded by the compiler's own macros, with the
portable code in the ``#else``, so the same source builds anywhere (the
embedded export, ARM); OpenCL always gets the portable code.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import shapes
from ..errors import RuleError
from ..host import Host, probe
from ..ir import TensorType
from ..quant import QDTYPES, qrange, requantize, saturate_int32
from .columns import Im2col
from .registry import Op, register
from .window import axes_context

KERNELS = ("vnni512", "vnni256", "portable")
"""The inner kernels of ``qgemm``: the dot-product instructions it uses."""

KERNEL_LANES = {"vnni512": 16, "vnni256": 8}
"""int32 lanes of one accumulator vector of each intrinsics kernel."""

TILE_VECTORS = 2
"""Accumulator vectors per row of the register tile (NR = 2 x lanes), as in
the float GEMM's tile (``tuning.GEMM_NV``)."""

ACC_LIMIT = 2**31 - 1


def offset(dtype: str) -> int:
    """What makes an activation unsigned for the u8 x s8 dot product: 128
    for int8, 0 for uint8."""
    return 128 if dtype == "int8" else 0


def acc_fits(k: int) -> bool:
    """Whether K taps of u8 x s8 products cannot leave int32 in any partial sum."""
    return k * 255 * 128 <= ACC_LIMIT


def tile(kernel: str, host: Host | None = None) -> tuple[int, int]:
    """(MR, NR) of ``kernel``'s register tile on ``host``: NR = 2 vectors of
    int32 lanes (the vector width the compiler targets for "portable"), MR
    the most rows whose accumulators fit the vector registers, as the float
    GEMM derives it (:func:`convc.tuning.default_tile_rows`)."""
    from ..tuning import default_tile_rows

    host = host or probe()
    lanes = KERNEL_LANES.get(kernel, host.lanes("int32"))
    if kernel == "vnni256":          # AVX-VNNI's VEX encoding reaches ymm0-15 only
        host = dataclasses.replace(host, vector_registers=min(16, host.vector_registers))
    return default_tile_rows(host), TILE_VECTORS * lanes


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


WORK_ITEMS_PER_CORE = 4
"""As the float GEMM (``tuning.WORK_ITEMS_PER_CORE``): blocks per core a
product is split into at least, when it is big enough."""


def blocks(mp: int, kp: int, pp: int, mr: int, nr: int, batch: int, host: Host | None = None) -> tuple[int, int]:
    """(MC, NC): rows and columns of one block of work (one thread or
    work-item each), from the probed caches. Inside a block the kernel keeps
    one MR x KP weight panel in L1 while it walks the block's columns, whose
    KP x NC column block stays in L2 (half of it); blocks are then halved
    until the batch gives every core ``WORK_ITEMS_PER_CORE`` of them."""
    host = host or probe()
    nc = min(pp, max(nr, host.l2 // 2 // max(kp, 1) // nr * nr))
    mc = min(mp, max(mr, host.l2 // 4 // max(kp, 1) // mr * mr))

    def items():
        return batch * -(-mp // mc) * -(-pp // nc)
    while items() < WORK_ITEMS_PER_CORE * host.cores and (nc > nr or mc > mr):
        if nc > nr and (nc / nr >= mc / mr or mc <= mr):
            nc = max(nr, nc // 2 // nr * nr)
        else:
            mc = max(mr, mc // 2 // mr * mr)
    return mc, nc


def _check_qdtype(t: TensorType, what: str):
    if t.dtype not in QDTYPES:
        raise RuleError(f"{what} must be int8 or uint8, got {t.dtype}")


def _int(v, what: str, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < lo:
        raise RuleError(f"{what} must be an integer >= {lo}, got {v!r}")
    return int(v)


# -- qgemm_columns -----------------------------------------------------------
@register
class QGemmColumns(Op):
    """x (N, C, H, W) int8/uint8 -> (N, ceil(K/4), PP, 4) uint8, K = C * kh
    * kw, PP = ``positions`` (>= OH * OW): the unsigned im2col in the
    dot-product layout (module docstring)."""
    name = "qgemm_columns"

    def normalize(self, attrs, types):
        x = types[0]
        _check_qdtype(x, "qgemm_columns' input")
        if len(x.shape) != 4:
            raise RuleError(f"input must be (N, C, H, W), got {x.shape}")
        geo = Im2col().normalize(dict(kernel_size=attrs["kernel_size"], stride=attrs.get("stride", 1),
                                      padding=attrs.get("padding", 0), dilation=attrs.get("dilation", 1),
                                      flip=False), types)
        lo, hi = qrange(x.dtype)
        zp = attrs["x_zero_point"]
        if isinstance(zp, bool) or not isinstance(zp, (int, np.integer)) or not lo <= zp <= hi:
            raise RuleError(f"x_zero_point must be an integer in [{lo}, {hi}], got {zp!r}")
        return dict(kernel_size=geo["kernel_size"], stride=geo["stride"], padding=geo["padding"],
                    dilation=geo["dilation"], x_zero_point=int(zp), positions=_int(attrs["positions"], "positions"))

    def _out(self, attrs, x: TensorType):
        return shapes.window_out_sizes(x.shape[2:], attrs["kernel_size"], attrs["stride"], attrs["dilation"],
                                       attrs["padding"])

    def infer(self, attrs, types):
        x = types[0]
        _check_qdtype(x, "qgemm_columns' input")
        out = self._out(attrs, x)
        p = shapes.prod(out)
        if attrs["positions"] < p:
            raise RuleError(f"positions {attrs['positions']} < the {p} output positions")
        k = x.shape[1] * shapes.prod(attrs["kernel_size"])
        return TensorType((x.shape[0], -(-k // 4), attrs["positions"], 4), "uint8")

    def reference(self, attrs, x):
        off, zp = offset(str(x.dtype)), attrs["x_zero_point"]
        cols = Im2col().reference(dict(attrs, flip=False), x.astype(np.int32) - zp)   # (N, C, kh, kw, OH, OW)
        n, k, p = x.shape[0], x.shape[1] * shapes.prod(attrs["kernel_size"]), shapes.prod(cols.shape[4:])
        k4 = -(-k // 4)
        full = np.zeros((n, k4 * 4, attrs["positions"]), np.int32)            # every filler is x's zero point
        full[:, :k, :p] = cols.reshape(n, k, p)
        u = full + zp + off                                                     # shifted to [0, 255]
        return u.reshape(n, k4, 4, attrs["positions"]).transpose(0, 1, 3, 2).astype(np.uint8)

    def context(self, attrs, types, out):
        x = types[0]
        sizes = self._out(attrs, x)
        k = x.shape[1] * shapes.prod(attrs["kernel_size"])
        return dict(N=x.shape[0], C=x.shape[1], K=k, K4=out.shape[1], PP=attrs["positions"],
                    OFFSET=offset(x.dtype), FILL=attrs["x_zero_point"] + offset(x.dtype),
                    par=[("n", "N", x.shape[0]), ("k4", "K4", out.shape[1])],
                    axes=axes_context(x.shape[2:], sizes, attrs["kernel_size"], attrs["stride"],
                                      attrs["dilation"], attrs["padding"]))


# -- qgemm_weights / qgemm_bias (weight-only: folded at compile time) -------
@register
class QGemmWeights(Op):
    """w (M, C, *k) int8 -> (``rows``, ``depth``) int8: w as an M x K matrix,
    zero-padded to rows >= M and depth >= K, depth a multiple of 4."""
    name = "qgemm_weights"

    def normalize(self, attrs, types):
        return dict(rows=_int(attrs["rows"], "rows"), depth=_int(attrs["depth"], "depth"))

    def infer(self, attrs, types):
        w = types[0]
        if w.dtype != "int8" or len(w.shape) < 2:
            raise RuleError(f"weights must be int8 (C_out, C_in, *k), got {w}")
        k = shapes.prod(w.shape[1:])
        if attrs["rows"] < w.shape[0] or attrs["depth"] < k or attrs["depth"] % 4:
            raise RuleError(f"rows {attrs['rows']} x depth {attrs['depth']} must hold the {w.shape[0]} x {k} "
                            f"weight matrix, depth a multiple of 4")
        return TensorType((attrs["rows"], attrs["depth"]), "int8")

    def reference(self, attrs, w):
        out = np.zeros((attrs["rows"], attrs["depth"]), np.int8)
        out[:w.shape[0], :shapes.prod(w.shape[1:])] = w.reshape(w.shape[0], -1)
        return out

    def context(self, attrs, types, out):
        w = types[0]
        return dict(M=w.shape[0], K=shapes.prod(w.shape[1:]), MP=attrs["rows"], KP=attrs["depth"],
                    par=[("m", "MP", attrs["rows"])])


@register
class QGemmBias(Op):
    """(w (M, C, *k) int8, optional bias (M,) int32) -> (M,) int64:
    ``bias - offset * sum_k w[m, k]`` (``offset`` = x_zero_point + OFFSET)."""
    name = "qgemm_bias"
    arity = (1, 2)
    inputs = ("w", "b")

    def normalize(self, attrs, types):
        return dict(offset=_int(attrs["offset"], "offset", lo=-128))

    def infer(self, attrs, types):
        w = types[0]
        if w.dtype != "int8" or len(w.shape) < 2:
            raise RuleError(f"weights must be int8 (C_out, C_in, *k), got {w}")
        if len(types) == 2 and (types[1].dtype != "int32" or types[1].shape != (w.shape[0],)):
            raise RuleError(f"bias must be int32 ({w.shape[0]},), got {types[1]}")
        return TensorType((w.shape[0],), "int64")

    def reference(self, attrs, w, b=None):
        s = w.reshape(w.shape[0], -1).astype(np.int64).sum(axis=1)
        base = np.zeros(w.shape[0], np.int64) if b is None else b.astype(np.int64)
        return base - attrs["offset"] * s

    def context(self, attrs, types, out):
        w = types[0]
        return dict(M=w.shape[0], K=shapes.prod(w.shape[1:]), OFF=attrs["offset"], bias=len(types) == 2,
                    par=[("m", "M", w.shape[0])])


# -- qgemm -------------------------------------------------------------------
@register
class QGemm(Op):
    """(cols (N, K4, PP, 4) uint8, w (MP, 4*K4) int8, bias (M,) int64) ->
    (N, M, *spatial) int8/uint8: the requantized product of the first M rows
    of w and the first P = prod(spatial) columns (module docstring), written
    as the conv's output. Attributes: ``channels`` M, ``spatial`` (the
    output's spatial sizes), ``multiplier``/``shift`` (one per channel, from
    qconv), ``y_zero_point``, ``dtype``, ``clamp``, ``kernel``
    (:data:`KERNELS`) and its register tile ``mr`` x ``nr``."""
    name = "qgemm"
    arity = (3, 3)
    inputs = ("cols", "w", "bias")

    def normalize(self, attrs, types):
        dtype = attrs["dtype"]
        if dtype not in QDTYPES:
            raise RuleError(f"dtype must be one of {QDTYPES}, got {dtype!r}")
        lo, hi = qrange(dtype)
        m = _int(attrs["channels"], "channels")
        mult, shift = tuple(int(v) for v in attrs["multiplier"]), tuple(int(v) for v in attrs["shift"])
        if len(mult) != m or len(shift) != m:
            raise RuleError(f"multiplier and shift need one entry per channel ({m}), got {len(mult)} and "
                            f"{len(shift)}")
        c_lo, c_hi = attrs["clamp"]
        yz = attrs["y_zero_point"]
        if not lo <= int(yz) <= hi or not lo <= int(c_lo) <= int(c_hi) <= hi:
            raise RuleError(f"y_zero_point {yz} and clamp {attrs['clamp']} must lie in [{lo}, {hi}] ({dtype})")
        if attrs["kernel"] not in KERNELS:
            raise RuleError(f"kernel must be one of {KERNELS}, got {attrs['kernel']!r}")
        spatial = tuple(_int(v, "spatial sizes") for v in attrs["spatial"])
        return dict(channels=m, spatial=spatial, multiplier=mult, shift=shift,
                    y_zero_point=int(yz), dtype=dtype, clamp=(int(c_lo), int(c_hi)), kernel=attrs["kernel"],
                    mr=_int(attrs["mr"], "mr"), nr=_int(attrs["nr"], "nr"))

    def infer(self, attrs, types):
        cols, w, b = types
        if cols.dtype != "uint8" or len(cols.shape) != 4 or cols.shape[3] != 4:
            raise RuleError(f"cols must be uint8 (N, K/4, positions, 4), got {cols}")
        n, k4, pp, _ = cols.shape
        m, p, mr, nr = attrs["channels"], shapes.prod(attrs["spatial"]), attrs["mr"], attrs["nr"]
        if w.dtype != "int8" or len(w.shape) != 2 or w.shape[1] != 4 * k4 or w.shape[0] < m or w.shape[0] % mr:
            raise RuleError(f"w must be int8 (rows, {4 * k4}) with rows >= {m} a multiple of mr={mr}, got {w}")
        if pp < p or pp % nr:
            raise RuleError(f"cols hold {pp} positions: need >= {p}, a multiple of nr={nr}")
        if b.dtype != "int64" or b.shape != (m,):
            raise RuleError(f"bias must be int64 ({m},), got {b}")
        if not acc_fits(4 * k4):
            raise RuleError(f"{4 * k4} products per output could overflow the int32 accumulator "
                            f"({4 * k4} * 255 * 128 > 2**31 - 1)")
        return TensorType((n, m) + attrs["spatial"], attrs["dtype"])

    def reference(self, attrs, cols, w, b):
        n, k4, pp, _ = cols.shape
        m, p = attrs["channels"], shapes.prod(attrs["spatial"])
        cm = cols.transpose(0, 1, 3, 2).reshape(n, 4 * k4, pp)[:, :, :p].astype(np.int64)
        acc = np.einsum("mk,nkp->nmp", w[:m].astype(np.int64), cm)
        acc = saturate_int32(acc + b.reshape(1, m, 1))
        y = requantize(acc, np.asarray(attrs["multiplier"]).reshape(1, m, 1),
                       np.asarray(attrs["shift"]).reshape(1, m, 1)) + attrs["y_zero_point"]
        return np.clip(y, *attrs["clamp"]).astype(attrs["dtype"]).reshape((n, m) + attrs["spatial"])

    def context(self, attrs, types, out):
        cols, w, _ = types
        n, k4, pp, _ = cols.shape
        mp, mr, nr = w.shape[0], attrs["mr"], attrs["nr"]
        mc, nc = blocks(mp, 4 * k4, pp, mr, nr, n)
        lo, hi = attrs["clamp"]
        kernel = attrs["kernel"]
        return dict(N=n, M=attrs["channels"], MP=mp, P=shapes.prod(attrs["spatial"]), PP=pp, K4=k4, KP=4 * k4, MR=mr, NR=nr,
                    NV=TILE_VECTORS, LANES=nr // TILE_VECTORS, MC=mc, NC=nc, M_BLOCKS=-(-mp // mc),
                    N_BLOCKS=-(-pp // nc), YZP=attrs["y_zero_point"], LO=lo, HI=hi, kernel=kernel,
                    mult=list(attrs["multiplier"]), shift=list(attrs["shift"]),
                    par=[("n", "N", n), ("mb", "M_BLOCKS", -(-mp // mc)), ("nb", "N_BLOCKS", -(-pp // nc))])

    def macs(self, attrs, types, out):
        return out.size * types[1].shape[1]

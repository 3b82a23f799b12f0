"""The int8 GEMM that a quantized 2D convolution (``qconv``) lowers to
(pass ``qconv_to_gemm``, convc/passes/qgemm.py): four ops whose numpy
references compute the same integers as ``qconv``'s, bit for bit.

The GEMM reads its unsigned operand ``cols`` (N, L, 4) in groups of 4 taps:
group k4 of column p is the 4 bytes ``cols[n, offsets[k4] + p]``, four taps
of one output pixel side by side, the operand of one u8 x s8 -> s32
four-way dot product (AVX-512 VNNI ``vpdpbusd``), and a vector of them
covers consecutive columns. Values are unsigned: an int8 input is shifted by
``OFFSET`` = 128 (uint8: 0), and a tap in the padding holds the shifted input
zero point (it then adds nothing once the bias correction below is applied).

- ``qgemm_planes`` makes ``cols`` without an im2col copy (an implicit GEMM):
  the zero-point-padded image once, channels in groups of 4 (the 4 bytes of
  pixel q of group c4 are channels 4*c4 .. 4*c4+3), split into its stride
  phases (those some tap reads), each phase one plane of ``plane`` pixels H2
  x W2 (the padded sizes over the stride). Output (oy, ox) is column p = oy * W2 + ox; its tap (ky,
  kx) is pixel p + (ky*D // S) * W2 + (kx*D // S) of phase (ky*D % S, kx*D %
  S), so group (ky, kx, c4) is a plane read from a fixed offset. Columns with
  ox >= the output width are computed and dropped.
- ``qgemm_weights``: the int8 weights as a zero-padded (MP, KP) matrix, rows
  a multiple of the register tile, the taps in the order of the groups (ky,
  kx, c with the channels padded to a multiple of 4), folded at compile time
  by ``fold_params``.
- ``qgemm_bias``: the int64 per-channel constant that turns the unsigned
  product into the signed one: with ``u = x + OFFSET``,
  ``sum (x - x_zp) * w = sum u * w - (x_zp + OFFSET) * sum_k w``, so
  ``bias' = bias - (x_zp + OFFSET) * sum_k w[c, k]`` (also folded).
- ``qgemm``: ``acc = sum_k cols * w`` in int32 (``offsets`` and the row
  ``width`` of its columns are attributes), then
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
VNNI ``vpdpbusd`` and an AVX-512 requantization epilogue), "vnni256"
(AVX-VNNI) or "portable" (plain C the compiler vectorises). The x86 code is
guarded by the compiler's own macros, with the portable code in the
``#else``, so the same source builds anywhere (the embedded export, ARM);
OpenCL always gets the portable code. The AVX-512 epilogue repeats
``convc_requant``'s steps on vectors (tests check it bit for bit, with
saturating biases, left shifts and ties).
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
from .quantized import ACC_LIMIT
from .registry import Op, register

KERNELS = ("vnni512", "vnni256", "portable")
"""The inner kernels of ``qgemm``: the dot-product instructions it uses."""

KERNEL_LANES = {"vnni512": 16, "vnni256": 8}
"""int32 lanes of one accumulator vector of each intrinsics kernel."""

TILE_VECTORS = 2
"""Accumulator vectors per row of the register tile (NR = 2 x lanes), as in
the float GEMM's tile (``tuning.GEMM_NV``)."""

def offset(dtype: str) -> int:
    """What makes an activation unsigned for the u8 x s8 dot product: 128
    for int8, 0 for uint8."""
    return 128 if dtype == "int8" else 0


def acc_fits(k: int) -> bool:
    """Whether K taps of u8 x s8 products cannot leave int32 in any partial sum."""
    return k * 255 * 128 <= ACC_LIMIT


def tile(kernel: str, host: Host | None = None, rows: int | None = None) -> tuple[int, int]:
    """(MR, NR) of ``kernel``'s register tile on ``host``: NR = 2 vectors of
    int32 lanes (the vector width the compiler targets for "portable"), MR
    at most the rows whose accumulators fit the vector registers, as the
    float GEMM derives it (:func:`convc.tuning.default_tile_rows`). For a
    product of ``rows`` rows, MR is the one of the upper half of that range
    that pads ``rows`` least (the largest on a tie): 64 rows take 8 x 8, not
    5 x 14 with 6 rows of padding."""
    from ..tuning import default_tile_rows

    host = host or probe()
    lanes = KERNEL_LANES.get(kernel, host.lanes("int32"))
    if kernel == "vnni256":          # AVX-VNNI's VEX encoding reaches ymm0-15 only
        host = dataclasses.replace(host, vector_registers=min(16, host.vector_registers))
    most = default_tile_rows(host)
    mr = most if rows is None else min(range(max(2, most // 2), most + 1), key=lambda r: (-(-rows // r) * r, -r))
    return mr, TILE_VECTORS * lanes


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


# -- the unsigned operand ---------------------------------------------------
def _geometry(attrs, types, what: str) -> dict:
    x = types[0]
    _check_qdtype(x, f"{what}'s input")
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
                dilation=geo["dilation"], x_zero_point=int(zp))


def _out_sizes(attrs, x: TensorType):
    return shapes.window_out_sizes(x.shape[2:], attrs["kernel_size"], attrs["stride"], attrs["dilation"],
                                   attrs["padding"])


def phases(attrs) -> tuple:
    """The stride phases (py, px) some kernel tap reads: (ky*D % S, kx*D %
    S) over the taps; all S_Y x S_X of them for a 3x3 stride-2 window, only
    (0, 0) for a 1x1 one (``qgemm_planes`` writes no others)."""
    (kh, kw), (sy, sx), (dy, dx) = attrs["kernel_size"], attrs["stride"], attrs["dilation"]
    return tuple(sorted({(ky * dy % sy, kx * dx % sx) for ky in range(kh) for kx in range(kw)}))


def planes_layout(attrs, x: TensorType, nr: int) -> dict:
    """The geometry of ``qgemm_planes`` for a window on x: each stride
    phase (py, px) of the padded image is a plane of H2 x W2 pixels (H2, W2 =
    the padded sizes over the stride, rounded up); output (oy, ox) is column
    p = oy * W2 + ox, and its tap (ky, kx) is pixel p + (ky*D // S) * W2 +
    (kx*D // S) of phase (ky*D % S, kx*D % S). Returns the planes' width W2,
    the GEMM's columns (output rows x W2, rounded up to ``nr``), the plane
    length that keeps every tap of every column inside, and each group's
    offset, in the order (ky, kx, c4)."""
    (pt, pb), (pl, pr) = attrs["padding"]
    (kh, kw), (sy, sx), (dy, dx) = attrs["kernel_size"], attrs["stride"], attrs["dilation"]
    h2, w2 = -(-(x.shape[2] + pt + pb) // sy), -(-(x.shape[3] + pl + pr) // sx)
    oh, ow = _out_sizes(attrs, x)
    cols = -(-oh * w2 // nr) * nr
    plane = max((kh - 1) * dy // sy * w2 + (kw - 1) * dx // sx + cols, h2 * w2)
    c4, used = -(-x.shape[1] // 4), phases(attrs)
    offsets = tuple((c * len(used) + used.index((ky * dy % sy, kx * dx % sx))) * plane + ky * dy // sy * w2
                    + kx * dx // sx for ky in range(kh) for kx in range(kw) for c in range(c4))
    return dict(W=w2, OH=oh, OW=ow, columns=cols, plane=plane, C4=c4, offsets=offsets)


@register
class QGemmPlanes(Op):
    """x (N, C, H, W) int8/uint8 -> (N, ceil(C/4) * F * ``plane``, 4)
    uint8: the unsigned, zero-point-padded image, channels in groups of 4,
    split into the F stride phases the taps read (:func:`phases`; module
    docstring): channel 4*c4 + t of padded pixel (py + SY * r, px + SX * q)
    of phase f = (py, px) is at ``[(c4 * F + f) * plane + r * W2 + q][t]``;
    ``plane`` >= H2 x W2."""
    name = "qgemm_planes"

    def normalize(self, attrs, types):
        return dict(_geometry(attrs, types, "qgemm_planes"), plane=_int(attrs["plane"], "plane"))

    def _phase(self, attrs, x):
        """(H2, W2): a stride phase's rows and columns."""
        (pt, pb), (pl, pr) = attrs["padding"]
        (sy, sx) = attrs["stride"]
        return -(-(x.shape[2] + pt + pb) // sy), -(-(x.shape[3] + pl + pr) // sx)

    def infer(self, attrs, types):
        x = types[0]
        _check_qdtype(x, "qgemm_planes' input")
        _out_sizes(attrs, x)
        h2, w2 = self._phase(attrs, x)
        if attrs["plane"] < h2 * w2:
            raise RuleError(f"plane {attrs['plane']} < a stride phase's {h2} x {w2} pixels")
        return TensorType((x.shape[0], -(-x.shape[1] // 4) * len(phases(attrs)) * attrs["plane"], 4), "uint8")

    def reference(self, attrs, x):
        n, c = x.shape[:2]
        (pt, pb), (pl, pr) = attrs["padding"]
        (sy, sx), (h2, w2) = attrs["stride"], self._phase(attrs, x)
        fill = attrs["x_zero_point"] + offset(str(x.dtype))
        c4 = -(-c // 4)
        img = np.full((n, c4 * 4, h2 * sy, w2 * sx), fill, np.int32)     # padded, and rounded up to the stride
        img[:, :c, pt:pt + x.shape[2], pl:pl + x.shape[3]] = x.astype(np.int32) + offset(str(x.dtype))
        used = phases(attrs)
        out = np.full((n, c4, 4, len(used), attrs["plane"]), fill, np.int32)
        for f, (py, px) in enumerate(used):
            out[:, :, :, f, :h2 * w2] = img[:, :, py::sy, px::sx].reshape(n, c4, 4, h2 * w2)
        return out.transpose(0, 1, 3, 4, 2).reshape(n, -1, 4).astype(np.uint8)

    def context(self, attrs, types, out):
        x = types[0]
        (pt, _), (pl, _) = attrs["padding"]
        (sy, sx), (h2, w2) = attrs["stride"], self._phase(attrs, x)
        c4 = -(-x.shape[1] // 4)
        return dict(N=x.shape[0], C=x.shape[1], C4=c4, IN_Y=x.shape[2], IN_X=x.shape[3], H2=h2, W2=w2, SY=sy, SX=sx,
                    phases=[list(f) for f in phases(attrs)],
                    PT=pt, PL=pl, PLANE=attrs["plane"], OFFSET=offset(x.dtype),
                    FILL=attrs["x_zero_point"] + offset(x.dtype), par=[("n", "N", x.shape[0]), ("c4", "C4", c4)])


# -- qgemm_weights / qgemm_bias (weight-only: folded at compile time) -------
@register
class QGemmWeights(Op):
    """w (M, C, *k) int8 -> (``rows``, ``depth``) int8: w as an M x K matrix,
    K running (ky, kx, c) with C padded to a multiple of 4 (the order of
    ``qgemm_planes``' groups), zero-padded to rows >= M and depth >= K."""
    name = "qgemm_weights"
    inputs = ("w",)

    def normalize(self, attrs, types):
        return dict(rows=_int(attrs["rows"], "rows"), depth=_int(attrs["depth"], "depth"))

    def infer(self, attrs, types):
        w = types[0]
        if w.dtype != "int8" or len(w.shape) < 2:
            raise RuleError(f"weights must be int8 (C_out, C_in, *k), got {w}")
        k = -(-w.shape[1] // 4) * 4 * shapes.prod(w.shape[2:])
        if attrs["rows"] < w.shape[0] or attrs["depth"] < k or attrs["depth"] % 4:
            raise RuleError(f"rows {attrs['rows']} x depth {attrs['depth']} must hold the {w.shape[0]} x {k} "
                            f"weight matrix, depth a multiple of 4")
        return TensorType((attrs["rows"], attrs["depth"]), "int8")

    def reference(self, attrs, w):
        wp = np.zeros((w.shape[0], -(-w.shape[1] // 4) * 4) + w.shape[2:], np.int8)
        wp[:, :w.shape[1]] = w
        taps = np.moveaxis(wp, 1, -1).reshape(w.shape[0], -1)           # (M, ky, kx, C padded)
        out = np.zeros((attrs["rows"], attrs["depth"]), np.int8)
        out[:w.shape[0], :taps.shape[1]] = taps
        return out

    def context(self, attrs, types, out):
        w = types[0]
        return dict(M=w.shape[0], C=w.shape[1], C4P=-(-w.shape[1] // 4) * 4, KSIZE=shapes.prod(w.shape[2:]),
                    MP=attrs["rows"], KP=attrs["depth"], par=[("m", "MP", attrs["rows"])])


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
    """(cols (N, L, 4) uint8, w (MP, KP) int8, bias (M,) int64) -> (N, M, OH,
    OW) int8/uint8: the requantized product of the first M rows of w and the
    columns (module docstring), written as the conv's output. Attributes:
    ``channels`` M, ``spatial`` (OH, OW), ``width`` W >= OW (column p is
    output (p // W, p % W), dropped when p % W >= OW), ``offsets`` (where
    each group of 4 taps starts in cols, one per 4 columns of w),
    ``multiplier``/``shift`` (one per channel, from qconv),
    ``y_zero_point``, ``dtype``, ``clamp``, ``kernel`` (:data:`KERNELS`) and
    its register tile ``mr`` x ``nr``."""
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
        if len(spatial) != 2:
            raise RuleError(f"spatial must be (OH, OW), got {attrs['spatial']!r}")
        return dict(channels=m, spatial=spatial, width=_int(attrs.get("width", spatial[1]), "width"),
                    offsets=tuple(_int(v, "offsets", lo=0) for v in attrs["offsets"]), multiplier=mult, shift=shift,
                    y_zero_point=int(yz), dtype=dtype, clamp=(int(c_lo), int(c_hi)), kernel=attrs["kernel"],
                    mr=_int(attrs["mr"], "mr"), nr=_int(attrs["nr"], "nr"))

    @staticmethod
    def columns(attrs) -> int:
        """The GEMM's columns: output rows x width, rounded up to a whole register tile."""
        return -(-attrs["spatial"][0] * attrs["width"] // attrs["nr"]) * attrs["nr"]

    def infer(self, attrs, types):
        cols, w, b = types
        if cols.dtype != "uint8" or len(cols.shape) != 3 or cols.shape[2] != 4:
            raise RuleError(f"cols must be uint8 (N, length, 4), got {cols}")
        m, mr, (oh, ow), width = attrs["channels"], attrs["mr"], attrs["spatial"], attrs["width"]
        k4 = len(attrs["offsets"])
        if w.dtype != "int8" or len(w.shape) != 2 or w.shape[1] != 4 * k4 or w.shape[0] < m or w.shape[0] % mr:
            raise RuleError(f"w must be int8 (rows, {4 * k4}: 4 per offset) with rows >= {m} a multiple of mr={mr}, "
                            f"got {w}")
        if width < ow:
            raise RuleError(f"width {width} < the output width {ow}")
        if max(attrs["offsets"]) + self.columns(attrs) > cols.shape[1]:
            raise RuleError(f"cols hold {cols.shape[1]} positions: offsets up to {max(attrs['offsets'])} plus "
                            f"{self.columns(attrs)} columns read past them")
        if b.dtype != "int64" or b.shape != (m,):
            raise RuleError(f"bias must be int64 ({m},), got {b}")
        if not acc_fits(4 * k4):
            raise RuleError(f"{4 * k4} products per output could overflow the int32 accumulator "
                            f"({4 * k4} * 255 * 128 > 2**31 - 1)")
        return TensorType((cols.shape[0], m, oh, ow), attrs["dtype"])

    def reference(self, attrs, cols, w, b):
        n = cols.shape[0]
        m, (oh, ow), width = attrs["channels"], attrs["spatial"], attrs["width"]
        groups = np.stack([cols[:, o:o + oh * width] for o in attrs["offsets"]], axis=1)   # (N, K4, OH*W, 4)
        cm = groups.transpose(0, 1, 3, 2).reshape(n, -1, oh * width).astype(np.int64)
        acc = np.einsum("mk,nkp->nmp", w[:m].astype(np.int64), cm).reshape(n, m, oh, width)[..., :ow]
        acc = saturate_int32(acc + b.reshape(1, m, 1, 1))
        per_c = (1, m, 1, 1)
        y = requantize(acc, np.asarray(attrs["multiplier"]).reshape(per_c),
                       np.asarray(attrs["shift"]).reshape(per_c)) + attrs["y_zero_point"]
        return np.clip(y, *attrs["clamp"]).astype(attrs["dtype"])

    def context(self, attrs, types, out):
        cols, w, _ = types
        n = cols.shape[0]
        mp, mr, nr = w.shape[0], attrs["mr"], attrs["nr"]
        pc = self.columns(attrs)
        mc, nc = blocks(mp, w.shape[1], pc, mr, nr, n)
        lo, hi = attrs["clamp"]
        (oh, ow), width = attrs["spatial"], attrs["width"]
        m_blocks, n_blocks = -(-min(mp, attrs["channels"]) // mc), -(-pc // nc)
        return dict(N=n, M=attrs["channels"], MP=mp, L=cols.shape[1], OH=oh, OW=ow, W=width, P=oh * ow,
                    PR=oh * width, PC=pc, K4=len(attrs["offsets"]), KP=w.shape[1], ACC_BOUND=w.shape[1] * 255 * 128,
                    MR=mr, NR=nr,
                    NV=TILE_VECTORS, LANES=nr // TILE_VECTORS, MC=mc, NC=nc, M_BLOCKS=m_blocks, N_BLOCKS=n_blocks,
                    YZP=attrs["y_zero_point"], LO=lo, HI=hi, kernel=attrs["kernel"], offsets=list(attrs["offsets"]),
                    mult=list(attrs["multiplier"]), shift=list(attrs["shift"]),
                    par=[("n", "N", n), ("mb", "M_BLOCKS", m_blocks), ("nb", "N_BLOCKS", n_blocks)])

    def macs(self, attrs, types, out):
        return out.size * types[1].shape[1]

"""The integer arithmetic of quantized tensors, in one place.

A quantized tensor stores integers ``q`` (int8 or uint8) that stand for the
real numbers ``r = scale * (q - zero_point)``. Activations have one scale and
zero point per tensor (asymmetric); weights have one scale per output channel
and zero point 0 (symmetric). A quantized op accumulates
``(x - x_zero_point) * w`` products in int32, adds an int32 bias (whose scale
is ``x_scale * w_scale``), and *requantizes* the int32 sum to the output's
scale with a fixed-point multiplier and shift -- the integer-only arithmetic
of TensorFlow Lite and CMSIS-NN, so that a microcontroller without floats
gets the same integers as this host:

    real multiplier  M = x_scale * w_scale / y_scale  =  m * 2**(shift - 31),
    m in [2**30, 2**31);
    y = clamp(round(acc * m * 2**shift / 2**31) + y_zero_point, lo, hi)

where the product is rounded twice, as TensorFlow Lite's reference kernels
do: to its high 31 bits ("saturating rounding doubling high multiply": ties
toward +infinity), then when dividing by the power of two ``2**-shift``
(ties away from zero). :func:`requantize` is the
numpy meaning; the C prelude's ``convc_requant`` (templates/c/macros.j2)
computes the same bits.

Float -> int (the ``quantize`` op) follows ONNX's QuantizeLinear: ``q =
saturate(round_half_to_even(x / scale) + zero_point)``, in the float type of
``x``; int -> float (``dequantize``) is ``(q - zero_point) * scale`` in float32.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import RuleError

QDTYPES = ("int8", "uint8")
"""The dtypes of quantized activations and weights."""


def qrange(dtype: str) -> tuple[int, int]:
    """The integers a quantized dtype holds: (-128, 127) or (0, 255)."""
    if dtype not in QDTYPES:
        raise RuleError(f"a quantized tensor must be int8 or uint8, got {dtype}")
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def quantize_multiplier(real: float) -> tuple[int, int]:
    """(m, shift) with ``real ~= m * 2**(shift - 31)`` and ``m`` in [2**30,
    2**31), the Q31 multiplier of :func:`requantize`. A multiplier below
    2**-31 (nothing survives the shift) is (0, 0): the op outputs its zero
    point. ``real`` must be finite, >= 0 and < 2**30."""
    real = float(real)
    if not math.isfinite(real) or real < 0:
        raise RuleError(f"requantization multiplier must be finite and >= 0, got {real!r}")
    if real == 0.0:
        return 0, 0
    mant, exp = math.frexp(real)                  # real = mant * 2**exp, mant in [0.5, 1)
    q = math.floor(mant * (1 << 31) + 0.5)        # round half away from zero (mant > 0)
    if q == 1 << 31:
        q, exp = q >> 1, exp + 1
    if exp < -31:
        return 0, 0
    if exp > 30:
        raise RuleError(f"requantization multiplier {real!r} is too large (>= 2**30): the output scale is "
                        f"far too small for the input and weight scales")
    return int(q), int(exp)


def multipliers(real) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """:func:`quantize_multiplier` of each of ``real``: (ms, shifts)."""
    pairs = [quantize_multiplier(r) for r in np.ravel(real)]
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)


def _trunc_div_pow2(v: np.ndarray, bits: int) -> np.ndarray:
    """v / 2**bits rounded toward zero (C's integer division), int64."""
    return np.where(v >= 0, v >> bits, -((-v) >> bits))


def requantize(acc, m, shift) -> np.ndarray:
    """The int32 result of ``acc * m * 2**(shift - 31)`` rounded as
    TensorFlow Lite's MultiplyByQuantizedMultiplier does (see the module
    docstring); ``acc`` is int32-ranged, ``m``/``shift`` broadcast against it
    (per channel). A left shift that would leave int32 saturates."""
    acc = np.asarray(acc, dtype=np.int64)
    m = np.asarray(m, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    left, right = np.maximum(shift, 0), np.maximum(-shift, 0)
    x = np.clip(acc << left, -2**31, 2**31 - 1)
    ab = x * m
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    high = _trunc_div_pow2(ab + nudge, 31)
    mask = (np.int64(1) << right) - 1
    rem = high & mask
    threshold = (mask >> 1) + (high < 0)
    return (high >> right) + (rem > threshold)


def saturate_int32(v) -> np.ndarray:
    return np.clip(np.asarray(v, dtype=np.int64), -2**31, 2**31 - 1)


def quantize_array(x, scale, zero_point, dtype: str, axis: int | None = None) -> np.ndarray:
    """ONNX QuantizeLinear: ``saturate(rint(x / scale) + zero_point)`` in
    ``x``'s float type (round half to even); NaN becomes the zero point.
    ``scale``/``zero_point`` are scalars, or per index of ``axis``."""
    x = np.asarray(x)
    lo, hi = qrange(dtype)
    s, z = _per_axis(scale, x.dtype, x.ndim, axis), _per_axis(zero_point, x.dtype, x.ndim, axis)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        v = np.rint(x / s) + z
        v = np.where(np.isnan(v), z, v)
        return np.clip(v, lo, hi).astype(dtype)


def dequantize_array(q, scale, zero_point, axis: int | None = None) -> np.ndarray:
    """ONNX DequantizeLinear: ``(q - zero_point) * scale`` in float32."""
    q = np.asarray(q)
    z = _per_axis(np.asarray(zero_point, np.int32), np.int32, q.ndim, axis)
    s = _per_axis(np.asarray(scale, np.float32), np.float32, q.ndim, axis)
    return (q.astype(np.int32) - z).astype(np.float32) * s


def _per_axis(v, dtype, ndim: int, axis: int | None) -> np.ndarray:
    v = np.asarray(v, dtype=dtype).reshape(-1)
    if axis is None or v.size == 1:
        return v.reshape(())
    shape = [1] * ndim
    shape[axis] = v.size
    return v.reshape(shape)


def choose_qparams(lo: float, hi: float, dtype: str = "int8", symmetric: bool = False) -> tuple[float, int]:
    """(scale, zero_point) so that [lo, hi] (widened to hold 0, which must be
    exact: zero padding and ReLU's zeros) maps onto the dtype's integers.
    ``symmetric`` puts zero at the middle (0 for int8, 128 for uint8). The
    scale is a float32 value (what ONNX stores); an all-zero range gets 1."""
    qmin, qmax = qrange(dtype)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise RuleError(f"cannot quantize the range [{lo}, {hi}]: it is not finite")
    if symmetric:
        amax = max(-lo, hi)
        scale = float(np.float32(amax / ((qmax - qmin) / 2))) if amax > 0 else 1.0
        return scale, (0 if dtype == "int8" else 128)
    if hi == lo:                                  # both 0
        return 1.0, 0
    scale = float(np.float32((hi - lo) / (qmax - qmin)))
    zero_point = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    return scale, zero_point


def quantize_weights(w: np.ndarray, axis: int = 0) -> tuple[np.ndarray, tuple[float, ...]]:
    """Symmetric per-channel int8 weights: (q, scales), one scale per index
    of ``axis`` (the output channel), ``max |w| / 127`` (1 for an all-zero
    channel), values rounded half to even and kept in [-127, 127]."""
    w = np.asarray(w, dtype=np.float64)
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    amax = np.abs(moved).max(axis=1) if moved.size else np.zeros(w.shape[axis])
    scales = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / _per_axis(scales, np.float64, w.ndim, axis)), -127, 127).astype(np.int8)
    return q, tuple(float(s) for s in scales)


def quantize_bias(b: np.ndarray, x_scale: float, w_scales) -> np.ndarray:
    """int32 bias of scale ``x_scale * w_scale[c]`` per output channel
    (rounded half to even, saturated to int32)."""
    b = np.asarray(b, dtype=np.float64)
    s = np.float64(x_scale) * np.asarray(w_scales, dtype=np.float64).reshape(-1)
    s = s.reshape((-1,) + (1,) * (b.ndim - 1)) if s.size > 1 else s.reshape(())
    return saturate_int32(np.rint(b / s)).astype(np.int32)

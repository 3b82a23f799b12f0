"""Quantized (int8 / uint8) ops: ``quantize``, ``dequantize`` and the
integer convolution ``qconv``. The arithmetic (scales, zero points, the
fixed-point requantization) is defined once in :mod:`convc.quant`; these ops
carry its constants as attributes, so the generated C needs no float
arithmetic in a quantized layer and the numpy reference computes the same
integers bit for bit.

Quantization attributes, shared by the ops here:

- ``scale`` / ``zero_point`` (quantize, dequantize): tuples, one entry per
  tensor, or one per index of ``axis`` (per-channel).
- ``x_scale``, ``x_zero_point``: the input activation's (per tensor);
  ``w_scale``, ``w_zero_point``: the weight's, per output channel (tuples of
  length 1 or C_out); ``y_scale``, ``y_zero_point``, ``dtype``: the output's.
- ``clamp``: (lo, hi), the integer range the output is clamped to after the
  zero point is added: how relu and relu6 fold into a quantized producer
  (``activation_clamp``).
- ``multiplier``, ``shift``: derived in ``normalize`` from the scales
  (:func:`convc.quant.multipliers` of ``x_scale * w_scale / y_scale``); the
  template reads them, Python computes them.
"""
from __future__ import annotations

import math

import numpy as np

from .. import shapes
from ..errors import RuleError
from ..ir import TensorType, Value
from ..quant import (QDTYPES, dequantize_array, multipliers, qrange, quantize_array, requantize,
                     saturate_int32)
from .conv import Conv, conv_geometry
from .registry import Op, builder, register
from .window import axes_context


# -- attribute rules ---------------------------------------------------------
def _scales(v, what: str) -> tuple[float, ...]:
    vals = tuple(np.ravel(np.asarray(v, dtype=object)).tolist()) if not isinstance(v, (int, float)) else (v,)
    out = []
    for s in vals:
        if isinstance(s, bool) or not isinstance(s, (int, float, np.integer, np.floating)):
            raise RuleError(f"{what} must be positive finite numbers, got {v!r}")
        s = float(np.float32(s))              # scales are float32 values (what ONNX stores)
        if not (math.isfinite(s) and s > 0):
            raise RuleError(f"{what} must be positive finite numbers, got {v!r}")
        out.append(s)
    if not out:
        raise RuleError(f"{what} must not be empty")
    return tuple(out)


def _zero_points(v, what: str, dtype: str, n: int | None = None) -> tuple[int, ...]:
    vals = tuple(np.ravel(np.asarray(v, dtype=object)).tolist()) if not isinstance(v, (int, np.integer)) else (v,)
    lo, hi = qrange(dtype)
    out = []
    for z in vals:
        if isinstance(z, bool) or not isinstance(z, (int, np.integer)) or not lo <= int(z) <= hi:
            raise RuleError(f"{what} must be integers in [{lo}, {hi}] ({dtype}), got {v!r}")
        out.append(int(z))
    if not out:
        raise RuleError(f"{what} must not be empty")
    return tuple(out)


def _per_channel(vals: tuple, n: int, what: str) -> tuple:
    """A length-1 (per tensor) or length-n (per channel) tuple."""
    if len(vals) not in (1, n):
        raise RuleError(f"{what} has {len(vals)} entries; give 1 (per tensor) or {n} (one per channel)")
    return vals


def _qdtype(v, what: str) -> str:
    if v not in QDTYPES:
        raise RuleError(f"{what} must be one of {QDTYPES}, got {v!r}")
    return v


def _clamp(v, dtype: str) -> tuple[int, int]:
    lo, hi = qrange(dtype)
    if v is None:
        return lo, hi
    try:
        a, b = v
    except (TypeError, ValueError):
        raise RuleError(f"clamp must be a pair (lo, hi) of integers, got {v!r}") from None
    if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) for t in (a, b)) \
            or not lo <= int(a) <= int(b) <= hi:
        raise RuleError(f"clamp must be integers lo <= hi within [{lo}, {hi}] ({dtype}), got {v!r}")
    return int(a), int(b)


def _axis(axis, ndim: int, n_vals: int, what: str):
    if n_vals == 1:
        return None
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
        raise RuleError(f"{what}: per-axis quantization needs an axis in [{-ndim}, {ndim}), got {axis!r}")
    return int(axis) % ndim


def activation_clamp(activation: str | None, y_scale: float, y_zero_point: int, dtype: str) -> tuple[int, int]:
    """The integer clamp that applies ``activation`` ("relu", "relu6" or
    None) to a quantized output of (y_scale, y_zero_point): relu keeps
    q >= zero point, relu6 also q <= zero point + round(6 / scale)."""
    lo, hi = qrange(dtype)
    if activation is None:
        return lo, hi
    if activation == "relu":
        return max(lo, y_zero_point), hi
    if activation == "relu6":
        return max(lo, y_zero_point), min(hi, y_zero_point + int(round(6.0 / y_scale)))
    raise RuleError(f"activation {activation!r} does not fold into a clamp (relu, relu6 do)")


def _quant_check(t: TensorType, what: str):
    if t.dtype not in QDTYPES:
        raise RuleError(f"{what} must be int8 or uint8, got {t.dtype}")


def _per_axis_context(attrs, t: TensorType) -> dict:
    """Index arithmetic of a per-axis scale: channel = (i / INNER) % CH."""
    if attrs["axis"] is None:
        return dict(per_axis=False, CH=1, INNER=1)
    return dict(per_axis=True, CH=t.shape[attrs["axis"]], INNER=shapes.prod(t.shape[attrs["axis"] + 1:]))


# -- quantize / dequantize ---------------------------------------------------
@builder("x")
def quantize(x: Value, scale, zero_point=0, dtype: str = "int8", axis: int | None = None, name=None) -> Value:
    """Float -> int8/uint8 (ONNX QuantizeLinear): ``saturate(round_half_even(x
    / scale) + zero_point)``; NaN becomes ``zero_point``. ``scale`` and
    ``zero_point`` are numbers, or sequences with one entry per index of
    ``axis`` (per-channel)."""
    return x.graph.add("quantize", [x], dict(scale=scale, zero_point=zero_point, dtype=dtype, axis=axis), name)


@builder("x")
def dequantize(x: Value, scale, zero_point=0, axis: int | None = None, name=None) -> Value:
    """int8/uint8 -> float32 (ONNX DequantizeLinear): ``(x - zero_point) *
    scale``, per tensor or per index of ``axis``."""
    return x.graph.add("dequantize", [x], dict(scale=scale, zero_point=zero_point, axis=axis), name)


@register
class Quantize(Op):
    name = "quantize"

    def normalize(self, attrs, types):
        x = types[0]
        dtype = _qdtype(attrs["dtype"], "dtype")
        scale = _scales(attrs["scale"], "scale")
        zp = _zero_points(attrs["zero_point"], "zero_point", dtype)
        axis = _axis(attrs.get("axis"), len(x.shape), max(len(scale), len(zp)), "quantize")
        n = 1 if axis is None else x.shape[axis]
        scale, zp = _per_channel(scale, n, "scale"), _per_channel(zp, n, "zero_point")
        return dict(scale=scale, zero_point=zp, dtype=dtype, axis=axis)

    def infer(self, attrs, types):
        x = types[0]
        if x.dtype not in ("float32", "float64"):
            raise RuleError(f"quantize takes a float32 or float64 tensor, got {x.dtype}")
        return TensorType(x.shape, attrs["dtype"])

    def reference(self, attrs, x):
        return quantize_array(x, attrs["scale"], attrs["zero_point"], attrs["dtype"], attrs["axis"])

    def context(self, attrs, types, out):
        lo, hi = qrange(attrs["dtype"])
        return dict(SIZE=out.size, LO=lo, HI=hi, scale=attrs["scale"], zero_point=attrs["zero_point"],
                    par=[("i", "SIZE", out.size)], **_per_axis_context(attrs, out))


@register
class Dequantize(Op):
    name = "dequantize"

    def normalize(self, attrs, types):
        x = types[0]
        _quant_check(x, "dequantize's input")
        scale = _scales(attrs["scale"], "scale")
        zp = _zero_points(attrs["zero_point"], "zero_point", x.dtype)
        axis = _axis(attrs.get("axis"), len(x.shape), max(len(scale), len(zp)), "dequantize")
        n = 1 if axis is None else x.shape[axis]
        return dict(scale=_per_channel(scale, n, "scale"), zero_point=_per_channel(zp, n, "zero_point"),
                    axis=axis)

    def infer(self, attrs, types):
        _quant_check(types[0], "dequantize's input")
        return TensorType(types[0].shape, "float32")

    def reference(self, attrs, x):
        return dequantize_array(x, attrs["scale"], attrs["zero_point"], attrs["axis"])

    def context(self, attrs, types, out):
        return dict(SIZE=out.size, scale=attrs["scale"], zero_point=attrs["zero_point"],
                    par=[("i", "SIZE", out.size)], **_per_axis_context(attrs, out))


# -- qconv -------------------------------------------------------------------
@builder("x")
def qconv(x: Value, w: Value, bias: Value | None = None, *, x_scale, x_zero_point=0, w_scale, w_zero_point=0,
          y_scale, y_zero_point=0, dtype: str = "int8", clamp=None, stride=1, padding=0, dilation=1, groups=1,
          name=None) -> Value:
    """Quantized convolution: int8/uint8 ``x`` and ``w`` (C_out, C_in/groups,
    *k), optional int32 ``bias`` (C_out,) of scale ``x_scale * w_scale``;
    ``acc = bias + sum (x - x_zero_point) * (w - w_zero_point)`` in int32,
    then requantized to (``y_scale``, ``y_zero_point``, ``dtype``) and
    clamped to ``clamp`` (default: the dtype's range). ``w_scale`` and
    ``w_zero_point`` are per tensor or per output channel. Geometry as
    :func:`convc.conv` (no flip)."""
    g = x.graph
    ins = [x, w] + ([bias] if bias is not None else [])
    attrs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, x_scale=x_scale,
                 x_zero_point=x_zero_point, w_scale=w_scale, w_zero_point=w_zero_point, y_scale=y_scale,
                 y_zero_point=y_zero_point, dtype=dtype, clamp=clamp)
    return g.add("qconv", ins, attrs, name)


ACC_LIMIT = 2**31 - 1
"""The int32 accumulator's bound: a qconv whose worst-case sum of products
could pass it is refused (the C accumulates in int32)."""


@register
class QConv(Op):
    """Inputs x, w and an optional int32 bias."""
    name = "qconv"
    arity = (2, 3)
    inputs = ("x", "w", "b")

    def normalize(self, attrs, types):
        x, w = types[:2]
        _quant_check(x, "qconv's input x")
        _quant_check(w, "qconv's weight w")
        geo, out = conv_geometry(dict(attrs), x, w)
        c_out = w.shape[0]
        dtype = _qdtype(attrs["dtype"], "dtype")
        x_scale = _scales(attrs["x_scale"], "x_scale")
        y_scale = _scales(attrs["y_scale"], "y_scale")
        if len(x_scale) != 1 or len(y_scale) != 1:
            raise RuleError("x_scale and y_scale must be one number each (activations are per tensor)")
        w_scale = _per_channel(_scales(attrs["w_scale"], "w_scale"), c_out, "w_scale")
        x_zp = _zero_points(attrs["x_zero_point"], "x_zero_point", x.dtype)
        y_zp = _zero_points(attrs["y_zero_point"], "y_zero_point", dtype)
        if len(x_zp) != 1 or len(y_zp) != 1:
            raise RuleError("x_zero_point and y_zero_point must be one integer each")
        w_zp = _per_channel(_zero_points(attrs["w_zero_point"], "w_zero_point", w.dtype), c_out, "w_zero_point")
        real = [x_scale[0] * ws / y_scale[0] for ws in (w_scale if len(w_scale) == c_out else w_scale * c_out)]
        mult, shift = multipliers(real)
        return dict(stride=geo["stride"], padding=geo["padding"], dilation=geo["dilation"], groups=geo["groups"],
                    x_scale=x_scale[0], x_zero_point=x_zp[0], w_scale=w_scale, w_zero_point=w_zp,
                    y_scale=y_scale[0], y_zero_point=y_zp[0], dtype=dtype, clamp=_clamp(attrs.get("clamp"), dtype),
                    multiplier=mult, shift=shift)

    def infer(self, attrs, types):
        x, w = types[:2]
        _quant_check(x, "qconv's input x")
        _quant_check(w, "qconv's weight w")
        _, out = conv_geometry(attrs, x, w)
        if len(types) == 3 and (types[2].dtype != "int32" or types[2].shape != (out[1],)):
            raise RuleError(f"bias must be int32 ({out[1]},), got {types[2]}")
        terms = shapes.prod(w.shape[1:])
        xlo, xhi = qrange(x.dtype)
        wlo, whi = qrange(w.dtype)
        xz = attrs["x_zero_point"]
        worst = terms * max(abs(xlo - xz), abs(xhi - xz)) * max(
            max(abs(wlo - z), abs(whi - z)) for z in attrs["w_zero_point"])
        if worst > ACC_LIMIT:
            raise RuleError(f"{terms} products per output could overflow the int32 accumulator "
                            f"(worst case {worst} > 2**31 - 1); split the input channels")
        return TensorType(out, attrs["dtype"])

    def reference(self, attrs, x, w, b=None):
        c_out = w.shape[0]
        wz = np.asarray(attrs["w_zero_point"], np.int64).reshape((-1,) + (1,) * (w.ndim - 1))
        geo = dict(stride=attrs["stride"], padding=attrs["padding"], dilation=attrs["dilation"],
                   groups=attrs["groups"], flip=False)
        acc = Conv.convolve(geo, x.astype(np.int64) - attrs["x_zero_point"], w.astype(np.int64) - wz)
        if b is not None:
            acc = saturate_int32(acc + b.astype(np.int64).reshape((1, c_out) + (1,) * (x.ndim - 2)))
        per_c = (1, c_out) + (1,) * (x.ndim - 2)
        m = np.broadcast_to(np.asarray(attrs["multiplier"], np.int64), (c_out,)).reshape(per_c)
        s = np.broadcast_to(np.asarray(attrs["shift"], np.int64), (c_out,)).reshape(per_c)
        lo, hi = attrs["clamp"]
        y = np.clip(requantize(acc, m, s) + attrs["y_zero_point"], lo, hi)
        return y.astype(attrs["dtype"])

    def context(self, attrs, types, out):
        x, w = types[:2]
        g = attrs["groups"]
        c_out = w.shape[0]
        per = lambda v: list(v) * (c_out if len(v) == 1 else 1)     # noqa: E731
        lo, hi = attrs["clamp"]
        return dict(par=[("n", "N", x.shape[0]), ("co", "C_OUT", c_out)], N=x.shape[0], C_IN=x.shape[1],
                    C_OUT=c_out, GROUPS=g, C_IN_G=x.shape[1] // g, C_OUT_G=c_out // g, bias=len(types) == 3,
                    XZP=attrs["x_zero_point"], YZP=attrs["y_zero_point"], LO=lo, HI=hi,
                    wzp=per(attrs["w_zero_point"]), mult=list(attrs["multiplier"]), shift=list(attrs["shift"]),
                    KSIZE=shapes.prod(w.shape[2:]),
                    axes=axes_context(x.shape[2:], out.shape[2:], w.shape[2:], attrs["stride"],
                                      attrs["dilation"], attrs["padding"]))

    def macs(self, attrs, types, out):
        return shapes.prod(out.shape) * shapes.prod(types[1].shape[1:])

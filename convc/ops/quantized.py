"""Quantized (int8 / uint8) ops: ``quantize``, ``dequantize``, the integer
convolutions ``qconv`` and ``qconv_transpose``, ``qdense`` and ``qmatmul``,
``qadd`` (TensorFlow Lite's rescaling add), ``qconcat`` (inputs requantized
to the output's scale), ``qavg_pool`` and ``qglobal_avg_pool``, and
``qlookup`` (a 256-entry table: how hardswish, sigmoid and the other
activations run on int8; :func:`lookup_table` builds it). The arithmetic (scales, zero points, the
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
from .window import axes_context, padded, windows


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
def qconv(x: Value, w: Value, bias: Value | None = None, *, x_scale=None, x_zero_point=0, w_scale=None,
          w_zero_point=0, y_scale=None, y_zero_point=None, dtype: str = "int8", clamp=None, stride=1, padding=0,
          dilation=1, groups=1, name=None) -> Value:
    """Quantized convolution: int8/uint8 ``x`` and ``w`` (C_out, C_in/groups,
    *k), optional int32 ``bias`` (C_out,) of scale ``x_scale * w_scale``;
    ``acc = bias + sum (x - x_zero_point) * (w - w_zero_point)`` in int32,
    then requantized to (``y_scale``, ``y_zero_point``, ``dtype``) and
    clamped to ``clamp`` (default: the dtype's range). ``w_scale`` and
    ``w_zero_point`` are per tensor or per output channel. ``dtype="int32"``
    returns the raw accumulators (ONNX's ConvInteger: no y_scale, y zero
    point or clamp, and the scales may be left out). Geometry as
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
        outq = _out_qparams(attrs, raw_ok=True)
        raw = outq["dtype"] == "int32"
        x_zp = _one_zero_point(attrs["x_zero_point"], "x_zero_point", x.dtype)
        w_zp = _per_channel(_zero_points(attrs["w_zero_point"], "w_zero_point", w.dtype), c_out, "w_zero_point")
        if raw and attrs.get("x_scale") is None and attrs.get("w_scale") is None:
            x_scale, w_scale, mult, shift = None, None, (), ()        # ConvInteger: integers in, integers out
        else:
            for k in ("x_scale", "w_scale"):
                if attrs.get(k) is None:
                    raise RuleError(f"{k} is required (only an int32 output may go without scales)")
            x_scale = _one_scale(attrs["x_scale"], "x_scale")
            w_scale = _per_channel(_scales(attrs["w_scale"], "w_scale"), c_out, "w_scale")
            if raw:
                mult, shift = (), ()
            else:
                mult, shift = multipliers([x_scale * ws / outq["y_scale"] for ws in _per(w_scale, c_out)])
        return dict(stride=geo["stride"], padding=geo["padding"], dilation=geo["dilation"], groups=geo["groups"],
                    x_scale=x_scale, x_zero_point=x_zp, w_scale=w_scale, w_zero_point=w_zp, **outq,
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
        if attrs["dtype"] == "int32":
            return _finish(acc, attrs, None, None)
        per_c = (1, c_out) + (1,) * (x.ndim - 2)
        m = np.asarray(attrs["multiplier"], np.int64).reshape(per_c)
        s = np.asarray(attrs["shift"], np.int64).reshape(per_c)
        return _finish(acc, attrs, m, s)

    def context(self, attrs, types, out):
        x, w = types[:2]
        g = attrs["groups"]
        c_out = w.shape[0]
        return dict(par=[("n", "N", x.shape[0]), ("co", "C_OUT", c_out)], N=x.shape[0], C_IN=x.shape[1],
                    C_OUT=c_out, GROUPS=g, C_IN_G=x.shape[1] // g, C_OUT_G=c_out // g, bias=len(types) == 3,
                    XZP=attrs["x_zero_point"], **_out_context(attrs),
                    wzp=_per(attrs["w_zero_point"], c_out), mult=list(attrs["multiplier"]),
                    shift=list(attrs["shift"]),
                    KSIZE=shapes.prod(w.shape[2:]),
                    axes=axes_context(x.shape[2:], out.shape[2:], w.shape[2:], attrs["stride"],
                                      attrs["dilation"], attrs["padding"]))

    def macs(self, attrs, types, out):
        return shapes.prod(out.shape) * shapes.prod(types[1].shape[1:])


# -- shared rules of the ops below ---------------------------------------------
def _one_scale(v, what: str) -> float:
    s = _scales(v, what)
    if len(s) != 1:
        raise RuleError(f"{what} must be one number (activations are quantized per tensor), got {v!r}")
    return s[0]


def _one_zero_point(v, what: str, dtype: str) -> int:
    z = _zero_points(v, what, dtype)
    if len(z) != 1:
        raise RuleError(f"{what} must be one integer (activations are quantized per tensor), got {v!r}")
    return z[0]


def _max_abs(dtype: str, zero_points) -> int:
    """The largest |q - z| a ``dtype`` value q can give for the zero points."""
    lo, hi = qrange(dtype)
    return max(max(abs(lo - z), abs(hi - z)) for z in zero_points)


def _check_acc(terms: int, x_dtype: str, x_zps, w_dtype: str, w_zps, what: str = "products per output"):
    """Refuse a sum of ``terms`` products (x - x_zp) * (w - w_zp) that could
    pass the int32 accumulator (ACC_LIMIT) in the worst case."""
    worst = terms * _max_abs(x_dtype, x_zps) * _max_abs(w_dtype, w_zps)
    if worst > ACC_LIMIT:
        raise RuleError(f"{terms} {what} could overflow the int32 accumulator (worst case {worst} > 2**31 - 1); "
                        f"split the reduction")


def _check_sum(terms: int, dtype: str, zero_point: int, what: str):
    """Refuse a sum of ``terms`` values (q - zero_point) that could pass the
    int32 accumulator."""
    worst = terms * _max_abs(dtype, [zero_point])
    if worst > ACC_LIMIT:
        raise RuleError(f"{terms} {what} could overflow the int32 accumulator (worst case {worst} > 2**31 - 1)")


def headroom(worst: int, most: int = 20) -> int:
    """Bits a sum bounded by ``worst`` can be shifted left and stay in int32
    (at most ``most``). Ops whose sums are small (pools, concat, add) shift
    them before requantizing so that the multiplier's right shift grows by as
    many bits: the fixed-point result then rounds like exact arithmetic
    except within 2**-(bits + 1) of a tie (TFLite's ADD does this with 20)."""
    return max(0, min(most, 31 - int(worst).bit_length()))


def _out_qparams(attrs, raw_ok: bool = False) -> dict:
    """The output's (y_scale, y_zero_point, dtype, clamp). ``raw_ok``: the
    dtype may be "int32", the raw accumulator (ONNX's MatMulInteger and
    ConvInteger), which takes no scale, zero point or clamp."""
    dtype = attrs["dtype"]
    if raw_ok and dtype == "int32":
        if attrs.get("y_scale") is not None or attrs.get("y_zero_point") not in (None, 0) \
                or attrs.get("clamp") is not None:
            raise RuleError("an int32 output is the raw accumulator: it takes no y_scale, y_zero_point or clamp")
        return dict(y_scale=None, y_zero_point=0, dtype="int32", clamp=None)
    if dtype not in QDTYPES:
        allowed = QDTYPES + (("int32",) if raw_ok else ())
        raise RuleError(f"dtype must be one of {allowed}, got {dtype!r}")
    if attrs.get("y_scale") is None:
        raise RuleError(f"a {dtype} output needs y_scale")
    y_zp = attrs.get("y_zero_point")
    return dict(y_scale=_one_scale(attrs["y_scale"], "y_scale"),
                y_zero_point=_one_zero_point(0 if y_zp is None else y_zp, "y_zero_point", dtype),
                dtype=dtype, clamp=_clamp(attrs.get("clamp"), dtype))


def _finish(acc: np.ndarray, attrs, m, s) -> np.ndarray:
    """Requantize int32 accumulators to the output (or keep them, int32)."""
    if attrs["dtype"] == "int32":
        return acc.astype(np.int32)
    lo, hi = attrs["clamp"]
    return np.clip(requantize(acc, m, s) + attrs["y_zero_point"], lo, hi).astype(attrs["dtype"])


def _out_context(attrs) -> dict:
    """Template constants of the output: RAW (int32 accumulators out) or
    YZP and the clamp [LO, HI]."""
    if attrs["dtype"] == "int32":
        return dict(RAW=True, YZP=0, LO=0, HI=0)
    lo, hi = attrs["clamp"]
    return dict(RAW=False, YZP=attrs["y_zero_point"], LO=lo, HI=hi)


def _per(v, n: int) -> list:
    """A per-tensor (length 1) or per-channel tuple as n entries."""
    return list(v) * n if len(v) == 1 else list(v)


# -- qconv_transpose -------------------------------------------------------------
@builder("x")
def qconv_transpose(x: Value, w: Value, bias: Value | None = None, *, x_scale, x_zero_point=0, w_scale,
                    w_zero_point=0, y_scale, y_zero_point=0, dtype: str = "int8", clamp=None, stride=1, padding=0,
                    output_padding=0, dilation=1, groups=1, output_size=None, name=None) -> Value:
    """Quantized transposed convolution (PyTorch's conv_transpose geometry,
    :func:`convc.conv_transpose`): int8/uint8 ``x`` (N, C_in, *n) and ``w``
    (C_in, C_out/groups, *k), optional int32 ``bias`` (C_out,) of scale
    ``x_scale * w_scale[c]``; ``w_scale``/``w_zero_point`` per tensor or per
    output channel (C_out entries). int32 accumulation, requantization and
    clamp as :func:`qconv`."""
    ins = [x, w] + ([bias] if bias is not None else [])
    attrs = dict(stride=stride, padding=padding, output_padding=output_padding, dilation=dilation, groups=groups,
                 output_size=output_size, x_scale=x_scale, x_zero_point=x_zero_point, w_scale=w_scale,
                 w_zero_point=w_zero_point, y_scale=y_scale, y_zero_point=y_zero_point, dtype=dtype, clamp=clamp)
    return x.graph.add("qconv_transpose", ins, attrs, name)


@register
class QConvTranspose(Op):
    """Inputs x, w (C_in, C_out/groups, *k) and an optional int32 bias."""
    name = "qconv_transpose"
    arity = (2, 3)
    inputs = ("x", "w", "b")

    @staticmethod
    def _geometry(attrs, x: TensorType, w: TensorType) -> tuple[dict, tuple]:
        """conv_transpose's rules and output shape (ops/transpose.py)."""
        from .registry import get_op
        ct = get_op("conv_transpose")
        keys = ("stride", "padding", "output_padding", "dilation", "groups")
        geo = ct.normalize(dict({k: attrs[k] for k in keys}, output_size=attrs.get("output_size")), [x, w])
        out = (x.shape[0], w.shape[1] * geo["groups"]) + ct._out(geo, x, w)
        return geo, out

    def normalize(self, attrs, types):
        x, w = types[:2]
        _quant_check(x, "qconv_transpose's input x")
        _quant_check(w, "qconv_transpose's weight w")
        geo, out = self._geometry(attrs, x, w)
        c_out = out[1]
        x_scale = _one_scale(attrs["x_scale"], "x_scale")
        w_scale = _per_channel(_scales(attrs["w_scale"], "w_scale"), c_out, "w_scale")
        w_zp = _per_channel(_zero_points(attrs["w_zero_point"], "w_zero_point", w.dtype), c_out, "w_zero_point")
        y = _out_qparams(attrs)
        mult, shift = multipliers([x_scale * ws / y["y_scale"] for ws in _per(w_scale, c_out)])
        return dict(geo, x_scale=x_scale, x_zero_point=_one_zero_point(attrs["x_zero_point"], "x_zero_point",
                                                                         x.dtype),
                    w_scale=w_scale, w_zero_point=w_zp, **y, multiplier=mult, shift=shift)

    def infer(self, attrs, types):
        x, w = types[:2]
        _quant_check(x, "qconv_transpose's input x")
        _quant_check(w, "qconv_transpose's weight w")
        _, out = self._geometry(attrs, x, w)
        if len(types) == 3 and (types[2].dtype != "int32" or types[2].shape != (out[1],)):
            raise RuleError(f"bias must be int32 ({out[1]},), got {types[2]}")
        # an output sums at most C_in/groups * prod(k) products (fewer where taps miss the input)
        _check_acc(x.shape[1] // attrs["groups"] * shapes.prod(w.shape[2:]), x.dtype, [attrs["x_zero_point"]],
                   w.dtype, attrs["w_zero_point"])
        return TensorType(out, attrs["dtype"])

    def reference(self, attrs, x, w, b=None):
        from .transpose import transpose_reference
        out = self._geometry(attrs, TensorType(x.shape, str(x.dtype)), TensorType(w.shape, str(w.dtype)))[1]
        g, (c_in, c_out_g) = attrs["groups"], w.shape[:2]
        # w[ci, col] feeds output channel (ci's group) * C_out/groups + col: its zero point
        co = (np.arange(c_in)[:, None] // (c_in // g)) * c_out_g + np.arange(c_out_g)[None, :]
        wz = np.asarray(_per(attrs["w_zero_point"], out[1]), np.int64)[co].reshape(
            (c_in, c_out_g) + (1,) * (w.ndim - 2))
        acc = transpose_reference(x.astype(np.int64) - attrs["x_zero_point"], w.astype(np.int64) - wz,
                                  attrs["stride"], attrs["padding"], attrs["dilation"], g, out[2:])
        per_c = (1, out[1]) + (1,) * (x.ndim - 2)
        if b is not None:
            acc = saturate_int32(acc + b.astype(np.int64).reshape(per_c))
        m = np.asarray(attrs["multiplier"], np.int64).reshape(per_c)
        s = np.asarray(attrs["shift"], np.int64).reshape(per_c)
        return _finish(acc, attrs, m, s)

    def context(self, attrs, types, out):
        from .transpose import _transpose_context
        x, w = types[:2]
        c_out = out.shape[1]
        ctx = _transpose_context(x, w, out.shape, attrs["stride"], attrs["dilation"], attrs["padding"],
                                 attrs["groups"], len(types) == 3)
        for a in ctx["axes"]:
            a["ph"] = -(-a["o"] // a["s"])          # outputs per phase (the workspace's split, see the template)
        return dict(ctx, par=[("n", "N", out.shape[0]), ("co", "C_OUT", c_out)],
                    XZP=attrs["x_zero_point"], wzp=_per(attrs["w_zero_point"], c_out),
                    mult=list(attrs["multiplier"]), shift=list(attrs["shift"]), **_out_context(attrs))

    def workspace(self, attrs, types, out, target="c"):
        # the int32 sums of every (n, co) plane (one per parallel iteration), each axis padded to whole
        # phases (stride * ceil(out / stride)), plus one tap's channel sums over the input plane; in
        # output elements
        sums = shapes.prod(s * -(-o // s) for o, s in zip(out.shape[2:], attrs["stride"]))
        per_plane = sums + shapes.prod(types[0].shape[2:])
        return out.shape[0] * out.shape[1] * per_plane * 4 // np.dtype(out.dtype).itemsize

    def macs(self, attrs, types, out):
        return shapes.prod(types[0].shape) * shapes.prod(types[1].shape[1:])


# -- qdense, qmatmul -------------------------------------------------------------
@builder("x")
def qdense(x: Value, w: Value, bias: Value | None = None, *, x_scale, x_zero_point=0, w_scale, w_zero_point=0,
           y_scale=None, y_zero_point=0, dtype: str = "int8", clamp=None, name=None) -> Value:
    """Quantized fully connected layer (PyTorch's Linear): int8/uint8 ``x``
    (..., K), int8/uint8 ``w`` (M, K) with ``w_scale``/``w_zero_point`` per
    tensor or per row (output feature), optional int32 ``bias`` (M,) of scale
    ``x_scale * w_scale[m]``. ``acc = bias + sum_k (x - x_zp) * (w - w_zp)``
    in int32, requantized to (``y_scale``, ``y_zero_point``, ``dtype``) and
    clamped; ``dtype="int32"`` returns the accumulators as they are."""
    ins = [x, w] + ([bias] if bias is not None else [])
    attrs = dict(x_scale=x_scale, x_zero_point=x_zero_point, w_scale=w_scale, w_zero_point=w_zero_point,
                 y_scale=y_scale, y_zero_point=y_zero_point, dtype=dtype, clamp=clamp)
    return x.graph.add("qdense", ins, attrs, name)


@register
class QDense(Op):
    """Inputs x (..., K), w (M, K) and an optional int32 bias (M,)."""
    name = "qdense"
    arity = (2, 3)
    inputs = ("x", "w", "b")

    def normalize(self, attrs, types):
        x, w = types[:2]
        _quant_check(x, "qdense's input x")
        _quant_check(w, "qdense's weight w")
        if len(x.shape) < 1 or len(w.shape) != 2 or w.shape[1] != x.shape[-1]:
            raise RuleError(f"weight must be (out_features, in_features={x.shape[-1] if x.shape else '?'}), "
                            f"got {w.shape}")
        m = w.shape[0]
        x_scale = _one_scale(attrs["x_scale"], "x_scale")
        w_scale = _per_channel(_scales(attrs["w_scale"], "w_scale"), m, "w_scale")
        y = _out_qparams(attrs, raw_ok=True)
        mult, shift = ((), ()) if y["dtype"] == "int32" else \
            multipliers([x_scale * ws / y["y_scale"] for ws in _per(w_scale, m)])
        return dict(x_scale=x_scale, x_zero_point=_one_zero_point(attrs["x_zero_point"], "x_zero_point", x.dtype),
                    w_scale=w_scale,
                    w_zero_point=_per_channel(_zero_points(attrs["w_zero_point"], "w_zero_point", w.dtype), m,
                                              "w_zero_point"),
                    **y, multiplier=mult, shift=shift)

    def infer(self, attrs, types):
        x, w = types[:2]
        _quant_check(x, "qdense's input x")
        _quant_check(w, "qdense's weight w")
        if len(types) == 3 and (types[2].dtype != "int32" or types[2].shape != (w.shape[0],)):
            raise RuleError(f"bias must be int32 ({w.shape[0]},), got {types[2]}")
        _check_acc(w.shape[1], x.dtype, [attrs["x_zero_point"]], w.dtype, attrs["w_zero_point"])
        return TensorType(x.shape[:-1] + (w.shape[0],), attrs["dtype"])

    def reference(self, attrs, x, w, b=None):
        m = w.shape[0]
        wz = np.asarray(_per(attrs["w_zero_point"], m), np.int64)[:, None]
        acc = (x.astype(np.int64) - attrs["x_zero_point"]) @ (w.astype(np.int64) - wz).T
        if b is not None:
            acc = saturate_int32(acc + b.astype(np.int64))
        return _finish(acc, attrs, np.asarray(attrs["multiplier"], np.int64), np.asarray(attrs["shift"], np.int64))

    def context(self, attrs, types, out):
        x, w = types[:2]
        rows = shapes.prod(x.shape[:-1])
        return dict(M=rows, K=w.shape[1], N=w.shape[0], bias=len(types) == 3, XZP=attrs["x_zero_point"],
                    wzp=_per(attrs["w_zero_point"], w.shape[0]), mult=list(attrs["multiplier"]),
                    shift=list(attrs["shift"]), par=[("m", "M", rows), ("n", "N", w.shape[0])],
                    **_out_context(attrs))

    def macs(self, attrs, types, out):
        return out.size * types[1].shape[1]


@builder("a", "b")
def qmatmul(a: Value, b: Value, *, a_scale=None, a_zero_point=0, b_scale=None, b_zero_point=0, y_scale=None,
            y_zero_point=0, dtype: str = "int8", clamp=None, name=None) -> Value:
    """Quantized matrix product of int8/uint8 (..., M, K) and (..., K, N)
    (batch dims broadcast, numpy rules): ``acc = sum_k (a - a_zp) * (b -
    b_zp)`` in int32, ``a`` per tensor, ``b_scale``/``b_zero_point`` per
    tensor or per column (N entries); requantized by ``a_scale * b_scale /
    y_scale`` to (``y_zero_point``, ``dtype``) and clamped (ONNX's
    QLinearMatMul), or with ``dtype="int32"`` the accumulators themselves
    (ONNX's MatMulInteger; no scales needed)."""
    attrs = dict(a_scale=a_scale, a_zero_point=a_zero_point, b_scale=b_scale, b_zero_point=b_zero_point,
                 y_scale=y_scale, y_zero_point=y_zero_point, dtype=dtype, clamp=clamp)
    return a.graph.add("qmatmul", [a, b], attrs, name)


@register
class QMatmul(Op):
    name = "qmatmul"
    arity = (2, 2)
    inputs = ("a", "b")

    @staticmethod
    def _shape(a: TensorType, b: TensorType) -> tuple:
        if len(a.shape) < 2 or len(b.shape) < 2:
            raise RuleError(f"operands must have rank >= 2 (..., M, K) @ (..., K, N), got {a.shape} and {b.shape}")
        if a.shape[-1] != b.shape[-2]:
            raise RuleError(f"inner dims differ: {a.shape} @ {b.shape} needs {a.shape[-1]} == {b.shape[-2]}")
        try:
            batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        except ValueError:
            raise RuleError(f"batch dims {a.shape[:-2]} and {b.shape[:-2]} do not broadcast") from None
        return tuple(batch) + (a.shape[-2], b.shape[-1])

    def normalize(self, attrs, types):
        a, b = types
        _quant_check(a, "qmatmul's operand a")
        _quant_check(b, "qmatmul's operand b")
        n = self._shape(a, b)[-1]
        y = _out_qparams(attrs, raw_ok=True)
        b_zp = _per_channel(_zero_points(attrs["b_zero_point"], "b_zero_point", b.dtype), n, "b_zero_point")
        a_zp = _one_zero_point(attrs["a_zero_point"], "a_zero_point", a.dtype)
        if y["dtype"] == "int32":
            for k in ("a_scale", "b_scale"):
                if attrs.get(k) is not None:
                    _scales(attrs[k], k)            # checked, kept for the record (an importer's)
            a_scale = None if attrs.get("a_scale") is None else _one_scale(attrs["a_scale"], "a_scale")
            b_scale = None if attrs.get("b_scale") is None else \
                _per_channel(_scales(attrs["b_scale"], "b_scale"), n, "b_scale")
            return dict(a_scale=a_scale, a_zero_point=a_zp, b_scale=b_scale, b_zero_point=b_zp, **y,
                        multiplier=(), shift=())
        if attrs.get("a_scale") is None or attrs.get("b_scale") is None:
            raise RuleError(f"a {y['dtype']} output needs a_scale and b_scale")
        a_scale = _one_scale(attrs["a_scale"], "a_scale")
        b_scale = _per_channel(_scales(attrs["b_scale"], "b_scale"), n, "b_scale")
        mult, shift = multipliers([a_scale * bs / y["y_scale"] for bs in _per(b_scale, n)])
        return dict(a_scale=a_scale, a_zero_point=a_zp, b_scale=b_scale, b_zero_point=b_zp, **y,
                    multiplier=mult, shift=shift)

    def infer(self, attrs, types):
        a, b = types
        _quant_check(a, "qmatmul's operand a")
        _quant_check(b, "qmatmul's operand b")
        out = self._shape(a, b)
        _check_acc(a.shape[-1], a.dtype, [attrs["a_zero_point"]], b.dtype, attrs["b_zero_point"])
        return TensorType(out, attrs["dtype"])

    def reference(self, attrs, a, b):
        n = b.shape[-1]
        bz = np.asarray(_per(attrs["b_zero_point"], n), np.int64)
        acc = np.matmul(a.astype(np.int64) - attrs["a_zero_point"], b.astype(np.int64) - bz)
        if attrs["dtype"] == "int32":
            return acc.astype(np.int32)         # |acc| < 2**31: infer's bound
        return _finish(acc, attrs, np.asarray(attrs["multiplier"], np.int64), np.asarray(attrs["shift"], np.int64))

    def context(self, attrs, types, out):
        from .elementwise import broadcast_strides
        a, b = types
        batch = list(out.shape[:-2])
        m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
        nb = shapes.prod(batch)
        from ..host import probe
        jt = max(1, min(n, 2 * probe().lanes("int32")))        # two vectors of int32 sums per column tile
        return dict(M=m, K=k, N=n, BATCH=nb, JT=jt, batch=batch, sa=broadcast_strides(a.shape[:-2], batch),
                    sb=broadcast_strides(b.shape[:-2], batch), AZP=attrs["a_zero_point"],
                    bzp=_per(attrs["b_zero_point"], n), mult=list(attrs["multiplier"]), shift=list(attrs["shift"]),
                    par=[("bi", "BATCH", nb), ("i", "M", m)], **_out_context(attrs))

    def macs(self, attrs, types, out):
        return out.size * types[0].shape[-1]


# -- qadd ------------------------------------------------------------------------
ADD_LEFT_SHIFT = 20
"""qadd's headroom: both inputs are shifted left by this many bits before
being rescaled to a common scale (TensorFlow Lite's ADD); |q - zp| <= 255
times 2**20 stays below 2**28, so the rescaled sum fits int32."""


@builder("a", "b")
def qadd(a: Value, b: Value, *, a_scale, a_zero_point=0, b_scale, b_zero_point=0, y_scale, y_zero_point=0,
         dtype: str = "int8", clamp=None, name=None) -> Value:
    """Quantized ``a + b`` (numpy broadcasting, as :func:`convc.add`) with
    its own output scale, in TensorFlow Lite's integer arithmetic: each input
    ``(q - zp) * 2**20`` is rescaled to the common scale ``2 * max(a_scale,
    b_scale)`` by its own fixed-point multiplier, the two are summed, and the
    sum is requantized to (``y_scale``, ``y_zero_point``, ``dtype``) and
    clamped to ``clamp`` (relu folded: :func:`activation_clamp`)."""
    attrs = dict(a_scale=a_scale, a_zero_point=a_zero_point, b_scale=b_scale, b_zero_point=b_zero_point,
                 y_scale=y_scale, y_zero_point=y_zero_point, dtype=dtype, clamp=clamp)
    return a.graph.add("qadd", [a, b], attrs, name)


@register
class QAdd(Op):
    name = "qadd"
    arity = (2, 2)
    inputs = ("a", "b")

    def normalize(self, attrs, types):
        a, b = types
        _quant_check(a, "qadd's operand a")
        _quant_check(b, "qadd's operand b")
        y = _out_qparams(attrs)
        sa, sb = _one_scale(attrs["a_scale"], "a_scale"), _one_scale(attrs["b_scale"], "b_scale")
        twice = 2.0 * max(sa, sb)
        (ma, mb, my), (ha, hb, hy) = multipliers([sa / twice, sb / twice,
                                                  twice / ((1 << ADD_LEFT_SHIFT) * y["y_scale"])])
        return dict(a_scale=sa, a_zero_point=_one_zero_point(attrs["a_zero_point"], "a_zero_point", a.dtype),
                    b_scale=sb, b_zero_point=_one_zero_point(attrs["b_zero_point"], "b_zero_point", b.dtype),
                    **y, multiplier=(ma, mb, my), shift=(ha, hb, hy))

    def infer(self, attrs, types):
        a, b = types
        _quant_check(a, "qadd's operand a")
        _quant_check(b, "qadd's operand b")
        try:
            out = np.broadcast_shapes(a.shape, b.shape)
        except ValueError:
            raise RuleError(f"shapes {a.shape} and {b.shape} do not broadcast (numpy rules)") from None
        return TensorType(tuple(out), attrs["dtype"])

    @staticmethod
    def rescaled(q, zp, m, s) -> np.ndarray:
        """One input on the common scale: requantize((q - zp) * 2**20)."""
        return requantize((q.astype(np.int64) - zp) << ADD_LEFT_SHIFT, m, s)

    def reference(self, attrs, a, b):
        (ma, mb, my), (ha, hb, hy) = attrs["multiplier"], attrs["shift"]
        total = self.rescaled(a, attrs["a_zero_point"], ma, ha) + self.rescaled(b, attrs["b_zero_point"], mb, hb)
        return _finish(total, attrs, my, hy)

    def context(self, attrs, types, out):
        from .elementwise import broadcast_strides
        # same: both operands are indexed like the output (equal shapes, or a single element)
        same = types[0].shape == types[1].shape == out.shape or out.size == 1
        return dict(SIZE=out.size, dims=list(out.shape), same=same,
                    sa=broadcast_strides(types[0].shape, out.shape), sb=broadcast_strides(types[1].shape, out.shape),
                    AZP=attrs["a_zero_point"], BZP=attrs["b_zero_point"], LEFT=ADD_LEFT_SHIFT,
                    mult=list(attrs["multiplier"]), shift=list(attrs["shift"]), par=[("i", "SIZE", out.size)],
                    **_out_context(attrs))

    def macs(self, attrs, types, out):
        return 3 * out.size             # three fixed-point multiplications per element


# -- qconcat ---------------------------------------------------------------------
def qconcat(values, axis: int = 1, *, x_scales, x_zero_points, y_scale, y_zero_point=0, dtype: str = "int8",
            name=None) -> Value:
    """Join quantized tensors along ``axis``, each input requantized from
    its own (``x_scales[i]``, ``x_zero_points[i]``) to the output's
    (``y_scale``, ``y_zero_point``, ``dtype``): ``requantize((q - zp_i) *
    2**20, x_scale_i / (y_scale * 2**20)) + y_zero_point`` (the shift:
    :func:`headroom`); an input with the output's dtype, scale and zero point
    is copied."""
    from ..errors import GraphError
    vals = list(values) if isinstance(values, (list, tuple)) else None
    if not vals or not all(isinstance(v, Value) for v in vals):
        raise GraphError(f"qconcat takes a non-empty list of convc Values, got {values!r:.80}")
    attrs = dict(axis=axis, x_scales=x_scales, x_zero_points=x_zero_points, y_scale=y_scale,
                 y_zero_point=y_zero_point, dtype=dtype)
    return vals[0].graph.add("qconcat", vals, attrs, name)


@register
class QConcat(Op):
    name = "qconcat"
    arity = (1, 64)
    inputs = ()          # x0, x1, ...

    def normalize(self, attrs, types):
        from .tensor import _axis as tensor_axis
        for i, t in enumerate(types):
            _quant_check(t, f"qconcat's input {i}")
        scales = _scales(attrs["x_scales"], "x_scales")
        zps = attrs["x_zero_points"]
        zps = tuple(np.ravel(np.asarray(zps, dtype=object)).tolist()) if not isinstance(zps, (int, np.integer)) \
            else (zps,)
        if len(scales) != len(types) or len(zps) != len(types):
            raise RuleError(f"x_scales and x_zero_points need one entry per input ({len(types)}), got "
                            f"{len(scales)} and {len(zps)}")
        zps = tuple(_one_zero_point(z, f"x_zero_points[{i}]", t.dtype) for i, (z, t) in enumerate(zip(zps, types)))
        y = _out_qparams(dict(attrs, clamp=None))
        pre = headroom(max(_max_abs(t.dtype, [z]) for t, z in zip(types, zps)))
        mult, shift = multipliers([s / (y["y_scale"] * 2**pre) for s in scales])
        copy = tuple(t.dtype == y["dtype"] and s == y["y_scale"] and z == y["y_zero_point"]
                     for t, s, z in zip(types, scales, zps))
        return dict(axis=tensor_axis(attrs["axis"], len(types[0].shape)), x_scales=scales, x_zero_points=zps,
                    **y, pre_shift=pre, multiplier=mult, shift=shift, copy=copy)

    def infer(self, attrs, types):
        from .registry import get_op
        for i, t in enumerate(types):
            _quant_check(t, f"qconcat's input {i}")
        # concat's shape rule, on the inputs seen as one dtype
        same = [TensorType(t.shape, attrs["dtype"]) for t in types]
        return get_op("concat").infer({"axis": attrs["axis"]}, same)

    def reference(self, attrs, *xs):
        lo, hi = attrs["clamp"]
        parts = [x.astype(attrs["dtype"]) if cp else
                 np.clip(requantize((x.astype(np.int64) - z) << attrs["pre_shift"], m, s) + attrs["y_zero_point"],
                         lo, hi).astype(
                     attrs["dtype"])
                 for x, z, m, s, cp in zip(xs, attrs["x_zero_points"], attrs["multiplier"], attrs["shift"],
                                           attrs["copy"])]
        return np.concatenate(parts, axis=attrs["axis"])

    def context(self, attrs, types, out):
        ax = attrs["axis"]
        outer = shapes.prod(out.shape[:ax])
        ins = [dict(ROW=shapes.prod(t.shape[ax:]), same=cp, XZP=z, mult=m, shift=s)
               for t, cp, z, m, s in zip(types, attrs["copy"], attrs["x_zero_points"], attrs["multiplier"],
                                         attrs["shift"])]
        return dict(OUTER=outer, OUT_ROW=shapes.prod(out.shape[ax:]), ins=ins, PRE=attrs["pre_shift"],
                    par=[("o", "OUTER", outer)], **_out_context(attrs))

    def macs(self, attrs, types, out):
        return sum(t.size for t, cp in zip(types, attrs["copy"]) if not cp)


# -- qavg_pool, qglobal_avg_pool -------------------------------------------------
def _pool_qparams(attrs, x: TensorType) -> dict:
    """Input and output qparams of a quantized pool; the output's default
    to the input's (dtype, scale, zero point)."""
    _quant_check(x, "the input")
    x_scale = _one_scale(attrs["x_scale"], "x_scale")
    x_zp = _one_zero_point(attrs["x_zero_point"], "x_zero_point", x.dtype)
    dtype = x.dtype if attrs.get("dtype") is None else attrs["dtype"]
    y = _out_qparams(dict(attrs, dtype=dtype, y_scale=x_scale if attrs.get("y_scale") is None else attrs["y_scale"],
                          y_zero_point=x_zp if attrs.get("y_zero_point") is None else attrs["y_zero_point"]))
    return dict(x_scale=x_scale, x_zero_point=x_zp, **y)


def _count_multipliers(q: dict, counts: int, pre: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The requantization of a window sum (shifted left by ``pre``) divided
    by its count, for every count 1..counts (entry 0 unused): x_scale /
    (y_scale * count * 2**pre)."""
    mult, shift = multipliers([q["x_scale"] / (q["y_scale"] * c * 2**pre) for c in range(1, counts + 1)])
    return (0,) + mult, (0,) + shift


@builder("x")
def qavg_pool(x: Value, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, *, x_scale,
              x_zero_point=0, y_scale=None, y_zero_point=None, dtype=None, clamp=None, name=None) -> Value:
    """Quantized average pool (geometry as :func:`convc.avg_pool`): the
    window's ``sum (q - x_zero_point)`` in int32 (a padded tap is the real 0,
    adding nothing), shifted left by :func:`headroom` bits and requantized by
    ``x_scale / (y_scale * count * 2**bits)`` with the
    window's count (the divisor :func:`convc.avg_pool` uses), plus
    ``y_zero_point``, clamped. The output qparams default to the input's."""
    attrs = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=1, ceil_mode=ceil_mode,
                 count_include_pad=count_include_pad, x_scale=x_scale, x_zero_point=x_zero_point, y_scale=y_scale,
                 y_zero_point=y_zero_point, dtype=dtype, clamp=clamp)
    return x.graph.add("qavg_pool", [x], attrs, name)


@register
class QAvgPool(Op):
    name = "qavg_pool"
    GEOMETRY = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "count_include_pad")

    @staticmethod
    def _float_pool():
        from .registry import get_op
        return get_op("avg_pool")

    def normalize(self, attrs, types):
        x = types[0]
        geo = self._float_pool().normalize({k: attrs[k] for k in self.GEOMETRY}, [TensorType(x.shape, "float32")])
        q = _pool_qparams(attrs, x)
        taps = shapes.prod(geo["kernel_size"])
        pre = headroom(taps * _max_abs(x.dtype, [q["x_zero_point"]]))
        mult, shift = _count_multipliers(q, taps, pre)
        return dict(geo, **q, pre_shift=pre, multiplier=mult, shift=shift)

    def infer(self, attrs, types):
        x = types[0]
        _quant_check(x, "qavg_pool's input")
        _check_sum(shapes.prod(attrs["kernel_size"]), x.dtype, attrs["x_zero_point"], "taps per window")
        geo = {k: attrs[k] for k in self.GEOMETRY}
        return TensorType(self._float_pool().infer(geo, [TensorType(x.shape, "float32")]).shape, attrs["dtype"])

    def reference(self, attrs, x):
        pool = self._float_pool()
        k, s, d, pads, out, extra = pool._geometry(attrs, x.shape)
        full = [(lo, hi + e) for (lo, hi), e in zip(pads, extra)]
        total = sum(v for _, v in windows(padded(x.astype(np.int64) - attrs["x_zero_point"], full, 0), k, s, d, out))
        ones = np.ones((1, 1) + x.shape[2:], np.int64)
        if attrs["count_include_pad"]:   # padded region counts, the ceil_mode overhang does not (avg_pool's rule)
            mask = np.pad(np.pad(ones, [(0, 0), (0, 0)] + list(pads), constant_values=1),
                          [(0, 0), (0, 0)] + [(0, e) for e in extra])
        else:
            mask = padded(ones, full, 0)
        count = sum(v for _, v in windows(mask, k, s, d, out))
        m = np.asarray(attrs["multiplier"], np.int64)[count]
        sh = np.asarray(attrs["shift"], np.int64)[count]
        return _finish(total << attrs["pre_shift"], attrs, m, sh)

    def context(self, attrs, types, out):
        x = types[0]
        axes = axes_context(x.shape[2:], out.shape[2:], attrs["kernel_size"], attrs["stride"], attrs["dilation"],
                            attrs["padding"])
        for a, (_, hi) in zip(axes, attrs["padding"]):
            a["hi"] = hi
        nc = x.shape[0] * x.shape[1]
        return dict(NC=nc, axes=axes, count_include_pad=attrs["count_include_pad"], XZP=attrs["x_zero_point"],
                    PRE=attrs["pre_shift"],
                    COUNTS=len(attrs["multiplier"]), mult=list(attrs["multiplier"]), shift=list(attrs["shift"]),
                    par=[("nc", "NC", nc)] + [("o" + a["l"], "OUT_" + a["U"], a["o"]) for a in axes[:-1]],
                    **_out_context(attrs))

    def macs(self, attrs, types, out):
        return out.size


@builder("x")
def qglobal_avg_pool(x: Value, *, x_scale, x_zero_point=0, y_scale=None, y_zero_point=None, dtype=None, clamp=None,
                     name=None) -> Value:
    """Quantized mean over all spatial axes, (N, C, 1, ...): the plane's
    ``sum (q - x_zero_point)`` in int32, shifted left by :func:`headroom`
    bits, requantized by ``x_scale / (y_scale * H*W * 2**bits)``, plus
    ``y_zero_point``, clamped. Output qparams default to the input's."""
    attrs = dict(x_scale=x_scale, x_zero_point=x_zero_point, y_scale=y_scale, y_zero_point=y_zero_point,
                 dtype=dtype, clamp=clamp)
    return x.graph.add("qglobal_avg_pool", [x], attrs, name)


@register
class QGlobalAvgPool(Op):
    name = "qglobal_avg_pool"

    def normalize(self, attrs, types):
        x = types[0]
        if not 3 <= len(x.shape) <= 5:
            raise RuleError(f"input must be (N, C, *spatial) with 1 to 3 spatial axes, got rank {len(x.shape)}")
        q = _pool_qparams(attrs, x)
        hw = shapes.prod(x.shape[2:])
        pre = headroom(hw * _max_abs(x.dtype, [q["x_zero_point"]]))
        (m,), (s,) = multipliers([q["x_scale"] / (q["y_scale"] * hw * 2**pre)])
        return dict(q, pre_shift=pre, multiplier=m, shift=s)

    def infer(self, attrs, types):
        x = types[0]
        _quant_check(x, "qglobal_avg_pool's input")
        _check_sum(shapes.prod(x.shape[2:]), x.dtype, attrs["x_zero_point"], "elements per plane")
        return TensorType(x.shape[:2] + (1,) * (len(x.shape) - 2), attrs["dtype"])

    def reference(self, attrs, x):
        acc = (x.astype(np.int64) - attrs["x_zero_point"]).sum(axis=tuple(range(2, x.ndim)), keepdims=True)
        return _finish(acc << attrs["pre_shift"], attrs, attrs["multiplier"], attrs["shift"])

    def context(self, attrs, types, out):
        x = types[0]
        nc = x.shape[0] * x.shape[1]
        return dict(NC=nc, HW=shapes.prod(x.shape[2:]), XZP=attrs["x_zero_point"], PRE=attrs["pre_shift"],
                    MULT=attrs["multiplier"],
                    SHIFT=attrs["shift"], par=[("nc", "NC", nc)], **_out_context(attrs))

    def macs(self, attrs, types, out):
        return out.size


# -- qlookup ---------------------------------------------------------------------
def lookup_table(fn, x_scale, x_zero_point, y_scale, y_zero_point, dtype: str = "int8", x_dtype: str = "int8",
                 **params) -> np.ndarray:
    """The 256-entry table of a float function on quantized values, for
    :func:`qlookup`: entry ``q - min(x_dtype)`` holds ``quantize(fn(
    dequantize(q)))``, every step in float32 as a float graph ``dequantize ->
    fn -> quantize`` computes it (convc/quant.py's rounding). ``fn`` is an
    activation of convc's table (``"hardswish"``, ``"sigmoid"``, ``"tanh"``,
    ``"silu"``, ``"gelu"``, ``"leaky_relu"``, ..., with its ``params``) or a
    numpy function of a float32 array. This is how such activations run in an
    int8 graph: one table read per element, no float arithmetic in C."""
    from ..errors import GraphError
    try:
        return _lookup_table(fn, x_scale, x_zero_point, y_scale, y_zero_point, dtype, x_dtype, params)
    except RuleError as e:
        raise GraphError(f"lookup_table: {e}") from None


def _lookup_table(fn, x_scale, x_zero_point, y_scale, y_zero_point, dtype, x_dtype, params) -> np.ndarray:
    from . import activations
    lo, hi = qrange(x_dtype)
    q = np.arange(lo, hi + 1)
    r = dequantize_array(q, _one_scale(x_scale, "x_scale"), _one_zero_point(x_zero_point, "x_zero_point", x_dtype))
    if isinstance(fn, str):
        act = activations.get(fn)
        y = act.apply(r, act.normalize(params))
    elif callable(fn):
        if params:
            raise RuleError(f"params {sorted(params)} are for a named activation, not a function")
        y = np.asarray(fn(r), dtype=np.float32)
        if y.shape != r.shape:
            raise RuleError(f"fn must map the 256 values elementwise, got shape {y.shape}")
    else:
        raise RuleError(f"fn must be an activation name or a function, got {fn!r}")
    return quantize_array(y.astype(np.float32), _one_scale(y_scale, "y_scale"),
                          _one_zero_point(y_zero_point, "y_zero_point", _qdtype(dtype, "dtype")), dtype)


TABLE_SIZE = 256


@builder("x")
def qlookup(x: Value, table, name=None) -> Value:
    """``y[i] = table[x[i] - min(x.dtype)]``: any int8/uint8 -> int8/uint8
    function as a 256-entry table (:func:`lookup_table` builds one for an
    activation). ``table`` is a Value or an int8/uint8 numpy array (made a
    constant); the output has the table's dtype."""
    if not isinstance(table, Value):
        arr = np.asarray(table)
        if arr.dtype.name not in QDTYPES:
            from ..errors import GraphError
            raise GraphError(f"qlookup: table must be an int8 or uint8 array (lookup_table makes one), "
                             f"got {arr.dtype}")
        table = x.graph.const(arr, arr.dtype.name)
    return x.graph.add("qlookup", [x, table], {}, name)


@register
class QLookup(Op):
    name = "qlookup"
    arity = (2, 2)
    inputs = ("x", "table")

    def infer(self, attrs, types):
        x, t = types
        _quant_check(x, "qlookup's input x")
        _quant_check(t, "qlookup's table")
        if t.shape != (TABLE_SIZE,):
            raise RuleError(f"table must have {TABLE_SIZE} entries (one per {x.dtype} value), got shape {t.shape}")
        return TensorType(x.shape, t.dtype)

    def reference(self, attrs, x, table):
        return table[x.astype(np.int64) - qrange(str(x.dtype))[0]]

    def context(self, attrs, types, out):
        return dict(SIZE=out.size, OFFSET=-qrange(types[0].dtype)[0], par=[("i", "SIZE", out.size)])

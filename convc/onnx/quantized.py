"""The converters of ONNX's quantized ops (QuantizeLinear, DequantizeLinear,
QLinearConv, QLinearMatMul, MatMulInteger, ConvInteger, and ONNX Runtime's
QLinearAdd, QGemm, QLinearConcat, QLinearGlobalAveragePool) to convc's
integer ops (issue 15)."""
from __future__ import annotations

import numpy as np

from ..ops.quantized import dequantize, qadd, qconcat, qconv, qdense, qglobal_avg_pool, qmatmul, quantize
from ..quant import QDTYPES
from ..ops.tensor import transpose
from .importer import (STATIC_INPUTS, _DTYPE_OF_ELEM, _WINDOW, _Unsupported, _axis, _elem_name, _matmul_2d,
                       _conv_window, converts)


# -- quantized ops (issue 15) -----------------------------------------------------------
# Scales and zero points are compile-time constants in convc (they decide the
# fixed-point multipliers, computed in Python); a constant DequantizeLinear
# (an int8 weight, an int32 bias) is folded like any constant node, so a QDQ
# model reaches convc as quantize -> dequantize -> float op -> quantize, which
# passes/qdq.py's fold_qdq turns into integer ops.
STATIC_INPUTS.update(QuantizeLinear=(1, 2), DequantizeLinear=(1, 2), QLinearConv=(1, 2, 4, 5, 6, 7),
                     QLinearMatMul=(1, 2, 4, 5, 6, 7), MatMulInteger=(2, 3), ConvInteger=(2, 3))


def _qparams(im, scale: str, zero_point: str, what: str, per_axis_ok: bool = True, half_ok: bool = False):
    """(scales, zero points, dtype of the zero point or None) of a quantized
    tensor, from constant inputs; one entry each per tensor, or one per index
    of an axis (1-D). Scales are float32; ``half_ok`` (the QLinear ops, whose
    output is integer) also takes float16 ones, each exactly a float32 value
    (the fixed-point multipliers are computed from the values)."""
    s = im.const(scale, f"{what}'s scale") if scale else None
    kinds = (np.float32, np.float16) if half_ok else (np.float32,)
    if s is not None and (s.dtype not in kinds or s.ndim > 1):
        raise _Unsupported(f"{what}'s scale (input {scale!r}) must be a "
                           f"{' or '.join(np.dtype(k).name for k in kinds)} scalar or 1-D tensor, got {s.dtype} of "
                           f"shape {s.shape}")
    z = im.const(zero_point, f"{what}'s zero point") if zero_point else None
    if z is not None and (z.dtype.name not in QDTYPES or z.ndim > 1):
        raise _Unsupported(f"{what}'s zero point (input {zero_point!r}) must be an int8 or uint8 scalar or 1-D "
                           f"tensor, got {z.dtype} of shape {z.shape}")
    if not per_axis_ok and any(v is not None and v.size > 1 for v in (s, z)):
        raise _Unsupported(f"{what} must be quantized per tensor (one scale and zero point); convc quantizes "
                           "activations per tensor")
    scales = None if s is None else tuple(float(v) for v in s.reshape(-1))
    zps = (0,) if z is None else tuple(int(v) for v in z.reshape(-1))
    return scales, zps, None if z is None else z.dtype.name


def _q_axis(at, rank: int, *sizes: int):
    """The axis of per-axis quantization (None for per tensor)."""
    return _axis(at["axis"], rank) if max(sizes) > 1 else None


def _no_blocks(at):
    if at.get("block_size"):
        raise _Unsupported(f"block_size={at['block_size']} (blocked quantization) is not supported; convc "
                           "quantizes per tensor or per axis")


@converts("QuantizeLinear", axis=1, saturate=1, block_size=0, output_dtype=0, precision=0)
def _quantize_linear(im, node, ins, at):
    _no_blocks(at)
    x = im.value(ins[0])
    if x.dtype not in ("float32", "float64"):
        raise _Unsupported(f"input {ins[0]!r} is {x.dtype}; convc quantizes float32 and float64 tensors")
    if at["precision"]:
        raise _Unsupported(f"precision={at['precision']} is not supported (convc divides in the input's type)")
    scales, zps, zdt = _qparams(im, ins[1], ins[2], "the output")
    dtype = zdt or (_DTYPE_OF_ELEM.get(at["output_dtype"]) if at["output_dtype"] else "uint8")
    if dtype not in QDTYPES:
        raise _Unsupported(f"output type {dtype or _elem_name(at['output_dtype'])} is not supported; convc "
                           f"quantizes to {' and '.join(QDTYPES)}")
    axis = _q_axis(at, len(x.shape), len(scales), len(zps))
    return [quantize(x, scales, zps, dtype, axis, name=im.name(node))]


@converts("DequantizeLinear", axis=1, block_size=0, output_dtype=0)
def _dequantize_linear(im, node, ins, at):
    _no_blocks(at)
    x = im.value(ins[0])
    if x.dtype not in QDTYPES:
        raise _Unsupported(f"input {ins[0]!r} is {x.dtype}; convc dequantizes int8 and uint8 tensors at run time "
                           "(a constant of another type is folded at import)")
    if at["output_dtype"] not in (0, 1):
        raise _Unsupported(f"output_dtype {_elem_name(at['output_dtype'])} is not supported (float32 only)")
    scales, zps, _ = _qparams(im, ins[1], ins[2], "the input")
    axis = _q_axis(at, len(x.shape), len(scales), len(zps))
    return [dequantize(x, scales, zps, axis, name=im.name(node))]


@converts("QLinearConv", dilations=None, group=1, **_WINDOW)
def _qlinear_conv(im, node, ins, at):
    x, w = im.value(ins[0]), im.value(ins[3])
    s, d, pads = _conv_window(node, at, x, w)
    xs, xz, _ = _qparams(im, ins[1], ins[2], "input x", per_axis_ok=False, half_ok=True)
    ws, wz, _ = _qparams(im, ins[4], ins[5], "weight w", half_ok=True)
    ys, yz, ydt = _qparams(im, ins[6], ins[7], "output y", per_axis_ok=False, half_ok=True)
    b = im.value(ins[8]) if len(node.input) > 8 and node.input[8] else None
    return [qconv(x, w, b, x_scale=xs, x_zero_point=xz, w_scale=ws, w_zero_point=wz, y_scale=ys, y_zero_point=yz,
                  dtype=ydt or "uint8", stride=s, padding=pads, dilation=d, groups=at["group"], name=im.name(node))]


@converts("ConvInteger", dilations=None, group=1, **_WINDOW)
def _conv_integer(im, node, ins, at):
    """qconv's raw int32 output (no requantization): the sums of (x - x_zp)
    * (w - w_zp), zero-padded (the scales are placeholders: 1)."""
    x, w = im.value(ins[0]), im.value(ins[1])
    s, d, pads = _conv_window(node, at, x, w)
    _, xz, _ = _qparams(im, "", ins[2], "input x", per_axis_ok=False)
    _, wz, _ = _qparams(im, "", ins[3], "weight w")
    return [qconv(x, w, None, x_scale=1.0, x_zero_point=xz, w_scale=1.0, w_zero_point=wz, y_scale=None,
                  dtype="int32", stride=s, padding=pads, dilation=d, groups=at["group"], name=im.name(node))]


@converts("QLinearMatMul")
def _qlinear_matmul(im, node, ins, at):
    a, b = im.value(ins[0]), im.value(ins[3])
    as_, az, _ = _qparams(im, ins[1], ins[2], "input a", per_axis_ok=False, half_ok=True)
    bs, bz, _ = _qparams(im, ins[4], ins[5], "input b", half_ok=True)
    ys, yz, ydt = _qparams(im, ins[6], ins[7], "output y", per_axis_ok=False, half_ok=True)
    return [_matmul_2d(im, node, a, b, lambda p, q, name: qmatmul(
        p, q, a_scale=as_, a_zero_point=az, b_scale=bs, b_zero_point=bz, y_scale=ys, y_zero_point=yz,
        dtype=ydt or "uint8", name=name))]


@converts("MatMulInteger")
def _matmul_integer(im, node, ins, at):
    a, b = im.value(ins[0]), im.value(ins[1])
    _, az, _ = _qparams(im, "", ins[2], "input a", per_axis_ok=False)
    _, bz, _ = _qparams(im, "", ins[3], "input b")
    return [_matmul_2d(im, node, a, b, lambda p, q, name: qmatmul(
        p, q, a_zero_point=az, b_zero_point=bz, dtype="int32", name=name))]


# ONNX Runtime's QOperator format: its contrib ops (domain com.microsoft), as
# its quantizer writes them.
@converts("com.microsoft.QLinearAdd")
def _qlinear_add(im, node, ins, at):
    a, b = im.value(ins[0]), im.value(ins[3])
    as_, az, _ = _qparams(im, ins[1], ins[2], "input A", per_axis_ok=False, half_ok=True)
    bs, bz, _ = _qparams(im, ins[4], ins[5], "input B", per_axis_ok=False, half_ok=True)
    ys, yz, ydt = _qparams(im, ins[6], ins[7] if len(node.input) > 7 else "", "output C", per_axis_ok=False,
                           half_ok=True)
    return [qadd(a, b, a_scale=as_, a_zero_point=az, b_scale=bs, b_zero_point=bz, y_scale=ys, y_zero_point=yz,
                 dtype=ydt or a.dtype, name=im.name(node))]


@converts("com.microsoft.QGemm", alpha=1.0, transA=0, transB=0)
def _qgemm(im, node, ins, at):
    a, b = im.value(ins[0]), im.value(ins[3])
    if at["transA"] or at["alpha"] != 1.0:
        raise _Unsupported(f"transA={at['transA']}, alpha={at['alpha']} (convc maps transA=0, alpha=1)")
    if len(node.input) < 8 or not node.input[7]:
        raise _Unsupported("QGemm without y_scale (a float output) is not supported")
    as_, az, _ = _qparams(im, ins[1], ins[2], "input A", per_axis_ok=False, half_ok=True)
    bs, bz, _ = _qparams(im, ins[4], ins[5], "input B", half_ok=True)
    ys, yz, ydt = _qparams(im, ins[7], ins[8] if len(node.input) > 8 else "", "output Y", per_axis_ok=False,
                           half_ok=True)
    bias = im.value(ins[6]) if ins[6] else None
    if bias is not None and (bias.dtype != "int32" or len(bias.shape) != 1):
        raise _Unsupported(f"C {bias.dtype}{list(bias.shape)} must be an int32 vector (one per output column)")
    w = b if at["transB"] else transpose(b, (1, 0), name=im.name(node, "b_t"))
    return [qdense(a, w, bias, x_scale=as_, x_zero_point=az, w_scale=bs, w_zero_point=bz, y_scale=ys,
                   y_zero_point=yz, dtype=ydt or a.dtype, name=im.name(node))]


@converts("com.microsoft.QLinearConcat", axis=None)
def _qlinear_concat(im, node, ins, at):
    ys, yz, ydt = _qparams(im, node.input[0], node.input[1], "output Y", per_axis_ok=False, half_ok=True)
    rest = list(node.input[2:])
    if at["axis"] is None or len(rest) % 3:
        raise _Unsupported("QLinearConcat needs axis and (tensor, scale, zero point) triples")
    xs, scales, zps = [], [], []
    for i in range(0, len(rest), 3):
        s, z, _ = _qparams(im, rest[i + 1], rest[i + 2], f"input {i // 3}", per_axis_ok=False, half_ok=True)
        xs.append(im.value(rest[i]))
        scales.append(s[0])
        zps.append(z[0])
    return [qconcat(xs, at["axis"], x_scales=scales, x_zero_points=zps, y_scale=ys[0], y_zero_point=yz[0],
                    dtype=ydt or xs[0].dtype, name=im.name(node))]


@converts("com.microsoft.QLinearGlobalAveragePool", channels_last=0)
def _qlinear_global_avg_pool(im, node, ins, at):
    if at["channels_last"]:
        raise _Unsupported("channels_last=1 is not supported (convc pools NCHW)")
    x = im.value(ins[0])
    xs, xz, _ = _qparams(im, ins[1], ins[2], "input X", per_axis_ok=False, half_ok=True)
    ys, yz, ydt = _qparams(im, ins[3], ins[4], "output Y", per_axis_ok=False, half_ok=True)
    return [qglobal_avg_pool(x, x_scale=xs, x_zero_point=xz, y_scale=ys, y_zero_point=yz, dtype=ydt or x.dtype,
                             name=im.name(node))]

"""The converters of ONNX's elementwise math that is not one activation
record: Pow, PRelu and the variadic Sum, Mean, Max, Min.

The unary ops -- Elu, Selu, Softplus, Softsign, ThresholdedRelu, Mish,
HardSigmoid, HardSwish, Sqrt, Exp, Log, Neg, Abs, Reciprocal, Erf -- are
records of the activation table (``convc/ops/activations.py``: ONNX name,
attributes and ONNX's defaults there), and :mod:`.converters` registers one
converter per record; nothing of theirs is repeated here.

Versions (opset 7 on): Pow took one type for base and exponent up to 11;
12 lets the exponent be any numeric type (the output keeps the base's),
13 and 15 add bfloat16 (which convc does not compute in): one converter
serves them all. Sum, Mean, Max and Min broadcast multidirectionally from
opset 8 on; opset 6-7 required equal shapes, which broadcasting includes.
"""
from __future__ import annotations

import numpy as np

from ..ops.elementwise import add, div, maximum, minimum, mul, pow as pow_, prelu
from .converters import _LEGACY, _legacy_broadcast
from .importer import _Unsupported, converts


@converts("Pow", **_LEGACY)
def _pow(im, node, ins, at):
    x = im.value(ins[0])
    y = im.env[ins[1]]
    if isinstance(y, np.ndarray) and y.size == 1 and y.ndim <= len(x.shape) and float(y.reshape(-1)[0]) in (2, 3):
        # ONNX Runtime's own special cases (a scalar exponent of 2 or 3): x * x, x * x * x, so the
        # result is bit for bit ORT's (and no pow call); the broadcast shape is x's
        sq = mul(x, x, name=im.name(node) if y.reshape(-1)[0] == 2 else im.name(node, "square"))
        return [sq if y.reshape(-1)[0] == 2 else mul(sq, x, name=im.name(node))]
    e = im.value(ins[1])
    return [pow_(x, _legacy_broadcast(im, node, e, len(x.shape), at), name=im.name(node))]


@converts("PRelu")
def _prelu(im, node, ins, at):
    x, slope = im.value(ins[0]), im.value(ins[1])
    try:
        out = np.broadcast_shapes(x.shape, slope.shape)
    except ValueError:
        out = None
    if out != x.shape:
        raise _Unsupported(f"slope {slope.shape} does not broadcast to X {x.shape} (PRelu broadcasts "
                           f"unidirectionally: slope to X's shape)")
    return [prelu(x, slope, name=im.name(node))]


def _variadic(fn, what: str):
    """A converter folding ``fn`` over 1..n inputs, left to right (as ONNX
    Runtime does), numpy broadcasting throughout."""
    def convert(im, node, ins, at):
        values = [im.value(i) for i in ins if i]
        if not values:
            raise _Unsupported(f"{what} needs at least one input")
        try:
            np.broadcast_shapes(*(v.shape for v in values))
        except ValueError:
            raise _Unsupported(f"input shapes {', '.join(str(v.shape) for v in values)} do not broadcast "
                               f"(numpy's multidirectional rule)") from None
        return [fn(im, node, values)]
    return convert


def _fold(op):
    def fold(im, node, values):
        if len(values) == 1:
            return values[0]
        y = values[0]
        for k, v in enumerate(values[1:], 1):
            y = op(y, v, name=im.name(node) if k == len(values) - 1 else im.name(node, f"{k}"))
        return y
    return fold


def _mean(im, node, values):
    """Sum / n (ONNX Runtime's order: the sum left to right, then one division)."""
    if len(values) == 1:
        return values[0]
    s = values[0]
    for k, v in enumerate(values[1:], 1):
        s = add(s, v, name=im.name(node, f"sum{k}"))
    return div(s, float(len(values)), name=im.name(node))


converts("Sum")(_variadic(_fold(add), "Sum"))
converts("Max")(_variadic(_fold(maximum), "Max"))
converts("Min")(_variadic(_fold(minimum), "Min"))
converts("Mean")(_variadic(_mean, "Mean"))

"""``conv``: N-d convolution (cross-correlation, or true convolution with
``flip=True``), Eq 1/2 of the reference, with stride, every padding form,
dilation, groups and tied or untied bias."""
from __future__ import annotations

import numpy as np

from .. import shapes
from ..errors import RuleError
from ..ir import TensorType, Value
from .registry import Op, as_value, float_dtype, register, same_dtype
from .window import axes_context, padded, windows


def conv(x: Value, w, bias=None, stride=1, padding=0, dilation=1, groups=1, flip=False, name=None) -> Value:
    """Convolve ``x`` (N, C_in, *spatial) with ``w`` (C_out, C_in/groups, *k).

    ``stride``/``dilation``: int or per-axis tuple. ``padding``: int, per-axis
    tuple, per-axis ``(lo, hi)`` pairs, ``"valid"``, ``"same"`` or ``"full"``.
    ``bias``: ``(C_out,)`` (tied) or ``(C_out, *out_spatial)`` (untied).
    ``flip=True`` flips the kernel (true convolution instead of
    cross-correlation). Returns (N, C_out, *out_spatial).
    """
    w = as_value(x, w, "conv weight")
    ins = [x, w] + ([as_value(x, bias, "conv bias")] if bias is not None else [])
    attrs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, flip=flip)
    return x.graph.add("conv", ins, attrs, name)


def conv_geometry(attrs, x: TensorType, w: TensorType):
    """Validate conv-like geometry; returns normalised attrs and output shape."""
    if not 3 <= len(x.shape) <= 5:
        raise RuleError(f"input must be (N, C, *spatial) with 1 to 3 spatial axes, got rank {len(x.shape)}")
    rank = len(x.shape) - 2
    if len(w.shape) != len(x.shape):
        raise RuleError(f"weight must have rank {len(x.shape)} (C_out, C_in/groups, *k) like the input, "
                        f"got rank {len(w.shape)}")
    stride = shapes.positive(shapes.per_axis(attrs["stride"], rank, "stride"), "stride")
    dilation = shapes.positive(shapes.per_axis(attrs["dilation"], rank, "dilation"), "dilation")
    groups = attrs["groups"]
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise RuleError(f"groups must be an int >= 1, got {groups!r}")
    groups = int(groups)
    n, c_in, *sizes = x.shape
    c_out, c_in_g, *kernel = w.shape
    if c_in % groups:
        raise RuleError(f"input channels {c_in} are not divisible by groups={groups}")
    if c_out % groups:
        raise RuleError(f"output channels {c_out} (weight dim 0) are not divisible by groups={groups}")
    if c_in_g != c_in // groups:
        raise RuleError(f"weight channels {c_in_g} (dim 1) must equal input channels / groups = "
                        f"{c_in} / {groups} = {c_in // groups}")
    pads = shapes.normalize_padding(attrs["padding"], sizes, kernel, stride, dilation)
    out = shapes.window_out_sizes(sizes, kernel, stride, dilation, pads)
    attrs = dict(attrs, stride=stride, padding=pads, dilation=dilation, groups=groups)
    return attrs, (n, c_out, *out)


@register
class Conv(Op):
    name = "conv"
    arity = (2, 3)
    inputs = ("x", "w", "b")

    def normalize(self, attrs, types):
        attrs, _ = conv_geometry(attrs, types[0], types[1])
        attrs["flip"] = bool(attrs["flip"])
        return attrs

    def infer(self, attrs, types):
        x, w = types[:2]
        dtype = same_dtype(types)
        float_dtype(x)
        _, out = conv_geometry(attrs, x, w)
        if len(types) == 3:
            b = types[2].shape
            if b != (out[1],) and b != out[1:]:
                raise RuleError(f"bias must be ({out[1]},) (tied) or {out[1:]} (untied), got {b}")
        return TensorType(out, dtype)

    def reference(self, attrs, x, w, b=None):
        g = attrs["groups"]
        n, c_in = x.shape[:2]
        c_out, c_in_g, *kernel = w.shape
        if attrs["flip"]:
            w = w[(slice(None), slice(None)) + (slice(None, None, -1),) * len(kernel)]
        out_sizes = shapes.window_out_sizes(x.shape[2:], kernel, attrs["stride"], attrs["dilation"],
                                            attrs["padding"])
        xp = padded(x, attrs["padding"])
        wg = w.reshape(g, c_out // g, c_in_g, *kernel)
        acc = np.zeros((n, g, c_out // g) + out_sizes, dtype=x.dtype)
        for offs, view in windows(xp, kernel, attrs["stride"], attrs["dilation"], out_sizes):
            v = view.reshape(n, g, c_in_g, *out_sizes)
            acc += np.einsum("ngc...,goc->ngo...", v, wg[(Ellipsis,) + offs])
        y = acc.reshape(n, c_out, *out_sizes)
        if b is not None:
            y = y + (b.reshape(c_out, *([1] * len(out_sizes))) if b.ndim == 1 else b)
        return y.astype(x.dtype)

    def context(self, attrs, types, out):
        x, w = types[:2]
        g = attrs["groups"]
        bias = "none" if len(types) == 2 else ("tied" if len(types[2].shape) == 1 else "untied")
        return dict(N=x.shape[0], C_IN=x.shape[1], C_OUT=w.shape[0], GROUPS=g,
                    C_IN_G=x.shape[1] // g, C_OUT_G=w.shape[0] // g, flip=attrs["flip"], bias=bias,
                    axes=axes_context(x.shape[2:], out.shape[2:], w.shape[2:], attrs["stride"],
                                      attrs["dilation"], attrs["padding"]))

    def macs(self, attrs, types, out):
        w = types[1]
        return shapes.prod(out.shape) * shapes.prod(w.shape[1:])

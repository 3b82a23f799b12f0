"""``conv``: N-d convolution (cross-correlation, or true convolution with
``flip=True``), Eq 1/2 of the reference, with stride, every padding form,
dilation, groups and tied or untied bias."""
from __future__ import annotations

import numpy as np

from .. import shapes
from ..errors import RuleError
from ..ir import TensorType, Value
from . import epilogue
from .registry import Op, as_value, builder, float_dtype, register, rules, same_dtype
from .window import axes_context, padded, windows


@builder("x")
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
    if min(w.shape) < 1:
        raise RuleError(f"weight {w.shape} has an empty dimension; kernel sizes and channels must be >= 1")
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
    """Inputs x, w, an optional bias and, with ``residual=True``, the residual
    of the epilogue (ops/epilogue.py) last."""
    name = "conv"
    arity = (2, 4)
    inputs = ("x", "w", "b")

    def normalize(self, attrs, types):
        attrs, _ = conv_geometry(attrs, types[0], types[1])
        if not isinstance(attrs["flip"], (bool, np.bool_)):
            raise RuleError(f"flip must be True or False, got {attrs['flip']!r}")
        attrs["flip"] = bool(attrs["flip"])
        return epilogue.normalize(attrs)

    def infer(self, attrs, types):
        x, w = types[:2]
        dtype = same_dtype(types)
        float_dtype(x)
        _, out = conv_geometry(attrs, x, w)
        own = epilogue.check(attrs, types, TensorType(out, dtype))
        if len(own) > 3:
            raise RuleError("takes x, w and an optional bias (and a residual with residual=True)")
        if len(own) == 3:
            b = own[2].shape
            if b != (out[1],) and b != out[1:]:
                raise RuleError(f"bias must be ({out[1]},) (tied) or {out[1:]} (untied), got {b}")
        return TensorType(out, dtype)

    def grad(self, attrs, xs, y, gy, needs):
        from .transpose import conv_grad_input, conv_grad_kernel
        own, r = epilogue.split(attrs, xs)
        gy, gr = epilogue.grad("conv", attrs, xs, y, gy)
        x, w = own[:2]
        geo = dict(stride=attrs["stride"], padding=attrs["padding"], dilation=attrs["dilation"],
                   groups=attrs["groups"], flip=attrs["flip"])
        return [conv_grad_input(w, gy, x.shape[2:], **geo) if needs[0] else None,        # h, Eq 6
                conv_grad_kernel(gy, x, w.shape[2:], **geo) if needs[1] else None,       # g, Eq 5
                *([bias_grad(gy, own[2])] if len(own) == 3 else []),
                *([gr] if r is not None else [])]

    def reference(self, attrs, *xs):
        own, r = epilogue.split(attrs, xs)
        return epilogue.reference(attrs, self.convolve(attrs, *own), r)

    @staticmethod
    def convolve(attrs, x, w, b=None):
        """The convolution and its bias, without the epilogue."""
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

    @staticmethod
    def depthwise_2d(attrs, types) -> bool:
        """One input channel per group, 2D: the row kernel of depthwise.c.j2."""
        x, w = types[:2]
        return len(x.shape) == 4 and attrs["groups"] == x.shape[1] and w.shape[1] == 1

    def template_of(self, attrs, types):
        return "depthwise" if self.name == "conv" and self.depthwise_2d(attrs, types) else super().template_of(
            attrs, types)

    def context(self, attrs, types, out):
        types = epilogue.split(attrs, types)[0]
        x, w = types[:2]
        g = attrs["groups"]
        bias = "none" if len(types) == 2 else ("tied" if len(types[2].shape) == 1 else "untied")
        if self.name == "conv" and self.depthwise_2d(attrs, types):      # the columns whose taps are all inside
            first, end = shapes.interior(x.shape[3], out.shape[3], w.shape[3], attrs["stride"][1],
                                         attrs["dilation"][1], attrs["padding"][1][0])
            extra = dict(X_FIRST=first, X_END=end)
        else:
            extra = {}
        return dict(weights="shared", par=[("n", "N", x.shape[0]), ("co", "C_OUT", w.shape[0])], **extra,
                    N=x.shape[0], C_IN=x.shape[1], C_OUT=w.shape[0], GROUPS=g,
                    C_IN_G=x.shape[1] // g, C_OUT_G=w.shape[0] // g, flip=attrs["flip"], bias=bias,
                    axes=axes_context(x.shape[2:], out.shape[2:], w.shape[2:], attrs["stride"],
                                      attrs["dilation"], attrs["padding"]))

    def macs(self, attrs, types, out):
        w = types[1]
        return shapes.prod(out.shape) * shapes.prod(w.shape[1:])


# -- the separable family: compositions of ``conv`` --------------------------
def _sub(name, part):
    return None if name is None else f"{name}.{part}"


@builder("x")
def depthwise_conv(x: Value, w, bias=None, stride=1, padding=0, dilation=1, name=None) -> Value:
    """Depthwise convolution: ``conv`` with groups = C_in; w is
    (C_in * multiplier, 1, *k)."""
    return conv(x, w, bias, stride, padding, dilation, groups=x.shape[1] if len(x.shape) > 1 else 1, name=name)


@builder("x")
def separable_conv(x: Value, w_depthwise, w_pointwise, bias=None, stride=1, padding=0, dilation=1,
                   name=None) -> Value:
    """Depthwise separable convolution: depthwise ``w_depthwise`` (C_in*m, 1, *k)
    with the stride/padding/dilation, then pointwise ``w_pointwise``
    (C_out, C_in*m, 1, ...) with the bias. Nodes: ``<name>.depthwise``,
    ``<name>.pointwise`` (or ``name`` for the pointwise one)."""
    h = depthwise_conv(x, w_depthwise, None, stride, padding, dilation, name=_sub(name, "depthwise"))
    return conv(h, w_pointwise, bias, name=name)


def _pair(value, what):
    return shapes.per_axis(value, 2, what)


@builder("x")
def spatial_separable_conv(x: Value, w_col, w_row, bias=None, stride=1, padding=0, dilation=1, groups=1,
                           name=None) -> Value:
    """A k×k convolution factored into a k×1 then a 1×k one (2D only).

    ``w_col`` is (C_mid, C_in/groups, kH, 1), ``w_row`` (C_out, C_mid/groups,
    1, kW); per channel (groups = C) this is a depthwise conv whose kernel is
    the outer product col ⊗ row. Stride, padding and dilation are those of the
    whole kH×kW conv; each half takes its own axis of them."""
    w_col = as_value(x, w_col, "spatial_separable_conv w_col")
    w_row = as_value(x, w_row, "spatial_separable_conv w_row")
    with rules("spatial_separable_conv", name, x=x, w_col=w_col, w_row=w_row):
        if len(x.shape) != 4 or len(w_col.shape) != 4 or len(w_row.shape) != 4:
            raise RuleError("spatial_separable_conv is 2D: x, w_col and w_row must have rank 4")
        if w_col.shape[3] != 1 or w_row.shape[2] != 1:
            raise RuleError(f"w_col must be (C_mid, C_in/groups, kH, 1) and w_row (C_out, C_mid/groups, 1, kW), "
                            f"got {w_col.shape} and {w_row.shape}")
        s, d = _pair(stride, "stride"), _pair(dilation, "dilation")
        shapes.positive(s, "stride"), shapes.positive(d, "dilation")
        kernel = (w_col.shape[2], w_row.shape[3])
        pads = shapes.normalize_padding(padding, x.shape[2:], kernel, s, d)
    h = conv(x, w_col, None, (s[0], 1), (pads[0], (0, 0)), (d[0], 1), groups, name=_sub(name, "col"))
    return conv(h, w_row, bias, (1, s[1]), ((0, 0), pads[1]), (1, d[1]), groups, name=_sub(name, "row"))


@builder("x")
def flattened_conv(x: Value, w_channel, w_vertical, w_horizontal, bias=None, stride=1, padding=0, dilation=1,
                   name=None) -> Value:
    """Flattened convolution (2D): a 1×1 conv across channels ``w_channel``
    (C_out, C_in, 1, 1), then per-channel vertical ``w_vertical`` (C_out, 1, kH, 1)
    and horizontal ``w_horizontal`` (C_out, 1, 1, kW) 1D kernels."""
    h = conv(x, w_channel, name=_sub(name, "channel"))
    c = h.shape[1]
    return spatial_separable_conv(h, w_vertical, w_horizontal, bias, stride, padding, dilation, groups=c,
                                  name=name)


def bias_grad(gy: Value, b: Value) -> Value:
    """dL/d(bias) of a conv-like op: sum over the batch (and, for a tied bias,
    over the spatial axes)."""
    from .tensor import reduce_sum
    axes = (0,) if len(b.shape) > 1 else (0,) + tuple(range(2, len(gy.shape)))
    return reduce_sum(gy, axes)

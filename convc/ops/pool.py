"""Pools: ``max_pool``, ``avg_pool`` (1D/2D/3D, PyTorch semantics, including
``ceil_mode`` and ``count_include_pad``), ``lp_pool`` (ONNX's LpPool) and
``global_avg_pool`` (``global_max_pool`` is a reduce, in ops/reduce.py).
``max_pool`` takes integer tensors too (ONNX's MaxPool on int8 and uint8):
its padding is then the dtype's smallest value, the identity of max."""
from __future__ import annotations

import numpy as np

from .. import shapes
from ..shapes import interior
from ..errors import RuleError
from ..ir import INT_DTYPES, TensorType, Value
from .registry import Op, builder, flag, float_dtype, register
from .window import axes_context, padded, windows


@builder("x")
def max_pool(x: Value, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, name=None) -> Value:
    """Max over windows of ``kernel_size`` (stride defaults to the kernel size).
    Padding is implicit -inf, as in PyTorch."""
    attrs = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
                 ceil_mode=ceil_mode)
    return x.graph.add("max_pool", [x], attrs, name)


@builder("x")
def avg_pool(x: Value, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
             name=None) -> Value:
    """Mean over windows; ``count_include_pad`` counts zero padding in the
    divisor (PyTorch's default), windows past the padded edge never count."""
    attrs = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=1, ceil_mode=ceil_mode,
                 count_include_pad=count_include_pad)
    return x.graph.add("avg_pool", [x], attrs, name)


@builder("x")
def lp_pool(x: Value, p: float, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
            name=None) -> Value:
    """The p-norm of each window: ``(Σ |x|^p) ** (1/p)`` over the window's
    taps inside the input (padding adds zeros), as ONNX's LpPool; p >= 1.
    PyTorch's lp_pool sums x^p, not |x|^p: the same for even p or x >= 0."""
    attrs = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
                 ceil_mode=ceil_mode, p=p)
    return x.graph.add("lp_pool", [x], attrs, name)


@builder("x")
def global_avg_pool(x: Value, name=None) -> Value:
    """Mean over all spatial axes, keeping them as size 1: (N, C, 1, ...)."""
    return x.graph.add("global_avg_pool", [x], {}, name)


def _spatial_rank(t: TensorType) -> int:
    if not 3 <= len(t.shape) <= 5:
        raise RuleError(f"input must be (N, C, *spatial) with 1 to 3 spatial axes, got rank {len(t.shape)}")
    return len(t.shape) - 2


class _Pool(Op):
    template = "pool"

    def normalize(self, attrs, types):
        x = types[0]
        rank = _spatial_rank(x)
        k = shapes.positive(shapes.per_axis(attrs["kernel_size"], rank, "kernel_size"), "kernel_size")
        s = k if attrs["stride"] is None else attrs["stride"]
        s = shapes.positive(shapes.per_axis(s, rank, "stride"), "stride")
        d = shapes.positive(shapes.per_axis(attrs["dilation"], rank, "dilation"), "dilation")
        pads = shapes.normalize_padding(attrs["padding"], x.shape[2:], k, s, d)
        for (lo, hi), kk in zip(pads, k):
            if max(lo, hi) > kk // 2:
                raise RuleError(f"padding {pads} must be at most half the kernel size {k} on every axis "
                                f"(PyTorch's rule; more would let a window see only padding)")
        return dict(attrs, kernel_size=k, stride=s, padding=pads, dilation=d,
                    ceil_mode=flag(attrs["ceil_mode"], "ceil_mode"))

    def infer(self, attrs, types):
        x = types[0]
        if not (self.name == "max_pool" and x.dtype in INT_DTYPES):
            float_dtype(x)
        out = shapes.window_out_sizes(x.shape[2:], attrs["kernel_size"], attrs["stride"], attrs["dilation"],
                                      attrs["padding"], attrs["ceil_mode"])
        return TensorType(x.shape[:2] + out, x.dtype)

    def _geometry(self, attrs, x_shape):
        k, s, d, pads = attrs["kernel_size"], attrs["stride"], attrs["dilation"], attrs["padding"]
        out = shapes.window_out_sizes(x_shape[2:], k, s, d, pads, attrs["ceil_mode"])
        # ceil_mode windows may run past the padded input: extend the high side
        extra = [max(0, (o - 1) * ss + dd * (kk - 1) + 1 - (n + lo + hi))
                 for o, ss, dd, kk, n, (lo, hi) in zip(out, s, d, k, x_shape[2:], pads)]
        return k, s, d, pads, out, extra

    def context(self, attrs, types, out):
        """Shapes as constants; per axis the interior [first, end) of the
        output positions; the parallel nest is (n*c, every output axis but the
        innermost): each iteration writes one output row."""
        x = types[0]
        axes = axes_context(x.shape[2:], out.shape[2:], attrs["kernel_size"], attrs["stride"],
                            attrs["dilation"], attrs["padding"])
        for a, (_, hi) in zip(axes, attrs["padding"]):
            a["hi"] = hi
            a["first"], a["end"] = interior(a["i"], a["o"], a["k"], a["s"], a["d"], a["p"])
        nc = x.shape[0] * x.shape[1]
        # max_pool's interior skips the NaN checks once a scan finds no NaN in the input rows
        # it reads: per tap of the axes before the last two, `span` contiguous elements
        span = (axes[-2]["d"] * (axes[-2]["k"] - 1) + 1) * axes[-1]["i"] if len(axes) > 1 else axes[0]["i"]
        from .elementwise import c_int
        integer = x.dtype in INT_DTYPES
        return dict(kind=self.name, N=x.shape[0], C=x.shape[1], NC=nc, axes=axes, span=span,
                    nan=not integer,                # floats: NaN propagates (integers have none to check)
                    lowest=c_int(int(np.iinfo(x.dtype).min), x.dtype) if integer else "-INFINITY",
                    interior=all(a["first"] < a["end"] for a in axes),
                    count_include_pad=attrs.get("count_include_pad", False), lp=attrs.get("p"),
                    par=[("nc", "NC", nc)] + [("o" + a["l"], "OUT_" + a["U"], a["o"]) for a in axes[:-1]])


@register
class MaxPool(_Pool):
    name = "max_pool"

    def grad(self, attrs, xs, y, gy, needs):
        return [max_pool_grad(xs[0], gy, attrs)]

    def reference(self, attrs, x):
        k, s, d, pads, out, extra = self._geometry(attrs, x.shape)
        lowest = np.iinfo(x.dtype).min if x.dtype.kind in "iu" else -np.inf
        xp = padded(x, [(lo, hi + e) for (lo, hi), e in zip(pads, extra)], lowest)
        y = np.full(x.shape[:2] + out, lowest, x.dtype)
        for _, view in windows(xp, k, s, d, out):
            y = np.maximum(y, view)
        return y


def _avg_normalize(op, attrs, types):
    attrs = _Pool.normalize(op, attrs, types)
    if attrs["dilation"] != (1,) * len(attrs["dilation"]):
        raise RuleError(f"avg_pool has no dilation, got {attrs['dilation']}")
    return dict(attrs, count_include_pad=flag(attrs["count_include_pad"], "count_include_pad"))


@register
class AvgPool(_Pool):
    name = "avg_pool"

    def normalize(self, attrs, types):
        return _avg_normalize(self, attrs, types)

    def grad(self, attrs, xs, y, gy, needs):
        return [avg_pool_grad(gy, xs[0].shape, attrs)]

    def reference(self, attrs, x):
        k, s, d, pads, out, extra = self._geometry(attrs, x.shape)
        full = [(lo, hi + e) for (lo, hi), e in zip(pads, extra)]
        total = sum(v for _, v in windows(padded(x, full), k, s, d, out))
        ones = np.ones((1, 1) + x.shape[2:], x.dtype)
        if attrs["count_include_pad"]:   # padded region counts, the ceil_mode overhang does not
            mask = np.pad(np.pad(ones, [(0, 0), (0, 0)] + list(pads), constant_values=1),
                          [(0, 0), (0, 0)] + [(0, e) for e in extra])
        else:
            mask = padded(ones, full)
        count = sum(v for _, v in windows(mask, k, s, d, out))
        return total / count


def _lp_normalize(op, attrs, types):
    attrs = _Pool.normalize(op, attrs, types)
    p = attrs["p"]
    if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)) or not 1 <= p < np.inf:
        raise RuleError(f"p must be a finite number >= 1, got {p!r}")
    return dict(attrs, p=int(p) if float(p).is_integer() else float(p))


@register
class LpPool(_Pool):
    name = "lp_pool"

    def normalize(self, attrs, types):
        return _lp_normalize(self, attrs, types)

    def grad(self, attrs, xs, y, gy, needs):
        return [xs[0].graph.add("lp_pool_grad", [xs[0], y, gy], dict(attrs))]

    def reference(self, attrs, x):
        k, s, d, pads, out, extra = self._geometry(attrs, x.shape)
        xp = padded(np.abs(x), [(lo, hi + e) for (lo, hi), e in zip(pads, extra)])
        total = sum(view ** attrs["p"] for _, view in windows(xp, k, s, d, out))
        return (total ** (1 / attrs["p"])).astype(x.dtype)


@register
class GlobalAvgPool(Op):
    name = "global_avg_pool"

    def infer(self, attrs, types):
        x = types[0]
        rank = _spatial_rank(x)
        float_dtype(x)
        return TensorType(x.shape[:2] + (1,) * rank, x.dtype)

    def grad(self, attrs, xs, y, gy, needs):
        from .elementwise import mul
        from .tensor import expand
        x = xs[0]
        return [mul(expand(gy, x.shape), 1.0 / shapes.prod(x.shape[2:]))]

    def reference(self, attrs, x):
        return x.mean(axis=tuple(range(2, x.ndim)), keepdims=True)

    def context(self, attrs, types, out):
        x = types[0]
        nc = x.shape[0] * x.shape[1]
        return dict(NC=nc, HW=shapes.prod(x.shape[2:]), par=[("nc", "NC", nc)])


# -- pool gradients ----------------------------------------------------------------
def max_pool_grad(x: Value, gy: Value, attrs: dict, name=None) -> Value:
    """dL/dx of ``max_pool(x, **attrs)``: each window's gradient goes to its
    arg-max as PyTorch picks it: the first maximum in scan order, but the last
    NaN, and the first tap inside the input when every tap is -inf."""
    return x.graph.add("max_pool_grad", [x, gy], dict(attrs), name)


def avg_pool_grad(gy: Value, input_shape, attrs: dict, name=None) -> Value:
    """dL/dx of ``avg_pool`` on an input of ``input_shape``: each window's
    gradient spread evenly over the elements its divisor counted."""
    return gy.graph.add("avg_pool_grad", [gy], dict(attrs, input_shape=tuple(input_shape)), name)


class _PoolGrad(_Pool):
    def grad_context(self, ctx, kind):
        """A scatter: parallel iterations own whole (n, c) planes of the input gradient."""
        return dict(ctx, kind=kind, par=[("n", "N", ctx["N"]), ("c", "C", ctx["C"])])

    def check_gy(self, attrs, x: TensorType, gy: TensorType):
        want = _Pool.infer(self, attrs, [x]).shape
        if gy.shape != want:
            raise RuleError(f"output gradient has shape {gy.shape}, the pool's output is {want}")


@register
class MaxPoolGrad(_PoolGrad):
    name = "max_pool_grad"
    arity = (2, 2)
    inputs = ("x", "gy")
    template = "pool_grad"

    def normalize(self, attrs, types):
        return _Pool.normalize(self, attrs, types[:1])

    def infer(self, attrs, types):
        self.check_gy(attrs, *types)
        return types[0]

    def reference(self, attrs, x, gy):
        k, s, d, pads, out, extra = self._geometry(attrs, x.shape)
        full = [(lo, hi + e) for (lo, hi), e in zip(pads, extra)]
        xp = padded(x, full, -np.inf)
        inside = padded(np.ones((1, 1) + x.shape[2:], bool), full, False)
        best = np.full(gy.shape, -np.inf, x.dtype)
        found = np.zeros(gy.shape, bool)
        arg = np.zeros(gy.shape + (len(k),), np.int64)
        for (offs, view), (_, ok) in zip(windows(xp, k, s, d, out), windows(inside, k, s, d, out)):
            # PyTorch's rule: the first tap inside the input, then any greater one or any NaN
            # (so an all -inf window sends its gradient to its first tap, the last NaN wins)
            take = ok & (~found | (view > best) | np.isnan(view))
            best = np.where(take, view, best)
            found |= take
            arg[take] = offs
        dxp = np.zeros(xp.shape, x.dtype)
        idx = np.indices(gy.shape)
        pos = [idx[2 + a] * s[a] + arg[..., a] * d[a] for a in range(len(k))]
        np.add.at(dxp, (idx[0], idx[1], *pos), gy)
        crop = tuple(slice(lo, lo + n) for (lo, _), n in zip(pads, x.shape[2:]))
        return dxp[(slice(None), slice(None)) + crop]

    def context(self, attrs, types, out):
        return self.grad_context(_Pool.context(self, attrs, types[:1], TensorType(types[1].shape, out.dtype)),
                                 "max_pool")


@register
class AvgPoolGrad(_PoolGrad):
    name = "avg_pool_grad"
    inputs = ("gy",)
    template = "pool_grad"

    def _x(self, attrs, gy):
        return TensorType(tuple(attrs["input_shape"]), gy.dtype)

    def normalize(self, attrs, types):
        x = self._x(attrs, types[0])
        return dict(_avg_normalize(self, attrs, [x]), input_shape=x.shape)

    def infer(self, attrs, types):
        x = self._x(attrs, types[0])
        self.check_gy(attrs, x, types[0])
        return x

    def reference(self, attrs, gy):
        x_shape = tuple(attrs["input_shape"])
        k, s, d, pads, out, extra = self._geometry(attrs, x_shape)
        ones = np.ones((1, 1) + x_shape[2:], gy.dtype)
        full = [(lo, hi + e) for (lo, hi), e in zip(pads, extra)]
        if attrs["count_include_pad"]:
            mask = np.pad(np.pad(ones, [(0, 0), (0, 0)] + list(pads), constant_values=1),
                          [(0, 0), (0, 0)] + [(0, e) for e in extra])
        else:
            mask = padded(ones, full)
        count = sum(v for _, v in windows(mask, k, s, d, out))
        share = gy / count
        dxp = np.zeros(x_shape[:2] + mask.shape[2:], gy.dtype)
        for _, view in windows(dxp, k, s, d, out):
            view += share
        crop = tuple(slice(lo, lo + n) for (lo, _), n in zip(pads, x_shape[2:]))
        return dxp[(slice(None), slice(None)) + crop]

    def context(self, attrs, types, out):
        return self.grad_context(_Pool.context(self, attrs, [out], types[0]), "avg_pool")


@register
class LpPoolGrad(_PoolGrad):
    """dL/dx of ``lp_pool``: each window w holding x_i adds
    gy[w] * sign(x_i) |x_i|^(p-1) / y[w]^(p-1) (nothing from a window whose
    norm is 0)."""
    name = "lp_pool_grad"
    arity = (3, 3)
    inputs = ("x", "r", "gy")           # r: the pool's output
    template = "pool_grad"

    def normalize(self, attrs, types):
        return _lp_normalize(self, attrs, types[:1])

    def infer(self, attrs, types):
        self.check_gy(attrs, types[0], types[2])
        self.check_gy(attrs, types[0], types[1])
        return types[0]

    def reference(self, attrs, x, r, gy):
        k, s, d, pads, out, extra = self._geometry(attrs, x.shape)
        full = [(lo, hi + e) for (lo, hi), e in zip(pads, extra)]
        p = attrs["p"]
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(r > 0, gy / np.where(r > 0, r, 1) ** (p - 1), 0)
        dxp = np.zeros(padded(x, full).shape, x.dtype)
        for _, view in windows(dxp, k, s, d, out):
            view += share
        crop = tuple(slice(lo, lo + n) for (lo, _), n in zip(pads, x.shape[2:]))
        return (dxp[(slice(None), slice(None)) + crop] * np.sign(x) * np.abs(x) ** (p - 1)).astype(x.dtype)

    def context(self, attrs, types, out):
        return self.grad_context(_Pool.context(self, attrs, types[:1], types[2]), "lp_pool")

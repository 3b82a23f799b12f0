"""Reductions over any set of axes: ``reduce(x, kind, axes, keepdims)`` with
``kind`` one of ``KINDS`` (sum, mean, max, min, prod, l1, l2, sum_square,
log_sum_exp), and ``global_max_pool``.

One op, ``reduce``, with a ``kind`` attribute rather than one op per kind:
the kinds share everything but three lines of C (the start value, how an
element is folded in, and the finish), so attribute checks, shape inference,
the loop nest over kept and reduced axes and the template are written once;
the kind picks the lines. ``kind="sum"`` builds the existing ``reduce_sum``
(convc/ops/tensor.py), which the gradients of broadcasting ops already use.

The gradient is ``reduce_grad(x, y, gy)`` (one template too), except
mean's, which is ``gy`` broadcast back and scaled. max and min send each
output's gradient to the elements equal to it, split evenly between ties
(torch.amax / torch.amin's rule; max_pool instead picks one arg-max, as
PyTorch's max_pool does). prod's gradient is the product of the other
elements, exact when some are zero.
"""
from __future__ import annotations

import numpy as np

from .. import shapes
from ..errors import RuleError
from ..ir import TensorType, Value
from .registry import Op, builder, float_dtype, register, same_dtype
from .tensor import ReduceSum, expand, reduce_sum, reshape, row_major_strides

KINDS = ("sum", "mean", "max", "min", "prod", "l1", "l2", "sum_square", "log_sum_exp")


@builder("x")
def reduce(x: Value, kind: str, axes=None, keepdims: bool = False, name=None) -> Value:
    """Reduce ``x`` over ``axes`` (an int, a tuple, or None: all) by ``kind``:
    "sum", "mean", "max", "min", "prod", "l1" (Σ|x|), "l2" (sqrt Σx²),
    "sum_square" (Σx²) or "log_sum_exp" (log Σ exp x, computed with the
    maximum subtracted first); ``keepdims`` keeps reduced axes as size 1."""
    if kind == "sum":
        return reduce_sum(x, axes, keepdims, name=name)
    return x.graph.add("reduce", [x], {"kind": kind, "axes": axes, "keepdims": keepdims}, name)


@builder("x")
def global_max_pool(x: Value, name=None) -> Value:
    """Max over all spatial axes of x (N, C, ...), keeping them as size 1."""
    if len(x.shape) < 3:
        from ..errors import GraphError
        raise GraphError(f"global_max_pool: input must be (N, C, *spatial), got shape {x.shape}")
    return reduce(x, "max", tuple(range(2, len(x.shape))), True, name=name)


def _kind(attrs):
    if attrs.get("kind") not in KINDS[1:]:
        raise RuleError(f"kind must be one of {', '.join(KINDS)}, got {attrs.get('kind')!r}")
    return attrs["kind"]


def reduce_reference(kind: str, x: np.ndarray, axes: tuple, keepdims: bool) -> np.ndarray:
    """The numpy meaning of each kind (NaN propagates through max and min)."""
    if kind == "log_sum_exp":
        m = np.max(x, axis=axes, keepdims=True)
        m = np.where(np.isfinite(m), m, 0)          # all -inf (or some inf): no shift, the sum says it
        with np.errstate(divide="ignore"):
            y = np.log(np.sum(np.exp(x - m), axis=axes, keepdims=True)) + m
        return y if keepdims else np.squeeze(y, axis=axes)
    fn = {"sum": np.sum, "mean": np.mean, "max": np.max, "min": np.min, "prod": np.prod}.get(kind)
    if fn is not None:
        return fn(x, axis=axes, keepdims=keepdims)
    y = np.sum(np.abs(x) if kind == "l1" else x * x, axis=axes, keepdims=keepdims)
    return np.sqrt(y) if kind == "l2" else y


def _loops(attrs, x: TensorType):
    """The kept axes (extent, x stride), which decompose the output index j,
    innermost first, and the reduced axes (extent, x stride), outermost first."""
    xs = row_major_strides(x.shape)
    kept = [(n, s) for i, (n, s) in enumerate(zip(x.shape, xs)) if i not in attrs["axes"]]
    red = [(n, s) for i, (n, s) in enumerate(zip(x.shape, xs)) if i in attrs["axes"]]
    return dict(kept=list(reversed(kept)), red=red, COUNT=shapes.prod(n for n, _ in red))


@register
class Reduce(ReduceSum):
    name = "reduce"
    template = "reduce"

    def normalize(self, attrs, types):
        return dict(super().normalize(attrs, types), kind=_kind(attrs))

    def infer(self, attrs, types):
        float_dtype(types[0])
        return super().infer(attrs, types)

    def reference(self, attrs, x):
        return reduce_reference(attrs["kind"], x, attrs["axes"], attrs["keepdims"]).astype(x.dtype)

    def grad(self, attrs, xs, y, gy, needs):
        x = xs[0]
        if attrs["kind"] == "mean":
            from .elementwise import mul
            kept = tuple(1 if i in attrs["axes"] else n for i, n in enumerate(x.shape))
            count = shapes.prod(x.shape[a] for a in attrs["axes"])
            return [mul(expand(reshape(gy, kept) if gy.shape != kept else gy, x.shape), 1.0 / count)]
        return [x.graph.add("reduce_grad", [x, y, gy], dict(attrs))]

    def context(self, attrs, types, out):
        """The reduced axes one block with kept axes after it (x is (OUTER,
        R, INNER), INNER > 1: over channels, say): one parallel iteration an
        outer index, folding whole rows; otherwise one an output, walking its
        elements (log_sum_exp always: it takes the maximum first)."""
        x, axes = types[0], attrs["axes"]
        if axes and list(axes) == list(range(axes[0], axes[-1] + 1)) and axes[-1] < len(x.shape) - 1 \
                and attrs["kind"] != "log_sum_exp":
            outer = shapes.prod(x.shape[:axes[0]])
            rows = dict(OUTER=outer, R=shapes.prod(x.shape[a] for a in axes),
                        INNER=shapes.prod(x.shape[axes[-1] + 1:]))
            return dict(_loops(attrs, x), kind=attrs["kind"], rows=rows, par=[("o", "OUTER", outer)])
        return dict(_loops(attrs, x), kind=attrs["kind"], rows=None, SIZE=out.size, par=[("j", "SIZE", out.size)])

    def macs(self, attrs, types, out):
        return types[0].size if attrs["kind"] in ("prod", "l2", "sum_square", "log_sum_exp") else 0


@register
class ReduceGrad(Op):
    """dL/dx of ``reduce`` (every kind but mean): each output's gradient
    spread over the elements it reduced, as the kind's derivative says."""
    name = "reduce_grad"
    template = "reduce_grad"
    arity = (3, 3)
    inputs = ("x", "r", "gy")        # r: the reduction (the forward output)

    def normalize(self, attrs, types):
        return dict(ReduceSum.normalize(self, attrs, types[:1]), kind=_kind(attrs))

    def infer(self, attrs, types):
        same_dtype(types)
        float_dtype(types[0])
        want = ReduceSum.infer(self, attrs, types[:1]).shape
        for what, t in (("output", types[1]), ("output gradient", types[2])):
            if t.shape != want:
                raise RuleError(f"{what} has shape {t.shape}, the reduction's is {want}")
        if attrs["kind"] == "mean":
            raise RuleError("mean's gradient is a broadcast, not reduce_grad")
        return types[0]

    def reference(self, attrs, x, y, gy):
        kind, axes = attrs["kind"], attrs["axes"]
        kept = tuple(1 if i in axes else n for i, n in enumerate(x.shape))
        y, g = y.reshape(kept), gy.reshape(kept)
        if kind in ("max", "min"):
            hit = (x == y)
            return np.where(hit, g / np.sum(hit, axis=axes, keepdims=True), 0).astype(x.dtype)
        if kind == "prod":
            zero = x == 0
            nz = np.sum(zero, axis=axes, keepdims=True)
            rest = np.prod(np.where(zero, 1, x), axis=axes, keepdims=True)       # product of the nonzero ones
            with np.errstate(divide="ignore", invalid="ignore"):
                dx = np.where(nz == 0, g * rest / np.where(zero, 1, x), np.where((nz == 1) & zero, g * rest, 0))
            return dx.astype(x.dtype)
        if kind == "l1":
            return (g * np.sign(x)).astype(x.dtype)
        if kind == "l2":
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where(y > 0, g * x / np.where(y > 0, y, 1), 0).astype(x.dtype)
        if kind == "sum_square":
            return (2 * g * x).astype(x.dtype)
        return (g * np.exp(x - y)).astype(x.dtype)           # log_sum_exp: softmax times the gradient

    def context(self, attrs, types, out):
        return dict(_loops(attrs, types[0]), kind=attrs["kind"], SIZE=types[1].size,
                    par=[("j", "SIZE", types[1].size)])

"""Normalisations: ``lrn`` (local response normalisation across channels,
ONNX's and Caffe's LRN) and ``standardize`` (zero mean, unit variance over
the trailing axes), with their gradients ``lrn_grad`` and
``standardize_grad``; and the builders made of them:
``instance_norm``, ``group_norm``, ``layer_norm`` (``standardize`` of a
view, then the affine scale and bias as broadcast ``mul``/``add``, whose
gradients autodiff already has) and ``lp_normalize`` (``x`` divided by its
L1 or L2 norm: a ``reduce`` and a broadcast ``div``).

LRN's channel window follows ONNX: channel c sums the squares of channels
c - floor((size-1)/2) .. c + ceil((size-1)/2). PyTorch's
``local_response_norm`` has the same window for odd sizes only (for an even
size it leans the other way); both divide alpha by size.
"""
from __future__ import annotations

import numpy as np

from .. import shapes
from ..errors import RuleError
from ..ir import TensorType, Value
from .registry import Op, as_value, builder, float_dtype, register, same_dtype


def _number(v, what: str, lo: float | None = None, strict: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v):
        raise RuleError(f"{what} must be a finite number, got {v!r}")
    if lo is not None and (v <= lo if strict else v < lo):
        raise RuleError(f"{what} must be {'>' if strict else '>='} {lo}, got {v!r}")
    return float(v)


# -- LRN --------------------------------------------------------------------------
@builder("x")
def lrn(x: Value, size: int, alpha: float = 1e-4, beta: float = 0.75, bias: float = 1.0, name=None) -> Value:
    """Local response normalisation of x (N, C, ...) across channels:
    ``y = x / (bias + alpha / size * Σ x[c']²) ** beta``, the sum over the
    ``size`` channels around c (ONNX's window: floor((size-1)/2) before,
    ceil((size-1)/2) after)."""
    return x.graph.add("lrn", [x], dict(size=size, alpha=alpha, beta=beta, bias=bias), name)


def _lrn_window(size: int) -> tuple[int, int]:
    """Channels before and after c in c's window."""
    before = (size - 1) // 2
    return before, size - 1 - before


def _lrn_attrs(attrs):
    size = attrs["size"]
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise RuleError(f"size must be a positive integer, got {size!r}")
    return dict(size=int(size), alpha=_number(attrs["alpha"], "alpha"), beta=_number(attrs["beta"], "beta"),
                bias=_number(attrs["bias"], "bias", 0, strict=True))


def _lrn_context(attrs, x: TensorType):
    if len(x.shape) < 2:
        raise RuleError(f"input must be (N, C, ...), got {x.shape}")
    before, after = _lrn_window(attrs["size"])
    n, c = x.shape[:2]
    return dict(N=n, C=c, INNER=shapes.prod(x.shape[2:]), BEFORE=before, AFTER=after,
                scale=attrs["alpha"] / attrs["size"], beta=attrs["beta"], bias=attrs["bias"],
                par=[("n", "N", n), ("c", "C", c)])


def _lrn_sums(attrs, x):
    """bias + alpha/size * the window's sum of squares, per element."""
    before, after = _lrn_window(attrs["size"])
    sq = np.pad(x * x, [(0, 0), (before, after)] + [(0, 0)] * (x.ndim - 2))
    c = x.shape[1]
    total = sum(sq[:, k:k + c] for k in range(attrs["size"]))
    return x.dtype.type(attrs["bias"]) + x.dtype.type(attrs["alpha"] / attrs["size"]) * total


@register
class LRN(Op):
    name = "lrn"

    def normalize(self, attrs, types):
        return _lrn_attrs(attrs)

    def infer(self, attrs, types):
        float_dtype(types[0])
        _lrn_context(attrs, types[0])
        return types[0]

    def reference(self, attrs, x):
        return x * _lrn_sums(attrs, x) ** x.dtype.type(-attrs["beta"])

    def grad(self, attrs, xs, y, gy, needs):
        return [xs[0].graph.add("lrn_grad", [xs[0], gy], dict(attrs))]

    def context(self, attrs, types, out):
        return _lrn_context(attrs, types[0])

    def macs(self, attrs, types, out):
        return out.size * (attrs["size"] + 2)


@register
class LRNGrad(Op):
    """dL/dx of ``lrn``: with s = bias + alpha/size * window sum,
    dx[c] = gy[c] s[c]^-beta - 2 alpha beta / size * x[c] *
    Σ over the windows c' holding c of gy[c'] x[c'] s[c']^(-beta-1)."""
    name = "lrn_grad"
    arity = (2, 2)
    inputs = ("x", "gy")

    def normalize(self, attrs, types):
        return _lrn_attrs(attrs)

    def infer(self, attrs, types):
        same_dtype(types)
        float_dtype(types[0])
        if types[1].shape != types[0].shape:
            raise RuleError(f"output gradient has shape {types[1].shape}, the input {types[0].shape}")
        _lrn_context(attrs, types[0])
        return types[0]

    def reference(self, attrs, x, gy):
        s = _lrn_sums(attrs, x)
        beta = x.dtype.type(attrs["beta"])
        t = gy * x * s ** (-beta - 1)
        before, after = _lrn_window(attrs["size"])
        tp = np.pad(t, [(0, 0), (after, before)] + [(0, 0)] * (x.ndim - 2))   # windows c' in [c-after, c+before]
        c = x.shape[1]
        back = sum(tp[:, k:k + c] for k in range(attrs["size"]))
        return gy * s ** -beta - x.dtype.type(2 * attrs["alpha"] * attrs["beta"] / attrs["size"]) * x * back

    def context(self, attrs, types, out):
        return _lrn_context(attrs, types[0])

    def macs(self, attrs, types, out):
        return out.size * attrs["size"] * (attrs["size"] + 3)

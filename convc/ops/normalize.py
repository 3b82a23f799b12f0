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
from .registry import Op, as_value, builder, float_dtype, register, rules, same_dtype


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


# -- standardize: zero mean, unit variance over the trailing axes -------------------------
@builder("x")
def standardize(x: Value, axis: int, eps: float = 1e-5, name=None) -> Value:
    """``(x - mean) / sqrt(var + eps)``, mean and (biased) variance taken over
    the axes ``axis`` .. last, separately for each index of the axes before."""
    return x.graph.add("standardize", [x], {"axis": axis, "eps": eps}, name)


def _standardize_attrs(attrs, x: TensorType):
    rank = len(x.shape)
    a = attrs["axis"]
    if isinstance(a, bool) or not isinstance(a, (int, np.integer)) or not -rank <= a < rank:
        raise RuleError(f"axis {a!r} is out of range for rank {rank}")
    return {"axis": int(a) % rank, "eps": _number(attrs["eps"], "eps", 0)}


def _rows(attrs, x: TensorType):
    rows, length = shapes.prod(x.shape[:attrs["axis"]]), shapes.prod(x.shape[attrs["axis"]:])
    return dict(ROWS=rows, LEN=length, eps=attrs["eps"], par=[("r", "ROWS", rows)])


def _moments(attrs, x):
    axes = tuple(range(attrs["axis"], x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    inv = 1 / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True) + x.dtype.type(attrs["eps"]))
    return axes, (x - mean) * inv, inv


@register
class Standardize(Op):
    name = "standardize"

    def normalize(self, attrs, types):
        return _standardize_attrs(attrs, types[0])

    def infer(self, attrs, types):
        float_dtype(types[0])
        return types[0]

    def reference(self, attrs, x):
        return _moments(attrs, x)[1]

    def grad(self, attrs, xs, y, gy, needs):
        return [xs[0].graph.add("standardize_grad", [xs[0], gy], dict(attrs))]

    def context(self, attrs, types, out):
        return _rows(attrs, types[0])

    def macs(self, attrs, types, out):
        return 2 * out.size


@register
class StandardizeGrad(Op):
    """dL/dx of ``standardize``: with x̂ the standardized x and 1/σ its
    scale, dx = (gy - mean(gy) - x̂ mean(gy x̂)) / σ over each row."""
    name = "standardize_grad"
    arity = (2, 2)
    inputs = ("x", "gy")

    def normalize(self, attrs, types):
        return _standardize_attrs(attrs, types[0])

    def infer(self, attrs, types):
        same_dtype(types)
        float_dtype(types[0])
        if types[1].shape != types[0].shape:
            raise RuleError(f"output gradient has shape {types[1].shape}, the input {types[0].shape}")
        return types[0]

    def reference(self, attrs, x, gy):
        axes, xh, inv = _moments(attrs, x)
        return inv * (gy - gy.mean(axis=axes, keepdims=True) - xh * (gy * xh).mean(axis=axes, keepdims=True))

    def context(self, attrs, types, out):
        return _rows(attrs, types[0])

    def macs(self, attrs, types, out):
        return 5 * out.size


def _part(name, part: str):
    """The name of an inner node of a composite named ``name`` (None: automatic)."""
    return None if name is None else f"{name}.{part}"


def _affine(x: Value, y: Value, weight, bias, shape, name, op: str) -> Value:
    """y * weight + bias, weight and bias reshaped to ``shape`` (broadcast
    against y); None leaves that step out."""
    from .elementwise import add, mul
    from .tensor import reshape
    last = name if bias is None else None
    if weight is not None:
        w = as_value(x, weight, f"{op}: weight")
        y = mul(y, reshape(w, shape, name=_part(name, "weight")) if w.shape != shape else w,
                name=last if last else _part(name, "scaled"))
    if bias is not None:
        b = as_value(x, bias, f"{op}: bias")
        y = add(y, reshape(b, shape, name=_part(name, "bias")) if b.shape != shape else b, name=name)
    return y


def _check_params(op, name, x, shape, **params):
    """Each of ``params`` (weight, bias; None: absent) holds one value per
    element of ``shape`` (in any shape of that size)."""
    with rules(op, name, x=x, **{k: v for k, v in params.items() if v is not None}):
        for what, p in params.items():
            if p is None:
                continue
            got = p.shape if isinstance(p, Value) else np.shape(p)
            if shapes.prod(got) != shapes.prod(shape):
                raise RuleError(f"{what} must have {shapes.prod(shape)} elements (shape {shape}), got {got}")


@builder("x")
def instance_norm(x: Value, weight=None, bias=None, eps: float = 1e-5, name=None) -> Value:
    """Each (n, c) plane of x (N, C, ...) standardized over its spatial
    axes, then scaled by ``weight[c]`` and shifted by ``bias[c]`` (either may
    be None): torch.nn.functional.instance_norm without running stats."""
    with rules("instance_norm", name, x=x):
        if len(x.shape) < 3:
            raise RuleError(f"input must be (N, C, *spatial), got shape {x.shape}")
    c = x.shape[1]
    _check_params("instance_norm", name, x, (c,), weight=weight, bias=bias)
    y = standardize(x, 2, eps, name=name if weight is None and bias is None else _part(name, "standardize"))
    return _affine(x, y, weight, bias, (c,) + (1,) * (len(x.shape) - 2), name, "instance_norm")


@builder("x")
def group_norm(x: Value, num_groups: int, weight=None, bias=None, eps: float = 1e-5, name=None) -> Value:
    """x (N, C, ...) in ``num_groups`` groups of C / num_groups channels, each
    group of each sample standardized, then per-channel ``weight`` and
    ``bias``: torch.nn.functional.group_norm."""
    from .tensor import reshape
    with rules("group_norm", name, x=x):
        if len(x.shape) < 2:
            raise RuleError(f"input must be (N, C, ...), got shape {x.shape}")
        if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) or num_groups < 1 \
                or x.shape[1] % num_groups:
            raise RuleError(f"num_groups {num_groups!r} must be a positive divisor of the {x.shape[1]} channels")
    c = x.shape[1]
    _check_params("group_norm", name, x, (c,), weight=weight, bias=bias)
    plain = weight is None and bias is None
    y = standardize(reshape(x, (x.shape[0], int(num_groups), -1), name=_part(name, "groups")), 2, eps,
                    name=_part(name, "standardize"))
    y = reshape(y, x.shape, name=name if plain else _part(name, "ungroup"))
    return _affine(x, y, weight, bias, (c,) + (1,) * (len(x.shape) - 2), name, "group_norm")


@builder("x")
def layer_norm(x: Value, axis: int = -1, weight=None, bias=None, eps: float = 1e-5, name=None) -> Value:
    """x standardized over the axes ``axis`` .. last, then scaled by
    ``weight`` and shifted by ``bias`` (shaped like those axes, or
    broadcastable to them): torch.nn.functional.layer_norm with
    normalized_shape = x.shape[axis:]."""
    rank = len(x.shape)
    with rules("layer_norm", name, x=x):
        a = _standardize_attrs({"axis": axis, "eps": eps}, x.type)["axis"]
        for what, p in (("weight", weight), ("bias", bias)):
            if p is None:
                continue
            ps = p.shape if isinstance(p, Value) else np.shape(p)
            try:
                if len(ps) > rank - a or np.broadcast_shapes(ps, x.shape[a:]) != x.shape[a:]:
                    raise ValueError
            except ValueError:
                raise RuleError(f"{what} of shape {ps} does not broadcast to the normalized axes {x.shape[a:]}") \
                    from None
    y = standardize(x, a, eps, name=name if weight is None and bias is None else _part(name, "standardize"))
    from .elementwise import add, mul
    if weight is not None:
        y = mul(y, as_value(x, weight, "layer_norm: weight"), name=name if bias is None else _part(name, "scaled"))
    if bias is not None:
        y = add(y, as_value(x, bias, "layer_norm: bias"), name=name)
    return y


@builder("x")
def lp_normalize(x: Value, p: int = 2, axis: int = 1, name=None) -> Value:
    """x divided by its L1 (``p=1``) or L2 (``p=2``) norm along ``axis``; a
    zero vector stays zero (ONNX's LpNormalization: 0/0 is 0). The norm is
    clamped below at the dtype's smallest normal number (a clip), which
    leaves every other norm as it is and turns 0/0 into 0/tiny = 0;
    torch.nn.functional.normalize clamps at 1e-12 instead."""
    from .elementwise import clip, div
    from .reduce import reduce
    with rules("lp_normalize", name, x=x):
        if p not in (1, 2) or isinstance(p, bool):
            raise RuleError(f"p must be 1 or 2, got {p!r}")
        a = _standardize_attrs({"axis": axis, "eps": 0}, x.type)["axis"]
        float_dtype(x.type)
    norm = reduce(x, "l1" if p == 1 else "l2", a, keepdims=True, name=_part(name, "norm"))
    return div(x, clip(norm, float(np.finfo(x.dtype).tiny), None, name=_part(name, "clamped")), name=name)

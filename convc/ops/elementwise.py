"""Elementwise ops: activations (``relu``, ``leaky_relu``, ``sigmoid``,
``tanh``, ``clip``) and binary arithmetic (``add``, ``sub``, ``mul``, ``div``) with
numpy broadcasting."""
from __future__ import annotations

import numpy as np

from ..errors import RuleError
from ..ir import TensorType, Value
from .registry import Op, as_value, float_dtype, graph_of, register, same_dtype


# -- activations ---------------------------------------------------------------
def relu(x: Value, name=None) -> Value:
    """max(x, 0)."""
    return x.graph.add("relu", [x], {}, name)


def leaky_relu(x: Value, negative_slope: float = 0.01, name=None) -> Value:
    """x if x > 0 else negative_slope * x (PyTorch's default slope 0.01)."""
    return x.graph.add("leaky_relu", [x], {"negative_slope": negative_slope}, name)


def sigmoid(x: Value, name=None) -> Value:
    """1 / (1 + exp(-x))."""
    return x.graph.add("sigmoid", [x], {}, name)


def tanh(x: Value, name=None) -> Value:
    """Hyperbolic tangent."""
    return x.graph.add("tanh", [x], {}, name)


ACTIVATIONS = ("relu", "leaky_relu", "sigmoid", "tanh")


def activate(kind: str, x: np.ndarray, negative_slope: float = 0.01) -> np.ndarray:
    """numpy meaning of each activation (shared by the ops that fuse one)."""
    if kind == "relu":
        return np.maximum(x, 0)
    if kind == "leaky_relu":
        return np.where(x > 0, x, x * x.dtype.type(negative_slope))
    if kind == "sigmoid":
        one = x.dtype.type(1)
        return one / (one + np.exp(-x))
    if kind == "tanh":
        return np.tanh(x)
    raise ValueError(f"unknown activation {kind!r}")


class _Unary(Op):
    template = "unary"

    def reference(self, attrs, x):
        return activate(self.name, x, attrs.get("negative_slope", 0.01))

    def infer(self, attrs, types):
        float_dtype(types[0])
        return types[0]

    def context(self, attrs, types, out):
        return dict(kind=self.name, SIZE=out.size, attrs=attrs)


@register
class Relu(_Unary):
    name = "relu"

    def grad(self, attrs, xs, y, gy, needs):
        return [activation_grad("relu", xs[0], gy)]



@register
class LeakyRelu(_Unary):
    name = "leaky_relu"

    def normalize(self, attrs, types):
        try:
            return {"negative_slope": float(attrs["negative_slope"])}
        except (TypeError, ValueError):
            raise RuleError(f"negative_slope must be a number, got {attrs['negative_slope']!r}") from None

    def grad(self, attrs, xs, y, gy, needs):
        return [activation_grad("leaky_relu", xs[0], gy, attrs["negative_slope"])]



@register
class Sigmoid(_Unary):
    name = "sigmoid"

    def grad(self, attrs, xs, y, gy, needs):
        return [activation_grad("sigmoid", y, gy)]



@register
class Tanh(_Unary):
    name = "tanh"

    def grad(self, attrs, xs, y, gy, needs):
        return [activation_grad("tanh", y, gy)]



def clip(x: Value, min: float | None = None, max: float | None = None, name=None) -> Value:  # noqa: A002
    """Clamp to [min, max] as ``numpy.clip`` (``None``: open on that side);
    ReLU6 is ``clip(x, 0, 6)``. NaN stays NaN; min > max gives max."""
    lo = -np.inf if min is None else min
    hi = np.inf if max is None else max
    return x.graph.add("clip", [x], {"min": lo, "max": hi}, name)


def _bounds(attrs) -> dict:
    try:
        lo, hi = float(attrs["min"]), float(attrs["max"])
    except (TypeError, ValueError):
        raise RuleError(f"min and max must be numbers, got {attrs['min']!r} and {attrs['max']!r}") from None
    if lo != lo or hi != hi:
        raise RuleError("min and max must not be NaN")
    return {"min": lo, "max": hi}


@register
class Clip(Op):
    name = "clip"

    def normalize(self, attrs, types):
        return _bounds(attrs)

    def infer(self, attrs, types):
        float_dtype(types[0])
        return types[0]

    def reference(self, attrs, x):
        t = x.dtype.type
        return np.minimum(np.maximum(x, t(attrs["min"])), t(attrs["max"]))

    def grad(self, attrs, xs, y, gy, needs):
        # gy where min < x < max (strict, as F.hardtanh / F.relu6)
        return [activation_grad("clip", xs[0], gy, bounds=(attrs["min"], attrs["max"]))]

    def context(self, attrs, types, out):
        return dict(SIZE=out.size, lo=attrs["min"], hi=attrs["max"])


# -- binary arithmetic with broadcasting ---------------------------------------
def _binary(op, a, b, name):
    like = graph_of(a, b)
    a, b = as_value(like, a, f"{op} operand"), as_value(like, b, f"{op} operand")
    return like.graph.add(op, [a, b], {}, name)


def add(a, b, name=None) -> Value:
    """a + b with numpy broadcasting; either side may be a number or array."""
    return _binary("add", a, b, name)


def sub(a, b, name=None) -> Value:
    """a - b with numpy broadcasting."""
    return _binary("sub", a, b, name)


def mul(a, b, name=None) -> Value:
    """a * b with numpy broadcasting."""
    return _binary("mul", a, b, name)


def div(a, b, name=None) -> Value:
    """a / b with numpy broadcasting."""
    return _binary("div", a, b, name)


def broadcast_strides(shape, out_shape):
    """Element strides of ``shape`` seen through ``out_shape`` (0 where broadcast)."""
    pad = (1,) * (len(out_shape) - len(shape)) + tuple(shape)
    strides, acc = [], 1
    for n in reversed(pad):
        strides.append(0 if n == 1 else acc)
        acc *= n
    return list(reversed(strides))


class _Binary(Op):
    arity = (2, 2)
    inputs = ("a", "b")
    template = "binary"
    numpy_fn = None

    def infer(self, attrs, types):
        a, b = types
        dtype = same_dtype(types, "operands")
        try:
            out = np.broadcast_shapes(a.shape, b.shape)
        except ValueError:
            raise RuleError(f"shapes {a.shape} and {b.shape} do not broadcast (numpy rules)") from None
        return TensorType(tuple(out), dtype)

    def reference(self, attrs, a, b):
        return type(self).numpy_fn(a, b)

    def context(self, attrs, types, out):
        dims = list(out.shape)
        same = types[0].shape == types[1].shape == out.shape
        return dict(kind=self.name, same=same, SIZE=out.size, dims=dims,
                    sa=broadcast_strides(types[0].shape, out.shape),
                    sb=broadcast_strides(types[1].shape, out.shape))

    def macs(self, attrs, types, out):
        return out.size if self.name in ("mul", "div") else 0


@register
class Add(_Binary):
    name = "add"
    numpy_fn = np.add

    def grad(self, attrs, xs, y, gy, needs):
        from .tensor import sum_to
        a, b = xs
        return [sum_to(gy, a.shape) if needs[0] else None, sum_to(gy, b.shape) if needs[1] else None]


@register
class Sub(_Binary):
    name = "sub"
    numpy_fn = np.subtract

    def grad(self, attrs, xs, y, gy, needs):
        from .tensor import sum_to
        a, b = xs
        return [sum_to(gy, a.shape) if needs[0] else None, sum_to(mul(gy, -1.0), b.shape) if needs[1] else None]


@register
class Mul(_Binary):
    name = "mul"
    numpy_fn = np.multiply

    def grad(self, attrs, xs, y, gy, needs):
        from .tensor import sum_to
        a, b = xs
        return [sum_to(mul(gy, b), a.shape) if needs[0] else None, sum_to(mul(gy, a), b.shape) if needs[1] else None]


@register
class Div(_Binary):
    name = "div"
    numpy_fn = np.divide

    def grad(self, attrs, xs, y, gy, needs):
        from .tensor import sum_to
        a, b = xs
        q = div(gy, b)
        return [sum_to(q, a.shape) if needs[0] else None,
                sum_to(mul(mul(q, y), -1.0), b.shape) if needs[1] else None]        # -gy * a / b^2

    def infer(self, attrs, types):
        float_dtype(types[0], "dividend")
        return super().infer(attrs, types)




# -- activation gradients --------------------------------------------------------
def activation_grad(kind: str, t: Value, gy: Value, negative_slope: float = 0.01, name=None,
                    bounds=None) -> Value:
    """dL/dx of an activation from ``gy`` = dL/dy. ``t`` is the activation's
    input x for relu/leaky_relu/clip and its output y for sigmoid/tanh
    (cheaper); ``bounds`` is clip's (min, max)."""
    attrs = {"kind": kind, "negative_slope": negative_slope}
    if bounds is not None:
        attrs["min"], attrs["max"] = bounds
    return t.graph.add("activation_grad", [t, gy], attrs, name)


@register
class ActivationGrad(Op):
    name = "activation_grad"
    arity = (2, 2)
    inputs = ("t", "gy")
    KINDS = ("relu", "leaky_relu", "sigmoid", "tanh", "clip")

    def normalize(self, attrs, types):
        if attrs["kind"] not in self.KINDS:
            raise RuleError(f"kind must be one of {self.KINDS}, got {attrs['kind']!r}")
        out = {"kind": attrs["kind"], "negative_slope": float(attrs["negative_slope"])}
        if attrs["kind"] == "clip":
            if "min" not in attrs or "max" not in attrs:
                raise RuleError("kind 'clip' needs min and max")
            out.update(_bounds(attrs))
        return out

    def infer(self, attrs, types):
        if types[0].shape != types[1].shape:
            raise RuleError(f"t {types[0].shape} and gy {types[1].shape} must have one shape")
        same_dtype(types)
        return types[1]

    def reference(self, attrs, t, gy):
        kind = attrs["kind"]
        if kind == "relu":
            return np.where(t > 0, gy, 0)
        if kind == "leaky_relu":
            return np.where(t > 0, gy, gy * t.dtype.type(attrs["negative_slope"]))
        if kind == "sigmoid":
            return gy * t * (1 - t)
        if kind == "clip":
            c = t.dtype.type
            return np.where((t > c(attrs["min"])) & (t < c(attrs["max"])), gy, 0)
        return gy * (1 - t * t)

    def context(self, attrs, types, out):
        return dict(kind=attrs["kind"], SIZE=out.size, slope=attrs["negative_slope"],
                    lo=attrs.get("min", 0.0), hi=attrs.get("max", 0.0))

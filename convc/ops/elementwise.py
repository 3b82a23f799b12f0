"""Elementwise ops: one op per activation of the table in
``ops/activations.py`` (``relu``, ``leaky_relu``, ``clip``, ``sigmoid``,
``tanh``, ``silu``, ``hardswish``, ``hardsigmoid``, ``gelu``), their
gradient ``activation_grad``, and binary arithmetic (``add``, ``sub``,
``mul``, ``div``) with numpy broadcasting."""
from __future__ import annotations

import numpy as np

from ..errors import RuleError
from ..ir import TensorType, Value
from .activations import TABLE, Activation, get as get_activation
from .registry import Op, as_value, builder, float_dtype, graph_of, par_outer, register, register_op, same_dtype


# -- activations: one op per record of the table (ops/activations.py) ------
def _activation(kind: str, x: Value, name, **params) -> Value:
    return x.graph.add(kind, [x], params, name)


@builder("x")
def relu(x: Value, name=None) -> Value:
    """max(x, 0)."""
    return _activation("relu", x, name)


@builder("x")
def leaky_relu(x: Value, negative_slope: float = 0.01, name=None) -> Value:
    """x if x > 0 else negative_slope * x (PyTorch's default slope 0.01)."""
    return _activation("leaky_relu", x, name, negative_slope=negative_slope)


@builder("x")
def sigmoid(x: Value, name=None) -> Value:
    """1 / (1 + exp(-x))."""
    return _activation("sigmoid", x, name)


@builder("x")
def tanh(x: Value, name=None) -> Value:
    """Hyperbolic tangent."""
    return _activation("tanh", x, name)


@builder("x")
def clip(x: Value, min: float | None = None, max: float | None = None, name=None) -> Value:  # noqa: A002
    """Clamp to [min, max] as ``numpy.clip`` (``None``: open on that side);
    ReLU6 is ``clip(x, 0, 6)``. NaN stays NaN; min > max gives max."""
    return _activation("clip", x, name, min=-np.inf if min is None else min, max=np.inf if max is None else max)


@builder("x")
def relu6(x: Value, name=None) -> Value:
    """min(max(x, 0), 6): ``clip(x, 0, 6)``."""
    return clip(x, 0.0, 6.0, name=name)


@builder("x")
def silu(x: Value, name=None) -> Value:
    """x * sigmoid(x) (SiLU, also called swish)."""
    return _activation("silu", x, name)


@builder("x")
def hardswish(x: Value, name=None) -> Value:
    """x * relu6(x + 3) / 6, as torch.nn.functional.hardswish."""
    return _activation("hardswish", x, name)


@builder("x")
def hardsigmoid(x: Value, alpha: float = 1 / 6, beta: float = 0.5, name=None) -> Value:
    """clip(alpha * x + beta, 0, 1); the defaults are PyTorch's (ONNX's
    HardSigmoid defaults to alpha 0.2)."""
    return _activation("hardsigmoid", x, name, alpha=alpha, beta=beta)


@builder("x")
def gelu(x: Value, approximate: str = "none", name=None) -> Value:
    """x * Phi(x) as torch.nn.functional.gelu: ``approximate="none"`` (erf)
    or ``"tanh"``."""
    if approximate not in ("none", "tanh"):
        from ..errors import GraphError
        raise GraphError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _activation("gelu" if approximate == "none" else "gelu_tanh", x, name)


class ActivationOp(Op):
    """An elementwise op made from one record of the activation table."""
    template = "unary"

    def __init__(self, act: Activation):
        self.act = act
        self.name = act.name

    def normalize(self, attrs, types):
        return self.act.normalize(attrs)

    def infer(self, attrs, types):
        float_dtype(types[0])
        return types[0]

    def reference(self, attrs, x):
        return self.act.apply(x, attrs)

    def grad(self, attrs, xs, y, gy, needs):
        t = y if self.act.grad_input(attrs) == "y" else xs[0]
        return [activation_grad(self.name, t, gy, attrs)]

    def context(self, attrs, types, out):
        return dict(SIZE=out.size, par=[("i", "SIZE", out.size)], act=self.act, params=attrs)


for _act in TABLE.values():
    register_op(ActivationOp(_act))


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
                    par=[("i", "SIZE", out.size)] if same else par_outer(dims),
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
def activation_grad(kind: str, t: Value, gy: Value, params: dict | None = None, name=None) -> Value:
    """dL/dx of activation ``kind`` from ``gy`` = dL/dy. ``t`` is the
    activation's input x or its output y, whichever its table record's
    ``grad_from`` names for these ``params``."""
    return t.graph.add("activation_grad", [t, gy], {"kind": kind, **(params or {})}, name)


@register
class ActivationGrad(Op):
    name = "activation_grad"
    arity = (2, 2)
    inputs = ("t", "gy")

    def normalize(self, attrs, types):
        act = get_activation(attrs.get("kind"))
        return {"kind": act.name, **act.normalize(attrs)}

    def infer(self, attrs, types):
        if types[0].shape != types[1].shape:
            raise RuleError(f"t {types[0].shape} and gy {types[1].shape} must have one shape")
        same_dtype(types)
        float_dtype(types[1], "gy")
        return types[1]

    @staticmethod
    def _params(attrs):
        return {k: v for k, v in attrs.items() if k != "kind"}

    def reference(self, attrs, t, gy):
        return TABLE[attrs["kind"]].derivative(t, gy, self._params(attrs))

    def context(self, attrs, types, out):
        return dict(SIZE=out.size, par=[("i", "SIZE", out.size)], act=TABLE[attrs["kind"]],
                    params=self._params(attrs))

"""Elementwise ops: one op per activation of the table in
``ops/activations.py`` (``relu``, ``leaky_relu``, ``clip``, ``sigmoid``,
``tanh``, ``silu``, ``hardswish``, ``hardsigmoid``, ``gelu``), their
gradient ``activation_grad``, and binary arithmetic (``add``, ``sub``,
``mul``, ``div``) with numpy broadcasting.

Integer tensors (every integer dtype of the IR) take ``add``, ``sub``,
``mul``, ``div`` and ``clip``, with ONNX's (and numpy's) integer meaning:
add, sub and mul wrap around modulo 2**bits (the C computes in an unsigned
type, where wrapping is defined, and converts back); div truncates toward
zero as C does. Two cases ONNX leaves open are defined here, in the
reference and the C alike, so that no input can crash the process:
``x / 0`` is 0, and for signed types ``x / -1`` is ``-x`` wrapped (so
``MIN / -1`` is ``MIN``, the one quotient C cannot represent)."""
from __future__ import annotations

import numpy as np

from ..errors import RuleError
from ..ir import INT_DTYPES, TensorType, Value
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


@builder("x")
def elu(x: Value, alpha: float = 1.0, name=None) -> Value:
    """x if x > 0 else alpha * (exp(x) - 1)."""
    return _activation("elu", x, name, alpha=alpha)


@builder("x")
def selu(x: Value, alpha: float = 1.67326319217681884765625, gamma: float = 1.05070102214813232421875,
         name=None) -> Value:
    """gamma * elu(x, alpha), with ONNX's defaults (PyTorch's constants
    differ from the 8th digit on)."""
    return _activation("selu", x, name, alpha=alpha, gamma=gamma)


@builder("x")
def softplus(x: Value, name=None) -> Value:
    """log(1 + exp(x)), computed without overflow."""
    return _activation("softplus", x, name)


@builder("x")
def softsign(x: Value, name=None) -> Value:
    """x / (1 + |x|)."""
    return _activation("softsign", x, name)


@builder("x")
def thresholded_relu(x: Value, alpha: float = 1.0, name=None) -> Value:
    """x if x > alpha else 0 (ONNX's ThresholdedRelu; NaN stays NaN)."""
    return _activation("thresholded_relu", x, name, alpha=alpha)


@builder("x")
def mish(x: Value, name=None) -> Value:
    """x * tanh(softplus(x))."""
    return _activation("mish", x, name)


@builder("x")
def sqrt(x: Value, name=None) -> Value:
    """Square root, elementwise."""
    return _activation("sqrt", x, name)


@builder("x")
def exp(x: Value, name=None) -> Value:
    """e to the x, elementwise."""
    return _activation("exp", x, name)


@builder("x")
def log(x: Value, name=None) -> Value:
    """Natural logarithm, elementwise."""
    return _activation("log", x, name)


@builder("x")
def neg(x: Value, name=None) -> Value:
    """-x."""
    return _activation("neg", x, name)


@builder("x")
def abs(x: Value, name=None) -> Value:  # noqa: A001
    """|x|, elementwise."""
    return _activation("abs", x, name)


@builder("x")
def reciprocal(x: Value, name=None) -> Value:
    """1 / x, elementwise."""
    return _activation("reciprocal", x, name)


@builder("x")
def erf(x: Value, name=None) -> Value:
    """The error function, elementwise."""
    return _activation("erf", x, name)


class ActivationOp(Op):
    """An elementwise op made from one record of the activation table."""
    template = "unary"

    def __init__(self, act: Activation):
        self.act = act
        self.name = act.name

    def normalize(self, attrs, types):
        if self.name == "clip" and types[0].dtype in INT_DTYPES:
            return int_clip_bounds(attrs, types[0].dtype)
        return self.act.normalize(attrs)

    def infer(self, attrs, types):
        if not (self.name == "clip" and types[0].dtype in INT_DTYPES):
            float_dtype(types[0])
        return types[0]

    def reference(self, attrs, x):
        if x.dtype.kind in "iu":            # clip of integers: bounds are integers of the dtype
            lo, hi = (x.dtype.type(attrs[k]) for k in ("min", "max"))
            return np.where(np.where(x < lo, lo, x) > hi, hi, np.where(x < lo, lo, x)).astype(x.dtype)
        return self.act.apply(x, attrs)

    def grad(self, attrs, xs, y, gy, needs):
        t = y if self.act.grad_input(attrs) == "y" else xs[0]
        return [activation_grad(self.name, t, gy, attrs)]

    def context(self, attrs, types, out):
        expr = int_clip_expr(attrs, out.dtype, "v") if out.dtype in INT_DTYPES else None
        return dict(SIZE=out.size, par=[("i", "SIZE", out.size)], act=self.act, params=attrs, expr=expr)


def int_clip_bounds(attrs: dict, dtype: str) -> dict:
    """Clip's bounds for an integer tensor: integers within the dtype's range
    (an infinite or absent bound is the range's end), exact (kept as Python
    ints, so int64 bounds beyond 2**53 stay exact)."""
    info = np.iinfo(dtype)
    out = {}
    for k, end in (("min", int(info.min)), ("max", int(info.max))):
        v = attrs.get(k)
        if v is None or (isinstance(v, (float, np.floating)) and np.isinf(v) and (v < 0) == (k == "min")):
            out[k] = end
            continue
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)) \
                or (isinstance(v, (float, np.floating)) and not float(v).is_integer()):
            raise RuleError(f"clip of a {dtype} tensor: {k} must be an integer (or None), got {v!r}")
        if not info.min <= int(v) <= info.max:
            raise RuleError(f"clip of a {dtype} tensor: {k} {int(v)} is outside the dtype's range "
                            f"[{info.min}, {info.max}]")
        out[k] = int(v)
    return out


def c_int(v: int, dtype: str) -> str:
    """An integer literal of ``dtype`` C (and OpenCL C) read exactly: the
    most negative int64 is written as an expression (its literal would not
    fit), 64-bit values carry a suffix."""
    if dtype == "int64" and v == -2**63:
        return "(-9223372036854775807LL - 1)"
    return f"{v}{'ULL' if dtype == 'uint64' else 'LL' if dtype == 'int64' else ''}"


def int_clip_expr(attrs: dict, dtype: str, x: str) -> str:
    """C expression of an integer clip of variable ``x`` (numpy.clip's order:
    the lower bound, then the upper, so min > max gives max). A bound at the
    end of the dtype's range clips nothing and is left out (its comparison
    would always be false, which -Wextra reports for unsigned types)."""
    info = np.iinfo(dtype)
    lo, hi = attrs["min"], attrs["max"]
    e = x if lo <= info.min else f"({x} < {c_int(lo, dtype)} ? {c_int(lo, dtype)} : {x})"
    if hi < info.max:
        e = f"({e} > {c_int(hi, dtype)} ? {c_int(hi, dtype)} : {e})"
    return e


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


_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


def binary_c_expr(kind: str, dtype: str, a: str, b: str) -> str:
    """The C expression of ``a kind b`` (variables) in ``dtype``: plain for
    floats; for integers, add/sub/mul in the unsigned type of at least 32
    bits (wrapping is defined there, and operands narrower than int would
    otherwise be promoted to signed int, where a product can overflow),
    converted back (modulo 2**bits, as gcc, clang and OpenCL C define the
    conversion); div by the rules of the module docstring."""
    from ..codegen.env import CTYPES
    sym = _SYMBOL[kind]
    if dtype not in INT_DTYPES:
        return f"{a} {sym} {b}"
    T = CTYPES[dtype]
    W = "uint64_t" if np.dtype(dtype).itemsize == 8 else "uint32_t"
    if kind != "div":
        return f"({T})(({W}){a} {sym} ({W}){b})"
    if dtype.startswith("u"):
        return f"({b} == 0 ? 0 : ({T})({a} / {b}))"
    return f"({b} == 0 ? 0 : {b} == -1 ? ({T})(0 - ({W}){a}) : ({T})({a} / {b}))"


def int_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Integer a / b as :func:`binary_c_expr` computes it: truncated toward
    zero, x / 0 = 0, x / -1 = -x wrapped; in a's dtype."""
    a, b = np.broadcast_arrays(a, b)
    zero = b == 0
    neg1 = (b == -1) if a.dtype.kind == "i" else np.zeros(b.shape, bool)
    safe = np.where(zero | neg1, 1, b).astype(a.dtype)
    q = (a - np.fmod(a, safe)) // safe          # exact: a minus C's remainder is a multiple of b
    with np.errstate(over="ignore"):
        return np.where(zero, 0, np.where(neg1, np.negative(a), q)).astype(a.dtype)


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
        with np.errstate(over="ignore"):          # integers wrap around, as in C's unsigned arithmetic
            return np.asarray(type(self).numpy_fn(a, b), dtype=a.dtype)

    def context(self, attrs, types, out):
        dims = list(out.shape)
        same = types[0].shape == types[1].shape == out.shape
        return dict(kind=self.name, same=same, SIZE=out.size, dims=dims,
                    expr=binary_c_expr(self.name, out.dtype, "va", "vb"),
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

    def reference(self, attrs, a, b):
        return int_div(a, b) if a.dtype.kind in "iu" else np.divide(a, b)




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

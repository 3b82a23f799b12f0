"""Elementwise ops: one op per activation of the table in
``ops/activations.py`` (``relu``, ``leaky_relu``, ``clip``, ``sigmoid``,
``tanh``, ``silu``, ``hardswish``, ``hardsigmoid``, ``gelu``, ``elu``,
``selu``, ``softplus``, ``softsign``, ``thresholded_relu``, ``mish`` and the
unary math ``sqrt``, ``exp``, ``log``, ``neg``, ``abs``, ``reciprocal``,
``erf``), their gradient ``activation_grad``, and binary ops with numpy
broadcasting: arithmetic (``add``, ``sub``, ``mul``, ``div``), ``maximum``,
``minimum``, ``pow`` and ``prelu``, the last four with their gradient op
``binary_grad``.

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

    def c_expr(self, attrs, types, out) -> str:
        """The C expression of one output element from ``va`` and ``vb``."""
        return binary_c_expr(self.name, out.dtype, "va", "vb")

    def context(self, attrs, types, out):
        return dict(broadcast_context(self.inputs, types, out), kind=self.name, expr=self.c_expr(attrs, types, out))

    def macs(self, attrs, types, out):
        return out.size if self.name in ("mul", "div", "pow") else 0


def broadcast_context(args, types, out) -> dict:
    """The context of ``templates/c/binary.c.j2`` for operands ``args`` (C
    argument names; each is read into ``v<name>``) broadcast to ``out``:
    one flat loop when every operand has the output's shape, else a loop per
    axis with each operand's index from its broadcast strides."""
    dims = list(out.shape)
    same = all(t.shape == out.shape for t in types)
    if same:
        return dict(same=True, SIZE=out.size, dims=dims, par=[("i", "SIZE", out.size)],
                    loads=[(a, "i") for a in args], out_index="i")

    def index(strides):
        return " + ".join(f"i{k}" if s == 1 else f"i{k} * {s}" for k, s in enumerate(strides) if s) or "0"
    return dict(same=False, SIZE=out.size, dims=dims, par=par_outer(dims),
                loads=[(a, index(broadcast_strides(t.shape, out.shape))) for a, t in zip(args, types)],
                out_index=index(broadcast_strides(out.shape, out.shape)))


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


# -- maximum, minimum, pow, prelu ------------------------------------------------
def maximum(a, b, name=None) -> Value:
    """The larger of a and b, elementwise, with numpy broadcasting (as
    torch.maximum: NaN wins; a tie gives a, and splits the gradient evenly)."""
    return _binary("maximum", a, b, name)


def minimum(a, b, name=None) -> Value:
    """The smaller of a and b, elementwise (as torch.minimum; see :func:`maximum`)."""
    return _binary("minimum", a, b, name)


def pow(a, b, name=None) -> Value:  # noqa: A001
    """a ** b, elementwise with numpy broadcasting, in a's dtype (ONNX's Pow):
    the exponent may have another dtype. Floats: C's pow with b converted
    to a's type. Integers: exact, wrapping modulo 2**bits; a negative
    exponent gives 1 / a**-b truncated (1 for a = 1, +-1 for a = -1, 0 for
    any other a, 0 for a = 0 as convc's x / 0). An integer a to a float b:
    pow in b's type, then truncated toward zero, saturated to a's range,
    NaN -> 0."""
    like = graph_of(a, b)
    if not isinstance(b, Value) and isinstance(b, (int, float, np.number)) and not isinstance(b, bool):
        if like is a and a.dtype in INT_DTYPES and not float(b).is_integer():
            b = a.graph.const(np.asarray(b, np.float64), "float64")
    a, b = as_value(like, a, "pow base"), as_value(like, b, "pow exponent")
    return like.graph.add("pow", [a, b], {}, name)


def prelu(x, slope, name=None) -> Value:
    """x if x >= 0 else slope * x, ``slope`` broadcast to x's shape
    (ONNX's PRelu: unidirectional numpy broadcasting; torch's per-channel
    weight is ``slope`` of shape (C, 1, 1))."""
    return _binary("prelu", x, slope, name)


def _float_literal(v: float, dtype: str) -> str:
    from ..codegen.env import cfloat
    return cfloat(v, "float" if dtype == "float32" else "double")


@register
class Maximum(_Binary):
    name = "maximum"

    def reference(self, attrs, a, b):
        return np.where((a < b) | (b != b), b, a).astype(a.dtype)

    def c_expr(self, attrs, types, out):
        # b where a < b or b is NaN, else a: NaN wins, a tie gives a (torch.maximum, std::max)
        return "(va < vb ? vb : va)" if out.dtype in INT_DTYPES else "(va < vb || vb != vb ? vb : va)"

    def grad(self, attrs, xs, y, gy, needs):
        return _binary_grads(self.name, xs, gy, needs)


@register
class Minimum(_Binary):
    name = "minimum"

    def reference(self, attrs, a, b):
        return np.where((b < a) | (b != b), b, a).astype(a.dtype)

    def c_expr(self, attrs, types, out):
        return "(vb < va ? vb : va)" if out.dtype in INT_DTYPES else "(vb < va || vb != vb ? vb : va)"

    def grad(self, attrs, xs, y, gy, needs):
        return _binary_grads(self.name, xs, gy, needs)


@register
class Pow(_Binary):
    name = "pow"

    def infer(self, attrs, types):
        a, b = types
        try:
            out = np.broadcast_shapes(a.shape, b.shape)
        except ValueError:
            raise RuleError(f"shapes {a.shape} and {b.shape} do not broadcast (numpy rules)") from None
        return TensorType(tuple(out), a.dtype)

    def reference(self, attrs, a, b):
        return pow_array(a, b)

    def c_expr(self, attrs, types, out):
        from ..codegen.env import CTYPES
        a, b = types[0].dtype, types[1].dtype
        if a in INT_DTYPES:
            return f"convc_ipow_{a}_{b}(va, vb)"      # the template's helper (see context)
        vb = "vb" if a == b else f"({CTYPES[a]})vb"
        return f"pow{'f' if a == 'float32' else ''}(va, {vb})"

    def context(self, attrs, types, out):
        ctx = super().context(attrs, types, out)
        a, b = types[0].dtype, types[1].dtype
        if a in INT_DTYPES:
            from ..codegen.env import CTYPES
            info = np.iinfo(a)
            ctx["pow_helper"] = dict(
                name=f"convc_ipow_{a}_{b}", int_exponent=b in INT_DTYPES, signed_exponent=b.startswith("int"), signed=a.startswith("int"),
                W="uint64_t" if np.dtype(a).itemsize == 8 else "uint32_t", TB=CTYPES[b],
                f="f" if b == "float32" else "", lo=c_int(int(info.min), a), hi=c_int(int(info.max), a),
                # the range's ends as b's floats: 2^bits-1 rounds up, so "r >= hi" saturates exactly
                lo_f=_float_literal(float(info.min), b) if b not in INT_DTYPES else None,
                hi_f=_float_literal(float(info.max), b) if b not in INT_DTYPES else None)
        return ctx

    def grad(self, attrs, xs, y, gy, needs):
        a, b = xs
        if a.dtype not in ("float32", "float64"):
            return [None, None]
        return _binary_grads(self.name, xs, gy, [needs[0], needs[1] and b.dtype == a.dtype])


def pow_array(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """numpy a ** b in a's dtype as :func:`pow` defines it (the reference)."""
    with np.errstate(all="ignore"):
        if a.dtype.kind == "f":
            return np.power(a, b.astype(a.dtype)).astype(a.dtype)
        if b.dtype.kind == "f":          # integer base, float exponent: in b's type, truncated, saturated
            info = np.iinfo(a.dtype)
            r = np.trunc(np.power(a.astype(b.dtype), b))
            r = np.where(r != r, 0, r)
            big = r >= b.dtype.type(info.max)
            small = r <= b.dtype.type(info.min)
            safe = np.where(big | small, 0, r).astype(a.dtype)
            return np.where(big, info.max, np.where(small, info.min, safe)).astype(a.dtype)
        a, b = np.broadcast_arrays(a, b)
        neg = b < 0
        e = np.where(neg, 0, b).astype(np.uint64)
        r = np.ones(a.shape, np.uint64)
        p = a.astype(np.int64).astype(np.uint64) if a.dtype.kind == "i" else a.astype(np.uint64)
        while e.any():                  # square and multiply, modulo 2**64 (then a's width)
            r = np.where(e & np.uint64(1), r * p, r)
            p = p * p
            e = e >> np.uint64(1)
        out = r.astype(a.dtype)
        if neg.any():
            odd = (b % 2) != 0
            inv = np.where(a == 1, 1, np.where(a == -1, np.where(odd, -1, 1), 0)) if a.dtype.kind == "i" \
                else np.where(a == 1, 1, 0)
            out = np.where(neg, inv, out).astype(a.dtype)
        return out


@register
class PRelu(_Binary):
    name = "prelu"

    def infer(self, attrs, types):
        out = super().infer(attrs, types)
        float_dtype(types[0], "x")
        if out.shape != types[0].shape:
            raise RuleError(f"slope {types[1].shape} must broadcast to x's shape {types[0].shape} "
                            f"(ONNX's unidirectional broadcasting)")
        return out

    def reference(self, attrs, x, slope):
        return np.where(x < 0, slope * x, x).astype(x.dtype)

    def c_expr(self, attrs, types, out):
        return "(va < 0 ? vb * va : va)"

    def grad(self, attrs, xs, y, gy, needs):
        return _binary_grads(self.name, xs, gy, needs)

    def macs(self, attrs, types, out):
        return out.size


# -- gradients of maximum, minimum, pow, prelu ------------------------------------
_GRADS = {
    # kind: (numpy of operand 0's and operand 1's contribution, C of them), over va, vb, vgy.
    # maximum/minimum as torch: a tie gives each side gy / 2, NaN passes gy to both.
    "maximum": ((lambda a, b, g: np.where(a == b, g / 2, np.where(a < b, 0, g)),
                 lambda a, b, g: np.where(a == b, g / 2, np.where(a > b, 0, g))),
                ("(va == vb ? vgy / 2 : (va < vb ? 0 : vgy))", "(va == vb ? vgy / 2 : (va > vb ? 0 : vgy))")),
    "minimum": ((lambda a, b, g: np.where(a == b, g / 2, np.where(a > b, 0, g)),
                 lambda a, b, g: np.where(a == b, g / 2, np.where(a < b, 0, g))),
                ("(va == vb ? vgy / 2 : (va > vb ? 0 : vgy))", "(va == vb ? vgy / 2 : (va < vb ? 0 : vgy))")),
    # pow as torch: b * a^(b - 1), 0 where b == 0; a^b * log(a), 0 where a == 0 and b >= 0
    "pow": ((lambda a, b, g: np.where(b == 0, 0, g * (b * np.power(a, b - 1))),
             lambda a, b, g: np.where((a == 0) & (b >= 0), 0, g * (np.power(a, b) * np.log(a)))),
            ("(vb == 0 ? 0 : vgy * (vb * pow{f}(va, vb - 1)))",
             "(va == 0 && vb >= 0 ? 0 : vgy * (pow{f}(va, vb) * log{f}(va)))")),
    # prelu as torch's prelu_backward: gy where x > 0, else slope * gy; the slope's: x * gy where x <= 0
    "prelu": ((lambda a, b, g: np.where(a > 0, g, b * g),
               lambda a, b, g: np.where(a > 0, 0, a * g)),
              ("(va > 0 ? vgy : vb * vgy)", "(va > 0 ? 0 : va * vgy)")),
}


def _binary_grads(kind: str, xs, gy: Value, needs) -> list:
    """Each needed operand's gradient: its elementwise contribution at the
    broadcast shape, summed down to the operand's shape."""
    from .tensor import sum_to
    a, b = xs
    return [sum_to(gy.graph.add("binary_grad", [a, b, gy], {"kind": kind, "wrt": i}), x.shape) if need else None
            for i, (x, need) in enumerate(zip(xs, needs))]


@register
class BinaryGrad(Op):
    """One operand's gradient contribution of maximum, minimum, pow or prelu
    at the broadcast shape (``wrt`` 0: a, 1: b), before it is summed down to
    the operand's shape."""
    name = "binary_grad"
    arity = (3, 3)
    inputs = ("a", "b", "gy")
    template = "binary"

    def normalize(self, attrs, types):
        if attrs.get("kind") not in _GRADS:
            raise RuleError(f"kind must be one of {tuple(_GRADS)}, got {attrs.get('kind')!r}")
        if attrs.get("wrt") not in (0, 1):
            raise RuleError(f"wrt must be 0 or 1, got {attrs.get('wrt')!r}")
        return {"kind": attrs["kind"], "wrt": int(attrs["wrt"])}

    def infer(self, attrs, types):
        a, b, gy = types
        # (pow's exponent may be an integer tensor; its own gradient then is not asked for)
        same_dtype([a, gy] if attrs["kind"] == "pow" and attrs["wrt"] == 0 else types, "a, b and gy")
        float_dtype(gy, "gy")
        try:
            shape = np.broadcast_shapes(a.shape, b.shape)
        except ValueError:
            raise RuleError(f"shapes {a.shape} and {b.shape} do not broadcast (numpy rules)") from None
        if tuple(shape) != gy.shape:
            raise RuleError(f"gy {gy.shape} must have the broadcast shape {tuple(shape)} of a and b")
        return gy

    def reference(self, attrs, a, b, gy):
        with np.errstate(all="ignore"):
            return np.asarray(_GRADS[attrs["kind"]][0][attrs["wrt"]](a, b.astype(a.dtype), gy), gy.dtype)

    def context(self, attrs, types, out):
        from ..codegen.env import CTYPES
        expr = _GRADS[attrs["kind"]][1][attrs["wrt"]].format(f="f" if out.dtype == "float32" else "")
        if types[1].dtype != out.dtype:         # an integer exponent, as the base's type
            expr = expr.replace("vb", f"(({CTYPES[out.dtype]})vb)")
        return dict(broadcast_context(self.inputs, types, out), kind=attrs["kind"], expr=expr)

    def macs(self, attrs, types, out):
        return out.size




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

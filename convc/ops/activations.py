"""The activation table: one record per activation, read by everything that
needs one — the elementwise ops and their builders, the ``activation_grad``
op, every fused epilogue (numpy meaning and C expression), autodiff, ONNX
import and export, and the templates (which only print the expression).

Adding an activation is one :class:`Activation` record in ``TABLE`` plus its
tests (``tests/test_activations.py`` is parametrized over the table).

A record's C expressions are format strings over ``{x}`` (the input; it may
appear several times, so callers bind it to a variable first), ``{y}``,
``{t}`` and ``{gy}`` (gradients), ``{T}`` (the C type), ``{f}`` (the float
suffix of C math functions: ``tanhf`` for float, ``tanh`` for double),
``{exp}`` (float: the prelude's vectorisable ``convc_expf``; double: ``exp``),
``{expm1}`` (likewise ``convc_expm1f`` or ``expm1``)
and the record's parameters (printed as exact C literals).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import RuleError


def _erf(x: np.ndarray) -> np.ndarray:
    return np.frompyfunc(math.erf, 1, 1)(x).astype(x.dtype)


_SQRT_2_PI = math.sqrt(2.0 / math.pi)       # gelu's tanh form
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TWO_SQRT_PI = 2.0 / math.sqrt(math.pi)     # erf's derivative at 0
_SELU_ALPHA = 1.67326319217681884765625     # ONNX's Selu defaults (float32 values)
_SELU_GAMMA = 1.05070102214813232421875


@dataclass(frozen=True)
class Activation:
    """One activation: what it computes (numpy and C), its derivative and
    from what (``"x"``, its input, or ``"y"``, its output — cheaper: the
    fused producer's output serves), and its ONNX name."""
    name: str
    doc: str
    forward: Callable                       # (x, **params) -> y, numpy
    c: str                                  # C expression of {x}
    backward: Callable                      # (t, gy, **params) -> dL/dx, numpy; t is x or y (grad_from)
    c_grad: str                             # C expression of {t} and {gy}
    grad_from: str | Callable = "x"         # "x" | "y", or a function of the params saying which
    params: dict = field(default_factory=dict)     # name -> default
    onnx: str | None = None                 # ONNX op type (params as its attributes, same names unless onnx_attrs)
    onnx_attrs: dict = field(default_factory=dict)  # our param name -> ONNX attribute name
    onnx_defaults: dict = field(default_factory=dict)  # ONNX's default where it differs from ours
    onnx_since: int = 1                     # first ONNX opset with the op

    def grad_input(self, params: dict) -> str:
        """``"x"`` or ``"y"``: which tensor the derivative reads."""
        return self.grad_from(params) if callable(self.grad_from) else self.grad_from

    def normalize(self, attrs: dict) -> dict:
        """This activation's params from ``attrs`` (defaults filled, floats
        checked); raises RuleError on a bad value."""
        out = {}
        for p, default in self.params.items():
            v = attrs.get(p, default)
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise RuleError(f"{self.name}: {p} must be a number, got {v!r}") from None
            if v != v:
                raise RuleError(f"{self.name}: {p} must not be NaN")
            out[p] = v
        return out

    def apply(self, x: np.ndarray, params: dict) -> np.ndarray:
        p = {k: x.dtype.type(v) for k, v in params.items()}
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return np.asarray(self.forward(x, **p), dtype=x.dtype)

    def derivative(self, t: np.ndarray, gy: np.ndarray, params: dict) -> np.ndarray:
        p = {k: t.dtype.type(v) for k, v in params.items()}
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return np.asarray(self.backward(t, gy, **p), dtype=gy.dtype)

    def _literals(self, params: dict, T: str) -> dict:
        from ..codegen.env import cfloat
        return {k: f"({cfloat(v, T)})" for k, v in params.items()}

    def c_expr(self, x: str, params: dict, T: str) -> str:
        """The C expression of the activation of ``x`` (a variable name)."""
        return self.c.format(x=x, **_c_names(T), **self._literals(params, T))

    def c_grad_expr(self, t: str, gy: str, params: dict, T: str) -> str:
        return self.c_grad.format(t=t, gy=gy, **_c_names(T), **self._literals(params, T))


def _c_names(T: str) -> dict:
    """What a record's C format strings name: the type, the float suffix of
    C math functions, exp and expm1 (float: the prelude's vectorisable
    convc_expf and convc_expm1f)."""
    return dict(T=T, f="f" if T == "float" else "", exp="convc_expf" if T == "float" else "exp",
                expm1="convc_expm1f" if T == "float" else "expm1")


def _np_sigmoid(x):
    one = x.dtype.type(1)
    return one / (one + np.exp(-x))


def _np_clip(x, min, max):  # noqa: A002
    """numpy.clip as comparisons (np.maximum would turn -0.0 into 0.0; PyTorch keeps it)."""
    x = np.where(x < min, min, x)
    return np.where(x > max, max, x)


def _np_softplus(x):
    return np.where(x > 0, x + np.log1p(np.exp(-x)), np.log1p(np.exp(x)))


def _np_gelu_tanh(x):
    u = x.dtype.type(-2 * _SQRT_2_PI) * (x + x.dtype.type(0.044715) * x * x * x)
    return x / (1 + np.exp(u))


TABLE: dict[str, Activation] = {a.name: a for a in [
    Activation(
        "relu", "max(x, 0); NaN and -0.0 pass through, as in PyTorch.",
        # `x < 0 ? 0 : x`, not `x > 0 ? x : 0`: the same compare and blend, but NaN stays NaN
        lambda x: np.where(x < 0, 0, x), "({x} < 0 ? 0 : {x})",
        # PyTorch's threshold_backward: 0 where y <= 0, else gy (so NaN passes gy)
        lambda y, gy: np.where(y <= 0, 0, gy), "({t} <= 0 ? 0 : {gy})", grad_from="y",
        onnx="Relu"),
    Activation(
        "leaky_relu", "x if x > 0 else negative_slope * x (PyTorch's default slope 0.01).",
        lambda x, negative_slope: np.where(x > 0, x, x * negative_slope),
        "({x} > 0 ? {x} : {negative_slope} * {x})",
        lambda t, gy, negative_slope: np.where(t > 0, gy, gy * negative_slope),
        "({t} > 0 ? {gy} : {negative_slope} * {gy})",
        # y > 0 exactly where x > 0 unless the slope is negative
        grad_from=lambda p: "y" if p["negative_slope"] >= 0 else "x",
        params={"negative_slope": 0.01}, onnx="LeakyRelu", onnx_attrs={"negative_slope": "alpha"}),
    Activation(
        "clip", "Clamp to [min, max] as numpy.clip (ReLU6 is clip(x, 0, 6)); NaN stays NaN; min > max gives max.",
        _np_clip,
        "((({x}) < {min} ? {min} : ({x})) > {max} ? {max} : (({x}) < {min} ? {min} : ({x})))",
        # from y, so 0 where y sits on a finite bound (PyTorch, from x, gives gy at x == bound
        # exactly); an infinite bound clips nothing: every y but NaN passes there, as in PyTorch
        lambda y, gy, min, max: np.where(  # noqa: A006
            ((y > min) | ((min == -np.inf) & (y == y))) & ((y < max) | ((max == np.inf) & (y == y))), gy, 0),
        "(({t} > {min} || ({min} == -INFINITY && {t} == {t})) && ({t} < {max} || ({max} == INFINITY && {t} == {t}))"
        " ? {gy} : 0)",
        grad_from="y", params={"min": -np.inf, "max": np.inf}, onnx="Clip"),
    Activation(
        "sigmoid", "1 / (1 + exp(-x)).",
        _np_sigmoid, "(1 / (1 + {exp}(-{x})))",
        lambda y, gy: gy * y * (1 - y), "({gy} * {t} * (1 - {t}))", grad_from="y",
        onnx="Sigmoid"),
    Activation(
        "tanh", "Hyperbolic tangent.",
        np.tanh, "tanh{f}({x})",
        lambda y, gy: gy * (1 - y * y), "({gy} * (1 - {t} * {t}))", grad_from="y",
        onnx="Tanh"),
    Activation(
        "silu", "x * sigmoid(x) (SiLU, swish).",
        lambda x: x * _np_sigmoid(x), "({x} / (1 + {exp}(-{x})))",
        lambda x, gy: gy * _np_sigmoid(x) * (1 + x * (1 - _np_sigmoid(x))),
        "({gy} * (1 / (1 + {exp}(-{t}))) * (1 + {t} * (1 - 1 / (1 + {exp}(-{t})))))"),
    Activation(
        "hardswish", "x * relu6(x + 3) / 6 (MobileNetV3).",
        lambda x: x * np.where(x + 3 < 0, 0, np.where(x + 3 > 6, 6, x + 3)) / 6,   # NaN stays NaN
        "({x} * ({x} + 3 < 0 ? 0 : ({x} + 3 > 6 ? 6 : {x} + 3)) / 6)",
        # PyTorch's derivative (its vectorised kernel): 0 up to -3 (inclusive), gy from 3 on
        # (inclusive), x/3 + 1/2 between and for NaN (which stays NaN)
        lambda x, gy: np.where(x <= -3, 0, np.where(x >= 3, gy, gy * (x / 3 + x.dtype.type(0.5)))),
        "({t} <= -3 ? 0 : ({t} >= 3 ? {gy} : {gy} * ({t} / 3 + ({T})0.5)))",
        onnx="HardSwish", onnx_since=14),
    Activation(
        "hardsigmoid", "clip(alpha * x + beta, 0, 1) (PyTorch's alpha 1/6; ONNX's default is 0.2).",
        lambda x, alpha, beta: np.minimum(np.maximum(alpha * x + beta, 0), 1),
        "({alpha} * {x} + {beta} < 0 ? 0 : ({alpha} * {x} + {beta} > 1 ? 1 : {alpha} * {x} + {beta}))",
        lambda y, gy, alpha, beta: np.where((y > 0) & (y < 1), gy * alpha, 0),
        "({t} > 0 && {t} < 1 ? {alpha} * {gy} : 0)", grad_from="y",
        params={"alpha": 1 / 6, "beta": 0.5}, onnx="HardSigmoid", onnx_defaults={"alpha": 0.2}, onnx_since=6),
    Activation(
        "gelu", "x * Phi(x), Phi the standard normal CDF (PyTorch's approximate='none').",
        # PyTorch's order, x * 0.5 * (1 + erf): x near the largest float does not overflow
        lambda x: x * x.dtype.type(0.5) * (1 + _erf(x * x.dtype.type(_INV_SQRT_2))),
        f"({{x}} * ({{T}})0.5 * (1 + erf{{f}}({{x}} * ({{T}}){_INV_SQRT_2!r})))",
        lambda x, gy: gy * ((1 + _erf(x * x.dtype.type(_INV_SQRT_2))) / 2
                            + x * np.exp(-x * x / 2) * x.dtype.type(_INV_SQRT_2PI)),
        f"({{gy}} * ((1 + erf{{f}}({{t}} * ({{T}}){_INV_SQRT_2!r})) / 2 + {{t}} * {{exp}}(-{{t}} * {{t}} / 2) * ({{T}}){_INV_SQRT_2PI!r}))",
        onnx="Gelu", onnx_since=20),
    Activation(
        "gelu_tanh", "GELU's tanh form, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (approximate='tanh').",
        # as x * sigmoid(2u) = x / (1 + exp(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3): equal, but
        # no 1 + tanh(u) that cancels for u << 0 (or, where tanh is not exactly -1 at -inf, as in
        # some OpenCL libraries, turns -inf into -inf instead of NaN) and no overflow near the
        # largest float
        _np_gelu_tanh,
        f"({{x}} / (1 + {{exp}}(({{T}}){-2 * _SQRT_2_PI!r} * ({{x}} + ({{T}})0.044715 * {{x}} * {{x}} * {{x}}))))",
        lambda x, gy: gy * _gelu_tanh_grad(x),
        f"({{gy}} * ((1 + tanh{{f}}(({{T}}){_SQRT_2_PI!r} * ({{t}} + ({{T}})0.044715 * {{t}} * {{t}} * {{t}}))) / 2"
        # 1 - tanh(u)^2 as 1 / cosh(u)^2: exactly 0 where u saturates, whatever tanh's last ulp
        f" + {{t}} / 2 / (cosh{{f}}(({{T}}){_SQRT_2_PI!r} * ({{t}} + ({{T}})0.044715 * {{t}} * {{t}} * {{t}}))"
        f" * cosh{{f}}(({{T}}){_SQRT_2_PI!r} * ({{t}} + ({{T}})0.044715 * {{t}} * {{t}} * {{t}})))"
        f" * ({{T}}){_SQRT_2_PI!r} * (1 + 3 * ({{T}})0.044715 * {{t}} * {{t}})))",
        onnx="Gelu", onnx_since=20),
    Activation(
        "elu", "x if x > 0 else alpha * (exp(x) - 1) (ONNX's and PyTorch's default alpha 1).",
        lambda x, alpha: np.where(x > 0, x, alpha * np.expm1(x)), "({x} > 0 ? {x} : {alpha} * {expm1}({x}))",
        # PyTorch's elu_backward from x (its vectorised kernel: NaN gives NaN); from y would need
        # y + alpha, which cancels where x << 0
        lambda x, gy, alpha: np.where(x > 0, gy, gy * alpha * np.exp(x)),
        "({t} > 0 ? {gy} : {gy} * {alpha} * {exp}({t}))",
        params={"alpha": 1.0}, onnx="Elu", onnx_since=6),
    Activation(
        "selu", "gamma * elu(x, alpha); the defaults are ONNX's (float32 values; PyTorch's SELU constants "
                "differ from the 8th digit on).",
        lambda x, alpha, gamma: gamma * np.where(x > 0, x, alpha * np.expm1(x)),
        "({gamma} * ({x} > 0 ? {x} : {alpha} * {expm1}({x})))",
        lambda x, gy, alpha, gamma: np.where(x > 0, gy * gamma, gy * gamma * alpha * np.exp(x)),
        "({t} > 0 ? {gy} * {gamma} : {gy} * {gamma} * {alpha} * {exp}({t}))",
        params={"alpha": _SELU_ALPHA, "gamma": _SELU_GAMMA}, onnx="Selu", onnx_since=6),
    Activation(
        "softplus", "log(1 + exp(x)), as max(x, 0) + log1p(exp(-|x|)): no overflow for large x.",
        _np_softplus, "({x} > 0 ? {x} + log1p{f}({exp}(-{x})) : log1p{f}({exp}({x})))",
        # sigmoid(x) = 1 - exp(-y): accurate at both ends (y ~ exp(x) below, y ~ x above)
        lambda y, gy: gy * -np.expm1(-y), "({gy} * -{expm1}(-{t}))", grad_from="y",
        onnx="Softplus"),
    Activation(
        "softsign", "x / (1 + |x|) (NaN at +-inf, inf / inf, as in ONNX and PyTorch).",
        lambda x: x / (1 + np.abs(x)), "({x} / (1 + fabs{f}({x})))",
        # 1 / (1 + |x|)^2; the + 0 * x makes it NaN at +-inf, where the value is NaN (PyTorch's too)
        lambda x, gy: gy / ((1 + np.abs(x)) * (1 + np.abs(x))) + 0 * x,
        "({gy} / ((1 + fabs{f}({t})) * (1 + fabs{f}({t}))) + 0 * {t})",
        onnx="Softsign"),
    Activation(
        "thresholded_relu", "x if x > alpha else 0 (ONNX's default alpha 1); NaN stays NaN, as relu "
                            "(and torch.nn.Threshold) keep it.",
        lambda x, alpha: np.where(x <= alpha, 0, x), "({x} <= {alpha} ? 0 : {x})",
        lambda x, gy, alpha: np.where(x <= alpha, 0, gy), "({t} <= {alpha} ? 0 : {gy})",
        params={"alpha": 1.0}, onnx="ThresholdedRelu", onnx_since=10),
    Activation(
        "mish", "x * tanh(softplus(x)) (Misra 2019).",
        # tanh(log(1 + e)) = n / (n + 2) with e = exp(x), n = e (e + 2): one exp and no libm call,
        # so the loop vectorises; from x > 20 on it is 1 in float and double (n would overflow)
        lambda x: x * _mish_tsp(x), "({x} * ({x} > 20 ? 1 : {exp}({x}) * ({exp}({x}) + 2)"
                                    " / ({exp}({x}) * ({exp}({x}) + 2) + 2)))",
        # PyTorch's mish_backward, tanh(sp) + x * sigmoid(x) * (1 - tanh(sp)^2), with
        # 1 - tanh(sp)^2 = 4 (n + 1) / (n + 2)^2 and sigmoid(x) = e / (1 + e); 1 from x > 20 on
        # (1 + 0 * x: NaN at +inf, where torch's inf * 0 gives NaN)
        lambda x, gy: gy * _mish_grad(x),
        "({gy} * ({t} > 20 ? 1 + 0 * {t} : {exp}({t}) * ({exp}({t}) + 2) / ({exp}({t}) * ({exp}({t}) + 2) + 2)"
        " + {t} * ({exp}({t}) / (1 + {exp}({t}))) * (4 * ({exp}({t}) * ({exp}({t}) + 2) + 1)"
        " / (({exp}({t}) * ({exp}({t}) + 2) + 2) * ({exp}({t}) * ({exp}({t}) + 2) + 2)))))",
        onnx="Mish", onnx_since=18),
    # -- the unary math of ONNX (records too: fusable, differentiable, imported and exported alike)
    Activation(
        "sqrt", "Square root (NaN below 0, -0.0 stays -0.0).",
        np.sqrt, "sqrt{f}({x})",
        lambda y, gy: gy / (2 * y), "({gy} / (2 * {t}))", grad_from="y", onnx="Sqrt", onnx_since=6),
    Activation(
        "exp", "e to the x.",
        np.exp, "{exp}({x})",
        lambda y, gy: gy * y, "({gy} * {t})", grad_from="y", onnx="Exp", onnx_since=6),
    Activation(
        "log", "Natural logarithm (-inf at 0, NaN below).",
        np.log, "log{f}({x})",
        lambda x, gy: gy / x, "({gy} / {t})", onnx="Log", onnx_since=6),
    Activation(
        "neg", "-x.",
        np.negative, "(-{x})",
        lambda t, gy: -gy, "(-{gy})", grad_from="y", onnx="Neg", onnx_since=6),
    Activation(
        "abs", "|x|.",
        np.abs, "fabs{f}({x})",
        # PyTorch's gy * sgn(x), sgn(0) = sgn(NaN) = 0
        lambda x, gy: np.where(x > 0, gy, np.where(x < 0, -gy, 0)), "({t} > 0 ? {gy} : ({t} < 0 ? -{gy} : 0))",
        onnx="Abs", onnx_since=6),
    Activation(
        "reciprocal", "1 / x.",
        lambda x: 1 / x, "(1 / {x})",
        lambda y, gy: -gy * (y * y), "(-{gy} * ({t} * {t}))", grad_from="y", onnx="Reciprocal", onnx_since=6),
    Activation(
        "erf", "The error function, 2 / sqrt(pi) * integral of exp(-t^2) from 0 to x.",
        _erf, "erf{f}({x})",
        lambda x, gy: gy * x.dtype.type(_TWO_SQRT_PI) * np.exp(-x * x),
        f"({{gy}} * ({{T}}){_TWO_SQRT_PI!r} * {{exp}}(-{{t}} * {{t}}))",
        onnx="Erf", onnx_since=9),
]}


def _mish_n(x):
    e = np.exp(np.minimum(x, 20))
    return e, e * (e + 2)


def _mish_tsp(x):
    """tanh(softplus(x)) as n / (n + 2), n = e^x (e^x + 2); 1 from x > 20 on."""
    _, n = _mish_n(x)
    return np.where(x > 20, 1, n / (n + 2))


def _mish_grad(x):
    e, n = _mish_n(x)
    return np.where(x > 20, 1 + 0 * x, n / (n + 2) + x * (e / (1 + e)) * (4 * (n + 1) / ((n + 2) * (n + 2))))


def _gelu_tanh_grad(x):
    c = x.dtype.type(_SQRT_2_PI)
    k = x.dtype.type(0.044715)
    th = np.tanh(c * (x + k * x * x * x))
    return (1 + th) / 2 + x / 2 * (1 - th * th) * c * (1 + 3 * k * x * x)


ACTIVATIONS = tuple(TABLE)


def get(kind: str) -> Activation:
    try:
        return TABLE[kind]
    except KeyError:
        raise RuleError(f"activation must be one of {ACTIVATIONS}, got {kind!r}") from None


# -- an activation fused into a producer (part of its epilogue) ---------------
def fused(attrs: dict) -> tuple[Activation, dict] | None:
    """The fused activation of a node's (normalised) attrs and its params, or None."""
    kind = attrs.get("activation")
    if kind is None:
        return None
    act = TABLE[kind]
    return act, {p: attrs[p] for p in act.params}


def normalize_fused(attrs: dict) -> dict:
    """Validate the optional ``activation`` (and that activation's params) a
    pass may fuse into a producer's output loop; absent means none. Params of
    other activations are dropped."""
    all_params = {p for a in TABLE.values() for p in a.params}
    kind = attrs.get("activation")
    out = {k: v for k, v in attrs.items() if k not in all_params and k != "activation"}
    if kind is None:
        return out
    act = get(kind)
    out["activation"] = kind
    out.update(act.normalize(attrs))
    return out


def fused_attrs(kind, params: dict) -> dict:
    """The attrs that fuse activation ``kind`` (a name or a record) with
    ``params`` into a producer."""
    return {"activation": kind if isinstance(kind, str) else kind.name, **params}


def unfused(attrs: dict) -> dict:
    """``attrs`` without the fused activation."""
    return normalize_fused({k: v for k, v in attrs.items() if k != "activation"})

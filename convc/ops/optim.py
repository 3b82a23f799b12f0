"""The one optimizer op that is not plain arithmetic: Adam's bias-corrected
parameter step. (SGD with momentum is built from ``add``/``mul``/``sub``.)"""
from __future__ import annotations

import numpy as np

from ..errors import RuleError
from ..ir import Value
from .registry import Op, float_dtype, register


def adam_step(p: Value, m: Value, v: Value, t: Value, lr: float, beta1: float, beta2: float, eps: float,
              name=None) -> Value:
    """p - lr * m̂ / (sqrt(v̂) + eps) with m̂ = m / (1 - beta1^t), v̂ = v / (1 - beta2^t);
    ``t`` is the step count (a float64 scalar), m and v already updated."""
    attrs = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps)
    return p.graph.add("adam_step", [p, m, v, t], attrs, name)


@register
class AdamStep(Op):
    name = "adam_step"
    arity = (4, 4)
    inputs = ("p", "m", "v", "t")

    def normalize(self, attrs, types):
        try:
            return {k: float(attrs[k]) for k in ("lr", "beta1", "beta2", "eps")}
        except (TypeError, ValueError):
            raise RuleError(f"lr, beta1, beta2 and eps must be numbers, got {attrs}") from None

    def infer(self, attrs, types):
        p, m, v, t = types
        float_dtype(p)
        if not (p == m == v):
            raise RuleError(f"p, m and v must have one type, got {p}, {m}, {v}")
        if t.shape != () or t.dtype != "float64":
            raise RuleError(f"t must be a float64 scalar, got {t}")
        return p

    def reference(self, attrs, p, m, v, t):
        c1 = 1 - attrs["beta1"] ** float(t)
        c2 = 1 - attrs["beta2"] ** float(t)
        return p - attrs["lr"] * (m / c1) / (np.sqrt(v / c2) + attrs["eps"])

    def context(self, attrs, types, out):
        return dict(SIZE=out.size, par=[("i", "SIZE", out.size)], **attrs)

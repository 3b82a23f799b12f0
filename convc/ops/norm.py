"""``batch_norm`` in inference mode (PyTorch's F.batch_norm with
training=False): y = (x - mean[c]) / sqrt(var[c] + eps) * weight[c] + bias[c]."""
from __future__ import annotations

import numpy as np

from ..errors import RuleError
from ..ir import Value
from .registry import Op, as_value, builder, float_dtype, register, same_dtype


@builder("x")
def batch_norm(x: Value, running_mean, running_var, weight=None, bias=None, eps: float = 1e-5, name=None) -> Value:
    """Per-channel normalisation of x (N, C, ...) with fixed statistics."""
    c = x.shape[1] if len(x.shape) > 1 else 1
    args = [as_value(x, running_mean, "running_mean"), as_value(x, running_var, "running_var"),
            as_value(x, np.ones(c) if weight is None else weight, "weight"),
            as_value(x, np.zeros(c) if bias is None else bias, "bias")]
    return x.graph.add("batch_norm", [x] + args, {"eps": eps}, name)


@register
class BatchNorm(Op):
    name = "batch_norm"
    arity = (5, 5)
    inputs = ("x", "mean", "var", "gamma", "beta")

    def normalize(self, attrs, types):
        eps = attrs["eps"]
        if not isinstance(eps, (int, float)) or eps < 0:
            raise RuleError(f"eps must be a number >= 0, got {eps!r}")
        return {"eps": float(eps)}

    def infer(self, attrs, types):
        x = types[0]
        same_dtype(types)
        float_dtype(x)
        if len(x.shape) < 2:
            raise RuleError(f"input must be (N, C, ...), got {x.shape}")
        for what, t in zip(("running_mean", "running_var", "weight", "bias"), types[1:]):
            if t.shape != (x.shape[1],):
                raise RuleError(f"{what} must be ({x.shape[1]},), got {t.shape}")
        return x

    @staticmethod
    def scale_shift(attrs, mean, var, gamma, beta):
        scale = gamma / np.sqrt(var + var.dtype.type(attrs["eps"]))
        return scale, beta - mean * scale

    def reference(self, attrs, x, mean, var, gamma, beta):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return ((x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + x.dtype.type(attrs["eps"]))
                * gamma.reshape(shape) + beta.reshape(shape))

    def context(self, attrs, types, out):
        x = types[0]
        inner = 1
        for s in x.shape[2:]:
            inner *= s
        return dict(N=x.shape[0], C=x.shape[1], INNER=inner, eps=attrs["eps"],
                    par=[("n", "N", x.shape[0]), ("c", "C", x.shape[1])])

    def grad(self, attrs, xs, y, gy, needs):
        from .elementwise import mul
        from .tensor import reduce_sum
        x, mean, var, gamma, beta = xs
        g = x.graph
        c = x.shape[1]
        zeros, ones = g.const(np.zeros(c), x.dtype), g.const(np.ones(c), x.dtype)
        axes = (0,) + tuple(range(2, len(x.shape)))
        out = [batch_norm(gy, zeros, var, gamma, zeros, attrs["eps"]) if needs[0] else None,   # gy * scale
               None, None, None, None]
        if needs[3]:
            out[3] = reduce_sum(mul(gy, batch_norm(x, mean, var, ones, zeros, attrs["eps"])), axes)
        if needs[4]:
            out[4] = reduce_sum(gy, axes)
        return out

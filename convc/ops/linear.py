"""Linear algebra: ``dense`` (PyTorch's Linear), ``matmul`` (numpy rules,
batch dims broadcast) and ``softmax``."""
from __future__ import annotations

import numpy as np

from .. import shapes
from ..errors import RuleError
from ..ir import TensorType, Value
from .elementwise import broadcast_strides
from .registry import Op, as_value, float_dtype, register, same_dtype
from .tensor import _axis


def dense(x: Value, w, bias=None, name=None) -> Value:
    """``x @ w.T + bias``: x (..., in), w (out, in), bias (out,)."""
    w = as_value(x, w, "dense weight")
    ins = [x, w] + ([as_value(x, bias, "dense bias")] if bias is not None else [])
    return x.graph.add("dense", ins, {}, name)


def matmul(a: Value, b: Value, name=None, transpose_a: bool = False) -> Value:
    """Matrix product of (..., M, K) and (..., K, N); batch dims broadcast.
    ``transpose_a``: a is stored as (..., K, M) and used transposed (no copy)."""
    return a.graph.add("matmul", [a, as_value(a, b, "matmul operand")],
                       {"transpose_a": True} if transpose_a else {}, name)


def softmax(x: Value, axis: int = -1, name=None) -> Value:
    """exp(x) / sum(exp(x)) along ``axis`` (computed stably)."""
    return x.graph.add("softmax", [x], {"axis": axis}, name)


@register
class Dense(Op):
    name = "dense"
    arity = (2, 3)
    inputs = ("x", "w", "b")

    def infer(self, attrs, types):
        x, w = types[:2]
        dtype = same_dtype(types)
        float_dtype(x)
        if len(x.shape) < 1 or len(w.shape) != 2 or w.shape[1] != x.shape[-1]:
            raise RuleError(f"weight must be (out_features, in_features={x.shape[-1] if x.shape else '?'}), "
                            f"got {w.shape}")
        if len(types) == 3 and types[2].shape != (w.shape[0],):
            raise RuleError(f"bias must be ({w.shape[0]},), got {types[2].shape}")
        return TensorType(x.shape[:-1] + (w.shape[0],), dtype)

    def grad(self, attrs, xs, y, gy, needs):
        from .tensor import reduce_sum, reshape, transpose
        x, w = xs[:2]
        k, n = w.shape[1], w.shape[0]
        out = [dense(gy, transpose(w)) if needs[0] else None]                      # gy @ w
        if needs[1]:
            g2, x2 = (gy, x) if len(x.shape) == 2 else (reshape(gy, (-1, n)), reshape(x, (-1, k)))
            out.append(matmul(transpose(g2), x2))                                  # gy^T @ x
        else:
            out.append(None)
        if len(xs) == 3:
            out.append(reduce_sum(gy, tuple(range(len(gy.shape) - 1))) if len(gy.shape) > 1 else gy)
        return out

    def reference(self, attrs, x, w, b=None):
        y = x @ w.T
        return y + b if b is not None else y

    def context(self, attrs, types, out):
        x, w = types[:2]
        return dict(M=shapes.prod(x.shape[:-1]), K=w.shape[1], N=w.shape[0], bias=len(types) == 3)

    def macs(self, attrs, types, out):
        return out.size * types[1].shape[1]


@register
class Matmul(Op):
    name = "matmul"
    arity = (2, 2)
    inputs = ("a", "b")

    def normalize(self, attrs, types):
        ta = attrs.get("transpose_a", False)
        if ta not in (True, False):
            raise RuleError(f"transpose_a must be a bool, got {ta!r}")
        return {"transpose_a": True} if ta else {}

    @staticmethod
    def _mk(attrs, a):
        """(M, K) of operand a as used."""
        return (a.shape[-1], a.shape[-2]) if attrs.get("transpose_a") else (a.shape[-2], a.shape[-1])

    def infer(self, attrs, types):
        a, b = types
        dtype = same_dtype(types, "operands")
        if len(a.shape) < 2 or len(b.shape) < 2:
            raise RuleError(f"operands must have rank >= 2 (..., M, K) @ (..., K, N), got {a.shape} and {b.shape}")
        m, k = self._mk(attrs, a)
        if k != b.shape[-2]:
            used = "a transposed" if attrs.get("transpose_a") else "a"
            raise RuleError(f"inner dims differ: {used} of {a.shape} @ {b.shape} needs {k} == {b.shape[-2]}")
        try:
            batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        except ValueError:
            raise RuleError(f"batch dims {a.shape[:-2]} and {b.shape[:-2]} do not broadcast") from None
        return TensorType(tuple(batch) + (m, b.shape[-1]), dtype)

    def grad(self, attrs, xs, y, gy, needs):
        from .tensor import sum_to, transpose
        a, b = xs

        def t(v):
            perm = list(range(len(v.shape)))
            perm[-2:] = perm[-1], perm[-2]
            return transpose(v, perm)
        if attrs.get("transpose_a"):       # y = a^T b: da = b gy^T, db = a gy
            return [sum_to(matmul(b, t(gy)), a.shape) if needs[0] else None,
                    sum_to(matmul(a, gy), b.shape) if needs[1] else None]
        return [sum_to(matmul(gy, t(b)), a.shape) if needs[0] else None,
                sum_to(matmul(a, gy, transpose_a=True), b.shape) if needs[1] else None]

    def reference(self, attrs, a, b):
        return np.matmul(np.swapaxes(a, -1, -2) if attrs.get("transpose_a") else a, b)

    def context(self, attrs, types, out):
        a, b = types
        batch = out.shape[:-2]
        m, k = self._mk(attrs, a)
        return dict(M=m, K=k, N=b.shape[-1], batch=list(batch), transpose_a=bool(attrs.get("transpose_a")),
                    sa=broadcast_strides(a.shape[:-2], batch), sb=broadcast_strides(b.shape[:-2], batch))

    def macs(self, attrs, types, out):
        return out.size * self._mk(attrs, types[0])[1]


@register
class Softmax(Op):
    name = "softmax"

    def normalize(self, attrs, types):
        return {"axis": _axis(attrs["axis"], len(types[0].shape))}

    def infer(self, attrs, types):
        float_dtype(types[0])
        return types[0]

    def grad(self, attrs, xs, y, gy, needs):
        from .elementwise import mul, sub
        from .tensor import reduce_sum
        return [mul(y, sub(gy, reduce_sum(mul(gy, y), attrs["axis"], keepdims=True)))]

    def reference(self, attrs, x):
        e = np.exp(x - x.max(axis=attrs["axis"], keepdims=True))
        return e / e.sum(axis=attrs["axis"], keepdims=True)

    def context(self, attrs, types, out):
        ax, sh = attrs["axis"], out.shape
        return dict(OUTER=shapes.prod(sh[:ax]), AXIS=sh[ax], INNER=shapes.prod(sh[ax + 1:]))

"""Linear algebra: ``dense`` (PyTorch's Linear), ``matmul`` (numpy rules,
batch dims broadcast) and ``softmax``."""
from __future__ import annotations

import numpy as np

from .. import shapes, tuning
from ..errors import RuleError
from ..ir import TensorType, Value
from .elementwise import broadcast_strides
from . import epilogue
from .registry import Op, as_value, builder, float_dtype, register, same_dtype
from .tensor import _axis


@builder("x")
def dense(x: Value, w, bias=None, name=None) -> Value:
    """``x @ w.T + bias``: x (..., in), w (out, in), bias (out,)."""
    w = as_value(x, w, "dense weight")
    ins = [x, w] + ([as_value(x, bias, "dense bias")] if bias is not None else [])
    return x.graph.add("dense", ins, {}, name)


@builder("a")
def matmul(a: Value, b: Value, name=None, transpose_a: bool = False, bias=None, blocks=None) -> Value:
    """Matrix product of (..., M, K) and (..., K, N); batch dims broadcast.
    ``transpose_a``: a is stored as (..., K, M) and used transposed (no copy).
    ``bias``: one number per row, shape (..., M, 1) (batch dims broadcast),
    added in the GEMM's epilogue. ``blocks``: the register-tile rows and
    cache blocks (MR, MC, NC, KC) of the generated GEMM (a schedule choice,
    e.g. from the tuner; default: derived from this host's vector unit and
    caches, ``convc.tuning.default_gemm_blocks``)."""
    ins = [a, as_value(a, b, "matmul operand")] + ([as_value(a, bias, "matmul bias")] if bias is not None else [])
    attrs = {k: True for k, on in (("transpose_a", transpose_a), ("bias", bias is not None)) if on}
    if blocks is not None:
        attrs["blocks"] = blocks
    return a.graph.add("matmul", ins, attrs, name)


@builder("x")
def softmax(x: Value, axis: int = -1, name=None) -> Value:
    """exp(x) / sum(exp(x)) along ``axis`` (computed stably)."""
    return x.graph.add("softmax", [x], {"axis": axis}, name)


@register
class Dense(Op):
    name = "dense"
    arity = (2, 4)
    inputs = ("x", "w", "b")

    def normalize(self, attrs, types):
        return epilogue.normalize(attrs)

    def infer(self, attrs, types):
        x, w = types[:2]
        dtype = same_dtype(types)
        float_dtype(x)
        if len(x.shape) < 1 or len(w.shape) != 2 or w.shape[1] != x.shape[-1]:
            raise RuleError(f"weight must be (out_features, in_features={x.shape[-1] if x.shape else '?'}), "
                            f"got {w.shape}")
        out = TensorType(x.shape[:-1] + (w.shape[0],), dtype)
        own = epilogue.check(attrs, types, out)
        if len(own) > 3:
            raise RuleError("takes x, w and an optional bias (and a residual with residual=True)")
        if len(own) == 3 and own[2].shape != (w.shape[0],):
            raise RuleError(f"bias must be ({w.shape[0]},), got {own[2].shape}")
        return out

    def grad(self, attrs, xs, y, gy, needs):
        from .tensor import reduce_sum, reshape, transpose
        gy, gr = epilogue.grad(self.name, attrs, xs, y, gy)
        xs = epilogue.split(attrs, xs)[0]
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
        return out + ([gr] if gr is not None else [])

    def reference(self, attrs, *xs):
        (x, w, *b), r = epilogue.split(attrs, xs)
        y = x @ w.T
        return epilogue.reference(attrs, y + b[0] if b else y, r)

    def context(self, attrs, types, out):
        x, w, *b = epilogue.split(attrs, types)[0]
        m = shapes.prod(x.shape[:-1])
        return dict(M=m, K=w.shape[1], N=w.shape[0], bias=bool(b), par=[("m", "M", m), ("n", "N", w.shape[0])])

    def macs(self, attrs, types, out):
        return out.size * types[1].shape[1]


@register
class Matmul(Op):
    """Inputs a, b, the row bias when ``bias=True`` and the residual when
    ``residual=True``."""
    name = "matmul"
    arity = (2, 4)
    inputs = ("a", "b", "bias")

    def normalize(self, attrs, types):
        out = epilogue.normalize(attrs)
        for k in ("transpose_a", "bias"):
            v = out.pop(k, False)
            if v not in (True, False):
                raise RuleError(f"{k} must be a bool, got {v!r}")
            if v:
                out[k] = True
        blocks = out.pop("blocks", None)
        if blocks is not None:
            if not (isinstance(blocks, (tuple, list)) and len(blocks) == 4 and
                    all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 1 <= v <= 1 << 16
                        for v in blocks) and blocks[0] <= tuning.MAX_TILE_ROWS):
                raise RuleError(f"blocks must be four positive ints (MR, MC, NC, KC): tile rows up to "
                                f"{tuning.MAX_TILE_ROWS}, cache blocks up to 65536; got {blocks!r}")
            out["blocks"] = tuple(int(v) for v in blocks)
        return out

    @staticmethod
    def _mk(attrs, a):
        """(M, K) of operand a as used."""
        return (a.shape[-1], a.shape[-2]) if attrs.get("transpose_a") else (a.shape[-2], a.shape[-1])

    def infer(self, attrs, types):
        own = epilogue.split(attrs, types)[0]
        if len(own) != 2 + bool(attrs.get("bias")):
            raise RuleError(f"takes a, b{', bias' if attrs.get('bias') else ''}"
                            f"{' and the residual' if attrs.get('residual') else ''}: {len(types)} inputs given")
        a, b = own[:2]
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
        out = TensorType(tuple(batch) + (m, b.shape[-1]), dtype)
        if attrs.get("bias"):
            e = own[2].shape
            if len(e) < 2 or e[-2:] != (m, 1) or len(e) > len(out.shape) or \
                    np.broadcast_shapes(e[:-2], batch) != tuple(batch):
                raise RuleError(f"bias must be one number per row, (..., {m}, 1) with batch dims that broadcast "
                                f"to {tuple(batch)}, got {e}")
        epilogue.check(attrs, types, out)
        return out

    def grad(self, attrs, xs, y, gy, needs):
        from .tensor import sum_to, transpose
        gy, gr = epilogue.grad(self.name, attrs, xs, y, gy)
        own = epilogue.split(attrs, xs)[0]
        a, b = own[:2]
        rest = ([sum_to(gy, own[2].shape, name=None)] if attrs.get("bias") else []) + ([gr] if gr is not None else [])

        def t(v):
            perm = list(range(len(v.shape)))
            perm[-2:] = perm[-1], perm[-2]
            return transpose(v, perm)
        if attrs.get("transpose_a"):       # y = a^T b: da = b gy^T, db = a gy
            return [sum_to(matmul(b, t(gy)), a.shape) if needs[0] else None,
                    sum_to(matmul(a, gy), b.shape) if needs[1] else None] + rest
        return [sum_to(matmul(gy, t(b)), a.shape) if needs[0] else None,
                sum_to(matmul(a, gy, transpose_a=True), b.shape) if needs[1] else None] + rest

    def reference(self, attrs, *xs):
        (a, b, *e), r = epilogue.split(attrs, xs)
        y = np.matmul(np.swapaxes(a, -1, -2) if attrs.get("transpose_a") else a, b)
        return epilogue.reference(attrs, y + e[0] if e else y, r)

    def context(self, attrs, types, out):
        a, b, *e = epilogue.split(attrs, types)[0]
        batch = out.shape[:-2]
        m, k = self._mk(attrs, a)
        n = b.shape[-1]
        blk = tuning.gemm_blocks(m, k, n, out.dtype, attrs, batch=batch[0] if batch else 1)
        mr, mc, nc, kc = blk["MR"], blk["MC"], blk["NC"], blk["KC"]
        mblocks, nblocks = -(-m // mc), -(-n // nc)
        return dict(M=m, K=k, N=n, batch=list(batch), transpose_a=bool(attrs.get("transpose_a")),
                    sa=broadcast_strides(a.shape[:-2], batch), sb=broadcast_strides(b.shape[:-2], batch),
                    bias=bool(e), se=broadcast_strides(e[0].shape[:-2], batch) if e else [],
                    MR=mr, MC=mc, NC=nc, KC=kc, M_BLOCKS=mblocks, N_BLOCKS=nblocks,
                    par=[("i0", str(d), d) for d in batch[:1]] + [("mb", "M_BLOCKS", mblocks),
                                                                   ("nb", "N_BLOCKS", nblocks)])

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
        return dict(OUTER=shapes.prod(sh[:ax]), AXIS=sh[ax], INNER=shapes.prod(sh[ax + 1:]),
                    par=[("o", "OUTER", shapes.prod(sh[:ax])), ("i", "INNER", shapes.prod(sh[ax + 1:]))])

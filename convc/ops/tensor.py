"""Shape ops: ``concat``, ``reshape``, ``flatten``."""
from __future__ import annotations

import numpy as np

from .. import shapes
from ..errors import RuleError
from ..ir import TensorType, Value
from .registry import Op, register, same_dtype


def concat(values, axis: int = 1, name=None) -> Value:
    """Join tensors along ``axis`` (default: channels); other dims must match."""
    values = list(values)
    if not values:
        from ..errors import GraphError
        raise GraphError("concat needs at least one value")
    return values[0].graph.add("concat", values, {"axis": axis}, name)


def reshape(x: Value, shape, name=None) -> Value:
    """Same elements, new ``shape`` (one entry may be -1)."""
    return x.graph.add("reshape", [x], {"shape": shape}, name)


def flatten(x: Value, start_dim: int = 1, end_dim: int = -1, name=None) -> Value:
    """Merge dims ``start_dim..end_dim`` into one (PyTorch's flatten)."""
    return x.graph.add("flatten", [x], {"start_dim": start_dim, "end_dim": end_dim}, name)


def _axis(axis, rank, what="axis"):
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -rank <= axis < rank:
        raise RuleError(f"{what} {axis!r} is out of range for rank {rank}")
    return int(axis) % rank


@register
class Concat(Op):
    name = "concat"
    arity = (1, 64)
    inputs = ()          # x0, x1, ...

    def normalize(self, attrs, types):
        return {"axis": _axis(attrs["axis"], len(types[0].shape))}

    def infer(self, attrs, types):
        ax = attrs["axis"]
        dtype = same_dtype(types)
        first = types[0].shape
        for t in types[1:]:
            if len(t.shape) != len(first) or any(a != b for i, (a, b) in enumerate(zip(t.shape, first)) if i != ax):
                raise RuleError(f"all inputs must match except on axis {ax}: {first} vs {t.shape}")
        return TensorType(first[:ax] + (sum(t.shape[ax] for t in types),) + first[ax + 1:], dtype)

    def reference(self, attrs, *xs):
        return np.concatenate(xs, axis=attrs["axis"])

    def context(self, attrs, types, out):
        ax = attrs["axis"]
        return dict(OUTER=shapes.prod(out.shape[:ax]), OUT_ROW=shapes.prod(out.shape[ax:]),
                    rows=[shapes.prod(t.shape[ax:]) for t in types])


class _Copy(Op):
    template = "copy"

    def reference(self, attrs, x):
        return x.reshape(self.infer(attrs, [TensorType(x.shape, str(x.dtype))]).shape)

    def context(self, attrs, types, out):
        return dict(SIZE=out.size)


@register
class Reshape(_Copy):
    name = "reshape"

    def normalize(self, attrs, types):
        try:
            shape = tuple(int(s) for s in attrs["shape"])
        except TypeError:
            raise RuleError(f"shape must be a tuple of ints, got {attrs['shape']!r}") from None
        size = types[0].size
        if shape.count(-1) > 1 or any(s < -1 or s == 0 for s in shape):
            raise RuleError(f"shape {shape} may hold one -1 and otherwise positive sizes")
        if -1 in shape:
            known = shapes.prod(s for s in shape if s != -1)
            if size % known:
                raise RuleError(f"cannot reshape {types[0].shape} ({size} elements) to {shape}")
            shape = tuple(size // known if s == -1 else s for s in shape)
        if shapes.prod(shape) != size:
            raise RuleError(f"cannot reshape {types[0].shape} ({size} elements) to {shape}")
        return {"shape": shape}

    def infer(self, attrs, types):
        return TensorType(attrs["shape"], types[0].dtype)


@register
class Flatten(_Copy):
    name = "flatten"

    def normalize(self, attrs, types):
        rank = len(types[0].shape)
        s, e = _axis(attrs["start_dim"], rank, "start_dim"), _axis(attrs["end_dim"], rank, "end_dim")
        if s > e:
            raise RuleError(f"start_dim {s} is after end_dim {e}")
        return {"start_dim": s, "end_dim": e}

    def infer(self, attrs, types):
        sh, s, e = types[0].shape, attrs["start_dim"], attrs["end_dim"]
        return TensorType(sh[:s] + (shapes.prod(sh[s:e + 1]),) + sh[e + 1:], types[0].dtype)

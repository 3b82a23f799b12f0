"""Shape ops: ``concat``, ``reshape``, ``flatten``."""
from __future__ import annotations

import abc

import numpy as np

from .. import shapes
from ..errors import RuleError
from ..ir import TensorType, Value
from .registry import Op, builder, flag, par_outer, register, same_dtype


def concat(values, axis: int = 1, name=None) -> Value:
    """Join tensors along ``axis`` (default: channels); other dims must match."""
    from ..errors import GraphError

    given = values
    try:
        values = None if isinstance(given, Value) else list(given)
    except TypeError:
        values = None
    if values is None or (values and not isinstance(values[0], Value)):
        raise GraphError(f"concat takes a list of convc Values, got {type(given).__name__} {given!r:.80}")
    if not values:
        raise GraphError("concat needs at least one value")
    return values[0].graph.add("concat", values, {"axis": axis}, name)


@builder("x")
def reshape(x: Value, shape, name=None) -> Value:
    """Same elements, new ``shape`` (one entry may be -1)."""
    return x.graph.add("reshape", [x], {"shape": shape}, name)


@builder("x")
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

    def grad(self, attrs, xs, y, gy, needs):
        out, start = [], 0
        for x, need in zip(xs, needs):
            stop = start + x.shape[attrs["axis"]]
            out.append((gy if len(xs) == 1 else slice_axis(gy, attrs["axis"], start, stop)) if need else None)
            start = stop
        return out

    def reference(self, attrs, *xs):
        return np.concatenate(xs, axis=attrs["axis"])

    def context(self, attrs, types, out):
        ax = attrs["axis"]
        return dict(OUTER=shapes.prod(out.shape[:ax]), OUT_ROW=shapes.prod(out.shape[ax:]),
                    rows=[shapes.prod(t.shape[ax:]) for t in types], par=[("o", "OUTER", shapes.prod(out.shape[:ax]))])


class _Copy(Op):
    template = "copy"

    def grad(self, attrs, xs, y, gy, needs):
        return [reshape(gy, xs[0].shape)]

    def reference(self, attrs, x):
        return x.reshape(self.infer(attrs, [TensorType(x.shape, str(x.dtype))]).shape)

    def context(self, attrs, types, out):
        return dict(SIZE=out.size, par=[("i", "SIZE", out.size)])


@register
class Reshape(_Copy):
    name = "reshape"

    def normalize(self, attrs, types):
        shape = shapes.int_tuple(attrs["shape"], "shape")
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


# -- gathers: expand, transpose, slice (y[i...] = x[offset + Σ i_k·s_k]) -------
@builder("x")
def expand(x: Value, shape, name=None) -> Value:
    """Broadcast ``x`` to ``shape`` (numpy rules), materialised."""
    return x.graph.add("expand", [x], {"shape": shape}, name)


@builder("x")
def transpose(x: Value, perm=None, name=None) -> Value:
    """Permute the axes (default: reverse them), as numpy.transpose."""
    return x.graph.add("transpose", [x], {"perm": perm}, name)


@builder("x")
def slice_axis(x: Value, axis: int, start: int, stop: int, name=None) -> Value:
    """``x`` restricted to ``start:stop`` along ``axis`` (step 1)."""
    return x.graph.add("slice", [x], {"axis": axis, "start": start, "stop": stop}, name)


@builder("x")
def reduce_sum(x: Value, axes=None, keepdims: bool = False, name=None) -> Value:
    """Sum over ``axes`` (default: all)."""
    return x.graph.add("reduce_sum", [x], {"axes": axes, "keepdims": keepdims}, name)


def sum_to(x: Value, shape, name=None) -> Value:
    """Sum ``x`` down to ``shape``, undoing numpy broadcasting (what a
    gradient of a broadcast operand needs)."""
    shape = tuple(shape)
    if x.shape == shape:
        return x
    lead = len(x.shape) - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1)
    y = reduce_sum(x, axes, keepdims=False, name=name) if axes else x
    return y if y.shape == shape else reshape(y, shape)


def row_major_strides(shape):
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return list(reversed(strides))


class _Gather(Op):
    template = "gather"

    @abc.abstractmethod
    def gather(self, attrs, x: TensorType, out: TensorType):
        """(offset, per-output-axis strides into x)."""

    def context(self, attrs, types, out):
        offset, strides = self.gather(attrs, types[0], out)
        return dict(dims=list(out.shape), strides=strides, offset=offset, par=par_outer(out.shape))


@register
class Expand(_Gather):
    name = "expand"

    def normalize(self, attrs, types):
        shape = shapes.int_tuple(attrs["shape"], "shape")
        try:
            if tuple(np.broadcast_shapes(types[0].shape, shape)) != shape:
                raise ValueError
        except (TypeError, ValueError):
            raise RuleError(f"cannot broadcast {types[0].shape} to {attrs['shape']!r}") from None
        return {"shape": shape}

    def infer(self, attrs, types):
        return TensorType(attrs["shape"], types[0].dtype)

    def grad(self, attrs, xs, y, gy, needs):
        return [sum_to(gy, xs[0].shape)]

    def reference(self, attrs, x):
        return np.broadcast_to(x, attrs["shape"])

    def gather(self, attrs, x, out):
        from .elementwise import broadcast_strides
        return 0, broadcast_strides(x.shape, out.shape)


@register
class Transpose(_Gather):
    name = "transpose"

    def normalize(self, attrs, types):
        rank = len(types[0].shape)
        perm = attrs["perm"]
        perm = tuple(reversed(range(rank))) if perm is None else tuple(int(p) for p in perm)
        if sorted(perm) != list(range(rank)):
            raise RuleError(f"perm {perm} is not a permutation of the {rank} axes")
        return {"perm": perm}

    def infer(self, attrs, types):
        return TensorType(tuple(types[0].shape[p] for p in attrs["perm"]), types[0].dtype)

    def grad(self, attrs, xs, y, gy, needs):
        return [transpose(gy, tuple(int(i) for i in np.argsort(attrs["perm"])))]

    def reference(self, attrs, x):
        return np.transpose(x, attrs["perm"])

    def gather(self, attrs, x, out):
        s = row_major_strides(x.shape)
        return 0, [s[p] for p in attrs["perm"]]


@register
class Slice(_Gather):
    name = "slice"

    def normalize(self, attrs, types):
        shape = types[0].shape
        ax = _axis(attrs["axis"], len(shape))
        start, stop = int(attrs["start"]), int(attrs["stop"])
        if not 0 <= start < stop <= shape[ax]:
            raise RuleError(f"slice {start}:{stop} is not a non-empty range inside axis {ax} of size {shape[ax]}")
        return {"axis": ax, "start": start, "stop": stop}

    def infer(self, attrs, types):
        sh = list(types[0].shape)
        sh[attrs["axis"]] = attrs["stop"] - attrs["start"]
        return TensorType(tuple(sh), types[0].dtype)

    def grad(self, attrs, xs, y, gy, needs):
        x, ax = xs[0], attrs["axis"]
        parts = []
        for lo, hi in ((0, attrs["start"]), (attrs["stop"], x.shape[ax])):
            if hi > lo:
                shape = list(x.shape)
                shape[ax] = hi - lo
                parts.append(x.graph.const(np.zeros(shape), x.dtype))
        parts.insert(1 if attrs["start"] > 0 else 0, gy)
        return [concat(parts, ax) if len(parts) > 1 else gy]

    def reference(self, attrs, x):
        sl = [slice(None)] * x.ndim
        sl[attrs["axis"]] = slice(attrs["start"], attrs["stop"])
        return x[tuple(sl)]

    def gather(self, attrs, x, out):
        s = row_major_strides(x.shape)
        return attrs["start"] * s[attrs["axis"]], s


@register
class ReduceSum(Op):
    name = "reduce_sum"

    def normalize(self, attrs, types):
        rank = len(types[0].shape)
        axes = attrs["axes"]
        if axes is not None:            # one axis, or a tuple of them (not a string or a dict)
            axes = (axes,) if shapes.is_int(axes) else shapes.int_tuple(axes, "axes")
        axes = tuple(range(rank)) if axes is None else tuple(sorted({_axis(a, rank) for a in axes}))
        return {"axes": axes, "keepdims": flag(attrs["keepdims"], "keepdims")}

    def infer(self, attrs, types):
        sh = types[0].shape
        if attrs["keepdims"]:
            out = tuple(1 if i in attrs["axes"] else n for i, n in enumerate(sh))
        else:
            out = tuple(n for i, n in enumerate(sh) if i not in attrs["axes"])
        return TensorType(out, types[0].dtype)

    def grad(self, attrs, xs, y, gy, needs):
        x = xs[0]
        kept = tuple(1 if i in attrs["axes"] else n for i, n in enumerate(x.shape))
        return [expand(reshape(gy, kept) if gy.shape != kept else gy, x.shape)]

    def reference(self, attrs, x):
        return np.sum(x, axis=attrs["axes"], keepdims=attrs["keepdims"])

    def context(self, attrs, types, out):
        x = types[0]
        kept = [n if i not in attrs["axes"] else 1 for i, n in enumerate(x.shape)]
        ys = row_major_strides(kept)
        return dict(dims=list(x.shape), ystrides=[0 if i in attrs["axes"] else s for i, s in enumerate(ys)],
                    SIZE=out.size, par=[("j", "SIZE", out.size)])

"""Constant folding at import: the numpy functions of the ops that compute
shapes, indices and masks.

A node whose inputs are all constants is evaluated at import (see
:meth:`.importer._Importer.fold`), by the first of:

1. a function of :data:`FOLDS` (here): the shape-computing ops exporters
   write around reshapes and weights -- ConstantOfShape, Range, Gather,
   Concat, Unsqueeze / Squeeze in both forms (axes an attribute before opset
   13, an input since), Cast, the comparisons and Where, Slice in both forms,
   integer arithmetic -- in numpy, at any opset from 1 on;
2. convc's own converter of the op and its numpy reference
   (:mod:`convc.reference`): the meaning convc compiles, so a folded Conv or
   Relu is what the generated code would compute;
3. ``onnx.reference``, for the ops convc has neither for.

Each function takes ``(node, attrs, args, opset)`` (``attrs``: the node's
attributes by name, ``args``: its input arrays, None for an omitted one) and
returns the output arrays, or None when this form is not one it computes (the
next way is tried). A value ONNX forbids raises :class:`FoldError` with the
rule. Sizes are not checked here: :class:`.validate.FoldBudget` sized every
result before any of this runs.
"""
from __future__ import annotations

import numpy as np

from ..ir import DTYPES


class FoldError(Exception):
    """A constant input breaks the op's rule (an index out of range, a
    shape that does not fit): the reason, reported as the node's problem."""


FOLDS: dict[str, callable] = {}


def folds(*op_types: str):
    """Register a numpy fold function for ``op_types``."""
    def deco(fn):
        for t in op_types:
            FOLDS[t] = fn
        return fn
    return deco


def _axis(a: int, rank: int, what: str = "axis") -> int:
    a = int(a)
    if not -rank <= a < rank:
        raise FoldError(f"{what} {a} is out of range for rank {rank} ([{-rank}, {rank - 1}])")
    return a % rank


def _ints(arr, what: str) -> list[int]:
    arr = np.asarray(arr)
    if arr.dtype.kind not in "iu":
        raise FoldError(f"{what} must be integers (ONNX: int64), got {arr.dtype}")
    return [int(v) for v in arr.reshape(-1)]


def _axes(node, attrs, args, opset: int, since: int):
    """Squeeze / Unsqueeze / Reduce axes: the attribute before ``since``, the
    second input from it (None: not given)."""
    if opset < since:
        return attrs.get("axes")
    return _ints(args[1], "axes") if len(args) > 1 and args[1] is not None else None


@folds("Constant")
def _constant(node, attrs, args, opset):
    from .validate import Refusal, tensor_array

    if "value" in attrs:
        try:
            return [tensor_array(attrs["value"], 1 << 62)]     # (the budget sized it already)
        except Refusal as e:
            raise FoldError(str(e)) from None
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                       ("value_ints", np.int64)):
        if key in attrs:
            return [np.array(attrs[key], dtype)]
    return None       # strings, sparse values: onnx.reference


@folds("ConstantOfShape")
def _constant_of_shape(node, attrs, args, opset):
    from onnx import numpy_helper

    shape = _ints(args[0], "input shape")
    if any(s < 0 for s in shape):
        raise FoldError(f"shape {shape} has a negative entry")
    value = numpy_helper.to_array(attrs["value"]).reshape(-1) if "value" in attrs else np.zeros(1, np.float32)
    if value.size != 1:
        raise FoldError(f"attribute value must hold one element, it holds {value.size}")
    return [np.full(shape, value[0], value.dtype)]


@folds("Range")
def _range(node, attrs, args, opset):
    start, limit, delta = (np.asarray(a).reshape(-1) for a in args[:3])
    if any(a.size != 1 for a in (start, limit, delta)):
        raise FoldError("start, limit and delta must be scalars")
    if delta[0] == 0:
        raise FoldError("delta is 0")
    n = max(int(np.ceil((float(limit[0]) - float(start[0])) / float(delta[0]))), 0)     # ONNX's count
    return [(start[0] + np.arange(n, dtype=start.dtype) * delta[0]).astype(start.dtype)]


@folds("Gather")
def _gather(node, attrs, args, opset):
    data, idx = np.asarray(args[0]), np.asarray(args[1])
    axis = _axis(attrs.get("axis", 0), max(data.ndim, 1))
    if idx.dtype.kind not in "iu":
        raise FoldError(f"indices must be integers, got {idx.dtype}")
    n = data.shape[axis]
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise FoldError(f"an index of {idx.reshape(-1).tolist()[:8]} is out of range for axis {axis} of size {n}")
    return [np.take(data, idx.astype(np.int64), axis=axis)]


@folds("Concat")
def _concat(node, attrs, args, opset):
    arrays = [np.asarray(a) for a in args if a is not None]
    if attrs.get("axis") is None:
        return None
    axis = _axis(attrs["axis"], max(arrays[0].ndim, 1))
    try:
        return [np.concatenate(arrays, axis=axis)]
    except ValueError as e:
        raise FoldError(f"the inputs do not concatenate on axis {axis}: {e}") from None


@folds("Unsqueeze")
def _unsqueeze(node, attrs, args, opset):
    x = np.asarray(args[0])
    axes = _axes(node, attrs, args, opset, 13)
    if axes is None:
        raise FoldError("axes are required")
    rank = x.ndim + len(axes)
    axes = sorted(_axis(a, rank, "axes entry") for a in axes)
    if len(set(axes)) != len(axes):
        raise FoldError(f"axes {axes} has a repeated entry")
    shape = list(x.shape)
    for a in axes:
        shape.insert(a, 1)
    return [x.reshape(shape)]


@folds("Squeeze")
def _squeeze(node, attrs, args, opset):
    x = np.asarray(args[0])
    axes = _axes(node, attrs, args, opset, 13)
    if axes is None:
        return [x.reshape([n for n in x.shape if n != 1])]
    axes = {_axis(a, x.ndim, "axes entry") for a in axes}
    if any(x.shape[a] != 1 for a in axes):
        raise FoldError(f"axes {sorted(axes)} of shape {x.shape} must have size 1")
    return [x.reshape([n for i, n in enumerate(x.shape) if i not in axes])]


@folds("Cast")
def _cast(node, attrs, args, opset):
    from onnx import helper

    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(attrs["to"]))
    except (KeyError, ValueError, TypeError):
        return None
    if dtype.kind not in "biuf" or np.asarray(args[0]).dtype.kind not in "biuf":
        return None             # strings, float8, ...: onnx.reference knows their rules
    x = np.asarray(args[0])
    if dtype.name in DTYPES:          # the meaning convc's cast op compiles (float -> int saturates, NaN -> 0)
        from ..ops.indexing import cast_array
        return [cast_array(x, dtype.name)]
    return [x.astype(dtype)]


_COMPARE = {"Equal": np.equal, "Greater": np.greater, "Less": np.less, "GreaterOrEqual": np.greater_equal,
            "LessOrEqual": np.less_equal, "And": np.logical_and, "Or": np.logical_or, "Xor": np.logical_xor}


@folds(*_COMPARE)
def _compare(node, attrs, args, opset):
    if opset < 7 and attrs.get("broadcast"):
        return None             # legacy broadcasting from an axis: the converter's rule
    return [_COMPARE[node.op_type](args[0], args[1])]


@folds("Not")
def _not(node, attrs, args, opset):
    return [np.logical_not(args[0])]


@folds("Where")
def _where(node, attrs, args, opset):
    return [np.where(np.asarray(args[0]).astype(bool), args[1], args[2])]


_INT_ARITH = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}


@folds("Add", "Sub", "Mul", "Div")
def _int_arith(node, attrs, args, opset):
    """Integer arithmetic (shape computations); float arithmetic is convc's
    own (the converter and the numpy reference). Div truncates toward zero,
    as ONNX Runtime's and C's integer division."""
    a, b = np.asarray(args[0]), np.asarray(args[1])
    if a.dtype.kind not in "iu" or b.dtype.kind not in "iu" or (opset < 7 and attrs.get("broadcast")):
        return None
    if a.dtype != b.dtype:
        raise FoldError(f"inputs are {a.dtype} and {b.dtype}; ONNX takes one type")
    if node.op_type != "Div":
        with np.errstate(over="ignore"):
            return [_INT_ARITH[node.op_type](a, b).astype(a.dtype)]
    if not b.all():
        raise FoldError("integer division by zero")
    q = np.floor_divide(a, b)
    q += ((q * b != a) & ((a < 0) != (b < 0))).astype(a.dtype)       # floor -> toward zero
    return [q.astype(a.dtype)]


@folds("Slice")
def _slice(node, attrs, args, opset):
    x = np.asarray(args[0])
    if opset < 10:
        starts, ends, axes, steps = attrs.get("starts"), attrs.get("ends"), attrs.get("axes"), None
        if starts is None or ends is None:
            raise FoldError("attributes starts and ends are required")
    else:
        starts, ends = _ints(args[1], "starts"), _ints(args[2], "ends")
        axes = _ints(args[3], "axes") if len(args) > 3 and args[3] is not None else None
        steps = _ints(args[4], "steps") if len(args) > 4 and args[4] is not None else None
    axes = list(range(len(starts))) if axes is None else [_axis(a, x.ndim, "axes entry") for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise FoldError(f"starts {list(starts)}, ends {list(ends)}, axes and steps must have one length")
    index = [slice(None)] * x.ndim
    for a, st, en, sp in zip(axes, starts, ends, steps):
        n, st, en, sp = x.shape[a], int(st), int(en), int(sp)
        if sp == 0:
            raise FoldError(f"step 0 on axis {a}")
        st, en = (v + n if v < 0 else v for v in (st, en))
        if sp > 0:                              # ONNX's clamps: [0, n] forward, [-1, n - 1] backward
            st, en = min(max(st, 0), n), min(max(en, 0), n)
        else:
            st, en = min(max(st, 0), n - 1), min(max(en, -1), n - 1)
        index[a] = slice(st, en if en >= 0 else None, sp)
    return [x[tuple(index)]]


@folds("Reshape")
def _reshape(node, attrs, args, opset):
    x = np.asarray(args[0])
    target = attrs.get("shape") if opset < 5 else _ints(args[1], "shape")
    if target is None:
        raise FoldError("attribute shape is required")
    target = [int(t) for t in target]
    if not attrs.get("allowzero"):
        if any(t == 0 and i >= x.ndim for i, t in enumerate(target)):
            raise FoldError(f"shape {target} copies a dimension (0) the input {x.shape} does not have")
        target = [x.shape[i] if t == 0 else t for i, t in enumerate(target)]
    try:
        return [x.reshape(target)]
    except ValueError:
        raise FoldError(f"shape {target} does not fit the input's {x.shape}") from None


@folds("Identity")
def _identity(node, attrs, args, opset):
    return [np.asarray(args[0])]


@folds("Transpose")
def _transpose(node, attrs, args, opset):
    x = np.asarray(args[0])
    perm = attrs.get("perm")
    if perm is not None and sorted(perm) != list(range(x.ndim)):
        raise FoldError(f"perm {list(perm)} is not a permutation of the {x.ndim} axes")
    return [np.ascontiguousarray(np.transpose(x, perm))]


@folds("Expand")
def _expand(node, attrs, args, opset):
    x = np.asarray(args[0])
    target = _ints(args[1], "shape")
    try:
        shape = np.broadcast_shapes(x.shape, tuple(target))
    except ValueError:
        raise FoldError(f"shape {target} does not broadcast with the input's {x.shape}") from None
    return [np.array(np.broadcast_to(x, shape))]


@folds("Flatten")
def _flatten(node, attrs, args, opset):
    x = np.asarray(args[0])
    axis = int(attrs.get("axis", 1))
    if not -x.ndim <= axis <= x.ndim:
        raise FoldError(f"axis {axis} is out of range for rank {x.ndim}")
    axis = axis + x.ndim if axis < 0 else axis
    return [x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), int(np.prod(x.shape[axis:], dtype=np.int64)))]


@folds("Tile")
def _tile(node, attrs, args, opset):
    x = np.asarray(args[0])
    reps = _ints(args[1], "repeats")
    if len(reps) != x.ndim or min(reps, default=0) < 0:
        raise FoldError(f"repeats {reps} must be {x.ndim} entries, none negative")
    return [np.tile(x, reps)]


_VARIADIC = {"Sum": np.add, "Max": np.maximum, "Min": np.minimum}


@folds(*_VARIADIC)
def _variadic_int(node, attrs, args, opset):
    arrays = [np.asarray(a) for a in args if a is not None]
    if any(a.dtype.kind not in "iu" for a in arrays):
        return None             # float: convc's own
    out = arrays[0]
    for a in arrays[1:]:
        out = _VARIADIC[node.op_type](out, a)
    return [np.asarray(out)]


@folds("Neg", "Abs")
def _int_unary(node, attrs, args, opset):
    x = np.asarray(args[0])
    if x.dtype.kind not in "iu":
        return None
    return [np.negative(x) if node.op_type == "Neg" else np.abs(x)]

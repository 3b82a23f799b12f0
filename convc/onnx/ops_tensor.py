"""The converters of ONNX's tensor ops: DepthToSpace, SpaceToDepth, Tile,
Gather (constant indices), Cast and CastLike, Where (constant condition),
Einsum; and the comparisons and logical ops (Equal, Greater, Less,
GreaterOrEqual, LessOrEqual, Not, And, Or, Xor), which convc takes only when
their inputs are constants.

convc has no bool tensors: a comparison of constants is folded at import
(its result, a constant mask, is what Where's condition then reads); a
comparison of run-time tensors, or a Where whose condition is computed at
run time, is refused with that reason."""
from __future__ import annotations

import numpy as np

from ..ops.indexing import cast, take, where
from ..ops.rearrange import depth_to_space, einsum, space_to_depth, tile
from ..errors import ConvcError
from .importer import _DTYPE_OF_ELEM, STATIC_INPUTS, _axis, _elem_name, _Unsupported, converts

# Gather's indices, Tile's repeats, Where's condition (and CastLike's target_type, read for its dtype) decide the code convc
# emits: compile-time inputs (conformance binds them from the case's data).
STATIC_INPUTS.update(Gather=(1,), Tile=(1, 2), Where=(0,), CastLike=(1,))


def _block(at) -> int:
    b = at["blocksize"]
    if b is None:
        raise _Unsupported("attribute blocksize is required")
    if b < 1:
        raise _Unsupported(f"blocksize {b} must be at least 1")
    return int(b)


def _mode(at, op: str) -> str:
    mode = at["mode"]
    if mode not in ("DCR", "CRD"):
        raise _Unsupported(f"{op} mode {mode!r} is unknown (ONNX's modes: 'DCR', 'CRD')")
    return mode


def _nchw(im, name, op):
    shape = im.shape(name)
    if len(shape) != 4:
        raise _Unsupported(f"{op} takes an (N, C, H, W) input, got shape {shape}")
    return shape


@converts("DepthToSpace", blocksize=None, mode="DCR")
def _depth_to_space(im, node, ins, at):
    """Mode since opset 11 (DCR before: the default)."""
    _, c, _, _ = _nchw(im, ins[0], "DepthToSpace")
    r = _block(at)
    if c % (r * r):
        raise _Unsupported(f"{c} channels do not divide into blocks of {r}x{r} (blocksize {r})")
    return [depth_to_space(im.value(ins[0]), r, _mode(at, "DepthToSpace"), name=im.name(node))]


@converts("SpaceToDepth", blocksize=None, mode="DCR")
def _space_to_depth(im, node, ins, at):
    """Mode since opset 28 (DCR before)."""
    _, _, h, w = _nchw(im, ins[0], "SpaceToDepth")
    r = _block(at)
    if h % r or w % r:
        raise _Unsupported(f"height {h} and width {w} must be multiples of blocksize {r}")
    return [space_to_depth(im.value(ins[0]), r, _mode(at, "SpaceToDepth"), name=im.name(node))]


@converts("Tile", tiles=None, axis=None)
def _tile(im, node, ins, at):
    """Opset 6 on: repeats, one per axis (an input, constant here). Tile-1
    took the count (``tiles``) and the ``axis`` as inputs."""
    x = im.value(ins[0])
    if im.opset < 6:
        count, axis = im.scalar(ins[1], "tiles"), im.scalar(ins[2], "axis")
        if not (count.is_integer() and axis.is_integer()):
            raise _Unsupported(f"tiles {count} and axis {axis} must be whole numbers (Tile-1 gives them as tensors "
                               f"of the input's type)")
        reps = [1] * len(x.shape)
        reps[_axis(axis, len(x.shape))] = int(count)
    else:
        reps = [int(r) for r in im.ints(ins[1], "repeats")]
    if len(reps) != len(x.shape):
        raise _Unsupported(f"repeats {reps} must have one entry per axis of the input {x.shape}")
    if min(reps, default=1) < 1:
        raise _Unsupported(f"repeats {reps} must be at least 1 (0 makes an empty tensor; convc tensors are never "
                           f"empty)")
    if all(r == 1 for r in reps):
        return [x]
    im.allocate([r * n for r, n in zip(reps, x.shape)], "the tiled tensor")
    return [tile(x, reps, name=im.name(node))]


@converts("Gather", axis=0)
def _gather(im, node, ins, at):
    """numpy.take along ``axis`` with constant indices (negative ones count
    from the end); out-of-range indices are refused (ONNX leaves them an
    error)."""
    x = im.value(ins[0])
    rank = len(x.shape)
    axis = _axis(at["axis"], rank)
    idx = im.const(ins[1], "indices")
    if idx.dtype.kind not in "iu":
        raise _Unsupported(f"indices (input {ins[1]!r}) must be int32 or int64, got {idx.dtype}")
    if idx.size == 0:
        raise _Unsupported("indices is empty (the output would be empty; convc tensors are never empty)")
    n = x.shape[axis]
    bad = idx[(idx < -n) | (idx >= n)]
    if bad.size:
        raise _Unsupported(f"index {int(bad.reshape(-1)[0])} is out of range for axis {axis} of size {n} "
                           f"([{-n}, {n - 1}])")
    return [take(x, idx.astype(np.int64), axis, name=im.name(node))]


def _target_dtype(elem: int, what: str) -> str:
    dtype = _DTYPE_OF_ELEM.get(int(elem))
    if dtype is None:
        raise _Unsupported(f"{what} {_elem_name(int(elem))} is not supported at run time (convc computes in "
                           f"float32/64 and the integer types; bool, float16, bfloat16, float8 and sub-byte types "
                           f"are folded only when the input is a constant)")
    return dtype


def _cast_to(im, node, x, dtype):
    if x.dtype == dtype:
        return [x]
    return [cast(x, dtype, name=im.name(node))]


@converts("Cast", to=None, saturate=1, round_mode="up")
def _cast(im, node, ins, at):
    """Float -> integer truncates toward zero and saturates to the range (NaN
    -> 0): ONNX leaves out-of-range values undefined, convc defines them (see
    :mod:`convc.ops.indexing`). ``saturate`` and ``round_mode`` concern
    float8 targets only, which convc does not compute in."""
    if at["to"] is None:
        raise _Unsupported("attribute to is required")
    if isinstance(at["to"], str):           # Cast-1 spelled the type as a string ("FLOAT")
        from onnx import TensorProto
        at["to"] = TensorProto.DataType.Value(at["to"].upper())
    return _cast_to(im, node, im.value(ins[0]), _target_dtype(at["to"], "target type"))


@converts("CastLike", saturate=1, round_mode="up")
def _cast_like(im, node, ins, at):
    like = im.env[ins[1]]
    dtype = np.dtype(like.dtype).name if isinstance(like, np.ndarray) else like.dtype
    from .importer import _ELEM_OF_DTYPE
    if dtype not in _ELEM_OF_DTYPE:
        raise _Unsupported(f"target_type's dtype {dtype} is not supported at run time (convc computes in float32/64 "
                           f"and the integer types)")
    return _cast_to(im, node, im.value(ins[0]), dtype)


@converts("Where")
def _where(im, node, ins, at):
    """A select between X and Y (broadcast) by a constant condition."""
    if not isinstance(im.env[ins[0]], np.ndarray):
        raise _Unsupported(f"its condition {ins[0]!r} is computed at run time; convc has no bool tensors, so Where "
                           f"is imported only with a constant condition (an initializer or folded comparison)",
                           consequence=ins[0] in im.placeholders)
    cond = im.env[ins[0]]
    x, y = im.value(ins[1]), im.value(ins[2])
    if x.dtype != y.dtype:
        raise _Unsupported(f"X ({x.dtype}) and Y ({y.dtype}) must have one type")
    try:
        np.broadcast_shapes(cond.shape, x.shape, y.shape)
    except ValueError:
        raise _Unsupported(f"condition {cond.shape}, X {x.shape} and Y {y.shape} do not broadcast") from None
    if cond.all() or not cond.any():            # one side only: a broadcast of it
        from ..ops.tensor import expand
        side = x if cond.all() else y
        shape = tuple(np.broadcast_shapes(cond.shape, x.shape, y.shape))
        return [side if side.shape == shape else expand(side, shape, name=im.name(node))]
    return [where(cond.astype(bool), x, y, name=im.name(node))]


_LOGICAL = ("Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Not", "And", "Or", "Xor")


def _run_time_bool(im, node, ins, at):
    raise _Unsupported(f"{node.op_type} of run-time tensors makes a bool tensor at run time; convc has no bool "
                       f"tensors and imports {node.op_type} only when its inputs are constants (it is folded "
                       f"then, e.g. into Where's condition)")


for _op in _LOGICAL:
    converts(_op, broadcast=0, axis=None)(_run_time_bool)


@converts("Einsum", equation=None)
def _einsum(im, node, ins, at):
    if at["equation"] is None:
        raise _Unsupported("attribute equation is required")
    values = [im.value(i) for i in ins if i]
    try:
        return [einsum(at["equation"], *values, name=im.name(node))]
    except ConvcError as e:
        reason = str(e).split("): ", 1)[-1].split(" [inputs:")[0]
        raise _Unsupported(f"{reason} (equation {at['equation']!r})") from None

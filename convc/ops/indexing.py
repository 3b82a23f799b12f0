"""Dtype conversion and selection: ``cast``, ``where`` (a select by a mask)
and ``take`` (numpy.take along one axis with indices fixed at compile time)
with its gradient ``take_grad`` (the scatter-add of the gradient).

``cast`` defines every conversion between the IR's dtypes, in the numpy
reference and the generated C alike, so that no input is undefined behaviour:

* float -> float and integer -> float: C's conversion (round to nearest; a
  float64 beyond float32's range becomes +-inf);
* integer -> integer: modulo 2**bits (numpy's ``astype``; gcc, clang and
  OpenCL C define C's conversion that way);
* float -> integer: truncation toward zero, **saturated** to the dtype's range
  (+-inf too), NaN -> 0. C leaves an out-of-range conversion undefined, and
  so does ONNX's Cast; numpy gives whatever the CPU's instruction gives.
  Saturation is what ONNX specifies for its float8 casts (``saturate=1``) and
  what Rust and WebAssembly's saturating conversions do.
"""
from __future__ import annotations

import numpy as np

from .. import shapes
from ..errors import RuleError
from ..ir import FLOAT_DTYPES, INT_DTYPES, TensorType, Value, _dtype_name
from .elementwise import broadcast_strides
from .registry import Op, builder, par_outer, register, same_dtype


# -- cast ----------------------------------------------------------------------
@builder("x")
def cast(x: Value, dtype, name=None) -> Value:
    """``x`` converted to ``dtype`` (one of the IR's dtypes) by the rules of
    this module's docstring: float -> integer truncates toward zero and
    saturates (NaN -> 0), integer -> integer wraps around."""
    return x.graph.add("cast", [x], {"dtype": _dtype_name(dtype, "cast")}, name)


def _int_bounds(dtype: str) -> tuple[int, int]:
    """[lo, hi): the reals whose truncation fits ``dtype``, as powers of two
    (exact in every float type): -2**(b-1) .. 2**(b-1) signed, 0 .. 2**b
    unsigned."""
    info = np.iinfo(dtype)
    return int(info.min), int(info.max) + 1


def cast_array(x: np.ndarray, dtype: str) -> np.ndarray:
    """numpy's meaning of :func:`cast` (the reference, and what constant
    folding of ONNX's Cast should use)."""
    x = np.asarray(x)
    if x.dtype.kind != "f" or dtype not in INT_DTYPES:
        with np.errstate(over="ignore", invalid="ignore"):
            return x.astype(dtype)          # float64 -> float32 overflows to inf, as C
    lo, hi = _int_bounds(dtype)
    info = np.iinfo(dtype)
    low, high, nan = x <= lo, x >= hi, np.isnan(x)
    inside = np.where(low | high | nan, 0, x)
    with np.errstate(invalid="ignore"):
        y = np.trunc(inside).astype(dtype)
    y = np.where(low, info.min, y)
    return np.where(high, info.max, y).astype(dtype)


def _c_float(v: int, src: str) -> str:
    """A power of two as a literal of the source float type (exact)."""
    return f"{float(v)!r}{'f' if src == 'float32' else ''}"


@register
class Cast(Op):
    name = "cast"
    template = "cast"

    def normalize(self, attrs, types):
        return {"dtype": _dtype_name(attrs["dtype"], "cast")}

    def infer(self, attrs, types):
        return TensorType(types[0].shape, attrs["dtype"])

    def reference(self, attrs, x):
        return cast_array(x, attrs["dtype"])

    def grad(self, attrs, xs, y, gy, needs):
        x = xs[0]
        if x.dtype in FLOAT_DTYPES and attrs["dtype"] in FLOAT_DTYPES:
            return [cast(gy, x.dtype)]
        from ..errors import GraphError
        raise GraphError(f"cast %{y.name} from {x.dtype} to {attrs['dtype']} is not differentiable "
                         f"(only float -> float casts are)")

    @staticmethod
    def expression(src: str, dst: str, v: str = "v") -> tuple[str, str]:
        """The C expression converting variable ``v`` and the rule it follows."""
        from ..codegen.env import CTYPES
        T = CTYPES[dst]
        if src in FLOAT_DTYPES and dst in INT_DTYPES:
            lo, hi = _int_bounds(dst)
            info = np.iinfo(dst)
            from .elementwise import c_int
            low = f"{v} <= {_c_float(lo, src)} ? {c_int(int(info.min), dst)}"
            if dst.startswith("u"):
                low = f"{v} <= {_c_float(0, src)} ? 0"           # (-1, 0] truncates to 0 as well
            return (f"isnan({v}) ? 0 : {low} : {v} >= {_c_float(hi, src)} ? {c_int(int(info.max), dst)} : ({T}){v}",
                    "truncated toward zero, saturated to the range, NaN -> 0")
        if src in INT_DTYPES and dst in INT_DTYPES:
            return f"({T}){v}", "modulo 2**bits"
        return f"({T}){v}", "C's conversion (round to nearest)"

    def context(self, attrs, types, out):
        expr, rule = self.expression(types[0].dtype, out.dtype)
        return dict(SIZE=out.size, par=[("i", "SIZE", out.size)], expr=expr, rule=rule)


# -- where -----------------------------------------------------------------------
def where(cond: Value, a, b, name=None) -> Value:
    """``a`` where ``cond`` is nonzero, else ``b`` (numpy.where; the three
    broadcast together). ``cond``: a Value of any integer dtype or a numpy
    array of booleans (a constant mask); ``a`` and ``b`` share a dtype (a
    number becomes a constant of the other's dtype)."""
    from .registry import as_value, graph_of
    like = graph_of(a, b, cond)
    if not isinstance(cond, Value):
        cond = like.graph.const(np.asarray(cond).astype(np.uint8), "uint8")
    if not isinstance(a, Value):
        a = as_value(b if isinstance(b, Value) else like, a, "where operand a")
    if not isinstance(b, Value):
        b = as_value(a, b, "where operand b")
    return like.graph.add("where", [cond, a, b], {}, name)


def _index(dims, strides) -> str:
    return " + ".join(f"i{k} * {s}" for k, s in enumerate(strides) if s) or "0"


@register
class Where(Op):
    name = "where"
    arity = (3, 3)
    inputs = ("cond", "a", "b")

    def infer(self, attrs, types):
        c, a, b = types
        if c.dtype not in INT_DTYPES:
            raise RuleError(f"cond must be an integer mask (nonzero: take a), got {c.dtype}")
        dtype = same_dtype(types[1:], "a and b")
        try:
            out = np.broadcast_shapes(c.shape, a.shape, b.shape)
        except ValueError:
            raise RuleError(f"cond {c.shape}, a {a.shape} and b {b.shape} do not broadcast (numpy rules)") from None
        return TensorType(tuple(out), dtype)

    def reference(self, attrs, c, a, b):
        return np.where(c != 0, a, b).astype(a.dtype)

    def grad(self, attrs, xs, y, gy, needs):
        from .tensor import sum_to
        c, a, b = xs
        zero = gy.graph.const(np.zeros(()), gy.dtype)
        return [None,
                sum_to(where(c, gy, zero), a.shape) if needs[1] else None,
                sum_to(where(c, zero, gy), b.shape) if needs[2] else None]

    def context(self, attrs, types, out):
        dims = list(out.shape)
        return dict(dims=dims, par=par_outer(dims),
                    ic=_index(dims, broadcast_strides(types[0].shape, out.shape)),
                    ia=_index(dims, broadcast_strides(types[1].shape, out.shape)),
                    ib=_index(dims, broadcast_strides(types[2].shape, out.shape)))


# -- take: numpy.take with compile-time indices, and its gradient --------------------
@builder("x")
def take(x: Value, indices, axis: int = 0, name=None) -> Value:
    """``numpy.take(x, indices, axis)``: the entries of ``x`` at
    ``indices`` (an integer array of any shape, known now; negative ones count
    from the end) along ``axis``; the result has shape
    ``x.shape[:axis] + indices.shape + x.shape[axis + 1:]``."""
    idx = np.asarray(indices)
    return x.graph.add("take", [x], {"indices": idx.reshape(-1).tolist(), "index_shape": idx.shape, "axis": axis},
                       name)


def _take_attrs(attrs, n_axis_of, rank):
    """Canonical take attributes: the axis in [0, rank), the indices as
    non-negative ints (each checked against the axis' size)."""
    from .tensor import _axis
    axis = _axis(attrs["axis"], rank)
    n = n_axis_of(axis)
    shape = shapes.int_tuple(attrs["index_shape"], "index_shape") if len(attrs["index_shape"]) else ()
    raw = list(attrs["indices"])
    if not all(shapes.is_int(i) for i in raw):
        raise RuleError(f"indices must be integers, got {raw[:8]!r}")
    if len(raw) != shapes.prod(shape) or not raw:
        raise RuleError(f"{len(raw)} indices for an index shape {shape} (convc tensors are never empty)")
    bad = [int(i) for i in raw if not -n <= int(i) < n]
    if bad:
        raise RuleError(f"index {bad[0]} is out of range for axis {axis} of size {n} ([{-n}, {n - 1}])")
    return {"indices": tuple(int(i) % n for i in raw), "index_shape": shape, "axis": axis}


def _take_context(x_shape, axis, indices, index_shape):
    outer, inner = shapes.prod(x_shape[:axis]), shapes.prod(x_shape[axis + 1:])
    return dict(OUTER=outer, N=len(indices), AXIS=x_shape[axis], INNER=inner, idx=list(indices))


@register
class Take(Op):
    name = "take"

    def normalize(self, attrs, types):
        shape = types[0].shape
        return _take_attrs(attrs, lambda a: shape[a], len(shape))

    def infer(self, attrs, types):
        sh, ax = types[0].shape, attrs["axis"]
        return TensorType(sh[:ax] + attrs["index_shape"] + sh[ax + 1:], types[0].dtype)

    def reference(self, attrs, x):
        idx = np.array(attrs["indices"], np.int64).reshape(attrs["index_shape"])
        return np.take(x, idx, axis=attrs["axis"])

    def grad(self, attrs, xs, y, gy, needs):
        x = xs[0]
        return [gy.graph.add("take_grad", [gy], {**attrs, "size": x.shape[attrs["axis"]]})]

    def context(self, attrs, types, out):
        ctx = _take_context(types[0].shape, attrs["axis"], attrs["indices"], attrs["index_shape"])
        ctx["par"] = [("o", "OUTER", ctx["OUTER"]), ("j", "N", ctx["N"])]
        return ctx


@register
class TakeGrad(Op):
    """dL/dx of ``take``: zeros, then each gathered row's gradient added back
    where it came from (an index taken twice collects both)."""
    name = "take_grad"
    inputs = ("gy",)

    def normalize(self, attrs, types):
        size = int(attrs["size"])
        rank = len(types[0].shape) - len(attrs["index_shape"]) + 1
        out = _take_attrs(attrs, lambda a: size, rank)
        return {**out, "size": size}

    def infer(self, attrs, types):
        sh, ax, k = types[0].shape, attrs["axis"], len(attrs["index_shape"])
        if sh[ax:ax + k] != attrs["index_shape"]:
            raise RuleError(f"gy {sh} must hold the index shape {attrs['index_shape']} at axis {ax}")
        return TensorType(sh[:ax] + (attrs["size"],) + sh[ax + k:], types[0].dtype)

    def reference(self, attrs, gy):
        ax, k = attrs["axis"], len(attrs["index_shape"])
        outer, inner = gy.shape[:ax], gy.shape[ax + k:]
        g = gy.reshape(outer + (len(attrs["indices"]),) + inner)
        y = np.zeros(outer + (attrs["size"],) + inner, gy.dtype)
        for j, i in enumerate(attrs["indices"]):          # in order: sums as the C does
            y[(slice(None),) * ax + (i,)] += g[(slice(None),) * ax + (j,)]
        return y

    def context(self, attrs, types, out):
        ctx = _take_context(out.shape, attrs["axis"], attrs["indices"], attrs["index_shape"])
        ctx["par"] = [("o", "OUTER", ctx["OUTER"]), ("i", "INNER", ctx["INNER"])]
        return ctx


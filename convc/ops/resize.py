"""``resize``: nearest and (bi/tri)linear interpolation of the spatial axes
(N, C, *spatial; 1D/2D/3D), PyTorch's ``F.interpolate`` and ONNX's ``Resize``,
and its adjoint ``resize_grad``.

Both kinds are separable: along one axis, output position ``o`` reads the
input at ``src[o][k]`` with weight ``w[o][k]`` (one tap for nearest, two for
linear), and an N-D resize is the product of the axes' weights. Python
(:func:`axis_taps`) computes these tables once per node from the static
shapes; the reference applies them as matrices and the templates print them
as constant arrays.

The canonical attributes of a node are

* ``size``: the output size of every spatial axis;
* ``scale``: per axis, the scale of the coordinate transform (output over
  input); a scale that is the float nearest to ``size / input`` means
  exactly that ratio, so coordinates are computed in exact rationals;
* ``mode``: ``"nearest"`` or ``"linear"``;
* ``coordinate_transformation_mode``: how output position ``o`` maps to an
  input coordinate ``x`` (ONNX's names):
  ``half_pixel`` ``(o + 1/2) / scale - 1/2``; ``pytorch_half_pixel`` the
  same but ``0`` when the axis has one output; ``align_corners``
  ``o (in - 1) / (out - 1)`` (``0`` when out is 1); ``asymmetric`` ``o / scale``;
* ``nearest_mode`` (nearest only, else None): how ``x`` rounds to an index:
  ``floor``, ``ceil``, ``round_prefer_floor``, ``round_prefer_ceil``.

Indices clamp to the input (ONNX's edge padding); linear interpolates between
``floor(x)`` and the next index with ``x`` clamped to ``[0, in - 1]``.
"""
from __future__ import annotations

import functools
import math
from fractions import Fraction

import numpy as np

from .. import shapes
from ..errors import RuleError
from ..ir import TensorType, Value
from .registry import Op, builder, flag, float_dtype, register
from .window import AXIS_LETTERS

COORDINATE_MODES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric")
_HALF = Fraction(1, 2)
NEAREST_MODES = {                       # x -> an index, exactly
    "floor": math.floor,
    "ceil": math.ceil,
    "round_prefer_floor": lambda x: math.ceil(x - _HALF),
    "round_prefer_ceil": lambda x: math.floor(x + _HALF),
}
# PyTorch's mode names -> (canonical mode, required spatial rank or None)
_TORCH_MODES = {"nearest": ("nearest", None), "nearest-exact": ("nearest", None), "linear": ("linear", None),
                "bilinear": ("linear", 2), "trilinear": ("linear", 3)}


@builder("x")
def resize(x: Value, size=None, scale_factor=None, mode: str = "nearest", align_corners=None,
           coordinate_transformation_mode: str | None = None, nearest_mode: str | None = None,
           recompute_scale_factor=None, name=None) -> Value:
    """Resize the spatial axes of ``x`` (N, C, *spatial), as
    ``torch.nn.functional.interpolate``.

    Give ``size`` (an int or one per spatial axis) or ``scale_factor`` (a
    number or one per axis; the output is ``floor(n * scale_factor)``).
    ``mode``: ``"nearest"`` (PyTorch's: asymmetric coordinates, floor),
    ``"nearest-exact"`` (half_pixel, round_prefer_ceil), ``"linear"`` (any
    rank, as ONNX), ``"bilinear"`` (2 spatial axes) or ``"trilinear"`` (3).
    ``align_corners`` (linear modes) picks the ``align_corners`` coordinate
    transform, else ``half_pixel``; ``coordinate_transformation_mode`` and
    ``nearest_mode`` set ONNX's modes directly. ``recompute_scale_factor``:
    as PyTorch, use ``size / input`` in the coordinate transform instead of
    ``scale_factor``.

    >>> y = cc.resize(x, scale_factor=2, mode="bilinear", align_corners=False)   # doctest: +SKIP
    """
    attrs = dict(size=size, scale_factor=scale_factor, mode=mode, align_corners=align_corners,
                 coordinate_transformation_mode=coordinate_transformation_mode, nearest_mode=nearest_mode,
                 recompute_scale_factor=recompute_scale_factor)
    return x.graph.add("resize", [x], attrs, name)


def resize_grad(gy: Value, input_shape, attrs: dict, name=None) -> Value:
    """dL/dx of ``resize`` (canonical ``attrs``) on an input of
    ``input_shape``: the adjoint, each input element gathering the output
    gradients that read it, times the weights they read it with."""
    return gy.graph.add("resize_grad", [gy], dict(_canonical_keys(attrs), input_shape=tuple(input_shape)), name)


# -- the geometry ---------------------------------------------------------------------
def is_ratio(n_in: int, n_out: int, scale: float) -> bool:
    """Whether ``scale`` stands for exactly ``n_out / n_in`` (is the float nearest to it)."""
    return float(Fraction(n_out, n_in)) == scale


def _exact_scale(n_in: int, n_out: int, scale: float) -> Fraction:
    return Fraction(n_out, n_in) if is_ratio(n_in, n_out, scale) else Fraction(scale)


def source_coordinate(o: int, n_in: int, n_out: int, scale: float, ctm: str) -> Fraction:
    """The input coordinate output position ``o`` maps to (exact)."""
    if ctm == "align_corners":
        return Fraction(o * (n_in - 1), n_out - 1) if n_out > 1 else Fraction(0)
    s = _exact_scale(n_in, n_out, scale)
    if ctm == "asymmetric":
        return o / s
    if ctm == "pytorch_half_pixel" and n_out == 1:
        return Fraction(0)
    return (o + _HALF) / s - _HALF


@functools.lru_cache(maxsize=256)
def axis_taps(n_in: int, n_out: int, scale: float, mode: str, ctm: str, nearest_mode: str | None):
    """Per output position of one axis: the input indices it reads and their
    weights, as two tuples of ``n_out`` rows of 1 (nearest) or 2 (linear) taps."""
    src, w = [], []
    for o in range(n_out):
        x = source_coordinate(o, n_in, n_out, scale, ctm)
        if mode == "nearest":
            src.append((min(max(NEAREST_MODES[nearest_mode](x), 0), n_in - 1),))
            w.append((1.0,))
        else:
            x = min(max(x, Fraction(0)), Fraction(n_in - 1))
            i0 = math.floor(x)
            frac = x - i0
            src.append((i0, min(i0 + 1, n_in - 1)))
            w.append((float(1 - frac), float(frac)))
    return tuple(src), tuple(w)


@functools.lru_cache(maxsize=256)
def axis_adjoint(n_in: int, n_out: int, scale: float, mode: str, ctm: str, nearest_mode: str | None):
    """The transpose of :func:`axis_taps` in gather form: ``first`` (n_in + 1
    offsets) and, for input ``i``, entries ``first[i] .. first[i+1] - 1`` of
    ``outs`` / ``weights``: the output positions that read ``i`` and with
    what weight (zero weights dropped, repeats summed)."""
    src, w = axis_taps(n_in, n_out, scale, mode, ctm, nearest_mode)
    reads: list[dict[int, float]] = [{} for _ in range(n_in)]
    for o, (ss, ww) in enumerate(zip(src, w)):
        for i, wt in zip(ss, ww):
            if wt != 0.0:
                reads[i][o] = reads[i].get(o, 0.0) + wt
    first, outs, weights = [0], [], []
    for r in reads:
        for o in sorted(r):
            outs.append(o)
            weights.append(r[o])
        first.append(len(outs))
    return tuple(first), tuple(outs), tuple(weights)


def axis_matrix(n_in: int, n_out: int, scale: float, mode: str, ctm: str, nearest_mode: str | None) -> np.ndarray:
    """One axis of the resize as an (n_out, n_in) matrix."""
    m = np.zeros((n_out, n_in))
    for o, (ss, ww) in enumerate(zip(*axis_taps(n_in, n_out, scale, mode, ctm, nearest_mode))):
        for i, wt in zip(ss, ww):
            m[o, i] += wt
    return m


def _gather(a: np.ndarray, rows) -> np.ndarray:
    """Along spatial axis ``2 + j``, entry ``i`` of the result is
    ``sum(w * a[..., k, ...] for k, w in rows[j][i])`` (only the listed
    elements are read, so an inf elsewhere stays out of the sum)."""
    for j, axis_rows in enumerate(rows):
        axis = 2 + j
        shape = a.shape[:axis] + a.shape[axis + 1:]
        parts = []
        for entries in axis_rows:
            terms = [w * np.take(a, k, axis=axis) for k, w in entries]
            parts.append(functools.reduce(np.add, terms) if terms else np.zeros(shape, a.dtype))
        a = np.stack(parts, axis=axis)
    return a


# -- attributes ------------------------------------------------------------------------
def _rank(t: TensorType) -> int:
    if not 3 <= len(t.shape) <= 5:
        raise RuleError(f"input must be (N, C, *spatial) with 1 to 3 spatial axes, got rank {len(t.shape)}")
    return len(t.shape) - 2


def _floats(value, rank: int, what: str) -> tuple[float, ...]:
    """A positive finite number or ``rank`` of them -> tuple of floats."""
    def number(v):
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
    items = [value] * rank if number(value) else None
    if items is None:
        try:
            items = list(value)
        except TypeError:
            items = []
    if len(items) != rank or not all(number(v) for v in items):
        raise RuleError(f"{what} must be a number or a tuple of {rank} numbers, got {value!r}")
    out = tuple(float(v) for v in items)
    if not all(math.isfinite(v) and v > 0 for v in out):
        raise RuleError(f"{what} must be positive and finite on every axis, got {out}")
    return out


def _canonical_keys(attrs: dict) -> dict:
    return {k: attrs[k] for k in ("size", "scale", "mode", "coordinate_transformation_mode", "nearest_mode")}


def _check_modes(mode, ctm, nearest_mode):
    if mode not in ("nearest", "linear"):
        raise RuleError(f"mode must be 'nearest' or 'linear', got {mode!r}")
    if ctm not in COORDINATE_MODES:
        raise RuleError(f"coordinate_transformation_mode must be one of {', '.join(COORDINATE_MODES)}, "
                        f"got {ctm!r}")
    if mode == "nearest" and nearest_mode not in NEAREST_MODES:
        raise RuleError(f"nearest_mode must be one of {', '.join(NEAREST_MODES)}, got {nearest_mode!r}")
    if mode == "linear" and nearest_mode is not None:
        raise RuleError(f"nearest_mode ({nearest_mode!r}) applies to mode 'nearest' only, not 'linear'")


def _normalize(attrs: dict, x: TensorType) -> dict:
    """The canonical attributes (see the module docstring); idempotent."""
    rank = _rank(x)
    if "scale" in attrs:                # already canonical: check it
        size = shapes.positive(shapes.per_axis(attrs["size"], rank, "size"), "size")
        scale = _floats(attrs["scale"], rank, "scale")
        mode, ctm, nm = attrs["mode"], attrs["coordinate_transformation_mode"], attrs["nearest_mode"]
        _check_modes(mode, ctm, nm)
        return dict(size=size, scale=scale, mode=mode, coordinate_transformation_mode=ctm, nearest_mode=nm)

    torch_mode, ctm, nm, corners = attrs["mode"], attrs["coordinate_transformation_mode"], attrs["nearest_mode"], \
        attrs["align_corners"]
    if torch_mode not in _TORCH_MODES:
        raise RuleError(f"mode {torch_mode!r} is not supported; use one of {', '.join(_TORCH_MODES)}")
    mode, need = _TORCH_MODES[torch_mode]
    if need is not None and need != rank:
        raise RuleError(f"mode {torch_mode!r} needs {need} spatial axes (a {need + 2}D input), the input has "
                        f"{rank}; mode 'linear' interpolates any rank")
    if corners is not None and mode == "nearest":
        raise RuleError(f"align_corners applies to the linear modes only, not {torch_mode!r}")
    if corners is not None and ctm is not None:
        raise RuleError("give align_corners (PyTorch) or coordinate_transformation_mode (ONNX), not both")
    if torch_mode == "nearest-exact" and (ctm is not None or nm is not None):
        raise RuleError("mode 'nearest-exact' is half_pixel coordinates rounded half up; it takes no "
                        "coordinate_transformation_mode or nearest_mode")
    if ctm is None:
        ctm = ("align_corners" if corners else "half_pixel") if mode == "linear" else \
            ("half_pixel" if torch_mode == "nearest-exact" else "asymmetric")
    if mode == "nearest" and nm is None:
        nm = "round_prefer_ceil" if torch_mode == "nearest-exact" else "floor"
    _check_modes(mode, ctm, nm)

    size, factor = attrs["size"], attrs["scale_factor"]
    recompute = flag(attrs["recompute_scale_factor"], "recompute_scale_factor", none=False)
    if (size is None) == (factor is None):
        raise RuleError(f"give exactly one of size and scale_factor, got size={size!r}, scale_factor={factor!r}")
    n = x.shape[2:]
    if size is not None:
        size = shapes.positive(shapes.per_axis(size, rank, "size"), "size")
        scale = tuple(o / i for o, i in zip(size, n))
    else:
        factor = _floats(factor, rank, "scale_factor")
        size = tuple(math.floor(i * f) for i, f in zip(n, factor))
        if min(size) < 1:
            raise RuleError(f"scale_factor {factor} turns spatial sizes {n} into {size}; every size must be >= 1")
        scale = tuple(o / i for o, i in zip(size, n)) if recompute else factor
    return dict(size=size, scale=scale, mode=mode, coordinate_transformation_mode=ctm, nearest_mode=nm)


def _tables(attrs, n_in):
    return [(i, o, s, attrs["mode"], attrs["coordinate_transformation_mode"], attrs["nearest_mode"])
            for i, o, s in zip(n_in, attrs["size"], attrs["scale"])]


def _lines(rows, per_line=8):
    """Rows of a table grouped a few to a line, for the template to print."""
    return [list(rows[k:k + per_line]) for k in range(0, len(rows), per_line)]


def _par(axes, side: str, nc: int) -> list:
    """The parallel loop nest over the output (``side`` "o") or the input
    ("i"): (n, c) and every spatial axis but the innermost, which stays a
    plain loop the compiler can vectorise."""
    extent = {"o": "OUT", "i": "IN"}[side]
    return [("nc", "NC", nc)] + [(f"{side}{a['l']}", f"{extent}_{a['U']}", a[side]) for a in axes[:-1]]


@register
class Resize(Op):
    name = "resize"

    def normalize(self, attrs, types):
        return _normalize(attrs, types[0])

    def infer(self, attrs, types):
        x = types[0]
        float_dtype(x)
        return TensorType(x.shape[:2] + attrs["size"], x.dtype)

    def reference(self, attrs, x):
        rows = [[list(zip(*r)) for r in zip(*axis_taps(*t))] for t in _tables(attrs, x.shape[2:])]
        return _gather(x.astype(np.float64), rows).astype(x.dtype)

    def grad(self, attrs, xs, y, gy, needs):
        return [resize_grad(gy, xs[0].shape, attrs)]

    def context(self, attrs, types, out):
        x = types[0]
        axes = []
        for letter, t in zip(AXIS_LETTERS[len(x.shape) - 2], _tables(attrs, x.shape[2:])):
            src, w = axis_taps(*t)
            axes.append(dict(l=letter, U=letter.upper(), i=t[0], o=t[1], src=_lines(src), w=_lines(w)))
        nc = x.shape[0] * x.shape[1]
        return dict(NC=nc, axes=axes, taps=1 if attrs["mode"] == "nearest" else 2,
                    weighted=attrs["mode"] == "linear", par=_par(axes, "o", nc))

    def macs(self, attrs, types, out):
        return out.size * 2 ** (len(out.shape) - 2) if attrs["mode"] == "linear" else 0


@register
class ResizeGrad(Op):
    name = "resize_grad"
    inputs = ("gy",)

    def normalize(self, attrs, types):
        try:
            shape = tuple(int(s) for s in attrs["input_shape"])
        except (TypeError, ValueError):
            raise RuleError(f"input_shape must be a tuple of ints, got {attrs['input_shape']!r}") from None
        x = TensorType(shape, types[0].dtype)
        return dict(_normalize(_canonical_keys(attrs), x), input_shape=shape)

    def infer(self, attrs, types):
        gy = types[0]
        float_dtype(gy)
        shape = attrs["input_shape"]
        want = shape[:2] + attrs["size"]
        if gy.shape != want:
            raise RuleError(f"output gradient has shape {gy.shape}, the resize's output is {want}")
        return TensorType(shape, gy.dtype)

    def reference(self, attrs, gy):
        rows = []
        for t in _tables(attrs, attrs["input_shape"][2:]):
            first, outs, weights = axis_adjoint(*t)
            rows.append([list(zip(outs[a:b], weights[a:b])) for a, b in zip(first, first[1:])])
        return _gather(gy.astype(np.float64), rows).astype(gy.dtype)

    def grad(self, attrs, xs, y, gy, needs):
        return [gy.graph.add("resize", [gy], _canonical_keys(attrs))]     # the adjoint's adjoint

    def context(self, attrs, types, out):
        axes = []
        for letter, t in zip(AXIS_LETTERS[len(out.shape) - 2], _tables(attrs, out.shape[2:])):
            first, outs, weights = axis_adjoint(*t)
            axes.append(dict(l=letter, U=letter.upper(), i=t[0], o=t[1], nnz=len(outs), first=_lines(first),
                             outs=_lines(outs), w=_lines(weights)))
        nc = out.shape[0] * out.shape[1]
        return dict(NC=nc, axes=axes, weighted=attrs["mode"] == "linear", par=_par(axes, "i", nc))

    def macs(self, attrs, types, out):
        if attrs["mode"] != "linear":
            return 0
        nnz = [len(axis_adjoint(*t)[1]) for t in _tables(attrs, out.shape[2:])]
        return out.shape[0] * out.shape[1] * shapes.prod(nnz)

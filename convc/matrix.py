"""``cc.conv_matrix``: the explicit matrix C of a (small) convolution, so
that conv(V) = C @ vec(V) and the transposed convolution is C.T @ vec(G)."""
from __future__ import annotations

import itertools

import numpy as np

from . import shapes
from .errors import RuleError, ValidationError
from .ops.registry import flag
from .schedule import refuse_over_cap


def conv_matrix(input_shape, w, stride=1, padding=0, dilation=1, groups=1, flip=False) -> np.ndarray:
    """Dense matrix of ``conv`` for one image of ``input_shape`` (C_in,
    *spatial) (a leading batch of 1 is allowed); ``w`` is a numpy kernel
    (C_out, C_in/groups, *k). Rows are the flattened output (C_out, *out),
    columns the flattened input. Most entries are zero: each row holds one
    receptive field's weights.

    >>> C = cc.conv_matrix((1, 4, 4), np.ones((1, 1, 3, 3)))   # doctest: +SKIP
    >>> C.shape                                                 # doctest: +SKIP
    (4, 16)
    """
    w, shape = _check_args(input_shape, w)
    c_in, *sizes = shape
    c_out, c_in_g, *kernel = w.shape
    rank = len(sizes)
    if not shapes.is_int(groups) or groups < 1 or c_in % groups or c_out % groups or c_in_g * groups != c_in:
        raise ValidationError(f"conv_matrix: channels {c_in} -> {c_out} do not split into {groups!r} groups "
                              f"with kernel {w.shape}")
    try:
        flip = flag(flip, "flip")
        stride = shapes.positive(shapes.per_axis(stride, rank, "stride"), "stride")
        dilation = shapes.positive(shapes.per_axis(dilation, rank, "dilation"), "dilation")
        pads = shapes.normalize_padding(padding, sizes, kernel, stride, dilation)
        out = shapes.window_out_sizes(sizes, kernel, stride, dilation, pads)
    except RuleError as e:
        raise ValidationError(f"conv_matrix: input {shape}, kernel {w.shape}: {e}") from None
    rows, cols = c_out * shapes.prod(out), c_in * shapes.prod(sizes)
    refuse_over_cap(f"conv_matrix of input {shape} and kernel {w.shape}",
                    [(f"the dense {rows} x {cols} matrix", rows * cols * w.dtype.itemsize)])
    if flip:
        w = w[(slice(None), slice(None)) + (slice(None, None, -1),) * rank]
    C = np.zeros((rows, cols), dtype=w.dtype)
    for co in range(c_out):
        g = co // (c_out // groups)
        for o in itertools.product(*[range(n) for n in out]):
            row = np.ravel_multi_index((co, *o), (c_out, *out))
            for ci in range(c_in_g):
                for k in itertools.product(*[range(n) for n in kernel]):
                    i = [oo * s - p[0] + kk * d for oo, s, p, kk, d in zip(o, stride, pads, k, dilation)]
                    if all(0 <= ii < n for ii, n in zip(i, sizes)):
                        col = np.ravel_multi_index((g * c_in_g + ci, *i), (c_in, *sizes))
                        C[row, col] += w[(co, ci) + k]
    return C


def _check_args(input_shape, w) -> tuple[np.ndarray, tuple[int, ...]]:
    """The kernel as a real-valued array of rank 3 to 5 and the image shape
    (C_in, *spatial) as ints (a leading batch of 1 dropped), or a
    ValidationError that says which argument is wrong (swapped arguments: an
    array where the shape goes)."""
    usage = "conv_matrix(input_shape, w): input_shape is a tuple of ints (C_in, *spatial), w a numpy kernel"
    try:
        dims = tuple(input_shape)
    except TypeError:
        dims = None
    if dims is None or isinstance(input_shape, str) or not all(shapes.is_int(s) and s >= 1 for s in dims):
        raise ValidationError(f"{usage}; input_shape {_show(input_shape)} is not a tuple of ints >= 1"
                              + (" (are the arguments swapped?)" if np.ndim(input_shape) > 1 else ""))
    try:
        w = np.asarray(w)
    except (ValueError, TypeError) as e:
        raise ValidationError(f"{usage}; w is not an array ({e})") from None
    if w.dtype.kind not in "iuf" or not 3 <= w.ndim <= 5:
        raise ValidationError(f"{usage}; w {_show(w)} is not a real-valued kernel (C_out, C_in/groups, *k) "
                              f"with 1 to 3 spatial axes")
    shape = tuple(int(s) for s in dims)
    if len(shape) == w.ndim:
        if shape[0] != 1:
            raise ValidationError(f"conv_matrix: one image only, got batch {shape[0]}")
        shape = shape[1:]
    if len(shape) != w.ndim - 1:
        raise ValidationError(f"conv_matrix: input shape {input_shape} does not fit kernel {w.shape}")
    return w, shape


def _show(v) -> str:
    if isinstance(v, np.ndarray):
        return f"(an array of shape {v.shape}, dtype {v.dtype})"
    text = repr(v)
    return text if len(text) < 80 else text[:77] + "..."

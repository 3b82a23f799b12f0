"""``cc.conv_matrix``: the explicit matrix C of a (small) convolution, so
that conv(V) = C @ vec(V) and the transposed convolution is C.T @ vec(G)."""
from __future__ import annotations

import itertools

import numpy as np

from . import shapes
from .errors import ValidationError


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
    w = np.asarray(w)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == w.ndim:
        if shape[0] != 1:
            raise ValidationError(f"conv_matrix: one image only, got batch {shape[0]}")
        shape = shape[1:]
    if len(shape) != w.ndim - 1 or not 1 <= len(shape) - 1 <= 3:
        raise ValidationError(f"conv_matrix: input shape {input_shape} does not fit kernel {w.shape}")
    c_in, *sizes = shape
    c_out, c_in_g, *kernel = w.shape
    rank = len(sizes)
    if groups < 1 or c_in % groups or c_out % groups or c_in_g * groups != c_in:
        raise ValidationError(f"conv_matrix: channels {c_in} -> {c_out} do not split into {groups} groups "
                              f"with kernel {w.shape}")
    stride = shapes.per_axis(stride, rank, "stride")
    dilation = shapes.per_axis(dilation, rank, "dilation")
    pads = shapes.normalize_padding(padding, sizes, kernel, stride, dilation)
    out = shapes.window_out_sizes(sizes, kernel, stride, dilation, pads)
    if flip:
        w = w[(slice(None), slice(None)) + (slice(None, None, -1),) * rank]
    C = np.zeros((c_out * shapes.prod(out), c_in * shapes.prod(sizes)), dtype=w.dtype)
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

"""Shared pieces of the sliding-window ops (conv and pools): the per-axis
template context and the numpy window iterator used by the references."""
from __future__ import annotations

import itertools

import numpy as np

AXIS_LETTERS = {1: "x", 2: "yx", 3: "zyx"}


def axes_context(in_sizes, out_sizes, kernel, stride, dilation, pads):
    """One dict per spatial axis, named by letter (z, y, x) for the templates."""
    letters = AXIS_LETTERS[len(in_sizes)]
    return [dict(l=l, U=l.upper(), i=i, o=o, k=k, s=s, d=d, p=p[0])
            for l, i, o, k, s, d, p in zip(letters, in_sizes, out_sizes, kernel, stride, dilation, pads)]


def padded(x: np.ndarray, pads, value=0.0) -> np.ndarray:
    return np.pad(x, [(0, 0), (0, 0)] + [tuple(p) for p in pads], constant_values=value)


def windows(xp: np.ndarray, kernel, stride, dilation, out_sizes):
    """Yield (kernel offset, view of xp) for every kernel offset: the view holds,
    for every output position, the input element that offset touches."""
    for offs in itertools.product(*[range(k) for k in kernel]):
        sl = tuple(slice(m * d, m * d + s * (o - 1) + 1, s)
                   for m, d, s, o in zip(offs, dilation, stride, out_sizes))
        yield offs, xp[(slice(None), slice(None)) + sl]

"""Convolutions whose kernel changes with the output position:

* ``local_conv`` -- unshared convolution (Eq 3), one kernel per output
  position: ``Z[i,j,k] = Σ V[l, j·s + m·d, k·s + n·d] · W[i,j,k,l,m,n]``;
  weights (C_out, *out_spatial, C_in, *k).
* ``tiled_conv`` -- tiled convolution (Eq 4), a tile of t kernels cycled
  over the output: ``Z[i,j,k] = Σ V[l, j·s + m·d, k·s + n·d] · K[i,l,m,n, j mod t, k mod t]``;
  weights (C_out, C_in, *k, *t).
"""
from __future__ import annotations

import numpy as np

from .. import shapes
from ..errors import RuleError
from ..ir import TensorType, Value
from .conv import conv_geometry
from .registry import Op, as_value, float_dtype, register, same_dtype
from .window import axes_context, padded, windows


def local_conv(x: Value, w, bias=None, stride=1, padding=0, dilation=1, name=None) -> Value:
    """Unshared convolution (Eq 3); w is (C_out, *out_spatial, C_in, *k);
    bias is tied (C_out,) or untied (C_out, *out_spatial)."""
    w = as_value(x, w, "local_conv weight")
    ins = [x, w] + ([as_value(x, bias, "local_conv bias")] if bias is not None else [])
    return x.graph.add("local_conv", ins, dict(stride=stride, padding=padding, dilation=dilation), name)


def tiled_conv(x: Value, w, bias=None, stride=1, padding=0, dilation=1, name=None) -> Value:
    """Tiled convolution (Eq 4); w is (C_out, C_in, *k, *t): output position
    o uses kernel o mod t. t = 1 is ``conv``; t = output size is ``local_conv``."""
    w = as_value(x, w, "tiled_conv weight")
    ins = [x, w] + ([as_value(x, bias, "tiled_conv bias")] if bias is not None else [])
    return x.graph.add("tiled_conv", ins, dict(stride=stride, padding=padding, dilation=dilation), name)


def local_reference(x, w, b, stride, pads, dilation):
    """Eq 3 over windows: for each kernel offset, multiply the window view by
    that offset's per-position weights and sum over input channels."""
    rank = x.ndim - 2
    c_out, out_sizes = w.shape[0], w.shape[1:1 + rank]
    kernel = w.shape[2 + rank:]
    sp = "xyz"[:rank]
    y = np.zeros((x.shape[0], c_out) + tuple(out_sizes), dtype=x.dtype)
    for offs, view in windows(padded(x, pads), kernel, stride, dilation, out_sizes):
        y += np.einsum(f"nc{sp},o{sp}c->no{sp}", view, w[(Ellipsis,) + offs])
    if b is not None:
        y = y + (b.reshape(c_out, *([1] * rank)) if b.ndim == 1 else b)
    return y


class _Unshared(Op):
    arity = (2, 3)
    inputs = ("x", "w", "b")
    template = "conv"

    def kernel_and_check(self, x: TensorType, w: TensorType, out_spatial) -> tuple[int, ...]:
        raise NotImplementedError

    def _geometry(self, attrs, types):
        x, w = types[:2]
        if not 3 <= len(x.shape) <= 5:
            raise RuleError(f"input must be (N, C, *spatial) with 1 to 3 spatial axes, got rank {len(x.shape)}")
        rank = len(x.shape) - 2
        if len(w.shape) != 2 + 2 * rank:
            raise RuleError(f"weight must have rank {2 + 2 * rank} ({self.layout}), got {w.shape}")
        kernel = self.kernel_of(w, rank)
        attrs, out = conv_geometry(dict(attrs, groups=1), x, TensorType((w.shape[0], x.shape[1]) + kernel, x.dtype))
        self.check_weight(x, w, out[2:], rank)
        return {k: attrs[k] for k in ("stride", "padding", "dilation")}, out

    def normalize(self, attrs, types):
        return self._geometry(attrs, types)[0]

    def infer(self, attrs, types):
        dtype = same_dtype(types)
        float_dtype(types[0])
        _, out = self._geometry(attrs, types)
        if len(types) == 3 and types[2].shape not in ((out[1],), out[1:]):
            raise RuleError(f"bias must be ({out[1]},) (tied) or {out[1:]} (untied), got {types[2].shape}")
        return TensorType(out, dtype)

    def context(self, attrs, types, out):
        x, w = types[:2]
        rank = len(x.shape) - 2
        bias = "none" if len(types) == 2 else ("tied" if len(types[2].shape) == 1 else "untied")
        axes = axes_context(x.shape[2:], out.shape[2:], self.kernel_of(w, rank), attrs["stride"],
                            attrs["dilation"], attrs["padding"])
        for a, t in zip(axes, w.shape[2 + rank:] if self.name == "tiled_conv" else [1] * rank):
            a["t"] = t
        return dict(weights="local" if self.name == "local_conv" else "tiled", flip=False, bias=bias,
                    N=x.shape[0], C_IN=x.shape[1], C_OUT=w.shape[0], GROUPS=1, C_IN_G=x.shape[1],
                    C_OUT_G=w.shape[0], axes=axes)

    def macs(self, attrs, types, out):
        return shapes.prod(out.shape) * types[0].shape[1] * shapes.prod(self.kernel_of(types[1], len(out.shape) - 2))


@register
class LocalConv(_Unshared):
    name = "local_conv"
    layout = "C_out, *out_spatial, C_in, *k"

    def kernel_of(self, w, rank):
        return tuple(w.shape[2 + rank:])

    def check_weight(self, x, w, out_spatial, rank):
        if tuple(w.shape[1:1 + rank]) != tuple(out_spatial) or w.shape[1 + rank] != x.shape[1]:
            raise RuleError(f"weight must be (C_out, *out_spatial, C_in, *k) = ({w.shape[0]}, "
                            f"{', '.join(map(str, out_spatial))}, {x.shape[1]}, ...), got {w.shape}")

    def reference(self, attrs, x, w, b=None):
        return local_reference(x, w, b, attrs["stride"], attrs["padding"], attrs["dilation"])


@register
class TiledConv(_Unshared):
    name = "tiled_conv"
    layout = "C_out, C_in, *k, *t"

    def kernel_of(self, w, rank):
        return tuple(w.shape[2:2 + rank])

    def check_weight(self, x, w, out_spatial, rank):
        if w.shape[1] != x.shape[1]:
            raise RuleError(f"weight dim 1 ({w.shape[1]}) must equal input channels {x.shape[1]} "
                            f"(layout C_out, C_in, *k, *t)")

    def reference(self, attrs, x, w, b=None):
        # Expand the tile into one kernel per output position (Eq 4 -> Eq 3).
        rank = x.ndim - 2
        out = self.infer(attrs, [TensorType(x.shape, str(x.dtype)), TensorType(w.shape, str(w.dtype))]).shape[2:]
        tile = w.shape[2 + rank:]
        idx = np.ix_(*[np.arange(o) % t for o, t in zip(out, tile)])
        local = np.moveaxis(w, list(range(2 + rank, 2 + 2 * rank)), list(range(rank)))[idx]
        # local: (*out, C_out, C_in, *k) -> (C_out, *out, C_in, *k)
        local = np.moveaxis(local, rank, 0)
        return local_reference(x, local, b, attrs["stride"], attrs["padding"], attrs["dilation"])

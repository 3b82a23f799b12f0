"""Convolutions whose kernel changes with the output position:

* ``local_conv`` -- unshared convolution (Eq 3), one kernel per output
  position: ``Z[i,j,k] = Σ V[l, j·s + m·d, k·s + n·d] · W[i,j,k,l,m,n]``;
  weights (C_out, *out_spatial, C_in, *k).
* ``tiled_conv`` -- tiled convolution (Eq 4), a tile of t kernels cycled
  over the output: ``Z[i,j,k] = Σ V[l, j·s + m·d, k·s + n·d] · K[i,l,m,n, j mod t, k mod t]``;
  weights (C_out, C_in, *k, *t).
"""
from __future__ import annotations

import abc

import numpy as np

from .. import shapes
from ..errors import RuleError
from ..ir import TensorType, Value
from .conv import conv_geometry
from .registry import Op, as_value, builder, float_dtype, register, same_dtype
from .window import axes_context, padded, windows


@builder("x")
def local_conv(x: Value, w, bias=None, stride=1, padding=0, dilation=1, name=None) -> Value:
    """Unshared convolution (Eq 3); w is (C_out, *out_spatial, C_in, *k);
    bias is tied (C_out,) or untied (C_out, *out_spatial)."""
    w = as_value(x, w, "local_conv weight")
    ins = [x, w] + ([as_value(x, bias, "local_conv bias")] if bias is not None else [])
    return x.graph.add("local_conv", ins, dict(stride=stride, padding=padding, dilation=dilation), name)


@builder("x")
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

    layout = ""      # subclasses: the weight layout, kernel_of() and check_weight()

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

    def grad(self, attrs, xs, y, gy, needs):
        from .conv import bias_grad
        x, w = xs[:2]
        mode = "local" if self.name == "local_conv" else "tiled"
        return [unshared_grad_input(w, gy, x.shape[2:], mode, **attrs) if needs[0] else None,
                unshared_grad_kernel(gy, x, w.shape, mode, **attrs) if needs[1] else None,
                *([bias_grad(gy, xs[2])] if len(xs) == 3 else [])][:len(xs)]

    def context(self, attrs, types, out):
        x, w = types[:2]
        rank = len(x.shape) - 2
        bias = "none" if len(types) == 2 else ("tied" if len(types[2].shape) == 1 else "untied")
        axes = axes_context(x.shape[2:], out.shape[2:], self.kernel_of(w, rank), attrs["stride"],
                            attrs["dilation"], attrs["padding"])
        for a, t in zip(axes, w.shape[2 + rank:] if self.name == "tiled_conv" else [1] * rank):
            a["t"] = t
        return dict(weights="local" if self.name == "local_conv" else "tiled", flip=False, bias=bias,
                    par=[("n", "N", x.shape[0]), ("co", "C_OUT", w.shape[0])], N=x.shape[0], C_IN=x.shape[1], C_OUT=w.shape[0], GROUPS=1, C_IN_G=x.shape[1],
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
        if min(w.shape[2 + rank:]) < 1:
            raise RuleError(f"tile sizes {w.shape[2 + rank:]} must be >= 1 (weight {w.shape})")
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


# -- gradients of the unshared family --------------------------------------------
def unshared_grad_input(w: Value, gy: Value, input_size, mode: str, stride=1, padding=0, dilation=1,
                        name=None) -> Value:
    """dL/dx of ``local_conv`` (mode "local") or ``tiled_conv`` ("tiled")."""
    attrs = dict(input_size=tuple(input_size), mode=mode, stride=stride, padding=padding, dilation=dilation)
    return gy.graph.add("unshared_grad_input", [w, gy], attrs, name)


def unshared_grad_kernel(gy: Value, x: Value, weight_shape, mode: str, stride=1, padding=0, dilation=1,
                         name=None) -> Value:
    """dL/dw of ``local_conv`` / ``tiled_conv`` (summed over the batch)."""
    attrs = dict(weight_shape=tuple(weight_shape), mode=mode, stride=stride, padding=padding, dilation=dilation)
    return gy.graph.add("unshared_grad_kernel", [gy, x], attrs, name)


def _forward_op(mode):
    if mode not in ("local", "tiled"):
        raise RuleError(f"mode must be 'local' or 'tiled', got {mode!r}")
    return LocalConv() if mode == "local" else TiledConv()


def _local_weights(mode, w, out_sizes):
    """Per-position weights (C_out, *out, C_in, *k) of either kind."""
    if mode == "local":
        return w
    rank = len(out_sizes)
    idx = np.ix_(*[np.arange(o) % t for o, t in zip(out_sizes, w.shape[2 + rank:])])
    return np.moveaxis(np.moveaxis(w, list(range(2 + rank, 2 + 2 * rank)), list(range(rank)))[idx], rank, 0)


class _UnsharedGrad(Op):
    arity = (2, 2)
    template = "unshared_grad"

    @abc.abstractmethod
    def forward(self, attrs, types) -> tuple[TensorType, TensorType, TensorType]:
        """(x, w, gy) types of the forward op; checks gy against its output."""

    def normalize(self, attrs, types):
        fwd = _forward_op(attrs["mode"])
        x, w, gy = self.forward(attrs, types)
        conv_attrs = fwd.normalize(dict(stride=attrs["stride"], padding=attrs["padding"],
                                        dilation=attrs["dilation"]), [x, w])
        out = fwd.infer(conv_attrs, [x, w]).shape
        if out != gy.shape:
            raise RuleError(f"output gradient has shape {gy.shape}, but the forward {fwd.name} gives {out}")
        return dict(attrs, **conv_attrs)

    def context(self, attrs, types, out):
        x, w, gy = self.forward(attrs, types)
        ctx = _forward_op(attrs["mode"]).context(attrs, [x, w], gy)
        par = ([("n", "N", ctx["N"]), ("ci", "C_IN", ctx["C_IN"])] if self.role == "input"
               else [("co", "C_OUT", ctx["C_OUT"]), ("ci", "C_IN", ctx["C_IN"])])
        return dict(ctx, role=self.role, par=par)


@register
class UnsharedGradInput(_UnsharedGrad):
    name = "unshared_grad_input"
    inputs = ("w", "gy")
    role = "input"

    def forward(self, attrs, types):
        w, gy = types
        x = TensorType((gy.shape[0], w.shape[1] if attrs["mode"] == "tiled" else w.shape[1 + (len(w.shape) - 2) // 2])
                       + tuple(attrs["input_size"])[-(len(gy.shape) - 2):], gy.dtype)
        return x, w, gy

    def infer(self, attrs, types):
        same_dtype(types)
        return self.forward(attrs, types)[0]

    def reference(self, attrs, w, gy):
        x, _, _ = self.forward(attrs, [TensorType(w.shape, str(w.dtype)), TensorType(gy.shape, str(gy.dtype))])
        rank = len(gy.shape) - 2
        kernel = w.shape[2:2 + rank] if attrs["mode"] == "tiled" else w.shape[2 + rank:]
        wl = _local_weights(attrs["mode"], w, gy.shape[2:])
        sp = "xyz"[:rank]
        dxp = padded(np.zeros(x.shape, gy.dtype), attrs["padding"])
        for offs, view in windows(dxp, kernel, attrs["stride"], attrs["dilation"], gy.shape[2:]):
            view += np.einsum(f"no{sp},o{sp}c->nc{sp}", gy, wl[(Ellipsis,) + offs])
        crop = tuple(slice(lo, lo + n) for (lo, _), n in zip(attrs["padding"], x.shape[2:]))
        return dxp[(slice(None), slice(None)) + crop]


@register
class UnsharedGradKernel(_UnsharedGrad):
    name = "unshared_grad_kernel"
    inputs = ("gy", "x")
    role = "kernel"

    def forward(self, attrs, types):
        gy, x = types
        return x, TensorType(tuple(attrs["weight_shape"]), gy.dtype), gy

    def infer(self, attrs, types):
        same_dtype(types)
        return self.forward(attrs, types)[1]

    def reference(self, attrs, gy, x):
        rank = x.ndim - 2
        wshape = tuple(attrs["weight_shape"])
        kernel = wshape[2:2 + rank] if attrs["mode"] == "tiled" else wshape[2 + rank:]
        sp = "xyz"[:rank]
        out = gy.shape[2:]
        dl = np.zeros((gy.shape[1],) + out + (x.shape[1],) + tuple(kernel), x.dtype)
        for offs, view in windows(padded(x, attrs["padding"]), kernel, attrs["stride"], attrs["dilation"], out):
            dl[(Ellipsis,) + offs] = np.einsum(f"no{sp},nc{sp}->o{sp}c", gy, view)
        if attrs["mode"] == "local":
            return dl
        # fold per-position gradients onto the tile: position o -> tile o mod t
        dk = np.zeros(wshape, x.dtype)
        tile = wshape[2 + rank:]
        for pos in np.ndindex(*out):
            t = tuple(p % tt for p, tt in zip(pos, tile))
            dk[(Ellipsis,) + t] += dl[(slice(None),) + pos]
        return dk

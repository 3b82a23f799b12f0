"""The gradient family of convolution, as ops a user can call:

* ``conv_transpose`` -- the book's ``h``: the transpose of ``conv``'s linear
  map, with PyTorch's parameters and ``output_size`` to pick among the input
  sizes that a strided conv maps to the same output size;
* ``conv_grad_input`` -- Eq 6, ``h(K, G, s)``: the input gradient of ``conv``;
* ``conv_grad_kernel`` -- Eq 5, ``g(G, V, s)``: the kernel gradient of ``conv``
  (summed over the batch).
"""
from __future__ import annotations

import numpy as np

from .. import shapes
from ..errors import RuleError
from ..ir import TensorType, Value
from .conv import conv_geometry
from .registry import Op, as_value, builder, flag, float_dtype, register, same_dtype
from .window import axes_context, padded, windows


@builder("x")
def conv_transpose(x: Value, w, bias=None, stride=1, padding=0, output_padding=0, dilation=1, groups=1,
                   output_size=None, name=None) -> Value:
    """Transposed convolution: x (N, C_in, *n), w (C_in, C_out/groups, *k).

    Output size per axis: (n-1)*s - p_lo - p_hi + d*(k-1) + output_padding + 1.
    ``output_size`` (spatial sizes, or a full shape) picks ``output_padding``;
    sizes no ``output_padding`` in [0, max(s, d)) reaches are rejected.
    """
    w = as_value(x, w, "conv_transpose weight")
    ins = [x, w] + ([as_value(x, bias, "conv_transpose bias")] if bias is not None else [])
    attrs = dict(stride=stride, padding=padding, output_padding=output_padding, dilation=dilation,
                 groups=groups, output_size=output_size)
    return x.graph.add("conv_transpose", ins, attrs, name)


@builder("grad")
def conv_grad_input(k: Value, grad: Value, input_size, stride=1, padding=0, dilation=1, groups=1, flip=False,
                    name=None) -> Value:
    """Eq 6, h(K, G, s): gradient of ``conv(V, K, ...)`` w.r.t. V, given the
    output gradient ``grad`` (G). ``input_size``: V's spatial sizes or shape.
    ``flip`` matches a ``conv(..., flip=True)``."""
    attrs = dict(input_size=input_size, stride=stride, padding=padding, dilation=dilation, groups=groups,
                 flip=flip)
    return grad.graph.add("conv_grad_input", [as_value(grad, k, "kernel"), grad], attrs, name)


@builder("grad")
def conv_grad_kernel(grad: Value, v: Value, kernel_size, stride=1, padding=0, dilation=1, groups=1, flip=False,
                     name=None) -> Value:
    """Eq 5, g(G, V, s): gradient of ``conv(V, K, ...)`` w.r.t. K, given the
    output gradient ``grad`` (G) and the conv's input ``v``; summed over N.
    ``flip`` matches a ``conv(..., flip=True)``."""
    attrs = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation, groups=groups,
                 flip=flip)
    return grad.graph.add("conv_grad_kernel", [grad, v], attrs, name)


def _int_groups(groups):
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise RuleError(f"groups must be an int >= 1, got {groups!r}")
    return int(groups)


def transpose_reference(x, w, stride, pads, dilation, groups, out_sizes, bias=None):
    """Scatter form of the transposed conv: every input element adds
    x * w[kernel offset] at output position i*s - p_lo + m*d."""
    n, c_in, *in_sizes = x.shape
    _, c_out_g, *kernel = w.shape
    full = [max((i - 1) * s + d * (k - 1) + 1, lo + o)
            for i, s, d, k, (lo, _), o in zip(in_sizes, stride, dilation, kernel, pads, out_sizes)]
    y = np.zeros((n, groups, c_out_g, *full), dtype=x.dtype)
    xg = x.reshape(n, groups, c_in // groups, *in_sizes)
    wg = w.reshape(groups, c_in // groups, c_out_g, *kernel)
    for offs in np.ndindex(*kernel):
        sl = tuple(slice(m * d, m * d + s * (i - 1) + 1, s) for m, d, s, i in zip(offs, dilation, stride, in_sizes))
        y[(slice(None),) * 3 + sl] += np.einsum("ngc...,gco->ngo...", xg, wg[(Ellipsis,) + offs])
    y = y.reshape(n, groups * c_out_g, *full)
    crop = tuple(slice(lo, lo + o) for (lo, _), o in zip(pads, out_sizes))
    y = y[(slice(None), slice(None)) + crop]
    if bias is not None:
        y = y + (bias.reshape(-1, *([1] * len(out_sizes))) if bias.ndim == 1 else bias)
    return y


def _output_size(value, rank):
    """An int, ``rank`` spatial sizes, or a full shape of ``rank + 2`` entries."""
    if shapes.is_int(value):
        return (int(value),) * rank
    try:
        items = list(value)
    except TypeError:
        items = None
    if items is None or len(items) not in (rank, rank + 2) or not all(shapes.is_int(v) for v in items):
        raise RuleError(f"output_size must be an int, {rank} spatial sizes or a full shape of {rank + 2}, "
                        f"got {value!r}")
    return tuple(int(v) for v in items[-rank:])


def _transpose_context(x, w, out_shape, stride, dilation, pads, groups, bias):
    return dict(N=x.shape[0], C_IN=x.shape[1], C_OUT=out_shape[1], GROUPS=groups,
                C_IN_G=x.shape[1] // groups, C_OUT_G=out_shape[1] // groups, bias=bias,
                axes=axes_context(x.shape[2:], out_shape[2:], w.shape[2:], stride, dilation, pads))


@register
class ConvTranspose(Op):
    name = "conv_transpose"
    arity = (2, 3)
    inputs = ("x", "w", "b")
    template = "conv_transpose"

    def normalize(self, attrs, types):
        x, w = types[:2]
        if not 3 <= len(x.shape) <= 5:
            raise RuleError(f"input must be (N, C, *spatial) with 1 to 3 spatial axes, got rank {len(x.shape)}")
        rank = len(x.shape) - 2
        if len(w.shape) != len(x.shape):
            raise RuleError(f"weight must have rank {len(x.shape)} (C_in, C_out/groups, *k), got {w.shape}")
        groups = _int_groups(attrs["groups"])
        if x.shape[1] % groups:
            raise RuleError(f"input channels {x.shape[1]} are not divisible by groups={groups}")
        if w.shape[0] != x.shape[1]:
            raise RuleError(f"weight dim 0 ({w.shape[0]}) must equal input channels {x.shape[1]} "
                            f"(weight layout is (C_in, C_out/groups, *k))")
        stride = shapes.positive(shapes.per_axis(attrs["stride"], rank, "stride"), "stride")
        dilation = shapes.positive(shapes.per_axis(attrs["dilation"], rank, "dilation"), "dilation")
        padding = attrs["padding"]
        if isinstance(padding, str) and padding.lower() != "valid":
            raise RuleError(f"conv_transpose takes an int, a tuple, (lo, hi) pairs or 'valid' as padding, "
                            f"got {padding!r}")
        kernel = w.shape[2:]
        if min(w.shape) < 1:
            raise RuleError(f"weight {w.shape} has an empty dimension; kernel sizes and channels must be >= 1")
        pads = shapes.normalize_padding(padding, x.shape[2:], kernel, stride, dilation)
        opad = shapes.per_axis(attrs["output_padding"], rank, "output_padding")
        base = [(n - 1) * s - lo - hi + d * (k - 1) + 1
                for n, s, (lo, hi), d, k in zip(x.shape[2:], stride, pads, dilation, kernel)]
        if attrs.get("output_size") is not None:
            size = _output_size(attrs["output_size"], rank)
            want = tuple(sz - b for sz, b in zip(size, base))
            for ax, (sz, b, s, d) in enumerate(zip(size, base, stride, dilation)):
                if not 0 <= sz - b < max(s, d):
                    reach = list(range(b, b + max(s, d)))
                    raise RuleError(f"output_size {size} is unreachable on axis {ax}: with this input, stride, "
                                    f"padding and dilation the reachable sizes are {reach}")
            if any(opad) and opad != want:
                raise RuleError(f"output_padding {opad} contradicts output_size {size} (needs {want})")
            opad = want
        for ax, (op, s, d) in enumerate(zip(opad, stride, dilation)):
            if not 0 <= op < max(s, d):
                raise RuleError(f"output_padding {opad} must be >= 0 and smaller than stride or dilation "
                                f"on every axis (axis {ax}: stride {s}, dilation {d})")
        if any(b + op < 1 for b, op in zip(base, opad)):
            raise RuleError(f"output size {tuple(b + op for b, op in zip(base, opad))} must be >= 1 "
                            f"(padding {pads} is too large)")
        return dict(stride=stride, padding=pads, output_padding=tuple(opad), dilation=dilation, groups=groups)

    def _out(self, attrs, x, w):
        return tuple((n - 1) * s - lo - hi + d * (k - 1) + 1 + op for n, s, (lo, hi), d, k, op in
                     zip(x.shape[2:], attrs["stride"], attrs["padding"], attrs["dilation"], w.shape[2:],
                         attrs["output_padding"]))

    def infer(self, attrs, types):
        x, w = types[:2]
        dtype = same_dtype(types)
        float_dtype(x)
        out = (x.shape[0], w.shape[1] * attrs["groups"]) + self._out(attrs, x, w)
        if len(types) == 3 and types[2].shape not in ((out[1],), out[1:]):
            raise RuleError(f"bias must be ({out[1]},) (tied) or {out[1:]} (untied), got {types[2].shape}")
        return TensorType(out, dtype)

    def grad(self, attrs, xs, y, gy, needs):
        from ..errors import GraphError
        from .conv import bias_grad, conv
        x, w = xs[:2]
        if any(op >= s for op, s in zip(attrs["output_padding"], attrs["stride"])):
            raise GraphError(f"node %{y.name}: the gradient of conv_transpose needs output_padding < stride "
                             f"on every axis, got output_padding {attrs['output_padding']}, stride {attrs['stride']}")
        geo = dict(stride=attrs["stride"], padding=attrs["padding"], dilation=attrs["dilation"],
                   groups=attrs["groups"])
        return [conv(gy, w, **geo) if needs[0] else None,                                   # c(K, E, s)
                conv_grad_kernel(x, gy, w.shape[2:], **geo) if needs[1] else None,          # g(H, E, s)
                *([bias_grad(gy, xs[2])] if len(xs) == 3 else [])][:len(xs)]

    def reference(self, attrs, x, w, b=None):
        out = self._out(attrs, TensorType(x.shape, str(x.dtype)), TensorType(w.shape, str(w.dtype)))
        return transpose_reference(x, w, attrs["stride"], attrs["padding"], attrs["dilation"], attrs["groups"],
                                   out, b)

    def context(self, attrs, types, out):
        bias = "none" if len(types) == 2 else ("tied" if len(types[2].shape) == 1 else "untied")
        return dict(_transpose_context(types[0], types[1], out.shape, attrs["stride"], attrs["dilation"],
                                       attrs["padding"], attrs["groups"], bias), flip=False,
                    par=[("n", "N", out.shape[0]), ("co", "C_OUT", out.shape[1])])

    def macs(self, attrs, types, out):
        x, w = types[:2]
        return shapes.prod(x.shape) * shapes.prod(w.shape[1:])


def _forward_types(attrs, k: TensorType, grad: TensorType, v_spatial):
    """The conv whose gradient we take: V (N, C_in, *v_spatial), K; checks that
    G has that conv's output shape and returns (attrs, V type)."""
    if len(k.shape) != len(grad.shape) or not 3 <= len(grad.shape) <= 5:
        raise RuleError(f"kernel {k.shape} and output gradient {grad.shape} must both have rank 3 to 5")
    groups = _int_groups(attrs["groups"])
    v = TensorType((grad.shape[0], k.shape[1] * groups) + tuple(v_spatial), grad.dtype)
    conv_attrs, out = conv_geometry(dict(attrs, groups=groups), v, k)
    if tuple(out) != grad.shape:
        raise RuleError(f"output gradient has shape {grad.shape}, but conv of input {v.shape} with kernel "
                        f"{k.shape} gives {tuple(out)}")
    return conv_attrs, v


def _spatial(value, rank, what):
    """``rank`` spatial sizes, or a full shape of ``rank + 2`` entries."""
    try:
        items = list(value)
    except TypeError:
        items = [value] * rank if shapes.is_int(value) else None
    if items is None or len(items) not in (rank, rank + 2) or not all(shapes.is_int(v) and v >= 1 for v in items):
        raise RuleError(f"{what} must give {rank} positive spatial sizes (or a full shape), got {value!r}")
    return tuple(int(v) for v in items[-rank:])


@register
class ConvGradInput(Op):
    name = "conv_grad_input"
    arity = (2, 2)
    inputs = ("w", "x")          # the kernel K, and G, which the loops read as their input
    template = "conv_transpose"

    def normalize(self, attrs, types):
        k, grad = types
        size = _spatial(attrs["input_size"], len(grad.shape) - 2, "input_size")
        conv_attrs, _ = _forward_types(attrs, k, grad, size)
        return dict(input_size=size, stride=conv_attrs["stride"], padding=conv_attrs["padding"],
                    dilation=conv_attrs["dilation"], groups=conv_attrs["groups"],
                    flip=flag(attrs.get("flip"), "flip", none=False))

    def infer(self, attrs, types):
        k, grad = types
        dtype = same_dtype(types)
        float_dtype(grad)
        _, v = _forward_types(attrs, k, grad, attrs["input_size"])
        return TensorType(v.shape, dtype)

    def grad(self, attrs, xs, y, gy, needs):
        # h(K, G) is linear in both: its adjoints are the conv itself (for G)
        # and the kernel gradient g with gy in the role of the conv's input (for K).
        from .conv import conv
        k, g = xs
        geo = dict(stride=attrs["stride"], padding=attrs["padding"], dilation=attrs["dilation"],
                   groups=attrs["groups"], flip=attrs["flip"])
        return [conv_grad_kernel(g, gy, k.shape[2:], **geo) if needs[0] else None,
                conv(gy, k, **geo) if needs[1] else None]

    def reference(self, attrs, k, grad):
        if attrs["flip"]:
            k = k[(slice(None), slice(None)) + (slice(None, None, -1),) * (k.ndim - 2)]
        return transpose_reference(grad, k, attrs["stride"], attrs["padding"], attrs["dilation"],
                                   attrs["groups"], attrs["input_size"])

    def context(self, attrs, types, out):
        k, grad = types
        return dict(_transpose_context(grad, k, out.shape, attrs["stride"], attrs["dilation"], attrs["padding"],
                                       attrs["groups"], "none"), flip=attrs["flip"],
                    par=[("n", "N", out.shape[0]), ("co", "C_OUT", out.shape[1])])

    def macs(self, attrs, types, out):
        k, grad = types
        return shapes.prod(grad.shape) * shapes.prod(k.shape[1:])


@register
class ConvGradKernel(Op):
    name = "conv_grad_kernel"
    arity = (2, 2)
    inputs = ("gy", "x")

    def normalize(self, attrs, types):
        grad, v = types
        rank = len(v.shape) - 2
        ks = shapes.positive(shapes.per_axis(attrs["kernel_size"], rank, "kernel_size"), "kernel_size")
        groups = _int_groups(attrs["groups"])
        if v.shape[1] % groups:
            raise RuleError(f"input channels {v.shape[1]} are not divisible by groups={groups}")
        k = TensorType((grad.shape[1], v.shape[1] // groups) + ks, grad.dtype)
        conv_attrs, _ = _forward_types(dict(attrs, groups=groups), k, grad, v.shape[2:])
        if _forward_types(conv_attrs, k, grad, v.shape[2:])[1].shape != v.shape:
            raise RuleError(f"input {v.shape} does not match output gradient {grad.shape}")
        return dict(kernel_size=ks, stride=conv_attrs["stride"], padding=conv_attrs["padding"],
                    dilation=conv_attrs["dilation"], groups=groups, flip=flag(attrs.get("flip"), "flip", none=False))

    def infer(self, attrs, types):
        grad, v = types
        dtype = same_dtype(types)
        float_dtype(grad)
        return TensorType((grad.shape[1], v.shape[1] // attrs["groups"]) + attrs["kernel_size"], dtype)

    def grad(self, attrs, xs, y, gy, needs):
        # g(G, V) is linear in both: adjoint in G is conv(V, gy), in V it is h(gy, G).
        from .conv import conv
        g, v = xs
        geo = dict(stride=attrs["stride"], padding=attrs["padding"], dilation=attrs["dilation"],
                   groups=attrs["groups"], flip=attrs["flip"])
        return [conv(v, gy, **geo) if needs[0] else None,
                conv_grad_input(gy, g, v.shape[2:], **geo) if needs[1] else None]

    def reference(self, attrs, grad, v):
        g = attrs["groups"]
        n, c_in, *_ = v.shape
        c_out, out_sizes = grad.shape[1], grad.shape[2:]
        kernel = attrs["kernel_size"]
        dk = np.zeros((g, c_out // g, c_in // g) + tuple(kernel), dtype=v.dtype)
        gg = grad.reshape(n, g, c_out // g, *out_sizes)
        for offs, view in windows(padded(v, attrs["padding"]), kernel, attrs["stride"], attrs["dilation"],
                                  out_sizes):
            sp = "xyz"[:len(kernel)]
            dk[(Ellipsis,) + offs] = np.einsum(f"ngc{sp},ngo{sp}->goc", view.reshape(n, g, c_in // g, *out_sizes), gg)
        dk = dk.reshape(c_out, c_in // g, *kernel)
        return dk[(slice(None), slice(None)) + (slice(None, None, -1),) * len(kernel)] if attrs["flip"] else dk

    def context(self, attrs, types, out):
        grad, v = types
        g = attrs["groups"]
        return dict(flip=attrs["flip"], N=v.shape[0], C_IN=v.shape[1], C_OUT=grad.shape[1], C_IN_G=v.shape[1] // g,
                    C_OUT_G=grad.shape[1] // g, par=[("co", "C_OUT", grad.shape[1]), ("ci", "C_IN_G", v.shape[1] // g)],
                    axes=axes_context(v.shape[2:], grad.shape[2:], attrs["kernel_size"], attrs["stride"],
                                      attrs["dilation"], attrs["padding"]))

    def macs(self, attrs, types, out):
        return shapes.prod(types[0].shape) * shapes.prod(out.shape[1:])

"""``im2col`` and its transpose ``col2im``: the data movement that turns a
convolution into a matrix product (and a transposed convolution into a
matrix product followed by col2im).

``im2col(x)[n, c, k..., o...] = x[n, c, o*s - p + k*d]`` (0 outside x);
``col2im(cols)[n, c, i...] = Σ cols[n, c, k..., o...]`` over o*s - p + k*d = i.
"""
from __future__ import annotations

import numpy as np

from .. import shapes
from ..errors import RuleError
from ..ir import TensorType, Value
from . import epilogue
from .registry import Op, flag, register
from .window import axes_context, padded, windows


def im2col(x: Value, kernel_size, stride=1, padding=0, dilation=1, flip=False, name=None) -> Value:
    """Columns of x (N, C, *n) for a kernel: (N, C, *k, *out). ``flip``
    reverses the kernel axes (for a true convolution)."""
    attrs = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation, flip=flip)
    return x.graph.add("im2col", [x], attrs, name)


def col2im(cols: Value, output_size, stride=1, padding=0, dilation=1, name=None) -> Value:
    """The transpose of im2col: cols (N, C, *k, *n) summed into (N, C, *output_size)."""
    attrs = dict(output_size=tuple(output_size), stride=stride, padding=padding, dilation=dilation)
    return cols.graph.add("col2im", [cols], attrs, name)


def _geometry(attrs, sizes, kernel, rank):
    s = shapes.positive(shapes.per_axis(attrs["stride"], rank, "stride"), "stride")
    d = shapes.positive(shapes.per_axis(attrs["dilation"], rank, "dilation"), "dilation")
    pads = shapes.normalize_padding(attrs["padding"], sizes, kernel, s, d)
    return s, d, pads


@register
class Im2col(Op):
    name = "im2col"

    def normalize(self, attrs, types):
        x = types[0]
        if not 3 <= len(x.shape) <= 5:
            raise RuleError(f"input must be (N, C, *spatial) with 1 to 3 spatial axes, got rank {len(x.shape)}")
        rank = len(x.shape) - 2
        k = shapes.positive(shapes.per_axis(attrs["kernel_size"], rank, "kernel_size"), "kernel_size")
        s, d, pads = _geometry(attrs, x.shape[2:], k, rank)
        shapes.window_out_sizes(x.shape[2:], k, s, d, pads)
        return dict(kernel_size=k, stride=s, padding=pads, dilation=d, flip=flag(attrs["flip"], "flip"))

    def infer(self, attrs, types):
        x = types[0]
        out = shapes.window_out_sizes(x.shape[2:], attrs["kernel_size"], attrs["stride"], attrs["dilation"],
                                      attrs["padding"])
        return TensorType(x.shape[:2] + attrs["kernel_size"] + out, x.dtype)

    def reference(self, attrs, x):
        k, rank = attrs["kernel_size"], x.ndim - 2
        out = self.infer(attrs, [TensorType(x.shape, str(x.dtype))]).shape[2 + rank:]
        cols = np.zeros(x.shape[:2] + tuple(k) + tuple(out), x.dtype)
        for offs, view in windows(padded(x, attrs["padding"]), k, attrs["stride"], attrs["dilation"], out):
            at = tuple(kk - 1 - o for kk, o in zip(k, offs)) if attrs["flip"] else offs
            cols[(slice(None), slice(None)) + at] = view
        return cols

    def context(self, attrs, types, out):
        x, rank = types[0], len(types[0].shape) - 2
        return dict(role="im2col", NC=x.shape[0] * x.shape[1], flip=attrs["flip"],
                    par=[("nc", "NC", x.shape[0] * x.shape[1])],
                    axes=axes_context(x.shape[2:], out.shape[2 + rank:], attrs["kernel_size"], attrs["stride"],
                                      attrs["dilation"], attrs["padding"]))

    def grad(self, attrs, xs, y, gy, needs):
        if attrs["flip"]:
            from ..errors import GraphError
            raise GraphError(f"node %{y.name}: no gradient rule for a flipped im2col")
        return [col2im(gy, xs[0].shape[2:], attrs["stride"], attrs["padding"], attrs["dilation"])]


@register
class Col2im(Op):
    """Inputs: the columns, a per-channel bias (C,) when ``bias=True``, the
    epilogue's residual when ``residual=True`` (a transposed conv's bias and
    activation run in its epilogue)."""
    name = "col2im"
    template = "im2col"
    arity = (1, 3)

    inputs = ("x", "bias")

    def normalize(self, attrs, types):
        ep = epilogue.normalize({k: v for k, v in attrs.items() if k not in ("output_size", "stride", "padding",
                                                                             "dilation", "bias")})
        if attrs.get("bias", False) not in (True, False):
            raise RuleError(f"bias must be a bool, got {attrs['bias']!r}")
        c = types[0]
        if len(c.shape) not in (4, 6, 8):
            raise RuleError(f"cols must be (N, C, *k, *n) with 1 to 3 spatial axes, got {c.shape}")
        rank = (len(c.shape) - 2) // 2
        size = tuple(int(v) for v in attrs["output_size"])
        if len(size) != rank or min(size) < 1:
            raise RuleError(f"output_size must give {rank} positive sizes, got {attrs['output_size']!r}")
        k, n = c.shape[2:2 + rank], c.shape[2 + rank:]
        s, d, pads = _geometry(attrs, size, k, rank)
        got = shapes.window_out_sizes(size, k, s, d, pads)
        if tuple(got) != tuple(n):
            raise RuleError(f"cols hold {n} positions, but a {k} kernel over {size} gives {got}")
        return dict(output_size=size, stride=s, padding=pads, dilation=d, **({"bias": True} if attrs.get("bias") else {}),
                    **ep)

    def infer(self, attrs, types):
        c = types[0]
        out = TensorType(c.shape[:2] + attrs["output_size"], c.dtype)
        own = epilogue.check(attrs, types, out)
        if len(own) != 1 + bool(attrs.get("bias")):
            raise RuleError(f"takes the columns{', a bias' if attrs.get('bias') else ''}"
                            f"{' and the residual' if attrs.get('residual') else ''}: {len(types)} inputs given")
        if attrs.get("bias") and (own[1].shape != (c.shape[1],) or own[1].dtype != c.dtype):
            raise RuleError(f"bias must be {c.dtype}[{c.shape[1]}] (one per channel), got {own[1]}")
        return out

    def reference(self, attrs, *xs):
        (cols, *b), r = epilogue.split(attrs, xs)
        y = self.scatter(attrs, cols)
        if b:
            y = y + b[0].reshape((-1,) + (1,) * (y.ndim - 2))
        return epilogue.reference(attrs, y, r)

    @staticmethod
    def scatter(attrs, cols):
        """The sum of every column into place, without bias or epilogue."""
        rank = (cols.ndim - 2) // 2
        k, n = cols.shape[2:2 + rank], cols.shape[2 + rank:]
        size = attrs["output_size"]
        y = padded(np.zeros(cols.shape[:2] + tuple(size), cols.dtype), attrs["padding"])
        # windows may run past the padded end only where nothing is summed
        for offs, view in windows(y, k, attrs["stride"], attrs["dilation"], n):
            view += cols[(slice(None), slice(None)) + offs]
        crop = tuple(slice(lo, lo + m) for (lo, _), m in zip(attrs["padding"], size))
        return y[(slice(None), slice(None)) + crop]

    def context(self, attrs, types, out):
        c, rank = types[0], (len(types[0].shape) - 2) // 2
        return dict(role="col2im", NC=c.shape[0] * c.shape[1], C=c.shape[1], flip=False, bias=bool(attrs.get("bias")),
                    par=[("nc", "NC", c.shape[0] * c.shape[1])],
                    axes=axes_context(attrs["output_size"], c.shape[2 + rank:], c.shape[2:2 + rank],
                                      attrs["stride"], attrs["dilation"], attrs["padding"]))

    def grad(self, attrs, xs, y, gy, needs):
        from .tensor import reduce_sum
        gy, gr = epilogue.grad(self.name, attrs, xs, y, gy)
        own = epilogue.split(attrs, xs)[0]
        rank = len(attrs["output_size"])
        return ([im2col(gy, own[0].shape[2:2 + rank], attrs["stride"], attrs["padding"], attrs["dilation"])]
                + ([reduce_sum(gy, (0,) + tuple(range(2, 2 + rank)))] if attrs.get("bias") else [])
                + ([gr] if gr is not None else []))

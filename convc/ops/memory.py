"""Ops of the memory-saving rewrites (``passes/memory.py``): what a small
arena needs and the other ops do not give.

- ``crop``: a spatial window of a tensor (the input of one tile of a
  patch-based stage, halo included).
- ``paste``: a canvas with a tile written into its window; the first paste
  of a stage starts from zeros, the next ones write over the previous
  canvas (in place when the plan lets them: ``schedule.INPLACE``).
- ``depthwise_inplace``: a 2D depthwise conv (one input channel per output
  channel) whose output may overwrite its input's buffer: output rows wait
  in a small ring (the workspace) until no later row needs the input rows
  under them.
- ``pointwise_inplace``: a 1x1 conv (stride 1, no padding, one group) whose
  output may overwrite its input's buffer: each row of pixels is computed
  for every output channel into the workspace, then written back.

Each computes the same values whether or not its output shares its
input's buffer; whether it does is the memory plan's decision. The
in-place ops run their channels one after another (a later channel's rows
may land on an earlier channel's input), so they do not split over threads.
"""
from __future__ import annotations

import numpy as np

from .. import shapes
from ..errors import RuleError
from ..ir import TensorType, Value
from .conv import Conv
from .registry import Op, register, same_dtype
from .tensor import _Gather, row_major_strides


def _spatial(value, rank: int, what: str) -> tuple[int, ...]:
    t = shapes.int_tuple(value, what)
    if len(t) != rank:
        raise RuleError(f"{what} {t} must have one entry per spatial axis ({rank})")
    return t


def crop(x: Value, start, size, name=None) -> Value:
    """``x[:, :, start[0]:start[0]+size[0], ...]``: a window of the spatial axes."""
    return x.graph.add("crop", [x], {"start": start, "size": size}, name)


def paste(tile: Value, at, canvas: Value | None = None, shape=None, name=None) -> Value:
    """``canvas`` (zeros of ``shape`` when None) with ``tile`` written at
    spatial offset ``at`` (all of N and C)."""
    if canvas is None:
        return tile.graph.add("paste", [tile], {"at": at, "shape": shape}, name)
    return tile.graph.add("paste", [canvas, tile], {"at": at, "shape": canvas.shape}, name)


@register
class Crop(_Gather):
    name = "crop"

    def normalize(self, attrs, types):
        x = types[0].shape
        rank = len(x) - 2
        if rank < 1:
            raise RuleError(f"crop needs (N, C, *spatial), got rank {len(x)}")
        start = _spatial(attrs["start"], rank, "start")
        size = _spatial(attrs["size"], rank, "size")
        for a, (s, z, n) in enumerate(zip(start, size, x[2:])):
            if not (0 <= s and 1 <= z and s + z <= n):
                raise RuleError(f"window {s}:{s + z} of spatial axis {a} is not a non-empty range inside 0:{n}")
        return {"start": start, "size": size}

    def infer(self, attrs, types):
        return TensorType(types[0].shape[:2] + attrs["size"], types[0].dtype)

    def reference(self, attrs, x):
        return x[(slice(None), slice(None)) + tuple(slice(s, s + z) for s, z in zip(attrs["start"], attrs["size"]))]

    def gather(self, attrs, x, out):
        s = row_major_strides(x.shape)
        return sum(a * st for a, st in zip(attrs["start"], s[2:])), s


@register
class Paste(Op):
    name = "paste"
    arity = (1, 2)
    inputs = ("canvas", "tile")

    def arg_names(self, n, attrs=None):
        return ["canvas", "tile"] if n == 2 else ["tile"]

    def normalize(self, attrs, types):
        tile = types[-1].shape
        rank = len(tile) - 2
        if rank < 1:
            raise RuleError(f"paste needs (N, C, *spatial) tiles, got rank {len(tile)}")
        shape = shapes.int_tuple(attrs["shape"] if len(types) == 1 else types[0].shape, "shape")
        if len(shape) != len(tile) or shape[:2] != tile[:2]:
            raise RuleError(f"the canvas {shape} must have the tile's rank, batch and channels {tile}")
        at = _spatial(attrs["at"], rank, "at")
        for a, (o, z, n) in enumerate(zip(at, tile[2:], shape[2:])):
            if not (0 <= o and o + z <= n):
                raise RuleError(f"the tile's window {o}:{o + z} of spatial axis {a} is outside the canvas 0:{n}")
        return {"at": at, "shape": shape}

    def infer(self, attrs, types):
        return TensorType(attrs["shape"], same_dtype(types))

    def reference(self, attrs, *xs):
        tile = xs[-1]
        out = np.zeros(attrs["shape"], tile.dtype) if len(xs) == 1 else np.array(xs[0], copy=True)
        out[(slice(None), slice(None)) + tuple(slice(a, a + z) for a, z in zip(attrs["at"], tile.shape[2:]))] = tile
        return out

    def context(self, attrs, types, out):
        tile = types[-1]
        # the tile as rows of its last axis: every other spatial axis picks a row of the canvas
        return dict(canvas=len(types) == 2, SIZE=out.size, NC=out.shape[0] * out.shape[1],
                    tile_dims=list(tile.shape[2:]), canvas_dims=list(out.shape[2:]), at=list(attrs["at"]), par=[])


class _InPlaceConv(Conv):
    """A conv whose output may share its input's buffer (the plan decides);
    the epilogue may hold an activation, not a residual."""

    def normalize(self, attrs, types):
        attrs = super().normalize(attrs, types)
        x, w = types[:2]
        if len(x.shape) != 4:
            raise RuleError(f"{self.name} is 2D: input (N, C, H, W), got rank {len(x.shape)}")
        if attrs.get("residual"):
            raise RuleError(f"{self.name} takes no residual (it would read a third buffer while "
                            f"overwriting its input)")
        if len(types) == 3 and len(types[2].shape) != 1:
            raise RuleError(f"{self.name} takes a tied bias (C_out,), got {types[2].shape}")
        self.check(attrs, x, w)
        return attrs

    def check(self, attrs, x: TensorType, w: TensorType) -> None:
        """Raise RuleError where the op's in-place order would not be exact."""

    def template_of(self, attrs, types):
        return self.name

    def context(self, attrs, types, out):
        ctx = super().context(attrs, types, out)
        ctx["par"] = []                 # one channel after another (see the module docstring)
        return ctx


def inplace_delay(attrs, x: TensorType, w: TensorType, out: TensorType) -> int:
    """Rows an in-place depthwise conv holds back: output row r of plane q
    (q = n * C + c) is written to the elements ``q*OH*OW + r*OW ...`` of the
    shared buffer, where input plane q (or an earlier one) lay; it can go
    there once every output row that reads an input row under it is
    computed. The delay is the most rows any output row waits; the ring
    keeps delay + 1 rows. Earlier planes are finished, later ones lie
    beyond (an output plane is no bigger than an input plane)."""
    ih, iw = x.shape[2:]
    oh, ow = out.shape[2:]
    k, s, d, p = w.shape[2], attrs["stride"][0], attrs["dilation"][0], attrs["padding"][0][0]
    last = [-1] * ih                    # input row -> the last output row that reads it
    for r in range(oh):
        for m in range(k):
            i = r * s - p + m * d
            if 0 <= i < ih:
                last[i] = r
    delay, plane_in, plane_out = 0, ih * iw, oh * ow
    planes = x.shape[0] * x.shape[1]
    for q in range(planes):
        if q and q * (plane_in - plane_out) >= plane_out:
            break                       # this plane's output ends before its input starts (and later ones too)
        for r in range(oh):
            lo, hi = q * plane_out + r * ow - q * plane_in, q * plane_out + (r + 1) * ow - q * plane_in
            if hi <= 0:
                continue                # over finished planes only
            rows = range(max(lo, 0) // iw, (hi - 1) // iw + 1)
            delay = max(delay, max(last[i] for i in rows) - r)
    return max(delay, 0)


@register
class DepthwiseInPlace(_InPlaceConv):
    name = "depthwise_inplace"

    def check(self, attrs, x, w):
        c = x.shape[1]
        if attrs["groups"] != c or w.shape[0] != c:
            raise RuleError(f"{self.name} needs one output channel per input channel (groups = C_in = C_out = "
                            f"{c}), got groups {attrs['groups']} and weight {w.shape}")
        out = shapes.window_out_sizes(x.shape[2:], w.shape[2:], attrs["stride"], attrs["dilation"],
                                      attrs["padding"])
        if out[0] * out[1] > x.shape[2] * x.shape[3]:
            raise RuleError(f"{self.name}: the output plane {out} must be no bigger than the input plane "
                            f"{x.shape[2:]} to be written over it")

    def context(self, attrs, types, out):
        ctx = super().context(attrs, types, out)
        x, w = types[:2]
        ctx["DELAY"] = inplace_delay(attrs, x, w, out)
        ctx["HELD_FROM"] = max(out.shape[2] - ctx["DELAY"], 0)     # the rows still in the ring at the end
        return ctx

    def workspace(self, attrs, types, out, target="c"):
        """The ring of held-back output rows: (delay + 1) rows of OUT_X."""
        x, w = types[:2]
        return (inplace_delay(attrs, x, w, out) + 1) * out.shape[3]


@register
class PointwiseInPlace(_InPlaceConv):
    name = "pointwise_inplace"

    def check(self, attrs, x, w):
        if w.shape[2:] != (1, 1) or attrs["groups"] != 1 or attrs["stride"] != (1, 1) \
                or attrs["padding"] != ((0, 0), (0, 0)):
            raise RuleError(f"{self.name} is a 1x1 conv of stride 1, no padding, one group; got weight {w.shape}, "
                            f"stride {attrs['stride']}, padding {attrs['padding']}, groups {attrs['groups']}")
        if x.shape[0] > 1 and w.shape[0] > x.shape[1]:
            raise RuleError(f"{self.name}: with a batch of {x.shape[0]}, C_out {w.shape[0]} must be <= C_in "
                            f"{x.shape[1]} (a wider output of one image would land on the next one's input)")

    def workspace(self, attrs, types, out, target="c"):
        """One row of pixels for every output channel: C_OUT x OUT_X."""
        return out.shape[1] * out.shape[3]


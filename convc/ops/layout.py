"""Spatial re-layout ops, the building blocks of the lowering passes:

* ``downsample(x, stride)`` keeps every s-th element: ``y[j] = x[j·s]``;
* ``dilate(x, stride)`` inserts s − 1 zeros between elements: ``y[j·s] = x[j]``;
* ``pad(x, pads, value)`` adds ``value`` around the spatial axes (a negative
  pad crops);
* ``channel_shuffle(x, groups)`` interleaves the channels of ``groups``
  groups (ShuffleNet): channel ``g·(C/groups) + j`` moves to ``j·groups + g``.

All four are gathers, one C template: output position o along an axis reads
input (o − lo)·down / up when that is a whole in-range index, else ``value``.
"""
from __future__ import annotations

import abc

import numpy as np

from .. import shapes
from ..errors import RuleError
from ..ir import TensorType, Value
from .registry import Op, builder, register
from .window import AXIS_LETTERS


@builder("x")
def downsample(x: Value, stride, name=None) -> Value:
    """Keep every ``stride``-th element along each spatial axis (from index 0)."""
    return x.graph.add("downsample", [x], {"stride": stride}, name)


@builder("x")
def dilate(x: Value, stride, name=None) -> Value:
    """Insert ``stride - 1`` zeros between neighbouring spatial elements."""
    return x.graph.add("dilate", [x], {"stride": stride}, name)


@builder("x")
def pad(x: Value, pads, value: float = 0.0, name=None) -> Value:
    """Pad the spatial axes: ``pads`` is an int, a per-axis tuple or per-axis
    ``(lo, hi)`` pairs; negative entries crop."""
    return x.graph.add("pad", [x], {"pads": pads, "value": value}, name)


@builder("x")
def channel_shuffle(x: Value, groups: int, name=None) -> Value:
    """ShuffleNet's channel shuffle: view C as (groups, C/groups), transpose."""
    return x.graph.add("channel_shuffle", [x], {"groups": groups}, name)


def _rank(t: TensorType) -> int:
    if not 3 <= len(t.shape) <= 5:
        raise RuleError(f"input must be (N, C, *spatial) with 1 to 3 spatial axes, got rank {len(t.shape)}")
    return len(t.shape) - 2


class _Resample(Op):
    template = "resample"

    @abc.abstractmethod
    def axes(self, attrs, x: TensorType):
        """Per spatial axis: (down, up, lo) of the gather."""

    def infer(self, attrs, types):
        x = types[0]
        return TensorType(x.shape[:2] + self.out_spatial(attrs, x), x.dtype)

    def context(self, attrs, types, out):
        x = types[0]
        letters = AXIS_LETTERS[len(x.shape) - 2]
        axes = [dict(l=l, U=l.upper(), i=i, o=o, down=dn, up=up, lo=lo) for l, i, o, (dn, up, lo) in
                zip(letters, x.shape[2:], out.shape[2:], self.axes(attrs, x))]
        return dict(NC=x.shape[0] * x.shape[1], axes=axes, value=float(attrs.get("value", 0.0)),
                    par=[("nc", "NC", x.shape[0] * x.shape[1])])


@register
class Downsample(_Resample):
    name = "downsample"

    def normalize(self, attrs, types):
        s = shapes.positive(shapes.per_axis(attrs["stride"], _rank(types[0]), "stride"), "stride")
        return {"stride": s}

    def out_spatial(self, attrs, x):
        return tuple(shapes.ceil_div(n, s) for n, s in zip(x.shape[2:], attrs["stride"]))

    def axes(self, attrs, x):
        return [(s, 1, 0) for s in attrs["stride"]]

    def grad(self, attrs, xs, y, gy, needs):
        x = xs[0]
        up = dilate(gy, attrs["stride"])          # back to every s-th position ...
        extra = [n - u for n, u in zip(x.shape[2:], up.shape[2:])]
        return [pad(up, [(0, e) for e in extra]) if any(extra) else up]   # ... and the tail the stride skipped

    def reference(self, attrs, x):
        return x[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in attrs["stride"])]


@register
class Dilate(_Resample):
    name = "dilate"

    def normalize(self, attrs, types):
        s = shapes.positive(shapes.per_axis(attrs["stride"], _rank(types[0]), "stride"), "stride")
        return {"stride": s}

    def out_spatial(self, attrs, x):
        return tuple((n - 1) * s + 1 for n, s in zip(x.shape[2:], attrs["stride"]))

    def axes(self, attrs, x):
        return [(1, s, 0) for s in attrs["stride"]]

    def grad(self, attrs, xs, y, gy, needs):
        return [downsample(gy, attrs["stride"])]

    def reference(self, attrs, x):
        y = np.zeros(x.shape[:2] + self.out_spatial(attrs, TensorType(x.shape, str(x.dtype))), x.dtype)
        y[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in attrs["stride"])] = x
        return y


@register
class Pad(_Resample):
    name = "pad"

    def normalize(self, attrs, types):
        rank = _rank(types[0])
        p = attrs["pads"]
        if shapes.is_int(p):
            pairs = ((int(p), int(p)),) * rank
        else:
            def pair(i):
                if shapes.is_int(i):
                    return (int(i), int(i))
                lo_hi = tuple(i)
                if len(lo_hi) != 2 or not all(shapes.is_int(v) for v in lo_hi):
                    raise ValueError
                return (int(lo_hi[0]), int(lo_hi[1]))
            try:
                items = list(p)
                if len(items) != rank:
                    raise ValueError
                pairs = tuple(pair(i) for i in items)
            except (TypeError, ValueError):
                raise RuleError(f"pads must be an int, {rank} ints or {rank} (lo, hi) pairs, got {p!r}") from None
        for n, (lo, hi) in zip(types[0].shape[2:], pairs):
            if n + lo + hi < 1:
                raise RuleError(f"pads {pairs} crop axis of size {n} to nothing")
        try:
            value = float(attrs.get("value", 0.0))
        except (TypeError, ValueError):
            raise RuleError(f"value must be a number, got {attrs.get('value')!r}") from None
        dtype = types[0].dtype
        if np.dtype(dtype).kind in "iu":       # an integer tensor pads with one of its values (quantized: its zero point)
            info = np.iinfo(dtype)
            if not (np.isfinite(value) and value == int(value) and info.min <= value <= info.max):
                raise RuleError(f"value {value!r} is not a {dtype} value (an integer in [{info.min}, {info.max}])")
        return {"pads": pairs, "value": value}

    def out_spatial(self, attrs, x):
        return tuple(n + lo + hi for n, (lo, hi) in zip(x.shape[2:], attrs["pads"]))

    def axes(self, attrs, x):
        return [(1, 1, lo) for lo, _ in attrs["pads"]]

    def grad(self, attrs, xs, y, gy, needs):
        return [pad(gy, [(-lo, -hi) for lo, hi in attrs["pads"]])]

    def reference(self, attrs, x):
        pos = [(0, 0), (0, 0)] + [(max(lo, 0), max(hi, 0)) for lo, hi in attrs["pads"]]
        y = np.pad(x, pos, constant_values=attrs["value"])
        crop = tuple(slice(max(-lo, 0), y.shape[2 + i] - max(-hi, 0)) for i, (lo, hi) in enumerate(attrs["pads"]))
        return y[(slice(None), slice(None)) + crop]


@register
class ChannelShuffle(Op):
    name = "channel_shuffle"

    def normalize(self, attrs, types):
        x = types[0]
        g = attrs["groups"]
        if len(x.shape) < 2:
            raise RuleError(f"input must be (N, C, ...), got {x.shape}")
        if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1 or x.shape[1] % g:
            raise RuleError(f"groups must be a positive divisor of the channel count {x.shape[1]}, got {g!r}")
        return {"groups": int(g)}

    def infer(self, attrs, types):
        return types[0]

    def grad(self, attrs, xs, y, gy, needs):
        return [channel_shuffle(gy, xs[0].shape[1] // attrs["groups"])]       # the inverse permutation

    def reference(self, attrs, x):
        n, c, *rest = x.shape
        g = attrs["groups"]
        return x.reshape(n, g, c // g, *rest).swapaxes(1, 2).reshape(x.shape)

    def context(self, attrs, types, out):
        n, c, *rest = out.shape
        return dict(N=n, GROUPS=attrs["groups"], PER_GROUP=c // attrs["groups"], INNER=shapes.prod(rest),
                    par=[("n", "N", n), ("g", "GROUPS", attrs["groups"]), ("j", "PER_GROUP", c // attrs["groups"])])

"""Padding normalisation and the output-size formula: the only place for both.

Output size along one axis (0-based, see DESIGN.md):
    floor((n + p_lo + p_hi - d*(k - 1) - 1) / s) + 1
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from .errors import RuleError


def is_int(v) -> bool:
    """A true integer (Python or numpy), not a bool and not a float."""
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


INDEX_MAX = 2**31 - 1
"""The largest extent, element count, stride, padding, dilation or offset the
generated code can index. C templates index with ``int`` loop variables and
``enum`` constants, OpenCL kernels with ``int`` work-item ids: 32 bits on every
target convc builds for (LP64 and ILP32 C, OpenCL C), so every quantity they
compute must fit. Checked at graph-build time (``bounded``)."""


def bounded(value: int, what: str) -> int:
    """``value`` if the generated code's ``int`` indices hold it (``|value| <=
    INDEX_MAX``); a RuleError naming ``what``, the value and the limit
    otherwise."""
    if not -INDEX_MAX <= value <= INDEX_MAX:
        raise RuleError(f"{what} = {value} is beyond {INDEX_MAX} (2**31 - 1), the largest index the "
                        f"generated C and OpenCL code hold in an int")
    return value

PADDING_WORDS = ("valid", "same", "full")


def per_axis(value, rank: int, what: str) -> tuple[int, ...]:
    """An int or a sequence of ``rank`` ints -> tuple of ``rank`` ints."""
    if is_int(value):
        return (bounded(int(value), what),) * rank
    try:
        items = list(value)
    except TypeError:
        items = None
    if items is None or len(items) != rank or not all(is_int(v) for v in items):
        raise RuleError(f"{what} must be an int or a tuple of {rank} ints, got {value!r}")
    return tuple(bounded(int(v), what) for v in items)


def int_tuple(value, what: str) -> tuple[int, ...]:
    """A sequence of true ints (no floats, strings or bools, which int()
    would coerce), each within the index limit, as a tuple."""
    try:
        items = list(value)
    except TypeError:
        items = None
    if items is None or isinstance(value, (str, bytes, dict, set, frozenset)) or not all(is_int(v) for v in items):
        raise RuleError(f"{what} must be a tuple of ints, got {value!r}")
    return tuple(bounded(int(v), what) for v in items)


def positive(values: tuple[int, ...], what: str) -> tuple[int, ...]:
    if any(v < 1 for v in values):
        raise RuleError(f"{what} must be >= 1 on every axis, got {values}")
    return values


def out_size(n: int, k: int, s: int, d: int, lo: int, hi: int) -> int:
    """Output length of a sliding window along one axis (may be <= 0 if the
    effective kernel is larger than the padded input)."""
    return (n + lo + hi - d * (k - 1) - 1) // s + 1


def normalize_padding(padding, in_sizes, kernel, stride, dilation):
    """Turn every padding form into explicit ``((lo, hi), ...)`` pairs.

    Forms: int; per-axis tuple of ints; per-axis ``(lo, hi)`` pairs;
    ``"valid"`` (none); ``"same"`` (output = ceil(n / stride), odd total
    padding puts the extra element on the high side); ``"full"``
    (d*(k-1) on both sides).
    """
    rank = len(in_sizes)
    if isinstance(padding, str):
        word = padding.lower()
        if word == "valid":
            pairs = ((0, 0),) * rank
        elif word == "full":
            pairs = tuple((d * (k - 1), d * (k - 1)) for k, d in zip(kernel, dilation))
        elif word == "same":
            pairs = []
            for n, k, s, d in zip(in_sizes, kernel, stride, dilation):
                want = -(-n // s)
                total = max(0, (want - 1) * s + d * (k - 1) + 1 - n)
                pairs.append((total // 2, total - total // 2))
        else:
            raise RuleError(f"unknown padding word {padding!r}; use an int, a tuple, (lo, hi) pairs "
                            f"or one of {', '.join(map(repr, PADDING_WORDS))}")
    elif is_int(padding):
        pairs = ((int(padding), int(padding)),) * rank
    else:
        try:
            items = list(padding)
        except TypeError:
            raise RuleError(f"padding must be an int, a tuple, (lo, hi) pairs or a word, got {padding!r}") from None
        if len(items) != rank:
            raise RuleError(f"padding {padding!r} has {len(items)} entries but the op has {rank} spatial axes")
        pairs = []
        for item in items:
            if is_int(item):
                pairs.append((int(item), int(item)))
                continue
            try:
                lo, hi = item
            except (TypeError, ValueError):
                lo = hi = None
            if not (is_int(lo) and is_int(hi)):
                raise RuleError(f"padding entry {item!r} is neither an int nor a (lo, hi) pair of ints")
            pairs.append((int(lo), int(hi)))
        pairs = tuple(pairs)
    if any(lo < 0 or hi < 0 for lo, hi in pairs):
        raise RuleError(f"padding must be >= 0, got {pairs}")
    for n, (lo, hi) in zip(in_sizes, pairs):        # the padded extent is an index of the generated code
        bounded(n + lo + hi, f"padding ({lo}, {hi}) of an axis of {n}: the padded extent {n} + {lo} + {hi}")
    return tuple(tuple(p) for p in pairs)


def window_out_sizes(in_sizes, kernel, stride, dilation, pads, ceil_mode=False):
    """Output sizes of a sliding window; ``ceil_mode`` follows PyTorch's pools:
    round up, but the last window must start inside the input or left padding."""
    sizes = []
    for n, k, s, d, (lo, hi) in zip(in_sizes, kernel, stride, dilation, pads):
        bounded(n + lo + hi, f"padded extent {n} + {lo} + {hi}")
        bounded(d * (k - 1) + 1, f"kernel extent d*(k-1)+1 = {d}*({k}-1)+1")
        span = n + lo + hi - d * (k - 1) - 1
        if span < 0:
            raise RuleError(
                f"kernel extent d*(k-1)+1 = {d * (k - 1) + 1} is larger than the padded input "
                f"{n} + {lo} + {hi} = {n + lo + hi}")
        if ceil_mode:
            o = -(-span // s) + 1
            if (o - 1) * s >= n + lo:
                o -= 1
        else:
            o = span // s + 1
        sizes.append(o)
    return tuple(sizes)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def prod(values) -> int:
    return math.prod(int(v) for v in values)


def interior(n: int, out: int, k: int, s: int, d: int, lo: int) -> tuple[int, int]:
    """The output positions [first, end) of one axis whose window
    o*s - lo + [0, d*(k-1)] lies inside the input [0, n): no padding, no
    ceil_mode overhang. An empty interior is (out, out), so that the border
    [0, first) + [end, out) is the whole axis.

    >>> interior(112, 56, 3, 2, 1, 1)      # resnet's 3x3/2 pool: only output 0 touches padding
    (1, 56)
    >>> interior(3, 2, 3, 2, 1, 1)         # every window reaches into padding
    (2, 2)
    """
    first = -(-lo // s)                                 # o*s >= lo
    end = min(out, (n - 1 - d * (k - 1) + lo) // s + 1)  # o*s - lo + d*(k-1) <= n-1
    return (first, end) if first < end else (out, out)

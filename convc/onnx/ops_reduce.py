"""The converters of ONNX's reductions, the pools made of them, and the
normalisations: ReduceSum/Mean/Max/Min/Prod/L1/L2/SumSquare/LogSumExp (axes
an attribute before opset 13 (ReduceSum) or 18 (the others), an input from
then on), GlobalMaxPool, LpPool, LRN, InstanceNormalization,
GroupNormalization, LayerNormalization, LpNormalization; and the export
(to_onnx) of the ops behind them: reduce, lrn, lp_pool, standardize
(instance/group/layer norm and lp_normalize export as the ops they are made
of)."""
from __future__ import annotations

import numpy as np

from ..ops.normalize import group_norm, instance_norm, layer_norm, lp_normalize, lrn
from ..ops.layout import pad
from ..ops.pool import global_avg_pool, lp_pool
from ..ops.reduce import global_max_pool, reduce
from ..errors import ConvcError
from ..ops.elementwise import div, mul, sub
from ..ops.tensor import concat, expand, reshape
from ..shapes import prod
from .converters import _pool_geometry
from .exporter import exports
from .importer import STATIC_INPUTS, _WINDOW, _Unsupported, _axis, converts


@converts("LRN", size=None, alpha=1e-4, beta=0.75, bias=1.0)
def _lrn(im, node, ins, at):
    x = im.value(ins[0])
    if at["size"] is None:
        raise _Unsupported("attribute size is required")
    if len(x.shape) < 3:
        raise _Unsupported(f"LRN takes (N, C, D1, ...), got shape {x.shape}")
    return [lrn(x, at["size"], at["alpha"], at["beta"], at["bias"], name=im.name(node))]


# -- ReduceX -------------------------------------------------------------------------
_REDUCE_KINDS = {"ReduceSum": "sum", "ReduceMean": "mean", "ReduceMax": "max", "ReduceMin": "min",
                 "ReduceProd": "prod", "ReduceL1": "l1", "ReduceL2": "l2", "ReduceSumSquare": "sum_square",
                 "ReduceLogSumExp": "log_sum_exp"}
STATIC_INPUTS.update({op: (1,) for op in _REDUCE_KINDS})


def _reduce_axes(im, node, ins, at, x_rank: int):
    """The axes a ReduceX node reduces (sorted, non-negative), or None when
    it reduces nothing (no axes and noop_with_empty_axes). Before opset 13
    (ReduceSum) or 18 (the others) the axes are an attribute; from then on an
    optional input."""
    since = 13 if node.op_type == "ReduceSum" else 18
    if im.opset < since:
        if len(ins) > 1 and ins[1]:
            raise _Unsupported(f"{node.op_type} before opset {since} takes its axes as an attribute, "
                               f"not an input")
        axes = at["axes"]
    else:
        if at["axes"] is not None:
            raise _Unsupported(f"{node.op_type} from opset {since} on takes its axes as an input, "
                               f"not an attribute")
        axes = im.ints(ins[1], "axes").tolist() if len(ins) > 1 and ins[1] else None
    if not axes:
        return None if at["noop_with_empty_axes"] else list(range(x_rank))
    return sorted({_axis(a, x_rank, "axes entry") for a in axes})


@converts(*_REDUCE_KINDS, keepdims=1, axes=None, noop_with_empty_axes=0)
def _reduce(im, node, ins, at):
    x = im.value(ins[0])
    rank = len(x.shape)
    axes = _reduce_axes(im, node, ins, at, rank)
    kind, keep = _REDUCE_KINDS[node.op_type], bool(at["keepdims"])
    if axes is None:        # no reduction, but the elementwise part stays (ReduceSumSquare squares)
        return [x if kind in ("sum", "mean", "max", "min", "prod") else reduce(x, kind, (), keep, name=im.name(node))]
    if kind == "mean" and axes == list(range(2, rank)) and 3 <= rank <= 5:   # x.mean((2, 3)): a global average pool
        y = global_avg_pool(x, name=im.name(node) if keep else im.name(node, "pool"))
        return [y if keep else reshape(y, x.shape[:2], name=im.name(node))]
    return [reduce(x, kind, tuple(axes), keep, name=im.name(node))]


@converts("GlobalMaxPool")
def _global_max_pool(im, node, ins, at):
    x = im.value(ins[0])
    if len(x.shape) < 3:
        raise _Unsupported(f"GlobalMaxPool takes (N, C, D1, ...), got shape {x.shape}")
    return [global_max_pool(x, name=im.name(node))]


# -- normalisations ----------------------------------------------------------------------
@converts("InstanceNormalization", epsilon=1e-5)
def _instance_norm(im, node, ins, at):
    x = im.value(ins[0])
    if len(x.shape) < 3:
        raise _Unsupported(f"InstanceNormalization takes (N, C, D1, ...), got shape {x.shape}")
    for what, i in (("scale", 1), ("B", 2)):
        if im.shape(ins[i]) != x.shape[1:2]:
            raise _Unsupported(f"{what} must have shape ({x.shape[1]},) (one per channel), got {im.shape(ins[i])}")
    return [instance_norm(x, im.value(ins[1]), im.value(ins[2]), at["epsilon"], name=im.name(node))]


@converts("GroupNormalization", epsilon=1e-5, num_groups=None, stash_type=1)
def _group_norm(im, node, ins, at):
    """Opset 18: scale and bias hold one value per group; opset 21: one per
    channel (18's are repeated over each group's channels)."""
    x = im.value(ins[0])
    groups = at["num_groups"]
    if groups is None:
        raise _Unsupported("attribute num_groups is required")
    if len(x.shape) < 3 or groups < 1 or x.shape[1] % groups:
        raise _Unsupported(f"num_groups {groups} must divide the channels of an (N, C, D1, ...) input, "
                           f"got shape {x.shape}")
    c = x.shape[1]
    per = c // groups
    params = []
    for what, i in (("scale", 1), ("bias", 2)):
        want = (groups,) if im.opset < 21 else (c,)
        if im.shape(ins[i]) != want:
            raise _Unsupported(f"GroupNormalization-{18 if im.opset < 21 else 21}: {what} must have shape "
                               f"{want} (one per {'group' if im.opset < 21 else 'channel'}), got {im.shape(ins[i])}")
        v = im.value(ins[i])
        if im.opset < 21 and per > 1:
            v = reshape(expand(reshape(v, (groups, 1), name=im.name(node, f"{what}.col")), (groups, per),
                               name=im.name(node, f"{what}.rep")), (c,), name=im.name(node, f"{what}.per_channel"))
        params.append(v)
    return [group_norm(x, groups, params[0], params[1], at["epsilon"], name=im.name(node))]


@converts("LayerNormalization", dropped="the saved mean and inverse standard deviation (training outputs)",
          axis=-1, epsilon=1e-5, stash_type=1)
def _layer_norm(im, node, ins, at):
    x = im.value(ins[0])
    rank = len(x.shape)
    axis = _axis(at["axis"], rank, "axis")
    bias = im.value(ins[2]) if len(ins) > 2 and ins[2] else None
    for what, name in (("Scale", ins[1]), ("B", ins[2] if len(ins) > 2 else "")):
        if not name:
            continue
        s = im.shape(name)
        try:
            ok = len(s) <= rank - axis and np.broadcast_shapes(s, x.shape[axis:]) == x.shape[axis:]
        except ValueError:
            ok = False
        if not ok:
            raise _Unsupported(f"{what} of shape {s} does not broadcast to the normalized axes {x.shape[axis:]}")
    y = layer_norm(x, axis, im.value(ins[1]), bias, at["epsilon"], name=im.name(node))
    used = [len(node.output) > i and node.output[i] in im.used for i in (1, 2)]
    return [y] + (_layer_norm_stats(im, node, x, axis, at["epsilon"], used) if any(used) else [])


def _layer_norm_stats(im, node, x, axis: int, eps: float, used) -> list:
    """LayerNormalization's Mean and InvStdDev outputs (shape x.shape[:axis]
    + 1s), when a model uses them: the mean is a reduce; 1/sqrt(var + eps) is
    1 / the L2 norm of each row's deviations over sqrt(n), with one more
    element, sqrt(eps), appended to the row."""
    axes = tuple(range(axis, len(x.shape)))
    kept = x.shape[:axis] + (1,) * len(axes)
    mean = reduce(x, "mean", axes, True, name=im.name(node, "mean"))
    if not used[1]:
        return [mean]
    rows, n = prod(x.shape[:axis]), prod(x.shape[axis:])
    dev = reshape(mul(sub(x, mean, name=im.name(node, "dev")), 1.0 / np.sqrt(n), name=im.name(node, "dev_scaled")),
                  (rows, n), name=im.name(node, "rows"))
    im.allocate((rows, 1), "the epsilon column")
    eps_col = x.graph.const(np.full((rows, 1), np.sqrt(eps)), x.dtype)
    std = reduce(concat([dev, eps_col], 1, name=im.name(node, "with_eps")), "l2", 1, True,
                 name=im.name(node, "std"))
    return [mean, div(1.0, reshape(std, kept, name=im.name(node, "std_kept")), name=im.name(node, "inv_std"))]


@converts("LpNormalization", axis=-1, p=2)
def _lp_normalization(im, node, ins, at):
    x = im.value(ins[0])
    if at["p"] not in (1, 2):
        raise _Unsupported(f"p must be 1 or 2, got {at['p']}")
    return [lp_normalize(x, at["p"], _axis(at["axis"], len(x.shape), "axis"), name=im.name(node))]


@converts("LpPool", ceil_mode=0, dilations=None, p=2, **_WINDOW)
def _lp_pool(im, node, ins, at):
    """LpPool: p a float in opset 1, an int from 2 on; ceil_mode and
    dilations from 18 on. Pads beyond half the kernel are explicit zeros."""
    x = im.value(ins[0])
    if not 3 <= len(x.shape) <= 5:
        raise _Unsupported(f"LpPool takes (N, C, D1, ...) with 1 to 3 spatial axes, got shape {x.shape}")
    p = at["p"]
    if not 1 <= p < float("inf"):
        raise _Unsupported(f"p must be a finite number >= 1, got {p}")
    k, s, d, pads, ceil_mode, out = _pool_geometry(node, at, x.shape)
    if all(max(pp) <= kk // 2 for pp, kk in zip(pads, k)):
        y = lp_pool(x, p, k, s, pads, d, ceil_mode, name=im.name(node))
    else:
        need = [(o - 1) * ss + dd * (kk - 1) + 1 for o, ss, dd, kk in zip(out, s, d, k)]
        xp = pad(x, [(lo, max(0, t - n - lo)) for (lo, _), t, n in zip(pads, need, x.shape[2:])], 0.0,
                 name=im.name(node, "pad"))
        y = lp_pool(xp, p, k, s, 0, d, False, name=im.name(node))
    if list(y.shape[2:]) != out:
        raise _Unsupported(f"convc's output {y.shape[2:]} differs from ONNX's {out}")
    return [y]


# -- export (to_onnx) ----------------------------------------------------------------------
_REDUCE_OPS = {kind: op for op, kind in _REDUCE_KINDS.items()}


@exports("reduce")
def _x_reduce(ex, n, ins, attrs, out):
    """ReduceX with its axes an input from opset 18 on, an attribute before;
    no axes (the elementwise part only) is noop_with_empty_axes (18 on)."""
    op, axes = _REDUCE_OPS[attrs["kind"]], list(attrs["axes"])
    keep = dict(keepdims=int(attrs["keepdims"]))
    if not axes:
        if ex.opset < 18:
            raise ConvcError(f"node %{n} (reduce {attrs['kind']} over no axes) needs opset >= 18 "
                             f"(noop_with_empty_axes), not {ex.opset}")
        ex.node(op, [ex.tensor[ins[0]]], [ex.tensor[n]], noop_with_empty_axes=1, **keep)
    elif ex.opset >= 18:
        ex.node(op, [ex.tensor[ins[0]], ex.ints(axes, f"{n}.axes")], [ex.tensor[n]], **keep)
    else:
        ex.node(op, [ex.tensor[ins[0]]], [ex.tensor[n]], axes=axes, **keep)


@exports("lrn")
def _x_lrn(ex, n, ins, attrs, out):
    ex.node("LRN", [ex.tensor[ins[0]]], [ex.tensor[n]], size=attrs["size"], alpha=attrs["alpha"],
            beta=attrs["beta"], bias=attrs["bias"])


@exports("lp_pool")
def _x_lp_pool(ex, n, ins, attrs, out):
    extra = dict(ceil_mode=int(attrs["ceil_mode"]), dilations=list(attrs["dilation"]))
    if ex.opset < 18:
        if attrs["ceil_mode"] or any(d != 1 for d in attrs["dilation"]):
            raise ConvcError(f"node %{n} (lp_pool): ceil_mode and dilations need opset >= 18, not {ex.opset}")
        extra = {}
    p = attrs["p"]
    if not float(p).is_integer():
        raise ConvcError(f"node %{n} (lp_pool): ONNX's LpPool takes an integer p, not {p}")
    ex.node("LpPool", [ex.tensor[ins[0]]], [ex.tensor[n]], kernel_shape=list(attrs["kernel_size"]),
            strides=list(attrs["stride"]), pads=[lo for lo, _ in attrs["padding"]] + [hi for _, hi in attrs["padding"]],
            p=int(p), **extra)


@exports("standardize")
def _x_standardize(ex, n, ins, attrs, out):
    """LayerNormalization (opset 17 on) with a scale of ones."""
    if ex.opset < 17:
        raise ConvcError(f"node %{n} (standardize) is LayerNormalization, which needs opset >= 17, not {ex.opset}")
    ones = np.ones(out.shape[attrs["axis"]:], out.dtype)
    ex.node("LayerNormalization", [ex.tensor[ins[0]], ex.initializer(ones, f"{n}.scale")], [ex.tensor[n]],
            axis=attrs["axis"], epsilon=attrs["eps"])

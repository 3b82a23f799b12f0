"""The converters of ONNX's reductions, the pools made of them, and the
normalisations: ReduceSum/Mean/Max/Min/Prod/L1/L2/SumSquare/LogSumExp (axes
an attribute before opset 13 (ReduceSum) or 18 (the others), an input from
then on), GlobalMaxPool, LpPool, LRN, InstanceNormalization,
GroupNormalization, LayerNormalization, LpNormalization."""
from __future__ import annotations

from ..ops.normalize import lrn
from ..ops.pool import global_avg_pool
from ..ops.reduce import global_max_pool, reduce
from ..ops.tensor import reshape
from .importer import STATIC_INPUTS, _Unsupported, _axis, converts


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
    it is the identity (no axes and noop_with_empty_axes). Before opset 13
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
    if axes is None:
        return [x]
    kind, keep = _REDUCE_KINDS[node.op_type], bool(at["keepdims"])
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

"""Fusions: ``fold_batch_norm``, ``fuse_epilogues``, ``fuse_separable``."""
from __future__ import annotations

import numpy as np

from ..ir import Graph, Value
from ..ops import activations
from ..ops.conv import conv
from ..ops.elementwise import hardswish, silu
from ..ops.epilogue import PRODUCERS
from ..ops.norm import BatchNorm
from ..ops.tensor import reshape
from ..shapes import prod
from .manager import register
from .rewrite import attrs, fresh, ins, is_const, only_user, operands, rewrite


def _conv_args(a):
    return dict(stride=a["stride"], padding=a["padding"], dilation=a["dilation"], groups=a["groups"],
                flip=a["flip"])


def _fold_bn(g: Graph, n: str):
    if g.node(n)["op"] != "batch_norm":
        return None
    x, mean, var, gamma, beta = ins(g, n)
    if x.op != "conv" or only_user(g, x.name) != n or attrs(g, x.name).get("activation") \
            or attrs(g, x.name).get("residual"):
        return None
    cx, w, *b = ins(g, x.name)
    if not all(is_const(g, v) for v in (mean, var, gamma, beta, w, *b)):
        return None
    val = lambda v: g.node(v.name)["value"]  # noqa: E731
    scale, shift = BatchNorm.scale_shift(attrs(g, n), val(mean), val(var), val(gamma), val(beta))
    wv = val(w) * scale.reshape((-1,) + (1,) * (len(w.shape) - 1))
    bias = shift if not b else (val(b[0]) * (scale if val(b[0]).ndim == 1 else
                                             scale.reshape((-1,) + (1,) * (val(b[0]).ndim - 1)))
                                + (shift if val(b[0]).ndim == 1 else shift.reshape((-1,) + (1,) * (val(b[0]).ndim - 1))))
    w2 = g.param(fresh(g, f"{x.name}.w_bn"), wv, w.dtype)
    b2 = g.param(fresh(g, f"{x.name}.b_bn"), bias, w.dtype)
    return conv(cx, w2, b2, name=fresh(g, f"{x.name}.bn"), **_conv_args(attrs(g, x.name)))


@register
def fold_batch_norm(g: Graph) -> Graph:
    """conv → batch_norm (inference statistics) becomes one conv with scaled
    weights w·γ/√(σ²+ε) and bias (b − μ)·γ/√(σ²+ε) + β: the normalisation
    costs nothing at run time. The folded weights are new constants."""
    return rewrite(g, _fold_bn)


# -- fuse_epilogues ---------------------------------------------------------------
def _producer(g: Graph, v: Value, consumer: str):
    """The epilogue producer behind ``v`` as ``consumer`` sees it, through
    reshapes (aliases, no code), each step used only by the next: its name,
    or None."""
    if only_user(g, v.name) != consumer:
        return None
    n = v.name
    while g.node(n)["op"] == "reshape":
        (src,) = g.inputs_of(n)
        if only_user(g, src) != n:
            return None
        n = src
    return n if g.node(n)["op"] in PRODUCERS else None


def _rebuild(g: Graph, p: str, inputs: list[Value], new_attrs: dict, like: Value, what: str) -> Value:
    """Producer ``p`` again with ``inputs`` and ``new_attrs``, reshaped back to ``like``'s shape."""
    y = g.add(g.node(p)["op"], inputs, new_attrs, fresh(g, f"{p}.{what}"))
    return reshape(y, like.shape, name=fresh(g, f"{like.name}.{what}")) if y.shape != like.shape else y


def _per_channel(b: Value, shape) -> bool:
    """``b`` adds one number per channel (axis 1) to a tensor of ``shape``."""
    c, rank = shape[1], len(shape)
    dims = (1,) * (rank - len(b.shape)) + tuple(b.shape)
    return len(b.shape) <= rank and dims[1] == c and all(d == 1 for i, d in enumerate(dims) if i != 1)


def _bias_input(g: Graph, p: str, b: Value, out: Value):
    """``b`` (added to ``out``, the producer's output seen through reshapes)
    as the producer's own bias input, or None if it is not one."""
    op, pshape = g.node(p)["op"], g.node(p)["type"].shape
    if op in ("conv", "winograd_conv", "col2im"):
        if pshape == out.shape and _per_channel(b, out.shape):
            return b if b.shape == (out.shape[1],) else reshape(b, (out.shape[1],), name=fresh(g, f"{b.name}.as_bias"))
    elif op == "dense":
        if pshape == out.shape and all(d == 1 for d in b.shape[:-1]) and b.shape[-1:] == pshape[-1:]:
            return b if b.shape == pshape[-1:] else reshape(b, pshape[-1:], name=fresh(g, f"{b.name}.as_bias"))
    elif op == "matmul":
        if pshape == out.shape and len(b.shape) >= 2 and b.shape[-2:] == (pshape[-2], 1) and \
                len(b.shape) <= len(pshape) and np.broadcast_shapes(b.shape[:-2], pshape[:-2]) == pshape[:-2]:
            return b                                             # already one number per row
        # (N, ..., M, P) seen as (N, C, *spatial) with C = prod(... M): channel c is row c of the
        # flattened batch-and-row axes, so the flat layouts agree and the bias becomes (..., M, 1)
        if len(out.shape) >= 2 and _per_channel(b, out.shape) and len(pshape) >= 3 and \
                pshape[0] == out.shape[0] and prod(pshape[1:-1]) == out.shape[1] and \
                pshape[-1] == prod(out.shape[2:]):
            return reshape(b, tuple(pshape[1:-1]) + (1,), name=fresh(g, f"{b.name}.as_rows"))
    return None


BIAS_SLOT = {"conv": 2, "winograd_conv": 3, "dense": 2, "matmul": 2, "col2im": 1}
"""Where each producer takes its own bias among its inputs."""

BIAS_ATTR = ("matmul", "col2im")
"""Producers whose bias input is announced by ``bias=True`` (the others
know it from their input count)."""


def _has_bias(g: Graph, p: str) -> bool:
    return len(operands(g, p)) > BIAS_SLOT[g.node(p)["op"]]


def _fuse_add(g: Graph, n: str):
    """``add`` after a producer: its bias (one number per channel) or a residual."""
    a, b = ins(g, n)
    out_type = g.node(n)["type"]
    for v, other in ((a, b), (b, a)):
        p = _producer(g, v, n)
        if p is None or v.name == other.name:
            continue
        pa = attrs(g, p)
        if pa.get("activation") or pa.get("residual"):
            continue
        xs = ins(g, p)
        if other.type == out_type and v.type == out_type:              # a residual
            r = other if other.shape == g.node(p)["type"].shape else \
                reshape(other, g.node(p)["type"].shape, name=fresh(g, f"{other.name}.as_residual"))
            return _rebuild(g, p, xs + [r], dict(pa, residual=True), v, "residual")
        if v.type == out_type and not _has_bias(g, p):
            bias = _bias_input(g, p, other, v)
            if bias is not None:
                return _rebuild(g, p, xs + [bias], dict(pa, bias=True) if g.node(p)["op"] in BIAS_ATTR else pa,
                                v, "bias")
    return None


def _fuse_activation(g: Graph, n: str):
    """An activation after a producer runs in the producer's epilogue."""
    (v,) = ins(g, n)
    p = _producer(g, v, n)
    if p is None:
        return None
    pa = attrs(g, p)
    if pa.get("activation"):
        return None
    kind = g.node(n)["op"]
    return _rebuild(g, p, ins(g, p), dict(pa, **activations.fused_attrs(kind, attrs(g, n))), v, kind)


def _fuse_gated(g: Graph, n: str):
    """x * sigmoid(x) is silu(x); x * hardsigmoid(x) with PyTorch's alpha and
    beta is hardswish(x) (how exporters write them)."""
    a, b = ins(g, n)
    for x, gate in ((a, b), (b, a)):
        if only_user(g, gate.name) != n or g.inputs_of(gate.name) != [x.name]:
            continue
        if gate.op == "sigmoid":
            return silu(x, name=fresh(g, f"{gate.name}.silu"))
        ga = attrs(g, gate.name)
        if gate.op == "hardsigmoid" and abs(ga["alpha"] - 1 / 6) < 1e-7 and ga["beta"] == 0.5:
            return hardswish(x, name=fresh(g, f"{gate.name}.hardswish"))
    return None


EPILOGUE_RULES = {"add": _fuse_add, "mul": _fuse_gated,
                  **{kind: _fuse_activation for kind in activations.ACTIVATIONS}}


@register
def fuse_epilogues(g: Graph) -> Graph:
    """Each bias add, residual add and activation that follows a producer
    (conv, winograd_conv, matmul, dense — seen through reshapes) moves into
    the producer's epilogue, applied while the result is in registers: no
    extra node, buffer or pass over memory. x·sigmoid(x) becomes silu and
    x·hardsigmoid(x) hardswish first. Runs after the algorithm choice, so no
    lowering splits an epilogue again; rules run to a fixed point."""
    return rewrite(g, EPILOGUE_RULES)


MAX_TILE_BYTES = 64 << 10


def _is_pointwise(g, n):
    if g.node(n)["op"] != "conv":
        return False
    a, w = attrs(g, n), ins(g, n)[1]
    return (len(w.shape) == 4 and w.shape[2:] == (1, 1) and a["stride"] == (1, 1) and a["groups"] == 1
            and a["padding"] == ((0, 0), (0, 0)))


def _is_depthwise(g, n):
    if g.node(n)["op"] != "conv":
        return False
    x, w = ins(g, n)[:2]
    return len(x.shape) == 4 and attrs(g, n)["groups"] == x.shape[1] and w.shape[1] == 1


def _fuse_sep(g: Graph, n: str):
    if not _is_pointwise(g, n):
        return None
    mid, w_pw, *b_pw = ins(g, n)
    act = None
    dw = mid
    if attrs(g, n).get("residual"):
        return None
    if mid.op in activations.ACTIVATIONS:
        if only_user(g, mid.name) != n:
            return None
        act = activations.fused_attrs(mid.op, attrs(g, mid.name))
        (dw,) = ins(g, mid.name)
    if not _is_depthwise(g, dw.name) or only_user(g, dw.name) != (mid.name if act else n):
        return None
    tile = w_pw.shape[1] * g.node(dw.name)["type"].shape[3] * (8 if w_pw.dtype == "float64" else 4)
    if tile > MAX_TILE_BYTES:                    # the row tile lives on the stack
        return None
    da = attrs(g, dw.name)
    if (act and da.get("activation")) or da.get("residual"):
        return None
    x, w_dw, *b_dw = ins(g, dw.name)
    if any(len(b.shape) != 1 for b in b_dw + b_pw):       # the fused kernel takes tied biases only
        return None
    dw_act = act or (activations.fused_attrs(*activations.fused(da)) if da.get("activation") else {})
    pa = attrs(g, n)
    pw_act = activations.fused_attrs(*activations.fused(pa)) if pa.get("activation") else {}
    fused = dict(dw_stride=da["stride"], dw_padding=da["padding"], dw_dilation=da["dilation"], dw_flip=da["flip"],
                 dw_bias=bool(b_dw), pw_bias=bool(b_pw), **{f"dw_{k}": v for k, v in dw_act.items()},
                 **{f"pw_{k}": v for k, v in pw_act.items()})
    return g.add("fused_separable", [x, w_dw, w_pw, *b_dw, *b_pw], fused, fresh(g, f"{n}.fused"))


@register
def fuse_separable(g: Graph) -> Graph:
    """A depthwise conv (+ bias, + activation) feeding only a pointwise 1×1
    conv becomes ONE ``fused_separable`` op whose C kernel keeps the depthwise
    result in a one-row tile per channel instead of a full intermediate buffer
    (2D)."""
    return rewrite(g, _fuse_sep)



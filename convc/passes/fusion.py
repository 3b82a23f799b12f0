"""Fusions: ``fold_batch_norm``, ``fuse_epilogues``, ``fuse_separable``."""
from __future__ import annotations

import numpy as np

from ..ir import Graph, Value
from ..ops import activations, get_op
from ..ops.conv import conv
from ..ops.elementwise import hardswish, silu
from ..ops.epilogue import PRODUCERS
from ..ops.norm import BatchNorm
from ..ops.tensor import reshape
from ..shapes import prod
from .manager import decline, register
from .rewrite import an, attrs, fresh, ins, is_const, only_user, operands, rewrite, shared


def _conv_args(a):
    return dict(stride=a["stride"], padding=a["padding"], dilation=a["dilation"], groups=a["groups"],
                flip=a["flip"])


def _bn_declined(g: Graph, x: Value, stats: list[Value]) -> str | None:
    """Why a batch_norm of ``x`` with ``stats`` (mean, var, gamma, beta)
    cannot fold into the conv before it, or None."""
    if x.op != "conv":
        return f"follows {an(x.op)} ('{x.name}'), not a conv"
    why = shared(g, x.name)
    if why:
        return f"conv {why}"
    a = attrs(g, x.name)
    if a.get("activation"):
        return f"conv '{x.name}' applies {a['activation']} before it"
    if a.get("residual"):
        return f"conv '{x.name}' adds a residual before it"
    for v in stats + ins(g, x.name)[1:]:
        if not is_const(g, v):
            return f"'{v.name}' is computed ({an(v.op)}), not a param"
    return None


def _fold_bn(g: Graph, n: str):
    if g.node(n)["op"] != "batch_norm":
        return None
    x, mean, var, gamma, beta = ins(g, n)
    why = _bn_declined(g, x, [mean, var, gamma, beta])
    if why:
        return decline(n, why)
    cx, w, *b = ins(g, x.name)
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
def _producer(g: Graph, v: Value, consumer: str) -> tuple[str | None, str | None]:
    """The epilogue producer behind ``v`` as ``consumer`` sees it, through
    reshapes (aliases, no code), each step used only by the next: (its
    name, None), or (None, why there is none)."""
    n = v.name
    why = shared(g, n)
    while why is None and g.node(n)["op"] == "reshape":
        (n,) = g.inputs_of(n)
        why = shared(g, n)
    if why:
        return None, why
    op = g.node(n)["op"]
    return (n, None) if op in PRODUCERS else (None, f"'{n}' is {an(op)}, which has no epilogue")


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
    whys = []
    for v, other in ((a, b), (b, a)):
        p, why = _producer(g, v, n)
        if p is None or v.name == other.name:
            whys.append(why or f"adds '{v.name}' to itself")
            continue
        pa = attrs(g, p)
        if pa.get("activation") or pa.get("residual"):
            whys.append(f"'{p}' applies {pa['activation']} first" if pa.get("activation")
                        else f"'{p}' adds a residual already")
            continue
        xs = ins(g, p)
        if other.type == out_type and v.type == out_type:              # a residual
            r = other if other.shape == g.node(p)["type"].shape else \
                reshape(other, g.node(p)["type"].shape, name=fresh(g, f"{other.name}.as_residual"))
            return _rebuild(g, p, xs + [r], dict(pa, residual=True), v, "residual")
        if v.type != out_type:
            whys.append(f"'{v.name}' {v.shape} is broadcast to {out_type.shape}")
        elif _has_bias(g, p):
            whys.append(f"'{p}' has a bias already and '{other.name}' {other.shape} is no residual")
        else:
            bias = _bias_input(g, p, other, v)
            if bias is not None:
                return _rebuild(g, p, xs + [bias], dict(pa, bias=True) if g.node(p)["op"] in BIAS_ATTR else pa,
                                v, "bias")
            whys.append(f"'{other.name}' {other.shape} is neither a residual nor one number per channel "
                        f"of '{p}'")
    return decline(n, "; ".join(dict.fromkeys(whys)))


def _fuse_activation(g: Graph, n: str):
    """An activation after a producer runs in the producer's epilogue."""
    (v,) = ins(g, n)
    p, why = _producer(g, v, n)
    if p is None:
        return decline(n, why)
    pa = attrs(g, p)
    if pa.get("activation"):
        return decline(n, f"'{p}' applies {pa['activation']} already")
    kind = g.node(n)["op"]
    return _rebuild(g, p, ins(g, p), dict(pa, **activations.fused_attrs(kind, attrs(g, n))), v, kind)


def _fuse_gated(g: Graph, n: str):
    """x * sigmoid(x) is silu(x); x * hardsigmoid(x) with PyTorch's alpha and
    beta is hardswish(x) (how exporters write them)."""
    a, b = ins(g, n)
    whys = []
    for x, gate in ((a, b), (b, a)):
        if gate.op not in ("sigmoid", "hardsigmoid") or g.inputs_of(gate.name) != [x.name]:
            continue
        why = shared(g, gate.name)
        if why:
            whys.append(why)
            continue
        if gate.op == "sigmoid":
            return silu(x, name=fresh(g, f"{gate.name}.silu"))
        ga = attrs(g, gate.name)
        if abs(ga["alpha"] - 1 / 6) < 1e-7 and ga["beta"] == 0.5:
            return hardswish(x, name=fresh(g, f"{gate.name}.hardswish"))
        whys.append(f"hardsigmoid '{gate.name}' has alpha {ga['alpha']:g}, beta {ga['beta']:g}, "
                    f"not hardswish's 1/6, 0.5")
    return decline(n, "; ".join(whys) or "not x·sigmoid(x) or x·hardsigmoid(x)")


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


def _pointwise_declined(g: Graph, n: str) -> str | None:
    """Why conv ``n`` is not the pointwise half of a separable pair (a 2D,
    unit-stride, unpadded, ungrouped 1×1 conv), or None."""
    a, w = attrs(g, n), ins(g, n)[1]
    if len(w.shape) != 4:
        return f"{len(w.shape) - 2}D, not 2D"
    for what, got, want in (("kernel", w.shape[2:], (1, 1)), ("stride", a["stride"], (1, 1)),
                            ("groups", a["groups"], 1), ("padding", a["padding"], ((0, 0), (0, 0)))):
        if got != want:
            return f"{what} {got}, not {want}"
    return None


def _depthwise_declined(g: Graph, n: str) -> str | None:
    """Why node ``n`` is not a 2D depthwise conv (one kernel per input
    channel), or None."""
    if g.node(n)["op"] != "conv":
        return f"is {an(g.node(n)['op'])}, not a conv"
    x, w = ins(g, n)[:2]
    if len(x.shape) != 4:
        return f"is {len(x.shape) - 2}D, not 2D"
    if attrs(g, n)["groups"] != x.shape[1] or w.shape[1] != 1:
        return f"has groups {attrs(g, n)['groups']} for {x.shape[1]} input channels"
    return None


def _macs(g: Graph, n: str) -> int:
    d = g.node(n)
    return get_op(d["op"]).macs(d["attrs"], [g.node(i)["type"] for i in g.inputs_of(n)], d["type"])


def _depthwise_alone(g: Graph, n: str) -> str | None:
    """Why depthwise conv ``n`` has no pointwise conv to fuse with (through
    one activation), or None when it has one (which then gives its own
    reason if the pair stays apart)."""
    why = shared(g, n)
    if why:
        return why
    user = only_user(g, n)
    if g.node(user)["op"] in activations.ACTIVATIONS:
        why = shared(g, user)
        if why:
            return why
        user = only_user(g, user)
    op = g.node(user)["op"]
    if op == "reshape" and only_user(g, user) and g.node(only_user(g, user))["op"] == "matmul":
        mm = only_user(g, user)                  # a 1x1 conv that conv_to_gemm lowered, or a user's GEMM
        return f"it feeds the GEMM '{mm}' ({_macs(g, mm):,} MACs) through a reshape, not a 1×1 conv"
    if op != "conv":
        return f"'{user}' after it is {an(op)}, not a 1×1 conv"
    why = _pointwise_declined(g, user)
    return f"conv '{user}' after it has {why}" if why else None


def _fuse_sep(g: Graph, n: str):
    if g.node(n)["op"] != "conv":
        return None
    why = _pointwise_declined(g, n)
    if why:
        dw_why = _depthwise_declined(g, n)
        if dw_why:
            return decline(n, f"neither pointwise ({why}) nor depthwise ({dw_why})")
        why = _depthwise_alone(g, n)
        return decline(n, f"depthwise, but {why}") if why else None
    mid, w_pw, *b_pw = ins(g, n)
    act = None
    dw = mid
    if attrs(g, n).get("residual"):
        return decline(n, "adds a residual; the fused kernel has none")
    if mid.op in activations.ACTIVATIONS:
        why = shared(g, mid.name)
        if why:
            return decline(n, why)
        act = activations.fused_attrs(mid.op, attrs(g, mid.name))
        (dw,) = ins(g, mid.name)
    why = _depthwise_declined(g, dw.name)
    if why:
        return decline(n, f"its input '{dw.name}' {why}")
    why = shared(g, dw.name)
    if why:
        return decline(n, f"its input {why}")
    tile = w_pw.shape[1] * g.node(dw.name)["type"].shape[3] * (8 if w_pw.dtype == "float64" else 4)
    if tile > MAX_TILE_BYTES:                    # the row tile lives on the stack
        return decline(n, f"row tile of {w_pw.shape[1]} channels × {g.node(dw.name)['type'].shape[3]} columns = "
                          f"{tile:,} B, above MAX_TILE_BYTES {MAX_TILE_BYTES:,} (on the stack)")
    da = attrs(g, dw.name)
    if act and da.get("activation"):
        return decline(n, f"'{dw.name}' applies {da['activation']} and '{mid.name}' follows it: two activations")
    if da.get("residual"):
        return decline(n, f"'{dw.name}' adds a residual; the fused kernel has none")
    x, w_dw, *b_dw = ins(g, dw.name)
    if any(len(b.shape) != 1 for b in b_dw + b_pw):       # the fused kernel takes tied biases only
        return decline(n, "an untied bias; the fused kernel takes one bias per channel")
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



"""Fusions: ``fold_batch_norm``, ``fuse_bias_activation``, ``fuse_separable``."""
from __future__ import annotations


from ..ir import Graph, Value
from ..ops.conv import conv
from ..ops.elementwise import ACTIVATIONS
from ..ops.norm import BatchNorm
from ..ops.tensor import reshape
from .manager import register
from .rewrite import attrs, fresh, ins, is_const, only_user, rewrite


def _conv_args(a):
    return dict(stride=a["stride"], padding=a["padding"], dilation=a["dilation"], groups=a["groups"],
                flip=a["flip"])


def _fold_bn(g: Graph, n: str):
    if g.node(n)["op"] != "batch_norm":
        return None
    x, mean, var, gamma, beta = ins(g, n)
    if x.op != "conv" or only_user(g, x.name) != n or attrs(g, x.name).get("activation"):
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


def _channel_bias(g: Graph, conv_out: Value, b: Value):
    """b as a (C,) conv bias if it adds one number per channel, else None."""
    shape = list(b.shape)
    c = conv_out.shape[1]
    while shape and shape[0] == 1 and len(shape) > len(conv_out.shape) - 1:
        shape.pop(0)
    if shape == [c] + [1] * (len(conv_out.shape) - 2) or (shape == [c] and len(conv_out.shape) == 2):
        return reshape(b, (c,), name=fresh(g, f"{b.name}.as_bias")) if tuple(b.shape) != (c,) else b
    return None


def _fuse_bias_act(g: Graph, n: str):
    d = g.node(n)
    if d["op"] == "add":
        a, b = ins(g, n)
        src, other = (a, b) if a.op == "conv" else (b, a)
        if src.op != "conv" or src.name == other.name or only_user(g, src.name) != n:
            return None
        sa = attrs(g, src.name)
        x, w, *old = ins(g, src.name)
        if old or sa.get("activation"):
            return None
        bias = _channel_bias(g, src, other)
        if bias is None or d["type"] != g.node(src.name)["type"]:
            return None
        return conv(x, w, bias, name=fresh(g, f"{src.name}.bias"), **_conv_args(sa))
    if d["op"] in ACTIVATIONS:
        (src,) = ins(g, n)
        if src.op != "conv" or only_user(g, src.name) != n:
            return None
        sa = attrs(g, src.name)
        slope = d["attrs"].get("negative_slope", 0.01)
        if sa.get("activation") or (d["op"] == "leaky_relu" and slope < 0):
            return None
        x, w, *b = ins(g, src.name)
        y = conv(x, w, b[0] if b else None, name=fresh(g, f"{src.name}.{d['op']}"), **_conv_args(sa))
        g.nx.nodes[y.name]["attrs"] = dict(g.node(y.name)["attrs"], activation=d["op"],
                                           **({"negative_slope": slope} if d["op"] == "leaky_relu" else {}))
        return y
    return None


@register
def fuse_bias_activation(g: Graph) -> Graph:
    """A per-channel ``add`` after a bias-free conv becomes the conv's bias,
    and a relu / leaky_relu / sigmoid / tanh after a conv is applied in the
    conv's output loop: no extra pass over memory."""
    g = rewrite(g, _fuse_bias_act)
    return rewrite(g, _fuse_bias_act)       # the activation after a freshly folded bias


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
    if mid.op in ACTIVATIONS:
        if only_user(g, mid.name) != n:
            return None
        act = (mid.op, attrs(g, mid.name).get("negative_slope", 0.01))
        (dw,) = ins(g, mid.name)
    if not _is_depthwise(g, dw.name) or only_user(g, dw.name) != (mid.name if act else n):
        return None
    tile = w_pw.shape[1] * g.node(dw.name)["type"].shape[3] * (8 if w_pw.dtype == "float64" else 4)
    if tile > MAX_TILE_BYTES:                    # the row tile lives on the stack
        return None
    da = attrs(g, dw.name)
    if act and da.get("activation"):
        return None
    x, w_dw, *b_dw = ins(g, dw.name)
    if any(len(b.shape) != 1 for b in b_dw + b_pw):       # the fused kernel takes tied biases only
        return None
    dw_act = act or ((da["activation"], da.get("negative_slope", 0.01)) if da.get("activation") else (None, 0.01))
    pa = attrs(g, n)
    fused = dict(dw_stride=da["stride"], dw_padding=da["padding"], dw_dilation=da["dilation"], dw_flip=da["flip"],
                 dw_bias=bool(b_dw), pw_bias=bool(b_pw), dw_activation=dw_act[0], dw_negative_slope=dw_act[1],
                 pw_activation=pa.get("activation"), pw_negative_slope=pa.get("negative_slope", 0.01))
    return g.add("fused_separable", [x, w_dw, w_pw, *b_dw, *b_pw], fused, fresh(g, f"{n}.fused"))


@register
def fuse_separable(g: Graph) -> Graph:
    """A depthwise conv (+ bias, + activation) feeding only a pointwise 1×1
    conv becomes ONE ``fused_separable`` op whose C kernel keeps the depthwise
    result in a one-row tile per channel instead of a full intermediate buffer
    (2D)."""
    return rewrite(g, _fuse_sep)



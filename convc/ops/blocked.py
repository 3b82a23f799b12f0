"""The blocked channel layout NCHWc and the direct convolutions over it.

A blocked tensor is (N, ceil(C/c), H, W, c): channel ``k`` of the plain
tensor is lane ``k % c`` of block ``k // c``. With ``c`` = the host's vector
width in elements, one vector holds ``c`` channels of one pixel, so a conv
kernel loads ``c`` output-channel weights as one vector, broadcasts one input
value and keeps a run of output pixels × a few channel blocks in registers
(oneDNN's and ONNX Runtime's NCHWc kernels work this way).

The lanes past C (the *padding channels* of the last block) hold finite
values that no consumer reads into a result: ``to_blocked`` writes zeros,
the weight blocks are zero there (so a conv multiplies them by 0), a pool or
an elementwise op keeps them per lane, ``from_blocked`` drops them.

Ops (the ``to_blocked_layout`` pass in convc/passes/blocked.py builds them):

- ``to_blocked(x, c)``: (N, C, H, W) -> (N, ceil(C/c), H, W, c), padding zero;
- ``from_blocked(x, channels)``: the inverse, dropping the padding channels;
- ``block_weights(w, kind, ci, co, flip)``: a conv's weights (or bias) in the
  order the kernels read them (a weight-only node: ``fold_params`` turns it
  into a constant at compile time);
- ``conv_nchwc(x, w[, b][, residual])``: a 2D conv (groups 1, or depthwise)
  with the standard epilogue; x blocked, or plain NCHW for a stem whose few
  input channels are not worth blocking; the output is blocked;
- ``max_pool_nchwc`` / ``global_avg_pool_nchwc``: the pools on blocked data.

``to_blocked`` and ``from_blocked`` are differentiable (each is the other's
adjoint). The others are inference-only: their gradient rule raises
"not differentiable: run the train pipeline, which keeps NCHW".
"""
from __future__ import annotations

import numpy as np

from .. import shapes
from ..errors import GraphError, RuleError
from ..ir import TensorType, Value
from . import epilogue
from .conv import Conv
from .pool import MaxPool
from .registry import Op, float_dtype, register, same_dtype
from .window import axes_context


# -- host facts: convc.host.probe() (vector bytes and registers from the compiler's target macros)
def block_size(dtype: str) -> int:
    """The channel block c for ``dtype``: one host vector of elements."""
    from ..host import probe
    return probe().lanes(dtype)


def vector_registers() -> int:
    """The host's vector registers (what a register tile may fill)."""
    from ..host import probe
    return probe().vector_registers


MIN_CHAINS = 8
"""Independent accumulators a tile needs to hide the FMA latency (latency ×
FMA ports: 4 × 2 on current x86 and Arm cores); a smaller tile is charged as
if it had this many. The tuner may override the whole choice (``blocking``)."""

CI_UNROLL = 4
"""Input lanes per unrolled step of the conv kernel's innermost loop: unrolled
over all 16 lanes of an AVX-512 block, gcc 12 schedules so many loads early
that it spills accumulators to the stack."""

MAX_OC_BLOCKS = 4
"""At most this many output-channel blocks per register tile."""


def widest_tile(out_x: int, oc_blocks: int, registers: int | None = None) -> int:
    """The most output columns a ``conv_nchwc`` register tile of
    ``oc_blocks`` channel blocks can hold: columns × blocks accumulators,
    one weight vector per block and one broadcast input in the registers."""
    return min(out_x, ((registers or vector_registers()) - oc_blocks - 1) // oc_blocks)


def default_blocking(out_x: int, oc_blocks: int, registers: int | None = None) -> dict:
    """The register tile of ``conv_nchwc`` (groups 1): ``ur_w`` output columns ×
    ``oc_blocks`` output-channel blocks of accumulators, plus one register per
    weight block and one for the broadcast input, within the host's vector
    registers. Among the tiles that fit, the one with the least estimated
    time for a row: per tile max(FMAs, loads, MIN_CHAINS), summed over the
    tiles that cover ``out_x`` columns × ``oc_blocks`` blocks (edges
    included)."""
    best = None
    for nb in range(1, min(MAX_OC_BLOCKS, oc_blocks) + 1):
        ur = widest_tile(out_x, nb, registers)
        if ur < 1:
            continue
        cost = 0
        for cols in [ur] * (out_x // ur) + ([out_x % ur] if out_x % ur else []):
            for blocks in [nb] * (oc_blocks // nb) + ([oc_blocks % nb] if oc_blocks % nb else []):
                cost += max(cols * blocks, cols + blocks, MIN_CHAINS)
        if best is None or cost < best[0]:
            best = (cost, dict(ur_w=ur, oc_blocks=nb))
    return best[1]


def depthwise_ur(out_x: int, registers: int | None = None) -> int:
    """Output columns per depthwise tile: one accumulator each, plus the weight
    vector and a loaded input vector."""
    return max(1, min(out_x, (registers or vector_registers()) - 2))


def segments(lo: int, hi: int, ur: int, edge: bool) -> list[dict]:
    """Columns [lo, hi) as tiles of ``ur`` plus one narrower last tile: one
    loop per width, ``edge`` saying whether the taps need bounds checks."""
    full = (hi - lo) // ur * ur
    out = [dict(start=lo, end=lo + full, ur=ur, edge=int(edge))] if full else []
    if hi - lo - full:
        out.append(dict(start=lo + full, end=hi, ur=hi - lo - full, edge=int(edge)))
    return out


def row_segments(out_x: int, first: int, end: int, ur: int) -> list[dict]:
    """An output row as tiles: the left border [0, first) and the right border
    [end, out_x) check their taps, the interior [first, end) does not."""
    return segments(0, first, ur, True) + segments(first, end, ur, False) + segments(end, out_x, ur, True)


def _not_differentiable(op: str, y: Value):
    raise GraphError(f"op {op!r} (node %{y.name}) is not differentiable: the blocked layout is for inference; "
                     f"run the train pipeline, which keeps NCHW")


def _int_attr(attrs, key, lo=1):
    v = attrs.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise RuleError(f"{key} must be an int >= {lo}, got {v!r}")
    return int(v)


def _blocked(t: TensorType, what="input") -> None:
    if len(t.shape) != 5:
        raise RuleError(f"{what} must be blocked (N, C/c, H, W, c), got rank {len(t.shape)}")


# -- reorders ------------------------------------------------------------------
def to_blocked(x: Value, c: int, name=None) -> Value:
    """(N, C, H, W) -> (N, ceil(C/c), H, W, c); channels past C are zero."""
    return x.graph.add("to_blocked", [x], {"c": c}, name)


def from_blocked(x: Value, channels: int, name=None) -> Value:
    """(N, C/c, H, W, c) -> (N, channels, H, W): the first ``channels`` channels."""
    return x.graph.add("from_blocked", [x], {"channels": channels}, name)


def block_array(x: np.ndarray, c: int) -> np.ndarray:
    """numpy: (N, C, *spatial) -> (N, ceil(C/c), *spatial, c), zero padding."""
    n, ch, *sp = x.shape
    cb = shapes.ceil_div(ch, c)
    xp = np.zeros((n, cb * c, *sp), x.dtype)
    xp[:, :ch] = x
    return np.moveaxis(xp.reshape(n, cb, c, *sp), 2, -1)


def unblock_array(x: np.ndarray, channels: int | None = None) -> np.ndarray:
    """numpy: (N, CB, *spatial, c) -> (N, channels, *spatial)."""
    n, cb, *sp, c = x.shape
    y = np.moveaxis(x, -1, 2).reshape(n, cb * c, *sp)
    return y[:, :channels] if channels is not None else y


@register
class ToBlocked(Op):
    """NCHW -> NCHWc (one parallel iteration per (image, channel block))."""
    name = "to_blocked"
    template = "blocked_reorder"

    def normalize(self, attrs, types):
        if len(types[0].shape) != 4:
            raise RuleError(f"input must be NCHW (rank 4), got rank {len(types[0].shape)}")
        return {"c": _int_attr(attrs, "c")}

    def infer(self, attrs, types):
        n, ch, h, w = types[0].shape
        return TensorType((n, shapes.ceil_div(ch, attrs["c"]), h, w, attrs["c"]), types[0].dtype)

    def grad(self, attrs, xs, y, gy, needs):
        return [from_blocked(gy, xs[0].shape[1])]

    def reference(self, attrs, x):
        return block_array(x, attrs["c"])

    def context(self, attrs, types, out):
        n, ch, h, w = types[0].shape
        return dict(direction="to", N=n, C=ch, CB=out.shape[1], HW=h * w, C_BLK=attrs["c"],
                    par=[("n", "N", n), ("cb", "CB", out.shape[1])])


@register
class FromBlocked(Op):
    """NCHWc -> NCHW (one parallel iteration per (image, channel block))."""
    name = "from_blocked"
    template = "blocked_reorder"

    def normalize(self, attrs, types):
        _blocked(types[0])
        ch = _int_attr(attrs, "channels")
        cb, c = types[0].shape[1], types[0].shape[4]
        if not (cb - 1) * c < ch <= cb * c:
            raise RuleError(f"channels={ch} does not fit {cb} blocks of {c}: must be in ({(cb - 1) * c}, {cb * c}]")
        return {"channels": ch}

    def infer(self, attrs, types):
        n, _, h, w, _ = types[0].shape
        return TensorType((n, attrs["channels"], h, w), types[0].dtype)

    def grad(self, attrs, xs, y, gy, needs):
        return [to_blocked(gy, xs[0].shape[4])]

    def reference(self, attrs, x):
        return unblock_array(x, attrs["channels"])

    def context(self, attrs, types, out):
        n, cb, h, w, c = types[0].shape
        return dict(direction="from", N=n, C=attrs["channels"], CB=cb, HW=h * w, C_BLK=c,
                    par=[("n", "N", n), ("cb", "CB", cb)])


WEIGHT_KINDS = ("conv", "depthwise", "bias")


def block_weights(w: Value, kind: str, ci: int = 1, co: int = 1, flip: bool = False, name=None) -> Value:
    """A conv's weights or bias in the order ``conv_nchwc`` reads them, zero
    where a block runs past the real channels:

    - ``conv``: (O, I, KH, KW) -> (ceil(O/co), ceil(I/ci), KH, KW, ci, co);
    - ``depthwise``: (C, 1, KH, KW) -> (ceil(C/co), KH, KW, co);
    - ``bias``: (C,) -> (ceil(C/co), co).

    ``flip`` reverses the kernel (a true convolution becomes a correlation)."""
    return w.graph.add("block_weights", [w], dict(kind=kind, ci=ci, co=co, flip=flip), name)


@register
class BlockWeights(Op):
    """Weights or bias -> the blocked order of conv_nchwc (inference-only)."""
    name = "block_weights"
    template = "blocked_weights"
    inputs = ("w",)

    def normalize(self, attrs, types):
        kind = attrs.get("kind")
        if kind not in WEIGHT_KINDS:
            raise RuleError(f"kind must be one of {WEIGHT_KINDS}, got {kind!r}")
        rank = {"conv": 4, "depthwise": 4, "bias": 1}[kind]
        w = types[0]
        if len(w.shape) != rank:
            raise RuleError(f"{kind} weights must have rank {rank}, got {w.shape}")
        if kind == "depthwise" and w.shape[1] != 1:
            raise RuleError(f"depthwise weights must be (C, 1, KH, KW), got {w.shape}")
        flip = attrs.get("flip", False)
        if flip not in (True, False):
            raise RuleError(f"flip must be True or False, got {flip!r}")
        return dict(kind=kind, ci=_int_attr(attrs, "ci") if kind == "conv" else 1, co=_int_attr(attrs, "co"),
                    flip=bool(flip) and kind != "bias")

    def infer(self, attrs, types):
        w = types[0].shape
        ci, co = attrs["ci"], attrs["co"]
        cb = shapes.ceil_div(w[0], co)
        out = {"conv": lambda: (cb, shapes.ceil_div(w[1], ci), w[2], w[3], ci, co),
               "depthwise": lambda: (cb, w[2], w[3], co),
               "bias": lambda: (cb, co)}[attrs["kind"]]()
        return TensorType(out, types[0].dtype)

    def grad(self, attrs, xs, y, gy, needs):
        _not_differentiable(self.name, y)

    def reference(self, attrs, w):
        if attrs["flip"]:
            w = w[:, :, ::-1, ::-1]
        ci, co = attrs["ci"], attrs["co"]
        ob = shapes.ceil_div(w.shape[0], co)
        wp = np.zeros((ob * co,) + w.shape[1:], w.dtype)
        wp[:w.shape[0]] = w
        if attrs["kind"] == "bias":
            return wp.reshape(ob, co)
        if attrs["kind"] == "depthwise":               # (CB, co, KH, KW) -> (CB, KH, KW, co)
            return wp.reshape(ob, co, *w.shape[2:]).transpose(0, 2, 3, 1).copy()
        ib = shapes.ceil_div(w.shape[1], ci)
        wq = np.zeros((ob * co, ib * ci) + w.shape[2:], w.dtype)
        wq[:, :w.shape[1]] = wp                        # (OB, co, IB, ci, KH, KW) -> (OB, IB, KH, KW, ci, co)
        return wq.reshape(ob, co, ib, ci, *w.shape[2:]).transpose(0, 2, 4, 5, 3, 1).copy()

    def context(self, attrs, types, out):
        w = types[0].shape
        k = (w[2], w[3]) if attrs["kind"] != "bias" else (1, 1)
        return dict(kind=attrs["kind"], O=w[0], I=w[1] if attrs["kind"] == "conv" else 1, KY=k[0], KX=k[1],
                    CI=attrs["ci"], CO=attrs["co"], OB=out.shape[0], flip=attrs["flip"],
                    IB=out.shape[1] if attrs["kind"] == "conv" else 1,
                    par=[("ob", "OB", out.shape[0])])


# -- the convolution ---------------------------------------------------------------
def conv_nchwc(x: Value, w: Value, bias: Value | None = None, stride=1, padding=0, dilation=1, blocking=None,
               name=None) -> Value:
    """2D convolution over NCHWc. ``x``: blocked (N, IB, H, W, ci), or plain
    (N, C, H, W) (read as blocks of one channel: a stem). ``w`` from
    :func:`block_weights`: (OB, IB, KH, KW, ci, co) for groups 1 (IB = C and
    ci = 1 for a plain x), (CB, KH, KW, c) for a depthwise conv (blocked x,
    one channel per group). ``bias``: (OB, co). Returns (N, OB, OH, OW, co).
    ``blocking``: the register tile {"ur_w": columns, "oc_blocks": blocks}
    (groups 1; default :func:`default_blocking`) or {"ur_w": columns}
    (depthwise; default :func:`depthwise_ur`), for the tuner."""
    ins = [x, w] + ([bias] if bias is not None else [])
    attrs = dict(stride=stride, padding=padding, dilation=dilation)
    if blocking is not None:
        attrs["blocking"] = blocking
    return x.graph.add("conv_nchwc", ins, attrs, name)


def _nchwc_geometry(attrs, x: TensorType, w: TensorType):
    """(depthwise?, plain equivalent attrs, blocked output shape) of a conv_nchwc."""
    from .conv import conv_geometry
    if len(x.shape) not in (4, 5):
        raise RuleError(f"input must be blocked (N, C/c, H, W, c) or plain NCHW, got rank {len(x.shape)}")
    if len(w.shape) == 6:
        ob, ib, kh, kw, ci, co = w.shape
        cin, want = (x.shape[1], (x.shape[1], 1)) if len(x.shape) == 4 else (x.shape[1] * x.shape[4],
                                                                             (x.shape[1], x.shape[4]))
        if (ib, ci) != want:
            raise RuleError(f"weight blocks (IB, ci) = {(ib, ci)} must match the input's {want} "
                            f"(weight (OB, IB, KH, KW, ci, co) from block_weights)")
        plain_w, groups, depthwise = (ob * co, cin, kh, kw), 1, False
    elif len(w.shape) == 4:
        cb, kh, kw, co = w.shape
        if len(x.shape) != 5 or (x.shape[1], x.shape[4]) != (cb, co):
            raise RuleError(f"depthwise weight (CB, KH, KW, c) = {w.shape} needs a blocked input of {cb} blocks "
                            f"of {co}, got {x.shape}")
        cin = cb * co
        plain_w, groups, depthwise = (cin, 1, kh, kw), cin, True
    else:
        raise RuleError(f"weight must be (OB, IB, KH, KW, ci, co) or depthwise (CB, KH, KW, c), got rank "
                        f"{len(w.shape)}")
    plain_x = TensorType((x.shape[0], cin) + tuple(x.shape[2:4]), x.dtype)
    geo = dict(stride=attrs.get("stride", 1), padding=attrs.get("padding", 0), dilation=attrs.get("dilation", 1),
               groups=groups)
    geo, out = conv_geometry(geo, plain_x, TensorType(plain_w, w.dtype))
    return depthwise, geo, (out[0], shapes.ceil_div(out[1], co), out[2], out[3], co)


@register
class ConvNCHWc(Op):
    """Inputs x, w, an optional bias and, with ``residual=True``, the
    residual (blocked like the output) last. Inference-only."""
    name = "conv_nchwc"
    arity = (2, 4)
    inputs = ("x", "w", "b")

    def normalize(self, attrs, types):
        own = epilogue.split(attrs, types)[0]
        if len(own) < 2:
            raise RuleError("takes x and w (and an optional bias)")
        _, geo, _ = _nchwc_geometry(attrs, own[0], own[1])
        out = dict(epilogue.normalize(attrs), stride=geo["stride"], padding=geo["padding"], dilation=geo["dilation"])
        blocking = attrs.get("blocking")
        if blocking is not None:
            keys = ("ur_w",) if len(own[1].shape) == 4 else ("ur_w", "oc_blocks")
            if not isinstance(blocking, dict) or set(blocking) != set(keys):
                raise RuleError(f"blocking must be a dict with keys {keys}, got {blocking!r}")
            out["blocking"] = {k: _int_attr(blocking, k) for k in keys}
        return out

    def infer(self, attrs, types):
        dtype = same_dtype(types)
        float_dtype(types[0])
        own = epilogue.split(attrs, types)[0]
        if len(own) > 3:
            raise RuleError("takes x, w and an optional bias (and a residual with residual=True)")
        _, _, out = _nchwc_geometry(attrs, own[0], own[1])
        out_t = TensorType(out, dtype)
        epilogue.check(attrs, types, out_t)
        if len(own) == 3 and own[2].shape != (out[1], out[4]):
            raise RuleError(f"bias must be blocked ({out[1]}, {out[4]}) (block_weights kind='bias'), got "
                            f"{own[2].shape}")
        return out_t

    def grad(self, attrs, xs, y, gy, needs):
        _not_differentiable(self.name, y)

    def reference(self, attrs, *xs):
        own, r = epilogue.split(attrs, xs)
        x, w = own[:2]
        depthwise, geo, _ = _nchwc_geometry(attrs, TensorType(x.shape, str(x.dtype)), TensorType(w.shape, str(w.dtype)))
        xp = unblock_array(x) if x.ndim == 5 else x
        if depthwise:                                  # (CB, KH, KW, c) -> (CB*c, 1, KH, KW)
            wp = w.transpose(0, 3, 1, 2).reshape(-1, 1, *w.shape[1:3])
        else:                                          # (OB, IB, KH, KW, ci, co) -> (OB*co, IB*ci, KH, KW)
            ob, ib, kh, kw, ci, co = w.shape
            wp = w.transpose(0, 5, 1, 4, 2, 3).reshape(ob * co, ib * ci, kh, kw)
        b = own[2].reshape(-1) if len(own) == 3 else None
        y = Conv.convolve(dict(geo, flip=False), xp, wp, b)
        return epilogue.reference(attrs, block_array(y, w.shape[-1]), r)

    def template_of(self, attrs, types):
        return "conv_nchwc_depthwise" if len(types[1].shape) == 4 else "conv_nchwc"

    def context(self, attrs, types, out):
        own = epilogue.split(attrs, types)[0]
        x, w = own[:2]
        n, ob, oh, ow, co = out.shape
        plain = len(x.shape) == 4
        axes = axes_context(x.shape[2:4], (oh, ow), w.shape[-4:-2] if len(w.shape) == 6 else w.shape[1:3],
                            attrs["stride"], attrs["dilation"], attrs["padding"])
        ay, ax = axes
        first, end = shapes.interior(ax["i"], ow, ax["k"], ax["s"], ax["d"], ax["p"])
        ctx = dict(axes=axes, N=n, OB=ob, C_BLK=co, bias=len(own) == 3, X_FIRST=first, X_END=end,
                   VBYTES=co * np.dtype(out.dtype).itemsize)
        blocking = attrs.get("blocking")
        if len(w.shape) == 4:                          # depthwise: one channel block per iteration
            ur = (blocking or {}).get("ur_w") or depthwise_ur(ow)
            return dict(ctx, UR=min(ur, ow), segments=row_segments(ow, first, end, min(ur, ow)),
                        par=[("n", "N", n), ("cb", "CB", ob), ("oy", "OUT_Y", oh)])
        tile = blocking or default_blocking(ow, ob)
        ur, nb = min(tile["ur_w"], ow), min(tile["oc_blocks"], ob)
        groups = shapes.ceil_div(ob, nb)
        return dict(ctx, UR=ur, NB=nb, CI_UNROLL=min(CI_UNROLL, w.shape[4]), NB_LAST=ob - (groups - 1) * nb, OG=groups, segments=row_segments(
            ow, first, end, ur), IB=w.shape[1], IC_BLK=w.shape[4], plain=plain,
            par=[("n", "N", n), ("og", "OG", groups), ("oy", "OUT_Y", oh)])

    def macs(self, attrs, types, out):
        w = epilogue.split(attrs, types)[0][1].shape
        per_output = w[1] * w[2] * w[3] * w[4] if len(w) == 6 else w[1] * w[2]
        return shapes.prod(out.shape) * per_output


# -- pools -------------------------------------------------------------------------
def max_pool_nchwc(x: Value, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, name=None) -> Value:
    """``max_pool`` (PyTorch semantics) of a blocked (N, CB, H, W, c) tensor, per lane."""
    attrs = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode)
    return x.graph.add("max_pool_nchwc", [x], attrs, name)


def global_avg_pool_nchwc(x: Value, name=None) -> Value:
    """The mean over H and W of a blocked tensor: (N, CB, 1, 1, c)."""
    return x.graph.add("global_avg_pool_nchwc", [x], {}, name)


def _plain_view(t: TensorType) -> TensorType:
    """A blocked type seen as NCHW with every lane a channel (for the pools' rules)."""
    _blocked(t)
    n, cb, h, w, c = t.shape
    return TensorType((n, cb * c, h, w), t.dtype)


@register
class MaxPoolNCHWc(MaxPool):
    """max_pool over NCHWc: each lane (channel) pooled on its own, NaN
    propagating as in PyTorch. Inference-only."""
    name = "max_pool_nchwc"
    template = "pool_blocked"

    def normalize(self, attrs, types):
        attrs = MaxPool.normalize(self, attrs, [_plain_view(types[0])])
        if len(attrs["kernel_size"]) != 2:
            raise RuleError("max_pool_nchwc is 2D")
        return attrs

    def infer(self, attrs, types):
        y = MaxPool.infer(self, attrs, [_plain_view(types[0])])
        return TensorType(types[0].shape[:2] + y.shape[2:] + types[0].shape[4:], y.dtype)

    def grad(self, attrs, xs, y, gy, needs):
        _not_differentiable(self.name, y)

    def reference(self, attrs, x):
        return block_array(MaxPool.reference(self, attrs, unblock_array(x)), x.shape[4])

    def context(self, attrs, types, out):
        n, cb, h, w, c = types[0].shape
        axes = axes_context((h, w), out.shape[2:4], attrs["kernel_size"], attrs["stride"], attrs["dilation"],
                            attrs["padding"])
        ax = axes[1]
        first, end = shapes.interior(ax["i"], ax["o"], ax["k"], ax["s"], ax["d"], ax["p"])
        size = np.dtype(out.dtype).itemsize
        return dict(kind="max", N=n, CB=cb, C_BLK=c, axes=axes, X_FIRST=first, X_END=end, VBYTES=c * size,
                    MASK_T=f"int{8 * size}_t", par=[("n", "N", n), ("cb", "CB", cb), ("oy", "OUT_Y", out.shape[2])])


@register
class GlobalAvgPoolNCHWc(Op):
    """global_avg_pool over NCHWc: the mean over H, W of every lane. Inference-only."""
    name = "global_avg_pool_nchwc"
    template = "pool_blocked"

    def infer(self, attrs, types):
        _blocked(types[0])
        float_dtype(types[0])
        n, cb, _, _, c = types[0].shape
        return TensorType((n, cb, 1, 1, c), types[0].dtype)

    def grad(self, attrs, xs, y, gy, needs):
        _not_differentiable(self.name, y)

    def reference(self, attrs, x):
        return x.mean(axis=(2, 3), keepdims=True)

    def context(self, attrs, types, out):
        n, cb, h, w, c = types[0].shape
        return dict(kind="global_avg", N=n, CB=cb, C_BLK=c, HW=h * w, par=[("n", "N", n), ("cb", "CB", cb)])

"""``fold_qdq``: the integer ops hidden in a QDQ graph.

A QDQ model (ONNX's QuantizeLinear / DequantizeLinear pairs, what
``onnxruntime.quantization.quantize_static`` writes by default) spells an int8
layer as float ops between a dequantize and a quantize::

    dequantize(xq) -> conv(., dequantize(wq), b) [-> relu] -> quantize   ==   qconv(xq, wq, bq)

Computed in float it is already correct (that is the format's meaning, and
what runs where no rule below matches); this pass replaces each ``quantize``
whose float producer reads dequantized operands by the integer op that
computes it, so the C accumulates in int32 and requantizes in fixed point
(:mod:`convc.quant`) like ONNX Runtime's QLinear kernels. What a rule matches
(the ``quantize`` output is per tensor; ``dequantize`` inputs per tensor,
weights per tensor or per output channel, and constant):

- conv / dense / matmul of a dequantized input and a dequantized constant
  weight, with a constant float bias (re-quantized to int32 at the scale
  ``x_scale * w_scale``: :func:`convc.quant.quantize_bias`), optionally
  through relu or clip(0, 6), which fold into the output clamp
  -> ``qconv`` / ``qdense`` / ``qmatmul``;
- add of two dequantized tensors (relu folded) -> ``qadd``;
  concat -> ``qconcat``; avg_pool / global_avg_pool -> ``qavg_pool`` /
  ``qglobal_avg_pool``;
- max_pool, reshape and relu of a dequantized tensor re-quantized with the
  same scale and zero point -> the op on the integers (max and reshape
  commute with the affine map; relu is a clip at the zero point);
- ``quantize(dequantize(xq))`` with the same parameters -> ``xq``.

The float op is left for any other consumer; what nothing reads any more is
removed. The importer runs this pass on QDQ models (``from_onnx(...,
fold_qdq=True)``), so every pipeline, the embedded export included, gets the
integer kernels.
"""
from __future__ import annotations

import numpy as np

from ..errors import ConvcError
from ..ir import Graph, Value
from ..ops import epilogue
from ..ops.elementwise import clip
from ..ops.pool import max_pool
from ..ops.quantized import activation_clamp, qadd, qavg_pool, qconcat, qconv, qdense, qglobal_avg_pool, qmatmul
from ..ops.tensor import reshape
from ..quant import qrange, quantize_bias
from .manager import register
from .rewrite import attrs, fresh, ins, is_const, rewrite


class _DQ:
    """A dequantized operand: the integers ``q`` and their parameters."""

    def __init__(self, g: Graph, v: Value):
        a = attrs(g, v.name)
        self.q = ins(g, v.name)[0]
        self.scale, self.zero_point, self.axis = a["scale"], a["zero_point"], a["axis"]

    @property
    def per_tensor(self) -> bool:
        return self.axis is None

    def same(self, q: dict) -> bool:
        """Whether quantize attributes ``q`` undo this dequantize exactly."""
        return (self.per_tensor and q["axis"] is None and self.scale == q["scale"]
                and self.zero_point == q["zero_point"] and self.q.dtype == q["dtype"])


def _dq(g: Graph, v: Value) -> _DQ | None:
    return _DQ(g, v) if v.op == "dequantize" else None


def _weight(g: Graph, v: Value, channel_axis: int) -> _DQ | None:
    """A dequantized constant weight, per tensor or per ``channel_axis``."""
    d = _dq(g, v)
    if d is None or not is_const(g, d.q):
        return None
    if d.axis is not None and d.axis != channel_axis % len(v.shape):
        return None
    return d


def _bias(g: Graph, b: list[Value], n_out: int, x_scale: float, w_scale) -> Value | None | bool:
    """The int32 bias (a new param), None without one, False if it cannot be
    made (not a constant, or not one number per output channel)."""
    if not b:
        return None
    (b,) = b
    if not is_const(g, b) or b.shape != (n_out,):
        return False
    scales = np.broadcast_to(np.asarray(w_scale, np.float64), (n_out,))
    q = quantize_bias(g.node(b.name)["value"], x_scale, scales)
    return g.param(fresh(g, f"{b.name}.int32"), q, "int32")


def _activation(g: Graph, f: Value, q: dict):
    """(source of the float op, clamp) when ``f`` is a relu or relu6 whose
    effect is a clamp of the quantized output; (f, None) otherwise."""
    if f.op == "relu":
        kind = "relu"
    elif f.op == "clip" and attrs(g, f.name)["min"] == 0 and attrs(g, f.name)["max"] in (6.0, np.inf):
        kind = "relu6" if attrs(g, f.name)["max"] == 6.0 else "relu"
    else:
        return f, None
    return ins(g, f.name)[0], activation_clamp(kind, q["scale"][0], q["zero_point"][0], q["dtype"])


def _out(q: dict, clamp) -> dict:
    return dict(y_scale=q["scale"][0], y_zero_point=q["zero_point"][0], dtype=q["dtype"], clamp=clamp)


def _weighted(g, src):
    """The integer operands of a conv or dense whose input and weight are
    dequantized (input per tensor, weight per output channel or tensor) and
    whose bias is a constant: (x dequantize, w dequantize, int32 bias or
    None), or None when the op is not of that form."""
    x, w, *b = ins(g, src.name)
    dx, dw = _dq(g, x), _weight(g, w, 0)
    if dx is None or not dx.per_tensor or dw is None:
        return None
    bq = _bias(g, b, w.shape[0], dx.scale[0], dw.scale)
    return None if bq is False else (dx, dw, bq)


def _int_weights(dx, dw) -> dict:
    return dict(x_scale=dx.scale, x_zero_point=dx.zero_point, w_scale=dw.scale, w_zero_point=dw.zero_point)


def _conv(g, n, src, q, clamp):
    a = attrs(g, src.name)
    ops = None if a.get("flip") or epilogue.active(a) else _weighted(g, src)
    if ops is None:
        return None
    dx, dw, bq = ops
    return qconv(dx.q, dw.q, bq, **_int_weights(dx, dw), stride=a["stride"], padding=a["padding"],
                 dilation=a["dilation"], groups=a["groups"], name=fresh(g, f"{n}.qconv"), **_out(q, clamp))


def _dense(g, n, src, q, clamp):
    ops = None if epilogue.active(attrs(g, src.name)) else _weighted(g, src)
    if ops is None:
        return None
    dx, dw, bq = ops
    return qdense(dx.q, dw.q, bq, **_int_weights(dx, dw), name=fresh(g, f"{n}.qdense"), **_out(q, clamp))


def _matmul(g, n, src, q, clamp):
    if any(attrs(g, src.name).get(k) for k in ("bias", "transpose_a")) or epilogue.active(attrs(g, src.name)):
        return None
    a, b = ins(g, src.name)
    da, db = _dq(g, a), _dq(g, b)
    if da is None or db is None or not da.per_tensor or (db.axis is not None and db.axis != len(b.shape) - 1):
        return None
    return qmatmul(da.q, db.q, a_scale=da.scale, a_zero_point=da.zero_point, b_scale=db.scale,
                   b_zero_point=db.zero_point, name=fresh(g, f"{n}.qmatmul"), **_out(q, clamp))


def _add(g, n, src, q, clamp):
    da, db = (_dq(g, v) for v in ins(g, src.name))
    if da is None or db is None or not (da.per_tensor and db.per_tensor):
        return None
    return qadd(da.q, db.q, a_scale=da.scale, a_zero_point=da.zero_point, b_scale=db.scale,
                b_zero_point=db.zero_point, name=fresh(g, f"{n}.qadd"), **_out(q, clamp))


def _concat(g, n, src, q, clamp):
    ds = [_dq(g, v) for v in ins(g, src.name)]
    if clamp is not None or any(d is None or not d.per_tensor for d in ds):
        return None
    return qconcat([d.q for d in ds], attrs(g, src.name)["axis"], x_scales=[d.scale[0] for d in ds],
                   x_zero_points=[d.zero_point[0] for d in ds], y_scale=q["scale"][0],
                   y_zero_point=q["zero_point"][0], dtype=q["dtype"], name=fresh(g, f"{n}.qconcat"))


def _avg_pool(g, n, src, q, clamp):
    (x,) = ins(g, src.name)
    dx = _dq(g, x)
    if dx is None or not dx.per_tensor:
        return None
    a = attrs(g, src.name)
    return qavg_pool(dx.q, a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"],
                     x_scale=dx.scale, x_zero_point=dx.zero_point, name=fresh(g, f"{n}.qavg_pool"),
                     **_out(q, clamp))


def _global_avg_pool(g, n, src, q, clamp):
    (x,) = ins(g, src.name)
    dx = _dq(g, x)
    if dx is None or not dx.per_tensor:
        return None
    return qglobal_avg_pool(dx.q, x_scale=dx.scale, x_zero_point=dx.zero_point,
                            name=fresh(g, f"{n}.qglobal_avg_pool"), **_out(q, clamp))


def _same_params(g, n, src, q, clamp):
    """Ops that commute with the affine map q -> scale * (q - zp): run on
    the integers when the output is quantized as the input was."""
    (x,) = ins(g, src.name)
    dx = _dq(g, x)
    if dx is None or not dx.same(q):
        return None
    name = fresh(g, f"{n}.{src.op}")
    a = attrs(g, src.name)
    if src.op == "max_pool":
        y = max_pool(dx.q, a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"], name=name)
    elif src.op == "reshape":
        y = reshape(dx.q, src.shape, name=name)
    else:                                   # dequantize: quantize(dequantize(xq)) is xq
        y = dx.q
    if clamp is not None:                   # relu / relu6 after it: a clip of the integers
        lo, hi = clamp
        full = qrange(q["dtype"])
        y = clip(y, lo if lo > full[0] else None, hi if hi < full[1] else None, name=fresh(g, f"{n}.clamp"))
    return y


_RULES = {"conv": _conv, "dense": _dense, "matmul": _matmul, "add": _add, "concat": _concat,
          "avg_pool": _avg_pool, "global_avg_pool": _global_avg_pool, "max_pool": _same_params,
          "reshape": _same_params, "dequantize": _same_params}


def _fold(g: Graph, n: str):
    q = attrs(g, n)
    if q["axis"] is not None:
        return None
    (f,) = ins(g, n)
    src, clamp = _activation(g, f, q)
    rule = _RULES.get(src.op)
    if rule is None:
        return None
    try:
        y = rule(g, n, src, q, clamp)
    except ConvcError:          # a rule of the integer op refused it (e.g. int32 accumulator bound): stay float
        return None
    return y


@register
def fold_qdq(g: Graph) -> Graph:
    """dequantize -> float op -> quantize becomes the integer op (qconv,
    qdense, qmatmul, qadd, qconcat, qavg_pool, qglobal_avg_pool, or max_pool /
    reshape / clip on the integers); what matches no rule stays in float
    between its dequantize and quantize, which computes the same model."""
    return rewrite(g, {"quantize": _fold})

"""The ``quantize_int8`` pass: a calibrated float graph -> an int8 graph.

Input: a float graph whose float values carry a calibrated range (node data
``"qrange" = (lo, hi)``, set by :func:`convc.calibration.calibrate`). Output:
the same computation with int8 activations, int8 weights (symmetric, per
output channel unless a node says ``"per_channel": False``) and int32
biases, in the arithmetic of :mod:`convc.quant`. Each layer keeps its name;
an int8 node carries node data ``"qparams" = (scale, zero_point)`` (what
its integers stand for) and ``"int8_form"`` (how the pass computed it).

How each op is mapped (``INT8_FORMS``, one function per op):

- a float graph input -> ``quantize`` with its range's (scale, zero point);
- ``conv`` (bias and a relu / relu6 epilogue) -> ``qconv``: weights by
  ``quant.quantize_weights``, bias by ``quant.quantize_bias``, the
  activation folded into the output clamp (``quantized.activation_clamp``);
  ``flip=True`` flips the weights;
- ``dense`` -> ``qdense`` (the same weights, bias and clamp);
- ``add`` -> ``qadd``, ``concat`` -> ``qconcat``, ``avg_pool`` ->
  ``qavg_pool``, ``global_avg_pool`` -> ``qglobal_avg_pool``, each with
  its own output scale and zero point from its calibrated range (a relu or
  relu6 that alone reads a sum folds into the qadd's clamp: ResNet blocks);
- every op of the activation table (hardswish, sigmoid, tanh, relu, ...)
  -> ``qlookup``, a 256-entry int8 table of its numpy meaning;
- ``max_pool``, ``reshape``, ``flatten`` -> the same op on int8 (max and
  copies commute with a monotone quantization: the input's scale and zero
  point carry over);
- any other op, and any node whose int8 form refuses it (an untied bias,
  computed weights, an accumulator that could overflow): the float op
  between ``dequantize`` and ``quantize`` (a *float fallback*, named in
  the notes);
- graph outputs -> ``dequantize``: the int8 graph takes and returns floats.

The ``split_int8_epilogues`` pass (run by calibration, before observing)
splits the epilogue parts no int8 producer keeps (a residual add, an
activation other than relu / relu6) into their own nodes, so each has a
calibrated range and an int8 form.

A value is quantized or dequantized once, where a consumer needs it, so a
dequantize is never followed by a quantize of the same params; a graph built
with such pairs (imported QDQ) has them cancelled (``cancel_requantize``).
When the graph inputs carry calibration samples (node data
``"calibration"``), the notes give per layer the scale, zero point, and the
error of the int8 layer against the float one on those samples.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import ValidationError
from ..ir import FLOAT_DTYPES, Graph, Value
from ..ops import activations
from ..ops.registry import OPS
from ..quant import choose_qparams, quantize_bias, quantize_weights
from .manager import register
from .rewrite import attrs, fresh, only_user, operands, reactivate, rewrite

DTYPE = "int8"
"""The dtype of every quantized activation the pass makes."""


def _note(text: str) -> None:
    """A line for this pass's PassReport notes (``convc passes`` shows them)."""
    from .. import tuning
    tuning.note(text)


def qparams_of(g: Graph, n: str) -> tuple[float, int]:
    """(scale, zero point) of node ``n``'s calibrated range; a
    CalibrationError naming the node when it has none."""
    from ..calibration import CalibrationError

    d = g.node(n)
    r = d.get("qrange")
    if r is None and d["op"] == "param":          # a constant's range is its values'
        v = np.asarray(d["value"], np.float64)
        r = (float(v.min()), float(v.max()))
    if r is None:
        d = g.node(n)
        ins = ", ".join(f"{i} {g.node(i)['type']}" for i in g.inputs_of(n)) or "none"
        raise CalibrationError(f"graph '{g.name}': node '{n}' ({d['op']} -> {d['type']}, inputs: {ins}) has no "
                               f"calibration range (node data 'qrange'); run cc.calibrate(g, data) before the "
                               f"quantize_int8 pass, or use cc.quantize(g, data)")
    return choose_qparams(r[0], r[1], DTYPE)


class _Translation:
    """The int8 graph under construction and, per node of the float graph,
    its value there: float (``f``) and/or quantized (``q``: Value, scale,
    zero point); each made once, on demand."""

    def __init__(self, src: Graph):
        self.src = src
        self.g = Graph(src.name)
        self.f: dict[str, Value] = {}
        self.q: dict[str, tuple[Value, float, int]] = {}
        self.done: set[str] = set()      # nodes computed inside another node's int8 form

    def fresh(self, base: str) -> str:
        """``base`` or ``base_2``...: free in the int8 graph and not a name of
        the float graph (whose nodes keep their names)."""
        name, i = base, 1
        while name in self.g.nx or name in self.src.nx:
            i += 1
            name = f"{base}_{i}"
        return name

    def as_float(self, n: str) -> Value:
        if n not in self.f:
            d = self.src.node(n)
            if d["op"] == "param":
                v = self.g.param(n, d["value"], d["type"].dtype)
                if d.get("const"):
                    self.g.nx.nodes[n]["const"] = True
            else:                                    # only quantized so far: dequantize
                qv, s, z = self.q[n]
                v = self.g.add("dequantize", [qv], dict(scale=s, zero_point=z), self.fresh(f"{n}.dequantize"))
            self.f[n] = v
        return self.f[n]

    def as_q(self, n: str) -> tuple[Value, float, int]:
        if n not in self.q:
            s, z = qparams_of(self.src, n)
            v = self.g.add("quantize", [self.as_float(n)], dict(scale=s, zero_point=z, dtype=DTYPE),
                           self.fresh(f"{n}.quantize"))
            self._mark(v.name, s, z, "quantize")
            self.q[n] = (v, s, z)
        return self.q[n]

    def set_q(self, n: str, v: Value, s: float, z: int, form: str) -> None:
        self._mark(v.name, s, z, form)
        self.q[n] = (v, s, z)

    def _mark(self, name: str, s: float, z: int, form: str) -> None:
        self.g.nx.nodes[name]["qparams"] = (s, z)
        self.g.nx.nodes[name]["int8_form"] = form

    def param(self, base: str, arr: np.ndarray, dtype: str) -> Value:
        v = self.g.param(self.fresh(base), arr, dtype)
        self.g.nx.nodes[v.name]["const"] = True
        return v

    def fallback(self, n: str, why: str) -> None:
        """The float op on dequantized inputs."""
        d = self.src.node(n)
        v = self.g.add(d["op"], [self.as_float(i) for i in self.src.inputs_of(n)], dict(d["attrs"]), n)
        self.g.nx.nodes[n]["int8_form"] = f"float {d['op']}"
        self.f[n] = v
        if d["type"].dtype in FLOAT_DTYPES:
            _note(f"'{n}' ({d['op']}): stays float between dequantize and quantize ({why})")


# -- the int8 forms, one per op: (translation, node) -> a reason to fall back, or None when done ------
def _clamp_activation(a: dict) -> str | None | bool:
    """The fused activation as activation_clamp names it (None: none), or
    False when it does not fold into a clamp."""
    f = activations.fused(a)
    if f is None:
        return None
    act, p = f
    if act.name == "relu":
        return "relu"
    if act.name == "clip" and p["min"] == 0.0 and p["max"] == 6.0:
        return "relu6"
    if act.name == "clip" and p["min"] == 0.0 and p["max"] == math.inf:
        return "relu"
    return False


def _weights(t: _Translation, n: str, w: str, b: str | None, flip_axes=()):
    """(int8 weight array, w scales, int32 bias Value or None) for a layer
    with weight param ``w`` (output channels on axis 0) and bias param ``b``."""
    src = t.src
    wv = np.asarray(src.node(w)["value"], np.float64)
    if flip_axes:
        wv = np.flip(wv, flip_axes)
    if src.node(n).get("per_channel", True):
        wq, ws = quantize_weights(wv, axis=0)
    else:
        q1, s1 = quantize_weights(wv.reshape(1, -1), axis=0)
        wq, ws = q1.reshape(wv.shape), s1
    xs = t.as_q(src.inputs_of(n)[0])[1]
    bq = None
    if b is not None:
        bq = t.param(f"{b}.int32", quantize_bias(src.node(b)["value"], xs, ws), "int32")
    return wq, ws, bq


def _conv_like(t: _Translation, n: str, kind: str):
    src = t.src
    d = src.node(n)
    a = d["attrs"]
    ins = src.inputs_of(n)
    if a.get("residual"):
        return "a residual epilogue has no int8 form here"
    act = _clamp_activation(a)
    if act is False:
        return f"activation {a['activation']} does not fold into the int8 clamp"
    w, b = ins[1], (ins[2] if len(ins) > 2 else None)
    if src.node(w)["op"] != "param" or (b is not None and src.node(b)["op"] != "param"):
        return "its weights are computed, not params"
    c_out = src.node(w)["type"].shape[0]
    if b is not None and src.node(b)["type"].shape != (c_out,):
        return f"bias {src.node(b)['type']} is not one number per output channel"
    from ..ops.quantized import activation_clamp

    ys, yz = qparams_of(src, n)
    clamp = activation_clamp(act, ys, yz, DTYPE)
    xq, xs, xz = t.as_q(ins[0])
    flip = tuple(range(2, len(src.node(w)["type"].shape))) if kind == "conv" and a.get("flip") else ()
    wq, ws, bq = _weights(t, n, w, b, flip)
    q = dict(x_scale=xs, x_zero_point=xz, w_scale=ws, w_zero_point=0, y_scale=ys, y_zero_point=yz,
             dtype=DTYPE, clamp=clamp)
    op = "qconv" if kind == "conv" else "qdense"
    if op not in OPS:
        return f"the op set has no {op}"
    if kind == "conv":
        q.update(stride=a["stride"], padding=a["padding"], dilation=a["dilation"], groups=a["groups"])
    wq = t.param(f"{w}.int8", wq, "int8")
    try:                                 # (what a refused node added is pruned at the end)
        v = t.g.add(op, [xq, wq] + ([bq] if bq is not None else []), q, n)
    except ValidationError as e:         # e.g. more products than the int32 accumulator holds
        return str(e)
    t.set_q(n, v, ys, yz, op)
    return None


def _conv(t, n):
    return _conv_like(t, n, "conv")


def _dense(t, n):
    return _conv_like(t, n, "dense")


def _same_params(t: _Translation, n: str):
    """An op that commutes with quantization: run it on the int8 input,
    whose scale and zero point carry over."""
    d = t.src.node(n)
    ins = t.src.inputs_of(n)
    xq, s, z = t.as_q(ins[0])
    try:
        v = t.g.add(d["op"], [xq], dict(d["attrs"]), n)
    except ValidationError as e:
        return f"the op takes no {DTYPE} input yet ({e})"
    t.set_q(n, v, s, z, d["op"])
    return None


def _own_params(t: _Translation, n: str, op: str, inputs: list, attrs: dict):
    """``op`` of the op set (if it has it) on quantized ``inputs`` with
    ``attrs``, output at node ``n``'s calibrated (scale, zero point)."""
    if op not in OPS:
        return f"the op set has no {op}"
    ys, yz = qparams_of(t.src, n)
    try:
        v = t.g.add(op, inputs, dict(attrs, y_scale=ys, y_zero_point=yz, dtype=DTYPE), n)
    except ValidationError as e:
        return str(e)
    t.set_q(n, v, ys, yz, op)
    return None


def _add(t: _Translation, n: str):
    """qadd; a relu or relu6 that alone reads the sum folds into its clamp
    (the qadd then takes that activation's node name and range)."""
    (a, sa, za), (b, sb, zb) = (t.as_q(i) for i in t.src.inputs_of(n))
    attrs = dict(a_scale=sa, a_zero_point=za, b_scale=sb, b_zero_point=zb)
    user = only_user(t.src, n)
    act = _clamp_activation(dict(t.src.node(user)["attrs"], activation=t.src.node(user)["op"])) \
        if user is not None and t.src.node(user)["op"] in ("relu", "clip") else False
    if act and "qrange" in t.src.node(user):
        from ..ops.quantized import activation_clamp
        ys, yz = qparams_of(t.src, user)
        if _own_params(t, user, "qadd", [a, b], dict(attrs, clamp=activation_clamp(act, ys, yz, DTYPE))) is None:
            t.g.nx.nodes[user]["int8_form"] = f"qadd+{act}"
            t.done.add(n)
            _note(f"'{user}' ({act}) folded into the clamp of the qadd of '{n}'")
            return None
    return _own_params(t, n, "qadd", [a, b], attrs)


def _concat(t: _Translation, n: str):
    qs = [t.as_q(i) for i in t.src.inputs_of(n)]
    return _own_params(t, n, "qconcat", [v for v, _, _ in qs],
                       dict(axis=t.src.node(n)["attrs"]["axis"], x_scales=tuple(s for _, s, _ in qs),
                            x_zero_points=tuple(z for _, _, z in qs)))


def _avg_pool(t: _Translation, n: str):
    a = t.src.node(n)["attrs"]
    x, s, z = t.as_q(t.src.inputs_of(n)[0])
    return _own_params(t, n, "qavg_pool", [x], dict(
        kernel_size=a["kernel_size"], stride=a["stride"], padding=a["padding"], dilation=a["dilation"],
        ceil_mode=a["ceil_mode"], count_include_pad=a["count_include_pad"], x_scale=s, x_zero_point=z))


def _global_avg_pool(t: _Translation, n: str):
    x, s, z = t.as_q(t.src.inputs_of(n)[0])
    return _own_params(t, n, "qglobal_avg_pool", [x], dict(x_scale=s, x_zero_point=z))


def _lookup(t: _Translation, n: str):
    """An activation as a 256-entry table of int8 -> int8 (its numpy
    meaning from the activation table, computed once per input integer)."""
    if "qlookup" not in OPS:
        return "the op set has no qlookup"
    from ..ops.quantized import lookup_table

    d = t.src.node(n)
    x, s, z = t.as_q(t.src.inputs_of(n)[0])
    ys, yz = qparams_of(t.src, n)
    table = t.param(f"{n}.table", lookup_table(d["op"], s, z, ys, yz, DTYPE, DTYPE, **d["attrs"]), DTYPE)
    v = t.g.add("qlookup", [x, table], {}, n)
    t.set_q(n, v, ys, yz, f"qlookup ({d['op']})")
    return None


INT8_FORMS = {
    "conv": _conv,
    "dense": _dense,
    "add": _add,
    "concat": _concat,
    "avg_pool": _avg_pool,
    "global_avg_pool": _global_avg_pool,
    "max_pool": _same_params,
    "reshape": _same_params,
    "flatten": _same_params,
    **{name: _lookup for name in activations.TABLE},
}
"""op -> its int8 form: ``form(translation, node)`` adds the int8 node(s)
and returns None, or returns why it cannot (the node then stays float)."""


def _split_epilogue(g: Graph, n: str):
    """A producer whose epilogue has a residual add or an activation that no
    int8 clamp expresses -> the plain producer, then the add and the
    activation as their own nodes (each then has an int8 form: qadd, qlookup)."""
    from ..ops.epilogue import PRODUCERS, split_attrs

    a = attrs(g, n)
    if g.node(n)["op"] not in PRODUCERS or (not a.get("residual") and _clamp_activation(a) is not False):
        return None
    y = g.add(g.node(n)["op"], operands(g, n), split_attrs(a)[0], fresh(g, f"{n}.own"))
    return reactivate(g, n, y)


@register
def split_int8_epilogues(g: Graph) -> Graph:
    """Undo the epilogue fusions an int8 producer cannot keep: a residual add,
    or an activation other than relu / relu6 (which fold into the int8
    clamp), become separate nodes again, so that calibration observes the
    value between them and quantize_int8 maps each one (qadd, qlookup)."""
    return rewrite(g, _split_epilogue)


def _cancel(g: Graph, n: str):
    """quantize(dequantize(q)) with the same scale, zero point and dtype -> q."""
    d = g.node(n)
    (src,) = g.inputs_of(n)
    s = g.node(src)
    if s["op"] != "dequantize":
        return None
    (q,) = g.inputs_of(src)
    a, b = d["attrs"], s["attrs"]
    if (a["scale"], a["zero_point"], a["axis"]) != (b["scale"], b["zero_point"], b["axis"]) \
            or g.node(q)["type"].dtype != a["dtype"]:
        return None
    return Value(g, q)


@register
def cancel_requantize(g: Graph) -> Graph:
    """A quantize of a dequantize with the same scale, zero point and dtype
    is the identity: both go (the integers pass through unchanged)."""
    return rewrite(g, {"quantize": _cancel})


@register
def quantize_int8(g: Graph) -> Graph:
    """Float graph with calibrated ranges (node data ``qrange``, from
    ``cc.calibrate``) -> int8 graph: inputs quantized, conv -> qconv (int8
    per-channel weights, int32 bias, relu/relu6 folded into the clamp),
    dense -> qdense (or a kernel-1 qconv), max_pool/reshape/flatten on int8,
    other ops float between dequantize and quantize, outputs dequantized.
    Notes: per layer the output scale and zero point, and the error against
    the float layer on the calibration sample the inputs carry."""
    from ..calibration import CalibrationError

    if g.assigns:
        raise CalibrationError(f"graph '{g.name}' assigns params (a training graph); quantize_int8 takes an "
                               f"inference graph")
    wide = [n for n in g.topological_order() if g.node(n)["type"].dtype == "float64"]
    if wide:
        raise CalibrationError(f"graph '{g.name}': node '{wide[0]}' ({g.node(wide[0])['op']}) is float64; "
                               f"quantize_int8 takes float32 graphs (dequantize gives float32)")
    t = _Translation(g)
    for n in g.topological_order():
        d = g.node(n)
        if d["op"] == "param":
            continue
        if d["op"] == "input":
            t.f[n] = t.g.input(n, d["type"].shape, d["type"].dtype)
            for k in ("qrange", "calibration"):
                if k in d:
                    t.g.nx.nodes[n][k] = d[k]
            continue
        if n in t.done or n in t.q:
            continue
        form = INT8_FORMS.get(d["op"])
        if d["type"].dtype not in FLOAT_DTYPES:
            why = f"its value is {d['type'].dtype}"
        elif form is None:
            why = f"no int8 form of {d['op']}"
        else:
            qparams_of(g, n)                     # a clear error for a node without a range
            why = form(t, n)
        if why is not None:
            t.fallback(n, why)
    for o, n in g.outputs.items():
        t.g.output(t.as_float(n), o)
    out = cancel_requantize(t.g)
    for n in out.topological_order():
        if n in g.nx and "qparams" in out.node(n) and g.node(n)["op"] != "input":
            s, z = out.node(n)["qparams"]
            _note(f"'{n}' ({g.node(n)['op']} -> {out.node(n)['int8_form']}): scale {s:.6g}, zero point {z}")
    _error_notes(g, out)
    return out


def _error_notes(gf: Graph, g8: Graph) -> None:
    """Per layer, the error of the int8 graph against the float graph on the
    calibration sample the inputs carry (reference interpreter)."""
    from .. import tuning
    from ..calibration import measure

    if not tuning.noting():
        return
    feeds = {n: gf.node(n).get("calibration") for n in gf.input_names}
    if any(v is None for v in feeds.values()) or not feeds:
        return
    rows = {n: gf.node(n)["type"].shape[0] for n in feeds}
    k = min(v.shape[0] // rows[n] for n, v in feeds.items())
    batches = [{n: v[i * rows[n]:(i + 1) * rows[n]] for n, v in feeds.items()} for i in range(k)]
    rep = measure(gf, g8, batches, engine="reference")
    for r in rep.rows:
        snr = "inf" if math.isinf(r.snr_db) else f"{r.snr_db:.1f}"
        _note(f"'{r.node}' on {rep.samples} calibration samples: max abs error {r.max_abs:.4g}, SNR {snr} dB, "
              f"params {r.flash_float:,} -> {r.flash_int8:,} bytes")
    _note(f"flash (params bytes) {rep.flash[0]:,} -> {rep.flash[1]:,}; arena {rep.arena[0]:,} -> {rep.arena[1]:,} "
          f"bytes")



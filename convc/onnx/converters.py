"""The converters of ONNX's float ops (Conv, Gemm, pools, reshapes, Resize,
...) to convc ops, registered with :func:`.importer.converts`."""
from __future__ import annotations

import numpy as np

from ..ir import Value
from ..ops.conv import conv
from ..ops.activations import TABLE as ACTIVATION_TABLE
from ..ops.elementwise import add, clip, div, gelu, mul, sub
from ..ops.layout import downsample, pad
from ..ops.linear import dense, matmul, softmax
from ..ops.norm import batch_norm
from ..ops.pool import avg_pool, global_avg_pool, max_pool
from ..ops.resize import COORDINATE_MODES, resize
from ..ops.tensor import concat, expand, reshape, slice_axis, transpose
from ..ops.transpose import conv_transpose
from ..shapes import ceil_div, prod
from .importer import (STATIC_INPUTS, _WINDOW, _Unsupported, _axis, _matmul_2d, _onnx_attr_names, _pad_pairs, _positive,
                       _spatial, _conv_window, _window, converts)


@converts("Identity")
def _identity(im, node, ins, at):
    return [im.env[ins[0]]]


@converts("Dropout", dropped="the mask, a bool tensor", ratio=0.5, is_test=0, seed=None)
def _dropout(im, node, ins, at):
    ratio = im.scalar(ins[1], "ratio") if ins[1] else at["ratio"]
    training = bool(im.scalar(ins[2], "training_mode")) if ins[2] else (im.opset < 7 and not at["is_test"])
    if training and ratio != 0:
        raise _Unsupported(f"training-mode Dropout (ratio {ratio}) is random; export the model in eval mode")
    return [im.env[ins[0]]]


def _required(at: dict, name: str, *also: str):
    """An attribute the op's opset requires (older opsets give as attributes
    what newer ones take as inputs)."""
    if at[name] is None:
        raise _Unsupported(f"attribute {' or '.join((*also, name))} is required")
    return at[name]


_SPECIAL_ACTIVATIONS = ("Clip", "Gelu")
"""Their ONNX form is not one attribute per param: Clip takes its bounds as
inputs (opset 11+), Gelu picks the record by its ``approximate`` string."""


def _activation_converter(act):
    """The converter of an activation of the table: its ONNX attributes are
    its params (ONNX's defaults)."""
    names = _onnx_attr_names(act)

    def convert(im, node, ins, at):
        x = im.value(ins[0])
        return [x.graph.add(act.name, [x], {p: at[a] for p, a in names.items()}, im.name(node))]
    converts(act.onnx, **{names[p]: act.onnx_defaults.get(p, d) for p, d in act.params.items()})(convert)


for _act in ACTIVATION_TABLE.values():
    if _act.onnx and _act.onnx not in _SPECIAL_ACTIVATIONS:
        _activation_converter(_act)


@converts("Gelu", approximate="none")
def _gelu(im, node, ins, at):
    if at["approximate"] not in ("none", "tanh"):
        raise _Unsupported(f"Gelu approximate={at['approximate']!r} (known: 'none', 'tanh')")
    return [gelu(im.value(ins[0]), at["approximate"], name=im.name(node))]


@converts("Clip", min=None, max=None)
def _clip(im, node, ins, at):
    lo, hi = at["min"], at["max"]
    if im.opset >= 11:
        lo = im.scalar(ins[1], "min", exact=True) if ins[1] else None
        hi = im.scalar(ins[2], "max", exact=True) if ins[2] else None
    return [clip(im.value(ins[0]), lo, hi, name=im.name(node))]


def _legacy_broadcast(im, node, b: Value, a_rank: int, at) -> Value:
    """Opset < 7 broadcasting of B from ``axis`` of A (numpy aligns suffixes)."""
    if not at.get("broadcast") or at.get("axis") is None:
        return b
    axis = _axis(at["axis"], a_rank)
    trail = a_rank - axis - len(b.shape)
    return reshape(b, b.shape + (1,) * trail, name=im.name(node, "b")) if trail > 0 else b


def _binary(fn):
    def convert(im, node, ins, at):
        a, b = im.value(ins[0]), im.value(ins[1])
        return [fn(a, _legacy_broadcast(im, node, b, len(a.shape), at), name=im.name(node))]
    return convert


_LEGACY = dict(broadcast=0, axis=None, consumed_inputs=None)
converts("Add", **_LEGACY)(_binary(add))
converts("Sub", **_LEGACY)(_binary(sub))
converts("Mul", **_LEGACY)(_binary(mul))
converts("Div", **_LEGACY)(_binary(div))


@converts("Concat", axis=None)
def _concat(im, node, ins, at):
    values = [im.value(i) for i in ins if i]
    if at["axis"] is None:
        raise _Unsupported("attribute axis is required")
    if len(values) == 1:
        return values
    return [concat(values, at["axis"], name=im.name(node))]


@converts("Flatten", axis=1)
def _flatten(im, node, ins, at):
    shape = im.shape(ins[0])
    axis = _axis(at["axis"], len(shape), end=True)
    return [reshape(im.value(ins[0]), (prod(shape[:axis]), prod(shape[axis:])), name=im.name(node))]


@converts("Reshape", shape=None, allowzero=0)
def _reshape(im, node, ins, at):
    target = [int(s) for s in (_required(at, "shape") if im.opset < 5 else im.ints(ins[1], "shape"))]
    x = im.shape(ins[0])
    if 0 in target:
        if at["allowzero"]:
            raise _Unsupported(f"shape {target} with allowzero=1 makes an empty tensor")
        target = [x[i] if s == 0 else s for i, s in enumerate(target)]
    return [reshape(im.value(ins[0]), tuple(target), name=im.name(node))]


@converts("Squeeze", axes=None)
def _squeeze(im, node, ins, at):
    shape = im.shape(ins[0])
    axes = at["axes"] if im.opset < 13 else (im.ints(ins[1], "axes") if ins[1] else None)
    if axes is None:
        axes = {i for i, n in enumerate(shape) if n == 1}
    else:
        listed = [_axis(a, len(shape), "axes entry") for a in axes]
        if len(set(listed)) != len(listed):
            raise _Unsupported(f"axes {[int(a) for a in axes]} repeat an axis; ONNX requires distinct axes")
        wide = [a for a in listed if shape[a] != 1]
        if wide:
            raise _Unsupported(f"axis {wide[0]} of the input {tuple(shape)} has size {shape[wide[0]]}; "
                               "Squeeze removes size-1 axes only")
        axes = set(listed)
    return [reshape(im.value(ins[0]), tuple(n for i, n in enumerate(shape) if i not in axes), name=im.name(node))]


@converts("Unsqueeze", axes=None)
def _unsqueeze(im, node, ins, at):
    shape = list(im.shape(ins[0]))
    axes = _required(at, "axes") if im.opset < 13 else im.ints(ins[1], "axes")
    rank = len(shape) + len(axes)
    listed = sorted(_axis(a, rank, "axes entry") for a in axes)
    if len(set(listed)) != len(listed):
        raise _Unsupported(f"axes {[int(a) for a in axes]} repeat an axis; ONNX requires distinct axes")
    for a in listed:
        shape.insert(a, 1)
    return [reshape(im.value(ins[0]), tuple(shape), name=im.name(node))]


@converts("Slice", starts=None, ends=None, axes=None)
def _slice(im, node, ins, at):
    x = im.value(ins[0])
    rank = len(x.shape)
    if im.opset < 10:
        starts, ends, axes, steps = _required(at, "starts"), _required(at, "ends"), at["axes"], None
    else:
        starts, ends = (im.ints(i, w) for i, w in ((ins[1], "starts"), (ins[2], "ends")))
        axes = im.ints(ins[3], "axes") if ins[3] else None
        steps = im.ints(ins[4], "steps") if ins[4] else None
    axes = range(len(starts)) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for k, (a, st, en, sp) in enumerate(zip(axes, starts, ends, steps)):
        a = _axis(a, rank, "axes entry")
        n, st, en, sp = x.shape[a], int(st), int(en), int(sp)
        if sp != 1 and not (sp > 1 and a >= 2 and 3 <= rank <= 5):
            raise _Unsupported(f"step {sp} on axis {a} (only 1, or a positive step on a spatial axis)")
        st, en = (min(max(v + n if v < 0 else v, 0), n) for v in (st, en))
        if en <= st:
            raise _Unsupported(f"the slice {st}:{en} of axis {a} is empty")
        if (st, en) != (0, n):
            x = slice_axis(x, a, st, en, name=im.name(node, f"axis{a}"))
        if sp > 1:
            x = downsample(x, tuple(sp if i == a else 1 for i in range(2, rank)), name=im.name(node, f"step{a}"))
    return [reshape(x, x.shape, name=im.name(node))]


@converts("Split", axis=0, split=None, num_outputs=None)
def _split(im, node, ins, at):
    """One slice per output. The sizes are the ``split`` attribute (opsets 2
    and 11) or input (1, 13 and later); without them, equal parts -- since
    opset 18 ``num_outputs`` parts of ceil(n / num_outputs), the last smaller."""
    x = im.value(ins[0])
    rank, k = len(x.shape), len(node.output)
    if not -rank <= at["axis"] < rank:
        raise _Unsupported(f"axis {at['axis']} is not an axis of the input {x.shape}")
    axis = at["axis"] % rank
    n = x.shape[axis]
    sizes = im.ints(ins[1], "split").tolist() if ins[1] else at["split"]
    if at["num_outputs"] is not None:
        if sizes is not None:
            raise _Unsupported("both split and num_outputs are given; ONNX allows one of them")
        if at["num_outputs"] != k:
            raise _Unsupported(f"num_outputs {at['num_outputs']} differs from the node's {k} outputs")
    if sizes is None and at["num_outputs"] is None and im.opset >= 18:
        raise _Unsupported("neither split nor num_outputs is given; from opset 18 ONNX requires one of them")
    if sizes is None:
        if n % k and at["num_outputs"] is None:
            raise _Unsupported(f"axis {axis} of size {n} does not split into {k} equal parts (a smaller last "
                               "part needs opset 18's num_outputs)")
        chunk = ceil_div(n, k)
        sizes = [chunk] * (k - 1) + [n - chunk * (k - 1)]
    sizes = [int(s) for s in sizes]
    if len(sizes) != k or min(sizes) < 0 or sum(sizes) != n:
        raise _Unsupported(f"split {sizes} must be {k} sizes (one per output, none negative) adding up to "
                           f"{n}, the size of axis {axis} of {x.shape}")
    outs, start = [], 0
    for i, (o, size) in enumerate(zip(node.output, sizes)):
        if not (o and o in im.used):
            outs.append(None)
        elif size == 0:
            raise _Unsupported(f"its output {o!r} is empty (split size 0); convc tensors are never empty")
        else:
            outs.append(x if size == n else slice_axis(x, axis, start, start + size, name=im.name(node, str(i))))
        start += size
    return outs


@converts("Expand")
def _expand(im, node, ins, at):
    x = im.value(ins[0])
    target = tuple(int(v) for v in im.ints(ins[1], "shape"))
    try:
        shape = tuple(np.broadcast_shapes(x.shape, target))
    except ValueError:
        raise _Unsupported(f"shape {list(target)} does not broadcast with the input's {x.shape}") from None
    return [expand(x, shape, name=im.name(node)) if shape != x.shape else x]


@converts("Transpose", perm=None)
def _transpose(im, node, ins, at):
    return [transpose(im.value(ins[0]), at["perm"], name=im.name(node))]


@converts("Gemm", alpha=1.0, beta=1.0, transA=0, transB=0, broadcast=0)
def _gemm(im, node, ins, at):
    a, b = im.value(ins[0]), im.value(ins[1])
    if at["transA"]:
        a = transpose(a, (1, 0), name=im.name(node, "a_t"))
    c = None
    if ins[2] and at["beta"] != 0:
        if at["beta"] == 1:
            c = im.value(ins[2])
        elif isinstance(im.env[ins[2]], np.ndarray):
            c = a.graph.const(im.env[ins[2]] * at["beta"], a.dtype)
        else:
            c = mul(im.value(ins[2]), at["beta"], name=im.name(node, "beta"))
    n_out = b.shape[0] if at["transB"] else b.shape[1]
    bias = c if c is not None and at["alpha"] == 1 and at["transB"] and c.shape == (n_out,) else None
    last = bias is not None or (c is None and at["alpha"] == 1)
    name = im.name(node) if last else im.name(node, "ab")
    y = dense(a, b, bias, name=name) if at["transB"] else matmul(a, b, name=name)
    if at["alpha"] != 1:
        y = mul(y, at["alpha"], name=im.name(node) if c is None else im.name(node, "alpha"))
    if c is not None and bias is None:
        y = add(y, c, name=im.name(node))
    return [y]


@converts("MatMul")
def _matmul(im, node, ins, at):
    return [_matmul_2d(im, node, im.value(ins[0]), im.value(ins[1]), lambda a, b, name: matmul(a, b, name=name))]


@converts("BatchNormalization", dropped="running statistics of training mode", epsilon=1e-5, momentum=0.9,
          training_mode=0, spatial=1, is_test=0, consumed_inputs=None)
def _batch_norm(im, node, ins, at):
    if at["training_mode"] or (im.opset < 7 and not at["is_test"] and len(node.output) > 1):
        raise _Unsupported("training_mode=1 (batch statistics) is not supported; export the model in eval mode")
    if not at["spatial"]:
        raise _Unsupported("spatial=0 (per-element statistics) is not supported")
    x = im.value(ins[0])
    scale, bias, mean, var = (im.value(i) for i in ins[1:5])
    return [batch_norm(x, mean, var, scale, bias, at["epsilon"], name=im.name(node))]


@converts("Softmax", axis=None)
def _softmax(im, node, ins, at):
    x = im.value(ins[0])
    rank = len(x.shape)
    if im.opset >= 13:
        return [softmax(x, -1 if at["axis"] is None else at["axis"], name=im.name(node))]
    axis = _axis(1 if at["axis"] is None else at["axis"], max(rank, 1))
    if axis == rank - 1:             # coercing to 2D changes nothing then
        return [softmax(x, -1, name=im.name(node))]
    flat = reshape(x, (prod(x.shape[:axis]), prod(x.shape[axis:])), name=im.name(node, "2d"))
    return [reshape(softmax(flat, 1, name=im.name(node, "softmax")), x.shape, name=im.name(node))]


@converts("Pad", mode="constant", pads=None, paddings=None, value=0.0)
def _pad(im, node, ins, at):
    if at["mode"] != "constant":
        raise _Unsupported(f"mode {at['mode']!r} is not supported (only 'constant')")
    x = im.value(ins[0])
    rank = len(x.shape)
    if im.opset < 11:
        pads = at["pads"] if at["pads"] is not None else _required(at, "paddings", "pads")
        value, axes = at["value"], None
    else:
        pads = im.ints(ins[1], "pads")
        value = im.scalar(ins[2], "constant_value") if ins[2] else 0.0
        axes = im.ints(ins[3], "axes") if ins[3] else None
    if x.dtype == "int64" and not float(value).is_integer():
        raise _Unsupported(f"constant_value {value} is not an integer, and the input is int64 (ONNX: one type T)")
    axes = list(range(rank)) if axes is None else [_axis(a, rank, "axes entry") for a in axes]
    pads = [int(p) for p in pads]
    if len(pads) != 2 * len(axes):
        raise _Unsupported(f"pads {pads} must have 2 x {len(axes)} entries")
    pairs = {a: (lo, hi) for a, lo, hi in zip(axes, pads[:len(axes)], pads[len(axes):]) if lo or hi}
    spatial = [pairs.pop(a, (0, 0)) for a in range(2, rank)] if 3 <= rank <= 5 else []
    for a, (lo, hi) in sorted(pairs.items()):      # batch / channel axes (or any axis of other ranks)
        x = _pad_axis(im, node, x, a, lo, hi, value)
    if any(lo or hi for lo, hi in spatial):
        x = pad(x, spatial, value, name=im.name(node))
    return [x]


def _pad_axis(im, node, x: Value, axis: int, lo: int, hi: int, value: float) -> Value:
    """Pad (or crop, for negative entries) one axis with concat / slice."""
    n = x.shape[axis]
    if lo < 0 or hi < 0:
        x = slice_axis(x, axis, max(-lo, 0), n - max(-hi, 0), name=im.name(node, f"crop{axis}"))
    parts = []
    for k in (lo, hi):
        shape = list(x.shape)
        shape[axis] = k
        if k > 0:
            im.allocate(shape, f"the padding of axis {axis}")
        parts.append(x.graph.const(np.full(shape, value), x.dtype) if k > 0 else None)
    if parts[0] is None and parts[1] is None:
        return x
    return concat([p for p in (parts[0], x, parts[1]) if p is not None], axis, name=im.name(node, f"pad{axis}"))


@converts("Conv", dilations=None, group=1, **_WINDOW)
def _conv(im, node, ins, at):
    x, w = im.value(ins[0]), im.value(ins[1])
    s, d, pads = _conv_window(node, at, x, w)
    b = im.value(ins[2]) if ins[2] else None
    return [conv(x, w, b, stride=s, padding=pads, dilation=d, groups=at["group"], name=im.name(node))]


@converts("ConvTranspose", dilations=None, group=1, output_padding=None, output_shape=None, **_WINDOW)
def _conv_transpose(im, node, ins, at):
    x, w = im.value(ins[0]), im.value(ins[1])
    b = im.value(ins[2]) if ins[2] else None
    rank = len(x.shape) - 2
    if rank < 1 or len(w.shape) != len(x.shape):
        raise _Unsupported(f"input {x.shape} and weight {w.shape} must be (N, C, *spatial) and (C, M/group, *k)")
    n, k = x.shape[2:], w.shape[2:]
    if at["kernel_shape"] is not None and tuple(at["kernel_shape"]) != tuple(k):
        raise _Unsupported(f"kernel_shape {list(at['kernel_shape'])} differs from the weight's {list(k)}")
    s = _spatial(at["strides"], rank, 1, "strides")
    d = _spatial(at["dilations"], rank, 1, "dilations")
    _positive(strides=s, dilations=d, group=at["group"])
    opad = _spatial(at["output_padding"], rank, 0, "output_padding")
    full = [(nn - 1) * ss + dd * (kk - 1) + 1 + op for nn, ss, dd, kk, op in zip(n, s, d, k, opad)]
    want = None if at["output_shape"] is None else [int(v) for v in at["output_shape"]][-rank:]
    auto = at["auto_pad"] or "NOTSET"
    # As onnx.reference: output position j is position j + lo of the full
    # (unpadded) transposed conv, which is zero past its end.
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        want = want or [nn * ss for nn, ss in zip(n, s)]
        total = [f - o for f, o in zip(full, want)]
        lows = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]
    elif auto in ("NOTSET", "VALID"):
        pairs = _pad_pairs(at["pads"] if auto == "NOTSET" else None, rank)
        lows = [lo for lo, _ in pairs]
        want = want or [f - lo - hi for f, (lo, hi) in zip(full, pairs)]
    else:
        raise _Unsupported(f"auto_pad {auto!r} is unknown")
    base = [f - op for f, op in zip(full, opad)]           # without output_padding
    lo_c = [max(lo, 0) for lo in lows]
    hi_c = [max(0, f - lo - o) for f, lo, o in zip(base, lo_c, want)]
    op_c = [o - (f - lo - hi) for f, lo, hi, o in zip(base, lo_c, hi_c, want)]
    geo = dict(stride=s, dilation=d, groups=at["group"])
    if all(lo >= 0 for lo in lows) and all(0 <= op < max(ss, dd) for op, ss, dd in zip(op_c, s, d)):
        return [conv_transpose(x, w, b, padding=list(zip(lo_c, hi_c)), output_padding=op_c, name=im.name(node),
                               **geo)]
    # Outputs before the full result or past what output_padding reaches: pad with zeros, then add the bias.
    y = conv_transpose(x, w, None, padding=list(zip(lo_c, hi_c)), name=im.name(node, "core"), **geo)
    extra = [(max(-lo, 0), o - yy - max(-lo, 0)) for lo, o, yy in zip(lows, want, y.shape[2:])]
    y = pad(y, extra, name=im.name(node, "pad") if b is not None else im.name(node))
    if b is not None:
        y = add(y, reshape(b, b.shape + (1,) * rank, name=im.name(node, "bias")), name=im.name(node))
    return [y]


def _pool_geometry(node, at, x_shape):
    """kernel, stride, dilation, (lo, hi) pads and output sizes as ONNX defines them."""
    k, s, d, pads = _window(node, at, x_shape)
    for kk, dd, (lo, hi) in zip(k, d, pads):
        if max(lo, hi) >= dd * (kk - 1) + 1:
            raise _Unsupported(f"pads {[lo for lo, _ in pads] + [hi for _, hi in pads]} reach a whole window "
                               f"({kk} wide, dilation {dd}) past the input: a window of padding only has no value "
                               f"(ONNX Runtime and PyTorch refuse such pads too)")
    ceil_mode = bool(at["ceil_mode"]) and (at["auto_pad"] or "NOTSET") == "NOTSET"
    out = []
    for nn, kk, ss, dd, (lo, hi) in zip(x_shape[2:], k, s, d, pads):
        span = nn + lo + hi - dd * (kk - 1) - 1
        if span < 0:
            raise _Unsupported(f"the window {kk} (dilation {dd}) is larger than the padded input {nn + lo + hi}")
        o = (-(-span // ss) if ceil_mode else span // ss) + 1
        if ceil_mode and (o - 1) * ss >= nn + lo:        # the last window must start inside
            o -= 1
        out.append(o)
    return k, s, d, pads, ceil_mode, out


@converts("MaxPool", dropped="the argmax indices", ceil_mode=0, dilations=None, storage_order=0, **_WINDOW)
def _max_pool(im, node, ins, at):
    x = im.value(ins[0])
    k, s, d, pads, ceil_mode, out = _pool_geometry(node, at, x.shape)
    if all(max(p) <= kk // 2 for p, kk in zip(pads, k)):
        y = max_pool(x, k, s, pads, d, ceil_mode, name=im.name(node))
    else:       # more padding than PyTorch's rule allows: pad with -inf explicitly
        need = [(o - 1) * ss + dd * (kk - 1) + 1 for o, ss, dd, kk in zip(out, s, d, k)]
        lowest = -np.inf if x.dtype in ("float32", "float64") else int(np.iinfo(x.dtype).min)
        xp = pad(x, [(lo, t - n - lo) for (lo, _), t, n in zip(pads, need, x.shape[2:])], lowest,
                 name=im.name(node, "pad"))
        y = max_pool(xp, k, s, 0, d, False, name=im.name(node))
    if list(y.shape[2:]) != out:
        raise _Unsupported(f"convc's output {y.shape[2:]} differs from ONNX's {out}")
    return [y]


@converts("AveragePool", ceil_mode=0, count_include_pad=0, dilations=None, **_WINDOW)
def _avg_pool(im, node, ins, at):
    x = im.value(ins[0])
    k, s, d, pads, ceil_mode, out = _pool_geometry(node, at, x.shape)
    include = bool(at["count_include_pad"])
    if all(dd == 1 for dd in d) and all(max(p) <= kk // 2 for p, kk in zip(pads, k)):
        y = avg_pool(x, k, s, pads, ceil_mode, include, name=im.name(node))
    else:
        # The window sums as a depthwise conv with a kernel of ones, divided by
        # how many elements each window counts (a constant of the geometry).
        c, n = x.shape[1], x.shape[2:]
        need = [(o - 1) * ss + dd * (kk - 1) + 1 for o, ss, dd, kk in zip(out, s, d, k)]
        im.allocate((c, 1) + k, "the window of ones")
        im.allocate(out, "the count of each window")
        im.allocate([sum(o * kk for o, kk in zip(out, k))], "the count of each window (steps)")
        ones = x.graph.const(np.ones((c, 1) + k), x.dtype)
        total = conv(x, ones, None, s, [(lo, max(0, t - nn - lo)) for (lo, _), t, nn in zip(pads, need, n)], d,
                     groups=c, name=im.name(node, "sum"))
        counts = [np.array([sum(1 for t in range(kk) if (-lo if include else 0) <= j * ss + t * dd - lo <
                                (nn + hi if include else nn)) for j in range(o)], np.float64)
                  for nn, kk, ss, dd, (lo, hi), o in zip(n, k, s, d, pads, out)]
        count = counts[0]
        for cnt in counts[1:]:
            count = np.multiply.outer(count, cnt)
        y = div(total, x.graph.const(count.reshape((1, 1) + count.shape), x.dtype), name=im.name(node))
    if list(y.shape[2:]) != out:
        raise _Unsupported(f"convc's output {y.shape[2:]} differs from ONNX's {out}")
    return [y]


@converts("GlobalAveragePool")
def _global_avg_pool(im, node, ins, at):
    return [global_avg_pool(im.value(ins[0]), name=im.name(node))]


# -- Resize, Upsample ----------------------------------------------------------------
STATIC_INPUTS.update(Resize=(1, 2, 3), Upsample=(1,))


def _resize_mode(mode: str) -> str:
    if mode in ("nearest", "linear"):
        return mode
    if mode == "bilinear":                  # Upsample-7's spelling in older exporters
        return "linear"
    if mode == "cubic":
        raise _Unsupported("mode 'cubic' is not supported (convc resizes with 'nearest' and 'linear')")
    raise _Unsupported(f"mode {mode!r} is unknown (ONNX's modes: nearest, linear, cubic)")


def _resize_spatial(x: Value, scales, sizes):
    """Keyword arguments of ``resize`` for ONNX's per-axis scales or sizes
    (every axis of x): the batch and channel axes must stay as they are."""
    rank = len(x.shape)
    if not 3 <= rank <= 5:
        raise _Unsupported(f"input {x.shape} must be (N, C, *spatial) with 1 to 3 spatial axes")
    given = scales if scales is not None else sizes
    if len(given) != rank:
        raise _Unsupported(f"{'scales' if scales is not None else 'sizes'} {given.tolist()} has "
                           f"{len(given)} entries for an input of rank {rank}")
    if scales is not None:
        if scales[0] != 1 or scales[1] != 1:
            raise _Unsupported(f"scales {scales.tolist()} resize the batch or channel axis; convc resizes "
                               "the spatial axes only")
        return dict(scale_factor=tuple(float(s) for s in scales[2:]))
    if tuple(int(s) for s in sizes[:2]) != x.shape[:2]:
        raise _Unsupported(f"sizes {sizes.tolist()} resize the batch or channel axis of {x.shape}; convc "
                           "resizes the spatial axes only")
    return dict(size=tuple(int(s) for s in sizes[2:]))


def _resize_legacy(im, node, x: Value, scales, mode: str) -> Value:
    """Upsample and Resize-10: asymmetric coordinates; nearest rounds as ONNX
    Runtime does, down along an axis that grows and up along one that shrinks
    (two resizes when the axes disagree: nearest is separable)."""
    mode = _resize_mode(mode)
    kw = _resize_spatial(x, np.asarray(scales, np.float32).reshape(-1), None)
    factors = kw["scale_factor"]
    if mode == "linear":
        return resize(x, scale_factor=factors, mode="linear", coordinate_transformation_mode="asymmetric",
                      name=im.name(node))
    groups = [("ceil", [f if f < 1 else 1.0 for f in factors]), ("floor", [f if f >= 1 else 1.0 for f in factors])]
    groups = [(rounding, f) for rounding, f in groups if any(v != 1 for v in f)] or [("floor", list(factors))]
    for k, (rounding, f) in enumerate(groups):
        x = resize(x, scale_factor=tuple(f), mode="nearest", coordinate_transformation_mode="asymmetric",
                   nearest_mode=rounding, name=im.name(node) if k == len(groups) - 1 else im.name(node, "down"))
    return x


@converts("Resize", mode="nearest", coordinate_transformation_mode="half_pixel", nearest_mode="round_prefer_floor",
          cubic_coeff_a=-0.75, exclude_outside=0, extrapolation_value=0.0, antialias=0, axes=None,
          keep_aspect_ratio_policy="stretch")
def _resize(im, node, ins, at):
    x = im.value(ins[0])
    if im.opset < 11:                   # Resize-10: (X, scales) and the mode only
        return [_resize_legacy(im, node, x, im.floats(ins[1], "scales"), at["mode"])]
    mode = _resize_mode(at["mode"])
    ctm = at["coordinate_transformation_mode"]
    if ctm == "tf_crop_and_resize":
        raise _Unsupported("coordinate_transformation_mode 'tf_crop_and_resize' (a crop given by roi) is not "
                           "supported")
    if ctm not in COORDINATE_MODES:
        raise _Unsupported(f"coordinate_transformation_mode {ctm!r} is not supported (only "
                           f"{', '.join(COORDINATE_MODES)})")
    if at["antialias"]:
        raise _Unsupported(f"antialias={at['antialias']} is not supported (only 0)")
    if at["exclude_outside"] and mode != "linear":
        # (linear reads at most one element past an edge, where excluding it
        # and renormalising gives the edge element, as clamping does)
        raise _Unsupported(f"exclude_outside={at['exclude_outside']} is supported with mode 'linear' only")
    scales = im.floats(ins[2], "scales") if ins[2] else None
    scales = scales if scales is not None and scales.size else None
    sizes = im.ints(ins[3], "sizes") if ins[3] else None
    if (scales is None) == (sizes is None):
        raise _Unsupported("exactly one of scales and sizes must be given")
    if sizes is not None and at["keep_aspect_ratio_policy"] != "stretch":
        raise _Unsupported(f"keep_aspect_ratio_policy {at['keep_aspect_ratio_policy']!r} is not supported "
                           "(only 'stretch')")
    if at["axes"] is not None:          # opset 18: scales / sizes of the listed axes only
        rank = len(x.shape)
        axes = [_axis(a, rank, "axes entry") for a in at["axes"]]
        given = scales if scales is not None else sizes
        if len(set(axes)) != len(axes) or len(axes) != len(given):
            raise _Unsupported(f"axes {list(at['axes'])} must be distinct, one per entry of "
                               f"{'scales' if scales is not None else 'sizes'} {given.tolist()}")
        full = np.array([1.0] * rank if scales is not None else x.shape, given.dtype)
        full[axes] = given
        scales, sizes = (full, None) if scales is not None else (None, full)
    nearest = at["nearest_mode"] if mode == "nearest" else None
    return [resize(x, mode=mode, coordinate_transformation_mode=ctm, nearest_mode=nearest, name=im.name(node),
                   **_resize_spatial(x, scales, sizes))]


@converts("Upsample", mode="nearest", scales=None)
def _upsample(im, node, ins, at):
    scales = at["scales"] if im.opset < 9 else im.floats(ins[1], "scales")
    if scales is None:
        raise _Unsupported("attribute scales is required")
    return [_resize_legacy(im, node, im.value(ins[0]), scales, at["mode"])]

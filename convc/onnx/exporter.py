"""ONNX export: :func:`to_onnx` writes a graph of ONNX-expressible ops as an
ONNX model, one ``@exports`` function per convc op (quantized ops as QDQ
pairs around float ops)."""
from __future__ import annotations

import math
import os

import numpy as np

from ..errors import ConvcError
from ..ir import Graph
from ..ops import activations, epilogue
from ..ops.activations import TABLE as ACTIVATION_TABLE
from ..ops.resize import axis_matrix, is_ratio
from .importer import _ELEM_OF_DTYPE, _NP_OF_DTYPE, _onnx, _onnx_attr_names


# -- export --------------------------------------------------------------------------
_EXPORTERS: dict[str, object] = {}


def exports(*ops: str):
    def deco(fn):
        for op in ops:
            _EXPORTERS[op] = fn
        return fn
    return deco


def to_onnx(graph: Graph, opset: int = 17, path=None):
    """Write ``graph`` as an ``onnx.ModelProto`` (opset 13 or later) and
    optionally save it to ``path``. Inputs, params (as initializers) and
    outputs keep their names. Raises a ConvcError listing every node whose op
    has no ONNX form (unshared and tiled convs, gradients, losses, ...)."""
    onnx = _onnx()
    from onnx import helper

    from ..schedule import live_nodes

    if not isinstance(graph, Graph):
        raise ConvcError(f"to_onnx() takes a convc.Graph, got {type(graph).__name__}")
    if not 13 <= opset <= onnx.defs.onnx_opset_version():
        raise ConvcError(f"to_onnx(opset={opset}): convc writes opsets 13 to {onnx.defs.onnx_opset_version()}")
    graph.verify()
    if graph.assigns:
        raise ConvcError(f"graph '{graph.name}' assigns params after each run (training state); "
                         "ONNX models have no such state")
    live = live_nodes(graph)
    order = [n for n in graph.topological_order() if n in live]
    bad = [f"  {graph.node(n)['op']} %{n}" for n in order
           if graph.node(n)["op"] not in ("input", "param") and graph.node(n)["op"] not in _EXPORTERS]
    if bad:
        raise ConvcError(f"graph '{graph.name}' cannot be written as ONNX; {len(bad)} node"
                         f"{'s have' if len(bad) != 1 else ' has'} an op with no ONNX form:\n" + "\n".join(bad))
    ex = _Exporter(graph, opset)
    for n in graph.input_names:            # all of them: the model's signature is the graph's
        t = graph.node(n)["type"]
        ex.inputs.append(helper.make_tensor_value_info(ex.tensor[n], _ELEM_OF_DTYPE[t.dtype], t.shape))
    for n in order:
        d = graph.node(n)
        if d["op"] == "input":
            continue
        if d["op"] == "param":
            ex.initializer(d["value"], n, param=True)
        else:
            _EXPORTERS[d["op"]](ex, n, graph.inputs_of(n), d["attrs"], d["type"])
    outputs = []
    for o, n in graph.outputs.items():
        if ex.tensor[n] != o:
            ex.node("Identity", [ex.tensor[n]], [o])
        t = graph.node(n)["type"]
        outputs.append(helper.make_tensor_value_info(o, _ELEM_OF_DTYPE[t.dtype], t.shape))
    from .. import __version__

    g = helper.make_graph(ex.nodes, graph.name, ex.inputs, outputs, ex.initializers)
    ops = [helper.make_opsetid("", opset)]
    model = helper.make_model(g, opset_imports=ops, producer_name="convc", producer_version=__version__,
                              ir_version=helper.find_min_ir_version_for(ops))
    if path is not None:
        onnx.save(model, os.fspath(path))
    return model


class _Exporter:
    def __init__(self, graph: Graph, opset: int):
        self.graph, self.opset = graph, opset
        self.nodes, self.inputs, self.initializers = [], [], []
        # A node's tensor is its name, unless an output of another node is called that.
        self.taken = set(graph.outputs) | set(graph.nx.nodes)
        self.tensor = {n: n if graph.outputs.get(n, n) == n else self.fresh(n) for n in graph.nx.nodes}

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], **attrs):
        from onnx import helper
        self.nodes.append(helper.make_node(op, inputs, outputs, name=outputs[0], **attrs))
        return outputs[0]

    def initializer(self, value: np.ndarray, base: str, param: bool = False) -> str:
        """A new initializer named after ``base`` (or, for ``param``, the
        initializer of param node ``base``); returns its tensor name."""
        from onnx import numpy_helper
        name = self.tensor[base] if param else self.fresh(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def ints(self, values, base: str) -> str:
        return self.initializer(np.array(values, np.int64), base)

    def value(self, n: str):
        """The array of a param node, or None."""
        d = self.graph.node(n)
        return d["value"] if d["op"] == "param" else None


def _np(t) -> type:
    return _NP_OF_DTYPE[t.dtype]


def _pads_attr(pairs):
    return [lo for lo, _ in pairs] + [hi for _, hi in pairs]


def _x_activation_node(ex, kind: str, params: dict, x: str, out: str, dtype) -> str:
    """One activation of the table as ONNX node(s) from tensor ``x`` to ``out``."""
    act = ACTIVATION_TABLE[kind]
    if act.onnx is None:          # silu: x * sigmoid(x)
        s = ex.node("Sigmoid", [x], [ex.fresh(f"{out}.sigmoid")])
        return ex.node("Mul", [x, s], [out])
    if ex.opset < act.onnx_since:
        raise ConvcError(f"{kind} is ONNX {act.onnx}, which needs opset >= {act.onnx_since}; "
                         f"export with to_onnx(..., opset={act.onnx_since})")
    if kind == "clip":
        bounds = [ex.initializer(np.array(params[k], dtype), f"{out}.{k}") if math.isfinite(params[k]) else ""
                  for k in ("min", "max")]
        while bounds and not bounds[-1]:
            bounds.pop()
        return ex.node("Clip", [x] + bounds, [out])
    extra = {"approximate": "tanh"} if kind == "gelu_tanh" else \
        {a: params[p] for p, a in _onnx_attr_names(act).items()}
    return ex.node(act.onnx, [x], [out], **extra)


def _finish(ex, n, y: str, attrs):
    """A producer's epilogue (residual add, fused activation) as its own nodes."""
    f = activations.fused(attrs)
    if attrs.get("residual"):
        r = ex.tensor[ex.graph.inputs_of(n)[-1]]
        y = ex.node("Add", [y, r], [ex.tensor[n] if f is None else ex.fresh(f"{n}.residual")])
    if f is None:
        return y
    return _x_activation_node(ex, f[0].name, f[1], y, ex.tensor[n], _np(ex.graph.node(n)["type"]))


def _with_bias(ex, n, op, ins, names, attrs, **onnx_attrs):
    """Conv / ConvTranspose on tensors ``names``: a tied bias as the third
    input, an untied one (a bias per output position) as an Add, then a
    fused activation."""
    ins, names = epilogue.split(attrs, ins)[0], epilogue.split(attrs, names)[0]
    untied = len(ins) == 3 and len(ex.graph.node(ins[2])["type"].shape) > 1
    act = attrs.get("activation") or attrs.get("residual")
    y = ex.node(op, names[:2] if untied else names,
                [ex.tensor[n] if not (untied or act) else ex.fresh(f"{n}.{op}")], **onnx_attrs)
    if untied:
        y = ex.node("Add", [y, names[2]], [ex.tensor[n] if not act else ex.fresh(f"{n}.bias")])
    _finish(ex, n, y, attrs)


@exports("conv")
def _x_conv(ex, n, ins, attrs, out):
    names = [ex.tensor[i] for i in ins]
    k = ex.graph.node(ins[1])["type"].shape[2:]
    if attrs["flip"]:            # true convolution: ONNX's Conv correlates, so flip the kernel
        w, rank = ex.value(ins[1]), len(k)
        if w is not None:
            names[1] = ex.initializer(w[(Ellipsis,) + (slice(None, None, -1),) * rank].copy(), f"{ins[1]}.flipped")
        else:
            names[1] = ex.node("Slice", [names[1], ex.ints([-1] * rank, f"{n}.starts"),
                                         ex.ints([-2**63] * rank, f"{n}.ends"),
                                         ex.ints(list(range(2, 2 + rank)), f"{n}.axes"),
                                         ex.ints([-1] * rank, f"{n}.steps")], [ex.fresh(f"{n}.flipped")])
    _with_bias(ex, n, "Conv", ins, names, attrs, kernel_shape=list(k), strides=list(attrs["stride"]),
               pads=_pads_attr(attrs["padding"]), dilations=list(attrs["dilation"]), group=attrs["groups"])


@exports("conv_transpose")
def _x_conv_transpose(ex, n, ins, attrs, out):
    k = ex.graph.node(ins[1])["type"].shape[2:]
    _with_bias(ex, n, "ConvTranspose", ins, [ex.tensor[i] for i in ins], attrs, kernel_shape=list(k),
               strides=list(attrs["stride"]), pads=_pads_attr(attrs["padding"]), dilations=list(attrs["dilation"]),
               group=attrs["groups"], output_padding=list(attrs["output_padding"]))


@exports("max_pool", "avg_pool")
def _x_pool(ex, n, ins, attrs, out):
    common = dict(kernel_shape=list(attrs["kernel_size"]), strides=list(attrs["stride"]),
                  pads=_pads_attr(attrs["padding"]), ceil_mode=int(attrs["ceil_mode"]))
    if ex.graph.node(n)["op"] == "max_pool":
        ex.node("MaxPool", [ex.tensor[ins[0]]], [ex.tensor[n]], dilations=list(attrs["dilation"]), **common)
    else:
        ex.node("AveragePool", [ex.tensor[ins[0]]], [ex.tensor[n]],
                count_include_pad=int(attrs["count_include_pad"]), **common)


_SIMPLE = {"global_avg_pool": "GlobalAveragePool", "add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div",
           "matmul": "MatMul", "maximum": "Max", "minimum": "Min", "pow": "Pow", "prelu": "PRelu"}


@exports(*_SIMPLE)
def _x_simple(ex, n, ins, attrs, out):
    own = epilogue.split(attrs, ins)[0]
    args = [ex.tensor[i] for i in own]
    if attrs.get("transpose_a"):            # matmul of a used transposed
        rank = len(ex.graph.node(ins[0])["type"].shape)
        perm = list(range(rank - 2)) + [rank - 1, rank - 2]
        args[0] = ex.node("Transpose", [args[0]], [ex.fresh(f"{n}.a_T")], perm=perm)
    done = not (attrs.get("bias") or epilogue.active(attrs))
    y = ex.node(_SIMPLE[ex.graph.node(n)["op"]], args[:2], [ex.tensor[n] if done else ex.fresh(f"{n}.product")])
    if attrs.get("bias"):                   # matmul's row bias
        y = ex.node("Add", [y, args[2]], [ex.tensor[n] if not epilogue.active(attrs) else ex.fresh(f"{n}.bias")])
    if not done:
        _finish(ex, n, y, attrs)


@exports(*ACTIVATION_TABLE)
def _x_activation(ex, n, ins, attrs, out):
    _x_activation_node(ex, ex.graph.node(n)["op"], attrs, ex.tensor[ins[0]], ex.tensor[n], _np(out))


@exports("softmax")
def _x_softmax(ex, n, ins, attrs, out):
    ex.node("Softmax", [ex.tensor[ins[0]]], [ex.tensor[n]], axis=attrs["axis"])


@exports("concat")
def _x_concat(ex, n, ins, attrs, out):
    ex.node("Concat", [ex.tensor[i] for i in ins], [ex.tensor[n]], axis=attrs["axis"])


@exports("reshape", "flatten")
def _x_reshape(ex, n, ins, attrs, out):
    ex.node("Reshape", [ex.tensor[ins[0]], ex.ints(out.shape, f"{n}.shape")], [ex.tensor[n]])


@exports("transpose")
def _x_transpose(ex, n, ins, attrs, out):
    ex.node("Transpose", [ex.tensor[ins[0]]], [ex.tensor[n]], perm=list(attrs["perm"]))


@exports("expand")
def _x_expand(ex, n, ins, attrs, out):
    ex.node("Expand", [ex.tensor[ins[0]], ex.ints(out.shape, f"{n}.shape")], [ex.tensor[n]])


@exports("slice")
def _x_slice(ex, n, ins, attrs, out):
    ex.node("Slice", [ex.tensor[ins[0]], ex.ints([attrs["start"]], f"{n}.starts"),
                      ex.ints([attrs["stop"]], f"{n}.ends"), ex.ints([attrs["axis"]], f"{n}.axes")], [ex.tensor[n]])


@exports("reduce_sum")
def _x_reduce_sum(ex, n, ins, attrs, out):
    ex.node("ReduceSum", [ex.tensor[ins[0]], ex.ints(attrs["axes"], f"{n}.axes")], [ex.tensor[n]],
            keepdims=int(attrs["keepdims"]))


@exports("dense")
def _x_dense(ex, n, ins, attrs, out):
    t = ex.tensor
    ins = epilogue.split(attrs, ins)[0]
    last = t[n] if not epilogue.active(attrs) else ex.fresh(f"{n}.dense")
    x_rank = len(ex.graph.node(ins[0])["type"].shape)
    if x_rank == 2:
        y = ex.node("Gemm", [t[i] for i in ins], [last], transB=1)
    else:
        w = ex.value(ins[1])
        wt = (ex.initializer(w.T.copy(), f"{ins[1]}.T") if w is not None
              else ex.node("Transpose", [t[ins[1]]], [ex.fresh(f"{n}.w_t")], perm=[1, 0]))
        y = ex.node("MatMul", [t[ins[0]], wt], [last if len(ins) == 2 else ex.fresh(f"{n}.matmul")])
        if len(ins) == 3:
            y = ex.node("Add", [y, t[ins[2]]], [last])
    if last != t[n]:
        _finish(ex, n, y, attrs)


@exports("batch_norm")
def _x_batch_norm(ex, n, ins, attrs, out):
    x, mean, var, gamma, beta = (ex.tensor[i] for i in ins)
    ex.node("BatchNormalization", [x, gamma, beta, mean, var], [ex.tensor[n]], epsilon=attrs["eps"])


@exports("pad")
def _x_pad(ex, n, ins, attrs, out):
    x, pads = ex.tensor[ins[0]], list(attrs["pads"])
    if any(lo < 0 or hi < 0 for lo, hi in pads):        # crops: a Slice (onnx.reference's Pad cannot)
        sizes = ex.graph.node(ins[0])["type"].shape[2:]
        x = ex.node("Slice", [x, ex.ints([max(-lo, 0) for lo, _ in pads], f"{n}.starts"),
                              ex.ints([sz - max(-hi, 0) for sz, (_, hi) in zip(sizes, pads)], f"{n}.ends"),
                              ex.ints(list(range(2, 2 + len(pads))), f"{n}.axes")], [ex.fresh(f"{n}.crop")])
        pads = [(max(lo, 0), max(hi, 0)) for lo, hi in pads]
    ex.node("Pad", [x, ex.ints(_pads_attr([(0, 0), (0, 0)] + pads), f"{n}.pads"),
                    ex.initializer(np.array(attrs["value"], _np(out)), f"{n}.value")], [ex.tensor[n]])


@exports("channel_shuffle")
def _x_channel_shuffle(ex, n, ins, attrs, out):
    nb, c, *rest = out.shape
    g = attrs["groups"]
    a = ex.node("Reshape", [ex.tensor[ins[0]], ex.ints([nb, g, c // g, *rest], f"{n}.split")], [ex.fresh(f"{n}.split")])
    b = ex.node("Transpose", [a], [ex.fresh(f"{n}.swap")], perm=[0, 2, 1, *range(3, 3 + len(rest))])
    ex.node("Reshape", [b, ex.ints(out.shape, f"{n}.shape")], [ex.tensor[n]])


@exports("downsample")
def _x_downsample(ex, n, ins, attrs, out):
    x = ex.graph.node(ins[0])["type"].shape
    rank = len(x) - 2
    ex.node("Slice", [ex.tensor[ins[0]], ex.ints([0] * rank, f"{n}.starts"), ex.ints(x[2:], f"{n}.ends"),
                      ex.ints(list(range(2, 2 + rank)), f"{n}.axes"), ex.ints(attrs["stride"], f"{n}.steps")],
            [ex.tensor[n]])


@exports("dilate")
def _x_dilate(ex, n, ins, attrs, out):
    # zeros between elements: a per-channel transposed conv with a 1x1 kernel of one
    c, rank = out.shape[1], len(out.shape) - 2
    if out.dtype == "int64":
        raise ConvcError(f"node %{n} (dilate): int64 tensors have no ONNX form here (ConvTranspose is float)")
    w = ex.initializer(np.ones((c, 1) + (1,) * rank, _np(out)), f"{n}.ones")
    ex.node("ConvTranspose", [ex.tensor[ins[0]], w], [ex.tensor[n]], strides=list(attrs["stride"]), group=c,
            kernel_shape=[1] * rank)


@exports("resize")
def _x_resize(ex, n, ins, attrs, out):
    # ONNX's Resize takes sizes (its scale is then exactly size / input) or
    # float32 scales (output floor(input * scale)): sizes when convc's scale
    # is that ratio, else the float32 scales if they compute the same.
    n_in = ex.graph.node(ins[0])["type"].shape[2:]
    mode, ctm, nearest = attrs["mode"], attrs["coordinate_transformation_mode"], attrs["nearest_mode"]
    onnx_attrs = dict(mode=mode, coordinate_transformation_mode=ctm, **({"nearest_mode": nearest} if nearest else {}))
    if all(is_ratio(i, o, s) for i, o, s in zip(n_in, attrs["size"], attrs["scale"])):
        ex.node("Resize", [ex.tensor[ins[0]], "", "", ex.ints(out.shape, f"{n}.sizes")], [ex.tensor[n]],
                **onnx_attrs)
        return
    for i, o, s in zip(n_in, attrs["size"], attrs["scale"]):
        s32 = float(np.float32(s))
        if math.floor(i * s32) != o or not np.allclose(axis_matrix(i, o, s32, mode, ctm, nearest),
                                                       axis_matrix(i, o, s, mode, ctm, nearest), rtol=0, atol=1e-6):
            raise ConvcError(f"node %{n} (resize): the scale {s} of an axis resized from {i} to {o} is not {o}/{i}, "
                             f"and as a float32 (ONNX's scales are float32) it reads other elements")
    scales = ex.initializer(np.array([1.0, 1.0] + list(attrs["scale"]), np.float32), f"{n}.scales")
    ex.node("Resize", [ex.tensor[ins[0]], "", scales], [ex.tensor[n]], **onnx_attrs)


# -- quantized ops as ONNX (QDQ) ------------------------------------------------------
# quantize / dequantize are QuantizeLinear / DequantizeLinear, qconv is
# QLinearConv, qmatmul QLinearMatMul (MatMulInteger when it returns the raw
# int32 sums); the other integer ops are written in the QDQ form --
# DequantizeLinear -> the float op -> QuantizeLinear -- which ONNX Runtime
# fuses into its integer kernels. A clamp narrower than the dtype (a folded
# relu) is a Clip on the integers. ONNX Runtime requantizes in float where
# convc uses fixed point, so the two agree within one step of the output.
def _q_scalar(ex, base: str, value, dtype) -> str:
    """An initializer of one number, or of one per channel (1-D)."""
    v = np.asarray(value, dtype).reshape(-1)
    return ex.initializer(v.reshape(()) if v.size == 1 else v, base)


def _x_q_pair(ex, n: str, what: str, scale, zero_point, dtype: str) -> list[str]:
    return [_q_scalar(ex, f"{n}.{what}_scale", scale, np.float32),
            _q_scalar(ex, f"{n}.{what}_zero_point", zero_point, _NP_OF_DTYPE[dtype])]


def _x_clamp(ex, n: str, y: str, attrs, out_name: str) -> str:
    """Clip to the op's clamp when it is narrower than its dtype."""
    lo, hi = attrs.get("clamp") or (None, None)
    info = np.iinfo(attrs["dtype"])
    if lo is None or (lo <= info.min and hi >= info.max):
        return y
    np_t = _NP_OF_DTYPE[attrs["dtype"]]
    return ex.node("Clip", [y, ex.initializer(np.array(lo, np_t), f"{n}.lo"), ex.initializer(np.array(hi, np_t),
                                                                                             f"{n}.hi")], [out_name])


def _needs_clip(attrs) -> bool:
    lo, hi = attrs.get("clamp") or (None, None)
    info = np.iinfo(attrs["dtype"])
    return lo is not None and not (lo <= info.min and hi >= info.max)


def _out_q(ex, n: str, y_float: str, attrs):
    """QuantizeLinear of a float result to the op's output (and its clamp)."""
    clip = _needs_clip(attrs)
    q = ex.node("QuantizeLinear", [y_float, *_x_q_pair(ex, n, "y", attrs["y_scale"], attrs["y_zero_point"],
                                                       attrs["dtype"])],
                [ex.fresh(f"{n}.unclamped") if clip else ex.tensor[n]])
    _x_clamp(ex, n, q, attrs, ex.tensor[n])


def _x_dq(ex, n: str, what: str, src: str, dtype: str, scale, zero_point, axis=None) -> str:
    """DequantizeLinear of tensor ``src`` (per axis: scale and zero point
    with one entry per index, as ONNX Runtime requires)."""
    n_axis = max(np.size(scale), np.size(zero_point))
    extra = {"axis": axis} if axis is not None and n_axis > 1 else {}
    if extra:
        scale, zero_point = (np.broadcast_to(np.reshape(v, -1), (n_axis,)) for v in (scale, zero_point))
    return ex.node("DequantizeLinear", [src, *_x_q_pair(ex, n, what, scale, zero_point, dtype)],
                   [ex.fresh(f"{n}.{what}_float")], **extra)


@exports("quantize")
def _x_quantize(ex, n, ins, attrs, out):
    extra = {"axis": attrs["axis"]} if attrs["axis"] is not None else {}
    ex.node("QuantizeLinear", [ex.tensor[ins[0]], *_x_q_pair(ex, n, "y", attrs["scale"], attrs["zero_point"],
                                                             out.dtype)], [ex.tensor[n]], **extra)


@exports("dequantize")
def _x_dequantize(ex, n, ins, attrs, out):
    x_dtype = ex.graph.node(ins[0])["type"].dtype
    extra = {"axis": attrs["axis"]} if attrs["axis"] is not None else {}
    ex.node("DequantizeLinear", [ex.tensor[ins[0]], *_x_q_pair(ex, n, "x", attrs["scale"], attrs["zero_point"],
                                                               x_dtype)], [ex.tensor[n]], **extra)


@exports("qconv")
def _x_qconv(ex, n, ins, attrs, out):
    t = ex.tensor
    x_dtype, w_dtype = (ex.graph.node(i)["type"].dtype for i in ins[:2])
    k = ex.graph.node(ins[1])["type"].shape[2:]
    args = [t[ins[0]], *_x_q_pair(ex, n, "x", attrs["x_scale"], attrs["x_zero_point"], x_dtype), t[ins[1]],
            *_x_q_pair(ex, n, "w", attrs["w_scale"], attrs["w_zero_point"], w_dtype),
            *_x_q_pair(ex, n, "y", attrs["y_scale"], attrs["y_zero_point"], attrs["dtype"])]
    if len(ins) == 3:
        args.append(t[ins[2]])
    clip = _needs_clip(attrs)
    y = ex.node("QLinearConv", args, [ex.fresh(f"{n}.unclamped") if clip else t[n]], kernel_shape=list(k),
                strides=list(attrs["stride"]), pads=_pads_attr(attrs["padding"]), dilations=list(attrs["dilation"]),
                group=attrs["groups"])
    _x_clamp(ex, n, y, attrs, t[n])


@exports("qmatmul")
def _x_qmatmul(ex, n, ins, attrs, out):
    t = ex.tensor
    a_dtype, b_dtype = (ex.graph.node(i)["type"].dtype for i in ins)
    if attrs["dtype"] == "int32":
        ex.node("MatMulInteger", [t[ins[0]], t[ins[1]],
                                  _q_scalar(ex, f"{n}.a_zero_point", attrs["a_zero_point"], _NP_OF_DTYPE[a_dtype]),
                                  _q_scalar(ex, f"{n}.b_zero_point", attrs["b_zero_point"], _NP_OF_DTYPE[b_dtype])],
                [t[n]])
        return
    clip = _needs_clip(attrs)
    y = ex.node("QLinearMatMul", [t[ins[0]], *_x_q_pair(ex, n, "a", attrs["a_scale"], attrs["a_zero_point"], a_dtype),
                                  t[ins[1]], *_x_q_pair(ex, n, "b", attrs["b_scale"], attrs["b_zero_point"], b_dtype),
                                  *_x_q_pair(ex, n, "y", attrs["y_scale"], attrs["y_zero_point"], attrs["dtype"])],
                [ex.fresh(f"{n}.unclamped") if clip else t[n]])
    _x_clamp(ex, n, y, attrs, t[n])


@exports("qdense")
def _x_qdense(ex, n, ins, attrs, out):
    if attrs["dtype"] == "int32":
        raise ConvcError(f"node %{n} (qdense): its raw int32 output has no QDQ form; use qmatmul")
    t, gt = ex.tensor, ex.graph.node
    x = _x_dq(ex, n, "x", t[ins[0]], gt(ins[0])["type"].dtype, attrs["x_scale"], attrs["x_zero_point"])
    w = _x_dq(ex, n, "w", t[ins[1]], gt(ins[1])["type"].dtype, attrs["w_scale"], attrs["w_zero_point"], axis=0)
    args = [x, w]
    if len(ins) == 3:
        bias_scale = np.float32(attrs["x_scale"]) * np.asarray(attrs["w_scale"], np.float32)
        args.append(_x_dq(ex, n, "b", t[ins[2]], "int32", bias_scale, 0, axis=0))
    x_rank = len(gt(ins[0])["type"].shape)
    if x_rank == 2:
        y = ex.node("Gemm", args, [ex.fresh(f"{n}.float")], transB=1)
    else:
        wt = ex.node("Transpose", [w], [ex.fresh(f"{n}.w_t")], perm=[1, 0])
        y = ex.node("MatMul", [x, wt], [ex.fresh(f"{n}.float")])
        if len(args) == 3:
            y = ex.node("Add", [y, args[2]], [ex.fresh(f"{n}.biased")])
    _out_q(ex, n, y, attrs)


@exports("qadd")
def _x_qadd(ex, n, ins, attrs, out):
    t, gt = ex.tensor, ex.graph.node
    a = _x_dq(ex, n, "a", t[ins[0]], gt(ins[0])["type"].dtype, attrs["a_scale"], attrs["a_zero_point"])
    b = _x_dq(ex, n, "b", t[ins[1]], gt(ins[1])["type"].dtype, attrs["b_scale"], attrs["b_zero_point"])
    _out_q(ex, n, ex.node("Add", [a, b], [ex.fresh(f"{n}.float")]), attrs)


@exports("qconcat")
def _x_qconcat(ex, n, ins, attrs, out):
    t, gt = ex.tensor, ex.graph.node
    parts = [_x_dq(ex, n, f"x{k}", t[i], gt(i)["type"].dtype, s, z)
             for k, (i, s, z) in enumerate(zip(ins, attrs["x_scales"], attrs["x_zero_points"]))]
    _out_q(ex, n, ex.node("Concat", parts, [ex.fresh(f"{n}.float")], axis=attrs["axis"]), attrs)


@exports("qavg_pool", "qglobal_avg_pool")
def _x_qpool(ex, n, ins, attrs, out):
    t, gt = ex.tensor, ex.graph.node
    x = _x_dq(ex, n, "x", t[ins[0]], gt(ins[0])["type"].dtype, attrs["x_scale"], attrs["x_zero_point"])
    if gt(n)["op"] == "qglobal_avg_pool":
        y = ex.node("GlobalAveragePool", [x], [ex.fresh(f"{n}.float")])
    else:
        y = ex.node("AveragePool", [x], [ex.fresh(f"{n}.float")], kernel_shape=list(attrs["kernel_size"]),
                    strides=list(attrs["stride"]), pads=_pads_attr(attrs["padding"]),
                    ceil_mode=int(attrs["ceil_mode"]), count_include_pad=int(attrs["count_include_pad"]))
    _out_q(ex, n, y, attrs)


# -- cast, where, take (convc/ops/indexing.py) ----------------------------------------
@exports("cast")
def _x_cast(ex, n, ins, attrs, out):
    """ONNX's Cast (its float -> integer result out of range is undefined;
    convc's saturates)."""
    from onnx import helper
    ex.node("Cast", [ex.tensor[ins[0]]], [ex.tensor[n]], to=helper.np_dtype_to_tensor_dtype(np.dtype(out.dtype)))


@exports("where")
def _x_where(ex, n, ins, attrs, out):
    """convc's mask is an integer tensor, ONNX's condition a bool one: a Cast between."""
    from onnx import TensorProto
    cond = ex.node("Cast", [ex.tensor[ins[0]]], [ex.fresh(f"{n}.cond")], to=TensorProto.BOOL)
    ex.node("Where", [cond, ex.tensor[ins[1]], ex.tensor[ins[2]]], [ex.tensor[n]])


@exports("take")
def _x_take(ex, n, ins, attrs, out):
    idx = np.array(attrs["indices"], np.int64).reshape(attrs["index_shape"])
    ex.node("Gather", [ex.tensor[ins[0]], ex.initializer(idx, f"{n}.indices")], [ex.tensor[n]], axis=attrs["axis"])

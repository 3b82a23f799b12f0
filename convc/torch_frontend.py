"""PyTorch in: :func:`from_torch` turns an ``nn.Module`` into a convc
:class:`Graph` through ``torch.export``, and :func:`fx_to_graph` does the same
for any ATen-level ``torch.fx`` graph (what the ``torch.compile`` backend in
:mod:`convc.torch_backend` receives from AOTAutograd).

The walk is the ONNX importer's: nodes in topological order, each ATen op
mapped by one ``@converts`` function onto convc's op builders; a node that
cannot be mapped is recorded and the walk goes on, so
:class:`TorchImportError` lists every unsupported op at once. The same
converters answer "can convc take this node?" for the backend's partitioner
(:func:`node_support`): a converter run on a scratch graph is the one
definition of what is supported.

ATen's core decompositions would split hardswish, silu, the activations'
backward ops and 1D upsampling into several elementwise or indexing ops;
:func:`decompositions` keeps every op convc maps whole (one activation,
which convc fuses into its producer's epilogue; celu, softplus, mish,
prelu, logsumexp, var_mean, pixel_shuffle ... as convc's own ops).

Index tensors and masks (index_select, gather, where) must be constants
of the module: their converters read them as arrays (``converts(consts=)``)
and the params they came from are dropped.

>>> g = cc.from_torch(model.eval(), (torch.randn(1, 3, 32, 32),))   # doctest: +SKIP
>>> y = cc.compile(g)(x=np.random.rand(1, 3, 32, 32).astype(np.float32))   # doctest: +SKIP
"""
from __future__ import annotations

import math
import operator
import os
import re
from collections import Counter

import numpy as np

from .errors import ConvcError, GraphError
from .ir import Graph, Value
from .ops.conv import conv
from .ops import elementwise as ew
from .ops.elementwise import (activation_grad, add, clip, div, gelu, hardsigmoid, hardswish, leaky_relu, mul, relu,
                              sigmoid, silu, sub, tanh)
from .ops.indexing import cast, take
from .ops.indexing import where as where_op
from .ops.normalize import group_norm, layer_norm
from .ops.rearrange import depth_to_space, space_to_depth, tile
from .ops.reduce import reduce
from .ops.linear import dense, matmul, softmax
from .ops.norm import batch_norm
from .ops.pool import avg_pool, avg_pool_grad, global_avg_pool, max_pool, max_pool_grad
from .ops.resize import resize
from .ops.tensor import concat, expand, reduce_sum, reshape, slice_axis, transpose
from .ops.transpose import conv_grad_input, conv_grad_kernel, conv_transpose
from .ops.layout import pad

FLOAT_DTYPES = {"torch.float32": "float32", "torch.float64": "float64"}
# what a placeholder may be: float tensors, and int64 ones a converter ignores (max pool indices)
INPUT_DTYPES = dict(FLOAT_DTYPES, **{"torch.int64": "int64"})


class TorchImportError(ConvcError):
    """A PyTorch program convc cannot import. ``problems`` lists every
    unsupported op as ``(op, count, reason, where)``: ``where`` is the
    source line of its first occurrence, when torch recorded it."""

    def __init__(self, what: str, problems: list[tuple[str, int, str, str]]):
        self.problems = problems
        n = sum(c for _, c, _, _ in problems)
        lines = [f"  {op} x{count}: {why}" + (f"\n      first at {where}" if where else "")
                 for op, count, why, where in problems]
        super().__init__(f"{what} cannot be imported: {n} unsupported node{'s' if n != 1 else ''} "
                         f"({len(problems)} distinct):\n" + "\n".join(lines))


class Unsupported(Exception):
    """Raised by converters: why this node cannot become convc ops."""


def _torch():
    try:
        import torch
    except ImportError:
        raise ConvcError("PyTorch support needs torch: pip install torch") from None
    return torch


def decompositions() -> dict:
    """ATen's core decomposition table without the ops convc maps: convc
    takes them whole (hardswish, silu, the activations' backward ops, 1D
    upsampling ...) instead of as the several elementwise or indexing ops
    they would decompose into. For AOTAutograd and ``torch.export``."""
    from torch._decomp import core_aten_decompositions
    return {op: fn for op, fn in core_aten_decompositions().items() if str(op) not in _CONVERTERS}


# -- converters ---------------------------------------------------------------------
_CONVERTERS: dict[str, callable] = {}
_CONST_ARGS: dict[str, tuple] = {}          # per overload: arguments that may be integer/bool constants


def converts(*targets: str, ignores: tuple = (), consts: tuple = ()):
    """Register ``fn(cv, node, a)`` for ATen overloads (``"aten.relu.default"``):
    ``a`` holds the node's arguments by schema name (defaults filled, FX
    nodes replaced by convc Values; the arguments in ``ignores`` are not
    read and come as None); it returns a Value or a tuple (several outputs;
    ``None`` for one it does not compute). The arguments in ``consts`` may
    be tensors of any dtype (indices, masks): the converter reads them as
    compile-time arrays with :func:`_const_array`."""
    def deco(fn):
        for t in targets:
            _CONVERTERS[t] = (fn, ignores)
            _CONST_ARGS[t] = tuple(consts)
        return fn
    return deco


def mapped_ops() -> list[str]:
    """Every ATen overload convc maps, sorted."""
    return sorted(_CONVERTERS)


def _op_name(node) -> str:
    if node.target is operator.getitem:
        return "getitem"
    return str(node.target)


def _bind(node, env, ignores=()) -> dict:
    """The node's arguments by schema name, defaults filled, FX nodes resolved through ``env``."""
    schema = node.target._schema
    out = {}
    for i, arg in enumerate(schema.arguments):
        if arg.name in ignores:
            v = None
        elif i < len(node.args):
            v = node.args[i]
        elif arg.name in node.kwargs:
            v = node.kwargs[arg.name]
        elif arg.has_default_value():
            v = arg.default_value
        else:
            raise Unsupported(f"argument {arg.name!r} missing")
        out[arg.name] = _resolve(v, env)
    return out


def _resolve(v, env):
    if isinstance(v, _torch().fx.Node):
        return env[v]
    if isinstance(v, (list, tuple)):
        return type(v)(_resolve(x, env) for x in v)
    return v


def _tensor(a, what: str) -> Value:
    if not isinstance(a, Value):
        raise Unsupported(f"{what} must be a tensor computed in the graph, got {type(a).__name__}")
    return a


def _scalar(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise Unsupported(f"{what} must be a number known at compile time, got {v!r}")
    return v


def _axes(x: Value, dims) -> list[int]:
    r = len(x.shape)
    return sorted(d % r for d in (dims if isinstance(dims, (list, tuple)) else [dims]))


# convolution and its gradient
@converts("aten.convolution.default")
def _convolution(cv, node, a):
    x, w, b = _tensor(a["input"], "input"), _tensor(a["weight"], "weight"), a["bias"]
    geo = dict(stride=list(a["stride"]), padding=list(a["padding"]), dilation=list(a["dilation"]),
               groups=a["groups"])
    if a["transposed"]:
        return conv_transpose(x, w, b, output_padding=list(a["output_padding"]), name=cv.name(node), **geo)
    if any(a["output_padding"]):
        raise Unsupported("output_padding on a convolution that is not transposed")
    return conv(x, w, b, name=cv.name(node), **geo)


@converts("aten.convolution_backward.default")
def _convolution_backward(cv, node, a):
    gy, x, w = _tensor(a["grad_output"], "grad_output"), _tensor(a["input"], "input"), _tensor(a["weight"], "weight")
    if a["transposed"]:
        raise Unsupported("the gradient of a transposed convolution")
    geo = dict(stride=list(a["stride"]), padding=list(a["padding"]), dilation=list(a["dilation"]),
               groups=a["groups"])
    need_x, need_w, need_b = a["output_mask"]
    return (conv_grad_input(w, gy, x.shape[2:], **geo) if need_x else None,           # h, Eq 6
            conv_grad_kernel(gy, x, w.shape[2:], **geo) if need_w else None,          # g, Eq 5
            reduce_sum(gy, (0,) + tuple(range(2, len(gy.shape)))) if need_b else None)


@converts("aten.constant_pad_nd.default")
def _constant_pad(cv, node, a):
    x, p = _tensor(a["self"], "input"), list(a["pad"])
    # torch lists (lo, hi) from the last axis backwards; convc pads the spatial axes
    pairs = [(p[2 * i], p[2 * i + 1]) for i in range(len(p) // 2)][::-1]
    spatial = len(x.shape) - 2
    if len(pairs) > spatial:
        if any(lo or hi for lo, hi in pairs[:len(pairs) - spatial]):
            raise Unsupported("padding of the batch or channel axis")
        pairs = pairs[len(pairs) - spatial:]
    pairs = [(0, 0)] * (spatial - len(pairs)) + pairs
    return pad(x, pairs, float(_scalar(a["value"], "pad value")), name=cv.name(node))


# pools
def _pool_args(x, a, rank):
    if len(x.shape) - 2 != rank:
        raise Unsupported(f"a {rank}D pool on a rank-{len(x.shape)} tensor")
    return dict(kernel_size=list(a["kernel_size"]), stride=list(a["stride"]) or None, padding=list(a["padding"]),
                ceil_mode=bool(a["ceil_mode"]))


for _r in (1, 2, 3):
    def _max_pool(cv, node, a, _r=_r):
        x = _tensor(a["self"], "input")
        attrs = dict(_pool_args(x, a, _r), dilation=list(a["dilation"]))
        return max_pool(x, name=cv.name(node), **attrs), None          # (values, indices: not computed)

    def _max_pool_backward(cv, node, a, _r=_r):
        x, gy = _tensor(a["self"], "input"), _tensor(a["grad_output"], "grad_output")
        attrs = dict(_pool_args(x, a, _r), dilation=list(a["dilation"]))
        attrs["stride"] = attrs["stride"] or attrs["kernel_size"]
        # the argmax is recomputed from x, with PyTorch's tie rules; the indices are not read
        return max_pool_grad(x, gy, attrs, name=cv.name(node))

    def _avg_pool(cv, node, a, _r=_r):
        x = _tensor(a["self"], "input")
        if a.get("divisor_override") is not None:         # (avg_pool1d has none)
            raise Unsupported(f"divisor_override={a['divisor_override']} (convc divides by the window's count)")
        return avg_pool(x, count_include_pad=bool(a["count_include_pad"]), name=cv.name(node),
                        **_pool_args(x, a, _r))

    def _avg_pool_backward(cv, node, a, _r=_r):
        x, gy = _tensor(a["self"], "input"), _tensor(a["grad_output"], "grad_output")
        if a["divisor_override"] is not None:
            raise Unsupported(f"divisor_override={a['divisor_override']}")
        attrs = dict(_pool_args(x, a, _r), count_include_pad=bool(a["count_include_pad"]), dilation=1)
        attrs["stride"] = attrs["stride"] or attrs["kernel_size"]
        return avg_pool_grad(gy, x.shape, attrs, name=cv.name(node))

    converts(f"aten.max_pool{_r}d_with_indices.default")(_max_pool)
    converts(f"aten.avg_pool{_r}d.default")(_avg_pool)
    if _r > 1:                      # ATen's 1D pools differentiate through the 2D ones
        converts(f"aten.max_pool{_r}d_with_indices_backward.default", ignores=("indices",))(_max_pool_backward)
        converts(f"aten.avg_pool{_r}d_backward.default")(_avg_pool_backward)


@converts("aten.adaptive_avg_pool1d.default", "aten._adaptive_avg_pool2d.default", "aten._adaptive_avg_pool3d.default")
def _adaptive_avg_pool(cv, node, a):
    x = _tensor(a["self"], "input")
    n_in, n_out = x.shape[2:], tuple(a["output_size"])
    if all(o == 1 for o in n_out):
        return global_avg_pool(x, name=cv.name(node))
    if len(n_out) != len(n_in) or any(o < 1 or i % o for i, o in zip(n_in, n_out)):
        raise Unsupported(f"adaptive pooling of {n_in} to {n_out}: only to 1 or to sizes that divide the input "
                          f"(plain pools)")
    k = [i // o for i, o in zip(n_in, n_out)]
    return avg_pool(x, k, k, name=cv.name(node))


@converts("aten.mean.dim")
def _mean(cv, node, a):
    x = _tensor(a["self"], "input")
    axes = list(range(len(x.shape))) if not a["dim"] else _axes(x, a["dim"])   # (no dims: all)
    keep = bool(a["keepdim"])
    if len(x.shape) >= 3 and axes == list(range(2, len(x.shape))):
        y = global_avg_pool(x, name=cv.name(node) if keep else None)
        return y if keep else reshape(y, x.shape[:2], name=cv.name(node))
    count = math.prod(x.shape[d] for d in axes)
    return div(reduce_sum(x, axes, keep), float(count), name=cv.name(node))


@converts("aten.sum.dim_IntList")
def _sum(cv, node, a):
    x = _tensor(a["self"], "input")
    if a["dtype"] is not None:
        raise Unsupported("sum with a dtype")
    axes = list(range(len(x.shape))) if not a["dim"] else _axes(x, a["dim"])   # (no dims: all)
    return reduce_sum(x, axes, bool(a["keepdim"]), name=cv.name(node))


# batch norm (eval)
@converts("aten._native_batch_norm_legit_no_training.default")
def _batch_norm(cv, node, a):
    x = _tensor(a["input"], "input")
    y = batch_norm(x, a["running_mean"], a["running_var"], a["weight"], a["bias"], eps=float(a["eps"]),
                   name=cv.name(node))
    return y, None, None                    # (output, save_mean, save_invstd: training only)


# activations (convc's activation table) and their gradients
_SIMPLE = {"aten.relu.default": relu, "aten.sigmoid.default": sigmoid, "aten.tanh.default": tanh,
           "aten.silu.default": silu, "aten.hardswish.default": hardswish}
for _t, _fn in _SIMPLE.items():
    converts(_t)(lambda cv, node, a, _fn=_fn: _fn(_tensor(a["self"], "input"), name=cv.name(node)))


@converts("aten.hardsigmoid.default")
def _hardsigmoid(cv, node, a):
    return hardsigmoid(_tensor(a["self"], "input"), name=cv.name(node))


@converts("aten.hardtanh.default", "aten.clamp.default")
def _clamp(cv, node, a):
    lo = a.get("min_val", a.get("min"))
    hi = a.get("max_val", a.get("max"))
    bounds = {k: float(_scalar(v, k)) for k, v in (("min", lo), ("max", hi)) if v is not None}
    return clip(_tensor(a["self"], "input"), name=cv.name(node), **bounds)


@converts("aten.leaky_relu.default")
def _leaky_relu(cv, node, a):
    return leaky_relu(_tensor(a["self"], "input"), float(_scalar(a["negative_slope"], "negative_slope")),
                      name=cv.name(node))


@converts("aten.gelu.default")
def _gelu(cv, node, a):
    return gelu(_tensor(a["self"], "input"), a["approximate"], name=cv.name(node))


def _grad(kind, t_arg, params=lambda a: {}):
    def convert(cv, node, a):
        return activation_grad(kind, _tensor(a[t_arg], t_arg), _tensor(a["grad_output"], "grad_output"),
                               params(a), name=cv.name(node))
    return convert


converts("aten.sigmoid_backward.default")(_grad("sigmoid", "output"))
converts("aten.tanh_backward.default")(_grad("tanh", "output"))
converts("aten.silu_backward.default")(_grad("silu", "self"))
converts("aten.hardswish_backward.default")(_grad("hardswish", "self"))
# clip's derivative reads y, but y is inside (min, max) exactly where x is: PyTorch's rule from x
converts("aten.hardtanh_backward.default")(
    _grad("clip", "self", lambda a: {"min": float(a["min_val"]), "max": float(a["max_val"])}))


@converts("aten.threshold_backward.default")
def _threshold_backward(cv, node, a):
    if a["threshold"] != 0:
        raise Unsupported(f"threshold {a['threshold']} (only ReLU's 0)")
    # ReLU's derivative from its output: 0 where y <= 0
    return activation_grad("relu", _tensor(a["self"], "self"), _tensor(a["grad_output"], "grad_output"),
                           name=cv.name(node))


@converts("aten.leaky_relu_backward.default")
def _leaky_relu_backward(cv, node, a):
    slope = float(_scalar(a["negative_slope"], "negative_slope"))
    if slope < 0 and a["self_is_result"]:
        raise Unsupported("a negative slope computed from the output")
    return activation_grad("leaky_relu", _tensor(a["self"], "self"), _tensor(a["grad_output"], "grad_output"),
                           {"negative_slope": slope}, name=cv.name(node))


@converts("aten.hardsigmoid_backward.default")
def _hardsigmoid_backward(cv, node, a):
    x = _tensor(a["self"], "self")
    y = hardsigmoid(x)                                  # convc's derivative reads the output
    # PyTorch's kernel multiplies by 1/6 rounded to float32 in float64 too; match eager
    params = {"alpha": float(np.float32(1 / 6))} if x.dtype == "float64" else {}
    return activation_grad("hardsigmoid", y, _tensor(a["grad_output"], "grad_output"), params, name=cv.name(node))


@converts("aten.gelu_backward.default")
def _gelu_backward(cv, node, a):
    kind = {"none": "gelu", "tanh": "gelu_tanh"}[a["approximate"]]
    return activation_grad(kind, _tensor(a["self"], "self"), _tensor(a["grad_output"], "grad_output"),
                           name=cv.name(node))


# linear algebra
@converts("aten.addmm.default")
def _addmm(cv, node, a):
    bias, m1, m2 = a["self"], _tensor(a["mat1"], "mat1"), _tensor(a["mat2"], "mat2")
    if (m2.op == "transpose" and a["alpha"] == 1 and a["beta"] == 1 and isinstance(bias, Value)
            and bias.shape == m2.shape[1:] and len(m1.shape) == 2):
        # nn.Linear: x @ w.T + b is convc's dense on the untransposed weight
        w = cv.g.value(cv.g.inputs_of(m2.name)[0])
        return dense(m1, w, bias, name=cv.name(node))
    y = matmul(m1, m2)
    if a["alpha"] != 1:
        y = mul(y, float(_scalar(a["alpha"], "alpha")))
    if a["beta"] != 1:
        bias = mul(_tensor(bias, "bias"), float(_scalar(a["beta"], "beta")))
    return add(y, bias, name=cv.name(node))


@converts("aten.mm.default", "aten.bmm.default")
def _mm(cv, node, a):
    return matmul(_tensor(a["self"], "self"), _tensor(a["mat2"], "mat2"), name=cv.name(node))


@converts("aten._softmax.default")
def _softmax(cv, node, a):
    if a["half_to_float"]:
        raise Unsupported("half_to_float")
    return softmax(_tensor(a["self"], "input"), a["dim"], name=cv.name(node))


# shapes and copies
@converts("aten.view.default", "aten._unsafe_view.default", "aten.reshape.default")
def _view(cv, node, a):
    x = _tensor(a["self"], "input")
    return reshape(x, _out_shape(node, a.get("size", a.get("shape"))), name=cv.name(node))


def _out_shape(node, size) -> tuple:
    val = node.meta.get("val")
    if val is not None:
        return tuple(int(d) for d in val.shape)
    return tuple(size)


@converts("aten.unsqueeze.default", "aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default")
def _squeeze(cv, node, a):
    x = _tensor(a["self"], "input")
    shape = _out_shape(node, ())
    return x if shape == tuple(x.shape) else reshape(x, shape, name=cv.name(node))


@converts("aten.permute.default")
def _permute(cv, node, a):
    x = _tensor(a["self"], "input")
    perm = [d % len(x.shape) for d in a["dims"]]
    return x if perm == sorted(perm) else transpose(x, perm, name=cv.name(node))


@converts("aten.t.default", "aten.transpose.int")
def _transpose(cv, node, a):
    x = _tensor(a["self"], "input")
    r = len(x.shape)
    d0, d1 = (a.get("dim0", 0) % max(r, 1), a.get("dim1", 1) % max(r, 1)) if r > 1 else (0, 0)
    perm = list(range(r))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return x if d0 == d1 else transpose(x, perm, name=cv.name(node))


@converts("aten.cat.default")
def _cat(cv, node, a):
    xs = [_tensor(t, "cat input") for t in a["tensors"]]
    xs = [t for t in xs if math.prod(t.shape) or len(xs) == 1]
    return xs[0] if len(xs) == 1 else concat(xs, a["dim"] % len(xs[0].shape), name=cv.name(node))


@converts("aten.slice.Tensor")
def _slice(cv, node, a):
    x = _tensor(a["self"], "input")
    axis = a["dim"] % len(x.shape)
    start, stop, _ = slice(a["start"], a["end"], a["step"]).indices(x.shape[axis])
    if a["step"] != 1:
        raise Unsupported(f"slice step {a['step']}")
    if (start, stop) == (0, x.shape[axis]):
        return x
    return slice_axis(x, axis, start, max(stop, start), name=cv.name(node))


@converts("aten.expand.default")
def _expand(cv, node, a):
    x = _tensor(a["self"], "input")
    shape = _out_shape(node, a["size"])
    return x if shape == tuple(x.shape) else expand(x, shape, name=cv.name(node))


@converts("aten.clone.default", "aten.alias.default", "aten.detach.default", "aten.lift_fresh_copy.default",
          "aten.dropout.default")
def _identity(cv, node, a):
    if node.target is not None and str(node.target) == "aten.dropout.default" and a["train"]:
        raise Unsupported("dropout in training mode")
    return _tensor(a.get("self", a.get("input")), "input")


# arithmetic, tensor or scalar on either side
def _operand(v, what: str):
    if isinstance(v, Value):
        return v
    return float(_scalar(v, what))


def _arith(fn, has_alpha):
    def convert(cv, node, a):
        x, y = a["self"], a["other"]
        if not isinstance(x, Value) and not isinstance(y, Value):
            raise Unsupported("no tensor operand")
        x, y = _operand(x, "self"), _operand(y, "other")
        if has_alpha and a.get("alpha", 1) != 1:
            y = mul(y, float(_scalar(a["alpha"], "alpha"))) if isinstance(y, Value) else y * a["alpha"]
        if not isinstance(x, Value):            # scalar op tensor: the tensor's dtype decides
            x = cv.g.const(np.asarray(x), y.dtype)
        return fn(x, y, name=cv.name(node))
    return convert


for _t in ("Tensor", "Scalar"):
    converts(f"aten.add.{_t}")(_arith(add, True))
    converts(f"aten.sub.{_t}")(_arith(sub, True))
    converts(f"aten.mul.{_t}")(_arith(mul, False))
    converts(f"aten.div.{_t}")(_arith(div, False))


@converts("aten.rsub.Scalar", "aten.rsub.Tensor")
def _rsub(cv, node, a):
    x = _tensor(a["self"], "self")
    other = a["other"] if isinstance(a["other"], Value) else cv.g.const(np.asarray(float(a["other"])), x.dtype)
    if a["alpha"] != 1:
        x = mul(x, float(a["alpha"]))
    return sub(other, x, name=cv.name(node))


# resize
def _upsample(mode):
    def convert(cv, node, a):
        x = _tensor(a["input"], "input")
        size, scales = a["output_size"], a["scale_factors"]
        kw = {} if mode == "nearest" else {"align_corners": bool(a["align_corners"])}
        if size is not None:
            return resize(x, size=list(size), mode=mode, name=cv.name(node), **kw)
        return resize(x, scale_factor=list(scales), mode=mode, name=cv.name(node), **kw)
    return convert


for _r, _lin in ((1, "linear"), (2, "bilinear"), (3, "trilinear")):
    converts(f"aten.upsample_nearest{_r}d.vec")(_upsample("nearest"))
    converts(f"aten.upsample_{_lin}{_r}d.vec")(_upsample(_lin))


# -- issue 20's ops: more activations, unary math, binary math, reductions, norms, indexing --------
def _const_array(cv, v, what: str) -> np.ndarray:
    """The value of a tensor known at compile time (a param or buffer of
    the module, a constant torch.export lifted), as a numpy array."""
    if isinstance(v, Value) and v.op == "param":
        cv.consts_read.add(v.name)
        return np.asarray(cv.g.node(v.name)["value"])
    raise Unsupported(f"{what} must be a constant of the module (a buffer or a tensor literal), "
                      f"not a tensor computed at run time")


def _same(a, b) -> bool:
    return float(a) == float(b)


def _elu_value(x: Value, alpha: float, scale: float, iscale: float, name) -> Value:
    """torch's elu(x, alpha, scale, input_scale) = scale * (x if x > 0 else
    alpha * expm1(input_scale * x))."""
    if iscale == 1.0:
        if scale == 1.0:
            return ew.elu(x, alpha, name=name)
        return ew.selu(x, alpha, scale, name=name)          # convc's selu: gamma * elu(x, alpha)
    if iscale <= 0:
        raise Unsupported(f"input_scale={iscale} (convc builds elu's input scaling for input_scale > 0 only)")
    # celu and the general form: the negative part alpha*expm1(input_scale*min(x, 0)) is 0 for x > 0
    neg = ew.elu(mul(clip(x, max=0.0), iscale), alpha)
    y = add(relu(x), neg, name=name if scale == 1.0 else None)
    return y if scale == 1.0 else mul(y, scale, name=name)


@converts("aten.elu.default")
def _elu(cv, node, a):
    """selu decomposes to elu (alpha and scale); celu is kept whole below."""
    alpha, scale, iscale = (float(_scalar(a[k], k)) for k in ("alpha", "scale", "input_scale"))
    return _elu_value(_tensor(a["self"], "input"), alpha, scale, iscale, cv.name(node))


@converts("aten.celu.default")
def _celu(cv, node, a):
    alpha = float(_scalar(a["alpha"], "alpha"))
    if alpha == 0:
        raise Unsupported("celu with alpha=0 (its input scale 1/alpha)")
    return _elu_value(_tensor(a["self"], "input"), alpha, 1.0, 1.0 / alpha, cv.name(node))


@converts("aten.elu_backward.default")
def _elu_backward(cv, node, a):
    """torch's elu_backward: gy * scale where x > 0, else gy * input_scale *
    alpha * scale * exp(input_scale * x) (from x), or gy * input_scale * (y +
    alpha * scale) (from the output y, for in-place elu)."""
    gy = _tensor(a["grad_output"], "grad_output")
    t = _tensor(a["self_or_result"], "self_or_result")
    alpha, scale, iscale = (float(_scalar(a[k], k)) for k in ("alpha", "scale", "input_scale"))
    if iscale <= 0 or scale <= 0:
        raise Unsupported(f"elu_backward with scale={scale}, input_scale={iscale} (convc builds it for positive "
                          f"scales, where x > 0 exactly when y > 0)")
    if a["is_result"]:
        pos = activation_grad("relu", t, gy)                # gy where y > 0, else 0
        neg = mul(mul(sub(gy, pos), iscale), add(t, alpha * scale))
        return add(mul(pos, scale) if scale != 1.0 else pos, neg, name=cv.name(node))
    # the selu record's derivative at input_scale * x (same sign as x) with alpha * input_scale
    tx = t if iscale == 1.0 else mul(t, iscale)
    if scale == 1.0:
        return activation_grad("elu", tx, gy, {"alpha": alpha * iscale}, name=cv.name(node))
    return activation_grad("selu", tx, gy, {"alpha": alpha * iscale, "gamma": scale}, name=cv.name(node))


def _softplus_checks(x: Value, beta, threshold, what: str) -> tuple[float, float]:
    """torch's softplus is x itself where beta*x > threshold; convc's record
    is log1p(exp(beta*x))/beta everywhere, which differs there by at most
    exp(-threshold) relative (value) and exp(-threshold) (derivative): taken
    when that is below the dtype's epsilon, so the two round alike."""
    beta, threshold = float(_scalar(beta, "beta")), float(_scalar(threshold, "threshold"))
    if beta <= 0:
        raise Unsupported(f"{what} with beta={beta} (convc builds softplus(beta*x)/beta for beta > 0)")
    eps = float(np.finfo(x.dtype).eps)
    if not math.exp(-threshold) < eps:
        raise Unsupported(f"{what} with threshold={threshold} on {x.dtype}: torch returns x itself above it, "
                          f"convc's softplus the smooth value, up to exp(-{threshold:g}) = "
                          f"{math.exp(-threshold):.2g} apart, above {x.dtype}'s epsilon {eps:.2g} "
                          f"(a threshold >= {math.ceil(-math.log(eps)) + 1} matches)")
    return beta, threshold


@converts("aten.softplus.default")
def _softplus(cv, node, a):
    x = _tensor(a["self"], "input")
    beta, _ = _softplus_checks(x, a["beta"], a["threshold"], "softplus")
    if beta == 1.0:
        return ew.softplus(x, name=cv.name(node))
    return div(ew.softplus(mul(x, beta)), beta, name=cv.name(node))


@converts("aten.softplus_backward.default")
def _softplus_backward(cv, node, a):
    x, gy = _tensor(a["self"], "self"), _tensor(a["grad_output"], "grad_output")
    beta, _ = _softplus_checks(x, a["beta"], a["threshold"], "softplus_backward")
    bx = x if beta == 1.0 else mul(x, beta)
    # d/dx softplus(beta x)/beta = sigmoid(beta x): the record's derivative at beta x (from its output)
    return activation_grad("softplus", ew.softplus(bx), gy, name=cv.name(node))


@converts("aten.mish.default")
def _mish(cv, node, a):
    return ew.mish(_tensor(a["self"], "input"), name=cv.name(node))


@converts("aten.mish_backward.default")
def _mish_backward(cv, node, a):
    return activation_grad("mish", _tensor(a["self"], "self"), _tensor(a["grad_output"], "grad_output"),
                           name=cv.name(node))


_UNARY = {"sqrt": ew.sqrt, "exp": ew.exp, "log": ew.log, "neg": ew.neg, "abs": ew.abs,
          "reciprocal": ew.reciprocal, "erf": ew.erf}
for _t, _fn in _UNARY.items():
    converts(f"aten.{_t}.default")(lambda cv, node, a, _fn=_fn: _fn(_tensor(a["self"], "input"),
                                                                      name=cv.name(node)))


@converts("aten.rsqrt.default")
def _rsqrt(cv, node, a):
    return ew.reciprocal(ew.sqrt(_tensor(a["self"], "input")), name=cv.name(node))


def _binary_math(fn):
    def convert(cv, node, a):
        x, y = a["self"], a.get("other", a.get("exponent"))
        if not isinstance(x, Value):            # pow.Scalar: a number to a tensor power
            y = _tensor(y, "exponent")
            x = cv.g.const(np.asarray(float(_scalar(x, "self"))), y.dtype)
        x = _tensor(x, "self")
        if not isinstance(y, Value):
            y = float(_scalar(y, "exponent"))
        # torch's type promotion (a 0-dim tensor counts as a number): operands to the result's dtype
        t = _meta_type(node)
        want = FLOAT_DTYPES.get(t[1]) if t else None
        if want:
            x, y = (cast(v, want) if isinstance(v, Value) and v.dtype != want else v for v in (x, y))
        return fn(x, y, name=cv.name(node))
    return convert


converts("aten.maximum.default")(_binary_math(ew.maximum))
converts("aten.minimum.default")(_binary_math(ew.minimum))
converts("aten.pow.Tensor_Tensor", "aten.pow.Tensor_Scalar", "aten.pow.Scalar")(_binary_math(ew.pow))


def _prelu_slope(x: Value, w: Value) -> Value:
    # torch's weight has one slope per channel (axis 1) or a single one; convc's broadcasts numpy-style
    if len(w.shape) == 1 and len(x.shape) >= 2 and w.shape[0] == x.shape[1] and w.shape[0] != 1:
        return reshape(w, (w.shape[0],) + (1,) * (len(x.shape) - 2))
    return w


@converts("aten.prelu.default")
def _prelu(cv, node, a):
    x, w = _tensor(a["self"], "input"), _tensor(a["weight"], "weight")
    return ew.prelu(x, _prelu_slope(x, w), name=cv.name(node))


@converts("aten._prelu_kernel.default")
def _prelu_kernel(cv, node, a):
    # (prelu's decomposition has shaped the weight to broadcast already)
    return ew.prelu(_tensor(a["self"], "input"), _tensor(a["weight"], "weight"), name=cv.name(node))


@converts("aten._prelu_kernel_backward.default")
def _prelu_backward(cv, node, a):
    """(dL/dx, the weight's contributions at the broadcast shape: torch's
    kernel leaves their sum over the broadcast axes to the decomposition)."""
    from .ops.tensor import sum_to
    gy, x, w = (_tensor(a[k], k) for k in ("grad_output", "self", "weight"))
    gx, gw = (gy.graph.add("binary_grad", [x, w, gy], {"kind": "prelu", "wrt": i}) for i in (0, 1))
    return (gx if gx.shape == x.shape else sum_to(gx, x.shape)), gw


# reductions
def _reduce_axes(x: Value, dim) -> list[int]:
    return list(range(len(x.shape))) if dim is None or dim == [] else _axes(x, dim)


def _reduction(kind):
    def convert(cv, node, a):
        x = _tensor(a["self"], "input")
        if a.get("dtype") is not None:
            raise Unsupported(f"a reduction with dtype={a['dtype']}")
        return reduce(x, kind, tuple(_reduce_axes(x, a.get("dim"))), bool(a.get("keepdim", False)),
                      name=cv.name(node))
    return convert


converts("aten.mean.default")(_reduction("mean"))
converts("aten.amax.default")(_reduction("max"))
converts("aten.amin.default")(_reduction("min"))
converts("aten.prod.dim_int", "aten.prod.default")(_reduction("prod"))
converts("aten.logsumexp.default")(_reduction("log_sum_exp"))


@converts("aten.linalg_vector_norm.default")
def _vector_norm(cv, node, a):
    x = _tensor(a["self"], "input")
    if a["dtype"] is not None:
        raise Unsupported(f"linalg_vector_norm with dtype={a['dtype']}")
    ord_ = float(_scalar(a["ord"], "ord"))
    axes, keep, name = tuple(_reduce_axes(x, a["dim"])), bool(a["keepdim"]), cv.name(node)
    if ord_ == 1:
        return reduce(x, "l1", axes, keep, name=name)
    if ord_ == 2:
        return reduce(x, "l2", axes, keep, name=name)
    if ord_ in (math.inf, -math.inf):
        return reduce(ew.abs(x), "max" if ord_ > 0 else "min", axes, keep, name=name)
    raise Unsupported(f"ord={a['ord']} (convc reduces to the 1-, 2- and inf-norms)")


def _variance(x: Value, a, name=None) -> Value:
    axes = tuple(_reduce_axes(x, a["dim"]))
    n = math.prod(x.shape[d] for d in axes)
    corr = 1.0 if a["correction"] is None else float(_scalar(a["correction"], "correction"))
    if n - corr <= 0:
        raise Unsupported(f"variance over {n} entries with correction {corr:g} (torch gives inf or NaN)")
    m = reduce(x, "mean", axes, True)
    return div(reduce(sub(x, m), "sum_square", axes, bool(a["keepdim"])), float(n - corr), name=name)


@converts("aten.var.correction")
def _var(cv, node, a):
    return _variance(_tensor(a["self"], "input"), a, cv.name(node))


@converts("aten.std.correction")
def _std(cv, node, a):
    return ew.sqrt(_variance(_tensor(a["self"], "input"), a), name=cv.name(node))


@converts("aten.var_mean.correction")
def _var_mean(cv, node, a):
    x = _tensor(a["self"], "input")
    axes = tuple(_reduce_axes(x, a["dim"]))
    return _Outputs(lambda: _variance(x, a), lambda: reduce(x, "mean", axes, bool(a["keepdim"])))


class _Outputs(tuple):
    """A multi-output op's results, each built when first read (a norm's
    mean and rstd only when the program uses them)."""

    def __new__(cls, *makers):
        t = super().__new__(cls, makers)
        t._made = {}
        return t

    def __getitem__(self, i):
        if i not in self._made:
            make = tuple.__getitem__(self, i)
            self._made[i] = make() if callable(make) else make
        return self._made[i]


def _moments(x: Value, axes: tuple, eps: float, shape: tuple):
    """mean and 1/sqrt(biased var + eps) of x over axes, as torch's native norms return them."""
    def mean():
        return reshape(reduce(x, "mean", axes, True), shape)

    def rstd():
        m = reduce(x, "mean", axes, True)
        var = reduce(sub(x, m), "sum_square", axes, True)
        n = math.prod(x.shape[d] for d in axes)
        return reshape(ew.reciprocal(ew.sqrt(add(div(var, float(n)), eps))), shape)
    return mean, rstd


@converts("aten.native_layer_norm.default")
def _native_layer_norm(cv, node, a):
    x = _tensor(a["input"], "input")
    k = len(a["normalized_shape"])
    axis, eps = len(x.shape) - k, float(_scalar(a["eps"], "eps"))
    y = layer_norm(x, axis, a["weight"], a["bias"], eps, name=cv.name(node))
    axes = tuple(range(axis, len(x.shape)))
    return _Outputs(y, *_moments(x, axes, eps, x.shape[:axis] + (1,) * k))


@converts("aten.native_group_norm.default")
def _native_group_norm(cv, node, a):
    x = _tensor(a["input"], "input")
    groups, eps = int(a["group"]), float(_scalar(a["eps"], "eps"))
    y = group_norm(x, groups, a["weight"], a["bias"], eps, name=cv.name(node))
    xg = reshape(x, (x.shape[0], groups, -1))
    return _Outputs(y, *_moments(xg, (2,), eps, (x.shape[0], groups)))


# rearrangement and indexing
@converts("aten.pixel_shuffle.default")
def _pixel_shuffle(cv, node, a):
    return depth_to_space(_tensor(a["self"], "input"), a["upscale_factor"], mode="CRD", name=cv.name(node))


@converts("aten.pixel_unshuffle.default")
def _pixel_unshuffle(cv, node, a):
    return space_to_depth(_tensor(a["self"], "input"), a["downscale_factor"], mode="CRD", name=cv.name(node))


@converts("aten.repeat.default")
def _repeat(cv, node, a):
    x = _tensor(a["self"], "input")
    reps = [int(r) for r in a["repeats"]]
    if len(reps) > len(x.shape):            # torch prepends axes of size 1
        x = reshape(x, (1,) * (len(reps) - len(x.shape)) + tuple(x.shape))
    return tile(x, reps, name=cv.name(node))


def _indices(cv, v, n: int, what: str) -> np.ndarray:
    idx = _const_array(cv, v, what)
    if idx.dtype.kind not in "iu":
        raise Unsupported(f"{what} of dtype {idx.dtype} (integer indices)")
    if idx.size and (idx.min() < 0 or idx.max() >= n):       # (torch refuses negative ones too)
        raise Unsupported(f"{what} out of range 0 .. {n - 1} of the axis: {idx.min()} .. {idx.max()}")
    return idx


@converts("aten.index_select.default", consts=("index",))
def _index_select(cv, node, a):
    x = _tensor(a["self"], "input")
    axis = a["dim"] % max(len(x.shape), 1)
    idx = _indices(cv, a["index"], x.shape[axis], "index")
    return take(x, idx.reshape(-1), axis, name=cv.name(node))


@converts("aten.gather.default", consts=("index",))
def _gather(cv, node, a):
    """gather with constant indices: the flat position of every output entry
    in x is known now, so it is one take from x seen flat."""
    x = _tensor(a["self"], "input")
    axis = a["dim"] % len(x.shape)
    idx = _indices(cv, a["index"], x.shape[axis], "index").astype(np.int64)
    if len(idx.shape) != len(x.shape) or any(i > n for d, (i, n) in enumerate(zip(idx.shape, x.shape))
                                             if d != axis):
        raise Unsupported(f"index of shape {idx.shape} for an input of shape {x.shape} (torch.gather's rule)")
    pos = list(np.indices(idx.shape, sparse=True))
    pos[axis] = idx
    flat = np.ravel_multi_index(tuple(pos), x.shape)
    return take(reshape(x, (math.prod(x.shape),)), flat, 0, name=cv.name(node))


@converts("aten.where.self", consts=("condition",))
def _where(cv, node, a):
    mask = _const_array(cv, a["condition"], "condition").astype(bool)
    x, y = a["self"], a["other"]
    like = x if isinstance(x, Value) else _tensor(y, "other")
    x = x if isinstance(x, Value) else cv.g.const(np.asarray(float(_scalar(x, "self"))), like.dtype)
    y = y if isinstance(y, Value) else cv.g.const(np.asarray(float(_scalar(y, "other"))), like.dtype)
    return where_op(mask, x, y, name=cv.name(node))


@converts("aten.scalar_tensor.default")
def _scalar_tensor(cv, node, a):
    dtype = FLOAT_DTYPES.get(str(a["dtype"]), "float32") if a["dtype"] is not None else "float32"
    if a["dtype"] is not None and str(a["dtype"]) not in FLOAT_DTYPES:
        raise Unsupported(f"a scalar tensor of dtype {a['dtype']}")
    return cv.g.const(np.asarray(float(_scalar(a["s"], "s"))), dtype)


@converts("aten._assert_tensor_metadata.default")
def _assert_metadata(cv, node, a):
    """torch.export's check of a tensor's size, stride and dtype: true for
    the static shapes convc compiles (and produces nothing)."""
    return None


@converts("aten._to_copy.default")
def _to_copy(cv, node, a):
    x = _tensor(a["self"], "input")
    if a["dtype"] is None or FLOAT_DTYPES.get(str(a["dtype"])) == x.dtype:
        return x
    if str(a["dtype"]) not in FLOAT_DTYPES:
        raise Unsupported(f"a cast to {a['dtype']} (convc's torch import computes in float32 and float64)")
    return cast(x, FLOAT_DTYPES[str(a["dtype"])], name=cv.name(node))


# -- the walk ------------------------------------------------------------------------
class _Poisoned:
    """The value of a node that could not be converted (or of its consumers)."""


_POISON = _Poisoned()


class FxConverter:
    """Converts the call_function nodes of an ATen FX graph into ``g``; the
    caller declares the placeholders in ``env`` first."""

    def __init__(self, g: Graph):
        self.g = g
        self.env: dict = {}
        self.problems: list[tuple[object, str]] = []        # (node, reason)
        self.consts_read: set[str] = set()                  # params converters took as compile-time arrays

    def drop_consts_read(self) -> None:
        """Remove the params converters read as arrays (indices, masks) that no node uses."""
        for n in sorted(self.consts_read):
            if n in self.g.nx and not self.g.users_of(n):
                self.g.nx.remove_node(n)

    def name(self, node) -> str | None:
        """The node's FX name as a convc name when it is free, else None (a fresh one)."""
        n = node.name
        return n if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", n) and n not in self.g.nx else None

    def convert(self, node) -> None:
        try:
            self.env[node] = self._convert(node)
        except Unsupported as e:
            self.env[node] = _POISON
            self.problems.append((node, str(e)))

    def _convert(self, node):
        torch = _torch()
        if node.target is operator.getitem:
            src, i = self.env[node.args[0]], node.args[1]
            if src is _POISON:
                return _POISON
            got = src[i] if isinstance(src, (tuple, list)) else None
            if got is None:
                raise Unsupported(f"output {i} of {_op_name(node.args[0])} (convc does not compute it)")
            return got
        key = _op_name(node)
        fn, ignores = _CONVERTERS.get(key, (None, ()))
        if fn is None or not isinstance(node.target, torch._ops.OpOverload):
            raise Unsupported("not mapped to a convc op")
        a = _bind(node, self.env, ignores)
        if any(v is _POISON for v in _flat(a.values())):
            return _POISON                  # reported at the node that caused it
        consts = _CONST_ARGS.get(key, ())
        for v in _flat(v for k, v in a.items() if k not in consts):
            if isinstance(v, Value) and v.dtype not in FLOAT_DTYPES.values():
                raise Unsupported(f"an operand of dtype {v.dtype} (convc maps float32 and float64 tensors)")
        try:
            return fn(self, node, a)
        except ConvcError as e:             # a convc rule the arguments break
            raise Unsupported(str(e)) from None


def _flat(vs):
    for v in vs:
        if isinstance(v, (list, tuple)):
            yield from _flat(v)
        else:
            yield v


def where(node) -> str:
    """The user's source line of an FX node (the last frame of its stack
    trace outside torch itself), or ''."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', trace)
    if not frames:
        return ""
    torch_dir = os.path.dirname(_torch().__file__)
    mine = [fr for fr in frames if not fr[0].startswith(torch_dir)]       # the user's code, not nn.Module's
    f, line, fn, code = (mine or frames)[-1]
    return f"{f}:{line} in {fn}: {code.strip()}"


def problems_table(problems) -> list[tuple[str, int, str, str]]:
    """(op, count, first reason, first source line) per distinct op, in order of first appearance."""
    counts = Counter(_op_name(n) for n, _ in problems)
    seen, table = set(), []
    for n, why in problems:
        op = _op_name(n)
        if op not in seen:
            seen.add(op)
            table.append((op, counts[op], why, where(n)))
    return table


def _meta_type(node) -> tuple[tuple, str] | None:
    """(shape, convc dtype) of a tensor-valued FX node from its fake value, or None."""
    val = node.meta.get("val", node.meta.get("example_value"))
    torch = _torch()
    if not isinstance(val, torch.Tensor):
        return None
    try:
        shape = tuple(int(d) for d in val.shape)
    except (TypeError, ValueError):         # a symbolic size
        return None
    return shape, str(val.dtype)


def node_support(node) -> str | None:
    """Why convc cannot take this ATen FX node (None: it can). Runs the
    node's converter on a scratch graph whose inputs have the shapes torch
    recorded, so the answer is the importer's own."""
    if node.op != "call_function":
        return "not a call"
    g = Graph("probe")
    cv = FxConverter(g)
    for i, arg in enumerate(node.all_input_nodes):
        if arg.op == "call_function" and arg.target is not operator.getitem and node.target is operator.getitem:
            # getitem of a multi-output op: convert the op first
            inner = "kept in PyTorch" if arg.meta.get("convc_eager") else node_support(arg)
            if inner is not None:
                return inner
            for j, src in enumerate(arg.all_input_nodes):
                _declare_probe(cv, src, f"p{i}_{j}")
            cv.convert(arg)
            continue
        _declare_probe(cv, arg, f"p{i}")
    if any(v is _POISON for v in cv.env.values()):
        return "an input convc cannot take"
    cv.convert(node)
    if cv.problems:
        return cv.problems[0][1]
    out = cv.env[node]
    if not isinstance(out, (Value, tuple)):
        return "no tensor result"
    return None


def _declare_probe(cv, arg, name):
    t = _meta_type(arg)
    if t is None or t[1] not in INPUT_DTYPES:
        cv.env[arg] = _POISON
    else:
        cv.env[arg] = cv.g.input(name, t[0], INPUT_DTYPES[t[1]])


def fx_to_graph(graph_module, placeholders: dict, name: str = "torch") -> tuple[Graph, list]:
    """Convert an ATen-level FX graph: ``placeholders`` maps each placeholder
    node to ``("input", shape, dtype)`` or ``("param", array)`` under its
    convc name (``{node: (kind, convc name, ...)}``). Returns the graph and
    the FX output list, each entry a convc output name, or ``("input", name)``
    for an output that is a graph input unchanged. Raises
    :class:`TorchImportError` listing every unsupported op."""
    g = Graph(name)
    cv = FxConverter(g)
    outs = None
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            spec = placeholders.get(node)
            if spec is None:
                cv.env[node] = None          # unused (or not a tensor)
            elif spec[0] == "input":
                cv.env[node] = g.input(spec[1], spec[2], spec[3])
            else:
                cv.env[node] = g.param(spec[1], spec[2])
        elif node.op == "call_function":
            cv.convert(node)
        elif node.op == "output":
            outs = node.args[0]
        else:
            cv.problems.append((node, f"FX {node.op} nodes are not supported"))
            cv.env[node] = _POISON
    if cv.problems:
        raise TorchImportError(f"graph {name!r}", problems_table(cv.problems))
    flat = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    names, seen = [], {}
    for i, o in enumerate(flat):
        v = cv.env.get(o) if o is not None else None
        if not isinstance(v, Value):
            raise TorchImportError(f"graph {name!r}", [("output", 1, f"output {i} is not a tensor convc computes",
                                                          "")])
        if v.op == "input":
            names.append(("input", v.name))
        elif v.name in seen:
            names.append(seen[v.name])
        else:
            oname = "y" if len(flat) == 1 else f"y{i}"
            if v.op == "param":             # a weight returned as it is: a copy the module computes
                v = mul(v, 1.0)
            g.output(v, oname)
            seen[v.name] = oname
            names.append(oname)
    cv.drop_consts_read()
    return g, names


def from_torch(module, example_inputs, dynamic: bool = False, name: str | None = None) -> Graph:
    """Import a PyTorch ``nn.Module`` as a convc Graph through ``torch.export``.

    ``example_inputs``: a tuple of tensors (or one tensor); they fix the
    graph's input shapes and dtypes (float32 or float64). Export runs the
    module as it is: call ``module.eval()`` first for inference (batch norm
    on running statistics, dropout off). Params and buffers become
    ``g.param``s named after the module's state_dict keys
    (``"layer1.0.conv1.weight"``; see :func:`param_name`); inputs keep the names of ``forward``'s
    arguments; outputs are ``y`` (one) or ``y0, y1, ...``. ``dynamic=True``
    is refused: convc compiles static shapes (import once per shape).

    Raises :class:`TorchImportError` listing every unsupported op at once,
    with its count and the source line of its first use.

    >>> g = cc.from_torch(net.eval(), (torch.randn(1, 3, 32, 32),))   # doctest: +SKIP
    """
    torch = _torch()
    if dynamic:
        raise ConvcError("from_torch(dynamic=True): convc compiles static shapes; import once per input shape "
                         "(or use torch.compile(model, backend='convc'), which recompiles per shape)")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    for i, t in enumerate(example_inputs):
        if not isinstance(t, torch.Tensor) or str(t.dtype) not in FLOAT_DTYPES:
            raise ConvcError(f"from_torch: example input {i} must be a float32 or float64 tensor, "
                             f"got {getattr(t, 'dtype', type(t).__name__)}")
    try:
        ep = torch.export.export(module, example_inputs)
    except Exception as e:  # noqa: BLE001 -- torch.export's own errors, reworded with where it failed
        raise ConvcError(f"from_torch: torch.export could not trace {type(module).__name__}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    ep = ep.run_decompositions(decompositions())
    return _exported_graph(ep, name or _graph_name(module))


def param_name(key: str) -> str:
    """The convc param name of a state_dict key: the key itself, with ``_``
    for characters convc names do not take and before a leading digit
    (``nn.Sequential``'s ``0.weight`` -> ``_0.weight``)."""
    n = re.sub(r"[^A-Za-z0-9_.\-]", "_", key)
    return n if re.match(r"[A-Za-z_]", n) else "_" + n


def _graph_name(module) -> str:
    n = re.sub(r"[^A-Za-z0-9_]", "_", type(module).__name__)
    return n if re.match(r"[A-Za-z_]", n) else "_" + n


def _exported_graph(ep, name: str) -> Graph:
    from torch.export.graph_signature import InputKind
    state = dict(ep.state_dict)
    state.update(getattr(ep, "constants", {}) or {})
    by_name = {n.name: n for n in ep.graph_module.graph.nodes if n.op == "placeholder"}
    placeholders = {}
    for spec in ep.graph_signature.input_specs:
        node = by_name[spec.arg.name]
        if not node.users:
            continue
        if spec.kind == InputKind.USER_INPUT:
            shape, dtype = _meta_type(node) or ((), "?")
            if dtype not in FLOAT_DTYPES:
                raise ConvcError(f"from_torch: input {node.name!r} is {dtype}; convc takes float32 or float64")
            placeholders[node] = ("input", node.name, shape, FLOAT_DTYPES[dtype])
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            t = state[spec.target]
            placeholders[node] = ("param", param_name(spec.target), t.detach().cpu().numpy())
        else:
            raise ConvcError(f"from_torch: input {node.name!r} is a {spec.kind.name}, which convc does not take")
    g, outs = fx_to_graph(ep.graph_module, placeholders, name)
    if any(isinstance(o, tuple) for o in outs):
        raise GraphError(f"from_torch: an output of {name!r} is an input returned unchanged")
    return g

"""``cc.grad``: every op's gradient rule against central finite differences
(float64), conv / conv_transpose / pools / whole networks against torch
autograd, the IR contract of the emitted gradient ops, and the semantics of
``cc.grad`` itself (fan-out, unrelated wrt, foreign values, errors).

Compile time: every case of a family is one input/output group of ONE big
graph, compiled once per target; each case is still its own test item.

Finite differences are taken on the numpy reference interpreter
(``convc.reference.evaluate``) of a forward-only graph per case, so the
analytic gradients (built by ``cc.grad`` and compiled for "numpy" and "c")
are checked against the forward semantics, not against themselves.
"""
from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convc as cc
from convc.reference import evaluate
from helpers import assert_close

from helpers import TARGETS
F64 = "float64"


# =============================================================================
# 1. Every gradient rule against central finite differences
# =============================================================================

@dataclass
class Case:
    name: str
    arrays: dict                       # array name -> ndarray (float64, or int64 = not differentiable)
    build: object                      # (dict name -> Value) -> Value
    params: tuple = ()                 # names declared with g.param in the gradient graph (else g.input)
    seed: str = "loss"                 # "loss": grad(reduce_sum(mul(y, G)))  |  "grad_output": grad(y, G)
    wrt: tuple = field(default=None)   # default: every float array
    xfail: str = ""                    # a known bug: the reason

    def wrt_names(self):
        if self.wrt is not None:
            return self.wrt
        return tuple(k for k, a in self.arrays.items() if a.dtype == np.float64)


_rng = np.random.default_rng(20240611)


def rn(*shape, scale=1.0):
    return np.array(_rng.standard_normal(shape) * scale, dtype=np.float64)


def away_from_zero(*shape, gap=1e-2):
    """Random values with |x| >= gap (no kinks of relu / leaky_relu nearby)."""
    v = _rng.standard_normal(shape)
    return np.sign(v) * (np.abs(v) + gap)


def distinct(*shape):
    """Random values at least 0.01 apart (no ties in max_pool, even perturbed)."""
    n = math.prod(shape)
    return (_rng.permutation(n) * 0.01 - n * 0.005 + _rng.uniform(-1e-3, 1e-3, n)).reshape(shape)


def positive(*shape):
    return _rng.uniform(0.5, 2.0, shape) * np.where(_rng.random(shape) < 0.5, -1, 1)



def _cases():
    C = []

    def add(name, arrays, build, params=(), **kw):
        C.append(Case(name, arrays, build, params, **kw))

    # -- conv: stride, padding forms, dilation, groups, flip, tied/untied bias, 1D/2D/3D
    add("conv2d_s2_same_tied", dict(x=rn(2, 3, 6, 5), w=rn(4, 3, 3, 2), b=rn(4)),
        lambda v: cc.conv(v["x"], v["w"], v["b"], stride=2, padding="same"), params=("w", "b"))
    add("conv2d_pairs_dil_stride", dict(x=rn(1, 2, 7, 6), w=rn(3, 2, 2, 3)),
        lambda v: cc.conv(v["x"], v["w"], stride=(1, 2), padding=((1, 2), (0, 1)), dilation=(2, 1)),
        params=("w",))
    add("conv2d_groups2_untied", dict(x=rn(2, 4, 5, 5), w=rn(6, 2, 3, 3), b=rn(6, 5, 5)),
        lambda v: cc.conv(v["x"], v["w"], v["b"], padding=1, groups=2))
    add("conv2d_flip_s21", dict(x=rn(1, 2, 5, 6), w=rn(2, 2, 3, 2), b=rn(2)),
        lambda v: cc.conv(v["x"], v["w"], v["b"], stride=(2, 1), padding=(1, 0), flip=True), params=("w",))
    add("conv2d_same_s3_dil2", dict(x=rn(1, 2, 8, 7), w=rn(2, 2, 2, 3)),
        lambda v: cc.conv(v["x"], v["w"], stride=3, dilation=2, padding="same"))
    add("conv2d_full_flip_groups", dict(x=rn(1, 4, 4, 3), w=rn(4, 2, 2, 2), b=rn(4, 5, 4)),
        lambda v: cc.conv(v["x"], v["w"], v["b"], padding="full", groups=2, flip=True), params=("b",))
    add("conv1d_s2_d2_full_tied", dict(x=rn(2, 3, 9), w=rn(2, 3, 3), b=rn(2)),
        lambda v: cc.conv(v["x"], v["w"], v["b"], stride=2, dilation=2, padding="full"), params=("w", "b"))
    add("conv1d_depthwise_same_flip_untied", dict(x=rn(1, 4, 8), w=rn(4, 1, 3), b=rn(4, 8)),
        lambda v: cc.conv(v["x"], v["w"], v["b"], groups=4, padding="same", flip=True))
    add("conv3d_pairs_tied", dict(x=rn(1, 2, 4, 5, 4), w=rn(2, 2, 2, 2, 2), b=rn(2)),
        lambda v: cc.conv(v["x"], v["w"], v["b"], stride=(1, 2, 1), padding=((0, 1), (1, 0), 1)),
        params=("w",))
    add("conv3d_groups_dil_flip", dict(x=rn(1, 4, 5, 3, 4), w=rn(2, 2, 2, 1, 2)),
        lambda v: cc.conv(v["x"], v["w"], groups=2, dilation=(2, 1, 1), flip=True, padding=(0, 1, 0)))

    # -- conv_transpose: input, kernel, bias; output_padding < stride
    add("conv_transpose2d_s2_op1_tied", dict(x=rn(2, 3, 3, 4), w=rn(3, 2, 3, 3), b=rn(2)),
        lambda v: cc.conv_transpose(v["x"], v["w"], v["b"], stride=2, padding=1, output_padding=1),
        params=("w", "b"))
    add("conv_transpose1d_groups_s3_d2_untied", dict(x=rn(1, 4, 4), w=rn(4, 1, 3), b=rn(2, 13)),
        lambda v: cc.conv_transpose(v["x"], v["w"], v["b"], stride=3, padding=((2, 1),), output_padding=2,
                                    dilation=2, groups=2))
    add("conv_transpose3d", dict(x=rn(1, 2, 2, 3, 2), w=rn(2, 2, 2, 2, 2)),
        lambda v: cc.conv_transpose(v["x"], v["w"], stride=(2, 1, 2), output_padding=(1, 0, 0)),
        params=("w",))

    # -- the gradient ops themselves (second-order rules): h = conv_grad_input, g = conv_grad_kernel
    add("conv_grad_input2d_s2_pairs", dict(k=rn(3, 2, 3, 2), E=rn(2, 3, 3, 4)),
        lambda v: cc.conv_grad_input(v["k"], v["E"], (6, 7), stride=2, padding=((1, 0), (0, 1))), params=("k",))
    add("conv_grad_input1d_groups_flip_dil", dict(k=rn(4, 1, 3), E=rn(1, 4, 5)),
        lambda v: cc.conv_grad_input(v["k"], v["E"], (9,), dilation=2, groups=2, flip=True))
    add("conv_grad_input3d", dict(k=rn(2, 1, 2, 2, 2), E=rn(1, 2, 2, 3, 3)),
        lambda v: cc.conv_grad_input(v["k"], v["E"], (3, 5, 4), stride=(1, 2, 2), padding=(0, 1, 1)))
    add("conv_grad_kernel2d_s2_same", dict(E=rn(2, 3, 3, 3), V=rn(2, 2, 6, 5)),
        lambda v: cc.conv_grad_kernel(v["E"], v["V"], (3, 2), stride=2, padding="same"), params=("V",))
    add("conv_grad_kernel1d_groups_flip", dict(E=rn(2, 4, 8), V=rn(2, 2, 8)),
        lambda v: cc.conv_grad_kernel(v["E"], v["V"], 3, groups=2, flip=True, padding=(1,)))
    add("conv_grad_kernel3d_dil", dict(E=rn(1, 2, 2, 2, 4), V=rn(1, 1, 4, 3, 4)),
        lambda v: cc.conv_grad_kernel(v["E"], v["V"], 2, dilation=(2, 1, 1), padding=(0, 0, (0, 1))))

    def double_backward(v):        # d/dw of 0.5*|conv(x, w)|^2 is itself differentiated
        y = cc.conv(v["x"], v["w"], stride=2, padding=1, flip=True)
        return cc.grad(cc.reduce_sum(cc.mul(cc.mul(y, y), 0.5)), v["w"])
    add("double_backward_conv", dict(x=rn(1, 2, 5, 5), w=rn(3, 2, 3, 3)), double_backward)

    # -- unshared convolutions
    add("local_conv2d_s2_tied", dict(x=rn(1, 2, 4, 4), w=rn(2, 2, 2, 2, 2, 2), b=rn(2)),
        lambda v: cc.local_conv(v["x"], v["w"], v["b"], stride=2), params=("w",))
    add("local_conv1d_pad_untied", dict(x=rn(2, 3, 7), w=rn(2, 4, 3, 3), b=rn(2, 4)),
        lambda v: cc.local_conv(v["x"], v["w"], v["b"], stride=2, padding=1))
    add("local_conv3d_dil", dict(x=rn(1, 1, 3, 4, 3), w=rn(1, 2, 2, 2, 1, 2, 2, 2)),
        lambda v: cc.local_conv(v["x"], v["w"], dilation=(1, 2, 1)))
    add("tiled_conv2d_t23", dict(x=rn(1, 2, 5, 5), w=rn(2, 2, 2, 2, 2, 3), b=rn(2)),
        lambda v: cc.tiled_conv(v["x"], v["w"], v["b"]), params=("w",))
    add("tiled_conv1d_s2_d2_pad", dict(x=rn(2, 2, 9), w=rn(3, 2, 3, 2), b=rn(3, 4)),
        lambda v: cc.tiled_conv(v["x"], v["w"], v["b"], stride=2, dilation=2, padding=1))

    # -- pools
    add("max_pool2d_pad_ceil", dict(x=distinct(2, 2, 6, 7)),
        lambda v: cc.max_pool(v["x"], 3, stride=2, padding=1, ceil_mode=True))
    add("max_pool1d_dil", dict(x=distinct(1, 3, 10)),
        lambda v: cc.max_pool(v["x"], 3, stride=2, dilation=2))
    add("max_pool3d", dict(x=distinct(1, 2, 4, 5, 4)),
        lambda v: cc.max_pool(v["x"], 2, stride=(2, 1, 2), padding=(0, 1, 0)))
    add("avg_pool2d_ceil_incl_pad", dict(x=rn(2, 2, 6, 7)),
        lambda v: cc.avg_pool(v["x"], 3, stride=2, padding=1, ceil_mode=True, count_include_pad=True))
    add("avg_pool2d_ceil_excl_pad", dict(x=rn(1, 2, 5, 5)),
        lambda v: cc.avg_pool(v["x"], (2, 3), stride=2, padding=1, ceil_mode=True, count_include_pad=False))
    add("avg_pool1d_excl_pad", dict(x=rn(2, 2, 9)),
        lambda v: cc.avg_pool(v["x"], 4, stride=3, padding=2, count_include_pad=False))
    add("avg_pool3d", dict(x=rn(1, 1, 4, 4, 5)),
        lambda v: cc.avg_pool(v["x"], 2, stride=2))
    add("global_avg_pool2d", dict(x=rn(2, 3, 4, 5)), lambda v: cc.global_avg_pool(v["x"]))
    add("global_avg_pool1d", dict(x=rn(2, 3, 6)), lambda v: cc.global_avg_pool(v["x"]))

    # -- activations
    add("relu", dict(x=away_from_zero(2, 3, 4, 5)), lambda v: cc.relu(v["x"]))
    add("leaky_relu", dict(x=away_from_zero(2, 3, 4)), lambda v: cc.leaky_relu(v["x"], 0.2))
    add("sigmoid", dict(x=rn(2, 3, 4)), lambda v: cc.sigmoid(v["x"]))
    add("tanh", dict(x=rn(2, 3, 4)), lambda v: cc.tanh(v["x"]))

    # -- broadcasting arithmetic: gradients reduced back to each operand's shape
    add("add_bcast", dict(a=rn(2, 3, 4, 5), b=rn(3, 1, 1)), lambda v: cc.add(v["a"], v["b"]), params=("b",))
    add("sub_bcast_both", dict(a=rn(4, 1), b=rn(2, 1, 5)), lambda v: cc.sub(v["a"], v["b"]))
    add("mul_bcast_both", dict(a=rn(2, 3, 1, 5), b=rn(4, 1)), lambda v: cc.mul(v["a"], v["b"]))
    div_a, div_b = rn(3, 4), positive(1, 4)
    add("div_bcast_dividend", dict(a=div_a, b=div_b), lambda v: cc.div(v["a"], v["b"]), wrt=("a",))
    add("div_bcast", dict(a=div_a, b=div_b), lambda v: cc.div(v["a"], v["b"]))
    div_a, div_b = rn(4), positive(2, 3, 4)
    add("div_bcast_numerator_dividend", dict(a=div_a, b=div_b), lambda v: cc.div(v["a"], v["b"]), wrt=("a",))
    add("div_bcast_numerator", dict(a=div_a, b=div_b), lambda v: cc.div(v["a"], v["b"]))
    add("mul_same_shape", dict(a=rn(2, 3), b=rn(2, 3)), lambda v: cc.mul(v["a"], v["b"]))

    # -- shape ops
    add("concat_axis1", dict(a=rn(2, 1, 3), b=rn(2, 3, 3), c=rn(2, 2, 3)),
        lambda v: cc.concat([v["a"], v["b"], v["c"]], axis=1))
    add("concat_last_axis", dict(a=rn(2, 3, 2), b=rn(2, 3, 4)),
        lambda v: cc.concat([v["a"], v["b"]], axis=-1))
    add("reshape", dict(x=rn(2, 3, 4)), lambda v: cc.reshape(v["x"], (4, -1)))
    add("flatten", dict(x=rn(2, 3, 2, 2)), lambda v: cc.flatten(v["x"]))
    add("flatten_0_1", dict(x=rn(2, 3, 2, 2)), lambda v: cc.flatten(v["x"], 0, 1))
    add("expand", dict(x=rn(3, 1, 4)), lambda v: cc.expand(v["x"], (2, 3, 5, 4)))
    add("transpose", dict(x=rn(2, 3, 4)), lambda v: cc.transpose(v["x"], (2, 0, 1)))
    add("transpose_default", dict(x=rn(2, 3, 4)), lambda v: cc.transpose(v["x"]))
    add("slice_middle", dict(x=rn(2, 6, 3)), lambda v: cc.slice_axis(v["x"], 1, 2, 5))
    add("slice_head", dict(x=rn(2, 6, 3)), lambda v: cc.slice_axis(v["x"], 2, 0, 2))
    add("slice_tail", dict(x=rn(4, 3)), lambda v: cc.slice_axis(v["x"], 0, 1, 4))
    add("reduce_sum_axes", dict(x=rn(2, 3, 4)), lambda v: cc.reduce_sum(v["x"], (0, 2)))
    add("reduce_sum_keepdims", dict(x=rn(2, 3, 4)), lambda v: cc.reduce_sum(v["x"], 1, keepdims=True))
    add("reduce_sum_all", dict(x=rn(2, 3, 4)), lambda v: cc.reduce_sum(v["x"]))

    # -- linear algebra
    add("dense_bias", dict(x=rn(3, 5), w=rn(4, 5), b=rn(4)),
        lambda v: cc.dense(v["x"], v["w"], v["b"]), params=("w", "b"))
    add("dense_3d_input_bias", dict(x=rn(2, 3, 5), w=rn(4, 5), b=rn(4)),
        lambda v: cc.dense(v["x"], v["w"], v["b"]))
    add("matmul_batched_bcast_rank2_b", dict(a=rn(2, 3, 4, 5), b=rn(5, 2)),
        lambda v: cc.matmul(v["a"], v["b"]))
    add("matmul_batched_bcast_both", dict(a=rn(3, 1, 2, 4), b=rn(2, 4, 3)),
        lambda v: cc.matmul(v["a"], v["b"]))
    add("matmul_transpose_a_bcast", dict(a=rn(3, 1, 4, 2), b=rn(2, 4, 3)),
        lambda v: cc.matmul(v["a"], v["b"], transpose_a=True))
    add("softmax_last", dict(x=rn(3, 5)), lambda v: cc.softmax(v["x"]))
    add("softmax_axis1", dict(x=rn(2, 4, 3)), lambda v: cc.softmax(v["x"], axis=1))

    # -- losses (scalar y)
    add("mse_loss", dict(p=rn(2, 3, 4), t=rn(2, 3, 4)), lambda v: cc.mse_loss(v["p"], v["t"]))
    add("cross_entropy", dict(z=rn(5, 4), labels=np.array([0, 3, 1, 3, 2], np.int64)),
        lambda v: cc.cross_entropy(v["z"], v["labels"]))

    # -- resampling / layout
    add("downsample2d_tail", dict(x=rn(1, 2, 7, 8)), lambda v: cc.downsample(v["x"], (2, 3)))
    add("downsample1d", dict(x=rn(2, 1, 9)), lambda v: cc.downsample(v["x"], 4))
    add("downsample3d", dict(x=rn(1, 1, 3, 4, 5)), lambda v: cc.downsample(v["x"], (1, 2, 2)))
    add("dilate2d", dict(x=rn(1, 2, 3, 4)), lambda v: cc.dilate(v["x"], (2, 3)))
    add("pad_negative_value", dict(x=rn(1, 2, 5, 6)), lambda v: cc.pad(v["x"], ((1, -2), (-1, 2)), 0.5))
    add("pad1d", dict(x=rn(2, 2, 7)), lambda v: cc.pad(v["x"], 2))
    add("pad3d_crop", dict(x=rn(1, 1, 4, 3, 5)), lambda v: cc.pad(v["x"], (-1, 1, (0, -2))))
    add("channel_shuffle_g2", dict(x=rn(2, 6, 3, 2)), lambda v: cc.channel_shuffle(v["x"], 2))
    add("channel_shuffle_g3_1d", dict(x=rn(1, 6, 4)), lambda v: cc.channel_shuffle(v["x"], 3))

    # -- corner cases of the broadcasting / reduction helpers and small inputs
    add("mul_scalar_operand", dict(a=rn(2, 3), s=rn()), lambda v: cc.mul(v["a"], v["s"]))
    add("add_bcast_size1", dict(a=rn(3, 4), b=rn(1)), lambda v: cc.add(v["a"], v["b"]))
    add("expand_lead_dims", dict(x=rn(4)), lambda v: cc.expand(v["x"], (2, 3, 4)))
    add("dense_1d_input", dict(x=rn(5), w=rn(3, 5), b=rn(3)), lambda v: cc.dense(v["x"], v["w"], v["b"]))
    add("downsample_stride_beyond_size", dict(x=rn(1, 2, 2, 5)), lambda v: cc.downsample(v["x"], (3, 2)))
    add("global_avg_pool3d", dict(x=rn(1, 2, 2, 3, 2)), lambda v: cc.global_avg_pool(v["x"]))
    add("tiled_conv3d", dict(x=rn(1, 1, 3, 4, 3), w=rn(2, 1, 2, 1, 2, 1, 2, 2)),
        lambda v: cc.tiled_conv(v["x"], v["w"]))
    add("conv_transpose2d_output_size", dict(x=rn(1, 2, 3, 3), w=rn(2, 1, 3, 3)),
        lambda v: cc.conv_transpose(v["x"], v["w"], stride=2, padding=1, output_size=(6, 5)))
    add("softmax_axis0", dict(x=rn(3, 2, 2)), lambda v: cc.softmax(v["x"], axis=0))
    add("reduce_sum_negative_axis", dict(x=rn(2, 3, 4)), lambda v: cc.reduce_sum(v["x"], -1))

    for i, c in enumerate(C):          # half the cases seed the backward pass with grad_output=G
        if i % 2:
            c.seed = "grad_output"
    return C


CASES = _cases()
CASE_BY_NAME = {c.name: c for c in CASES}
assert len(CASE_BY_NAME) == len(CASES)


def _g_of(case: Case, shape):
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    return rng.standard_normal(shape)


def add_case(g: cc.Graph, case: Case, feeds: dict):
    """Add one case (forward op, random G, cc.grad) to ``g``; outputs
    ``<case>__d<name>`` for each wrt array; inputs go into ``feeds``."""
    vals = {}
    for k, a in case.arrays.items():
        node = f"{case.name}__{k}"
        if k in case.params:
            vals[k] = g.param(node, a)
        else:
            vals[k] = g.input(node, a.shape, str(a.dtype))
            feeds[node] = a
    y = case.build(vals)
    G = _g_of(case, y.shape)
    if case.seed == "loss":
        Gv = g.param(f"{case.name}__G", G)
        grads = cc.grad(cc.reduce_sum(cc.mul(y, Gv)), [vals[k] for k in case.wrt_names()])
    else:
        Gv = g.input(f"{case.name}__G", G.shape, F64)
        feeds[Gv.name] = G
        grads = cc.grad(y, [vals[k] for k in case.wrt_names()], grad_output=Gv)
    for k, d in zip(case.wrt_names(), grads):
        g.output(d, f"{case.name}__d{k}")


def finite_differences(case: Case, eps: float = 1e-6) -> dict:
    """Per-element central differences of L = sum(y * G), y from the numpy
    reference interpreter on a forward-only graph of the case."""
    fg = cc.Graph("fd")
    vals = {k: fg.input(k, a.shape, str(a.dtype)) for k, a in case.arrays.items()}
    y = case.build(vals)
    fg.output(y, "y")
    G = _g_of(case, y.shape)
    base = {k: a.copy() for k, a in case.arrays.items()}

    def loss(feeds):
        return float(np.sum(evaluate(fg, feeds)["y"] * G))

    out = {}
    for k in case.wrt_names():
        a = base[k]
        d = np.zeros_like(a)
        for idx in np.ndindex(*a.shape):
            old = a[idx]
            a[idx] = old + eps
            lp = loss(base)
            a[idx] = old - eps
            lm = loss(base)
            a[idx] = old
            d[idx] = (lp - lm) / (2 * eps)
        out[k] = d
    return out


def _compile_cases(cases, target, gname):
    """{case name: {output: array}} and {case name: error} for ``cases``: one graph
    for all, falling back to a graph per case if the big one fails to build,
    compile or run (so a failure is pinned on the case that causes it)."""
    def build(cs, name):
        g, feeds, errors, built = cc.Graph(name), {}, {}, []
        for c in cs:
            try:
                add_case(g, c, feeds)
                built.append(c)
            except Exception as e:          # noqa: BLE001 -- reported by that case's test
                errors[c.name] = e
        return g, feeds, errors, built

    g, feeds, errors, built = build(cases, gname)
    results = {}
    try:
        res = cc.compile(g, target=target).run(feeds)
    except Exception:                       # noqa: BLE001
        res = None
    if res is not None:
        for c in built:
            results[c.name] = {o: res[o] for o in res if o.startswith(c.name + "__")}
        return results, errors
    for c in built:
        g1, feeds1, err1, _ = build([c], "one_case")
        if err1:
            errors.update(err1)
            continue
        try:
            results[c.name] = cc.compile(g1, target=target).run(feeds1)
        except Exception as e:              # noqa: BLE001
            errors[c.name] = e
    return results, errors


@pytest.fixture(scope="module")
def fd_grads():
    return {t: _compile_cases(CASES, t, f"fd_{t}") for t in TARGETS}


_FD_CACHE: dict = {}


def _fd(case):
    if case.name not in _FD_CACHE:
        _FD_CACHE[case.name] = finite_differences(case)
    return _FD_CACHE[case.name]


def assert_rel_close(got, want, what, tol=1e-6):
    """max|got - want| / max|want| < tol (norm-relative: robust to zero entries)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: gradient shape {got.shape} != operand shape {want.shape}"
    scale = np.max(np.abs(want))
    assert scale > 0, f"{what}: finite differences are all zero (a useless case)"
    err = np.max(np.abs(got - want)) / scale
    if not err < tol:
        i = np.unravel_index(int(np.argmax(np.abs(got - want))), got.shape)
        raise AssertionError(f"{what}: relative error {err:.3g} >= {tol}; worst at {i}: "
                             f"got {got[i]!r}, finite differences {want[i]!r}")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", [pytest.param(c.name, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)]
                                               if c.xfail else []) for c in CASES])
def test_gradient_matches_finite_differences(fd_grads, name, target):
    case = CASE_BY_NAME[name]
    results, errors = fd_grads[target]
    if name in errors:
        raise AssertionError(f"{name} [{target}]: building/compiling/running the gradient failed: "
                             f"{type(errors[name]).__name__}: {errors[name]}")
    fd = _fd(case)
    for k in case.wrt_names():
        got = results[name][f"{name}__d{k}"]
        assert got.dtype == np.float64, f"{name} [{target}] d{k}: dtype {got.dtype}"
        assert_rel_close(got, fd[k], f"{name} [{target}] dL/d{k} (seed={case.seed})")


def test_finite_difference_cases_cover_every_rule():
    """Every differentiable op family the brief lists has at least one case."""
    g = cc.Graph("cover")
    ops = set()
    for c in CASES:
        vals = {k: g.input(f"{c.name}__{k}", a.shape, str(a.dtype)) for k, a in c.arrays.items()}
        ops.add(c.build(vals).op)
    want = {"conv", "conv_transpose", "local_conv", "tiled_conv", "max_pool", "avg_pool", "global_avg_pool",
            "relu", "leaky_relu", "sigmoid", "tanh", "add", "sub", "mul", "div", "concat", "reshape", "flatten",
            "dense", "matmul", "softmax", "mse_loss", "cross_entropy", "downsample", "dilate", "pad",
            "channel_shuffle", "expand", "transpose", "slice", "reduce_sum", "conv_grad_input", "conv_grad_kernel"}
    assert want <= ops, f"missing cases for {sorted(want - ops)}"
    ranks = {len(c.arrays["x"].shape) - 2 for c in CASES if c.name.startswith("conv") and "x" in c.arrays
             and not c.name.startswith("conv_transpose")}
    assert ranks == {1, 2, 3}
    assert {c.seed for c in CASES} == {"loss", "grad_output"}


# =============================================================================
# 2. Against torch autograd
# =============================================================================

TORCH_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
TORCH_CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
TORCH_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
TORCH_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
TORCH_SEED = 977


def _per_axis(v, rank):
    return tuple(v) if isinstance(v, tuple) else (v,) * rank


def explicit_pads(padding, sizes, kernel, stride, dilation):
    """((lo, hi), ...) from DESIGN.md's padding rules (written independently of convc)."""
    r = len(sizes)
    if padding == "valid":
        return ((0, 0),) * r
    if padding == "full":
        return tuple((d * (k - 1),) * 2 for k, d in zip(kernel, dilation))
    if padding == "same":
        out = []
        for n, k, s, d in zip(sizes, kernel, stride, dilation):
            total = max(0, (math.ceil(n / s) - 1) * s + d * (k - 1) + 1 - n)
            out.append((total // 2, total - total // 2))
        return tuple(out)
    if isinstance(padding, int):
        return ((padding, padding),) * r
    return tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)


def torch_pad_arg(pads):
    """F.pad's flat argument (last axis first) for ((lo, hi), ...) spatial pairs."""
    return [v for lo_hi in reversed(pads) for v in lo_hi]


@dataclass(frozen=True)
class ConvCfg:
    rank: int
    n: int
    c_in: int
    c_out: int
    groups: int
    sizes: tuple
    kernel: tuple
    stride: object
    dilation: object
    padding: object
    flip: bool
    bias: str                  # none | tied | untied
    grad_output_kind: str      # input | param: how G enters the graph

    @property
    def s(self):
        return _per_axis(self.stride, self.rank)

    @property
    def d(self):
        return _per_axis(self.dilation, self.rank)

    @property
    def pads(self):
        return explicit_pads(self.padding, self.sizes, self.kernel, self.s, self.d)

    @property
    def out(self):
        return tuple((n + lo + hi - d * (k - 1) - 1) // s + 1
                     for n, k, s, d, (lo, hi) in zip(self.sizes, self.kernel, self.s, self.d, self.pads))

    @property
    def id(self):
        p = self.padding if isinstance(self.padding, str) else str(self.padding).replace(" ", "")
        return "-".join([f"{self.rank}d", f"n{self.n}", f"ci{self.c_in}", f"co{self.c_out}", f"g{self.groups}",
                         "in" + "x".join(map(str, self.sizes)), "k" + "x".join(map(str, self.kernel)),
                         f"s{str(self.stride).replace(' ', '')}", f"d{str(self.dilation).replace(' ', '')}",
                         f"p{p}"] + (["flip"] if self.flip else []) + ([self.bias] if self.bias != "none" else []))


def _random_conv_cfg(rng: random.Random) -> ConvCfg:
    rank = rng.choice([1, 1, 2, 2, 2, 3])
    kind = rng.choice(["plain", "plain", "grouped", "depthwise"])
    if kind == "depthwise":
        c_in = rng.randint(1, 3)
        groups, c_out = c_in, c_in * rng.randint(1, 2)
    elif kind == "grouped":
        groups = rng.randint(2, 3)
        c_in, c_out = groups * rng.randint(1, 2), groups * rng.randint(1, 2)
    else:
        groups, c_in, c_out = 1, rng.randint(1, 3), rng.randint(1, 3)
    kmax, nmax, dils = {1: (4, 12, [1, 1, 2, 3]), 2: (3, 7, [1, 1, 2]), 3: (2, 5, [1, 1, 2])}[rank]
    kernel = tuple(rng.randint(1, kmax) for _ in range(rank))

    def pick(choices):
        vals = tuple(rng.choice(choices) for _ in range(rank))
        return vals[0] if len(set(vals)) == 1 and rng.random() < 0.5 else vals
    stride, dilation = pick([1, 1, 2, 3]), pick(dils)
    form = rng.choice(["int", "tuple", "pairs", "pairs", "valid", "same", "same", "full"])
    padding = {"int": lambda: rng.randint(0, 2),
               "tuple": lambda: tuple(rng.randint(0, 2) for _ in range(rank)),
               "pairs": lambda: tuple((rng.randint(0, 2), rng.randint(0, 2)) for _ in range(rank))}.get(
        form, lambda: form)()
    while True:
        sizes = tuple(rng.randint(1, nmax) for _ in range(rank))
        cfg = ConvCfg(rank, rng.choice([1, 2]), c_in, c_out, groups, sizes, kernel, stride, dilation, padding,
                      rng.random() < 0.3, rng.choice(["none", "tied", "untied"]), rng.choice(["input", "param"]))
        pads = cfg.pads
        if all(n + lo + hi >= d * (k - 1) + 1 for n, k, d, (lo, hi) in zip(sizes, kernel, cfg.d, pads)):
            return cfg


def _conv_cfgs():
    C = ConvCfg
    fixed = [
        C(2, 2, 3, 4, 1, (6, 5), (3, 3), 2, 1, "same", False, "tied", "input"),
        C(2, 1, 4, 4, 4, (7, 6), (3, 2), (2, 1), (1, 2), ((1, 2), (0, 1)), True, "untied", "param"),
        C(1, 2, 2, 3, 1, (11,), (3,), 3, 2, "full", False, "tied", "input"),
        C(3, 1, 2, 2, 2, (4, 5, 4), (2, 3, 2), (1, 2, 1), (2, 1, 1), ((0, 1), (1, 1), (1, 0)), True, "tied",
          "param"),
        C(2, 1, 2, 2, 1, (5, 5), (5, 5), 1, 1, 0, False, "untied", "input"),   # kernel as large as the input
        C(2, 1, 1, 2, 1, (3, 3), (2, 2), 1, 1, 3, False, "tied", "param"),      # padding wider than the kernel
    ]
    rng = random.Random(TORCH_SEED)
    cfgs = fixed + [_random_conv_cfg(rng) for _ in range(114)]
    seen, out = {}, []
    for c in cfgs:
        seen[c.id] = seen.get(c.id, 0) + 1
        out.append((c, c.id if seen[c.id] == 1 else f"{c.id}#{seen[c.id]}"))
    return out


CONV_CFGS = _conv_cfgs()


def _conv_arrays(cfg: ConvCfg, index: int):
    rng = np.random.default_rng([TORCH_SEED, index])
    x = rng.standard_normal((cfg.n, cfg.c_in) + cfg.sizes)
    w = rng.standard_normal((cfg.c_out, cfg.c_in // cfg.groups) + cfg.kernel)
    b = {"none": None, "tied": rng.standard_normal(cfg.c_out),
         "untied": rng.standard_normal((cfg.c_out,) + cfg.out)}[cfg.bias]
    G = rng.standard_normal((cfg.n, cfg.c_out) + cfg.out)
    return x, w, b, G


def torch_conv_grads(cfg: ConvCfg, x, w, b, G):
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(w, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True) if b is not None else None
    k = tw.flip(list(range(2, 2 + cfg.rank))) if cfg.flip else tw
    y = TORCH_CONV[cfg.rank](F.pad(tx, torch_pad_arg(cfg.pads)), k, tb if cfg.bias == "tied" else None,
                             stride=cfg.s, dilation=cfg.d, groups=cfg.groups)
    if cfg.bias == "untied":
        y = y + tb[None]
    y.backward(torch.tensor(G))
    return {"dx": tx.grad.numpy(), "dw": tw.grad.numpy(), **({"db": tb.grad.numpy()} if b is not None else {})}


@pytest.fixture(scope="module")
def conv_grid():
    """One graph: per configuration, x (input), w and b (params), G (input or
    param), cc.grad(y, [x, w, b], grad_output=G) as three outputs."""
    g, feeds, errors = cc.Graph("conv_grad_grid"), {}, {}
    for i, (cfg, cid) in enumerate(CONV_CFGS):
        x, w, b, G = _conv_arrays(cfg, i)
        try:
            xv = g.input(f"x{i}", x.shape, F64)
            feeds[xv.name] = x
            wv = g.param(f"w{i}", w)
            bv = g.param(f"b{i}", b) if b is not None else None
            y = cc.conv(xv, wv, bv, stride=cfg.stride, padding=cfg.padding, dilation=cfg.dilation,
                        groups=cfg.groups, flip=cfg.flip)
            if cfg.grad_output_kind == "param":
                Gv = g.param(f"G{i}", G)
            else:
                Gv = g.input(f"G{i}", G.shape, F64)
                feeds[Gv.name] = G
            grads = cc.grad(y, [xv, wv] + ([bv] if bv is not None else []), grad_output=Gv)
            for nm, d in zip(("dx", "dw", "db"), grads):
                g.output(d, f"{nm}{i}")
        except cc.ConvcError as e:
            errors[cid] = e
    res = {t: cc.compile(g, target=t).run(feeds) for t in TARGETS}
    return errors, res


def test_conv_grid_covers_the_parameter_space():
    cfgs = [c for c, _ in CONV_CFGS]
    assert len(cfgs) >= 100
    assert {c.rank for c in cfgs} == {1, 2, 3}
    assert any(c.n > 1 for c in cfgs)
    assert any(max(c.s) > 1 for c in cfgs) and any(max(c.d) > 1 for c in cfgs)
    assert any(1 < c.groups < c.c_in for c in cfgs) and any(c.groups == c.c_in > 1 for c in cfgs)
    for word in ("valid", "same", "full"):
        assert any(c.padding == word for c in cfgs), word
    assert any(isinstance(c.padding, tuple) and any(isinstance(p, tuple) and p[0] != p[1] for p in c.padding)
               for c in cfgs)
    assert any(c.flip for c in cfgs)
    assert {c.bias for c in cfgs} == {"none", "tied", "untied"}
    assert {c.grad_output_kind for c in cfgs} == {"input", "param"}
    for r in (1, 2, 3):
        assert sum(c.rank == r for c in cfgs) >= 15, f"rank {r}"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("index", range(len(CONV_CFGS)), ids=[cid for _, cid in CONV_CFGS])
def test_conv_grads_match_torch(conv_grid, index, target):
    errors, res = conv_grid
    cfg, cid = CONV_CFGS[index]
    assert cid not in errors, f"{cid}: convc rejected a valid configuration: {errors.get(cid)}"
    want = torch_conv_grads(cfg, *_conv_arrays(cfg, index))
    for nm, expected in want.items():
        assert_close(res[target][f"{nm}{index}"], expected, rtol=1e-9, atol=1e-11,
                     what=f"conv {cid} [{target}] {nm} vs torch")


# -- conv_transpose and pools against torch (one graph) -------------------------

@dataclass(frozen=True)
class TransposeCfg:
    rank: int
    n: int
    c_in: int
    c_out: int
    groups: int
    sizes: tuple
    kernel: tuple
    stride: tuple
    padding: object            # int / tuple (torch's own form) or pairs (checked by cropping)
    output_padding: tuple
    dilation: tuple
    bias: str                  # none | tied | untied

    @property
    def pads(self):
        return explicit_pads(self.padding, self.sizes, self.kernel, self.stride, self.dilation)

    @property
    def out(self):
        return tuple((n - 1) * s - lo - hi + d * (k - 1) + 1 + op for n, s, (lo, hi), d, k, op in
                     zip(self.sizes, self.stride, self.pads, self.dilation, self.kernel, self.output_padding))

    @property
    def id(self):
        j = lambda t: "x".join(map(str, t))  # noqa: E731
        return (f"{self.rank}d-n{self.n}-ci{self.c_in}-co{self.c_out}-g{self.groups}-in{j(self.sizes)}-"
                f"k{j(self.kernel)}-s{j(self.stride)}-p{str(self.padding).replace(' ', '')}-"
                f"op{j(self.output_padding)}-d{j(self.dilation)}-{self.bias}")


def _transpose_cfgs():
    rng = random.Random(TORCH_SEED + 1)
    out = []
    while len(out) < 24:
        rank = rng.choice([1, 2, 2, 3])
        groups = rng.choice([1, 1, 2])
        c_in, c_out = groups * rng.randint(1, 2), groups * rng.randint(1, 2)
        kernel = tuple(rng.randint(1, 3) for _ in range(rank))
        stride = tuple(rng.randint(1, 3) for _ in range(rank))
        dilation = tuple(rng.choice([1, 1, 2]) for _ in range(rank))
        output_padding = tuple(rng.randint(0, s - 1) for s in stride)       # < stride: differentiable
        sizes = tuple(rng.randint(1, {1: 6, 2: 4, 3: 3}[rank]) for _ in range(rank))
        form = rng.choice(["int", "tuple", "pairs"])
        if form == "int":
            padding = rng.randint(0, 1)
        elif form == "tuple":
            padding = tuple(rng.randint(0, 1) for _ in range(rank))
        else:
            padding = tuple((rng.randint(0, 2), rng.randint(0, 1)) for _ in range(rank))
        cfg = TransposeCfg(rank, rng.choice([1, 2]), c_in, c_out, groups, sizes, kernel, stride, padding,
                           output_padding, dilation, rng.choice(["none", "tied", "untied"]))
        if min(cfg.out) >= 1 and all(op < max(s, d) for op, s, d in zip(output_padding, stride, dilation)):
            out.append(cfg)
    return out


TRANSPOSE_CFGS = _transpose_cfgs()


def _transpose_arrays(cfg: TransposeCfg, i: int):
    rng = np.random.default_rng([TORCH_SEED, 1, i])
    x = rng.standard_normal((cfg.n, cfg.c_in) + cfg.sizes)
    w = rng.standard_normal((cfg.c_in, cfg.c_out // cfg.groups) + cfg.kernel)
    b = {"none": None, "tied": rng.standard_normal(cfg.c_out),
         "untied": rng.standard_normal((cfg.c_out,) + cfg.out)}[cfg.bias]
    G = rng.standard_normal((cfg.n, cfg.c_out) + cfg.out)
    return x, w, b, G


def torch_transpose_grads(cfg: TransposeCfg, x, w, b, G):
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True) if b is not None else None
    fn = TORCH_CONVT[cfg.rank]
    symmetric = not (isinstance(cfg.padding, tuple) and any(isinstance(p, tuple) for p in cfg.padding))
    if symmetric:                                  # torch's own padding and output_padding
        y = fn(tx, tw, tb if cfg.bias == "tied" else None, stride=cfg.stride, padding=cfg.padding,
               output_padding=cfg.output_padding, groups=cfg.groups, dilation=cfg.dilation)
    else:                                          # (lo, hi) pairs: crop the unpadded result
        full = fn(tx, tw, None, stride=cfg.stride, groups=cfg.groups, dilation=cfg.dilation)
        extra = [max(0, lo + o - f) for (lo, _), o, f in zip(cfg.pads, cfg.out, full.shape[2:])]
        full = F.pad(full, torch_pad_arg([(0, e) for e in extra]))
        y = full[(slice(None), slice(None)) + tuple(slice(lo, lo + o) for (lo, _), o in zip(cfg.pads, cfg.out))]
        if cfg.bias == "tied":
            y = y + tb.reshape((-1,) + (1,) * cfg.rank)
    if cfg.bias == "untied":
        y = y + tb[None]
    y.backward(torch.tensor(G))
    return {"dx": tx.grad.numpy(), "dw": tw.grad.numpy(), **({"db": tb.grad.numpy()} if b is not None else {})}


@dataclass(frozen=True)
class PoolCfg:
    kind: str                  # max | avg
    rank: int
    shape: tuple
    kernel: tuple
    stride: tuple
    padding: tuple             # symmetric, <= k // 2 (torch's rule)
    dilation: tuple
    ceil_mode: bool
    count_include_pad: bool
    ties: bool

    @property
    def id(self):
        j = lambda t: "x".join(map(str, t))  # noqa: E731
        return (f"{self.kind}{self.rank}d-{j(self.shape)}-k{j(self.kernel)}-s{j(self.stride)}-p{j(self.padding)}-"
                f"d{j(self.dilation)}" + ("-ceil" if self.ceil_mode else "")
                + ("-ties" if self.ties else "")
                + ("-exclpad" if self.kind == "avg" and not self.count_include_pad else ""))


def _pool_cfgs():
    rng = random.Random(TORCH_SEED + 2)
    out = []
    for kind in ("max", "avg"):
        for i in range(14):
            rank = (1, 2, 3)[i % 3]
            kernel = tuple(rng.randint(1, 3) for _ in range(rank))
            stride = tuple(rng.randint(1, 3) for _ in range(rank))
            padding = tuple(rng.randint(0, k // 2) for k in kernel)
            dilation = tuple(rng.choice([1, 2]) for _ in range(rank)) if kind == "max" else (1,) * rank
            sizes = tuple(rng.randint(d * (k - 1) + 1, d * (k - 1) + {1: 8, 2: 5, 3: 3}[rank])
                          for k, d in zip(kernel, dilation))
            shape = (rng.randint(1, 2), rng.randint(1, 3)) + sizes
            out.append(PoolCfg(kind, rank, shape, kernel, stride, padding, dilation, rng.random() < 0.5,
                               rng.random() < 0.5, kind == "max" and i % 4 != 3))
    # hand-picked: overlapping windows full of ties (stride < kernel), and a constant input
    out.append(PoolCfg("max", 2, (1, 2, 5, 5), (3, 3), (1, 1), (1, 1), (1, 1), False, True, True))
    out.append(PoolCfg("max", 1, (2, 1, 7), (3,), (2,), (1,), (1,), True, True, True))
    return out


POOL_CFGS = _pool_cfgs()


def _pool_arrays(cfg: PoolCfg, i: int):
    rng = np.random.default_rng([TORCH_SEED, 2, i])
    if cfg.ties:     # small integers: many windows hold their maximum more than once
        x = rng.integers(0, 3, cfg.shape).astype(np.float64)
    else:
        x = rng.standard_normal(cfg.shape)
    with torch.no_grad():
        y = _torch_pool(cfg, torch.tensor(x))
    G = rng.standard_normal(tuple(y.shape))
    return x, G


def _torch_pool(cfg: PoolCfg, tx):
    if cfg.kind == "max":
        return TORCH_MAXPOOL[cfg.rank](tx, cfg.kernel, cfg.stride, cfg.padding, cfg.dilation, cfg.ceil_mode)
    return TORCH_AVGPOOL[cfg.rank](tx, cfg.kernel, cfg.stride, cfg.padding, cfg.ceil_mode, cfg.count_include_pad)


def torch_pool_grad(cfg: PoolCfg, x, G):
    tx = torch.tensor(x, requires_grad=True)
    _torch_pool(cfg, tx).backward(torch.tensor(G))
    return tx.grad.numpy()


@pytest.fixture(scope="module")
def transpose_pool_grid():
    g, feeds, errors = cc.Graph("transpose_pool_grads"), {}, {}
    for i, cfg in enumerate(TRANSPOSE_CFGS):
        x, w, b, G = _transpose_arrays(cfg, i)
        try:
            xv = g.input(f"tx{i}", x.shape, F64)
            feeds[xv.name] = x
            wv = g.param(f"tw{i}", w)
            bv = g.param(f"tb{i}", b) if b is not None else None
            y = cc.conv_transpose(xv, wv, bv, stride=cfg.stride, padding=cfg.padding,
                                  output_padding=cfg.output_padding, dilation=cfg.dilation, groups=cfg.groups)
            Gv = g.input(f"tG{i}", G.shape, F64)
            feeds[Gv.name] = G
            for nm, d in zip(("dx", "dw", "db"), cc.grad(y, [xv, wv] + ([bv] if bv is not None else []),
                                                          grad_output=Gv)):
                g.output(d, f"t{nm}{i}")
        except cc.ConvcError as e:
            errors[cfg.id] = e
    for i, cfg in enumerate(POOL_CFGS):
        x, G = _pool_arrays(cfg, i)
        try:
            xv = g.input(f"px{i}", x.shape, F64)
            feeds[xv.name] = x
            if cfg.kind == "max":
                y = cc.max_pool(xv, cfg.kernel, cfg.stride, cfg.padding, cfg.dilation, cfg.ceil_mode)
            else:
                y = cc.avg_pool(xv, cfg.kernel, cfg.stride, cfg.padding, cfg.ceil_mode, cfg.count_include_pad)
            Gv = g.param(f"pG{i}", G)
            g.output(cc.grad(cc.reduce_sum(cc.mul(y, Gv)), xv), f"pdx{i}")
        except cc.ConvcError as e:
            errors[cfg.id] = e
    res = {t: cc.compile(g, target=t).run(feeds) for t in TARGETS}
    return errors, res


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("index", range(len(TRANSPOSE_CFGS)), ids=[c.id for c in TRANSPOSE_CFGS])
def test_conv_transpose_grads_match_torch(transpose_pool_grid, index, target):
    errors, res = transpose_pool_grid
    cfg = TRANSPOSE_CFGS[index]
    assert cfg.id not in errors, f"{cfg.id}: convc rejected a valid configuration: {errors.get(cfg.id)}"
    for nm, expected in torch_transpose_grads(cfg, *_transpose_arrays(cfg, index)).items():
        assert_close(res[target][f"t{nm}{index}"], expected, rtol=1e-9, atol=1e-11,
                     what=f"conv_transpose {cfg.id} [{target}] {nm} vs torch")


def test_transpose_and_pool_grids_cover_the_parameter_space():
    t = TRANSPOSE_CFGS
    assert {c.rank for c in t} == {1, 2, 3}
    assert any(c.groups > 1 for c in t) and any(max(c.dilation) > 1 for c in t)
    assert any(max(c.output_padding) > 0 for c in t)
    assert any(isinstance(c.padding, tuple) and any(isinstance(p, tuple) and p[0] != p[1] for p in c.padding)
               for c in t)
    assert {c.bias for c in t} == {"none", "tied", "untied"}
    p = POOL_CFGS
    for kind in ("max", "avg"):
        assert {c.rank for c in p if c.kind == kind} == {1, 2, 3}
        assert {c.ceil_mode for c in p if c.kind == kind} == {True, False}
        assert any(max(c.padding) > 0 for c in p if c.kind == kind)
    assert {c.count_include_pad for c in p if c.kind == "avg"} == {True, False}
    assert any(c.ties for c in p) and any(c.kind == "max" and not c.ties for c in p)
    assert any(max(c.dilation) > 1 for c in p if c.kind == "max")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("index", range(len(POOL_CFGS)), ids=[c.id for c in POOL_CFGS])
def test_pool_grads_match_torch(transpose_pool_grid, index, target):
    errors, res = transpose_pool_grid
    cfg = POOL_CFGS[index]
    assert cfg.id not in errors, f"{cfg.id}: convc rejected a valid configuration: {errors.get(cfg.id)}"
    x, G = _pool_arrays(cfg, index)
    if cfg.ties:     # the case really has tied maxima in some window
        assert len(np.unique(x)) < x.size
    assert_close(res[target][f"pdx{index}"], torch_pool_grad(cfg, x, G), rtol=1e-9, atol=1e-11,
                 what=f"{cfg.id} [{target}] dx vs torch")


# -- whole networks against torch --------------------------------------------------

def _lenet_params(rng):
    return dict(w1=rng.standard_normal((4, 1, 5, 5)) / 5, b1=rng.standard_normal(4) * 0.1,
                w2=rng.standard_normal((6, 4, 3, 3)) / 6, b2=rng.standard_normal(6) * 0.1,
                w3=rng.standard_normal((10, 24)) / 5, b3=rng.standard_normal(10) * 0.1,
                w4=rng.standard_normal((3, 10)) / 3, b4=rng.standard_normal(3) * 0.1)


def _autoencoder_params(rng):
    return dict(e1=rng.standard_normal((4, 1, 3, 3)) / 3, eb1=rng.standard_normal(4) * 0.1,
                e2=rng.standard_normal((6, 4, 3, 3)) / 6, eb2=rng.standard_normal(6) * 0.1,
                d1=rng.standard_normal((6, 4, 3, 3)) / 6, db1=rng.standard_normal(4) * 0.1,
                d2=rng.standard_normal((4, 1, 3, 3)) / 3, db2=rng.standard_normal(1) * 0.1)


def _nets():
    rng = np.random.default_rng(4242)
    lenet = _lenet_params(rng)
    ae = _autoencoder_params(rng)
    data = dict(img=rng.standard_normal((3, 1, 16, 16)), labels=np.array([2, 0, 1], np.int64),
                ae_x=rng.standard_normal((2, 1, 8, 8)))
    return lenet, ae, data


def build_nets(g):
    """LeNet (conv-relu-maxpool-conv-relu-maxpool-flatten-dense-relu-dense-cross_entropy)
    and a conv autoencoder (conv s2 + relu encoder, conv_transpose decoder, mse_loss)."""
    lenet, ae, data = _nets()
    P = {k: g.param(k, v) for k, v in {**lenet, **ae}.items()}
    img = g.input("img", data["img"].shape, F64)
    labels = g.input("labels", (3,), "int64")
    h = cc.max_pool(cc.relu(cc.conv(img, P["w1"], P["b1"])), 2)                 # (3, 4, 6, 6)
    h = cc.max_pool(cc.relu(cc.conv(h, P["w2"], P["b2"])), 2)                   # (3, 6, 2, 2)
    h = cc.relu(cc.dense(cc.flatten(h), P["w3"], P["b3"]))
    lenet_loss = cc.cross_entropy(cc.dense(h, P["w4"], P["b4"]), labels)
    x = g.input("ae_x", data["ae_x"].shape, F64)
    z = cc.relu(cc.conv(x, P["e1"], P["eb1"], stride=2, padding=1))             # (2, 4, 4, 4)
    z = cc.relu(cc.conv(z, P["e2"], P["eb2"], stride=2, padding=1))             # (2, 6, 2, 2)
    r = cc.relu(cc.conv_transpose(z, P["d1"], P["db1"], stride=2, padding=1, output_padding=1))
    r = cc.conv_transpose(r, P["d2"], P["db2"], stride=2, padding=1, output_padding=1)   # (2, 1, 8, 8)
    ae_loss = cc.mse_loss(r, x)
    return P, lenet_loss, ae_loss, data


def torch_nets():
    lenet, ae, data = _nets()
    T = {k: torch.tensor(v, requires_grad=True) for k, v in {**lenet, **ae}.items()}
    h = F.max_pool2d(F.relu(F.conv2d(torch.tensor(data["img"]), T["w1"], T["b1"])), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, T["w2"], T["b2"])), 2)
    h = F.relu(F.linear(h.flatten(1), T["w3"], T["b3"]))
    lenet_loss = F.cross_entropy(F.linear(h, T["w4"], T["b4"]), torch.tensor(data["labels"]))
    x = torch.tensor(data["ae_x"])
    z = F.relu(F.conv2d(x, T["e1"], T["eb1"], stride=2, padding=1))
    z = F.relu(F.conv2d(z, T["e2"], T["eb2"], stride=2, padding=1))
    r = F.relu(F.conv_transpose2d(z, T["d1"], T["db1"], stride=2, padding=1, output_padding=1))
    r = F.conv_transpose2d(r, T["d2"], T["db2"], stride=2, padding=1, output_padding=1)
    ae_loss = F.mse_loss(r, x)
    (lenet_loss + ae_loss).backward()
    return (lenet_loss.item(), ae_loss.item(), {k: t.grad.numpy() for k, t in T.items()},
            {"img": data["img"], "labels": data["labels"], "ae_x": data["ae_x"]})


@pytest.fixture(scope="module")
def nets():
    g = cc.Graph("nets_grad")
    P, lenet_loss, ae_loss, data = build_nets(g)
    lenet_names, ae_names = list(_nets()[0]), list(_nets()[1])
    g.output(lenet_loss, "lenet_loss")
    g.output(ae_loss, "ae_loss")
    for k, d in zip(lenet_names, cc.grad(lenet_loss, [P[k] for k in lenet_names])):
        g.output(d, f"d_{k}")
    for k, d in zip(ae_names, cc.grad(ae_loss, [P[k] for k in ae_names])):
        g.output(d, f"d_{k}")
    want = torch_nets()
    res = {t: cc.compile(g, target=t).run(want[3]) for t in TARGETS}
    return res, want, lenet_names, ae_names


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("net", ["lenet", "autoencoder"])
def test_network_grads_match_torch(nets, net, target):
    res, (lenet_loss, ae_loss, grads, _), lenet_names, ae_names = nets
    r = res[target]
    loss, names = (("lenet_loss", lenet_loss), lenet_names) if net == "lenet" else (("ae_loss", ae_loss), ae_names)
    assert_close(r[loss[0]], loss[1], rtol=1e-10, atol=0, what=f"{net} [{target}] loss vs torch")
    for k in names:
        assert np.abs(grads[k]).max() > 0, f"{net}: torch's gradient of {k} is zero (a useless check)"
        assert_close(r[f"d_{k}"], grads[k], rtol=1e-9, atol=1e-12, what=f"{net} [{target}] dL/d{k} vs torch")


# =============================================================================
# 3. The IR contract: a conv's gradient is g (conv_grad_kernel) and h (conv_grad_input)
# =============================================================================

def test_conv_gradient_emits_conv_grad_kernel_and_conv_grad_input_nodes():
    g = cc.Graph("ir_contract")
    x = g.input("x", (2, 3, 7, 7), F64)
    w = g.param("w", np.ones((4, 3, 3, 3)))
    y = cc.conv(x, w, stride=2, padding=1, dilation=1, name="the_conv")
    before = set(g.nx.nodes)
    dx, dw = cc.grad(cc.reduce_sum(y), [x, w])
    g.output(dx, "dx")
    g.output(dw, "dw")
    assert dx.graph is g and dw.graph is g, "cc.grad must add its nodes to the SAME graph"
    assert (dx.shape, dw.shape) == (x.shape, w.shape)
    text = str(g)
    assert "conv_grad_kernel" in text and "conv_grad_input" in text, text
    new_ops = [g.node(n)["op"] for n in set(g.nx.nodes) - before]
    assert new_ops.count("conv_grad_kernel") == 1 and new_ops.count("conv_grad_input") == 1, new_ops
    # h(K, G, s) reads the kernel; g(G, V, s) reads the conv's input V; both carry the conv's geometry
    assert dx.op == "conv_grad_input" and g.inputs_of(dx.name)[0] == "w"
    assert dw.op == "conv_grad_kernel" and g.inputs_of(dw.name)[1] == "x"
    for v in (dx, dw):
        attrs = g.node(v.name)["attrs"]
        assert attrs["stride"] == (2, 2) and attrs["padding"] == ((1, 1), (1, 1)), attrs
    # the printed IR has one line per node naming its op
    for n in g.nx.nodes:
        assert any(line.strip().startswith(f"%{n} = {g.node(n)['op']}(") for line in text.splitlines()), n


# =============================================================================
# 4. cc.grad semantics
# =============================================================================

def test_fan_out_accumulates():
    g = cc.Graph("fanout")
    x = g.input("x", (2, 3), F64)
    # x feeds mul twice (both slots), mul by a constant, and concat twice:
    # L = sum(x*x) + sum(3*x) + sum(concat([x, x])) -> dL/dx = 2x + 3 + 2
    loss = cc.add(cc.add(cc.reduce_sum(cc.mul(x, x)), cc.reduce_sum(cc.mul(x, 3.0))),
                  cc.reduce_sum(cc.concat([x, x], axis=0)))
    g.output(cc.grad(loss, x), "dx")
    a = np.arange(6, dtype=np.float64).reshape(2, 3) - 2.5
    for t in TARGETS:
        np.testing.assert_allclose(cc.compile(g, target=t).run({"x": a})["dx"], 2 * a + 5, rtol=1e-12,
                                   err_msg=f"[{t}]")


def test_fan_out_through_a_conv_and_a_skip_connection():
    g = cc.Graph("fanout_conv")
    x = g.input("x", (1, 1, 4, 4), F64)
    w = g.param("w", np.full((1, 1, 3, 3), 0.5))
    y = cc.add(cc.conv(x, w, padding="same"), x)          # a residual block: x used twice
    g.output(cc.grad(cc.reduce_sum(y), x), "dx")
    # d/dx sum(conv) = 0.5 * (number of output windows covering each pixel); + 1 from the skip
    cover = np.array([2, 3, 3, 2], np.float64)
    want = 0.5 * np.outer(cover, cover) + 1.0
    for t in TARGETS:
        np.testing.assert_allclose(cc.compile(g, target=t).run({"x": np.ones((1, 1, 4, 4))})["dx"][0, 0], want,
                                   rtol=1e-12, err_msg=f"[{t}]")


def test_wrt_that_does_not_influence_y_gets_zeros_of_its_shape():
    g = cc.Graph("unrelated")
    x = g.input("x", (2, 3), F64)
    u = g.input("u", (4, 1, 5), F64)                    # an input y does not read
    p = g.param("p", np.ones((3, 2)))                   # a param y does not read
    y = cc.reduce_sum(cc.mul(x, x))
    after = cc.relu(cc.mul(y, 2.0))                     # downstream of y only
    dx, du, dp, da = cc.grad(y, [x, u, p, after])
    for nm, d in (("dx", dx), ("du", du), ("dp", dp), ("da", da)):
        g.output(d, nm)
    assert (du.shape, dp.shape, da.shape) == ((4, 1, 5), (3, 2), ())
    a = np.full((2, 3), 1.5)
    for t in TARGETS:
        r = cc.compile(g, target=t).run({"x": a, "u": np.ones((4, 1, 5))})
        np.testing.assert_allclose(r["dx"], 2 * a, err_msg=f"[{t}]")
        for nm, shape in (("du", (4, 1, 5)), ("dp", (3, 2)), ("da", ())):
            assert r[nm].shape == shape and r[nm].dtype == np.float64, f"[{t}] {nm}: {r[nm].shape} {r[nm].dtype}"
            assert not r[nm].any(), f"[{t}] {nm} must be all zeros, got {r[nm]}"


def test_grad_keeps_float32():
    g = cc.Graph("f32grad")
    x = g.input("x", (1, 2, 5, 5))
    w = g.param("w", np.ones((3, 2, 3, 3), np.float32))
    b = g.param("b", np.zeros(3, np.float32))
    dx, dw, db = cc.grad(cc.reduce_sum(cc.conv(x, w, b)), [x, w, b])
    assert {v.dtype for v in (dx, dw, db)} == {"float32"}
    g.output(db, "db")
    for t in TARGETS:       # d sum(conv)/db = number of output positions (3 x 3) per channel
        np.testing.assert_array_equal(cc.compile(g, target=t).run({"x": np.ones((1, 2, 5, 5), np.float32)})["db"],
                                      np.full(3, 9, np.float32), err_msg=f"[{t}]")


def test_single_value_wrt_returns_a_value():
    g = cc.Graph("single")
    x = g.input("x", (3,), F64)
    d = cc.grad(cc.reduce_sum(x), x)
    assert isinstance(d, cc.Value) and d.shape == (3,)
    ds = cc.grad(cc.reduce_sum(x), [x])
    assert isinstance(ds, list) and len(ds) == 1


def test_value_from_another_graph_raises_graph_error():
    g, other = cc.Graph("mine"), cc.Graph("other")
    x = g.input("x", (2, 2), F64)
    foreign = other.input("x", (2, 2), F64)
    loss = cc.reduce_sum(cc.mul(x, x))
    with pytest.raises(cc.GraphError) as e:
        cc.grad(loss, [x, foreign])
    assert isinstance(e.value, cc.ConvcError)
    assert "other" in str(e.value) and "mine" in str(e.value), str(e.value)
    with pytest.raises(cc.GraphError):
        cc.grad(cc.mul(x, 2.0), [x], grad_output=foreign)     # grad_output of another graph
    with pytest.raises(cc.ConvcError):
        cc.grad(loss, [np.zeros((2, 2))])                     # not a Value at all


def test_non_scalar_y_needs_grad_output():
    def graph():
        g = cc.Graph("nonscalar")
        x = g.input("x", (2, 3), F64)
        return g, x, cc.mul(x, 2.0)

    g, x, y = graph()
    with pytest.raises(cc.GraphError, match="grad_output"):
        cc.grad(y, [x])
    g, x, y = graph()
    with pytest.raises(cc.GraphError):                          # grad_output of the wrong shape
        cc.grad(y, [x], grad_output=g.input("G", (3, 2), F64))
    g, x, y = graph()
    with pytest.raises(cc.GraphError):                          # ... or the wrong dtype
        cc.grad(y, [x], grad_output=g.input("G", (2, 3)))
    g, x, y = graph()
    G = g.input("G", (2, 3), F64)
    g.output(cc.grad(y, x, grad_output=G), "dx")               # with G it works: dx = 2 G
    Ga = np.arange(6.0).reshape(2, 3)
    for t in TARGETS:
        np.testing.assert_allclose(cc.compile(g, target=t).run({"x": np.ones((2, 3)), "G": Ga})["dx"], 2 * Ga,
                                   err_msg=f"[{t}]")


def test_int64_wrt_raises():
    g = cc.Graph("intwrt")
    z = g.input("z", (4, 3), F64)
    labels = g.input("labels", (4,), "int64")
    loss = cc.cross_entropy(z, labels)
    with pytest.raises(cc.GraphError, match="int64"):
        cc.grad(loss, [z, labels])


def test_grad_with_respect_to_an_intermediate_value():
    g = cc.Graph("intermediate")
    x = g.input("x", (2, 3), F64)
    r = cc.relu(x)
    loss = cc.reduce_sum(cc.mul(cc.mul(r, r), 3.0))          # L = 3 * sum(relu(x)^2)
    dr, dx = cc.grad(loss, [r, x])
    g.output(dr, "dr")
    g.output(dx, "dx")
    a = np.array([[-1.0, 0.5, 2.0], [3.0, -0.25, 1.0]])
    for t in TARGETS:
        res = cc.compile(g, target=t).run({"x": a})
        np.testing.assert_allclose(res["dr"], 6 * np.maximum(a, 0), err_msg=f"[{t}] dL/dr = 6 r")
        np.testing.assert_allclose(res["dx"], 6 * np.maximum(a, 0) * (a > 0), err_msg=f"[{t}] dL/dx")


def test_conv_transpose_gradient_with_output_padding_not_below_stride_is_refused():
    g = cc.Graph("ct_opad")
    x = g.input("x", (1, 1, 4), F64)
    # output_padding 1 is valid with stride 1 because dilation 2 > 1, but no conv maps back onto it
    y = cc.conv_transpose(x, np.ones((1, 1, 2)), stride=1, dilation=2, output_padding=1)
    with pytest.raises(cc.ConvcError, match="output_padding"):
        cc.grad(cc.reduce_sum(y), x)

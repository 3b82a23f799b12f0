"""Tensor ops (convc/ops/indexing.py, convc/ops/rearrange.py) and their ONNX
converters (convc/onnx/ops_tensor.py):

* ``take``, ``where``, ``depth_to_space`` / ``space_to_depth``, ``tile`` and
  ``einsum``: forward and float64 gradients against torch (index_select,
  where, pixel_shuffle / pixel_unshuffle, repeat, einsum and autograd) on
  every target, all cases in one graph (one compile per target), and the
  numpy reference's gradients against central finite differences;
* ``cast``: the conversion rules of every dtype pair (saturation, NaN,
  wrap-around) written out here, on every target, and against ONNX Runtime
  where ONNX defines the result;
* the converters against ONNX Runtime, one model of many nodes per opset
  (the old and new forms of each op); refusals name the rule;
* the onnx package's node cases of these ops (``CONVC_LONG_TESTS=1``; D's
  conformance runs them in the suite).
"""
from __future__ import annotations

import copy
import os
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import convc as cc
from convc.ops.indexing import cast, take, where
from convc.ops.rearrange import depth_to_space, einsum, space_to_depth, tile
from helpers import TARGETS, assert_close

RNG = np.random.default_rng(20)
T = torch.tensor

# (id, input shapes, convc builder(*values), torch function(*tensors))
MASK = RNG.random((3, 1, 5)) > 0.5
IDX2 = np.array([[4, -1], [0, 2], [-5, 4]])
CASES = [
    ("take_axis0", [(5, 3)], lambda x: take(x, [4, 0, 0, -2], 0),
     lambda x: x[T([4, 0, 0, 3])]),
    ("take_axis1_2d", [(2, 5, 3)], lambda x: take(x, IDX2, 1),
     lambda x: x[:, T(IDX2 % 5)]),
    ("take_last_scalar", [(2, 3, 4)], lambda x: take(x, np.array(-1), -1),
     lambda x: x[..., 3]),
    ("where_mask", [(3, 4, 5), (4, 1)], lambda a, b: where(MASK, a, b),
     lambda a, b: torch.where(T(MASK), a, b)),
    ("d2s_crd", [(2, 12, 3, 2)], lambda x: depth_to_space(x, 2, "CRD"),
     lambda x: torch.nn.functional.pixel_shuffle(x, 2)),
    ("d2s_dcr", [(1, 18, 2, 3)], lambda x: depth_to_space(x, 3, "DCR"),       # DCR: channels read as (r, r, C)
     lambda x: x.reshape(1, 3, 3, 2, 2, 3).permute(0, 3, 4, 1, 5, 2).reshape(1, 2, 6, 9)),
    ("s2d_crd", [(2, 3, 4, 6)], lambda x: space_to_depth(x, 2, "CRD"),
     lambda x: torch.nn.functional.pixel_unshuffle(x, 2)),
    ("s2d_dcr", [(1, 2, 4, 4)], lambda x: space_to_depth(x, 2),
     lambda x: x.reshape(1, 2, 2, 2, 2, 2).permute(0, 3, 5, 1, 2, 4).reshape(1, 8, 2, 2)),
    ("tile", [(2, 1, 3)], lambda x: tile(x, (2, 3, 1)), lambda x: x.repeat(2, 3, 1)),
    ("ein_matmul", [(3, 4), (4, 5)], lambda a, b: einsum("ij,jk->ik", a, b),
     lambda a, b: torch.einsum("ij,jk->ik", a, b)),
    ("ein_bmm", [(2, 3, 4), (2, 4, 5)], lambda a, b: einsum("bij,bjk->bik", a, b),
     lambda a, b: torch.einsum("bij,bjk->bik", a, b)),
    ("ein_transpose", [(3, 4)], lambda a: einsum("ij->ji", a), lambda a: torch.einsum("ij->ji", a)),
    ("ein_mix", [(2, 3, 4, 5), (6, 3)], lambda a, b: einsum("nchw,oc->nohw", a, b),
     lambda a, b: torch.einsum("nchw,oc->nohw", a, b)),
    ("ein_outer", [(3,), (4,)], lambda a, b: einsum("i,j", a, b), lambda a, b: torch.einsum("i,j", a, b)),
    ("ein_sum", [(3, 4)], lambda a: einsum("ij->i", a), lambda a: torch.einsum("ij->i", a)),
    ("ein_diag_ellipsis", [(2, 3, 3)], lambda a: einsum("...ii->...i", a), lambda a: torch.einsum("...ii->...i", a)),
    ("ein_three", [(2, 3), (4, 3, 5), (2, 5)], lambda a, b, c: einsum("bn,anm,bm->ba", a, b, c),
     lambda a, b, c: torch.einsum("bn,anm,bm->ba", a, b, c)),
]


def test_ops_against_torch_with_gradients():
    """Every case's output and the gradients of all its inputs (float64)
    against torch and autograd, on every target: one graph, one compile per
    target; then the numpy reference's gradients against central finite
    differences of the reference itself."""
    g = cc.Graph("tensor_cases")
    feeds, want, builds = {}, {}, {}
    for cid, shapes, build, tfn in CASES:
        xs = [g.input(f"{cid}_x{i}", s, "float64") for i, s in enumerate(shapes)]
        y = build(*xs)
        gy = g.input(f"{cid}_gy", y.shape, "float64")
        g.output(y, f"{cid}_y")
        for i, d in enumerate(cc.grad(y, xs, grad_output=gy)):
            g.output(d, f"{cid}_dx{i}")
        arrays = [RNG.standard_normal(s) for s in shapes]
        b = RNG.standard_normal(y.shape)
        feeds.update({f"{cid}_x{i}": a for i, a in enumerate(arrays)}, **{f"{cid}_gy": b})
        ts = [T(a, requires_grad=True) for a in arrays]
        ty = tfn(*ts)
        ty.backward(T(b))
        want[f"{cid}_y"] = ty.detach().numpy()
        want.update({f"{cid}_dx{i}": t.grad.numpy() for i, t in enumerate(ts)})
        builds[cid] = (build, shapes)
    for target in TARGETS:
        got = cc.compile(g, target=target).run(feeds)
        for k, v in want.items():
            assert_close(got[k], v, rtol=1e-10, atol=1e-12, what=f"{k} on {target}")
    h = 1e-6
    for cid, (build, shapes) in builds.items():
        fg = cc.Graph("fd")
        xs = [fg.input(f"x{i}", s, "float64") for i, s in enumerate(shapes)]
        fg.output(build(*xs), "y")
        ref = cc.compile(fg, target="numpy")
        base = {f"x{i}": feeds[f"{cid}_x{i}"] for i in range(len(shapes))}
        gy = feeds[f"{cid}_gy"]
        for i in range(len(shapes)):
            fd = np.zeros(shapes[i])
            for j in np.ndindex(shapes[i]):
                up, dn = dict(base), dict(base)
                up[f"x{i}"], dn[f"x{i}"] = base[f"x{i}"].copy(), base[f"x{i}"].copy()
                up[f"x{i}"][j] += h
                dn[f"x{i}"][j] -= h
                fd[j] = np.sum((ref.run(up)["y"] - ref.run(dn)["y"]) * gy) / (2 * h)
            assert_close(want[f"{cid}_dx{i}"], fd, rtol=1e-6, atol=1e-7, what=f"finite differences of {cid} x{i}")


# -- cast -------------------------------------------------------------------------------
SPECIAL = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 0.5, -0.5, 0.999, -0.999, 2.7, -2.7,
                    127.9, -128.9, 128.0, -129.0, 255.5, 256.0, 32767.5, -32769.0, 65535.9, 65536.0,
                    2.0**31 - 1, 2.0**31, -2.0**31, -2.0**31 - 4096, 2.0**32, 2.0**53, 2.0**63, -2.0**63, 2.0**64,
                    1e30, -1e30])


def _saturated(v: float, dtype: str) -> int:
    """The cast rule written out for one value: NaN -> 0, truncate toward
    zero, clamp to the dtype's range."""
    info = np.iinfo(dtype)
    if v != v:
        return 0
    if v in (np.inf, -np.inf):
        return int(info.max) if v > 0 else int(info.min)
    return max(int(info.min), min(int(info.max), int(v)))       # int() truncates toward zero, exactly


INT_TYPES = ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64")


def test_cast_rules_on_every_target():
    g = cc.Graph("casts")
    xf = {d: g.input(f"x_{d}", SPECIAL.shape, d) for d in ("float32", "float64")}
    ints = np.array([0, 1, -1, 127, 128, -129, 255, 256, 65535, 65536, -2**31, 2**31, 2**40 + 7, -2**63,
                     2**63 - 1, 2**53 + 1], np.int64)
    xi = g.input("x_int64", ints.shape, "int64")
    feeds = {"x_float32": SPECIAL.astype(np.float32), "x_float64": SPECIAL, "x_int64": ints}
    want = {}
    for src, v in xf.items():
        for dst in INT_TYPES:
            g.output(cast(v, dst), f"{src}_{dst}")
            want[f"{src}_{dst}"] = np.array([_saturated(float(a), dst) for a in feeds[f"x_{src}"]], dtype=dst)
    for dst in INT_TYPES:                        # integer -> integer: modulo 2**bits
        g.output(cast(xi, dst), f"int64_{dst}")
        bits = np.dtype(dst).itemsize * 8
        mod = [int(a) % 2**bits for a in ints]
        want[f"int64_{dst}"] = np.array([m - 2**bits if dst.startswith("int") and m >= 2**(bits - 1) else m
                                         for m in mod], dtype=dst)
    g.output(cast(xf["float64"], "float32"), "f64_f32")          # beyond float32: +-inf (C's rounding)
    want["f64_f32"] = np.array([float(np.float32(a)) if abs(a) < 3.5e38 or a != a else np.copysign(np.inf, a)
                                for a in SPECIAL], np.float32)
    g.output(cast(xi, "float32"), "int64_f32")
    want["int64_f32"] = np.array([float(a) for a in ints], np.float32)
    g.output(cast(cast(xi, "int8"), "float64"), "int64_int8_f64")
    want["int64_int8_f64"] = want["int64_int8"].astype(np.float64)
    for target in TARGETS:
        got = cc.compile(g, target=target).run(feeds)
        for k, v in want.items():
            assert got[k].dtype == v.dtype, f"{k} on {target}: dtype {got[k].dtype}"
            np.testing.assert_array_equal(got[k], v, err_msg=f"{k} on {target}")


def test_cast_gradient_and_refusals():
    g = cc.Graph("cast_grad")
    x = g.input("x", (3,), "float32")
    y = cast(x, "float64")
    loss = cc.reduce_sum(cc.mul(y, y))
    dx, = cc.grad(loss, [x])
    g.output(dx, "dx")
    a = np.array([1.5, -2.0, 0.25], np.float32)
    got = cc.compile(g, target="c").run({"x": a})["dx"]
    assert got.dtype == np.float32 and np.array_equal(got, 2 * a)
    with pytest.raises(cc.ConvcError, match="not differentiable"):
        cc.grad(cc.reduce_sum(cast(cast(x, "int32"), "float32")), [x])
    with pytest.raises(cc.ConvcError, match="dtype 'bool' is not supported"):
        cast(x, "bool")


# -- ONNX against ONNX Runtime ---------------------------------------------------------------
def _model(nodes, inputs, outputs, opset, inits=()):
    """A model of several independent nodes: ``inputs`` [(name, array)] graph
    inputs, ``inits`` [(name, array)] initializers, ``outputs`` names."""
    elem = lambda a: helper.np_dtype_to_tensor_dtype(a.dtype)        # noqa: E731
    graph = helper.make_graph(nodes, f"tensor_ops_{opset}",
                              [helper.make_tensor_value_info(n, elem(a), a.shape) for n, a in inputs],
                              [helper.make_empty_tensor_value_info(o) for o in outputs],
                              [numpy_helper.from_array(a, n) for n, a in inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _check_ort(model, feeds, targets=("c",)):
    import onnxruntime as ort
    names = [o.name for o in model.graph.output]
    want = dict(zip(names, ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
                    .run(None, feeds)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = cc.from_onnx(model)
    for target in targets:
        got = cc.compile(g, target=target).run(feeds)
        for n in names:
            assert got[n].dtype == want[n].dtype, f"{n} on {target}: dtype {got[n].dtype}, ORT {want[n].dtype}"
            assert_close(got[n], want[n], rtol=1e-6, atol=1e-6, what=f"{n} ({model.graph.name}) on {target}")


X4 = RNG.standard_normal((2, 8, 3, 4)).astype(np.float32)
IN_RANGE = np.clip(RNG.standard_normal(24) * 50, -120, 120).astype(np.float32)   # in int8's range: truncated


def _nodes(opset):
    """(nodes, outputs, initializers) of every converter at ``opset``."""
    n, outs = [], []

    def add(op, ins, **attrs):
        out = f"{op.lower()}{len(outs)}"
        n.append(helper.make_node(op, ins, [out], **attrs))
        outs.append(out)
    inits = [("reps", np.array([1, 2, 1, 3], np.int64)), ("idx", np.array([[2, -1], [0, 7]], np.int64)),
             ("idx32", np.array([-3, 1], np.int32)), ("cond", RNG.random((3, 4)) > 0.4),
             ("w", RNG.standard_normal((5, 8)).astype(np.float32)), ("c", RNG.random((3, 4)).astype(np.float32)),
             ("half", np.array(0.5, np.float32))]
    if opset >= 11:
        add("DepthToSpace", ["x"], blocksize=2, mode="CRD")
    add("DepthToSpace", ["x"], blocksize=2)                   # DCR (the only mode before opset 11)
    add("SpaceToDepth", ["s"], blocksize=2)
    add("Tile", ["x", "reps"])
    add("Gather", ["x", "idx"], axis=1)
    add("Gather", ["x", "idx32"], axis=-1)
    add("Cast", ["f"], to=TensorProto.INT8)
    add("Cast", ["u"], to=TensorProto.UINT8)
    add("Cast", ["f"], to=TensorProto.DOUBLE)
    add("Cast", ["f"], to=TensorProto.INT64)
    if opset >= 9:
        add("Where", ["cond", "x", "y"])
        n += [helper.make_node("Less", ["c", "half"], ["m"]), helper.make_node("Not", ["m"], ["nm"])]
        add("Where", ["nm", "x", "c"])                      # a comparison of constants folds into the mask
    if opset >= 12:
        add("Einsum", ["x", "w"], equation="nchw,oc->nohw")
        add("Einsum", ["x"], equation="nchw->nc")
    return n, outs, inits


@pytest.mark.parametrize("opset", [7, 11, 21])
def test_converters_against_ort(opset):
    """Old and new forms: DepthToSpace without mode (opset 1 form) and with
    (11, 13), SpaceToDepth-1/13, Tile-6/13, Gather-1/11/13, Cast-6/9/21,
    Where-9/16, Einsum-12; all nodes of one opset in one model, on C (and
    OpenCL at the newest opset: the templates are the ones the op tests
    above run on every target)."""
    nodes, outs, inits = _nodes(opset)
    if opset < 9:
        inits = [i for i in inits if i[0] not in ("cond", "c", "half")]
    feeds = {"x": X4, "s": RNG.standard_normal((1, 2, 4, 6)).astype(np.float32), "f": IN_RANGE,
             "u": np.abs(IN_RANGE), "y": RNG.standard_normal((3, 1)).astype(np.float32)}
    inputs = [(k, v) for k, v in feeds.items() if any(k in nd.input for nd in nodes)]
    feeds = dict(inputs)
    _check_ort(_model(nodes, inputs, outs, opset, inits), feeds, targets=TARGETS[1:] if opset == 21 else ("c",))


def test_tile_1_form():
    """Tile before opset 6: the count and the axis are inputs of the input's
    type (ONNX Runtime runs opset 7 on, so numpy's tile is the oracle)."""
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    node = helper.make_node("Tile", ["x", "t", "a"], ["y"])
    graph = helper.make_graph([node], "tile1", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in
                                                (("x", x.shape), ("t", ()), ("a", ()))],
                              [helper.make_empty_tensor_value_info("y")],
                              [numpy_helper.from_array(np.array(3, np.float32), "t"),
                               numpy_helper.from_array(np.array(-1, np.float32), "a")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 5)], ir_version=3)
    got = cc.compile(cc.from_onnx(model), target="numpy").run({"x": x})["y"]
    np.testing.assert_array_equal(got, np.tile(x, (1, 3)))


def _import_error(nodes, inputs, outs, opset=13, inits=()):
    with pytest.raises(cc.ConvcError) as e:
        cc.from_onnx(_model(nodes, inputs, outs, opset, inits))
    return str(e.value)


def test_converter_refusals_name_the_rule():
    x = ("x", X4)
    msg = _import_error([helper.make_node("Greater", ["x", "t"], ["c"]), helper.make_node("Where", ["c", "x", "t"], ["y"])],
                        [x], ["y"], inits=[("t", np.zeros((1,), np.float32))])
    assert "Greater of run-time tensors makes a bool tensor" in msg
    msg = _import_error([helper.make_node("Gather", ["x", "i"], ["y"], axis=0)], [x, ("i", np.array([0], np.int64))],
                        ["y"])
    assert "indices (input 'i') must be a constant" in msg
    msg = _import_error([helper.make_node("Gather", ["x", "i"], ["y"], axis=1)], [x], ["y"],
                        inits=[("i", np.array([8], np.int64))])
    assert "index 8 is out of range for axis 1 of size 8 ([-8, 7])" in msg
    msg = _import_error([helper.make_node("DepthToSpace", ["x"], ["y"], blocksize=2, mode="XYZ")], [x], ["y"])
    assert "DepthToSpace mode 'XYZ' is unknown" in msg
    msg = _import_error([helper.make_node("DepthToSpace", ["x"], ["y"], blocksize=3)], [x], ["y"])
    assert "8 channels do not divide into blocks of 3x3" in msg
    msg = _import_error([helper.make_node("SpaceToDepth", ["x"], ["y"], blocksize=2)], [("x", X4[:, :, :, :3])],
                        ["y"])
    assert "must be multiples of blocksize 2" in msg
    msg = _import_error([helper.make_node("Tile", ["x", "r"], ["y"])], [x], ["y"], inits=[("r", np.array([1, 2]))])
    assert "one entry per axis" in msg
    msg = _import_error([helper.make_node("Einsum", ["x"], ["y"], equation="nchw->nq")], [x], ["y"], opset=12)
    assert "output 'nq' must name distinct labels of the operands (equation 'nchw->nq')" in msg
    msg = _import_error([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT16)], [x], ["y"])
    assert "target type float16 is not supported at run time" in msg


def test_to_onnx_against_ort():
    """cast, where and take export as Cast, Where (after a Cast of the mask
    to bool) and Gather; the composites as their reshapes, transposes,
    expands and matmuls: ONNX Runtime on the exported model matches convc's
    reference (in range: ONNX leaves out-of-range float -> int undefined)."""
    import onnxruntime as ort
    g = cc.Graph("export_tensor_ops")
    x, i = g.input("x", (2, 8, 4, 6)), g.input("i", (5,), "int64")
    outs = dict(take=take(x, [[1, -1], [0, 3]], 1), cast=cast(x, "int32"), cast_i=cast(i, "float32"),
                where=where(np.arange(6) % 2 == 0, x, 1.5), d2s=depth_to_space(x, 2, "CRD"),
                s2d=space_to_depth(x, 2), tile=tile(x, (1, 1, 2, 1)), einsum=einsum("nchw,nchw->nc", x, x))
    for k, v in outs.items():
        g.output(v, k)
    feeds = {"x": (RNG.standard_normal((2, 8, 4, 6)) * 10).astype(np.float32), "i": np.arange(5) - 2}
    want = cc.compile(g, target="numpy").run(feeds)
    model = cc.to_onnx(g)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(list(outs), feeds)
    for k, v in zip(outs, got):
        assert v.dtype == want[k].dtype, f"{k}: ORT dtype {v.dtype}, convc {want[k].dtype}"
        assert_close(v, want[k], rtol=1e-5, atol=1e-4, what=f"exported {k}")


# -- the onnx package's node cases ---------------------------------------------------------------------
MY_OPS = ("DepthToSpace", "SpaceToDepth", "Tile", "Gather", "Where", "Einsum", "Cast", "CastLike")


@pytest.mark.skipif(os.environ.get("CONVC_LONG_TESTS", "") in ("", "0"), reason="CONVC_LONG_TESTS=1 runs them")
@pytest.mark.parametrize("target", TARGETS[1:])
def test_node_cases(target):
    """Every node case of these ops passes, or fails for a reason that names
    a type convc does not compute in (float16, bfloat16, float8, float4,
    the 2- and 4-bit integers) or an empty tensor (CastLike's expanded cases
    take an empty ``like`` input). Expected outputs the suite stores as
    TensorProtos are read as arrays here (conformance.run_case does so for
    the inputs only)."""
    from convc.onnx.conformance import outcome, select_cases
    failures = []
    for case in select_cases(MY_OPS):
        data = [([numpy_helper.to_array(a) if isinstance(a, onnx.TensorProto) else a for a in i],
                 [numpy_helper.to_array(a) if isinstance(a, onnx.TensorProto) else a for a in o])
                for i, o in case.data_sets]
        case = copy.copy(case)
        case.data_sets = data
        ok, why = outcome(case, target)
        if not ok and not any(s in why for s in ("float16", "bfloat16", "float8", "float4", "int4", "int2",
                                                 "uint4", "uint2", "empty dimension")):
            failures.append(f"{case.name}: {why}")
    assert not failures, "\n".join(failures)

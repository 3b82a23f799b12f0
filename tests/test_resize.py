"""``resize`` (nearest and linear interpolation, convc/ops/resize.py) and its
gradient ``resize_grad``:

* against ``torch.nn.functional.interpolate`` in 1D/2D/3D, with sizes and
  scale factors, up and down, on every target (all cases are outputs of one
  graph per dtype, compiled once per target);
* gradients in float64 against central finite differences and torch autograd;
* ONNX: ``Resize`` for every coordinate transform and nearest mode against
  ``onnx.reference``, opsets 11/13/18/19, ``Resize``-10 and ``Upsample``
  against ONNX Runtime, the onnx package's own Resize/Upsample node tests,
  export round trips, and models exported by ``torch.onnx.export``;
* bad attributes and unsupported ONNX attributes as clear ConvcErrors.
"""
from __future__ import annotations

import io
import re
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import convc as cc
from helpers import TARGETS, assert_close
from convc.ops.resize import axis_adjoint, axis_matrix, axis_taps

RNG_SEED = 31


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=1e-12, atol=1e-12)


# -- forward against torch ------------------------------------------------------------------
CASES = [  # (id, x shape, cc.resize / F.interpolate keyword arguments, dtype)
    ("nearest_1d_up_x2", (2, 3, 5), dict(scale_factor=2, mode="nearest"), "float32"),
    ("nearest_1d_size_up", (1, 2, 7), dict(size=10, mode="nearest"), "float32"),
    ("nearest_1d_size_down", (1, 2, 11), dict(size=4, mode="nearest"), "float32"),
    ("nearest_2d_scale_1p5", (2, 2, 4, 6), dict(scale_factor=1.5, mode="nearest"), "float32"),
    ("nearest_2d_scale_down", (1, 3, 9, 10), dict(scale_factor=(0.5, 0.7), mode="nearest"), "float32"),
    ("nearest_2d_sizes_mixed", (2, 1, 5, 7), dict(size=(3, 11), mode="nearest"), "float32"),
    ("nearest_2d_size_1", (1, 2, 6, 5), dict(size=(1, 2), mode="nearest"), "float32"),
    ("nearest_3d", (1, 2, 3, 4, 5), dict(size=(5, 3, 8), mode="nearest"), "float32"),
    ("nearest_3d_scale", (1, 1, 2, 3, 4), dict(scale_factor=(2, 1.5, 0.5), mode="nearest"), "float64"),
    ("nearest_exact_2d", (1, 2, 5, 7), dict(size=(8, 4), mode="nearest-exact"), "float32"),
    ("nearest_exact_1d_scale", (1, 2, 9), dict(scale_factor=0.45, mode="nearest-exact"), "float32"),
    ("linear_1d_up", (2, 3, 6), dict(scale_factor=2.5, mode="linear", align_corners=False), "float32"),
    ("linear_1d_corners", (1, 2, 6), dict(size=13, mode="linear", align_corners=True), "float32"),
    ("linear_1d_down", (1, 2, 11), dict(size=4, mode="linear"), "float32"),
    ("linear_1d_in_1", (1, 2, 1), dict(size=5, mode="linear", align_corners=True), "float32"),
    ("bilinear_up_x2", (2, 3, 5, 7), dict(scale_factor=2, mode="bilinear", align_corners=False), "float32"),
    ("bilinear_up_corners", (2, 3, 5, 7), dict(scale_factor=2, mode="bilinear", align_corners=True), "float32"),
    ("bilinear_sizes", (1, 2, 4, 6), dict(size=(7, 9), mode="bilinear"), "float32"),
    ("bilinear_sizes_corners", (1, 2, 4, 6), dict(size=(7, 9), mode="bilinear", align_corners=True), "float32"),
    ("bilinear_down", (1, 2, 12, 9), dict(size=(5, 4), mode="bilinear", align_corners=False), "float32"),
    ("bilinear_down_scale", (1, 2, 12, 9), dict(scale_factor=(0.4, 0.75), mode="bilinear"), "float32"),
    ("bilinear_down_corners", (1, 2, 12, 9), dict(size=(5, 4), mode="bilinear", align_corners=True), "float32"),
    ("bilinear_mixed_f64", (2, 2, 5, 8), dict(size=(9, 3), mode="bilinear"), "float64"),
    ("bilinear_out_1", (1, 1, 5, 6), dict(size=(1, 3), mode="bilinear"), "float32"),
    ("bilinear_out_1_corners", (1, 1, 5, 6), dict(size=(1, 3), mode="bilinear", align_corners=True), "float32"),
    ("bilinear_recompute", (1, 2, 5, 7), dict(scale_factor=1.7, mode="bilinear", recompute_scale_factor=True),
     "float32"),
    ("bilinear_big", (1, 3, 32, 40), dict(scale_factor=2, mode="bilinear"), "float32"),
    ("trilinear_up", (1, 2, 3, 4, 5), dict(scale_factor=2, mode="trilinear", align_corners=False), "float32"),
    ("trilinear_corners", (1, 2, 3, 4, 5), dict(size=(5, 7, 4), mode="trilinear", align_corners=True), "float32"),
    ("trilinear_down_f64", (2, 1, 6, 5, 7), dict(scale_factor=(0.5, 0.8, 1.3), mode="trilinear"), "float64"),
]


def build_case(xv, kw, name):
    return cc.resize(xv, **kw, name=name)


def torch_resize(a, kw):
    return F.interpolate(torch.from_numpy(a), **kw).numpy()


@pytest.fixture(scope="module")
def forward_results():
    graphs, feeds, arrays = {}, {}, {}
    for i, (cid, shape, kw, dtype) in enumerate(CASES):
        g = graphs.setdefault(dtype, cc.Graph(f"resize_{dtype}"))
        a = np.random.default_rng([RNG_SEED, i]).standard_normal(shape).astype(dtype)
        xv = g.input(f"x_{cid}", shape, dtype)
        feeds.setdefault(dtype, {})[xv.name] = a
        g.output(build_case(xv, kw, cid), f"y_{cid}")
        arrays[cid] = a
    results = {t: {} for t in TARGETS}
    for dtype, g in graphs.items():
        for t in TARGETS:
            results[t].update(cc.compile(g, target=t).run(feeds[dtype]))
    return arrays, results


@pytest.mark.parametrize("cid, shape, kw, dtype", CASES, ids=[c[0] for c in CASES])
def test_resize_matches_torch(forward_results, cid, shape, kw, dtype):
    arrays, results = forward_results
    want = torch_resize(arrays[cid], kw)
    for t in TARGETS:
        got = results[t][f"y_{cid}"]
        assert got.dtype == np.dtype(dtype), f"{cid} [{t}]: dtype {got.dtype}"
        if kw["mode"].startswith("nearest"):
            np.testing.assert_array_equal(got, want, err_msg=f"{cid} [{t}]")    # a copy: exact
        else:
            assert_close(got, want, what=f"{cid} [{t}]", **_tol(dtype))


def test_cases_cover_the_brief():
    modes = {(kw["mode"], len(shape) - 2) for _, shape, kw, _ in CASES}
    assert {("nearest", 1), ("nearest", 2), ("nearest", 3), ("linear", 1), ("bilinear", 2),
            ("trilinear", 3)} <= modes
    for mode in ("nearest", "bilinear", "trilinear", "linear"):
        picked = [(kw, s) for _, s, kw, _ in CASES if kw["mode"] == mode]
        assert any("size" in kw for kw, _ in picked) and any("scale_factor" in kw for kw, _ in picked), mode
        outs = [torch_resize(np.zeros(s, np.float32), kw).shape[2:] for kw, s in picked]
        assert any(o > i for (_, s), out in zip(picked, outs) for i, o in zip(s[2:], out)), f"{mode}: no upsampling"
        assert any(o < i for (_, s), out in zip(picked, outs) for i, o in zip(s[2:], out)), f"{mode}: no downsampling"
    assert {kw.get("align_corners") for _, _, kw, _ in CASES if kw["mode"] == "bilinear"} >= {True, False}


def test_nearest_keeps_every_value_exactly():
    """A nearest resize copies: inf, nan and -0.0 come through as they are,
    on every target (linear reads only the two neighbours it needs)."""
    a = np.array([[[1.0, -0.0, np.inf, np.nan, -np.inf, 2.5]]], np.float32)
    g = cc.Graph("resize_special")
    x = g.input("x", a.shape)
    g.output(cc.resize(x, size=12, mode="nearest"), "near")
    g.output(cc.resize(x, size=3, mode="linear", align_corners=True), "lin")   # reads 0, 2.5 and 5
    want = np.repeat(a, 2, axis=2)
    for t in TARGETS:
        r = cc.compile(g, target=t).run({"x": a})
        np.testing.assert_array_equal(r["near"], want, err_msg=t)
        assert np.array_equal(np.signbit(r["near"]), np.signbit(want)), f"{t}: the sign of -0.0 is lost"
        lin = torch_resize(a, dict(size=3, mode="linear", align_corners=True))
        np.testing.assert_array_equal(r["lin"], lin, err_msg=t)


def test_ir_shows_canonical_attributes_and_cost():
    g = cc.Graph("resize_ir")
    x = g.input("x", (1, 3, 8, 8))
    y = cc.resize(x, scale_factor=2, mode="bilinear", align_corners=True, name="up")
    z = cc.resize(x, size=(4, 4), name="down")
    g.output(y, "y")
    g.output(z, "z")
    text = str(g)
    assert ("%up = resize(%x, size=(16,16), scale=(2.0,2.0), mode=linear, "
            "coordinate_transformation_mode=align_corners, nearest_mode=None) : float32[1,3,16,16]") in text, text
    assert "mode=nearest, coordinate_transformation_mode=asymmetric, nearest_mode=floor" in text
    g.verify()                                  # canonical attributes normalise to themselves
    rep = cc.cost(g)
    assert rep.macs == 3 * 16 * 16 * 4          # four taps per bilinear output, nearest copies


def test_generated_c_builds_clean_with_warnings_as_errors(tmp_path):
    import subprocess
    from convc.codegen import c as cgen
    from convc.runtime.build import compiler
    g = cc.Graph("resize_strict")
    for shape, kw in (((1, 2, 5), dict(size=9, mode="linear")), ((1, 2, 4, 6), dict(scale_factor=1.5)),
                      ((1, 1, 3, 4, 5), dict(size=(2, 7, 5), mode="trilinear", align_corners=True))):
        x = g.input(f"x{len(shape)}", shape, "float64")
        y = cc.resize(x, **kw)
        g.output(y, f"y{len(shape)}")
        g.output(cc.grad(y, x, grad_output=g.input(f"g{len(shape)}", y.shape, "float64")), f"dx{len(shape)}")
    path = tmp_path / "resize.c"
    path.write_text(cgen.generate(g).text)
    flags = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-fopenmp", "-fsyntax-only"]
    r = subprocess.run([compiler(), *flags, str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_opencl_tables_are_constant_memory():
    g = cc.Graph("resize_cl")
    x = g.input("x", (1, 1, 4, 4))
    g.output(cc.resize(x, scale_factor=2, mode="bilinear"), "y")
    g.output(cc.grad(cc.mse_loss(cc.resize(x, size=(3, 5), mode="bilinear"), g.input("t", (1, 1, 3, 5))), x),
             "dx")
    from convc.codegen import opencl
    src = opencl.generate(g).kernels
    assert re.search(r"^__constant int node_\w+_src_y\[8\]\[2\] = \{", src, re.M), src
    assert re.search(r"^__constant float node_\w+_w_x\[\d+\] = \{", src, re.M), src      # resize_grad's
    assert "static const" not in src


# -- gradients ----------------------------------------------------------------------------
GRAD_CASES = [  # (id, x shape, kwargs)
    ("nearest_1d_up", (2, 2, 5), dict(scale_factor=2.5, mode="nearest")),
    ("nearest_2d_down", (1, 2, 9, 7), dict(size=(4, 3), mode="nearest")),
    ("nearest_exact_2d", (1, 2, 5, 6), dict(size=(7, 4), mode="nearest-exact")),
    ("linear_1d_corners", (2, 1, 6), dict(size=11, mode="linear", align_corners=True)),
    ("bilinear_up", (1, 2, 4, 5), dict(scale_factor=2, mode="bilinear")),
    ("bilinear_down", (1, 2, 9, 8), dict(size=(4, 3), mode="bilinear", align_corners=False)),
    ("bilinear_corners_mixed", (2, 1, 5, 7), dict(size=(8, 3), mode="bilinear", align_corners=True)),
    ("trilinear", (1, 2, 3, 4, 3), dict(scale_factor=(2, 1.5, 0.7), mode="trilinear")),
    ("nearest_3d", (1, 1, 3, 4, 5), dict(size=(4, 2, 7), mode="nearest")),
]


@pytest.fixture(scope="module")
def grad_results():
    g = cc.Graph("resize_grads")
    feeds, arrays = {}, {}
    for i, (cid, shape, kw) in enumerate(GRAD_CASES):
        rng = np.random.default_rng([RNG_SEED, 100 + i])
        a = rng.standard_normal(shape)
        x = g.input(f"x_{cid}", shape, "float64")
        y = cc.resize(x, **kw)
        G = rng.standard_normal(y.shape)
        gv = g.input(f"g_{cid}", y.shape, "float64")
        g.output(cc.grad(y, x, grad_output=gv), f"dx_{cid}")
        feeds.update({x.name: a, gv.name: G})
        arrays[cid] = (a, G)
    return arrays, {t: cc.compile(g, target=t).run(feeds) for t in TARGETS}


def _fd_grad(a, G, kw, eps=1e-6):
    """d(sum(G * resize(x)))/dx by central differences on convc's reference."""
    g = cc.Graph("resize_fd")
    x = g.input("x", a.shape, "float64")
    g.output(cc.resize(x, **kw), "y")
    mod = cc.compile(g, target="numpy")
    d = np.zeros_like(a)
    for i in np.ndindex(*a.shape):
        hi, lo = a.copy(), a.copy()
        hi[i] += eps
        lo[i] -= eps
        d[i] = ((mod(x=hi) - mod(x=lo)) * G).sum() / (2 * eps)
    return d


@pytest.mark.parametrize("cid, shape, kw", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_resize_gradient(grad_results, cid, shape, kw):
    arrays, results = grad_results
    a, G = arrays[cid]
    tx = torch.from_numpy(a.copy()).requires_grad_(True)
    F.interpolate(tx, **kw).backward(torch.from_numpy(G))
    want = tx.grad.numpy()
    fd = _fd_grad(a, G, kw)
    assert_close(want, fd, rtol=1e-6, atol=1e-7, what=f"{cid}: torch vs finite differences")
    for t in TARGETS:
        assert_close(results[t][f"dx_{cid}"], want, rtol=1e-10, atol=1e-12, what=f"{cid} [{t}] vs torch autograd")


def test_resize_grad_is_the_adjoint_and_differentiates():
    """<resize(x), g> == <x, resize_grad(g)>, and the gradient of resize_grad
    (w.r.t. its output gradient) is the resize again."""
    rng = np.random.default_rng(5)
    g = cc.Graph("resize_adjoint")
    x = g.input("x", (1, 2, 5, 6), "float64")
    gy = g.input("gy", (1, 2, 8, 4), "float64")
    h = g.input("h", (1, 2, 5, 6), "float64")
    y = cc.resize(x, size=(8, 4), mode="bilinear", align_corners=True)
    dx = cc.grad(y, x, grad_output=gy)
    assert g.node(dx.name)["op"] == "resize_grad"
    g.output(y, "y")
    g.output(dx, "dx")
    g.output(cc.grad(dx, gy, grad_output=h), "ddx")
    feeds = {"x": rng.standard_normal((1, 2, 5, 6)), "gy": rng.standard_normal((1, 2, 8, 4)),
             "h": rng.standard_normal((1, 2, 5, 6))}
    for t in TARGETS:
        r = cc.compile(g, target=t).run(feeds)
        np.testing.assert_allclose((r["y"] * feeds["gy"]).sum(), (feeds["x"] * r["dx"]).sum(), rtol=1e-12)
        want = torch_resize(feeds["h"], dict(size=(8, 4), mode="bilinear", align_corners=True))
        assert_close(r["ddx"], want, rtol=1e-12, atol=1e-12, what=f"d resize_grad [{t}]")


def test_adjoint_tables_transpose_the_taps():
    for args in [(5, 8, 1.6, "linear", "half_pixel", None), (9, 4, 4 / 9, "nearest", "asymmetric", "floor"),
                 (4, 11, 2.75, "linear", "align_corners", None), (7, 3, 0.5, "nearest", "half_pixel", "ceil")]:
        n_in, n_out = args[:2]
        src, w = axis_taps(*args)
        m = axis_matrix(*args)
        assert all(m[o, i] > 0 for o, (ss, ww) in enumerate(zip(src, w)) for i, v in zip(ss, ww) if v)
        first, outs, weights = axis_adjoint(*args)
        mt = np.zeros((n_in, n_out))
        for i in range(n_in):
            for p in range(first[i], first[i + 1]):
                mt[i, outs[p]] += weights[p]
        np.testing.assert_array_equal(mt, m.T, err_msg=str(args))
        assert np.allclose(m.sum(axis=1), 1), "every output's weights sum to 1"


# -- ONNX import --------------------------------------------------------------------------------
def _model(nodes, inputs, outputs, opset, initializers=()):
    g = helper.make_graph(nodes, "resize_model",
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
                          list(initializers))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _f32(name, values):
    return numpy_helper.from_array(np.array(values, np.float32), name)


def _i64(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _run_convc(model, feeds, targets=None, constants=None):
    g = cc.from_onnx(model, constants=constants)
    return {t: cc.compile(g, target=t).run(feeds) for t in (targets or TARGETS)}


def _check_against(want: dict, got_by_target: dict, exact_outputs=(), tol=1e-5):
    for t, got in got_by_target.items():
        assert set(got) == set(want), f"[{t}] outputs {sorted(got)} != {sorted(want)}"
        for k, w in want.items():
            if k in exact_outputs:
                np.testing.assert_array_equal(got[k], w, err_msg=f"{k} [{t}]")
            else:
                assert_close(got[k], w, rtol=tol, atol=tol, what=f"{k} [{t}]")


CTMS = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric")
NEAREST = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


@pytest.mark.parametrize("opset", [11, 13, 18, 19])
def test_onnx_resize_every_mode_against_reference(opset):
    """One model, a Resize node per (mode, coordinate transform, nearest
    mode, scales or sizes), all against onnx.reference."""
    shape = (2, 3, 4, 6)          # the scales make whole sizes (see the next test for the others)
    nodes, outputs, inits, exact = [], [], [], set()
    roi = "" if opset >= 13 else "roi"
    if roi:
        inits.append(_f32("roi", []))
    for how, values in (("up_scales", [1, 1, 1.75, 2.5]), ("down_scales", [1, 1, 0.75, 0.5]),
                        ("up_sizes", [2, 3, 8, 9]), ("down_sizes", [2, 3, 3, 4]), ("one_sizes", [2, 3, 1, 4])):
        arg = f"{how}_arg"
        inits.append(_f32(arg, values) if how.endswith("scales") else _i64(arg, values))
        ins = ["x", roi, arg] if how.endswith("scales") else ["x", roi, "", arg]
        if how.endswith("sizes") and opset < 13:
            inits.append(_f32(f"{how}_empty", []))
            ins = ["x", roi, f"{how}_empty", arg]          # opset 11: scales must be an (empty) input
        for ctm in CTMS:
            for nm in NEAREST:
                out = f"nearest_{ctm}_{nm}_{how}"
                nodes.append(helper.make_node("Resize", ins, [out], mode="nearest", coordinate_transformation_mode=ctm,
                                              nearest_mode=nm))
                outputs.append(out)
                exact.add(out)
            out = f"linear_{ctm}_{how}"
            nodes.append(helper.make_node("Resize", ins, [out], mode="linear", coordinate_transformation_mode=ctm))
            outputs.append(out)
    out = "nearest_defaults"                  # half_pixel + round_prefer_floor
    nodes.append(helper.make_node("Resize", ["x", roi, "up_scales_arg"], [out]))
    outputs.append(out)
    exact.add(out)
    model = _model(nodes, [("x", shape)], outputs, opset, inits)
    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    ref = ReferenceEvaluator(model).run(None, {"x": x})
    _check_against(dict(zip(outputs, ref)), _run_convc(model, {"x": x}), exact)


def test_onnx_align_corners_uses_the_whole_output_length():
    """When input * scale is not whole, ONNX's formula divides by the length
    of the output (an integer, as ONNX Runtime and PyTorch do);
    onnx.reference divides by the fractional input * scale instead."""
    x = np.random.default_rng(6).standard_normal((1, 2, 5, 6)).astype(np.float32)
    nodes = [helper.make_node("Resize", ["x", "", "s"], ["near"], mode="nearest", nearest_mode="floor",
                              coordinate_transformation_mode="align_corners"),
             helper.make_node("Resize", ["x", "", "s"], ["lin"], mode="linear",
                              coordinate_transformation_mode="align_corners")]
    model = _model(nodes, [("x", x.shape)], ["near", "lin"], 13, [_f32("s", [1, 1, 1.6, 0.7])])
    want = _ort(model, {"x": x})
    _check_against(want, _run_convc(model, {"x": x}), {"near"})
    corners = torch_resize(x, dict(size=(8, 4), mode="bilinear", align_corners=True))
    assert_close(want["lin"], corners, what="ONNX Runtime vs torch")


def test_onnx_resize_axes_1d_3d_and_exclude_outside():
    nodes = [helper.make_node("Resize", ["x3", "", "s3"], ["y3"], mode="linear"),
             helper.make_node("Resize", ["x1", "", "s1"], ["y1"], mode="linear",
                              coordinate_transformation_mode="asymmetric", exclude_outside=1),
             helper.make_node("Resize", ["x1", "", "", "z1"], ["n1"], mode="nearest", nearest_mode="ceil"),
             helper.make_node("Resize", ["x", "", "sa"], ["ya"], mode="nearest", axes=[3, 2]),
             helper.make_node("Resize", ["x", "", "", "za"], ["za_out"], mode="linear", axes=[3])]
    inits = [_f32("s3", [1, 1, 2, 0.5, 1.5]), _f32("s1", [1, 1, 2.5]), _i64("z1", [1, 2, 4]),
             _f32("sa", [2, 1.5]), _i64("za", [11])]
    inputs = [("x3", (1, 2, 3, 6, 4)), ("x1", (1, 2, 7)), ("x", (1, 2, 4, 5))]
    model = _model(nodes, inputs, ["y3", "y1", "n1", "ya", "za_out"], 18, inits)
    rng = np.random.default_rng(8)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in inputs}
    ref = ReferenceEvaluator(model).run(None, feeds)
    _check_against(dict(zip(["y3", "y1", "n1", "ya", "za_out"], ref)), _run_convc(model, feeds), {"n1", "ya"})


def _ort(model, feeds):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def test_onnx_resize10_and_upsample_against_onnxruntime():
    """Resize-10 and Upsample (7: scales attribute, 9: scales input):
    asymmetric coordinates; nearest rounds down along a growing axis and up
    along a shrinking one, as ONNX Runtime does."""
    x = np.random.default_rng(9).standard_normal((1, 2, 7, 10)).astype(np.float32)
    r10 = _model([helper.make_node("Resize", ["x", "s_mixed"], ["near_mixed"], mode="nearest"),
                  helper.make_node("Resize", ["x", "s_down"], ["near_down"], mode="nearest"),
                  helper.make_node("Resize", ["x", "s_mixed"], ["lin_mixed"], mode="linear"),
                  helper.make_node("Resize", ["x", "s_up"], ["lin_up"], mode="linear")],
                 [("x", x.shape)], ["near_mixed", "near_down", "lin_mixed", "lin_up"], 10,
                 [_f32("s_mixed", [1, 1, 1.5, 0.6]), _f32("s_down", [1, 1, 0.7, 0.45]), _f32("s_up", [1, 1, 2, 1.7])])
    up9 = _model([helper.make_node("Upsample", ["x", "s"], ["near"], mode="nearest"),
                  helper.make_node("Upsample", ["x", "s"], ["lin"], mode="linear")],
                 [("x", x.shape)], ["near", "lin"], 9, [_f32("s", [1, 1, 2.5, 1.5])])
    up7 = _model([helper.make_node("Upsample", ["x"], ["near"], mode="nearest", scales=[1.0, 1.0, 3.0, 2.0]),
                  helper.make_node("Upsample", ["x"], ["lin"], mode="linear", scales=[1.0, 1.0, 1.5, 1.0])],
                 [("x", x.shape)], ["near", "lin"], 7)
    for model in (r10, up9, up7):
        want = _ort(model, {"x": x})
        _check_against(want, _run_convc(model, {"x": x}), {k for k in want if k.startswith("near")})
    g = cc.from_onnx(r10)
    assert [g.node(n)["attrs"]["nearest_mode"] for n in g.topological_order() if n.startswith("near_mixed")] \
        == ["ceil", "floor"], "the mixed Resize-10 is a rounding-up downsample and a rounding-down upsample"


def test_onnx_upsample_nearest_against_reference():
    x = np.random.default_rng(10).standard_normal((1, 2, 3, 4)).astype(np.float32)
    model = _model([helper.make_node("Upsample", ["x", "s"], ["y"], mode="nearest")], [("x", x.shape)], ["y"], 9,
                   [_f32("s", [1, 1, 2, 3])])
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    _check_against({"y": want}, _run_convc(model, {"x": x}), {"y"})


# The onnx package's node tests for Resize and Upsample: what convc cannot
# take must fail with the reason given here.
UNSUPPORTED_NODE_TESTS = [
    (r"cubic", r"mode 'cubic' is not supported"),
    (r"tf_crop_and_resize", r"'tf_crop_and_resize' \(a crop given by roi\) is not supported"),
    (r"antialias", r"antialias=1 is not supported|mode 'cubic'"),
    (r"not_larger|not_smaller", r"keep_aspect_ratio_policy '(not_larger|not_smaller)' is not supported"),
    (r"half_pixel_symmetric", r"coordinate_transformation_mode 'half_pixel_symmetric' is not supported"),
]


def _node_tests():
    from onnx.backend.test.case.node import collect_testcases
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases(None)
    return sorted((c for c in cases if c.kind == "node" and c.model.graph.node
                   and all(n.op_type in ("Resize", "Upsample") for n in c.model.graph.node)), key=lambda c: c.name)


NODE_TESTS = {c.name: c for c in _node_tests()}

# Node tests whose expected output follows onnx.reference where it departs
# from ONNX's formula (and from ONNX Runtime and PyTorch): convc matches
# ONNX Runtime there instead.
DEPARTS = {"test_resize_downsample_scales_linear_align_corners":
           "align_corners divides by the fractional input * scale (2.4), not the output length (2)"}


@pytest.mark.parametrize("name", sorted(NODE_TESTS))
def test_onnx_node_test(name):
    from convc.onnx.conformance import run_case, static_bindings
    expected = next((why for pattern, why in UNSUPPORTED_NODE_TESTS if re.search(pattern, name)), None)
    if name in DEPARTS:
        case = NODE_TESTS[name]
        with pytest.raises(AssertionError):
            run_case(case, "c")
        inputs, _ = case.data_sets[0]
        constants, feeds = static_bindings(case.model, inputs)
        want = _ort(case.model, dict(constants, **feeds))
        _check_against(want, _run_convc(case.model, feeds, ["c"], constants))
        return
    if expected is None:
        run_case(NODE_TESTS[name], "c")
        return
    with pytest.raises(cc.ConvcError) as e:
        run_case(NODE_TESTS[name], "c")
    assert re.search(expected, str(e.value)), str(e.value)


def test_node_tests_mostly_pass():
    supported = [n for n in NODE_TESTS if not any(re.search(p, n) for p, _ in UNSUPPORTED_NODE_TESTS)]
    assert len(NODE_TESTS) >= 30 and len(supported) >= 15, (len(NODE_TESTS), supported)


@pytest.mark.parametrize("attrs, extra, words", [
    (dict(mode="cubic"), {}, "mode 'cubic' is not supported"),
    (dict(mode="area"), {}, "mode 'area' is unknown"),
    (dict(mode="linear", coordinate_transformation_mode="tf_crop_and_resize"), {}, "tf_crop_and_resize"),
    (dict(mode="nearest", coordinate_transformation_mode="tf_half_pixel_for_nn"), {},
     "coordinate_transformation_mode 'tf_half_pixel_for_nn' is not supported"),
    (dict(mode="linear", antialias=1), {}, "antialias=1 is not supported"),
    (dict(mode="nearest", exclude_outside=1), {}, "exclude_outside=1 is supported with mode 'linear' only"),
    (dict(mode="nearest"), dict(scales=[2, 1, 2, 2]), "resize the batch or channel axis"),
    (dict(mode="nearest"), dict(scales=[1, 1, 2]), "3 entries for an input of rank 4"),
    (dict(mode="nearest"), dict(scales=[1, 1, 0.1, 1]), "every size must be >= 1"),
    (dict(mode="nearest", keep_aspect_ratio_policy="not_larger"), dict(sizes=[1, 2, 6, 6]),
     "keep_aspect_ratio_policy 'not_larger' is not supported"),
    (dict(mode="nearest"), dict(both=True), "exactly one of scales and sizes"),
], ids=["cubic", "unknown_mode", "tf_crop", "tf_half_pixel_for_nn", "antialias", "exclude_outside_nearest",
        "batch_scale", "short_scales", "empty_output", "aspect_policy", "scales_and_sizes"])
def test_onnx_resize_unsupported(attrs, extra, words):
    inits, ins = [], ["x", ""]
    if "sizes" in extra or extra.get("both"):
        inits += [_i64("z", extra.get("sizes", [1, 2, 8, 8]))]
        ins += ["s" if extra.get("both") else "", "z"]
    if "sizes" not in extra:
        inits += [_f32("s", extra.get("scales", [1, 1, 2, 2]))]
        ins = ins[:2] + ["s"] + ins[3:]
    model = _model([helper.make_node("Resize", ins, ["y"], name="rs", **attrs)], [("x", (1, 2, 4, 4))], ["y"], 18,
                   inits)
    with pytest.raises(cc.ConvcError) as e:
        cc.from_onnx(model)
    msg = str(e.value)
    assert "Resize 'rs'" in msg and words in msg, msg


# -- ONNX export ----------------------------------------------------------------------------
def test_export_round_trip():
    g = cc.Graph("resize_export")
    x = g.input("x", (1, 2, 5, 6))
    x1 = g.input("x1", (2, 3, 7))
    x3 = g.input("x3", (1, 1, 3, 4, 5))
    outs = {
        "near": cc.resize(x, scale_factor=2),
        "near_sizes": cc.resize(x, size=(3, 11)),
        "near_exact": cc.resize(x, size=(8, 4), mode="nearest-exact"),
        "near_onnx": cc.resize(x, scale_factor=(1.6, 0.5), coordinate_transformation_mode="pytorch_half_pixel",
                               nearest_mode="round_prefer_floor"),
        "bilinear": cc.resize(x, scale_factor=2.5, mode="bilinear"),
        "bilinear_corners": cc.resize(x, size=(9, 4), mode="bilinear", align_corners=True),
        "linear_1d": cc.resize(x1, scale_factor=0.6, mode="linear"),
        "trilinear": cc.resize(x3, scale_factor=(2, 1.5, 0.8), mode="trilinear", align_corners=False),
        "asym": cc.resize(x, size=(7, 7), mode="linear", coordinate_transformation_mode="asymmetric"),
    }
    for k, v in outs.items():
        g.output(v, k)
    rng = np.random.default_rng(11)
    feeds = {n: rng.standard_normal(g.node(n)["type"].shape).astype(np.float32) for n in ("x", "x1", "x3")}
    want = cc.compile(g, target="numpy").run(feeds)
    model = cc.to_onnx(g)
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node if n.op_type != "Identity"] == ["Resize"] * len(outs)
    ref = ReferenceEvaluator(model).run(None, feeds)
    exact = {k for k in outs if k.startswith("near")}
    _check_against(want, {"onnx.reference": dict(zip([o.name for o in model.graph.output], ref))}, exact)
    back = cc.from_onnx(model)
    def resizes(graph):         # canonical attributes, scales as float32 (what ONNX's scales hold)
        return sorted(repr(dict(graph.node(n)["attrs"], scale=tuple(np.float32(graph.node(n)["attrs"]["scale"]))))
                      for n in graph.topological_order() if graph.node(n)["op"] == "resize")
    assert resizes(back) == resizes(g), "the same canonical attributes come back"
    _check_against(want, {t: cc.compile(back, target=t).run(feeds) for t in ("c",)}, exact)


def test_export_rejects_a_scale_float32_cannot_carry():
    g = cc.Graph("resize_bad_export")
    x = g.input("x", (1, 1, 10))
    g.output(cc.resize(x, scale_factor=1 / 3, name="third"), "y")   # 3 outputs, read at 0, 3, 6 (not 3/10)
    with pytest.raises(cc.ConvcError, match=r"node %third \(resize\).*float32"):
        cc.to_onnx(g)


# -- torch.onnx.export ----------------------------------------------------------------------------
class Interp(torch.nn.Module):
    def forward(self, x):
        a = F.interpolate(x, scale_factor=2, mode="nearest")
        b = F.interpolate(x, size=(7, 9), mode="bilinear", align_corners=False)
        c = F.interpolate(x, scale_factor=1.5, mode="bilinear", align_corners=True)
        return a, b, c


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_torch_onnx_export(dynamo):
    x = torch.from_numpy(np.random.default_rng(12).standard_normal((1, 3, 5, 6)).astype(np.float32))
    buf = io.BytesIO() if not dynamo else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            prog = torch.onnx.export(Interp().eval(), (x,), buf, input_names=["x"], output_names=["a", "b", "c"],
                                     dynamo=dynamo, opset_version=17 if not dynamo else 18)
        except Exception as e:      # noqa: BLE001 -- an exporter this torch lacks
            pytest.skip(f"torch.onnx.export(dynamo={dynamo}) fails here: {type(e).__name__}: {e}")
    model = onnx.load_from_string(buf.getvalue()) if not dynamo else prog.model_proto
    assert "Resize" in {n.op_type for n in model.graph.node}
    want = dict(zip("abc", (t.numpy() for t in Interp()(x))))
    g = cc.from_onnx(model)
    got = {t: cc.compile(g, target=t).run({"x": x.numpy()}) for t in TARGETS}
    _check_against(want, got, {"a"})


# -- validation --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, kw, words", [
    ((1, 2, 4, 4), dict(scale_factor=2, mode="bicubic"), ["mode 'bicubic' is not supported"]),
    ((1, 2, 4, 4), dict(scale_factor=2, mode="area"), ["mode 'area'"]),
    ((1, 2, 4), dict(scale_factor=2, mode="bilinear"), ["'bilinear' needs 2 spatial axes", "'linear'"]),
    ((1, 2, 4, 4), dict(scale_factor=2, mode="trilinear"), ["'trilinear' needs 3 spatial axes"]),
    ((1, 2, 4, 4), dict(size=0), ["size must be >= 1"]),
    ((1, 2, 4, 4), dict(size=(4, -2)), ["size must be >= 1"]),
    ((1, 2, 4, 4), dict(size=(4, 4, 4)), ["size must be an int or a tuple of 2 ints"]),
    ((1, 2, 4, 4), dict(size=2.5), ["size must be an int"]),
    ((1, 2, 4, 4), dict(scale_factor=0), ["scale_factor must be positive"]),
    ((1, 2, 4, 4), dict(scale_factor=(2, -1)), ["scale_factor must be positive"]),
    ((1, 2, 4, 4), dict(scale_factor=float("nan")), ["scale_factor must be positive and finite"]),
    ((1, 2, 4, 4), dict(scale_factor=(2, 2, 2)), ["scale_factor must be a number or a tuple of 2 numbers"]),
    ((1, 2, 4, 4), dict(scale_factor=0.1), ["every size must be >= 1"]),
    ((1, 2, 4, 4), dict(), ["exactly one of size and scale_factor"]),
    ((1, 2, 4, 4), dict(size=3, scale_factor=2), ["exactly one of size and scale_factor"]),
    ((1, 2, 4, 4), dict(size=3, align_corners=True), ["align_corners applies to the linear modes only"]),
    ((1, 2, 4, 4), dict(size=3, mode="bilinear", nearest_mode="floor"), ["nearest_mode", "'nearest' only"]),
    ((1, 2, 4, 4), dict(size=3, coordinate_transformation_mode="tf_crop_and_resize"),
     ["coordinate_transformation_mode must be one of half_pixel"]),
    ((1, 2, 4, 4), dict(size=3, nearest_mode="round"), ["nearest_mode must be one of"]),
    ((1, 2, 4, 4), dict(size=3, mode="bilinear", align_corners=True, coordinate_transformation_mode="asymmetric"),
     ["not both"]),
    ((1, 2, 4, 4), dict(size=3, mode="nearest-exact", nearest_mode="floor"), ["'nearest-exact'"]),
    ((8, 4), dict(size=3), ["rank 2"]),
    ((1, 1, 2, 2, 2, 2), dict(size=3), ["rank 6"]),
], ids=lambda v: None)
def test_bad_resize_is_a_clear_error(shape, kw, words):
    g = cc.Graph("resize_bad")
    x = g.input("x", shape)
    with pytest.raises(cc.ValidationError) as e:
        cc.resize(x, **kw, name="rbad")
    msg = str(e.value)
    assert "'rbad' (resize)" in msg and str(shape).replace(" ", "") in msg.replace(" ", ""), msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


def test_resize_rejects_int64():
    g = cc.Graph("resize_int")
    x = g.input("x", (1, 1, 4), "int64")
    with pytest.raises(cc.ValidationError, match="float32 or float64"):
        cc.resize(x, size=8)

"""Hostile ONNX files (issue 16, the ONNX parts of items 2, 8 and 11): each
must give a clear ``ConvcError`` naming what is wrong, quickly, without a
large allocation, a hang or a bare Python exception.

One test function per defect item; every import that could hang runs under
an alarm, so a regression fails the test instead of hanging the suite.
"""
from __future__ import annotations

import signal
import warnings
from contextlib import contextmanager

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import convc as cc
from convc import onnx as convc_onnx
from convc.onnx import validate as onnx_validate
from convc.onnx import OnnxImportError, from_onnx


@contextmanager
def time_limit(seconds: int = 20):
    """Fail (rather than hang) when the block runs longer than ``seconds``."""
    def expired(signum, frame):
        raise AssertionError(f"from_onnx ran longer than {seconds} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def model(nodes, inputs=(("x", (1, 2, 5, 5)),), outputs=("y",), inits=(), opset=17, ir_version=8):
    g = helper.make_graph(nodes, "hostile",
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
                          [numpy_helper.from_array(np.asarray(v), n) for n, v in inits])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir_version
    return m


def i64(*v):
    return np.array(v, np.int64)


def problems(m, **kw):
    """The (op, node, reason) list of the OnnxImportError importing ``m`` raises."""
    with time_limit(), pytest.raises(OnnxImportError) as e:
        from_onnx(m, **kw)
    return e.value.problems


# -- item 2: folding constants can neither hang nor allocate without bound -------------------
def _loop_model(trip_count):
    body = helper.make_graph(
        [helper.make_node("Add", ["acc_in", "one"], ["acc_out"]), helper.make_node("Constant", [], ["cond_out"], value=numpy_helper.from_array(np.array(True)))],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.ones(1, np.float32), "one")])
    nodes = [helper.make_node("Loop", ["M", "true", "acc0"], ["acc"], body=body, name="forever"),
             helper.make_node("Add", ["x", "acc"], ["y"])]
    return model(nodes, inits=[("M", i64(trip_count)), ("true", np.array(True)), ("acc0", np.zeros(1, np.float32))])


FOLDS = {   # name: (nodes, initializers); each folds to a tensor of >= 2**32 bytes
    "constant_of_shape": ([helper.make_node("ConstantOfShape", ["s"], ["k"], name="big")], [("s", i64(28000, 28000))]),
    "expand": ([helper.make_node("Expand", ["one", "s"], ["k"], name="big")],
               [("one", np.ones(1, np.float32)), ("s", i64(100000, 100000))]),
    "tile": ([helper.make_node("Tile", ["one", "r"], ["k"], name="big")],
             [("one", np.ones(4, np.float32)), ("r", i64(10**9))]),
    "range": ([helper.make_node("Range", ["a", "b", "c"], ["k"], name="big")],
              [("a", np.array(0, np.float32)), ("b", np.array(1e12, np.float32)), ("c", np.array(1, np.float32))]),
    "pad": ([helper.make_node("Pad", ["one", "p"], ["k"], name="big")],
            [("one", np.ones(1, np.float32)), ("p", i64(0, 2**40))]),
    "resize": ([helper.make_node("Resize", ["one", "", "sc"], ["k"], name="big")],
               [("one", np.ones((1, 1, 2, 2), np.float32)), ("sc", np.array([1, 1, 1e5, 1e5], np.float32))]),
    "outer_product": ([helper.make_node("Mul", ["col", "row"], ["k"], name="big")],
                      [("col", np.ones((50000, 1), np.float32)), ("row", np.ones((1, 50000), np.float32))]),
}


SLOW_FOLDS = {  # name: (nodes, initializers, what the error says); each would run for minutes
    "python_loop": ([helper.make_node("MaxPool", ["c"], ["k"], kernel_shape=[1, 1], name="big")],
                    [("c", np.ones((1, 1, 2048, 2048), np.float32))], "one by one"),
    "conv_work": ([helper.make_node("Conv", ["c", "w"], ["k"], pads=[4, 4, 4, 4], name="big")],
                  [("c", np.ones((1, 64, 64, 64), np.float32)), ("w", np.ones((64, 64, 9, 9), np.float32))],
                  "multiply-adds"),
}


@pytest.mark.parametrize("case", ["loop", "loop_in_chain", *FOLDS, "sparse_constant", *SLOW_FOLDS])
def test_item2_folding_is_bounded(case):
    """Issue 16 item 2: a Loop of 10**12 iterations is not folded (it ran
    forever); folds whose result exceeds the cap are refused before any
    allocation, naming the node, op, size and cap; so are folds that would
    compute for minutes (onnx.reference's element-by-element ops, huge convs)."""
    if case == "loop":
        found = problems(_loop_model(10**12))
        assert [(op, name) for op, name, _ in found] == [("Loop", "forever")]
        assert "control flow" in found[0][2]
        return
    if case == "loop_in_chain":     # a Loop feeding a supported node: still one problem
        m = _loop_model(10**12)
        m.graph.node.insert(1, helper.make_node("Relu", ["acc"], ["acc_r"]))
        m.graph.node[2].input[1] = "acc_r"
        ((op, _, why),) = problems(m)
        assert op == "Loop" and "control flow" in why
        return
    if case == "sparse_constant":   # a sparse value of 10**12 dense elements
        values = numpy_helper.from_array(np.ones(1, np.float32), "v")
        sparse = helper.make_sparse_tensor(values, numpy_helper.from_array(i64(0), "i"), [10**6, 10**6])
        nodes, inits = [helper.make_node("Constant", [], ["k"], sparse_value=sparse, name="big")], []
    elif case in SLOW_FOLDS:
        nodes, inits, says = SLOW_FOLDS[case]
        ((op, name, why),) = problems(model(nodes + [helper.make_node("Relu", ["k"], ["y"])], inits=inits))
        assert (op, name) == (nodes[0].op_type, "big") and says in why, why
        return
    else:
        nodes, inits = FOLDS[case]
    nodes = nodes + [helper.make_node("Add", ["x", "k"], ["y"])]
    ((op, name, why), *_) = problems(model(nodes, inits=inits))
    assert name == "big" and op == nodes[0].op_type
    assert "GiB" in why or "TiB" in why, why
    assert "CONVC_MAX_MEMORY" in why and "cap" in why, why


def test_item2_fold_cap_is_configurable(monkeypatch):
    """Issue 16 item 2: the cap follows CONVC_MAX_MEMORY (bytes)."""
    nodes = [helper.make_node("ConstantOfShape", ["s"], ["k"], name="c"), helper.make_node("Add", ["x", "k"], ["y"])]
    m = model(nodes, inputs=[("x", (1, 1000))], inits=[("s", i64(1, 1000))])
    from_onnx(m)                                            # 4 kB folds by default
    monkeypatch.setenv("CONVC_MAX_MEMORY", "1000")
    ((op, name, why),) = problems(m)
    assert (op, name) == ("ConstantOfShape", "c") and "4000 bytes" in why and "1000 bytes" in why, why
    monkeypatch.setenv("CONVC_MAX_MEMORY", "lots")
    with pytest.raises(cc.ConvcError, match="CONVC_MAX_MEMORY"):
        from_onnx(m)


# -- item 8: invalid models are refused -------------------------------------------------------
def _relu(i, o, name):
    return helper.make_node("Relu", [i], [o], name=name)


def test_item8_invalid_models_are_refused():
    """Issue 16 item 8: a self-loop, out-of-order nodes, two producers of one
    tensor, duplicate names, opset 0 / 99999 and ir_version 999 imported
    silently (a phantom input named 'unsupported', the last writer winning)."""
    cases = {
        "self_loop": (model([_relu("x", "a", "r0"), helper.make_node("Add", ["a", "b"], ["b"], name="loop"),
                             _relu("b", "y", "r1")]), r"'loop'.*reads 'b'.*its own output"),
        "out_of_order": (model([_relu("a", "y", "second"), _relu("x", "a", "first")]),
                         r"'second'.*reads 'a'.*topological order.*'first'"),
        "undefined": (model([_relu("nowhere", "y", "r")]), r"'r'.*reads 'nowhere'.*no node, input or initializer"),
        "two_producers": (model([_relu("x", "y", "one"), helper.make_node("Sigmoid", ["x"], ["y"], name="two")]),
                          r"'y' is written by node 'one' \(Relu\) and node 'two' \(Sigmoid\)"),
        "overwrites_input": (model([_relu("x", "x", "r"), _relu("x", "y", "s")]), r"'x'.*graph input"),
        "duplicate_input": (model([_relu("x", "y", "r")], inputs=[("x", (2,)), ("x", (3,))]),
                            r"input 'x' is listed twice"),
        "duplicate_initializer": (model([helper.make_node("Add", ["x", "w"], ["y"])], inputs=[("x", (2,))],
                                        inits=[("w", np.ones(2, np.float32)), ("w", np.zeros(2, np.float32))]),
                                  r"initializer 'w' is listed twice"),
        "duplicate_output": (model([_relu("x", "y", "r")], outputs=["y", "y"]), r"output 'y' is listed twice"),
        "opset_0": (model([_relu("x", "y", "r")], opset=0), r"opset 0"),
        "opset_99999": (model([_relu("x", "y", "r")], opset=99999), r"opset 99999 .*newest"),
        "ir_999": (model([_relu("x", "y", "r")], ir_version=999), r"ir_version 999"),
        "ir_0": (model([_relu("x", "y", "r")], ir_version=0), r"ir_version"),
        "ir3_initializer_not_input": (model([helper.make_node("Add", ["x", "w"], ["y"])], inputs=[("x", (2,))],
                                            inits=[("w", np.ones(2, np.float32))], ir_version=3, opset=7),
                                      r"IR version 3.*initializer 'w'.*graph input"),
    }
    for case, (m, pattern) in cases.items():
        with pytest.raises(cc.ConvcError, match=pattern):
            from_onnx(m)
        with pytest.raises(cc.ConvcError, match=pattern):       # and the same for its bytes
            from_onnx(m.SerializeToString())
    # a cycle inside a local function shows once the function is inlined
    body = helper.make_function("custom", "Loopy", ["a"], ["b"], [helper.make_node("Add", ["a", "b"], ["b"])],
                                [helper.make_opsetid("", 17)])
    m = model([helper.make_node("Loopy", ["x"], ["y"], domain="custom", name="fn")])
    m.opset_import.append(helper.make_opsetid("custom", 1))
    m.functions.append(body)
    with pytest.raises(cc.ConvcError, match=r"reads 'y', its own output \(a cycle\)"):
        from_onnx(m)
    no_opset = model([_relu("x", "y", "r")])
    del no_opset.opset_import[:]
    with pytest.raises(cc.ConvcError, match="opset"):
        from_onnx(no_opset)
    two = model([_relu("x", "y", "r")])
    two.opset_import.append(helper.make_opsetid("", 13))
    with pytest.raises(cc.ConvcError, match="opset.*twice"):
        from_onnx(two)
    # what stays valid: IR >= 4 initializers that are also inputs (the input's default), empty optional inputs
    m = model([helper.make_node("Clip", ["x", "", "hi"], ["y"])], inputs=[("x", (2,)), ("hi", ())],
              inits=[("hi", np.array(0.5, np.float32))])
    x = np.array([-1.0, 2.0], np.float32)
    np.testing.assert_array_equal(cc.compile(from_onnx(m), "numpy")(x=x), [-1.0, 0.5])


def test_item8_newer_opset_warns(monkeypatch):
    """Issue 16 item 8: an opset newer than the newest convc was checked
    against imports with a warning naming the model's ops that changed since."""
    monkeypatch.setattr(onnx_validate, "NEWEST_OPSET", 17)
    nodes = [helper.make_node("ReduceMean", ["x", "ax"], ["m"], name="mean"), _relu("m", "y", "r")]
    m = model(nodes, inits=[("ax", i64(2, 3))], opset=18)
    with pytest.warns(convc_onnx.OnnxOpsetWarning, match=r"opset 18.*17.*ReduceMean \(changed in opset 18\)") as w:
        from_onnx(m)
    assert "Relu" not in str(w[0].message)
    with warnings.catch_warnings():                        # ops unchanged since 17: no warning
        warnings.simplefilter("error")
        from_onnx(model([_relu("x", "y", "r")], opset=18))


# -- item 11: garbage, inconsistent tensors, bad attributes, external data --------------------
def test_item11_garbage_files_and_bytes(tmp_path):
    """Issue 16 item 11: garbage from_onnx(bytes) raised bare DecodeError (or
    imported an empty model); truncated models, directories, missing files and
    protobufs that are not models must all be clear errors."""
    good = model([_relu("x", "y", "r")]).SerializeToString()
    garbage = {"random": np.random.default_rng(0).bytes(300), "empty": b"", "truncated": good[:len(good) // 2],
               "tensor_proto": numpy_helper.from_array(np.ones(3, np.float32), "t").SerializeToString(),
               "text": b"ir_version: 8\ngraph { }\n", "bytearray": bytearray(good[:-7])}
    for what, data in garbage.items():
        with pytest.raises(cc.ConvcError, match="ONNX model"):
            from_onnx(data)
        (tmp_path / f"{what}.onnx").write_bytes(bytes(data))
        with pytest.raises(cc.ConvcError, match="ONNX model"):
            from_onnx(tmp_path / f"{what}.onnx")
    with pytest.raises(cc.ConvcError, match="is a directory"):
        from_onnx(tmp_path)
    with pytest.raises(cc.ConvcError, match="no such file"):
        from_onnx(str(tmp_path / "missing.onnx"))


def _tensor(name, dims, raw=None, floats=None, dtype=TensorProto.FLOAT):
    t = TensorProto(name=name, data_type=dtype)
    t.dims.extend(dims)
    if raw is not None:
        t.raw_data = raw
    if floats is not None:
        t.float_data.extend(floats)
    return t


def test_item11_initializer_size_mismatch():
    """Issue 16 item 11: an initializer whose data does not fill its dims
    raised a bare ValueError from numpy (or tried to allocate the dims)."""
    bad = {"raw_short": _tensor("w", [2, 3], raw=b"\0" * 20), "raw_long": _tensor("w", [2, 3], raw=b"\0" * 28),
           "floats_short": _tensor("w", [2, 3], floats=[1.0] * 5), "negative_dim": _tensor("w", [-2, 3], raw=b""),
           "huge_dims": _tensor("w", [10**9, 10**9], raw=b"\0" * 8), "no_data": _tensor("w", [2, 3]),
           "unknown_dtype": _tensor("w", [2, 3], raw=b"\0" * 24, dtype=999)}
    for what, t in bad.items():
        m = model([helper.make_node("Add", ["x", "w"], ["y"], name="add")], inputs=[("x", (2, 3))])
        m.graph.initializer.append(t)
        found = problems(m)
        assert found[0][:2] == ("initializer", "w"), (what, found)
        assert ("(2, 3)" in found[0][2] or what in ("negative_dim", "huge_dims", "unknown_dtype")), (what, found)
    # what stays valid: every dtype, in raw_data and in its typed field (sub-byte types packed)
    for code in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT8,
                 TensorProto.UINT16, TensorProto.INT64, TensorProto.UINT64, TensorProto.BOOL, TensorProto.COMPLEX64,
                 TensorProto.INT4, TensorProto.UINT4, TensorProto.FLOAT8E4M3FN):
        values = [1, 0, 1, 1, 0, 1, 1]
        for t in (helper.make_tensor("t", code, [7], values),
                  numpy_helper.from_array(np.array(values).astype(helper.tensor_dtype_to_np_dtype(code)), "t")):
            raw = bool(t.raw_data)
            got = onnx_validate.tensor_array(t, 1 << 20)
            assert got.shape == (7,) and got.astype(np.complex128).real.tolist() == values, (code, raw)
    # a Constant node's tensor is checked the same way
    m = model([helper.make_node("Constant", [], ["k"], value=_tensor("k", [4], raw=b"\0" * 3), name="konst"),
               helper.make_node("Add", ["x", "k"], ["y"])], inputs=[("x", (4,))])
    assert problems(m)[0][:2] == ("Constant", "konst")


def test_item11_bad_window_attributes():
    """Issue 16 item 11: strides=[0, 0] raised ZeroDivisionError and hid the
    list of unsupported nodes; int64 attributes beyond int32 reached the graph."""
    w = ("w", np.ones((2, 2, 3, 3), np.float32))
    cases = {"strides": dict(strides=[0, 0]), "dilations": dict(dilations=[0, 1]), "kernel": dict(kernel_shape=[0, 3]),
             "group": dict(group=0), "huge_stride": dict(strides=[2**32, 1]), "huge_pads": dict(pads=[0, 0, 2**40, 0]),
             "huge_group": dict(group=2**33), "huge_dilation": dict(dilations=[1, -2**40]),
             "same_zero_stride": dict(auto_pad="SAME_UPPER", strides=[0, 1])}
    for what, attrs in cases.items():
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", **attrs),
                 helper.make_node("Round", ["c"], ["e"], name="round"),
                 helper.make_node("MaxPool", ["e"], ["y"], kernel_shape=[2, 2], name="pool", **{
                     k: v for k, v in attrs.items() if k in ("strides", "pads", "dilations")})]
        found = problems(model(nodes, inits=[w]))
        assert [(op, name) for op, name, _ in found][:2] == [("Conv", "conv"), ("Round", "round")], (what, found)
        key = "kernel_shape" if what == "kernel" else what.replace("huge_", "").replace("same_zero_", "")
        assert key.rstrip("s") in found[0][2], (what, found)
    # ConvTranspose and AveragePool too
    for op, attrs in (("ConvTranspose", dict(strides=[0, 2])), ("AveragePool", dict(kernel_shape=[2, 2], strides=[1, 0])),
                      ("ConvTranspose", dict(output_padding=[2**31, 0]))):
        ins = ["x", "w"] if op == "ConvTranspose" else ["x"]
        ((o, name, why),) = problems(model([helper.make_node(op, ins, ["y"], name="n", **attrs)], inits=[w]))
        assert (o, name) == (op, "n") and ("stride" in why or "output_padding" in why), why


def test_item11_external_data(tmp_path, monkeypatch):
    """Issue 16 item 11: from_onnx(bytes) resolved external data against the
    current directory; refuse it (pass a path). Paths leaving the model's
    directory stay refused; a path inside it loads."""
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    m = model([helper.make_node("Add", ["x", "w"], ["y"])], inputs=[("x", (2, 3))], inits=[("w", w)])
    d = tmp_path / "model"
    d.mkdir()
    onnx.save_model(m, d / "m.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    g = from_onnx(d / "m.onnx")
    np.testing.assert_array_equal(cc.compile(g, "numpy")(x=np.zeros((2, 3), np.float32)), w)
    data = (d / "m.onnx").read_bytes()
    monkeypatch.chdir(d)                   # where w.bin would be found relative to the current directory
    with pytest.raises(cc.ConvcError, match=r"'w'.*external.*pass the model's path"):
        from_onnx(data)
    with pytest.raises(cc.ConvcError, match=r"'w'.*external.*pass the model's path"):
        from_onnx(onnx.load(d / "m.onnx", load_external_data=False))
    # a location outside the model's directory
    outside = onnx.load(d / "m.onnx", load_external_data=False)
    for entry in outside.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../secret.bin"
    (tmp_path / "secret.bin").write_bytes(w.tobytes())
    onnx.save_model(outside, d / "evil.onnx")
    with pytest.raises(cc.ConvcError, match="cannot be read"):
        from_onnx(d / "evil.onnx")

"""The call path of compiled modules (convc/runtime/module.py, opencl.py):
the generated fast path for inputs exactly as declared (no copy), the
checked path for everything else, caller-provided outputs (``out=``) and
their rules, errors raised before any generated code runs, and concurrent
calls from several threads. Every result is compared with the numpy
reference interpreter."""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import pytest

import convc as cc
import helpers
from helpers import assert_close

RNG = np.random.default_rng(14)


def _f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _graphs():
    """name -> (graph, feeds maker): the shapes of call a module can have."""
    out = {}
    g = cc.Graph("one_relu")                            # one input, one output
    g.output(cc.relu(g.input("x", (16,))), "y")
    out["one_in"] = (g, lambda: {"x": _f32(16)})

    g = cc.Graph("two_in_three_out")                    # 2 inputs; 3 outputs, one the input as is
    x, z = g.input("x", (2, 3, 6, 6)), g.input("z", (2, 4, 6, 6))
    w, b = g.param("w", _f32(4, 3, 3, 3)), g.param("b", _f32(4))
    h = cc.relu(cc.conv(x, w, bias=b, padding=1))       # params and an arena
    g.output(cc.add(cc.conv(h, g.param("w2", _f32(4, 4, 1, 1))), z), "y")
    g.output(cc.sigmoid(x), "s")
    g.output(x, "x_as_is")
    out["two_in"] = (g, lambda: {"x": _f32(2, 3, 6, 6), "z": _f32(2, 4, 6, 6)})

    g = cc.Graph("float64_pair")                        # float64, two outputs of one shape
    x = g.input("x", (3, 5), "float64")
    g.output(cc.tanh(x), "t")
    g.output(cc.relu(x), "r")
    out["float64"] = (g, lambda: {"x": RNG.standard_normal((3, 5))})

    g = cc.Graph("ce_labels")                           # int64 labels, a scalar output
    logits, labels = g.input("logits", (5, 4)), g.input("labels", (5,), "int64")
    g.output(cc.cross_entropy(logits, labels), "loss")
    out["labels"] = (g, lambda: {"logits": _f32(5, 4), "labels": RNG.integers(0, 4, 5).astype(np.int64)})
    return out


GRAPHS = _graphs()


@pytest.fixture(scope="module")
def modules():
    """(name, target) -> module, and name -> reference module."""
    mods = {}
    for name, (g, _) in GRAPHS.items():
        mods[name, "numpy"] = cc.compile(g, target="numpy")
        mods[name, "c"] = cc.compile(g, target="c")
    return mods


def _want(modules, name, feeds):
    return modules[name, "numpy"].run({k: np.array(v) for k, v in feeds.items()})


def _spy(monkeypatch, mod):
    """Record the buffer addresses the generated code gets on each call."""
    real, seen = mod._call_entry, []

    def spy(*ptrs):
        seen.append([int(mod._ffi.cast("uintptr_t", p)) for p in ptrs])
        return real(*ptrs)
    monkeypatch.setattr(mod, "_call_entry", spy)
    return seen


def _no_checked_path(monkeypatch, mod):
    def checked(*a, **k):
        raise AssertionError("the checked path ran: the fast path was not taken")
    monkeypatch.setattr(mod, "_checked_run", checked)
    monkeypatch.setattr(mod, "_checked_call", checked)


# -- the fast path -----------------------------------------------------------

@pytest.mark.parametrize("name", list(GRAPHS))
def test_fast_path_matches_reference_without_copies(modules, name, monkeypatch):
    mod, (_, make) = modules[name, "c"], GRAPHS[name]
    feeds = make()
    want = _want(modules, name, feeds)
    before = {k: v.copy() for k, v in feeds.items()}
    _no_checked_path(monkeypatch, mod)
    seen = _spy(monkeypatch, mod)
    for _ in range(3):                                  # repeated calls: fresh outputs each time
        got = mod.run(feeds)
        assert list(got) == list(want)
        for o in want:
            assert_close(got[o], want[o], what=f"{name}: {o}", check_dtype=True)
    assert got is not mod.run(feeds)
    assert all(not np.shares_memory(a, b) for a in got.values() for b in mod.run(feeds).values())
    vals = mod(**feeds)                                 # __call__: one array, or a tuple in output order
    vals = vals if isinstance(vals, tuple) else (vals,)
    for v, o in zip(vals, want):
        assert_close(v, want[o], what=f"{name}: mod(**feeds) {o}")
    # the inputs reached the generated code as they are: same buffers, unchanged
    order = [n for n, _, _ in mod._in_spec]
    assert seen and all(s[:len(order)] == [feeds[n].ctypes.data for n in order] for s in seen)
    for k in feeds:
        np.testing.assert_array_equal(feeds[k], before[k])


def test_an_output_that_is_an_input_is_a_copy(modules):
    mod = modules["two_in", "c"]
    feeds = GRAPHS["two_in"][1]()
    res = mod.run(feeds)
    np.testing.assert_array_equal(res["x_as_is"], feeds["x"])
    assert not np.shares_memory(res["x_as_is"], feeds["x"])


def _strided(feeds):
    """The same values as views with negative strides: the checked path."""
    return {k: v[::-1].copy()[::-1] for k, v in feeds.items()}


def _odd_inputs(feeds):
    """Inputs the fast path does not take; each must still give the right answer."""
    x = feeds["x"]
    fortran = np.asfortranarray(x)
    big = np.zeros((2 * x.shape[0],) + x.shape[1:], x.dtype)
    big[::2] = x
    ro = x.copy()
    ro.setflags(write=False)
    raw = np.zeros(x.nbytes + 1, np.uint8)
    unaligned = np.frombuffer(raw.data, x.dtype, count=x.size, offset=1).reshape(x.shape)
    unaligned[...] = x
    return {
        "stepped_view": big[::2],
        "reversed_view": x[::-1].copy()[::-1],
        "fortran_order": fortran,
        "read_only": ro,                                # taken by the fast path, not written
        "unaligned": unaligned,
        "dtype_with_metadata": x.view(np.dtype(x.dtype.str, metadata={"unit": "m"})),
    }


@pytest.mark.parametrize("target", ["numpy", "c"])
@pytest.mark.parametrize("kind", list(_odd_inputs({"x": _f32(2, 3, 6, 6)})))
def test_other_inputs_are_converted(modules, target, kind):
    mod, (_, make) = modules["two_in", target], GRAPHS["two_in"]
    feeds = make()
    want = _want(modules, "two_in", feeds)
    odd = _odd_inputs(feeds)[kind]
    kept = np.array(odd, copy=True)
    got = mod.run({"x": odd, "z": feeds["z"]})
    for o in want:
        assert_close(got[o], want[o], what=f"{kind} x [{target}]: {o}")
    np.testing.assert_array_equal(np.asarray(odd), kept)       # the caller's array is not written to


@pytest.mark.parametrize("target", ["numpy", "c"])
def test_other_feed_containers(modules, target):
    mod, (_, make) = modules["two_in", target], GRAPHS["two_in"]
    feeds = make()
    want = _want(modules, "two_in", feeds)
    for what, f in [("OrderedDict", OrderedDict(feeds)), ("reversed order", dict(reversed(feeds.items())))]:
        got = mod.run(f)
        assert_close(got["y"], want["y"], what=f"{what} [{target}]")


@pytest.mark.parametrize("name", ["float64", "labels"])
def test_lists_are_converted(modules, name):
    """A list becomes an array as np.asarray makes it (float64, int64): it
    fits inputs of those dtypes (the float64 graph, the int64 labels)."""
    mod, feeds = modules[name, "c"], GRAPHS[name][1]()
    want = _want(modules, name, feeds)
    got = mod.run({k: v.tolist() if v.dtype != np.float32 else v for k, v in feeds.items()})
    for o in want:
        assert_close(got[o], want[o], what=f"{name}: list inputs, {o}")


def test_unused_graph_inputs_may_be_passed(modules):
    g = cc.Graph("unused_input")
    x = g.input("x", (4,))
    g.input("extra", (3,))
    g.output(cc.relu(x), "y")
    mod = cc.compile(g, target="c")
    assert list(mod.inputs) == ["x"]
    a = _f32(4)
    res = mod.run({"x": a, "extra": np.zeros(3, np.float32)})      # the checked path ignores it
    np.testing.assert_array_equal(res["y"], np.maximum(a, 0))
    np.testing.assert_array_equal(mod.run({"x": a})["y"], np.maximum(a, 0))


# -- errors for bad inputs (same messages on both paths) ---------------------

BAD_INPUTS = {
    "missing": (lambda f: {"z": f["z"]}, ["two_in_three_out", "missing", "'x'"]),
    "unknown": (lambda f: {**f, "q": f["x"]}, ["two_in_three_out", "unknown", "'q'"]),
    "misspelled": (lambda f: {"X": f["x"], "z": f["z"]}, ["missing", "unknown", "'X'", "'x'"]),
    "wrong_shape": (lambda f: {"x": f["x"][:1], "z": f["z"]},
                    ["'x'", "shape", "(1, 3, 6, 6)", "expected (2, 3, 6, 6)"]),
    "wrong_dtype": (lambda f: {"x": f["x"].astype(np.float64), "z": f["z"]},
                    ["'x'", "float64", "float32", ".astype(np.float32)"]),
    "byte_swapped": (lambda f: {"x": f["x"].astype(">f4"), "z": f["z"]}, ["'x'", ">f4", "expected float32"]),
    "int_labels_as_float": (None, ["'labels'", "float32", "int64", ".astype(np.int64)"]),
}


@pytest.mark.parametrize("target", ["numpy", "c"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_before_anything_runs(modules, target, case, monkeypatch):
    make_bad, words = BAD_INPUTS[case]
    name = "labels" if make_bad is None else "two_in"
    mod = modules[name, target]
    feeds = GRAPHS[name][1]()
    bad = {**feeds, "labels": feeds["labels"].astype(np.float32)} if make_bad is None else make_bad(feeds)

    def must_not_run(*args):
        raise AssertionError("the target ran on bad input")
    monkeypatch.setattr(mod, "_run" if target == "numpy" else "_call_entry", must_not_run)
    for call in (lambda: mod.run(bad), lambda: mod(**bad)):
        with pytest.raises(cc.InputError) as ei:
            call()
        for w in words:
            assert w in str(ei.value), f"{case}: message does not say {w!r}: {ei.value}"


@pytest.mark.parametrize("target", ["numpy", "c"])
def test_run_takes_a_dict(modules, target):
    with pytest.raises(cc.InputError, match="dict of input name"):
        modules["one_in", target].run([_f32(16)])


def test_error_code_of_generated_code_is_an_input_error(modules, monkeypatch):
    mod = modules["one_in", "c"]
    monkeypatch.setattr(mod, "_call_entry", lambda *ptrs: 3)
    for call in (lambda: mod.run({"x": _f32(16)}), lambda: mod.run(_strided({"x": _f32(16)})),
                 lambda: mod(x=_f32(16))):
        with pytest.raises(cc.InputError, match="one_relu.*returned error 3"):
            call()


# -- out= -------------------------------------------------------------------

@pytest.mark.parametrize("target", ["numpy", "c"])
@pytest.mark.parametrize("name", list(GRAPHS))
def test_out_arrays_are_written_and_returned(modules, target, name, monkeypatch):
    mod, (_, make) = modules[name, target], GRAPHS[name]
    outs = {o: np.full(t.shape, 7, t.dtype) for o, t in mod.outputs.items()}
    for _ in range(2):                                  # the same arrays again, new inputs
        feeds = make()
        want = _want(modules, name, feeds)
        with monkeypatch.context() as m:
            if target == "c":                           # every output given, all fine: the fast path
                _no_checked_path(m, mod)
                m.setattr(mod, "_outputs", lambda *a: pytest.fail("the fast path did not take these out arrays"))
            res = mod.run(feeds, out=outs)
        assert list(res) == list(want)
        for o in want:
            assert res[o] is outs[o]
            assert_close(outs[o], want[o], what=f"{name} out[{o}] [{target}]", check_dtype=True)
    # through the checked path too (strided inputs), and with some outputs allocated
    feeds = make()
    want = _want(modules, name, feeds)
    first = next(iter(mod.outputs))
    some = {first: outs[first]}
    res = mod.run(_strided(feeds), out=some)
    assert res[first] is outs[first]
    for o in want:
        assert_close(res[o], want[o], what=f"{name} partial out, {o} [{target}]")
        assert o == first or not any(np.shares_memory(res[o], a) for a in outs.values())


def _bad_outs(feeds):
    """case -> (out dict, words the message must hold); graph two_in_three_out."""
    y = np.zeros((2, 4, 6, 6), np.float32)
    wide = np.zeros((2, 3, 6, 12), np.float32)
    ro = np.zeros((2, 3, 6, 6), np.float32)
    ro.setflags(write=False)
    raw = np.zeros(4 * 2 * 3 * 6 * 6 + 1, np.uint8)
    unaligned = np.frombuffer(raw.data, np.float32, count=2 * 3 * 6 * 6, offset=1).reshape(2, 3, 6, 6)
    x = feeds["x"]
    return {
        "not_a_dict": ([y], ["dict of output name"]),
        "unknown_name": ({"y": y, "w": y.copy()}, ["unknown output", "'w'", "'y', 's', 'x_as_is'"]),
        "not_an_array": ({"y": y.tolist()}, ["out['y']", "list", "numpy arrays"]),
        "wrong_shape": ({"y": np.zeros((2, 4, 6, 5), np.float32)}, ["out['y']", "(2, 4, 6, 5)", "(2, 4, 6, 6)"]),
        "wrong_dtype": ({"y": y.astype(np.float64)}, ["out['y']", "float64", "float32"]),
        "not_contiguous": ({"s": wide[..., ::2]}, ["out['s']", "C-contiguous"]),
        "fortran_order": ({"s": np.asfortranarray(np.zeros((2, 3, 6, 6), np.float32))}, ["out['s']", "C-contiguous"]),
        "read_only": ({"s": ro}, ["out['s']", "read-only"]),
        "unaligned": ({"s": unaligned}, ["out['s']", "aligned"]),
        "is_an_input": ({"s": x}, ["out['s']", "shares memory with input 'x'"]),
        "overlaps_an_input": ({"y": feeds["z"].reshape(-1)[::-1].copy().reshape(2, 4, 6, 6),
                               "s": feeds["z"].reshape(-1)[:x.size].reshape(x.shape)},
                              ["out['s']", "input 'z'", "must not overlap"]),
        "two_outputs_share": ({"s": y.reshape(-1)[:x.size].reshape(x.shape), "x_as_is": y.reshape(-1)[-x.size:]
                               .reshape(x.shape)}, ["out['x_as_is']", "shares memory with out['s']"]),
    }


@pytest.mark.parametrize("target", ["numpy", "c"])
@pytest.mark.parametrize("mode", ["exact", "every_output", "strided"])
@pytest.mark.parametrize("case", list(_bad_outs(GRAPHS["two_in"][1]())))
def test_bad_out_raises_before_anything_runs(modules, target, mode, case, monkeypatch):
    """Exact inputs (the fast path), the same with good arrays for the outputs
    the case leaves out (the fast path's own out check), strided inputs (the
    checked path)."""
    mod = modules["two_in", target]
    feeds = GRAPHS["two_in"][1]()
    if mode == "strided" and case not in ("is_an_input", "overlaps_an_input"):
        feeds = _strided(feeds)
    out, words = _bad_outs(feeds)[case]
    if mode == "every_output" and isinstance(out, dict):
        out = {**{o: np.empty(t.shape, t.dtype) for o, t in mod.outputs.items()}, **out}

    def must_not_run(*args):
        raise AssertionError("the target ran with a bad out")
    monkeypatch.setattr(mod, "_run" if target == "numpy" else "_call_entry", must_not_run)
    with pytest.raises(cc.InputError) as ei:
        mod.run(feeds, out=out)
    msg = str(ei.value)
    for w in ["two_in_three_out", *words]:
        assert w in msg, f"{case}: message does not say {w!r}: {msg}"


def test_a_good_out_is_untouched_when_another_is_bad(modules):
    mod = modules["two_in", "c"]
    feeds = GRAPHS["two_in"][1]()
    y = np.full((2, 4, 6, 6), 7, np.float32)
    with pytest.raises(cc.InputError, match="read-only"):
        ro = np.zeros((2, 3, 6, 6), np.float32)
        ro.setflags(write=False)
        mod.run(feeds, out={"y": y, "s": ro})
    assert (y == 7).all()


# -- threads ------------------------------------------------------------------

def test_concurrent_runs_from_four_threads(modules):
    """One module (params, a shared arena) called from 4 threads at once,
    half with out=: every result matches the reference for its own input."""
    mod, (_, make) = modules["two_in", "c"], GRAPHS["two_in"]
    cases = [make() for _ in range(4)]
    wants = [_want(modules, "two_in", f) for f in cases]
    start, errors = threading.Barrier(4), []

    def work(i):
        feeds, want = cases[i], wants[i]
        outs = {o: np.empty(t.shape, t.dtype) for o, t in mod.outputs.items()}
        start.wait()
        try:
            for k in range(150):
                res = mod.run(feeds, out=outs) if i % 2 else (mod(**feeds) if k % 2 else mod.run(feeds))
                vals = res.values() if isinstance(res, dict) else res
                for o, v in zip(want, vals):
                    np.testing.assert_allclose(v, want[o], rtol=1e-4, atol=1e-5, err_msg=f"thread {i} call {k} {o}")
        except Exception as e:          # noqa: BLE001 -- reported below, with the thread
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


# -- OpenCL -------------------------------------------------------------------

@pytest.mark.skipif(helpers.OPENCL_MISSING is not None and not helpers.OPENCL_REQUIRED,
                    reason=f"no usable OpenCL device: {helpers.OPENCL_MISSING}")
def test_opencl_fast_path_and_out(modules, monkeypatch):
    g, make = GRAPHS["two_in"]
    mod = cc.compile(g, target="opencl")
    feeds = make()
    want = _want(modules, "two_in", feeds)
    outs = {o: np.full(t.shape, 7, t.dtype) for o, t in mod.outputs.items()}
    with monkeypatch.context() as m:
        _no_checked_path(m, mod)
        for res in (mod.run(feeds), mod.run(feeds, out=outs)):
            for o in want:
                assert_close(res[o], want[o], what=f"opencl {o}")
        assert all(res[o] is outs[o] for o in outs)
    res = mod.run(_strided(feeds), out={"y": outs["y"]})
    assert res["y"] is outs["y"]
    assert_close(res["s"], want["s"], what="opencl s, checked path")
    with pytest.raises(cc.InputError, match="shares memory with input 'x'"):
        mod.run(feeds, out={"s": feeds["x"]})
    with pytest.raises(cc.InputError, match=r"out\['y'\].*float64"):
        mod.run(feeds, out={"y": outs["y"].astype(np.float64)})

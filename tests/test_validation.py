"""Every broken rule raises a ConvcError subclass whose message names the
node (or input) and the rule: ValidationError while building, InputError at
run time (before any C runs), CompileError when the C compiler fails."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convc as cc
import convc.codegen.c
from helpers import assert_close


def w32(*shape):
    return np.ones(shape, np.float32)


# -- build time --------------------------------------------------------------------

def _conv(xshape, wshape, **kw):
    g = cc.Graph("bad")
    x = g.input("x", xshape)
    return cc.conv(x, w32(*wshape), name="badconv", **kw)


BUILD_CASES = {
    # case id: (x shape, w shape, conv kwargs, words the rule must show)
    "c_in_not_divisible_by_groups": ((1, 3, 8, 8), (4, 1, 3, 3), dict(groups=2), ["divisible", "groups"]),
    "c_out_not_divisible_by_groups": ((1, 4, 8, 8), (3, 2, 3, 3), dict(groups=2), ["divisible", "groups"]),
    "weight_channels_not_c_in_over_groups": ((1, 4, 8, 8), (4, 4, 3, 3), dict(groups=2), ["weight", "groups"]),
    "weight_channels_not_c_in": ((1, 3, 8, 8), (2, 2, 3, 3), {}, ["weight", "channels"]),
    "kernel_larger_than_input": ((1, 1, 4, 4), (1, 1, 5, 3), {}, ["kernel", "padded input"]),
    "kernel_larger_than_padded_input": ((1, 1, 4), (1, 1, 8), dict(padding=((1, 2),)), ["kernel", "padded input"]),
    "dilated_kernel_larger_than_input": ((1, 1, 6, 6), (1, 1, 3, 3), dict(dilation=(1, 3)),
                                         ["kernel", "padded input"]),
    "stride_zero": ((1, 1, 8, 8), (1, 1, 3, 3), dict(stride=0), ["stride", ">= 1"]),
    "stride_negative_on_one_axis": ((1, 1, 8, 8), (1, 1, 3, 3), dict(stride=(1, -1)), ["stride", ">= 1"]),
    "dilation_zero": ((1, 1, 8, 8), (1, 1, 3, 3), dict(dilation=0), ["dilation", ">= 1"]),
    "dilation_zero_on_one_axis": ((1, 1, 8), (1, 1, 3), dict(dilation=(0,)), ["dilation", ">= 1"]),
    "unknown_padding_word": ((1, 1, 8, 8), (1, 1, 3, 3), dict(padding="samee"), ["padding", "samee"]),
    "negative_padding": ((1, 1, 8, 8), (1, 1, 3, 3), dict(padding=((0, -1), 0)), ["padding", ">= 0"]),
    "padding_wrong_number_of_axes": ((1, 1, 8, 8), (1, 1, 3, 3), dict(padding=(1, 1, 1)), ["padding", "axes"]),
    "stride_wrong_number_of_axes": ((1, 1, 8, 8), (1, 1, 3, 3), dict(stride=(1, 1, 1)), ["stride"]),
    "groups_zero": ((1, 2, 8, 8), (2, 2, 3, 3), dict(groups=0), ["groups"]),
    "bias_wrong_length": ((1, 1, 8, 8), (4, 1, 3, 3), dict(bias=np.zeros(5, np.float32)), ["bias"]),
    "bias_wrong_untied_shape": ((1, 1, 8, 8), (4, 1, 3, 3), dict(bias=np.zeros((4, 6, 5), np.float32)),
                                ["bias", "untied"]),
    "bias_with_batch_dim": ((1, 1, 8, 8), (4, 1, 3, 3), dict(bias=np.zeros((1, 4, 6, 6), np.float32)),
                            ["bias"]),
    "input_rank_2": ((1, 3), (2, 3), {}, ["rank"]),
    "input_rank_6": ((1, 1, 2, 2, 2, 2), (1, 1, 1, 1, 1, 1), {}, ["rank"]),
    "weight_rank_mismatch": ((1, 1, 8, 8), (1, 1, 3), {}, ["weight", "rank"]),
}


@pytest.mark.parametrize("case", list(BUILD_CASES))
def test_build_rule_raises_validation_error(case):
    xshape, wshape, kw, words = BUILD_CASES[case]
    with pytest.raises(cc.ValidationError) as ei:
        _conv(xshape, wshape, **kw)
    assert isinstance(ei.value, cc.ConvcError)
    msg = str(ei.value)
    assert "badconv" in msg, f"message does not name the node: {msg}"
    assert "(conv)" in msg, f"message does not name the op: {msg}"
    assert str(tuple(xshape)) in msg, f"message does not show the input shape: {msg}"
    for word in words:
        assert word.lower() in msg.lower(), f"message does not state the rule ({word!r}): {msg}"


def test_valid_neighbours_of_the_bad_cases_build():
    # the rules are not over-eager: the boundary cases next to the bad ones are fine
    assert _conv((1, 4, 8, 8), (4, 2, 3, 3), groups=2).shape == (1, 4, 6, 6)
    assert _conv((1, 1, 4, 4), (1, 1, 4, 3)).shape == (1, 1, 1, 2)
    assert _conv((1, 1, 4), (1, 1, 7), padding=((1, 2),)).shape == (1, 1, 1)
    assert _conv((1, 1, 7, 7), (1, 1, 3, 3), dilation=(1, 3)).shape == (1, 1, 5, 1)
    assert _conv((1, 1, 8, 8), (4, 1, 3, 3), bias=np.zeros((4, 6, 6), np.float32)).shape == (1, 4, 6, 6)
    assert _conv((1, 1, 2, 2, 2), (1, 1, 1, 1, 1)).shape == (1, 1, 2, 2, 2)
    assert _conv((1, 1, 8, 8), (1, 1, 3, 3), padding="SAME").shape == (1, 1, 8, 8)


def test_mixed_dtypes_are_rejected():
    g = cc.Graph("mixed")
    x = g.input("x", (1, 1, 5, 5), "float64")
    w = g.param("w", w32(1, 1, 3, 3))
    with pytest.raises(cc.ValidationError, match=r"(?s)mixedconv.*dtype"):
        cc.conv(x, w, name="mixedconv")


def test_validation_error_leaves_graph_unchanged():
    g = cc.Graph("unchanged")
    x = g.input("x", (1, 1, 5, 5))
    before = set(g.nx.nodes)
    with pytest.raises(cc.ValidationError):
        cc.conv(x, g.param("w", w32(1, 1, 3, 3)), stride=0, name="badconv")
    assert "badconv" not in g.nx.nodes
    assert set(g.nx.nodes) - before == {"w"}


# -- attribute types -----------------------------------------------------------------

@pytest.mark.parametrize("kw, want", [
    (dict(stride=np.int64(2)), (1, 1, 4, 4)),          # e.g. attributes read from ONNX / numpy arrays
    (dict(dilation=np.int32(2)), (1, 1, 5, 5)),
    (dict(padding=np.int64(1)), (1, 1, 9, 9)),
    (dict(stride=(np.int64(2), 1)), (1, 1, 4, 7)),
    (dict(groups=np.int64(1)), (1, 1, 7, 7)),
])
def test_numpy_integer_attributes_work_like_ints(kw, want):
    assert _conv((1, 1, 9, 9), (1, 1, 3, 3), **kw).shape == want


@pytest.mark.parametrize("kw, word", [
    (dict(stride=(1.5, 1)), "stride"),
    (dict(dilation=(2.7, 1)), "dilation"),
    (dict(padding=((0.5, 1), (1, 1))), "padding"),
    (dict(stride=2.0), "stride"),
    (dict(padding=1.0), "padding"),
    (dict(groups=1.0), "groups"),
])
def test_non_integer_attributes_are_rejected_not_truncated(kw, word):
    with pytest.raises(cc.ValidationError, match=rf"(?s)badconv.*{word}"):
        _conv((1, 1, 9, 9), (1, 1, 3, 3), **kw)


# -- run time ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def modules():
    g = cc.Graph("runcheck")
    x = g.input("x", (2, 3, 6, 5))
    w = np.random.default_rng(1).standard_normal((4, 3, 3, 2)).astype(np.float32)
    g.output(cc.conv(x, w, padding=1, name="conv1"), "y")
    return {t: cc.compile(g, target=t) for t in ("numpy", "c")}, w


def _good_x():
    return np.random.default_rng(2).standard_normal((2, 3, 6, 5)).astype(np.float32)


def _torch_ref(x, w):
    return F.conv2d(torch.from_numpy(np.ascontiguousarray(x, np.float64)), torch.from_numpy(w.astype(np.float64)),
                    padding=1).numpy()


RUN_CASES = {
    "missing_input": ({}, ["missing", "'x'"]),
    "unknown_input": ({"x": "GOOD", "z": np.zeros(3, np.float32)}, ["unknown", "'z'"]),
    "misspelled_input": ({"X": "GOOD"}, ["missing", "unknown", "'X'"]),
    "wrong_shape": ({"x": np.zeros((2, 3, 5, 6), np.float32)}, ["'x'", "shape", "(2, 3, 5, 6)", "(2, 3, 6, 5)"]),
    "wrong_rank": ({"x": np.zeros((2, 3, 30), np.float32)}, ["'x'", "shape"]),
    "wrong_dtype_float64": ({"x": np.zeros((2, 3, 6, 5), np.float64)}, ["'x'", "float64", "float32"]),
    "wrong_dtype_int64": ({"x": np.zeros((2, 3, 6, 5), np.int64)}, ["'x'", "int64", "float32"]),
}


@pytest.mark.parametrize("target", ["numpy", "c"])
@pytest.mark.parametrize("case", list(RUN_CASES))
def test_run_rule_raises_input_error(modules, target, case):
    mods, _ = modules
    feeds, words = RUN_CASES[case]
    feeds = {k: (_good_x() if isinstance(v, str) else v) for k, v in feeds.items()}
    with pytest.raises(cc.InputError) as ei:
        mods[target].run(feeds)
    msg = str(ei.value)
    assert "runcheck" in msg, f"message does not name the graph: {msg}"
    for word in words:
        assert word in msg, f"message does not say {word!r}: {msg}"


@pytest.mark.parametrize("target", ["numpy", "c"])
def test_bad_input_is_caught_before_the_target_runs(modules, target, monkeypatch):
    mod = modules[0][target]

    def must_not_run(*args):
        raise AssertionError("the target ran on unchecked input")

    # what runs the target: the reference interpreter, or the C entry point (fast and checked paths)
    monkeypatch.setattr(mod, "_run" if target == "numpy" else "_call_entry", must_not_run)
    for feeds, _ in RUN_CASES.values():
        with pytest.raises(cc.InputError):
            mod.run({k: (_good_x() if isinstance(v, str) else v) for k, v in feeds.items()})
    with pytest.raises(AssertionError, match="unchecked"):   # and good input does reach it
        mod.run({"x": _good_x()})


@pytest.mark.parametrize("target", ["numpy", "c"])
def test_run_rejects_non_dict_and_keyword_errors(modules, target):
    mods, _ = modules
    with pytest.raises(cc.InputError):
        mods[target].run([_good_x()])
    with pytest.raises(cc.InputError, match="unknown"):
        mods[target](x=_good_x(), y=_good_x())


@pytest.mark.parametrize("target", ["numpy", "c"])
def test_module_still_works_after_bad_input(modules, target):
    mods, w = modules
    with pytest.raises(cc.InputError):
        mods[target].run({"x": np.zeros((1, 3, 6, 5), np.float32)})
    x = _good_x()
    assert_close(mods[target](x=x), _torch_ref(x, w), what=f"after bad input [{target}]")


def _non_contiguous_inputs():
    base = np.random.default_rng(3).standard_normal((5, 6, 3, 2)).astype(np.float32)
    big = np.random.default_rng(4).standard_normal((4, 7, 12, 15)).astype(np.float32)
    fortran = np.asfortranarray(_good_x())
    return {
        "transposed": base.transpose(3, 2, 1, 0),           # (2, 3, 6, 5), strides reversed
        "stepped_slice": big[::2, 1:7:2, ::2, 2::3],        # (2, 3, 6, 5)
        "negative_step": big[:2, :3, :6, :5][..., ::-1],
        "fortran_order": fortran,
        "broadcast_view": np.broadcast_to(np.arange(5, dtype=np.float32), (2, 3, 6, 5)),
    }


@pytest.mark.parametrize("target", ["numpy", "c"])
@pytest.mark.parametrize("kind", list(_non_contiguous_inputs()))
def test_non_contiguous_inputs_are_accepted(modules, target, kind):
    mods, w = modules
    x = _non_contiguous_inputs()[kind]
    assert x.shape == (2, 3, 6, 5)
    assert not x.flags.c_contiguous
    before = x.copy()
    y = mods[target](x=x)
    assert_close(y, _torch_ref(x, w), what=f"{kind} input [{target}]")
    np.testing.assert_array_equal(x, before)   # the caller's array is not written to


# -- C compiler failures -------------------------------------------------------------

def _small_graph(name):
    g = cc.Graph(name)
    x = g.input("x", (1, 1, 5))
    g.output(cc.conv(x, w32(1, 1, 3)), "y")
    return g


def test_compile_error_from_bad_generated_source(monkeypatch):
    real = convc.codegen.c.generate

    def broken(graph, *a, **kw):
        src = real(graph, *a, **kw)
        return dataclasses.replace(src, text=src.text + "\nstatic int convc_broken(void) { return undeclared_q7; }\n")

    monkeypatch.setattr(convc.codegen.c, "generate", broken)
    with pytest.raises(cc.CompileError) as ei:
        cc.compile(_small_graph("broken_source"), target="c")
    msg = str(ei.value)
    assert "undeclared_q7" in msg and "error" in msg, f"compiler's message missing: {msg}"
    m = re.search(r"generated source: (\S+)", msg)
    assert m, f"path of the generated source missing: {msg}"
    path = Path(m.group(1))
    assert path.is_file(), f"{path} does not exist"
    assert "undeclared_q7" in path.read_text()
    assert "broken_source" in path.read_text()


def test_compile_error_from_bad_flags(monkeypatch):
    monkeypatch.setenv("CONVC_CFLAGS", "-include /nonexistent/convc_missing_header.h")
    with pytest.raises(cc.CompileError) as ei:
        cc.compile(_small_graph("bad_flags"), target="c")
    msg = str(ei.value)
    assert "convc_missing_header.h" in msg, f"compiler's message missing: {msg}"
    m = re.search(r"generated source: (\S+)", msg)
    assert m and Path(m.group(1)).is_file(), msg
    # the failure is not cached: with good flags the same graph builds and runs
    monkeypatch.delenv("CONVC_CFLAGS")
    y = cc.compile(_small_graph("bad_flags"), target="c")(x=np.arange(5, dtype=np.float32).reshape(1, 1, 5))
    np.testing.assert_array_equal(y, [[[3, 6, 9]]])


def test_compile_error_when_the_compiler_is_missing(monkeypatch):
    monkeypatch.setenv("CONVC_CC", "/nonexistent/convc-cc")
    with pytest.raises(cc.CompileError, match="convc-cc"):
        cc.compile(_small_graph("no_cc"), target="c")


def test_unbalanced_quote_in_cflags_is_a_convc_error(monkeypatch):
    # DESIGN: every error convc raises on purpose is a ConvcError; a malformed
    # CONVC_CFLAGS must not escape as a bare ValueError from shlex.
    monkeypatch.setenv("CONVC_CFLAGS", '-DX="')
    with pytest.raises(cc.ConvcError, match="CONVC_CFLAGS"):
        cc.compile(_small_graph("bad_quote"), target="c")


def test_unknown_target_and_non_graph():
    with pytest.raises(cc.ConvcError, match="opencl2"):
        cc.compile(_small_graph("tgt"), target="opencl2")
    with pytest.raises(cc.ConvcError, match="Graph"):
        cc.compile("not a graph")

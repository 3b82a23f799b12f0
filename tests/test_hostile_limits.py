"""Hostile input at graph-build and compile time (issue 16, items 1, 9, 10
and 11): limits of the generated code's index types, the memory cap, names
that C or the generated code reserve, and every value that used to be
coerced, accepted or answered with a bare Python exception. Each test names
its issue-16 item; every one failed before the fix it guards."""
from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

import convc as cc
from convc import shapes
from convc.errors import ConvcError, GraphError, InputError, ValidationError
from convc.export import export_c
from convc.schedule import available_memory, parse_bytes

LIMIT = 2**31 - 1
STRICT = ["-Wall", "-Wextra", "-Werror", "-pedantic"]


def gcc():
    if not shutil.which("gcc"):
        pytest.skip("gcc is not installed")
    return "gcc"


def sh(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-3000:]}"
    return proc


def image(shape=(1, 1, 5, 5), name="g"):
    g = cc.Graph(name)
    return g, g.input("x", shape)


def ones(*shape):
    return np.ones(shape, np.float32)


# -- item 1: bounds of the generated index types ------------------------------------

@pytest.mark.parametrize("kwargs, what", [
    (dict(stride=2**32), "stride = 4294967296"),
    (dict(stride=2**63 - 1), "stride = 9223372036854775807"),
    (dict(stride=(1, 2**31)), "stride = 2147483648"),
    (dict(dilation=2**40), "dilation = 1099511627776"),
    (dict(padding=2**31), "padding"),
    (dict(padding=((0, 2**40), (0, 0))), "padding"),
])
def test_item1_conv_attributes_beyond_int_are_refused(kwargs, what):
    """Issue 16 item 1: a stride of 2**32 built and the compiled module died
    with SIGILL; 2**63-1 returned 0. Every stride, dilation and padding must
    fit the generated code's int indices: a ValidationError names node, op,
    attribute, value and limit."""
    g, x = image()
    with pytest.raises(ValidationError) as e:
        cc.conv(x, ones(1, 1, 3, 3), name="c1", **kwargs)
    msg = str(e.value)
    assert "node 'c1' (conv)" in msg and what in msg and str(LIMIT) in msg, msg


def test_item1_low_level_add_and_other_ops_are_bounded():
    """Issue 16 item 1: the same limit through ``g.add`` (what importers use)
    and for every window op: pools, transposed conv (stride, output_padding),
    downsample, dilate and the ONNX-style int64 strides."""
    g, x = image((1, 1, 8, 8))
    w = g.param("w", ones(1, 1, 3, 3))
    cases = [
        ("conv", [x, w], dict(stride=np.int64(2**32), padding=0, dilation=1, groups=1, flip=False)),
        ("max_pool", [x], dict(kernel_size=2, stride=2**31, padding=0, dilation=1, ceil_mode=False)),
        ("avg_pool", [x], dict(kernel_size=2**33, stride=1, padding=0, dilation=1, ceil_mode=False,
                                count_include_pad=True)),
        ("downsample", [x], dict(stride=2**32)),
        ("dilate", [x], dict(stride=2**32)),
    ]
    for op, ins, attrs in cases:
        with pytest.raises(ValidationError, match=re.escape(str(LIMIT))):
            g.add(op, ins, attrs, name=f"bad_{op}")
    with pytest.raises(ValidationError, match=re.escape(str(LIMIT))):
        cc.conv_transpose(x, w, stride=2**32)
    with pytest.raises(ValidationError, match=re.escape(str(LIMIT))):
        cc.conv_transpose(x, w, stride=2, output_padding=2**32)


def test_item1_element_counts_beyond_int_are_refused():
    """Issue 16 item 1: tensors of more than 2**31-1 elements generated
    ``for (int i = 0; i < 2147488281; i++)``. Inputs, params (checked before
    any copy) and every op's output are bounded."""
    with pytest.raises(ValidationError, match=r"input 'x'.*2500000000 elements.*2147483647"):
        cc.Graph("g").input("x", (1, 1, 50000, 50000))
    with pytest.raises(ValidationError, match=r"param 'p'.*4294967296 elements"):
        cc.Graph("g").param("p", np.broadcast_to(np.float32(0), (2**16, 2**16)))
    g, x = image((1, 1, 40000, 40000))
    with pytest.raises(ValidationError, match=r"node 'up' \(dilate\).*elements, beyond 2147483647"):
        cc.dilate(x, 2, name="up")
    g, x = image()
    with pytest.raises(ValidationError, match=r"node 'c' \(conv\).*4000012000009 elements"):
        cc.conv(x, ones(1, 1, 3, 3), padding=10**6, name="c")
    assert cc.Graph("g").input("x", (LIMIT,)).shape == (LIMIT,)     # the limit itself is fine


def test_item1_scratch_beyond_int_is_refused_before_codegen():
    """Issue 16 item 1 (derived quantities): an op's scratch (here the FFT
    spectra of a 64x2048x2048 conv, 1.4e11 elements) is indexed with int in
    its template; the memory plan refuses it, naming the node, before any
    code is generated."""
    g, x = image((1, 64, 2048, 2048), "fft")
    w = g.param("w", ones(64, 64, 3, 3))
    g.output(g.add("fft_conv", [x, w], dict(stride=1, padding=1, dilation=1, groups=1, flip=False),
                   name="big_fft"), "y")
    with pytest.raises(ValidationError, match=r"node 'big_fft' \(fft_conv\): its scratch of 139619991552 "
                                              r"elements is beyond 2147483647"):
        cc.compile(g, passes="none")


def test_item1_stride_at_the_limit_compiles_and_runs():
    """Issue 16 item 1: the largest legal stride (2**31-1) compiles without
    overflow in the generated C and gives the reference's answer (one window
    at the origin)."""
    g, x = image((1, 2, 6, 7))
    w = np.arange(2 * 2 * 3 * 3, dtype=np.float32).reshape(2, 2, 3, 3)
    g.output(cc.conv(x, w, stride=(LIMIT, 2), padding=(0, 1)), "y")
    a = np.random.default_rng(0).standard_normal((1, 2, 6, 7)).astype(np.float32)
    want = cc.compile(g, target="numpy")(x=a)
    got = cc.compile(g, target="c")(x=a)
    assert got.shape == (1, 2, 1, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_item1_opencl_host_sizes_buffers_beyond_int(tmp_path):
    """Issue 16 item 1 (OpenCL index types): the OpenCL host program sized its
    params and arena with an ``enum`` (an int): an arena past 2 GiB was out of
    range. The host program of a graph with a 12.8 GB arena now compiles with
    -Wall -Wextra -Werror -pedantic (generated only: nothing is allocated)."""
    from convc.codegen.opencl import generate

    if not shutil.which("gcc") or not any(p.joinpath("CL", "cl.h").exists() for p in
                                          map(__import__("pathlib").Path, ("/usr/include", "/usr/local/include"))):
        pytest.skip("gcc or the OpenCL headers are missing")
    g, x = image((1, 1, 40000, 40000), "big")
    g.output(cc.relu(cc.relu(cc.relu(x))), "y")
    src = generate(g)
    assert src.plan.arena_bytes > 2**32
    (tmp_path / "host.c").write_text(src.host)
    sh([gcc(), "-std=c99", *STRICT, "-Wno-overlength-strings", "-Wno-unused-function", "-c", "host.c"], tmp_path)


# -- item 9: the memory cap ---------------------------------------------------------

def huge_graph():
    """64 outputs of 2**31 - 1 - 88047 float64 elements each: about 1 TiB,
    more than any machine this runs on, and legal for the index limit."""
    g, x = image((1, 1, 46340, 46340), "huge")
    x = cc.relu(x)
    for i in range(64):
        g.output(cc.relu(x, name=f"r{i}"), f"y{i}")
    return g


@pytest.mark.parametrize("target", ["c", "numpy"])
def test_item9_default_cap_is_available_memory(monkeypatch, target):
    """Issue 16 item 9: 5 GiB-500 TiB arenas built and generated code; the
    first error was numpy's MemoryError. compile() now refuses, before any
    code is generated or memory allocated, what exceeds the available memory,
    naming the total, the largest buffers and how to raise the cap."""
    monkeypatch.delenv("CONVC_MAX_MEMORY", raising=False)
    avail = available_memory()
    assert avail is not None and avail > 0
    with pytest.raises(ValidationError) as e:
        cc.compile(huge_graph(), target=target)
    msg = str(e.value)
    assert "graph 'huge'" in msg and "MemAvailable" in msg and "CONVC_MAX_MEMORY" in msg, msg
    assert "max_memory" in msg and re.search(r"output 'y\d+' float32\[1,1,46340,46340\]", msg), msg


def test_item9_available_memory_reads_meminfo():
    """Issue 16 item 9: the default cap is MemAvailable of /proc/meminfo."""
    try:
        text = open("/proc/meminfo").read()
    except OSError:
        pytest.skip("no /proc/meminfo")
    kib = int(re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M).group(1))
    assert abs(available_memory() - kib * 1024) < 2**30          # the machine's use moves meanwhile


def test_item9_cap_from_environment_and_argument(monkeypatch):
    """Issue 16 item 9: ``CONVC_MAX_MEMORY`` (bytes, K/M/G suffixes) and
    ``compile(..., max_memory=)`` set the cap; the argument wins; a cap that
    cannot be read is a clear error."""
    g, x = image((1, 1, 64, 64))
    g.output(cc.relu(cc.relu(x, name="r1")), "y")              # 16 KiB each: input, r1 (arena), output
    monkeypatch.setenv("CONVC_MAX_MEMORY", "40K")
    with pytest.raises(ValidationError, match=r"49,152 bytes.*cap of 40,960 bytes.*CONVC_MAX_MEMORY=40K.*"
                                              r"node 'r1' \(relu\)"):
        cc.compile(g)
    a = np.ones((1, 1, 64, 64), np.float32)
    assert cc.compile(g, max_memory="1M")(x=a).sum() == 4096   # the argument overrides the variable
    with pytest.raises(ValidationError, match="max_memory=1000"):
        cc.compile(g, max_memory=1000)
    monkeypatch.setenv("CONVC_MAX_MEMORY", "lots")
    with pytest.raises(ConvcError, match="CONVC_MAX_MEMORY.*'lots' is not a size"):
        cc.compile(g)
    assert [parse_bytes(v) for v in ("4096", "4K", "1.5M", "2G", "1T", "8GiB", 77)] == \
        [4096, 4096, 3 << 19, 2 << 30, 1 << 40, 8 << 30, 77]
    with pytest.raises(ValueError):
        parse_bytes("-1G")


def test_item9_export_is_not_capped_by_the_host(monkeypatch, tmp_path):
    """Issue 16 item 9: the embedded export is for a device: an arena bigger
    than this host's cap still exports (and compiles); only the harness, whose
    expected outputs are computed here, is refused, with a clear error."""
    monkeypatch.setenv("CONVC_MAX_MEMORY", "1M")
    g, x = image((1, 4, 256, 256), "wide")                     # 1 MiB a tensor: 2 MiB of arena
    g.output(cc.relu(cc.relu(cc.relu(x))), "y")
    exp = export_c(g, tmp_path, name="wide", harness=False)
    assert exp.arena_bytes >= 2 << 20
    sh([gcc(), "-std=c99", *STRICT, "-c", "wide.c"], tmp_path)
    with pytest.raises(ValidationError, match=r"test harness of graph 'wide' \(export with harness=False"):
        export_c(g, tmp_path / "h", name="wide")


# -- item 10: names C or the generated code reserve ------------------------------------

RESERVED = ["_Bool", "NULL", "NAN", "INFINITY", "uintptr_t", "CONVC_MR", "CONVC_NV", "int", "restrict", "bool",
            "true", "_Static_assert", "size_t", "int64_t", "INT64_C", "EOF", "HUGE_VAL", "M_PI", "errno",
            "math_errhandling", "linux", "unix", "stdout", "convc_first", "arena", "base", "i", "expf", "main"]


def reserved_graph(role: str) -> cc.Graph:
    """Every reserved name as an input (``role="inputs"``) or as an output."""
    g = cc.Graph("names")
    if role == "inputs":
        xs = [g.input(n, (1, 2, 3)) for n in RESERVED]
        acc = xs[0]
        for k, v in enumerate(xs[1:]):
            acc = cc.add(acc, cc.mul(v, float(k + 2)))
        g.output(acc, "y")
    else:
        x = g.input("x", (1, 2, 3))
        for k, n in enumerate(RESERVED):
            g.output(cc.mul(x, float(k + 1)), n)
    return g


@pytest.mark.parametrize("role", ["inputs", "outputs"])
def test_item10_reserved_names_export_and_compile(role, tmp_path):
    """Issue 16 item 10: inputs/outputs named _Bool, NULL, NAN, INFINITY,
    uintptr_t, CONVC_MR (and other keywords, standard macros and typedefs,
    convc's own identifiers) worked with cc.compile but gave an export gcc
    rejected. The export now renames such a C parameter (in_NAME, out_NAME),
    keeps NAME_<LABEL>_SIZE, and builds strict in C99 and GNU mode (where
    ``linux`` and ``unix`` are macros); its harness matches the reference."""
    g = reserved_graph(role)
    exp = export_c(g, tmp_path, name="net")
    for std in ("-std=c99", "-std=gnu99"):
        sh([gcc(), std, *STRICT, "-O1", "-o", "harness", "net_test.c", "net.c", "-lm"], tmp_path)
        out = sh(["./harness"], tmp_path).stdout
        assert "OK" in out and float(re.search(r"^max_error (\S+)$", out, re.M).group(1)) <= 1e-6, out
    header = (tmp_path / "net.h").read_text()
    for n in RESERVED:
        assert f"#define NET_{n.upper()}_SIZE 6" in header, n
    feeds = ({n: np.full((1, 2, 3), k, np.float32) for k, n in enumerate(RESERVED)} if role == "inputs"
             else {"x": np.arange(6, dtype=np.float32).reshape(1, 2, 3)})
    want = cc.compile(g, target="numpy").run(feeds)
    for target in targets():                                     # C and OpenCL at run time, too
        got = cc.compile(g, target=target).run(feeds)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, err_msg=f"{target} {k}")
    assert exp.name == "net"


# -- item 11: validation gaps --------------------------------------------------------

def test_item11_names_must_match_in_full_and_be_str():
    """Issue 16 item 11: name regexes used ``$`` (a trailing newline passed)
    and non-str names raised a bare TypeError."""
    with pytest.raises(GraphError, match="graph name 'g\\\\n'"):
        cc.Graph("g\n")
    for bad in (3, None, b"g"):
        with pytest.raises(GraphError, match="graph name must be a str"):
            cc.Graph(bad)
    g = cc.Graph("g")
    with pytest.raises(GraphError, match="node name 'x\\\\n'"):
        g.input("x\n", (1,))
    with pytest.raises(GraphError, match="node name must be a str"):
        g.input(3, (1,))
    x = g.input("x", (1,))
    for bad in ("y\n", "y z", "1y"):
        with pytest.raises(GraphError, match="output name"):
            g.output(cc.relu(x), bad)
    for bad in (5, b"y"):
        with pytest.raises(GraphError, match="output name must be a str"):
            g.output(cc.relu(x), bad)
    with pytest.raises(GraphError, match="op must be an op name"):
        g.add(["relu"], [x])
    with pytest.raises(GraphError, match="attrs must be a dict"):
        g.add("relu", [x], [("a", 1)])


@pytest.mark.parametrize("dim", [2.7, "3", True, np.float64(3), np.bool_(True), 3.0, None])
def test_item11_shapes_are_not_coerced(dim):
    """Issue 16 item 11: shapes were silently coerced (2.7 -> 2, "3" -> 3,
    True -> 1); only true integers (Python or numpy) are dimensions."""
    with pytest.raises(GraphError, match=r"input 'x': shape must be a tuple of ints"):
        cc.Graph("g").input("x", (1, dim))


def test_item11_numpy_integer_shapes_and_dtypes_are_fine():
    """Issue 16 item 11 (what stays legal): numpy integers as dimensions,
    numpy dtypes as dtype names."""
    g = cc.Graph("g")
    assert g.input("x", (np.int64(1), np.int32(3)), np.float64).type == cc.TensorType((1, 3), "float64")
    assert g.param("p", np.arange(3, dtype=np.uint8)).dtype == "int64"


@pytest.mark.parametrize("value, dtype, rule", [
    (np.array([1 + 2j]), None, "complex128 are not supported"),
    (np.array([1, 2], np.complex64), "float32", "complex64 are not supported"),
    (np.array([2**64 - 1], np.uint64), None, "do not fit int64"),
    ([2**70], None, "dtype object are not supported"),
    ([1.5, 2.0], "int64", "non-integral or non-finite"),
    ([np.inf], "int64", "non-integral or non-finite"),
    (np.full((1, 2, 3, 4), 1.5), "int64", "non-finite float values (e.g. 1.5)"),   # the message indexed a 4-D mask
    ([1e300], "float32", "do not fit float32"),
    (["a"], None, "<U1 are not supported"),
    ([None], "float32", "dtype object are not supported"),
    ([[1, 2], [3]], None, "not a numeric array"),
    ([1.0], "float16", "dtype 'float16' is not supported"),
    ([-1], "uint16", "do not fit uint16"),
    ([128], "int8", "do not fit int8"),
    ([-1], "uint8", "do not fit uint8"),
    ([2**31], "int32", "do not fit int32"),
    ([1.5], "int8", "non-integral or non-finite"),
])
def test_item11_param_values_that_do_not_fit_are_refused(value, dtype, rule):
    """Issue 16 item 11: complex params lost their imaginary part, uint64
    2**64-1 became -1, floats were truncated into int64 and overflowed to inf
    in float32, strings raised a bare ValueError."""
    with pytest.raises(GraphError, match=re.escape(rule)):
        cc.Graph("g").param("p", value, dtype)


def test_item11_param_values_that_fit_are_kept():
    """Issue 16 item 11 (what stays legal): integers within int64, integral
    floats as int64, inf and NaN as floats, float64 rounded into float32."""
    g = cc.Graph("g")

    def value(name, v, dtype=None):
        return g.node(g.param(name, v, dtype).name)["value"]
    np.testing.assert_array_equal(value("b", [3.0, -2.0], "int64"), [3, -2])
    v = value("c", [np.inf, np.nan, 1e-300, 3e38], "float32")
    assert np.isinf(v[0]) and np.isnan(v[1]) and v[2] == 0 and np.isfinite(v[3])
    assert value("d", np.array([2**63 - 1], np.uint64))[0] == 2**63 - 1
    assert value("e", np.array([True, False])).dtype == np.float32


GARBAGE = [None, "a", "", 1.5, -1, 0, 2**31, 2**40, -2**40, 2**63, [1.5], [[1]], [None], {}, (), True,
           np.float32(2), np.int64(2**40), float("nan"), float("inf"), [2**40, 2**40], [-5, -5], ["a", "b"]]


def recorded_adds(monkeypatch) -> list:
    """(graph, op, inputs, attrs) of every ``Graph.add`` made while building a
    graph with every public builder, its gradients and the default, blocked
    and study pipelines (which add the lowered ops: im2col, Winograd, FFT,
    NCHWc, fused separable...)."""
    from convc import models
    from convc.ir import Graph
    from convc.passes import run as run_passes

    calls = []
    real = Graph.add

    def spy(self, op, inputs, attrs=None, name=None):
        calls.append((self, op, list(inputs), dict(attrs or {})))
        return real(self, op, inputs, attrs, name)
    monkeypatch.setattr(Graph, "add", spy)
    rng = np.random.default_rng(0)

    def w(*shape):
        return g.param(f"w{len(g.param_names)}", rng.standard_normal(shape).astype(np.float32))
    g = cc.Graph("every")
    x = g.input("x", (2, 4, 10, 10))
    y = cc.conv(x, w(4, 4, 3, 3), w(4), padding=1)
    y = cc.batch_norm(y, w(4), g.param("var", np.linspace(0.5, 2, 4, dtype=np.float32)), w(4), w(4))
    y = cc.leaky_relu(cc.max_pool(cc.relu(y), 2, ceil_mode=True), 0.1)
    y = cc.conv_transpose(y, w(4, 4, 3, 3), stride=2, output_padding=1)
    y = cc.avg_pool(cc.pad(y, 1), 3, stride=1, count_include_pad=False)
    y = cc.depthwise_conv(cc.channel_shuffle(y, 2), w(4, 1, 3, 3), padding="same")
    y = cc.separable_conv(y, w(4, 1, 3, 3), w(8, 4, 1, 1), padding=1)
    y = cc.spatial_separable_conv(y, w(8, 1, 3, 1), w(8, 1, 1, 3), padding=1, groups=8)
    y = cc.resize(cc.downsample(cc.dilate(y, 2), 2), scale_factor=2.0, mode="bilinear")
    y = cc.local_conv(cc.sigmoid(y), w(2, 22, 22, 8, 3, 3))
    y = cc.tiled_conv(cc.tanh(y), w(2, 2, 3, 3, 2, 2))
    y = cc.clip(cc.silu(cc.hardswish(cc.gelu(y))), -1.0, 1.0)
    y = cc.concat([cc.hardsigmoid(y), cc.sub(y, cc.div(y, 2.0))], axis=1)
    y = cc.transpose(cc.slice_axis(y, 2, 0, 8), (0, 1, 3, 2))
    z = cc.reduce_sum(cc.global_avg_pool(y), (2, 3), keepdims=False)
    z = cc.softmax(cc.dense(cc.flatten(z), w(5, 4), w(5)))
    logits = cc.matmul(cc.reshape(z, (2, 5)), w(5, 3))
    loss = cc.add(cc.cross_entropy(logits, g.input("labels", (2,), "int64")),
                  cc.mse_loss(cc.expand(cc.reduce_sum(logits, (1,), keepdims=True), (2, 3)), logits))
    g.output(loss, "loss")
    cc.grad(loss, [g.value(n) for n in g.param_names])
    for m in (models.lenet5(), models.mobilenet_tiny(), g):
        for pipeline in ("default", "blocked", "study", ["conv_to_fft"], ["conv_to_im2col"]):
            run_passes(m.copy(), pipeline)
    return calls


def test_item11_every_op_attribute_garbage_is_a_validation_error(monkeypatch):
    """Issue 16 item 11: garbage attributes through the low-level ``g.add``
    (``{"stride": "a"}``, missing keys, lists of floats, None, nested lists,
    negative or huge values) raised bare KeyError/TypeError/ValueError/
    OverflowError in 60 ops, and boolean attributes took anything truthy.
    Now every variant of every recorded attribute either builds or raises a
    ValidationError naming the node and op; booleans refuse non-bools."""
    calls = recorded_adds(monkeypatch)
    monkeypatch.undo()
    seen, ops = set(), set()
    for g, op, inputs, attrs in calls:
        key = (op, tuple(sorted(attrs)))
        if key in seen:
            continue
        seen.add(key)
        ops.add(op)
        variants = [{k: v for k, v in attrs.items() if k != drop} for drop in attrs]
        variants += [dict(attrs, **{k: v}) for k in attrs for v in GARBAGE]
        for bad in variants:
            try:
                g.add(op, inputs, bad, name=g._fresh("fuzz"))
            except ValidationError as e:
                assert re.match(r"node 'fuzz_\d+' \(" + op + r"\): ", str(e)), str(e)
    assert len(ops) >= 55, sorted(ops)          # nearly every registered op was reached
    g, x = image()
    for attr in ("ceil_mode",):
        for bad in ("yes", [1], 2, None):
            with pytest.raises(ValidationError, match=f"{attr} must be True or False"):
                g.add("max_pool", [x], dict(kernel_size=2, stride=2, padding=0, dilation=1, **{attr: bad}))
    with pytest.raises(ValidationError, match="missing attribute 'stride'"):
        g.add("conv", [x, g.param("w", ones(1, 1, 3, 3))], {})


class SmallModules(dict):
    """One module of a small graph (a conv, an int64 param) per target,
    compiled on first use."""

    def __init__(self):
        super().__init__()
        self.graph = g = cc.Graph("r")
        x = g.input("x", (1, 1, 4, 4))
        w = g.param("w", np.ones((1, 1, 3, 3), np.float32))
        k = g.param("k", np.array([2], np.int64))
        g.output(cc.conv(x, w), "y")
        g.output(cc.mul(k, 3), "z")

    def __missing__(self, target):
        self[target] = cc.compile(self.graph, target=target)
        return self[target]


@pytest.fixture(scope="module")
def small_modules():
    mods = SmallModules()
    return mods.graph, mods


def targets():
    from helpers import TARGETS
    return TARGETS


@pytest.mark.parametrize("target", targets())
def test_item11_set_params_hostile_values(small_modules, target):
    """Issue 16 item 11: ``Module.set_params`` with strings, string arrays,
    ragged lists, complex or object values, out-of-range floats, a list
    instead of a dict: bare ValueError/AttributeError or a silent cast. All
    InputError now, naming the graph and param; good values still land."""
    g, mods = small_modules
    m = mods[target]
    bad = [
        ({"w": "abc"}, "dtype <U3 are not supported"),
        ({"w": np.full((1, 1, 3, 3), "a")}, "<U1 are not supported"),
        ({"w": [[1], [2, 3]]}, "not a numeric array"),
        ({"w": np.ones((1, 1, 3, 3), np.complex64)}, "complex64 are not supported"),
        ({"w": np.full((1, 1, 3, 3), None)}, "dtype object are not supported"),
        ({"w": np.full((1, 1, 3, 3), 1e300)}, "do not fit float32"),
        ({"w": np.ones((3, 3))}, "has shape (1, 1, 3, 3), got (3, 3)"),
        ({"w": None}, "dtype object are not supported"),
        ({"k": np.array([1.5])}, "non-integral"),
        ({"q": np.ones(3)}, "has no param 'q'"),
        ({"x": np.ones((1, 1, 4, 4))}, "has no param 'x'"),
        ({3: np.ones(3)}, "param names are str"),
    ]
    for values, rule in bad:
        with pytest.raises(InputError, match=re.escape(rule)):
            m.set_params(values)
    with pytest.raises(InputError, match="set_params\\(\\) takes a dict"):
        m.set_params([("w", np.ones((1, 1, 3, 3)))])
    a = np.ones((1, 1, 4, 4), np.float32)
    m.set_params({"w": np.full((1, 1, 3, 3), 2.0), "k": np.array([5.0])})    # float64 values that fit
    y, z = m(x=a)
    np.testing.assert_array_equal(y, np.full((1, 1, 2, 2), 18, np.float32))
    assert z.tolist() == [15]
    m.set_params({"w": np.ones((1, 1, 3, 3), np.float32), "k": np.array([2])})


@pytest.mark.parametrize("target", targets())
def test_item11_run_with_hostile_arrays(small_modules, target):
    """Issue 16 item 11: ``Module.run``/``__call__`` with a ragged list raised
    a bare ValueError and positional arrays a bare TypeError; every hostile
    feed is an InputError before any generated code runs, and odd but valid
    arrays (non-contiguous, read-only) still run."""
    g, mods = small_modules
    m = mods[target]
    a = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    for feed, rule in [(a.astype(object), "dtype object"), (a.astype(str), "dtype <U"),
                       (a.astype(np.complex64), "dtype complex64"), (a.astype(">f4"), "dtype >f4"),
                       (a[0], "shape (1, 4, 4)"), (np.float32(1), "shape ()"), (None, "dtype object"),
                       ([[1.0, 2.0], [3.0]], "is not an array of float32")]:
        with pytest.raises(InputError, match=re.escape(rule)):
            m(x=feed)
    for feeds, rule in [({}, "missing input(s) ['x']"), ({"x": a, "z": a}, "unknown input(s) ['z']"),
                        ({"x": a, 3: a}, "unknown input(s) [3]"), ([a], "takes a dict")]:
        with pytest.raises(InputError, match=re.escape(rule)):
            m.run(feeds)
    with pytest.raises(InputError, match=re.escape("keyword arrays, mod(x=...)")):
        m(a)
    want = m(x=a)[0]
    strided = np.zeros((1, 1, 4, 8), np.float32)
    strided[..., ::2] = a
    ro = a.copy()
    ro.flags.writeable = False
    for feed in (strided[..., ::2], ro):
        np.testing.assert_array_equal(m(x=feed)[0], want)


def test_item11_conv_matrix_bad_arguments():
    """Issue 16 item 11: ``cc.conv_matrix`` called with its arguments swapped
    raised a bare TypeError; a string shape, groups="a" or stride 0 bare
    ValueError/TypeError/ZeroDivisionError; a big image numpy's MemoryError
    (4 PiB). Each is a ValidationError now."""
    k = np.ones((1, 1, 3, 3))
    for args, kw, rule in [((k, (1, 5, 5)), {}, "are the arguments swapped?"),
                           (("abc", k), {}, "input_shape 'abc' is not a tuple of ints"),
                           (((1, 5.5, 5), k), {}, "is not a tuple of ints"),
                           (((1, 5, 5), "abc"), {}, "is not a real-valued kernel"),
                           (((1, 5, 5), k), dict(groups="a"), "do not split into 'a' groups"),
                           (((1, 5, 5), k), dict(stride=0), "stride must be >= 1"),
                           (((1, 5, 5), k), dict(flip="yes"), "flip must be True or False"),
                           (((1, 3, 3), np.ones((1, 1, 5, 5))), {}, "kernel extent"),
                           (((1, 5000, 5000), k), {}, "the dense 24980004 x 25000000 matrix")]:
        with pytest.raises(ValidationError, match=re.escape(rule)):
            cc.conv_matrix(*args, **kw)
    C = cc.conv_matrix((1, 4, 4), k)
    assert C.shape == (4, 16) and C.sum() == 36


def test_item1_index_limit_is_the_generated_int():
    """Issue 16 item 1: one limit, the range of the C and OpenCL ``int`` the
    templates index with, is what every check uses."""
    assert shapes.INDEX_MAX == np.iinfo(np.int32).max == LIMIT


BUILDERS = ["conv", "depthwise_conv", "separable_conv", "spatial_separable_conv", "flattened_conv", "conv_transpose",
            "conv_grad_input", "conv_grad_kernel", "local_conv", "tiled_conv", "downsample", "dilate", "pad",
            "channel_shuffle", "max_pool", "avg_pool", "global_avg_pool", "resize", "relu", "leaky_relu", "sigmoid",
            "tanh", "clip", "relu6", "silu", "hardswish", "hardsigmoid", "gelu", "reshape", "flatten", "expand",
            "transpose", "slice_axis", "reduce_sum", "dense", "matmul", "softmax", "batch_norm", "mse_loss",
            "cross_entropy"]


@pytest.mark.parametrize("fn", BUILDERS)
def test_item11_builders_refuse_what_is_not_a_value(fn):
    """Issue 16 item 11 (no bare exception for bad input): every public
    builder given None, a numpy array or a string where its tensor goes, or
    arguments its signature does not take, raised a bare AttributeError or
    TypeError; now a GraphError naming the builder."""
    builder = getattr(cc, fn)
    for bad in (None, np.ones((1, 1, 4, 4), np.float32), "x"):
        with pytest.raises(GraphError, match=f"^{fn}: "):
            builder(bad, *([] if fn in ("conv_grad_input", "conv_grad_kernel") else [np.ones((1, 1, 1, 1))]),
                    **({"grad": bad} if fn in ("conv_grad_input", "conv_grad_kernel") else {}))
    g, x = image()
    with pytest.raises(GraphError, match=f"^{fn}"):
        builder(x, bogus_argument=1)


def test_item11_concat_reshape_and_passes_arguments():
    """Issue 16 item 11: concat(x) (a Value, not a list) and concat([3, x])
    raised bare TypeError/AttributeError, reshape/expand coerced float sizes
    (2.0 -> 2), reduce_sum took "" or {} as axes, and compile(passes=3)
    raised a bare TypeError."""
    g, x = image((1, 2, 4, 4))
    for bad in (x, [3, x], 7):
        with pytest.raises(GraphError, match="concat takes a list of convc Values"):
            cc.concat(bad)
    with pytest.raises(ValidationError, match=r"\(reshape\): shape must be a tuple of ints, got \(2\.0, 16\)"):
        cc.reshape(x, (2.0, 16))
    with pytest.raises(ValidationError, match=r"\(expand\): shape must be a tuple of ints"):
        cc.expand(x, (1, 2, 4, "4"))
    assert cc.reshape(x, (np.int64(2), 16)).shape == (2, 16)
    for bad in ("", "1", {}, 1.0, [1.5]):                       # axes of reduce_sum: "" was no axis at all
        with pytest.raises(ValidationError, match=r"\(reduce_sum\): axes must be a tuple of ints"):
            cc.reduce_sum(x, bad)
    assert cc.reduce_sum(x, np.int64(1)).shape == (1, 4, 4)
    g.output(cc.relu(x), "y")
    for bad in (3, [["relu"]]):
        with pytest.raises(ConvcError, match="pass"):
            cc.compile(g, passes=bad)


@pytest.mark.parametrize("bad", [3, None, "g", np.zeros(3)])
def test_item11_entry_points_refuse_what_is_not_a_graph(bad):
    """Issue 16 item 11: public functions that take a graph (cost, passes.run,
    size_report) raised a bare AttributeError on ``3.verify()``; grad on a
    non-list ``wrt`` a bare TypeError."""
    from convc.export import size_report

    for fn in (cc.cost, lambda b: cc.passes.run(b, "default"), size_report, cc.compile):
        with pytest.raises(GraphError, match="takes a convc.Graph"):
            fn(bad)
    g = cc.Graph("t")
    x = g.input("x", (1, 2))
    with pytest.raises(GraphError, match="grad: y must be a convc Value"):
        cc.grad(bad, x)
    with pytest.raises(GraphError, match="wrt must be a Value or a list"):
        cc.grad(x, 3)

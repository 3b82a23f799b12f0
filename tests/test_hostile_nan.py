"""Issue 16, item 5: NaN, +-inf, huge finite values and -0.0 go through every
activation (value and gradient), clip, pool, softmax and cross-entropy
exactly as PyTorch takes them, on the numpy reference, C and OpenCL, both as
separate nodes and fused into a producer's epilogue (direct conv, GEMM via
im2col and 1x1, Winograd, NCHWc, col2im, dense, matmul).

Each table below goes into one graph per dtype, compiled once per target, so
the whole file costs a handful of compiles. By default float64 runs the
activations only (the templates of pools, softmax and epilogues do not depend
on the type) and the fused epilogues run in float32 with relu and one
other activation per producer; CONVC_TEST_FULL_NAN=1 runs every table in both
dtypes and every activation on every producer."""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convc as cc
from convc.ops.activations import ACTIVATIONS, TABLE
from convc.passes import run as run_passes
from helpers import TARGETS, torch_activation

DTYPES = ("float32", "float64")
FULL = os.environ.get("CONVC_TEST_FULL_NAN", "") not in ("", "0")
INF, NAN = float("inf"), float("nan")


def special_values(dtype: str) -> np.ndarray:
    """NaN, +-inf, the largest finite values of the type and around where
    exp overflows or underflows (float32 near 88.7, float64 near 709.8),
    the kinks of relu/clip/hardswish/hardsigmoid, signed zeros and tiny values."""
    huge = [3e38, -3e38] + ([1e308, -1e308, 710.0, -710.0, 745.5, -745.5] if dtype == "float64" else [])
    v = [NAN, INF, -INF, *huge, 100.0, -100.0, 89.0, -89.0, 88.5, -88.5, 87.0, -87.0, 30.0, -30.0,
         6.0, -6.0, 3.0, -3.0, 1.0, -1.0, 0.5, 0.0, -0.0, 1e-30, -1e-30, 1e-40, -1e-40]
    return np.array(v, dtype)


def tiled(v: np.ndarray, n: int = 64) -> np.ndarray:
    """``v`` repeated to a multiple of ``n`` elements: torch runs every element
    through its vectorised kernel (its scalar tail loop treats NaN differently in
    some backward kernels, e.g. hardswish's, so its answer would depend on the
    position)."""
    reps = -(-len(v) // n) * n
    return np.resize(v, reps)


def torch_answer(fn, xa: np.ndarray, ga: np.ndarray, kind: str, grad: bool = True):
    """torch's value and input gradient of ``fn`` at ``xa`` for output
    gradient ``ga``, in ``xa``'s dtype: the same overflow of intermediates
    (hardswish(3e38) is inf in float32 as in torch). One exception: torch's
    vectorised float32 gelu gives gelu(+inf) = NaN (its erf) and gelu(3e38) =
    inf (its order of operations), where its float64 kernel, the math and
    convc give +inf and 3e38: float32 gelu values are checked against torch's
    float64 gelu rounded to float32."""
    tx = torch.tensor(xa, requires_grad=grad)
    ty = fn(tx)
    y = ty.detach().numpy()
    if kind == "gelu" and xa.dtype == np.float32:
        y = fn(torch.tensor(xa, dtype=torch.float64)).numpy().astype(np.float32)
    if not grad:
        return y
    ty.backward(torch.tensor(ga))
    return y, tx.grad.numpy()


# finite inputs where a derivative has a kink and convc's one-sided choice differs from
# torch's: clip and hardsigmoid take their derivative from y, which cannot tell x == bound
# from x beyond it (torch gives gy at x == bound for clip, 0 for hardsigmoid at +-3)
GRAD_KINKS = {"clip": lambda p: [p["min"], p["max"]], "hardsigmoid": lambda p: [-3.0, 3.0]}


# (kind, params): every record with its defaults and the params that change its form
VARIANTS = [(k, {}) for k in ACTIVATIONS] + [
    ("leaky_relu", {"negative_slope": -0.5}),
    ("clip", {"min": 0.0, "max": 6.0}),
    ("clip", {"min": 1.0, "max": -1.0}),
]
IDS = [k + "".join(f"-{p}={v:g}" for p, v in ps.items()) for k, ps in VARIANTS]


def torch_act(kind, params):
    """The torch twin; hardsigmoid is torch's own op here (its NaN and
    gradient behaviour at the special values is what convc must match)."""
    return F.hardsigmoid if kind == "hardsigmoid" else torch_activation(kind, params)


def assert_same(got, want, what, rtol=None, zero_sign=True):
    """NaN exactly where ``want`` has NaN, +-inf exactly where it has them,
    finite values close, and with ``zero_sign`` a zero's sign as in ``want``
    (PyTorch keeps -0.0 through relu and clip)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    rtol = rtol if rtol is not None else (1e-5 if want.dtype == np.float32 else 1e-7)
    # (torch's float64 hardsigmoid derivative is the float32 1/6); atol: cancellation near 0
    # (1 + erf, 1 - y^2) and libm differences
    atol = 1e-6 if want.dtype == np.float32 else 1e-12
    bad = np.isnan(got) != np.isnan(want)
    inf = np.isinf(want) | np.isinf(got)
    bad |= inf & (got != want)
    fin = np.isfinite(want) & np.isfinite(got)
    g, w = np.where(fin, got, 0).astype(np.float64), np.where(fin, want, 0).astype(np.float64)
    bad |= fin & ~(np.abs(g - w) <= rtol * np.abs(w) + atol)
    if zero_sign:
        bad |= (want == 0) & (got == 0) & (np.signbit(got) != np.signbit(want))
    if bad.any():
        idx = np.flatnonzero(bad)
        lines = [f"  [{i}] got {got.flat[i]!r} want {want.flat[i]!r}" for i in idx[:12]]
        raise AssertionError(f"{what}: {idx.size} of {got.size} differ from torch\n" + "\n".join(lines))


def check_all(cases):
    """assert_same on every (got, want, what) of ``cases``; one failure lists them all."""
    errors = []
    for got, want, what in cases:
        try:
            assert_same(got, want, what)
        except AssertionError as e:
            errors.append(str(e))
    assert not errors, "\n".join(errors)


def _compile_all(g, feeds):
    return {t: cc.compile(g, target=t, passes="none").run(feeds) for t in TARGETS}


# -- one graph per dtype: activations, pools, softmax, cross-entropy ----------------------
@pytest.fixture(scope="module", params=DTYPES)
def runs(request):
    """Every node test of this file in one graph per dtype, compiled once per target."""
    dtype = request.param
    g, feeds, want = cc.Graph(f"nan_{dtype[-2:]}"), {}, {}
    add_activations(g, dtype, feeds, want)
    if dtype == "float32" or FULL:
        add_pools(g, dtype, feeds, want)
    if dtype == "float32" or FULL:
        add_softmax(g, dtype, feeds, want)
    return dtype, _compile_all(g, feeds), want


def add_activations(g, dtype, feeds, want):
    """Every activation variant of x (the special values) and its gradient for gy = 1."""
    xa = tiled(special_values(dtype))
    x = g.input("x", xa.shape, dtype)
    gy = g.input("gy", xa.shape, dtype)
    ga = np.ones_like(xa)
    feeds.update({"x": xa, "gy": ga})
    for i, (kind, params) in enumerate(VARIANTS):
        y = g.add(kind, [x], dict(params), f"act{i}")
        g.output(y, f"y{i}")
        g.output(cc.grad(y, x, grad_output=gy), f"dx{i}")
        want[f"y{i}"], want[f"dx{i}"] = torch_answer(torch_act(kind, params), xa, ga, kind)
        kinks = GRAD_KINKS.get(kind, lambda p: [])(TABLE[kind].normalize(params))
        want[f"kink{i}"] = np.isin(xa, kinks)


@pytest.mark.parametrize("i", range(len(VARIANTS)), ids=IDS)
def test_item5_activation_nan_inf_as_torch(runs, i):
    """Issue 16 item 5: every activation's value and gradient on NaN, +-inf,
    huge finite values and -0.0, on every target, equals torch's."""
    dtype, got, want = runs
    keep = ~want[f"kink{i}"]
    check_all([(got[t][f"{k}{i}"][keep], want[f"{k}{i}"][keep], f"{IDS[i]} {dtype} {what} [{t}]")
               for t in TARGETS for k, what in (("y", "value"), ("dx", "gradient"))])


# -- pools: max (NaN wins, as in torch; -inf windows), average and global average --------
# (name, rank, torch function, convc builder)
POOLS = [
    ("max2d_k3s2p1", 2, lambda t: F.max_pool2d(t, 3, 2, 1), lambda x: cc.max_pool(x, 3, 2, 1)),
    ("max2d_k2s2_ceil", 2, lambda t: F.max_pool2d(t, 2, 2, ceil_mode=True),
     lambda x: cc.max_pool(x, 2, 2, ceil_mode=True)),
    ("max2d_k3s1_d2", 2, lambda t: F.max_pool2d(t, 3, 1, 0, 2), lambda x: cc.max_pool(x, 3, 1, 0, 2)),
    ("max1d_k3s2p1", 1, lambda t: F.max_pool1d(t, 3, 2, 1), lambda x: cc.max_pool(x, 3, 2, 1)),
    ("max3d_k2", 3, lambda t: F.max_pool3d(t, 2), lambda x: cc.max_pool(x, 2)),
    ("avg2d_k3s2p1", 2, lambda t: F.avg_pool2d(t, 3, 2, 1), lambda x: cc.avg_pool(x, 3, 2, 1)),
    ("avg2d_k2_nopad", 2, lambda t: F.avg_pool2d(t, 2, 1, 1, count_include_pad=False),
     lambda x: cc.avg_pool(x, 2, 1, 1, count_include_pad=False)),
    ("global_avg", 2, lambda t: t.mean(dim=(2, 3), keepdim=True), cc.global_avg_pool),
]
POOL_SHAPES = {1: (2, 3, 15), 2: (2, 3, 9, 9), 3: (2, 3, 4, 5, 5)}


def pool_input(rank, dtype, seed):
    """Mostly normal values with the special values sprinkled in, one whole
    plane NaN-free but -inf (every window -inf) and one all +inf."""
    rng = np.random.default_rng(seed)
    xa = rng.standard_normal(POOL_SHAPES[rank]).astype(dtype)
    flat = xa.reshape(-1)
    at = rng.choice(flat.size, size=flat.size // 4, replace=False)
    flat[at] = np.resize(special_values(dtype), at.size)
    xa[0, 1] = -np.inf
    xa[1, 2] = np.inf
    return xa


def add_pools(g, dtype, feeds, want):
    """Every pool of POOLS, value and (max and average) input gradient."""
    for i, (name, rank, tfn, build) in enumerate(POOLS):
        xa = pool_input(rank, dtype, i)
        x = g.input(f"px{i}", xa.shape, dtype)
        y = build(x)
        ga = np.random.default_rng(50 + i).standard_normal(y.shape).astype(dtype)
        gy = g.input(f"pg{i}", y.shape, dtype)
        feeds.update({f"px{i}": xa, f"pg{i}": ga})
        g.output(y, f"py{i}")
        g.output(cc.grad(y, x, grad_output=gy), f"pdx{i}")
        tx = torch.tensor(xa, requires_grad=True)
        ty = tfn(tx)
        ty.backward(torch.tensor(ga))
        want[f"py{i}"], want[f"pdx{i}"] = ty.detach().numpy(), tx.grad.numpy()


@pytest.mark.parametrize("i", range(len(POOLS)), ids=[p[0] for p in POOLS])
def test_item5_pool_nan_inf_as_torch(runs, i):
    """Issue 16 item 5: max pools propagate NaN (and send its gradient to the
    NaN) and -inf, average pools inf - inf = NaN, on every target, as torch."""
    dtype, got, want = runs
    if f"py{i}" not in want:
        pytest.skip("pools run in float32 (CONVC_TEST_FULL_NAN=1: both dtypes)")
    check_all([(got[t][f"{k}{i}"], want[f"{k}{i}"], f"{POOLS[i][0]} {dtype} {k} [{t}]")
               for t in TARGETS for k in ("py", "pdx")])


# -- softmax and cross-entropy (its log-sum-exp and gradient) -----------------------------------
SOFTMAX_ROWS = [[INF, 1, 2, 0], [1, INF, INF, 0], [-INF, -INF, -INF, -INF], [-INF, 0, 1, 2],
                [NAN, 1, 2, 0], [1, 2, 0, NAN], [3e38, -3e38, 0, 1], [-INF, INF, 0, 1],
                [1e30, 1e30, 0, -1e30], [-3e38, -3e38, -3e38, -3e38], [0, 0, 0, 0], [-0.0, 1, 2, 3]]


def add_softmax(g, dtype, feeds, want):
    """softmax over the last axis and over axis 0 (strided rows), and
    cross-entropy with labels 0 and 1 for every row, value and gradient."""
    za = np.array(SOFTMAX_ROWS, dtype)
    z = g.input("sz", za.shape, dtype)
    zt = g.input("szt", za.T.shape, dtype)
    feeds.update({"sz": za, "szt": np.ascontiguousarray(za.T)})
    g.output(cc.softmax(z, axis=1), "softmax")
    g.output(cc.softmax(zt, axis=0), "softmax_t")
    want["softmax"] = F.softmax(torch.tensor(za), 1).numpy()
    want["softmax_t"] = np.ascontiguousarray(want["softmax"].T)
    n, c = za.shape
    for label in (0, 1):                 # label 0 meets -inf (loss inf) and 3e38 rows, 1 the others
        la = np.full(n, label, np.int64)
        lab = g.input(f"lab{label}", (n,), "int64")
        zc = g.input(f"cz{label}", za.shape, dtype)
        feeds.update({f"lab{label}": la, f"cz{label}": za})
        loss = cc.cross_entropy(zc, lab)
        g.output(loss, f"ce{label}")
        g.output(cc.grad(loss, zc), f"dce{label}")
        tz = torch.tensor(za, requires_grad=True)
        tl = F.cross_entropy(tz, torch.tensor(la))
        tl.backward()
        want[f"ce{label}"], want[f"dce{label}"] = tl.detach().numpy(), tz.grad.numpy()
        # the rows without NaN or +inf: the loss is finite or +inf, the gradient finite
        rows = [6, 8, 9, 10, 11] + ([3] if label else [])
        zf = g.input(f"zf{label}", (len(rows), c), dtype)
        lf = g.input(f"labf{label}", (len(rows),), "int64")
        feeds.update({f"zf{label}": za[rows], f"labf{label}": la[rows]})
        loss = cc.cross_entropy(zf, lf)
        g.output(loss, f"cef{label}")
        g.output(cc.grad(loss, zf), f"dcef{label}")
        tz = torch.tensor(za[rows], requires_grad=True)
        tl = F.cross_entropy(tz, torch.tensor(la[rows]))
        tl.backward()
        want[f"cef{label}"], want[f"dcef{label}"] = tl.detach().numpy(), tz.grad.numpy()


def test_item5_softmax_nan_inf_as_torch(runs):
    """Issue 16 item 5: softmax rows with NaN, +-inf, all -inf and huge
    values equal torch's, on every target."""
    dtype, got, want = runs
    if "softmax" not in want:
        pytest.skip("softmax runs in float32 (CONVC_TEST_FULL_NAN=1: both dtypes)")
    check_all([(got[t][k], want[k], f"{k} {dtype} [{t}]") for t in TARGETS for k in ("softmax", "softmax_t")])


def test_item5_cross_entropy_nan_inf_as_torch(runs):
    """Issue 16 item 5: cross-entropy's log-sum-exp and gradient with NaN,
    +-inf and huge logits equal torch's (all rows; the rows without NaN or +inf)."""
    dtype, got, want = runs
    keys = [k for k in want if k.startswith(("ce", "dce"))]
    if not keys:
        pytest.skip("cross-entropy runs in float32 (CONVC_TEST_FULL_NAN=1: both dtypes)")
    check_all([(got[t][k], want[k], f"{k} {dtype} [{t}]") for t in TARGETS for k in keys])


# -- fused into a producer's epilogue ----------------------------------------------------------
# (name, producer op the passes must make, passes, builder(sub-graph, x) -> pre-activation value,
#  torch of the same). The producer reads x = 0 with zero bias, and its epilogue adds a residual r
# holding the special values, so the activation sees exactly r whatever the lowering's arithmetic.
def _conv(ci, co, k, s, groups=1):
    def build(g, x, rng):
        w = rng.standard_normal((co, ci // groups, k, k)) / 3
        b = np.zeros(co)
        return (cc.conv(x, g.param("w", w.astype(x.dtype)), g.param("b", b.astype(x.dtype)), stride=s,
                        padding=k // 2, groups=groups, name="prod"),
                lambda tx: F.conv2d(tx, torch.tensor(w, dtype=tx.dtype), torch.tensor(b, dtype=tx.dtype),
                                    stride=s, padding=k // 2, groups=groups))
    return build


def _conv_transpose(ci, co, k, s):
    def build(g, x, rng):
        w = rng.standard_normal((ci, co, k, k)) / 3
        return (cc.conv_transpose(x, g.param("w", w.astype(x.dtype)), None, stride=s, padding=1, name="prod"),
                lambda tx: F.conv_transpose2d(tx, torch.tensor(w, dtype=tx.dtype), stride=s, padding=1))
    return build


def _dense(fi, fo):
    def build(g, x, rng):
        w, b = rng.standard_normal((fo, fi)) / 3, np.zeros(fo)
        return (cc.dense(cc.flatten(x), g.param("w", w.astype(x.dtype)), g.param("b", b.astype(x.dtype)),
                         name="prod"),
                lambda tx: F.linear(tx.flatten(1), torch.tensor(w, dtype=tx.dtype), torch.tensor(b, dtype=tx.dtype)))
    return build


PRODUCERS = [
    ("direct", "conv", ["fuse_epilogues"], (3, 6), _conv(3, 4, 3, 1)),
    ("depthwise", "conv", ["conv_to_gemm", "fuse_epilogues"], (8, 9), _conv(8, 8, 3, 2, groups=8)),
    ("winograd", "winograd_conv", ["conv_to_winograd", "fuse_epilogues"], (8, 7), _conv(8, 8, 3, 1)),
    ("gemm_im2col", "matmul", ["conv_to_gemm", "fuse_epilogues"], (16, 9), _conv(16, 24, 3, 2)),
    ("gemm_1x1", "matmul", ["conv_to_gemm", "fuse_epilogues"], (32, 6), _conv(32, 48, 1, 1)),
    ("nchwc", "conv_nchwc", ["fuse_epilogues", "to_blocked_layout"], (16, 6), _conv(16, 16, 3, 1)),
    ("col2im", "col2im", ["transposed_to_matmul", "fuse_epilogues"], (6, 5), _conv_transpose(6, 5, 4, 2)),
    ("dense", "dense", ["fuse_epilogues"], (4, 3), _dense(36, 20)),
]


def add_fused_case(g, tag, producer, kind, params, dtype, feeds, want):
    """Producer ``producer`` with activation ``kind`` fused (checked), copied into ``g`` under
    names prefixed ``tag``; records its feeds and torch's answer."""
    name, op, passes, (c, n), build = producer
    rng = np.random.default_rng(len(tag))
    sub = cc.Graph("fused")
    x = sub.input("x", (2, c, n, n), dtype)
    pre, tfn = build(sub, x, rng)
    r = sub.input("r", pre.shape, dtype)
    sub.output(sub.add(kind, [cc.add(pre, r)], dict(params), "act"), "y")
    fused = run_passes(sub, passes)
    nodes = [fused.node(v) for v in fused.nx.nodes]
    made = [d for d in nodes if d["op"] == op]
    assert made and made[-1]["attrs"].get("activation") == kind and made[-1]["attrs"].get("residual"), (
        f"{name}: {kind} not fused into a {op} with a residual: {fused}")
    names = {v: f"{tag}_{v}" for v in fused.nx.nodes}
    for v in fused.topological_order():
        d = fused.node(v)
        if d["op"] == "input":
            g.input(names[v], d["type"].shape, dtype)
        elif d["op"] == "param":
            g.param(names[v], d["value"])
        else:
            g.add(d["op"], [g.value(names[s]) for s in fused.inputs_of(v)], dict(d["attrs"]), names[v])
    g.output(g.value(names[fused.outputs["y"]]), tag)
    xa = np.zeros(x.shape, dtype)
    ra = rng.permutation(np.resize(special_values(dtype), pre.shape).ravel()).reshape(pre.shape)
    feeds.update({f"{tag}_x": xa, f"{tag}_r": ra})
    want[tag] = torch_answer(lambda t: torch_act(kind, params)(tfn(t) + torch.tensor(ra)), xa,
                             np.zeros(()), kind, grad=False)


# every producer with relu (the fused activation of nearly every conv), the first four also with
# one of those that compare (clip, leaky_relu, hardswish, hardsigmoid); FULL: every activation
# (the others of SECOND too) on every producer
SECOND = ["clip-min=0-max=6", "leaky_relu", "hardswish", "hardsigmoid", "clip-min=1-max=-1",
          "leaky_relu-negative_slope=-0.5", "silu", "gelu_tanh"]
FUSED = [(p, VARIANTS[j]) for i, p in enumerate(PRODUCERS)    # (the second only on the first four: time)
         for j in (((0, IDS.index(SECOND[i])) if i < 4 else (0,)) if not FULL else range(len(VARIANTS)))]
FUSED_IDS = [f"{p[0]}-{IDS[VARIANTS.index(v)]}" for p, v in FUSED]


@pytest.fixture(scope="module", params=DTYPES if FULL else DTYPES[:1])
def fused_runs(request):
    dtype = request.param
    g, feeds, want = cc.Graph(f"nan_fused_{dtype[-2:]}"), {}, {}
    for i, (p, (kind, params)) in enumerate(FUSED):
        add_fused_case(g, f"f{i}", p, kind, params, dtype, feeds, want)
    return dtype, _compile_all(g, feeds), want


@pytest.mark.parametrize("i", range(len(FUSED)), ids=FUSED_IDS)
def test_item5_fused_epilogue_nan_inf_as_torch(fused_runs, i):
    """Issue 16 item 5: an activation fused into each producer's epilogue
    (direct, depthwise, Winograd, GEMM, NCHWc, col2im, dense) keeps NaN,
    +-inf and huge values as torch does, on every target."""
    dtype, got, want = fused_runs
    check_all([(got[t][f"f{i}"], want[f"f{i}"], f"{FUSED_IDS[i]} {dtype} [{t}]") for t in TARGETS])


def test_item5_embedded_export_keeps_nan(tmp_path):
    """Issue 16 item 5: the embedded export (its own entry point and arena,
    the same node templates) keeps NaN and +-inf through a conv with fused
    relu, a max pool and softmax: its harness compares with the reference,
    for which NaN must meet NaN (a 0 where NaN is expected fails it)."""
    if not shutil.which("gcc"):
        pytest.skip("gcc is not installed")
    g = cc.Graph("nan_export")
    x = g.input("x", (1, 2, 6, 6))
    w = g.param("w", np.random.default_rng(4).standard_normal((3, 2, 1, 1)).astype(np.float32))
    y = cc.relu(cc.conv(x, w, name="conv"))
    g.output(cc.max_pool(y, 2), "pool")
    g.output(cc.softmax(cc.flatten(cc.clip(y, 0.0, 6.0)), axis=1), "p")
    xa = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
    xa[0, 0, 1, 1], xa[0, 1, 4, 4], xa[0, 0, 5, 0] = np.nan, np.inf, -np.inf
    exp = cc.export_c(g, tmp_path, name="nanx", test_inputs=[{"x": xa}])
    assert np.isnan(cc.compile(g, target="numpy").run({"x": xa})["pool"]).any()
    src = (tmp_path / "nanx.c").read_text()
    assert "< 0 ? 0 :" in src, "relu fused into the conv as x < 0 ? 0 : x"
    subprocess.run(["gcc", "-std=c99", "-O2", "-o", "harness", "nanx_test.c", "nanx.c", "-lm"], cwd=tmp_path,
                   check=True, capture_output=True, text=True, timeout=300)
    run = subprocess.run(["./harness"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout
    assert exp.name == "nanx"

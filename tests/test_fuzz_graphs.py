"""Random valid graphs under AddressSanitizer and UBSan, against the numpy reference.

hypothesis draws batches of random chains: an input (1D/2D/3D, float32 or
float64), then one to four ops among the conv family (strides, asymmetric
padding, dilation, groups, flip, bias, transposed with output padding),
pools, activations, elementwise ops with broadcast params, and layout ops
(pad/crop, slice, transpose, reshape, concat, dilate, downsample, channel
shuffle); half of the chains also get their gradients (``cc.grad`` with a
``grad_output`` input, with respect to the input and every param). A batch is
ONE graph (every chain its own inputs and outputs), built again in a child
process that compiles it with ``-fsanitize=address,undefined
-fno-sanitize-recover=all`` (libasan preloaded, leak checks off) under each
of :data:`FUZZ_PIPELINES` (the default, and pipelines that force the GEMM,
Winograd F(4x4) + FFT, and the NCHWc layout), runs it, and compares every
output with ``cc.compile(g, target="numpy")``. Any sanitizer report kills the
child with a non-zero status.

The default run is bounded (``DEFAULT_EXAMPLES`` batches, derandomized so CI
is deterministic); ``CONVC_FUZZ_EXAMPLES=N`` runs N random chains (in
batches of CHAINS_PER_GRAPH), each batch under every pipeline, with fresh
random draws on every run (a failure prints the batch, which
``build_batch`` rebuilds, and hypothesis's reproduction blob).
``test_sanitizer_catches_a_bad_graph`` checks the harness is not vacuous.
"""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

import convc as cc
from convc.errors import ConvcError

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import helpers  # noqa: E402

DEFAULT_EXAMPLES = 2
CHAINS_PER_GRAPH = 6
ALL_PIPELINES = "CONVC_FUZZ_EXAMPLES" in os.environ
EXAMPLES = -(-int(os.environ["CONVC_FUZZ_EXAMPLES"]) // CHAINS_PER_GRAPH) if ALL_PIPELINES else DEFAULT_EXAMPLES
"""Batches to draw. A sanitized compile of one batch takes gcc ~5-25 s here:
the default run compiles each batch under two of the four pipelines, in turn
(every pipeline once over the two batches). CONVC_FUZZ_EXAMPLES=N (shared
with the ONNX fuzz) asks for N random graphs: ceil(N / CHAINS_PER_GRAPH)
batches, each under every pipeline."""
SANITIZE = "-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"

FUZZ_PIPELINES = {
    # name: (pass list, algorithm forced on every conv-like node (helpers.forcing_database) or None)
    "default": ("default", None),
    "gemm": ("train", "gemm"),
    "winograd4_fft": (["fold_constants", "conv_to_winograd", "conv_to_fft", "transposed_to_matmul",
                       "fuse_epilogues", "fuse_separable", "eliminate_dead_code"], "winograd4"),
    "blocked": ("blocked", None),
}

ACTIVATIONS = ("relu", "leaky_relu", "sigmoid", "tanh", "silu", "hardswish", "gelu", "clip")
OPS = ("conv", "conv", "conv", "conv_transpose", "max_pool", "avg_pool", "activation", "pad", "slice",
       "transpose", "reshape", "concat", "add_param", "gate", "dilate", "downsample", "channel_shuffle")


# -- building a chain from its spec (parent and child) ----------------------------------------------
def _divisors(c: int) -> list[int]:
    return [d for d in range(1, c + 1) if c % d == 0]


def _activation(v, which: str, name: str):
    if which == "clip":
        return cc.clip(v, -0.5, 0.75, name=name)
    if which == "leaky_relu":
        return cc.leaky_relu(v, 0.1, name=name)
    return getattr(cc, which)(v, name=name)


def apply_op(g, v, op: str, p: dict, name: str, rng: np.random.Generator, params: list):
    """Apply one drawn op to ``v``; new params are appended to ``params``."""
    rank, dtype, c = len(v.shape) - 2, v.dtype, v.shape[1]

    def param(suffix, shape, scale=1.0):
        w = g.param(f"{name}_{suffix}", (rng.standard_normal(shape) * scale).astype(dtype))
        params.append(w)
        return w

    if op in ("conv", "conv_transpose"):
        groups = p["groups"]
        k = tuple(p["kernel"][:rank])
        geo = dict(stride=tuple(p["stride"][:rank]), dilation=tuple(p["dilation"][:rank]), groups=groups)
        fan = (c // groups) * int(np.prod(k))
        if op == "conv":
            w = param("w", (groups * p["mult"], c // groups) + k, 1 / np.sqrt(fan))
            b = param("b", (groups * p["mult"],)) if p["bias"] else None
            return cc.conv(v, w, bias=b, padding=tuple(map(tuple, p["padding"][:rank])), flip=p["flip"],
                           name=name, **geo)
        w = param("w", (c, p["mult"]) + k, 1 / np.sqrt(fan))
        b = param("b", (groups * p["mult"],)) if p["bias"] else None
        return cc.conv_transpose(v, w, bias=b, padding=tuple(map(tuple, p["padding"][:rank])),
                                 output_padding=tuple(p["output_padding"][:rank]), name=name, **geo)
    if op == "max_pool":
        return cc.max_pool(v, p["kernel"][:rank], stride=p["stride"][:rank], padding=p["pad"],
                           dilation=p["dilation"][:rank], ceil_mode=p["ceil"], name=name)
    if op == "avg_pool":
        return cc.avg_pool(v, p["kernel"][:rank], stride=p["stride"][:rank], padding=p["pad"], ceil_mode=p["ceil"],
                           count_include_pad=p["include_pad"], name=name)
    if op == "activation":
        return _activation(v, p["which"], name)
    if op == "pad":
        return cc.pad(v, tuple(map(tuple, p["pads"][:rank])), value=p["value"], name=name)
    if op == "slice":
        ax = p["axis"] % len(v.shape)
        n = v.shape[ax]
        start = p["start"] % n
        return cc.slice_axis(v, ax, start, start + 1 + p["len"] % (n - start), name=name)
    if op == "transpose":
        return cc.transpose(v, tuple(p["perm"]), name=name)
    if op == "reshape":
        # merge channels into the first spatial axis, or flatten the spatial axes
        shape = (v.shape[0], 1, v.shape[1] * int(np.prod(v.shape[2:]))) if p["flatten"] else \
            (v.shape[0], v.shape[1] * v.shape[2]) + v.shape[3:] if rank > 1 else (v.shape[0], 1, v.shape[1] * v.shape[2])
        return cc.reshape(v, shape, name=name)
    if op == "concat":
        other = _activation(v, p["which"], f"{name}_other")
        return cc.concat([v, other] if p["first"] else [other, v], axis=p["axis"] % len(v.shape), name=name)
    if op == "add_param":
        b = param("p", (c,) + (1,) * rank)
        return (cc.add if p["add"] else cc.mul)(v, b, name=name)
    if op == "gate":
        return cc.mul(v, cc.sigmoid(v, name=f"{name}_sig"), name=name)
    if op == "dilate":
        return cc.dilate(v, tuple(p["stride"][:rank]), name=name)
    if op == "downsample":
        return cc.downsample(v, tuple(p["stride"][:rank]), name=name)
    if op == "channel_shuffle":
        return cc.channel_shuffle(v, p["groups"], name=name)
    raise AssertionError(op)


def build_chain(g, chain: dict, prefix: str, feeds: dict):
    """Build one chain into ``g``; returns its output names. Replays exactly
    what the strategy accepted (``chain["ops"]``)."""
    rng = np.random.default_rng(chain["seed"])
    x = g.input(f"{prefix}_x", tuple(chain["shape"]), chain["dtype"])
    feeds[x.name] = rng.standard_normal(chain["shape"]).astype(chain["dtype"])
    params: list = []
    v = x
    for i, (op, p) in enumerate(chain["ops"]):
        v = apply_op(g, v, op, p, f"{prefix}_{i}{op}", rng, params)
    outs = [g.output(v, f"{prefix}_y")]       # Values: the chain's output first, then the gradients
    if chain["grad"]:
        gy = g.input(f"{prefix}_gy", v.shape, chain["dtype"])
        feeds[gy.name] = rng.standard_normal(v.shape).astype(chain["dtype"])
        for i, d in enumerate(cc.grad(v, [x, *params], grad_output=gy)):
            outs.append(g.output(d, f"{prefix}_d{i}"))
    return outs


def build_batch(chains: list) -> tuple:
    g = cc.Graph("fuzz")
    feeds: dict = {}
    for i, chain in enumerate(chains):
        build_chain(g, chain, f"c{i}", feeds)
    return g, feeds


# -- the strategy -------------------------------------------------------------------------------------
def _triple(lo, hi):
    return st.lists(st.integers(lo, hi), min_size=3, max_size=3)


def _op_params(draw, op: str, shape: tuple) -> dict:
    c = shape[1]
    if op in ("conv", "conv_transpose"):
        stride = draw(_triple(1, 2))
        dilation = draw(_triple(1, 2))
        p = dict(groups=draw(st.sampled_from(_divisors(c))), mult=draw(st.integers(1, 3)),
                 kernel=draw(_triple(1, 3)), stride=stride, dilation=dilation,
                 padding=draw(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), min_size=3, max_size=3)),
                 bias=draw(st.booleans()))
        if op == "conv":
            p["flip"] = draw(st.booleans())
        else:      # output_padding < stride on every axis: the gradient needs it
            p["output_padding"] = [draw(st.integers(0, s - 1)) for s in stride]
        return p
    if op in ("max_pool", "avg_pool"):
        k = draw(_triple(1, 3))
        return dict(kernel=k, stride=draw(_triple(1, 2)), dilation=draw(_triple(1, 2)),
                    pad=draw(st.integers(0, min(k) // 2)), ceil=draw(st.booleans()), include_pad=draw(st.booleans()))
    if op == "activation":
        return dict(which=draw(st.sampled_from(ACTIVATIONS)))
    if op == "pad":
        return dict(pads=draw(st.lists(st.tuples(st.integers(-1, 2), st.integers(-1, 2)), min_size=3, max_size=3)),
                    value=draw(st.sampled_from([0.0, 0.5])))
    if op == "slice":
        return dict(axis=draw(st.integers(0, 4)), start=draw(st.integers(0, 8)), len=draw(st.integers(0, 8)))
    if op == "transpose":
        return dict(perm=draw(st.permutations(range(len(shape)))))
    if op == "reshape":
        return dict(flatten=draw(st.booleans()))
    if op == "concat":
        return dict(which=draw(st.sampled_from(ACTIVATIONS)), first=draw(st.booleans()),
                    axis=draw(st.integers(0, 4)))
    if op == "add_param":
        return dict(add=draw(st.booleans()))
    if op in ("dilate", "downsample"):
        return dict(stride=draw(_triple(1, 3)))
    if op == "channel_shuffle":
        return dict(groups=draw(st.sampled_from(_divisors(c))))
    return {}


@st.composite
def chains(draw, seed: int):
    """One chain spec (plain data, JSON for the child) that convc accepts:
    each drawn op is tried on a scratch graph and dropped if convc rejects
    it or the tensor grows past MAX_ELEMENTS."""
    rank = draw(st.sampled_from([1, 2, 2, 3]))
    dtype = draw(st.sampled_from(["float32", "float64"]))
    shape = [draw(st.integers(1, 2)), draw(st.integers(1, 5))] + \
        [draw(st.integers(3, {1: 12, 2: 8, 3: 5}[rank])) for _ in range(rank)]
    chain = dict(shape=shape, dtype=dtype, ops=[], grad=False, seed=seed)
    current = tuple(shape)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(OPS))
        trial = dict(chain, ops=chain["ops"] + [[op, _op_params(draw, op, current)]])
        try:
            y = build_chain(cc.Graph("scratch"), trial, "s", {})[0]
        except ConvcError:
            continue
        if y.type.size <= MAX_ELEMENTS:
            chain, current = trial, y.shape
    if draw(st.booleans()):
        try:
            build_chain(cc.Graph("scratch"), dict(chain, grad=True), "s", {})
            chain["grad"] = True
        except ConvcError:
            pass
    return chain


MAX_ELEMENTS = 4096


# -- the sanitized child ------------------------------------------------------------------------------
CHILD = r"""
import json, sys
import numpy as np
import convc as cc
from convc import tuning
from helpers import forcing_database
from test_fuzz_graphs import FUZZ_PIPELINES, build_batch, differences, not_lowered

job = json.load(sys.stdin)
g, feeds = build_batch(job["chains"])
want = cc.compile(g, target="numpy").run(feeds)
found = []
for name in job["pipelines"]:
    passes, algorithm = FUZZ_PIPELINES[name]
    with tuning.using(forcing_database(g, algorithm)):
        mod = cc.compile(g, passes=passes)
    found += [f"[{name}] {d}" for d in differences(mod.run(feeds), want)]
    found += [f"[{name}] {d}" for d in not_lowered(mod.graph, name)]
print(json.dumps(found))
"""


def not_lowered(lg, pipeline: str) -> list[str]:
    """Under the GEMM-forcing pipeline every conv, g, h and transposed conv
    must have become a GEMM (all but h of a flipped conv, which
    conv_to_gemm leaves direct): otherwise the batch silently ran the direct
    loops there."""
    if pipeline != "gemm":
        return []
    left = [n for n in lg.nx.nodes if lg.node(n)["op"] in ("conv", "conv_grad_kernel", "conv_transpose")
            or (lg.node(n)["op"] == "conv_grad_input" and not lg.node(n)["attrs"]["flip"])]
    return [f"still direct after the GEMM pipeline: {left}"] if left else []


def differences(got: dict, want: dict) -> list[str]:
    """Every output that differs from the reference beyond rounding: float64
    1e-9, float32 2e-3 of the output's largest magnitude (Winograd F(4x4)'s
    transforms grow float32 rounding up to ~256x a direct sum's, see
    tests/opinfo.tolerance), plus the same relative to each element."""
    out = []
    for name, w in want.items():
        a = got.get(name)
        if a is None or a.shape != w.shape or a.dtype != w.dtype:
            out.append(f"{name}: got {None if a is None else (a.shape, a.dtype)}, expected {(w.shape, w.dtype)}")
            continue
        tol = 1e-9 if w.dtype == np.float64 else 2e-3
        scale = float(np.max(np.abs(w), initial=0.0)) if w.size else 0.0
        err = np.abs(a.astype(np.float64) - w)
        bad = ~(err <= tol * (scale + 1.0) + tol * np.abs(w)) & ~(np.isnan(a) & np.isnan(w))
        if bad.any():
            i = np.unravel_index(int(np.argmax(np.where(bad, err, -np.inf))), w.shape)
            out.append(f"{name}: {int(bad.sum())} of {w.size} differ; worst at {tuple(map(int, i))}: "
                       f"got {float(a[i])!r}, expected {float(w[i])!r} (max |expected| {scale:.3g})")
    return out


def sanitized_env() -> dict:
    asan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(asan) or not os.path.exists(asan):
        if os.environ.get("CONVC_REQUIRE_SANITIZER") == "1":        # set by .ci/run: CI must not skip the fuzz
            pytest.fail(f"CONVC_REQUIRE_SANITIZER=1 but gcc has no AddressSanitizer runtime ({asan!r})")
        pytest.skip(f"gcc has no AddressSanitizer runtime here (gcc -print-file-name=libasan.so gave {asan!r}): "
                    "install libasan (e.g. the libgcc-<version>-dev package)")
    return helpers.subprocess_env(CONVC_CFLAGS=SANITIZE, LD_PRELOAD=asan, CONVC_TUNING="0",
                                  ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1",
                                  UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1", OMP_NUM_THREADS="2")


def run_child(script: str, job: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([helpers.PYTHON, "-c", script], input=json.dumps(job), capture_output=True, text=True,
                          env=sanitized_env(), timeout=timeout)


def _report(r: subprocess.CompletedProcess, job: dict) -> str:
    return (f"child exit {r.returncode}; stderr tail:\n{r.stderr[-4000:]}\n"
            f"stdout tail:\n{r.stdout[-2000:]}\nbatch (replay with build_batch):\n{json.dumps(job['chains'])}")


_TURN = [-1]


@settings(max_examples=EXAMPLES, derandomize=not ALL_PIPELINES, deadline=None, database=None, print_blob=True,
          suppress_health_check=list(HealthCheck))
@given(st.lists(st.integers(0, 2**31 - 1), min_size=CHAINS_PER_GRAPH, max_size=CHAINS_PER_GRAPH,
                unique=True).flatmap(lambda seeds: st.tuples(*[chains(s) for s in seeds])))
def test_random_graphs_under_sanitizers(batch):
    """Random graphs (and their gradients), compiled with ASan+UBSan under
    the pipelines of FUZZ_PIPELINES, agree with the numpy reference."""
    names = list(FUZZ_PIPELINES)
    if not ALL_PIPELINES:
        turn = _TURN[0] = _TURN[0] + 1
        names = names[2 * (turn % 2):][:2]
    job = dict(chains=list(batch), pipelines=names)
    r = run_child(CHILD, job)
    assert r.returncode == 0, _report(r, job)
    found = json.loads(r.stdout.strip().splitlines()[-1])
    assert not found, "\n".join(found) + "\n" + _report(r, job)


BAD_CHILD = r"""
import numpy as np
import convc as cc
from convc.ops.tensor import Slice, row_major_strides

# a slice op whose template context is wrong (its gather offset moved on by
# `shift` elements): the generated C then reads past the input array, which
# nothing but a sanitizer sees. First without the shift (must run clean), then with.
right = Slice.gather
for shift in (0, 5):
    Slice.gather = lambda self, attrs, x, out: (right(self, attrs, x, out)[0] + shift, row_major_strides(x.shape))
    g = cc.Graph(f"bad{shift}")
    x = g.input("x", (1, 4, 8))
    g.output(cc.slice_axis(x, 2, 2, 6, name="s"), "y")
    print(f"shift {shift}:", cc.compile(g, passes="none").run({"x": np.ones((1, 4, 8), np.float32)})["y"].sum(),
          flush=True)
"""


def test_sanitizer_catches_a_bad_graph():
    """The harness is not vacuous: a slice whose gather offset is moved 5
    elements on (it then reads past its input) dies with an AddressSanitizer
    report; the same slice without the shift runs clean first."""
    r = run_child(BAD_CHILD, {}, timeout=300)
    assert "shift 0: 16.0" in r.stdout, r.stdout + r.stderr[-3000:]
    assert r.returncode != 0 and "AddressSanitizer" in r.stderr and "shift 5" not in r.stdout, \
        r.stdout + r.stderr[-3000:]

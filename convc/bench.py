"""``convc bench``: a fixed benchmark suite, timed in one process against
PyTorch CPU and ONNX Runtime, with every figure also shown as a fraction of
this machine's measured FMA peak.

    convc bench [--quick] [--cases PATTERN] [--models [PATTERN]] [--profile [N]]
                [--threads 1,2] [--under-load] [--repeat-seconds S] [--min-runs N]
                [--int8] [--torch] [--json FILE] [--markdown] [--list]
    python -m convc bench --quick

(The options are defined in :mod:`convc.cli`; ``--torch`` runs
:mod:`convc.bench_torch` instead of the suite.)

How it measures:

* every case is a convc graph built with the public builders; it is compiled
  to C, run once and checked against its PyTorch twin (or, without torch, the
  numpy reference interpreter) *before* it is timed, at every thread count:
  a case whose output is off by more than ``RTOL`` of the output's scale is
  reported as FAILED and not timed, so a wrong kernel is never reported fast;
* a time is the median of repeated runs after warm-up (at least ``min_runs``
  runs and ``repeat_seconds`` of running; slow cases stop after
  ``max_seconds`` once three runs are in), measured with ``time.perf_counter``
  around each library's own Python entry point (``Module.run``,
  ``torch.nn.functional``, ``InferenceSession.run``);
* GFLOP/s = 2 x MACs (``cc.cost``) / time; ``x torch`` and ``x ORT`` are
  convc's throughput over the peer's (> 1: convc is faster);
* the FMA peak comes from a generated C micro-kernel of independent fused
  multiply-add chains, built with convc's own build step; for N threads it
  runs in N Python threads at once (cffi releases the GIL during the call).

Forward single-layer cases run at batch 1, their gradients at batch 8; the
layers of ResNet-18 and MobileNetV2 (``r18_*``, ``mbv2_*``) forward at batch 1
and 8 (``_b1``, ``_b8``); nets at batch 1 (latency) and 64 (throughput), all
in float32.

The models section (``--models``) runs torchvision classifiers with random
weights at batch 1, 3x224x224: each is exported once with
``torch.onnx.export`` (cached beside the compile cache), imported with
``cc.from_onnx``, compiled with the default pipeline, checked against ONNX
Runtime to ``MODEL_RTOL`` and timed against ORT and PyTorch eager like the
other cases; the table shows convc/ORT and convc/PyTorch time ratios and
their geometric means. A model convc cannot import yet is a row that says
so, not a crash. ``--profile`` adds each case's slowest nodes.

``--under-load`` runs everything beside one busy process per core
(:func:`busy_load`) and reports each case's time at N threads over its time
at 1 thread, for convc (target <= ``LOAD_TARGET``), PyTorch and ORT: how the
threads fare on a machine someone else is using (see
``convc/runtime/threads.py`` for how convc's threads wait).
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from . import timing
from .errors import ConvcError
from .host import FmaPeak, cpu_mhz, cpu_model, isa_flags

UNTUNED_TARGET = 1.3       # with --tune: the untuned defaults' time over the tuned time
RTOL = 1e-3                  # max |convc - reference| / max |reference| a case may show
FORWARD_BATCH, GRAD_BATCH = 1, 8
QUICK_BATCH = 2              # --quick runs gradients and larger-batch layer cases at this batch
LAYER_BATCHES = (1, 8)       # the real-model layer cases (r18_*, mbv2_*) run at each of these
NET_BATCHES = (1, 64)
TRAIN_BATCH, TRAIN_LR, TRAIN_MOMENTUM = 32, 0.01, 0.9


@dataclass
class Settings:
    """How long to time. ``quick`` shrinks every case and every repeat count
    so the whole suite runs in a few seconds (for tests and smoke runs)."""
    quick: bool = False
    warmup: int = 2
    min_runs: int = 5
    repeat_seconds: float = 0.2
    max_seconds: float = 5.0
    fma_seconds: float = 0.2
    cold_compiles: int = 3

    @classmethod
    def make(cls, quick: bool = False, repeat_seconds: float | None = None, min_runs: int | None = None):
        """Defaults for the full or the quick suite, with optional overrides."""
        s = cls(quick=True, warmup=1, min_runs=3, repeat_seconds=0.01, max_seconds=0.5, fma_seconds=0.02,
                cold_compiles=1) if quick else cls()
        if repeat_seconds is not None:
            if not repeat_seconds >= 0:
                raise ConvcError(f"bench: --repeat-seconds must be >= 0, got {repeat_seconds}")
            s.repeat_seconds = repeat_seconds
        if min_runs is not None:
            if min_runs < 1:
                raise ConvcError(f"bench: --min-runs must be >= 1, got {min_runs}")
            s.min_runs = min_runs
        return s


def median_time(fn: Callable[[], object], settings: Settings) -> float:
    """Median seconds of ``fn()`` after ``settings.warmup`` warm-up calls,
    over at least ``min_runs`` runs and ``repeat_seconds`` of running (or
    three runs once ``max_seconds`` have passed, for slow cases):
    :func:`convc.timing.median_time`."""
    return timing.median_time(fn, settings.min_runs, settings.repeat_seconds, settings.max_seconds,
                              warmup=settings.warmup)[0]


def median_times_in_turn(fns: list[Callable[[], object]], settings: Settings) -> list[float]:
    """Median seconds of each of ``fns``, run in turn round by round
    (:func:`convc.timing.median_times_in_turn`) for the settings' runs and time."""
    return timing.median_times_in_turn(fns, settings.min_runs, settings.repeat_seconds, settings.max_seconds)


# -- the suite ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layer:
    """One single-layer case: a conv (or transposed conv) of the given shape.
    ``quick`` is (c_in, c_out, spatial sizes) for ``--quick``. ``batch``:
    the batch it runs at (None: ``FORWARD_BATCH`` forward, ``GRAD_BATCH``
    for its gradients); ``grads``: whether the suite also times its kernel
    and input gradients."""
    name: str
    what: str
    c_in: int
    c_out: int
    size: tuple
    kernel: tuple
    quick: tuple
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    transposed: bool = False
    batch: int | None = None
    grads: bool = True

    def batch_for(self, mode: str, quick: bool) -> int:
        """The batch of the case for ``mode`` ("fwd", "dw", "dx")."""
        if self.batch is not None:
            return min(self.batch, QUICK_BATCH) if quick else self.batch
        return FORWARD_BATCH if mode == "fwd" else QUICK_BATCH if quick else GRAD_BATCH

    def dims(self, quick: bool) -> tuple:
        """(c_in, c_out, spatial sizes, groups) for the full or the quick suite."""
        c_in, c_out, size = self.quick if quick else (self.c_in, self.c_out, self.size)
        return c_in, c_out, size, c_in if self.groups == self.c_in else self.groups   # depthwise stays depthwise

    def describe(self, quick: bool) -> str:
        """e.g. "ResNet 3x3 conv, 64->128 channels at 56x56, stride 2, pad 1"."""
        c_in, c_out, size, groups = self.dims(quick)
        shape = "x".join(map(str, size))
        if self.transposed:
            shape += " -> " + "x".join(str((n - 1) * self.stride - 2 * self.padding + self.dilation
                                           * (k - 1) + 1) for n, k in zip(size, self.kernel))
        text = f"{self.what}, {c_in} channels" if groups == c_in == c_out else f"{self.what}, {c_in}->{c_out} channels"
        text += f" at {shape}, stride {self.stride}, pad {self.padding}"
        if self.dilation > 1:
            text += f", dilation {self.dilation}"
        if 1 < groups < c_in:
            text += f", {groups} groups"
        return text

    def weight_shape(self, quick: bool) -> tuple:
        c_in, c_out, _, groups = self.dims(quick)
        if self.transposed:
            return (c_in, c_out // groups) + self.kernel
        return (c_out, c_in // groups) + self.kernel


def model_layers(name: str, what: str, c_in: int, c_out: int, size: tuple, kernel: tuple, quick: tuple,
                 **kw) -> tuple:
    """A forward layer of a real model, once per batch of ``LAYER_BATCHES``:
    ``<name>_b1``, ``<name>_b8``."""
    return tuple(Layer(f"{name}_b{b}", what, c_in, c_out, size, kernel, quick, batch=b, grads=False, **kw)
                 for b in LAYER_BATCHES)


LAYERS = (
    Layer("resnet3x3_s1", "ResNet 3x3 conv", 64, 64, (56, 56), (3, 3), (16, 16, (12, 12)), padding=1),
    Layer("resnet3x3_s2", "ResNet 3x3 conv", 64, 128, (56, 56), (3, 3), (16, 32, (12, 12)), stride=2, padding=1),
    Layer("mbnet_dw3x3", "MobileNet depthwise 3x3 conv", 128, 128, (56, 56), (3, 3), (32, 32, (12, 12)),
          padding=1, groups=128),
    Layer("mbnet_pw1x1", "MobileNet pointwise 1x1 conv", 128, 128, (56, 56), (1, 1), (32, 32, (12, 12))),
    Layer("dcgan_tconv4x4", "DCGAN transposed 4x4 conv", 128, 64, (16, 16), (4, 4), (32, 16, (4, 4)),
          stride=2, padding=1, transposed=True),
    Layer("dilated3x3_d2", "dilated 3x3 conv", 64, 64, (56, 56), (3, 3), (16, 16, (12, 12)), padding=2, dilation=2),
    Layer("conv1d_k5", "1D conv k=5", 64, 64, (4096,), (5,), (16, 16, (256,)), padding=2),
    Layer("conv3d_3x3x3", "3D conv 3x3x3", 16, 16, (16, 32, 32), (3, 3, 3), (4, 4, (4, 8, 8)), padding=1),
    Layer("grouped3x3_g8", "grouped 3x3 conv", 128, 128, (28, 28), (3, 3), (32, 32, (8, 8)), padding=1, groups=8),
    # the layers torchvision's ResNet-18 and MobileNetV2 spend their time in, forward at batch 1 and 8
    *model_layers("r18_3x3_64", "ResNet-18 3x3 conv (layer1)", 64, 64, (56, 56), (3, 3), (16, 16, (12, 12)),
                  padding=1),
    *model_layers("r18_3x3_128", "ResNet-18 3x3 conv (layer2)", 128, 128, (28, 28), (3, 3), (16, 16, (8, 8)),
                  padding=1),
    *model_layers("r18_3x3s2_64_128", "ResNet-18 3x3 stride-2 conv (layer2.0.conv1)", 64, 128, (56, 56), (3, 3),
                  (16, 32, (12, 12)), stride=2, padding=1),
    *model_layers("r18_1x1s2_64_128", "ResNet-18 1x1 stride-2 downsample conv (layer2.0.downsample)", 64, 128,
                  (56, 56), (1, 1), (16, 32, (12, 12)), stride=2),
    *model_layers("r18_stem7x7", "ResNet-18 stem 7x7 conv", 3, 64, (224, 224), (7, 7), (3, 16, (32, 32)),
                  stride=2, padding=3),
    *model_layers("mbv2_dw3x3_144", "MobileNetV2 depthwise 3x3 conv", 144, 144, (56, 56), (3, 3),
                  (32, 32, (12, 12)), padding=1, groups=144),
    *model_layers("mbv2_dw3x3s2_144", "MobileNetV2 depthwise 3x3 stride-2 conv", 144, 144, (56, 56), (3, 3),
                  (32, 32, (12, 12)), stride=2, padding=1, groups=144),
    *model_layers("mbv2_pw1x1_24_144", "MobileNetV2 pointwise 1x1 expansion conv", 24, 144, (56, 56), (1, 1),
                  (8, 32, (12, 12))),
)


@dataclass
class Prepared:
    """A case made ready to time: the convc graph and its callable, the
    torch peer (returns what is compared with convc's output), the inputs,
    and whether the graph goes to ONNX Runtime."""
    graph: object
    convc: Callable[[], object]
    torch: Callable[[], object] | None = None
    feeds: dict = field(default_factory=dict)
    onnx: bool = False
    check: Callable[[], float] | None = None    # custom check: returns the relative error
    macs: int = 0
    onnx_bytes: bytes | None = None
    reference: Callable[[], np.ndarray] | None = None   # what convc is checked against (default: torch)
    reference_name: str = "the reference"
    profiled: object = None                      # the profile=True build, made on the first --profile


@dataclass
class Case:
    """One benchmark case. ``group``: layer | grad | net | train | compile."""
    name: str
    group: str
    description: str
    prepare: Callable[["Env", int], Prepared] | None = None
    kernel3x3: bool = False
    latency: bool = False           # batch-1 net: the latency target applies
    rtol: float = RTOL              # the check's tolerance, relative to the output's scale


class Mismatch(ConvcError):
    """convc's output differs from the reference beyond ``RTOL``."""


class CaseFailure(ConvcError):
    """A case that cannot be timed, with the ``status`` its rows show:
    "FAILED" (convc broke or is wrong), "unsupported" (convc cannot import
    the model yet) or "n/a" (what the case needs is missing)."""

    def __init__(self, status: str, text: str):
        self.status = status
        super().__init__(text)


def relative_error(got, want) -> float:
    """max |got - want| / max |want|: the error on the scale of the output."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise Mismatch(f"shape {got.shape}, expected {want.shape}")
    if not np.all(np.isfinite(got)):
        raise Mismatch(f"{int(np.sum(~np.isfinite(got)))} non-finite values")
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    return float(np.max(np.abs(got - want))) / max(scale, 1e-30) if got.size else 0.0


def check_close(got, want, what: str = "output", rtol: float = RTOL, against: str = "the reference") -> float:
    """The relative error of ``got``; raises :class:`Mismatch` above ``rtol``."""
    err = relative_error(got, want)
    if not err <= rtol:
        raise Mismatch(f"{what} differs from {against}: max error {err:.2e} of the output scale "
                       f"(allowed {rtol:.0e})")
    return err


class Env:
    """What the cases build with: settings, a seeded RNG, torch and
    onnxruntime if present, and where to say what a slow step is doing."""

    def __init__(self, settings: Settings, torch_mod, ort_mod=None, progress: Callable[[str], None] | None = None,
                 tune: float | None = None):
        self.settings = settings
        self.quick = settings.quick
        self.torch = torch_mod
        self.ort = ort_mod
        self.F = torch_mod.nn.functional if torch_mod is not None else None
        self.progress = progress or (lambda msg: None)
        self.tune = tune                # --tune: seconds of cc.tune per graph, and untuned builds beside
        self.untuned = False            # which build a Variants module runs

    def rng(self, name: str):
        return np.random.default_rng(sum(map(ord, name)))

    def t(self, a):
        a = np.ascontiguousarray(a)     # params are read-only (frozen) arrays: torch wants its own writable copy
        return self.torch.from_numpy(a if a.flags.writeable else a.copy())

    def compile(self, graph):
        """``graph`` compiled to C; with ``--tune``, first tuned on this host
        (``tune`` seconds, at the current thread count) and returned as
        :class:`Variants` of the tuned and the untuned build."""
        from .api import compile
        if not self.tune:
            return compile(graph, target="c")
        from . import tuning
        from .tuner import tune
        self.progress(f"  cc.tune({graph.name}, budget={self.tune:g})")
        report = tune(graph, budget=self.tune, progress=False)
        with tuning.using(None):
            untuned = compile(graph, target="c")
        return Variants(compile(graph, target="c"), untuned, self, report)


class Variants:
    """A case compiled twice, with this host's tuning database and with the
    untuned defaults; ``run`` runs the build the runner selects
    (``Env.untuned``), so one case closure times both, interleaved with the
    peers in one process."""

    def __init__(self, tuned, untuned, env: Env, report):
        self.tuned, self.untuned, self.env, self.report = tuned, untuned, env, report

    def run(self, feeds, out=None):
        return (self.untuned if self.env.untuned else self.tuned).run(feeds, out=out)

    def __call__(self, **feeds):
        return (self.untuned if self.env.untuned else self.tuned)(**feeds)

    def __getattr__(self, name):                # outputs, inputs, graph, ...: the tuned build's
        return getattr(self.tuned, name)


def _torch_conv(env: Env, layer: Layer, groups: int):
    F, rank = env.F, len(layer.kernel)
    if layer.transposed:
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[rank - 1]
        return lambda x, w: fn(x, w, None, layer.stride, layer.padding, 0, groups, layer.dilation)
    fn = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    return lambda x, w: fn(x, w, None, layer.stride, layer.padding, layer.dilation, groups)


def layer_graph(layer: Layer, mode: str, quick: bool, batch: int, seed: int = 0):
    """The convc graph of ``layer``: ``mode`` "fwd" outputs y; "dw" / "dx"
    output the kernel / input gradient of y for an output gradient input G
    (built with ``cc.grad``: conv_grad_kernel / conv_grad_input, or for a
    transposed conv, conv_grad_kernel / conv). Returns (graph, feeds)."""
    from .autodiff import grad
    from .ir import Graph
    from .ops.conv import conv
    from .ops.transpose import conv_transpose

    rng = np.random.default_rng(seed)
    c_in, c_out, size, groups = layer.dims(quick)
    wshape = layer.weight_shape(quick)
    fan_in = int(np.prod(wshape[1:])) if not layer.transposed else c_in * int(np.prod(layer.kernel))
    g = Graph(f"bench_{layer.name}_{mode}")
    x = g.input("x", (batch, c_in) + tuple(size))
    w = g.param("w", (rng.standard_normal(wshape) / np.sqrt(fan_in)).astype(np.float32))
    op = conv_transpose if layer.transposed else conv
    y = op(x, w, stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=groups, name=layer.name)
    feeds = {"x": rng.standard_normal(x.shape).astype(np.float32)}
    if mode == "fwd":
        g.output(y, "y")
    else:
        G = g.input("G", y.shape)
        feeds["G"] = rng.standard_normal(y.shape).astype(np.float32)
        g.output(grad(y, w if mode == "dw" else x, grad_output=G), mode)
    return g, feeds


def _layer_case(layer: Layer, mode: str, quick: bool) -> Case:
    batch = layer.batch_for(mode, quick)
    label = {"fwd": "", "dw": "kernel gradient of ", "dx": "input gradient of "}[mode]

    def prepare(env: Env, _threads: int) -> Prepared:
        g, feeds = layer_graph(layer, mode, env.quick, batch)
        mod = env.compile(g)
        prep = Prepared(g, lambda: mod.run(feeds)[next(iter(mod.outputs))], feeds=feeds, onnx=mode == "fwd")
        if env.torch is not None:
            groups = layer.dims(env.quick)[3]
            torch, op = env.torch, _torch_conv(env, layer, groups)
            x, w = env.t(feeds["x"]), env.t(g.node("w")["value"])
            if mode == "fwd":
                def run_torch():
                    with torch.inference_mode():
                        return op(x, w)
            else:
                G, rank = env.t(feeds["G"]), len(layer.kernel)
                mask = [mode == "dx", mode == "dw", False]
                args = (None, [layer.stride] * rank, [layer.padding] * rank, [layer.dilation] * rank,
                        layer.transposed, [0] * rank, groups, mask)

                def run_torch():      # what torch.nn.grad.conv2d_weight/_input call: only the wanted gradient
                    with torch.inference_mode():
                        return torch.ops.aten.convolution_backward(G, x, w, *args)[0 if mode == "dx" else 1]
            prep.torch = run_torch
        return prep

    suffix = {"fwd": "", "dw": ":dw", "dx": ":dx"}[mode]
    return Case(layer.name + suffix, "layer" if mode == "fwd" else "grad",
                f"{label}{layer.describe(quick)}, batch {batch}", prepare, kernel3x3=layer.kernel == (3, 3))


# -- nets -------------------------------------------------------------------------------------------

def dcgan_generator(batch: int = 1, nz: int = 100, ngf: int = 64, seed: int = 0, dtype: str = "float32"):
    """The DCGAN generator (Radford et al.): a latent (N, nz, 1, 1) to a
    3x64x64 image through 4x4 transposed convs (the first stride 1 pad 0,
    then stride 2 pad 1; 8, 4, 2, 1 x ngf channels), each but the last
    followed by inference batch norm and ReLU, and tanh at the end."""
    from .ir import Graph
    from .ops.elementwise import relu, tanh
    from .ops.norm import batch_norm
    from .ops.transpose import conv_transpose

    rng = np.random.default_rng(seed)
    g = Graph("dcgan_generator")
    h = g.input("z", (batch, nz, 1, 1), dtype)
    widths = [nz, ngf * 8, ngf * 4, ngf * 2, ngf, 3]
    for i, (c_in, c_out) in enumerate(zip(widths, widths[1:]), start=1):
        stride, pad = (1, 0) if i == 1 else (2, 1)
        w = g.param(f"t{i}_w", rng.standard_normal((c_in, c_out, 4, 4)) * np.sqrt(2.0 * stride ** 2 / (16 * c_in)),
                    dtype)
        h = conv_transpose(h, w, stride=stride, padding=pad, name=f"t{i}")
        if c_out == 3:
            g.output(tanh(h, name="tanh"), "image")
            break
        stats = [g.param(f"bn{i}_{p}", v, dtype) for p, v in (
            ("mean", rng.standard_normal(c_out) * 0.1), ("var", rng.random(c_out) + 0.5),
            ("weight", rng.random(c_out) + 0.5), ("bias", rng.standard_normal(c_out) * 0.1))]
        h = relu(batch_norm(h, *stats, name=f"bn{i}"), name=f"relu{i}")
    return g


def _torch_lenet(F, p, x):
    h = F.max_pool2d(F.relu(F.conv2d(x, p["conv1_w"], p["conv1_b"], padding=2)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, p["conv2_w"], p["conv2_b"])), 2)
    h = F.relu(F.linear(h.flatten(1), p["fc1_w"], p["fc1_b"]))
    h = F.relu(F.linear(h, p["fc2_w"], p["fc2_b"]))
    return F.linear(h, p["fc3_w"], p["fc3_b"])


def _torch_mobilenet(F, p, x):
    h = F.relu(F.conv2d(x, p["stem_w"], p["stem_b"], stride=2, padding=1))
    for i, stride in enumerate((1, 2, 1, 2), start=1):       # the blocks of convc.models.mobilenet_tiny
        h = F.relu(F.conv2d(h, p[f"block{i}_dw_w"], p[f"block{i}_dw_b"], stride=stride, padding=1,
                            groups=h.shape[1]))
        h = F.relu(F.conv2d(h, p[f"block{i}_pw_w"], p[f"block{i}_pw_b"]))
    return F.linear(h.mean((2, 3)), p["fc_w"], p["fc_b"])


def _torch_dcgan(F, p, x):
    import torch

    h, i = x, 1
    while f"t{i}_w" in p:
        h = F.conv_transpose2d(h, p[f"t{i}_w"], stride=1 if i == 1 else 2, padding=0 if i == 1 else 1)
        if f"bn{i}_mean" not in p:
            return torch.tanh(h)
        h = F.relu(F.batch_norm(h, p[f"bn{i}_mean"], p[f"bn{i}_var"], p[f"bn{i}_weight"], p[f"bn{i}_bias"],
                                training=False, eps=1e-5))
        i += 1
    return h


def _net_case(name: str, what: str, batch: int, quick: bool) -> Case:
    b = batch if not quick else min(batch, 4)
    nz, ngf = (16, 8) if quick else (100, 64)
    what = what.format(nz=nz, ngf=ngf)

    def prepare(env: Env, _threads: int) -> Prepared:
        from . import models

        if name == "lenet5":
            g, torch_net, shape = models.lenet5(batch=b), _torch_lenet, (b, 1, 28, 28)
        elif name == "mobilenet":
            g, torch_net, shape = models.mobilenet_tiny(batch=b), _torch_mobilenet, (b, 3, 32, 32)
        else:
            g, torch_net, shape = dcgan_generator(batch=b, nz=nz, ngf=ngf), _torch_dcgan, (b, nz, 1, 1)
        feeds = {g.input_names[0]: env.rng(name).standard_normal(shape).astype(np.float32)}
        mod = env.compile(g)
        prep = Prepared(g, lambda: mod.run(feeds)[next(iter(mod.outputs))], feeds=feeds, onnx=True)
        if env.torch is not None:
            params = {n: env.t(g.node(n)["value"]) for n in g.param_names}
            x = env.t(feeds[g.input_names[0]])

            def run_torch():
                with env.torch.inference_mode():
                    return torch_net(env.F, params, x)
            prep.torch = run_torch
        return prep

    return Case(f"{name}_b{batch}", "net", f"{what}, batch {b} ({'latency' if batch == 1 else 'throughput'})",
                prepare, latency=batch == 1)


def _train_case(quick: bool) -> Case:
    b = TRAIN_BATCH if not quick else 8
    return Case(f"lenet5_train_b{TRAIN_BATCH}", "train",
                f"one LeNet-5 training step, batch {b}, cross-entropy, SGD momentum {TRAIN_MOMENTUM} "
                f"(convc Trainer vs torch eager + torch.optim.SGD)", lambda env, _threads: _train_prepare(env, b))


def _train_prepare(env: Env, b: int) -> Prepared:
    """A fresh LeNet Trainer (SGD with momentum) and a fresh torch twin with
    the same weights and optimizer; the check compares their first steps."""
    from .models import lenet5
    from .ops.loss import cross_entropy
    from .train import SGD, Trainer

    g = lenet5(batch=b)
    labels = g.input("labels", (b,), "int64")
    trainer = Trainer(g, cross_entropy(g.value(g.outputs["logits"]), labels),
                      optimizer=SGD(lr=TRAIN_LR, momentum=TRAIN_MOMENTUM))
    rng = env.rng("train")
    batch = {"x": rng.standard_normal((b, 1, 28, 28)).astype(np.float32),
             "labels": rng.integers(0, 10, b).astype(np.int64)}
    prep = Prepared(trainer.train_graph, lambda: trainer.step(batch), feeds=batch)
    first = {}

    if env.torch is not None:
        torch, F = env.torch, env.F
        params = {n: env.t(g.node(n)["value"]).clone().requires_grad_(True) for n in trainer.param_names}
        opt = torch.optim.SGD(list(params.values()), lr=TRAIN_LR, momentum=TRAIN_MOMENTUM)
        x, y = env.t(batch["x"]), env.t(batch["labels"])

        def torch_step():
            opt.zero_grad()
            loss = F.cross_entropy(_torch_lenet(F, params, x), y)
            loss.backward()
            opt.step()
            return loss.item()
        prep.torch = torch_step

        def reference():
            loss = torch_step()
            return loss, {n: p.detach().numpy().copy() for n, p in params.items()}
    else:
        from .runtime.module import NumpyModule
        ref = NumpyModule(trainer.train_graph)

        def reference():
            loss = float(ref.run({k: v for k, v in batch.items() if k in ref.inputs})["loss"])
            return loss, ref.get_params(trainer.param_names)

    def check() -> float:
        if first:                               # the first step only: later ones start from other weights
            return first["err"]
        want_loss, want_params = reference()
        got_loss = trainer.step(batch)
        err = check_close(np.array(got_loss), np.array(want_loss), "loss")
        for n, got in trainer.params.items():
            err = max(err, check_close(got, want_params[n], f"param {n} after one step"))
        first["err"] = err
        return err
    prep.check = check
    return prep


def _call_case(out: bool) -> Case:
    """The cost of one call: ``Module.run`` on a graph that is one ReLU of
    16 float32s (checks, output allocation, cffi, the module's lock) against
    ``torch.relu``; with ``out``, into a preallocated array."""
    def prepare(env: Env, _threads: int) -> Prepared:
        from .ir import Graph
        from .ops.elementwise import relu

        g = Graph("call_overhead")
        g.output(relu(g.input("x", (16,))), "y")
        feeds = {"x": env.rng("call_overhead").standard_normal(16).astype(np.float32)}
        mod, y = env.compile(g), np.empty(16, np.float32)
        run = (lambda: mod.run(feeds, out={"y": y})["y"]) if out else (lambda: mod.run(feeds)["y"])
        prep = Prepared(g, run, feeds=feeds, onnx=True)
        if env.torch is not None:
            x = env.t(feeds["x"])
            prep.torch = lambda: env.torch.relu(x)
        return prep
    return Case("call_overhead" + ("_out" if out else ""), "call",
                f"mod.run({{'x': x}}{', out=...' if out else ''}) on one ReLU of 16 float32s vs torch.relu: "
                f"the cost of a call (times under 10 us are shown in us)", prepare)


def suite(quick: bool = False) -> list[Case]:
    """Every case, in table order (names are the same in the quick suite;
    descriptions give the sizes actually run)."""
    cases = [_layer_case(layer, "fwd", quick) for layer in LAYERS]
    cases += [_layer_case(layer, mode, quick) for layer in LAYERS if layer.grads for mode in ("dw", "dx")]
    for name, what in (("lenet5", "LeNet-5 (convc.models.lenet5, 1x28x28)"),
                       ("mobilenet", "MobileNet-style net (convc.models.mobilenet_tiny, 3x32x32)"),
                       ("dcgan", "DCGAN generator (nz {nz}, ngf {ngf}, 3x64x64)")):
        cases += [_net_case(name, what, b, quick) for b in NET_BATCHES]
    cases.append(_train_case(quick))
    cases += [_call_case(out=False), _call_case(out=True)]
    cases.append(Case("lenet5_compile_cold", "compile",
                      "cc.compile(lenet5()) into a fresh, empty CONVC_CACHE_DIR (passes, codegen, C compiler, load)"))
    cases.append(Case("lenet5_load_cached", "compile", "cc.compile(lenet5()) again, from the compile cache"))
    return cases


def select(cases: list[Case], pattern: str | None) -> list[Case]:
    """Cases matching ``pattern``: comma-separated parts, each a glob
    ("resnet*"), an exact case name ("resnet3x3_s2": that case alone), or
    else a substring ("lenet": every LeNet case)."""
    if not pattern:
        return cases
    parts = [p.strip() for p in pattern.split(",") if p.strip()]
    names = {c.name for c in cases}

    def matches(name, p):
        if any(ch in p for ch in "*?["):
            return fnmatch.fnmatchcase(name, p)
        return name == p if p in names else p in name

    def hit(name):
        return any(matches(name, p) for p in parts)
    chosen = [c for c in cases if hit(c.name)]
    if not chosen:
        raise ConvcError(f"bench: no case matches {pattern!r}; the cases are: {', '.join(c.name for c in cases)}")
    return chosen


# -- models: torchvision classifiers through ONNX ---------------------------------------------------

MODEL_RTOL = 1e-4                # convc against ONNX Runtime, relative to the output's scale
MODEL_OPSET = 18                 # the opset torch 2.13's (dynamo) exporter writes natively
MODEL_GEOMEAN, MODEL_WORST, MODEL_GOAL = 1.0, 1.25, 0.8    # targets for convc time / ORT time


@dataclass(frozen=True)
class TorchModel:
    """A model of the models section: a torchvision classifier by name, with
    random weights, or (``build``) any ``() -> torch.nn.Module``. ``size`` is
    the C, H, W of its batch-1 input; ``quick_size`` that of ``--quick``."""
    name: str
    what: str
    build: Callable[[], object] | None = None
    size: tuple = (3, 224, 224)
    quick_size: tuple = (3, 64, 64)

    def input_shape(self, quick: bool) -> tuple:
        return (1,) + tuple(self.quick_size if quick else self.size)


MODELS = (
    TorchModel("resnet18", "ResNet-18"),
    TorchModel("mobilenet_v2", "MobileNetV2 (ReLU6 as Clip)"),
    TorchModel("mobilenet_v3_small", "MobileNetV3-Small (HardSwish, HardSigmoid, squeeze-excitation)"),
    TorchModel("efficientnet_b0", "EfficientNet-B0 (SiLU as Sigmoid x Mul, squeeze-excitation)"),
    TorchModel("squeezenet1_1", "SqueezeNet 1.1 (fire modules: concatenated 1x1 and 3x3 expands)"),
    TorchModel("shufflenet_v2_x0_5", "ShuffleNetV2 x0.5 (channel split and shuffle)"),
)

_TORCHVISION_STANDINS = None     # the torch.library.Library holding them: dropping it unregisters the ops


def torchvision_models():
    """``torchvision.models``, importable next to a CPU-only torch.

    torchvision 0.28's compiled extension does not load against the CPU build
    of torch 2.13, and ``import torchvision`` then fails registering fake
    kernels for ``torchvision::nms`` and ``qnms``, ops the extension would
    have defined. The classification models use neither, so when the plain
    import fails that way, stand-in schemas are defined (without kernels)
    and the import is tried again. Raises ImportError without torchvision."""
    global _TORCHVISION_STANDINS
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # "Failed to load image Python extension"
        try:
            import torchvision.models
            return torchvision.models
        except RuntimeError as e:
            if "torchvision::" not in str(e):
                raise
        for mod in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[mod]                # the half-imported package
        import torch
        _TORCHVISION_STANDINS = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            _TORCHVISION_STANDINS.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision.models
        return torchvision.models


def build_model(spec: TorchModel, torch):
    """The model in eval mode, its random weights seeded by its name (so an
    export cached earlier holds the same weights)."""
    with torch.random.fork_rng():
        torch.manual_seed(sum(map(ord, spec.name)))
        if spec.build is not None:
            net = spec.build()
        else:
            try:
                models = torchvision_models()
            except ImportError:
                raise CaseFailure("n/a", "torchvision is not installed (pip install 'convc[bench]')") from None
            net = models.get_model(spec.name, weights=None)
    return net.eval()


def exported_onnx(spec: TorchModel, net, shape: tuple, torch, progress: Callable[[str], None]):
    """``net`` as an ONNX ModelProto, exported with ``torch.onnx.export``
    (dynamo exporter, ``MODEL_OPSET``) once and then read from
    ``<cache>/bench-onnx/``, keyed by the name, the input shape, the torch and
    torchvision versions and the module's structure."""
    import contextlib
    import hashlib
    import io
    import re
    import warnings

    import onnx

    from .runtime.cache import file_problem, subdir, write_private

    tv = getattr(sys.modules.get("torchvision"), "__version__", "none")
    arch = hashlib.sha256(repr(net).encode()).hexdigest()[:12]
    key = re.sub(r"[^A-Za-z0-9._-]", "_", f"{spec.name}-{'x'.join(map(str, shape))}-opset{MODEL_OPSET}-"
                                         f"torch{torch.__version__}-torchvision{tv}-{arch}")
    path = subdir("bench-onnx") / f"{key}.onnx"     # private to the user (runtime/cache.py)
    if path.exists() and file_problem(path) is None:
        try:
            return onnx.load_from_string(path.read_bytes())
        except Exception:                   # noqa: BLE001  (a damaged entry: export again)
            path.unlink(missing_ok=True)
    progress(f"  {spec.name}: torch.onnx.export (once; cached in {path.parent})")
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(net, (torch.zeros(shape),), dynamo=True, opset_version=MODEL_OPSET,
                                        verbose=False, input_names=["x"], output_names=["logits"])
        model = program.model_proto
    except Exception as e:                  # noqa: BLE001  (the exporter's failure is not convc's)
        raise CaseFailure("n/a", f"torch.onnx.export: {_describe(e)}") from e
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    write_private(tmp, model.SerializeToString())
    os.replace(tmp, path)                   # atomic: a concurrent run sees all of it or nothing
    return model


def import_summary(e) -> str:
    """An OnnxImportError in one line: how many nodes, of which ops, and the
    first reason given."""
    from collections import Counter

    ops = Counter(op for op, _, _ in e.problems)
    first = e.problems[0][2] if e.problems else ""
    return (f"{len(e.problems)} unsupported node{'s' * (len(e.problems) != 1)}: "
            + ", ".join(f"{op} x{n}" for op, n in ops.most_common()) + (f" ({first})" if first else ""))


def _model_case(spec: TorchModel, quick: bool) -> Case:
    shape = spec.input_shape(quick)

    def prepare(env: Env, _threads: int) -> Prepared:
        from .onnx import OnnxImportError, from_onnx

        if env.torch is None:
            raise CaseFailure("n/a", "torch is not installed (pip install 'convc[bench]')")
        torch = env.torch
        net = build_model(spec, torch)
        model = exported_onnx(spec, net, shape, torch, env.progress)
        env.progress(f"  {spec.name}: cc.from_onnx, cc.compile")
        try:
            g = from_onnx(model, name=spec.name)
        except OnnxImportError as e:
            raise CaseFailure("unsupported", f"import: {import_summary(e)}") from e
        except Exception as e:              # noqa: BLE001
            raise CaseFailure("FAILED", f"import: {_describe(e)}") from e
        try:
            mod = env.compile(g)
        except Exception as e:              # noqa: BLE001
            raise CaseFailure("FAILED", f"compile: {_describe(e)}") from e
        x = env.rng(spec.name).standard_normal(shape).astype(np.float32)
        feeds = {g.input_names[0]: x}
        out = next(iter(mod.outputs))
        xt = env.t(x)

        def run_torch():
            with torch.inference_mode():
                return net(xt)
        prep = Prepared(g, lambda: mod.run(feeds)[out], run_torch, feeds, onnx=True,
                        onnx_bytes=model.SerializeToString())
        if env.ort is not None:
            def reference():
                so = env.ort.SessionOptions()
                so.intra_op_num_threads = 1
                so.log_severity_level = 3
                sess = env.ort.InferenceSession(prep.onnx_bytes, so, providers=["CPUExecutionProvider"])
                return sess.run(None, {"x": x})[0]
            prep.reference, prep.reference_name = reference, "ONNX Runtime's"
        else:
            prep.reference, prep.reference_name = lambda: run_torch().numpy(), "PyTorch's"
        return prep

    return Case(spec.name, "model", f"{spec.what}; torchvision weights=None (random), batch 1, "
                                    f"{'x'.join(map(str, shape[1:]))}", prepare, rtol=MODEL_RTOL)


def model_cases(quick: bool = False) -> list[Case]:
    """The models section, one case per entry of ``MODELS``."""
    return [_model_case(m, quick) for m in MODELS]


def geomean(values) -> float | None:
    """The geometric mean of positive numbers (None for none)."""
    values = list(values)
    return float(np.exp(np.mean(np.log(values)))) if values else None


def model_summary(rows: list["Row"]) -> list[dict]:
    """Per thread count of the model rows: the geometric mean of convc/ORT
    (target <= ``MODEL_GEOMEAN``) and of convc/torch, the worst model against
    ORT (target <= ``MODEL_WORST``, goal ``MODEL_GOAL``), and the models left
    out (not timed against ORT) with their status."""
    models = [r for r in rows if r.group == "model"]
    out = []
    for t in sorted({r.threads for r in models}):
        at = [r for r in models if r.threads == t]
        vs_ort = {r.case: r.vs_ort for r in at if r.status == "ok" and r.vs_ort is not None}
        vs_torch = [r.vs_torch for r in at if r.status == "ok" and r.vs_torch is not None]
        entry = dict(threads=t, models=len(vs_ort), of=len(at), geomean_ort=geomean(vs_ort.values()),
                     geomean_torch=geomean(vs_torch), worst=None, worst_ort=None, targets=[],
                     left_out={r.case: r.status if r.status != "ok" else "ORT n/a" for r in at
                               if r.case not in vs_ort})
        if vs_ort:
            worst = max(vs_ort, key=vs_ort.get)
            entry.update(worst=worst, worst_ort=vs_ort[worst])
            entry["targets"] = [
                {"target": f"geomean <={MODEL_GEOMEAN:g}x ORT", "value": f"{entry['geomean_ort']:.2f}x",
                 "pass": entry["geomean_ort"] <= MODEL_GEOMEAN},
                {"target": f"every model <={MODEL_WORST:g}x ORT", "value": f"{worst} {vs_ort[worst]:.2f}x",
                 "pass": vs_ort[worst] <= MODEL_WORST},
                {"target": f"goal: every model <={MODEL_GOAL:g}x ORT", "value": f"{worst} {vs_ort[worst]:.2f}x",
                 "pass": vs_ort[worst] <= MODEL_GOAL}]
        out.append(entry)
    return out


# -- under load: other processes spinning on the cores ---------------------------------------------

BUSY_LOOP = """import os, sys, time
end, parent = time.monotonic() + float(sys.argv[1]), os.getppid()
print("spinning", flush=True)
while time.monotonic() < end and os.getppid() == parent:    # until the deadline, or the bench is gone
    for _ in range(20000):
        pass
"""
"""What each busy process runs: a pure-Python spin, which competes for a
core and for little else (no I/O, next to no memory traffic)."""

LOAD_TARGET = 1.3
"""Under load, convc's time at N threads over its time at 1 thread must not exceed this."""


def load_processes() -> int:
    """How many busy processes ``--under-load`` starts: one per core this
    process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def busy_load(processes: int | None = None, seconds: float = 3600.0, start_timeout: float = 60.0):
    """Keep ``processes`` other processes (default: one per core) spinning on
    the CPU while the ``with`` block runs, as on a machine someone else is
    using; yields their pids once every one of them is spinning.

    On leaving the block, normally, on an error or on Ctrl-C, they are
    terminated and reaped. Each also stops by itself after ``seconds`` and as
    soon as this process is gone, so none outlives even a killed bench; they
    run in their own session, so a Ctrl-C in the terminal reaches the bench
    (whose exit stops them) rather than printing their tracebacks.

    >>> with busy_load() as pids:                   # doctest: +SKIP
    ...     mod.run(feeds)                          # timed on a busy machine
    """
    import select as io                         # (this module's select() chooses cases)

    n = load_processes() if processes is None else processes
    if not (isinstance(n, int) and n >= 1 and seconds > 0):
        raise ConvcError(f"bench: busy_load takes processes >= 1 and seconds > 0, got {processes!r}, {seconds!r}")
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", BUSY_LOOP, repr(float(seconds))],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, start_new_session=True))
        deadline = time.monotonic() + start_timeout
        for p in procs:
            ready = io.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]
            if not ready or p.stdout.readline() != b"spinning\n":
                raise ConvcError(f"bench: busy process {p.pid} did not start spinning within {start_timeout:g} s "
                                 f"(exit code {p.poll()})")
        yield [p.pid for p in procs]
    finally:
        _stop(procs)


def _stop(procs: list) -> None:
    """Terminate ``procs``, wait for them (kill one that lingers) and close their pipes."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if p.stdout is not None:
            p.stdout.close()


def judge_load(rows: list["Row"]) -> None:
    """Under load: give each row at N > 1 threads the target that convc's
    time is at most ``LOAD_TARGET`` times its 1-thread time."""
    one = {r.case: r.convc_ms for r in rows if r.threads == 1 and r.status == "ok"}
    for r in rows:
        if r.threads is not None and r.threads > 1 and r.status == "ok" and one.get(r.case):
            ratio = r.convc_ms / one[r.case]
            r.targets.append({"target": f"under load <={LOAD_TARGET:g}x 1 thread", "value": f"{ratio:.2f}x",
                              "pass": ratio <= LOAD_TARGET})


def load_summary(rows: list["Row"]) -> list[dict]:
    """Per case and thread count N > 1 that has a 1-thread row: convc's,
    PyTorch's and ONNX Runtime's times at 1 and N threads and N/1 ratios
    (None where a time is missing), and whether convc's meets ``LOAD_TARGET``."""
    by = {(r.case, r.threads): r for r in rows if r.threads is not None}
    out = []
    for (case, n), r in by.items():
        one = by.get((case, 1))
        if n == 1 or one is None:
            continue

        def ratio(a, b):
            return a / b if a is not None and b else None
        entry = dict(case=case, threads=n, convc_1=one.convc_ms, convc_n=r.convc_ms,
                     convc=ratio(r.convc_ms, one.convc_ms), torch=ratio(r.torch_ms, one.torch_ms),
                     ort=ratio(r.ort_ms, one.ort_ms), status=r.status if r.status != "ok" else one.status)
        entry["pass"] = entry["convc"] is not None and entry["convc"] <= LOAD_TARGET
        out.append(entry)
    return out


# -- running ----------------------------------------------------------------------------------------

@dataclass
class Row:
    """One line of the table: a case at a thread count."""
    case: str
    group: str
    threads: int | None
    macs: int | None = None
    convc_ms: float | None = None
    gflops: float | None = None
    pct_peak: float | None = None
    torch_ms: float | None = None
    x_torch: float | None = None
    ort_ms: float | None = None
    x_ort: float | None = None
    untuned_ms: float | None = None     # --tune: the same case built without the tuning database
    error: float | None = None          # relative error against the reference
    status: str = "ok"                  # ok | FAILED | unsupported | n/a (see CaseFailure)
    targets: list = field(default_factory=list)     # [{"target", "value", "pass"}]
    reason: str | None = None           # why the status is not ok
    profile: dict | None = None         # --profile: {"total_ms", "runs", "nodes": [{node, op, shape, ms, pct}]}

    @property
    def mflop(self) -> float | None:
        return None if self.macs is None else 2 * self.macs / 1e6

    @property
    def vs_ort(self) -> float | None:
        """convc's time over ORT's (< 1: convc is faster)."""
        return None if self.x_ort is None else 1 / self.x_ort

    @property
    def vs_torch(self) -> float | None:
        """convc's time over PyTorch's (< 1: convc is faster)."""
        return None if self.x_torch is None else 1 / self.x_torch


@dataclass
class Report:
    """The result of a run: header facts, rows, and notes."""
    header: dict
    rows: list[Row]
    notes: list[str]
    descriptions: dict
    int8: list = field(default_factory=list)          # --int8: run_int8's rows

    @property
    def failed(self) -> list[str]:
        return sorted({r.case for r in self.rows if r.status == "FAILED"})

    @property
    def models(self) -> list[dict]:
        """The models section's summary (:func:`model_summary`)."""
        return model_summary(self.rows)

    def to_json(self) -> dict:
        return dict(header=self.header, notes=self.notes, cases=self.descriptions,
                    rows=[dict(asdict(r), mflop=r.mflop) for r in self.rows], models=self.models,
                    under_load=load_summary(self.rows) if self.header.get("under_load") else None, int8=self.int8)

    def table(self, markdown: bool = False) -> str:
        """The header lines, the cases' table and the models' table (plain or
        Markdown), the models' summary, the legend, profiles and notes."""
        h = self.header
        lines = [f"machine: {h['cpu']}, {h['cores']} logical cores, load average {h['load']}; {h['compiler']}",
                 f"ISA: {h['isa']}" if h.get("isa") else "",
                 "versions: " + ", ".join(f"{k} {v}" for k, v in h["versions"].items()),
                 "FMA peak: " + ", ".join(f"{v:.1f} GFLOP/s with {t} thread{'s' * (int(t) > 1)}"
                                          for t, v in h["fma_peak"].items()) + f" ({h['fma_detail']})",
                 f"settings: {h['settings']}" if h.get("settings") else "",
                 f"models: {h['models']}" if h.get("models") else "",
                 f"OpenMP: {h['openmp']}" if h.get("openmp") else "",
                 f"under load: {h['under_load']}" if h.get("under_load") else "",
                 f"tuning: {h['tuned']}" if h.get("tuned") else ""]
        lines = [ln for ln in lines if ln]
        if markdown:
            lines = [f"- {ln}" for ln in lines]
        cases = [r for r in self.rows if r.group != "model"]
        if cases:
            tuned = bool(h.get("tuned"))
            cols = ["case", "threads", "MFLOP", "convc ms"] + (["untuned ms", "untuned/tuned"] if tuned else []) + \
                ["GFLOP/s", "% peak", "torch ms", "x torch", "ORT ms", "x ORT", "target"]
            body = [[r.case, "-" if r.threads is None else str(r.threads), _num(r.mflop), _ms(r.convc_ms, r.status)]
                    + ([_ms(r.untuned_ms), _ratio(r.untuned_ms / r.convc_ms if r.untuned_ms and r.convc_ms else None)]
                       if tuned else [])
                    + [_num(r.gflops), _num(r.pct_peak), _ms(r.torch_ms), _ratio(r.x_torch), _ms(r.ort_ms),
                       _ratio(r.x_ort), _targets(r)] for r in cases]
            lines += [""] + _grid(cols, body, markdown)
        models = [r for r in self.rows if r.group == "model"]
        if models:
            cols = ["model", "threads", "GFLOP", "convc ms", "ORT ms", "torch ms", "convc/ORT", "convc/torch",
                    "% peak", "target / status"]
            said = set()                    # a failure's reason once per model, not at every thread count

            def status(r):
                if r.status == "ok" or (r.case, r.reason) not in said:
                    said.add((r.case, r.reason))
                    return _targets(r)
                return f"{r.status} (as above)"
            body = [[r.case, str(r.threads), _num(None if r.macs is None else 2 * r.macs / 1e9),
                     _ms(r.convc_ms, r.status), _ms(r.ort_ms), _ms(r.torch_ms), _ratio(r.vs_ort),
                     _ratio(r.vs_torch), _num(r.pct_peak), status(r)] for r in models]
            lines += ["", "models (time ratios: < 1x means convc is faster):"] + _grid(cols, body, markdown)
            lines += [""] + [("- " if markdown else "") + _summary_line(m) for m in self.models]
        if h.get("under_load"):
            cols = ["case", "threads", "convc 1 thread ms", "convc N threads ms", "convc N/1", "torch N/1", "ORT N/1",
                    "target"]
            body = [[e["case"], str(e["threads"]), _ms(e["convc_1"]), _ms(e["convc_n"], e["status"]),
                     _ratio(e["convc"]), _ratio(e["torch"]), _ratio(e["ort"]),
                     e["status"] if e["convc"] is None else
                     f"{'pass' if e['pass'] else 'miss'} <={LOAD_TARGET:g}x"] for e in load_summary(self.rows)]
            lines += ["", f"under load (time at N threads over time at 1 thread, with busy processes on every core; "
                          f"target for convc: <= {LOAD_TARGET:g}x):"] + _grid(cols, body, markdown)
        if self.int8:
            lines += int8_table(self.int8, markdown)
        results = [t["pass"] for r in self.rows for t in r.targets]
        results += [t["pass"] for m in self.models for t in m["targets"]]
        results += [r["target"]["pass_"] for r in self.int8 if "target" in r]
        lines += ["", f"targets: {sum(results)} pass, {len(results) - sum(results)} miss"
                  + (f"; FAILED cases: {', '.join(self.failed)}" if self.failed else "")]
        bullet = "- " if markdown else "  "
        lines += ["", "cases:"] + [f"{bullet}{n}: {d}" for n, d in self.descriptions.items()]
        profiled = [r for r in self.rows if r.profile]
        if profiled:
            lines += ["", "per-node profile (a build with profile=True, run at the row's thread count; "
                          "ms per run, % of the nodes' total):"]
            for r in profiled:
                p = r.profile
                lines += ["", f"{r.case}, {r.threads} thread{'s' * (r.threads != 1)}: {p['total_ms']:.3f} ms in "
                              f"{p['count']} nodes (timed run {_ms(r.convc_ms)} ms), mean of {p['runs']} runs; "
                              f"top {len(p['nodes'])}:"]
                lines += _grid(["node", "op", "shape", "ms", "%"],
                               [[n["node"], n["op"], n["shape"], _ms(n["ms"]), f"{n['pct']:.1f}"]
                                for n in p["nodes"]], markdown, left=(0, 1, 2))
        if self.notes:
            lines += ["", "notes:"] + [f"{bullet}{n}" for n in self.notes]
        return "\n".join(lines)


def _grid(cols: list[str], body: list[list[str]], markdown: bool, left=None) -> list[str]:
    """A table's lines: Markdown, or plain text in aligned columns. The
    columns ``left`` (default: the first and the last) are left-aligned."""
    lefts = {0, len(cols) - 1} if left is None else set(left)
    if markdown:
        return (["| " + " | ".join(cols) + " |",
                 "|" + "|".join("---" if i in lefts else "---:" for i in range(len(cols))) + "|"]
                + ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in body])
    widths = [max(len(x) for x in col) for col in zip(cols, *body)]
    fmt = lambda row: "  ".join(v.ljust(w) if i in lefts else v.rjust(w)  # noqa: E731
                                for i, (v, w) in enumerate(zip(row, widths))).rstrip()
    return [fmt(cols), "-" * len(fmt(cols))] + [fmt(row) for row in body]


def _summary_line(m: dict) -> str:
    """One thread count of :func:`model_summary` as a sentence."""
    text = f"models, {m['threads']} thread{'s' * (m['threads'] != 1)}: "
    if m["geomean_ort"] is None:
        text += "no model timed against ORT"
    else:
        text += "; ".join(f"{'pass' if t['pass'] else 'miss'} {t['target']} ({t['value']})" for t in m["targets"])
        text += f"; over {m['models']} of {m['of']} models"
    if m["geomean_torch"] is not None:
        text += f"; geomean convc/torch {m['geomean_torch']:.2f}x"
    if m["left_out"]:
        text += "; left out: " + ", ".join(f"{n} ({s})" for n, s in m["left_out"].items())
    return text


def _num(v):
    if v is None:
        return "n/a"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def _ms(v, status="ok"):
    if status != "ok":
        return status
    if v is None:
        return "n/a"
    if v < 0.01:
        return f"{v * 1e3:.2f} us"          # a call's overhead: microseconds
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def _ratio(v):
    return "n/a" if v is None else f"{v:.2f}x"


def _targets(r: Row) -> str:
    if r.status != "ok":
        return r.status + (f": {r.reason}" if r.reason and r.group == "model" else "")
    return "; ".join(f"{'pass' if t['pass'] else 'miss'} {t['target']} ({t['value']})" for t in r.targets) or "-"


def _describe(e: Exception) -> str:
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def _try_import(name):
    try:
        return __import__(name)
    except ImportError:
        return None


class Runner:
    """Runs cases at thread counts and collects rows and notes."""

    def __init__(self, settings: Settings, threads: list[int], progress: Callable[[str], None] | None = None,
                 profile: int = 0):
        import convc

        self.settings, self.threads, self.profile_top = settings, threads, profile
        self.progress = progress or (lambda msg: None)
        self.notes: list[str] = []
        self.torch = _try_import("torch")
        self.ort = _try_import("onnxruntime")
        self.onnx = _try_import("onnx")
        if self.torch is None:
            self.note("torch is not installed: torch columns are n/a and cases are checked against convc's numpy "
                      "reference interpreter (pip install 'convc[bench]')")
        if self.ort is None:
            self.note("onnxruntime is not installed: ORT columns are n/a (pip install 'convc[bench]')")
        elif self.onnx is None:
            self.note("onnx is not installed, so graphs cannot be written for ONNX Runtime: ORT columns are n/a")
        self.set_convc_threads = getattr(convc, "set_num_threads", None)
        if self.set_convc_threads is None:
            self.note("convc threads: not controllable (convc has no set_num_threads); convc runs as its "
                      "generated code does at every thread count")
        self.env = Env(settings, self.torch, self.ort if self.onnx is not None else None, self.progress)
        self.peak: dict[int, float] = {}
        self.fma_detail = ""

    def untuned(self, fn: Callable[[], object]) -> Callable[[], object]:
        """``fn`` (a case's convc call) run on the untuned build of its
        :class:`Variants` module."""
        def call():
            self.env.untuned = True
            try:
                return fn()
            finally:
                self.env.untuned = False
        return call

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def measure_peak(self) -> None:
        fma = FmaPeak()
        for t in self.threads:
            self.peak[t] = fma.measure(t, self.settings.fma_seconds)
        kernel = fma.kernels[fma.best]
        per_thread = self.peak[self.threads[0]] / self.threads[0]
        mhz = cpu_mhz()
        self.fma_detail = f"{kernel} kernel, 12 independent chains"
        if mhz:
            self.fma_detail += (f"; {per_thread * 1e3 / mhz:.1f} flop/cycle per thread at the {mhz:.0f} MHz "
                                "/proc/cpuinfo reports (turbo clocks make this look higher)")
        if not 0.5 <= per_thread <= 500:
            self.note(f"FMA peak {per_thread:.1f} GFLOP/s per thread is implausible; % peak may be meaningless")
        low, top = min(self.threads), max(self.threads)
        scale = self.peak[top] / self.peak[low]
        if top > low and scale < 0.75 * top / low:
            self.note(f"the FMA rate with {top} threads is only {scale:.2f}x the rate with {low}: this machine does "
                      f"not have {top} cores' worth of compute free (SMT siblings, a shared host, or other load), "
                      f"so the {top}-thread rows measure scheduling as much as kernels")

    def set_threads(self, n: int) -> None:
        if self.set_convc_threads is not None:
            self.set_convc_threads(n)
        if self.torch is not None:
            self.torch.set_num_threads(n)

    def prepare(self, case: Case, threads: int) -> Prepared:
        from .cost import cost

        prep = case.prepare(self.env, threads)
        prep.macs = cost(prep.graph).macs
        return prep

    def run_case(self, case: Case) -> list[Row]:
        """Rows of ``case`` at each thread count: check, then time convc and the peers."""
        if case.group == "compile":
            return self.run_compile(case)
        rows: list[Row] = []
        prep = reference = None
        for threads in self.threads:
            row = Row(case.name, case.group, threads)
            rows.append(row)
            self.set_threads(threads)
            try:
                if prep is None or case.group == "train":     # a fresh Trainer: its check is its first step
                    prep = self.prepare(case, threads)
                row.macs = prep.macs
                if prep.check is not None:
                    row.error = prep.check()
                else:
                    if reference is None:
                        reference = self.reference(case, prep)
                    row.error = check_close(prep.convc(), reference, rtol=case.rtol, against=prep.reference_name)
                if self.env.tune and case.group != "train":
                    t, untuned = median_times_in_turn([prep.convc, self.untuned(prep.convc)], self.settings)
                    row.untuned_ms = 1e3 * untuned
                else:
                    t = median_time(prep.convc, self.settings)
            except Exception as e:          # noqa: BLE001  (a broken case must not stop the suite)
                row.status = e.status if isinstance(e, CaseFailure) else "FAILED"
                row.reason = str(e).splitlines()[0] if isinstance(e, CaseFailure) else _describe(e)
                if case.group != "model":           # the models' table shows the reason itself
                    self.note(f"{case.name} {row.status} ({threads} thread{'s' * (threads > 1)}): {row.reason}")
                if isinstance(e, CaseFailure):      # the same at every thread count
                    for t in self.threads[len(rows):]:
                        rows.append(Row(case.name, case.group, t, status=row.status, reason=row.reason))
                    break
                continue
            row.convc_ms = t * 1e3
            row.gflops = 2 * prep.macs / t / 1e9 if prep.macs else None
            if row.gflops is not None and threads in self.peak:
                row.pct_peak = 100 * row.gflops / self.peak[threads]
            if prep.torch is not None:
                row.torch_ms = 1e3 * median_time(prep.torch, self.settings)
                row.x_torch = row.torch_ms / row.convc_ms
            if not prep.onnx:
                if self.ort is not None:
                    self.note("ORT is n/a for gradient cases and the training step: gradient ops have no ONNX form")
            elif self.ort is not None and self.onnx is not None:
                row.ort_ms = self.time_ort(case, prep, threads, reference)
                if row.ort_ms is not None:
                    row.x_ort = row.ort_ms / row.convc_ms
            self.judge(case, row)
            if self.profile_top and case.group != "train":
                try:
                    row.profile = self.node_profile(prep, row.convc_ms)
                except Exception as e:      # noqa: BLE001
                    self.note(f"{case.name}: no profile ({threads} thread{'s' * (threads > 1)}): {_describe(e)}")
        return rows

    def reference(self, case: Case, prep: Prepared) -> np.ndarray:
        """The case's own reference (a model's: ONNX Runtime's output), else the
        torch peer's output, else the numpy reference interpreter's. When the
        case has its own reference, the torch peer's output is compared with
        it too: a note says when the peer computes something else."""
        if prep.reference is not None:
            want = prep.reference()
            if prep.torch is not None:
                err = relative_error(prep.torch().numpy(), want)
                if not err <= 10 * case.rtol:
                    self.note(f"{case.name}: PyTorch's output differs from {prep.reference_name} by {err:.1e} of "
                              f"the output scale, so the torch column may time another computation")
            return want
        if prep.torch is not None:
            return prep.torch().numpy()
        from .api import compile
        return next(iter(compile(prep.graph, target="numpy").run(prep.feeds).values()))

    def node_profile(self, prep: Prepared, convc_ms: float) -> dict:
        """The ``profile_top`` slowest nodes of a ``profile=True`` build of the
        case's graph (built once per case), as ms per run and % of all nodes'
        time, averaged over the runs that fill ``repeat_seconds`` (at least
        ``min_runs``) after a warm-up run."""
        from .api import compile

        if prep.profiled is None:
            self.progress("  compiling with profile=True")
            prep.profiled = compile(prep.graph, target="c", profile=True)
        mod, s = prep.profiled, self.settings
        mod.run(prep.feeds)
        before = mod.profile()
        runs = max(s.min_runs, min(int(s.repeat_seconds / max(convc_ms / 1e3, 1e-6)) + 1, 10_000))
        for _ in range(runs):
            mod.run(prep.feeds)
        times = {n: (t - before.get(n, 0.0)) / runs * 1e3 for n, t in mod.profile().items()}
        total = sum(times.values())
        top = sorted(times.items(), key=lambda kv: -kv[1])[:self.profile_top]

        def shape(n):
            typ = mod.graph.node(n).get("type")
            return "x".join(map(str, getattr(typ, "shape", ()))) or "-"
        return dict(total_ms=total, runs=runs, count=len(times),
                    nodes=[dict(node=n, op=str(mod.graph.node(n).get("op", "?")), shape=shape(n), ms=ms,
                                pct=100 * ms / total if total > 0 else 0.0) for n, ms in top])

    def time_ort(self, case: Case, prep: Prepared, threads: int, reference) -> float | None:
        """ORT's median time on the graph written with ``cc.to_onnx``, after
        checking its output too; None (and a note) when it cannot run."""
        try:
            so = self.ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            so.execution_mode = self.ort.ExecutionMode.ORT_SEQUENTIAL
            so.log_severity_level = 3
            if prep.onnx_bytes is None:
                from .onnx import to_onnx
                prep.onnx_bytes = to_onnx(prep.graph).SerializeToString()
            sess = self.ort.InferenceSession(prep.onnx_bytes, so, providers=["CPUExecutionProvider"])
            feeds = {i.name: prep.feeds[i.name] for i in sess.get_inputs()}
            check_close(sess.run(None, feeds)[0], reference, "ONNX Runtime's output", rtol=case.rtol,
                        against=prep.reference_name)
            return 1e3 * median_time(lambda: sess.run(None, feeds), self.settings)
        except Exception as e:              # noqa: BLE001  (a peer that cannot run is n/a, not a crash)
            self.note(f"{case.name}: ORT n/a: {_describe(e)}")
            return None

    @staticmethod
    def judge(case: Case, row: Row) -> None:
        """Attach the issue's targets that apply to this row."""
        def add(target, value, ok):
            row.targets.append({"target": target, "value": value, "pass": bool(ok)})
        if case.group in ("layer", "grad"):
            if row.x_torch is not None:
                add(">=1x torch", f"{row.x_torch:.2f}x", row.x_torch >= 1.0)
            if case.kernel3x3 and row.pct_peak is not None:
                add(">=70% peak", f"{row.pct_peak:.0f}%", row.pct_peak >= 70)
        elif case.group == "net" and case.latency:
            for peer, x in (("torch", row.x_torch), ("ORT", row.x_ort)):
                if x is not None:
                    add(f"latency <=0.5x {peer}", f"{1 / x:.2f}x", 1 / x <= 0.5)
        elif case.group == "train" and row.x_torch is not None:
            add(">=3x torch eager", f"{row.x_torch:.2f}x", row.x_torch >= 3.0)
        elif case.group == "model" and row.vs_ort is not None:
            add(f"<={MODEL_WORST:g}x ORT", f"{row.vs_ort:.2f}x", row.vs_ort <= MODEL_WORST)
            add(f"goal <={MODEL_GOAL:g}x ORT", f"{row.vs_ort:.2f}x", row.vs_ort <= MODEL_GOAL)
        if row.untuned_ms is not None and row.convc_ms:
            slower = row.untuned_ms / row.convc_ms
            add(f"untuned <={UNTUNED_TARGET:g}x tuned", f"{slower:.2f}x", slower <= UNTUNED_TARGET)

    def run_compile(self, case: Case) -> list[Row]:
        """Cold compile: each into a fresh temporary CONVC_CACHE_DIR, with the
        compiler-version lookup forgotten too; cached: the same graph again."""
        from .api import compile
        from .models import lenet5
        from .runtime import build

        row = Row(case.name, case.group, None)
        g = lenet5()
        old = os.environ.get("CONVC_CACHE_DIR")
        try:
            with tempfile.TemporaryDirectory(prefix="convc-bench-") as tmp:
                if case.name.endswith("cold"):
                    times = []
                    for i in range(self.settings.cold_compiles):
                        os.environ["CONVC_CACHE_DIR"] = os.path.join(tmp, str(i))
                        if hasattr(build.compiler_version, "cache_clear"):
                            build.compiler_version.cache_clear()
                        t = time.perf_counter()
                        mod = compile(g, target="c")
                        times.append(time.perf_counter() - t)
                    t = statistics.median(times)
                    limit, label = 1.5, "<1.5 s"
                else:
                    os.environ["CONVC_CACHE_DIR"] = tmp
                    mod = compile(g, target="c")
                    s = self.settings
                    t = median_time(lambda: compile(g, target="c"),
                                    Settings(warmup=0, min_runs=s.min_runs, repeat_seconds=s.repeat_seconds,
                                             max_seconds=s.max_seconds))
                    limit, label = 0.05, "<50 ms"
                x = self.env.rng("compile").standard_normal((1, 1, 28, 28)).astype(np.float32)
                row.error = check_close(mod(x=x), compile(g, target="numpy")(x=x))
        except Exception as e:              # noqa: BLE001
            row.status = "FAILED"
            self.note(f"{case.name} FAILED: {_describe(e)}")
            return [row]
        finally:
            if old is None:
                os.environ.pop("CONVC_CACHE_DIR", None)
            else:
                os.environ["CONVC_CACHE_DIR"] = old
        row.convc_ms = t * 1e3
        row.targets.append({"target": label, "value": f"{t * 1e3:.0f} ms" if t < 1 else f"{t:.2f} s",
                            "pass": t < limit})
        return [row]


def parse_threads(text: str | None) -> list[int]:
    """"1,4" -> [1, 4]; default: 1 and os.cpu_count() (once if equal)."""
    if not text:
        return sorted({1, os.cpu_count() or 1})
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConvcError(f"bench: --threads takes comma-separated positive integers such as 1,4, got {text!r}") \
            from None
    if not values or min(values) < 1:
        raise ConvcError(f"bench: --threads takes comma-separated positive integers such as 1,4, got {text!r}")
    return sorted(set(values))


def choose(cases: str | None = None, models: str | None = None, quick: bool = False) -> list[Case]:
    """The cases to run: those matching ``cases`` (all without a pattern),
    then the models matching ``models`` ("*" or "all": every model). With
    ``models`` and no ``cases`` only the models run."""
    chosen = [] if models and not cases else select(suite(quick), cases)
    if models:
        chosen += select(model_cases(quick), None if models.strip() in ("*", "all") else models)
    return chosen


def run(cases: str | None = None, threads=None, quick: bool = False, repeat_seconds: float | None = None,
        min_runs: int | None = None, progress: Callable[[str], None] | None = None, models: str | None = None,
        profile: int = 0, under_load: bool = False, tune: float | None = None, int8: bool = False) -> Report:
    """Run the suite (or the cases matching ``cases``) and the models matching
    ``models`` (see :func:`choose`) at each thread count of ``threads`` (a
    list, or text like "1,4"; default 1 and all cores) and return a
    :class:`Report`. ``profile``: keep each row's ``profile`` slowest nodes.
    ``under_load``: time everything beside :func:`busy_load` processes (one
    per core; the FMA peak is measured before they start) and judge each
    case's time at N threads against its time at 1 thread (1 is added to
    ``threads`` if missing; ``LOAD_TARGET``). ``tune``: seconds of
    :func:`convc.tune` per case graph (at the first thread count) before it is
    timed; each row then also times the untuned build (``untuned_ms``,
    target ``UNTUNED_TARGET``).

    >>> print(cc.bench.run(cases="lenet5_b1", quick=True).table())   # doctest: +SKIP
    >>> print(cc.bench.run(models="resnet18", threads=[1]).table())  # doctest: +SKIP
    """
    import convc

    settings = Settings.make(quick, repeat_seconds, min_runs)
    thread_list = parse_threads(threads if threads is None or isinstance(threads, str)
                                else ",".join(map(str, threads)))
    if profile < 0:
        raise ConvcError(f"bench: --profile takes a positive number of nodes, got {profile}")
    if under_load:
        thread_list = sorted({1, *thread_list})
        if len(thread_list) < 2:
            raise ConvcError("bench: --under-load compares convc at 1 thread with more threads, but only 1 thread "
                             "is asked for (this machine has one core, or --threads 1): try --threads 1,2")
    chosen = [] if int8 and not cases and not models else choose(cases, models, quick)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if tune is not None and not tune > 0:
        raise ConvcError(f"bench: --tune takes a positive number of seconds, got {tune}")
    runner = Runner(settings, thread_list, progress, profile)
    runner.env.tune = tune
    progress = runner.progress
    progress("measuring the FMA peak")
    runner.measure_peak()
    rows: list[Row] = []
    busy = 0
    with busy_load() if under_load else contextlib.nullcontext() as pids:
        if under_load:
            busy = len(pids)
            progress(f"under load: {busy} busy processes spinning (pids {', '.join(map(str, pids))})")
        for i, case in enumerate(chosen, start=1):
            progress(f"[{i}/{len(chosen)}] {case.name}")
            rows += runner.run_case(case)
        int8_rows = run_int8(runner, quick, cases) if int8 else []
    if under_load:
        judge_load(rows)
    from .runtime.build import compiler, compiler_version

    versions = {"convc": convc.__version__, "numpy": np.__version__,
                "torch": getattr(runner.torch, "__version__", "not installed"),
                "onnxruntime": getattr(runner.ort, "__version__", "not installed")}
    timing = (f"median of >= {settings.min_runs} runs and >= {settings.repeat_seconds:g} s after "
              f"{settings.warmup} warm-up(s); threads {', '.join(map(str, thread_list))}")
    how = models_how = None
    if any(c.group != "model" for c in chosen):
        how = (f"{'quick, ' if quick else ''}float32; forward single-layer cases at batch "
               f"{FORWARD_BATCH}, gradients at batch {GRAD_BATCH if not quick else QUICK_BATCH}, r18_*/mbv2_* "
               f"layers at the batch their description gives; "
               f"{timing}; checked to {RTOL:g} of the output scale")
    if any(c.group == "model" for c in chosen):
        tv = sys.modules.get("torchvision")
        if tv is not None:
            versions["torchvision"] = tv.__version__
        shape = "x".join(map(str, MODELS[0].input_shape(quick)[1:]))
        models_how = (f"{'quick, ' if quick else ''}float32, batch 1, {shape}, random weights; "
                      f"torch.onnx.export(dynamo=True, opset {MODEL_OPSET}) -> cc.from_onnx -> cc.compile "
                      f"(default pipeline); convc checked against ONNX Runtime to {MODEL_RTOL:g} of the output "
                      f"scale; ORT intra_op_num_threads = threads, sequential; torch eager with "
                      f"torch.set_num_threads; {timing}")
    from .runtime.threads import wait_policy

    under = (f"{busy} busy processes (one per core, a pure-Python spin each) ran beside every compile, check and "
             f"timed run; the FMA peak was measured before they started") if under_load else None
    header = dict(cpu=cpu_model(), isa=isa_flags(), cores=os.cpu_count(), load=f"{load:.2f} at start",
                  compiler=compiler_version(compiler()).splitlines()[0], versions=versions,
                  fma_peak={str(t): v for t, v in runner.peak.items()}, fma_detail=runner.fma_detail, settings=how,
                  models=models_how, quick=quick, openmp=wait_policy().detail, under_load=under,
                  tuned=(f"each case graph tuned by cc.tune (budget {tune:g} s, at {thread_list[0]} thread"
                         f"{'s' * (thread_list[0] > 1)}) into {tuning_db_path()}; convc ms is the tuned build, "
                         f"untuned ms the same graph compiled without the tuning database, the two run in turn")
                  if tune else None)
    descriptions = {c.name: c.description for c in chosen}
    descriptions.update({la.name: la.describe(quick) for la in int8_layers() if any(r["case"] == la.name
                                                                                     for r in int8_rows)})
    return Report(header, rows, runner.notes, descriptions, int8_rows)


# -- int8 (--int8) ----------------------------------------------------------------------------------

INT8_TARGET = 2.0
"""Issue 15: int8 conv on a host with VNNI >= 2x the float32 path of the same layer."""


def int8_layers() -> list[Layer]:
    """The forward 2D ungrouped layers the int8 rows run: the real-model
    layers (``r18_*``, ``mbv2_pw*``) at batch 1."""
    return [la for la in LAYERS if la.batch == 1 and la.groups == 1 and not la.transposed and len(la.kernel) == 2]


def int8_layer(layer: Layer, quick: bool, seed: int = 0):
    """(float graph, its feeds, int8 graph, its feeds, torch quantized peer
    or None): the layer in float32 as the suite runs it and quantized as a
    post-training static quantizer would (convc/quant.py): uint8 activations
    with min/max scales, symmetric per-channel int8 weights."""
    from . import quant
    from .api import compile
    from .ir import Graph
    from .ops.quantized import qconv

    g, feeds = layer_graph(layer, "fwd", quick, 1, seed)
    x, w = feeds["x"], g.node("w")["value"]
    y = compile(g, target="numpy")(x=x)
    x_scale, x_zp = quant.choose_qparams(x.min(), x.max(), "uint8")
    y_scale, y_zp = quant.choose_qparams(y.min(), y.max(), "uint8")
    wq, w_scale = quant.quantize_weights(w)
    xq = quant.quantize_array(x, x_scale, x_zp, "uint8")
    q = Graph(f"bench_{layer.name}_int8")
    xi = q.input("x", xq.shape, "uint8")
    q.output(qconv(xi, q.param("w", wq, "int8"), x_scale=x_scale, x_zero_point=x_zp, w_scale=w_scale,
                   y_scale=y_scale, y_zero_point=y_zp, dtype="uint8", stride=layer.stride, padding=layer.padding,
                   dilation=layer.dilation), "y")
    return g, feeds, q, {"x": xq}, (x_scale, x_zp, wq, w_scale, y_scale, y_zp)


def _torch_qconv(torch, layer: Layer, xq, qp):
    """PyTorch's quantized conv (fbgemm engine) on the same integers, or None."""
    x_scale, x_zp, wq, w_scale, y_scale, y_zp = qp
    try:
        import torch.ao.nn.quantized.functional as qF
        torch.backends.quantized.engine = "fbgemm"
        tx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(xq), x_scale, x_zp)
        tw = torch._make_per_channel_quantized_tensor(torch.from_numpy(wq), torch.tensor(w_scale, dtype=torch.float64),
                                                      torch.zeros(len(w_scale), dtype=torch.long), 0)
    except (ImportError, RuntimeError, AttributeError):
        return None

    def run_torch():
        with torch.inference_mode():
            return qF.conv2d(tx, tw, None, stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                             scale=y_scale, zero_point=y_zp)
    return run_torch


def run_int8(runner: "Runner", quick: bool, cases: str | None = None) -> list[dict]:
    """The int8 rows: each layer of :func:`int8_layers` (matching ``cases``)
    at each thread count, convc int8 (default pipeline: the int8 GEMM of
    convc/ops/qgemm.py), convc float32 and PyTorch's quantized conv timed in
    turn in this process (median of the settings' runs). convc int8 is
    checked bit for bit against the reference interpreter and PyTorch's
    output to 1 LSB (it requantizes in float) before anything is timed."""
    from .api import compile
    from .cost import cost
    from .host import probe

    chosen = {c.name for c in select([Case(la.name, "int8", "") for la in int8_layers()], cases)}
    layers = [la for la in int8_layers() if la.name in chosen]
    out = []
    for layer in layers:
        runner.progress(f"[int8] {layer.name}")
        g, feeds, q, qfeeds, qp = int8_layer(layer, quick)
        f32, i8 = compile(g, target="c"), compile(q, target="c")
        lowered = [i8.graph.node(n)["op"] for n in i8.graph.topological_order()]
        kernel = next((i8.graph.node(n)["attrs"]["kernel"] for n in i8.graph.topological_order()
                       if i8.graph.node(n)["op"] == "qgemm"), "direct loop")
        want = compile(q, target="numpy")(**qfeeds)
        peer = _torch_qconv(runner.torch, layer, qfeeds["x"], qp) if runner.torch is not None else None
        for threads in runner.threads:
            runner.set_threads(threads)
            row = dict(case=layer.name, threads=threads, mflop=2 * cost(q).macs / 1e6, kernel=kernel,
                       path="qgemm" if "qgemm" in lowered else "qconv", status="ok")
            got = i8(**qfeeds)
            if not np.array_equal(got, want):
                row.update(status="FAILED", reason=f"{np.count_nonzero(got != want)} outputs differ from the reference")
                runner.note(f"int8 {layer.name} FAILED: {row['reason']}")
                out.append(row)
                continue
            fns = [lambda: i8.run(qfeeds), lambda: f32.run(feeds)]
            if peer is not None:
                lsb = int(np.abs(peer().int_repr().numpy().astype(np.int32) - got.astype(np.int32)).max())
                row["torch_lsb"] = lsb
                if lsb > 1:
                    runner.note(f"int8 {layer.name}: PyTorch's quantized conv differs by {lsb} LSB")
                fns.append(peer)
            times = median_times_in_turn(fns, runner.settings)
            row.update(int8_ms=1e3 * times[0], f32_ms=1e3 * times[1],
                       torch_ms=1e3 * times[2] if peer is not None else None)
            row["x_f32"] = row["f32_ms"] / row["int8_ms"]
            row["x_torch"] = row["torch_ms"] / row["int8_ms"] if peer is not None else None
            if not quick:                       # the target is about the real layers, not --quick's small ones
                row["target"] = dict(target=f">={INT8_TARGET:g}x convc float32", value=f"{row['x_f32']:.2f}x",
                                     pass_=row["x_f32"] >= INT8_TARGET)
            out.append(row)
    dot = probe().int8_dot
    runner.note(f"int8 rows: uint8 activations, per-channel int8 weights, batch 1; kernel from host.probe(): "
                f"{dot} ({'VNNI' if dot != 'none' else 'no VNNI: plain C'}); x f32 = convc float32 ms / int8 ms "
                f"(the float path is the default pipeline's choice: Winograd, GEMM or direct), x torch = PyTorch "
                f"fbgemm quantized conv ms / int8 ms; run in turn, medians")
    return out


def int8_table(rows: list[dict], markdown: bool) -> list[str]:
    cols = ["int8 case", "threads", "MFLOP", "int8 ms", "f32 ms", "x f32", "torch int8 ms", "x torch", "kernel",
            "target"]
    body = [[r["case"], str(r["threads"]), _num(r["mflop"]), _ms(r.get("int8_ms"), r["status"]), _ms(r.get("f32_ms")),
             _ratio(r.get("x_f32")), _ms(r.get("torch_ms")), _ratio(r.get("x_torch")), r["kernel"],
             r["status"] if r["status"] != "ok" else "-" if "target" not in r else
             f"{'pass' if r['target']['pass_'] else 'miss'} {r['target']['target']} ({r['target']['value']})"]
            for r in rows]
    return ["", "int8 (--int8; x f32 and x torch > 1: convc int8 is faster):"] + _grid(cols, body, markdown)


# -- command line -----------------------------------------------------------------------------------

def tuning_db_path() -> str:
    from .tuning import db_path
    return str(db_path())


def cmd_bench(args) -> int:
    """``convc bench``: run, print the table, optionally write JSON. Exit 1 if a case FAILED."""
    if args.list:
        chosen = choose(args.cases, args.models, args.quick)
        if not args.cases and not args.models:
            chosen += model_cases(args.quick)
        for c in chosen:
            print(f"{c.name:24s} {'(--models) ' if c.group == 'model' else ''}{c.description}")
        return 0
    report = run(args.cases, args.threads, args.quick, args.repeat_seconds, args.min_runs,
                 progress=lambda msg: print(msg, file=sys.stderr, flush=True), models=args.models,
                 profile=args.profile, under_load=args.under_load, tune=args.tune, int8=args.int8)
    print(report.table(markdown=args.markdown))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_json(), f, indent=1)
    return 1 if report.failed else 0

"""One op-info record per convolution op, and the lowerings that can take it.

An :class:`OpInfo` says, for one op (``conv``, its kernel gradient ``g``
(``conv_grad_kernel``), its input gradient ``h`` (``conv_grad_input``), the
transposed conv, a depthwise + pointwise pair for the fused separable
kernel, conv + residual + activation for the epilogue each lowering's
producer fuses, a depthwise conv with a fused clip for the depthwise row
kernel, and the Winograd grid: 3x3 convs with an optional residual and
activation, ``WINOGRAD_CASES``):

- how to build the op in a graph from a :class:`Config` (``build``), with the
  arrays it takes (``arrays``: deterministic per config and seed);
- its torch twin (``torch``: ``torch.nn.functional`` conv / conv_transpose,
  autograd for g and h), evaluated in float64 on the same values;
- which lowerings (:data:`LOWERINGS`) can take each config (``lowerings``);
- its config grid (``grid(long)``).

The conv grid writes some paddings as cc.conv accepts them ("same",
"valid", "full", ints; ``Config.written``): tests/test_conv.py checks their
normalisation to ``Config.padding``. Its long grid holds the random configs
tests/test_conv.py used to draw (:func:`random_written_cfg`).
:class:`WinogradCase` is the case type (arrays and torch twin) of
tests/test_winograd.py and tests/test_winograd_f43.py, which take their cases
from ``WINOGRAD_CASES``.

The numpy reference is convc's own interpreter (``cc.compile(g,
target="numpy")``); tests/test_lowerings.py compares it, and every lowering's
generated C, with the torch twin.

A :class:`Lowering` is a pass list plus, where a pass applies a size rule
(``conv_to_gemm``'s MIN_MACS, ``conv_to_winograd``'s channel minimum and tile
choice), a one-entry-per-node tuning database that makes the pass take every
node; ``taken`` says whether a compiled graph really computes a node that way,
so a test cannot pass by silently running the direct loops.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

import convc as cc
from convc.ir import Graph
from helpers import expected_pads, forcing_database

TORCH_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
TORCH_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


# -- configurations -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """One convolution geometry, every attribute per axis and explicit.

    For ``conv``, ``g`` and ``h`` it describes the forward conv ``x (n, c_in,
    *sizes) * w (c_out, c_in/groups, *kernel)``; for the transposed conv,
    ``x (n, c_in, *sizes)`` and ``w (c_in, c_out/groups, *kernel)``; for the
    separable pair, the depthwise conv (``groups == c_in``, ``c_out`` a
    multiple of it) followed by a 1x1 conv to ``c_pw`` channels."""
    rank: int
    n: int
    c_in: int
    c_out: int
    groups: int
    sizes: tuple
    kernel: tuple
    stride: tuple
    padding: tuple                  # ((lo, hi), ...) per axis
    dilation: tuple
    flip: bool = False
    bias: str = "none"              # "none" | "tied" | "untied"
    output_padding: tuple = ()      # transposed conv only
    c_pw: int = 0                   # separable only: pointwise output channels
    tag: str = ""
    written: object = None          # conv only: the padding as passed to cc.conv when not the pairs
                                    # ("same", "valid", "full", an int, per-axis ints); ``padding`` holds
                                    # the pairs helpers.expected_pads derives from it (DESIGN.md's rules)
    act: str | None = None          # the winograd record: an activation after the conv (TORCH_ACTIVATIONS)
    residual: bool = False          # the winograd record: a residual input added before the activation

    @property
    def id(self) -> str:
        j = lambda v: "x".join(map(str, v))  # noqa: E731
        pads = "_".join(f"{lo}{hi}" for lo, hi in self.padding)
        parts = [f"{self.rank}d", f"n{self.n}", f"ci{self.c_in}", f"co{self.c_out}", f"g{self.groups}",
                 "in" + j(self.sizes), "k" + j(self.kernel), "s" + j(self.stride), "d" + j(self.dilation),
                 "p" + pads]
        if self.output_padding and any(self.output_padding):
            parts.append("op" + j(self.output_padding))
        if isinstance(self.written, str):
            parts.append(self.written)
        if self.c_pw:
            parts.append(f"pw{self.c_pw}")
        if self.flip:
            parts.append("flip")
        if self.bias != "none":
            parts.append(self.bias)
        if self.residual:
            parts.append("res")
        if self.act:
            parts.append(self.act)
        return "-".join(([self.tag] if self.tag else []) + parts)

    @property
    def conv_out(self) -> tuple:
        """Spatial output sizes of the forward conv (DESIGN.md's formula)."""
        return tuple((n + lo + hi - d * (k - 1) - 1) // s + 1 for n, k, s, d, (lo, hi) in
                     zip(self.sizes, self.kernel, self.stride, self.dilation, self.padding))

    @property
    def transposed_out(self) -> tuple:
        """Spatial output sizes of the transposed conv (PyTorch's formula)."""
        return tuple((n - 1) * s - lo - hi + d * (k - 1) + 1 + op for n, s, (lo, hi), d, k, op in
                     zip(self.sizes, self.stride, self.padding, self.dilation, self.kernel, self.output_padding))

    @property
    def pointwise(self) -> bool:
        """A 1x1 unit-stride unpadded conv: its input is already the GEMM's matrix."""
        return (all(k == 1 for k in self.kernel) and all(s == 1 for s in self.stride)
                and all(p == (0, 0) for p in self.padding))

    @property
    def depthwise(self) -> bool:
        return self.groups == self.c_in > 1


def C(rank, n, c_in, c_out, groups, sizes, kernel, stride=1, padding=0, dilation=1, written=False,
      **kw) -> Config:
    """A Config from ints or per-axis values (padding: an int, per-axis ints,
    (lo, hi) pairs, or a word "valid" / "same" / "full"). A word, or
    ``written=True``, keeps the padding as written (``Config.written``: conv
    builds its node with it, and test_conv checks that convc normalises it to
    ``Config.padding``, the pairs from helpers.expected_pads)."""
    axes = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * rank  # noqa: E731
    pads = expected_pads(padding, axes(sizes), axes(kernel), axes(stride), axes(dilation))
    if "output_padding" in kw:
        kw["output_padding"] = axes(kw["output_padding"])
    return Config(rank, n, c_in, c_out, groups, axes(sizes), axes(kernel), axes(stride), pads, axes(dilation),
                  written=padding if written or isinstance(padding, str) else None, **kw)


def _fits(cfg: Config) -> bool:
    return all(o >= 1 for o in cfg.conv_out)


def random_conv_cfg(rng: random.Random) -> Config:
    """A random valid forward-conv geometry (the long grid)."""
    rank = rng.choice([1, 2, 2, 2, 3])
    kind = rng.choice(["plain", "plain", "grouped", "depthwise", "winograd", "pointwise"])
    if kind == "depthwise":
        c_in = rng.randint(2, 5)
        groups, c_out = c_in, c_in * rng.randint(1, 2)
    elif kind == "grouped":
        groups = rng.randint(2, 3)
        c_in, c_out = groups * rng.randint(1, 3), groups * rng.randint(1, 3)
    else:
        groups, c_in, c_out = 1, rng.randint(1, 9), rng.randint(1, 12)
    nmax = {1: 17, 2: 10, 3: 6}[rank]
    while True:
        if kind == "winograd":
            rank, kernel, stride, dil = 2, (3, 3), (1, 1), (1, 1)
        elif kind == "pointwise":
            kernel, stride, dil = (1,) * rank, (1,) * rank, tuple(rng.choice([1, 2]) for _ in range(rank))
        else:
            kernel = tuple(rng.randint(1, 4 if rank < 3 else 3) for _ in range(rank))
            stride = tuple(rng.choice([1, 1, 2, 3]) for _ in range(rank))
            dil = tuple(rng.choice([1, 1, 2]) for _ in range(rank))
        pads = ((0, 0),) * rank if kind == "pointwise" else \
            tuple((rng.randint(0, 2), rng.randint(0, 2)) for _ in range(rank))
        sizes = tuple(rng.randint(1, nmax) for _ in range(rank))
        cfg = Config(rank, rng.choice([1, 1, 2]), c_in, c_out, groups, sizes, kernel, stride, pads, dil,
                     flip=rng.random() < 0.25, bias=rng.choice(["none", "tied", "untied"]), tag="rnd")
        if _fits(cfg):
            return cfg


def _axis_tuple_or_int(rng: random.Random, rank: int, choices: list):
    vals = tuple(rng.choice(choices) for _ in range(rank))
    if len(set(vals)) == 1 and rng.random() < 0.5:
        return vals[0]
    return vals


def random_written_cfg(rng: random.Random) -> Config:
    """A random valid forward-conv geometry with its padding in any form
    cc.conv accepts (an int, per-axis ints, asymmetric pairs, "valid",
    "same", "full"), kernels up to 5 and dilation up to 3: the long grid
    tests/test_conv.py drew its 240 random configs from (same seed, same
    draws, so the same geometries)."""
    rank = rng.choices([1, 2, 3], weights=[3, 5, 2])[0]
    n = rng.choice([1, 1, 2, 3])
    kind = rng.choice(["plain", "plain", "plain", "grouped", "grouped", "depthwise"])
    if kind == "depthwise":
        c_in = rng.randint(1, 4)
        groups, c_out = c_in, c_in * rng.randint(1, 2)
    elif kind == "grouped":
        groups = rng.randint(2, 4)
        c_in, c_out = groups * rng.randint(1, 2), groups * rng.randint(1, 2)
    else:
        groups, c_in, c_out = 1, rng.randint(1, 4), rng.randint(1, 4)
    kmax, dil, nmax = {1: (5, [1, 1, 2, 3], 20), 2: (4, [1, 1, 2, 3], 11), 3: (3, [1, 1, 2], 7)}[rank]
    kernel = tuple(rng.randint(1, kmax) for _ in range(rank))
    stride = _axis_tuple_or_int(rng, rank, [1, 1, 2, 3])
    dilation = _axis_tuple_or_int(rng, rank, dil)
    form = rng.choice(["int", "tuple", "pairs", "pairs", "valid", "same", "same", "full"])
    if form == "int":
        padding = rng.randint(0, 3)
    elif form == "tuple":
        padding = tuple(rng.randint(0, 3) for _ in range(rank))
    elif form == "pairs":
        padding = tuple((rng.randint(0, 3), rng.randint(0, 3)) for _ in range(rank))
        if all(lo == hi for lo, hi in padding):           # make at least one axis asymmetric
            lo, hi = padding[0]
            padding = ((lo, hi + 1),) + padding[1:]
    else:
        padding = form
    flip = rng.random() < 0.25
    bias = rng.choices(["none", "tied", "untied"], weights=[4, 3, 3])[0]
    rng.random()        # test_conv's float64 draw, kept for the same sequence: every config runs in both dtypes
    while True:
        sizes = tuple(rng.randint(1, nmax) for _ in range(rank))
        cfg = C(rank, n, c_in, c_out, groups, sizes, kernel, stride, padding, dilation, written=True,
                flip=flip, bias=bias, tag="rndw")
        if _fits(cfg):
            return cfg


# -- arrays ---------------------------------------------------------------------------------------
def _rng(cfg: Config, seed: int):
    return np.random.default_rng([seed, *map(ord, cfg.id)])


def _normal(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def _conv_weight(rng, cfg: Config, dtype):
    fan_in = cfg.c_in // cfg.groups * math.prod(cfg.kernel)
    return _normal(rng, (cfg.c_out, cfg.c_in // cfg.groups) + cfg.kernel, dtype, 1 / math.sqrt(fan_in))


def _bias(rng, cfg: Config, out_sizes, channels, dtype):
    if cfg.bias == "tied":
        return _normal(rng, (channels,), dtype)
    if cfg.bias == "untied":
        return _normal(rng, (channels,) + tuple(out_sizes), dtype)
    return None


def conv_arrays(cfg: Config, dtype: str, seed: int = 0) -> dict:
    rng = _rng(cfg, seed)
    return dict(x=_normal(rng, (cfg.n, cfg.c_in) + cfg.sizes, dtype), w=_conv_weight(rng, cfg, dtype),
                b=_bias(rng, cfg, cfg.conv_out, cfg.c_out, dtype))


def grad_kernel_arrays(cfg: Config, dtype: str, seed: int = 0) -> dict:
    rng = _rng(cfg, seed)
    return dict(gy=_normal(rng, (cfg.n, cfg.c_out) + cfg.conv_out, dtype),
                v=_normal(rng, (cfg.n, cfg.c_in) + cfg.sizes, dtype))


def grad_input_arrays(cfg: Config, dtype: str, seed: int = 0) -> dict:
    rng = _rng(cfg, seed)
    return dict(k=_conv_weight(rng, cfg, dtype), gy=_normal(rng, (cfg.n, cfg.c_out) + cfg.conv_out, dtype))


def transpose_arrays(cfg: Config, dtype: str, seed: int = 0) -> dict:
    rng = _rng(cfg, seed)
    fan_in = cfg.c_in // cfg.groups * math.prod(cfg.kernel)
    return dict(x=_normal(rng, (cfg.n, cfg.c_in) + cfg.sizes, dtype),
                w=_normal(rng, (cfg.c_in, cfg.c_out // cfg.groups) + cfg.kernel, dtype, 1 / math.sqrt(fan_in)),
                b=_bias(rng, cfg, cfg.transposed_out, cfg.c_out, dtype))


def separable_arrays(cfg: Config, dtype: str, seed: int = 0) -> dict:
    rng = _rng(cfg, seed)
    tied = cfg.bias == "tied"
    return dict(x=_normal(rng, (cfg.n, cfg.c_in) + cfg.sizes, dtype), w_dw=_conv_weight(rng, cfg, dtype),
                b_dw=_normal(rng, (cfg.c_out,), dtype) if tied else None,
                w_pw=_normal(rng, (cfg.c_pw, cfg.c_out) + (1,) * cfg.rank, dtype, 1 / math.sqrt(cfg.c_out)),
                b_pw=_normal(rng, (cfg.c_pw,), dtype) if tied else None)


# -- building the op in a graph -------------------------------------------------------------------
def _geo(cfg: Config) -> dict:
    return dict(stride=cfg.stride, padding=cfg.padding, dilation=cfg.dilation, groups=cfg.groups)


def _inp(g: Graph, name: str, a: np.ndarray, feeds: dict):
    feeds[name] = a
    return g.input(name, a.shape, str(a.dtype))


def build_conv(g: Graph, cfg: Config, tag: str, a: dict, feeds: dict):
    """cc.conv with the padding as the config writes it (a word, an int, the pairs)."""
    x = _inp(g, f"{tag}_x", a["x"], feeds)
    b = g.param(f"{tag}_b", a["b"]) if a["b"] is not None else None
    geo = _geo(cfg)
    if cfg.written is not None:
        geo["padding"] = cfg.written
    return cc.conv(x, g.param(f"{tag}_w", a["w"]), bias=b, flip=cfg.flip, name=tag, **geo)


def build_grad_kernel(g: Graph, cfg: Config, tag: str, a: dict, feeds: dict):
    gy, v = _inp(g, f"{tag}_gy", a["gy"], feeds), _inp(g, f"{tag}_v", a["v"], feeds)
    return cc.conv_grad_kernel(gy, v, cfg.kernel, flip=cfg.flip, name=tag, **_geo(cfg))


def build_grad_input(g: Graph, cfg: Config, tag: str, a: dict, feeds: dict):
    gy = _inp(g, f"{tag}_gy", a["gy"], feeds)
    return cc.conv_grad_input(g.param(f"{tag}_k", a["k"]), gy, cfg.sizes, flip=cfg.flip, name=tag, **_geo(cfg))


def build_transpose(g: Graph, cfg: Config, tag: str, a: dict, feeds: dict):
    x = _inp(g, f"{tag}_x", a["x"], feeds)
    b = g.param(f"{tag}_b", a["b"]) if a["b"] is not None else None
    return cc.conv_transpose(x, g.param(f"{tag}_w", a["w"]), bias=b, output_padding=cfg.output_padding,
                             name=tag, **_geo(cfg))


def build_separable(g: Graph, cfg: Config, tag: str, a: dict, feeds: dict):
    """Depthwise conv, relu, pointwise 1x1 conv (the pair fuse_separable takes);
    the pointwise node is named ``tag``."""
    x = _inp(g, f"{tag}_x", a["x"], feeds)
    bd = g.param(f"{tag}_bdw", a["b_dw"]) if a["b_dw"] is not None else None
    bp = g.param(f"{tag}_bpw", a["b_pw"]) if a["b_pw"] is not None else None
    h = cc.conv(x, g.param(f"{tag}_wdw", a["w_dw"]), bias=bd, flip=cfg.flip, name=f"{tag}_dw", **_geo(cfg))
    h = cc.relu(h, name=f"{tag}_relu")
    return cc.conv(h, g.param(f"{tag}_wpw", a["w_pw"]), bias=bp, name=tag)


def epilogue_arrays(cfg: Config, dtype: str, seed: int = 0) -> dict:
    a = conv_arrays(cfg, dtype, seed)
    a["r"] = _normal(_rng(cfg, seed + 1), (cfg.n, cfg.c_out) + cfg.conv_out, dtype)
    return a


def build_epilogue(g: Graph, cfg: Config, tag: str, a: dict, feeds: dict):
    """conv (node ``tag``) + a residual input + silu: what fuse_epilogues folds
    into the producer, whichever lowering made it (``tag_res`` and
    ``tag_act`` must be gone from a compiled graph that fused them)."""
    y = cc.add(build_conv(g, cfg, tag, a, feeds), _inp(g, f"{tag}_r", a["r"], feeds), name=f"{tag}_res")
    return cc.silu(y, name=f"{tag}_act")


def build_depthwise_clip(g: Graph, cfg: Config, tag: str, a: dict, feeds: dict):
    """A depthwise 2D conv with a clip to [-0.5, 0.5] fused as its activation
    (the node's own attributes, no pass): the depthwise row kernel's
    epilogue. The node is named ``tag``."""
    x = _inp(g, f"{tag}_x", a["x"], feeds)
    args = [x, g.param(f"{tag}_w", a["w"])] + ([g.param(f"{tag}_b", a["b"])] if a["b"] is not None else [])
    return g.add("conv", args, dict(_geo(cfg), flip=cfg.flip, activation="clip", min=CLIP[0], max=CLIP[1]),
                 name=tag)


CLIP = (-0.5, 0.5)


# -- torch twins (float64) ------------------------------------------------------------------------
def _t(a):
    return None if a is None else torch.from_numpy(np.asarray(a, np.float64))


def _padded(cfg: Config, x):
    """x zero-padded by the explicit (lo, hi) pairs (torch pads symmetrically only)."""
    pads = [p for lo_hi in reversed(cfg.padding) for p in lo_hi]
    return F.pad(x, pads)


def _flipped(cfg: Config, w):
    return w.flip(list(range(2, 2 + cfg.rank))) if cfg.flip else w


def _symmetric(cfg: Config) -> bool:
    return all(lo == hi for lo, hi in cfg.padding)


def torch_conv(cfg: Config, a: dict) -> np.ndarray:
    """torch's conv with its own padding where symmetric, else on the explicitly padded input."""
    x, w, b = _t(a["x"]), _t(a["w"]), _t(a["b"])
    if _symmetric(cfg):
        y = TORCH_CONV[cfg.rank](x, _flipped(cfg, w), None, stride=cfg.stride, dilation=cfg.dilation,
                                 groups=cfg.groups, padding=tuple(lo for lo, _ in cfg.padding))
    else:
        y = TORCH_CONV[cfg.rank](_padded(cfg, x), _flipped(cfg, w), None, stride=cfg.stride,
                                 dilation=cfg.dilation, groups=cfg.groups)
    return (y if b is None else y + (b.reshape((-1,) + (1,) * cfg.rank) if cfg.bias == "tied" else b)).numpy()


def _conv_vjp(cfg: Config, x, w, gy):
    """Autograd through torch's conv: (dL/dx, dL/dw) for L = <conv(x, w), gy>."""
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = TORCH_CONV[cfg.rank](_padded(cfg, x), _flipped(cfg, w), None, stride=cfg.stride, dilation=cfg.dilation,
                             groups=cfg.groups)
    y.backward(gy)
    return x.grad, w.grad


def torch_grad_kernel(cfg: Config, a: dict) -> np.ndarray:
    w = torch.zeros((cfg.c_out, cfg.c_in // cfg.groups) + cfg.kernel, dtype=torch.float64)
    return _conv_vjp(cfg, _t(a["v"]), w, _t(a["gy"]))[1].numpy()


def torch_grad_input(cfg: Config, a: dict) -> np.ndarray:
    x = torch.zeros((cfg.n, cfg.c_in) + cfg.sizes, dtype=torch.float64)
    return _conv_vjp(cfg, x, _t(a["k"]), _t(a["gy"]))[0].numpy()


def torch_transpose(cfg: Config, a: dict) -> np.ndarray:
    """torch's conv_transpose with its own padding where symmetric; else
    without padding, then the (lo, hi) crop and the output_padding zeros at
    the high end (torch has no asymmetric padding)."""
    x, w, b = _t(a["x"]), _t(a["w"]), _t(a["b"])
    if _symmetric(cfg):
        y = TORCH_CONV_T[cfg.rank](x, w, None, stride=cfg.stride, dilation=cfg.dilation, groups=cfg.groups,
                                   padding=tuple(lo for lo, _ in cfg.padding), output_padding=cfg.output_padding)
    else:
        full = TORCH_CONV_T[cfg.rank](x, w, None, stride=cfg.stride, dilation=cfg.dilation, groups=cfg.groups)
        full = F.pad(full, [p for op in reversed(cfg.output_padding) for p in (0, op)])
        y = full[(slice(None), slice(None)) + tuple(slice(lo, lo + o) for (lo, _), o in
                                                     zip(cfg.padding, cfg.transposed_out))]
    return (y if b is None else y + (b.reshape((-1,) + (1,) * cfg.rank) if cfg.bias == "tied" else b)).numpy()


def torch_epilogue(cfg: Config, a: dict) -> np.ndarray:
    return F.silu(torch.from_numpy(torch_conv(cfg, a) + np.asarray(a["r"], np.float64))).numpy()


def epilogue_magnitude(cfg: Config, a: dict) -> np.ndarray:
    """Sum of |products| before the activation (|conv| + |residual|), times
    silu's largest slope (1.1): silu(|z|) itself would be too small a scale
    where z < 0."""
    absd = {k: None if v is None else np.abs(v) for k, v in a.items()}
    return 1.1 * (np.abs(torch_conv(cfg, absd)) + absd["r"])


def torch_depthwise_clip(cfg: Config, a: dict) -> np.ndarray:
    return np.clip(torch_conv(cfg, a), *CLIP)


def conv_magnitude(cfg: Config, a: dict) -> np.ndarray:
    """The conv on |arrays|, before any clip (clip is 1-Lipschitz: it can
    only shrink the conv's rounding error, never the bound's scale)."""
    return np.abs(torch_conv(cfg, {k: None if v is None else np.abs(v) for k, v in a.items()}))


def torch_separable(cfg: Config, a: dict) -> np.ndarray:
    h = torch_conv(replace(cfg, bias="tied" if a["b_dw"] is not None else "none"),
                   dict(x=a["x"], w=a["w_dw"], b=a["b_dw"]))
    h = np.maximum(h, 0)
    pw = replace(cfg, c_in=cfg.c_out, c_out=cfg.c_pw, groups=1, sizes=h.shape[2:], kernel=(1,) * cfg.rank,
                 stride=(1,) * cfg.rank, padding=((0, 0),) * cfg.rank, dilation=(1,) * cfg.rank, flip=False,
                 bias="tied" if a["b_pw"] is not None else "none")
    return torch_conv(pw, dict(x=h, w=a["w_pw"], b=a["b_pw"]))


# -- the Winograd tests' cases (tests/test_winograd.py, tests/test_winograd_f43.py) ---------------
TORCH_ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
                     "leaky_relu": lambda v: F.leaky_relu(v, 0.01), "silu": F.silu, None: lambda v: v}
"""torch's twin of each activation a conv epilogue fuses (leaky_relu at convc's default slope)."""


@dataclass(frozen=True)
class WinogradCase:
    """A 3x3, stride-1, dilation-1, groups-1 2D conv as the Winograd tests
    build it (padding as written), optionally followed by a residual add and
    an activation that fuse_epilogues folds into the winograd_conv."""
    n: int
    c_in: int
    c_out: int
    size: tuple                 # (H, W) of the input
    padding: object             # as given to the builder
    bias: str = "none"          # "none" | "tied" | "untied"
    flip: bool = False
    act: str | None = None      # a key of TORCH_ACTIVATIONS
    residual: bool = False      # y = act(conv + r)

    @property
    def id(self) -> str:
        pad = str(self.padding).replace(" ", "")
        return (f"n{self.n}-ci{self.c_in}-co{self.c_out}-in{self.size[0]}x{self.size[1]}-p{pad}-{self.bias}"
                + ("-flip" if self.flip else "") + ("-res" if self.residual else "")
                + (f"-{self.act}" if self.act else ""))

    @property
    def config(self) -> Config:
        """The conv as an op-info Config (padding pairs by helpers.expected_pads)."""
        return C(2, self.n, self.c_in, self.c_out, 1, self.size, 3, 1, self.padding, 1, written=True,
                 flip=self.flip, bias=self.bias, act=self.act, residual=self.residual)

    def pads(self) -> tuple:
        return self.config.padding

    def out(self) -> tuple:
        return self.config.conv_out

    def arrays(self, dtype: str, seed: int, index: int, gain: float = 1.0):
        """(x, w, b, r): x ~ N(0, 1), w ~ N(0, gain / (9 C_in)) (gain 2: He),
        b per ``bias`` and r for a residual case, else None."""
        rng = np.random.default_rng([seed, index])
        x = rng.standard_normal((self.n, self.c_in) + self.size).astype(dtype)
        w = (rng.standard_normal((self.c_out, self.c_in, 3, 3)) * math.sqrt(gain / (9 * self.c_in))).astype(dtype)
        shape = {"none": None, "tied": (self.c_out,), "untied": (self.c_out,) + self.out()}[self.bias]
        b = None if shape is None else rng.standard_normal(shape).astype(dtype)
        r = rng.standard_normal((self.n, self.c_out) + self.out()).astype(dtype) if self.residual else None
        return x, w, b, r

    def torch(self, x, w, b=None, r=None) -> np.ndarray:
        """What the case computes, by torch in float64 (opinfo's conv twin)."""
        y = torch.from_numpy(torch_conv(replace(self.config, act=None, residual=False), dict(x=x, w=w, b=b)))
        if r is not None:
            y = y + torch.from_numpy(np.asarray(r, np.float64))
        return TORCH_ACTIVATIONS[self.act](y).numpy()


# The Winograd grid (tests/test_winograd.py's nine cases, then test_winograd_f43.py's own): tile
# edges, outputs smaller than a tile, several blocks of tiles across and down for either tile,
# channels that are not whole blocks, fused activations and residuals.
WINOGRAD_CASES = (
    WinogradCase(1, 9, 11, (10, 12), 1, "tied"),                             # even output 10x12
    WinogradCase(3, 13, 8, (9, 7), 0),                                       # odd output 7x5, batch 3
    WinogradCase(1, 8, 17, (5, 6), 2, "untied"),                             # 7x8; 17 = 2 blocks of 8 + 1
    WinogradCase(3, 10, 9, (11, 8), ((0, 2), (1, 0)), "tied", flip=True),    # asymmetric padding
    WinogradCase(1, 16, 24, (3, 3), 0, "tied", act="relu"),                  # one 1x1 output: a cut tile
    WinogradCase(1, 12, 8, (40, 70), "same", "none", act="leaky_relu"),      # 35 F(2x2) tile columns
    WinogradCase(2, 8, 8, (70, 3), 1, "untied", act="tanh"),                 # 35 F(2x2) tile rows
    WinogradCase(1, 33, 40, (15, 15), (2, 1), "tied", flip=True, act="sigmoid"),
    WinogradCase(3, 11, 14, (8, 13), ((2, 1), (0, 2)), "none"),
    WinogradCase(1, 12, 8, (30, 134), "same", "none", act="leaky_relu"),     # 34 F(4x4) tile columns
    WinogradCase(2, 8, 8, (130, 5), 1, "untied", act="tanh"),                # 33 F(4x4) tile rows
    WinogradCase(2, 11, 14, (16, 13), 1, "tied", act="relu", residual=True),  # fused residual + activation
    WinogradCase(1, 64, 72, (23, 21), 1, "untied", residual=True),           # He-scale channels, residual
    WinogradCase(3, 5, 3, (6, 9), 0),                                        # fewer channels than a block
)


def winograd_arrays(cfg: Config, dtype: str, seed: int = 0) -> dict:
    a = conv_arrays(cfg, dtype, seed)
    a["r"] = _normal(_rng(cfg, seed + 1), (cfg.n, cfg.c_out) + cfg.conv_out, dtype) if cfg.residual else None
    return a


def build_winograd(g: Graph, cfg: Config, tag: str, a: dict, feeds: dict):
    """conv (node ``tag``), then the residual input (``tag_res``) and the
    activation (``tag_act``) the config asks for."""
    y = build_conv(g, cfg, tag, a, feeds)
    if cfg.residual:
        y = cc.add(y, _inp(g, f"{tag}_r", a["r"], feeds), name=f"{tag}_res")
    return getattr(cc, cfg.act)(y, name=f"{tag}_act") if cfg.act else y


def torch_winograd(cfg: Config, a: dict) -> np.ndarray:
    y = torch_conv(replace(cfg, act=None, residual=False), a)
    if cfg.residual:
        y = y + np.asarray(a["r"], np.float64)
    return TORCH_ACTIVATIONS[cfg.act](torch.from_numpy(y)).numpy()


def winograd_magnitude(cfg: Config, a: dict) -> np.ndarray:
    """|conv| + |residual| on |arrays|, times 1.1: no activation of the grid
    is steeper than that (relu, leaky_relu, tanh: 1; sigmoid: 1/4)."""
    absd = {k: None if v is None else np.abs(v) for k, v in a.items()}
    m = np.abs(torch_conv(replace(cfg, act=None, residual=False), absd))
    return 1.1 * (m + (absd["r"] if cfg.residual else 0))


# -- lowerings --------------------------------------------------------------------------------------
def _lowered(lg: Graph, tag: str) -> dict[str, str]:
    """name -> op of the compiled graph's nodes that came from node ``tag``
    (the passes name what they make ``tag.<part>``), and ``tag`` itself."""
    return {n: lg.node(n)["op"] for n in lg.nx.nodes if n == tag or n.startswith(tag + ".")}


def _has(*ops, absent=(), attrs=None):
    """A ``taken`` check: the node's replacement contains every op of ``ops``,
    none of ``absent``, the original node is gone, and (``attrs``) the node
    of ops[0] has those attribute values."""
    def taken(lg: Graph, tag: str, op: str) -> str | None:
        made = _lowered(lg, tag)
        if made.get(tag) == op:
            return f"node {tag!r} is still a {op} (the direct loops)"
        have = set(made.values())
        missing = [o for o in ops if o not in have]
        if missing:
            return f"node {tag!r} became {sorted(have)}, without {missing}"
        extra = [o for o in absent if o in have]
        if extra:
            return f"node {tag!r} became {sorted(have)}, which should not contain {extra}"
        if attrs:
            node = next(n for n, o in made.items() if o == ops[0])
            got = {k: lg.node(node)["attrs"].get(k) for k in attrs}
            if got != attrs:
                return f"node {node!r} has {got}, expected {attrs}"
        return None
    return taken


def _direct(lg: Graph, tag: str, op: str) -> str | None:
    got = _lowered(lg, tag).get(tag)
    return None if got == op else f"node {tag!r} is {got!r}, expected the direct {op}"


def _study(lg: Graph, tag: str, op: str) -> str | None:
    """The study pipeline ends in conv_to_im2col: no conv may remain anywhere."""
    convs = [n for n in lg.nx.nodes if lg.node(n)["op"] == "conv"]
    if convs:
        return f"the study pipeline left conv nodes {convs[:5]}"
    return None if "im2col" in set(_lowered(lg, tag).values()) else f"node {tag!r} has no im2col"


def _default(lg: Graph, tag: str, op: str) -> str | None:
    """The default pipeline picks per node by its size rules (direct, GEMM,
    Winograd ...): the node must still be computed, as itself or as what a
    pass made of it (the comparison with torch is the test)."""
    made = _lowered(lg, tag)
    if not made:
        return f"node {tag!r} is gone from the compiled graph (nothing named {tag!r} or {tag + '.*'!r})"
    return None


def _template(name: str):
    """A ``taken`` check: the node is still an ``op`` node, generated from template ``name``."""
    def taken(lg: Graph, tag: str, op: str) -> str | None:
        from convc.ops import get_op

        if _lowered(lg, tag).get(tag) != op:
            return f"node {tag!r} is {_lowered(lg, tag)}, expected one {op} node"
        types = [lg.node(i)["type"] for i in lg.inputs_of(tag)]
        got = get_op(op).template_of(lg.node(tag)["attrs"], types)
        return None if got == name else f"node {tag!r} uses template {got!r}, expected {name!r}"
    return taken


def _fused(taken):
    """``taken`` plus: the residual add and the activation after node ``tag``
    were fused into what computes it (no ``tag_res`` / ``tag_act`` left)."""
    def check(lg: Graph, tag: str, op: str) -> str | None:
        left = [n for n in (f"{tag}_res", f"{tag}_act") if n in lg.nx]
        return f"not fused into {tag!r}: {left}" if left else taken(lg, tag, op)
    return check


@dataclass(frozen=True)
class Lowering:
    """A way a conv-like node is computed: the passes to run, the tuning
    algorithm forced on every node (None: no database at all), how to tell
    that the compiled graph took it (``taken(graph, node, op)`` -> why not,
    or None), and its float32 error model (see :func:`tolerance`)."""
    name: str
    passes: tuple
    algorithm: str | None
    taken: Callable | dict          # one check, or one per op
    error: str = "sum"              # "sum" | "winograd2" | "winograd4" | "fft"

    def check(self, lg: Graph, tag: str, op: str) -> str | None:
        fn = self.taken[op] if isinstance(self.taken, dict) else self.taken
        return fn(lg, tag, op)


LOWERINGS = {lw.name: lw for lw in [
    Lowering("direct", (), None, _direct),
    Lowering("im2col", ("conv_to_im2col",), None, _has("im2col", "matmul")),
    Lowering("gemm", ("conv_to_gemm",), "gemm", {
        "conv": _has("im2col", "matmul"),
        "conv_grad_kernel": _has("im2col"),                 # then matmul, or dense for few channels
        "conv_grad_input": _has("matmul", "col2im")}),
    Lowering("gemm_1x1", ("conv_to_gemm",), "gemm", _has("matmul", absent=("im2col",))),
    Lowering("winograd2", ("conv_to_winograd",), "winograd", _has("winograd_conv", "winograd_kernel",
                                                                 attrs=dict(tile=2)), "winograd2"),
    Lowering("winograd4", ("conv_to_winograd",), "winograd4", _has("winograd_conv", "winograd_kernel",
                                                                  attrs=dict(tile=4)), "winograd4"),
    Lowering("fft", ("conv_to_fft",), None, _has("fft_conv"), "fft"),
    Lowering("blocked", ("to_blocked_layout",), None, _has("conv_nchwc")),
    Lowering("study", tuple(cc.passes.PIPELINES["study"]), None, _study),
    Lowering("default", tuple(cc.passes.PIPELINES["default"]), None, _default),
    Lowering("depthwise_rows", (), None, _template("depthwise")),
    Lowering("transposed_matmul", ("transposed_to_matmul",), None, _has("matmul", "col2im")),
    Lowering("transposed_conv", ("transposed_to_conv",), None, _has("conv")),
    Lowering("fused_separable", ("fuse_separable",), None, _has("fused_separable")),
    # with the epilogue (bias, residual, activation) fused into what each lowering makes
    Lowering("direct_epilogue", ("fuse_epilogues",), None,
             _fused(_has("conv", attrs=dict(activation="silu", residual=True)))),
    Lowering("gemm_epilogue", ("fuse_epilogues", "conv_to_gemm", "fuse_epilogues"), "gemm",
             _fused(_has("im2col", "matmul"))),
    Lowering("winograd2_epilogue", ("fuse_epilogues", "conv_to_winograd", "fuse_epilogues"), "winograd",
             _fused(_has("winograd_conv", attrs=dict(tile=2))), "winograd2"),
    Lowering("winograd4_epilogue", ("fuse_epilogues", "conv_to_winograd", "fuse_epilogues"), "winograd4",
             _fused(_has("winograd_conv", attrs=dict(tile=4))), "winograd4"),
    Lowering("blocked_epilogue", ("fuse_epilogues", "to_blocked_layout", "fuse_epilogues"), None,
             _fused(_has("conv_nchwc"))),
]}


def compile_lowered(g: Graph, lowering: Lowering, target: str = "c"):
    """Compile ``g`` with only ``lowering``'s passes, under its forcing
    database (never the host's tuning database)."""
    from convc import tuning

    with tuning.using(forcing_database(g, lowering.algorithm)):
        return cc.compile(g, target=target, passes=list(lowering.passes))


# -- tolerances -------------------------------------------------------------------------------------
def _winograd_growth(tile: int) -> float:
    """How much bigger the Winograd F(tile x tile, 3x3) output is when every
    transform matrix, kernel and input entry is replaced by its absolute
    value than the direct conv's sum of |w|·|x| (9 for all-ones): the factor
    by which its rounding errors outgrow the direct conv's, from the
    transform matrices themselves (Aᵀ, G, Bᵀ of convc.ops.winograd)."""
    from convc.ops.winograd import TRANSFORMS

    t = TRANSFORMS[tile]
    at, gm, bt = (np.abs(np.asarray(m, np.float64)) for m in (t.at, t.g, t.bt))
    u = gm @ np.ones((3, 3)) @ gm.T
    v = bt @ np.ones((bt.shape[1],) * 2) @ bt.T
    return float(np.max(at @ (u * v) @ at.T)) / 9.0


def tolerance(lowering: Lowering, dtype: str, reduction: int, magnitude: np.ndarray, plane: int = 1):
    """The per-element error bound for a result whose exact value sums
    ``reduction`` products, with ``magnitude`` the same op on |operands|
    (float64, by torch). Rounding error of a sum of K products in any order
    is at most K·eps·Σ|a·b| (Higham's γ_K), which bounds the direct loops,
    im2col/GEMM, the NCHWc kernel and the fused separable kernel alike (their
    only difference is the order of the sum). Winograd adds the transforms'
    rounding, grown by :func:`_winograd_growth` (7.1 for F(2x2), 256 for
    F(4x4), whose points ±2 and Aᵀ's 8 amplify it) and spread
    over a tile: bounded with the tensor's largest magnitude instead of each
    element's. FFT spreads every product's error over the whole plane, by
    log2(plane) butterfly stages: also bounded with the largest magnitude.
    float64 gets the same bound, never looser than 1e-10 relative."""
    eps = float(np.finfo(dtype).eps)
    k = max(reduction, 1)
    if lowering.error == "sum":
        bound = k * eps * magnitude
    elif lowering.error.startswith("winograd"):
        bound = np.full_like(magnitude, (k + 4 * _winograd_growth(int(lowering.error[-1]))) * eps
                             * float(magnitude.max(initial=0)))
    else:
        bound = np.full_like(magnitude, (k + 8 * math.log2(max(plane, 2))) * eps * float(magnitude.max(initial=0)))
    if dtype == "float64":
        bound = np.minimum(bound, 1e-10 * np.maximum(magnitude, float(magnitude.max(initial=0)) * 1e-3))
    return bound + float(np.finfo(dtype).tiny)


# -- the op-info records ----------------------------------------------------------------------------
@dataclass(frozen=True)
class OpInfo:
    """Everything the lowering tests need to know about one op (module docstring)."""
    name: str                       # the test's name for it (conv, g, h, transposed, separable)
    op: str                         # the IR op of the node named after the config
    build: Callable                 # (graph, cfg, tag, arrays, feeds) -> Value
    arrays: Callable                # (cfg, dtype, seed) -> dict of arrays
    torch: Callable                 # (cfg, arrays) -> float64 ndarray
    lowerings: Callable             # cfg -> set of Lowering names that can take it
    reduction: Callable             # cfg -> products summed per output element
    plane: Callable = field(default=lambda cfg: 1)      # the FFT plane size (fft only)
    magnitude_of: Callable | None = None                # (cfg, arrays) -> scale; default: the twin on |arrays|
    configs: tuple = ()
    long_configs: tuple = ()
    # long configs the default pipeline also takes in every default run, in float32 (test_conv's
    # random grid, which always ran: one big graph, a few seconds of gcc)
    default_run: tuple = ()
    uncapped: bool = False          # every config under every lowering it takes (test_lowerings' caps)

    def takes(self, cfg: Config, dtype: str) -> set:
        """The lowerings that can take ``cfg`` in ``dtype`` on this host."""
        out = set(self.lowerings(cfg))
        for lw in ("blocked", "blocked_epilogue"):
            if lw in out and not blocked_takes(cfg, dtype):
                out.discard(lw)
        return out

    def grid(self, long: bool = False) -> list[Config]:
        return list(self.configs) + (list(self.long_configs) if long else [])

    def magnitude(self, cfg: Config, a: dict) -> np.ndarray:
        """The twin on |arrays|: the sum of |products| per output element."""
        if self.magnitude_of is not None:
            return self.magnitude_of(cfg, a)
        return np.abs(self.torch(cfg, {k: None if v is None else np.abs(v) for k, v in a.items()}))


def _conv_lowerings(cfg: Config) -> set:
    from convc.ops.blocked import block_size

    out = {"direct", "im2col", "study", "default"}
    out.add("gemm_1x1" if cfg.pointwise else "gemm")
    if cfg.rank == 2 and cfg.kernel == (3, 3) and cfg.stride == (1, 1) and cfg.dilation == (1, 1) \
            and cfg.groups == 1:
        out |= {"winograd2", "winograd4"}
    if cfg.rank in (1, 2) and all(s == 1 for s in cfg.stride):
        out.add("fft")
    # NCHWc: 2D, groups 1 or depthwise without multiplier, tied or no bias, and at most half of
    # the output lanes padding (the smallest vector-width block is the float64 one)
    c = block_size("float64")
    if cfg.rank == 2 and (cfg.groups == 1 or cfg.groups == cfg.c_in == cfg.c_out) and cfg.bias != "untied" \
            and -(-cfg.c_out // c) * c <= 2 * cfg.c_out:
        out.add("blocked")
    return out


def blocked_takes(cfg: Config, dtype: str) -> bool:
    """The NCHWc block is the host's vector width: float32's is twice float64's."""
    from convc.ops.blocked import block_size

    c = block_size(dtype)
    return -(-cfg.c_out // c) * c <= 2 * cfg.c_out


CONV_CONFIGS = (
    # ordered so that the first five a lowering takes cover its axes (test_lowerings' default cap):
    # 1D/2D/3D, stride, asymmetric padding, dilation, flip, biases, batch, groups, depthwise
    C(1, 2, 3, 4, 1, 11, 3, 2, ((1, 2),), 1, bias="tied", tag="s2"),
    C(2, 2, 3, 5, 1, (7, 6), (3, 2), (2, 1), ((0, 2), (1, 0)), (1, 2), bias="untied", tag="mixed"),
    C(3, 1, 2, 3, 1, (5, 4, 6), (2, 3, 2), (1, 2, 1), ((1, 0), (0, 1), (1, 1)), (2, 1, 1), flip=True,
      bias="tied", tag="3d"),
    C(2, 2, 4, 6, 2, (6, 7), (3, 3), 1, 1, 1, bias="tied", tag="grouped"),
    C(2, 2, 3, 6, 3, (6, 5), (3, 3), 1, ((1, 2), (0, 1)), 2, flip=True, tag="dw_mult2"),
    C(1, 1, 2, 5, 1, 13, 4, 1, 2, 2, flip=True, tag="d2"),
    C(2, 1, 4, 6, 1, (9, 8), (5, 5), 1, 2, 1, flip=True, bias="tied", tag="k5"),
    C(2, 1, 2, 3, 1, (5, 5), (2, 2), 3, 3, 1, tag="pad_gt_k"),
    C(1, 1, 6, 3, 3, 12, 3, 2, ((2, 0),), 2, flip=True, tag="grouped1d"),
    C(2, 1, 5, 5, 5, (7, 7), (3, 3), 2, 1, 1, bias="tied", tag="dw"),
    C(3, 1, 3, 3, 3, (4, 5, 4), 3, 1, 1, 1, bias="untied", tag="dw3d"),
    # Winograd's shapes: 3x3, stride 1, dilation 1, groups 1 (tile edges, outputs smaller than a tile)
    C(2, 2, 3, 5, 1, (7, 9), (3, 3), 1, ((1, 1), (0, 2)), 1, bias="tied", tag="w3x3"),
    C(2, 1, 9, 8, 1, (6, 6), (3, 3), 1, 1, 1, flip=True, bias="untied", tag="w3x3_flip"),
    C(2, 1, 2, 3, 1, (3, 4), (3, 3), 1, 0, 1, tag="w_tiny"),
    C(2, 1, 4, 16, 1, (10, 11), (3, 3), 1, 2, 1, bias="tied", tag="w_wide"),
    # NCHWc-sized output channels (stem: few input channels; blocked input: more than a block)
    C(2, 1, 3, 12, 1, (9, 10), (3, 3), 2, ((1, 2), (1, 0)), 1, bias="tied", tag="stem"),
    C(2, 1, 20, 16, 1, (6, 5), (3, 3), 1, 1, (2, 1), flip=True, tag="wide_in"),
    C(2, 1, 10, 10, 10, (7, 8), (3, 3), (1, 2), 1, 1, bias="tied", tag="dw_blocked"),
    # 1x1 (pointwise, the GEMM without im2col) and 1x1 with stride/padding (through im2col)
    C(2, 2, 5, 7, 1, (4, 5), 1, 1, 0, 1, bias="tied", tag="pw"),
    C(1, 1, 6, 4, 2, 9, 1, 1, 0, 1, tag="pw_grouped"),
    C(3, 1, 3, 4, 1, (3, 2, 4), 1, 1, 0, 1, bias="untied", tag="pw3d"),
    C(2, 1, 4, 5, 1, (5, 6), 1, 2, 1, 1, tag="1x1_s2"),
    # -- from tests/test_conv.py (padding as written: checked there against DESIGN.md's rules); after
    # the configs above, so the other lowerings' first DEFAULT_CAP are unchanged
    # "same" at stride 2 and 3 with odd total padding (extra on the high side)
    C(1, 2, 3, 4, 1, 7, 4, 2, "same", 1, tag="same_s2"),
    C(1, 1, 2, 2, 1, 10, 3, 3, "same", 1, tag="same_s3"),
    C(1, 1, 1, 1, 1, 11, 2, 3, "same", 2, tag="same_s3_d2"),
    C(2, 2, 2, 3, 1, (7, 9), (4, 2), (2, 3), "same", 1, bias="tied", tag="same_s23"),
    C(2, 1, 4, 4, 4, (8, 5), (3, 3), 2, "same", (2, 1), bias="untied", tag="same_dw"),
    C(3, 1, 2, 2, 1, (5, 6, 7), (2, 3, 2), (2, 3, 1), "same", 1, tag="same_3d"),
    C(2, 1, 2, 2, 1, (6, 6), (2, 2), 1, "same", 1, tag="same_s1_even"),
    C(2, 2, 3, 4, 1, (7, 6), (3, 3), 2, "same", 1, bias="tied", tag="same_s2_2d"),
    # "full" with dilation: output n + d*(k-1) at stride 1
    C(1, 1, 2, 3, 1, 6, 3, 1, "full", 2, tag="full_d2"),
    C(2, 2, 2, 2, 2, (5, 4), (3, 2), 1, "full", (2, 3), bias="untied", tag="full_d23"),
    C(3, 1, 1, 2, 1, (4, 3, 5), (2, 2, 3), 1, "full", (1, 2, 2), tag="full_3d"),
    C(2, 1, 1, 1, 1, (5, 5), (3, 3), 2, "full", 1, flip=True, tag="full_s2"),
    C(1, 1, 2, 2, 2, 10, 4, 1, "full", 3, flip=True, tag="full_g2_d3"),
    # explicit asymmetric (lo, hi) pairs
    C(2, 2, 3, 2, 1, (6, 5), (3, 2), 1, ((0, 2), (3, 0)), 1, tag="pairs"),
    C(1, 1, 2, 2, 2, 9, 3, 2, ((4, 1),), 2, bias="tied", tag="pairs_big_lo"),
    C(3, 1, 2, 1, 1, (4, 5, 3), (2, 2, 2), (1, 2, 1), ((1, 0), (0, 2), (2, 1)), 1, tag="pairs_3d"),
    # padding wider than the kernel: border outputs are pure padding (+ bias)
    C(2, 1, 1, 2, 1, (3, 3), (2, 2), 1, 3, 1, written=True, bias="tied", tag="pad_gt_k_tied"),
    # kernel as large as the input: one output per axis; a size-1 input
    C(2, 1, 3, 2, 1, (4, 5), (4, 5), 1, 0, 1, written=True, bias="untied", tag="k_eq_in"),
    C(1, 2, 1, 1, 1, 1, 1, 1, "valid", 1, tag="size1"),
    # depthwise with a channel multiplier, and groups == C_in == C_out
    C(2, 3, 3, 6, 3, (7, 6), (3, 3), 1, 1, 1, written=True, bias="tied", tag="dw_mult2_n3"),
    C(2, 1, 5, 5, 5, (6, 6), (3, 3), 2, "same", 1, flip=True, tag="dw_same"),
    C(1, 2, 4, 4, 4, 12, 5, 1, "full", 2, tag="dw_1d"),
    C(3, 2, 3, 3, 3, (4, 4, 4), (3, 3, 3), 1, 1, 1, written=True, bias="untied", tag="dw_3d"),
    # flip with an asymmetric kernel, per-axis stride/dilation/padding
    C(2, 1, 2, 3, 1, (9, 8), (3, 2), (2, 1), (1, 2), (1, 3), written=True, flip=True, tag="flip"),
    C(1, 4, 3, 2, 1, 15, 4, 3, "valid", 2, flip=True, bias="untied", tag="batch4"),
    C(3, 2, 2, 4, 2, (5, 6, 4), (2, 3, 2), (1, 2, 2), ((1, 1), (0, 1), (1, 0)), (2, 1, 1),
      flip=True, bias="tied", tag="grp3d"),
)

GRAD_CONFIGS = (
    C(1, 2, 3, 4, 1, 11, 3, 2, ((1, 2),), 1, tag="s2"),
    C(2, 2, 3, 5, 1, (7, 6), (3, 2), (2, 1), ((0, 2), (1, 0)), (1, 2), tag="mixed"),
    C(2, 1, 4, 20, 1, (6, 7), (3, 3), 1, 1, 1, flip=True, tag="wide_out"),
    C(2, 2, 4, 6, 2, (6, 7), (3, 3), 1, 1, 1, tag="grouped"),
    C(2, 1, 4, 4, 4, (7, 7), (3, 3), 2, ((1, 0), (0, 1)), 1, flip=True, tag="dw"),
    C(3, 1, 2, 3, 1, (5, 4, 5), (2, 3, 2), (1, 2, 1), ((1, 0), (0, 1), (1, 1)), (2, 1, 1), tag="3d"),
    C(1, 3, 2, 3, 1, 14, 4, 3, 0, 2, flip=True, tag="s3_d2"),
    C(2, 1, 3, 5, 1, (5, 5), 1, 1, 0, 1, tag="pw"),
)

TRANSPOSED_CONFIGS = (
    C(1, 2, 3, 4, 1, 6, 3, 2, 1, 1, output_padding=1, bias="tied", tag="s2_op1"),
    C(2, 1, 4, 6, 2, (4, 5), (3, 2), (2, 3), ((1, 0), (0, 2)), 1, output_padding=(1, 2), tag="grouped_asym"),
    C(2, 2, 3, 5, 1, (5, 4), (3, 3), 1, 1, (2, 1), output_padding=(1, 0), bias="untied", tag="op_lt_d"),
    C(2, 1, 4, 4, 4, (5, 5), (3, 3), 2, 0, 1, output_padding=0, tag="dw"),
    C(3, 1, 2, 3, 1, (3, 4, 3), (2, 3, 2), (2, 1, 2), 0, 1, output_padding=(1, 0, 0), bias="tied", tag="3d"),
    C(1, 1, 2, 2, 1, 7, 4, 3, ((2, 1),), 2, output_padding=0, tag="s3_d2"),
    C(2, 1, 3, 4, 1, (4, 4), 1, 1, 0, 1, output_padding=0, tag="1x1"),
)

SEPARABLE_CONFIGS = (
    C(2, 1, 4, 4, 4, (8, 9), (3, 3), 1, 1, 1, c_pw=6, bias="tied", tag="sep"),
    C(2, 2, 3, 6, 3, (7, 6), (3, 3), 2, ((0, 1), (1, 2)), 1, c_pw=5, flip=True, tag="sep_mult2_s2"),
    C(2, 1, 5, 5, 5, (9, 8), (5, 3), 1, 2, (2, 1), c_pw=3, tag="sep_dil"),
)


def _long(n: int, seed: int, ok=lambda c: True) -> tuple:
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        c = random_conv_cfg(rng)
        if ok(c):
            out.append(c)
    return tuple(out)


def _written_long(n: int, seed: int) -> tuple:
    rng = random.Random(seed)
    return tuple(random_written_cfg(rng) for _ in range(n))


def _transposed_long(n: int, seed: int) -> tuple:
    rng = random.Random(seed)
    out = []
    for c in _long(3 * n, seed):
        op = tuple(rng.randrange(max(s, d)) for s, d in zip(c.stride, c.dilation))
        t = replace(c, output_padding=op, bias="none" if c.bias == "untied" else c.bias)
        if all(o >= 1 for o in t.transposed_out):
            out.append(t)
        if len(out) == n:
            break
    return tuple(out)


def _prod(v):
    return math.prod(v)


CONV = OpInfo(
    "conv", "conv", build_conv, conv_arrays, torch_conv, _conv_lowerings,
    reduction=lambda c: c.c_in // c.groups * _prod(c.kernel),
    plane=lambda c: _prod(n + lo + hi for n, (lo, hi) in zip(c.sizes, c.padding)),
    configs=CONV_CONFIGS, long_configs=_long(60, 1601) + _written_long(240, 20240917),
    default_run=_written_long(240, 20240917))

G = OpInfo(
    "g", "conv_grad_kernel", build_grad_kernel, grad_kernel_arrays, torch_grad_kernel,
    lambda c: {"direct", "gemm"},
    reduction=lambda c: c.n * _prod(c.conv_out),
    configs=GRAD_CONFIGS, long_configs=tuple(replace(c, bias="none") for c in _long(30, 1602)))

H = OpInfo(
    "h", "conv_grad_input", build_grad_input, grad_input_arrays, torch_grad_input,
    lambda c: {"direct"} | (set() if c.flip else {"gemm"}),
    reduction=lambda c: c.c_out // c.groups * _prod(c.kernel),
    configs=GRAD_CONFIGS, long_configs=tuple(replace(c, bias="none") for c in _long(30, 1603)))

TRANSPOSED = OpInfo(
    "transposed", "conv_transpose", build_transpose, transpose_arrays, torch_transpose,
    lambda c: {"direct", "transposed_conv"} | ({"transposed_matmul"} if all(
        o < s for o, s in zip(c.output_padding, c.stride)) else set()),
    reduction=lambda c: c.c_in // c.groups * _prod(c.kernel),
    configs=TRANSPOSED_CONFIGS, long_configs=_transposed_long(30, 1604))

SEPARABLE = OpInfo(
    "separable", "conv", build_separable, separable_arrays, torch_separable,
    lambda c: {"direct", "fused_separable"} if c.rank == 2 else {"direct"},
    reduction=lambda c: c.c_out * _prod(c.kernel),      # the two sums in a row
    configs=SEPARABLE_CONFIGS)

EPILOGUE_CONFIGS = (
    C(2, 2, 9, 12, 1, (9, 8), (3, 3), 1, ((1, 1), (0, 2)), 1, bias="tied", tag="e_w"),
    C(2, 1, 4, 10, 1, (7, 6), (3, 3), 1, 1, 1, flip=True, bias="untied", tag="e_flip_untied"),
    C(2, 1, 3, 16, 1, (6, 7), (3, 3), 1, 0, 1, tag="e_nobias"),
    C(1, 2, 3, 5, 1, 11, 3, 2, ((1, 0),), 1, bias="tied", tag="e_1d"),
    C(2, 1, 5, 12, 1, (9, 9), (3, 3), 2, 1, 2, bias="tied", tag="e_s2_d2"),
)


def _epilogue_lowerings(cfg: Config) -> set:
    conv = _conv_lowerings(cfg)
    return {f"{lw}_epilogue" for lw in ("direct", "gemm", "winograd2", "winograd4", "blocked") if lw in conv}


EPILOGUE = OpInfo(
    "epilogue", "conv", build_epilogue, epilogue_arrays, torch_epilogue, _epilogue_lowerings,
    reduction=lambda c: c.c_in // c.groups * _prod(c.kernel) + 1, magnitude_of=epilogue_magnitude,
    configs=EPILOGUE_CONFIGS)

DEPTHWISE_CONFIGS = (     # from tests/test_depthwise.py: the row kernel's border cases (batch 2)
    C(2, 2, 2, 2, 2, (5, 6), (3, 1), 1, ((2, 2), (0, 0)), 1, tag="dw_rows_out"),   # rows outside the input
    C(2, 2, 2, 2, 2, (7, 6), (1, 2), 1, ((0, 0), (2, 2)), (1, 2), bias="tied", tag="dw_cols_out"),  # dilated
    C(2, 2, 3, 6, 3, (9, 9), (3, 3), 2, 1, 1, bias="tied", tag="dw_s2_mult2"),     # MobileNet stride 2
    C(2, 2, 4, 4, 4, (14, 14), (3, 3), 1, 1, 1, flip=True, bias="untied", tag="dw_flip_untied"),
    C(2, 2, 2, 2, 2, (4, 5), (5, 5), 1, 2, 1, bias="tied", tag="dw_no_interior"),  # no interior column
    C(2, 2, 3, 3, 3, (33, 40), (3, 5), (1, 2), ((0, 2), (3, 1)), (2, 1), tag="dw_long_rows"),
    C(2, 2, 2, 6, 2, (8, 7), (2, 3), (3, 2), ((1, 0), (0, 2)), 1, flip=True, bias="tied", tag="dw_mult3"),
    C(2, 2, 1, 1, 1, (3, 3), (3, 3), 1, 0, 1, bias="tied", tag="dw_one_out"),      # one output
)

DEPTHWISE = OpInfo(
    "depthwise_clip", "conv", build_depthwise_clip, conv_arrays, torch_depthwise_clip,
    lambda c: {"depthwise_rows"},
    reduction=lambda c: _prod(c.kernel), magnitude_of=conv_magnitude,
    configs=DEPTHWISE_CONFIGS)

WINOGRAD = OpInfo(
    "winograd", "conv", build_winograd, winograd_arrays, torch_winograd,
    lambda c: {"direct", "winograd2_epilogue", "winograd4_epilogue"},
    reduction=lambda c: c.c_in * 9 + c.residual, magnitude_of=winograd_magnitude,
    configs=tuple(c.config for c in WINOGRAD_CASES), uncapped=True)

OPINFOS = {o.name: o for o in (CONV, G, H, TRANSPOSED, SEPARABLE, EPILOGUE, DEPTHWISE, WINOGRAD)}

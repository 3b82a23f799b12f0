"""Batch-1 latency of ``torch.compile(backend="convc")`` beside PyTorch eager
and ``torch.compile`` with inductor, on a resnet18-style and a
mobilenet_v2-style net (:func:`resnet_style`, :func:`mobilenet_style`:
torchvision's block structure, narrower, so that a run takes seconds).

Timing interleaves the three callables in one process (eager, convc,
inductor, eager, ...) and reports medians, so load from other processes
on the machine hits all three alike; the spread (interquartile range over
the median) says how noisy the run was.

``run(...)`` returns the rows; ``cmd_bench_torch`` prints them
(``convc bench --torch [--repeats N] [--no-inductor] [--size S] [--net NAME]``).
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .timing import median_iqr, times_in_turn


# -- the nets ---------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """torchvision's resnet BasicBlock: two 3x3 conv + batch norm, ReLU, a
    residual add (through a strided 1x1 conv + batch norm when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + identity)


def resnet_style(width: int = 16, classes: int = 10, stages: int = 4) -> nn.Module:
    """resnet18's layout (7x7 stem, max pool, four stages of two basic
    blocks, global pool, fc) with ``width`` channels in the first stage
    (``stages`` < 4: the first ones only, for quick tests)."""
    w = [width, 2 * width, 4 * width, 8 * width][:stages]
    layers = [nn.Conv2d(3, w[0], 7, 2, 3, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    c = w[0]
    for i, c_out in enumerate(w):
        layers += [BasicBlock(c, c_out, 1 if i == 0 else 2), BasicBlock(c_out, c_out)]
        c = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
    return _init(nn.Sequential(*layers))


class InvertedResidual(nn.Module):
    """mobilenet_v2's block: 1x1 expand + ReLU6, 3x3 depthwise + ReLU6, 1x1
    project (linear), a residual add when stride is 1 and channels agree."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(), nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


def mobilenet_style(width: float = 0.5, classes: int = 10, stages: int = 7) -> nn.Module:
    """mobilenet_v2's table of inverted residual stages (t, c, n, s), with
    channels scaled by ``width`` (``stages`` < 7: the first rows only)."""
    def ch(c):
        return max(8, int(c * width + 4) // 8 * 8)
    table = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
             (6, 320, 1, 1)][:stages]
    c = ch(32)
    layers = [nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU6()]
    for t, c_out, n, s in table:
        for i in range(n):
            layers.append(InvertedResidual(c, ch(c_out), s if i == 0 else 1, t))
            c = ch(c_out)
    last = ch(1280)
    layers += [nn.Conv2d(c, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(), nn.AdaptiveAvgPool2d(1),
               nn.Flatten(), nn.Dropout(0.2), nn.Linear(last, classes)]
    return _init(nn.Sequential(*layers))


def _init(m: nn.Module) -> nn.Module:
    """Batch-norm statistics away from the identity (as a trained net has),
    reproducibly."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                n = mod.num_features
                mod.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                mod.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                mod.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                mod.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    return m.eval()


NETS = {"resnet18-style": (resnet_style, (1, 3, 224, 224)), "mobilenet_v2-style": (mobilenet_style, (1, 3, 224, 224))}


# -- timing --------------------------------------------------------------------------
def run(nets=None, repeats: int = 30, inductor: bool = True, size: int | None = None) -> list[dict]:
    """Time every net at batch 1: eager, convc and (``inductor``) inductor,
    interleaved; ``repeats`` timed calls each after warm-up. ``size``: the
    input's spatial size (default 224). Returns one row per net and
    backend: median and interquartile range in ms, the max abs difference
    from eager, and the compile time (first call) in s."""
    from . import torch_backend
    rows = []
    for name in nets or NETS:
        torch._dynamo.reset()              # (no automatic dynamic shapes from the previous net's compile)
        first_report = len(torch_backend.reports)
        make, shape = NETS[name]
        if size is not None:
            shape = shape[:2] + (size, size)
        model = make()
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        fns = {"eager": model}
        fns["convc"] = torch.compile(model, backend="convc", dynamic=False)
        if inductor:
            fns["inductor"] = torch.compile(model, backend="inductor", dynamic=False)
        compile_s, out = {}, {}
        with torch.no_grad():
            for k, f in fns.items():
                t = time.perf_counter()
                out[k] = f(x)
                compile_s[k] = time.perf_counter() - t
            # exactly `repeats` rounds of one call each, after two warm-up rounds
            samples = times_in_turn([lambda f=f: f(x) for f in fns.values()], min_rounds=repeats, seconds=0.0,
                                    warmup=2, max_rounds=repeats)
            times = dict(zip(fns, samples))
        reports = torch_backend.reports[first_report:]
        for k in fns:
            med, iqr = median_iqr(times[k])
            rows.append(dict(net=name, backend=k, ms=med * 1e3, iqr_ms=iqr * 1e3,
                             vs_eager=med / median_iqr(times["eager"])[0],
                             max_diff=float((out[k] - out["eager"]).abs().max()),
                             first_call_s=compile_s[k] if k != "eager" else 0.0,
                             convc_parts=sum(len(r.parts) for r in reports) if k == "convc" else None,
                             left_eager=sum(c for r in reports for c, _ in r.eager.values()) if k == "convc" else None))
    return rows


def format_rows(rows) -> str:
    """The rows as a Markdown table."""
    lines = ["| net | backend | median ms | IQR ms | vs eager | max abs diff | first call s | convc parts / eager ops |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        split = f"{r['convc_parts']} / {r['left_eager']}" if r["convc_parts"] is not None else ""
        lines.append(f"| {r['net']} | {r['backend']} | {r['ms']:.2f} | {r['iqr_ms']:.2f} | {r['vs_eager']:.2f}x"
                     f" | {r['max_diff']:.1e} | {r['first_call_s']:.1f} | {split} |")
    return "\n".join(lines)


def cmd_bench_torch(args) -> int:
    """``convc bench --torch``: time the nets (options --repeats, --no-inductor,
    --size, --net; see :mod:`convc.cli`) and print the Markdown table."""
    import platform

    from . import torch_backend
    torch_backend.register()                # (the string works without the entry point too)
    rows = run(args.net, args.repeats, not args.no_inductor, args.size)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}")
    print(format_rows(rows))
    return 0

"""``qconv_to_gemm``: the fast path of quantized convolution. A 2D ``qconv``
becomes the int8 GEMM of convc/ops/qgemm.py: ``qgemm_planes`` (the padded
image in the dot-product layout, split into its stride phases: an implicit
GEMM, no im2col), ``qgemm_weights`` and ``qgemm_bias`` (weight-only,
folded at compile time by ``fold_params``) and ``qgemm`` (u8 x s8 products
in int32, then qconv's own requantization), with the same integers as the
direct loop, bit for bit."""
from __future__ import annotations

import os

from .. import shapes
from ..errors import ConvcError
from ..host import probe
from ..ir import Graph
from ..ops import get_op
from ..ops import qgemm as Q
from .gemm import MIN_MACS
from .manager import decline, register
from .rewrite import attrs, fresh, ins, rewrite

KERNEL_ENV = "CONVC_VNNI"
"""Environment variable that overrides the kernel choice: "0" (or
"portable") forces plain C, "256" AVX-VNNI, "512" AVX-512 VNNI; unset or
"auto": the best the host has (``host.probe().int8_dot``). A kernel the
compiler does not target still builds: its source falls back to plain C."""

_FORCED = {"0": "portable", "portable": "portable", "none": "portable", "256": "vnni256", "vnni256": "vnni256",
           "512": "vnni512", "vnni512": "vnni512"}


def kernel_choice() -> str:
    """The ``qgemm`` kernel the pass writes into the graph (see :data:`KERNEL_ENV`)."""
    forced = os.environ.get(KERNEL_ENV, "auto").strip().lower()
    if forced in ("", "auto"):
        dot = probe().int8_dot
        return dot if dot in Q.KERNELS else "portable"
    if forced not in _FORCED:
        raise ConvcError(f"{KERNEL_ENV}={forced!r}: use auto, 0 (portable C), 256 (AVX-VNNI) or 512 (AVX-512 VNNI)")
    return _FORCED[forced]


def eligible(g: Graph, n: str) -> str | None:
    """Why qconv ``n`` stays on the direct loop (with the numbers that
    decided), or None when the GEMM takes it."""
    a = attrs(g, n)
    x, w = ins(g, n)[:2]
    if len(x.shape) != 4:
        return f"{len(x.shape) - 2}D; the int8 GEMM is 2D only"
    if a["dtype"] == "int32":
        return "int32 output (raw accumulators, ONNX's ConvInteger); the int8 GEMM requantizes"
    if a["groups"] != 1:
        return f"groups={a['groups']}; the int8 GEMM takes ungrouped convs (grouped and depthwise stay direct)"
    if w.dtype != "int8" or any(z != 0 for z in a["w_zero_point"]):
        return (f"{w.dtype} weights with zero points {sorted(set(a['w_zero_point']))}; the int8 GEMM needs "
                f"symmetric int8 weights (zero point 0)")
    taps = -(-w.shape[1] // 4) * 4 * shapes.prod(w.shape[2:])         # taps with channels padded to 4
    if not Q.acc_fits(taps):
        return f"{taps} taps x 255 x 128 > 2**31 - 1: u8 x s8 sums could overflow the int32 accumulator"
    macs = get_op("qconv").macs(a, [x.type, w.type], g.node(n)["type"])
    if macs < MIN_MACS:
        return f"{macs} multiply-accumulates < MIN_MACS={MIN_MACS}"
    return None


def _qconv(g: Graph, n: str):
    why = eligible(g, n)
    if why is not None:
        return decline(n, why)
    a = attrs(g, n)
    x, w, *b = ins(g, n)
    out = g.node(n)["type"].shape
    kernel = kernel_choice()
    mr, nr = Q.tile(kernel, rows=w.shape[0])
    m = w.shape[0]
    window = dict(kernel_size=w.shape[2:], stride=a["stride"], padding=a["padding"], dilation=a["dilation"],
                  x_zero_point=a["x_zero_point"])
    # the implicit GEMM: the padded image once, split into its stride phases; each tap is a shifted
    # view of one phase (no im2col copy)
    lay = Q.planes_layout(dict(a, kernel_size=w.shape[2:]), x.type, nr)
    cols = g.add("qgemm_planes", [x], dict(window, plane=lay["plane"]), fresh(g, f"{n}.planes"))
    depth = lay["C4"] * 4 * shapes.prod(w.shape[2:])
    wm = g.add("qgemm_weights", [w], dict(rows=-(-m // mr) * mr, depth=depth), fresh(g, f"{n}.w_matrix"))
    bias = g.add("qgemm_bias", [w, *b], dict(offset=a["x_zero_point"] + Q.offset(x.dtype)), fresh(g, f"{n}.bias"))
    return g.add("qgemm", [cols, wm, bias], dict(channels=m, spatial=out[2:], width=lay["W"], offsets=lay["offsets"],
                                                 multiplier=a["multiplier"], shift=a["shift"],
                                                 y_zero_point=a["y_zero_point"], dtype=a["dtype"], clamp=a["clamp"],
                                                 kernel=kernel, mr=mr, nr=nr), fresh(g, f"{n}.gemm"))


@register
def qconv_to_gemm(g: Graph) -> Graph:
    """Every 2D, ungrouped qconv with symmetric int8 weights and at least
    ``MIN_MACS`` multiply-accumulates becomes the int8 GEMM: the unsigned
    operand in the dot-product layout (the padded image once, split into its
    stride phases: an implicit GEMM, no im2col), padded weight matrix and corrected
    bias (both weight-only, folded at compile time), and ``qgemm`` with the
    host's dot-product kernel (AVX-512 VNNI, AVX-VNNI or plain C;
    ``CONVC_VNNI`` overrides). Grouped, depthwise, 1D and 3D qconvs stay on
    the direct loop."""
    return rewrite(g, {"qconv": _qconv})

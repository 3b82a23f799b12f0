"""Lowerings of the transposed convolution (the book's h): to a convolution
of the zero-dilated input, and to the transpose of the conv's matrix."""
from __future__ import annotations

from .. import tuning
from ..ir import Graph
from ..ops.columns import col2im
from ..ops.conv import conv
from ..ops.elementwise import add
from ..ops.layout import dilate, pad
from ..ops.linear import matmul
from ..ops.tensor import reshape, transpose
from .manager import decline, register
from .rewrite import attrs, fresh, ins, rewrite


def _bias(g, n, y, b):
    if not b:
        return y
    b = b[0]
    if len(b.shape) == 1:
        b = reshape(b, (b.shape[0],) + (1,) * (len(y.shape) - 2), name=fresh(g, f"{n}.bias_shape"))
    return add(y, b, name=fresh(g, f"{n}.bias"))


def _to_conv(g: Graph, n: str):
    if g.node(n)["op"] != "conv_transpose":
        return None
    a = attrs(g, n)
    x, w, *b = ins(g, n)
    groups, rank = a["groups"], len(x.shape) - 2
    c_in, c_out_g, *k = w.shape
    h = dilate(x, a["stride"], name=fresh(g, f"{n}.dilate")) if any(s > 1 for s in a["stride"]) else x
    # pad so the flipped kernel sees every product: d*(k-1) - p on each side (+ output_padding)
    pads = [(d * (kk - 1) - lo, d * (kk - 1) - hi + op)
            for d, kk, (lo, hi), op in zip(a["dilation"], k, a["padding"], a["output_padding"])]
    if any(p != (0, 0) for p in pads):
        h = pad(h, pads, name=fresh(g, f"{n}.pad"))
    # (C_in, C_out/g, k) -> (C_out, C_in/g, k): swap the channel roles within each group
    wg = reshape(w, (groups, c_in // groups, c_out_g, *k), name=fresh(g, f"{n}.w_groups"))
    perm = (0, 2, 1) + tuple(range(3, 3 + rank))
    ws = reshape(transpose(wg, perm, name=fresh(g, f"{n}.w_swap")), (groups * c_out_g, c_in // groups, *k),
                 name=fresh(g, f"{n}.w_conv"))
    y = conv(h, ws, None, 1, 0, a["dilation"], groups, flip=True, name=fresh(g, f"{n}.conv"))
    return _bias(g, n, y, b)


@register
def transposed_to_conv(g: Graph) -> Graph:
    """A transposed conv becomes zero insertion (``dilate`` by the stride),
    ``pad`` by d·(k−1) − p, and an ordinary unit-stride conv with the flipped,
    channel-swapped kernel: h expressed with c."""
    return rewrite(g, _to_conv)


def _to_matmul(g: Graph, n: str):
    if g.node(n)["op"] != "conv_transpose":
        return None
    tuned = tuning.choice(g, n, mine=("gemm", "direct"))
    if tuned is not None and tuned["algorithm"] != "gemm":
        return decline(n, tuning.chose_other(tuned))
    blocks = tuple(tuned["gemm"][k] for k in tuning.GEMM_KNOBS) if tuned and tuned.get("gemm") else None
    a = attrs(g, n)
    if any(op >= s for op, s in zip(a["output_padding"], a["stride"])):
        # col2im's positions cover only what a strided conv of the output reaches
        return decline(n, f"output_padding {a['output_padding']} not below stride {a['stride']}: "
                          f"col2im covers only what a strided conv of the output reaches")
    x, w, *b = ins(g, n)
    out = g.node(n)["type"].shape
    groups = a["groups"]
    c_in, c_out_g, *k = w.shape
    nb, sizes = x.shape[0], x.shape[2:]
    kk, nn = 1, 1
    for v in k:
        kk *= v
    for v in sizes:
        nn *= v
    # the weight matrix (G, C_in/g, C_out/g * K), used transposed by the GEMM
    wm = reshape(w, (groups, c_in // groups, c_out_g * kk), name=fresh(g, f"{n}.w_matrix"))
    xm = reshape(x, (nb, groups, c_in // groups, nn), name=fresh(g, f"{n}.x_matrix"))
    cols = matmul(wm, xm, name=fresh(g, f"{n}.gemm"), transpose_a=True, blocks=blocks)   # (N, G, C_out/g*K, n)
    cols = reshape(cols, (nb, groups * c_out_g, *k, *sizes), name=fresh(g, f"{n}.cols"))
    y = col2im(cols, out[2:], a["stride"], a["padding"], a["dilation"], name=fresh(g, f"{n}.col2im"))
    return _bias(g, n, y, b)


@register
def transposed_to_matmul(g: Graph) -> Graph:
    """A transposed conv becomes the transpose of the conv's matrix: a GEMM
    with the transposed weight matrix (W^T · X, all kernel taps at once)
    followed by ``col2im``, the transpose of im2col, which sums the taps
    into place. A tuning entry (``convc tune``) for the node may keep it
    direct instead, or give the GEMM's cache blocks."""
    return rewrite(g, _to_matmul)



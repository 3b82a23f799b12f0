"""``conv_to_im2col`` and ``local_to_matmul``: convolutions as matrix products."""
from __future__ import annotations

from ..ir import Graph
from ..ops.columns import im2col
from ..ops.linear import matmul
from ..ops.tensor import reshape, transpose
from .manager import register
from .rewrite import attrs, fresh, ins, operands, reactivate, rewrite
from .transposed import _bias


def _prod(v):
    p = 1
    for s in v:
        p *= s
    return p


def _conv(g: Graph, n: str, blocks=None):
    if g.node(n)["op"] != "conv":
        return None
    a = attrs(g, n)
    x, w, *b = operands(g, n)
    groups = a["groups"]
    c_out, c_in_g, *k = w.shape
    out = g.node(n)["type"].shape
    nb, kk, pp = x.shape[0], _prod(k), _prod(out[2:])
    cols = im2col(x, k, a["stride"], a["padding"], a["dilation"], a["flip"], name=fresh(g, f"{n}.im2col"))
    cm = reshape(cols, (nb, groups, c_in_g * kk, pp), name=fresh(g, f"{n}.cols"))
    wm = reshape(w, (groups, c_out // groups, c_in_g * kk), name=fresh(g, f"{n}.w_matrix"))
    y = matmul(wm, cm, name=fresh(g, f"{n}.gemm"), blocks=blocks)          # (N, G, C_out/g, positions)
    y = reshape(y, out, name=fresh(g, f"{n}.unflatten"))
    return reactivate(g, n, _bias(g, n, y, b))


@register
def conv_to_im2col(g: Graph) -> Graph:
    """A conv becomes im2col (every receptive field as a column) and one
    matrix product per group, W (C_out/g × C_in/g·K) · cols: the classic GEMM
    lowering, any stride, padding, dilation and groups."""
    return rewrite(g, _conv)


def _local(g: Graph, n: str):
    if g.node(n)["op"] != "local_conv":
        return None
    a = attrs(g, n)
    x, w, *b = ins(g, n)
    rank = len(x.shape) - 2
    c_out, out_sp = w.shape[0], w.shape[1:1 + rank]
    c_in, k = w.shape[1 + rank], w.shape[2 + rank:]
    nb, pp, ck = x.shape[0], _prod(out_sp), c_in * _prod(k)
    cols = im2col(x, k, a["stride"], a["padding"], a["dilation"], name=fresh(g, f"{n}.im2col"))
    cm = transpose(reshape(cols, (nb, ck, pp), name=fresh(g, f"{n}.cols")), (2, 1, 0),
                   name=fresh(g, f"{n}.cols_by_position"))                 # (P, C_in*K, N)
    wm = transpose(reshape(w, (c_out, pp, ck), name=fresh(g, f"{n}.w_matrix")), (1, 0, 2),
                   name=fresh(g, f"{n}.w_by_position"))                   # (P, C_out, C_in*K)
    y = matmul(wm, cm, name=fresh(g, f"{n}.batched_gemm"))                # (P, C_out, N)
    y = reshape(transpose(y, (2, 1, 0), name=fresh(g, f"{n}.by_image")), (nb, c_out, *out_sp),
                name=fresh(g, f"{n}.unflatten"))
    return _bias(g, n, y, b)


@register
def local_to_matmul(g: Graph) -> Graph:
    """An unshared conv (Eq 3) becomes im2col and a batched matrix product:
    one small (C_out × C_in·K) · (C_in·K × N) product per output position,
    since every position has its own kernel."""
    return rewrite(g, _local)

"""``conv_to_gemm``: the compiler's choice of matrix products for the
convolutions that are big enough, forward and both gradients. The GEMM is
the blocked, register-tiled ``matmul`` template; this pass only decides
where it pays and rewrites the node into im2col/col2im plus matmul."""
from __future__ import annotations

from .. import tuning
from ..ir import Graph
from ..ops import get_op
from ..ops.columns import col2im, im2col
from ..ops.linear import dense, matmul
from ..ops.tensor import reduce_sum, reshape, transpose
from .im2col import _conv as _conv_im2col
from .manager import decline, register
from .rewrite import attrs, fresh, ins, operands, reactivate, rewrite
from .transposed import _bias

MIN_MACS = 1 << 16
"""Smaller nodes stay direct: the im2col copy and the call overhead eat the gain."""

NARROW = 16
"""A kernel gradient with fewer output channels than this is computed as dot
products (``dense``) instead of a GEMM whose register tiles it cannot fill."""


def _prod(v):
    p = 1
    for s in v:
        p *= s
    return p


def gemm_declined(g: Graph, n: str, c_in_g: int, c_out_g: int) -> str | None:
    """Why conv_to_gemm's default rule leaves node ``n`` direct (too few
    MACs, or depthwise-like), or None if the GEMM pays."""
    d = g.node(n)
    types = [g.node(i)["type"] for i in g.inputs_of(n)]
    macs = get_op(d["op"]).macs(d["attrs"], types, d["type"])
    if macs < MIN_MACS:
        return f"{macs:,} MACs, below MIN_MACS {MIN_MACS:,}: the im2col copy and the call would eat the gain"
    # a depthwise conv (one channel per group) is a tiny GEMM per group: direct is better
    if d["attrs"]["groups"] > 1 and min(c_in_g, c_out_g) == 1:
        return (f"groups {d['attrs']['groups']} of {c_in_g} input and {c_out_g} output channel(s): "
                f"one tiny GEMM per group, the direct loops are faster")
    return None


def _pointwise(a) -> bool:
    return all(s == 1 for s in a["stride"]) and all(p == (0, 0) for p in a["padding"])


def _forward(g: Graph, n: str, blocks=None, tuned=False):
    a = attrs(g, n)
    x, w, *b = operands(g, n)
    c_out, c_in_g, *k = w.shape
    why = None if tuned else gemm_declined(g, n, c_in_g, c_out // a["groups"])
    if why:
        return decline(n, why)
    if all(kk == 1 for kk in k) and _pointwise(a):        # 1x1: x is already the column matrix
        groups, out = a["groups"], g.node(n)["type"].shape
        xm = reshape(x, (x.shape[0], groups, c_in_g, _prod(out[2:])), name=fresh(g, f"{n}.x_matrix"))
        wm = reshape(w, (groups, c_out // groups, c_in_g), name=fresh(g, f"{n}.w_matrix"))
        y = reshape(matmul(wm, xm, name=fresh(g, f"{n}.gemm"), blocks=blocks), out, name=fresh(g, f"{n}.unflatten"))
        return reactivate(g, n, _bias(g, n, y, b))
    return _conv_im2col(g, n, blocks)


def _grad_kernel(g: Graph, n: str, blocks=None, tuned=False):
    """dW^T (C_in/g·K × C_out/g) = cols (C_in/g·K × P) · G^T (P × C_out/g) per
    image and group, summed over images; transposing G (not the K-times
    larger cols) keeps the extra copy small. With fewer than ``NARROW``
    output channels (and one group), dW = dot products of G's and the
    columns' rows over all images at once."""
    a = attrs(g, n)
    gy, v = ins(g, n)
    c_out, c_in_g, *k = g.node(n)["type"].shape
    groups = a["groups"]
    why = None if tuned else gemm_declined(g, n, c_in_g, c_out // groups)
    if why:
        return decline(n, why)
    nb, pp, ck = gy.shape[0], _prod(gy.shape[2:]), c_in_g * _prod(k)
    cols = im2col(v, k, a["stride"], a["padding"], a["dilation"], a["flip"], name=fresh(g, f"{n}.im2col"))
    if groups == 1 and c_out < NARROW:
        # too few output channels for the GEMM's register tiles: dot products
        # over all images and positions at once (dense: rows of both operands contiguous)
        gt = reshape(transpose(reshape(gy, (nb, c_out, pp), name=fresh(g, f"{n}.g_matrix")), (1, 0, 2),
                               name=fresh(g, f"{n}.g_by_channel")), (c_out, nb * pp), name=fresh(g, f"{n}.g_rows"))
        ct = reshape(transpose(reshape(cols, (nb, ck, pp), name=fresh(g, f"{n}.cols")), (1, 0, 2),
                               name=fresh(g, f"{n}.cols_by_tap")), (ck, nb * pp), name=fresh(g, f"{n}.col_rows"))
        return reshape(dense(gt, ct, name=fresh(g, f"{n}.dots")), g.node(n)["type"].shape, name=fresh(g, f"{n}.dw"))
    cm = reshape(cols, (nb, groups, ck, pp), name=fresh(g, f"{n}.cols"))
    gt = transpose(reshape(gy, (nb, groups, c_out // groups, pp), name=fresh(g, f"{n}.g_matrix")), (0, 1, 3, 2),
                   name=fresh(g, f"{n}.g_matrix_T"))
    prod = matmul(cm, gt, name=fresh(g, f"{n}.gemm"), blocks=blocks)        # (N, G, CK, C_out/g)
    total = reduce_sum(prod, (0,), name=fresh(g, f"{n}.sum_images")) if nb > 1 else \
        reshape(prod, (groups, ck, c_out // groups), name=fresh(g, f"{n}.one_image"))
    total = reshape(total, (groups, ck, c_out // groups), name=fresh(g, f"{n}.by_group"))
    wt = transpose(total, (0, 2, 1), name=fresh(g, f"{n}.dw_matrix"))       # (G, C_out/g, CK)
    return reshape(wt, g.node(n)["type"].shape, name=fresh(g, f"{n}.dw"))


def _grad_input(g: Graph, n: str, blocks=None, tuned=False):
    """dX = col2im(W^T · G): the transposed conv as one GEMM per image and
    group plus the scatter of every tap into place."""
    a = attrs(g, n)
    if a["flip"]:
        return decline(n, "flip=True; the col2im lowering is written for cross-correlation")
    w, gy = ins(g, n)
    c_out, c_in_g, *k = w.shape
    groups = a["groups"]
    why = None if tuned else gemm_declined(g, n, c_in_g, c_out // groups)
    if why:
        return decline(n, why)
    nb, sizes = gy.shape[0], gy.shape[2:]
    wm = reshape(w, (groups, c_out // groups, c_in_g * _prod(k)), name=fresh(g, f"{n}.w_matrix"))
    gm = reshape(gy, (nb, groups, c_out // groups, _prod(sizes)), name=fresh(g, f"{n}.g_matrix"))
    cols = matmul(wm, gm, name=fresh(g, f"{n}.gemm"), transpose_a=True, blocks=blocks)   # (N, G, C_in/g*K, P)
    cols = reshape(cols, (nb, groups * c_in_g, *k, *sizes), name=fresh(g, f"{n}.cols"))
    return col2im(cols, a["input_size"], a["stride"], a["padding"], a["dilation"], name=fresh(g, f"{n}.col2im"))


_RULES = {"conv": _forward, "conv_grad_kernel": _grad_kernel, "conv_grad_input": _grad_input}


def gemm_choice(g: Graph, n: str):
    """(the tuning database's entry, the GEMM's cache blocks or None): None
    when it has no entry for ``n`` (the default rule decides)."""
    e = tuning.choice(g, n, mine=("gemm", "direct"))
    if e is None:
        return None
    blocks = tuple(e["gemm"][k] for k in tuning.GEMM_KNOBS) if e.get("gemm") else None
    return e, blocks


def _rule(g: Graph, n: str):
    rule = _RULES.get(g.node(n)["op"])
    if rule is None:
        return None
    tuned = gemm_choice(g, n)
    if tuned is None:
        return rule(g, n)
    e, blocks = tuned
    if e["algorithm"] != "gemm":
        return decline(n, tuning.chose_other(e))
    return rule(g, n, blocks, tuned=True)


@register
def conv_to_gemm(g: Graph) -> Graph:
    """Every conv, conv_grad_kernel (g) and conv_grad_input (h) with at least
    ``MIN_MACS`` multiply-accumulates that is not depthwise-like (grouped with
    one channel per group) becomes a blocked GEMM: forward im2col · W (a 1×1 conv needs no im2col),
    g as cols · Gᵀ summed over images, h as col2im(Wᵀ · G). Where the tuning
    database (``convc tune``) has an entry for a node, the entry decides
    instead, and gives the GEMM's cache blocks."""
    return rewrite(g, _rule)

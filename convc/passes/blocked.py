"""``to_blocked_layout``: keep activations in the blocked layout NCHWc between
the convolutions that run over it (convc/ops/blocked.py)."""
from __future__ import annotations

from .. import tuning
from ..ir import Graph, Value
from ..ops import activations, epilogue
from ..ops.blocked import (block_size, block_weights, from_blocked, global_avg_pool_nchwc, max_pool_nchwc,
                           to_blocked)
from ..shapes import ceil_div
from .manager import decline, register
from .rewrite import an, attrs, fresh, ins, operands, rewrite


def blocked_ineligible(g: Graph, n: str) -> str | None:
    """Why conv node ``n`` cannot run as ``conv_nchwc``, or None if it can:
    the ONE place that decides (the tuner may take it over). Today's rule:
    a 2D float conv, groups 1 or depthwise (one input and one output channel
    per group), no bias or a tied one, and at most half of its output lanes
    padding (ceil(C_out / c)·c <= 2·C_out: a conv with few output channels
    would waste most of its vectors)."""
    d = g.node(n)
    if d["op"] != "conv":
        return f"{an(d['op'])}, not a conv"
    x, w, *b = operands(g, n)
    if len(x.shape) != 4:
        return f"input rank {len(x.shape)}; NCHWc is 2D (rank 4)"
    if x.dtype not in ("float32", "float64"):
        return f"dtype {x.dtype}; NCHWc takes float32 or float64"
    groups, (c_out, c_in_g) = d["attrs"]["groups"], w.shape[:2]
    if groups != 1 and not (groups == x.shape[1] == c_out and c_in_g == 1):
        return f"groups {groups} of {c_in_g} input channel(s); NCHWc takes groups 1 or depthwise"
    if b and len(b[0].shape) != 1:
        return f"untied bias {b[0].shape}; NCHWc takes one bias per channel"
    c = block_size(x.dtype)
    lanes = ceil_div(c_out, c) * c
    if lanes > 2 * c_out:
        return f"{c_out} output channels in blocks of {c}: {lanes - c_out} of {lanes} lanes would be padding"
    return None


def blocked_eligible(g: Graph, n: str) -> bool:
    """Whether conv node ``n`` runs as ``conv_nchwc`` (see :func:`blocked_ineligible`)."""
    return blocked_ineligible(g, n) is None


def _blocked(g: Graph, v: Value, c: int) -> Value:
    """``v`` in NCHWc: the blocked tensor behind a ``from_blocked``, or a new
    ``to_blocked``."""
    if v.op == "from_blocked" and ins(g, v.name)[0].shape[-1] == c:
        return ins(g, v.name)[0]
    return to_blocked(v, c, name=fresh(g, f"{v.name}.blocked"))


def plain_input_declined(g: Graph, n: str) -> str | None:
    """Why conv ``n`` is not a stem for the blocked kernel, or None if it is:
    a stem is not depthwise and has fewer input channels than a block, on
    an input not already blocked, so ``conv_nchwc`` reads the NCHW image as
    it is (no reorder on the way in)."""
    d = g.node(n)
    x = operands(g, n)[0]
    if d["attrs"]["groups"] != 1:
        return f"groups {d['attrs']['groups']}"
    if x.shape[1] >= block_size(x.dtype):
        return f"{x.shape[1]} input channels, not fewer than a block of {block_size(x.dtype)}"
    if x.op == "from_blocked":
        return "its input is blocked already"
    return None


def reads_plain_input(g: Graph, n: str) -> bool:
    """Whether conv ``n`` is a stem for the blocked kernel (see :func:`plain_input_declined`)."""
    return plain_input_declined(g, n) is None


def blocked_unpaid(g: Graph, n: str) -> str | None:
    """Why the default pipeline's rule (without a tuning entry) leaves conv
    ``n`` in NCHW, or None when the blocked layout pays: for a stem, i.e. a
    conv with a kernel bigger than 1×1 on a graph input that
    :func:`reads_plain_input` (the image). Its direct kernel broadcasts one
    input value into whole output-channel vectors and runs at the FMA peak,
    where the im2col + GEMM it replaces has a K of only C_in·K_Y·K_X (147
    for ResNet's 7×7 stem) and pays for the column copy: ResNet-18's stem
    went from about 5 ms to 1.6 ms, the whole model from 1.39× to 1.21× ONNX
    Runtime's time (one thread, Xeon AVX-512). Other convs lose to
    Winograd, the GEMM or the depthwise row kernel unless a chain of them
    stays blocked, which the tuner measures per conv."""
    x, w = operands(g, n)[:2]
    if x.op != "input":
        return f"not a stem: its input '{x.name}' is {an(x.op)}, not a graph input"
    if max(w.shape[2:]) <= 1:
        return "not a stem: a 1×1 kernel"
    why = plain_input_declined(g, n)
    return f"not a stem: {why}" if why else None


def blocked_pays(g: Graph, n: str) -> bool:
    """The default pipeline's rule for taking conv ``n`` into NCHWc without a
    tuning entry (see :func:`blocked_unpaid`)."""
    return blocked_unpaid(g, n) is None


def _rule_conv(everywhere: bool):
    """The conv rule of the two passes: ``everywhere`` takes every eligible
    conv (to_blocked_layout), else those :func:`blocked_pays` picks
    (choose_blocked_layout); a tuning entry decides either way."""
    def rule(g: Graph, n: str):
        why = blocked_ineligible(g, n)
        if why:
            return decline(n, why)
        tuned = tuning.choice(g, n, mine=("blocked",))
        if tuned is not None:
            why = None if tuned["algorithm"] == "blocked" else tuning.chose_other(tuned)
        elif not everywhere:
            why = blocked_unpaid(g, n)
        return decline(n, why) if why else _conv(g, n, tuned)
    return rule


def _conv(g: Graph, n: str, tuned):
    tile = {"blocking": tuned["blocking"]} if tuned and tuned.get("blocking") else {}
    a = attrs(g, n)
    x, w, *b = operands(g, n)
    c = block_size(x.dtype)
    depthwise = a["groups"] > 1
    if depthwise:
        xb, wb = _blocked(g, x, c), block_weights(w, "depthwise", co=c, flip=a["flip"],
                                                  name=fresh(g, f"{n}.w_blocked"))
    else:
        # a stem (fewer input channels than a block, not blocked already) reads NCHW as it is
        plain = x.shape[1] < c and x.op != "from_blocked"
        xb = x if plain else _blocked(g, x, c)
        wb = block_weights(w, "conv", ci=1 if plain else c, co=c, flip=a["flip"], name=fresh(g, f"{n}.w_blocked"))
    extra = [block_weights(b[0], "bias", co=c, name=fresh(g, f"{n}.b_blocked"))] if b else []
    if a.get("residual"):
        extra.append(_blocked(g, ins(g, n)[-1], c))
    geo = dict(stride=a["stride"], padding=a["padding"], dilation=a["dilation"])
    y = g.add("conv_nchwc", [xb, wb] + extra, dict(geo, **tile, **epilogue.split_attrs(a)[1]), fresh(g, f"{n}.nchwc"))
    return from_blocked(y, g.node(n)["type"].shape[1], name=fresh(g, f"{n}.nchw"))


def _cancel(g: Graph, n: str):
    """to_blocked(from_blocked(y)) with the same block size is y (its
    padding lanes hold finite values instead of zeros: no consumer reads them)."""
    (v,) = ins(g, n)
    if v.op == "from_blocked" and ins(g, v.name)[0].type == g.node(n)["type"]:
        return ins(g, v.name)[0]
    return None


def _sources(g: Graph, n: str):
    """The blocked tensors behind every input of ``n`` when all are
    ``from_blocked`` of one shape and channel count as the output, else None."""
    xs = ins(g, n)
    if not all(v.op == "from_blocked" and v.shape == g.node(n)["type"].shape for v in xs):
        return None
    src = [ins(g, v.name)[0] for v in xs]
    if len({s.type for s in src}) != 1:
        return None
    return src


def _elementwise(g: Graph, n: str):
    """add/sub/mul of two blocked tensors, or an activation of one, runs per
    element on the blocked data."""
    src = _sources(g, n)
    if src is None:
        plain = [v for v in ins(g, n) if v.op != "from_blocked"]
        if len(plain) < len(ins(g, n)):           # some input blocked: say why the layout ends here
            decline(n, f"input '{plain[0].name}' is NCHW ({an(plain[0].op)}): reordered back here" if plain else
                    "its blocked inputs differ in shape: reordered back here")
        return None
    y = g.add(g.node(n)["op"], src, attrs(g, n), fresh(g, f"{n}.nchwc"))
    return from_blocked(y, g.node(n)["type"].shape[1], name=fresh(g, f"{n}.nchw"))


def _max_pool(g: Graph, n: str):
    src = _sources_of_one(g, n)
    if src is None:
        return None
    a = attrs(g, n)
    y = max_pool_nchwc(src, a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"],
                       name=fresh(g, f"{n}.nchwc"))
    return from_blocked(y, g.node(n)["type"].shape[1], name=fresh(g, f"{n}.nchw"))


def _global_avg_pool(g: Graph, n: str):
    src = _sources_of_one(g, n)
    if src is None:
        return None
    y = global_avg_pool_nchwc(src, name=fresh(g, f"{n}.nchwc"))
    return from_blocked(y, g.node(n)["type"].shape[1], name=fresh(g, f"{n}.nchw"))


def _sources_of_one(g: Graph, n: str):
    """The blocked tensor behind a 2D pool's input, if it is a from_blocked."""
    (v,) = ins(g, n)
    return ins(g, v.name)[0] if v.op == "from_blocked" and len(v.shape) == 4 else None


RULES = {"to_blocked": _cancel, "max_pool": _max_pool, "global_avg_pool": _global_avg_pool,
         **{op: _elementwise for op in ("add", "sub", "mul", *activations.ACTIVATIONS)}}
"""How blocked tensors travel (besides the conv rule): through elementwise
ops and pools, and a reorder pair cancels."""


@register
def to_blocked_layout(g: Graph) -> Graph:
    """Convs that :func:`blocked_eligible` accepts become ``conv_nchwc`` over
    the blocked layout NCHWc (c = the host's vector width), their epilogue
    kept. Activations stay blocked from one such conv to the next and through
    the ops that work per element or per channel on blocked data: add, sub
    and mul of two blocked tensors of one shape, activations, 2D max_pool
    and global_avg_pool. ``to_blocked`` / ``from_blocked`` appear only where
    the layout changes: after graph inputs and NCHW-only ops (reshape,
    concat, dense, ...), before graph outputs and NCHW-only ops. A stem conv
    with fewer input channels than a block reads its NCHW input directly.
    Weights and biases are reordered by ``block_weights`` nodes, which
    ``fold_params`` folds into constants. Where the tuning database has an
    entry for a conv, it decides (``blocked`` or another algorithm) among
    the convs blocked_eligible allows. Inference-only (conv_nchwc has no
    gradient): the train pipeline keeps NCHW."""
    return rewrite(g, dict(RULES, conv=_rule_conv(everywhere=True)))


@register
def choose_blocked_layout(g: Graph) -> Graph:
    """The default pipeline's use of NCHWc: like :func:`to_blocked_layout`,
    but a conv goes blocked only where it pays: where the tuning database
    chose ``blocked`` for it, or, without an entry, where
    :func:`blocked_pays` says so (a stem, which reads the image as it is).
    The blocked tensor then travels as far as to_blocked_layout would take
    it (e.g. through ResNet's max pool) and is reordered back before the
    next NCHW op."""
    return rewrite(g, dict(RULES, conv=_rule_conv(everywhere=False)))

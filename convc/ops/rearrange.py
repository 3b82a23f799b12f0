"""Rearrangements built from convc's shape ops (reshape, transpose, expand,
reduce_sum, matmul), so their gradients are those ops' gradients:
``depth_to_space`` / ``space_to_depth`` (pixel shuffle), ``tile`` and
``einsum``.

Each builder checks its rules first and raises a ValidationError naming the
op, the shapes and the rule."""
from __future__ import annotations

import re
import string

from ..errors import RuleError
from ..ir import Value
from .. import shapes
from .registry import builder, rules
from .tensor import expand, reduce_sum, reshape, transpose

_DEPTH_MODES = ("DCR", "CRD")


def _named(name, part):
    return None if name is None else f"{name}.{part}"


@builder("x")
def depth_to_space(x: Value, blocksize: int, mode: str = "DCR", name=None) -> Value:
    """(N, C*r*r, H, W) -> (N, C, H*r, W*r), as ONNX's DepthToSpace: ``mode``
    "DCR" reads the channels as (r, r, C) (depth, column, row), "CRD" as (C,
    r, r) (torch.nn.functional.pixel_shuffle). A reshape to rank 6, a
    transpose and a reshape back."""
    with rules("depth_to_space", name, x=x):
        n, c, h, w = _nchw(x, "depth_to_space")
        r = _block(blocksize)
        if mode not in _DEPTH_MODES:
            raise RuleError(f"mode {mode!r} is not one of {', '.join(_DEPTH_MODES)}")
        if c % (r * r):
            raise RuleError(f"{c} channels do not divide into blocks of {r}x{r}")
    k = c // (r * r)
    if mode == "DCR":
        t = reshape(x, (n, r, r, k, h, w), name=_named(name, "split"))
        t = transpose(t, (0, 3, 4, 1, 5, 2), name=_named(name, "shuffle"))
    else:
        t = reshape(x, (n, k, r, r, h, w), name=_named(name, "split"))
        t = transpose(t, (0, 1, 4, 2, 5, 3), name=_named(name, "shuffle"))
    return reshape(t, (n, k, h * r, w * r), name=name)


@builder("x")
def space_to_depth(x: Value, blocksize: int, mode: str = "DCR", name=None) -> Value:
    """(N, C, H*r, W*r) -> (N, C*r*r, H, W), the inverse of
    :func:`depth_to_space` in the same ``mode`` (ONNX's SpaceToDepth is
    "DCR"; "CRD" is torch.nn.functional.pixel_unshuffle)."""
    with rules("space_to_depth", name, x=x):
        n, c, h, w = _nchw(x, "space_to_depth")
        r = _block(blocksize)
        if mode not in _DEPTH_MODES:
            raise RuleError(f"mode {mode!r} is not one of {', '.join(_DEPTH_MODES)}")
        if h % r or w % r:
            raise RuleError(f"height {h} and width {w} must be multiples of the block size {r}")
    t = reshape(x, (n, c, h // r, r, w // r, r), name=_named(name, "split"))
    perm = (0, 3, 5, 1, 2, 4) if mode == "DCR" else (0, 1, 3, 5, 2, 4)
    t = transpose(t, perm, name=_named(name, "shuffle"))
    return reshape(t, (n, c * r * r, h // r, w // r), name=name)


def _nchw(x: Value, what: str):
    if len(x.shape) != 4:
        raise RuleError(f"{what} takes an (N, C, H, W) tensor, got rank {len(x.shape)}")
    return x.shape


def _block(blocksize) -> int:
    if not shapes.is_int(blocksize) or int(blocksize) < 1:
        raise RuleError(f"blocksize must be a positive integer, got {blocksize!r}")
    return int(blocksize)


@builder("x")
def tile(x: Value, repeats, name=None) -> Value:
    """``numpy.tile`` with one repeat count per axis of ``x``: each axis n
    becomes r*n, the whole block repeated r times. An expand of x seen as
    (1, n0, 1, n1, ...) to (r0, n0, r1, n1, ...), then a reshape."""
    with rules("tile", name, x=x):
        reps = shapes.int_tuple(repeats, "repeats") if not shapes.is_int(repeats) else (int(repeats),)
        if len(reps) != len(x.shape):
            raise RuleError(f"{len(reps)} repeats for the {len(x.shape)} axes of {x.shape}")
        if min(reps, default=1) < 1:
            raise RuleError(f"repeats {reps} must be at least 1 (convc tensors are never empty)")
    if all(r == 1 for r in reps):
        return x
    spread = tuple(d for n in x.shape for d in (1, n))
    wide = tuple(d for r, n in zip(reps, x.shape) for d in (r, n))
    t = expand(reshape(x, spread, name=_named(name, "spread")), wide, name=_named(name, "repeat"))
    return reshape(t, tuple(r * n for r, n in zip(reps, x.shape)), name=name)


# -- einsum -----------------------------------------------------------------------
def parse_einsum(equation: str, ranks: list[int]) -> tuple[list[str], str, str]:
    """The operands' labels, the output's, and the labels that stand for the
    ellipsis (``...``: the same trailing-aligned axes in every term, which
    broadcast). The implicit output is the ellipsis, then the labels seen
    once in alphabetical order (upper case first), as numpy and ONNX. Raises
    RuleError on a malformed equation."""
    eq = equation.replace(" ", "")
    if not re.fullmatch(r"[A-Za-z.,]*(->[A-Za-z.]*)?", eq):
        raise RuleError(f"einsum {equation!r}: labels must be letters, terms separated by ',' and one '->'")
    lhs, arrow, out = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        raise RuleError(f"einsum {equation!r} has {len(terms)} terms for {len(ranks)} operands")
    if any(t.replace("...", "").count(".") for t in terms + [out]) or any(t.count("...") > 1 for t in terms + [out]):
        raise RuleError(f"einsum {equation!r}: a term may hold one ellipsis '...' and no other '.'")
    free = [c for c in string.ascii_letters if c not in eq]
    widths = [r - len(t.replace("...", "")) for t, r in zip(terms, ranks) if "..." in t]
    k = max(widths, default=0)
    if min(widths, default=0) < 0:
        raise RuleError(f"einsum {equation!r}: an ellipsis term has more labels than its operand's rank")
    ell = "".join(free[:k])
    full = []
    for t, r in zip(terms, ranks):
        if "..." in t:
            t = t.replace("...", ell[k - (r - len(t.replace("...", ""))):])
        if len(t) != r:
            raise RuleError(f"einsum {equation!r}: term {t!r} has {len(t)} labels for an operand of rank {r}")
        full.append(t)
    if arrow:
        out = out.replace("...", ell)
    else:
        seen = "".join(full)
        out = ell + "".join(sorted(c for c in set(seen) if seen.count(c) == 1 and c not in ell))
    if len(set(out)) != len(out) or not set(out) <= set("".join(full)):
        raise RuleError(f"einsum {equation!r}: output {out!r} must name distinct labels of the operands")
    return full, out, ell


def einsum(equation: str, *operands: Value, name=None) -> Value:
    """``numpy.einsum`` of one or more Values: matrix products ('ij,jk->ik',
    batched 'bij,bjk->bik' or '...ij,...jk'), transposes ('ij->ji'),
    channel mixing ('nchw,oc->nohw'), outer products ('i,j->ij'), sums
    ('ij->i'), diagonals ('ii->i'). A repeated label in a term first takes
    its diagonal (a ``take`` of the merged axes); labels only one operand has
    and nothing later needs are summed out; then operands are contracted
    left to right, each pair as one batched ``matmul`` between transposes
    and reshapes. Ellipsis axes of size 1 broadcast (an ``expand``)."""
    if not operands or not all(isinstance(v, Value) for v in operands):
        from ..errors import GraphError
        raise GraphError(f"einsum {equation!r}: the operands must be convc Values, got "
                         f"{[type(v).__name__ for v in operands]}")
    with rules("einsum", name, **{f"x{i}": v for i, v in enumerate(operands)}):
        terms, out, ell = parse_einsum(equation, [len(v.shape) for v in operands])
        sizes: dict[str, int] = {}
        for t, v in zip(terms, operands):
            for c, n in zip(t, v.shape):
                if c in ell and n == 1:
                    continue
                if sizes.setdefault(c, n) != n:
                    raise RuleError(f"einsum {equation!r}: label {c!r} is {sizes[c]} and {n}")
        for c in ell:
            sizes.setdefault(c, 1)
    step = 0

    def part_name():
        nonlocal step
        step += 1
        return _named(name, f"s{step}")

    parts = []
    for t, v in zip(terms, operands):
        want = tuple(sizes[c] for c in t)
        if v.shape != want:                      # an ellipsis axis of size 1 broadcast
            v = expand(v, want, name=part_name())
        parts.append(_diagonal(t, v, part_name))

    def needed(i):        # the labels the result or a later operand still needs, after operand i
        return set(out).union(*(t for t, _ in parts[i + 1:]))

    term, acc = _sum_out(parts[0][0], parts[0][1], needed(0), part_name)
    for i in range(1, len(parts)):
        t, v = _sum_out(parts[i][0], parts[i][1], needed(i) | set(term), part_name)
        term, acc = _contract(term, acc, t, v, needed(i), sizes, part_name)
    if term != out:
        acc = transpose(acc, tuple(term.index(c) for c in out), name=part_name())
    return reshape(acc, acc.shape, name=name) if name is not None else acc


def _diagonal(term: str, v: Value, part_name):
    """A term with repeated labels -> its diagonal: the m axes of a label
    moved last, merged (n**m entries) and the n entries i*(1 + n + ... +
    n**(m-1)) taken; one label at a time."""
    from .indexing import take
    while len(set(term)) != len(term):
        c = next(c for c in term if term.count(c) > 1)
        at = [i for i, l in enumerate(term) if l == c]
        rest = [i for i, l in enumerate(term) if l != c]
        n, m = v.shape[at[0]], len(at)
        if rest + at != list(range(len(term))):
            v = transpose(v, tuple(rest + at), name=part_name())
        v = reshape(v, tuple(v.shape[:len(rest)]) + (n ** m,), name=part_name())
        step = sum(n ** j for j in range(m))
        v = take(v, [i * step for i in range(n)], axis=len(rest), name=part_name())
        term = "".join(term[i] for i in rest) + c
    return term, v


def _sum_out(term: str, v: Value, keep: set, part_name):
    drop = tuple(i for i, c in enumerate(term) if c not in keep)
    if not drop:
        return term, v
    return "".join(c for c in term if c in keep), reduce_sum(v, drop, name=part_name())


def _contract(ta: str, a: Value, tb: str, b: Value, keep: set, sizes: dict, part_name):
    """One pair: batch labels (both, kept), contracted (both, not kept), a's
    and b's own; a -> (B, M, K), b -> (B, K, N), one matmul, back to labels
    batch + a's own + b's own."""
    from .linear import matmul
    batch = [c for c in ta if c in tb and c in keep]
    red = [c for c in ta if c in tb and c not in keep]
    own_a = [c for c in ta if c not in tb]
    own_b = [c for c in tb if c not in ta]

    def arrange(t, v, order, shape):
        if list(t) != order:
            v = transpose(v, tuple(t.index(c) for c in order), name=part_name())
        return reshape(v, shape, name=part_name()) if v.shape != shape else v

    size = lambda labels: shapes.prod(sizes[c] for c in labels)     # noqa: E731
    B, M, K, N = size(batch), size(own_a), size(red), size(own_b)
    a3 = arrange(ta, a, batch + own_a + red, (B, M, K))
    b3 = arrange(tb, b, batch + red + own_b, (B, K, N))
    y = matmul(a3, b3, name=part_name())
    labels = batch + own_a + own_b
    return "".join(labels), reshape(y, tuple(sizes[c] for c in labels), name=part_name())

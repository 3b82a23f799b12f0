"""The epilogue: what an output-writing op (a *producer*: conv, winograd_conv,
matmul, dense, col2im) applies to each result while it is still in
registers, instead of a separate node and another pass over memory.

In the order it is applied:

1. the producer's own bias, where it has one (conv: per channel or untied;
   matmul: per row; dense: per column; col2im: per channel);
2. ``residual``: the element of a second tensor of the output's shape is
   added (ResNet's skip connection); the residual is the node's last input;
3. ``activation``: one record of the activation table, with its params.

A producer carries its epilogue in its attrs (``residual=True``,
``activation=...`` and that activation's params), so ``print(g)`` shows it on
the node. The ``fuse_epilogues`` pass builds epilogues after the lowerings
have chosen each node's algorithm; producers declare that they take one by
calling :func:`normalize` and :func:`check` and by printing their stores with
the ``store`` macro of ``templates/c/macros.j2``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import RuleError
from ..ir import TensorType
from . import activations


PRODUCERS = ("conv", "winograd_conv", "matmul", "dense", "col2im")
"""Ops whose template applies an epilogue (their own bias: conv and
winograd_conv per channel or untied, matmul per row, dense per column,
col2im per channel)."""


def normalize(attrs: dict) -> dict:
    """Validated epilogue attrs (``residual`` only when True, the activation
    and its params), the op's other attrs unchanged."""
    out = activations.normalize_fused(attrs)
    r = out.pop("residual", False)
    if r not in (True, False):
        raise RuleError(f"residual must be True or False, got {r!r}")
    if r:
        out["residual"] = True
    return out


def split_attrs(attrs: dict) -> tuple[dict, dict]:
    """(the op's own attrs, the epilogue's: residual, activation and its params)."""
    f = activations.fused(attrs)
    keys = {"residual", "activation"} | (set(f[1]) if f else set())
    return ({k: v for k, v in attrs.items() if k not in keys}, {k: v for k, v in attrs.items() if k in keys})


def split(attrs: dict, xs: list) -> tuple[list, object]:
    """(the op's own inputs, the residual input or None)."""
    if attrs.get("residual"):
        return list(xs[:-1]), xs[-1]
    return list(xs), None


def check(attrs: dict, types: list[TensorType], out: TensorType) -> list[TensorType]:
    """Check the residual against the output type; returns the op's own input types."""
    own, r = split(attrs, types)
    if r is not None and (r.shape != out.shape or r.dtype != out.dtype):
        raise RuleError(f"residual must be {out} like the output, got {r}")
    return own


def reference(attrs: dict, y: np.ndarray, residual: np.ndarray | None) -> np.ndarray:
    """The numpy meaning of the epilogue after the producer's own result ``y``."""
    if residual is not None:
        y = y + residual
    f = activations.fused(attrs)
    return y if f is None else f[0].apply(y, f[1])


def grad(op: str, attrs: dict, xs: list, y, gy):
    """Reverse mode through the epilogue: returns (dL/d(pre-activation sum),
    the residual's gradient or None). An activation whose derivative needs
    its input recomputes the pre-activation value (the same node without
    the activation); one that reads its output uses ``y``."""
    from .elementwise import activation_grad
    f = activations.fused(attrs)
    if f is not None:
        act, params = f
        if act.grad_input(params) == "y":
            t = y
        else:
            t = y.graph.add(op, xs, activations.unfused(attrs), None)
        gy = activation_grad(act.name, t, gy, params)
    return gy, (gy if attrs.get("residual") else None)


def active(attrs: dict) -> bool:
    """Whether a producer's attrs hold an epilogue (a residual or an activation)."""
    return bool(attrs.get("residual") or attrs.get("activation"))


@dataclass(frozen=True)
class Epilogue:
    """What a template needs to print a node's epilogue (see the ``store``
    macro): whether a residual ``res`` is added and the activation's C
    expression."""
    residual: bool
    act: object        # Activation | None
    params: dict
    T: str

    @classmethod
    def of(cls, attrs: dict, T: str) -> "Epilogue":
        f = activations.fused(attrs)
        return cls(bool(attrs.get("residual")), f[0] if f else None, f[1] if f else {}, T)

    @property
    def active(self) -> bool:
        return self.residual or self.act is not None

    def expr(self, v: str) -> str:
        """The activation applied to the C variable ``v`` (``v`` itself if none)."""
        return v if self.act is None else self.act.c_expr(v, self.params, self.T)

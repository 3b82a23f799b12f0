"""Scalar losses, mean over the batch as in PyTorch: ``mse_loss`` and
``cross_entropy`` (logits and int64 class labels)."""
from __future__ import annotations

import numpy as np

from ..errors import InputError, RuleError
from ..ir import TensorType, Value
from .registry import Op, as_value, builder, float_dtype, register, same_dtype


@builder("pred")
def mse_loss(pred: Value, target, name=None) -> Value:
    """mean((pred - target)^2) over every element; a scalar, shape ()."""
    return pred.graph.add("mse_loss", [pred, as_value(pred, target, "mse_loss target")], {}, name)


@builder("logits")
def cross_entropy(logits: Value, labels: Value, name=None) -> Value:
    """mean over the batch of -log softmax(logits)[label]; logits (N, C),
    labels (N,) int64 class indices. A scalar, shape ()."""
    return logits.graph.add("cross_entropy", [logits, labels], {}, name)


def cross_entropy_grad(logits: Value, labels: Value, gy: Value, name=None) -> Value:
    """d cross_entropy / d logits = (softmax(logits) - onehot(labels)) * gy / N."""
    return logits.graph.add("cross_entropy_grad", [logits, labels, gy], {}, name)


@register
class MseLoss(Op):
    name = "mse_loss"
    arity = (2, 2)
    inputs = ("p", "t")

    def infer(self, attrs, types):
        p, t = types
        dtype = same_dtype(types)
        float_dtype(p)
        if p.shape != t.shape:
            raise RuleError(f"prediction {p.shape} and target {t.shape} must have one shape")
        return TensorType((), dtype)

    def grad(self, attrs, xs, y, gy, needs):
        from .elementwise import mul, sub
        p, t = xs
        d = mul(sub(p, t), mul(gy, 2.0 / p.type.size))
        return [d if needs[0] else None, mul(d, -1.0) if needs[1] else None]

    def reference(self, attrs, p, t):
        return np.mean((p - t) ** 2)

    def context(self, attrs, types, out):
        return dict(SIZE=types[0].size)

    def macs(self, attrs, types, out):
        return types[0].size


def _check_ce(logits: TensorType, labels: TensorType):
    float_dtype(logits, "logits")
    if len(logits.shape) != 2:
        raise RuleError(f"logits must be (N, C), got {logits.shape}")
    if labels.dtype != "int64" or labels.shape != logits.shape[:1]:
        raise RuleError(f"labels must be int64 of shape ({logits.shape[0]},), got {labels.dtype}{list(labels.shape)}")


def check_labels(labels: np.ndarray, classes: int) -> None:
    """Raise InputError naming the first label outside [0, classes), its
    position and the valid range (the caller adds the node and op)."""
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if bad.size:
        i = int(bad[0])
        raise InputError(f"label {int(labels[i])} at position {i} is outside the valid range [0, {classes}) "
                         f"of the logits' {classes} classes ({bad.size} of {labels.size} labels out of range)")


class _Labelled(Op):
    """An op reading int64 class labels (its input 1), which must lie in
    [0, C). The generated C checks them before computing anything: the node
    function returns nonzero, the entry point returns the node's status
    (``codegen.c``), and ``reference.invalid_input`` explains it."""

    def value_ranges(self, attrs, types) -> dict[int, tuple[int, int]]:
        """{input index: (lo, hi)}: the values of that input must lie in [lo, hi)."""
        return {1: (0, types[0].shape[1])}

    def check_values(self, attrs, types, values: dict[int, np.ndarray]) -> None:
        check_labels(values[1], types[0].shape[1])


def _log_softmax(z):
    with np.errstate(over="ignore", invalid="ignore"):       # inf - inf is NaN, as in PyTorch
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


@register
class CrossEntropy(_Labelled):
    name = "cross_entropy"
    arity = (2, 2)
    inputs = ("z", "labels")

    def infer(self, attrs, types):
        _check_ce(*types)
        return TensorType((), types[0].dtype)

    def grad(self, attrs, xs, y, gy, needs):
        return [cross_entropy_grad(xs[0], xs[1], gy), None]                        # labels: not differentiable

    def reference(self, attrs, z, labels):
        check_labels(labels, z.shape[1])
        return 0 - np.mean(_log_softmax(z)[np.arange(z.shape[0]), labels])      # 0 -: a zero loss is +0.0

    def context(self, attrs, types, out):
        return dict(N=types[0].shape[0], C=types[0].shape[1], par=[("n", "N", types[0].shape[0])])


@register
class CrossEntropyGrad(_Labelled):
    name = "cross_entropy_grad"
    arity = (3, 3)
    inputs = ("z", "labels", "gy")
    template = "cross_entropy"

    def infer(self, attrs, types):
        _check_ce(*types[:2])
        if types[2].shape != () or types[2].dtype != types[0].dtype:
            raise RuleError(f"gy must be a {types[0].dtype} scalar, got {types[2]}")
        return types[0]

    def reference(self, attrs, z, labels, gy):
        check_labels(labels, z.shape[1])
        p = np.exp(_log_softmax(z))
        p[np.arange(z.shape[0]), labels] -= 1
        return p * (gy / z.shape[0])

    def context(self, attrs, types, out):
        return dict(N=types[0].shape[0], C=types[0].shape[1], grad=True, par=[("n", "N", types[0].shape[0])])

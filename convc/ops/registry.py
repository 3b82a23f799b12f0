"""The op registry. An op is ONE class: arity, attribute normalisation, shape
inference (which validates), the numpy reference, the C template and its
context, and the cost in multiplications.
"""
from __future__ import annotations

import abc
import contextlib
import functools
import inspect

import numpy as np

from ..errors import GraphError, RuleError, ValidationError, format_node_error
from ..ir import TensorType, Value

OPS: dict[str, "Op"] = {}


class Op(abc.ABC):
    """Base class of an op definition; subclasses are registered by name."""

    name: str = ""
    arity: tuple[int, int] = (1, 1)      # min and max number of inputs
    template: str | None = None         # templates/c/<template>.c.j2 (default: name)

    inputs: tuple[str, ...] = ("x",)    # C argument names of the inputs

    def arg_names(self, n: int, attrs: dict | None = None) -> list[str]:
        if attrs and attrs.get("residual"):          # a producer's epilogue input comes last (ops/epilogue.py)
            return self.arg_names(n - 1) + ["res"]
        if n <= len(self.inputs):
            return list(self.inputs[:n])
        return [f"x{i}" for i in range(n)]

    def check_arity(self, n: int):
        lo, hi = self.arity
        if not lo <= n <= hi:
            want = str(lo) if lo == hi else f"{lo} to {hi}"
            raise RuleError(f"takes {want} inputs, got {n}")

    def normalize(self, attrs: dict, types: list[TensorType]) -> dict:
        """Canonical attributes (idempotent). Raise RuleError on a broken rule."""
        return attrs

    @abc.abstractmethod
    def infer(self, attrs: dict, types: list[TensorType]) -> TensorType:
        """Output type; raise RuleError on a broken rule."""

    @abc.abstractmethod
    def reference(self, attrs: dict, *arrays: np.ndarray) -> np.ndarray:
        """The numpy meaning of the op: the oracle for every target."""

    def grad(self, attrs: dict, xs: list[Value], y: Value, gy: Value, needs: list[bool]) -> list:
        """Reverse-mode rule: given dL/dy (``gy``), build and return dL/dx for
        each input (a Value, or None where ``needs`` is False or the input is
        not differentiable)."""
        from ..errors import GraphError
        raise GraphError(f"op {self.name!r} has no gradient rule (node %{y.name})")

    def template_of(self, attrs: dict, types: list[TensorType]) -> str:
        """The template (templates/c/<name>.c.j2) that prints this node: by
        default the op's; an op may pick a specialised one per node."""
        return self.template or self.name

    def context(self, attrs: dict, types: list[TensorType], out: TensorType) -> dict:
        """Extra template variables (shapes as constants) for the C template."""
        return {}

    def workspace(self, attrs: dict, types: list[TensorType], out: TensorType, target: str = "c") -> int:
        """Scratch elements (of the output's dtype) the generated code needs
        while the node runs; the planner gives it a slice of the arena,
        passed as the last argument ``ws``."""
        return 0

    def macs(self, attrs: dict, types: list[TensorType], out: TensorType) -> int:
        """Multiplications (multiply-accumulates) performed by this node."""
        return 0

    def value_ranges(self, attrs: dict, types: list[TensorType]) -> dict[int, tuple[int, int]]:
        """Integer inputs whose values must lie in a range: {input index: (lo,
        hi)}, each value in [lo, hi) (class labels in [0, C)). An op with
        ranges has its template check them before it writes anything and
        return nonzero; the module's entry point then returns the node's
        status (``codegen.c.module_status``). Empty: nothing checked."""
        return {}

    def check_values(self, attrs: dict, types: list[TensorType], values: dict) -> None:
        """Raise an InputError explaining which of ``values`` (input index ->
        array, the inputs of ``value_ranges``) is out of range."""


def register_op(op: "Op") -> "Op":
    """Register an op instance under its name."""
    if op.name in OPS:
        raise RuntimeError(f"op {op.name!r} registered twice")
    OPS[op.name] = op
    return op


def register(cls):
    """Class decorator: register one instance of the op class."""
    register_op(cls())
    return cls


def get_op(name: str) -> Op:
    try:
        return OPS[name]
    except KeyError:
        raise GraphError(f"unknown op {name!r}; known ops: {', '.join(sorted(OPS))}") from None


def same_dtype(types, what="inputs"):
    dts = {t.dtype for t in types}
    if len(dts) > 1:
        raise RuleError(f"{what} must share one dtype, got {', '.join(t.dtype for t in types)}")
    return types[0].dtype


def float_dtype(t: TensorType, what="input"):
    if t.dtype not in ("float32", "float64"):
        raise RuleError(f"{what} must be float32 or float64, got {t.dtype}")
    return t.dtype


def flag(value, what: str, none=None) -> bool:
    """A boolean attribute: True or False (numpy's too, and the integers 0
    and 1 that ONNX uses). Anything merely truthy (a string, a list, 2**40)
    is a broken rule, not True. ``none`` is what None means (None: refused)."""
    if value is None and none is not None:
        return none
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise RuleError(f"{what} must be True or False, got {value!r}")


def builder(*tensors: str):
    """Decorator of a public op builder: its parameters named in ``tensors``
    must be convc Values (what it works on; other parameters may be arrays
    or numbers that become constants). None, a numpy array or a string there,
    or arguments that do not fit the signature, are a GraphError naming the
    builder and the parameter, not an AttributeError or TypeError from
    inside it."""
    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def checked(*args, **kwargs):
            try:
                given = sig.bind_partial(*args, **kwargs).arguments
                for t in tensors:
                    if not isinstance(given.get(t), Value):
                        raise GraphError(f"{fn.__name__}: {t} must be a convc Value (from g.input, g.param or "
                                         f"an op), got {type(given.get(t)).__name__}")
                sig.bind(*args, **kwargs)
            except TypeError as e:
                raise GraphError(f"{fn.__name__}: {e}; it takes {fn.__name__}{sig}") from None
            return fn(*args, **kwargs)
        return checked
    return wrap


def as_value(like: Value, v, what: str) -> Value:
    """Accept a Value, or turn a numpy array / Python number into a constant."""
    if isinstance(v, Value):
        return v
    if isinstance(v, (np.ndarray, int, float, list, tuple)) and not isinstance(v, bool):
        a = np.asarray(v)
        if like.dtype == "int64" and a.dtype.kind not in "iu":
            raise GraphError(f"{what}: {v!r} is not an integer, but %{like.name} is int64")
        return like.graph.const(a, like.dtype)
    raise GraphError(f"{what} must be a convc Value, a numpy array or a number, got {type(v).__name__}")


@contextlib.contextmanager
def rules(op: str, name: str | None, **values):
    """Builders that check rules before adding nodes (composite ops) report
    broken rules like nodes do: node name, op, shapes, rule."""
    try:
        yield
    except RuleError as e:
        shown = {k: (v.shape if isinstance(v, Value) else np.shape(v)) for k, v in values.items()}
        raise ValidationError(format_node_error(name or f"<new {op}>", op, shown, str(e))) from None


def par_outer(dims) -> list[tuple[str, str, int]]:
    """The parallel loop nest (``par`` of a template context) over the outer
    axes of ``dims``, i0, i1, ...: at most two, never the innermost axis of
    several, which stays a plain loop the compiler can vectorise."""
    npar = 1 if len(dims) <= 1 else min(2, len(dims) - 1)
    return [(f"i{k}", str(d), d) for k, d in enumerate(list(dims)[:npar])]


def graph_of(*values) -> "Value":
    for v in values:
        if isinstance(v, Value):
            return v
    raise GraphError("at least one argument must be a convc Value")

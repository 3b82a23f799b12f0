"""The IR: a :class:`Graph` of op nodes on a networkx MultiDiGraph.

Every node produces one tensor. An edge ``producer -> consumer`` carries the
input slot it feeds (``key`` and ``slot``), so the ordered inputs of a node are
its in-edges sorted by slot. Node data: ``op`` (name in the op registry),
``attrs`` (normalised attributes), ``type`` (:class:`TensorType`) and, for
params, ``value`` (a numpy array).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import networkx as nx
import numpy as np

from . import shapes
from .errors import GraphError, RuleError, ValidationError, format_node_error

DTYPES = ("float32", "float64", "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64")
FLOAT_DTYPES = ("float32", "float64")
INT_DTYPES = ("int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64")
"""int64 for class labels and indices; int8/uint8 for quantized tensors
(ops/quantized.py), int32 for their biases and accumulators; int16, int32 and
the rest (uint16, uint32, uint64 too) for ONNX's integer element-wise ops."""


@dataclass(frozen=True)
class TensorType:
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise GraphError(f"dtype {self.dtype!r} is not supported; use one of {DTYPES}")

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize

    def __str__(self):
        return f"{self.dtype}[{','.join(map(str, self.shape))}]"


class Value:
    """A handle on one node's output: knows its graph, name, shape and dtype."""

    __slots__ = ("graph", "name")

    def __init__(self, graph: "Graph", name: str):
        self.graph = graph
        self.name = name

    @property
    def type(self) -> TensorType:
        return self.graph.nx.nodes[self.name]["type"]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.type.shape

    @property
    def dtype(self) -> str:
        return self.type.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def op(self) -> str:
        return self.graph.nx.nodes[self.name]["op"]

    def __repr__(self):
        return f"Value(%{self.name}: {self.type})"

    def __eq__(self, other):
        return isinstance(other, Value) and other.graph is self.graph and other.name == self.name

    def __hash__(self):
        return hash((id(self.graph), self.name))


_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")     # node names (used with fullmatch: no trailing newline)
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")        # graph and output names: C identifiers


def _check_name(name, what: str, pattern=_IDENT_RE, rule="must be a C identifier (letters, digits, _)") -> str:
    """``name`` if it is a str matching ``pattern`` in full; a GraphError
    naming ``what`` and the rule otherwise."""
    if not isinstance(name, str):
        raise GraphError(f"{what} must be a str, got {type(name).__name__} {name!r}")
    if not pattern.fullmatch(name):
        raise GraphError(f"{what} {name!r} {rule}")
    return name


class Graph:
    """A network of convolution ops.

    >>> import numpy as np, convc as cc
    >>> g = cc.Graph("tiny")
    >>> x = g.input("x", (1, 1, 5, 5))
    >>> w = g.param("w", np.ones((1, 1, 3, 3), np.float32))
    >>> y = g.output(cc.conv(x, w), "y")
    >>> y.shape
    (1, 1, 3, 3)
    """

    def __init__(self, name: str = "graph"):
        self.name = _check_name(name, "graph name")
        self.nx = nx.MultiDiGraph()
        self.outputs: dict[str, str] = {}   # output name -> node name
        self.assigns: dict[str, str] = {}   # param node -> node whose value it takes after a run
        self._counter: dict[str, int] = {}

    # -- building -----------------------------------------------------------
    def _fresh(self, base: str) -> str:
        while True:
            n = self._counter.get(base, 0) + 1
            self._counter[base] = n
            name = f"{base}_{n}"
            if name not in self.nx:
                return name

    def _claim(self, name: str | None, base: str) -> str:
        if name is None:
            return self._fresh(base)
        _check_name(name, "node name", _NAME_RE, "must start with a letter or _ and use letters, digits, _ . -")
        if name in self.nx:
            raise GraphError(f"node name {name!r} is already used in graph '{self.name}'")
        return name

    def input(self, name: str, shape, dtype: str = "float32") -> Value:
        """Declare a graph input of a static ``shape`` (N, C, spatial...)."""
        name = self._claim(name, "input")
        shape = _check_shape(shape, name)
        self.nx.add_node(name, op="input", attrs={}, type=TensorType(shape, _dtype_name(dtype, f"input '{name}'")))
        return Value(self, name)

    def param(self, name: str, value, dtype: str | None = None) -> Value:
        """A named constant (trainable) tensor. ``value`` is copied into a
        read-only array the graph owns (so passes and graph copies share it
        instead of copying every weight); an array that is already such a
        frozen copy (a param of another graph) is shared as it is."""
        name = self._claim(name, "param")
        if isinstance(value, np.ndarray):       # before any copy: a broadcast view may claim 2**40 elements
            _check_size(value.shape, f"param '{name}'")
        arr = param_array(value, dtype, f"param '{name}'")
        dtype = arr.dtype.name
        _check_size(arr.shape, f"param '{name}'")
        self.nx.add_node(name, op="param", attrs={}, type=TensorType(tuple(arr.shape), dtype), value=arr)
        return Value(self, name)

    def const(self, value, dtype: str = "float32") -> Value:
        """An anonymous constant (Python scalars in ``add``, seeds, zeros);
        never trained."""
        v = self.param(self._fresh("const"), np.asarray(value), dtype)
        self.nx.nodes[v.name]["const"] = True
        return v

    def assign(self, param: Value, value: Value) -> None:
        """After each run, ``param`` takes ``value`` (computed in that run): how
        training updates weights and optimizer state inside generated code."""
        self._own(param, "assign")
        self._own(value, "assign")
        if param.op != "param":
            raise GraphError(f"assign: %{param.name} is a {param.op}, only params can be assigned")
        if param.type != value.type:
            raise GraphError(f"assign: %{param.name} is {param.type} but %{value.name} is {value.type}")
        if param.name in self.assigns:
            raise GraphError(f"assign: %{param.name} is already assigned")
        self.assigns[param.name] = value.name

    def copy(self, name: str | None = None) -> "Graph":
        """An independent copy of the structure; param values are read-only
        arrays, shared (not copied): a pass that changes a weight makes a new
        param. Values of the copy are ``copy.value(name)``."""
        g = Graph(name or self.name)
        g.nx = self.nx.copy()
        g.outputs = dict(self.outputs)
        g.assigns = dict(self.assigns)
        g._counter = dict(self._counter)
        return g

    def output(self, value: Value, name: str | None = None) -> Value:
        """Mark ``value`` as a graph output called ``name`` (default: its node name)."""
        self._own(value, "output")
        name = _check_name(value.name if name is None else name, "output name")
        if name in self.outputs or name in self.input_names:
            raise GraphError(f"output name {name!r} is already used in graph '{self.name}'")
        self.outputs[name] = value.name
        return value

    def add(self, op: str, inputs: list[Value], attrs: dict | None = None, name: str | None = None) -> Value:
        """Add a node of a registered op; normalises attributes and infers the
        output type, wrapping any broken rule in a :class:`ValidationError`."""
        from .ops import get_op

        if not isinstance(op, str):
            raise GraphError(f"add: op must be an op name (str), got {type(op).__name__} {op!r}")
        if not isinstance(inputs, (list, tuple)):
            raise GraphError(f"{op}: inputs must be a list of convc Values, got {type(inputs).__name__}")
        if attrs is not None and not isinstance(attrs, dict):
            raise GraphError(f"{op}: attrs must be a dict of attribute name -> value, got {type(attrs).__name__}")
        for v in inputs:
            self._own(v, op)
        opdef = get_op(op)
        name = self._claim(name, op)
        types = [v.type for v in inputs]
        attrs, out_type = _infer(opdef, name, attrs or {}, types, [v.name for v in inputs])
        self.nx.add_node(name, op=op, attrs=attrs, type=out_type)
        for slot, v in enumerate(inputs):
            self.nx.add_edge(v.name, name, key=slot, slot=slot)
        return Value(self, name)

    def _own(self, v, op):
        if not isinstance(v, Value):
            raise GraphError(f"{op}: expected a convc Value, got {type(v).__name__}")
        if v.graph is not self:
            raise GraphError(f"{op}: value %{v.name} belongs to graph '{v.graph.name}', not '{self.name}'")

    # -- queries ------------------------------------------------------------
    def node(self, name: str) -> dict:
        return self.nx.nodes[name]

    def value(self, name: str) -> Value:
        if name not in self.nx:
            raise GraphError(f"graph '{self.name}' has no node {name!r}")
        return Value(self, name)

    def inputs_of(self, name: str) -> list[str]:
        edges = sorted(self.nx.in_edges(name, data="slot"), key=lambda e: e[2])
        return [src for src, _, _ in edges]

    def users_of(self, name: str) -> list[str]:
        """Nodes that read ``name`` (each once), in insertion order."""
        users = set(self.nx.successors(name))
        return [n for n in self.nx.nodes if n in users]

    @property
    def input_names(self) -> list[str]:
        return [n for n in self.nx.nodes if self.nx.nodes[n]["op"] == "input"]

    @property
    def param_names(self) -> list[str]:
        return [n for n in self.nx.nodes if self.nx.nodes[n]["op"] == "param"]

    def topological_order(self) -> list[str]:
        """Deterministic topological order (ties broken by insertion order)."""
        index = {n: i for i, n in enumerate(self.nx.nodes)}
        return list(nx.lexicographical_topological_sort(self.nx, key=index.__getitem__))

    # -- printing -----------------------------------------------------------
    def __str__(self):
        from .ops.epilogue import split_attrs
        lines = [f"graph {self.name} {{"]
        for n in self.topological_order():
            d = self.nx.nodes[n]
            own_attrs, ep = split_attrs(d["attrs"])
            srcs = self.inputs_of(n)
            if ep.get("residual"):                  # the epilogue's input, shown with it
                srcs, r = srcs[:-1], srcs[-1]
                ep = dict(ep, residual=f"%{r}")
            args = ", ".join(f"%{i}" for i in srcs)
            attrs = ", ".join(f"{k}={_fmt(v)}" for k, v in own_attrs.items())
            inner = ", ".join(s for s in (args, attrs) if s)
            then = "".join(f" then {step}" for step in _epilogue_steps(ep))
            lines.append(f"  %{n} = {d['op']}({inner}){then} : {d['type']}")
        for out, n in self.outputs.items():
            lines.append(f"  output {out} = %{n}")
        for p, n in self.assigns.items():
            lines.append(f"  assign %{p} = %{n}")
        lines.append("}")
        return "\n".join(lines)

    __repr__ = __str__

    def to_dot(self, highlight=(), added=(), links=None) -> str:
        """Graphviz source: one box per node labelled with op and shape;
        nodes in ``highlight`` filled orange, in ``added`` green; ``links``
        (node -> URL) makes those boxes links (the explain page's C)."""
        lines = [f'digraph "{self.name}" {{', "  rankdir=TB;", '  node [shape=box, fontname="monospace"];']
        for n in self.topological_order():
            d = self.nx.nodes[n]
            fill = "#b7e4a8" if n in added else ("#ffd27f" if n in highlight else None)
            style = f', style=filled, fillcolor="{fill}"' if fill else ""
            if d["op"] in ("input", "param"):
                style += ", shape=ellipse"
            if links and n in links:
                style += f', URL="{links[n]}", tooltip="generated C of {n}"'
            lines.append(f'  "{n}" [label="{n}\\n{d["op"]}\\n{d["type"]}"{style}];')
        for src, dst, slot in sorted(self.nx.edges(data="slot")):
            lines.append(f'  "{src}" -> "{dst}" [label="{slot}"];')
        for out, n in self.outputs.items():
            lines.append(f'  "out:{out}" [shape=doubleoctagon, label="{out}"];')
            lines.append(f'  "{n}" -> "out:{out}";')
        lines.append("}")
        return "\n".join(lines) + "\n"

    def structure_hash(self) -> str:
        """Hash of the structure (ops, attrs, types, wiring), not param values."""
        return hashlib.sha256(str(self).encode()).hexdigest()[:16]

    # -- checking -----------------------------------------------------------
    def verify(self) -> "Graph":
        """Check structure and re-infer every type; raise on the first problem."""
        from .ops import get_op

        if not nx.is_directed_acyclic_graph(self.nx):
            raise GraphError(f"graph '{self.name}' has a cycle")
        if not self.outputs:
            raise GraphError(f"graph '{self.name}' has no outputs; call g.output(value)")
        for n in self.topological_order():
            d = self.nx.nodes[n]
            ins = self.inputs_of(n)
            if d["op"] in ("input", "param"):
                if ins:
                    raise GraphError(f"node '{n}' ({d['op']}) must not have inputs")
                continue
            opdef = get_op(d["op"])
            types = [self.nx.nodes[i]["type"] for i in ins]
            _, t = _infer(opdef, n, d["attrs"], types, ins)
            if t != d["type"]:
                raise GraphError(f"node '{n}' ({d['op']}): stored type {d['type']} != inferred {t}")
        for out, n in self.outputs.items():
            if n not in self.nx:
                raise GraphError(f"output '{out}' refers to missing node '{n}'")
        return self


def require_graph(obj, what: str) -> Graph:
    """``obj`` if it is a :class:`Graph`, else a GraphError naming the entry
    point ``what`` (public functions take graphs from users: no bare
    AttributeError on ``3.verify()``)."""
    if not isinstance(obj, Graph):
        raise GraphError(f"{what} takes a convc.Graph, got {type(obj).__name__}")
    return obj


def _infer(opdef, name, attrs, types, input_names):
    """Normalise ``attrs`` and infer the output type of node ``name``. Every
    broken rule, and any attribute value an op's normalisation cannot read
    (a missing key, a value of the wrong type), becomes a ValidationError
    naming the node, the op and the input shapes: this is the one place
    attributes enter the IR, for the builders, ``g.add`` and importers alike."""
    try:
        opdef.check_arity(len(types))
        attrs = opdef.normalize(dict(attrs), types)
        out = opdef.infer(attrs, types)
        if out.size > shapes.INDEX_MAX:
            raise RuleError(f"output {out} has {out.size} elements, beyond {shapes.INDEX_MAX} (2**31 - 1), "
                            f"the largest count the generated C and OpenCL code index with an int")
        return attrs, out
    except RuleError as e:
        rule = str(e)
    except KeyError as e:
        rule = f"missing attribute {e}; given {sorted(attrs)}"
    except (TypeError, ValueError, IndexError, AttributeError, OverflowError, ZeroDivisionError) as e:
        rule = f"attributes {attrs!r} cannot be read ({type(e).__name__}: {e})"
    shown = {nm: t.shape for nm, t in zip(input_names, types)}
    raise ValidationError(format_node_error(name, opdef.name, shown, rule)) from None


def _check_size(shape, what: str) -> None:
    """Every dimension and the element count must fit the generated code's
    ``int`` indices (``shapes.INDEX_MAX``)."""
    size = shapes.prod(shape)
    if size > shapes.INDEX_MAX:
        raise ValidationError(f"{what}: shape {tuple(shape)} has {size} elements, beyond {shapes.INDEX_MAX} "
                              f"(2**31 - 1), the largest count the generated C and OpenCL code index with an int")


def _check_shape(shape, name):
    """A shape of true integers (Python or numpy ints; no floats, strings or
    bools, which would be silently truncated), each >= 1, within the index
    limit."""
    try:
        dims = tuple(shape)
    except TypeError:
        raise GraphError(f"input '{name}': shape must be a tuple of ints, got {shape!r}") from None
    if not all(shapes.is_int(s) for s in dims):
        raise GraphError(f"input '{name}': shape must be a tuple of ints, got {shape!r} "
                         f"(floats, strings and bools are not dimensions)")
    dims = tuple(int(s) for s in dims)
    if any(s < 1 for s in dims):
        raise GraphError(f"input '{name}': every dimension must be >= 1, got {dims}")
    _check_size(dims, f"input '{name}'")
    return dims


def _dtype_name(dtype, what: str) -> str:
    """One of DTYPES from its name or a numpy dtype (``np.float32``); no
    other spelling (``"float"``, ``None``), which numpy would read as float64."""
    try:
        name = dtype if isinstance(dtype, str) else None if dtype is None else np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise GraphError(f"{what}: dtype {dtype!r} is not supported; use one of {DTYPES}")
    return name


def param_array(value, dtype, what: str) -> np.ndarray:
    """A C-contiguous copy of ``value`` as one of DTYPES (default: int64 for
    integers, float64 for float64, float32 otherwise). Values the dtype cannot
    hold are refused, not wrapped or truncated: complex numbers, strings and
    objects, integers beyond the integer dtype's range, non-integral or
    non-finite floats for an integer dtype, finite floats beyond the float
    type's range."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as e:
        raise GraphError(f"{what}: value is not a numeric array ({e})") from None
    kind = arr.dtype.kind
    if kind not in "biuf":
        raise GraphError(f"{what}: values of numpy dtype {arr.dtype} are not supported: give real numbers "
                         f"(bool, int or float; integers within int64)")
    if dtype is None:
        dtype = "int64" if kind in "iu" else ("float64" if arr.dtype == np.float64 else "float32")
    dtype = _dtype_name(dtype, what)
    if arr.size and kind in "iuf":
        lo, hi = arr.min(), arr.max()
        if dtype in INT_DTYPES:
            info = np.iinfo(dtype)
            if kind == "f" and not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
                raise GraphError(f"{what}: {dtype} param has non-integral or non-finite float values "
                                 f"(e.g. {arr[(arr != np.round(arr)) | ~np.isfinite(arr)][0].item()})")
            if kind in "iu":
                fits = int(info.min) <= int(lo) and int(hi) <= int(info.max)
            else:
                fits = float(info.min) <= float(lo) and float(hi) < float(info.max) + 1
            if not fits:
                raise GraphError(f"{what}: values from {lo} to {hi} do not fit {dtype} "
                                 f"([{info.min}, {info.max}])")
        else:
            finite = arr[np.isfinite(arr)] if kind == "f" else arr
            big = float(np.finfo(dtype).max)
            if finite.size and max(abs(float(finite.min())), abs(float(finite.max()))) > big:
                raise GraphError(f"{what}: finite values from {finite.min()} to {finite.max()} do not fit "
                                 f"{dtype} (largest {big}); they would become infinite")
    if frozen(arr) and arr.dtype == np.dtype(dtype):
        return arr                      # immutable already: share it
    out = np.array(arr, dtype=dtype, order="C", copy=True)  # (ascontiguousarray would make 0-d 1-d)
    out.flags.writeable = False
    return out


def frozen(arr) -> bool:
    """True for an array no one can change: read-only, C-contiguous and
    owning its memory (a read-only view of a writable array could change
    under it)."""
    return (isinstance(arr, np.ndarray) and not arr.flags.writeable and arr.flags.owndata
            and arr.flags.c_contiguous)


def _fmt(v):
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, tuple):
        return "(" + ",".join(_fmt(x) for x in v) + ")"
    return str(v)


def _epilogue_steps(ep: dict) -> list[str]:
    """The printed steps of a producer's epilogue: ``add(%r)``, ``relu``."""
    steps = [f"add({ep['residual']})"] if ep.get("residual") else []
    if ep.get("activation"):
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in ep.items() if k not in ("activation", "residual"))
        steps.append(f"{ep['activation']}({params})" if params else ep["activation"])
    return steps

"""ONNX import: :func:`from_onnx` and the walk over an ONNX graph.

The walk takes the ONNX nodes in their (topological) order:

* a node whose inputs are all known at compile time -- initializers,
  ``Constant`` nodes, the results of earlier such nodes, and ``Shape`` of any
  tensor, since convc shapes are static -- is evaluated at import and becomes
  a constant (:mod:`.fold`'s numpy functions, else convc's converter and
  numpy reference, else ``onnx.reference``); so the Shape -> Gather ->
  Concat -> Reshape chains exporters write for reshape targets fold away;
* every other node maps to convc ops through the converter registered for
  its op type with :func:`converts` (float ops in :mod:`.converters`,
  quantized ones in :mod:`.quantized`); initializers it reads become params
  named after them. Each converter says through which opset it was checked
  (``checked``): a model whose op resolves, at the model's opset, to a
  version of the op newer than that is refused, naming both versions;
* a node that cannot be mapped is recorded and the walk goes on, so the
  :class:`OnnxImportError` lists every unsupported node at once.

This module holds the registry, the walk, the schema and attribute checks,
and the helpers the converters share (windows, pads, axes).
"""
from __future__ import annotations

import functools
import re
from typing import Callable, NamedTuple

import numpy as np

from ..errors import ConvcError
from ..ir import DTYPES, Graph, Value, frozen
from ..ops.tensor import reshape
from ..quant import QDTYPES
from ..shapes import ceil_div, prod
from .fold import FOLDS, FoldError
from .validate import NEWEST_OPSET, FoldBudget, Refusal, check_model, read_model, tensor_array


class OnnxImportError(ConvcError):
    """A model convc cannot import; ``problems`` lists every unsupported node
    (and input) as ``(op_type, name, reason)``. ``invalid``: the model breaks
    ONNX's own rules (names, order, versions), so nothing was imported."""

    def __init__(self, model: str, problems: list[tuple[str, str, str]], invalid: bool = False):
        self.problems, self.invalid = problems, invalid
        lines = [f"  {op} {name if name.startswith('(') else repr(name)}: {why}" for op, name, why in problems]
        if invalid:
            head = f"is not a valid ONNX model; {len(problems)} problem{'s' if len(problems) != 1 else ''}"
        else:
            n_values = sum(op in ("input", "output", "initializer") for op, _, _ in problems)
            counts = [f"{n} unsupported {what}{'s' if n != 1 else ''}" for n, what in
                      ((len(problems) - n_values, "node"), (n_values, "input or output")) if n]
            head = f"cannot be imported; {' and '.join(counts)}"
        super().__init__(f"ONNX model {model!r} {head}:\n" + "\n".join(lines))


class _Unsupported(Exception):
    """Raised by converters: the reason this node cannot be imported.
    ``consequence``: caused only by an earlier unsupported node."""

    def __init__(self, reason: str, consequence: bool = False):
        super().__init__(reason)
        self.consequence = consequence


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ConvcError("ONNX support needs the onnx package: pip install 'convc[onnx]'") from None
    return onnx


_NP_OF_DTYPE = {d: np.dtype(d).type for d in DTYPES}
# TensorProto FLOAT, DOUBLE, INT64, INT32, INT16, INT8, UINT8, UINT16, UINT32, UINT64
_DTYPE_OF_ELEM = {1: "float32", 11: "float64", 7: "int64", 6: "int32", 5: "int16", 3: "int8", 2: "uint8",
                  4: "uint16", 12: "uint32", 13: "uint64"}
_ELEM_OF_DTYPE = {v: k for k, v in _DTYPE_OF_ELEM.items()}


def _dtype_of(arr: np.ndarray) -> str | None:
    name = np.dtype(arr.dtype).name
    return name if name in DTYPES else None


def node_name(text: str, fallback: str = "node") -> str:
    """A convc node name for an ONNX name: characters other than letters,
    digits, ``_ . -`` become ``_`` (``/layer1/conv/Conv`` -> ``layer1_conv_Conv``)."""
    s = re.sub(r"[^A-Za-z0-9_.\-]", "_", text).strip("_.-")
    s = s or fallback
    return s if re.match(r"[A-Za-z_]", s) else "_" + s


def c_name(text: str, fallback: str = "y") -> str:
    """A C identifier for an ONNX name (graph and output names)."""
    s = re.sub(r"[^A-Za-z0-9_]", "_", text).strip("_") or fallback
    return s if re.match(r"[A-Za-z_]", s) else "_" + s


# -- import ------------------------------------------------------------------------
class _Converter(NamedTuple):
    """A registered converter: the function, what its dropped outputs are,
    its attributes' defaults, and the newest opset it was checked against."""
    fn: Callable
    dropped: str
    defaults: dict
    checked: int


_CONVERTERS: dict[str, _Converter] = {}

# Inputs convc needs at compile time, per op type (their values decide shapes
# or attributes). A graph input feeding one can be bound with ``constants=``.
STATIC_INPUTS = {"Reshape": (1,), "Pad": (1, 2, 3), "Clip": (1, 2), "Dropout": (1, 2), "Slice": (1, 2, 3, 4),
                 "Expand": (1,), "Squeeze": (1,), "Unsqueeze": (1,), "ReduceSum": (1,), "ReduceMean": (1,),
                 "Split": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2)}

# Never folded: their result is random.
_RANDOM = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


_DOMAINS = ("", "ai.onnx", "com.microsoft")
"""Domains with converters: ONNX's, and ONNX Runtime's contrib ops that its
quantizer writes in the QOperator format (QLinearAdd, QGemm, ...), as
``"com.microsoft.QLinearAdd"`` in ``_CONVERTERS``."""


def _key(node) -> str:
    """A node's entry in _CONVERTERS: the op type, after its domain unless ONNX's."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def converts(*op_types: str, dropped: str = "", checked: int = NEWEST_OPSET, **defaults):
    """Register a converter for ``op_types``. ``defaults``: every attribute
    the converter understands, with its ONNX default (an attribute not
    listed is unsupported). ``checked``: the newest opset whose definition
    of the op the converter follows (default :data:`.validate.NEWEST_OPSET`);
    a model whose opset gives the op a newer version is refused.

    A converter ``fn(importer, node, inputs, attrs)`` returns the node's
    outputs in order, a Value (or a constant array) each, or None for an
    unused output it leaves out. It may return fewer than the node has
    (most compute the first only); ``dropped`` says what the others are,
    for the error when one of them is used."""
    def deco(fn):
        for t in op_types:
            _CONVERTERS[t] = _Converter(fn, dropped, defaults, checked)
        return fn
    return deco


def from_onnx(model, input_shapes: dict | None = None, constants: dict | None = None,
              name: str | None = None, fold_qdq: bool = True) -> Graph:
    """Import an ONNX model (a path, bytes or ``onnx.ModelProto``) as a Graph.

    ``input_shapes``: ``{input name: shape}`` for inputs whose ONNX shape has
    symbolic dims (a dynamic batch size); ``constants``: ``{input name:
    array}`` binds graph inputs to values known at compile time (what
    ``STATIC_INPUTS`` need: a reshape target, pads, clip bounds). Inputs and
    params keep their ONNX names where convc allows them (see
    :func:`node_name`), outputs become C identifiers (:func:`c_name`).
    Raises :class:`OnnxImportError` listing every unsupported node, or every
    way the model breaks ONNX's rules (see :mod:`convc.onnx.validate`: names,
    topological order, versions, tensor sizes); constants folded at import
    are capped (``CONVC_MAX_MEMORY``). External data needs the model's path.

    Quantized models: QuantizeLinear / DequantizeLinear become ``quantize``
    / ``dequantize``, QLinearConv ``qconv``, QLinearMatMul and MatMulInteger
    ``qmatmul``; ``fold_qdq`` (default on) runs the pass of that name
    (:mod:`convc.passes.qdq`) on the result, so a QDQ model's dequantize ->
    float op -> quantize groups become integer ops.
    """
    onnx = _onnx()
    model = read_model(model)
    opset = check_model(model, lambda problems: OnnxImportError(model.graph.name or "?", problems, invalid=True),
                        warn=not model.functions)       # (with functions: once they are inlined)
    if model.functions:
        try:
            from onnx import inliner
        except ImportError:
            raise ConvcError(f"the model defines functions; inlining them needs onnx >= 1.16 "
                             f"(this is {onnx.__version__})") from None
        try:
            model = inliner.inline_local_functions(model)
        except Exception as e:      # noqa: BLE001 -- onnx's inliner on a malformed function
            raise ConvcError(f"ONNX model {model.graph.name!r}: its functions cannot be inlined: "
                             f"{type(e).__name__}: {e}") from None
        # the functions' bodies are now nodes of the graph: check them as such
        check_model(model, lambda problems: OnnxImportError(model.graph.name or "?", problems, invalid=True))
    g = _Importer(model, dict(input_shapes or {}), dict(constants or {}), name, opset).run()
    if fold_qdq and any(g.node(n)["op"] == "quantize" for n in g.nx.nodes):
        from ..passes.qdq import fold_qdq as fold
        g = fold(g).verify()
    return g


class _Importer:
    def __init__(self, model, input_shapes, constants, name, opset, budget: FoldBudget | None = None,
                 used: set | None = None):
        self.model = model
        self.opset = opset
        self.budget = budget or FoldBudget(sum(t.ByteSize() for t in model.graph.initializer), opset)
        self.folding = False                            # a scratch importer folding one node (see fold)
        self.g = Graph(c_name(name or model.graph.name or "onnx_model", "onnx_model"))
        self.env: dict[str, Value | np.ndarray] = {}   # ONNX tensor -> Value (run time) or array (constant)
        self.params: dict[str, Value] = {}             # constant -> the param it became
        self.initializers: set[str] = set()
        self.placeholders: set[str] = set()
        self.unknown_constants: set[str] = set()        # would be constants, but come from an unsupported node
        self.problems: list[tuple[str, str, str]] = []
        self.input_shapes, self.constants = input_shapes, constants
        self.shapes: dict[str, tuple] = {}              # graph input -> the shape it was given
        self._inferred = None
        self.used = used if used is not None else \
            {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}

    # -- values ------------------------------------------------------------------
    def value(self, name: str) -> Value:
        """The run-time Value of an ONNX tensor; constants become params."""
        if not name:
            raise _Unsupported("a required input is missing (its name is empty)")
        v = self.env[name]
        if isinstance(v, Value):
            return v
        if name not in self.params:
            dtype = _dtype_of(v)
            if dtype is None:
                raise _Unsupported(f"constant {name!r} has dtype {v.dtype}; convc computes in "
                                   f"{', '.join(DTYPES)}")
            if name in self.initializers:
                self.params[name] = self.g.param(self.unique(node_name(name, "param")), v, dtype)
            else:
                self.params[name] = self.g.const(v, dtype)
        return self.params[name]

    def const(self, name: str, what: str) -> np.ndarray:
        """A compile-time constant input, or _Unsupported."""
        if not name:
            raise _Unsupported(f"input {what} is required, and missing (its name is empty)")
        v = self.env[name]
        if isinstance(v, np.ndarray):
            return v
        raise _Unsupported(f"{what} (input {name!r}) must be a constant (an initializer, a Constant or "
                           f"something convc folds); bind a graph input with from_onnx(constants=...)",
                           consequence=name in self.placeholders)

    def ints(self, name: str, what: str) -> np.ndarray:
        """A compile-time constant input of integers, flattened (ONNX's
        shapes, axes, pads, starts, ... are int64 tensors)."""
        v = self.const(name, what)
        if v.dtype.kind not in "iu":
            raise _Unsupported(f"{what} (input {name!r}) must be integers (ONNX: int64), got {v.dtype}")
        if v.dtype.kind == "u" and v.size and int(v.max()) >= 2**63:
            raise _Unsupported(f"{what} (input {name!r}) holds {int(v.max())}, beyond int64")
        return v.reshape(-1).astype(np.int64)

    def floats(self, name: str, what: str) -> np.ndarray:
        """A compile-time constant input of real numbers, flattened."""
        v = self.const(name, what)
        if v.dtype.kind not in "f":
            raise _Unsupported(f"{what} (input {name!r}) must be floating point (ONNX: float), got {v.dtype}")
        return v.reshape(-1)

    def allocate(self, shape, what: str) -> None:
        """Claim room for a constant a converter makes (``shape``, 8 bytes an
        element at most) from the import's budget, before making it."""
        try:
            self.budget.claim(8 * prod(int(n) for n in shape), f"{what} of shape {tuple(shape)}")
        except Refusal as e:
            raise _Unsupported(str(e)) from None

    def scalar(self, name: str, what: str, exact: bool = False) -> float:
        """A compile-time constant input holding one number (``exact``: an
        integer stays a Python int, so int64 values keep every bit)."""
        v = self.const(name, what)
        if v.size != 1 or v.dtype.kind not in "biuf":
            raise _Unsupported(f"{what} (input {name!r}) must be one number, got {v.dtype} of shape {v.shape}")
        return int(v.reshape(-1)[0]) if exact and v.dtype.kind in "iu" else float(v.reshape(-1)[0])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(np.shape(self.env[name])) if isinstance(self.env[name], np.ndarray) else self.env[name].shape

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.g.nx:
            i += 1
            name = f"{base}_{i}"
        return name

    def name(self, node, part: str | None = None) -> str:
        base = node_name(node.name or (node.output[0] if node.output else node.op_type), node.op_type)
        return self.unique(base if part is None else f"{base}.{part}")

    # -- walking the model -------------------------------------------------------
    def run(self) -> Graph:
        graph = self.model.graph
        names = {i.name for i in graph.input}
        for what, given in (("input_shapes", self.input_shapes), ("constants", self.constants)):
            unknown = sorted(set(given) - names)
            if unknown:
                raise ConvcError(f"from_onnx({what}=...): the model has no input {', '.join(map(repr, unknown))}; "
                                 f"its inputs are {sorted(names)}")
        for init in graph.initializer:
            try:
                self.env[init.name] = tensor_array(init, self.budget.cap)
            except Refusal as e:
                self.problems.append(("initializer", init.name, f"{e}"))
                self.unknown_constants.add(init.name)
                continue
            self.initializers.add(init.name)
        for sp in graph.sparse_initializer:
            self.problems.append(("initializer", sp.values.name, "sparse initializers are not supported"))
        for inp in graph.input:
            if inp.name in self.constants:
                self.env[inp.name] = np.asarray(self.constants[inp.name])
            elif inp.name not in self.env:          # IR < 4 lists initializers as inputs too
                self.declare_input(inp)
        for node in graph.node:
            self.convert(node)
        for out in graph.output:
            if out.name not in self.env and not self.problems:
                self.problems.append(("output", out.name, "no node of the model computes it"))
            if out.name in self.env:
                try:
                    v = self.value(out.name)
                except _Unsupported as e:
                    self.problems.append(("output", out.name, str(e)))
                    continue
                oname = c_name(out.name)
                while oname in self.g.outputs or oname in self.g.input_names:
                    oname += "_"
                self.g.output(v, oname)
        if self.problems:
            raise OnnxImportError(graph.name or "?", self.problems)
        return self.g.verify()

    def declare_input(self, inp):
        tt = inp.type.tensor_type if inp.type.HasField("tensor_type") else None
        if tt is None:
            kind = (inp.type.WhichOneof("value") or "untyped value").replace("_type", "")
            self.problems.append(("input", inp.name, f"it is {'an' if kind[0] in 'aeiou' else 'a'} {kind}, "
                                                     "not a tensor; convc takes tensors"))
            return
        dtype = _DTYPE_OF_ELEM.get(tt.elem_type)
        if dtype is None:
            self.problems.append(("input", inp.name, f"dtype {_elem_name(tt.elem_type)} is not supported; convc "
                                                     f"computes in {', '.join(DTYPES)}"))
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        given = self.input_shapes.get(inp.name)
        if given is not None:
            given = tuple(int(s) for s in given)
            if tt.HasField("shape") and (len(given) != len(dims) or any(
                    d is not None and d != s for d, s in zip(dims, given))):
                raise ConvcError(f"from_onnx(input_shapes=...): input {inp.name!r} has shape "
                                 f"{_show_dims(tt)} in the model, {given} does not fit it")
            shape = given
        elif tt.HasField("shape") and 0 in dims:
            self.problems.append(("input", inp.name, f"shape {_show_dims(tt)} has an empty dimension; convc "
                                                     "tensors are never empty"))
            return
        elif not tt.HasField("shape") or any(d is None or d < 1 for d in dims):
            self.problems.append(("input", inp.name, f"shape {_show_dims(tt)} is not static; give it with "
                                                     f"from_onnx(input_shapes={{{inp.name!r}: (...)}}) "
                                                     f"(on the command line: --shape {inp.name}=D0,D1,...)"))
            return
        else:
            shape = tuple(dims)
        self.shapes[inp.name] = shape
        self.env[inp.name] = self.g.input(self.unique(node_name(inp.name, "input")), shape, dtype or "float32")
        if dtype is None:           # a float32 stand-in, so the nodes reading it can still be checked
            self.placeholders.add(inp.name)

    def convert(self, node):
        label = node.name or f"(unnamed, output {node.output[0] if node.output else '?'!r})"
        missing = [i for i in node.input if i and i not in self.env]
        if missing and not all(self.placeholder(i) for i in missing):
            # an input comes from an unsupported node: only the op itself can be
            # checked -- whether convc maps it, should its inputs be run-time tensors
            if node.domain not in _DOMAINS:
                self.problems.append((node.op_type, label, f"domain {node.domain!r} is not supported"))
            elif _key(node) not in _CONVERTERS and not self.would_be_constant(node):
                self.problems.append((node.op_type, label, f"op {node.op_type} is not supported"))
            self.unresolved(node)
            return
        try:
            outs = self.convert_node(node)
        except _Unsupported as e:
            if not e.consequence:
                self.problems.append((node.op_type, label, str(e)))
            self.unresolved(node)
            return
        except ConvcError as e:
            if not any(i in self.placeholders for i in node.input):
                self.problems.append((node.op_type, label, f"convc rejects it: {e}"))
            self.unresolved(node)
            return
        except Exception as e:      # noqa: BLE001 -- a converter missed a check: still one line of the report
            self.problems.append((node.op_type, label, f"the importer failed on it (a bug in convc, please report "
                                                       f"it): {type(e).__name__}: {e}"))
            self.unresolved(node)
            return
        for o, v in zip(node.output, outs):
            if o and v is not None:
                self.env[o] = v

    def convert_node(self, node):
        if node.domain not in _DOMAINS:
            raise _Unsupported(f"domain {node.domain!r} is not supported")
        args = [self.env[i] if i else None for i in node.input]
        if node.op_type in ("Shape", "Size") and args and args[0] is not None:
            return [_shape_op(node, self.shape(node.input[0]))]
        if not self.folding and all(a is None or isinstance(a, np.ndarray) for a in args) \
                and node.op_type not in _RANDOM and not _kept_dequantize(node, args):
            return self.fold(node, args)
        if not self.folding and self.would_be_constant(node):   # folded, were it not for an unsupported node
            raise _Unsupported("an input comes from an unsupported node", consequence=True)
        entry = _CONVERTERS.get(_key(node))
        if entry is None and node.op_type in FOLDS and node.domain in ("", "ai.onnx"):
            late = [i for i, a in zip(node.input, args) if i and not isinstance(a, np.ndarray)]
            raise _Unsupported(f"convc computes {node.op_type} at import only (its result decides shapes, and "
                               f"convc's shapes are static), and input {late[0]!r} is computed at run time; bind it "
                               f"with from_onnx(constants=...) if it is a graph input")
        if entry is None:
            raise _Unsupported(f"op {node.op_type} is not supported" if node.domain in ("", "ai.onnx") else
                               f"op {node.op_type} of domain {node.domain!r} is not supported")
        fn, dropped, defaults, checked = entry
        if node.domain in ("", "ai.onnx"):     # (onnx has no schemas of ONNX Runtime's contrib ops)
            _check_version(node.op_type, self.opset, checked)
            _check_schema(node, args, self.opset, guessed=self.placeholders)
        attrs = dict(defaults)
        for a in node.attribute:
            if a.name not in defaults:
                raise _Unsupported(f"attribute {a.name!r} is not supported")
            attrs[a.name] = _attr_value(a)
            if a.name in _INT32_ATTRS:
                _check_int32(a.name, attrs[a.name])
            if a.name in _FLAG_ATTRS and attrs[a.name] not in (0, 1):
                raise _Unsupported(f"attribute {a.name} is {attrs[a.name]}; ONNX's flags are 0 or 1 (runtimes "
                                   f"read other values differently)")
        ins = list(node.input)
        outs = fn(self, node, ins + [""] * (6 - len(ins)), attrs)
        for o in node.output[len(outs):]:
            if o and o in self.used:
                first = "the first output" if len(outs) == 1 else f"the first {len(outs)} outputs"
                raise _Unsupported(f"its output {o!r} ({dropped}) is used; convc computes only {first}")
        return outs

    def would_be_constant(self, node) -> bool:
        """Whether the node would be folded, had every node before it been
        imported: Shape and Size, and deterministic nodes whose inputs are (or
        would be) constants."""
        if node.op_type in ("Shape", "Size"):
            return True
        if _kept_dequantize(node, [self.env.get(i) for i in node.input[:1]]):
            return False
        return node.op_type not in _RANDOM and all(
            not i or isinstance(self.env.get(i), np.ndarray) or i in self.unknown_constants for i in node.input)

    def unresolved(self, node):
        """A node not imported: its outputs stay unknown (later nodes reading
        them get placeholders, or are skipped), constants among them noted."""
        if self.would_be_constant(node):
            self.unknown_constants.update(o for o in node.output if o)

    def fold(self, node, args):
        """The outputs of a node of constants, computed at import once the
        budget has sized them: by :mod:`.fold`'s numpy function of the op,
        else by convc's converter and numpy reference, else by
        ``onnx.reference`` (see :mod:`.fold`)."""
        try:
            self.budget.check(node, args)
        except Refusal as e:
            raise _Unsupported(f"{e}") from None
        fn = FOLDS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if fn is not None:
            attrs = {a.name: _attr_value(a) for a in node.attribute}
            try:
                outs = fn(node, attrs, args, self.opset)
            except FoldError as e:
                raise _Unsupported(f"its inputs are constants, and {e}") from None
            if outs is not None:
                return [_frozen(o, args) for o in outs]
        why = self.fold_by_converter(node, args)
        if not isinstance(why, str):
            return why
        return self.fold_by_onnx_reference(node, args, why)

    def fold_by_converter(self, node, args):
        """The outputs through convc's converter into a scratch graph of
        params, evaluated by convc's numpy reference; or why it cannot."""
        from ..reference import values

        entry = _CONVERTERS.get(_key(node))
        if entry is None:
            return f"convc has no converter of {node.op_type}"
        scratch = _Importer(self.model, {}, {}, "fold", self.opset, budget=self.budget, used=self.used)
        scratch.folding = True
        scratch.env = {i: a for i, a in zip(node.input, args) if i}
        try:
            outs = scratch.convert_node(node)
            vals = [o if o is None or isinstance(o, np.ndarray) else o.name for o in outs]
            computed = values(scratch.g, {}, nodes=[v for v in vals if isinstance(v, str)])
        except (_Unsupported, ConvcError) as e:
            return f"convc's converter cannot take it ({e})"
        return [None if v is None else _frozen(computed[v] if isinstance(v, str) else v, args) for v in vals]

    def fold_by_onnx_reference(self, node, args, why_not_convc: str):
        from onnx.reference import ReferenceEvaluator

        feeds = {i: a for i, a in zip(node.input, args) if i}
        try:
            outs = ReferenceEvaluator(node, opsets={"": self.opset}).run(None, feeds)
        except Exception as e:       # noqa: BLE001 -- any failure of the reference is a reason
            raise _Unsupported(f"its inputs are constants, but {why_not_convc}, and onnx.reference cannot "
                               f"evaluate it: {type(e).__name__}: {e}") from None
        if not all(isinstance(o, (np.ndarray, np.generic)) for o in outs):
            raise _Unsupported("it yields a non-tensor value (sequence, map or optional)")
        return [_frozen(o, args) for o in outs]

    def placeholder(self, name: str) -> bool:
        """Stand in for a tensor an unsupported node should have made, using
        ONNX shape inference, so later nodes can still be checked."""
        if self._inferred is None:
            self._inferred = self.infer_shapes()
        info = self._inferred.get(name)
        if info is None:
            return False
        try:
            self.env[name] = self.g.input(self.unique("unsupported"), *info)
        except ConvcError:          # a shape convc cannot hold: nothing to stand in with
            return False
        self.placeholders.add(name)
        return True

    def infer_shapes(self) -> dict:
        onnx = _onnx()
        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        for inp in m.graph.input:
            if inp.name in self.shapes:
                dims = inp.type.tensor_type.shape.dim
                del dims[:]
                for s in self.shapes[inp.name]:
                    dims.add().dim_value = s
        # onnx's inference aborts the process on a Split whose num_outputs is
        # not its number of outputs (onnx 1.23): leave such nodes out
        bad = [n for n in m.graph.node if n.op_type == "Split" and n.domain in ("", "ai.onnx") and any(
            a.name == "num_outputs" and a.i != len(n.output) for a in n.attribute)]
        for n in bad:
            m.graph.node.remove(n)
        try:
            m = onnx.shape_inference.infer_shapes(m)
        except Exception:       # noqa: BLE001 -- no inference, no placeholders
            return {}
        out = {}
        for vi in list(m.graph.value_info) + list(m.graph.output):
            tt = vi.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tt.shape.dim]
            if vi.type.HasField("tensor_type") and tt.HasField("shape") and all(d > 0 for d in dims):
                out[vi.name] = (tuple(dims), _DTYPE_OF_ELEM.get(tt.elem_type, "float32"))
        return out


def _frozen(arr, inputs=()) -> np.ndarray:
    """A folded result as an array no one can change (owning its memory), so
    the param made of it shares it instead of copying (see ``ir.frozen``);
    an input handed back (Identity) is copied unless frozen already, so a
    caller's array (``constants=``) is never made read-only."""
    arr = np.asarray(arr)
    if frozen(arr):
        return arr
    if not (arr.flags.owndata and arr.flags.c_contiguous) or any(arr is a for a in inputs):
        arr = np.array(arr, order="C")
    arr.flags.writeable = False
    return arr


def _check_version(op_type: str, opset: int, checked: int) -> None:
    """Refuse an op whose version at the model's opset (the ``since_version``
    of its schema) is newer than the one its converter was checked against."""
    schema = _schema(op_type, opset)
    if schema is None or schema.since_version <= checked:
        return
    known = _schema(op_type, checked)
    known = f"{op_type}-{known.since_version}" if known is not None else f"no version of {op_type}"
    raise _Unsupported(f"opset {opset} makes it {op_type}-{schema.since_version}, newer than the newest convc knows "
                       f"({known}, checked through opset {checked}); export the model at opset {checked} or lower")


def _kept_dequantize(node, args) -> bool:
    """A DequantizeLinear of constant int8/uint8 (a quantized weight) is not
    folded: it stays a ``dequantize`` of an integer param, so that fold_qdq
    finds the weight's integers and scales."""
    return node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx") and args \
        and isinstance(args[0], np.ndarray) and args[0].dtype.name in QDTYPES


def _elem_name(elem: int) -> str:
    onnx = _onnx()
    try:
        return onnx.TensorProto.DataType.Name(elem).lower()
    except ValueError:
        return str(elem)


def _show_dims(tt) -> str:
    if not tt.HasField("shape"):
        return "(unknown rank)"
    dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


@functools.lru_cache(maxsize=None)
def _schema(op_type: str, opset: int):
    """ONNX's definition of the op at ``opset`` (None if onnx has none)."""
    onnx = _onnx()
    try:
        return onnx.defs.get_schema(op_type, opset)
    except Exception:       # noqa: BLE001 -- SchemaError: an op the opset does not have
        return None


def _type_str(arg) -> str:
    """ONNX's name of a tensor's type: ``tensor(float)``."""
    onnx = _onnx()
    from onnx import helper

    dtype = np.dtype(arg.dtype) if isinstance(arg, np.ndarray) else np.dtype(_NP_OF_DTYPE[arg.dtype])
    try:
        return f"tensor({onnx.TensorProto.DataType.Name(helper.np_dtype_to_tensor_dtype(dtype)).lower()})"
    except (KeyError, ValueError, TypeError):
        return f"tensor({dtype.name})"


def _check_schema(node, args, opset: int, guessed=frozenset()) -> None:
    """What ONNX's definition of the op at ``opset`` says of the node: its
    attributes and their types, its number of inputs and outputs, and the
    types of its inputs (one type per type parameter, an allowed one) but
    those in ``guessed`` (placeholders standing in for a refused node's
    output: their type is a guess, so a mismatch is no second error)."""
    schema = _schema(node.op_type, opset)
    if schema is None:
        return
    op = f"{node.op_type}-{opset}"
    for a in node.attribute:
        declared = schema.attributes.get(a.name)
        if declared is None:
            raise _Unsupported(f"attribute {a.name!r} is not an attribute of {op}")
        if a.type != int(declared.type.value):
            raise _Unsupported(f"attribute {a.name!r} is {_attr_type_name(a.type)}; {op} takes "
                               f"{_attr_type_name(int(declared.type.value))}")
    for what, n, lo, hi in (("inputs", len(node.input), schema.min_input, schema.max_input),
                            ("outputs", len(node.output), schema.min_output, schema.max_output)):
        if not lo <= n <= hi:
            raise _Unsupported(f"it has {n} {what}; {op} takes {lo}" + (f" to {hi}" if hi != lo else ""))
    formals = list(schema.inputs)
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    bound: dict[str, tuple[str, str]] = {}
    for i, (name, arg) in enumerate(zip(node.input, args)):
        if not name or arg is None or not formals or name in guessed:
            continue
        param = formals[min(i, len(formals) - 1)].type_str
        t = _type_str(arg)
        ok = allowed.get(param, {param})
        if t not in ok:
            raise _Unsupported(f"input {name!r} is {t}; {op} takes {', '.join(sorted(ok))} there")
        if param in bound and bound[param][1] != t:
            raise _Unsupported(f"inputs {bound[param][0]!r} ({bound[param][1]}) and {name!r} ({t}) must have one "
                               f"type ({param}), as {op} defines them")
        bound.setdefault(param, (name, t))


def _attr_type_name(t: int) -> str:
    onnx = _onnx()
    try:
        return onnx.AttributeProto.AttributeType.Name(t).lower()
    except ValueError:
        return f"of unknown type {t}"


def _attr_value(a):
    from onnx import helper

    v = helper.get_attribute_value(a)
    try:
        if isinstance(v, bytes):
            return v.decode()
        if isinstance(v, list):
            return [x.decode() if isinstance(x, bytes) else x for x in v]
    except UnicodeDecodeError:
        raise _Unsupported(f"attribute {a.name!r} is not UTF-8 text") from None
    return v


def _shape_op(node, shape):
    if node.op_type == "Size":
        return np.array(prod(shape), np.int64)
    attrs = {a.name: a.i for a in node.attribute}
    rank = len(shape)
    start, end = attrs.get("start", 0), attrs.get("end", rank)
    start, end = (max(0, min(rank, v + rank if v < 0 else v)) for v in (start, end))
    return np.array(shape[start:end], np.int64)


_INT32_ATTRS = {"strides", "pads", "dilations", "group", "kernel_shape", "output_padding", "output_shape"}
"""Window attributes: ONNX stores them as int64; convc's generated code
indexes with int, so beyond int32 they can only be a mistake."""


_FLAG_ATTRS = {"keepdims", "ceil_mode", "count_include_pad", "transA", "transB", "allowzero", "noop_with_empty_axes",
               "training_mode", "spatial", "is_test", "broadcast", "exclude_outside", "antialias", "storage_order"}


def _check_int32(name: str, value) -> None:
    values = value if isinstance(value, list) else [value]
    bad = [v for v in values if not isinstance(v, int) or not -2**31 <= v < 2**31]
    if bad:
        raise _Unsupported(f"attribute {name} {value} has {bad[0]}, beyond the int32 range convc's generated code "
                           f"indexes with")


def _spatial(values, rank, default, what):
    if values is None:
        return (default,) * rank
    values = tuple(int(v) for v in values)
    if len(values) != rank:
        raise _Unsupported(f"{what} {list(values)} has {len(values)} entries for {rank} spatial axes")
    return values


def _pad_pairs(pads, rank):
    if pads is None:
        return [(0, 0)] * rank
    pads = [int(p) for p in pads]
    if len(pads) != 2 * rank:
        raise _Unsupported(f"pads {pads} must have 2 x {rank} entries")
    return list(zip(pads[:rank], pads[rank:]))


def _auto_pads(auto_pad, n, k, s, d):
    """ONNX's SAME_UPPER / SAME_LOWER: output ceil(n / s); the odd element of
    the total padding goes at the end (UPPER) or the beginning (LOWER)."""
    pairs = []
    for nn, kk, ss, dd in zip(n, k, s, d):
        need = max(0, (ceil_div(nn, ss) - 1) * ss + dd * (kk - 1) + 1 - nn)
        lo = need // 2 if auto_pad == "SAME_UPPER" else need - need // 2
        pairs.append((lo, need - lo))
    return pairs


def _window(node, at, x_shape, w_spatial=None):
    """Stride, dilation and explicit (lo, hi) pads of a Conv or pool."""
    rank = len(x_shape) - 2
    if rank < 1:
        raise _Unsupported(f"input of rank {len(x_shape)} has no spatial axes")
    if w_spatial is None and at["kernel_shape"] is None:
        raise _Unsupported("attribute kernel_shape is required")
    k = w_spatial if w_spatial is not None else _spatial(at["kernel_shape"], rank, None, "kernel_shape")
    if at.get("kernel_shape") is not None and tuple(at["kernel_shape"]) != tuple(k):
        raise _Unsupported(f"kernel_shape {list(at['kernel_shape'])} differs from the weight's {list(k)}")
    s = _spatial(at["strides"], rank, 1, "strides")
    d = _spatial(at.get("dilations"), rank, 1, "dilations")
    _positive(k=k, strides=s, dilations=d)
    auto = at["auto_pad"] or "NOTSET"
    if auto == "NOTSET":
        pads = _pad_pairs(at["pads"], rank)
    elif auto == "VALID":
        pads = [(0, 0)] * rank
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = _auto_pads(auto, x_shape[2:], k, s, d)
    else:
        raise _Unsupported(f"auto_pad {auto!r} is unknown")
    if any(lo < 0 or hi < 0 for lo, hi in pads):
        raise _Unsupported(f"negative pads {pads}")
    return tuple(k), s, d, pads


def _conv_window(node, at, x: Value, w: Value):
    """Stride, dilation and (lo, hi) pads of a Conv-like node (Conv,
    QLinearConv, ConvInteger) on input ``x`` with weight ``w``, after its
    rules: the weight has the input's rank, group is at least 1."""
    if len(w.shape) != len(x.shape):
        raise _Unsupported(f"weight {w.shape} must have the rank of the input {x.shape}")
    _positive(group=at["group"])
    _, s, d, pads = _window(node, at, x.shape, w.shape[2:])
    return s, d, pads


def _positive(**given) -> None:
    """Window sizes, strides, dilations (and group): each at least 1."""
    for what, values in given.items():
        values = values if isinstance(values, (tuple, list)) else [values]
        if any(v < 1 for v in values):
            what = "kernel_shape" if what == "k" else what
            raise _Unsupported(f"{what} {list(values) if len(values) > 1 else values[0]} must be at least 1 "
                               f"(each entry)")


_WINDOW = dict(auto_pad="NOTSET", kernel_shape=None, pads=None, strides=None)


def _onnx_attr_names(act) -> dict:
    """Our param name -> the ONNX attribute's name, for an activation record."""
    return {p: act.onnx_attrs.get(p, p) for p in act.params}


def _axis(a, rank: int, what: str = "axis", end: bool = False) -> int:
    """An ONNX axis in [-rank, rank) (or [-rank, rank] for ``end``), counted
    from 0; out of range is an error, not a wrap-around."""
    a = int(a)
    if not -rank <= a < rank + end:
        raise _Unsupported(f"{what} {a} is out of range for an input of rank {rank} "
                           f"([{-rank}, {rank + end - 1}])")
    return a + rank if a < 0 else a


def _matmul_2d(im, node, a: Value, b: Value, product):
    """numpy's 1-D operands of a matrix product: a row / column matrix, its
    axis dropped afterwards (as MatMul)."""
    a_rank, b_rank = len(a.shape), len(b.shape)
    if a_rank > 1 and b_rank > 1:
        return product(a, b, im.name(node))
    if a_rank == 1:
        a = reshape(a, (1,) + a.shape, name=im.name(node, "row"))
    if b_rank == 1:
        b = reshape(b, b.shape + (1,), name=im.name(node, "col"))
    y = product(a, b, im.name(node, "2d"))
    shape = list(y.shape)
    if b_rank == 1:
        shape.pop(-1)
    if a_rank == 1:
        shape.pop(-2 if b_rank > 1 else -1)
    return reshape(y, tuple(shape), name=im.name(node))

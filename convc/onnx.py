"""ONNX in and out: :func:`from_onnx` turns an ONNX model into a convc
:class:`Graph`, :func:`to_onnx` writes a graph of ONNX-expressible ops as an
ONNX model. Needs the optional ``onnx`` package (``pip install 'convc[onnx]'``),
imported on first use.

Import walks the ONNX nodes in their (topological) order:

* a node whose inputs are all known at compile time -- initializers,
  ``Constant`` nodes, the results of earlier such nodes, and ``Shape`` of any
  tensor, since convc shapes are static -- is evaluated with
  ``onnx.reference`` and becomes a constant; so the Shape -> Gather ->
  Concat -> Reshape chains exporters write for reshape targets fold away;
* every other node maps to convc ops (the ``@converts`` functions below);
  initializers it reads become params named after them;
* a node that cannot be mapped is recorded and the walk goes on, so the
  :class:`OnnxImportError` lists every unsupported node at once.

:func:`add_cli` registers ``convc run`` (import or load a model, compile it,
run it on ``.npy`` inputs, write the outputs) and ``convc compile`` (print the
IR and cost table, compile).

>>> g = cc.from_onnx("model.onnx", input_shapes={"x": (1, 3, 32, 32)})   # doctest: +SKIP
>>> model = cc.to_onnx(g)                                                  # doctest: +SKIP
"""
from __future__ import annotations

import functools
import math
import os
import re
import time

import numpy as np

from .errors import ConvcError
from .ir import DTYPES, Graph, Value
from .ops.conv import conv
from .ops import activations, epilogue
from .ops.activations import TABLE as ACTIVATION_TABLE
from .ops.elementwise import add, clip, div, gelu, mul, sub
from .ops.layout import downsample, pad
from .ops.linear import dense, matmul, softmax
from .ops.norm import batch_norm
from .ops.pool import avg_pool, global_avg_pool, max_pool
from .ops.quantized import dequantize, qadd, qconcat, qconv, qdense, qglobal_avg_pool, qmatmul, quantize
from .quant import QDTYPES
from .ops.resize import COORDINATE_MODES, axis_matrix, is_ratio, resize
from .ops.tensor import concat, expand, reduce_sum, reshape, slice_axis, transpose
from .ops.transpose import conv_transpose
from .onnx_validate import FoldBudget, Refusal, check_model, read_model, tensor_array
from . import onnx_validate

OnnxOpsetWarning = onnx_validate.OnnxOpsetWarning       # the warning of a model newer than convc knows
from .shapes import ceil_div, prod


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
_CONVERTERS: dict[str, tuple] = {}

# Inputs convc needs at compile time, per op type (their values decide shapes
# or attributes). A graph input feeding one can be bound with ``constants=``.
STATIC_INPUTS = {"Reshape": (1,), "Pad": (1, 2, 3), "Clip": (1, 2), "Dropout": (1, 2), "Slice": (1, 2, 3, 4),
                 "Expand": (1,), "Squeeze": (1,), "Unsqueeze": (1,), "ReduceSum": (1,), "ReduceMean": (1,),
                 "Split": (1,)}

# Never folded: their result is random.
_RANDOM = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


_DOMAINS = ("", "ai.onnx", "com.microsoft")
"""Domains with converters: ONNX's, and ONNX Runtime's contrib ops that its
quantizer writes in the QOperator format (QLinearAdd, QGemm, ...), as
``"com.microsoft.QLinearAdd"`` in ``_CONVERTERS``."""


def _key(node) -> str:
    """A node's entry in _CONVERTERS: the op type, after its domain unless ONNX's."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def converts(*op_types: str, dropped: str = "", **defaults):
    """Register a converter for ``op_types``. ``defaults``: every attribute
    the converter understands, with its ONNX default (an attribute not
    listed is unsupported).

    A converter ``fn(importer, node, inputs, attrs)`` returns the node's
    outputs in order, a Value (or a constant array) each, or None for an
    unused output it leaves out. It may return fewer than the node has
    (most compute the first only); ``dropped`` says what the others are,
    for the error when one of them is used."""
    def deco(fn):
        for t in op_types:
            _CONVERTERS[t] = (fn, dropped, defaults)
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
    way the model breaks ONNX's rules (see :mod:`convc.onnx_validate`: names,
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
        from .passes.qdq import fold_qdq as fold
        g = fold(g).verify()
    return g


class _Importer:
    def __init__(self, model, input_shapes, constants, name, opset):
        self.model = model
        self.opset = opset
        self.budget = FoldBudget(sum(t.ByteSize() for t in model.graph.initializer), opset)
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
        self.used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}

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
        if all(a is None or isinstance(a, np.ndarray) for a in args) and node.op_type not in _RANDOM \
                and not _kept_dequantize(node, args):
            return self.fold(node, args)
        if self.would_be_constant(node):        # folded, were it not for an unsupported node before it
            raise _Unsupported("an input comes from an unsupported node", consequence=True)
        entry = _CONVERTERS.get(_key(node))
        if entry is None:
            raise _Unsupported(f"op {node.op_type} is not supported" if node.domain in ("", "ai.onnx") else
                               f"op {node.op_type} of domain {node.domain!r} is not supported")
        fn, dropped, defaults = entry
        if node.domain in ("", "ai.onnx"):     # (onnx has no schemas of ONNX Runtime's contrib ops)
            _check_schema(node, args, self.opset)
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
        from onnx.reference import ReferenceEvaluator

        try:
            self.budget.check(node, args)
        except Refusal as e:
            raise _Unsupported(f"{e}") from None
        feeds = {i: a for i, a in zip(node.input, args) if i}
        try:
            outs = ReferenceEvaluator(node, opsets={"": self.opset}).run(None, feeds)
        except Exception as e:       # noqa: BLE001 -- any failure of the reference is a reason
            raise _Unsupported(f"its inputs are constants but onnx.reference cannot evaluate it: "
                               f"{type(e).__name__}: {e}") from None
        if not all(isinstance(o, (np.ndarray, np.generic)) for o in outs):
            raise _Unsupported("it yields a non-tensor value (sequence, map or optional)")
        return [np.asarray(o) for o in outs]

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


def _check_schema(node, args, opset: int) -> None:
    """What ONNX's definition of the op at ``opset`` says of the node: its
    attributes and their types, its number of inputs and outputs, and the
    types of its inputs (one type per type parameter, an allowed one)."""
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
        if not name or arg is None or not formals:
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


def _positive(**given) -> None:
    """Window sizes, strides, dilations (and group): each at least 1."""
    for what, values in given.items():
        values = values if isinstance(values, (tuple, list)) else [values]
        if any(v < 1 for v in values):
            what = "kernel_shape" if what == "k" else what
            raise _Unsupported(f"{what} {list(values) if len(values) > 1 else values[0]} must be at least 1 "
                               f"(each entry)")


_WINDOW = dict(auto_pad="NOTSET", kernel_shape=None, pads=None, strides=None)


@converts("Identity")
def _identity(im, node, ins, at):
    return [im.env[ins[0]]]


@converts("Dropout", dropped="the mask, a bool tensor", ratio=0.5, is_test=0, seed=None)
def _dropout(im, node, ins, at):
    ratio = im.scalar(ins[1], "ratio") if ins[1] else at["ratio"]
    training = bool(im.scalar(ins[2], "training_mode")) if ins[2] else (im.opset < 7 and not at["is_test"])
    if training and ratio != 0:
        raise _Unsupported(f"training-mode Dropout (ratio {ratio}) is random; export the model in eval mode")
    return [im.env[ins[0]]]


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


def _required(at: dict, name: str, *also: str):
    """An attribute the op's opset requires (older opsets give as attributes
    what newer ones take as inputs)."""
    if at[name] is None:
        raise _Unsupported(f"attribute {' or '.join((*also, name))} is required")
    return at[name]


_SPECIAL_ACTIVATIONS = ("Clip", "Gelu")
"""Their ONNX form is not one attribute per param: Clip takes its bounds as
inputs (opset 11+), Gelu picks the record by its ``approximate`` string."""


def _activation_converter(act):
    """The converter of an activation of the table: its ONNX attributes are
    its params (ONNX's defaults)."""
    names = _onnx_attr_names(act)

    def convert(im, node, ins, at):
        x = im.value(ins[0])
        return [x.graph.add(act.name, [x], {p: at[a] for p, a in names.items()}, im.name(node))]
    converts(act.onnx, **{names[p]: act.onnx_defaults.get(p, d) for p, d in act.params.items()})(convert)


for _act in ACTIVATION_TABLE.values():
    if _act.onnx and _act.onnx not in _SPECIAL_ACTIVATIONS:
        _activation_converter(_act)


@converts("Gelu", approximate="none")
def _gelu(im, node, ins, at):
    if at["approximate"] not in ("none", "tanh"):
        raise _Unsupported(f"Gelu approximate={at['approximate']!r} (known: 'none', 'tanh')")
    return [gelu(im.value(ins[0]), at["approximate"], name=im.name(node))]


@converts("Clip", min=None, max=None)
def _clip(im, node, ins, at):
    lo, hi = at["min"], at["max"]
    if im.opset >= 11:
        lo = im.scalar(ins[1], "min", exact=True) if ins[1] else None
        hi = im.scalar(ins[2], "max", exact=True) if ins[2] else None
    return [clip(im.value(ins[0]), lo, hi, name=im.name(node))]


def _legacy_broadcast(im, node, b: Value, a_rank: int, at) -> Value:
    """Opset < 7 broadcasting of B from ``axis`` of A (numpy aligns suffixes)."""
    if not at.get("broadcast") or at.get("axis") is None:
        return b
    axis = _axis(at["axis"], a_rank)
    trail = a_rank - axis - len(b.shape)
    return reshape(b, b.shape + (1,) * trail, name=im.name(node, "b")) if trail > 0 else b


def _binary(fn):
    def convert(im, node, ins, at):
        a, b = im.value(ins[0]), im.value(ins[1])
        return [fn(a, _legacy_broadcast(im, node, b, len(a.shape), at), name=im.name(node))]
    return convert


_LEGACY = dict(broadcast=0, axis=None, consumed_inputs=None)
converts("Add", **_LEGACY)(_binary(add))
converts("Sub", **_LEGACY)(_binary(sub))
converts("Mul", **_LEGACY)(_binary(mul))
converts("Div", **_LEGACY)(_binary(div))


@converts("Concat", axis=None)
def _concat(im, node, ins, at):
    values = [im.value(i) for i in ins if i]
    if at["axis"] is None:
        raise _Unsupported("attribute axis is required")
    if len(values) == 1:
        return values
    return [concat(values, at["axis"], name=im.name(node))]


@converts("Flatten", axis=1)
def _flatten(im, node, ins, at):
    shape = im.shape(ins[0])
    axis = _axis(at["axis"], len(shape), end=True)
    return [reshape(im.value(ins[0]), (prod(shape[:axis]), prod(shape[axis:])), name=im.name(node))]


@converts("Reshape", shape=None, allowzero=0)
def _reshape(im, node, ins, at):
    target = [int(s) for s in (_required(at, "shape") if im.opset < 5 else im.ints(ins[1], "shape"))]
    x = im.shape(ins[0])
    if 0 in target:
        if at["allowzero"]:
            raise _Unsupported(f"shape {target} with allowzero=1 makes an empty tensor")
        target = [x[i] if s == 0 else s for i, s in enumerate(target)]
    return [reshape(im.value(ins[0]), tuple(target), name=im.name(node))]


@converts("Squeeze", axes=None)
def _squeeze(im, node, ins, at):
    shape = im.shape(ins[0])
    axes = at["axes"] if im.opset < 13 else (im.ints(ins[1], "axes") if ins[1] else None)
    axes = {_axis(a, len(shape), "axes entry") for a in axes} if axes is not None else {i for i, n in enumerate(shape) if n == 1}
    return [reshape(im.value(ins[0]), tuple(n for i, n in enumerate(shape) if i not in axes), name=im.name(node))]


@converts("Unsqueeze", axes=None)
def _unsqueeze(im, node, ins, at):
    shape = list(im.shape(ins[0]))
    axes = _required(at, "axes") if im.opset < 13 else im.ints(ins[1], "axes")
    rank = len(shape) + len(axes)
    for a in sorted(_axis(a, rank, "axes entry") for a in axes):
        shape.insert(a, 1)
    return [reshape(im.value(ins[0]), tuple(shape), name=im.name(node))]


@converts("Slice", starts=None, ends=None, axes=None)
def _slice(im, node, ins, at):
    x = im.value(ins[0])
    rank = len(x.shape)
    if im.opset < 10:
        starts, ends, axes, steps = _required(at, "starts"), _required(at, "ends"), at["axes"], None
    else:
        starts, ends = (im.ints(i, w) for i, w in ((ins[1], "starts"), (ins[2], "ends")))
        axes = im.ints(ins[3], "axes") if ins[3] else None
        steps = im.ints(ins[4], "steps") if ins[4] else None
    axes = range(len(starts)) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for k, (a, st, en, sp) in enumerate(zip(axes, starts, ends, steps)):
        a = _axis(a, rank, "axes entry")
        n, st, en, sp = x.shape[a], int(st), int(en), int(sp)
        if sp != 1 and not (sp > 1 and a >= 2 and 3 <= rank <= 5):
            raise _Unsupported(f"step {sp} on axis {a} (only 1, or a positive step on a spatial axis)")
        st, en = (min(max(v + n if v < 0 else v, 0), n) for v in (st, en))
        if en <= st:
            raise _Unsupported(f"the slice {st}:{en} of axis {a} is empty")
        if (st, en) != (0, n):
            x = slice_axis(x, a, st, en, name=im.name(node, f"axis{a}"))
        if sp > 1:
            x = downsample(x, tuple(sp if i == a else 1 for i in range(2, rank)), name=im.name(node, f"step{a}"))
    return [reshape(x, x.shape, name=im.name(node))]


@converts("Split", axis=0, split=None, num_outputs=None)
def _split(im, node, ins, at):
    """One slice per output. The sizes are the ``split`` attribute (opsets 2
    and 11) or input (1, 13 and later); without them, equal parts -- since
    opset 18 ``num_outputs`` parts of ceil(n / num_outputs), the last smaller."""
    x = im.value(ins[0])
    rank, k = len(x.shape), len(node.output)
    if not -rank <= at["axis"] < rank:
        raise _Unsupported(f"axis {at['axis']} is not an axis of the input {x.shape}")
    axis = at["axis"] % rank
    n = x.shape[axis]
    sizes = im.ints(ins[1], "split").tolist() if ins[1] else at["split"]
    if at["num_outputs"] is not None:
        if sizes is not None:
            raise _Unsupported("both split and num_outputs are given; ONNX allows one of them")
        if at["num_outputs"] != k:
            raise _Unsupported(f"num_outputs {at['num_outputs']} differs from the node's {k} outputs")
    if sizes is None:
        if n % k and at["num_outputs"] is None:
            raise _Unsupported(f"axis {axis} of size {n} does not split into {k} equal parts (a smaller last "
                               "part needs opset 18's num_outputs)")
        chunk = ceil_div(n, k)
        sizes = [chunk] * (k - 1) + [n - chunk * (k - 1)]
    sizes = [int(s) for s in sizes]
    if len(sizes) != k or min(sizes) < 0 or sum(sizes) != n:
        raise _Unsupported(f"split {sizes} must be {k} sizes (one per output, none negative) adding up to "
                           f"{n}, the size of axis {axis} of {x.shape}")
    outs, start = [], 0
    for i, (o, size) in enumerate(zip(node.output, sizes)):
        if not (o and o in im.used):
            outs.append(None)
        elif size == 0:
            raise _Unsupported(f"its output {o!r} is empty (split size 0); convc tensors are never empty")
        else:
            outs.append(x if size == n else slice_axis(x, axis, start, start + size, name=im.name(node, str(i))))
        start += size
    return outs


@converts("Expand")
def _expand(im, node, ins, at):
    x = im.value(ins[0])
    target = tuple(int(v) for v in im.ints(ins[1], "shape"))
    try:
        shape = tuple(np.broadcast_shapes(x.shape, target))
    except ValueError:
        raise _Unsupported(f"shape {list(target)} does not broadcast with the input's {x.shape}") from None
    return [expand(x, shape, name=im.name(node)) if shape != x.shape else x]


@converts("ReduceSum", keepdims=1, axes=None, noop_with_empty_axes=0)
def _reduce_sum(im, node, ins, at):
    x = im.value(ins[0])
    axes = at["axes"] if im.opset < 13 else (im.ints(ins[1], "axes").tolist() if ins[1] else None)
    if not axes and at["noop_with_empty_axes"]:
        return [x]
    return [reduce_sum(x, None if not axes else tuple(int(a) for a in axes), bool(at["keepdims"]),
                       name=im.name(node))]


@converts("ReduceMean", keepdims=1, axes=None, noop_with_empty_axes=0)
def _reduce_mean(im, node, ins, at):
    x = im.value(ins[0])
    rank = len(x.shape)
    axes = at["axes"] if im.opset < 18 else (im.ints(ins[1], "axes").tolist() if ins[1] else None)
    if not axes and at["noop_with_empty_axes"]:
        return [x]
    axes = sorted({_axis(a, rank, "axes entry") for a in axes} if axes else range(rank))
    if axes == list(range(2, rank)) and 3 <= rank <= 5:       # x.mean((2, 3)): a global average pool
        y = global_avg_pool(x, name=im.name(node) if at["keepdims"] else im.name(node, "pool"))
        return [y if at["keepdims"] else reshape(y, x.shape[:2], name=im.name(node))]
    total = reduce_sum(x, tuple(axes), bool(at["keepdims"]), name=im.name(node, "sum"))
    return [mul(total, 1.0 / prod(x.shape[a] for a in axes), name=im.name(node))]


@converts("Transpose", perm=None)
def _transpose(im, node, ins, at):
    return [transpose(im.value(ins[0]), at["perm"], name=im.name(node))]


@converts("Gemm", alpha=1.0, beta=1.0, transA=0, transB=0, broadcast=0)
def _gemm(im, node, ins, at):
    a, b = im.value(ins[0]), im.value(ins[1])
    if at["transA"]:
        a = transpose(a, (1, 0), name=im.name(node, "a_t"))
    c = None
    if ins[2] and at["beta"] != 0:
        if at["beta"] == 1:
            c = im.value(ins[2])
        elif isinstance(im.env[ins[2]], np.ndarray):
            c = a.graph.const(im.env[ins[2]] * at["beta"], a.dtype)
        else:
            c = mul(im.value(ins[2]), at["beta"], name=im.name(node, "beta"))
    n_out = b.shape[0] if at["transB"] else b.shape[1]
    bias = c if c is not None and at["alpha"] == 1 and at["transB"] and c.shape == (n_out,) else None
    last = bias is not None or (c is None and at["alpha"] == 1)
    name = im.name(node) if last else im.name(node, "ab")
    y = dense(a, b, bias, name=name) if at["transB"] else matmul(a, b, name=name)
    if at["alpha"] != 1:
        y = mul(y, at["alpha"], name=im.name(node) if c is None else im.name(node, "alpha"))
    if c is not None and bias is None:
        y = add(y, c, name=im.name(node))
    return [y]


@converts("MatMul")
def _matmul(im, node, ins, at):
    return [_matmul_2d(im, node, im.value(ins[0]), im.value(ins[1]), lambda a, b, name: matmul(a, b, name=name))]


@converts("BatchNormalization", dropped="running statistics of training mode", epsilon=1e-5, momentum=0.9,
          training_mode=0, spatial=1, is_test=0, consumed_inputs=None)
def _batch_norm(im, node, ins, at):
    if at["training_mode"] or (im.opset < 7 and not at["is_test"] and len(node.output) > 1):
        raise _Unsupported("training_mode=1 (batch statistics) is not supported; export the model in eval mode")
    if not at["spatial"]:
        raise _Unsupported("spatial=0 (per-element statistics) is not supported")
    x = im.value(ins[0])
    scale, bias, mean, var = (im.value(i) for i in ins[1:5])
    return [batch_norm(x, mean, var, scale, bias, at["epsilon"], name=im.name(node))]


@converts("Softmax", axis=None)
def _softmax(im, node, ins, at):
    x = im.value(ins[0])
    rank = len(x.shape)
    if im.opset >= 13:
        return [softmax(x, -1 if at["axis"] is None else at["axis"], name=im.name(node))]
    axis = _axis(1 if at["axis"] is None else at["axis"], max(rank, 1))
    if axis == rank - 1:             # coercing to 2D changes nothing then
        return [softmax(x, -1, name=im.name(node))]
    flat = reshape(x, (prod(x.shape[:axis]), prod(x.shape[axis:])), name=im.name(node, "2d"))
    return [reshape(softmax(flat, 1, name=im.name(node, "softmax")), x.shape, name=im.name(node))]


@converts("Pad", mode="constant", pads=None, paddings=None, value=0.0)
def _pad(im, node, ins, at):
    if at["mode"] != "constant":
        raise _Unsupported(f"mode {at['mode']!r} is not supported (only 'constant')")
    x = im.value(ins[0])
    rank = len(x.shape)
    if im.opset < 11:
        pads = at["pads"] if at["pads"] is not None else _required(at, "paddings", "pads")
        value, axes = at["value"], None
    else:
        pads = im.ints(ins[1], "pads")
        value = im.scalar(ins[2], "constant_value") if ins[2] else 0.0
        axes = im.ints(ins[3], "axes") if ins[3] else None
    if x.dtype == "int64" and not float(value).is_integer():
        raise _Unsupported(f"constant_value {value} is not an integer, and the input is int64 (ONNX: one type T)")
    axes = list(range(rank)) if axes is None else [_axis(a, rank, "axes entry") for a in axes]
    pads = [int(p) for p in pads]
    if len(pads) != 2 * len(axes):
        raise _Unsupported(f"pads {pads} must have 2 x {len(axes)} entries")
    pairs = {a: (lo, hi) for a, lo, hi in zip(axes, pads[:len(axes)], pads[len(axes):]) if lo or hi}
    spatial = [pairs.pop(a, (0, 0)) for a in range(2, rank)] if 3 <= rank <= 5 else []
    for a, (lo, hi) in sorted(pairs.items()):      # batch / channel axes (or any axis of other ranks)
        x = _pad_axis(im, node, x, a, lo, hi, value)
    if any(lo or hi for lo, hi in spatial):
        x = pad(x, spatial, value, name=im.name(node))
    return [x]


def _pad_axis(im, node, x: Value, axis: int, lo: int, hi: int, value: float) -> Value:
    """Pad (or crop, for negative entries) one axis with concat / slice."""
    n = x.shape[axis]
    if lo < 0 or hi < 0:
        x = slice_axis(x, axis, max(-lo, 0), n - max(-hi, 0), name=im.name(node, f"crop{axis}"))
    parts = []
    for k in (lo, hi):
        shape = list(x.shape)
        shape[axis] = k
        if k > 0:
            im.allocate(shape, f"the padding of axis {axis}")
        parts.append(x.graph.const(np.full(shape, value), x.dtype) if k > 0 else None)
    if parts[0] is None and parts[1] is None:
        return x
    return concat([p for p in (parts[0], x, parts[1]) if p is not None], axis, name=im.name(node, f"pad{axis}"))


@converts("Conv", dilations=None, group=1, **_WINDOW)
def _conv(im, node, ins, at):
    x, w = im.value(ins[0]), im.value(ins[1])
    if len(w.shape) != len(x.shape):
        raise _Unsupported(f"weight {w.shape} must have the rank of the input {x.shape}")
    _positive(group=at["group"])
    _, s, d, pads = _window(node, at, x.shape, w.shape[2:])
    b = im.value(ins[2]) if ins[2] else None
    return [conv(x, w, b, stride=s, padding=pads, dilation=d, groups=at["group"], name=im.name(node))]


@converts("ConvTranspose", dilations=None, group=1, output_padding=None, output_shape=None, **_WINDOW)
def _conv_transpose(im, node, ins, at):
    x, w = im.value(ins[0]), im.value(ins[1])
    b = im.value(ins[2]) if ins[2] else None
    rank = len(x.shape) - 2
    if rank < 1 or len(w.shape) != len(x.shape):
        raise _Unsupported(f"input {x.shape} and weight {w.shape} must be (N, C, *spatial) and (C, M/group, *k)")
    n, k = x.shape[2:], w.shape[2:]
    if at["kernel_shape"] is not None and tuple(at["kernel_shape"]) != tuple(k):
        raise _Unsupported(f"kernel_shape {list(at['kernel_shape'])} differs from the weight's {list(k)}")
    s = _spatial(at["strides"], rank, 1, "strides")
    d = _spatial(at["dilations"], rank, 1, "dilations")
    _positive(strides=s, dilations=d, group=at["group"])
    opad = _spatial(at["output_padding"], rank, 0, "output_padding")
    full = [(nn - 1) * ss + dd * (kk - 1) + 1 + op for nn, ss, dd, kk, op in zip(n, s, d, k, opad)]
    want = None if at["output_shape"] is None else [int(v) for v in at["output_shape"]][-rank:]
    auto = at["auto_pad"] or "NOTSET"
    # As onnx.reference: output position j is position j + lo of the full
    # (unpadded) transposed conv, which is zero past its end.
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        want = want or [nn * ss for nn, ss in zip(n, s)]
        total = [f - o for f, o in zip(full, want)]
        lows = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]
    elif auto in ("NOTSET", "VALID"):
        pairs = _pad_pairs(at["pads"] if auto == "NOTSET" else None, rank)
        lows = [lo for lo, _ in pairs]
        want = want or [f - lo - hi for f, (lo, hi) in zip(full, pairs)]
    else:
        raise _Unsupported(f"auto_pad {auto!r} is unknown")
    base = [f - op for f, op in zip(full, opad)]           # without output_padding
    lo_c = [max(lo, 0) for lo in lows]
    hi_c = [max(0, f - lo - o) for f, lo, o in zip(base, lo_c, want)]
    op_c = [o - (f - lo - hi) for f, lo, hi, o in zip(base, lo_c, hi_c, want)]
    geo = dict(stride=s, dilation=d, groups=at["group"])
    if all(lo >= 0 for lo in lows) and all(0 <= op < max(ss, dd) for op, ss, dd in zip(op_c, s, d)):
        return [conv_transpose(x, w, b, padding=list(zip(lo_c, hi_c)), output_padding=op_c, name=im.name(node),
                               **geo)]
    # Outputs before the full result or past what output_padding reaches: pad with zeros, then add the bias.
    y = conv_transpose(x, w, None, padding=list(zip(lo_c, hi_c)), name=im.name(node, "core"), **geo)
    extra = [(max(-lo, 0), o - yy - max(-lo, 0)) for lo, o, yy in zip(lows, want, y.shape[2:])]
    y = pad(y, extra, name=im.name(node, "pad") if b is not None else im.name(node))
    if b is not None:
        y = add(y, reshape(b, b.shape + (1,) * rank, name=im.name(node, "bias")), name=im.name(node))
    return [y]


def _pool_geometry(node, at, x_shape):
    """kernel, stride, dilation, (lo, hi) pads and output sizes as ONNX defines them."""
    k, s, d, pads = _window(node, at, x_shape)
    for kk, dd, (lo, hi) in zip(k, d, pads):
        if max(lo, hi) >= dd * (kk - 1) + 1:
            raise _Unsupported(f"pads {[lo for lo, _ in pads] + [hi for _, hi in pads]} reach a whole window "
                               f"({kk} wide, dilation {dd}) past the input: a window of padding only has no value "
                               f"(ONNX Runtime and PyTorch refuse such pads too)")
    ceil_mode = bool(at["ceil_mode"]) and (at["auto_pad"] or "NOTSET") == "NOTSET"
    out = []
    for nn, kk, ss, dd, (lo, hi) in zip(x_shape[2:], k, s, d, pads):
        span = nn + lo + hi - dd * (kk - 1) - 1
        if span < 0:
            raise _Unsupported(f"the window {kk} (dilation {dd}) is larger than the padded input {nn + lo + hi}")
        o = (-(-span // ss) if ceil_mode else span // ss) + 1
        if ceil_mode and (o - 1) * ss >= nn + lo:        # the last window must start inside
            o -= 1
        out.append(o)
    return k, s, d, pads, ceil_mode, out


@converts("MaxPool", dropped="the argmax indices", ceil_mode=0, dilations=None, storage_order=0, **_WINDOW)
def _max_pool(im, node, ins, at):
    x = im.value(ins[0])
    k, s, d, pads, ceil_mode, out = _pool_geometry(node, at, x.shape)
    if all(max(p) <= kk // 2 for p, kk in zip(pads, k)):
        y = max_pool(x, k, s, pads, d, ceil_mode, name=im.name(node))
    else:       # more padding than PyTorch's rule allows: pad with -inf explicitly
        need = [(o - 1) * ss + dd * (kk - 1) + 1 for o, ss, dd, kk in zip(out, s, d, k)]
        lowest = -np.inf if x.dtype in ("float32", "float64") else int(np.iinfo(x.dtype).min)
        xp = pad(x, [(lo, t - n - lo) for (lo, _), t, n in zip(pads, need, x.shape[2:])], lowest,
                 name=im.name(node, "pad"))
        y = max_pool(xp, k, s, 0, d, False, name=im.name(node))
    if list(y.shape[2:]) != out:
        raise _Unsupported(f"convc's output {y.shape[2:]} differs from ONNX's {out}")
    return [y]


@converts("AveragePool", ceil_mode=0, count_include_pad=0, dilations=None, **_WINDOW)
def _avg_pool(im, node, ins, at):
    x = im.value(ins[0])
    k, s, d, pads, ceil_mode, out = _pool_geometry(node, at, x.shape)
    include = bool(at["count_include_pad"])
    if all(dd == 1 for dd in d) and all(max(p) <= kk // 2 for p, kk in zip(pads, k)):
        y = avg_pool(x, k, s, pads, ceil_mode, include, name=im.name(node))
    else:
        # The window sums as a depthwise conv with a kernel of ones, divided by
        # how many elements each window counts (a constant of the geometry).
        c, n = x.shape[1], x.shape[2:]
        need = [(o - 1) * ss + dd * (kk - 1) + 1 for o, ss, dd, kk in zip(out, s, d, k)]
        im.allocate((c, 1) + k, "the window of ones")
        im.allocate(out, "the count of each window")
        im.allocate([sum(o * kk for o, kk in zip(out, k))], "the count of each window (steps)")
        ones = x.graph.const(np.ones((c, 1) + k), x.dtype)
        total = conv(x, ones, None, s, [(lo, max(0, t - nn - lo)) for (lo, _), t, nn in zip(pads, need, n)], d,
                     groups=c, name=im.name(node, "sum"))
        counts = [np.array([sum(1 for t in range(kk) if (-lo if include else 0) <= j * ss + t * dd - lo <
                                (nn + hi if include else nn)) for j in range(o)], np.float64)
                  for nn, kk, ss, dd, (lo, hi), o in zip(n, k, s, d, pads, out)]
        count = counts[0]
        for cnt in counts[1:]:
            count = np.multiply.outer(count, cnt)
        y = div(total, x.graph.const(count.reshape((1, 1) + count.shape), x.dtype), name=im.name(node))
    if list(y.shape[2:]) != out:
        raise _Unsupported(f"convc's output {y.shape[2:]} differs from ONNX's {out}")
    return [y]


@converts("GlobalAveragePool")
def _global_avg_pool(im, node, ins, at):
    return [global_avg_pool(im.value(ins[0]), name=im.name(node))]


# -- quantized ops (issue 15) -----------------------------------------------------------
# Scales and zero points are compile-time constants in convc (they decide the
# fixed-point multipliers, computed in Python); a constant DequantizeLinear
# (an int8 weight, an int32 bias) is folded like any constant node, so a QDQ
# model reaches convc as quantize -> dequantize -> float op -> quantize, which
# passes/qdq.py's fold_qdq turns into integer ops.
STATIC_INPUTS.update(QuantizeLinear=(1, 2), DequantizeLinear=(1, 2), QLinearConv=(1, 2, 4, 5, 6, 7),
                     QLinearMatMul=(1, 2, 4, 5, 6, 7), MatMulInteger=(2, 3), ConvInteger=(2, 3))


def _qparams(im, scale: str, zero_point: str, what: str, per_axis_ok: bool = True, half_ok: bool = False):
    """(scales, zero points, dtype of the zero point or None) of a quantized
    tensor, from constant inputs; one entry each per tensor, or one per index
    of an axis (1-D). Scales are float32; ``half_ok`` (the QLinear ops, whose
    output is integer) also takes float16 ones, each exactly a float32 value
    (the fixed-point multipliers are computed from the values)."""
    s = im.const(scale, f"{what}'s scale") if scale else None
    kinds = (np.float32, np.float16) if half_ok else (np.float32,)
    if s is not None and (s.dtype not in kinds or s.ndim > 1):
        raise _Unsupported(f"{what}'s scale (input {scale!r}) must be a "
                           f"{' or '.join(np.dtype(k).name for k in kinds)} scalar or 1-D tensor, got {s.dtype} of "
                           f"shape {s.shape}")
    z = im.const(zero_point, f"{what}'s zero point") if zero_point else None
    if z is not None and (z.dtype.name not in QDTYPES or z.ndim > 1):
        raise _Unsupported(f"{what}'s zero point (input {zero_point!r}) must be an int8 or uint8 scalar or 1-D "
                           f"tensor, got {z.dtype} of shape {z.shape}")
    if not per_axis_ok and any(v is not None and v.size > 1 for v in (s, z)):
        raise _Unsupported(f"{what} must be quantized per tensor (one scale and zero point); convc quantizes "
                           "activations per tensor")
    scales = None if s is None else tuple(float(v) for v in s.reshape(-1))
    zps = (0,) if z is None else tuple(int(v) for v in z.reshape(-1))
    return scales, zps, None if z is None else z.dtype.name


def _q_axis(at, rank: int, *sizes: int):
    """The axis of per-axis quantization (None for per tensor)."""
    return _axis(at["axis"], rank) if max(sizes) > 1 else None


def _no_blocks(at):
    if at.get("block_size"):
        raise _Unsupported(f"block_size={at['block_size']} (blocked quantization) is not supported; convc "
                           "quantizes per tensor or per axis")


@converts("QuantizeLinear", axis=1, saturate=1, block_size=0, output_dtype=0, precision=0)
def _quantize_linear(im, node, ins, at):
    _no_blocks(at)
    x = im.value(ins[0])
    if x.dtype not in ("float32", "float64"):
        raise _Unsupported(f"input {ins[0]!r} is {x.dtype}; convc quantizes float32 and float64 tensors")
    if at["precision"]:
        raise _Unsupported(f"precision={at['precision']} is not supported (convc divides in the input's type)")
    scales, zps, zdt = _qparams(im, ins[1], ins[2], "the output")
    dtype = zdt or (_DTYPE_OF_ELEM.get(at["output_dtype"]) if at["output_dtype"] else "uint8")
    if dtype not in QDTYPES:
        raise _Unsupported(f"output type {dtype or _elem_name(at['output_dtype'])} is not supported; convc "
                           f"quantizes to {' and '.join(QDTYPES)}")
    axis = _q_axis(at, len(x.shape), len(scales), len(zps))
    return [quantize(x, scales, zps, dtype, axis, name=im.name(node))]


@converts("DequantizeLinear", axis=1, block_size=0, output_dtype=0)
def _dequantize_linear(im, node, ins, at):
    _no_blocks(at)
    x = im.value(ins[0])
    if x.dtype not in QDTYPES:
        raise _Unsupported(f"input {ins[0]!r} is {x.dtype}; convc dequantizes int8 and uint8 tensors at run time "
                           "(a constant of another type is folded at import)")
    if at["output_dtype"] not in (0, 1):
        raise _Unsupported(f"output_dtype {_elem_name(at['output_dtype'])} is not supported (float32 only)")
    scales, zps, _ = _qparams(im, ins[1], ins[2], "the input")
    axis = _q_axis(at, len(x.shape), len(scales), len(zps))
    return [dequantize(x, scales, zps, axis, name=im.name(node))]


@converts("QLinearConv", dilations=None, group=1, **_WINDOW)
def _qlinear_conv(im, node, ins, at):
    x, w = im.value(ins[0]), im.value(ins[3])
    if len(w.shape) != len(x.shape):
        raise _Unsupported(f"weight {w.shape} must have the rank of the input {x.shape}")
    _positive(group=at["group"])
    _, s, d, pads = _window(node, at, x.shape, w.shape[2:])
    xs, xz, _ = _qparams(im, ins[1], ins[2], "input x", per_axis_ok=False, half_ok=True)
    ws, wz, _ = _qparams(im, ins[4], ins[5], "weight w", half_ok=True)
    ys, yz, ydt = _qparams(im, ins[6], ins[7], "output y", per_axis_ok=False, half_ok=True)
    b = im.value(ins[8]) if len(node.input) > 8 and node.input[8] else None
    return [qconv(x, w, b, x_scale=xs, x_zero_point=xz, w_scale=ws, w_zero_point=wz, y_scale=ys, y_zero_point=yz,
                  dtype=ydt or "uint8", stride=s, padding=pads, dilation=d, groups=at["group"], name=im.name(node))]


@converts("ConvInteger", dilations=None, group=1, **_WINDOW)
def _conv_integer(im, node, ins, at):
    """qconv's raw int32 output (no requantization): the sums of (x - x_zp)
    * (w - w_zp), zero-padded (the scales are placeholders: 1)."""
    x, w = im.value(ins[0]), im.value(ins[1])
    if len(w.shape) != len(x.shape):
        raise _Unsupported(f"weight {w.shape} must have the rank of the input {x.shape}")
    _positive(group=at["group"])
    _, s, d, pads = _window(node, at, x.shape, w.shape[2:])
    _, xz, _ = _qparams(im, "", ins[2], "input x", per_axis_ok=False)
    _, wz, _ = _qparams(im, "", ins[3], "weight w")
    return [qconv(x, w, None, x_scale=1.0, x_zero_point=xz, w_scale=1.0, w_zero_point=wz, y_scale=None,
                  dtype="int32", stride=s, padding=pads, dilation=d, groups=at["group"], name=im.name(node))]


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


@converts("QLinearMatMul")
def _qlinear_matmul(im, node, ins, at):
    a, b = im.value(ins[0]), im.value(ins[3])
    as_, az, _ = _qparams(im, ins[1], ins[2], "input a", per_axis_ok=False, half_ok=True)
    bs, bz, _ = _qparams(im, ins[4], ins[5], "input b", half_ok=True)
    ys, yz, ydt = _qparams(im, ins[6], ins[7], "output y", per_axis_ok=False, half_ok=True)
    return [_matmul_2d(im, node, a, b, lambda p, q, name: qmatmul(
        p, q, a_scale=as_, a_zero_point=az, b_scale=bs, b_zero_point=bz, y_scale=ys, y_zero_point=yz,
        dtype=ydt or "uint8", name=name))]


@converts("MatMulInteger")
def _matmul_integer(im, node, ins, at):
    a, b = im.value(ins[0]), im.value(ins[1])
    _, az, _ = _qparams(im, "", ins[2], "input a", per_axis_ok=False)
    _, bz, _ = _qparams(im, "", ins[3], "input b")
    return [_matmul_2d(im, node, a, b, lambda p, q, name: qmatmul(
        p, q, a_zero_point=az, b_zero_point=bz, dtype="int32", name=name))]


# ONNX Runtime's QOperator format: its contrib ops (domain com.microsoft), as
# its quantizer writes them.
@converts("com.microsoft.QLinearAdd")
def _qlinear_add(im, node, ins, at):
    a, b = im.value(ins[0]), im.value(ins[3])
    as_, az, _ = _qparams(im, ins[1], ins[2], "input A", per_axis_ok=False, half_ok=True)
    bs, bz, _ = _qparams(im, ins[4], ins[5], "input B", per_axis_ok=False, half_ok=True)
    ys, yz, ydt = _qparams(im, ins[6], ins[7] if len(node.input) > 7 else "", "output C", per_axis_ok=False,
                           half_ok=True)
    return [qadd(a, b, a_scale=as_, a_zero_point=az, b_scale=bs, b_zero_point=bz, y_scale=ys, y_zero_point=yz,
                 dtype=ydt or a.dtype, name=im.name(node))]


@converts("com.microsoft.QGemm", alpha=1.0, transA=0, transB=0)
def _qgemm(im, node, ins, at):
    a, b = im.value(ins[0]), im.value(ins[3])
    if at["transA"] or at["alpha"] != 1.0:
        raise _Unsupported(f"transA={at['transA']}, alpha={at['alpha']} (convc maps transA=0, alpha=1)")
    if len(node.input) < 8 or not node.input[7]:
        raise _Unsupported("QGemm without y_scale (a float output) is not supported")
    as_, az, _ = _qparams(im, ins[1], ins[2], "input A", per_axis_ok=False, half_ok=True)
    bs, bz, _ = _qparams(im, ins[4], ins[5], "input B", half_ok=True)
    ys, yz, ydt = _qparams(im, ins[7], ins[8] if len(node.input) > 8 else "", "output Y", per_axis_ok=False,
                           half_ok=True)
    bias = im.value(ins[6]) if ins[6] else None
    if bias is not None and (bias.dtype != "int32" or len(bias.shape) != 1):
        raise _Unsupported(f"C {bias.dtype}{list(bias.shape)} must be an int32 vector (one per output column)")
    w = b if at["transB"] else transpose(b, (1, 0), name=im.name(node, "b_t"))
    return [qdense(a, w, bias, x_scale=as_, x_zero_point=az, w_scale=bs, w_zero_point=bz, y_scale=ys,
                   y_zero_point=yz, dtype=ydt or a.dtype, name=im.name(node))]


@converts("com.microsoft.QLinearConcat", axis=None)
def _qlinear_concat(im, node, ins, at):
    ys, yz, ydt = _qparams(im, node.input[0], node.input[1], "output Y", per_axis_ok=False, half_ok=True)
    rest = list(node.input[2:])
    if at["axis"] is None or len(rest) % 3:
        raise _Unsupported("QLinearConcat needs axis and (tensor, scale, zero point) triples")
    xs, scales, zps = [], [], []
    for i in range(0, len(rest), 3):
        s, z, _ = _qparams(im, rest[i + 1], rest[i + 2], f"input {i // 3}", per_axis_ok=False, half_ok=True)
        xs.append(im.value(rest[i]))
        scales.append(s[0])
        zps.append(z[0])
    return [qconcat(xs, at["axis"], x_scales=scales, x_zero_points=zps, y_scale=ys[0], y_zero_point=yz[0],
                    dtype=ydt or xs[0].dtype, name=im.name(node))]


@converts("com.microsoft.QLinearGlobalAveragePool", channels_last=0)
def _qlinear_global_avg_pool(im, node, ins, at):
    if at["channels_last"]:
        raise _Unsupported("channels_last=1 is not supported (convc pools NCHW)")
    x = im.value(ins[0])
    xs, xz, _ = _qparams(im, ins[1], ins[2], "input X", per_axis_ok=False, half_ok=True)
    ys, yz, ydt = _qparams(im, ins[3], ins[4], "output Y", per_axis_ok=False, half_ok=True)
    return [qglobal_avg_pool(x, x_scale=xs, x_zero_point=xz, y_scale=ys, y_zero_point=yz, dtype=ydt or x.dtype,
                             name=im.name(node))]


# -- Resize, Upsample ----------------------------------------------------------------
STATIC_INPUTS.update(Resize=(1, 2, 3), Upsample=(1,))


def _resize_mode(mode: str) -> str:
    if mode in ("nearest", "linear"):
        return mode
    if mode == "bilinear":                  # Upsample-7's spelling in older exporters
        return "linear"
    if mode == "cubic":
        raise _Unsupported("mode 'cubic' is not supported (convc resizes with 'nearest' and 'linear')")
    raise _Unsupported(f"mode {mode!r} is unknown (ONNX's modes: nearest, linear, cubic)")


def _resize_spatial(x: Value, scales, sizes):
    """Keyword arguments of ``resize`` for ONNX's per-axis scales or sizes
    (every axis of x): the batch and channel axes must stay as they are."""
    rank = len(x.shape)
    if not 3 <= rank <= 5:
        raise _Unsupported(f"input {x.shape} must be (N, C, *spatial) with 1 to 3 spatial axes")
    given = scales if scales is not None else sizes
    if len(given) != rank:
        raise _Unsupported(f"{'scales' if scales is not None else 'sizes'} {given.tolist()} has "
                           f"{len(given)} entries for an input of rank {rank}")
    if scales is not None:
        if scales[0] != 1 or scales[1] != 1:
            raise _Unsupported(f"scales {scales.tolist()} resize the batch or channel axis; convc resizes "
                               "the spatial axes only")
        return dict(scale_factor=tuple(float(s) for s in scales[2:]))
    if tuple(int(s) for s in sizes[:2]) != x.shape[:2]:
        raise _Unsupported(f"sizes {sizes.tolist()} resize the batch or channel axis of {x.shape}; convc "
                           "resizes the spatial axes only")
    return dict(size=tuple(int(s) for s in sizes[2:]))


def _resize_legacy(im, node, x: Value, scales, mode: str) -> Value:
    """Upsample and Resize-10: asymmetric coordinates; nearest rounds as ONNX
    Runtime does, down along an axis that grows and up along one that shrinks
    (two resizes when the axes disagree: nearest is separable)."""
    mode = _resize_mode(mode)
    kw = _resize_spatial(x, np.asarray(scales, np.float32).reshape(-1), None)
    factors = kw["scale_factor"]
    if mode == "linear":
        return resize(x, scale_factor=factors, mode="linear", coordinate_transformation_mode="asymmetric",
                      name=im.name(node))
    groups = [("ceil", [f if f < 1 else 1.0 for f in factors]), ("floor", [f if f >= 1 else 1.0 for f in factors])]
    groups = [(rounding, f) for rounding, f in groups if any(v != 1 for v in f)] or [("floor", list(factors))]
    for k, (rounding, f) in enumerate(groups):
        x = resize(x, scale_factor=tuple(f), mode="nearest", coordinate_transformation_mode="asymmetric",
                   nearest_mode=rounding, name=im.name(node) if k == len(groups) - 1 else im.name(node, "down"))
    return x


@converts("Resize", mode="nearest", coordinate_transformation_mode="half_pixel", nearest_mode="round_prefer_floor",
          cubic_coeff_a=-0.75, exclude_outside=0, extrapolation_value=0.0, antialias=0, axes=None,
          keep_aspect_ratio_policy="stretch")
def _resize(im, node, ins, at):
    x = im.value(ins[0])
    if im.opset < 11:                   # Resize-10: (X, scales) and the mode only
        return [_resize_legacy(im, node, x, im.floats(ins[1], "scales"), at["mode"])]
    mode = _resize_mode(at["mode"])
    ctm = at["coordinate_transformation_mode"]
    if ctm == "tf_crop_and_resize":
        raise _Unsupported("coordinate_transformation_mode 'tf_crop_and_resize' (a crop given by roi) is not "
                           "supported")
    if ctm not in COORDINATE_MODES:
        raise _Unsupported(f"coordinate_transformation_mode {ctm!r} is not supported (only "
                           f"{', '.join(COORDINATE_MODES)})")
    if at["antialias"]:
        raise _Unsupported(f"antialias={at['antialias']} is not supported (only 0)")
    if at["exclude_outside"] and mode != "linear":
        # (linear reads at most one element past an edge, where excluding it
        # and renormalising gives the edge element, as clamping does)
        raise _Unsupported(f"exclude_outside={at['exclude_outside']} is supported with mode 'linear' only")
    scales = im.floats(ins[2], "scales") if ins[2] else None
    scales = scales if scales is not None and scales.size else None
    sizes = im.ints(ins[3], "sizes") if ins[3] else None
    if (scales is None) == (sizes is None):
        raise _Unsupported("exactly one of scales and sizes must be given")
    if sizes is not None and at["keep_aspect_ratio_policy"] != "stretch":
        raise _Unsupported(f"keep_aspect_ratio_policy {at['keep_aspect_ratio_policy']!r} is not supported "
                           "(only 'stretch')")
    if at["axes"] is not None:          # opset 18: scales / sizes of the listed axes only
        rank = len(x.shape)
        axes = [_axis(a, rank, "axes entry") for a in at["axes"]]
        given = scales if scales is not None else sizes
        if len(set(axes)) != len(axes) or len(axes) != len(given):
            raise _Unsupported(f"axes {list(at['axes'])} must be distinct, one per entry of "
                               f"{'scales' if scales is not None else 'sizes'} {given.tolist()}")
        full = np.array([1.0] * rank if scales is not None else x.shape, given.dtype)
        full[axes] = given
        scales, sizes = (full, None) if scales is not None else (None, full)
    nearest = at["nearest_mode"] if mode == "nearest" else None
    return [resize(x, mode=mode, coordinate_transformation_mode=ctm, nearest_mode=nearest, name=im.name(node),
                   **_resize_spatial(x, scales, sizes))]


@converts("Upsample", mode="nearest", scales=None)
def _upsample(im, node, ins, at):
    scales = at["scales"] if im.opset < 9 else im.floats(ins[1], "scales")
    if scales is None:
        raise _Unsupported("attribute scales is required")
    return [_resize_legacy(im, node, im.value(ins[0]), scales, at["mode"])]


# -- export --------------------------------------------------------------------------
_EXPORTERS: dict[str, object] = {}


def exports(*ops: str):
    def deco(fn):
        for op in ops:
            _EXPORTERS[op] = fn
        return fn
    return deco


def to_onnx(graph: Graph, opset: int = 17, path=None):
    """Write ``graph`` as an ``onnx.ModelProto`` (opset 13 or later) and
    optionally save it to ``path``. Inputs, params (as initializers) and
    outputs keep their names. Raises a ConvcError listing every node whose op
    has no ONNX form (unshared and tiled convs, gradients, losses, ...)."""
    onnx = _onnx()
    from onnx import helper

    from .schedule import live_nodes

    if not isinstance(graph, Graph):
        raise ConvcError(f"to_onnx() takes a convc.Graph, got {type(graph).__name__}")
    if not 13 <= opset <= onnx.defs.onnx_opset_version():
        raise ConvcError(f"to_onnx(opset={opset}): convc writes opsets 13 to {onnx.defs.onnx_opset_version()}")
    graph.verify()
    if graph.assigns:
        raise ConvcError(f"graph '{graph.name}' assigns params after each run (training state); "
                         "ONNX models have no such state")
    live = live_nodes(graph)
    order = [n for n in graph.topological_order() if n in live]
    bad = [f"  {graph.node(n)['op']} %{n}" for n in order
           if graph.node(n)["op"] not in ("input", "param") and graph.node(n)["op"] not in _EXPORTERS]
    if bad:
        raise ConvcError(f"graph '{graph.name}' cannot be written as ONNX; {len(bad)} node"
                         f"{'s have' if len(bad) != 1 else ' has'} an op with no ONNX form:\n" + "\n".join(bad))
    ex = _Exporter(graph, opset)
    for n in graph.input_names:            # all of them: the model's signature is the graph's
        t = graph.node(n)["type"]
        ex.inputs.append(helper.make_tensor_value_info(ex.tensor[n], _ELEM_OF_DTYPE[t.dtype], t.shape))
    for n in order:
        d = graph.node(n)
        if d["op"] == "input":
            continue
        if d["op"] == "param":
            ex.initializer(d["value"], n, param=True)
        else:
            _EXPORTERS[d["op"]](ex, n, graph.inputs_of(n), d["attrs"], d["type"])
    outputs = []
    for o, n in graph.outputs.items():
        if ex.tensor[n] != o:
            ex.node("Identity", [ex.tensor[n]], [o])
        t = graph.node(n)["type"]
        outputs.append(helper.make_tensor_value_info(o, _ELEM_OF_DTYPE[t.dtype], t.shape))
    from . import __version__

    g = helper.make_graph(ex.nodes, graph.name, ex.inputs, outputs, ex.initializers)
    ops = [helper.make_opsetid("", opset)]
    model = helper.make_model(g, opset_imports=ops, producer_name="convc", producer_version=__version__,
                              ir_version=helper.find_min_ir_version_for(ops))
    if path is not None:
        onnx.save(model, os.fspath(path))
    return model


class _Exporter:
    def __init__(self, graph: Graph, opset: int):
        self.graph, self.opset = graph, opset
        self.nodes, self.inputs, self.initializers = [], [], []
        # A node's tensor is its name, unless an output of another node is called that.
        self.taken = set(graph.outputs) | set(graph.nx.nodes)
        self.tensor = {n: n if graph.outputs.get(n, n) == n else self.fresh(n) for n in graph.nx.nodes}

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], **attrs):
        from onnx import helper
        self.nodes.append(helper.make_node(op, inputs, outputs, name=outputs[0], **attrs))
        return outputs[0]

    def initializer(self, value: np.ndarray, base: str, param: bool = False) -> str:
        """A new initializer named after ``base`` (or, for ``param``, the
        initializer of param node ``base``); returns its tensor name."""
        from onnx import numpy_helper
        name = self.tensor[base] if param else self.fresh(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def ints(self, values, base: str) -> str:
        return self.initializer(np.array(values, np.int64), base)

    def value(self, n: str):
        """The array of a param node, or None."""
        d = self.graph.node(n)
        return d["value"] if d["op"] == "param" else None


def _np(t) -> type:
    return _NP_OF_DTYPE[t.dtype]


def _pads_attr(pairs):
    return [lo for lo, _ in pairs] + [hi for _, hi in pairs]


def _x_activation_node(ex, kind: str, params: dict, x: str, out: str, dtype) -> str:
    """One activation of the table as ONNX node(s) from tensor ``x`` to ``out``."""
    act = ACTIVATION_TABLE[kind]
    if act.onnx is None:          # silu: x * sigmoid(x)
        s = ex.node("Sigmoid", [x], [ex.fresh(f"{out}.sigmoid")])
        return ex.node("Mul", [x, s], [out])
    if ex.opset < act.onnx_since:
        raise ConvcError(f"{kind} is ONNX {act.onnx}, which needs opset >= {act.onnx_since}; "
                         f"export with to_onnx(..., opset={act.onnx_since})")
    if kind == "clip":
        bounds = [ex.initializer(np.array(params[k], dtype), f"{out}.{k}") if math.isfinite(params[k]) else ""
                  for k in ("min", "max")]
        while bounds and not bounds[-1]:
            bounds.pop()
        return ex.node("Clip", [x] + bounds, [out])
    extra = {"approximate": "tanh"} if kind == "gelu_tanh" else \
        {a: params[p] for p, a in _onnx_attr_names(act).items()}
    return ex.node(act.onnx, [x], [out], **extra)


def _finish(ex, n, y: str, attrs):
    """A producer's epilogue (residual add, fused activation) as its own nodes."""
    f = activations.fused(attrs)
    if attrs.get("residual"):
        r = ex.tensor[ex.graph.inputs_of(n)[-1]]
        y = ex.node("Add", [y, r], [ex.tensor[n] if f is None else ex.fresh(f"{n}.residual")])
    if f is None:
        return y
    return _x_activation_node(ex, f[0].name, f[1], y, ex.tensor[n], _np(ex.graph.node(n)["type"]))


def _with_bias(ex, n, op, ins, names, attrs, **onnx_attrs):
    """Conv / ConvTranspose on tensors ``names``: a tied bias as the third
    input, an untied one (a bias per output position) as an Add, then a
    fused activation."""
    ins, names = epilogue.split(attrs, ins)[0], epilogue.split(attrs, names)[0]
    untied = len(ins) == 3 and len(ex.graph.node(ins[2])["type"].shape) > 1
    act = attrs.get("activation") or attrs.get("residual")
    y = ex.node(op, names[:2] if untied else names,
                [ex.tensor[n] if not (untied or act) else ex.fresh(f"{n}.{op}")], **onnx_attrs)
    if untied:
        y = ex.node("Add", [y, names[2]], [ex.tensor[n] if not act else ex.fresh(f"{n}.bias")])
    _finish(ex, n, y, attrs)


@exports("conv")
def _x_conv(ex, n, ins, attrs, out):
    names = [ex.tensor[i] for i in ins]
    k = ex.graph.node(ins[1])["type"].shape[2:]
    if attrs["flip"]:            # true convolution: ONNX's Conv correlates, so flip the kernel
        w, rank = ex.value(ins[1]), len(k)
        if w is not None:
            names[1] = ex.initializer(w[(Ellipsis,) + (slice(None, None, -1),) * rank].copy(), f"{ins[1]}.flipped")
        else:
            names[1] = ex.node("Slice", [names[1], ex.ints([-1] * rank, f"{n}.starts"),
                                         ex.ints([-2**63] * rank, f"{n}.ends"),
                                         ex.ints(list(range(2, 2 + rank)), f"{n}.axes"),
                                         ex.ints([-1] * rank, f"{n}.steps")], [ex.fresh(f"{n}.flipped")])
    _with_bias(ex, n, "Conv", ins, names, attrs, kernel_shape=list(k), strides=list(attrs["stride"]),
               pads=_pads_attr(attrs["padding"]), dilations=list(attrs["dilation"]), group=attrs["groups"])


@exports("conv_transpose")
def _x_conv_transpose(ex, n, ins, attrs, out):
    k = ex.graph.node(ins[1])["type"].shape[2:]
    _with_bias(ex, n, "ConvTranspose", ins, [ex.tensor[i] for i in ins], attrs, kernel_shape=list(k),
               strides=list(attrs["stride"]), pads=_pads_attr(attrs["padding"]), dilations=list(attrs["dilation"]),
               group=attrs["groups"], output_padding=list(attrs["output_padding"]))


@exports("max_pool", "avg_pool")
def _x_pool(ex, n, ins, attrs, out):
    common = dict(kernel_shape=list(attrs["kernel_size"]), strides=list(attrs["stride"]),
                  pads=_pads_attr(attrs["padding"]), ceil_mode=int(attrs["ceil_mode"]))
    if ex.graph.node(n)["op"] == "max_pool":
        ex.node("MaxPool", [ex.tensor[ins[0]]], [ex.tensor[n]], dilations=list(attrs["dilation"]), **common)
    else:
        ex.node("AveragePool", [ex.tensor[ins[0]]], [ex.tensor[n]],
                count_include_pad=int(attrs["count_include_pad"]), **common)


_SIMPLE = {"global_avg_pool": "GlobalAveragePool", "add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div",
           "matmul": "MatMul"}


@exports(*_SIMPLE)
def _x_simple(ex, n, ins, attrs, out):
    own = epilogue.split(attrs, ins)[0]
    args = [ex.tensor[i] for i in own]
    if attrs.get("transpose_a"):            # matmul of a used transposed
        rank = len(ex.graph.node(ins[0])["type"].shape)
        perm = list(range(rank - 2)) + [rank - 1, rank - 2]
        args[0] = ex.node("Transpose", [args[0]], [ex.fresh(f"{n}.a_T")], perm=perm)
    done = not (attrs.get("bias") or epilogue.active(attrs))
    y = ex.node(_SIMPLE[ex.graph.node(n)["op"]], args[:2], [ex.tensor[n] if done else ex.fresh(f"{n}.product")])
    if attrs.get("bias"):                   # matmul's row bias
        y = ex.node("Add", [y, args[2]], [ex.tensor[n] if not epilogue.active(attrs) else ex.fresh(f"{n}.bias")])
    if not done:
        _finish(ex, n, y, attrs)


@exports(*ACTIVATION_TABLE)
def _x_activation(ex, n, ins, attrs, out):
    _x_activation_node(ex, ex.graph.node(n)["op"], attrs, ex.tensor[ins[0]], ex.tensor[n], _np(out))


@exports("softmax")
def _x_softmax(ex, n, ins, attrs, out):
    ex.node("Softmax", [ex.tensor[ins[0]]], [ex.tensor[n]], axis=attrs["axis"])


@exports("concat")
def _x_concat(ex, n, ins, attrs, out):
    ex.node("Concat", [ex.tensor[i] for i in ins], [ex.tensor[n]], axis=attrs["axis"])


@exports("reshape", "flatten")
def _x_reshape(ex, n, ins, attrs, out):
    ex.node("Reshape", [ex.tensor[ins[0]], ex.ints(out.shape, f"{n}.shape")], [ex.tensor[n]])


@exports("transpose")
def _x_transpose(ex, n, ins, attrs, out):
    ex.node("Transpose", [ex.tensor[ins[0]]], [ex.tensor[n]], perm=list(attrs["perm"]))


@exports("expand")
def _x_expand(ex, n, ins, attrs, out):
    ex.node("Expand", [ex.tensor[ins[0]], ex.ints(out.shape, f"{n}.shape")], [ex.tensor[n]])


@exports("slice")
def _x_slice(ex, n, ins, attrs, out):
    ex.node("Slice", [ex.tensor[ins[0]], ex.ints([attrs["start"]], f"{n}.starts"),
                      ex.ints([attrs["stop"]], f"{n}.ends"), ex.ints([attrs["axis"]], f"{n}.axes")], [ex.tensor[n]])


@exports("reduce_sum")
def _x_reduce_sum(ex, n, ins, attrs, out):
    ex.node("ReduceSum", [ex.tensor[ins[0]], ex.ints(attrs["axes"], f"{n}.axes")], [ex.tensor[n]],
            keepdims=int(attrs["keepdims"]))


@exports("dense")
def _x_dense(ex, n, ins, attrs, out):
    t = ex.tensor
    ins = epilogue.split(attrs, ins)[0]
    last = t[n] if not epilogue.active(attrs) else ex.fresh(f"{n}.dense")
    x_rank = len(ex.graph.node(ins[0])["type"].shape)
    if x_rank == 2:
        y = ex.node("Gemm", [t[i] for i in ins], [last], transB=1)
    else:
        w = ex.value(ins[1])
        wt = (ex.initializer(w.T.copy(), f"{ins[1]}.T") if w is not None
              else ex.node("Transpose", [t[ins[1]]], [ex.fresh(f"{n}.w_t")], perm=[1, 0]))
        y = ex.node("MatMul", [t[ins[0]], wt], [last if len(ins) == 2 else ex.fresh(f"{n}.matmul")])
        if len(ins) == 3:
            y = ex.node("Add", [y, t[ins[2]]], [last])
    if last != t[n]:
        _finish(ex, n, y, attrs)


@exports("batch_norm")
def _x_batch_norm(ex, n, ins, attrs, out):
    x, mean, var, gamma, beta = (ex.tensor[i] for i in ins)
    ex.node("BatchNormalization", [x, gamma, beta, mean, var], [ex.tensor[n]], epsilon=attrs["eps"])


@exports("pad")
def _x_pad(ex, n, ins, attrs, out):
    x, pads = ex.tensor[ins[0]], list(attrs["pads"])
    if any(lo < 0 or hi < 0 for lo, hi in pads):        # crops: a Slice (onnx.reference's Pad cannot)
        sizes = ex.graph.node(ins[0])["type"].shape[2:]
        x = ex.node("Slice", [x, ex.ints([max(-lo, 0) for lo, _ in pads], f"{n}.starts"),
                              ex.ints([sz - max(-hi, 0) for sz, (_, hi) in zip(sizes, pads)], f"{n}.ends"),
                              ex.ints(list(range(2, 2 + len(pads))), f"{n}.axes")], [ex.fresh(f"{n}.crop")])
        pads = [(max(lo, 0), max(hi, 0)) for lo, hi in pads]
    ex.node("Pad", [x, ex.ints(_pads_attr([(0, 0), (0, 0)] + pads), f"{n}.pads"),
                    ex.initializer(np.array(attrs["value"], _np(out)), f"{n}.value")], [ex.tensor[n]])


@exports("channel_shuffle")
def _x_channel_shuffle(ex, n, ins, attrs, out):
    nb, c, *rest = out.shape
    g = attrs["groups"]
    a = ex.node("Reshape", [ex.tensor[ins[0]], ex.ints([nb, g, c // g, *rest], f"{n}.split")], [ex.fresh(f"{n}.split")])
    b = ex.node("Transpose", [a], [ex.fresh(f"{n}.swap")], perm=[0, 2, 1, *range(3, 3 + len(rest))])
    ex.node("Reshape", [b, ex.ints(out.shape, f"{n}.shape")], [ex.tensor[n]])


@exports("downsample")
def _x_downsample(ex, n, ins, attrs, out):
    x = ex.graph.node(ins[0])["type"].shape
    rank = len(x) - 2
    ex.node("Slice", [ex.tensor[ins[0]], ex.ints([0] * rank, f"{n}.starts"), ex.ints(x[2:], f"{n}.ends"),
                      ex.ints(list(range(2, 2 + rank)), f"{n}.axes"), ex.ints(attrs["stride"], f"{n}.steps")],
            [ex.tensor[n]])


@exports("dilate")
def _x_dilate(ex, n, ins, attrs, out):
    # zeros between elements: a per-channel transposed conv with a 1x1 kernel of one
    c, rank = out.shape[1], len(out.shape) - 2
    if out.dtype == "int64":
        raise ConvcError(f"node %{n} (dilate): int64 tensors have no ONNX form here (ConvTranspose is float)")
    w = ex.initializer(np.ones((c, 1) + (1,) * rank, _np(out)), f"{n}.ones")
    ex.node("ConvTranspose", [ex.tensor[ins[0]], w], [ex.tensor[n]], strides=list(attrs["stride"]), group=c,
            kernel_shape=[1] * rank)


@exports("resize")
def _x_resize(ex, n, ins, attrs, out):
    # ONNX's Resize takes sizes (its scale is then exactly size / input) or
    # float32 scales (output floor(input * scale)): sizes when convc's scale
    # is that ratio, else the float32 scales if they compute the same.
    n_in = ex.graph.node(ins[0])["type"].shape[2:]
    mode, ctm, nearest = attrs["mode"], attrs["coordinate_transformation_mode"], attrs["nearest_mode"]
    onnx_attrs = dict(mode=mode, coordinate_transformation_mode=ctm, **({"nearest_mode": nearest} if nearest else {}))
    if all(is_ratio(i, o, s) for i, o, s in zip(n_in, attrs["size"], attrs["scale"])):
        ex.node("Resize", [ex.tensor[ins[0]], "", "", ex.ints(out.shape, f"{n}.sizes")], [ex.tensor[n]],
                **onnx_attrs)
        return
    for i, o, s in zip(n_in, attrs["size"], attrs["scale"]):
        s32 = float(np.float32(s))
        if math.floor(i * s32) != o or not np.allclose(axis_matrix(i, o, s32, mode, ctm, nearest),
                                                       axis_matrix(i, o, s, mode, ctm, nearest), rtol=0, atol=1e-6):
            raise ConvcError(f"node %{n} (resize): the scale {s} of an axis resized from {i} to {o} is not {o}/{i}, "
                             f"and as a float32 (ONNX's scales are float32) it reads other elements")
    scales = ex.initializer(np.array([1.0, 1.0] + list(attrs["scale"]), np.float32), f"{n}.scales")
    ex.node("Resize", [ex.tensor[ins[0]], "", scales], [ex.tensor[n]], **onnx_attrs)


# -- quantized ops as ONNX (QDQ) ------------------------------------------------------
# quantize / dequantize are QuantizeLinear / DequantizeLinear, qconv is
# QLinearConv, qmatmul QLinearMatMul (MatMulInteger when it returns the raw
# int32 sums); the other integer ops are written in the QDQ form --
# DequantizeLinear -> the float op -> QuantizeLinear -- which ONNX Runtime
# fuses into its integer kernels. A clamp narrower than the dtype (a folded
# relu) is a Clip on the integers. ONNX Runtime requantizes in float where
# convc uses fixed point, so the two agree within one step of the output.
def _q_scalar(ex, base: str, value, dtype) -> str:
    """An initializer of one number, or of one per channel (1-D)."""
    v = np.asarray(value, dtype).reshape(-1)
    return ex.initializer(v.reshape(()) if v.size == 1 else v, base)


def _x_q_pair(ex, n: str, what: str, scale, zero_point, dtype: str) -> list[str]:
    return [_q_scalar(ex, f"{n}.{what}_scale", scale, np.float32),
            _q_scalar(ex, f"{n}.{what}_zero_point", zero_point, _NP_OF_DTYPE[dtype])]


def _x_clamp(ex, n: str, y: str, attrs, out_name: str) -> str:
    """Clip to the op's clamp when it is narrower than its dtype."""
    lo, hi = attrs.get("clamp") or (None, None)
    info = np.iinfo(attrs["dtype"])
    if lo is None or (lo <= info.min and hi >= info.max):
        return y
    np_t = _NP_OF_DTYPE[attrs["dtype"]]
    return ex.node("Clip", [y, ex.initializer(np.array(lo, np_t), f"{n}.lo"), ex.initializer(np.array(hi, np_t),
                                                                                             f"{n}.hi")], [out_name])


def _needs_clip(attrs) -> bool:
    lo, hi = attrs.get("clamp") or (None, None)
    info = np.iinfo(attrs["dtype"])
    return lo is not None and not (lo <= info.min and hi >= info.max)


def _out_q(ex, n: str, y_float: str, attrs):
    """QuantizeLinear of a float result to the op's output (and its clamp)."""
    clip = _needs_clip(attrs)
    q = ex.node("QuantizeLinear", [y_float, *_x_q_pair(ex, n, "y", attrs["y_scale"], attrs["y_zero_point"],
                                                       attrs["dtype"])],
                [ex.fresh(f"{n}.unclamped") if clip else ex.tensor[n]])
    _x_clamp(ex, n, q, attrs, ex.tensor[n])


def _x_dq(ex, n: str, what: str, src: str, dtype: str, scale, zero_point, axis=None) -> str:
    """DequantizeLinear of tensor ``src`` (per axis: scale and zero point
    with one entry per index, as ONNX Runtime requires)."""
    n_axis = max(np.size(scale), np.size(zero_point))
    extra = {"axis": axis} if axis is not None and n_axis > 1 else {}
    if extra:
        scale, zero_point = (np.broadcast_to(np.reshape(v, -1), (n_axis,)) for v in (scale, zero_point))
    return ex.node("DequantizeLinear", [src, *_x_q_pair(ex, n, what, scale, zero_point, dtype)],
                   [ex.fresh(f"{n}.{what}_float")], **extra)


@exports("quantize")
def _x_quantize(ex, n, ins, attrs, out):
    extra = {"axis": attrs["axis"]} if attrs["axis"] is not None else {}
    ex.node("QuantizeLinear", [ex.tensor[ins[0]], *_x_q_pair(ex, n, "y", attrs["scale"], attrs["zero_point"],
                                                             out.dtype)], [ex.tensor[n]], **extra)


@exports("dequantize")
def _x_dequantize(ex, n, ins, attrs, out):
    x_dtype = ex.graph.node(ins[0])["type"].dtype
    extra = {"axis": attrs["axis"]} if attrs["axis"] is not None else {}
    ex.node("DequantizeLinear", [ex.tensor[ins[0]], *_x_q_pair(ex, n, "x", attrs["scale"], attrs["zero_point"],
                                                               x_dtype)], [ex.tensor[n]], **extra)


@exports("qconv")
def _x_qconv(ex, n, ins, attrs, out):
    t = ex.tensor
    x_dtype, w_dtype = (ex.graph.node(i)["type"].dtype for i in ins[:2])
    k = ex.graph.node(ins[1])["type"].shape[2:]
    args = [t[ins[0]], *_x_q_pair(ex, n, "x", attrs["x_scale"], attrs["x_zero_point"], x_dtype), t[ins[1]],
            *_x_q_pair(ex, n, "w", attrs["w_scale"], attrs["w_zero_point"], w_dtype),
            *_x_q_pair(ex, n, "y", attrs["y_scale"], attrs["y_zero_point"], attrs["dtype"])]
    if len(ins) == 3:
        args.append(t[ins[2]])
    clip = _needs_clip(attrs)
    y = ex.node("QLinearConv", args, [ex.fresh(f"{n}.unclamped") if clip else t[n]], kernel_shape=list(k),
                strides=list(attrs["stride"]), pads=_pads_attr(attrs["padding"]), dilations=list(attrs["dilation"]),
                group=attrs["groups"])
    _x_clamp(ex, n, y, attrs, t[n])


@exports("qmatmul")
def _x_qmatmul(ex, n, ins, attrs, out):
    t = ex.tensor
    a_dtype, b_dtype = (ex.graph.node(i)["type"].dtype for i in ins)
    if attrs["dtype"] == "int32":
        ex.node("MatMulInteger", [t[ins[0]], t[ins[1]],
                                  _q_scalar(ex, f"{n}.a_zero_point", attrs["a_zero_point"], _NP_OF_DTYPE[a_dtype]),
                                  _q_scalar(ex, f"{n}.b_zero_point", attrs["b_zero_point"], _NP_OF_DTYPE[b_dtype])],
                [t[n]])
        return
    clip = _needs_clip(attrs)
    y = ex.node("QLinearMatMul", [t[ins[0]], *_x_q_pair(ex, n, "a", attrs["a_scale"], attrs["a_zero_point"], a_dtype),
                                  t[ins[1]], *_x_q_pair(ex, n, "b", attrs["b_scale"], attrs["b_zero_point"], b_dtype),
                                  *_x_q_pair(ex, n, "y", attrs["y_scale"], attrs["y_zero_point"], attrs["dtype"])],
                [ex.fresh(f"{n}.unclamped") if clip else t[n]])
    _x_clamp(ex, n, y, attrs, t[n])


@exports("qdense")
def _x_qdense(ex, n, ins, attrs, out):
    if attrs["dtype"] == "int32":
        raise ConvcError(f"node %{n} (qdense): its raw int32 output has no QDQ form; use qmatmul")
    t, gt = ex.tensor, ex.graph.node
    x = _x_dq(ex, n, "x", t[ins[0]], gt(ins[0])["type"].dtype, attrs["x_scale"], attrs["x_zero_point"])
    w = _x_dq(ex, n, "w", t[ins[1]], gt(ins[1])["type"].dtype, attrs["w_scale"], attrs["w_zero_point"], axis=0)
    args = [x, w]
    if len(ins) == 3:
        bias_scale = np.float32(attrs["x_scale"]) * np.asarray(attrs["w_scale"], np.float32)
        args.append(_x_dq(ex, n, "b", t[ins[2]], "int32", bias_scale, 0, axis=0))
    x_rank = len(gt(ins[0])["type"].shape)
    if x_rank == 2:
        y = ex.node("Gemm", args, [ex.fresh(f"{n}.float")], transB=1)
    else:
        wt = ex.node("Transpose", [w], [ex.fresh(f"{n}.w_t")], perm=[1, 0])
        y = ex.node("MatMul", [x, wt], [ex.fresh(f"{n}.float")])
        if len(args) == 3:
            y = ex.node("Add", [y, args[2]], [ex.fresh(f"{n}.biased")])
    _out_q(ex, n, y, attrs)


@exports("qadd")
def _x_qadd(ex, n, ins, attrs, out):
    t, gt = ex.tensor, ex.graph.node
    a = _x_dq(ex, n, "a", t[ins[0]], gt(ins[0])["type"].dtype, attrs["a_scale"], attrs["a_zero_point"])
    b = _x_dq(ex, n, "b", t[ins[1]], gt(ins[1])["type"].dtype, attrs["b_scale"], attrs["b_zero_point"])
    _out_q(ex, n, ex.node("Add", [a, b], [ex.fresh(f"{n}.float")]), attrs)


@exports("qconcat")
def _x_qconcat(ex, n, ins, attrs, out):
    t, gt = ex.tensor, ex.graph.node
    parts = [_x_dq(ex, n, f"x{k}", t[i], gt(i)["type"].dtype, s, z)
             for k, (i, s, z) in enumerate(zip(ins, attrs["x_scales"], attrs["x_zero_points"]))]
    _out_q(ex, n, ex.node("Concat", parts, [ex.fresh(f"{n}.float")], axis=attrs["axis"]), attrs)


@exports("qavg_pool", "qglobal_avg_pool")
def _x_qpool(ex, n, ins, attrs, out):
    t, gt = ex.tensor, ex.graph.node
    x = _x_dq(ex, n, "x", t[ins[0]], gt(ins[0])["type"].dtype, attrs["x_scale"], attrs["x_zero_point"])
    if gt(n)["op"] == "qglobal_avg_pool":
        y = ex.node("GlobalAveragePool", [x], [ex.fresh(f"{n}.float")])
    else:
        y = ex.node("AveragePool", [x], [ex.fresh(f"{n}.float")], kernel_shape=list(attrs["kernel_size"]),
                    strides=list(attrs["stride"]), pads=_pads_attr(attrs["padding"]),
                    ceil_mode=int(attrs["ceil_mode"]), count_include_pad=int(attrs["count_include_pad"]))
    _out_q(ex, n, y, attrs)


# -- command line: convc run / convc compile -------------------------------------------
def load(spec: str, input_shapes: dict | None = None) -> Graph:
    """A model for the CLI: an ``.onnx`` file, else what
    ``convc.export.load_model`` takes (a bundled name or a Python file)."""
    if str(spec).lower().endswith(".onnx"):
        return from_onnx(spec, input_shapes=input_shapes)
    from .export import load_model
    return load_model(spec)


def _onnx_inputs(path: str) -> list[str]:
    onnx = _onnx()
    try:
        m = onnx.load(path, load_external_data=False)
    except FileNotFoundError:
        raise ConvcError(f"ONNX model {path!r}: no such file") from None
    except Exception as e:      # noqa: BLE001
        raise ConvcError(f"ONNX model {path!r} cannot be read: {type(e).__name__}: {e}") from None
    inits = {i.name for i in m.graph.initializer}
    return [i.name for i in m.graph.input if i.name not in inits]


def _parse_inputs(specs, names: list[str]) -> dict[str, np.ndarray]:
    feeds = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep:
            if len(names) != 1:
                raise ConvcError(f"--input {spec}: the model has {len(names)} inputs {names}; "
                                 f"say which with --input NAME=FILE.npy")
            name, path = names[0], spec
        if name not in names:
            raise ConvcError(f"--input {spec}: the model has no input {name!r}; its inputs are {names}")
        try:
            feeds[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ConvcError(f"--input {spec}: cannot read {path!r} as a .npy file: {e}") from None
    missing = [n for n in names if n not in feeds]
    if missing:
        raise ConvcError(f"no array for input(s) {missing}; give --input NAME=FILE.npy for each")
    return feeds


def _compile(g: Graph, target: str, pipeline: str):
    from .api import TARGETS, compile as cc_compile
    if target not in TARGETS:
        if target == "opencl":
            raise ConvcError("the opencl target is not available in this build")
        raise ConvcError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")
    return cc_compile(g, target=target, passes=pipeline)


def _median_time(fn, min_time: float = 0.2, min_runs: int = 5, max_runs: int = 1000) -> tuple[float, int]:
    times = []
    t0 = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - t0 < min_time and len(times) < max_runs):
        s = time.perf_counter()
        fn()
        times.append(time.perf_counter() - s)
    return float(np.median(times)), len(times)


def cmd_run(args) -> int:
    from pathlib import Path

    onnx_model = str(args.model).lower().endswith(".onnx")
    if onnx_model:
        names = _onnx_inputs(args.model)
        feeds = _parse_inputs(args.input, names)
        g = from_onnx(args.model, input_shapes={n: a.shape for n, a in feeds.items()})
        feeds = {node_name(n, "input"): a for n, a in feeds.items()}
    else:
        g = load(args.model)
        feeds = _parse_inputs(args.input, g.input_names)
    t0 = time.perf_counter()
    mod = _compile(g, args.target, args.pipeline)
    t_compile = time.perf_counter() - t0
    res = mod.run(feeds)
    t_run, runs = _median_time(lambda: mod.run(feeds))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, arr in res.items():
        np.save(out / f"{name}.npy", arr)
        print(f"wrote {out / (name + '.npy')}  {arr.dtype}{list(arr.shape)}")
    print(f"target {args.target}: compile {t_compile * 1e3:.0f} ms, run {t_run * 1e3:.3f} ms "
          f"(median of {runs})")
    return 0


def _parse_shapes(specs) -> dict:
    shapes = {}
    for spec in specs or []:
        name, sep, dims = spec.partition("=")
        try:
            shapes[name] = tuple(int(d) for d in dims.split(","))
        except ValueError:
            sep = ""
        if not sep:
            raise ConvcError(f"--shape {spec}: write NAME=D0,D1,... (e.g. x=1,3,224,224)")
    return shapes


def cmd_compile(args) -> int:
    from .cost import cost

    g = load(args.model, _parse_shapes(args.shape)) if str(args.model).lower().endswith(".onnx") else load(args.model)
    print(g)
    print()
    print(cost(g).table())
    if args.target != "none":
        t0 = time.perf_counter()
        _compile(g, args.target, args.pipeline)
        print(f"\ncompiled for {args.target} in {(time.perf_counter() - t0) * 1e3:.0f} ms")
    return 0


def add_cli(subparsers) -> None:
    """Register ``convc run`` and ``convc compile`` on an argparse subparsers object."""
    model_help = "an ONNX file (MODEL.onnx), a bundled model name (lenet5) or a Python file defining build()"
    r = subparsers.add_parser("run", help="compile a model (e.g. MODEL.onnx) and run it on .npy inputs; "
                                          "writes each output as OUT/NAME.npy and prints timings",
                              description="Import or load MODEL, compile it for --target, run it on the "
                                          "--input arrays, write every output as DIR/NAME.npy and print the "
                                          "compile time and the median run time.")
    r.add_argument("model", metavar="MODEL", help=model_help)
    r.add_argument("-i", "--input", action="append", metavar="[NAME=]FILE.npy",
                   help="an input array (repeat for several inputs; NAME= may be left out for one input)")
    r.add_argument("--target", default="c", choices=["c", "opencl", "numpy"], help="default: c")
    r.add_argument("-o", "--out", default=".", metavar="DIR", help="where to write the outputs (default: .)")
    r.add_argument("--pipeline", default="default", help="pass pipeline (default: default)")
    r.set_defaults(fn=cmd_run)
    c = subparsers.add_parser("compile", help="import or load a model (e.g. MODEL.onnx), print its IR and cost "
                                              "and compile it",
                              description="Print MODEL's IR and its cost table (MACs, params, bytes per node), "
                                          "then compile it for --target.")
    c.add_argument("model", metavar="MODEL", help=model_help)
    c.add_argument("--shape", action="append", metavar="NAME=D0,D1,...",
                   help="static shape for an ONNX input with symbolic dims (repeatable)")
    c.add_argument("--target", default="c", choices=["c", "opencl", "numpy", "none"],
                   help="compile for this target after printing (default: c; none: only print)")
    c.add_argument("--pipeline", default="default", help="pass pipeline (default: default)")
    c.set_defaults(fn=cmd_compile)


def main(argv=None) -> int:
    """``convc run|compile ...`` without convc.cli: ``from convc.onnx import main``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="convc")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except ConvcError as e:
        print(f"convc: error: {e}", file=sys.stderr)
        return 2

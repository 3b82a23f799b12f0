"""What :func:`convc.onnx.from_onnx` checks before and while it imports a
model, so that a hostile or broken file gives a clear :class:`ConvcError`
instead of a hang, a huge allocation, a bare exception or a silently wrong
graph:

* :func:`read_model` -- bytes or a path to an ``onnx.ModelProto``; tensors
  keeping their data in external files need the model's path (bytes and
  protos have no directory to find them in);
* :func:`check_model` -- IR version and opsets in the ranges the installed
  onnx package knows, unique names, one producer per tensor and nodes in
  topological order (ONNX requires all of these); an opset newer than
  :data:`NEWEST_OPSET` warns with the model's ops that changed since;
* :func:`tensor_array` -- an initializer or Constant tensor as an array, its
  data checked against its dims before numpy sees it;
* :class:`FoldBudget` -- what folding constant subgraphs may compute: no
  control flow (a Loop's trip count is unbounded), each result's size known
  from ONNX shape inference before anything is computed, and all results
  together within the cap (see :func:`memory_cap`).
"""
from __future__ import annotations

import os
import warnings

import numpy as np

from ..errors import ConvcError

NEWEST_OPSET = 28
"""The newest default-domain opset convc's importer was checked against: the
onnx package's node tests (onnx 1.23 writes them up to opset 28) pass through
its converters (tests/test_onnx_import.py), or fail for the reasons
conformance.CANNOT_PASS gives. It is each converter's default ``checked``
(:func:`.importer.converts`): a model whose op has a newer version is refused."""

FOLD_FLOOR = 256 << 20
"""Folding may always produce this many bytes (shape arithmetic, small
tables), whatever the size of the model's own weights."""

FOLD_PER_WEIGHT = 8
"""... and up to this many times the bytes of the model's initializers
(a weight cast, transposed and reshaped is a few copies of it)."""

FOLD_FILLS = 1 << 30
"""ConstantOfShape results (one value repeated) may add up to this many bytes
besides: models with their weights stripped write each weight as one (the
onnx wheel's light model zoo: VGG-19's are 548 MiB, from a 9 kB file)."""

FOLD_MAX_MACS = 1 << 30
"""The most multiply-adds one folded node (a Conv or MatMul of constants)
may take in ``onnx.reference``: seconds, not hours."""

FOLD_MAX_LOOPED = 1 << 20
"""The most elements a folded node outside :data:`_VECTORIZED` may produce:
``onnx.reference`` computes some ops (pools, GridSample, Col2Im, ...)
element by element in Python."""

_VECTORIZED = {
    "Abs", "Add", "And", "Cast", "CastLike", "Ceil", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv",
    "ConvTranspose", "CumSum", "DequantizeLinear", "Div", "Dropout", "Einsum", "Equal", "Erf", "Exp", "Expand",
    "EyeLike", "Flatten", "Floor", "Gather", "GatherElements", "Gemm", "Greater", "GreaterOrEqual", "Identity",
    "IsInf", "IsNaN", "LeakyRelu", "Less", "LessOrEqual", "Log", "MatMul", "Max", "Mean", "Min", "Mod", "Mul",
    "Neg", "NonZero", "Not", "Or", "Pad", "Pow", "QuantizeLinear", "Range", "Reciprocal", "ReduceL1", "ReduceL2",
    "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape",
    "Round", "Shape", "Sigmoid", "Sign", "Size", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Sum",
    "Tanh", "Tile", "Transpose", "Trilu", "Unsqueeze", "Where", "Xor"}
"""Ops ``onnx.reference`` computes with whole-array numpy operations."""

_GROWING_DATA_DEPENDENT = {"NonZero": lambda sizes, ranks: ranks[0] * sizes[0]}
"""Ops whose output shape depends on input values that shape inference does
not see: an upper bound of their output's element count."""
_SHRINKING_DATA_DEPENDENT = {"Unique", "Compress", "TopK", "StringSplit"}   # at most the first input's size


class Refusal(Exception):
    """Why a tensor or a fold is refused; the importer reports it as a
    problem of the node or initializer (never escapes to users)."""


class OnnxOpsetWarning(UserWarning):
    """The model's opset is newer than the one convc was checked against;
    the message lists the model's ops whose definition changed since."""


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ConvcError("ONNX support needs the onnx package: pip install 'convc[onnx]'") from None
    return onnx


def memory_cap() -> tuple[int, str]:
    """Bytes an import may allocate for folded constants and initializers,
    and where the number comes from: :func:`convc.schedule.memory_cap`
    (``CONVC_MAX_MEMORY``, else the memory available now)."""
    from ..schedule import memory_cap as module_cap

    cap, source = module_cap()
    return (cap, source) if cap is not None else (1 << 62, "no cap: the available memory is unknown")


def show_bytes(n: int) -> str:
    """``3221225472`` -> ``'3.00 GiB (3221225472 bytes)'``."""
    if n < 1024:
        return f"{n} bytes"
    x = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        x /= 1024
        if x < 1024 or unit == "EiB":
            return f"{x:.2f} {unit} ({n} bytes)"


# -- reading ------------------------------------------------------------------------
def read_model(model):
    """An ``onnx.ModelProto`` from a path, bytes or a ModelProto, with its
    external data loaded (a path) or refused (bytes, a proto)."""
    onnx = _onnx()
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if os.path.isdir(path):
            raise ConvcError(f"ONNX model {path!r} is a directory, not a model file")
        try:
            return onnx.load(path)
        except FileNotFoundError:
            raise ConvcError(f"ONNX model {path!r}: no such file") from None
        except Exception as e:      # noqa: BLE001 -- protobuf's DecodeError, a bad external-data path, ...
            raise ConvcError(f"ONNX model {path!r} cannot be read: {type(e).__name__}: {e}") from None
    if isinstance(model, (bytes, bytearray, memoryview)):
        data = bytes(model)
        proto = onnx.ModelProto()
        try:
            proto.ParseFromString(data)
        except Exception as e:      # noqa: BLE001 -- DecodeError and friends
            raise ConvcError(f"ONNX model (given as {len(data)} bytes) cannot be read: {type(e).__name__}: {e}") \
                from None
        _refuse_external(proto, "bytes")
        _check_text(proto, "model")
        return proto
    if isinstance(model, onnx.ModelProto):
        _refuse_external(model, "an onnx.ModelProto")
        _check_text(model, "model")
        return model
    raise ConvcError(f"from_onnx() takes a path, bytes or an onnx.ModelProto, got {type(model).__name__}")


def _check_text(msg, where: str) -> None:
    """Every string field of ``msg`` is text: protobuf hands ONNX's (proto2)
    strings back as bytes when they are not valid UTF-8."""
    from google.protobuf.descriptor import FieldDescriptor

    for field, value in msg.ListFields():
        if field.type not in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE):
            continue            # (numbers and bytes: raw data, float_data, ... need no look)
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        values = value if repeated else [value]
        if field.type == FieldDescriptor.TYPE_STRING:
            for v in values:
                if not isinstance(v, str):
                    raise ConvcError(f"ONNX model: {where}.{field.name} is {bytes(v)[:40]!r}, not UTF-8 text; the "
                                     f"file is damaged")
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            for i, v in enumerate(values):
                _check_text(v, f"{where}.{field.name}" + (f"[{i}]" if repeated else ""))


def _tensors(graph):
    """Every TensorProto of a graph and its subgraphs: (tensor, where)."""
    for t in graph.initializer:
        yield t, "initializer"
    for sp in graph.sparse_initializer:
        yield sp.values, "sparse initializer"
    for node in graph.node:
        for a in node.attribute:
            for t in ([a.t] if a.HasField("t") else []) + list(a.tensors):
                yield t, f"node {node.name or node.op_type!r}"
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _tensors(sub)


def _refuse_external(model, given: str) -> None:
    onnx = _onnx()
    for t, where in _tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise ConvcError(f"ONNX model: tensor {t.name!r} ({where}) keeps its data in an external file, and "
                             f"from_onnx() was given {given}, which has no directory to find it in: pass the "
                             f"model's path instead (from_onnx('dir/model.onnx'))")


# -- structure ---------------------------------------------------------------------
def check_model(model, invalid, warn: bool = True) -> int:
    """Check what ONNX requires of a model's structure; returns its
    default-domain opset. ``invalid(problems)`` makes the error to raise
    from a list of ``(what, name, reason)``; ``warn``: give the
    OnnxOpsetWarning of a newer opset."""
    onnx = _onnx()
    newest_ir = onnx.IR_VERSION
    if not 1 <= model.ir_version <= newest_ir:
        why = "is missing (0): the data is not an ONNX model" if model.ir_version == 0 else \
            f"is not one the installed onnx {onnx.__version__} knows (1 to {newest_ir})"
        raise invalid([("model", "ir_version", f"ir_version {model.ir_version} {why}")])
    if not model.HasField("graph"):
        raise invalid([("model", "graph", "the model has no graph")])
    opsets: dict[str, int] = {}
    problems = []
    for o in model.opset_import:
        domain = "" if o.domain == "ai.onnx" else o.domain
        if domain in opsets:
            problems.append(("model", "opset_import", f"domain {o.domain or 'ai.onnx'!r} has an opset twice "
                                                      f"({opsets[domain]} and {o.version})"))
        opsets[domain] = o.version
    newest = onnx.defs.onnx_opset_version()
    opset = opsets.get("")
    if opset is None:
        if model.ir_version >= 3 or model.opset_import:
            problems.append(("model", "opset_import", "no opset for the default (ai.onnx) domain; ONNX requires one "
                                                      "since IR version 3"))
        opset = 1
    elif not 1 <= opset <= newest:
        problems.append(("model", "opset_import", f"opset {opset} of the default domain is not one the installed "
                                                  f"onnx {onnx.__version__} knows: its newest is {newest}"
                                                  + (", and opsets start at 1" if opset < 1 else "")))
    graph = model.graph
    problems += _check_names(graph, model.ir_version)
    if problems:
        raise invalid(problems)
    if opset > NEWEST_OPSET and warn:
        _warn_newer(graph, opset)
    return opset


def _check_names(graph, ir_version: int) -> list:
    """Unique inputs, initializers and outputs; one producer per tensor;
    nodes in topological order."""
    problems = []

    def once(kind, names):
        seen = set()
        for n in names:
            if n in seen:
                problems.append((kind, n, f"{kind} {n!r} is listed twice; ONNX names are unique"))
            seen.add(n)
        return seen

    inputs = once("input", [i.name for i in graph.input])
    inits = once("initializer", [t.name for t in graph.initializer] + [t.values.name for t in graph.sparse_initializer])
    once("output", [o.name for o in graph.output])
    for kind, names in (("input", inputs), ("output", [o.name for o in graph.output])):
        if "" in names:
            problems.append((kind, "(unnamed)", f"a graph {kind} has an empty name"))
    if ir_version < 4:
        for name in sorted(inits - inputs):
            problems.append(("initializer", name, f"IR version {ir_version} (before 4) requires every initializer to be "
                                                  f"a graph input too; initializer {name!r} is not a graph input"))
    producer: dict[str, str] = {}
    later: dict[str, str] = {}
    for node in graph.node:
        for o in node.output:
            if o:
                later.setdefault(o, _label(node))
    for node in graph.node:
        label = _label(node)
        for i in node.input:
            if not i or i in producer or i in inputs or i in inits:
                continue
            if i in node.output:
                why = f"reads {i!r}, its own output (a cycle)"
            elif i in later:
                why = (f"reads {i!r} before any node computes it: ONNX requires nodes in topological order, and "
                       f"node {later[i]} computes it later")
            else:
                why = f"reads {i!r}, which no node, input or initializer of the graph provides"
            problems.append((node.op_type, _name(node), f"node {label} {why}"))
        for o in node.output:
            if not o:
                continue
            if o in inputs or o in inits:
                kind = "graph input" if o in inputs else "initializer"
                problems.append((node.op_type, _name(node), f"node {label} writes {o!r}, which is a {kind}; "
                                                            "ONNX tensors have one producer"))
            elif o in producer:
                problems.append((node.op_type, _name(node), f"tensor {o!r} is written by node {producer[o]} and "
                                                            f"node {label}; ONNX tensors have one producer"))
            else:
                producer[o] = label
    return problems


def _name(node) -> str:
    """How the importer's errors name a node: its name, else its output."""
    return node.name or f"(unnamed, output {node.output[0] if node.output else '?'!r})"


def _label(node) -> str:
    return f"{node.name!r} ({node.op_type})" if node.name else f"{_name(node)} ({node.op_type})"


def _warn_newer(graph, opset: int) -> None:
    onnx = _onnx()
    changed = {}
    for node in graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type not in changed:
            try:
                since = onnx.defs.get_schema(node.op_type, opset).since_version
            except Exception:       # noqa: BLE001 -- an unknown op: the importer reports it
                continue
            if since > NEWEST_OPSET:
                changed[node.op_type] = since
    if changed:
        ops = ", ".join(f"{op} (changed in opset {v})" for op, v in sorted(changed.items()))
        warnings.warn(f"the model uses opset {opset}, newer than opset {NEWEST_OPSET}, the newest convc was checked "
                      f"against; these ops of the model changed since and are imported as convc knows them: {ops}",
                      OnnxOpsetWarning, stacklevel=4)


# -- tensors -----------------------------------------------------------------------
def tensor_array(t, cap: int) -> np.ndarray:
    """A TensorProto as an array; raises Refusal with the reason when its
    data does not fill its dims, its dtype is unknown or it is beyond ``cap``
    bytes -- all checked before anything is allocated."""
    onnx = _onnx()
    from onnx import helper, numpy_helper

    dims = tuple(int(d) for d in t.dims)
    if any(d < 0 for d in dims):
        raise Refusal(f"dims {dims} has a negative entry")
    try:
        np_dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
        field = helper.tensor_dtype_to_field(t.data_type)
    except (KeyError, ValueError, TypeError):
        raise Refusal(f"data_type {t.data_type} is not an ONNX tensor type") from None
    if t.data_location == onnx.TensorProto.EXTERNAL:
        raise Refusal("its data is in an external file that was not loaded")
    n = int(np.prod(dims, dtype=object)) if dims else 1
    name = onnx.TensorProto.DataType.Name(t.data_type).lower()
    bits = {"int4": 4, "uint4": 4, "float4e2m1": 4, "int2": 2, "uint2": 2}.get(name, 8 * np_dtype.itemsize)
    if np_dtype.kind != "O":            # (strings: one entry each, any length)
        if len(t.raw_data):
            have, want, unit = len(t.raw_data), -(-n * bits // 8), "bytes of raw_data"
        else:
            per_value = 2 if name.startswith("complex") else 1          # (real, imaginary) pairs
            per_int32 = 8 // bits if bits < 8 and field == "int32_data" else 1   # sub-byte types: a byte per entry
            have, want, unit = len(getattr(t, field)), -(-n * per_value // per_int32), f"values in {field}"
        if have != want:
            raise Refusal(f"it holds {have} {unit}, where its dims {dims} of {name} need {want}")
    if n * np_dtype.itemsize > cap:
        raise Refusal(f"dims {dims} of {name} make {show_bytes(n * np_dtype.itemsize)}, beyond the memory cap of "
                      f"{show_bytes(cap)} (CONVC_MAX_MEMORY, else the available memory)")
    try:
        arr = numpy_helper.to_array(t)
    except Exception as e:      # noqa: BLE001 -- whatever else onnx finds wrong with it
        raise Refusal(f"onnx cannot read it: {type(e).__name__}: {e}") from None
    if tuple(arr.shape) != dims:
        raise Refusal(f"its data has shape {tuple(arr.shape)}, its dims say {dims}")
    if not (arr.flags.owndata and arr.flags.c_contiguous):
        arr = np.array(arr, order="C")      # (onnx returns a view; one tensor's copy, its base freed at once)
    arr.flags.writeable = False             # immutable: a param made of it shares it (ir.frozen), no second copy
    return arr


# -- folding -----------------------------------------------------------------------
class FoldBudget:
    """What folding may compute in one import: each result's size known
    before anything is computed, and all of them within ``total`` bytes
    (the larger of :data:`FOLD_FLOOR` and :data:`FOLD_PER_WEIGHT` times the
    initializers, at most :func:`memory_cap`); ConstantOfShape's fills
    within ``fill_total`` besides (:data:`FOLD_FILLS`, at most the cap)."""

    def __init__(self, weight_bytes: int, opset: int):
        self.cap, self.cap_source = memory_cap()
        self.total = min(self.cap, max(FOLD_FLOOR, FOLD_PER_WEIGHT * weight_bytes))
        self.fill_total = min(self.cap, FOLD_FILLS)
        self.used = self.fills = 0
        self.opset = opset

    def rule(self, fill: bool = False) -> str:
        if fill:
            return (f"the cap on ConstantOfShape's results at import, {show_bytes(self.fill_total)}: "
                    f"{FOLD_FILLS >> 20} MiB, at most {self.cap} bytes ({self.cap_source}; CONVC_MAX_MEMORY sets it)")
        return (f"the cap on constants computed at import, {show_bytes(self.total)}: the larger of "
                f"{FOLD_FLOOR >> 20} MiB and {FOLD_PER_WEIGHT}x the model's initializers, at most {self.cap} bytes "
                f"({self.cap_source}; CONVC_MAX_MEMORY sets it)")

    def check(self, node, args) -> None:
        """Raise Refusal (the reason) unless folding ``node`` on the
        arrays ``args`` (None: an omitted input) stays within the budget."""
        onnx = _onnx()
        for a in node.attribute:
            if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise Refusal(f"it is control flow (attribute {a.name!r} is a subgraph); convc does not run "
                              f"subgraphs at import, whose trip counts are unbounded")
            for t in ([a.t] if a.HasField("t") else []) + list(a.tensors):
                tensor_array_size(t, self)
            if a.HasField("sparse_tensor"):
                tensor_array_size(a.sparse_tensor, self, sparse=True)
        sizes = self.output_sizes(node, args)
        new = sum(b for b, _, _ in sizes)
        fill = node.op_type == "ConstantOfShape"
        used, total = (self.fills, self.fill_total) if fill else (self.used, self.total)
        if used + new > total:
            what = ", ".join(t for _, t, _ in sizes) + f": {show_bytes(new)}" + (
                f", with the {show_bytes(used)} folded before it" if used else "")
            raise Refusal(f"folding it makes {what}, beyond {self.rule(fill)}")
        elements = max((n for _, _, n in sizes), default=0)
        if node.op_type not in _VECTORIZED and elements > FOLD_MAX_LOOPED:
            raise Refusal(f"folding it makes {', '.join(t for _, t, _ in sizes)}: {elements} elements, beyond "
                          f"the {FOLD_MAX_LOOPED} convc lets onnx.reference compute one by one (in Python) for "
                          f"{node.op_type}")
        macs = _macs(node, args)
        if macs > FOLD_MAX_MACS:
            raise Refusal(f"folding it takes {macs:.3g} multiply-adds, beyond the {FOLD_MAX_MACS:.3g} convc "
                          f"spends on one node at import")
        if fill:
            self.fills += new
        else:
            self.used += new

    def claim(self, nbytes: int, what: str) -> None:
        """Count ``nbytes`` of a constant made at import against the budget
        (Refusal if they do not fit)."""
        if self.used + nbytes > self.total:
            raise Refusal(f"{what} would take {show_bytes(nbytes)}, beyond {self.rule()}")
        self.used += nbytes

    def output_sizes(self, node, args) -> list[tuple[int, str, int]]:
        """(bytes, what, elements) of each output, from ONNX shape inference (values
        of the constant inputs included), before anything is computed."""
        onnx = _onnx()
        from onnx import helper, numpy_helper, shape_inference

        try:
            schema = onnx.defs.get_schema(node.op_type, self.opset, node.domain or "")
        except Exception:       # noqa: BLE001 -- SchemaError
            raise Refusal(f"onnx has no op {node.op_type!r} in opset {self.opset}") from None
        types, data = {}, {}
        for name, a in zip(node.input, args):
            if not name or a is None:
                continue
            elem = helper.np_dtype_to_tensor_dtype(a.dtype) if a.dtype.kind != "U" else onnx.TensorProto.STRING
            types[name] = helper.make_tensor_type_proto(elem, a.shape)
            if a.size <= 1 << 16:       # shape-like inputs: what data propagation reads
                data[name] = numpy_helper.from_array(a, name)
        try:
            out = shape_inference.infer_node_outputs(schema, node, types, input_data=data)
        except Exception:       # noqa: BLE001 -- inference refuses the node: no sizes known
            out = {}
        sizes = []
        for o in node.output:
            if not o:
                continue
            tp = out.get(o)
            tt = tp.tensor_type if tp is not None and tp.HasField("tensor_type") else None
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim] \
                if tt is not None and tt.HasField("shape") else None
            try:
                dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt is not None else None
            except (KeyError, ValueError, TypeError):
                dtype = None
            item, dtype = (dtype.itemsize, dtype.name) if dtype is not None else (8, "a tensor")
            if dims is not None and all(d is not None for d in dims):
                n = int(np.prod(dims, dtype=object)) if dims else 1
                sizes.append((n * item, f"{dtype} of shape {tuple(dims)}", n))
            else:
                n = self._data_dependent(node, args)
                sizes.append((n * item, f"{dtype} of up to {n} elements", n))
        return sizes

    @staticmethod
    def _data_dependent(node, args) -> int:
        present = [a for a in args if a is not None]
        if node.op_type == "Range" and len(present) == 3 and all(a.size == 1 for a in present):
            start, limit, delta = (float(a.reshape(-1)[0]) for a in present)     # (float16: no inference)
            if delta != 0 and np.isfinite([start, limit, delta]).all():
                return max(int(np.ceil((limit - start) / delta)), 0)
        if node.op_type in _GROWING_DATA_DEPENDENT and present:
            return _GROWING_DATA_DEPENDENT[node.op_type]([a.size for a in present], [a.ndim for a in present])
        if node.op_type in _SHRINKING_DATA_DEPENDENT and present:
            return int(present[0].size)
        raise Refusal("ONNX shape inference cannot tell the size of its result beforehand, so convc does not "
                      "fold it")


def tensor_array_size(t, budget: FoldBudget, sparse: bool = False) -> None:
    """Raise Refusal when a Constant's tensor would not fit the budget."""
    dims = tuple(int(d) for d in t.dims)
    if any(d < 0 for d in dims):
        raise Refusal(f"its {'sparse ' if sparse else ''}value has dims {dims} with a negative entry")
    n = int(np.prod(dims, dtype=object)) if dims else 1
    if budget.used + 8 * n > budget.total:
        raise Refusal(f"its {'sparse ' if sparse else ''}value of dims {dims} makes up to {show_bytes(8 * n)}, "
                      f"beyond {budget.rule()}")
    if not sparse:
        tensor_array(t, budget.total)


def _macs(node, args) -> int:
    """Multiply-adds of a Conv / ConvTranspose / MatMul / Gemm / Einsum of
    constants (0 for ops whose work is about their data's size)."""
    shapes = [tuple(a.shape) if a is not None else () for a in args]
    if node.op_type in ("Conv", "ConvTranspose", "ConvInteger", "DeformConv") and len(shapes) >= 2:
        x, w = shapes[0], shapes[1]
        return int(np.prod(x, dtype=object)) * int(np.prod(w, dtype=object)) // max(1, x[1] if len(x) > 1 else 1)
    if node.op_type in ("MatMul", "MatMulInteger", "Gemm") and len(shapes) >= 2 and shapes[0] and shapes[1]:
        a, b = shapes[0], shapes[1]      # (..., M, K) x (..., K, N): a's elements x N, at most a x b / K
        k = max(1, min(a[-2:]) if node.op_type == "Gemm" else a[-1])
        return int(np.prod(a, dtype=object)) * int(np.prod(b, dtype=object)) // k
    if node.op_type == "Einsum":
        return int(np.prod([int(np.prod(s, dtype=object)) for s in shapes], dtype=object))
    return 0

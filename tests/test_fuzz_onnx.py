"""Fuzz ``from_onnx`` with mutated ONNX models (issue 16, "Tests that reach
every path"): the only allowed outcomes are a correct import or a
``ConvcError``.

Seeds: a small conv net written by convc's own exporter, a net with the
Shape -> Gather -> Concat -> Reshape chain exporters write, and one-node
models of the ops convc imports with their attributes set (as the onnx
package's backend cases, whose generators take ~40 s to collect here).
Hypothesis mutates one of them: attribute values (zero, negative, huge,
plausible), dims, dtypes, raw_data lengths, node order, tensor names, opset
and IR version, dropped and duplicated nodes, flipped bytes of the
serialized model.

Every model goes to a worker process (this file run as a script) that
imports it, compiles an imported graph for the numpy target and compares it
on random input with ONNX Runtime when ORT accepts the model (with
onnx.reference where ORT is not installed, or with
``CONVC_FUZZ_ORACLE=reference``; models where onnx.reference is known to be
wrong are then not compared). The worker runs with an address-space limit
and each model with a wall-time bound, so a hang, a crash or a huge
allocation fails the test rather than the machine.

``CONVC_FUZZ_EXAMPLES=N`` runs N random examples (default: the same 400
every run, derandomized, ~5 s here).
"""
from __future__ import annotations

import os
import pickle
import resource
import select
import struct
import subprocess
import sys
import tempfile
import traceback
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

EXAMPLES = int(os.environ.get("CONVC_FUZZ_EXAMPLES", "0") or 0)
TIME_LIMIT = 60             # seconds per model: import, compile (numpy target), run, the oracle
WORKER_MEMORY = 6 << 30     # the worker's address space: a runaway allocation is a MemoryError
FOLD_CAP = 1 << 30          # CONVC_MAX_MEMORY in the worker: below the address-space limit


# -- seeds ---------------------------------------------------------------------------
def _rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _convc_net():
    import convc as cc
    g = cc.Graph("fuzz_net")
    x = g.input("x", (1, 3, 8, 8))
    h = cc.relu(cc.conv(x, g.param("w1", _rand(4, 3, 3, 3, seed=1)), g.param("b1", _rand(4, seed=2)), padding=1))
    h = cc.max_pool(h, 2, 2)
    h = cc.conv(h, g.param("w2", _rand(4, 2, 3, 3, seed=3)), None, stride=2, padding=1, groups=2)
    h = cc.reshape(h, (1, 16))
    g.output(cc.dense(h, g.param("fc", _rand(5, 16, seed=4)), g.param("fb", _rand(5, seed=5))), "y")
    return cc.to_onnx(g, opset=17)


def _shape_chain_net():
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1], strides=[1, 1], name="conv"),
             helper.make_node("Shape", ["h"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "zero"], ["n"], axis=0, name="gather"),
             helper.make_node("Unsqueeze", ["n", "axes"], ["n1"], name="unsqueeze"),
             helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0, name="concat"),
             helper.make_node("Reshape", ["h", "target"], ["flat"], name="reshape"),
             helper.make_node("Concat", ["n1", "one"], ["oshape"], axis=0, name="concat_ones"),
             helper.make_node("ConstantOfShape", ["oshape"], ["ones"], value=numpy_helper.from_array(
                 np.ones(1, np.float32)), name="const_of_shape"),
             helper.make_node("Gemm", ["flat", "fcw", "fcb"], ["g"], transB=1, name="gemm"),
             helper.make_node("Mul", ["g", "ones"], ["y"], name="mul")]
    inits = [numpy_helper.from_array(v, n) for n, v in (
        ("w", _rand(2, 3, 3, 3, seed=1)), ("zero", np.array(0, np.int64)), ("axes", np.array([0], np.int64)),
        ("minus1", np.array([-1], np.int64)), ("one", np.array([1], np.int64)), ("fcw", _rand(4, 32, seed=2)), ("fcb", _rand(4, seed=3)))]
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, (2, 3, 4, 4))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _one(op, x_shape, inits=(), opset=17, outputs=("y",), **attrs):
    """A one-node model reading x (and the initializers ``inits``)."""
    inits = [numpy_helper.from_array(np.asarray(v), n) for n, v in inits]
    node = helper.make_node(op, ["x"] + [t.name for t in inits], list(outputs), name=op.lower(), **attrs)
    g = helper.make_graph([node], op.lower(), [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _i64(*v):
    return np.array(v, np.int64)


def _one_node_seeds():
    x4 = (1, 2, 6, 7)
    return [
        _one("Conv", x4, [("w", _rand(4, 1, 3, 2)), ("b", _rand(4))], strides=[2, 1], pads=[1, 0, 1, 1],
             dilations=[1, 2], group=2, kernel_shape=[3, 2]),
        _one("ConvTranspose", x4, [("w", _rand(2, 3, 3, 3))], strides=[2, 2], pads=[1, 1, 0, 0],
             output_padding=[1, 0]),
        _one("MaxPool", x4, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1),
        _one("AveragePool", x4, kernel_shape=[2, 3], auto_pad="SAME_UPPER", count_include_pad=1),
        _one("Gemm", (3, 4), [("b", _rand(5, 4)), ("c", _rand(5))], alpha=0.5, beta=2.0, transB=1),
        _one("BatchNormalization", x4, [("s", _rand(2)), ("bb", _rand(2)), ("m", _rand(2)),
                                        ("v", np.abs(_rand(2)) + 1)], epsilon=1e-3),
        _one("Softmax", (2, 3, 4), axis=1),
        _one("Reshape", (2, 3, 4), [("shape", _i64(0, 4, -1))]),
        _one("Transpose", (2, 3, 4), perm=[2, 0, 1]),
        _one("Concat", (2, 3), [("c", _rand(2, 5))], axis=1),
        _one("Clip", (3, 4), [("lo", np.array(-0.5, np.float32)), ("hi", np.array(0.5, np.float32))]),
        _one("Pad", x4, [("pads", _i64(0, 1, 2, 0, 0, 0, 1, 3)), ("v", np.array(1.5, np.float32))]),
        _one("Slice", x4, [("st", _i64(1, -5)), ("en", _i64(6, 100)), ("ax", _i64(2, 3)), ("sp", _i64(2, 1))]),
        _one("Split", (2, 7), [("sp", _i64(3, 4))], outputs=("y", "z"), axis=1),
        _one("Resize", (1, 1, 3, 4), [("roi", np.zeros(0, np.float32)), ("sc", np.array([1, 1, 2, 1.5], np.float32))],
             mode="linear", coordinate_transformation_mode="half_pixel"),
        _one("MatMul", (2, 3, 4), [("b", _rand(4, 5))]),
        _one("ReduceMean", x4, [("ax", _i64(2, 3))], keepdims=1, opset=18),
        _one("LeakyRelu", (2, 5), alpha=0.3),
        _one("Flatten", (2, 3, 4), axis=2),
    ]


@lru_cache(maxsize=None)
def seeds() -> tuple[bytes, ...]:
    models = [_convc_net(), _shape_chain_net()] + _one_node_seeds()
    return tuple(m.SerializeToString() for m in models)


# -- mutations -----------------------------------------------------------------------
INTS = st.sampled_from([0, -1, 1, 2, 3, 7, 2**31 - 1, 2**31, 2**32, 2**63 - 1, -2**63, -2**31 - 1, 10**6])
FLOATS = st.sampled_from([0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf"), -float("inf"), 0.5])
NAMES = st.sampled_from(["x", "y", "w", "h", "s", "", "unsupported", "x\n", "%n", "a" * 300])


def _mutate(m, kind: str, data) -> None:
    """Apply one mutation of ``kind`` to the ModelProto ``m`` in place,
    drawing its details from ``data``."""
    g = m.graph
    pick = lambda seq: seq[data.draw(st.integers(0, len(seq) - 1))] if len(seq) else None      # noqa: E731
    if kind == "attribute":
        node = pick(g.node)
        attr = pick(node.attribute) if node is not None else None
        if attr is None:
            if node is not None:
                name = data.draw(st.sampled_from(["strides", "pads", "dilations", "group", "axis", "kernel_shape",
                                                  "perm", "auto_pad", "output_padding", "alpha"]))
                node.attribute.append(helper.make_attribute(name, data.draw(st.lists(INTS, min_size=1, max_size=6))))
            return
        if attr.type == onnx.AttributeProto.INT:
            attr.i = data.draw(INTS)
        elif attr.type == onnx.AttributeProto.INTS and len(attr.ints):
            attr.ints[data.draw(st.integers(0, len(attr.ints) - 1))] = data.draw(INTS)
        elif attr.type == onnx.AttributeProto.INTS:
            attr.ints.extend(data.draw(st.lists(INTS, max_size=4)))
        elif attr.type == onnx.AttributeProto.FLOAT:
            attr.f = data.draw(FLOATS)
        elif attr.type == onnx.AttributeProto.STRING:
            attr.s = data.draw(st.sampled_from([b"", b"SAME_UPPER", b"VALID", b"reflect", b"nearest", b"\xff"]))
        elif attr.type == onnx.AttributeProto.TENSOR:
            attr.t.dims.append(data.draw(INTS.filter(lambda v: -2**63 <= v < 2**63)))
        attr.type = data.draw(st.sampled_from([attr.type] * 4 + [onnx.AttributeProto.INTS, onnx.AttributeProto.FLOAT]))
    elif kind == "small":          # a plausible value: more mutants stay valid and are compared
        node = pick(g.node)
        attr = pick([a for a in node.attribute if a.type in (onnx.AttributeProto.INT, onnx.AttributeProto.INTS)]) \
            if node is not None and data.draw(st.booleans()) else None
        value = data.draw(st.integers(-2, 4))
        if attr is not None and attr.type == onnx.AttributeProto.INT:
            attr.i = value
        elif attr is not None and len(attr.ints):
            attr.ints[data.draw(st.integers(0, len(attr.ints) - 1))] = value
        else:
            vi = pick(g.input)
            dims = vi.type.tensor_type.shape.dim if vi is not None else []
            if len(dims):
                dims[data.draw(st.integers(0, len(dims) - 1))].dim_value = data.draw(st.integers(1, 9))
    elif kind == "drop_ints":
        node = pick(g.node)
        attr = pick([a for a in node.attribute if a.type == onnx.AttributeProto.INTS]) if node is not None else None
        if attr is not None and len(attr.ints):
            del attr.ints[-1]
    elif kind == "dims":
        target = pick(list(g.initializer) + [None] * len(g.input))
        if target is not None:
            if len(target.dims):
                target.dims[data.draw(st.integers(0, len(target.dims) - 1))] = data.draw(
                    INTS.filter(lambda v: -2**63 <= v < 2**63))
            else:
                target.dims.append(data.draw(st.integers(0, 4)))
        else:
            vi = pick(g.input)
            dims = vi.type.tensor_type.shape.dim if vi is not None else []
            if len(dims):
                dims[data.draw(st.integers(0, len(dims) - 1))].dim_value = data.draw(
                    st.sampled_from([0, 1, 2, 5, 2**31, 2**40]))
    elif kind == "dtype":
        target = pick(list(g.initializer) + list(g.input))
        if isinstance(target, onnx.TensorProto):
            target.data_type = data.draw(st.integers(0, 26))
        elif target is not None:
            target.type.tensor_type.elem_type = data.draw(st.integers(0, 26))
    elif kind == "raw_data":
        t = pick([t for t in g.initializer if len(t.raw_data)])
        if t is not None:
            n = data.draw(st.integers(-8, 8))
            t.raw_data = t.raw_data[:n] if n < 0 else t.raw_data + b"\0" * (n or 1)
    elif kind == "order" and len(g.node) > 1:
        i, j = data.draw(st.integers(0, len(g.node) - 1)), data.draw(st.integers(0, len(g.node) - 1))
        a, b = onnx.NodeProto(), onnx.NodeProto()
        a.CopyFrom(g.node[i])
        b.CopyFrom(g.node[j])
        g.node[i].CopyFrom(b)
        g.node[j].CopyFrom(a)
    elif kind == "rename":
        node = pick(g.node)
        if node is not None:
            names = node.input if data.draw(st.booleans()) or not len(node.output) else node.output
            if len(names):
                names[data.draw(st.integers(0, len(names) - 1))] = data.draw(NAMES)
    elif kind == "graph_names":
        seq = data.draw(st.sampled_from(["input", "output", "initializer"]))
        items = getattr(g, seq)
        if len(items):
            if data.draw(st.booleans()):
                items.add().CopyFrom(items[data.draw(st.integers(0, len(items) - 1))])        # a duplicate
            else:
                items[data.draw(st.integers(0, len(items) - 1))].name = data.draw(NAMES)
    elif kind == "opset":
        m.opset_import[0].version = data.draw(st.sampled_from([0, 1, 6, 7, 10, 11, 13, 17, 18, 22, 99999]))
    elif kind == "ir_version":
        m.ir_version = data.draw(st.sampled_from([0, 1, 3, 4, 7, 10, 999]))
    elif kind == "drop_node" and len(g.node):
        del g.node[data.draw(st.integers(0, len(g.node) - 1))]
    elif kind == "duplicate_node" and len(g.node):
        g.node.add().CopyFrom(g.node[data.draw(st.integers(0, len(g.node) - 1))])


MUTATIONS = ["attribute", "attribute", "attribute", "small", "small", "small", "small", "drop_ints", "dims", "dtype", "raw_data", "order", "rename",
             "graph_names", "opset", "ir_version", "drop_node", "duplicate_node", "bytes"]


def mutated(data) -> bytes:
    """A seed with 1 to 3 mutations, serialized."""
    blob = seeds()[data.draw(st.integers(0, len(seeds()) - 1), label="seed")]
    m = onnx.ModelProto()
    m.ParseFromString(blob)
    flips = []
    for kind in data.draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3)):
        if kind == "bytes":
            flips.append(data.draw(st.tuples(st.floats(0, 1), st.integers(0, 255), st.booleans())))
        else:
            _mutate(m, kind, data)
    try:
        blob = m.SerializeToString()
    except Exception:       # noqa: BLE001 -- a mutation protobuf cannot encode (e.g. a bad utf-8 name)
        return blob
    for where, value, truncate in flips:
        at = int(where * (len(blob) - 1))
        blob = blob[:at] if truncate and where > 0.5 else blob[:at] + bytes([value]) + blob[at + 1:]
    return blob


# -- the worker ----------------------------------------------------------------------
ORACLE = "reference" if os.environ.get("CONVC_FUZZ_ORACLE") == "reference" else "ort"
_NP = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64, TensorProto.INT64: np.int64}


def _reference_differs(m) -> str | None:
    """Why onnx.reference's answer for ``m`` cannot be trusted (where it is
    known to differ from ONNX, as tests/test_onnx_import.py records), or None."""
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 1)
    for n in m.graph.node:
        attrs = {a.name: a for a in n.attribute}
        if n.op_type == "ConvTranspose" and "group" in attrs and attrs["group"].i != 1:
            return "onnx.reference mixes up a grouped ConvTranspose's groups"
        if n.op_type in ("Softmax", "LogSoftmax", "Hardmax") and opset < 13:
            return "onnx.reference applies opset 13's Softmax to older opsets"
        if n.op_type == "BatchNormalization" and 9 <= opset < 14:
            return "onnx.reference's BatchNormalization-9 differs from ONNX Runtime's (and convc's)"
        if "broadcast" in attrs or (n.op_type in ("Resize", "Upsample") and opset < 11):
            return "onnx.reference does not know opset < 7 broadcasting / Resize-10's rounding"
        if any(a.type == onnx.AttributeProto.FLOAT and not np.isfinite(a.f) for a in n.attribute):
            return "onnx.reference's LeakyRelu and others compute 0 * inf = NaN for a non-finite attribute"
    return None


def _oracle(blob: bytes):
    """The inputs [(name, dtype)] of the model and a function computing its
    outputs: ONNX Runtime, or onnx.reference (``CONVC_FUZZ_ORACLE=reference``,
    or ORT not installed: it is not among the test extras). Raises what the
    oracle raises for a model it refuses."""
    if ORACLE == "ort":
        try:
            import onnxruntime as ort
        except ImportError:
            ort = None
        if ort is not None:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = opts.inter_op_num_threads = 1
            opts.log_severity_level = 4
            sess = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
            kinds = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64}
            return [(i.name, kinds.get(i.type)) for i in sess.get_inputs()], lambda feeds: sess.run(None, feeds)
    from onnx.reference import ReferenceEvaluator

    m = onnx.ModelProto()
    m.ParseFromString(blob)
    why = _reference_differs(m)
    if why:
        raise ValueError(why)
    ref = ReferenceEvaluator(m)
    inits = {t.name for t in m.graph.initializer}
    inputs = [(i.name, _NP.get(i.type.tensor_type.elem_type)) for i in m.graph.input if i.name not in inits]
    return inputs, lambda feeds: ref.run(None, feeds)


def check_one(blob: bytes) -> dict:
    """Import ``blob``; for a graph, compile it (numpy target) and compare
    with ONNX Runtime (or onnx.reference). Returns {"outcome", "detail"}."""
    import convc as cc
    from convc.onnx import from_onnx, node_name

    try:
        g = from_onnx(blob)
    except cc.ConvcError as e:
        bug = "a bug in convc" in str(e)
        return {"outcome": "bug" if bug else "refused", "detail": str(e)[:3000]}
    except BaseException:       # noqa: BLE001 -- what the fuzz is looking for
        return {"outcome": "bare", "detail": traceback.format_exc()[-4000:]}
    try:
        mod = cc.compile(g, "numpy")
    except cc.ConvcError as e:
        return {"outcome": "refused at compile", "detail": str(e)[:2000]}
    except BaseException:       # noqa: BLE001
        return {"outcome": "bare at compile", "detail": traceback.format_exc()[-4000:]}
    try:
        inputs, run = _oracle(blob)
    except Exception as e:      # noqa: BLE001 -- the oracle refuses the model: nothing to compare with
        return {"outcome": "imported", "detail": f"the oracle refuses it: {type(e).__name__}: {e}"[:300]}
    rng = np.random.default_rng(0)
    feeds = {}
    for name, dtype in inputs:
        shape = g.value(node_name(name, "input")).shape if node_name(name, "input") in g.input_names else None
        if dtype is None or shape is None or np.prod(shape) > 1 << 16:
            return {"outcome": "imported", "detail": f"input {name} not compared ({dtype}, {shape})"}
        feeds[name] = (rng.standard_normal(shape) * 2).astype(dtype)
    try:
        want = run(feeds)
    except Exception as e:      # noqa: BLE001
        return {"outcome": "imported", "detail": f"the oracle cannot run it: {type(e).__name__}"}
    try:
        got = mod.run({node_name(n, "input"): a for n, a in feeds.items()})
    except cc.ConvcError as e:
        return {"outcome": "refused at run", "detail": str(e)[:2000]}
    except BaseException:       # noqa: BLE001
        return {"outcome": "bare at run", "detail": traceback.format_exc()[-4000:]}
    if len(got) != len(want):
        return {"outcome": "wrong", "detail": f"{len(got)} outputs, the oracle has {len(want)}"}
    for (name, y), w in zip(got.items(), want):
        w = np.asarray(w)
        if y.shape != w.shape or not np.allclose(y, w, rtol=1e-3, atol=1e-4, equal_nan=True):
            return {"outcome": "wrong", "detail": f"output {name}: convc {y.shape} vs {w.shape}, max |diff| "
                                                  f"{np.nanmax(np.abs(y - w)) if y.shape == w.shape else '-'}"}
    return {"outcome": "matches", "detail": ""}


def worker() -> None:
    """Serve check_one over stdin/stdout: a 4-byte length, then the model."""
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))
    import warnings

    try:
        import onnxruntime
        onnxruntime.set_default_logger_severity(4)
    except ImportError:
        pass
    warnings.simplefilter("ignore")
    check_one(seeds()[0])                       # warm up the imports
    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    while True:
        head = sys.stdin.buffer.read(4)
        if len(head) < 4:
            return
        blob = sys.stdin.buffer.read(struct.unpack("<I", head)[0])
        reply = pickle.dumps(check_one(blob))
        out.write(struct.pack("<I", len(reply)) + reply)
        out.flush()


class Worker:
    """The worker process; restarted after a timeout or a crash."""

    def __init__(self):
        self.proc = None

    def start(self):
        env = dict(os.environ, CONVC_MAX_MEMORY=str(FOLD_CAP), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                   CONVC_FUZZ_ORACLE=ORACLE)
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, cwd=tempfile.gettempdir())
        if not self._wait(TIME_LIMIT * 2) or self.proc.stdout.readline() != b"ready\n":
            raise RuntimeError("the fuzz worker did not start")

    def _wait(self, seconds: float) -> bool:
        return bool(select.select([self.proc.stdout], [], [], seconds)[0])

    def stop(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def check(self, blob: bytes) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(struct.pack("<I", len(blob)) + blob)
        self.proc.stdin.flush()
        if not self._wait(TIME_LIMIT):
            self.stop()
            return {"outcome": "hang", "detail": f"no answer within {TIME_LIMIT} s"}
        head = self.proc.stdout.read(4)
        if len(head) < 4:
            code = self.proc.wait()
            self.proc = None
            return {"outcome": "crash", "detail": f"the worker died (exit status {code})"}
        return pickle.loads(self.proc.stdout.read(struct.unpack("<I", head)[0]))


ALLOWED = {"refused", "refused at compile", "imported", "matches"}


@pytest.fixture(scope="module")
def fuzz_worker():
    w = Worker()
    yield w
    w.stop()


def _check(worker_, blob: bytes, tmp_dir: Path) -> None:
    result = worker_.check(blob)
    event(result["outcome"])            # (pytest --hypothesis-show-statistics: how often each outcome came)
    if result["outcome"] not in ALLOWED:
        path = tmp_dir / f"fuzz_{abs(hash(blob)):x}.onnx"
        path.write_bytes(blob)
        raise AssertionError(f"from_onnx on a mutated model ({path}): {result['outcome']}\n{result['detail']}")


def _with(m, edit):
    edit(m)
    return m


def _attr(m, name):
    return next(a for a in m.graph.node[0].attribute if a.name == name)


def _set_ints_type(a):
    a.type = onnx.AttributeProto.INTS


def _graph_name_bytes(m):
    return m.SerializeToString().replace(b"\x12\x05split", b"\x12\x05spl\xect")


FOUND = {   # what the fuzz found (each was a bare exception, a wrong result or an accepted invalid model)
    "attribute_of_another_type": (lambda: _with(_one("Split", (2, 7), [("sp", _i64(3, 4))], outputs=("y", "z"), axis=1),
                                                lambda m: _set_ints_type(_attr(m, "axis"))),
                                  r"attribute 'axis' is ints; Split-17 takes int"),
    "keepdims_2_changed_the_shape": (lambda: _one("ReduceMean", (1, 2, 6, 7), [("ax", _i64(2, 3))], keepdims=2, opset=18),
                                     r"keepdims is 2; ONNX's flags are 0 or 1"),
    "axis_2_32_wrapped_around": (lambda: _one("Softmax", (2, 3, 4), axis=2**32, opset=11),
                                 r"axis 4294967296 is out of range for an input of rank 3"),
    "opset_1_reshape_without_shape": (lambda: _one("Reshape", (2, 3, 4), opset=1), r"attribute shape is required"),
    "reshape_without_its_shape_input": (lambda: _one("Reshape", (2, 3, 4)), r"it has 1 inputs; Reshape-17 takes 2"),
    "clip_bound_not_a_scalar": (lambda: _one("Clip", (3, 4), [("lo", _rand(2)), ("hi", np.array(0.5, np.float32))]),
                                r"min \(input 'lo'\) must be one number"),
    "clip_bound_of_another_type": (lambda: _one("Clip", (3, 4), [("lo", np.array(1, np.uint32))]),
                                   r"inputs 'x' \(tensor\(float\)\) and 'lo' \(tensor\(uint32\)\) must have one type"),
    "attribute_of_an_older_opset": (lambda: _one("Pad", (1, 2, 6, 7), [("pads", _i64(0, 0, 1, 1, 0, 0, 1, 1))],
                                                 pads=[0]), r"attribute 'pads' is not an attribute of Pad-17"),
    "pads_not_integers": (lambda: _one("Pad", (1, 2, 6, 7), [("pads", np.zeros(8, np.complex64))]),
                          r"tensor\(complex64\)"),
    "expand_to_an_incompatible_shape": (lambda: _one("Expand", (2, 3), [("s", _i64(4, 5))]),
                                        r"shape \[4, 5\] does not broadcast with the input's \(2, 3\)"),
    "string_attribute_not_utf8": (lambda: _one("Resize", (1, 1, 3, 4), [("roi", np.zeros(0, np.float32)),
                                                                        ("sc", np.array([1, 1, 2, 2], np.float32))],
                                               mode=b"\xff"), r"attribute 'mode' is not UTF-8 text"),
    "pool_window_of_padding_only": (lambda: _one("MaxPool", (1, 2, 6, 7), kernel_shape=[3, 3], pads=[7, 1, 1, 1],
                                                 strides=[2, 2], ceil_mode=1),
                                    r"pads \[7, 1, 1, 1\] reach a whole window \(3 wide, dilation 1\)"),
    "pad_of_a_huge_constant": (lambda: _one("Pad", (1, 2, 6, 7), [("pads", _i64(2**24, 0, 0, 0, 0, 0, 0, 0))]),
                               r"the padding of axis 0 of shape \(16777216, 2, 6, 7\) would take 10.50 GiB"),
    "avg_pool_window_of_ones": (lambda: _one("AveragePool", (1, 2, 6, 7), kernel_shape=[2**30, 3],
                                             pads=[2**30 - 1, 1, 2**30 - 1, 1]),
                                r"the window of ones of shape \(2, 1, 1073741824, 3\) would take 48.00 GiB"),
    "graph_name_not_utf8": (lambda: _graph_name_bytes(_one("Split", (2, 7), [("sp", _i64(3, 4))], outputs=("y", "z"))),
                            r"model.graph.name is b'spl\\xect', not UTF-8 text"),
}


@pytest.mark.parametrize("case", FOUND)
def test_fuzz_found(case):
    """Models the fuzz found, kept as regressions: each a clear ConvcError."""
    import convc as cc
    from convc.onnx import from_onnx

    make, pattern = FOUND[case]
    with pytest.raises(cc.ConvcError, match=pattern) as e:
        from_onnx(make())
    assert "a bug in convc" not in str(e.value)


def test_fuzz_seeds_import(fuzz_worker, tmp_path):
    """The seeds themselves import and match ONNX Runtime."""
    outcomes = [fuzz_worker.check(blob)["outcome"] for blob in seeds()]
    assert len(outcomes) >= 15
    assert outcomes == ["matches"] * len(outcomes), outcomes


@settings(max_examples=EXAMPLES or 400, deadline=None, derandomize=not EXAMPLES, database=None,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_from_onnx(fuzz_worker, tmp_path_factory, data):
    """Issue 16: a mutated model imports correctly or raises ConvcError;
    never a bare exception, a crash, a hang or a wrong result."""
    _check(fuzz_worker, mutated(data), tmp_path_factory.getbasetemp())


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]
    worker()

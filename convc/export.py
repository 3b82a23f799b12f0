"""Embedded export: a graph as a standalone C99 library with static memory.

``export_c(graph, out_dir, name)`` writes ``NAME.h`` (the API: ``NAME_run``,
``NAME_run_with_arena``, size macros, shapes and layout), ``NAME.c`` (one
static function per node, rendered from the same ``templates/c/<op>.c.j2``
and the same memory plan as the runtime, plus the weights as const data --
by default string literals of their bytes in a union with the typed array,
see ``weight_format`` -- unless ``weights_file``, which moves them to
``NAME_weights.c``) and
``NAME_test.c``, a host harness that embeds test vectors computed by the
reference interpreter and prints the maximum error.

``size_report(graph)`` compiles the library (with ``arm-none-eabi-gcc`` for a
Cortex-M4F when it is installed, else the host compiler) and reports flash
(code + const data) and RAM (arena + stack) per node and in total.

>>> from convc.models import lenet5
>>> exp = export_c(lenet5(), "out", name="lenet")      # doctest: +SKIP
>>> print(size_report(lenet5(), name="lenet").table())  # doctest: +SKIP
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .codegen.c import bind_buffers, node_functions, output_copies
from .codegen.env import CTYPES, Namer, cfloat, environment
from .errors import CompileError, ConvcError
from .ir import INT_DTYPES, Graph, require_graph
from .loading import load_model  # noqa: F401  (its home was here: explain.py and older callers import it)
from .schedule import Plan, _align, plan as make_plan

# The Cortex-M4F of the CI check (Debian package gcc-arm-none-eabi).
ARM_CC = "arm-none-eabi-gcc"
ARM_FLAGS = ["-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"]
# A second build keeps every node in its own function and section so its
# code can be measured and apportioned (identical functions are not folded).
SIZE_FLAGS = ["-std=c99", "-Os", "-fno-inline-functions-called-once", "-fno-inline-small-functions",
              "-fno-ipa-icf", "-ffunction-sections", "-fdata-sections"]


# -- memory figures -----------------------------------------------------------
def live_bytes(p: Plan) -> list[int]:
    """Bytes of arena buffers alive while each scheduled node runs (its
    inputs still needed and its output being written), in schedule order."""
    return [sum(_align(b.nbytes) for b in p.buffers if b.start <= step <= b.end) for step in range(len(p.order))]


def peak_live_bytes(p: Plan) -> int:
    """The peak of live buffers: what any plan needs at least; the arena
    equals it when the planner leaves no holes."""
    return max(live_bytes(p), default=0)


# -- rendering ----------------------------------------------------------------
def c_literals(a: np.ndarray, per_line: int = 8) -> list[str]:
    """Exact C literals of ``a``'s elements, ``per_line`` to a string. float32
    values print as numpy's shortest string that reads back as the same
    float32 (``0.1f``; straight from the float32, never through a double,
    which could round twice), float64 as Python's ``repr``; both read back
    bit for bit."""
    flat = np.asarray(a).reshape(-1)
    if flat.dtype == np.float32:
        vals = [_float32_literal(v) for v in flat]
    elif flat.dtype == np.float64:
        vals = [cfloat(v, "double") for v in flat.tolist()]
    elif flat.dtype == np.int64:
        vals = ["INT64_MIN" if v == -2**63 else f"INT64_C({v})" for v in flat.tolist()]
    elif flat.dtype == np.int32:
        vals = ["INT32_MIN" if v == -2**31 else str(v) for v in flat.tolist()]
    elif flat.dtype in (np.uint32, np.uint64):      # beyond int: the unsigned constant macros
        bits = 8 * flat.dtype.itemsize
        vals = [f"UINT{bits}_C({v})" for v in flat.tolist()]
    else:                               # int16, uint16, int8, uint8: plain decimal literals
        vals = [str(v) for v in flat.tolist()]
    if not vals:
        vals = ["0"]                    # C has no empty arrays; the length is 1 then
    return [", ".join(vals[i:i + per_line]) for i in range(0, len(vals), per_line)]


# The unsigned word that carries each element size's bit patterns in the "hex" form.
WORDS = {4: "uint32_t", 8: "uint64_t"}
WEIGHT_FORMATS = ("bytes", "hex", "decimal")


def c_words(a: np.ndarray, per_line: int = 8) -> list[str]:
    """The bit patterns of ``a``'s elements (4 or 8 bytes each) as C hex
    constants of the same width (``0x3f800000`` for 1.0f), ``per_line`` to a
    string: the "hex" form of the export's weights, read back through a
    union as the original values bit for bit on a target of any byte order.
    Built with numpy, not a Python loop per value."""
    flat = np.ascontiguousarray(a).reshape(-1)
    size = flat.dtype.itemsize
    if size not in WORDS:
        raise ConvcError(f"c_words: {flat.dtype} has {size}-byte elements; hex words are for 4- and 8-byte types")
    if flat.size == 0:
        return ["0"]                    # C has no empty arrays; the length is 1 then
    digits = 2 * size
    # big-endian bytes print most significant digit first: the constant's value is the element's bits
    hexes = np.frombuffer(flat.view(f"u{size}").astype(f">u{size}").tobytes().hex().encode(), np.uint8)
    cells = np.empty((flat.size, digits + 4), np.uint8)       # "0x" + digits + ", "
    cells[:, 0], cells[:, 1] = ord("0"), ord("x")
    cells[:, 2:2 + digits] = hexes.reshape(-1, digits)
    cells[:, -2], cells[:, -1] = ord(","), ord(" ")
    text = cells.tobytes().decode("ascii")
    step = per_line * (digits + 4)
    return [text[i:i + step].removesuffix(", ") for i in range(0, len(text), step)]


def _escapes() -> np.ndarray:
    """How each byte appears in a C string literal: printable ASCII as itself
    (but backslash, quote and ``?``, which could start a trigraph), the rest
    as the shortest octal escape (row 0) or the three-digit one (row 1), which
    a following octal digit cannot extend."""
    short, full = [], []
    for b in range(256):
        c = chr(b)
        raw = 0x20 <= b < 0x7f and c not in '\\"?'
        short.append(c if raw else "\\" + format(b, "o"))
        full.append(c if raw else "\\" + format(b, "03o"))
    return np.array(short + full, dtype=object)


_ESCAPES = _escapes()


def c_string(data: bytes, per_line: int = 64) -> list[str]:
    """``data`` as C string literals of ``per_line`` bytes each (adjacent
    literals concatenate into one): the "bytes" form of the export's weights.
    One token per line instead of one per value makes big weight arrays
    compile several times faster than initializer lists."""
    b = np.frombuffer(data, np.uint8)
    if b.size == 0:
        return ['""']
    octal_next = np.zeros(b.size, np.intp)      # 1 where the next byte prints as an octal digit 0-7
    octal_next[:-1] = (b[1:] >= 0x30) & (b[1:] <= 0x37)
    pieces = _ESCAPES[b.astype(np.intp) + 256 * octal_next].tolist()
    return ['"' + "".join(pieces[i:i + per_line]) + '"' for i in range(0, b.size, per_line)]


def weight_init(a: np.ndarray, weight_format: str = "bytes") -> dict:
    """The template fields of one weight array: ``word`` (the element type of
    the union's first member, "" for a plain array of one literal per value),
    ``string`` (the first member is initialized by string literals) and
    ``lines``. "bytes": the values' little-endian bytes as string literals
    (any dtype); "hex": 4- and 8-byte elements as hex words of their bits
    (1- and 2-byte integers stay decimal: packing them into words would
    depend on the target's byte order); "decimal": one C literal per value."""
    if weight_format not in WEIGHT_FORMATS:
        raise ConvcError(f"weight format {weight_format!r}: expected one of {', '.join(WEIGHT_FORMATS)}")
    a = np.asarray(a)
    if weight_format == "bytes" and a.size:
        return dict(word="unsigned char", string=True, length_bytes=a.nbytes,
                    lines=c_string(np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes()))
    if weight_format == "hex" and a.dtype.itemsize in WORDS:
        return dict(word=WORDS[a.dtype.itemsize], string=False, length_bytes=0, lines=c_words(a))
    return dict(word="", string=False, length_bytes=0, lines=c_literals(a))


def literal_bytes(elements: int) -> int:
    """Host memory ``c_literals`` takes for ``elements`` values at its peak: a
    Python str per value (the longest, a float64 ``repr``), its slot in the
    list and its characters (and separator) in the joined lines."""
    longest = "-1.2345678901234567e-308"
    return elements * (sys.getsizeof(longest) + 8 + len(longest) + 2)


def _check_host_memory(subject: str, items: list[tuple[str, int]]) -> None:
    """The export renders on this host: refuse (ValidationError naming the
    parts) what would need more memory than the host cap
    (``schedule.memory_cap``: $CONVC_MAX_MEMORY or the available memory).
    The device's own arena and flash are not capped here: they are figures
    in the generated code, whatever this host has."""
    from .schedule import refuse_over_cap
    refuse_over_cap(subject, items)


def _float32_literal(v: np.float32) -> str:
    if not np.isfinite(v):
        return cfloat(float(v), "float")
    text = str(v)                        # Dragon4, unique: shortest round-trip for float32
    return (text if "." in text or "e" in text else text + ".0") + "f"


@dataclass
class Library:
    """The rendered sources of one export and what they are made of."""
    name: str
    graph: Graph                                # the graph rendered (after the pass pipeline)
    files: dict[str, str]                       # file name -> text
    plan: Plan
    functions: dict[str, str]                   # node -> C function name
    weights: dict[str, str]                     # param node -> C array name
    arena_align: int
    weight_bytes: int
    tensors: dict[str, list[dict]] = field(default_factory=dict)   # "inputs"/"outputs" -> entry arguments


def size_macro(P: str, label: str) -> str:
    """``NAME_<LABEL>_SIZE``: the macro of a tensor's element count in an
    export's header (``P``: the library's name in capitals; the label's
    characters C does not allow become ``_``)."""
    return f"{P}_{re.sub(r'[^A-Za-z0-9_]', '_', label).upper()}_SIZE"


def entry_tensors(g: Graph, inputs, outputs: dict, names: Namer, macro, var: dict, out_var: dict) -> dict:
    """The arguments of one exported entry point: ``inputs`` (graph input
    names, in order), then ``outputs`` ({label: node}). Each gets a C name
    from ``names`` -- the graph's own unless C or the generated code reserves
    it (NULL, _Bool, uintptr_t, CONVC_MR...): then in_NAME / out_NAME --
    recorded in ``var`` (input node -> name) and ``out_var`` (label -> name),
    and its size macro ``macro(label, type)``. Returns {"inputs": [...],
    "outputs": [...]}, one dict per argument (var, label, type, T, macro, and
    its ``private`` (restrict) and ``public`` declarations)."""
    tensors = {"inputs": [], "outputs": []}
    for role, items in (("inputs", [(n, n) for n in inputs]), ("outputs", list(outputs.items()))):
        for label, node in items:
            t = g.node(node)["type"]
            v = names(label, fallback="in_" if role == "inputs" else "out_")
            if role == "inputs":
                var[node] = v
            else:
                out_var[label] = v
            T = CTYPES[t.dtype]
            const = "const " if role == "inputs" else ""
            tensors[role].append(dict(var=v, label=label, type=t, dtype=t.dtype, shape=str(t.shape), size=t.size,
                                      T=T, macro=macro(label, t), private=f"{const}{T} *restrict {v}",
                                      public=f"{const}{T} *{v}"))
    return tensors


def render(graph: Graph, name: str = "model", weights_file: bool = False, passes="embedded",
           weight_format: str = "bytes") -> Library:
    """Render ``NAME.h``, ``NAME.c`` (and ``NAME_weights.c``) for ``graph``
    after the pass pipeline ``passes`` ("embedded": the default's cleanups
    and fusions without the GEMM/Winograd lowerings, whose scratch costs RAM;
    the node functions are the ones the runtime renders). ``weight_format``:
    see :func:`export_c`."""
    from .passes import run as run_passes

    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ConvcError(f"export name {name!r} must be a C identifier (letters, digits, _)")
    if weight_format not in WEIGHT_FORMATS:
        raise ConvcError(f"weight format {weight_format!r}: expected one of {', '.join(WEIGHT_FORMATS)}")
    graph.verify()
    if graph.assigns:
        raise ConvcError(f"graph '{graph.name}' assigns params ({', '.join(graph.assigns)}): it is a training "
                         f"step; export the inference graph (weights are const in the library), or its "
                         f"training step with export_c(inference graph or cc.Trainer, train=True)")
    g = run_passes(graph, passes)
    plan = make_plan(g)
    _check_host_memory(f"rendering the export of graph '{g.name}' on this host",
                       [(f"param '{n}' {g.node(n)['type']} as C literals", literal_bytes(g.node(n)["type"].size))
                        for n in plan.params])
    P = name.upper()
    ident = Namer(reserved=("arena", "base", "i", "convc_first", "convc_last", "CONVC_SIMD_SUM",
                            f"{name}_run", f"{name}_run_with_arena", f"{name}_arena"))
    macro = Namer(reserved=[f"{P}_{s}" for s in ("H", "ARENA_BYTES", "ARENA_ALIGN", "WEIGHT_BYTES", "INPUT_SIZE",
                                                 "OUTPUT_SIZE", "NO_STATIC_ARENA", "TEST_TOLERANCE")], mangle=False)
    var: dict[str, str] = {}
    out_var: dict[str, str] = {}
    tensors = entry_tensors(g, g.input_names, g.outputs, ident,
                            lambda label, t: macro(size_macro(P, label)),
                            var, out_var)
    private = [t["private"] for role in ("inputs", "outputs") for t in tensors[role]]
    public = [t["public"] for role in ("inputs", "outputs") for t in tensors[role]]
    params = []
    for n in plan.params:
        t = g.node(n)["type"]
        sym = ident(n, f"{name}_p_")
        init = weight_init(g.node(n)["value"], weight_format)
        var[n] = f"{sym}.v" if init["word"] else sym       # packed: the node functions read the typed member
        params.append(dict(T=CTYPES[t.dtype], var=sym, length=max(t.size, 1), note=f"{n} {t}", **init))
    arena_ptrs = bind_buffers(g, plan, ident, var, out_var)
    functions, calls = node_functions(g, plan, ident, var, parallel=True)   # OpenMP only where built with -fopenmp
    copies = output_copies(g, var, out_var)

    weight_bytes = sum(g.node(n)["type"].nbytes for n in plan.params)
    arena_align = max((np.dtype(g.node(n)["type"].dtype).itemsize for n in plan.order), default=1)
    aliases = []
    for role, generic in (("inputs", "INPUT_SIZE"), ("outputs", "OUTPUT_SIZE")):
        if len(tensors[role]) == 1:
            aliases.append((f"{P}_{generic}", tensors[role][0]))
    args = tensors["inputs"] + tensors["outputs"]
    ctx = dict(version=__version__, graph=g.name, hash=g.structure_hash(), name=name, P=P, guard=f"{P}_H",
               inputs=tensors["inputs"], outputs=tensors["outputs"], aliases=aliases,
               public_args=public, private_args=private, pointers=[t["var"] for t in args],
               params=params, functions=functions, calls=calls, copies=copies, arena_ptrs=arena_ptrs,
               arena_bytes=plan.arena_bytes, arena_align=arena_align, intermediate_bytes=plan.intermediate_bytes,
               weight_bytes=weight_bytes, weights_file=weights_file,
               needs_stdint=any(t["dtype"] in INT_DTYPES for t in args))
    env = environment()
    files = {f"{name}.h": env.get_template("c/export.h.j2").render(ctx),
             f"{name}.c": env.get_template("c/export.c.j2").render(ctx)}
    if weights_file:
        ctx["needs_stdint"] = any(p["T"].endswith("_t") or p["word"].endswith("_t") for p in params)
        files[f"{name}_weights.c"] = env.get_template("c/export_weights.c.j2").render(ctx)
    symbols = {n: p["var"] for n, p in zip(plan.params, params)}      # the C objects (unions when packed)
    return Library(name, g, files, plan, {c["node"]: c["fn"] for c in calls}, symbols, arena_align, weight_bytes,
                   tensors)


def render_harness(graph: Graph, lib: Library, test_inputs=None, tests: int = 2, seed: int = 0,
                   weights_file: bool = False) -> str:
    """``NAME_test.c``: ``tests`` input vectors (or ``test_inputs``, a list of
    {input name: array}) and the outputs the reference interpreter computes
    for them from ``graph`` as given (before any pass: the oracle checks the
    passes too). Random inputs (:func:`random_inputs`) are standard normal
    for float inputs, zeros for int64 ones (a valid class index) and uniform
    over the range of the narrower integer dtypes. The harness compares float
    outputs within ``NAME_TEST_TOLERANCE`` and integer outputs exactly."""
    from .reference import evaluate
    from .runtime.module import NumpyModule

    io = [graph.node(n)["type"] for n in graph.input_names] + [graph.node(n)["type"] for n in graph.outputs.values()]
    vectors = tests if test_inputs is None else len(test_inputs)
    _check_host_memory(
        f"the test harness of graph '{graph.name}' (export with harness=False to skip it)",
        [("the test vectors as C literals", vectors * literal_bytes(sum(t.size for t in io))),
         ("the test vectors as arrays (float64 while drawn)", vectors * sum(8 * t.size for t in io)),
         ("the reference interpreter's results", make_plan(graph).intermediate_bytes)])
    if test_inputs is None:
        test_inputs = random_inputs(graph, tests, seed)
    if not test_inputs:
        raise ConvcError("the test harness needs at least one test vector")
    check = NumpyModule(graph)          # the boundary checks of Module.run: names, shapes, dtypes
    feeds = [check.check_inputs(f) for f in test_inputs]
    wants = [evaluate(graph, f) for f in feeds]
    names = Namer(reserved=("arena", "worst", "failures", "v", "s", "how", "err", "rc", "e", "i", "error", "run",
                            "main", "TESTS", "WAYS", "vector", "static_arena"))
    rows = {}
    for role, values, prefixes in (("inputs", feeds, ("in_", "test_")), ("outputs", wants, ("out_", "want_"))):
        rows[role] = [dict(t, var=names(t["var"], prefixes[0]), data=names(t["var"], prefixes[1]), role=role[:-1],
                           vectors=[c_literals(v[t["label"]]) for v in values], exact=t["dtype"] in INT_DTYPES)
                      for t in lib.tensors[role]]
    ctx = dict(version=__version__, graph=graph.name, hash=graph.structure_hash(), name=lib.name,
               P=lib.name.upper(), tests=len(feeds), inputs=rows["inputs"], outputs=rows["outputs"],
               inputs_outputs=[r["var"] for r in rows["inputs"] + rows["outputs"]],
               arena_bytes=lib.plan.arena_bytes, arena_align=lib.arena_align, weights_file=weights_file,
               rejects=value_checks(lib, rows["inputs"]), exact=any(r["exact"] for r in rows["outputs"]),
               inexact=not all(r["exact"] for r in rows["outputs"]))
    return environment().get_template("c/export_test.c.j2").render(ctx)


def random_inputs(graph: Graph, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``count`` feeds for ``graph``'s inputs: standard normal floats, zeros
    for int64 (class labels: 0 is valid for any class count), and for the
    other integer dtypes uniform integers over the dtype's range cut to
    int16's (int8 and uint8 over their whole range: a quantized input's
    saturation edges are drawn; wider ones stay far from overflow)."""
    rng = np.random.default_rng(seed)

    def draw(t):
        if t.dtype in ("float32", "float64"):
            return rng.standard_normal(t.shape).astype(t.dtype)
        if t.dtype == "int64":
            return np.zeros(t.shape, np.int64)
        info = np.iinfo(t.dtype)
        lo, hi = max(int(info.min), -2**15), min(int(info.max), 2**15 - 1)
        return rng.integers(lo, hi + 1, t.shape).astype(t.dtype)

    return [{n: draw(graph.node(n)["type"]) for n in graph.input_names} for _ in range(count)]


def value_checks(lib: Library, inputs: list[dict]) -> list[dict]:
    """The graph inputs whose values a node checks (class labels in [lo, hi)):
    the harness feeds each one value below and one at or above its range and
    expects that node's status (1 + its schedule position; the first such node)."""
    from .ops import get_op

    rows = {r["label"]: r for r in inputs}
    found: dict[str, dict] = {}
    for k, n in enumerate(lib.plan.order):
        d = lib.graph.node(n)
        op = get_op(d["op"])
        ins = lib.graph.inputs_of(n)
        for j, (lo, hi) in op.value_ranges(d["attrs"], [lib.graph.node(i)["type"] for i in ins]).items():
            src = lib.plan.aliases.get(ins[j], ins[j])
            if src in rows and src not in found:
                found[src] = dict(rows[src], lo=lo, hi=hi, status=k + 1, node=n)
    return list(found.values())


@dataclass
class Export:
    """What ``export_c`` wrote."""
    name: str
    dir: Path
    files: list[Path]
    passes: object              # the pipeline run before rendering
    plan: Plan                  # the memory plan of the rendered graph
    arena_bytes: int            # NAME_ARENA_BYTES: the planner's arena
    peak_live_bytes: int        # the peak of live buffers (equal unless the plan has holes)
    intermediate_bytes: int     # the arena without reuse
    weight_bytes: int
    graph: Graph | None = None  # the graph rendered (after the pass pipeline; quantized with int8=True)
    budget: object = None       # with ram= or flash=: the plan chosen (convc.budget.Choice)

    def __str__(self):
        return (f"wrote {', '.join(str(f) for f in self.files)}\n"
                f"arena {self.arena_bytes:,} bytes (peak of live buffers {self.peak_live_bytes:,}; "
                f"{self.intermediate_bytes:,} without reuse), weights {self.weight_bytes:,} bytes"
                + (f"\n{self.budget.table()}" if self.budget is not None else ""))


def write_files(out_dir, files: dict) -> tuple[Path, list[Path]]:
    """Write ``{file name: text or bytes}`` into ``out_dir`` (created if
    needed); returns the directory and the paths in order. Every export
    (C library, training step, OpenCL project) writes through here."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fname, data in files.items():
        (out / fname).write_bytes(data if isinstance(data, bytes) else data.encode())
        paths.append(out / fname)
    return out, paths


def export_c(graph: Graph, out_dir, name: str = "model", weights_file: bool = False, passes="embedded",
             harness: bool = True, test_inputs=None, tests: int = 2, seed: int = 0, int8: bool = False,
             calibration=None, weight_format: str = "bytes", train: bool = False, loss: str | None = None,
             optimizer=None, steps: int | None = None, ram=None, flash=None, target: str = "c",
             embed_kernels: bool = False):
    """Write ``NAME.h``, ``NAME.c`` (weights inside, or in ``NAME_weights.c``
    with ``weights_file=True``) and the test harness ``NAME_test.c`` into
    ``out_dir`` (created if needed). ``passes``: the pipeline run first, as in
    ``cc.compile`` ("embedded" by default: no im2col or Winograd scratch;
    "default" for speed where RAM allows, "none", or a list of pass names).
    ``weight_format``: how the weights are written, always as const data
    read bit-exact by the node functions: "bytes" (default) as string
    literals of their little-endian bytes in a const union with the typed
    array (the fastest to compile: one token per 64 bytes; a big-endian
    target stops at an ``#error``), "hex" as hex words of their bits in such
    a union (any byte order), "decimal" as one C literal per value.

    ``int8=True`` exports the graph quantized first (:func:`int8_graph`, with
    ``calibration``: an ``.npz`` file, a dict of arrays or a list of feeds); a
    graph already made of quantized ops (``cc.qconv`` ...) exports as it is,
    with int8_t weights and int32_t biases, without the flag. The harness's
    oracle is then the quantized graph, which the library matches bit for bit.

    ``train=True`` exports the training step instead (``graph``: a
    ``cc.Trainer``, or an inference Graph to which ``loss`` -- "cross_entropy"
    or "mse" -- and ``optimizer`` are added): see :mod:`convc.export_train`;
    the harness then runs ``steps`` steps on ``test_inputs`` or random batches.
    Returns an :class:`Export`, or a ``TrainExport`` with ``train=True``.

    ``ram`` / ``flash`` (bytes; an int or a string like "24K"): budgets for
    the arena and for code + const data. The export then renders the
    cheapest plan of :func:`convc.budget.fit` that fits (the memory-saving
    rewrites of ``passes/memory.py``: in place, patch-based), or raises a
    ``BudgetError`` naming the smallest size reached and where its peak is;
    ``Export.budget`` says what was chosen. The harness still checks against
    ``graph`` as given.

    ``target="opencl"`` writes the OpenCL host program, kernels, params,
    harness and Makefile instead (:func:`convc.export_opencl.export_opencl`;
    ``embed_kernels`` puts the kernels inside the host source); the C
    library's options (int8, weights_file, weight_format, ram, flash) do not
    apply there.

    >>> cc.export_c(lenet5(), "build/lenet", name="lenet")   # doctest: +SKIP
    >>> cc.export_c(lenet5(), "build/qlenet", name="qlenet", int8=True, calibration="digits.npz")  # doctest: +SKIP
    >>> cc.export_c(lenet5(batch=8), "build/tlenet", name="tlenet", train=True, optimizer=cc.Adam())  # doctest: +SKIP
    """
    if target == "opencl":
        from .export_opencl import export_opencl
        given = [k for k, v in (("int8", int8), ("weights_file", weights_file), ("calibration", calibration),
                                ("weight_format", weight_format != "bytes"), ("ram", ram), ("flash", flash),
                                ("steps", steps)) if v not in (False, None)]
        if given:
            raise ConvcError(f"export_c(target='opencl'): {', '.join(given)} apply to the C library only")
        return export_opencl(graph, out_dir, name, embed_kernels, passes, harness, test_inputs,
                             tests, seed, train, loss, optimizer)
    if target != "c":
        raise ConvcError(f"export_c(): target {target!r}: expected 'c' or 'opencl'")
    if embed_kernels:
        raise ConvcError("export_c(): embed_kernels is for target='opencl'")
    if train and (ram is not None or flash is not None):
        raise ConvcError("export_c(): ram and flash budgets are for inference exports, not train=True")
    if train:
        from .export_train import STEPS, export_train
        if int8 or weights_file or calibration is not None:
            raise ConvcError("export_c(train=True): int8, weights_file and calibration are for inference exports")
        return export_train(graph, out_dir, name, passes, harness, steps or STEPS, seed, test_inputs, loss,
                            optimizer, weight_format=weight_format)
    if loss is not None or optimizer is not None or steps is not None:
        raise ConvcError("export_c(): loss, optimizer and steps are for train=True")
    if not isinstance(graph, Graph):
        hint = " (a cc.Trainer exports with train=True)" if type(graph).__name__ == "Trainer" else ""
        raise ConvcError(f"export_c() takes a convc.Graph, got {type(graph).__name__}{hint}")
    if int8:
        graph = int8_graph(graph, calibration, seed=seed)
    elif calibration is not None:
        raise ConvcError("export_c(): calibration data is for int8=True (--int8); without it the graph exports "
                         "as it is")
    choice = None
    if ram is not None or flash is not None:        # the memory budget picks the passes (convc/budget.py)
        from .budget import fit
        choice = fit(graph, ram, flash, passes, name)
    lib = render(choice.graph if choice else graph, name, weights_file, "none" if choice else passes, weight_format)
    files = dict(lib.files)
    if harness:
        files[f"{name}_test.c"] = render_harness(graph, lib, test_inputs, tests, seed, weights_file)
    out, paths = write_files(out_dir, files)
    return Export(name, out, paths, passes, lib.plan, lib.plan.arena_bytes, peak_live_bytes(lib.plan),
                  lib.plan.intermediate_bytes, lib.weight_bytes, lib.graph, choice)


# -- int8 ---------------------------------------------------------------------
CALIBRATION_SAMPLES = 32
"""Random calibration inputs when none are given (a weak calibration: the
ranges of random inputs, not of the data the model will see)."""


def int8_graph(graph: Graph, calibration=None, samples: int = CALIBRATION_SAMPLES, seed: int = 0) -> Graph:
    """``graph`` quantized to int8 for the export (``export_c(int8=True)``,
    ``convc export --int8``): ``cc.quantize`` (the float cleanups,
    calibration through the reference interpreter -- the export's oracle --
    and the ``quantize_int8`` pass). ``calibration``: an ``.npz`` path, an
    array, a dict of arrays or a list of feeds (as ``cc.quantize`` takes them);
    ``None``: ``samples`` random inputs of the declared shapes
    (:func:`random_inputs`), a weak calibration whose scales fit random data
    rather than the data the model will see. Ops without an int8 form stay
    float between a dequantize and a quantize."""
    from .quant import QDTYPES

    require_graph(graph, "export_c(int8=True)")
    done = [n for n in graph.topological_order() if graph.node(n)["type"].dtype in QDTYPES]
    if done:
        d = graph.node(done[0])
        raise ConvcError(f"graph '{graph.name}' is already quantized (node '{done[0]}' ({d['op']}) is "
                         f"{d['type']}): export it without int8=True / --int8")
    import convc

    if getattr(convc.quantize, "__module__", "") == "convc.ops.quantized":       # only the op, no graph pass
        raise ConvcError("int8 export needs cc.quantize(graph, calibration) (the quantize_int8 pass), which this "
                         "convc does not have; quantize the graph by hand with cc.quantize/cc.qconv/"
                         "cc.dequantize on values and export that graph")
    if calibration is None:
        floats = [n for n in graph.input_names if graph.node(n)["type"].dtype in ("float32", "float64")]
        calibration = [{n: f[n] for n in floats} for f in random_inputs(graph, samples, seed)]
    return convc.quantize(graph, calibration, engine="reference")


# -- flash and RAM ------------------------------------------------------------
@dataclass
class Toolchain:
    cc: str
    nm: str
    size: str
    flags: list[str]
    label: str


def toolchain(prefer_arm: bool = True) -> Toolchain:
    """arm-none-eabi-gcc for a Cortex-M4F when on PATH (and ``prefer_arm``),
    else the host compiler ($CONVC_CC or cc) with the host binutils."""
    if prefer_arm and shutil.which(ARM_CC):
        return Toolchain(ARM_CC, "arm-none-eabi-nm", "arm-none-eabi-size", list(ARM_FLAGS),
                         "arm-none-eabi-gcc, Cortex-M4F (" + " ".join(ARM_FLAGS) + ")")
    cc = os.environ.get("CONVC_CC", "cc")
    return Toolchain(cc, "nm", "size", [], f"host compiler {cc} (install gcc-arm-none-eabi for Cortex-M4F figures)")


@dataclass
class SizeRow:
    node: str
    op: str
    code: int           # bytes of machine code of the node (apportioned, see size_report)
    const: int          # bytes of the weights it reads first and of its own tables (requantization constants)
    live: int           # arena bytes alive while it runs
    stack: int          # its stack frame

    @property
    def flash(self) -> int:
        return self.code + self.const


@dataclass
class SizeReport:
    name: str
    toolchain: str
    rows: list[SizeRow]
    entry_code: int     # NAME_run + NAME_run_with_arena
    other_code: int     # shared helpers and rounding
    other_const: int    # alignment padding, literal constants outside functions
    arena: int          # the planner's arena (NAME_ARENA_BYTES)
    peak_live: int      # the peak of live buffers
    static_ram: int     # .bss + .data of the build: the arena, aligned
    stack: int          # deepest call chain: NAME_run -> NAME_run_with_arena -> what is left out of line

    @property
    def code(self) -> int:
        return sum(r.code for r in self.rows) + self.entry_code + self.other_code

    @property
    def const(self) -> int:
        return sum(r.const for r in self.rows) + self.other_const

    @property
    def flash(self) -> int:
        return self.code + self.const

    @property
    def ram(self) -> int:
        return self.static_ram + self.stack

    def table(self) -> str:
        head = ("node", "op", "code", "const", "flash", "live arena", "stack")
        peak = max(range(len(self.rows)), key=lambda i: self.rows[i].live, default=-1)   # the step that sets it
        body = [(r.node, r.op, r.code, r.const, r.code + r.const, f"{r.live:,}{' *' if i == peak else '  '}",
                 r.stack) for i, r in enumerate(self.rows)]
        body.append(("(entry)", f"{self.name}_run*", self.entry_code, 0, self.entry_code, "0  ", 0))
        if self.other_code or self.other_const:
            body.append(("(other)", "helpers, padding", self.other_code, self.other_const,
                         self.other_code + self.other_const, "0  ", 0))
        total = ("total", "", self.code, self.const, self.flash, f"{self.static_ram:,}  ", self.stack)
        rows = [head] + [tuple(v if isinstance(v, str) else f"{v:,}" for v in r) for r in body + [total]]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(-1, "-" * len(lines[0]))
        lines += [f"flash: {self.flash:,} bytes = code {self.code:,} + const data {self.const:,}",
                  f"live arena: bytes of arena buffers alive while the node runs (its inputs, its output, "
                  f"its scratch); * marks the peak, step {peak} of the schedule",
                  f"RAM:   {self.ram:,} bytes = static {self.static_ram:,} (the arena: planned {self.arena:,}, "
                  f"peak of live buffers {self.peak_live:,}) + stack {self.stack:,} (estimate)",
                  f"toolchain: {self.toolchain}, -Os; per-node code apportioned from a build with every node "
                  f"out of line"]
        return "\n".join(lines)

    __str__ = table


def run_tool(cmd: list[str], cwd) -> str:
    """Run a toolchain command (compiler, size, nm) in ``cwd``; its stdout, or
    a CompileError with the command, the directory and its stderr."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CompileError(f"running {cmd[0]} failed: {e}") from None
    if proc.returncode != 0:
        raise CompileError(f"{' '.join(cmd)} failed (exit {proc.returncode}) in {cwd}:\n{proc.stderr[-4000:]}")
    return proc.stdout



@dataclass
class _Object:
    symbols: dict[str, int]     # name -> bytes (IPA clones like node_x.constprop.0 summed into node_x)
    sections: dict[str, int]    # name -> bytes
    stack: dict[str, int]       # function -> frame bytes (-fstack-usage)
    data: dict[str, int] = field(default_factory=dict)     # the symbols of const/initialised data (nm r, d)

    def total(self, *prefixes) -> int:
        return sum(v for k, v in self.sections.items() if k.startswith(prefixes))


def _measure(tools: Toolchain, tmp: str, name: str, obj: str, flags: list[str]) -> _Object:
    run_tool([tools.cc, *tools.flags, *flags, "-fstack-usage", "-c", f"{name}.c", "-o", f"{obj}.o"], tmp)
    symbols: dict[str, int] = {}
    data: dict[str, int] = {}
    seen = set()                # GCC merges identical const tables (two all-zero ones): count the bytes once
    for line in run_tool([tools.nm, "-S", f"{obj}.o"], tmp).splitlines():
        parts = line.split()
        if len(parts) == 4:
            base = parts[3].split(".")[0]
            symbols[base] = symbols.get(base, 0) + int(parts[1], 16)
            if parts[2] in "rRdD" and (parts[2].lower(), parts[0]) not in seen:
                seen.add((parts[2].lower(), parts[0]))
                data[base] = data.get(base, 0) + int(parts[1], 16)
    sections = {}
    for line in run_tool([tools.size, "-A", f"{obj}.o"], tmp).splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith(".") and parts[1].isdigit():
            sections[parts[0]] = int(parts[1])
    stack: dict[str, int] = {}
    su = Path(tmp, f"{obj}.su")
    for line in su.read_text().splitlines() if su.exists() else []:
        where, nbytes, _kind = line.split("\t")
        fn = where.rsplit(":", 1)[-1].split(".")[0]
        stack[fn] = max(stack.get(fn, 0), int(nbytes))
    return _Object(symbols, sections, stack, data)


def size_report(graph: Graph, name: str = "model", tools: Toolchain | None = None, passes="embedded") -> SizeReport:
    """Compile the exported library twice and measure it. Totals come from
    the build a firmware project does (``-std=c99 -Os``): code = .text,
    const data = .rodata + .data, static RAM = .bss + .data (the arena);
    the stack estimate is the deepest call chain of that build
    (``-fstack-usage``). Per node, that code total is apportioned by the sizes
    of the node functions in a second build that keeps every node out of line
    (``SIZE_FLAGS``); const data is the node's weights (each counted at its
    first reader) and the tables its function defines (``node_fn_*``: a
    quantized node's multipliers and shifts), exactly."""
    require_graph(graph, "size_report()")
    tools = tools or toolchain()
    lib = render(graph, name, passes=passes)
    graph = lib.graph
    with tempfile.TemporaryDirectory(prefix="convc-size-") as tmp:
        for fname, text in lib.files.items():
            Path(tmp, fname).write_text(text)
        real = _measure(tools, tmp, name, name, ["-std=c99", "-Os"])
        split = _measure(tools, tmp, name, f"{name}_split", SIZE_FLAGS)
    if real.symbols.get(f"{name}_arena", 0) < lib.plan.arena_bytes:
        raise CompileError(f"{name}.o: the arena symbol has {real.symbols.get(f'{name}_arena', 0)} bytes, "
                           f"the plan needs {lib.plan.arena_bytes}")
    code = real.total(".text")
    scale = code / max(split.total(".text"), 1)
    first_user: dict[str, str] = {}
    for n in lib.plan.order:
        for i in graph.inputs_of(n):
            i = lib.plan.aliases.get(i, i)          # a reshaped param is read through its alias
            if i in lib.weights:
                first_user.setdefault(i, n)
    live = live_bytes(lib.plan)
    tables = _tables(real.data, lib)
    rows = []
    for step, n in enumerate(lib.plan.order):
        fn = lib.functions[n]
        weights = sum(graph.node(p)["type"].nbytes for p, u in first_user.items() if u == n)
        rows.append(SizeRow(n, graph.node(n)["op"], round(split.symbols.get(fn, 0) * scale), weights + tables[n],
                            live[step], split.stack.get(fn, 0)))
    entry = round(sum(split.symbols.get(f, 0) for f in (f"{name}_run", f"{name}_run_with_arena")) * scale)
    const = real.total(".rodata", ".data")
    entries = (f"{name}_run", f"{name}_run_with_arena")
    callees = [v for k, v in real.stack.items() if k not in entries]     # whatever the build left out of line
    stack = sum(real.stack.get(f, 0) for f in entries) + max(callees, default=0)
    return SizeReport(name, tools.label, rows, entry, code - sum(r.code for r in rows) - entry,
                      const - sum(r.const for r in rows), lib.plan.arena_bytes, peak_live_bytes(lib.plan),
                      real.total(".bss", ".data"), stack)


@dataclass
class SizeComparison:
    """The size reports of a float graph and of its int8 form, side by side
    (``convc export MODEL --int8 --size``)."""
    float: SizeReport
    int8: SizeReport

    def rows(self) -> list[tuple[SizeRow | None, SizeRow | None]]:
        """(float row, int8 row) pairs in the int8 schedule, matched by node
        name, else by the name without an epilogue suffix (``conv1.relu``
        and ``conv1``); a node of only one graph (a quantize, a float node
        the int8 graph lowered differently) pairs with None and keeps its
        place after the previous matched node."""
        base = lambda r: r.node.split(".")[0]    # noqa: E731
        mate: dict[int, SizeRow] = {}           # int8 row index -> float row
        free = dict(enumerate(self.int8.rows))
        for match in (lambda f, q: f.node == q.node, lambda f, q: base(f) == base(q)):
            for f in self.float.rows:
                if f in mate.values():
                    continue
                i = next((i for i, q in free.items() if match(f, q)), None)
                if i is not None:
                    mate[i] = f
                    del free[i]
        pairs = [(mate.get(i), q) for i, q in enumerate(self.int8.rows)]
        order = {id(f): k for k, f in enumerate(self.float.rows)}
        for f in reversed(self.float.rows):
            if f in mate.values():
                continue
            before = [i for i, (a, _) in enumerate(pairs) if a is not None and order[id(a)] < order[id(f)]]
            pairs.insert(before[-1] + 1 if before else 0, (f, None))
        return pairs

    def table(self) -> str:
        head = ("node", "float op", "flash", "live arena", "int8 op", "flash", "live arena")
        cell = lambda r, f: "-" if r is None else (r.op if f == "op" else f"{getattr(r, f):,}")  # noqa: E731
        body = [(n, cell(a, "op"), cell(a, "flash"), cell(a, "live"), cell(b, "op"), cell(b, "flash"),
                 cell(b, "live"))
                for a, b in self.rows() for n in [(a or b).node]]
        F, Q = self.float, self.int8
        body.append(("(entry, other)", "", f"{F.entry_code + F.other_code + F.other_const:,}", "", "",
                     f"{Q.entry_code + Q.other_code + Q.other_const:,}", ""))
        rows = [head] + body + [("total", "", f"{F.flash:,}", f"{F.static_ram:,}", "", f"{Q.flash:,}",
                                 f"{Q.static_ram:,}")]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(v.ljust(w) if i in (0, 1, 4) else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(-1, "-" * len(lines[0]))
        ratio = lambda q, f: f"{q / f:.1%}" if f else "-"  # noqa: E731
        lines += [f"{what:<6} float {f:>9,}  int8 {q:>9,}  int8/float {ratio(q, f)}" for what, f, q in (
                  ("flash", F.flash, Q.flash), ("code", F.code, Q.code), ("const", F.const, Q.const),
                  ("arena", F.arena, Q.arena), ("stack", F.stack, Q.stack), ("RAM", F.ram, Q.ram))]
        lines.append(f"toolchain: {Q.toolchain}, -Os; flash = code + const data; live arena = arena bytes alive "
                     f"while the node runs")
        return "\n".join(lines)

    __str__ = table


def size_comparison(graph: Graph, int8: Graph | None = None, name: str = "model", tools: Toolchain | None = None,
                    passes="embedded", calibration=None) -> SizeComparison:
    """:func:`size_report` of the float ``graph`` and of ``int8`` (by default
    :func:`int8_graph` of ``graph`` with ``calibration``), side by side."""
    tools = tools or toolchain()
    if int8 is None:
        int8 = int8_graph(graph, calibration)
    return SizeComparison(size_report(graph, name, tools, passes), size_report(int8, name, tools, passes))


def _tables(data: dict[str, int], lib: Library) -> dict[str, int]:
    """Bytes of the const tables each node's function defines next to it
    (``static const`` arrays named ``<function>_<what>``, as qconv's
    multipliers), by node; the longest function name that prefixes a symbol
    owns it (``node_fc1_mult`` is node_fc1's, not node_f's)."""
    owner = {fn: n for n, fn in lib.functions.items()}
    weights = set(lib.weights.values())
    out = dict.fromkeys(lib.functions, 0)
    for sym, nbytes in data.items():
        fns = [fn for fn in owner if sym.startswith(fn + "_")]
        if fns and sym not in weights:
            out[owner[max(fns, key=len)]] += nbytes
    return out


# -- command line -------------------------------------------------------------
def cmd_export(args) -> int:
    if args.target == "opencl":
        from .export_opencl import cmd_export_opencl
        return cmd_export_opencl(args)
    if args.embed_kernels:
        raise ConvcError("convc export: --embed-kernels is for --target opencl")
    budget = args.ram is not None or args.flash is not None
    if args.out is None and not args.size and not budget:
        raise ConvcError("convc export: give -o DIR to write the library, --size to measure it, or --ram/--flash "
                         "to see the plan that fits")
    if budget and args.train:
        raise ConvcError("convc export: --ram/--flash budgets are for inference exports, not --train")
    if args.calibration is not None and not args.int8:
        raise ConvcError("convc export: --calibration is for --int8")
    if args.train:
        from .export_train import cmd_export_train
        return cmd_export_train(args)
    if args.lr is not None or args.momentum is not None or args.loss or args.batch is not None \
            or args.optimizer != "sgd":
        raise ConvcError("convc export: --optimizer, --lr, --momentum, --loss and --batch are for --train")
    g = load_model(args.model)
    q = int8_graph(g, args.calibration) if args.int8 else None
    choice = None                                           # with budgets, the plan convc/budget.py picked
    if args.out is not None:
        exp = export_c(q or g, args.out, name=args.name, weights_file=args.weights_file, passes=args.pipeline,
                       weight_format=args.weight_format, ram=args.ram, flash=args.flash)
        print(exp)
        choice = exp.budget
        objs = " ".join(f"{args.out}/{f}" for f in [f"{args.name}.c"] + ([f"{args.name}_weights.c"]
                                                                         if args.weights_file else []))
        print(f"check it: cc -std=c99 -O2 {args.out}/{args.name}_test.c {objs} -lm && ./a.out")
    elif budget:
        from .budget import fit
        choice = fit(q or g, args.ram, args.flash, args.pipeline, args.name)
        print(choice.table())
    if args.size:
        rep = (size_report(choice.graph, name=args.name, passes="none") if choice is not None
               else size_comparison(g, q, name=args.name, passes=args.pipeline) if q is not None
               else size_report(g, name=args.name, passes=args.pipeline))
        print(rep.table())
    if args.board or args.run_qemu:
        from .qemu import cmd_board

        args.board = args.board or "mps2-an386"
        cmd_board(args)
    return 0

"""Compiled modules: check inputs at the boundary, then run the target."""
from __future__ import annotations

import abc
import os
import pickle
import threading
from pathlib import Path

import numpy as np

from ..errors import ConvcError, GraphError, InputError
from ..ir import Graph, TensorType, param_array


# ndarray.flags.num bits (numpy's C API: NPY_ARRAY_C_CONTIGUOUS, NPY_ARRAY_ALIGNED,
# NPY_ARRAY_WRITEABLE): one integer read tells whether an array can be handed
# to generated code as it is
_C_CONTIGUOUS, _ALIGNED, _WRITEABLE = 0x0001, 0x0100, 0x0400
_DENSE = _C_CONTIGUOUS | _ALIGNED
_WRITEABLE_DENSE = _DENSE | _WRITEABLE


# -- pickling: a module travels as the recipe that compiles it again --------------------------------
PICKLE_FORMAT = 1
"""The layout of the state a pickled module or Trainer carries (see
:func:`pickled`). Bump it when that state or the IR it holds changes."""


class StateVersionError(ConvcError):
    """A pickled module or Trainer was written by another convc (another
    pickle format or another release) than the one unpickling it."""


def pickled(kind: str, payload: dict) -> tuple:
    """The ``__reduce__`` value of a module or Trainer: a call of
    :func:`unpickled` on the format, this convc's version and ``payload``
    pickled on its own, so that a version mismatch is reported before any
    of the payload (graph, optimizer) is read with classes that may have
    changed."""
    from .. import __version__
    return unpickled, (kind, PICKLE_FORMAT, __version__, pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))


def unpickled(kind: str, fmt: int, version: str, payload: bytes):
    """Rebuild what :func:`pickled` described: check the format and the
    convc version, then compile again (the library comes from the compile
    cache, or is built into it on this host)."""
    from .. import __version__
    if fmt != PICKLE_FORMAT or version != __version__:
        raise StateVersionError(
            f"cannot unpickle a convc {kind}: it was written by convc {version} (pickle format {fmt}), "
            f"this is convc {__version__} (pickle format {PICKLE_FORMAT}); unpickle it where that version is "
            f"installed, or compile the graph again with this one")
    state = pickle.loads(payload)
    if kind == "trainer":
        from ..train import Trainer
        return Trainer._from_state(state)
    from ..api import compile
    return compile(state["graph"], target=state["target"], **state["options"])


class Module(abc.ABC):
    """A compiled graph. ``run({name: array}) -> {name: array}``;
    ``mod(**inputs)`` returns one array, or a tuple for several outputs.

    Every call is checked before the target runs. The C and OpenCL modules
    take a fast path (``fast_path``) when the inputs are exactly what the
    graph declares -- numpy arrays of the declared dtype and shape,
    C-contiguous and aligned: one comparison per property, and the arrays go
    to the generated code without a copy. Anything else takes the checked
    path (``check_inputs``), which converts what it can (lists, strided
    views) and raises ``InputError`` otherwise."""

    target = "?"

    def __init__(self, graph: Graph, source: str, arg_order: list[str] | None = None):
        self.graph = graph
        self.source = source
        from ..schedule import live_nodes

        live = live_nodes(graph)
        # the inputs the outputs need; other graph inputs may be passed and are ignored
        self.inputs: dict[str, TensorType] = {n: graph.node(n)["type"] for n in graph.input_names if n in live}
        self.param_names: list[str] = [n for n in graph.param_names if n in live]
        self.outputs: dict[str, TensorType] = {o: graph.node(n)["type"] for o, n in graph.outputs.items()}
        self._detached: dict[str, np.ndarray] = {}      # set params that only folded constants read
        # built once, read by every call: (name, dtype, shape) of each input in
        # the order the target takes them, and (shape, dtype) of each output
        order = list(self.inputs) if arg_order is None else list(arg_order)
        self._in_spec = tuple((n, np.dtype(self.inputs[n].dtype), self.inputs[n].shape) for n in order)
        self._out_names = tuple(self.outputs)
        self._out_spec = tuple((t.shape, np.dtype(t.dtype)) for t in self.outputs.values())

    def check_inputs(self, feeds) -> dict[str, np.ndarray]:
        """Names, shapes and dtypes checked; arrays made C-contiguous (and
        aligned). Raises ``InputError`` naming the graph, the input and the
        rule."""
        if not isinstance(feeds, dict):
            raise InputError(f"graph '{self.graph.name}': run() takes a dict of input name -> array, "
                             f"got {type(feeds).__name__}")
        missing = [n for n in self.inputs if n not in feeds]
        unknown = [n for n in feeds if n not in self.inputs and n not in self.graph.input_names]
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing input(s) {missing}")
            if unknown:
                parts.append(f"unknown input(s) {unknown}")
            raise InputError(f"graph '{self.graph.name}': {'; '.join(parts)}; "
                             f"the inputs are {list(self.inputs)}")
        out = {}
        for name, t in self.inputs.items():
            a = feeds[name]
            if not isinstance(a, np.ndarray):
                try:
                    a = np.asarray(a)
                except (ValueError, TypeError, OverflowError) as e:       # a ragged list, an odd object
                    raise InputError(f"graph '{self.graph.name}': input '{name}' is not an array of "
                                     f"{t.dtype} {t.shape} ({type(e).__name__}: {e})") from None
            if a.dtype != np.dtype(t.dtype):
                raise InputError(f"graph '{self.graph.name}': input '{name}' has dtype {a.dtype}, expected "
                                 f"{t.dtype} (convert with .astype(np.{t.dtype}))")
            if tuple(a.shape) != t.shape:
                raise InputError(f"graph '{self.graph.name}': input '{name}' has shape {tuple(a.shape)}, "
                                 f"expected {t.shape}")
            a = np.ascontiguousarray(a)
            out[name] = a if a.flags.aligned else a.copy()      # e.g. a float view at an odd byte offset
        return out

    def _outputs(self, out, args: list[np.ndarray]) -> list[np.ndarray]:
        """The arrays the outputs are written to, in output order: the
        caller's ``out`` arrays, checked against the rules the generated code
        relies on, and new arrays for the outputs ``out`` does not name."""
        if out is None:
            return [np.empty(shape, dtype) for shape, dtype in self._out_spec]
        if type(out) is not dict or not out.keys() <= self.outputs.keys():
            self._bad_out(out)
        arrays: list[np.ndarray] = []
        for name, (shape, dtype) in zip(self._out_names, self._out_spec):
            a = out.get(name)
            if a is None:
                arrays.append(np.empty(shape, dtype))
                continue
            if (type(a) is not np.ndarray or a.dtype is not dtype or a.shape != shape
                    or a.flags.num & _WRITEABLE_DENSE != _WRITEABLE_DENSE):
                self._check_out_array(name, a)          # equal dtypes, subclasses; else the rule broken
            for (n, _, _), x in zip(self._in_spec, args):
                if np.shares_memory(a, x):
                    raise InputError(f"graph '{self.graph.name}': out['{name}'] shares memory with input '{n}' "
                                     f"(shape {x.shape}); the generated code may read an input after writing "
                                     f"an output, so an out array must not overlap any input")
            for other, b in zip(self._out_names, arrays):        # (arrays allocated here overlap nothing)
                if b is out.get(other) and np.shares_memory(a, b):
                    raise InputError(f"graph '{self.graph.name}': out['{name}'] shares memory with "
                                     f"out['{other}']; each output needs its own buffer")
            arrays.append(a)
        return arrays

    def _bad_out(self, out):
        """Raise the InputError for an ``out`` that is no dict, or names an
        output the graph does not have."""
        g = self.graph.name
        if not isinstance(out, dict):
            raise InputError(f"graph '{g}': run(out=...) takes a dict of output name -> array, "
                             f"got {type(out).__name__}")
        unknown = [n for n in out if n not in self.outputs]
        raise InputError(f"graph '{g}': out names unknown output(s) {unknown}; the outputs are {list(self.outputs)}")

    def _check_out_array(self, name: str, a) -> None:
        """Raise the InputError naming the rule that out array ``a`` for
        output ``name`` breaks, if it breaks one."""
        t = self.outputs[name]
        at = f"graph '{self.graph.name}': out['{name}']"
        if not isinstance(a, np.ndarray):
            raise InputError(f"{at} is a {type(a).__name__}; out takes numpy arrays, "
                             f"e.g. np.empty({t.shape}, np.{t.dtype})")
        if a.dtype != np.dtype(t.dtype):
            raise InputError(f"{at} has dtype {a.dtype}, expected {t.dtype} (outputs are written as computed, "
                             f"not converted)")
        if a.shape != t.shape:
            raise InputError(f"{at} has shape {a.shape}, expected {t.shape}")
        if not a.flags.c_contiguous:
            raise InputError(f"{at} (shape {t.shape}) is not C-contiguous; the generated code writes each "
                             f"output as one dense block in C order")
        if not a.flags.aligned:
            raise InputError(f"{at} is not aligned to its dtype {t.dtype}; the generated code needs aligned "
                             f"elements")
        if not a.flags.writeable:
            raise InputError(f"{at} is read-only; the generated code must write into it")

    def run(self, feeds: dict, out: dict | None = None) -> dict[str, np.ndarray]:
        """Run the graph on ``feeds`` ({input name: array}) and return
        {output name: array}.

        Inputs are checked before any generated code runs (``InputError``
        names the graph, the input and the rule). Values a node checks (class
        labels in [0, C)) raise ``InputError`` naming the node, its op, the
        value and its position; the run stops at that node and the params
        (weights, optimizer state) are left as they were. Numpy arrays of the
        declared dtype and shape in C order are used without a copy; other
        array-likes (lists, strided or reversed views) are converted; the
        caller's arrays are never written.

        ``out`` ({output name: array}, optional) gives arrays to write the
        outputs into, e.g. to reuse memory across calls. Each must be a numpy
        array of exactly the output's shape and dtype, C-contiguous, aligned
        and writeable, and must not share memory with any input or with
        another out array (``InputError`` otherwise, raised before anything
        runs). The result maps those names to the very arrays given; outputs
        that ``out`` does not name are allocated as usual.

        >>> res = mod.run({"x": x})                             # doctest: +SKIP
        >>> y = np.empty_like(res["y"])                          # doctest: +SKIP
        >>> mod.run({"x": x}, out={"y": y})["y"] is y           # doctest: +SKIP
        True
        """
        return self._fast_run(self, feeds, out)

    def __call__(self, *args, **feeds):
        """``mod(x=a)``: run on keyword arrays; one output -> its array,
        several -> a tuple in output order."""
        if args:
            raise InputError(f"graph '{self.graph.name}': call the module with keyword arrays, "
                             f"mod({', '.join(f'{n}=...' for n in self.inputs)}), or mod.run(dict); "
                             f"got {len(args)} positional argument(s)")
        return self._fast_call(self, feeds)

    # The fast path of a target, or these: every call takes the checked path.
    @staticmethod
    def _fast_run(mod, feeds, out=None):
        return mod._checked_run(feeds, out)

    @staticmethod
    def _fast_call(mod, feeds):
        return mod._checked_call(feeds)

    def _checked_run(self, feeds, out=None) -> dict[str, np.ndarray]:
        """``run`` for any feeds: check and convert, then run the target."""
        checked = self.check_inputs(feeds)
        args = [checked[n] for n, _, _ in self._in_spec]
        return dict(zip(self._out_names, self._run(args, self._outputs(out, args))))

    def _checked_call(self, feeds):
        vals = tuple(self._checked_run(feeds).values())
        return vals[0] if len(vals) == 1 else vals

    @abc.abstractmethod
    def _run(self, args: list[np.ndarray], outs: list[np.ndarray]) -> list[np.ndarray]:
        """Run the target on checked inputs (in ``_in_spec`` order), writing
        the outputs into ``outs`` (in output order); return the outputs."""

    def _status_error(self, rc: int, args) -> InputError:
        """The InputError for a positive status ``rc`` of the generated code:
        the node it names (``codegen.c.module_status``) rejected input values,
        computed again here from ``args`` (the inputs in ``_in_spec`` order)
        to say which value, where, and the rule."""
        import networkx as nx

        from ..codegen.c import module_status
        from ..reference import invalid_input

        n = module_status(self.plan, rc)
        if n is None:
            return InputError(f"graph '{self.graph.name}': generated code returned error {rc}")
        up = nx.ancestors(self.graph.nx, n)
        params = {p: self._get_param(p) for p in self.param_names if p in up and p in self.plan.params}
        return invalid_input(self.graph, n, {name: a for (name, _, _), a in zip(self._in_spec, args)}, params)

    @abc.abstractmethod
    def _get_param(self, n): ...

    @abc.abstractmethod
    def _set_param(self, n, a): ...

    # -- params held by the module (weights, optimizer state) ------------------
    def get_params(self, names=None) -> dict[str, np.ndarray]:
        """Copies of the module's current param values, by node name."""
        names = self.graph.param_names if names is None else list(names)
        return {n: self._get_param(self._param_name(n)) for n in names}

    def set_params(self, values: dict) -> None:
        """Overwrite param values (same shape; cast to the param's dtype).
        Constants that ``fold_params`` computed from a changed param at
        compile time (default pipeline: Winograd kernels, ...) are computed
        again, on the host. Values must be numbers the param's dtype holds
        (``InputError`` otherwise, and for an unknown name or a wrong shape)."""
        if not isinstance(values, dict):
            raise InputError(f"graph '{self.graph.name}': set_params() takes a dict of param name -> array, "
                             f"got {type(values).__name__}")
        for n in values:
            if not isinstance(n, str):
                raise InputError(f"graph '{self.graph.name}': param names are str, got {type(n).__name__} {n!r}")
        folded = {c: self.graph.node(c)["folded"] for c in self.graph.param_names if "folded" in self.graph.node(c)}
        detached = self._detached        # a param only folded constants read is no longer in the graph
        for n, v in values.items():
            f = next((f for f in folded.values() if n in f.roots), None)
            if f is not None and n not in self.graph.nx:
                t = f.graph.node(n)["type"]
                detached[n] = self._checked(n, t, v)
            else:
                self._set_param(n, self._checked(n, self.graph.node(self._param_name(n))["type"], v))
        for c, f in folded.items():
            if set(values) & set(f.roots):
                now = {r: detached[r] if r in detached else
                       (self._get_param(r) if r in self.graph.nx else f.graph.node(r)["value"]) for r in f.roots}
                value = f.recompute(now)
                self._set_param(c, np.ascontiguousarray(value, dtype=self.graph.node(c)["type"].dtype))

    def _checked(self, n, t, v) -> np.ndarray:
        """``v`` as param ``n`` of type ``t``: the graph's rules for param
        values (``ir.param_array``: real numbers the dtype holds), and the
        param's shape."""
        try:
            a = param_array(v, t.dtype, f"graph '{self.graph.name}': param '{n}'")
        except GraphError as e:
            raise InputError(str(e)) from None
        if a.shape != t.shape:
            raise InputError(f"graph '{self.graph.name}': param '{n}' has shape {t.shape}, got {a.shape}")
        return a

    def _param_name(self, n):
        if n not in self.graph.nx or self.graph.node(n)["op"] != "param":
            raise InputError(f"graph '{self.graph.name}' has no param {n!r}")
        return n

    def __repr__(self):
        ins = ", ".join(f"{n}: {t}" for n, t in self.inputs.items())
        outs = ", ".join(f"{n}: {t}" for n, t in self.outputs.items())
        return f"<convc {self.target} module '{self.graph.name}' ({ins}) -> ({outs})>"

    # -- pickling ------------------------------------------------------------------------------
    def _remember(self, graph: Graph, options: dict) -> "Module":
        """Called by ``cc.compile``: keep what compiling this module again
        needs, the graph it was given (``graph``, before the passes; a copy,
        which shares the immutable param arrays) and the compile options."""
        passes = options["passes"]
        self._recipe = (graph.copy(), {**options, "passes": passes if isinstance(passes, str) else list(passes)})
        return self

    def source_graph(self) -> Graph:
        """The graph ``cc.compile`` was given (before the passes), with the
        module's current param values: weights and optimizer state as
        training or ``set_params`` left them. This is what a pickled module
        carries. Raises ``ConvcError`` for a module not made by ``cc.compile``."""
        recipe = getattr(self, "_recipe", None)
        if recipe is None:
            raise ConvcError(f"graph '{self.graph.name}': this {self.target} module was not made by cc.compile, "
                             f"so the graph it was compiled from is not known (it cannot be pickled)")
        g = recipe[0].copy()
        for n in g.param_names:
            d = g.nx.nodes[n]
            if n in self._detached:                 # set since compile; only folded constants read it
                value = self._detached[n].copy()
            elif n in self.graph.nx and self.graph.node(n)["op"] == "param" and self.graph.node(n)["type"] == d["type"]:
                value = self._current(n)            # the compiled graph's own param: its value now
            else:
                continue                            # not changeable in the module: as compiled
            value.flags.writeable = False           # params are immutable (ir.param_array); this copy is ours
            d["value"] = value
        return g

    def _current(self, n: str) -> np.ndarray:
        """A copy of param ``n``'s value now: from the module, or from the
        compiled graph where the generated code does not use it."""
        try:
            return self._get_param(n)
        except InputError:                   # not in the params blob (nothing reads it)
            return self.graph.node(n)["value"].copy()

    def __reduce__(self):
        """Pickle as the recipe, never as cffi objects or buffers: the
        graph as given to ``cc.compile`` with the current param values, the
        target and the compile options. Unpickling (in any process, on any
        host) compiles it again through ``cc.compile``: the passes run
        again, for this host (its tuning database, its int8 instructions),
        the library comes from the compile cache or is built there
        (``native=True``: for this host's CPU), OpenMP threads and the
        OpenCL device are chosen as this process would. A pickle from another
        convc raises :class:`StateVersionError`."""
        return pickled("module", dict(graph=self.source_graph(), target=self.target, options=self._recipe[1]))


class NumpyModule(Module):
    """Runs the reference interpreter."""

    target = "numpy"

    def __init__(self, graph: Graph):
        super().__init__(graph, str(graph))
        self._state = {n: graph.node(n)["value"].copy() for n in graph.param_names}

    def _run(self, args, outs):
        from ..reference import run_step
        res = run_step(self.graph, {n: a for (n, _, _), a in zip(self._in_spec, args)}, self._state)
        for name, o in zip(self._out_names, outs):
            o[...] = res[name]
        return outs

    def _get_param(self, n):
        return self._state[n].copy()

    def _set_param(self, n, a):
        self._state[n] = a.copy()


def param_view(graph: Graph, plan, blob: np.ndarray, n: str) -> np.ndarray:
    """Param ``n`` as a typed view into the param blob laid out by ``plan``."""
    t = graph.node(n)["type"]
    if n not in plan.params:
        raise InputError(f"graph '{graph.name}': param '{n}' is not used by the compiled code")
    off = plan.params[n]
    return blob[off:off + t.nbytes].view(t.dtype).reshape(t.shape)


def untyped(ffi, fn, n_args: int):
    """``fn`` (an ``int f(T *, ...)`` entry point) seen as taking ``n_args``
    untyped pointers, so that its arguments can be plain
    ``ffi.from_buffer(array)``: about 0.1 us cheaper per call than typed
    buffers, and the dtypes have been checked before any call."""
    return ffi.cast(f"int(*)({', '.join(['void *'] * n_args)})", fn)


def fast_path(mod: Module, fixed: tuple, lock) -> str:
    """Give ``mod`` its fast path: ``run`` and ``__call__`` specialised, as
    straight-line Python compiled once, to this graph's inputs and outputs.

    It applies to a dict of exactly the declared inputs, each a numpy array
    whose dtype is the declared dtype object, whose shape is the declared
    tuple and which is C-contiguous and aligned. It allocates the outputs,
    or takes the caller's ``out`` arrays when ``out`` names every output
    with an array of the same kind that is writeable and overlaps no input
    and no other out array (any other ``out`` goes to ``Module._outputs``);
    then it takes ``lock`` and calls ``mod._call_entry(inputs...,
    outputs..., *fixed)`` on the arrays' own buffers (looked up per call, as
    the checked path does, so that tests can put a spy there). Anything else
    goes to ``Module._checked_run``. The loops over inputs and outputs, the
    starred calls and the intermediate lists of a generic path cost more
    than the checks themselves on a small graph: that is why this code is
    generated. Returns its source (kept as ``mod._fast_source``)."""
    ins = [f"in{i}" for i in range(len(mod._in_spec))]
    outs = [f"out{j}" for j in range(len(mod._out_spec))]
    ns = dict(ndarray=np.ndarray, empty=np.empty, shares_memory=np.shares_memory, DENSE=_DENSE,
              WRITEABLE_DENSE=_WRITEABLE_DENSE, lock=lock, from_buffer=mod._ffi.from_buffer)
    for i, (_, dtype, shape) in enumerate(mod._in_spec):
        ns[f"in_dtype{i}"], ns[f"in_shape{i}"] = dtype, shape
    for j, (shape, dtype) in enumerate(mod._out_spec):
        ns[f"out_shape{j}"], ns[f"out_dtype{j}"] = shape, dtype
    for k, f in enumerate(fixed):
        ns[f"fixed{k}"] = f

    def each(terms: list[str], indent: str) -> str:           # one condition a line
        return f"\n{indent}and ".join(terms) or "True"
    fetch = [f"{v} = feeds.get({n!r})" for v, (n, _, _) in zip(ins, mod._in_spec)]
    exact = [f"type({v}) is ndarray and {v}.dtype is in_dtype{i} and {v}.shape == in_shape{i} "
             f"and {v}.flags.num & DENSE == DENSE" for i, v in enumerate(ins)]
    allocate = [f"{v} = empty(out_shape{j}, out_dtype{j})" for j, v in enumerate(outs)]
    given = [f"{v} = out.get({n!r})" for v, n in zip(outs, mod._out_names)]
    usable = [f"type({v}) is ndarray and {v}.dtype is out_dtype{j} and {v}.shape == out_shape{j} "
              f"and {v}.flags.num & WRITEABLE_DENSE == WRITEABLE_DENSE" for j, v in enumerate(outs)]
    usable += [f"not shares_memory({v}, {w})" for j, v in enumerate(outs) for w in ins + outs[:j]]
    unpack = ", ".join(outs) + ("," if len(outs) == 1 else "")
    pointers = ", ".join([f"from_buffer({v})" for v in ins + outs] + [f"fixed{k}" for k in range(len(fixed))])
    as_dict = "{" + ", ".join(f"{n!r}: {v}" for n, v in zip(mod._out_names, outs)) + "}"
    as_value = outs[0] if len(outs) == 1 else f"({', '.join(outs)})"
    outputs_of_run = [
        "if out is None:",
        *(f"    {line}" for line in allocate),
        f"elif type(out) is dict and len(out) == {len(outs)}:",
        *(f"    {line}" for line in given),
        "    # each out array exactly as declared, writeable, overlapping no input and no other out array",
        f"    if not ({each(usable, ' ' * 24)}):",
        f"        {unpack} = mod._outputs(out, [{', '.join(ins)}])     # explains what is wrong",
        "else:",
        f"    {unpack} = mod._outputs(out, [{', '.join(ins)}])"]

    def function(head: str, outputs: list[str], result: str, otherwise: str) -> list[str]:
        return [head,
                f"    if type(feeds) is dict and len(feeds) == {len(ins)}:",
                *(f"        {line}" for line in fetch),
                "        # each input exactly as declared: no conversion, no copy",
                f"        if ({each(exact, ' ' * 16)}):",
                *(f"            {line}" for line in outputs),
                "            lock.acquire()            # the module's arena and params are shared: calls take turns",
                "            try:",
                f"                rc = mod._call_entry({pointers})",
                "            finally:",
                "                lock.release()",
                "            if rc:",
                f"                mod._failed(rc, [{', '.join(ins)}])      # invalid input values, or a device error",
                f"            return {result}",
                "    # anything else: check, convert or explain",
                f"    return {otherwise}",
                ""]

    # names only ever appear as repr() literals: a name with a newline must not end the comment
    lines = [f"# fast path of convc module {mod.graph.name!r} ({mod.target}): "
             f"({', '.join(repr(n) for n, _, _ in mod._in_spec)}) -> ({', '.join(map(repr, mod._out_names))})",
             *function("def run(mod, feeds, out=None):", outputs_of_run, as_dict, "mod._checked_run(feeds, out)"),
             *function("def call(mod, feeds):", allocate, as_value, "mod._checked_call(feeds)")]
    source = "\n".join(lines)
    exec(compile(source, f"<convc fast path of {mod.graph.name}>", "exec"), ns)
    mod._fast_run, mod._fast_call, mod._fast_source = ns["run"], ns["call"], source
    return source


def aligned_bytes(nbytes: int, align: int = 64) -> np.ndarray:
    raw = np.zeros(nbytes + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + nbytes]


class CModule(Module):
    """A graph compiled to C and loaded through cffi."""

    target = "c"

    def __init__(self, graph: Graph, csrc, lib_path):
        import cffi

        super().__init__(graph, csrc.text, [n for n, _ in csrc.inputs])
        self.library_path = lib_path
        self.plan = csrc.plan
        self._ffi = cffi.FFI()
        self._ffi.cdef(csrc.signature.replace("restrict ", "") + ";")
        if csrc.profile_signature:
            self._ffi.cdef(csrc.profile_signature + ";")
        self._profile_fn = csrc.profile_signature and csrc.profile_signature.split()[1].split("(")[0].lstrip("*")
        from .cache import private_copy

        alias = private_copy(Path(lib_path))
        try:
            self._lib = self._ffi.dlopen(str(alias))
        finally:
            os.unlink(alias)
        self._entry = getattr(self._lib, csrc.entry)
        self._profiled = getattr(self._lib, self._profile_fn) if self._profile_fn else None
        self._params = aligned_bytes(max(csrc.plan.params_bytes, 1))
        for n, off in csrc.plan.params.items():
            arr = graph.node(n)["value"]
            self._params[off:off + arr.nbytes] = arr.reshape(-1).view(np.uint8)
        self._arena = aligned_bytes(max(csrc.plan.arena_bytes, 1))
        self._lock = threading.Lock()        # one arena: calls from several threads take turns
        # resolved once for every call: the entry point on untyped pointers,
        # and the params and arena, which never move
        self._fixed = (self._ffi.from_buffer(self._params), self._ffi.from_buffer(self._arena))
        self._call_entry = untyped(self._ffi, self._entry, len(csrc.inputs) + len(csrc.outputs) + 2)
        fast_path(self, self._fixed, self._lock)

    def profile(self) -> dict[str, float]:
        """Seconds spent in each node over all runs so far (needs
        ``cc.compile(..., profile=True)``), slowest first."""
        if self._profiled is None:
            raise InputError(f"graph '{self.graph.name}': compile with profile=True to get per-node times")
        times = self._profiled()
        res = {n: float(times[i]) for i, n in enumerate(self.plan.order)}
        return dict(sorted(res.items(), key=lambda kv: -kv[1]))

    def _param_view(self, n) -> np.ndarray:
        return param_view(self.graph, self.plan, self._params, n)

    def _get_param(self, n):
        with self._lock:
            return self._param_view(n).copy()

    def _set_param(self, n, a):
        with self._lock:
            self._param_view(n)[...] = a

    def _run(self, args, outs):
        # from_buffer is the cheapest way to a pointer (a.ctypes.data costs
        # several times more); each cdata keeps its array alive while the
        # call runs
        ptrs = [self._ffi.from_buffer(a) for a in (*args, *outs)]
        with self._lock:
            rc = self._call_entry(*ptrs, *self._fixed)
        if rc:
            self._failed(rc, args)
        return outs

    def _failed(self, rc: int, args=()):
        raise self._status_error(rc, args)

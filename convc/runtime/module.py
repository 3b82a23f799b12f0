"""Compiled modules: check inputs at the boundary, then run the target."""
from __future__ import annotations

import abc
import os
import threading
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..ir import Graph, TensorType


class Module(abc.ABC):
    """A compiled graph. ``run({name: array}) -> {name: array}``;
    ``mod(**inputs)`` returns one array, or a tuple for several outputs."""

    target = "?"

    def __init__(self, graph: Graph, source: str):
        self.graph = graph
        self.source = source
        from ..schedule import live_nodes

        live = live_nodes(graph)
        # the inputs the outputs need; other graph inputs may be passed and are ignored
        self.inputs: dict[str, TensorType] = {n: graph.node(n)["type"] for n in graph.input_names if n in live}
        self.param_names: list[str] = [n for n in graph.param_names if n in live]
        self.outputs: dict[str, TensorType] = {o: graph.node(n)["type"] for o, n in graph.outputs.items()}
        self._detached: dict[str, np.ndarray] = {}      # set params that only folded constants read

    def check_inputs(self, feeds) -> dict[str, np.ndarray]:
        """Names, shapes and dtypes checked; arrays made C-contiguous."""
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
                a = np.asarray(a)
            if a.dtype != np.dtype(t.dtype):
                raise InputError(f"graph '{self.graph.name}': input '{name}' has dtype {a.dtype}, expected "
                                 f"{t.dtype} (convert with .astype(np.{t.dtype}))")
            if tuple(a.shape) != t.shape:
                raise InputError(f"graph '{self.graph.name}': input '{name}' has shape {tuple(a.shape)}, "
                                 f"expected {t.shape}")
            out[name] = np.ascontiguousarray(a)
        return out

    def run(self, feeds: dict) -> dict[str, np.ndarray]:
        return self._run(self.check_inputs(feeds))

    def __call__(self, **feeds):
        res = self.run(feeds)
        vals = tuple(res[o] for o in self.outputs)
        return vals[0] if len(vals) == 1 else vals

    @abc.abstractmethod
    def _run(self, feeds):
        """Run the target on checked feeds."""

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
        again, on the host."""
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
        a = np.asarray(v)
        if a.shape != t.shape:
            raise InputError(f"graph '{self.graph.name}': param '{n}' has shape {t.shape}, got {a.shape}")
        return np.ascontiguousarray(a, dtype=t.dtype)

    def _param_name(self, n):
        if n not in self.graph.nx or self.graph.node(n)["op"] != "param":
            raise InputError(f"graph '{self.graph.name}' has no param {n!r}")
        return n

    def __repr__(self):
        ins = ", ".join(f"{n}: {t}" for n, t in self.inputs.items())
        outs = ", ".join(f"{n}: {t}" for n, t in self.outputs.items())
        return f"<convc {self.target} module '{self.graph.name}' ({ins}) -> ({outs})>"


class NumpyModule(Module):
    """Runs the reference interpreter."""

    target = "numpy"

    def __init__(self, graph: Graph):
        super().__init__(graph, str(graph))
        self._state = {n: graph.node(n)["value"].copy() for n in graph.param_names}

    def _run(self, feeds):
        from ..reference import run_step
        return run_step(self.graph, feeds, self._state)

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


_CDATA = {np.dtype(k): v for k, v in {"float32": "float[]", "float64": "double[]", "int64": "int64_t[]",
                                       "uint8": "unsigned char[]"}.items()}


def aligned_bytes(nbytes: int, align: int = 64) -> np.ndarray:
    raw = np.zeros(nbytes + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + nbytes]


class CModule(Module):
    """A graph compiled to C and loaded through cffi."""

    target = "c"

    def __init__(self, graph: Graph, csrc, lib_path):
        import cffi

        super().__init__(graph, csrc.text)
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
        self._fixed = None
        self._lock = threading.Lock()

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

    def _ptr(self, a: np.ndarray):
        # from_buffer is several times cheaper than casting a.ctypes.data, and
        # keeps the array alive while the cdata is
        return self._ffi.from_buffer(_CDATA[a.dtype], a)

    def _run(self, feeds):
        outs = {o: np.empty(t.shape, t.dtype) for o, t in self.outputs.items()}
        args = [self._ptr(feeds[n]) for n in self.inputs] + [self._ptr(outs[o]) for o in self.outputs]
        if self._fixed is None:                 # params and arena never move
            self._fixed = (self._ffi.from_buffer(self._params), self._ffi.from_buffer(self._arena))
        with self._lock:
            rc = self._entry(*args, *self._fixed)
        if rc != 0:
            raise InputError(f"graph '{self.graph.name}': generated code returned error {rc}")
        return outs

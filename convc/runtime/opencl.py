"""The OpenCL target at run time: the generated host program (C, linked
with the ICD loader ``-lOpenCL``) is built through the cache and loaded with
cffi like the C target; it keeps params and arena on the device."""
from __future__ import annotations

import ctypes.util
import functools
import os
import threading
from pathlib import Path

import numpy as np

from ..errors import CompileError, ConvcError, InputError
from ..ir import Graph
from .module import Module, aligned_bytes, fast_path, param_view, untyped

INSTALL_HINT = ("install an OpenCL ICD loader, its headers and a driver, e.g. on Debian/Ubuntu: "
                "apt-get install ocl-icd-opencl-dev opencl-headers pocl-opencl-icd")


class OpenCLUnavailable(ConvcError):
    """No OpenCL loader, headers or device on this machine."""


def _check_toolchain() -> None:
    if not ctypes.util.find_library("OpenCL"):
        raise OpenCLUnavailable(f"the OpenCL ICD loader (libOpenCL) is not installed; {INSTALL_HINT}")
    heads = [Path(p) / "CL" / "cl.h" for p in ("/usr/include", "/usr/local/include",
                                               *os.environ.get("CPATH", "").split(os.pathsep)) if p]
    if not any(h.exists() for h in heads):
        raise OpenCLUnavailable(f"the OpenCL headers (CL/cl.h) are not installed; {INSTALL_HINT}")


@functools.lru_cache(maxsize=None)
def _probe():
    import cffi

    from .. import __version__
    from ..codegen.env import environment
    from .build import build

    _check_toolchain()
    text = environment().get_template("opencl/probe.c.j2").render(version=__version__)
    ffi = cffi.FFI()
    ffi.cdef("int convc_list_devices(char *buf, int n);")
    return ffi, ffi.dlopen(str(build(text, libs=("-lOpenCL",), what="OpenCL device probe")))


def devices() -> list[dict]:
    """The OpenCL devices present, in platform:device order; the one the
    OpenCL target would pick has ``chosen=True``. Raises ``OpenCLUnavailable``
    (a ConvcError saying what to install) when there is no loader or no
    device."""
    ffi, lib = _probe()
    buf = ffi.new("char[]", 1 << 16)
    count = lib.convc_list_devices(buf, 1 << 16)
    text = ffi.string(buf).decode(errors="replace")
    if count < 0:
        raise OpenCLUnavailable(text)
    out = []
    for line in text.splitlines():
        idx, kind, platform, name, version, fp64, units, mib, chosen = line.split("\t")
        out.append(dict(index=idx, type=kind, platform=platform, name=name, version=version,
                        fp64=fp64 == "yes", compute_units=int(units), memory_mib=int(mib),
                        chosen=chosen == "chosen", note="" if chosen in ("", "chosen") else chosen))
    return out


class OpenCLModule(Module):
    """A graph compiled to OpenCL kernels plus a C host program."""

    target = "opencl"

    def __init__(self, graph: Graph, src, lib_path):
        import cffi

        super().__init__(graph, src.kernels, [n for n, _ in src.inputs])
        self.host_source = src.host            # the C host program (kernels embedded): builds without Python
        self.host_api = src.cdef()              # its declarations, e.g. for a C main() that links it
        self.host_prefix = src.prefix
        self.library_path = lib_path
        self.kernels_path = Path(lib_path).parent / "kernels.cl"
        self.plan = src.plan
        self._src = src
        self._ffi = cffi.FFI()
        self._ffi.cdef(src.cdef())
        from .cache import private_copy

        alias = private_copy(Path(lib_path))
        try:
            self._lib = self._ffi.dlopen(str(alias))
        finally:
            os.unlink(alias)
        p = src.prefix
        self._fn = {k: getattr(self._lib, f"{p}_{k}") for k in ("init", "run", "read_params", "write_params",
                                                                  "error", "device", "release")}
        self._params = aligned_bytes(max(src.plan.params_bytes, 1))
        for n, off in src.plan.params.items():
            arr = graph.node(n)["value"]
            self._params[off:off + arr.nbytes] = arr.reshape(-1).view(np.uint8)
        self._lock = threading.Lock()
        rc = self._fn["init"](self._ptr(self._params))
        if rc != 0:
            msg = self._error()
            if rc == -3:
                raise CompileError(f"graph '{graph.name}': {msg}\nkernel source: {self.kernels_path}")
            if rc == -1 and "no OpenCL platform" in msg:
                raise OpenCLUnavailable(msg)
            raise ConvcError(f"graph '{graph.name}': OpenCL setup failed: {msg}")
        self.device = self._ffi.string(self._fn["device"]()).decode(errors="replace")
        # the host program's run(inputs..., outputs...) copies inputs to the
        # device and the results back into the output buffers it is given
        self._call_entry = untyped(self._ffi, self._fn["run"], len(src.inputs) + len(src.outputs))
        fast_path(self, (), self._lock)

    def _error(self) -> str:
        return self._ffi.string(self._fn["error"]()).decode(errors="replace")

    def _ptr(self, a: np.ndarray):
        return self._ffi.cast("void *", a.ctypes.data)

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise ConvcError(f"graph '{self.graph.name}': {what} on OpenCL device '{self.device}': {self._error()}")

    def _run(self, args, outs):
        ptrs = [self._ffi.from_buffer(a) for a in (*args, *outs)]     # each keeps its array alive
        with self._lock:
            rc = self._call_entry(*ptrs)
        if rc:
            self._failed(rc, args)
        return outs

    def _failed(self, rc: int, args=()):
        if rc > 0:          # a node's status: invalid input values (the host checks them before any launch)
            raise self._status_error(rc, args)
        self._check(rc, "run")

    def _param_view(self, n) -> np.ndarray:
        return param_view(self.graph, self.plan, self._params, n)

    def _get_param(self, n):
        with self._lock:
            self._check(self._fn["read_params"](self._ptr(self._params)), "reading params")
            return self._param_view(n).copy()

    def _set_param(self, n, a):
        with self._lock:
            self._check(self._fn["read_params"](self._ptr(self._params)), "reading params")
            self._param_view(n)[...] = a
            self._check(self._fn["write_params"](self._ptr(self._params)), "writing params")

    def params_blob(self) -> np.ndarray:
        """The params as the host program's ``<prefix>_init`` takes them: one
        byte blob (with the current, possibly trained, values)."""
        with self._lock:
            self._check(self._fn["read_params"](self._ptr(self._params)), "reading params")
            return self._params.copy()

    def profile(self):
        raise InputError(f"graph '{self.graph.name}': per-node profiling is not available on the opencl target")

    def __del__(self):
        fn = getattr(self, "_fn", None)
        if fn:
            fn["release"]()

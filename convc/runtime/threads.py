"""Threads of the generated C code. Nodes big enough to pay for it
(``codegen.c.PARALLEL_WORK``) run their parallel loop nest with OpenMP; the
thread count is OpenMP's (``OMP_NUM_THREADS``, else every core) unless set
here."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

from ..errors import ConvcError


@functools.lru_cache(maxsize=None)
def _gomp():
    name = ctypes.util.find_library("gomp") or "libgomp.so.1"
    try:
        return ctypes.CDLL(name)
    except OSError as e:
        raise ConvcError(f"the OpenMP runtime (libgomp) cannot be loaded: {e}; install gcc's libgomp") from None


def set_num_threads(n: int) -> None:
    """Use ``n`` threads in generated C code run from this Python thread
    (the same library every compiled module links, so it applies to all)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConvcError(f"set_num_threads() takes a positive int, got {n!r}")
    _gomp().omp_set_num_threads(ctypes.c_int(n))


def get_num_threads() -> int:
    """Threads the next parallel node will use."""
    return int(_gomp().omp_get_max_threads())

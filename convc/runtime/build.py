"""Compile C source to a shared library with the system compiler, through
the cache. We build a plain shared library and load it with cffi's ABI mode
(``ffi.dlopen`` with a cdef rendered from the same signature as the C
prototype): no Python headers are needed, and the artifact is the same C that
``export`` ships to devices."""
from __future__ import annotations

import functools
import hashlib
import os
import shlex
import subprocess
import tempfile
from pathlib import Path

from ..errors import CompileError
from . import cache


def compiler() -> str:
    return os.environ.get("CONVC_CC", "cc")


@functools.lru_cache(maxsize=None)
def compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CompileError(f"C compiler {cc!r} cannot be run ({e}); install gcc or set CONVC_CC") from None
    return out.stdout.strip()


@functools.lru_cache(maxsize=None)
def native_target(cc: str) -> str:
    """What ``-march=native`` means to ``cc`` on this host: the macros it
    predefines under that flag (the ISA extensions: ``__AVX2__``,
    ``__AVX512F__``, ...). Part of the cache key of a native build, so that a
    cache shared between machines (a network home, a copied directory, a
    module unpickled on another host) never hands out a library built for
    another CPU."""
    try:
        out = subprocess.run([cc, "-march=native", "-dM", "-E", "-x", "c", os.devnull], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CompileError(f"C compiler {cc!r} cannot be run ({e}); install gcc or set CONVC_CC") from None
    return "\n".join(sorted(out.stdout.splitlines())) + out.stderr


def flags(native: bool = True) -> list[str]:
    try:
        extra = shlex.split(os.environ.get("CONVC_CFLAGS", ""))
    except ValueError as e:
        raise CompileError(f"CONVC_CFLAGS={os.environ['CONVC_CFLAGS']!r} cannot be split into flags: {e}") from None
    return ["-std=c99", "-O3", *(["-march=native"] if native else []), "-fopenmp", "-ffp-contract=fast", "-DCONVC_OMP_SIMD",
            "-fPIC", "-shared", *extra]


def build(source: str, native: bool = True, libs: tuple[str, ...] = (), extra_files: dict[str, str] | None = None,
          what: str = "generated code") -> Path:
    """Return the path of a shared library built from ``source`` (cached).
    ``libs``: link flags (e.g. "-lOpenCL"); ``extra_files``: name -> text
    written beside the source (e.g. the OpenCL kernels, for reading)."""
    cc = compiler()
    cmd = [cc, *flags(native)]
    host = native_target(cc) if native else ""          # -march=native: the key names this CPU's ISA
    key = hashlib.sha256("\0".join([source, compiler_version(cc), " ".join(cmd), *libs, host]).encode()).hexdigest()
    d = cache.entry_dir(key)                    # checked private to this user (see runtime/cache.py)
    hit = cache.lookup(d)
    if hit:
        cache.STATS["hits"] += 1
        return hit
    with cache.locked(d):
        hit = cache.lookup(d, count=False)      # someone else may have built it while we waited
        if hit:
            cache.STATS["hits"] += 1
            return hit
        try:
            cache.clean_entry(d)                # what a build killed before publishing left behind
            src = d / "module.c"
            cache.write_private(src, source.encode())
            for fname, text in (extra_files or {}).items():
                cache.write_private(d / fname, text.encode())
            fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=d)
            os.close(fd)
        except OSError as e:
            raise CompileError(f"cannot write the cache entry {d}: {e}") from None
        full = cmd + ["-o", tmp, str(src), "-lm", *libs]
        cache.STATS["compiles"] += 1
        try:
            proc = subprocess.run(full, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            os.unlink(tmp)
            raise CompileError(f"running the C compiler failed: {e}\ncommand: {' '.join(full)}\n"
                               f"generated source: {src}") from None
        if proc.returncode != 0:
            os.unlink(tmp)
            lines = proc.stderr.strip().splitlines()
            shown = "\n".join(lines[:40]) + (f"\n... ({len(lines) - 40} more lines)" if len(lines) > 40 else "")
            raise CompileError(f"the C compiler rejected the {what} (exit {proc.returncode})\n"
                               f"command: {' '.join(full)}\ngenerated source: {src}\n{shown}")
        try:
            return cache.publish(d, Path(tmp), {"command": full, "compiler": compiler_version(cc)})
        except OSError as e:
            raise CompileError(f"cannot publish the built library into the cache entry {d}: {e}") from None

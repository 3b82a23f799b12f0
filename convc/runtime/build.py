"""Compile C source to a shared library with the system compiler, through
the cache. We build a plain shared library and load it with cffi's ABI mode
(``ffi.dlopen`` with a cdef rendered from the same signature as the C
prototype): no Python headers are needed, and the artifact is the same C that
``export`` ships to devices."""
from __future__ import annotations

import contextlib
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


def jobs() -> int:
    """How many compiler processes to run at once: one per core of this host."""
    from ..host import probe
    return max(1, probe().cores)


def build(source: str | dict[str, str], native: bool = True, libs: tuple[str, ...] = (),
          extra_files: dict[str, str] | None = None, what: str = "generated code", progress=None) -> Path:
    """Return the path of a shared library built from ``source`` (cached):
    one C text, or several translation units (file name -> text, the first
    one ``module.c``) compiled in parallel, :func:`jobs` at a time, and
    linked into one library. ``libs``: link flags (e.g. "-lOpenCL");
    ``extra_files``: name -> text written beside the source (e.g. the OpenCL
    kernels, for reading); ``progress``: a ``convc.progress.Progress`` told
    how many compiler jobs are done."""
    units = source if isinstance(source, dict) else {"module.c": source}
    cc = compiler()
    cmd = [cc, *flags(native)]
    host = native_target(cc) if native else ""          # -march=native: the key names this CPU's ISA
    texts = [part for fname, text in units.items() for part in (fname, text)] if len(units) > 1 else list(units.values())
    key = hashlib.sha256("\0".join([*texts, compiler_version(cc), " ".join(cmd), *libs, host]).encode()).hexdigest()
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
            srcs = []
            for fname, text in units.items():
                cache.write_private(d / fname, text.encode())
                srcs.append(d / fname)
            for fname, text in (extra_files or {}).items():
                cache.write_private(d / fname, text.encode())
            fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=d)
            os.close(fd)
        except OSError as e:
            raise CompileError(f"cannot write the cache entry {d}: {e}") from None
        cache.STATS["compiles"] += 1
        objects: list[str] = []
        try:
            if len(srcs) == 1:
                full = cmd + ["-o", tmp, str(srcs[0]), "-lm", *libs]
                _run([full], srcs, what, progress)
            else:                               # each unit to an object file, in parallel; then one link
                for _ in srcs:
                    fd, obj = tempfile.mkstemp(prefix=".build-", suffix=".o", dir=d)
                    os.close(fd)
                    objects.append(obj)
                _run([cmd + ["-c", "-o", o, str(s)] for o, s in zip(objects, srcs)], srcs, what, progress)
                full = cmd + ["-o", tmp, *objects, "-lm", *libs]
                _run([full], srcs, what, None)
        except CompileError:
            os.unlink(tmp)
            raise
        finally:
            for o in objects:
                with contextlib.suppress(OSError):
                    os.unlink(o)
        try:
            return cache.publish(d, Path(tmp), {"command": full, "compiler": compiler_version(cc),
                                                "units": list(units)})
        except OSError as e:
            raise CompileError(f"cannot publish the built library into the cache entry {d}: {e}") from None


def _run(commands: list[list[str]], srcs: list[Path], what: str, progress) -> None:
    """Run the compiler ``commands``, :func:`jobs` at a time; CompileError
    (with the command, the source and the first 40 lines the compiler
    printed) for the first that fails or cannot run."""
    where = srcs[0] if len(srcs) == 1 else f"{srcs[0].parent} ({', '.join(s.name for s in srcs)})"
    if len(commands) == 1:
        try:
            proc = subprocess.run(commands[0], capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise CompileError(f"running the C compiler failed: {e}\ncommand: {' '.join(commands[0])}\n"
                               f"generated source: {where}") from None
        if proc.returncode != 0:
            raise CompileError(_rejected(what, proc.returncode, commands[0], where, proc.stderr))
        return
    pending, running, done = list(commands), [], 0

    def fail(msg: str):
        for p, _ in running:
            p.kill()
            p.wait()
        raise CompileError(msg)
    try:
        while pending or running:
            while pending and len(running) < jobs():
                c = pending.pop(0)
                try:
                    running.append((subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), c))
                except OSError as e:
                    fail(f"running the C compiler failed: {e}\ncommand: {' '.join(c)}\ngenerated source: {where}")
            p, c = running[0]
            try:
                _, err = p.communicate(timeout=600)
            except subprocess.TimeoutExpired:
                fail(f"running the C compiler failed: it took more than 600 s\ncommand: {' '.join(c)}\n"
                     f"generated source: {where}")
            running.pop(0)
            done += 1
            if progress is not None:
                progress.update(f"C compiler {done}/{len(commands)} units")
            if p.returncode != 0:
                fail(_rejected(what, p.returncode, c, where, err))
    finally:
        for p, _ in running:
            if p.poll() is None:
                p.kill()
                p.wait()


def _rejected(what: str, rc: int, command: list[str], where, err: str) -> str:
    """The message of a CompileError for a compiler that exited with ``rc``:
    the command, the source and the first 40 lines it printed."""
    lines = err.strip().splitlines()
    shown = "\n".join(lines[:40]) + (f"\n... ({len(lines) - 40} more lines)" if len(lines) > 40 else "")
    return f"the C compiler rejected the {what} (exit {rc})\ncommand: {' '.join(command)}\ngenerated source: {where}\n{shown}"

"""The compile cache: one directory per key under the user cache dir.

Key = sha256 of the source text, the compiler's version banner and the full
command line. An entry holds the shared library and a manifest with the
library's sha256; an entry whose library does not match its manifest is
treated as corrupt and rebuilt. Builds take a per-key file lock, look in the
cache again after taking it (another process may have finished the build),
and publish with an atomic rename.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

STATS = {"compiles": 0, "hits": 0, "rebuilt_corrupt": 0}


def cache_dir() -> Path:
    env = os.environ.get("CONVC_CACHE_DIR")
    if env:
        root = Path(env)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = Path(base) / "convc"
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def entry_dir(key: str) -> Path:
    return cache_dir() / key[:2] / key


def lookup(key: str, count: bool = True) -> Path | None:
    """The cached library for ``key`` if present and intact, else None
    (``count``: record a corrupt entry in STATS)."""
    d = entry_dir(key)
    lib, manifest = d / "module.so", d / "manifest.json"
    if not lib.exists():
        return None
    try:
        meta = json.loads(manifest.read_text())
        if meta.get("sha256") == sha256_file(lib):
            return lib
    except (OSError, ValueError):
        pass
    if count:
        STATS["rebuilt_corrupt"] += 1
    return None


@contextlib.contextmanager
def locked(key: str):
    d = entry_dir(key)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield d
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def publish(key: str, built: Path, info: dict) -> Path:
    """Move a freshly built library into place atomically, manifest last."""
    d = entry_dir(key)
    lib = d / "module.so"
    os.replace(built, lib)
    tmp = d / f"manifest.json.{os.getpid()}"
    tmp.write_text(json.dumps(dict(info, sha256=sha256_file(lib)), indent=1))
    os.replace(tmp, d / "manifest.json")
    return lib


_loads = 0


def private_copy(lib: Path) -> Path:
    """A private copy of ``lib`` to dlopen (the caller unlinks it once loaded;
    the mapping stays valid). Two reasons: the dynamic loader hands back the
    handle it already has for a path it has seen, so a library rebuilt after
    corruption must be opened under a new name; and a mapping of the cache
    file itself would turn any later damage to that file into a SIGBUS."""
    global _loads
    _loads += 1
    alias = lib.parent / f".load-{os.getpid()}-{_loads}-{os.urandom(4).hex()}.so"
    shutil.copyfile(lib, alias)
    return alias

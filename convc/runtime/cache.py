"""The compile cache: one directory per key under the user cache dir.

Key = sha256 of the source text, the compiler's version banner and the full
command line. An entry (``<root>/<key[:2]>/<key>/``) holds the shared library
and a manifest with the library's sha256; an entry whose library does not
match its manifest is treated as corrupt and rebuilt. Builds take a per-key
file lock, look in the cache again after taking it (another process may have
finished the build), remove what a killed build left behind, and publish with
an atomic rename.

Security model
--------------
A library in the cache is code this process will run, so the cache is only
used when nobody but this user (and root) can have written it:

* convc creates the root, every directory under it and every file it writes
  private to the user (directories 0700, files 0600, libraries 0700) whatever
  the process umask, and writes a ``CACHEDIR.TAG`` marker into a root it
  creates (backup tools skip the directory; ``convc cache --clear`` and
  :func:`clear` delete only what convc itself made).
* The root must be a directory owned by the user and not writable by group
  or others, and every directory above it (as written and after resolving
  symbolic links) must be owned by the user or root and not writable by
  group or others unless it is sticky (like ``/tmp``). Otherwise, or if the
  root is not a directory, cannot be created or is read-only, convc warns
  (:class:`CacheWarning`) and compiles into a private temporary directory for
  the rest of the process (removed at exit): nothing is cached across
  processes, nothing is read from the untrusted place.
* Each entry directory, its shard directory and the files read from it
  (``module.so``, ``manifest.json``) must be real directories/regular files,
  not symbolic links, owned by the user and not writable by group or others;
  an entry that is not is never loaded: convc warns and builds that module in
  the private temporary directory instead.
* The library is loaded from a private copy, and the bytes written to that
  copy are the bytes whose sha256 was checked against the manifest (one read
  under the entry's lock; no window between check and copy).

Not protected: anything running as the same user (or root) can rewrite the
cache, the manifest included, and so run code in the next convc process; that
attacker can equally edit convc itself or the user's shell startup files.
The sha256 catches damage (truncation, disk errors, a half-written file), it
does not authenticate who built the library.
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import warnings
from pathlib import Path

from ..errors import CompileError

STATS = {"compiles": 0, "hits": 0, "rebuilt_corrupt": 0}

MARKER = "CACHEDIR.TAG"
MARKER_TEXT = ("Signature: 8a477f597d28d172789f06886806bc55\n"
               "# This file is a cache directory tag created by convc (its compile cache).\n"
               "# For information about cache directory tags see https://bford.info/cachedir/\n")
_KEY = re.compile(r"[0-9a-f]{64}")
#: names convc itself creates directly under the root (besides the key shards)
OWN_SUBDIRS = ("probes", "tuning", "bench-onnx", "modules")
#: files a build leaves in an entry while it runs: the compiler's output (and
#: its pre-``.build-`` name), the object files of a several-unit build, the manifest being written
_STALE = (re.compile(r"\.build-[^/]*\.so"), re.compile(r"\.build-[^/]*\.o"), re.compile(r"tmp[A-Za-z0-9_]{8}\.so"), re.compile(r"manifest\.json\.\d+"))
_MAX_MANIFEST = 1 << 20


class CacheWarning(UserWarning):
    """The compile cache (or one entry of it) is not trusted or not usable:
    convc compiles into a private temporary directory instead."""


# -- the root ------------------------------------------------------------------------------------
def configured_dir() -> Path:
    """The cache root convc is configured to use (``CONVC_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/convc``, else ``~/.cache/convc``), not created or
    checked."""
    env = os.environ.get("CONVC_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "convc"


def _mode(st) -> str:
    return oct(stat.S_IMODE(st.st_mode))


def _private_problem(st, what: str) -> str | None:
    """Why a directory or file with lstat/fstat result ``st`` is not private
    to this user, or None."""
    uid = os.geteuid()
    if st.st_uid != uid:
        return f"{what} is owned by uid {st.st_uid}, not by this user (uid {uid})"
    if st.st_mode & 0o022:
        return f"{what} is writable by group or others (mode {_mode(st)})"
    return None


def _ancestors_problem(path: Path) -> str | None:
    """Why a directory above ``path`` (as written, and after resolving
    symbolic links) lets someone other than this user or root replace what is
    below it, or None."""
    uid = os.geteuid()
    for chain in (Path(os.path.abspath(path)), Path(os.path.realpath(path))):
        for parent in chain.parents:
            try:
                st = os.stat(parent)
            except OSError:
                continue                        # not there (yet): what is created below it is checked
            if st.st_uid not in (uid, 0):
                return f"{parent} (above it) is owned by uid {st.st_uid}, neither this user (uid {uid}) nor root"
            if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
                return f"{parent} (above it) is writable by group or others and not sticky (mode {_mode(st)})"
    return None


def _mkdir_private(path: Path) -> None:
    """Create ``path`` and any missing parents, each 0700 (whatever the
    umask); an existing directory is left as it is."""
    missing = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for p in reversed(missing):
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:             # made meanwhile by another process: checked by the caller
            continue
        os.chmod(p, 0o700)


def _looks_like_cache(root: Path) -> bool:
    """Everything in ``root`` is something convc makes there."""
    for name in os.listdir(root):
        if not (name in (MARKER, *OWN_SUBDIRS) or re.fullmatch(r"[0-9a-f]{2}", name)):
            return False
    return True


def root_problem(root: Path) -> str | None:
    """Why ``root`` cannot be used as the cache root (see the module
    docstring), or None. Nothing is created."""
    try:
        st = os.stat(root)
    except FileNotFoundError:
        return "it does not exist"
    except OSError as e:
        return f"it cannot be examined ({e.strerror or e})"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    why = _private_problem(st, "it") or _ancestors_problem(root)
    if why:
        return why
    if not os.access(root, os.W_OK | os.X_OK):
        return "it is not writable (read-only?)"
    return None


def _prepare_root(root: Path) -> str | None:
    """Create ``root`` (0700, with the marker) if it is missing and check it;
    why it cannot be used, or None."""
    created = False
    if not os.path.lexists(root):
        try:
            _mkdir_private(root)
            created = True
        except OSError as e:
            return f"it cannot be created ({e.strerror or e})"
    why = root_problem(root)
    if why:
        return why
    if not (root / MARKER).exists():
        try:
            if created or _looks_like_cache(root):      # never tag a directory holding other things
                write_private(root / MARKER, MARKER_TEXT.encode())
        except FileExistsError:                         # another process wrote it just now
            pass
        except OSError as e:
            return f"it is not writable ({e.strerror or e})"
    return None


_private_roots: dict[str, Path] = {}


def private_root(why: str, where: Path) -> Path:
    """The private temporary directory this process compiles into instead of
    ``where`` (which is not used because of ``why``): made once per process,
    removed at exit; warns (:class:`CacheWarning`) the first time for each
    ``where``."""
    if "" not in _private_roots:
        tmp = Path(tempfile.mkdtemp(prefix="convc-cache-"))      # 0700, ours
        write_private(tmp / MARKER, MARKER_TEXT.encode())
        owner = os.getpid()
        atexit.register(lambda: os.getpid() == owner and shutil.rmtree(tmp, True))    # not from a forked child
        _private_roots[""] = tmp
    tmp = _private_roots[""]
    if str(where) not in _private_roots:
        _private_roots[str(where)] = tmp
        fix = (f"remove {where} (and check who wrote it)" if where != configured_dir() else
               "point CONVC_CACHE_DIR at a directory only you can write (mode 0700), or fix this one")
        warnings.warn(f"convc compile cache: {where} is not used: {why}. Compiling into the private temporary "
                      f"directory {tmp} instead (removed at exit; nothing is cached across processes); to cache "
                      f"again, {fix}.", CacheWarning, stacklevel=3)
    return tmp


def cache_dir() -> Path:
    """The cache root, created 0700 if missing; a private temporary directory
    (with a :class:`CacheWarning`) if the configured one is not trusted or
    not usable."""
    root = configured_dir()
    why = _prepare_root(root)
    return root if why is None else private_root(why, root)


def subdir(name: str) -> Path:
    """``<root>/<name>``, a directory convc keeps beside the entries (probes,
    tuning database, ONNX exports), created 0700; the same directory in the
    private temporary root if the one in the cache is a symbolic link, not a
    directory, or not private to this user."""
    root = cache_dir()
    d = root / name
    try:
        if not os.path.lexists(d):
            _mkdir_private(d)
        why = entry_problem(d, levels=1)
    except OSError as e:                        # e.g. the disk filled up since the root was checked
        why = f"{d} cannot be created ({e.strerror or e})"
    if why is None:
        return d
    d = private_root(why, d) / name
    _mkdir_private(d)
    return d


# -- files ---------------------------------------------------------------------------------------
def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to a new file ``path`` (replacing a file of that name;
    never following a symbolic link), readable only by this user."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def file_problem(path: Path) -> str | None:
    """Why the file ``path`` (if it exists) must not be trusted: a symbolic
    link, not a regular file, not owned by this user or writable by group or
    others; else None."""
    return _node_problem(path, stat.S_ISREG, "a regular file")


def _node_problem(path: Path, is_kind, kind: str) -> str | None:
    """Why ``path`` (if it exists; not followed if a link) is not a private
    ``kind`` (``is_kind`` tests its mode): a symbolic link, another kind,
    foreign or writable by others; else None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"{path} cannot be examined ({e.strerror or e})"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if not is_kind(st.st_mode):
        return f"{path} is not {kind}"
    return _private_problem(st, str(path))


def _read_trusted(path: Path, limit: int | None = None) -> bytes:
    """The bytes of ``path``, read once through one descriptor that is
    checked to be a regular file private to this user (OSError/ValueError
    otherwise; a symbolic link fails to open)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file")
        why = _private_problem(st, str(path))
        if why:
            raise PermissionError(errno.EPERM, why)
        if limit is not None and st.st_size > limit:
            raise ValueError(f"{path} is {st.st_size} bytes, more than {limit}")
        return f.read()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- entries -------------------------------------------------------------------------------------
def entry_problem(d: Path, levels: int = 2) -> str | None:
    """Why the existing directory ``d`` (and, with ``levels=2``, its parent
    shard) is not private to this user, or None (None too if it does not
    exist)."""
    for p in [d.parent, d][2 - levels:]:
        why = _node_problem(p, stat.S_ISDIR, "a directory")
        if why:
            return why
    return None


def entry_dir(key: str) -> Path:
    """The directory of ``key``'s entry: in the cache root, or in the private
    temporary root (with a :class:`CacheWarning`) if the entry there is not
    to be trusted (see the module docstring)."""
    root = cache_dir()
    d = root / key[:2] / key
    why = entry_problem(d)
    return d if why is None else private_root(why, d) / key[:2] / key


def _as_dir(where) -> Path:
    return where if isinstance(where, Path) else entry_dir(where)


def _verified_bytes(d: Path) -> bytes | None:
    """The library of entry ``d`` if it matches its manifest, read once
    (so the bytes checked are the bytes used), else None (FileNotFoundError
    if there is no library)."""
    lib = d / "module.so"
    try:
        data = _read_trusted(lib)
    except FileNotFoundError:
        raise
    except (OSError, ValueError):
        return None
    try:
        meta = json.loads(_read_trusted(d / "manifest.json", _MAX_MANIFEST))
    except (OSError, ValueError):
        return None
    want = meta.get("sha256") if isinstance(meta, dict) else None
    return data if isinstance(want, str) and want == hashlib.sha256(data).hexdigest() else None


def lookup(where, count: bool = True) -> Path | None:
    """The cached library of an entry (a key, or the entry directory
    :func:`entry_dir` gave) if present and intact, else None (``count``:
    record a corrupt entry in STATS)."""
    d = _as_dir(where)
    try:
        ok = _verified_bytes(d) is not None
    except FileNotFoundError:
        return None
    if ok:
        return d / "module.so"
    if count:
        STATS["rebuilt_corrupt"] += 1
    return None


def _open_lock(d: Path) -> int:
    return os.open(d / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


@contextlib.contextmanager
def locked(where):
    """Hold the entry's build lock (exclusive; creates the entry 0700);
    yields the entry directory. Inside it, no other process builds or loads
    this entry."""
    d = _as_dir(where)
    _mkdir_private(d)
    why = entry_problem(d)
    if why:                                     # made meanwhile by someone else
        raise CompileError(f"cache entry {d} is not private to this user: {why}")
    fd = _open_lock(d)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield d
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


_LOAD = re.compile(r"\.load-(\d+)-\d+-[0-9a-f]{8}\.so")
#: a private copy is unlinked milliseconds after it is written; one older than
#: this whose process is gone was left by a process killed while loading
STALE_LOAD_SECONDS = 60


def _remove_stale_loads(d: Path) -> None:
    """Remove private copies (:func:`private_copy`) left in ``d`` by
    processes killed between copying and loading: the process is gone and
    the copy is older than :data:`STALE_LOAD_SECONDS`."""
    import time

    for name in os.listdir(d):
        m = _LOAD.fullmatch(name)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue                                    # alive (or not ours to signal): keep
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        with contextlib.suppress(OSError):
            if time.time() - os.lstat(d / name).st_mtime > STALE_LOAD_SECONDS:
                os.unlink(d / name)


def clean_entry(d: Path) -> list[str]:
    """Under the entry's lock: remove what a killed build left in ``d`` (its
    compiler output, a half-written manifest) and a ``module.so`` or
    ``manifest.json`` that is not a regular file, so the build can publish.
    Returns the names removed."""
    gone = []
    for name in sorted(os.listdir(d)):
        p = d / name
        st = os.lstat(p)
        if any(r.fullmatch(name) for r in _STALE) and not stat.S_ISDIR(st.st_mode):
            os.unlink(p)
        elif (name in ("module.so", "manifest.json", "module.c") or re.fullmatch(r"module_part\d+\.c", name)) \
                and not stat.S_ISREG(st.st_mode):
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(p)            # never follows symbolic links inside
            else:
                os.unlink(p)
        else:
            continue
        gone.append(name)
    _remove_stale_loads(d)
    return gone


def publish(where, built: Path, info: dict) -> Path:
    """Move a freshly built library into place atomically, manifest last."""
    d = _as_dir(where)
    lib = d / "module.so"
    os.chmod(built, 0o700)
    os.replace(built, lib)
    tmp = d / f"manifest.json.{os.getpid()}"
    write_private(tmp, json.dumps(dict(info, sha256=sha256_file(lib)), indent=1).encode())
    os.replace(tmp, d / "manifest.json")
    return lib


_loads = 0


def private_copy(lib: Path) -> Path:
    """A private copy of ``lib`` to dlopen (the caller unlinks it once loaded;
    the mapping stays valid). Two reasons: the dynamic loader hands back the
    handle it already has for a path it has seen, so a library rebuilt after
    corruption must be opened under a new name; and a mapping of the cache
    file itself would turn any later damage to that file into a SIGBUS.

    For a cache entry (a ``manifest.json`` beside ``lib``), the bytes copied
    are read once under the entry's lock and checked against the manifest;
    any other file (a probe) must be a regular file private to this user in
    a directory private to this user. Otherwise :class:`CompileError`, and
    nothing is loaded."""
    global _loads
    lib = Path(lib)
    d = lib.parent
    why = entry_problem(d, levels=1)
    data = None
    try:
        if why is None and os.path.lexists(d / "manifest.json"):
            fd = _open_lock(d)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)          # a build replaces library and manifest under LOCK_EX
                try:
                    data = _verified_bytes(d)
                except FileNotFoundError:
                    pass
            finally:
                os.close(fd)
            if data is None:
                why = f"{lib} does not match its manifest (changed after it was checked?)"
            _remove_stale_loads(d)
        elif why is None:
            try:
                data = _read_trusted(lib)
            except ValueError as e:
                why = str(e)
        if why:
            raise CompileError(f"refusing to load {lib}: {why}; compile again (the cache entry is rebuilt)")
        _loads += 1
        alias = d / f".load-{os.getpid()}-{_loads}-{os.urandom(4).hex()}.so"
        write_private(alias, data, 0o700)
    except OSError as e:
        raise CompileError(f"cannot load {lib} from the compile cache: {e}") from None
    return alias


# -- convc cache --clear -------------------------------------------------------------------------
def _own_entry(d: Path, shard: str) -> bool:
    """``d`` is an entry convc made: a real directory named by a sha256 key
    in the shard of its first two digits, owned by this user, holding only
    regular files."""
    if not (_KEY.fullmatch(d.name) and d.name[:2] == shard):
        return False
    try:
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            return False
        return all(stat.S_ISREG(os.lstat(d / n).st_mode) for n in os.listdir(d))
    except OSError:
        return False


def _remove_entry(d: Path) -> bool:
    """Delete entry ``d`` unless a build holds its lock or it cannot be
    deleted (then False)."""
    try:
        fd = _open_lock(d)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        shutil.rmtree(d)
        return True
    except OSError:                             # BlockingIOError: a build holds it
        return False
    finally:
        os.close(fd)


_OWN_FILES = {"probes": re.compile(r"threads-[0-9a-f]{16}(\.so|\.\d+\.(c|tmp))"),
              "bench-onnx": re.compile(r"[A-Za-z0-9._-]+\.onnx(\.\d+\.tmp)?"),
              "modules": re.compile(r"[0-9a-f]{64}\.(json|npz)(\.\d+\.tmp)?")}     # runtime/module_cache.py


def clear(root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """Delete convc's own compiled entries (and probe libraries and cached
    ONNX exports) under ``root`` (default: :func:`configured_dir`); leave
    everything else, the tuning database included. Symbolic links are never
    followed. Returns (removed, left): the paths deleted, and the paths
    under the root that stay (not convc's, or an entry a build is using)."""
    root = configured_dir() if root is None else Path(root)
    removed: list[Path] = []
    left: list[Path] = []
    for name in sorted(os.listdir(root)):
        p = root / name
        st = os.lstat(p)
        if name == MARKER or (name == "tuning" and stat.S_ISDIR(st.st_mode)):
            continue
        if not stat.S_ISDIR(st.st_mode):           # a file or a symbolic link: not ours
            left.append(p)
            continue
        own = re.fullmatch(r"[0-9a-f]{2}", name) or name in _OWN_FILES
        try:
            inside = sorted(p.iterdir()) if own else []
        except OSError:                              # not readable by us: not ours
            own = False
        if not own:
            left.append(p)
            continue
        if name not in _OWN_FILES:
            for e in inside:
                if _own_entry(e, name) and _remove_entry(e):
                    removed.append(e)
                else:
                    left.append(e)
        else:
            for f in inside:
                try:
                    if _OWN_FILES[name].fullmatch(f.name) and stat.S_ISREG(os.lstat(f).st_mode):
                        f.unlink()
                        removed.append(f)
                        continue
                except OSError:
                    pass
                left.append(f)
        with contextlib.suppress(OSError):
            p.rmdir()                                # only if now empty
    return removed, left

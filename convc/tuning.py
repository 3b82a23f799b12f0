"""Per-host choices: the tuning database and the defaults derived from a probe.

Two sources decide how a conv-like node is computed:

1. **The tuning database.** ``convc tune`` / :func:`convc.tune` measures
   candidate implementations of every distinct conv-like node on this machine
   (``convc/tuner.py``) and stores the winner per *op signature* (op,
   operand shapes and dtypes, attributes) in one JSON file per host under
   the compile cache, ``<cache>/tuning/<host key>.json``. The host key
   covers the CPU model, its ISA flags, the vector width and the C compiler's
   version (:class:`convc.host.Host`), so a tuning from another CPU or
   compiler is never used. The algorithm-choice passes ask :func:`choice`
   before applying their default rule, and each answer they use is written
   into the pass report (``PassReport.notes``).
2. **Defaults from the probe.** Without an entry, cache blocks of the GEMM
   come from the probed cache sizes and vector width
   (:func:`default_gemm_blocks`), not from constants measured on one CPU.

An entry is a dict ``{"algorithm": ..., "gemm": {"MR":, "MC":, "NC":, "KC":}
or "blocking": {"ur_w":, "oc_blocks":}, "seconds": ..., "candidates": {...}}``; a malformed file or entry is ignored
with a warning (and never breaks a compile). ``CONVC_TUNING=0`` turns the
database off; :func:`using` installs another database (or none) for a block
of code, which is how the tuner forces each candidate it measures.
"""
from __future__ import annotations

import contextlib
import contextvars
import fcntl
import json
import os
import warnings
from pathlib import Path

import numpy as np

from .host import Host, probe

SCHEMA = 1
ALGORITHMS = ("default", "direct", "gemm", "winograd", "winograd4", "blocked")
"""What an entry may choose for a conv-like node: the passes' own rules (the
tuner measured nothing faster), the direct loops, im2col (or col2im) + the
blocked GEMM, Winograd F(2×2,3×3) or F(4×4,3×3), the direct kernel over the
NCHWc layout."""

TUNED_OPS = ("conv", "conv_grad_kernel", "conv_grad_input", "conv_transpose")
"""The ops whose implementation the tuner chooses."""


GEMM_KNOBS = ("MR", "MC", "NC", "KC")
"""The GEMM's schedule: register-tile rows, then the cache blocks (rows,
columns, K slice)."""

MAX_TILE_ROWS = 16
"""``CONVC_MR_MAX`` of the templates: the most rows a register tile may have."""


class TuningWarning(UserWarning):
    """A tuning database (or one entry of it) could not be used."""


# -- signatures -----------------------------------------------------------------------------------
def signature_of(op: str, types, attrs: dict) -> str:
    """The key of a node in the database: op, operand types and the
    attributes that change the computation; not a fused epilogue (residual
    input, activation), which every algorithm applies alike, so a conv has
    one signature before and after ``fuse_epilogues``."""
    from .ops import epilogue

    own = epilogue.split(attrs, list(types))[0]
    mine = epilogue.split_attrs(attrs)[0]
    return " ".join([op, " ".join(str(t) for t in own)] + [f"{k}={mine[k]!r}" for k in sorted(mine)])


def signature(g, n: str) -> str:
    d = g.node(n)
    return signature_of(d["op"], [g.node(i)["type"] for i in g.inputs_of(n)], d["attrs"])


# -- the database ---------------------------------------------------------------------------------
def db_path(host: Host | None = None) -> Path:
    from .runtime.cache import subdir

    return subdir("tuning") / f"{(host or probe()).key}.json"     # private to the user (runtime/cache.py)


def _valid_entry(e) -> str | None:
    """Why ``e`` is not a usable entry, or None."""
    if not isinstance(e, dict):
        return "not an object"
    if e.get("algorithm") not in ALGORITHMS:
        return f"unknown algorithm {e.get('algorithm')!r}"
    blocks = e.get("gemm")
    if blocks is not None:
        if not isinstance(blocks, dict) or set(blocks) != set(GEMM_KNOBS) or \
                not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1 << 16 for v in blocks.values()) \
                or blocks["MR"] > MAX_TILE_ROWS:
            return f"bad GEMM tile and blocks {blocks!r}"
    tile = e.get("blocking")
    if tile is not None:
        if e["algorithm"] != "blocked" or not isinstance(tile, dict) or not tile or \
                not set(tile) <= {"ur_w", "oc_blocks"} or \
                not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 256 for v in tile.values()):
            return f"bad NCHWc register tile {tile!r}"
    return None


class Database:
    """The tuning entries of one host, by op signature."""

    def __init__(self, host: Host, path: Path | None = None, entries: dict | None = None):
        self.host = host
        self.path = path
        self.entries: dict[str, dict] = dict(entries or {})

    @classmethod
    def load(cls, host: Host | None = None, path: Path | None = None) -> "Database":
        """The database for ``host`` (default: this machine) from ``path``
        (default: :func:`db_path`); empty if absent. A file written on another
        host or compiler, or not readable as a database, is ignored with a
        :class:`TuningWarning`; so is each malformed entry."""
        from .runtime.cache import file_problem

        host = host or probe()
        path = Path(path) if path is not None else db_path(host)
        db = cls(host, path)
        why = file_problem(path)            # a file someone else could have written steers compile: not read
        if why:
            warnings.warn(f"tuning database {path} is ignored: {why}", TuningWarning)
            return db
        try:
            text = path.read_text()
        except FileNotFoundError:
            return db
        except OSError as e:
            warnings.warn(f"tuning database {path} cannot be read ({e}); untuned defaults are used", TuningWarning)
            return db
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("schema") != SCHEMA:
                raise ValueError(f"schema {data.get('schema') if isinstance(data, dict) else None!r}, "
                                 f"expected {SCHEMA}")
            stored = data.get("host", {})
            if stored.get("key") != host.key:
                why = "another CPU" if stored.get("cpu") != host.cpu else \
                      "another compiler" if stored.get("compiler") != host.compiler else "another host"
                warnings.warn(f"tuning database {path} was measured on {why} ({stored.get('cpu')!r}, "
                              f"{stored.get('compiler')!r}); it is ignored here", TuningWarning)
                return db
            entries = data.get("entries")
            if not isinstance(entries, dict):
                raise ValueError("no entries")
        except ValueError as e:
            warnings.warn(f"tuning database {path} is corrupt ({e}); it is ignored", TuningWarning)
            return db
        for sig, e in entries.items():
            why = _valid_entry(e)
            if why:
                warnings.warn(f"tuning database {path}: entry {sig!r} is ignored: {why}", TuningWarning)
            else:
                db.entries[sig] = e
        return db

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def lookup(self, sig: str, threads: int | None = None) -> dict | None:
        """The entry for op signature ``sig`` measured at ``threads``
        (default: the current thread count), else at the nearest count."""
        from .runtime.threads import get_num_threads

        threads = get_num_threads() if threads is None else threads
        hit = self.entries.get(entry_key(sig, threads))
        if hit is not None:
            return hit
        others = [(abs(e.get("threads", 0) - threads), k) for k, e in self.entries.items()
                  if k.rsplit(" @", 1)[0] == sig]
        return self.entries[min(others)[1]] if others else None

    def put(self, key: str, entry: dict) -> None:
        """Store ``entry`` under ``key`` (:func:`entry_key` of a signature
        and a thread count)."""
        why = _valid_entry(entry)
        if why:
            raise ValueError(f"tuning entry for {key!r}: {why}")
        self.entries[key] = entry

    def save(self) -> Path:
        """Write the database (merged with entries another process saved
        meanwhile; ours win), atomically, under a file lock."""
        if self.path is None:
            raise ValueError("this tuning database has no file")
        from .runtime.cache import write_private

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", TuningWarning)
                merged = {**Database.load(self.host, self.path).entries, **self.entries}
            data = dict(schema=SCHEMA, host=dict(key=self.host.key, cpu=self.host.cpu, isa=self.host.isa,
                                                 compiler=self.host.compiler, vector_bytes=self.host.vector_bytes),
                        entries=merged)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            write_private(tmp, json.dumps(data, indent=1, sort_keys=True).encode())     # 0600 whatever the umask
            os.replace(tmp, self.path)
        self.entries = merged
        _loaded.clear()
        return self.path


_loaded: dict[Path, tuple[float, Database]] = {}


def _host_database() -> Database | None:
    """This host's database, cached while its file is unchanged; None with
    ``CONVC_TUNING=0``."""
    if os.environ.get("CONVC_TUNING", "1").strip() in ("0", "off", "no", "false"):
        return None
    path = db_path()
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return None
    hit = _loaded.get(path)
    if hit and hit[0] == mtime:
        return hit[1]
    db = Database.load(path=path)
    _loaded[path] = (mtime, db)
    return db


_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("convc_tuning_active", default="host")
_NOTES: contextvars.ContextVar = contextvars.ContextVar("convc_tuning_notes", default=None)


def active() -> Database | None:
    """The database the passes consult now: this host's (default), or the
    one :func:`using` installed."""
    db = _ACTIVE.get()
    return _host_database() if db == "host" else db


@contextlib.contextmanager
def using(db: Database | None):
    """Consult ``db`` (None: no database, the untuned defaults) inside the block."""
    token = _ACTIVE.set(db)
    try:
        yield db
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def notes():
    """Collect the notes :func:`choice` writes while the block runs (the pass
    manager wraps each pass in this to fill ``PassReport.notes``)."""
    got: list[str] = []
    token = _NOTES.set(got)
    try:
        yield got
    finally:
        _NOTES.reset(token)


def note(text: str) -> None:
    """Add a line to the notes of the pass that is running (its
    ``PassReport.notes``: the tuning entries it used, a quantized layer's
    scales); nothing outside a pass run."""
    sink = _NOTES.get()
    if sink is not None:
        sink.append(text)


def noting() -> bool:
    """True while a pass runs under the pass manager, which keeps its notes
    (work that only feeds notes can be skipped otherwise)."""
    return _NOTES.get() is not None


def entry_key(sig: str, threads: int) -> str:
    """Entries are measured at a thread count: the key says which."""
    return f"{sig} @{threads} threads"


def choice(g, n: str, mine=ALGORITHMS) -> dict | None:
    """The tuned entry for node ``n`` of ``g`` if the active database has one,
    else None: the pass applies its default rule. An entry measured at the
    current thread count (``cc.set_num_threads``) is preferred; else one
    measured at another count is used. The entry is noted for the pass
    report when its algorithm is one of ``mine`` (the ones the asking pass
    carries out), so each choice is reported once, by the pass that made it."""
    db = active()
    if db is None:
        return None
    e = db.lookup(signature(g, n))
    if e is not None and e["algorithm"] == "default":
        return None                                 # measured: the rules' own choice is the fastest
    if e is not None and e["algorithm"] in mine:
        if noting():
            how = e["algorithm"] + (" with GEMM tile rows {MR}, blocks {MC}x{NC}x{KC}".format(**e["gemm"])
                                    if e.get("gemm") else "") + \
                (" with register tile " + ", ".join(f"{k}={v}" for k, v in e["blocking"].items())
                 if e.get("blocking") else "")
            note(f"'{n}' ({g.node(n)['op']}): tuned -> {how}{_measured(e)}")
    return e


def _measured(e: dict) -> str:
    return f", {e['seconds'] * 1e3:.3g} ms measured" if isinstance(e.get("seconds"), (int, float)) else ""


def chose_other(e: dict) -> str:
    """The decline reason of a pass whose algorithm tuning entry ``e`` (from
    :func:`choice`) did not choose."""
    return f"the tuning database chose {e['algorithm']!r} for it{_measured(e)}"


def algorithm(g, n: str, mine=ALGORITHMS) -> str | None:
    """The tuned algorithm of node ``n`` (see :data:`ALGORITHMS`), or None."""
    e = choice(g, n, mine)
    return e["algorithm"] if e else None


# -- defaults from the probe ----------------------------------------------------------------------
GEMM_NV = 2
"""Vectors per row of the GEMM's register tile (``CONVC_NV`` in the
templates): NR = GEMM_NV × lanes columns."""

WORK_ITEMS_PER_CORE = 4
"""Blocks per core a GEMM is split into at least (when it is big enough): a
few per core even out blocks that finish at different times."""


def default_tile_rows(host: Host | None = None) -> int:
    """Rows MR of the GEMM register tile: the most (even, up to
    ``MAX_TILE_ROWS``) whose MR × NV accumulators, NV loaded vectors of b and
    one broadcast of a fit the vector registers (32 with AVX-512 or NEON: 14;
    16 with AVX2: 6)."""
    host = host or probe()
    mr = (host.vector_registers - GEMM_NV - 1) // GEMM_NV
    return max(2, min(MAX_TILE_ROWS, mr - mr % 2))


def _round_down(v: int, m: int) -> int:
    return max(m, v // m * m)


def default_gemm_blocks(m: int, k: int, n: int, dtype: str = "float32", batch: int = 1,
                        host: Host | None = None) -> dict:
    """Register tile and cache blocks of the GEMM template for an M×K by K×N
    product, from the probed vector unit and caches. The template walks a
    block of MC rows × NC columns in K slices of KC, tile by tile (MR × NR
    accumulators in registers): each A micro-panel (MR × KC) is reused across
    the block's columns and each B micro-panel (KC × NR) is streamed once per
    tile, so both fit half the L1 together; the B block (KC × NC) is reused
    by every row tile, and the Y block (MC × NC) is re-read once per K slice,
    so they share half the L2. Then blocks are halved (the one longer in
    register tiles first) until the ``batch`` products give every core
    ``WORK_ITEMS_PER_CORE`` blocks to balance, as far as the tile allows."""
    host = host or probe()
    e = np.dtype(dtype).itemsize
    mr = default_tile_rows(host)
    nr = GEMM_NV * host.lanes(dtype)
    kc = _round_down(host.l1d // 2 // ((nr + mr) * e), 8)
    nc = min(_round_down(host.l2 // 4 // (kc * e), nr), n)
    mc = min(_round_down(host.l2 // 4 // (nc * e), mr), m)

    def items():
        return batch * -(-m // mc) * -(-n // nc)
    while items() < WORK_ITEMS_PER_CORE * host.cores and (nc > nr or mc > mr):
        if nc > nr and (nc / nr >= mc / mr or mc <= mr):
            nc = _round_down(nc // 2, nr)
        else:
            mc = _round_down(mc // 2, mr)
    return dict(MR=mr, MC=mc, NC=nc, KC=min(kc, k))


def gemm_blocks(m: int, k: int, n: int, dtype: str, attrs: dict, batch: int = 1) -> dict:
    """The tile and blocks a matmul node uses: its own ``blocks`` attribute
    (MR, MC, NC, KC; set from a tuning entry by the pass that made it) or
    the probe's defaults; blocks clipped to the product."""
    b = attrs.get("blocks")
    if b:
        mr, mc, nc, kc = b
        return dict(MR=mr, MC=min(mc, m), NC=min(nc, n), KC=min(kc, k))
    return default_gemm_blocks(m, k, n, dtype, batch)

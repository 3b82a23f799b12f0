"""The pre-pass module cache: ``cc.compile`` of a graph it has compiled
before skips the passes and code generation.

Key (:func:`key`) = sha256 of the graph *before* the passes -- its printed
structure (ops, attributes, types incl. every param's dtype and shape,
wiring, outputs) and which params are constants, but not param values --, the
pipeline (and which function each pass is), the target and compile options,
convc's own code (every ``.py`` and template file: a changed pass misses),
the host and compiler, the ``CONVC_*`` environment (but the cache directory
and the progress line), this host's tuning database entries and the thread
count (what the passes consult).

An entry, ``<cache root>/modules/<key>.json`` and ``<key>.npz``, holds what
the passes and the code generator produced: the post-pass graph structure,
the memory plan, the entry point's signature and the build key of the
library (in the compile cache, ``runtime/build.py``). Param values are *not*
stored where they come from the graph given: a post-pass param that is a
source param (the same array, shared by the passes) takes the given graph's
value, and a constant ``fold_params`` computed (``passes.cleanup.Folded``) is
recomputed from its recipe -- the ops and params it came from, stored as a
small graph -- on the given values. So a graph with other weights gets its own
outputs. Values a pass computed otherwise (batch norm folded into a conv's
weights, a factored kernel) are stored in the ``.npz``; the source params no
post-pass param reads as they are (their values went into such a computed
value, or were dropped) are *value-keyed*: the entry records their sha256 and
is used only when the given values hash the same. This relies on the contract
``Module.set_params`` already relies on: a param that stays in the compiled
graph may take any value without recompiling.

Security: the same rules as the compile cache (``runtime/cache.py``): the
directory and files are private to the user and never symbolic links, each
file is read once through a checked descriptor, the ``.json`` names the
sha256 of the ``.npz`` it goes with, and nothing is unpickled (JSON, and npz
with ``allow_pickle=False``). A damaged or foreign entry is a miss.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from ..ir import Graph, TensorType

FORMAT = 1
STATS = {"hits": 0, "misses": 0, "stored": 0}
_MAX_JSON = 1 << 28


class _NotCacheable(Exception):
    """The post-pass graph holds something the entry format cannot store."""


# -- the key -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def code_digest() -> str:
    """sha256 of convc's own code (its ``.py`` files and templates): an
    entry made by other code is not used."""
    from ..codegen.env import template_dirs

    h = hashlib.sha256()
    for root in (Path(__file__).resolve().parent.parent, *template_dirs()):
        for p in sorted(root.rglob("*")):
            if p.suffix in (".py", ".j2") and p.is_file() and "__pycache__" not in p.parts:
                h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def key(graph: Graph, target: str, pipeline: list[str], options: dict) -> str:
    """The entry key of compiling ``graph`` (before the passes) with the
    resolved ``pipeline`` for ``target`` with ``options`` (see the module
    docstring for what it covers)."""
    from .. import __version__, tuning
    from ..host import probe
    from .build import compiler, compiler_version, flags, native_target
    from .threads import get_num_threads

    cc = compiler()
    db = tuning.active()
    consts = [n for n in graph.param_names if graph.node(n).get("const")]
    parts = [f"convc module cache {FORMAT}", __version__, code_digest(), str(graph), repr(consts), target,
             repr(pipeline), json.dumps(options, sort_keys=True, default=repr), probe().key, compiler_version(cc),
             " ".join(flags(options.get("native", True))),
             native_target(cc) if options.get("native", True) else "",
             json.dumps(db.entries if db is not None else None, sort_keys=True, default=repr),
             str(get_num_threads()), repr(_passes_code(pipeline)),
             repr(sorted((k, v) for k, v in os.environ.items()      # CONVC_CC, CONVC_CFLAGS, CONVC_VNNI, ...
                         if k.startswith("CONVC_") and k not in ("CONVC_CACHE_DIR", "CONVC_PROGRESS")))]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _passes_code(pipeline: list[str]) -> list[str]:
    """Which function each pass of ``pipeline`` is now (a pass replaced at
    run time, as tests do, is another key)."""
    from ..passes import PASSES
    return [f"{getattr(PASSES.get(p), '__module__', '?')}.{getattr(PASSES.get(p), '__qualname__', '?')}"
            for p in pipeline]


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8).reshape(-1)).hexdigest()


# -- values inside JSON (attributes, node data) --------------------------------------------------
def _enc(v):
    """``v`` as JSON that :func:`_dec` turns back into an equal value of the
    same type (tuples stay tuples, numpy scalars keep their dtype)."""
    if isinstance(v, np.generic):           # first: np.float64 is also a float
        return {"np": v.dtype.str, "v": _enc(v.item())}
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if np.isfinite(v) else {"float": repr(v)}
    if isinstance(v, np.ndarray):
        return {"arr": v.dtype.str, "shape": list(v.shape), "v": [_enc(x) for x in v.reshape(-1).tolist()]}
    if isinstance(v, tuple):
        return {"t": [_enc(x) for x in v]}
    if isinstance(v, list):
        return [_enc(x) for x in v]
    if isinstance(v, dict):
        return {"d": [[_enc(k), _enc(x)] for k, x in v.items()]}
    if isinstance(v, TensorType):
        return {"tt": [list(v.shape), v.dtype]}
    raise _NotCacheable(f"a {type(v).__name__} value")


def _dec(v):
    if isinstance(v, list):
        return [_dec(x) for x in v]
    if not isinstance(v, dict):
        return v
    if "float" in v:
        return float(v["float"])
    if "np" in v:
        return np.dtype(v["np"]).type(_dec(v["v"]))
    if "arr" in v:
        return np.array([_dec(x) for x in v["v"]], dtype=np.dtype(v["arr"])).reshape(v["shape"])
    if "t" in v:
        return tuple(_dec(x) for x in v["t"])
    if "d" in v:
        return {_dec(k): _dec(x) for k, x in v["d"]}
    if "tt" in v:
        return TensorType(tuple(v["tt"][0]), v["tt"][1])
    raise ValueError(f"unknown tagged value {sorted(v)}")


# -- graphs --------------------------------------------------------------------------------------
class _Writer:
    """Encodes graphs for one entry: a param value that is a param of the
    source graph (the very array) is written as that name, a folded constant
    by its recipe, any other value into the ``.npz``."""

    def __init__(self, source: Graph):
        self.by_id = {id(source.node(n)["value"]): n for n in source.param_names}
        self.used: set[str] = set()             # source params read as they are
        self.arrays: dict[str, np.ndarray] = {}
        self.recipes: list[dict] = []

    def value(self, name: str, d: dict) -> dict:
        src = self.by_id.get(id(d["value"]))
        if src is not None:
            self.used.add(src)
            return {"source": src}
        k = f"v{len(self.arrays)}"
        self.arrays[k] = d["value"]
        return {"npz": k}

    def graph(self, g: Graph) -> dict:
        nodes = []
        for n, d in g.nx.nodes(data=True):
            rec = {"name": n, "op": d["op"], "attrs": _enc(d["attrs"]), "type": _enc(d["type"]),
                   "inputs": g.inputs_of(n)}
            for k, v in d.items():
                if k in ("op", "attrs", "type"):
                    continue
                if k == "value":
                    rec["value"] = None if "folded" in d else self.value(n, d)
                elif k == "folded":
                    rec["folded"] = len(self.recipes)
                    self.recipes.append(None)           # (reserved: a recipe may hold recipes of its own)
                    self.recipes[rec["folded"]] = {"graph": self.graph(v.graph), "node": v.node,
                                                   "roots": list(v.roots)}
                else:
                    rec.setdefault("data", {})[k] = _enc(v)
            nodes.append(rec)
        return {"name": g.name, "nodes": nodes, "outputs": g.outputs, "assigns": g.assigns,
                "counter": g._counter}


class _Reader:
    def __init__(self, source: Graph, arrays, recipes: list[dict]):
        self.source, self.arrays, self.recipes = source, arrays, recipes

    def graph(self, rec: dict, fold: bool = True) -> Graph:
        from ..passes.cleanup import Folded

        g = Graph(rec["name"])
        for r in rec["nodes"]:
            d = dict(op=r["op"], attrs=_dec(r["attrs"]), type=_dec(r["type"]))
            d.update({k: _dec(v) for k, v in r.get("data", {}).items()})
            g.nx.add_node(r["name"], **d)
            for slot, src in enumerate(r["inputs"]):
                g.nx.add_edge(src, r["name"], key=slot, slot=slot)
        g.outputs, g.assigns, g._counter = dict(rec["outputs"]), dict(rec["assigns"]), dict(rec["counter"])
        folds = []
        for r in rec["nodes"]:
            if "folded" in r:
                recipe = self.recipes[r["folded"]]
                f = Folded(self.graph(recipe["graph"]), recipe["node"], tuple(recipe["roots"]))
                g.nx.nodes[r["name"]]["folded"] = f
                folds.append((g.nx.nodes[r["name"]], f))
            elif "value" in r:
                v = r["value"]
                g.nx.nodes[r["name"]]["value"] = (self.source.node(v["source"])["value"] if "source" in v
                                                  else _frozen(self.arrays[v["npz"]]))

        def refold(job):
            d, f = job
            value = f.recompute({n: f.graph.node(n)["value"] for n in f.roots})
            d["value"] = _frozen(np.asarray(value, dtype=d["type"].dtype))
        for job in folds:
            refold(job)
        return g


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


# -- storing and loading -------------------------------------------------------------------------
def _paths(k: str) -> tuple[Path, Path]:
    from .cache import subdir
    d = subdir("modules")
    return d / f"{k}.json", d / f"{k}.npz"


def store(k: str, source: Graph, graph: Graph, csrc, library: Path) -> bool:
    """Write the entry ``k`` for a C module compiled from ``source`` (the
    graph before the passes): ``graph`` after them, ``csrc`` its generated
    source (``codegen.c.CSource``), ``library`` the built library in the
    compile cache. False (nothing written) if the graph holds a value the
    format cannot store or the cache cannot be written."""
    from .cache import write_private

    w = _Writer(source)
    try:
        post = w.graph(graph)
    except _NotCacheable:
        return False
    keyed = {n: _digest(source.node(n)["value"]) for n in source.param_names if n not in w.used}
    buf = io.BytesIO()
    np.savez(buf, **{k2: np.ascontiguousarray(a) for k2, a in w.arrays.items()})
    npz = buf.getvalue()
    plan = dataclasses.asdict(csrc.plan)
    entry = {"format": FORMAT, "graph": post, "recipes": w.recipes, "value_keyed": keyed,
             "npz_sha256": hashlib.sha256(npz).hexdigest(), "library": library.parent.name,
             "plan": _enc(plan), "entry": csrc.entry, "signature": csrc.signature,
             "inputs": [[n, _enc(t)] for n, t in csrc.inputs], "outputs": [[n, _enc(t)] for n, t in csrc.outputs],
             "profile_signature": csrc.profile_signature, "units": list(csrc.units)}
    try:
        text = json.dumps(entry).encode()
    except (TypeError, ValueError):
        return False
    jpath, npath = _paths(k)
    try:
        for path, data in ((npath, npz), (jpath, text)):        # the .json last: it names the .npz's hash
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            write_private(tmp, data)
            os.replace(tmp, path)
    except OSError:
        return False
    STATS["stored"] += 1
    return True


def load(k: str, source: Graph):
    """The C module of entry ``k`` for ``source`` (the graph before the
    passes, with the values to use), or None on a miss: no entry, a damaged
    or foreign one, a value-keyed param whose value differs, or a library no
    longer in the compile cache."""
    from ..codegen.c import CSource
    from ..schedule import Buffer, Plan
    from . import cache
    from .module import CModule

    jpath, npath = _paths(k)
    try:
        entry = json.loads(cache._read_trusted(jpath, _MAX_JSON))
        if entry.get("format") != FORMAT:
            return _miss()
        for n, h in entry["value_keyed"].items():
            if n not in source.nx or _digest(source.node(n)["value"]) != h:
                return _miss()
        npz = cache._read_trusted(npath)
        if hashlib.sha256(npz).hexdigest() != entry["npz_sha256"]:
            return _miss()
        arrays = dict(np.load(io.BytesIO(npz), allow_pickle=False))
        lib_dir = cache.entry_dir(entry["library"])
        lib = cache.lookup(lib_dir)
        if lib is None:
            return _miss()
        cache.STATS["hits"] += 1                # the library came from the compile cache
        graph = _Reader(source, arrays, entry["recipes"]).graph(entry["graph"])
        p = _dec(entry["plan"])
        p["buffers"] = [Buffer(**b) for b in p["buffers"]]
        plan = Plan(**p)
        units = {u: cache._read_trusted(lib_dir / u).decode() for u in entry["units"]}
    except FileNotFoundError:
        return _miss()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return _miss()
    text = next(iter(units.values())) if len(units) == 1 else \
        "\n".join(f"/* ===== {fname} ===== */\n{t}" for fname, t in units.items())
    csrc = CSource(text, entry["entry"], entry["signature"], [(n, _dec(t)) for n, t in entry["inputs"]],
                   [(n, _dec(t)) for n, t in entry["outputs"]], plan, entry["profile_signature"],
                   units if len(units) > 1 else None)
    STATS["hits"] += 1
    return CModule(graph, csrc, lib)


def _miss():
    STATS["misses"] += 1
    return None

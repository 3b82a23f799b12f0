"""``convc.tune``: measure, on this machine, how to compute each conv-like node.

For every distinct op signature among a graph's conv-like nodes (forward
conv, its gradients ``g`` and ``h``, transposed conv; see
``tuning.TUNED_OPS``), the tuner

1. lists the legal candidates: the direct loops, im2col/col2im + GEMM,
   Winograd F(2×2,3×3) and F(4×4,3×3) where the conv is a 3×3 unit-stride
   one, the NCHWc direct kernel where the blocked layout takes the conv;
2. builds a one-node graph with the node's operand types (weights as params,
   so weight transforms are folded as in the real compile), compiles it with
   the same pipeline once per candidate, forcing the candidate through a
   one-entry :class:`tuning.Database`;
3. checks every candidate's output against the numpy reference before it
   may win (one that disagrees is reported and dropped);
4. times the candidates interleaved, round after round, and keeps the median;
5. for the GEMM, refines the cache blocks (MC, NC, KC) around the probe's
   defaults by halving and doubling one at a time, while the budget lasts.

Winners are saved to this host's tuning database, which ``cc.compile``
consults from then on. Signatures are tuned biggest first (by MACs), so a
short budget is spent where it matters; what the budget did not reach keeps
the untuned defaults, and the report says so.
"""
from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass, field

import numpy as np

from . import tuning
from .errors import ConvcError
from .host import Host, fma_peak, probe
from .ir import Graph
from .timing import median_times_in_turn
from .passes.blocked import blocked_eligible

CHOICE_PASSES = ("conv_to_winograd", "conv_to_gemm", "transposed_to_matmul", "to_blocked_layout",
                 "choose_blocked_layout")
"""The passes that choose algorithms: the tuner looks at the graph as it is
just before the first of them."""

CLEAR_WIN = 0.97
"""A candidate replaces the one it is timed against only when it takes less
than this fraction of its time: in the schedule refinements, and at the end,
where the winner must beat what the untuned defaults compile to or the entry
says ``default`` (the passes' own rules stay, so timing noise never makes a
tuned build slower than an untuned one)."""

RTOL = {"float32": 2e-3, "float64": 1e-9}
"""Max |candidate − reference| / max |reference| a candidate may show
(float32 Winograd F(4×4,3×3) on unit-scale data stays near 1e-4)."""


@dataclass
class Candidate:
    algorithm: str
    gemm: dict | None = None            # the GEMM's MR, MC, NC, KC
    blocking: dict | None = None        # the NCHWc kernel's register tile

    @property
    def label(self) -> str:
        return self.algorithm + (" {MR}r {MC}x{NC}x{KC}".format(**self.gemm) if self.gemm else "") + \
            ("".join(f" {k}={v}" for k, v in self.blocking.items()) if self.blocking else "")

    def entry(self) -> dict:
        return {"algorithm": self.algorithm, **({"gemm": dict(self.gemm)} if self.gemm else {}),
                **({"blocking": dict(self.blocking)} if self.blocking else {})}


@dataclass
class Measured:
    candidate: Candidate
    seconds: float | None = None
    error: float | None = None
    failure: str | None = None


@dataclass
class OpTuning:
    """What the tuner found for one op signature."""
    signature: str
    op: str
    example: str                 # one node with this signature
    count: int                   # nodes with this signature
    macs: int
    measured: list[Measured] = field(default_factory=list)
    default: Measured | None = None         # what the untuned defaults compile to
    best: Measured | None = None
    peak_gflops: float | None = None
    skipped: str | None = None

    @property
    def pct_peak(self) -> float | None:
        if self.best is None or not self.best.seconds or not self.peak_gflops:
            return None
        return 100 * 2 * self.macs / self.best.seconds / 1e9 / self.peak_gflops


@dataclass
class TuneReport:
    """The result of :func:`tune`: one :class:`OpTuning` per signature."""
    host: Host
    threads: int
    ops: list[OpTuning]
    seconds: float
    budget: float
    path: str | None

    def table(self) -> str:
        rows = [f"tuned on {self.host.describe()}; {self.threads} thread(s); "
                f"{self.seconds:.1f} s of a {self.budget:.0f} s budget"]
        head = f"{'node':24} {'op':17} {'best':26} {'ms':>8} {'default ms':>10} {'% peak':>7}"
        rows += [head, "-" * len(head)]
        for t in self.ops:
            if t.best is None:
                rows.append(f"{t.example[:24]:24} {t.op:17} {'(' + (t.skipped or 'no candidate passed') + ')'}")
                continue
            d = f"{t.default.seconds * 1e3:10.3f}" if t.default and t.default.seconds else f"{'-':>10}"
            pct = f"{t.pct_peak:6.0f}%" if t.pct_peak is not None else f"{'-':>7}"
            rows.append(f"{t.example[:24]:24} {t.op:17} {t.best.candidate.label[:26]:26} "
                        f"{t.best.seconds * 1e3:8.3f} {d} {pct}")
        if self.path:
            rows.append(f"saved to {self.path}")
        return "\n".join(rows)

    __str__ = table


# -- candidates -----------------------------------------------------------------------------------
def _winograd_tiles(x, w, attrs) -> list[int]:
    from .ops import winograd

    return [] if winograd.winograd_rule(x, w, attrs) else list(winograd.TILES)


NEEDS_PASS = {"gemm": ("conv_to_gemm", "transposed_to_matmul"), "winograd": ("conv_to_winograd",),
              "winograd4": ("conv_to_winograd",), "blocked": ("to_blocked_layout", "choose_blocked_layout")}
"""The passes that carry out each algorithm: a pipeline without them cannot."""


def candidates(g: Graph, n: str, passes=None) -> list[Candidate]:
    """The legal implementations of node ``n`` (GEMM with default blocks)
    that the pipeline ``passes`` (names; default: every pass) can carry out."""
    d = g.node(n)
    op, a = d["op"], d["attrs"]
    types = [g.node(i)["type"] for i in g.inputs_of(n)]
    out = [Candidate("direct")]
    if op == "conv":
        x, w = types[:2]
        depthwise = a["groups"] > 1 and w.shape[1] == 1
        if not depthwise:
            out.append(Candidate("gemm"))
        out += [Candidate("winograd" if t == 2 else f"winograd{t}") for t in _winograd_tiles(x, w, a)]
        if blocked_eligible(g, n):
            out.append(Candidate("blocked"))
    elif op == "conv_grad_kernel":
        out.append(Candidate("gemm"))
    elif op == "conv_grad_input":
        if not a["flip"]:
            out.append(Candidate("gemm"))
    elif op == "conv_transpose":
        if all(p < s for p, s in zip(a["output_padding"], a["stride"])):
            out.append(Candidate("gemm"))
    able = (lambda c: True) if passes is None else \
        (lambda c: c.algorithm == "direct" or any(p in passes for p in NEEDS_PASS[c.algorithm]))
    return [c for c in out if c.algorithm in tuning.ALGORITHMS and able(c)]


# -- one-node graphs ------------------------------------------------------------------------------
def micro_graph(g: Graph, n: str, seed: int = 0) -> Graph:
    """A graph computing node ``n`` of ``g`` alone: an operand that is a
    param in ``g`` is a param here (random values of a He-initialised
    scale), any other operand a graph input; attributes as in ``g``."""
    rng = np.random.default_rng(seed)
    d = g.node(n)
    m = Graph(f"tune_{d['op']}")
    ins = []
    for k, i in enumerate(g.inputs_of(n)):
        t = g.node(i)["type"]
        if g.node(i)["op"] == "param":
            fan_in = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
            v = rng.standard_normal(t.shape) * np.sqrt(2.0 / max(fan_in, 1))
            ins.append(m.param(f"p{k}", v.astype(t.dtype)))
        else:
            ins.append(m.input(f"x{k}", t.shape, t.dtype))
    m.output(m.add(d["op"], ins, dict(d["attrs"]), "node"), "y")
    return m


def _feeds(m: Graph, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return {i: rng.standard_normal(m.node(i)["type"].shape).astype(m.node(i)["type"].dtype) for i in m.input_names}


def _forcing(host: Host, sig: str, c: Candidate) -> tuning.Database:
    """A one-entry database that makes the passes pick ``c`` for ``sig``."""
    from .runtime.threads import get_num_threads

    return tuning.Database(host, None, {tuning.entry_key(sig, get_num_threads()): c.entry()})


def _compile(m: Graph, pipeline, db: tuning.Database | None):
    from .api import compile as cc_compile

    with tuning.using(db):
        return cc_compile(m, passes=pipeline)


def _used_blocks(mod) -> dict | None:
    """The cache blocks of the (first) GEMM in a compiled module."""
    from .ops import get_op

    g = mod.graph
    for n in g.topological_order():
        d = g.node(n)
        if d["op"] == "matmul":
            types = [g.node(i)["type"] for i in g.inputs_of(n)]
            ctx = get_op("matmul").context(d["attrs"], types, d["type"])
            return {k: ctx[k] for k in tuning.GEMM_KNOBS}
    return None


# -- the search -----------------------------------------------------------------------------------
class _Clock:
    def __init__(self, budget: float):
        self.start, self.budget = time.perf_counter(), budget

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def left(self) -> float:
        return self.budget - self.elapsed


def _time_modules(mods: list, feeds: dict, seconds: float) -> list[float]:
    """Median seconds of each module's run on ``feeds``, in turn
    (:func:`convc.timing.median_times_in_turn`)."""
    return median_times_in_turn([lambda mod=mod: mod.run(feeds) for mod in mods], 5, seconds)


def _measure(m: Graph, sig: str, cands: list[Candidate], pipeline, host: Host, want: np.ndarray,
             feeds: dict, seconds: float) -> list[tuple[Measured, object]]:
    """Compile every candidate (in parallel: one compiler process per core),
    check each against ``want``, then time the good ones interleaved."""
    def build(c):
        return _compile(m, pipeline, _forcing(host, sig, c))

    results: list[tuple[Measured, object]] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, host.cores)) as pool:
        futures = [(c, pool.submit(build, c)) for c in cands]
        for c, f in futures:
            r = Measured(c)
            try:
                mod = f.result()
            except ConvcError as e:
                r.failure = f"does not compile: {str(e).splitlines()[0]}"
                results.append((r, None))
                continue
            got = mod.run(feeds)["y"]
            scale = float(np.max(np.abs(want))) or 1.0
            r.error = float(np.max(np.abs(got.astype(np.float64) - want))) / scale
            if not np.isfinite(r.error) or r.error > RTOL[got.dtype.name]:
                r.failure = f"wrong result: max error {r.error:.3g} of the output's scale"
                mod = None
            results.append((r, mod))
    good = [(r, mod) for r, mod in results if mod is not None]
    if good:
        for (r, _), s in zip(good, _time_modules([mod for _, mod in good], feeds, seconds)):
            r.seconds = s
    return results


def _refine_blocks(m: Graph, sig: str, best: Measured, mod, pipeline, host, want, feeds, seconds,
                   clock: _Clock, rounds: int = 2) -> list[Measured]:
    """Try a few register-tile heights MR, then halve and double the GEMM's
    KC, NC and MC around ``best``, one at a time, keeping each step that is
    faster."""
    start = best.candidate.gemm or _used_blocks(mod)
    if not start:
        return []
    tried: list[Measured] = []
    cur, cur_s = dict(start), best.seconds
    seen = {tuple(sorted(cur.items()))}
    for _ in range(rounds):
        improved = False
        for key in ("MR", "KC", "NC", "MC"):
            if clock.left < 3 * seconds + 2:
                return tried
            cands = []
            steps = [cur["MR"] - 4, cur["MR"] - 2, cur["MR"] + 2] if key == "MR" else \
                [int(cur[key] * f) for f in (0.5, 2.0)]
            for v in steps:
                if not 2 <= v <= (tuning.MAX_TILE_ROWS if key == "MR" else 1 << 16):
                    continue
                b = dict(cur, **{key: v})
                if tuple(sorted(b.items())) not in seen:
                    seen.add(tuple(sorted(b.items())))
                    cands.append(Candidate("gemm", b))
            if not cands:
                continue
            got = _measure(m, sig, [Candidate("gemm", dict(cur))] + cands, pipeline, host, want, feeds, seconds)
            ref = got[0][0].seconds or cur_s
            for r, _ in got[1:]:
                tried.append(r)
                if r.seconds is not None and r.seconds < CLEAR_WIN * ref:
                    cur, ref, improved = dict(r.candidate.gemm), r.seconds, True
            cur_s = min(cur_s, ref)
        if not improved:
            break
    if cur != start:
        tried.append(Measured(Candidate("gemm", cur), cur_s))
    return tried


def _blocked_tiles(g: Graph, n: str, host: Host) -> list[dict]:
    """Register tiles of ``conv_nchwc`` worth measuring for node ``n``: for
    each number of output-channel blocks the widest row of columns that fits
    the vector registers, and half of it (depthwise: columns only)."""
    from .ops.blocked import MAX_OC_BLOCKS, block_size, depthwise_ur, widest_tile

    d = g.node(n)
    x, w = [g.node(i)["type"] for i in g.inputs_of(n)][:2]
    out_x = d["type"].shape[-1]
    regs = host.vector_registers
    if d["attrs"]["groups"] > 1:
        widest = depthwise_ur(out_x, regs)
        return [{"ur_w": u} for u in sorted({widest, max(1, widest // 2), min(out_x, 8)})]
    blocks = -(-w.shape[0] // block_size(x.dtype))
    tiles = []
    for nb in range(1, min(MAX_OC_BLOCKS, blocks) + 1):
        widest = widest_tile(out_x, nb, regs)
        tiles += [{"ur_w": ur, "oc_blocks": nb} for ur in sorted({widest, max(1, widest // 2)}) if ur >= 1]
    return tiles


def _refine_blocked(m: Graph, sig: str, lowered: Graph, n: str, best: Measured, pipeline, host, want, feeds,
                    seconds, clock: _Clock) -> list[Measured]:
    """Measure the NCHWc kernel's register tiles (:func:`_blocked_tiles`)
    beside the default one, as far as the clock allows."""
    cands = [Candidate("blocked", blocking=t) for t in _blocked_tiles(lowered, n, host)]
    tried: list[Measured] = []
    while cands and clock.left > 3 * seconds + 2:
        batch, cands = cands[:max(1, host.cores)], cands[max(1, host.cores):]
        got = _measure(m, sig, [best.candidate] + batch, pipeline, host, want, feeds, seconds)
        ref = got[0][0].seconds
        for r, _ in got[1:]:
            tried.append(r)
            if r.seconds is not None and ref is not None:
                r.seconds *= best.seconds / ref         # on the scale of the first measurement
    return tried


def _pipeline_prefix(names: list[str]) -> list[str]:
    out = []
    for p in names:
        if p in CHOICE_PASSES:
            break
        out.append(p)
    return out


def tune(graph: Graph, budget: float = 120.0, passes=None, progress: bool = True, save: bool = True,
         database: tuning.Database | None = None, seed: int = 0, quiet: bool = False) -> TuneReport:
    """Measure the candidate implementations of every distinct conv-like
    node of ``graph`` on this machine, at the current thread count
    (``cc.set_num_threads``), and save the fastest correct one per op
    signature to the host's tuning database (``save``; or into
    ``database``). ``budget``: seconds for the whole search (compiles
    included); ``passes``: the pipeline the graph will be compiled with
    (default: "train" for a graph that updates params, else "default");
    ``progress``: one line per signature on stderr. ``quiet``: neither
    those lines nor the progress line (``convc.progress``: the signature
    being measured, rewritten in place, when stderr is a terminal). Returns
    a :class:`TuneReport` (print it for the table)."""
    from .progress import Progress

    with Progress(f"tune '{getattr(graph, 'name', '?')}'", quiet=quiet) as bar:
        return _tune(graph, budget, passes, progress and not quiet, save, database, seed, bar)


def _tune(graph, budget, passes, progress, save, database, seed, bar) -> TuneReport:
    """:func:`tune`, reporting each op signature it measures to ``bar``
    (a ``convc.progress.Progress``)."""
    from .passes import manager
    from .reference import evaluate
    from .runtime.threads import get_num_threads

    if not isinstance(graph, Graph):
        raise ConvcError(f"tune() takes a convc.Graph, got {type(graph).__name__}")
    if not (isinstance(budget, (int, float)) and budget > 0):
        raise ConvcError(f"tune(): budget must be a positive number of seconds, got {budget!r}")
    clock = _Clock(float(budget))
    pipeline = passes if passes is not None else ("train" if graph.assigns else "default")
    names = manager.resolve(pipeline)
    host, threads = probe(), get_num_threads()
    db = database if database is not None else tuning.Database.load(host)
    say = bar.say if progress else (lambda s: None)
    with tuning.using(None):
        lowered = manager.run(graph, _pipeline_prefix(names))
    from .ops import get_op

    groups: dict[str, list[str]] = {}
    for n in lowered.topological_order():
        if lowered.node(n)["op"] in tuning.TUNED_OPS:
            groups.setdefault(tuning.signature(lowered, n), []).append(n)

    def macs(n):
        d = lowered.node(n)
        return get_op(d["op"]).macs(d["attrs"], [lowered.node(i)["type"] for i in lowered.inputs_of(n)], d["type"])
    order = sorted(groups, key=lambda s: -macs(groups[s][0]) * len(groups[s]))
    say(f"convc tune: {len(order)} op signature(s) in '{graph.name}' on {host.describe()}, "
        f"{threads} thread(s), budget {budget:.0f} s")
    peak = fma_peak(threads) if order else None
    results: list[OpTuning] = []
    # time per candidate: enough runs for a stable median, within a share of the budget
    for k, sig in enumerate(order):
        n = groups[sig][0]
        bar.update(f"[{k + 1}/{len(order)}] {n}")
        t = OpTuning(sig, lowered.node(n)["op"], n, len(groups[sig]), macs(n), peak_gflops=peak)
        results.append(t)
        share = clock.left / (len(order) - k)
        if share < 1.0:
            t.skipped = "budget spent: untuned defaults"
            say(f"  [{k + 1}/{len(order)}] {n}: skipped, budget spent")
            continue
        began = time.perf_counter()
        m = micro_graph(lowered, n, seed)
        feeds = _feeds(m)
        want = evaluate(m, feeds)["y"].astype(np.float64)
        cands = candidates(lowered, n, names)
        per = min(0.25, max(0.02, share / (4 * (len(cands) + 1))))
        got = _measure(m, sig, cands, pipeline, host, want, feeds, per)
        t.measured = [r for r, _ in got]
        ok = [(r, mod) for r, mod in got if r.seconds is not None]
        if not ok:
            t.skipped = "no candidate passed"
            say(f"  [{k + 1}/{len(order)}] {n}: no candidate passed: "
                + "; ".join(f"{r.candidate.label}: {r.failure}" for r in t.measured))
            continue
        best, best_mod = min(ok, key=lambda rm: rm[0].seconds)
        more = []
        if best.candidate.algorithm == "gemm":
            more = _refine_blocks(m, sig, best, best_mod, pipeline, host, want, feeds, per,
                                  _Clock(share - (time.perf_counter() - began)))
        elif best.candidate.algorithm == "blocked":
            more = _refine_blocked(m, sig, lowered, n, best, pipeline, host, want, feeds, per,
                                   _Clock(share - (time.perf_counter() - began)))
        if more:
            t.measured += more
            faster = [r for r in more if r.seconds is not None and r.seconds < CLEAR_WIN * best.seconds]
            if faster:
                best = min(faster, key=lambda r: r.seconds)
        # the final say: the winner against what the untuned defaults compile to, timed in turn
        # (a cache hit: no compile); unless the winner is clearly faster, the defaults stay
        dmod = _compile(m, pipeline, None)
        winner = _compile(m, pipeline, _forcing(host, sig, best.candidate))
        d_s, w_s = _time_modules([dmod, winner], feeds, per)
        t.default = Measured(Candidate("default"), d_s)
        if not w_s < CLEAR_WIN * d_s and best.candidate.algorithm != "default":
            best = Measured(Candidate("default"), d_s)
        else:
            best.seconds = w_s
        t.best = best
        entry = dict(best.candidate.entry(), seconds=best.seconds, threads=threads,
                     candidates={r.candidate.label: r.seconds for r in t.measured if r.seconds is not None})
        db.put(tuning.entry_key(sig, threads), entry)
        if save and db.path is not None:
            db.save()
        line = ", ".join(f"{r.candidate.label} {r.seconds * 1e3:.3g} ms" if r.seconds is not None
                         else f"{r.candidate.label} FAILED ({r.failure})" for r in t.measured)
        pct = f", {t.pct_peak:.0f}% of peak" if t.pct_peak is not None else ""
        say(f"  [{k + 1}/{len(order)}] {n} ({t.op}, {t.count}x): {line} -> {best.candidate.label}{pct}")
    return TuneReport(host, threads, results, clock.elapsed, float(budget),
                      str(db.path) if save and db.path is not None else None)

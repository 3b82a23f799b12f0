"""``cc.explain``: one self-contained HTML page that shows what every pass of
a pipeline did to a graph -- proven, costed and explained.

For each pass step the page holds the IR diff (added, removed and rewritten
nodes marked), the graph picture with the changes highlighted, the cost
before and after, the numeric error the step introduced (measured on the
same inputs, on the reference interpreter and on compiled C), and the
reasons the pass gave for each node it left alone. Then the memory picture
of the final plan (one bar per arena buffer over the schedule steps, for the
compiled module and for the embedded export), the measured time of each
node on this machine, and the generated C of every node, reachable from its
box in the graph pictures.

The page needs no network: SVGs are inline, styles are in the page, the
only script opens the folded section a link points to. Graph pictures come
from Graphviz's ``dot`` when it is installed (the page says so when not).

    >>> ex = cc.explain(g)                  # doctest: +SKIP
    >>> ex.save("report.html")              # doctest: +SKIP
    >>> ex                                  # in Jupyter: renders the page
"""
from __future__ import annotations

import datetime
import difflib
import html
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import __version__
from .errors import ConvcError
from .ir import Graph, require_graph


@dataclass
class OutputError:
    """How far one graph output moved in one step: the reference
    interpreter's value after the pass against its value before
    (``ref_*``: zero for every rewrite whose ops keep their meaning, as
    the reference of winograd_conv is that of conv), and the graph after
    the pass compiled to C against the graph before it compiled to C
    (``c_*``: the rounding the rewrite changes in the generated code;
    Winograd's and FFT's transforms show here; None when C was not measured
    or did not compile). Relative errors are to the output's scale (its
    largest magnitude)."""
    output: str
    ref_abs: float
    ref_rel: float
    c_abs: float | None = None
    c_rel: float | None = None


@dataclass
class Step:
    """One pass of the pipeline (or the input graph, ``report`` None)."""
    name: str
    graph: Graph
    report: object = None                     # passes.manager.PassReport
    errors: list[OutputError] = field(default_factory=list)
    c_error: str | None = None                # why compiled C could not be measured
    seconds: float = 0.0                      # the pass's own time


@dataclass
class MemoryPicture:
    """A memory plan drawn as SVG; ``buffers`` and ``arena_bytes`` are the
    plan's (for the tests and the legend)."""
    title: str
    svg: str
    buffers: int
    arena_bytes: int
    peak_step: int
    peak_live_bytes: int


class Explanation:
    """What :func:`explain` found; renders as HTML (``html()``, Jupyter's
    ``_repr_html_``) and saves with ``save(path)``."""

    def __init__(self, graph: Graph, pipeline: str, steps: list[Step], feeds: dict, memory: list[MemoryPicture],
                 times: dict[str, float] | None, c_functions: dict[str, str], host: str, notes: list[str]):
        self.graph = graph
        self.pipeline = pipeline
        self.steps = steps
        self.feeds = feeds
        self.memory = memory
        self.times = times
        self.c_functions = c_functions
        self.host = host
        self.notes = notes

    @property
    def final(self) -> Graph:
        return self.steps[-1].graph

    def html(self) -> str:
        return _render(self)

    def _repr_html_(self) -> str:
        return self.html()

    def save(self, path) -> str:
        """Write the page to ``path`` (UTF-8); returns the path."""
        from pathlib import Path
        p = Path(path)
        p.write_text(self.html(), encoding="utf-8")
        return str(p)

    def __repr__(self):
        changed = sum(1 for s in self.steps[1:] if s.report is not None and s.report.changed)
        return (f"<Explanation of graph '{self.graph.name}': {len(self.steps) - 1} passes ({changed} changed "
                f"the graph); .save(path) writes the page>")


# -- measuring ------------------------------------------------------------------
def feeds_for(g: Graph, inputs=None, seed: int = 0) -> dict[str, np.ndarray]:
    """``inputs`` (a dict, or an .npz path whose arrays are named after the
    graph's inputs) checked against the graph, or random ones: standard
    normal floats, integers in [0, 2) for labels, the whole range for
    int8/uint8."""
    from .runtime.module import NumpyModule

    if inputs is None:
        rng = np.random.default_rng(seed)
        feeds = {}
        for n in g.input_names:
            t = g.node(n)["type"]
            if t.dtype in ("float32", "float64"):
                feeds[n] = rng.standard_normal(t.shape).astype(t.dtype)
            elif t.dtype in ("int8", "uint8"):
                info = np.iinfo(t.dtype)
                feeds[n] = rng.integers(info.min, info.max + 1, t.shape).astype(t.dtype)
            else:
                feeds[n] = rng.integers(0, 2, t.shape).astype(t.dtype)
        return feeds
    if isinstance(inputs, (str, bytes)) or hasattr(inputs, "__fspath__"):
        try:
            with np.load(inputs, allow_pickle=False) as z:
                inputs = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise ConvcError(f"explain: cannot read inputs from {inputs!r} ({e}); give an .npz with one array "
                             f"per graph input ({', '.join(g.input_names)})") from None
    if not isinstance(inputs, dict):
        raise ConvcError(f"explain: inputs must be a dict of input name -> array or an .npz path, got "
                         f"{type(inputs).__name__}")
    return NumpyModule(g).check_inputs(inputs)


def _error(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    if got.shape != want.shape:
        return float("inf"), float("inf")
    g, w = got.astype(np.float64), want.astype(np.float64)
    finite = np.isfinite(w) & np.isfinite(g)
    same_nonfinite = ~finite & ((g == w) | (np.isnan(g) & np.isnan(w)))
    if not np.all(finite | same_nonfinite):
        return float("inf"), float("inf")
    if not finite.any():
        return 0.0, 0.0
    err = float(np.max(np.abs(g[finite] - w[finite])))
    scale = float(np.max(np.abs(w[finite])))
    return err, (err / scale if scale > 0 else (0.0 if err == 0 else float("inf")))


def _compiled(g: Graph, feeds: dict):
    """Outputs of ``g`` compiled to C as given (no passes), or the error."""
    from .api import compile as cc_compile
    try:
        return cc_compile(g, target="c", passes="none").run(feeds), None
    except ConvcError as e:
        return None, f"{type(e).__name__}: {e}"


def _measure(step: Step, feeds: dict, before: dict, before_c: dict | None, compiled: bool) -> tuple[dict, dict]:
    """Fill ``step.errors``: the reference's outputs after the pass against
    before it, and compiled C's after against before (both compiled as
    given). Returns the step's (reference, C) outputs."""
    from .reference import evaluate

    after = evaluate(step.graph, feeds)
    after_c = None
    if compiled:
        after_c, step.c_error = _compiled(step.graph, feeds)
        if step.c_error is None and before_c is None:
            step.c_error = "the graph before this pass did not compile"
    for out, want in before.items():
        ra, rr = _error(after[out], want)
        e = OutputError(out, ra, rr)
        if after_c is not None and before_c is not None:
            e.c_abs, e.c_rel = _error(after_c[out], before_c[out])
        step.errors.append(e)
    return after, after_c


def _progress(done: int, total: int, what: str, enabled: bool):
    if enabled:
        sys.stderr.write(f"\r[explain {done}/{total}] {what:<40.40}")
        sys.stderr.flush()
        if done == total:
            sys.stderr.write("\n")


def explain(g: Graph, pipeline="default", inputs=None, compiled: bool = True, timing: bool = True,
            embedded: bool = True, seed: int = 0, progress: bool | None = None, notes=()) -> Explanation:
    """Run ``pipeline`` (a pipeline name or a list of pass names) on ``g``
    one pass at a time and explain each step: what it added, removed and
    rewrote, what it cost or saved, the error it introduced on ``inputs``
    (a dict or .npz; default random) measured on the reference interpreter
    and, with ``compiled``, on compiled C, and why it left nodes alone.
    ``timing`` measures each node of the final graph on this machine;
    ``embedded`` adds the memory picture of the embedded export's plan.
    Progress goes to stderr when it is a terminal (``progress``); ``notes``
    (strings) are printed under the page's title."""
    from . import passes as P
    from .reference import evaluate

    g = require_graph(g, "explain()")
    g.verify()
    names = P.resolve(pipeline)
    label = pipeline if isinstance(pipeline, str) else ",".join(names)
    if progress is None:
        progress = sys.stderr.isatty()
    feeds = feeds_for(g, inputs, seed)
    total = len(names) + 2 + int(timing)
    _progress(0, total, "reference run of the input graph", progress)
    steps = [Step("input", g)]
    before = evaluate(g, feeds)
    before_c = _compiled(g, feeds)[0] if compiled else None
    cur = g
    for i, name in enumerate(names, 1):
        _progress(i, total, name, progress)
        reps: list = []
        t0 = time.perf_counter()
        new = P.run(cur, [name], reports=reps)
        step = Step(name, new, reps[0], seconds=time.perf_counter() - t0)
        before, before_c = _measure(step, feeds, before, before_c, compiled)
        steps.append(step)
        cur = new
    _progress(len(names) + 1, total, "memory plans", progress)
    memory = [memory_picture(cur, f"arena of the compiled module ({label})")]
    notes = [str(n) for n in notes]
    if embedded:
        try:
            memory.append(memory_picture(P.run(g, "embedded"), "arena of the embedded export (pipeline embedded)"))
        except ConvcError as e:
            notes.append(f"embedded plan not drawn: {e}")
    times = None
    if timing:
        _progress(len(names) + 2, total, "timing each node", progress)
        times = node_times(cur, feeds)
    c_functions = node_sources(cur)
    _progress(total, total, "done", progress)
    return Explanation(g, label, steps, feeds, memory, times, c_functions, _host_line(), notes)


def node_times(g: Graph, feeds: dict, runs: int = 20, budget: float = 2.0) -> dict[str, float]:
    """Mean seconds per call of each node of ``g`` (as given: no passes),
    from the per-node timers of a profiled build: their totals over ``runs``
    calls (fewer, at least 3, once ``budget`` seconds have passed) divided
    by the number of calls."""
    from .api import compile as cc_compile
    from .timing import times_in_turn

    mod = cc_compile(g, target="c", passes="none", profile=True)
    n = len(times_in_turn([lambda: mod.run(feeds)], min_rounds=runs, seconds=0.0, max_seconds=budget,
                          max_rounds=runs, warmup=0)[0])
    return {k: v / n for k, v in mod.profile().items()}


def node_sources(g: Graph) -> dict[str, str]:
    """The generated C function of each scheduled node of ``g``."""
    from .codegen.c import node_functions
    from .codegen.env import Namer
    from .schedule import plan

    p = plan(g)
    functions, _ = node_functions(g, p, Namer(reserved=("params", "arena")), None)
    return dict(zip(p.order, functions))


def _host_line() -> str:
    try:
        from .host import probe
        h = probe()
        return f"{h.cpu} ({h.cores} cores, {h.isa})"
    except Exception as e:                       # the page is still useful without it
        return f"host not probed ({type(e).__name__})"


# -- pictures -------------------------------------------------------------------
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac")


def _color(op: str) -> str:
    import zlib
    return PALETTE[zlib.crc32(op.encode()) % len(PALETTE)]


def memory_picture(g: Graph, title: str, width: int = 860, height: int = 320) -> MemoryPicture:
    """The arena plan of ``g`` as an SVG: one bar per buffer, x = schedule
    steps it is live (written .. last read), y = its arena offset and
    size, colored by the op that writes it; the arena's size (what
    ``cc.cost(g).arena_bytes`` reports) is the top line, and the step where
    the most bytes are live is marked."""
    from .schedule import plan

    p = plan(g)
    bufs = [b for b in p.buffers if b.offset >= 0]
    steps = max(len(p.order), 1)
    arena = max(p.arena_bytes, 1)
    live = [0] * steps
    for b in bufs:
        for s in range(b.start, min(b.end, steps - 1) + 1):
            live[s] += b.nbytes
    peak_step = int(np.argmax(live)) if bufs else 0
    left, top, bottom = 70, 24, 36
    w, h = width - left - 10, height - top - bottom
    sx, sy = w / steps, h / arena
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="memory" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" data-arena="{p.arena_bytes}" data-buffers="{len(bufs)}" role="img">',
           f'<title>{html.escape(title)}</title>',
           f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="#fafafa" stroke="#999"/>']
    ops = {}
    for b in bufs:
        node = b.node[:-len(" workspace")] if b.node.endswith(" workspace") else b.node
        op = g.node(node)["op"] if node in g.nx else "?"
        kind = "scratch of " + op if b.node.endswith(" workspace") else op
        ops[kind] = _color(kind)
        x = left + b.start * sx
        bw = max((b.end - b.start + 1) * sx, 1.0)
        y = top + h - (b.offset + b.nbytes) * sy
        out.append(f'<rect class="buf" x="{x:.1f}" y="{y:.1f}" width="{bw:.1f}" height="{max(b.nbytes * sy, 0.8):.1f}" '
                   f'fill="{ops[kind]}" fill-opacity="0.85" stroke="#333" stroke-width="0.3" '
                   f'data-node="{html.escape(b.node)}" data-offset="{b.offset}" data-bytes="{b.nbytes}">'
                   f'<title>{html.escape(b.node)} ({html.escape(kind)}): {b.nbytes:,} bytes at +{b.offset:,}, '
                   f'steps {b.start}..{b.end}</title></rect>')
    px = left + (peak_step + 0.5) * sx
    out.append(f'<line class="peak" x1="{px:.1f}" y1="{top}" x2="{px:.1f}" y2="{top + h}" stroke="#d00" '
               f'stroke-dasharray="4 3"/>')
    out.append(f'<text x="{min(px + 4, left + w - 200):.1f}" y="{top + 12}" font-size="11" fill="#d00">'
               f'most live: {live[peak_step] if bufs else 0:,} B at step {peak_step}</text>')
    out.append(f'<text x="4" y="{top + 10}" font-size="11">{p.arena_bytes:,} B</text>')
    out.append(f'<text x="4" y="{top + h}" font-size="11">0</text>')
    out.append(f'<text x="{left}" y="{height - 18}" font-size="11">schedule step 0 .. {steps - 1} '
               f'(x), arena offset (y)</text>')
    lx = left
    for kind, color in sorted(ops.items()):
        if lx > width - 120:
            break
        out.append(f'<rect x="{lx}" y="{height - 12}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{lx + 13}" y="{height - 3}" font-size="10">{html.escape(kind)}</text>')
        lx += 18 + 6.2 * len(kind)
    out.append("</svg>")
    return MemoryPicture(title, "\n".join(out), len(bufs), p.arena_bytes, peak_step, live[peak_step] if bufs else 0)


def graph_svg(g: Graph, added=(), rewritten=(), link=()) -> str | None:
    """The graph drawn by Graphviz as inline SVG, nodes ``added`` in green
    and ``rewritten`` in orange; a node in ``link`` links to its generated
    C (``#c-<node>``). None when ``dot`` is not installed."""
    dot = shutil.which("dot")
    if dot is None:
        return None
    source = g.to_dot(highlight=rewritten, added=added, links={n: f"#c-{_anchor(n)}" for n in link})
    try:
        res = subprocess.run([dot, "-Tsvg"], input=source, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    svg = res.stdout
    return svg[svg.index("<svg"):] if "<svg" in svg else None


def _anchor(n: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in n)


# -- the page --------------------------------------------------------------------
CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .4em 0; } td, th { border: 1px solid #ccc; padding: 2px 8px; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; font-size: 12px; }
details { border: 1px solid #ddd; border-radius: 4px; margin: .5em 0; padding: .3em .7em; }
summary { cursor: pointer; font-weight: 600; }
.add { background: #e6ffe6; } .del { background: #ffe6e6; } .mod { background: #fff3d6; }
.muted { color: #777; } .graph svg { max-width: 100%; height: auto; }
.declines li { font-family: monospace; font-size: 12px; }
"""

SCRIPT = """
function convcOpen() {
  var id = decodeURIComponent(location.hash.slice(1));
  var el = id ? document.getElementById(id) : null;
  if (el && el.tagName === 'DETAILS') { el.open = true; el.scrollIntoView(); }
}
window.addEventListener('hashchange', convcOpen);
window.addEventListener('load', convcOpen);
"""


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    return "0" if v == 0 else f"{v:.3g}"


def _ir_diff(before: Graph, after: Graph) -> str:
    a, b = str(before).splitlines(), str(after).splitlines()
    rows = []
    for line in difflib.ndiff(a, b):
        tag, text = line[:1], html.escape(line[2:])
        if tag == "?":
            continue
        cls = {"+": "add", "-": "del"}.get(tag, "")
        rows.append(f'<span class="{cls}">{html.escape(tag)} {text}</span>' if cls else f"  {text}")
    return "<pre class=\"ir\">" + "\n".join(rows) + "</pre>"


def _cost_table(rep) -> str:
    rows = "".join(f"<tr><td>{k}</td><td class=n>{rep.before[k]:,}</td><td class=n>{rep.after[k]:,}</td>"
                   f"<td class=n>{rep.after[k] - rep.before[k]:+,}</td></tr>"
                   for k in ("macs", "params", "bytes", "arena_bytes", "nodes"))
    return f"<table class=cost><tr><th></th><th>before</th><th>after</th><th>change</th></tr>{rows}</table>"


def _error_table(step: Step) -> str:
    rows = "".join(f"<tr><td>{html.escape(e.output)}</td><td class=n>{_fmt(e.ref_abs)}</td>"
                   f"<td class=n>{_fmt(e.ref_rel)}</td><td class=n>{_fmt(e.c_abs)}</td>"
                   f"<td class=n>{_fmt(e.c_rel)}</td></tr>" for e in step.errors)
    note = f'<p class=muted>compiled C not measured: {html.escape(step.c_error)}</p>' if step.c_error else ""
    return ("<table class=error><tr><th>output</th><th>reference: max abs</th><th>max rel</th>"
            f"<th>compiled C: max abs</th><th>max rel</th></tr>{rows}</table>{note}")


def _declines(rep) -> str:
    items = getattr(rep, "declines", None) or []
    if not items:
        return "<p class=muted>no nodes declined</p>"
    lis = "".join(f"<li>'{html.escape(n)}': {html.escape(r)}</li>" for n, r in items)
    return f'<ul class="declines">{lis}</ul>'


def _render(ex: Explanation) -> str:
    from .cost import cost

    first, last = cost(ex.graph), cost(ex.final)
    link = set(ex.c_functions)
    parts = [f"<h1>convc explain: graph '{html.escape(ex.graph.name)}', pipeline {html.escape(ex.pipeline)}</h1>",
             f"<p class=muted>convc {__version__} on {html.escape(ex.host)}, "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Inputs: "
             f"{html.escape(', '.join(f'{k} {v.dtype}{list(v.shape)}' for k, v in ex.feeds.items()))}.</p>"]
    parts += [f"<p class=note>{html.escape(n)}</p>" for n in ex.notes]
    total = sum(ex.times.values()) if ex.times else None
    parts.append("<h2 id=summary>Summary</h2><table class=summary><tr><th></th><th>input graph</th>"
                 "<th>after the pipeline</th></tr>" + "".join(
                     f"<tr><td>{k}</td><td class=n>{a:,}</td><td class=n>{b:,}</td></tr>" for k, a, b in (
                         ("multiplications (MACs)", first.macs, last.macs),
                         ("params (elements)", first.params, last.params),
                         ("arena (bytes)", first.arena_bytes, last.arena_bytes),
                         ("nodes", len(first.nodes), len(last.nodes))))
                 + (f"<tr><td>measured time per call</td><td></td><td class=n>{total * 1e6:,.1f} µs</td></tr>"
                    if total is not None else "") + "</table>")
    if ex.times:
        rows = "".join(
            f"<tr><td><a href='#c-{_anchor(n)}'>{html.escape(n)}</a></td><td>{html.escape(ex.final.node(n)['op'])}"
            f"</td><td class=n>{last.nodes[n].macs if n in last.nodes else 0:,}</td><td class=n>{t * 1e6:,.2f}</td>"
            f"<td class=n>{(2 * last.nodes[n].macs / t / 1e9) if n in last.nodes and t > 0 else 0:,.2f}</td></tr>"
            for n, t in ex.times.items())
        parts.append("<details id=times><summary>Measured time of each node on this machine (slowest first)"
                     "</summary><table><tr><th>node</th><th>op</th><th>MACs</th><th>µs per call</th>"
                     f"<th>GFLOP/s</th></tr>{rows}</table></details>")
    parts.append("<h2 id=passes>Pass by pass</h2>")
    for i, step in enumerate(ex.steps):
        if step.report is None:
            svg = graph_svg(step.graph, link=link)
            parts.append(f"<details class=step id=step-00><summary>00 input graph: {len(first.nodes)} ops, "
                         f"{len(step.graph.param_names)} params"
                         f"</summary><pre class=ir>{html.escape(str(step.graph))}</pre>"
                         f"<div class=graph>{svg or _no_dot()}</div></details>")
            continue
        rep = step.report
        worst = max((e.ref_abs for e in step.errors), default=0.0)
        worst_c = max((e.c_abs for e in step.errors if e.c_abs is not None), default=None)
        head = (f"{i:02d} {html.escape(step.name)}: +{len(rep.added)} −{len(rep.removed)} ~{len(rep.rewritten)} "
                f"nodes, MACs {rep.before['macs']:,} → {rep.after['macs']:,}, error {_fmt(worst)} (reference)"
                + (f", {_fmt(worst_c)} (C)" if worst_c is not None else "")
                + (f", {len(rep.declines)} declined" if getattr(rep, "declines", None) else ""))
        doc = _pass_doc(step.name)
        svg = graph_svg(step.graph, added=set(rep.added), rewritten=set(rep.rewritten), link=link) \
            if rep.changed else None
        removed = (f"<p>removed: <span class=del>{html.escape(', '.join(rep.removed))}</span></p>"
                   if rep.removed else "")
        notes = "".join(f"<li>{html.escape(t)}</li>" for t in rep.notes)
        parts.append(
            f"<details class=step id=step-{i:02d}{' open' if rep.changed else ''}><summary>{head}</summary>"
            f"<p class=muted>{html.escape(doc)}</p>"
            f"<h3>Cost</h3>{_cost_table(rep)}<h3>Measured error</h3>{_error_table(step)}"
            f"<h3>Declined</h3>{_declines(rep)}" + (f"<h3>Notes</h3><ul>{notes}</ul>" if notes else "")
            + (f"<h3>IR diff</h3>{removed}{_ir_diff(ex.steps[i - 1].graph, step.graph)}" if rep.changed else
               "<p class=muted>the graph is unchanged</p>")
            + (f"<h3>Graph</h3><p class=muted>green: added, orange: rewritten; click a node for its C</p>"
               f"<div class=graph>{svg or _no_dot()}</div>" if rep.changed else "") + "</details>")
    parts.append("<h2 id=memory>Memory</h2>")
    for m in ex.memory:
        parts.append(f"<h3>{html.escape(m.title)}</h3><p>{m.buffers} buffers, arena {m.arena_bytes:,} bytes; "
                     f"most bytes live at step {m.peak_step} ({m.peak_live_bytes:,} B).</p>{m.svg}")
    parts.append("<h2 id=code>Generated C, node by node</h2>")
    for n, src in ex.c_functions.items():
        parts.append(f"<details class=code id=c-{_anchor(n)}><summary>{html.escape(n)}: "
                     f"{html.escape(ex.final.node(n)['op'])}</summary><pre>{html.escape(src)}</pre></details>")
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>convc explain: "
            f"{html.escape(ex.graph.name)}</title><style>{CSS}</style></head><body>\n{body}\n"
            f"<script>{SCRIPT}</script></body></html>\n")


def _no_dot() -> str:
    return "<p class=muted>(install Graphviz's <code>dot</code> to draw the graph)</p>"


def _pass_doc(name: str) -> str:
    from .passes import PASSES
    doc = (PASSES[name].__doc__ or "").strip()
    return " ".join(doc.split("\n\n")[0].split())


# -- the command ---------------------------------------------------------------------
def cmd_explain(args) -> int:
    """``convc explain MODEL -o report.html`` (its options are in convc/cli.py)."""
    from .loading import load_model

    g = load_model(args.model)
    pipeline = [s.strip() for s in args.passes.split(",") if s.strip()] if args.passes else args.pipeline
    ex = explain(g, pipeline, inputs=args.inputs, compiled=not args.no_compiled, timing=not args.no_timing,
                 progress=False if args.quiet else None)
    path = ex.save(args.output)
    changed = sum(1 for s in ex.steps[1:] if s.report is not None and s.report.changed)
    print(f"wrote {path}: {len(ex.steps) - 1} passes ({changed} changed the graph); open it in a browser")
    return 0

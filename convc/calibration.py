"""Post-training quantization: calibration, ``cc.quantize`` and its report.

Calibration runs the float graph (after the float cleanups: constants and
batch norm folded, bias and activation fused into each producer's epilogue)
on sample inputs and records, on every float value of the graph, the range
it took: node data ``"qrange" = (lo, hi)``. The ranges travel in the graph,
so the ``quantize_int8`` pass (convc/passes/quantize.py) that turns them into
scales and zero points has no hidden state. Calibration also keeps a small
sample of its inputs on each graph input (node data ``"calibration"``): the
pass measures each layer's error on it for its report notes.

Observers (how a range is read from the values a node took):

- ``"minmax"``: the smallest and largest value seen;
- ``"percentile"``: the ``100 - p`` and ``p`` percentiles of the values
  seen (``p = 99.99`` by default), so that a few outliers do not stretch
  the scale for everything else.

>>> import numpy as np, convc as cc
>>> from convc.models import lenet5
>>> data = np.random.default_rng(0).random((4, 1, 28, 28), np.float32)
>>> g8 = cc.quantize(lenet5(), data, engine="reference")
>>> g8.node("conv1.relu")["op"]
'qconv'
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConvcError
from .ir import FLOAT_DTYPES, Graph, require_graph

CLEANUP = ["eliminate_dead_code", "eliminate_common_subexpressions", "fold_constants", "fold_batch_norm",
           "fuse_epilogues", "split_int8_epilogues", "eliminate_dead_code"]
"""The float passes run before calibration: batch norm folded into its conv,
bias and activation fused into their producer (a residual add, and an
activation that no int8 clamp expresses, split off again), so that each
range is that of a value the int8 graph computes."""

OBSERVERS = ("minmax", "percentile")

SAMPLE_ROWS = 32
"""Calibration samples (batch rows) kept on the graph inputs for the pass's
per-layer error notes (the report of ``cc.quantize`` uses all the data)."""

PERCENTILE_VALUES = 1 << 21
"""The most values per node the percentile observer keeps (evenly strided
from each batch beyond that), bounding its memory on large calibration sets."""


class CalibrationError(ConvcError):
    """Calibration data that does not fit the graph, or a graph without the
    calibration ranges a quantization needs."""


# -- calibration data ---------------------------------------------------------
def batches(g: Graph, calibration) -> list[dict[str, np.ndarray]]:
    """``calibration`` as a list of feeds, one per batch of the graph's
    declared shape. Accepted: an array (the graph has one float input) of
    shape (k * N, *rest) when the input is (N, *rest); a dict name -> such
    array; a list of feeds dicts (each one batch); a path to an ``.npz``
    whose arrays are named after the inputs (or one array for a graph with
    one input)."""
    float_inputs = [n for n in g.input_names if g.node(n)["type"].dtype in FLOAT_DTYPES]
    if not float_inputs:
        raise CalibrationError(f"graph '{g.name}' has no float input to calibrate "
                               f"(inputs: {[str(g.node(n)['type']) for n in g.input_names]})")
    if isinstance(calibration, (str, Path)):
        calibration = _load_npz(Path(calibration), float_inputs)
    if isinstance(calibration, (list, tuple)):
        if not calibration:
            raise CalibrationError("calibration data is an empty list; give at least one batch")
        out = []
        for i, feeds in enumerate(calibration):
            if not isinstance(feeds, dict):
                raise CalibrationError(f"calibration batch {i} is a {type(feeds).__name__}; a list of "
                                       f"calibration batches holds dicts input name -> array")
            out += _split(g, feeds, float_inputs, f"calibration batch {i}", whole=True)
        return out
    if isinstance(calibration, dict):
        return _split(g, calibration, float_inputs, "calibration data", whole=False)
    if len(float_inputs) != 1:
        raise CalibrationError(f"graph '{g.name}' has {len(float_inputs)} float inputs {float_inputs}: give the "
                               f"calibration data as a dict input name -> array (or an .npz with those names)")
    return _split(g, {float_inputs[0]: calibration}, float_inputs, "calibration data", whole=False)


def _load_npz(path: Path, names: list[str]) -> dict:
    if not path.is_file():
        raise CalibrationError(f"calibration file {str(path)!r} does not exist (give an .npz of input arrays)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise CalibrationError(f"calibration file {str(path)!r} is not a readable .npz ({e})") from None
    if set(names) <= set(arrays):
        return {n: arrays[n] for n in names}
    if len(names) == 1 and len(arrays) == 1:
        return {names[0]: next(iter(arrays.values()))}
    raise CalibrationError(f"calibration file {str(path)!r} holds arrays {sorted(arrays)}; the graph's float "
                           f"inputs are {names} (name the arrays after them, or store one array for a graph "
                           f"with one input)")


def _split(g: Graph, feeds: dict, names: list[str], what: str, whole: bool) -> list[dict]:
    """Check ``feeds`` against the inputs ``names``; cut (k * N)-row arrays
    into k batches of N rows (``whole``: exactly one batch)."""
    missing = [n for n in names if n not in feeds]
    unknown = [k for k in feeds if k not in names]
    if missing or unknown:
        raise CalibrationError(f"{what}: the graph's float inputs are {names}; missing {missing}, "
                               f"unknown {unknown}")
    counts = {}
    arrays = {}
    for n in names:
        t = g.node(n)["type"]
        try:
            a = np.asarray(feeds[n])
        except (TypeError, ValueError) as e:
            raise CalibrationError(f"{what} for input '{n}' {t} is not an array ({e})") from None
        if a.dtype.kind not in "f":
            raise CalibrationError(f"{what} for input '{n}' {t} has dtype {a.dtype}; calibration takes float "
                                   f"values as the float graph does (convert, e.g. images / 255)")
        rows = t.shape[0]
        ok = a.shape == t.shape if whole else (a.ndim == len(t.shape) and a.shape[1:] == t.shape[1:]
                                                and a.shape[0] >= rows and a.shape[0] % rows == 0)
        if not ok:
            rule = (f"exactly {t.shape}" if whole else
                    f"(k * {rows}, {', '.join(map(str, t.shape[1:]))}) for k >= 1 batches of the declared "
                    f"batch size {rows}")
            raise CalibrationError(f"{what} for input '{n}' {t} has shape {a.shape}; it must be {rule}")
        if not np.isfinite(a).all():
            raise CalibrationError(f"{what} for input '{n}' holds NaN or infinite values")
        arrays[n] = a.astype(t.dtype, copy=False)
        counts[n] = a.shape[0] // rows
    if len(set(counts.values())) > 1:
        raise CalibrationError(f"{what}: the inputs hold different numbers of batches {counts}")
    k = next(iter(counts.values()))
    return [{n: arrays[n][i * g.node(n)["type"].shape[0]:(i + 1) * g.node(n)["type"].shape[0]] for n in names}
            for i in range(k)]


# -- per-node values, batch by batch -----------------------------------------
ENGINES = ("c", "opencl", "reference")


def node_values(g: Graph, nodes: list[str], feeds_list, engine: str = "c", what: str = "running"):
    """Yield, for each feeds dict of ``feeds_list``, a dict node -> value of
    every node in ``nodes`` (inputs, params and ops of ``g``). ``engine``:
    ``"c"`` compiles ``g`` once with each node as an extra output (fast on
    many batches; ``"opencl"`` the same on the OpenCL target),
    ``"reference"`` runs the numpy interpreter. A progress
    line goes to stderr when it is a terminal."""
    from .reference import values

    if engine not in ENGINES:
        raise ConvcError(f"engine must be one of {ENGINES}, got {engine!r}")
    computed = [n for n in nodes if g.node(n)["op"] not in ("input", "param")]
    mod = names = None
    if engine != "reference" and computed:
        from .api import compile as compile_graph

        probe = g.copy()
        names = {}
        taken = set(probe.outputs) | set(probe.input_names)
        by_node = {n: o for o, n in probe.outputs.items()}
        for i, n in enumerate(computed):
            if n in by_node:
                names[n] = by_node[n]
                continue
            o = f"observe_{i}"
            while o in taken:
                o += "_"
            taken.add(o)
            probe.output(probe.value(n), o)
            names[n] = o
        mod = compile_graph(probe, target=engine)
    tty = sys.stderr.isatty()
    for i, feeds in enumerate(feeds_list):
        if tty:
            sys.stderr.write(f"\r{what}: batch {i + 1}/{len(feeds_list)}")
            sys.stderr.flush()
        if mod is not None:
            res = mod.run(feeds)
            got = {n: res[names[n]] for n in computed}
        else:
            got = values(g, feeds, nodes=computed) if computed else {}
        for n in nodes:
            d = g.node(n)
            if d["op"] == "input":
                got[n] = np.asarray(feeds[n])
            elif d["op"] == "param":
                got[n] = d["value"]
        yield {n: got[n] for n in nodes}
    if tty:
        sys.stderr.write("\n")


# -- observers -----------------------------------------------------------------
class _MinMax:
    def __init__(self):
        self.lo, self.hi = math.inf, -math.inf

    def update(self, v: np.ndarray):
        self.lo, self.hi = min(self.lo, float(v.min())), max(self.hi, float(v.max()))

    def range(self):
        return self.lo, self.hi


class _Percentile:
    def __init__(self, p: float, per_batch: int):
        self.p, self.per_batch, self.kept = p, per_batch, []

    def update(self, v: np.ndarray):
        flat = v.reshape(-1)
        step = max(1, -(-flat.size // self.per_batch))
        self.kept.append(flat[::step].astype(np.float64))

    def range(self):
        allv = np.concatenate(self.kept)
        return float(np.percentile(allv, 100.0 - self.p)), float(np.percentile(allv, self.p))


def observed(g: Graph) -> list[str]:
    """The nodes calibration records a range for: graph inputs and computed
    nodes with a float value."""
    return [n for n in g.topological_order()
            if g.node(n)["op"] != "param" and g.node(n)["type"].dtype in FLOAT_DTYPES]


def calibrate(g: Graph, calibration, observer: str = "minmax", percentile: float = 99.99,
              engine: str = "c", cleanup: bool = True) -> Graph:
    """The float graph after the cleanup passes (``CLEANUP``; ``cleanup=False``
    takes ``g`` as it is) with a calibrated range on every float value: node
    data ``"qrange" = (lo, hi)``, observed while running the graph on
    ``calibration`` (see :func:`batches` for its forms) through ``engine``
    (``"c"``: compiled, ``"reference"``: the numpy interpreter). The inputs
    keep the first ``SAMPLE_ROWS`` calibration rows (node data
    ``"calibration"``) for the pass's error notes.

    >>> import numpy as np, convc as cc
    >>> from convc.models import lenet5
    >>> x = np.random.default_rng(0).random((2, 1, 28, 28), np.float32)
    >>> gc = cc.calibrate(lenet5(), x, engine="reference")
    >>> gc.node("conv1.relu")["qrange"][0]       # after the relu
    0.0
    """
    from . import passes

    require_graph(g, "calibrate()")
    if observer not in OBSERVERS:
        raise ConvcError(f"observer must be one of {OBSERVERS}, got {observer!r}")
    if observer == "percentile" and not (isinstance(percentile, (int, float)) and 50 < percentile <= 100):
        raise ConvcError(f"percentile must be a number in (50, 100], got {percentile!r}")
    if g.assigns:
        raise CalibrationError(f"graph '{g.name}' assigns params (a training graph); quantize the inference graph")
    feeds_list = batches(g, calibration)
    out = passes.run(g, CLEANUP) if cleanup else g.copy()
    nodes = observed(out)
    per_batch = max(1, PERCENTILE_VALUES // len(feeds_list))
    obs = {n: (_MinMax() if observer == "minmax" else _Percentile(float(percentile), per_batch)) for n in nodes}
    for vals in node_values(out, nodes, feeds_list, engine, "calibrating"):
        for n in nodes:
            obs[n].update(vals[n])
    for n in nodes:
        lo, hi = obs[n].range()
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise CalibrationError(f"node '{n}' ({out.node(n)['op']}, {out.node(n)['type']}) took non-finite "
                                   f"values on the calibration data; it cannot be quantized")
        out.nx.nodes[n]["qrange"] = (lo, hi)
    rows = {n: out.node(n)["type"].shape[0] for n in out.input_names if n in feeds_list[0]}
    keep = max(1, -(-SAMPLE_ROWS // max(rows.values())))
    for n in rows:
        out.nx.nodes[n]["calibration"] = np.concatenate([f[n] for f in feeds_list[:keep]])
    return out


# -- the report ----------------------------------------------------------------
@dataclass
class LayerRow:
    """One layer of the float graph and what quantization made of it."""
    node: str
    op: str                     # the float op
    int8_op: str                # what the int8 graph computes it with ("dequantize -> op" for a float fallback)
    scale: float | None         # the int8 output's (None: the layer stays float)
    zero_point: int | None
    max_abs: float              # |float layer - dequantized int8 layer|, max over the data
    snr_db: float               # 10 log10(sum float^2 / sum error^2); inf when equal
    flash_float: int            # bytes of the layer's params in the float graph
    flash_int8: int             # bytes of the int8 graph's params for this layer


@dataclass
class QuantReport:
    """Per layer the output scale and zero point, the measured error against
    the float graph, and the size change; whole-graph flash (params bytes)
    and RAM (arena bytes) before and after. ``str(report)`` is a table."""
    graph: str
    rows: list[LayerRow] = field(default_factory=list)
    flash: tuple[int, int] = (0, 0)
    arena: tuple[int, int] = (0, 0)
    samples: int = 0
    outputs: dict = field(default_factory=dict)     # output name -> (max abs, SNR dB)

    def table(self) -> str:
        head = ("layer", "op", "int8", "scale", "zp", "max abs err", "SNR dB", "flash f32", "flash int8")
        rows = [head]
        for r in self.rows:
            rows.append((r.node, r.op, r.int8_op, "-" if r.scale is None else f"{r.scale:.4g}",
                         "-" if r.zero_point is None else str(r.zero_point), f"{r.max_abs:.4g}",
                         _db(r.snr_db), f"{r.flash_float:,}", f"{r.flash_int8:,}"))
        w = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [f"quantize_int8 of '{self.graph}' measured on {self.samples} calibration samples"]
        lines += ["  ".join(c.ljust(w[i]) if i < 3 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows]
        for o, (err, snr) in self.outputs.items():
            lines.append(f"output {o}: max abs error {err:.4g}, SNR {_db(snr)} dB")
        f, q = self.flash
        a, b = self.arena
        lines.append(f"flash (params bytes): {f:,} float -> {q:,} int8 ({q / max(f, 1):.1%})")
        lines.append(f"RAM (arena bytes):    {a:,} float -> {b:,} int8 ({b / max(a, 1):.1%})")
        return "\n".join(lines)

    __str__ = table


def _db(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.1f}"


class _Err:
    def __init__(self):
        self.sig = self.noise = 0.0
        self.max = 0.0

    def update(self, f: np.ndarray, q: np.ndarray):
        f, q = f.astype(np.float64), q.astype(np.float64)
        e = f - q
        self.sig += float(np.sum(f * f))
        self.noise += float(np.sum(e * e))
        self.max = max(self.max, float(np.max(np.abs(e))) if e.size else 0.0)

    def snr(self) -> float:
        if self.noise == 0:
            return math.inf
        return 10 * math.log10(self.sig / self.noise) if self.sig > 0 else -math.inf


def _as_float(g8: Graph, n: str, v: np.ndarray) -> np.ndarray:
    """Node ``n``'s value in the int8 graph as the real numbers it stands for."""
    from .quant import dequantize_array

    qp = g8.node(n).get("qparams")
    return dequantize_array(v, *qp) if qp is not None else v


def layer_pairs(gf: Graph, g8: Graph) -> list[str]:
    """Layers of the float graph with a twin of the same name in the int8 graph."""
    return [n for n in gf.topological_order() if gf.node(n)["op"] not in ("input", "param") and n in g8.nx]


def measure(gf: Graph, g8: Graph, feeds_list, engine: str = "c") -> QuantReport:
    """The report of quantizing ``gf`` (the calibrated float graph) into
    ``g8`` (what ``quantize_int8`` made of it), errors measured on
    ``feeds_list`` through ``engine``."""
    from .cost import cost

    layers = layer_pairs(gf, g8)
    errs = {n: _Err() for n in layers}
    outs = {o: _Err() for o in gf.outputs}
    vf = node_values(gf, layers + [gf.outputs[o] for o in gf.outputs], feeds_list, engine, "float graph")
    v8 = node_values(g8, layers + [g8.outputs[o] for o in g8.outputs], feeds_list, engine, "int8 graph")
    samples = 0
    for a, b in zip(vf, v8):
        for n in layers:
            errs[n].update(a[n], _as_float(g8, n, b[n]))
        for o in gf.outputs:
            outs[o].update(a[gf.outputs[o]], b[g8.outputs[o]])
        samples += next(iter(feeds_list[0].values())).shape[0]
    rep = QuantReport(gf.name, samples=samples)
    for n in layers:
        d8 = g8.node(n)
        qp = d8.get("qparams")
        rep.rows.append(LayerRow(n, gf.node(n)["op"], d8.get("int8_form", d8["op"]),
                                 None if qp is None else float(qp[0]), None if qp is None else int(qp[1]),
                                 errs[n].max, errs[n].snr(), _param_bytes(gf, n), _param_bytes(g8, n)))
    rep.outputs = {o: (e.max, e.snr()) for o, e in outs.items()}
    cf, c8 = cost(gf), cost(g8)
    rep.flash = (_all_param_bytes(gf), _all_param_bytes(g8))
    rep.arena = (cf.arena_bytes, c8.arena_bytes)
    return rep


def _param_bytes(g: Graph, n: str) -> int:
    """Bytes of the params node ``n`` reads (through reshapes of params)."""
    total, seen, todo = 0, set(), list(g.inputs_of(n))
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        d = g.node(p)
        if d["op"] == "param":
            total += d["type"].nbytes
        elif d["op"] == "reshape" and all(g.node(i)["op"] == "param" for i in g.inputs_of(p)):
            todo += g.inputs_of(p)
    return total


def _all_param_bytes(g: Graph) -> int:
    from .schedule import live_nodes

    live = live_nodes(g)
    return sum(g.node(p)["type"].nbytes for p in g.param_names if p in live)


# -- cc.quantize -----------------------------------------------------------------
def quantize(g, *args, **kwargs):
    """``cc.quantize``: on a Graph, post-training quantization
    (:func:`quantize_graph`: ``cc.quantize(g, calibration, per_channel=True,
    observer="minmax")``); on a Value, the ``quantize`` op
    (``cc.quantize(x, scale, zero_point=0, dtype="int8", axis=None)``), so
    both meanings the public API gives the name stay callable."""
    from .ir import Value

    if isinstance(g, Value):
        from .ops.quantized import quantize as quantize_op
        return quantize_op(g, *args, **kwargs)
    return quantize_graph(g, *args, **kwargs)


def quantize_graph(g: Graph, calibration=None, per_channel: bool = True, observer: str = "minmax",
                   percentile: float = 99.99, engine: str = "c", report: bool = False):
    """Post-training static quantization: the float cleanups, calibration on
    ``calibration`` (an array, a dict of arrays, a list of feeds or an .npz;
    see :func:`batches`) and the ``quantize_int8`` pass. Returns the int8
    graph (float in, float out: the inputs are quantized and the outputs
    dequantized inside it); with ``report=True``, ``(graph, QuantReport)``,
    the report measured on all the calibration data. ``per_channel``: one
    weight scale per output channel (default) or one per tensor.
    ``observer``: ``"minmax"`` or ``"percentile"`` (``percentile``).

    >>> import numpy as np, convc as cc
    >>> from convc.models import lenet5
    >>> data = np.random.default_rng(0).random((2, 1, 28, 28), np.float32)
    >>> g8, rep = cc.quantize(lenet5(), data, engine="reference", report=True)
    >>> rep.rows[0].node, rep.rows[0].int8_op
    ('conv1.relu', 'qconv')
    """
    from .passes.quantize import quantize_int8

    require_graph(g, "quantize()")
    if calibration is None:
        raise CalibrationError("quantize(graph, calibration): give calibration inputs (an array, a dict of "
                               "arrays, a list of feeds or an .npz path)")
    if per_channel not in (True, False):
        raise ConvcError(f"per_channel must be True or False, got {per_channel!r}")
    gc = calibrate(g, calibration, observer=observer, percentile=percentile, engine=engine)
    if not per_channel:
        for n in gc.topological_order():
            gc.nx.nodes[n]["per_channel"] = False
    g8 = quantize_int8(gc)
    if not report:
        return g8
    return g8, measure(gc, g8, batches(g, calibration), engine)


# -- writing a quantized graph as a model file ----------------------------------------
def save_python(g: Graph, path) -> tuple[Path, Path]:
    """Write ``g`` as a model file ``convc`` loads back (``convc passes``,
    ``convc run``, ``convc export``): ``path`` (Python, a ``build()`` that
    re-adds every node with ``g.add``, attributes as written in the IR) and
    the params beside it (``path`` with suffix ``.npz``). Returns both paths."""
    path = Path(path)
    npz = path.with_suffix(".npz")
    params = {f"p{i}": g.node(n)["value"] for i, n in enumerate(g.param_names)}
    key = {n: f"p{i}" for i, n in enumerate(g.param_names)}
    lines = [f'"""The graph \'{g.name}\' as written by convc (calibrate.save_python); its params are in',
             f'{npz.name}. Load it with convc.loading.load_model or any convc command taking a MODEL."""',
             "from pathlib import Path", "", "import numpy as np", "", "import convc as cc", "",
             'inf, nan = float("inf"), float("nan")', "", "",
             "def build() -> cc.Graph:",
             "    p = np.load(Path(__file__).with_suffix('.npz'), allow_pickle=False)",
             f"    g = cc.Graph({g.name!r})", "    v = {}"]
    for n in g.topological_order():
        d = g.node(n)
        if d["op"] == "input":
            lines.append(f"    v[{n!r}] = g.input({n!r}, {d['type'].shape!r}, {d['type'].dtype!r})")
        elif d["op"] == "param":
            lines.append(f"    v[{n!r}] = g.param({n!r}, p[{key[n]!r}], {d['type'].dtype!r})")
            if d.get("const"):
                lines.append(f"    g.nx.nodes[{n!r}]['const'] = True")
        else:
            ins = ", ".join(f"v[{i!r}]" for i in g.inputs_of(n))
            lines.append(f"    v[{n!r}] = g.add({d['op']!r}, [{ins}], {d['attrs']!r}, {n!r})")
    for o, n in g.outputs.items():
        lines.append(f"    g.output(v[{n!r}], {o!r})")
    lines.append("    return g")
    path.write_text("\n".join(lines) + "\n")
    np.savez(npz, **params)
    return path, npz

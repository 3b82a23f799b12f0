"""Training export: the training step of a graph as a standalone C99 library.

``export_train(model, out_dir, name)`` (``cc.export_c(model, out_dir,
train=True)``, ``convc export MODEL --train``) writes ``NAME.h``, ``NAME.c``
and the harness ``NAME_test.c`` for the graph :func:`convc.train.training_graph`
builds -- forward, loss, the gradients ``g``/``h``, the SGD or Adam update --
rendered from the same node templates and memory plan as the runtime and the
inference export (:mod:`convc.export`):

- the trained params and the optimizer's state are ``static`` arrays in RAM,
  initialised from the graph's values (zero state in .bss); params training
  does not change stay ``const`` (flash);
- ``NAME_train_step`` runs one step on one static arena; each param's (and
  state's) new value is written into its array as soon as nothing reads the
  old one, and only after every check of the inputs, so a rejected batch
  changes nothing (:func:`early_commits`; the schedule runs each update as its
  gradient is ready, and the update's elementwise chain works in place);
- ``NAME_predict`` runs the inference graph on the same params and arena
  (node functions identical to the step's are shared, not copied);
- ``NAME_get_params``/``NAME_set_params`` copy the params and state to and from
  a checkpoint of ``NAME_PARAMS_BYTES`` bytes (layout in ``NAME.h``).

``NAME_test.c`` runs a few steps on batches the reference interpreter trained
on and checks every step's loss, the params and state after them, predict
before and after, the checkpoint round trip, and the rejection of bad labels.

>>> from convc.models import lenet5
>>> export_train(lenet5(batch=4), "out", name="lenet_train",
...              optimizer=cc.SGD(lr=0.01, momentum=0.9))          # doctest: +SKIP
"""
from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import numpy as np

from . import __version__
from .codegen.c import bind_buffers, node_functions, output_copies, share_identical
from .codegen.env import CTYPES, Namer, environment
from .errors import CompileError, ConvcError
from .ir import INT_DTYPES, Graph, require_graph
from .schedule import ALIAS_OPS, Plan, plan as make_plan

TRAIN_PASSES = ["eliminate_dead_code", "eliminate_common_subexpressions", "fold_constants", "fuse_epilogues",
                "fuse_separable", "eliminate_dead_code"]
"""The training export's pipeline: the embedded one without ``fold_batch_norm``
(both bake trained weights into new constants, which would go stale after a
step) and, as there, without the GEMM/Winograd lowerings whose scratch costs RAM."""
AFTER_COMMIT = ["inplace_elementwise"]
"""Run on the step graph after :func:`early_commits` has fixed its schedule
(the in-place rule depends on the order): an update's elementwise chain
(gradient * lr, param - that) writes over its own dead inputs instead of a
new buffer each."""
FOLDING = ("fold_batch_norm", "fold_params")
LOSSES = ("cross_entropy", "mse")
STEPS = 3
"""Training steps the harness runs by default."""
TOLERANCE = {"float32": 1e-4, "float64": 1e-10}
"""The harness's tolerance on |got - want| / max(1, |want|) by the graph's float
type: the C code sums in another order than numpy, and errors grow over steps."""


# -- the graphs -----------------------------------------------------------------
def training_graphs(model, loss: str | None = None, optimizer=None, params=None) -> tuple[Graph, Graph, list[str]]:
    """(the training step graph, the inference graph, the names of the trained
    params) for ``model``: a :class:`convc.Trainer` (its step graph with the
    weights and optimizer state it holds now) or an inference Graph with one
    output, to which ``loss`` ("cross_entropy": an int64 input ``labels`` of
    class indices, the default; "mse": an input ``targets`` shaped like the
    output) and ``optimizer`` (default ``SGD()``) are added exactly as
    :class:`convc.Trainer` adds them. The inference graph is the step graph
    with the model's own outputs and no assigns: the same param names."""
    from .ops.loss import cross_entropy, mse_loss
    from .train import Trainer, training_graph

    if isinstance(model, Trainer):
        if loss is not None or optimizer is not None or params is not None:
            raise ConvcError("export_c(trainer, train=True): the Trainer already has its loss, optimizer and "
                             "params; pass loss/optimizer/params only with a Graph")
        step = model.step_module.source_graph()         # the values training left
        outputs, trained = dict(model.graph.outputs), list(model.param_names)
    else:
        require_graph(model, "export_c(train=True)")
        model.verify()
        if model.assigns:
            raise ConvcError(f"graph '{model.name}' assigns params ({', '.join(model.assigns)}) already: give "
                             f"export_c(train=True) the inference graph, or a cc.Trainer built on it")
        if len(model.outputs) != 1:
            raise ConvcError(f"graph '{model.name}' has {len(model.outputs)} outputs "
                             f"({', '.join(model.outputs) or 'none'}); train=True adds the loss to one output: "
                             f"build the loss yourself and export cc.Trainer(graph, loss, optimizer)")
        loss = loss or "cross_entropy"
        (label, node), = model.outputs.items()
        t = model.node(node)["type"]
        g = model.copy()
        y = g.value(node)
        if loss == "cross_entropy":
            if len(t.shape) != 2 or t.dtype not in ("float32", "float64"):
                raise ConvcError(f"graph '{model.name}': output '{label}' (node '{node}', {g.node(node)['op']}) "
                                 f"is {t}; the cross_entropy loss needs float logits of shape (batch, classes)")
            value = cross_entropy(y, g.input("labels", (t.shape[0],), "int64"))
        elif loss == "mse":
            value = mse_loss(y, g.input("targets", t.shape, t.dtype))
        else:
            raise ConvcError(f"loss {loss!r}: expected one of {', '.join(LOSSES)}")
        step, trained = training_graph(g, value, params, optimizer)
        outputs = dict(model.outputs)
    predict = step.copy(step.name.removesuffix("_train"))
    predict.outputs, predict.assigns = outputs, {}
    return step, predict, trained


def train_pipeline(passes) -> list[str]:
    """The pass list for a training export: "embedded" (the default of
    ``export_c``) means :data:`TRAIN_PASSES`; a pipeline that folds weights
    into constants is refused."""
    from .passes import resolve

    names = list(TRAIN_PASSES) if passes == "embedded" else resolve(passes)
    folding = [n for n in names if n in FOLDING]
    if folding:
        raise ConvcError(f"pipeline {passes!r} runs {', '.join(folding)}, which bakes trained params into new "
                         f"constants (stale after a step); a training export needs a pipeline without it "
                         f"(default: {', '.join(TRAIN_PASSES)})")
    return names


# -- committing the update early -------------------------------------------------------
COMMIT = "__commit__"
"""Prefix of the output labels that stand for a param's new value (see :func:`early_commits`)."""


def _readers(g: Graph, n: str) -> set[str]:
    """Nodes that read ``n``'s memory: its successors, through reshapes that
    are second names for it (``schedule.ALIAS_OPS``)."""
    out, todo = set(), [n]
    while todo:
        for u in g.nx.successors(todo.pop()):
            if g.node(u)["op"] in ALIAS_OPS and u not in g.outputs.values():
                todo.append(u)
            else:
                out.add(u)
    return out


def early_commits(g: Graph) -> tuple[Graph, dict[str, str]]:
    """``g`` (a training step after the pipeline) rewritten so that each
    param's new value is written into the param's own memory as soon as
    nothing reads the old value any more, instead of living in the arena
    until a copy after the last node (what ``g.assign`` means in the runtime).
    Returns the graph -- no assigns; one output ``__commit__<param>`` per
    assign, which the export binds to the param's array -- and {output label:
    param}.

    The node computing the new value writes the param directly when it does
    not read the param (restrict: one object is never both input and output
    of a call) and no reader of the old value depends on it (the Adam and
    momentum state); otherwise a copy node (a reshape to the same shape) takes
    the value over after the last reader. A schedule edge puts every writer
    after every reader of the old value and after every node that checks
    input values, so a rejected batch (a label out of range) still changes
    nothing. The order (``_commit_order``) runs each update as soon as its
    gradient is ready, so gradients and new values do not pile up."""
    from .ops import get_op
    from .ops.tensor import reshape

    out = g.copy()
    out.assigns = {}
    labels: dict[str, str] = {}
    after: dict[str, set[str]] = {}                 # node -> nodes that must run before it (besides its inputs)
    checks = [n for n in g.nx if g.node(n)["op"] not in ("input", "param")
              and get_op(g.node(n)["op"]).value_ranges(g.node(n)["attrs"],
                                                      [g.node(i)["type"] for i in g.inputs_of(n)])]
    taken = [n for n in g.assigns.values()]
    for p, n in g.assigns.items():
        old = _readers(g, p)
        d = g.node(n)
        direct = (d["op"] not in ("input", "param") and taken.count(n) == 1 and n not in g.outputs.values()
                  and n not in old and not (old & nx.descendants(g.nx, n)))
        writer = n if direct else reshape(out.value(n), d["type"].shape, name=f"{p}.commit").name
        label = f"{COMMIT}{p}"
        out.outputs[label] = writer
        labels[label] = p
        after.setdefault(writer, set()).update(old - {writer}, checks)
    return _commit_order(out, after), labels


def _commit_order(g: Graph, after: dict[str, set[str]]) -> Graph:
    """``g`` with its nodes re-inserted in a schedule that keeps few bytes
    alive (``plan`` schedules in insertion order); ``after`` adds edges
    (node -> nodes that must run before it). A greedy list schedule: of the
    nodes ready to run, the one that adds the fewest bytes to the arena (its
    output, less the buffers it reads last) runs first -- so a gradient's
    update and commit follow it at once, and a big weight gradient waits
    until the small ones are done -- ties going to the node enabled most
    recently, then to the given order. A node of params alone (a weight's
    transpose, momentum * beta) runs just before its first reader."""
    order = g.topological_order()
    idx = {n: i for i, n in enumerate(order)}
    preds = {n: set(g.nx.predecessors(n)) | after.get(n, set()) for n in order}
    succs: dict[str, set[str]] = {n: set() for n in order}
    for n, ps in preds.items():
        for u in ps:
            succs[u].add(n)
    fed, code = {}, {}
    for n in order:
        op = g.node(n)["op"]
        fed[n] = op == "input" or any(fed[u] for u in preds[n])
        code[n] = op not in ("input", "param")
    final = set(g.outputs.values())
    alias = {n for n in order if g.node(n)["op"] in ALIAS_OPS and n not in final}

    def source(n):                          # the node whose buffer n reads (through reshapes)
        while n in alias:
            n = g.inputs_of(n)[0]
        return n
    readers: dict[str, set[str]] = {}       # arena buffer -> the nodes that read it (through reshapes)
    for n in order:
        if code[n] and n not in alias:
            for i in g.inputs_of(n):
                readers.setdefault(source(i), set()).add(n)
    owns = {n: code[n] and n not in alias and n not in final for n in order}   # has an arena buffer
    done: set[str] = {n for n in order if not code[n]}
    pos: dict[str, int] = {}
    sched: list[str] = []

    def pulled(n) -> list[str]:             # n and the params-only nodes it needs first, in order
        need, todo = [], [n]
        while todo:
            u = todo.pop()
            if u in done or u in need:
                continue
            need.append(u)
            todo += [v for v in preds[u] if not fed[v] and code[v]]
        return sorted(need, key=idx.__getitem__)

    def cost(nodes) -> int:
        group = set(nodes)
        add = sum(g.node(u)["type"].nbytes for u in nodes if owns[u])
        freed = sum(g.node(b)["type"].nbytes for b in {source(i) for u in nodes for i in g.inputs_of(u)}
                    if owns.get(b) and readers.get(b, set()) <= done | group)
        return add - freed

    ready = {n for n in order if code[n] and fed[n] and preds[n] <= done | {u for u in preds[n] if not fed[u]}}
    while ready:
        best = min(ready, key=lambda n: (cost(pulled(n)), -max((pos.get(u, -1) for u in preds[n]), default=-1),
                                         idx[n]))
        ready.discard(best)
        newly = pulled(best)
        for u in newly:
            done.add(u)
            pos[u] = len(sched)
            sched.append(u)
        for v in {w for u in newly for w in succs[u]}:
            if v not in done and fed[v] and all(u in done or not fed[u] for u in preds[v]):
                ready.add(v)
    rest = [n for n in order if n not in done]        # dead code and params-only nodes nothing reads
    h = nx.MultiDiGraph()
    h.graph.update(g.nx.graph)
    h.add_nodes_from((n, g.nx.nodes[n]) for n in [n for n in order if not code[n]] + sched + rest)
    h.add_edges_from(g.nx.edges(keys=True, data=True))
    out = g.copy()
    out.nx = h
    if out.topological_order() != [n for n in h.nodes]:
        raise RuntimeError(f"graph '{g.name}': the training schedule is not a topological order")
    return out


# -- rendering ------------------------------------------------------------------
@dataclass
class TrainLibrary:
    """The rendered sources of one training export and what they are made of."""
    name: str
    step: Graph                      # the step graph rendered (after the pipeline)
    predict: Graph                   # the inference graph rendered
    files: dict[str, str]
    step_plan: Plan
    predict_plan: Plan
    state: list[dict]                # the checkpoint's items in order: name, offset, nbytes, T, dtype, shape
    arena_bytes: int                 # the one arena: the larger of the two plans'
    arena_align: int
    const_bytes: int                 # params that stay const (flash)
    tensors: dict[str, dict[str, list[dict]]] = field(default_factory=dict)   # entry -> inputs/outputs

    @property
    def state_bytes(self) -> int:
        """NAME_PARAMS_BYTES: the trained params and the optimizer's state."""
        return sum(s["nbytes"] for s in self.state)

    @property
    def trained_bytes(self) -> int:
        return sum(s["nbytes"] for s in self.state if s["trained"])


def render_train(step: Graph, predict: Graph, trained: list[str], name: str = "model", passes="embedded",
                 weight_format: str = "bytes") -> TrainLibrary:
    """Render ``NAME.h`` and ``NAME.c`` for the training ``step`` graph and
    the ``predict`` graph over the same params (see the module docstring);
    ``trained``: the params the step trains (first in the checkpoint)."""
    from .export import WEIGHT_FORMATS, _check_host_memory, entry_tensors, literal_bytes, size_macro, weight_init
    from .passes import run as run_passes

    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ConvcError(f"export name {name!r} must be a C identifier (letters, digits, _)")
    if weight_format not in WEIGHT_FORMATS:
        raise ConvcError(f"weight format {weight_format!r}: expected one of {', '.join(WEIGHT_FORMATS)}")
    step.verify()
    _check_host_memory(f"rendering the training export of graph '{step.name}' on this host",
                       [(f"param '{n}' {step.node(n)['type']} as C literals", literal_bytes(step.node(n)["type"].size))
                        for n in step.param_names])
    pipeline = train_pipeline(passes)
    gs, gp = run_passes(step, pipeline), run_passes(predict, pipeline)
    for g in (gs, gp):
        for n in trained:
            if n not in g.nx:
                continue
            d = g.node(n)
            if d["op"] != "param":
                raise ConvcError(f"graph '{g.name}': trained param '{n}' is a {d['op']} after the pipeline")
    lost = [n for n in step.assigns if n not in gs.assigns]
    if lost:
        raise ConvcError(f"graph '{step.name}': the pipeline dropped the update of {', '.join(lost)}")
    order = [n for n in trained if n in gs.assigns] + [n for n in gs.assigns if n not in trained]
    gc, commits = early_commits(gs)            # the step as rendered: new values written into the params
    gc = run_passes(gc, AFTER_COMMIT)
    ps, pp = make_plan(gc), make_plan(gp)
    P = name.upper()
    entries = {e: f"{name}_{e}" for e in ("train_step", "predict", "get_params", "set_params")}
    ident = Namer(reserved=("arena", "base", "i", "dst", "src", "s", "convc_first", "convc_last", "CONVC_SIMD_SUM",
                            f"{name}_arena", *entries.values()))
    fixed = [f"{P}_{s}" for s in ("H", "ARENA_BYTES", "ARENA_ALIGN", "PARAMS_BYTES", "TRAINED_BYTES", "CONST_BYTES",
                                  "NO_STATIC_ARENA", "TEST_TOLERANCE")]
    macros = Namer(reserved=fixed, mangle=False)
    sizes: dict[str, tuple] = {}

    def macro(label, t):                # one NAME_<LABEL>_SIZE per tensor name (x: both entries')
        if label not in sizes or sizes[label][1] != t.size:
            sizes[label] = (macros(size_macro(P, label)), t.size)
        return sizes[label][0]

    # entry arguments: each entry has its own scope, but no argument may hide a file-scope name
    vs, vp, outs_s, outs_p = {}, {}, {}, {}
    taken = set(ident.used)
    tensors = {"train_step": entry_tensors(gc, [n for n in gc.input_names if n in ps.storage],
                                           {o: n for o, n in gc.outputs.items() if o not in commits},
                                           ident, macro, vs, outs_s)}
    own = Namer(reserved=taken)
    tensors["predict"] = entry_tensors(gp, [n for n in gp.input_names if n in pp.storage], gp.outputs, own, macro,
                                       vp, outs_p)
    ident.used |= own.used

    # params: the state (trained params, optimizer state) in RAM, the rest const; one symbol per name
    symbols: dict[str, dict] = {}
    params, state, offset = [], [], 0
    for g, plan, var in ((gc, ps, vs), (gp, pp, vp)):
        for n in plan.params:
            d = g.node(n)
            t, value = d["type"], np.asarray(d["value"])
            known = symbols.get(n)
            if known is None or known["type"] != t or not np.array_equal(known["value"], value, equal_nan=True):
                ram = n in gs.assigns
                sym = ident(n, f"{name}_s_" if ram else f"{name}_p_")
                zero = ram and not np.ascontiguousarray(value).view(np.uint8).any()
                init = dict(word="", string=False, length_bytes=0, lines=[]) if zero else \
                    weight_init(value, weight_format)
                known = dict(type=t, value=value, var=f"{sym}.v" if init["word"] else sym)
                symbols[n] = known
                params.append(dict(T=CTYPES[t.dtype], var=sym, length=max(t.size, 1), note=f"{n} {t}", ram=ram,
                                   zero=zero, nbytes=t.nbytes, **init))
            var[n] = known["var"]
    for n in order:
        t = gs.node(n)["type"]
        state.append(dict(name=n, var=symbols[n]["var"], offset=offset, nbytes=t.nbytes, T=CTYPES[t.dtype],
                          dtype=t.dtype, shape=str(t.shape), size=t.size, trained=n in trained))
        offset += t.nbytes
    outs_s.update({label: symbols[p]["var"] for label, p in commits.items()})

    # node functions of both graphs, identical ones shared; calls in each entry's schedule
    arena_s = bind_buffers(gc, ps, ident, vs, outs_s)
    arena_p = bind_buffers(gp, pp, ident, vp, outs_p)
    fs, cs = node_functions(gc, ps, ident, vs, parallel=True)
    fp, cp = node_functions(gp, pp, ident, vp, parallel=True)
    functions, calls = share_identical(fs + fp, cs + cp)
    calls_s, calls_p = calls[:len(cs)], calls[len(cs):]
    writes = {gc.outputs[label]: p for label, p in commits.items()}
    for c in calls_s:
        c["commit"] = writes.get(c["node"])       # the call writes this param's new value
    copies_s, copies_p = output_copies(gc, vs, outs_s), output_copies(gp, vp, outs_p)
    arena_bytes = max(ps.arena_bytes, pp.arena_bytes)
    dtypes = [g.node(n)["type"].dtype for g, p in ((gc, ps), (gp, pp)) for n in p.order]
    arena_align = max((np.dtype(d).itemsize for d in dtypes), default=1)
    const_bytes = sum(p["nbytes"] for p in params if not p["ram"])
    sig = {e: [t["private"] for t in v["inputs"] + v["outputs"]] for e, v in tensors.items()}
    pub = {e: [t["public"] for t in v["inputs"] + v["outputs"]] for e, v in tensors.items()}
    ptrs = {e: [t["var"] for t in v["inputs"] + v["outputs"]] for e, v in tensors.items()}
    everything = [t for v in tensors.values() for ts in v.values() for t in ts]
    ctx = dict(version=__version__, graph=step.name, hash=gs.structure_hash(), name=name, P=P, guard=f"{P}_H",
               tensors=tensors, sig=sig, pub=pub, ptrs=ptrs, params=params, state=state,
               functions=[f for _, f in functions], calls_s=calls_s, calls_p=calls_p, copies_s=copies_s,
               copies_p=copies_p, arena_s=arena_s, arena_p=arena_p,
               arena_bytes=arena_bytes, arena_align=arena_align, step_arena=ps.arena_bytes,
               predict_arena=pp.arena_bytes, const_bytes=const_bytes,
               state_bytes=offset, trained_bytes=sum(s["nbytes"] for s in state if s["trained"]),
               optimizer_bytes=sum(s["nbytes"] for s in state if not s["trained"]),
               sizes=sorted(sizes.values(), key=lambda m: m[0]),
               needs_stdint=any(t["dtype"] in INT_DTYPES for t in everything))
    env = environment()
    files = {f"{name}.h": env.get_template("c/export_train.h.j2").render(ctx),
             f"{name}.c": env.get_template("c/export_train.c.j2").render(ctx)}
    return TrainLibrary(name, gc, gp, files, ps, pp, state, arena_bytes, arena_align, const_bytes, tensors)


# -- the harness ------------------------------------------------------------------
def train_batches(step: Graph, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``count`` feeds for the step graph: :func:`convc.export.random_inputs`,
    with every input a node checks (class labels) drawn uniformly over its
    valid range instead of zeros, so the steps see every class."""
    from .export import random_inputs
    from .ops import get_op

    feeds = random_inputs(step, count, seed)
    rng = np.random.default_rng(seed + 1)
    ranges = {}
    for n in step.topological_order():
        d = step.node(n)
        if d["op"] in ("input", "param"):
            continue
        ins = step.inputs_of(n)
        for j, (lo, hi) in get_op(d["op"]).value_ranges(d["attrs"], [step.node(i)["type"] for i in ins]).items():
            if step.node(ins[j])["op"] == "input":
                ranges.setdefault(ins[j], (lo, hi))
    for f in feeds:
        for n, (lo, hi) in ranges.items():
            f[n] = rng.integers(lo, hi, step.node(n)["type"].shape).astype(step.node(n)["type"].dtype)
    return feeds


def reference_steps(step: Graph, predict: Graph, state: list[str], feeds: list[dict]) -> dict:
    """What the reference interpreter computes for the harness: the step
    graph's outputs on each feed in turn (assigns applied after each), the
    state after them, and the predict graph's outputs on the first feed
    before and after the steps."""
    from .reference import evaluate, run_step

    params = {n: np.array(step.node(n)["value"]) for n in state}
    pin = [n for n in predict.input_names if n in feeds[0]]

    def pred():
        return evaluate(predict, {n: feeds[0][n] for n in pin}, {k: v for k, v in params.items() if k in predict.nx})
    before = pred()
    outputs = [run_step(step, f, params) for f in feeds]
    return dict(outputs=outputs, state=params, predict=[before, pred()])


def render_train_harness(step: Graph, predict: Graph, lib: TrainLibrary, steps: int = STEPS, seed: int = 0,
                         feeds=None) -> str:
    """``NAME_test.c`` for a training export: ``steps`` batches
    (:func:`train_batches`, or ``feeds``) and what the reference computed for
    them (:func:`reference_steps`, from the graphs as given: the oracle checks
    the passes too). Plain C99 with stdio and malloc only: it also runs on a
    board (no files, no host calls but printf)."""
    from .export import _check_host_memory, c_literals, literal_bytes
    from .ops import get_op
    from .runtime.module import NumpyModule

    io = sum(step.node(n)["type"].size for n in step.input_names) + sum(s["size"] for s in lib.state)
    _check_host_memory(f"the training harness of graph '{step.name}' (export with harness=False to skip it)",
                       [("the batches and the state after them as C literals", (steps + 1) * literal_bytes(io)),
                        ("the reference interpreter's results", make_plan(step).intermediate_bytes)])
    if feeds is None:
        feeds = train_batches(step, steps, seed)
    if not feeds:
        raise ConvcError("the training harness needs at least one batch")
    check = NumpyModule(step)
    feeds = [check.check_inputs(f) for f in feeds]
    ref = reference_steps(step, predict, [s["name"] for s in lib.state], feeds)
    names = Namer(reserved=("main", "state", "moved", "worst", "failures", "v", "s", "i", "rc", "e", "err", "error",
                            "check", "check_state", "predict_check", "STEPS", "bad", "side"))
    rows = {}
    for entry, role, values in (("train_step", "inputs", feeds), ("train_step", "outputs", ref["outputs"]),
                                ("predict", "outputs", ref["predict"])):
        rows[(entry, role)] = [dict(t, var=names(t["var"], "", "v_"),
                                    data=names(t["var"], "test_" if role == "inputs" else f"want_{entry}_"),
                                    exact=t["dtype"] in INT_DTYPES,
                                    vectors=[c_literals(np.asarray(v[t["label"]])) for v in values])
                               for t in lib.tensors[entry][role]]
    train_in = {t["label"]: t for t in rows[("train_step", "inputs")]}
    pred_in = []
    for t in lib.tensors["predict"]["inputs"]:
        if t["label"] not in train_in:
            raise ConvcError(f"predict reads input '{t['label']}', which the training step does not")
        pred_in.append(dict(t, var=train_in[t["label"]]["var"], data=train_in[t["label"]]["data"]))
    state = [dict(s, data=names(s["name"], "want_state_"), lines=c_literals(ref["state"][s["name"]]))
             for s in lib.state]
    rejects = []
    for k, n in enumerate(lib.step_plan.order):
        d = lib.step.node(n)
        ins = lib.step.inputs_of(n)
        for j, (lo, hi) in get_op(d["op"]).value_ranges(d["attrs"], [lib.step.node(i)["type"] for i in ins]).items():
            src = lib.step_plan.aliases.get(ins[j], ins[j])
            t = train_in.get(src)
            if t is not None and all(r["var"] != t["var"] for r in rejects):
                rejects.append(dict(t, lo=lo, hi=hi, status=k + 1, node=n))
    dtypes = {s["dtype"] for s in lib.state if s["trained"]}
    tolerance = max(TOLERANCE.get(d, TOLERANCE["float32"]) for d in dtypes) if dtypes else TOLERANCE["float32"]
    ctx = dict(version=__version__, graph=step.name, hash=step.structure_hash(), name=lib.name,
               P=lib.name.upper(), steps=len(feeds), train_in=rows[("train_step", "inputs")],
               train_out=rows[("train_step", "outputs")], pred_in=pred_in, pred_out=rows[("predict", "outputs")],
               state=state, rejects=rejects, tolerance=f"{tolerance:g}", arena_bytes=lib.arena_bytes)
    return environment().get_template("c/export_train_test.c.j2").render(ctx)


# -- export_c(train=True) -------------------------------------------------------------
@dataclass
class TrainExport:
    """What ``export_c(..., train=True)`` wrote."""
    name: str
    dir: Path
    files: list[Path]
    passes: list[str]
    library: TrainLibrary
    step: Graph                  # the step graph as given (before the pipeline): the oracle
    predict: Graph

    @property
    def arena_bytes(self) -> int:
        return self.library.arena_bytes

    @property
    def params_bytes(self) -> int:
        return self.library.state_bytes

    def __str__(self):
        lib = self.library
        return (f"wrote {', '.join(str(f) for f in self.files)}\n"
                f"training RAM {lib.state_bytes + lib.arena_bytes:,} bytes = params {lib.trained_bytes:,} + "
                f"optimizer state {lib.state_bytes - lib.trained_bytes:,} + arena {lib.arena_bytes:,} "
                f"(train step {lib.step_plan.arena_bytes:,}, predict {lib.predict_plan.arena_bytes:,}); "
                f"const params {lib.const_bytes:,} bytes")


def export_train(model, out_dir, name: str = "model", passes="embedded", harness: bool = True, steps: int = STEPS,
                 seed: int = 0, feeds=None, loss: str | None = None, optimizer=None, params=None,
                 weight_format: str = "bytes") -> TrainExport:
    """Write the training export of ``model`` (a :class:`convc.Trainer`, or
    an inference Graph to which :func:`training_graphs` adds ``loss`` and
    ``optimizer``) into ``out_dir``: ``NAME.h``, ``NAME.c`` and, with
    ``harness``, ``NAME_test.c`` running ``steps`` reference-checked steps
    (or ``feeds``: a list of {input name: array})."""
    from .export import write_files

    step, predict, trained = training_graphs(model, loss, optimizer, params)
    lib = render_train(step, predict, trained, name, passes, weight_format)
    files = dict(lib.files)
    if harness:
        files[f"{name}_test.c"] = render_train_harness(step, predict, lib, steps, seed, feeds)
    out, paths = write_files(out_dir, files)
    return TrainExport(name, out, paths, train_pipeline(passes), lib, step, predict)


# -- flash and RAM ----------------------------------------------------------------------
@dataclass
class TrainSizeReport:
    """Flash and RAM of the training library beside those of the inference
    export of the same graph (``convc export MODEL --train --size``)."""
    name: str
    toolchain: str
    inference: object            # export.SizeReport of the inference export (weights const, in flash)
    code: int                    # .text of NAME.c
    const: int                   # .rodata: params training does not change, the kernels' tables
    initial: int                 # .data: the initial values of the params and state (flash and RAM)
    static_ram: int              # .data + .bss: params, optimizer state, the arena
    state: int                   # NAME_PARAMS_BYTES
    trained: int                 # NAME_TRAINED_BYTES
    arena: int                   # NAME_ARENA_BYTES
    step_arena: int              # what the train step alone needs
    stack: int                   # the deeper entry point's frame and what is left out of line

    @property
    def flash(self) -> int:
        return self.code + self.const + self.initial

    @property
    def ram(self) -> int:
        return self.static_ram + self.stack

    def table(self) -> str:
        inf = self.inference
        rows = [("", "inference", "training"),
                ("code", inf.code, self.code),
                ("const data", inf.const, self.const),
                ("initial values (.data)", 0, self.initial),
                ("flash", inf.flash, self.flash),
                ("params (RAM)", 0, self.trained),
                ("optimizer state", 0, self.state - self.trained),
                ("arena", inf.arena, self.arena),
                ("stack (estimate)", inf.stack, self.stack),
                ("RAM", inf.ram, self.ram)]
        cells = [tuple(v if isinstance(v, str) else f"{v:,}" for v in r) for r in rows]
        widths = [max(len(r[i]) for r in cells) for i in range(3)]
        lines = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
                 for r in cells]
        lines.insert(1, "-" * len(lines[0]))
        lines += [f"training RAM: {self.ram:,} bytes = params {self.trained:,} + optimizer state "
                  f"{self.state - self.trained:,} + arena {self.arena:,} (the train step needs {self.step_arena:,}) "
                  f"+ stack {self.stack:,}; static {self.static_ram:,} (.data + .bss)",
                  f"inference RAM: {inf.ram:,} bytes (arena {inf.arena:,} + stack {inf.stack:,}); weights in flash",
                  f"toolchain: {self.toolchain}, -Os"]
        return "\n".join(lines)

    __str__ = table


def train_size_report(model, name: str = "model", tools=None, passes="embedded", loss: str | None = None,
                      optimizer=None, params=None) -> TrainSizeReport:
    """Compile the training library of ``model`` (``-std=c99 -Os``, with
    ``arm-none-eabi-gcc`` for a Cortex-M4F when installed) and measure it:
    code = .text, const = .rodata, initial values = .data (flash, copied to
    RAM at start-up), static RAM = .data + .bss; the stack estimate is the
    deeper entry point's frame plus the largest frame left out of line
    (``-fstack-usage``). Beside it, :func:`convc.export.size_report` of the
    inference export of the same graph."""
    from .export import _measure, size_report, toolchain
    from .train import Trainer

    tools = tools or toolchain()
    step, predict, trained = training_graphs(model, loss, optimizer, params)
    lib = render_train(step, predict, trained, name, passes)
    with tempfile.TemporaryDirectory(prefix="convc-train-size-") as tmp:
        for fname, text in lib.files.items():
            Path(tmp, fname).write_text(text)
        obj = _measure(tools, tmp, name, name, ["-std=c99", "-Os"])
    static = obj.total(".bss", ".data")
    if static < lib.state_bytes + lib.arena_bytes:
        raise CompileError(f"{name}.o: {static} bytes of .data + .bss, less than the params, state and arena "
                           f"({lib.state_bytes} + {lib.arena_bytes})")
    entries = (f"{name}_train_step", f"{name}_predict")
    callees = [v for k, v in obj.stack.items() if k not in entries]
    stack = max(obj.stack.get(f, 0) for f in entries) + max(callees, default=0)
    inference = size_report(model.graph if isinstance(model, Trainer) else model, name, tools)
    return TrainSizeReport(name, tools.label, inference, obj.total(".text"), obj.total(".rodata"),
                           obj.total(".data"), static, lib.state_bytes, lib.trained_bytes, lib.arena_bytes,
                           lib.step_plan.arena_bytes, stack)


# -- command line ------------------------------------------------------------------------
def cmd_export_train(args) -> int:
    """``convc export MODEL --train ...``: write the training library
    (``-o DIR``) and/or report its sizes (``--size``)."""
    from . import models
    from .loading import load_model
    from .train import SGD, Adam

    if args.int8 or args.weights_file or args.calibration is not None:
        raise ConvcError("convc export --train: --int8, --weights-file and --calibration are for inference exports")
    if args.batch is None:
        g = load_model(args.model)
    elif getattr(getattr(models, args.model, None), "__module__", "") == models.__name__:   # a bundled builder
        g = getattr(models, args.model)(batch=args.batch)
    else:
        raise ConvcError(f"convc export --batch {args.batch}: --batch rebuilds a bundled model "
                         f"(lenet5, mobilenet_tiny); build {args.model} with the batch you want")
    if args.optimizer == "adam":
        if args.momentum is not None:
            raise ConvcError("convc export --train: --momentum is for --optimizer sgd (Adam has beta1)")
        opt = Adam() if args.lr is None else Adam(lr=args.lr)
    else:
        opt = SGD(lr=0.01 if args.lr is None else args.lr, momentum=args.momentum or 0.0)
    if args.out is not None:
        exp = export_train(g, args.out, name=args.name, passes=args.pipeline, loss=args.loss, optimizer=opt,
                           weight_format=args.weight_format)
        print(exp)
        print(f"check it: cc -std=c99 -O2 {args.out}/{args.name}_test.c {args.out}/{args.name}.c -lm && ./a.out")
    if args.size:
        print(train_size_report(g, name=args.name, passes=args.pipeline, loss=args.loss, optimizer=opt).table())
    if args.board or args.run_qemu:                 # as for inference: board files, the run under QEMU
        from .qemu import cmd_board

        args.board = args.board or "mps2-an386"
        cmd_board(args)
    return 0

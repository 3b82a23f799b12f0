"""C code generation: one static function per op node, named after the node,
rendered from ``templates/c/<op>.c.j2``, plus one exported entry point that
calls them in schedule order on buffers from the planned arena."""
from __future__ import annotations

import re
from dataclasses import dataclass

from .. import __version__
from ..ir import Graph, TensorType
from ..ops import get_op
from ..ops.epilogue import Epilogue
from ..schedule import Plan, plan as make_plan
from .env import CL_TYPES, CTYPES, Namer, environment


@dataclass
class CSource:
    text: str                                   # the C source: every file, the entry point's first
    entry: str                                  # exported function name
    signature: str                              # its prototype (also the cffi cdef)
    inputs: list[tuple[str, TensorType]]        # in argument order
    outputs: list[tuple[str, TensorType]]
    plan: Plan
    profile_signature: str | None = None        # set when built with per-node timers
    files: dict[str, str] | None = None         # several translation units: file name -> text (entry first)

    @property
    def units(self) -> dict[str, str]:
        """The translation units to compile into one library: file name ->
        text, ``module.c`` (the entry point) first."""
        return self.files or {"module.c": self.text}


def describe(g: Graph, n: str) -> str:
    d = g.node(n)
    args = ", ".join(g.inputs_of(n))
    attrs = " ".join(f"{k}={v}" for k, v in d["attrs"].items())
    return f"{n}: {d['op']}({args}) {attrs} -> {d['type']}".replace("*/", "* /")


def generate(g: Graph, plan: Plan | None = None, profile: bool = False, parts: int | None = None) -> CSource:
    """Render ``g`` as C: one static function per node, one exported entry
    point. ``profile`` adds a timer around every node call and an exported
    ``<graph>_profile()`` returning the accumulated seconds per node (in
    schedule order).

    Nodes whose functions are identical but for their names share one
    function. A big module is split into several translation units that the
    build compiles in parallel (``runtime/build.py``): ``module.c`` with the
    entry point, and ``module_part<k>.c`` files holding the node functions,
    spread by size. ``parts``: how many function files at most (default
    :func:`unit_count`: one per core, each at least :data:`SPLIT_BYTES` of
    C); 1 keeps one translation unit."""
    g.verify()
    plan = plan or make_plan(g)
    name = Namer(reserved=("params", "arena"))
    entry = name(f"{g.name}_run")
    var: dict[str, str] = {}
    ctype = lambda n: CTYPES[g.node(n)["type"].dtype]  # noqa: E731

    inputs = [(n, g.node(n)["type"]) for n in g.input_names if n in plan.storage]   # the ones outputs need
    outputs = [(o, g.node(n)["type"]) for o, n in g.outputs.items()]
    entry_args = []
    for n, t in inputs:
        var[n] = name(n, "in_")
        entry_args.append(f"const {CTYPES[t.dtype]} *restrict {var[n]}")
    out_var = {}
    for o, t in outputs:
        out_var[o] = name(o, "out_")
        entry_args.append(f"{CTYPES[t.dtype]} *restrict {out_var[o]}")
    state = "unsigned char" if g.assigns else "const unsigned char"     # training writes its params
    entry_args += [f"{state} *restrict params", "unsigned char *restrict arena"]
    signature = f"int {entry}({', '.join(entry_args)})"

    param_ptrs = []
    for n, off in plan.params.items():
        var[n] = name(n, "p_")          # prefixed: a param may be called memcpy or NULL
        param_ptrs.append(dict(T=ctype(n), var=var[n], offset=off, note=f"{n} {g.node(n)['type']}",
                               const="" if n in g.assigns else "const "))
    arena_ptrs = bind_buffers(g, plan, name, var, out_var)
    functions, calls = share_identical(*node_functions(g, plan, name, var, parallel=True))
    copies = output_copies(g, var, out_var)
    for p, n in g.assigns.items():      # after every node has run: no reader sees a new value early
        copies.append(dict(dst=var[p], src=var[n], size=g.node(n)["type"].size, what=f"assign {p}"))

    env, hash_ = environment(), g.structure_hash()
    groups = split_units(functions, unit_count(functions) if parts is None else parts)
    externs = [] if len(groups) == 1 else [prototype(fn, f) for fn, f in functions]
    text = env.get_template("c/module.c.j2").render(
        version=__version__, graph=g.name, hash=hash_, signature=signature,
        functions=[f for _, f in functions] if len(groups) == 1 else [], externs=externs, parts=len(groups),
        param_ptrs=param_ptrs, arena_ptrs=arena_ptrs, calls=calls, copies=copies,
        arena_bytes=plan.arena_bytes, params_bytes=plan.params_bytes, state=bool(g.assigns),
        inputs=[(var[n], t) for n, t in inputs], outputs=[(out_var[o], t) for o, t in outputs],
        profile=profile, profile_fn=f"{entry[:-4]}_profile")
    files = None
    if len(groups) > 1:
        files = {"module.c": text}
        for k, group in enumerate(groups, 1):
            files[f"module_part{k}.c"] = env.get_template("c/module_part.c.j2").render(
                version=__version__, graph=g.name, hash=hash_, part=k, parts=len(groups),
                functions=[external(fn, f) for fn, f in group])
        text = "\n".join(f"/* ===== {fname} ===== */\n{t}" for fname, t in files.items())
    return CSource(text, entry, signature, inputs, outputs, plan,
                   f"double *{entry[:-4]}_profile(void)" if profile else None, files)


# -- sharing identical functions, splitting into translation units ----------
_COMMENT = re.compile(r"/\*.*?\*/", re.S)


def _head(function: str, fn: str):
    """The definition line of node function ``fn`` in its text: groups
    (return type, name, parameters)."""
    m = re.search(rf"^static (void|int) ({fn})\(([^)]*)\)\n\{{", function, re.M)
    if m is None:
        raise RuntimeError(f"node function {fn} has no 'static void|int {fn}(...)' line: {function[:200]!r}")
    return m


def share_identical(functions: list[str], calls: list[dict]) -> tuple[list[tuple[str, str]], list[dict]]:
    """Nodes whose functions are the same code (the same text but for the
    function's name and comments: e.g. the equal 3x3 convolutions of a
    DenseNet block) call one function, the first one's; the C compiler then
    compiles it once. A shared function says which nodes call it, and each
    such call names its node in a comment. Returns
    the (name, text) of each function kept, and ``calls`` updated."""
    first: dict[str, int] = {}
    users: dict[int, list[str]] = {}
    kept: list[tuple[str, str]] = []
    for f, c in zip(functions, calls):
        fn = c["fn"]
        key = _COMMENT.sub("", f).replace(fn, "@fn@")
        if key in first:
            k = first[key]
            users[k].append(c["node"])
            c["fn"] = kept[k][0]
            c["shared"] = True          # the call says whose it is: /* node <name> */
            continue
        first[key] = len(kept)
        users[len(kept)] = [c["node"]]
        kept.append((fn, f))
    for k, nodes in users.items():
        if len(nodes) > 1:
            fn, f = kept[k]
            at = _head(f, fn).start()
            names = ", ".join(n.replace("*/", "* /") for n in nodes[1:])
            kept[k] = fn, f"{f[:at]}/* Also called for {len(nodes) - 1} other node(s) with the same code: {names}. */\n{f[at:]}"
    return kept, calls


SPLIT_BYTES = 1 << 16
"""Generated C per translation unit below which a module is not split: a
unit of its own costs a compiler process and a parse of the prelude (tens of
milliseconds), which a much smaller share of the functions would not win
back. The number of units is also bounded by the cores (``unit_count``)."""


def unit_count(functions: list[tuple[str, str]]) -> int:
    """How many files of node functions to compile in parallel: one per core
    of this host, but no more than there are :data:`SPLIT_BYTES` of C."""
    from ..host import probe

    size = sum(len(f) for _, f in functions)
    return max(1, min(probe().cores, size // SPLIT_BYTES))


def split_units(functions: list[tuple[str, str]], parts: int) -> list[list[tuple[str, str]]]:
    """Spread ``functions`` over at most ``parts`` groups of about the same
    size (the largest function first into the smallest group), each keeping
    schedule order; one group when ``parts`` <= 1."""
    parts = max(1, min(parts, len(functions)))
    if parts == 1:
        return [functions]
    load = [0] * parts
    where: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(functions)), key=lambda i: (-len(functions[i][1]), i)):
        k = min(range(parts), key=lambda k: (load[k], k))
        load[k] += len(functions[i][1])
        where[k].append(i)
    return [[functions[i] for i in sorted(idx)] for idx in where if idx]


def prototype(fn: str, function: str) -> str:
    """The declaration of node function ``fn`` (defined by ``function``), as
    ``module.c`` sees it when it is defined in another translation unit."""
    m = _head(function, fn)
    return f"CONVC_NODE {m.group(1)} {m.group(2)}({m.group(3)});"


def external(fn: str, function: str) -> str:
    """Node function ``fn`` as another translation unit calls it: not
    ``static``, but hidden (not exported from the shared library)."""
    m = _head(function, fn)
    return function[:m.start()] + "CONVC_NODE" + function[m.start() + len("static"):]


# -- pieces shared with the embedded export (convc/export.py) ----------------
def bind_buffers(g: Graph, plan: Plan, name: Namer, var: dict[str, str], out_var: dict[str, str]) -> list[dict]:
    """Name the buffer of every scheduled node in ``var``: a graph output
    writes straight into its caller buffer (``out_var``), anything else gets a
    pointer into the arena; returns those arena pointers (type, name, offset).
    A concat that emits no code (``plan.joins``) names its buffer too, and a
    node written into its slice of one (``plan.views``) points into it."""
    import numpy as np

    arena_ptrs = []
    for n in plan.order + plan.joins:
        kind, where = plan.storage[n]
        t = g.node(n)["type"]
        if kind == "output":                # a view starts its offset into the caller's array
            at = plan.views[n][1] // np.dtype(t.dtype).itemsize if n in plan.views else 0
            var[n] = f"({out_var[where]} + {at})" if at else out_var[where]
        else:
            var[n] = name(n, "t_")
            note = f"{n} {t}" + (f", over {plan.inplace[n]} (in place)" if n in plan.inplace else
                                 f", in {plan.views[n][0]} at +{plan.views[n][1]}" if n in plan.views else "")
            arena_ptrs.append(dict(T=CTYPES[t.dtype], var=var[n], offset=where, note=note))
        if n in plan.workspace:
            var[f"{n} workspace"] = name(n, "ws_")
            arena_ptrs.append(dict(T=CTYPES[g.node(n)["type"].dtype], var=var[f"{n} workspace"],
                                   offset=plan.workspace[n], note=f"scratch of {n}"))
    for a, src in plan.aliases.items():     # a reshape reads its input's buffer under the same pointer
        var[a] = var[src]
    return arena_ptrs


PARALLEL_WORK = 1 << 17
"""A node is split over OpenMP threads when it performs at least this many
multiply-accumulates (or writes this many elements): below that, starting
the threads costs more than it saves."""


def node_functions(g: Graph, plan: Plan, name: Namer, var: dict[str, str] | None, target: str = "c",
                   parallel: bool = False) -> tuple[list[str], list[dict]]:
    """One static function per scheduled node, rendered from
    ``templates/c/<op>.c.j2``, and the call of each in schedule order on the
    buffers named in ``var`` (every input, param and scheduled node; None
    leaves the calls' ``args`` out, for a caller that binds buffers itself).

    ``target`` "opencl" renders the same templates as OpenCL C (``__global``
    pointers, one work-item per iteration of the op's parallel loop nest);
    each call then carries ``launch``, the node's NDRange. ``parallel`` lets
    big nodes use OpenMP on the C target."""
    env = environment()
    G = "__global " if target == "opencl" else ""
    types_of = CL_TYPES if target == "opencl" else CTYPES
    functions, calls = [], []
    for n in plan.order:
        d = g.node(n)
        op = get_op(d["op"])
        ins = g.inputs_of(n)
        types = [g.node(i)["type"] for i in ins]
        arg_names = op.arg_names(len(ins), d["attrs"])
        T = types_of[d["type"].dtype]
        # a node written over its input (plan.inplace) shares that buffer: no restrict on either
        shared = {k for k, i in enumerate(ins) if plan.aliases.get(i, i) == plan.inplace.get(n)}
        params = [f"{G}const {types_of[t.dtype]} *{'' if k in shared else 'restrict '}{a}"
                  for k, (a, t) in enumerate(zip(arg_names, types))]
        params.append(f"{G}{T} *{'' if shared else 'restrict '}y")
        if n in plan.workspace:
            params.append(f"{G}{T} *restrict ws")
        fn = name(n, "node_")
        work = max(op.macs(d["attrs"], types, d["type"]), d["type"].size)
        ctx = dict(op.context(d["attrs"], types, d["type"]))
        par = ctx.setdefault("par", [])          # the op's parallel loop nest: the OpenCL NDRange
        if any(not isinstance(e, int) for _, _, e in par):
            raise RuntimeError(f"context of op {d['op']!r}: par extents must be ints, got {par}")
        ctx.update(fn=fn, sig=", ".join(params), T=T,
                   TI=types_of[types[0].dtype] if types else "float",
                   TS=[types_of[t.dtype] for t in types],       # the C type of every input, in order
                   comment=describe(g, n), in_types=types, out=d["type"], ep=Epilogue.of(d["attrs"], T),
                   target=target, G=G, parallel=parallel and work >= PARALLEL_WORK)
        functions.append(env.get_template(f"c/{op.template_of(d['attrs'], types)}.c.j2").render(ctx))
        args = None if var is None else \
            [var[i] for i in ins] + [var[n]] + ([var[f"{n} workspace"]] if n in plan.workspace else [])
        # an op that checks input values (labels in range, ...): its function returns nonzero on bad
        # input and the caller returns `check`, the node's status (see module_status)
        check = len(calls) + 1 if op.value_ranges(d["attrs"], types) else None
        calls.append(dict(fn=fn, node=n, args=args, launch=[e for _, _, e in par],
                          ws=plan.workspace.get(n), T=T, check=check))
    return functions, calls


def module_status(plan: Plan, rc: int) -> str | None:
    """The node a positive status of an entry point names: rc = 1 + its
    position in the schedule (it found invalid input values and the entry
    point returned before any later node ran or any param was assigned)."""
    return plan.order[rc - 1] if 0 < rc <= len(plan.order) else None


def output_copies(g: Graph, var: dict[str, str], out_var: dict[str, str]) -> list[dict]:
    """Outputs no node wrote in place (an input or param returned as is, or a
    node returned under two names) are copied after the last node."""
    return [dict(dst=out_var[o], src=var[n], size=g.node(n)["type"].size, what=f"output {o}")
            for o, n in g.outputs.items() if var.get(n) != out_var[o]]

"""C code generation: one static function per op node, named after the node,
rendered from ``templates/c/<op>.c.j2``, plus one exported entry point that
calls them in schedule order on buffers from the planned arena."""
from __future__ import annotations

from dataclasses import dataclass

from .. import __version__
from ..ir import Graph, TensorType
from ..ops import get_op
from ..ops.epilogue import Epilogue
from ..schedule import Plan, plan as make_plan
from .env import CL_TYPES, CTYPES, Namer, environment


@dataclass
class CSource:
    text: str                                   # the C translation unit
    entry: str                                  # exported function name
    signature: str                              # its prototype (also the cffi cdef)
    inputs: list[tuple[str, TensorType]]        # in argument order
    outputs: list[tuple[str, TensorType]]
    plan: Plan
    profile_signature: str | None = None        # set when built with per-node timers


def describe(g: Graph, n: str) -> str:
    d = g.node(n)
    args = ", ".join(g.inputs_of(n))
    attrs = " ".join(f"{k}={v}" for k, v in d["attrs"].items())
    return f"{n}: {d['op']}({args}) {attrs} -> {d['type']}".replace("*/", "* /")


def generate(g: Graph, plan: Plan | None = None, profile: bool = False) -> CSource:
    """Render ``g`` as one C translation unit. ``profile`` adds a timer around
    every node call and an exported ``<graph>_profile()`` returning the
    accumulated seconds per node (in schedule order)."""
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
    functions, calls = node_functions(g, plan, name, var, parallel=True)
    copies = output_copies(g, var, out_var)
    for p, n in g.assigns.items():      # after every node has run: no reader sees a new value early
        copies.append(dict(dst=var[p], src=var[n], size=g.node(n)["type"].size, what=f"assign {p}"))

    text = environment().get_template("c/module.c.j2").render(
        version=__version__, graph=g.name, hash=g.structure_hash(), signature=signature,
        functions=functions, param_ptrs=param_ptrs, arena_ptrs=arena_ptrs, calls=calls, copies=copies,
        arena_bytes=plan.arena_bytes, params_bytes=plan.params_bytes, state=bool(g.assigns),
        inputs=[(var[n], t) for n, t in inputs], outputs=[(out_var[o], t) for o, t in outputs],
        profile=profile, profile_fn=f"{entry[:-4]}_profile")
    return CSource(text, entry, signature, inputs, outputs, plan,
                   f"double *{entry[:-4]}_profile(void)" if profile else None)


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
            note = f"{n} {t}" + (f", in {plan.views[n][0]} at +{plan.views[n][1]}" if n in plan.views else "")
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
        params = [f"{G}const {types_of[t.dtype]} *restrict {a}" for a, t in zip(arg_names, types)]
        params.append(f"{G}{T} *restrict y")
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

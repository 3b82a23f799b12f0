"""OpenCL code generation: the node functions of the C target rendered as
OpenCL C (``templates/c/*`` with ``target="opencl"``), one ``__kernel`` per
node, and a generated C host program (``templates/opencl/host.c.j2``) that
owns the device, its buffers and the launches. The host is plain C compiled
through the same cache as the C target, so the file that runs under Python
is also the one a device without Python would ship."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import __version__
from ..ir import Graph, TensorType
from ..ops import get_op
from ..schedule import Plan, plan as make_plan
from .c import node_functions
from .env import CL_TYPES, CTYPES, Namer, environment


@dataclass
class OpenCLSource:
    host: str                                   # C host program (embeds the kernels)
    kernels: str                                # OpenCL C translation unit
    prefix: str                                 # host API prefix: <prefix>_init, _run, ...
    entry: str
    signature: str
    inputs: list[tuple[str, TensorType]]
    outputs: list[tuple[str, TensorType]]
    plan: Plan
    fp64: bool
    kernel_file: bool = False                   # init reads the kernels from a path instead of embedding them
    arg_names: tuple[str, ...] = ()             # the C names of the run's arguments: inputs, then outputs
    input_checks: tuple[dict, ...] = ()         # value_checks of graph inputs: the run returns `status` if out of range

    def declarations(self) -> dict[str, str]:
        """The host API's C declarations, by function: init, run,
        read_params, write_params, error, device, release."""
        p = self.prefix
        path = ", const char *kernels_path" if self.kernel_file else ""
        return dict(init=f"int {p}_init(const unsigned char *params{path});",
                    run=self.signature.replace("restrict ", "") + ";",
                    read_params=f"int {p}_read_params(unsigned char *dst);",
                    write_params=f"int {p}_write_params(const unsigned char *src);",
                    error=f"const char *{p}_error(void);",
                    device=f"const char *{p}_device(void);",
                    release=f"void {p}_release(void);")

    def cdef(self) -> str:
        """Declarations of the host API for cffi."""
        return "\n".join(self.declarations().values())


def _c_string_lines(text: str) -> list[str]:
    return [line.replace("\\", "\\\\").replace('"', '\\"') for line in text.splitlines()]


def value_checks(g: Graph, plan: Plan, calls: list[dict], kernels: list[dict], var: dict, out_var: dict
                 ) -> list[dict]:
    """The host's checks of input values (labels in [0, C), ...) for the
    nodes whose op has ``value_ranges``: a graph input is checked before
    anything is written to the device (``host``: its argument), a value
    computed on the device is read back before the node's kernel runs
    (``mem``, ``offset``: where it lives; ``kernel``: that kernel's index).
    Either way the run returns the node's status (``codegen.c``) before any
    later kernel runs, so no param is updated."""
    at_kernel = {k["node"]: i for i, k in enumerate(kernels) if k["node"] is not None}
    checks = []
    for c in calls:
        n = c["node"]
        if not c["check"] or n not in at_kernel:
            continue
        d = g.node(n)
        ins = g.inputs_of(n)
        types = [g.node(i)["type"] for i in ins]
        for k, (lo, hi) in get_op(d["op"]).value_ranges(d["attrs"], types).items():
            i, t = ins[k], types[k]
            check = dict(node=n, input=i, status=c["check"], T=CTYPES[t.dtype], size=t.size, lo=lo, hi=hi)
            kind, where = plan.storage[plan.aliases.get(i, i)]
            if kind == "input":
                check["host"] = var[where]
            elif kind == "output":
                view = plan.views.get(i, (None, 0))[1]
                check.update(mem=f"S.{out_var[where]}", offset=view, kernel=at_kernel[n])
            else:
                check.update(mem="S.params" if kind == "param" else "S.arena", offset=where, kernel=at_kernel[n])
            checks.append(check)
    return checks


def generate(g: Graph, plan: Plan | None = None, prefix: str | None = None, kernel_file: bool = False,
             header: str | None = None) -> OpenCLSource:
    """Render ``g`` as OpenCL kernels plus the C host program that runs them.
    The export (``convc.export_opencl``) sets ``prefix`` (the API's, else the
    graph's name), ``kernel_file`` (``<prefix>_init`` takes the path of the
    kernels' source and reads it at run time instead of embedding it) and
    ``header`` (a header the host includes, which declares its API)."""
    g.verify()
    plan = plan or make_plan(g, target="opencl")
    name = Namer(reserved=("params", "arena", "i"))
    prefix = name(prefix or g.name)
    entry = f"{prefix}_run"
    name.used.update({entry, f"{prefix}_init", f"{prefix}_error"})
    dtypes = {g.node(n)["type"].dtype for n in g.nx.nodes}
    fp64 = "float64" in dtypes

    inputs = [(n, g.node(n)["type"]) for n in g.input_names if n in plan.storage]
    outputs = [(o, g.node(n)["type"]) for o, n in g.outputs.items()]
    var: dict[str, str] = {}
    host_args, kernel_args = [], ["__global uchar *params", "__global uchar *arena"]
    for n, t in inputs:
        var[n] = name(n, "in_")
        host_args.append(f"const {CTYPES[t.dtype]} *restrict {var[n]}")
        kernel_args.append(f"__global const {CL_TYPES[t.dtype]} *{var[n]}")
    out_var = {}
    for o, t in outputs:
        out_var[o] = name(o, "out_")
        host_args.append(f"{CTYPES[t.dtype]} *restrict {out_var[o]}")
        kernel_args.append(f"__global {CL_TYPES[t.dtype]} *{out_var[o]}")
    signature = f"int {entry}({', '.join(host_args)})"

    # a buffer, as an expression of the kernel arguments (a view of a concat's
    # buffer is an offset into it: the arena's is in the storage already)
    def where(n: str, const: bool = False) -> str:
        dtype = g.node(n)["type"].dtype
        t = CL_TYPES[dtype]
        kind, at = plan.storage[n]
        cast = f"(__global {'const ' if const else ''}{t} *)"
        if kind == "input":
            return var[at]
        if kind == "output":
            k = plan.views[n][1] // np.dtype(dtype).itemsize if n in plan.views else 0
            return f"({out_var[at]} + {k})" if k else out_var[at]
        base = "params" if kind == "param" else "arena"
        return f"{cast}({base} + {at})"

    functions, calls = node_functions(g, plan, name, None, target="opencl")
    kernels = []
    for c in calls:
        n = c["node"]
        args = [where(i, const=True) for i in g.inputs_of(n)] + [where(n)]
        if c["ws"] is not None:
            args.append(f"(__global {c['T']} *)(arena + {c['ws']})")
        gsize = list(reversed(c["launch"])) or [1]      # dimension 0 is the innermost index
        if 0 in gsize:
            continue                                    # an empty tensor: nothing to launch
        kernels.append(dict(name=name(n, "k_"), node=n, gsize=gsize,
                            call=f"{c['fn']}({', '.join(args)})"))
    copies = [dict(dst=out_var[o], src=n, what=f"output {o}") for o, n in g.outputs.items()
              if plan.storage.get(n) != ("output", o)]        # an input, a param, or a second name
    copies += [dict(dst=where(p), src=n, what=f"assign {p}") for p, n in g.assigns.items()]
    for c in copies:                    # after every node, in one kernel each
        size = g.node(c["src"])["type"].size
        if size:
            kernels.append(dict(name=name(c["what"].replace(" ", "_"), "k_"), node=None, gsize=[size], call=None,
                                what=c["what"], dst=f"({c['dst']})", src=f"({where(c['src'], const=True)})"))

    checks = value_checks(g, plan, calls, kernels, var, out_var)
    env = environment()
    common = dict(version=__version__, graph=g.name, hash=g.structure_hash(), fp64=fp64)
    kernel_text = env.get_template("opencl/kernels.cl.j2").render(
        functions=functions, kernels=kernels, kernel_args=", ".join(kernel_args), **common)
    host = env.get_template("opencl/host.c.j2").render(
        P=prefix, signature=signature, kernel_lines=_c_string_lines(kernel_text), kernels=kernels,
        params_bytes=plan.params_bytes, arena_bytes=plan.arena_bytes, state=bool(g.assigns),
        inputs=[(var[n], t) for n, t in inputs], outputs=[(out_var[o], t) for o, t in outputs],
        host_checks=[c for c in checks if "host" in c], device_checks=[c for c in checks if "mem" in c],
        build_options="", kernel_file=kernel_file, header=header, **common)
    return OpenCLSource(host, kernel_text, prefix, entry, signature, inputs, outputs, plan, fp64, kernel_file,
                        tuple(var[n] for n, _ in inputs) + tuple(out_var[o] for o, _ in outputs),
                        tuple(c for c in checks if "host" in c))

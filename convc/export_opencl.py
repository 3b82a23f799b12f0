"""OpenCL export: a graph as a C host program, its OpenCL kernels and a
Makefile, built and run without Python.

``export_opencl(graph, out_dir, name)`` writes

- ``NAME_host.c``: the OpenCL target's host program (``codegen/opencl.py``
  and ``templates/opencl/host.c.j2``, the file the runtime builds and loads
  under Python): it picks a device, builds the kernels, keeps the params and
  the arena in device buffers and runs one kernel per node;
- ``NAME_host.h``: its API -- ``NAME_init``, ``NAME_run``,
  ``NAME_read_params``, ``NAME_write_params``, ``NAME_error``,
  ``NAME_device``, ``NAME_release`` -- with the sizes and the params' layout;
- ``NAME_kernels.cl``: the OpenCL C kernels, which ``NAME_init`` reads at run
  time from the path it is given; with ``embed_kernels=True`` this file is
  not written and the kernels are string literals in ``NAME_host.c`` (one
  binary, nothing to find at run time; ``NAME_init`` then takes no path);
- ``NAME_params.bin``: the params as the one byte blob ``NAME_init`` takes
  (each param's little-endian bytes at the offset the header lists). The
  params are a file, not C data: the device holds them in a buffer anyway,
  the host only passes them through, and a retrained blob (written by
  ``NAME_read_params``, or by ``Module.params_blob()`` under Python) drops
  in without rebuilding;
- ``NAME_test.c``: a ``main()`` that runs the test vectors the reference
  interpreter computed and checks the outputs and the params API;
- ``Makefile``: ``make`` builds ``NAME_test`` with ``cc ... -lOpenCL``,
  ``make test`` runs it, ``make clean``.

A training step (a ``cc.Trainer``, a graph with assigns, or ``train=True``)
exports the same way: each ``NAME_run`` is one step whose update of the
params and the optimizer's state stays on the device, and the harness checks
the steps' outputs and the params after them.

>>> cc.export_opencl(lenet5(), "build/lenet_cl", name="lenet")    # doctest: +SKIP
>>> # then: make -C build/lenet_cl test
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .codegen.env import CTYPES, Namer, environment
from .errors import ConvcError
from .ir import INT_DTYPES, Graph, require_graph

TEST_TOLERANCE = {"float32": 1e-4, "float64": 1e-10}
"""The harness's default bound on |got - expected| / max(1, |expected|), by
float type (the narrowest among the outputs and, for a training step, the
params): kernels on a device sum in another order than the reference (and
may contract to FMA); ``-DNAME_TEST_TOLERANCE=...`` overrides it."""


@dataclass
class OpenCLExport:
    """What ``export_opencl`` wrote."""
    name: str
    dir: Path
    files: list[Path]
    embed_kernels: bool
    graph: Graph                # the graph rendered (after the pass pipeline)
    plan: object                # the memory plan: plan.params[node] is a param's offset in the blob
    params_bytes: int           # NAME_PARAMS_BYTES: the blob NAME_init takes
    arena_bytes: int            # the device buffer of intermediate results

    def sizes(self) -> dict[str, int]:
        """Bytes of each file written, by file name."""
        return {f.name: f.stat().st_size for f in self.files}

    def __str__(self):
        return (f"wrote {', '.join(str(f) for f in self.files)}\n"
                f"params {self.params_bytes:,} bytes ({self.name}_params.bin), device arena {self.arena_bytes:,} bytes; "
                f"kernels {'embedded in the host' if self.embed_kernels else 'read at run time'}")


def params_blob(g: Graph, plan) -> bytes:
    """The params of ``g`` at the offsets of ``plan``: the blob
    ``NAME_init`` takes, each value's bytes little-endian."""
    blob = bytearray(plan.params_bytes)
    for n, off in plan.params.items():
        a = np.asarray(g.node(n)["value"])
        data = np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes()
        blob[off:off + len(data)] = data
    return bytes(blob)


def _tensors(src, macro: Namer, P: str) -> dict[str, list[dict]]:
    """The host API's inputs and outputs for the header and the harness:
    C variable, graph name, type, size macro."""
    from .export import size_macro

    out = {}
    args = iter(src.arg_names)
    for role, items in (("inputs", src.inputs), ("outputs", src.outputs)):
        out[role] = [dict(var=next(args), label=label, type=t, dtype=t.dtype, shape=str(t.shape), size=t.size,
                          T=CTYPES[t.dtype], exact=t.dtype in INT_DTYPES,
                          macro=macro(size_macro(P, label)))
                     for label, t in items]
    return out


def export_opencl(model, out_dir, name: str = "model", embed_kernels: bool = False, passes="embedded",
                  harness: bool = True, test_inputs=None, tests: int | None = None, seed: int = 0,
                  train: bool = False, loss: str | None = None, optimizer=None) -> OpenCLExport:
    """Write the OpenCL host program ``NAME_host.c`` with its API header
    ``NAME_host.h``, the kernels ``NAME_kernels.cl`` (or, with
    ``embed_kernels``, inside ``NAME_host.c``), the params ``NAME_params.bin``,
    a test harness ``NAME_test.c`` with ``tests`` vectors (default 2; or
    ``test_inputs``) and the expected outputs the reference interpreter
    computed from the graph as given, and a ``Makefile`` into ``out_dir``
    (created if needed; ``harness=False`` writes neither the harness nor the
    Makefile, which builds it). ``passes``: the pipeline run first ("embedded" by
    default, as ``export_c``: no im2col or Winograd scratch buffers;
    "default" is what ``cc.compile(target="opencl")`` runs). The host needs
    an OpenCL 1.2 ICD loader and its headers; nothing here needs a device.

    A training step exports too: ``model`` a :class:`convc.Trainer`, a graph
    with assigns, or ``train=True`` with an inference graph, ``loss`` and
    ``optimizer`` (as ``export_c(train=True)``: see
    :func:`convc.export_train.training_graphs`). Each ``NAME_run`` is then one
    step -- forward, loss, gradients, the optimizer's update of the params and
    its state, all on the device -- and ``NAME_read_params`` is the
    checkpoint. The harness runs ``tests`` steps (default 3) in order and
    checks every step's outputs and the params and state after the last.

    >>> exp = cc.export_opencl(lenet5(), "build/lenet_cl", name="lenet")   # doctest: +SKIP
    >>> exp.sizes()                                                         # doctest: +SKIP
    """
    from .codegen.opencl import generate
    from .export import c_literals, random_inputs, write_files
    from .export_train import STEPS, train_pipeline, training_graphs
    from .passes import run as run_passes
    from .reference import evaluate, run_step
    from .runtime.module import NumpyModule
    from .schedule import plan as make_plan
    from .train import Trainer

    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ConvcError(f"export name {name!r} must be a C identifier (letters, digits, _)")
    if train or isinstance(model, Trainer):
        graph, _, _ = training_graphs(model, loss, optimizer)
    else:
        if loss is not None or optimizer is not None:
            raise ConvcError("export_opencl(): loss and optimizer are for train=True")
        graph = require_graph(model, "export_opencl()")
    graph.verify()
    state = bool(graph.assigns)         # a training step: every run updates params on the device
    g = run_passes(graph, train_pipeline(passes) if state else passes)
    plan = make_plan(g, target="opencl")
    src = generate(g, plan, prefix=name, kernel_file=not embed_kernels, header=f"{name}_host.h")
    if src.prefix != name:
        raise ConvcError(f"export name {name!r} is reserved in C or in convc's generated code; choose another "
                         f"(the host API would be {src.prefix}_init ...)")
    P = name.upper()
    macro = Namer(reserved=[f"{P}_{s}" for s in ("HOST_H", "PARAMS_BYTES", "ARENA_BYTES", "TEST_TOLERANCE")],
                  mangle=False)
    tensors = _tensors(src, macro, P)
    params = []                         # in the blob's order
    for i, (n, off) in enumerate(sorted(plan.params.items(), key=lambda item: item[1])):
        t = g.node(n)["type"]
        params.append(dict(name=n, type=t, offset=off, T=CTYPES[t.dtype], size=t.size, exact=t.dtype in INT_DTYPES,
                           data=f"final_{i}"))
    env = environment()
    ctx = dict(version=__version__, graph=g.name, hash=g.structure_hash(), name=name, P=P,
               inputs=tensors["inputs"], outputs=tensors["outputs"], embed=embed_kernels, state=state,
               assigned=sorted(g.assigns), api=src.declarations(), params_bytes=plan.params_bytes,
               arena_bytes=plan.arena_bytes, params=params,
               needs_stdint=any(t["exact"] for t in tensors["inputs"] + tensors["outputs"]))
    files = {f"{name}_host.h": env.get_template("opencl/export_host.h.j2").render(ctx), f"{name}_host.c": src.host}
    if not embed_kernels:
        files[f"{name}_kernels.cl"] = src.kernels
    files[f"{name}_params.bin"] = params_blob(g, plan)
    if harness:
        if test_inputs is None:
            test_inputs = random_inputs(graph, tests or (STEPS if state else 2), seed)
        if not test_inputs:
            raise ConvcError("the test harness needs at least one test vector")
        check = NumpyModule(graph)          # the boundary checks of Module.run: names, shapes, dtypes
        feeds = [check.check_inputs(f) for f in test_inputs]
        if state:                           # the steps in order, from the exported values
            values = {n: np.array(graph.node(n)["value"]) for n in graph.param_names}
            wants = [run_step(graph, f, values) for f in feeds]
            for p in params:                # after the last step (a param the passes made keeps its value)
                p["vectors"] = c_literals(values.get(p["name"], g.node(p["name"])["value"]))
        else:
            wants = [evaluate(graph, f) for f in feeds]
        for role, got, prefix in (("inputs", feeds, "test_"), ("outputs", wants, "want_")):
            for t in tensors[role]:
                t["data"] = f"{prefix}{t['var']}"
                t["vectors"] = [c_literals(v[t["label"]]) for v in got]
        rows = {t["var"]: t for t in tensors["inputs"]}
        rejects = {}                        # per checked input, the first node that checks it
        for c in src.input_checks:
            rejects.setdefault(c["host"], dict(rows[c["host"]], node=c["node"], status=c["status"], lo=c["lo"],
                                               hi=c["hi"]))
        checked = tensors["outputs"] + (params if state else [])      # what the harness compares
        floats = {t["type"].dtype for t in checked} & set(TEST_TOLERANCE)
        files[f"{name}_test.c"] = env.get_template("opencl/export_test.c.j2").render(
            ctx, tests=len(feeds), rejects=list(rejects.values()), exact=any(t["exact"] for t in checked),
            inexact=bool(floats), tolerance=max((TEST_TOLERANCE[d] for d in floats), default=0))
        files["Makefile"] = env.get_template("opencl/export_Makefile.j2").render(ctx)
    out, paths = write_files(out_dir, files)
    return OpenCLExport(name, out, paths, embed_kernels, g, plan, plan.params_bytes, plan.arena_bytes)


def cmd_export_opencl(args) -> int:
    """``convc export MODEL --target opencl -o DIR [--name NAME] [--embed-kernels]``."""
    from .loading import load_model

    if getattr(args, "train", False):
        raise ConvcError("convc export --train --target opencl: the command line exports OpenCL inference hosts; "
                         "export a training step from Python with cc.export_opencl(trainer_or_graph, DIR, train=True, "
                         "optimizer=...)")
    c_only = {"--size": "size", "--int8": "int8", "--weights-file": "weights_file", "--calibration": "calibration",
              "--board": "board", "--run-qemu": "run_qemu", "--lr": "lr", "--momentum": "momentum",
              "--loss": "loss", "--batch": "batch", "--ram": "ram", "--flash": "flash"}
    refused = [flag for flag, attr in c_only.items() if getattr(args, attr, None) not in (None, False)]
    refused += ["--weight-format"] if getattr(args, "weight_format", "bytes") != "bytes" else []
    if refused:
        raise ConvcError(f"convc export --target opencl: {', '.join(refused)} {'is' if len(refused) == 1 else 'are'} "
                         f"for the C library (--target c); the OpenCL export writes a host program, kernels and a "
                         f"params file")
    if args.out is None:
        raise ConvcError("convc export --target opencl: give -o DIR to write the host program into")
    exp = export_opencl(load_model(args.model), args.out, name=args.name, embed_kernels=args.embed_kernels,
                        passes=args.pipeline)
    print(exp)
    print(f"check it: make -C {args.out} test")
    return 0

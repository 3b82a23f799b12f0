"""The ``convc`` command line: one parser, one :func:`main`.

Every command is a ``cmd_*(args) -> int`` function: the general ones here
(demo, run, compile, passes, tune, quantize, devices, cache), the others
beside what they drive (:func:`convc.export.cmd_export`,
:func:`convc.bench.cmd_bench`, :func:`convc.bench_torch.cmd_bench_torch`,
:func:`convc.explain.cmd_explain`), imported only when their command runs. ``python -m convc COMMAND ...`` is the same.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time

import numpy as np

from .errors import ConvcError
from .timing import median_time


def _lazy(module: str, name: str):
    """The command ``module.name``, imported when it runs (``convc --help``
    does not import torch, the ONNX package or the bench suite)."""
    def run(args) -> int:
        return getattr(importlib.import_module(module), name)(args)
    run.__name__ = name
    return run


def cmd_demo(args) -> int:
    import convc as cc
    from convc.models import lenet5
    from convc.runtime import cache

    g = lenet5(batch=args.batch)
    print(g)
    print()
    print(cc.cost(g))
    print()
    # Cold compile in a private, empty cache; then the cached load from it.
    old = os.environ.get("CONVC_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="convc-demo-") as tmp:
        os.environ["CONVC_CACHE_DIR"] = tmp
        try:
            t0 = time.perf_counter()
            mod = cc.compile(g, target=args.target)
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            mod = cc.compile(g, target=args.target)
            warm = time.perf_counter() - t0
        finally:
            if old is None:
                os.environ.pop("CONVC_CACHE_DIR", None)
            else:
                os.environ["CONVC_CACHE_DIR"] = old
    ref = cc.compile(g, target="numpy")
    x = np.random.default_rng(1).standard_normal((args.batch, 1, 28, 28)).astype(np.float32)
    got, want = mod(x=x), ref(x=x)
    err = float(np.max(np.abs(got - want)) / max(1e-12, float(np.max(np.abs(want)))))
    t_c = median_time(lambda: mod(x=x), seconds=0.3)[0] / args.batch
    t_np = median_time(lambda: ref(x=x), seconds=0.3)[0] / args.batch
    if args.target == "opencl":
        print(f"OpenCL device: {mod.device} (choose with CONVC_OPENCL_DEVICE; list with `convc devices`)")
    print(f"target {args.target}: compile {cold * 1e3:.0f} ms cold, {warm * 1e3:.1f} ms cached "
          f"(compiler runs: {cache.STATS['compiles']})")
    print(f"max relative difference vs numpy reference: {err:.2e}")
    print(f"run time per image: {t_c * 1e6:.1f} us ({args.target})  vs  {t_np * 1e6:.1f} us (numpy "
          f"interpreter)  -> {t_np / t_c:.1f}x")
    print(f"predicted classes: {np.argmax(got, axis=1).tolist()}")
    if err > 1e-4:
        print("MISMATCH: compiled output differs from the reference", file=sys.stderr)
        return 1
    print("OK")
    return 0


def cmd_devices(args) -> int:
    from convc.errors import ConvcError
    from convc.runtime.opencl import devices

    try:
        found = devices()
    except ConvcError as e:
        print(f"no OpenCL device: {e}", file=sys.stderr)
        return 1
    for d in found:
        mark = "*" if d["chosen"] else " "
        print(f"{mark} {d['index']}  {d['type']:<5} {d['name']}  [{d['platform']}]  {d['version']}; "
              f"{d['compute_units']} compute units, {d['memory_mib']} MiB, fp64 {'yes' if d['fp64'] else 'no'}"
              + (f"  ({d['note']})" if d["note"] else ""))
    print("* = the device the opencl target uses (first GPU, else first device; "
          "override with CONVC_OPENCL_DEVICE=P:D or a name substring)")
    return 0


def cmd_cache(args) -> int:
    """``convc cache [--clear]``: the configured cache root, its modules and
    size; ``--clear`` deletes only convc's own entries (cache.clear) and
    lists what it left."""
    import stat

    from convc.errors import ConvcError
    from convc.runtime import cache

    d = cache.configured_dir()
    if not os.path.lexists(d):
        print(f"cache: {d}  (does not exist yet)")
        return 0
    why = cache.root_problem(d)
    if why:
        raise ConvcError(f"compile cache {d}: {why}; convc does not use it (it compiles into a private temporary "
                         f"directory instead) and does not touch it (if the directory is yours and only you "
                         f"wrote to it: `chmod 700 {d}`, then run this again)")
    entries = [p for p in d.glob("[0-9a-f][0-9a-f]/*") if cache.file_problem(p / "module.so") is None
               and (p / "module.so").exists()]
    size = 0
    for top, dirs, files in os.walk(d):             # never follows symbolic links
        for f in files:
            st = os.lstat(os.path.join(top, f))
            size += st.st_size if stat.S_ISREG(st.st_mode) else 0
    print(f"cache: {d}  ({len(entries)} modules, {size / 1e6:.1f} MB)")
    if args.clear:
        removed, left = cache.clear(d)
        print(f"cleared: {len(removed)} convc entries and files removed")
        if left:
            print(f"left {len(left)} items that convc did not make (or that a build is using):")
            for p in left[:20]:
                print(f"  {p}")
            if len(left) > 20:
                print(f"  ... and {len(left) - 20} more")
    return 0


def compare_pipelines(g, pipelines: list[str]) -> str:
    """The graph after each pipeline side by side: a cost table (MACs,
    arena, nodes, layout reorders, nodes per op) and the ops of each final
    graph in schedule order, one column per pipeline."""
    from collections import Counter

    from convc import passes
    from convc.cost import cost
    from convc.schedule import plan

    outs = [passes.run(g, p) for p in pipelines]
    counts = [Counter(o.node(n)["op"] for n in o.topological_order()
                      if o.node(n)["op"] not in ("input", "param")) for o in outs]
    rows = [("pipeline", *pipelines)]
    reps = [cost(o) for o in outs]
    rows.append(("MACs", *(f"{r.macs:,}" for r in reps)))
    rows.append(("arena bytes", *(f"{plan(o).arena_bytes:,}" for o in outs)))
    rows.append(("nodes", *(str(sum(c.values())) for c in counts)))
    rows.append(("layout reorders", *(str(c["to_blocked"] + c["from_blocked"]) for c in counts)))
    for op in sorted(set().union(*counts)):
        rows.append((f"  {op}", *(str(c[op]) for c in counts)))
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip() for r in rows]
    lines.append("")
    cols = [[f"{o.node(n)['op']} -> {o.node(n)['type']}" for n in plan(o).order] for o in outs]
    colw = max(36, *(len(t) for c in cols for t in c))
    lines.append("  ".join(p.ljust(colw) for p in pipelines).rstrip())
    for i in range(max(len(c) for c in cols)):
        lines.append("  ".join((c[i] if i < len(c) else "").ljust(colw) for c in cols).rstrip())
    return "\n".join(lines)


def cmd_passes(args) -> int:
    import shutil
    import subprocess
    from pathlib import Path

    from convc import passes
    from convc.loading import load_model

    g = load_model(args.model)
    if args.compare:
        print(compare_pipelines(g, [p.strip() for p in args.compare.split(",") if p.strip()]))
        return 0
    names = passes.resolve([p.strip() for p in args.passes.split(",")] if args.passes else args.pipeline)
    steps = [("input", g, None)]
    for name in names:
        reps: list = []
        g = passes.run(g, [name], debug=args.debug, reports=reps)
        steps.append((name, g, reps[0]))
    dot_dir = Path(args.dot) if args.dot else None
    if dot_dir:
        dot_dir.mkdir(parents=True, exist_ok=True)
    have_dot = shutil.which("dot") is not None
    for i, (name, graph, rep) in enumerate(steps):
        title = "input graph" if rep is None else f"after {name}"
        print(f"== {i:02d} {title} ==")
        print(graph)
        if rep is not None:
            print(rep.table())
            if rep.changed:
                print(f"  added: {', '.join(rep.added) or '-'}")
                print(f"  removed: {', '.join(rep.removed) or '-'}")
                if rep.rewritten:
                    print(f"  rewritten: {', '.join(rep.rewritten)}")
        print()
        if dot_dir:
            stem = dot_dir / f"{i:02d}_{name}"
            highlight = set(rep.added + rep.rewritten) if rep else set()
            stem.with_suffix(".dot").write_text(graph.to_dot(highlight=highlight))
            if have_dot:
                for fmt in ("svg", "png"):
                    subprocess.run(["dot", f"-T{fmt}", str(stem.with_suffix(".dot")), "-o",
                                    str(stem.with_suffix("." + fmt))], check=False)
    if dot_dir:
        what = ".dot, .svg and .png" if have_dot else ".dot (install graphviz for .svg/.png)"
        print(f"wrote {len(steps)} steps as {what} files to {dot_dir}")
    return 0


def cmd_tune(args) -> int:
    import convc as cc
    from convc.loading import load_model

    g = load_model(args.model)
    if args.threads is not None:
        cc.set_num_threads(args.threads)
    rep = cc.tune(g, budget=args.budget, passes=args.pipeline, progress=not args.quiet)
    print(rep.table())
    return 0


def cmd_quantize(args) -> int:
    """``convc quantize MODEL --calibration FILE.npz``: calibrate, run the
    quantize_int8 pass, print the float graph and the int8 graph one after
    the other with the per-layer scales (``--report``: the measured error
    and sizes per layer), and write the int8 graph (``-o``, ``--onnx``)."""
    import convc as cc
    from convc import calibration as cal
    from convc import passes
    from convc.loading import load_model

    g = load_model(args.model)
    gc = cal.calibrate(g, args.calibration, observer=args.observer, percentile=args.percentile, engine=args.engine)
    if args.per_tensor:
        for n in gc.topological_order():
            gc.nx.nodes[n]["per_channel"] = False
    g8, (rep,) = passes.report(gc, ["quantize_int8"])
    print(f"== float graph '{g.name}' after {', '.join(cal.CLEANUP)} ==")
    print(gc)
    print()
    print(f"== int8 graph (quantize_int8, observer {args.observer}) ==")
    print(g8)
    print()
    if args.report:
        print(cal.measure(gc, g8, cal.batches(g, args.calibration), args.engine).table())
    else:
        print(rep.table())
    if args.output:
        py, npz = cal.save_python(g8, args.output)
        print(f"wrote {py} and {npz}")
    if args.onnx:
        cc.to_onnx(g8, path=args.onnx)
        print(f"wrote {args.onnx}")
    return 0


def _onnx_inputs(path: str) -> list[str]:
    from convc.onnx.importer import _onnx

    onnx = _onnx()
    try:
        m = onnx.load(path, load_external_data=False)
    except FileNotFoundError:
        raise ConvcError(f"ONNX model {path!r}: no such file") from None
    except Exception as e:      # noqa: BLE001
        raise ConvcError(f"ONNX model {path!r} cannot be read: {type(e).__name__}: {e}") from None
    inits = {i.name for i in m.graph.initializer}
    return [i.name for i in m.graph.input if i.name not in inits]


def _parse_inputs(specs, names: list[str]) -> dict[str, np.ndarray]:
    feeds = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep:
            if len(names) != 1:
                raise ConvcError(f"--input {spec}: the model has {len(names)} inputs {names}; "
                                 f"say which with --input NAME=FILE.npy")
            name, path = names[0], spec
        if name not in names:
            raise ConvcError(f"--input {spec}: the model has no input {name!r}; its inputs are {names}")
        try:
            feeds[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ConvcError(f"--input {spec}: cannot read {path!r} as a .npy file: {e}") from None
    missing = [n for n in names if n not in feeds]
    if missing:
        raise ConvcError(f"no array for input(s) {missing}; give --input NAME=FILE.npy for each")
    return feeds


def _compile(g, target: str, pipeline: str):
    from convc.api import TARGETS, compile as cc_compile
    if target not in TARGETS:
        if target == "opencl":
            raise ConvcError("the opencl target is not available in this build")
        raise ConvcError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")
    return cc_compile(g, target=target, passes=pipeline)


def cmd_run(args) -> int:
    """``convc run MODEL -i [NAME=]FILE.npy ... -o DIR``: import or load,
    compile, run, write every output as DIR/NAME.npy, print the timings."""
    from pathlib import Path

    from convc.loading import load_model
    from convc.onnx import from_onnx, node_name

    onnx_model = str(args.model).lower().endswith(".onnx")
    if onnx_model:
        names = _onnx_inputs(args.model)
        feeds = _parse_inputs(args.input, names)
        g = from_onnx(args.model, input_shapes={n: a.shape for n, a in feeds.items()})
        feeds = {node_name(n, "input"): a for n, a in feeds.items()}
    else:
        g = load_model(args.model)
        feeds = _parse_inputs(args.input, g.input_names)
    t0 = time.perf_counter()
    mod = _compile(g, args.target, args.pipeline)
    t_compile = time.perf_counter() - t0
    res = mod.run(feeds)
    t_run, runs = median_time(lambda: mod.run(feeds), max_runs=1000)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, arr in res.items():
        np.save(out / f"{name}.npy", arr)
        print(f"wrote {out / (name + '.npy')}  {arr.dtype}{list(arr.shape)}")
    print(f"target {args.target}: compile {t_compile * 1e3:.0f} ms, run {t_run * 1e3:.3f} ms "
          f"(median of {runs})")
    return 0


def _parse_shapes(specs) -> dict:
    shapes = {}
    for spec in specs or []:
        name, sep, dims = spec.partition("=")
        try:
            shapes[name] = tuple(int(d) for d in dims.split(","))
        except ValueError:
            sep = ""
        if not sep:
            raise ConvcError(f"--shape {spec}: write NAME=D0,D1,... (e.g. x=1,3,224,224)")
    return shapes


def cmd_compile(args) -> int:
    """``convc compile MODEL``: print the IR and the cost table, then compile."""
    from convc.cost import cost
    from convc.loading import load_model

    shapes = _parse_shapes(args.shape)
    g = load_model(args.model, shapes) if str(args.model).lower().endswith(".onnx") else load_model(args.model)
    print(g)
    print()
    print(cost(g).table())
    if args.target != "none":
        t0 = time.perf_counter()
        _compile(g, args.target, args.pipeline)
        print(f"\ncompiled for {args.target} in {(time.perf_counter() - t0) * 1e3:.0f} ms")
    return 0


def cmd_bench(args) -> int:
    """``convc bench``: the suite (:func:`convc.bench.cmd_bench`), or with
    ``--torch`` the torch.compile comparison (:func:`convc.bench_torch.cmd_bench_torch`)."""
    torch_only = {"--repeats": args.repeats is not None, "--no-inductor": args.no_inductor, "--size": args.size is not None,
                  "--net": bool(args.net)}
    if args.compile:
        from convc.compile_timing import MODELS
        if args.repeats is not None or args.no_inductor or args.size is not None or args.torch:
            raise ConvcError("convc bench --compile takes only --net (torchvision model names, default "
                             f"{', '.join(MODELS)})")
        return _lazy("convc.compile_timing", "cmd_bench_compile")(args)
    if args.torch:
        from convc.bench_torch import NETS
        unknown = [n for n in args.net or [] if n not in NETS]
        if unknown:
            raise ConvcError(f"convc bench --torch: unknown --net {', '.join(unknown)}; the nets are "
                             f"{', '.join(NETS)}")
        args.repeats = 30 if args.repeats is None else args.repeats
        if args.repeats < 1:
            raise ConvcError(f"convc bench --torch: --repeats must be >= 1, got {args.repeats}")
        return _lazy("convc.bench_torch", "cmd_bench_torch")(args)
    given = [k for k, v in torch_only.items() if v]
    if given:
        raise ConvcError(f"convc bench: {', '.join(given)} {'is' if len(given) == 1 else 'are'} for --torch")
    return _lazy("convc.bench", "cmd_bench")(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convc", description="convc: a small graph compiler for conv nets")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("demo", help="build LeNet-5, compile it, check it against the reference, time it")
    d.add_argument("--target", default="c", choices=["c", "opencl"], help="compilation target (default: c)")
    d.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    d.set_defaults(fn=cmd_demo)
    from convc.passes import PIPELINES

    p_ = sub.add_parser("passes", help="run a pass pipeline on a model, printing the IR and cost after each pass")
    p_.add_argument("model", help="a Python file defining build() -> Graph (or `graph`), or a bundled model "
                                  "name such as lenet5")
    p_.add_argument("--pipeline", default="default", help=f"pipeline name: {', '.join(PIPELINES)} (default: default)")
    p_.add_argument("--passes", help="comma-separated pass names instead of a pipeline")
    p_.add_argument("--dot", metavar="DIR", help="write one Graphviz file per step (and SVG/PNG if `dot` exists)")
    p_.add_argument("--debug", action="store_true", help="check every pass against the reference interpreter")
    p_.add_argument("--compare", metavar="P1,P2", help="show the graphs two or more pipelines make side by side "
                                                       "(e.g. default,blocked: NCHW vs NCHWc)")
    p_.set_defaults(fn=cmd_passes)
    t = sub.add_parser("tune", help="measure how to compute each conv of a model on this machine and save the "
                                    "winners to the tuning database that compile uses")
    t.add_argument("model", help="an ONNX file, a bundled model name such as lenet5, or a Python file defining "
                                 "build() -> Graph")
    t.add_argument("--budget", type=float, default=120.0, metavar="SECONDS",
                   help="time for the whole search, compiles included (default 120)")
    t.add_argument("--pipeline", default=None, help="the pipeline the model will be compiled with "
                                                    "(default: default, or train for a training graph)")
    t.add_argument("--threads", type=int, default=None, help="tune at this many threads (default: all cores)")
    t.add_argument("--quiet", action="store_true", help="no progress lines")
    t.set_defaults(fn=cmd_tune)
    q = sub.add_parser("quantize", help="post-training int8 quantization of a model: calibrate on sample inputs, "
                                        "show the float and int8 graphs and the per-layer error and sizes")
    q.add_argument("model", help="an ONNX file, a bundled model name such as lenet5, or a Python file defining "
                                 "build() -> Graph")
    q.add_argument("--calibration", required=True, metavar="FILE.npz",
                   help="calibration inputs: arrays named after the graph's inputs (or one array), k batches each")
    q.add_argument("-o", "--output", metavar="OUT.py", help="write the int8 graph as a model file (and OUT.npz)")
    q.add_argument("--onnx", metavar="OUT.onnx", help="write the int8 graph as ONNX")
    q.add_argument("--report", action="store_true", help="measure each layer's error and size on all the "
                                                         "calibration data (default: the pass notes, on a sample)")
    q.add_argument("--observer", default="minmax", choices=["minmax", "percentile"], help="default: minmax")
    q.add_argument("--percentile", type=float, default=99.99, help="for --observer percentile (default 99.99)")
    q.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor, not per channel")
    q.add_argument("--engine", default="c", choices=["c", "reference"],
                   help="run the float graph compiled (c, default) or on the numpy interpreter")
    q.set_defaults(fn=cmd_quantize)
    model_help = "an ONNX file (MODEL.onnx), a bundled model name (lenet5) or a Python file defining build()"
    r = sub.add_parser("run", help="compile a model (e.g. MODEL.onnx) and run it on .npy inputs; "
                                   "writes each output as OUT/NAME.npy and prints timings",
                       description="Import or load MODEL, compile it for --target, run it on the "
                                   "--input arrays, write every output as DIR/NAME.npy and print the "
                                   "compile time and the median run time.")
    r.add_argument("model", metavar="MODEL", help=model_help)
    r.add_argument("-i", "--input", action="append", metavar="[NAME=]FILE.npy",
                   help="an input array (repeat for several inputs; NAME= may be left out for one input)")
    r.add_argument("--target", default="c", choices=["c", "opencl", "numpy"], help="default: c")
    r.add_argument("-o", "--out", default=".", metavar="DIR", help="where to write the outputs (default: .)")
    r.add_argument("--pipeline", default="default", help="pass pipeline (default: default)")
    r.set_defaults(fn=cmd_run)
    cp = sub.add_parser("compile", help="import or load a model (e.g. MODEL.onnx), print its IR and cost "
                                        "and compile it",
                        description="Print MODEL's IR and its cost table (MACs, params, bytes per node), "
                                    "then compile it for --target.")
    cp.add_argument("model", metavar="MODEL", help=model_help)
    cp.add_argument("--shape", action="append", metavar="NAME=D0,D1,...",
                    help="static shape for an ONNX input with symbolic dims (repeatable)")
    cp.add_argument("--target", default="c", choices=["c", "opencl", "numpy", "none"],
                    help="compile for this target after printing (default: c; none: only print)")
    cp.add_argument("--pipeline", default="default", help="pass pipeline (default: default)")
    cp.set_defaults(fn=cmd_compile)
    from convc.export import CALIBRATION_SAMPLES, WEIGHT_FORMATS

    e = sub.add_parser(
        "export", help="write a standalone C99 library (NAME.h, NAME.c) with static memory, and its test harness",
        description="Export MODEL as NAME.h + NAME.c (+ NAME_weights.c) and a test harness NAME_test.c; "
                    "--size reports flash and RAM per node and in total; --int8 quantizes the model first.")
    e.add_argument("model", metavar="MODEL",
                   help="lenet5 or mobilenet_tiny (bundled), or a Python file defining build() -> convc.Graph "
                        "(or a module-level `graph`)")
    e.add_argument("-o", "--out", metavar="DIR", help="directory to write the files into")
    e.add_argument("--name", default="model", help="C prefix of the API and the file names (default: model)")
    e.add_argument("--weights-file", action="store_true", help="put the weights in NAME_weights.c")
    e.add_argument("--weight-format", choices=WEIGHT_FORMATS, default="bytes",
                   help="bytes (default): the weights' little-endian bytes as C string literals in a const union "
                        "(bit-exact, compiles fastest); hex: 32/64-bit hex words of their bits (any byte order); "
                        "decimal: one C literal per value")
    e.add_argument("--size", action="store_true",
                   help="compile the library (arm-none-eabi-gcc for a Cortex-M4F if installed, else the host "
                        "compiler) and report flash (code + const data) and RAM (arena + stack) per node")
    e.add_argument("--int8", action="store_true",
                   help="quantize the model to int8 first (the quantize_int8 pass: int8_t weights, int32_t biases, "
                        "int8 activations); with --size, the float and int8 figures side by side")
    e.add_argument("--calibration", metavar="FILE.npz",
                   help=f"calibration inputs for --int8: arrays keyed by input name, N samples stacked on the batch "
                        f"axis (default: {CALIBRATION_SAMPLES} random inputs, a weak calibration)")
    e.add_argument("--pipeline", default="embedded",
                   help="pass pipeline run before rendering, as in cc.compile (default: embedded, which leaves out "
                        "the GEMM/Winograd lowerings that need scratch RAM; none: as given)")
    e.add_argument("--ram", metavar="BYTES",
                   help="arena budget (e.g. 24576 or 24K): export the cheapest plan that fits, choosing among "
                        "in-place ops and a patch-based schedule of the first stages (convc/budget.py), or fail "
                        "naming the smallest arena reached and the node where it peaks")
    e.add_argument("--flash", metavar="BYTES",
                   help="flash budget (code + const data, measured by compiling): as --ram")
    e.add_argument("--train", action="store_true",
                   help="export the training step instead (convc/export_train.py): forward, loss, gradients and "
                        "the optimizer's update as NAME_train_step, NAME_predict, NAME_get_params/NAME_set_params "
                        "on params and state in static RAM; with --size, training RAM beside inference RAM")
    e.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd", help="with --train (default: sgd)")
    e.add_argument("--lr", type=float, default=None, help="with --train: learning rate (default: sgd 0.01, adam 1e-3)")
    e.add_argument("--momentum", type=float, default=None, help="with --train --optimizer sgd (default: 0)")
    e.add_argument("--loss", choices=["cross_entropy", "mse"], default=None,
                   help="with --train: the loss on the model's one output (default: cross_entropy, with int64 "
                        "class indices 'labels'; mse: float 'targets' shaped like the output)")
    e.add_argument("--batch", type=int, default=None, metavar="N",
                   help="with --train: rebuild the bundled model (lenet5, mobilenet_tiny) with batch N")
    from convc.qemu import BOARDS

    e.add_argument("--board", choices=sorted(BOARDS), default=None,
                   help="also write board support for this board beside the library (startup code, linker "
                        "script, semihosting output, Makefile): mps2-an386 is QEMU's Arm MPS2 AN386, a Cortex-M4F")
    e.add_argument("--run-qemu", action="store_true",
                   help="build the harness for --board (default mps2-an386) with arm-none-eabi-gcc, run it under "
                        "qemu-system-arm, check that it passes and print the instructions per call (emulated, "
                        "indicative)")
    e.add_argument("--qemu-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="stop a --run-qemu run that takes longer than this (default: 120)")
    e.add_argument("--target", choices=["c", "opencl"], default="c",
                   help="c (default): the C99 library; opencl: NAME_host.c/.h (the OpenCL host program and its API), "
                        "NAME_kernels.cl, NAME_params.bin, the harness NAME_test.c and a Makefile (-lOpenCL)")
    e.add_argument("--embed-kernels", action="store_true",
                   help="with --target opencl: the kernels as strings in NAME_host.c instead of NAME_kernels.cl "
                        "read at run time")
    e.set_defaults(fn=_lazy("convc.export", "cmd_export"))
    from convc.bench import LOAD_TARGET, MODELS, UNTUNED_TARGET

    b = sub.add_parser("bench", help="time a fixed suite against PyTorch and ONNX Runtime, with the FMA peak; "
                                     "--torch: torch.compile(backend='convc') beside eager and inductor")
    b.add_argument("--quick", action="store_true", help="shrink every case and repeat count (a few seconds)")
    b.add_argument("--cases", metavar="PATTERN",
                   help="comma-separated case names, globs (resnet*) or substrings (lenet); --list shows the names")
    b.add_argument("--models", metavar="PATTERN", nargs="?", const="*",
                   help="the models section: torchvision classifiers through ONNX against ORT and PyTorch; alone, "
                        "every model, else names, globs or substrings (resnet18,mobilenet*); without --cases only "
                        f"the models run. Models: {', '.join(m.name for m in MODELS)}")
    b.add_argument("--profile", metavar="N", nargs="?", type=int, const=10, default=0,
                   help="after each row, the N slowest nodes of a profile=True build (default N: 10)")
    b.add_argument("--threads", metavar="N,M", help="thread counts (default: 1 and all cores)")
    b.add_argument("--under-load", action="store_true",
                   help=f"time beside one busy process per core and report each case's time at N threads over its "
                        f"time at 1 thread (target <= {LOAD_TARGET:g}x); the processes stop when the bench ends")
    b.add_argument("--tune", type=float, metavar="SECONDS",
                   help="tune each case's graph on this host first (cc.tune with this budget; the winners go to the "
                        "tuning database) and time the untuned build beside the tuned one "
                        f"(target: untuned <= {UNTUNED_TARGET:g}x tuned)")
    b.add_argument("--repeat-seconds", type=float, metavar="S", help="time each case for at least S seconds "
                                                                     "(default 0.2; quick 0.01)")
    b.add_argument("--min-runs", type=int, metavar="N", help="at least N timed runs per case (default 5)")
    b.add_argument("--int8", action="store_true",
                   help="the int8 rows: quantized ResNet-18 / MobileNetV2 layers, convc int8 against convc float32 "
                        "and PyTorch's quantized conv (with --cases: those layers; alone: only the int8 rows)")
    b.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    b.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    b.add_argument("--list", action="store_true", help="list the cases and exit")
    t = b.add_argument_group("--torch", "batch-1 latency of torch.compile(backend='convc') beside PyTorch eager "
                                        "and inductor (convc.bench_torch), instead of the suite")
    t.add_argument("--torch", action="store_true", help="run this comparison")
    b.add_argument("--compile", action="store_true",
                   help="instead of the suite: cold and cached compile time and peak RSS of torchvision models "
                        "via ONNX, each compile in a fresh process (--net NAME: which; default vgg11, densenet121)")
    t.add_argument("--repeats", type=int, default=None, help="timed calls per backend, interleaved (default 30)")
    t.add_argument("--no-inductor", action="store_true", help="leave out torch.compile's inductor")
    t.add_argument("--size", type=int, default=None, help="input height and width (default 224)")
    t.add_argument("--net", action="append", metavar="NET",
                   help="resnet18-style or mobilenet_v2-style (repeatable; default: both)")
    b.set_defaults(fn=cmd_bench)
    ex = sub.add_parser("explain", help="write one HTML page that shows what every pass did to a model: IR diff, "
                                        "graph, cost, measured error, decline reasons, memory plan, per-node "
                                        "time and C")
    ex.add_argument("model", help="an ONNX file, a bundled model name such as lenet5, or a Python file defining "
                                  "build() -> Graph")
    ex.add_argument("-o", "--output", default="report.html", help="the page to write (default report.html)")
    ex.add_argument("--pipeline", default="default", help=f"pipeline name: {', '.join(PIPELINES)} (default: default)")
    ex.add_argument("--passes", help="comma-separated pass names instead of a pipeline")
    ex.add_argument("--inputs", metavar="FILE.npz", help="inputs to measure the error on (default: random)")
    ex.add_argument("--no-compiled", action="store_true", help="measure each step on the reference only (faster: "
                                                                "no C compile per step)")
    ex.add_argument("--no-timing", action="store_true", help="do not time the nodes on this machine")
    ex.add_argument("--quiet", action="store_true", help="no progress line")
    ex.set_defaults(fn=_lazy("convc.explain", "cmd_explain"))
    dv = sub.add_parser("devices", help="list the OpenCL devices and the one the opencl target picks")
    dv.set_defaults(fn=cmd_devices)
    c = sub.add_parser("cache", help="show (or --clear) the compile cache")
    c.add_argument("--clear", action="store_true",
                   help="delete every cached module (only what convc made there; the tuning database stays)")
    c.set_defaults(fn=cmd_cache)
    return p


def main(argv=None) -> int:
    """``convc COMMAND ...`` (``python -m convc COMMAND ...``): parse, run the
    command; a :class:`ConvcError` prints as ``convc: error: ...``, exit 2."""
    p = build_parser()
    args = p.parse_args(argv)
    if not getattr(args, "fn", None):
        p.print_help()
        return 0
    try:
        return args.fn(args)
    except ConvcError as e:
        print(f"convc: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

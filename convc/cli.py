"""The ``convc`` command line."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np


def _timeit(fn, min_time=0.3, min_runs=5):
    fn()
    runs, t0 = 0, time.perf_counter()
    times = []
    while runs < min_runs or time.perf_counter() - t0 < min_time:
        s = time.perf_counter()
        fn()
        times.append(time.perf_counter() - s)
        runs += 1
    return float(np.median(times))


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
    t_c = _timeit(lambda: mod(x=x)) / args.batch
    t_np = _timeit(lambda: ref(x=x)) / args.batch
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
    from convc.export import load_model

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
    from convc.export import load_model

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
    from convc.export import load_model

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
    from convc.export import add_cli as add_export_cli

    add_export_cli(sub)
    from convc.onnx import add_cli as add_onnx_cli

    add_onnx_cli(sub)
    from convc.bench import add_cli as add_bench_cli

    add_bench_cli(sub)
    from convc.explain import add_cli as add_explain_cli

    add_explain_cli(sub)
    dv = sub.add_parser("devices", help="list the OpenCL devices and the one the opencl target picks")
    dv.set_defaults(fn=cmd_devices)
    c = sub.add_parser("cache", help="show (or --clear) the compile cache")
    c.add_argument("--clear", action="store_true",
                   help="delete every cached module (only what convc made there; the tuning database stays)")
    c.set_defaults(fn=cmd_cache)
    return p


def main(argv=None) -> int:
    from convc.errors import ConvcError

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

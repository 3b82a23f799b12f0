"""Embedded export (``convc/export.py``): the exported C99 library builds
warning-free, matches the reference interpreter, stays inside its arena,
depends on nothing but <math.h>/<stddef.h>/<stdint.h>, cross-compiles for a
Cortex-M4F, and ``--size`` agrees with ``arm-none-eabi-size``.

The ARM checks skip when arm-none-eabi-gcc is missing, unless
CONVC_REQUIRE_ARM=1 (set by .ci/run), which turns the skip into a failure.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from fractions import Fraction

import numpy as np
import pytest

import convc as cc
from convc.codegen.c import generate
from convc.cli import build_parser, main as cli_main
from convc.export import c_literals, c_string, export_c, live_bytes, peak_live_bytes, size_report, toolchain
from convc.loading import load_model
from convc.models import lenet5, mobilenet_tiny
from convc.passes import run as run_passes
from convc.schedule import plan as make_plan

STRICT = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic"]
ARM = ["arm-none-eabi-gcc", "-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16", "-Os", "-c"]
TOLERANCE = 1e-5
FLASH_MARGIN = 0.01     # README "Embedded": --size and arm-none-eabi-size agree within 1% on flash
# What the library may call: <math.h> functions, and the memcpy/memset/memmove
# that GCC emits for plain loops (it requires them even when freestanding).
ALLOWED_UNDEFINED = {"memcpy", "memset", "memmove"} | {
    f + s for f in ("exp", "log", "tanh", "sqrt", "fabs", "pow", "floor", "ceil", "fmax", "fmin", "expm1",
                    "log1p", "erf") for s in ("", "f")}
# id -> (builder, export name, weights in NAME_weights.c, pass pipeline, weight format)
MODELS = {"lenet5": (lenet5, "lenet", False, "embedded", "bytes"),
          "mobilenet_tiny": (mobilenet_tiny, "mnet", True, "embedded", "hex"),
          "mobilenet_tiny-unfused": (mobilenet_tiny, "mnet", False, "none", "decimal")}


def sh(cmd, cwd, check=True):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def gcc():
    if not shutil.which("gcc"):
        pytest.skip("gcc is not installed")
    return "gcc"


def need_arm():
    if shutil.which("arm-none-eabi-gcc") and shutil.which("arm-none-eabi-size"):
        return
    if os.environ.get("CONVC_REQUIRE_ARM") == "1":
        pytest.fail("CONVC_REQUIRE_ARM=1 but arm-none-eabi-gcc/arm-none-eabi-size are not on PATH "
                    "(Debian: apt-get install gcc-arm-none-eabi)")
    pytest.skip("arm-none-eabi-gcc not installed (Debian package gcc-arm-none-eabi; .ci/run installs it "
                "and sets CONVC_REQUIRE_ARM=1)")


def max_error(stdout: str) -> float:
    m = re.search(r"^max_error (\S+)$", stdout, re.M)
    assert m, f"the harness printed no max_error line:\n{stdout}"
    return float(m.group(1))


def lib_sources(exp):
    return [f.name for f in exp.files if not f.name.endswith("_test.c") and f.suffix == ".c"]


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
    """(graph, Export): LeNet with its weights inside NAME.c, the MobileNet-style
    net with them in NAME_weights.c (after the default pipeline: fused conv +
    ReLU, fused separable blocks), and the MobileNet-style net unfused; the
    weights in each of the three forms (bytes, hex words, decimal literals)."""
    build, name, weights_file, passes, weight_format = MODELS[request.param]
    g = build()
    out = tmp_path_factory.mktemp(f"export-{name}")
    return g, export_c(g, out, name=name, weights_file=weights_file, passes=passes, weight_format=weight_format)


def test_harness_builds_strict_and_matches_reference(exported):
    g, exp = exported
    sh([gcc(), *STRICT, "-O2", "-o", "harness", f"{exp.name}_test.c", *lib_sources(exp), "-lm"], exp.dir)
    run = sh(["./harness"], exp.dir)
    runs = re.findall(r"^vector \d+, \w+: max error (\S+)$", run.stdout, re.M)
    assert len(runs) == 4, run.stdout            # 2 vectors x (static arena, caller's arena)
    assert max_error(run.stdout) <= TOLERANCE, run.stdout
    assert "OK" in run.stdout


def test_harness_detects_a_wrong_result(exported, tmp_path):
    """The harness is a real check: a library with one weight changed fails it."""
    g, exp = exported
    for f in exp.files:
        shutil.copy(f, tmp_path / f.name)
    weights = tmp_path / (f"{exp.name}_weights.c" if (tmp_path / f"{exp.name}_weights.c").exists()
                          else f"{exp.name}.c")
    text = weights.read_text()
    # the first weight becomes 9.0f: a decimal literal, a float's bits as a hex word (0x41100000), or the
    # first four bytes of the first string literal (decoded: raw characters and octal escapes; re-encoded)
    first = re.search(r"= \{ ?\{?   /\* .*\n    (-?[0-9.e+-]+f|0x[0-9a-f]{8}|\"[^\n]*\")", text)
    old = first.group(1)
    if old.startswith('"'):
        data = re.sub(r"\\([0-7]{1,3})", lambda m: chr(int(m.group(1), 8)), old[1:-1]).encode("latin-1")
        assert c_string(data) == [old]                  # the decoding is right: it encodes back to the same line
        new = c_string(np.float32(9.0).tobytes() + data[4:])[0]
    else:
        new = "0x41100000" if old.startswith("0x") else "9.0f"
    weights.write_text(text[:first.start(1)] + new + text[first.end(1):])
    sh([gcc(), "-std=c99", "-O2", "-o", "harness", f"{exp.name}_test.c", *lib_sources(exp), "-lm"], tmp_path)
    run = sh(["./harness"], tmp_path, check=False)
    assert run.returncode == 1 and "FAIL" in run.stdout and max_error(run.stdout) > TOLERANCE, run.stdout


def test_library_depends_only_on_math_stddef_stdint(exported):
    g, exp = exported
    for f in exp.files:
        if f.name.endswith("_test.c"):
            continue
        text = f.read_text()
        includes = set(re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', text, re.M))
        assert includes <= {"math.h", "stddef.h", "stdint.h", f"{exp.name}.h"}, (f.name, includes)
        bad = re.findall(r"\b(malloc|calloc|realloc|free|printf|fprintf|puts|FILE|fopen|stdio|stdlib|string\.h|"
                         r"memcpy|memset|abort|exit)\b", text)
        assert not bad, f"{f.name} uses {sorted(set(bad))}"
    objs = []
    for src in lib_sources(exp):
        sh([gcc(), *STRICT, "-O2", "-c", src], exp.dir)
        objs.append(src[:-2] + ".o")
    symbols = lambda *opt: {line.split()[-1] for line in sh(["nm", *opt, *objs], exp.dir).stdout.splitlines()  # noqa
                            if line.strip() and not line.endswith(":")}
    undefined = symbols("-u") - symbols("--defined-only")
    assert undefined <= ALLOWED_UNDEFINED, f"the library needs {sorted(undefined - ALLOWED_UNDEFINED)}"


def test_header_documents_the_api(exported):
    g, exp = exported
    h = (exp.dir / f"{exp.name}.h").read_text()
    P = exp.name.upper()
    x, y = g.node("x")["type"], g.node(g.outputs["logits"])["type"]
    assert f"int {exp.name}_run(const float *x, float *logits);" in h
    assert f"int {exp.name}_run_with_arena(const float *x, float *logits, void *arena);" in h
    assert f"x: float32 {x.shape}, {x.size} elements" in h and f"logits: float32 {y.shape}" in h
    assert "row-major" in h
    macros = dict(re.findall(r"^#define (\w+) (\w+)", h, re.M))
    assert int(macros[f"{P}_ARENA_BYTES"]) == exp.plan.arena_bytes
    assert int(macros[f"{P}_WEIGHT_BYTES"]) == sum(g.node(p)["type"].nbytes for p in exp.plan.params)
    assert macros[f"{P}_INPUT_SIZE"] == f"{P}_X_SIZE" and int(macros[f"{P}_X_SIZE"]) == x.size
    assert macros[f"{P}_OUTPUT_SIZE"] == f"{P}_LOGITS_SIZE" and int(macros[f"{P}_LOGITS_SIZE"]) == y.size


def test_node_functions_are_the_runtime_ones(exported):
    """Export and runtime render the same per-op templates: every node function
    of the runtime module appears verbatim in NAME.c."""
    g, exp = exported
    runtime = generate(run_passes(g, exp.passes)).text
    fns = re.findall(r"^static void node_\w+\(.*?^}\n", runtime, re.M | re.S)
    lib = (exp.dir / f"{exp.name}.c").read_text()
    for f in fns:
        assert f in lib, f.splitlines()[0]
    # the export has one function per node; the runtime one per distinct code (codegen.c.share_identical:
    # nodes whose functions differ only in name and comments share the first one)
    lib_fns = re.findall(r"^static void (node_\w+)(\(.*?^}\n)", lib, re.M | re.S)
    assert len(lib_fns) == len(exp.plan.order)
    distinct = {re.sub(r"/\*.*?\*/", "", body, flags=re.S).replace(name, "@fn@") for name, body in lib_fns}
    assert len(fns) == len(distinct)


@pytest.mark.parametrize("passes", ["none", "embedded", "default"])
def test_lenet_arena_is_reused(passes, tmp_path):
    g = run_passes(lenet5(), passes)
    p = make_plan(g)
    # the peak of live buffers, recomputed from the graph's own edges
    step = {n: i for i, n in enumerate(p.order)}
    inter = [n for n in p.order if p.storage[n][0] == "arena"]
    # a reshape of an intermediate is a second name for its buffer (no code): its readers read the buffer
    assert p.aliases and all(p.storage[a] == p.storage[src] and a not in step for a, src in p.aliases.items())
    assert all(p.storage[a][0] in ("arena", "param", "input") for a in p.aliases)
    views = {n: [n] + [a for a, src in p.aliases.items() if src == n] for n in inter}
    last = {n: max(step[u] for v in views[n] for u in g.nx.successors(v) if u in step) for n in inter}
    align = lambda n: (n + 63) // 64 * 64  # noqa: E731
    peak = max(sum(align(g.node(n)["type"].nbytes) for n in inter if step[n] <= s <= last[n])
               for s in range(len(p.order)))
    total = sum(align(g.node(n)["type"].nbytes) for n in inter)
    assert peak == peak_live_bytes(p) == max(live_bytes(p)) == p.arena_bytes
    assert p.arena_bytes < p.intermediate_bytes == total, (p.arena_bytes, total)
    # the export's one static arena is that size
    exp = export_c(lenet5(), tmp_path, name="lenet", passes=passes, harness=False)
    assert (exp.arena_bytes, exp.peak_live_bytes, exp.intermediate_bytes) == (p.arena_bytes, peak, total)
    sh([gcc(), *STRICT, "-O2", "-c", "lenet.c"], tmp_path)
    arena = [line.split() for line in sh(["nm", "-S", "lenet.o"], tmp_path).stdout.splitlines()
             if line.endswith(" lenet_arena")]
    assert len(arena) == 1 and int(arena[0][1], 16) == p.arena_bytes and arena[0][2] in "bB", arena


def test_sanitizers_see_no_access_outside_buffers(tmp_path):
    """ASan + UBSan over the LeNet harness: static arena, a heap arena of
    exactly NAME_ARENA_BYTES, heap inputs/outputs of exactly their size. The
    control run shrinks the arena by one float and must be caught."""
    exp = export_c(lenet5(), tmp_path, name="lenet")
    flags = [gcc(), *STRICT, "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
             "-fno-omit-frame-pointer", "-o", "harness", "lenet_test.c", "lenet.c", "-lm"]
    sh(flags, tmp_path)
    run = sh(["./harness"], tmp_path)
    assert "lenet_run_with_arena: max error" in run.stdout and "lenet_run: max error" in run.stdout
    assert max_error(run.stdout) <= TOLERANCE and "runtime error" not in run.stderr
    # caller's arena only, no static one
    sh(flags + ["-DLENET_NO_STATIC_ARENA"], tmp_path)
    run = sh(["./harness"], tmp_path)
    assert "lenet_run:" not in run.stdout and max_error(run.stdout) <= TOLERANCE
    # control: an arena one float shorter than the highest byte the plan uses
    used = max(b.offset + b.nbytes for b in exp.plan.buffers)
    header = tmp_path / "lenet.h"
    header.write_text(header.read_text().replace(f"LENET_ARENA_BYTES {exp.arena_bytes} ",
                                                 f"LENET_ARENA_BYTES {used - 4} "))
    sh(flags, tmp_path)
    run = sh(["./harness"], tmp_path, check=False)
    assert run.returncode != 0 and "AddressSanitizer" in run.stderr, run.stderr[-2000:]


def test_float64_and_int64_io(tmp_path):
    rng = np.random.default_rng(0)
    g = cc.Graph("mixed")
    x = g.input("x", (2, 1, 6, 6), "float64")
    labels = g.input("labels", (2,), "int64")
    h = cc.relu(cc.conv(x, g.param("w", rng.standard_normal((3, 1, 3, 3))), g.param("b", rng.standard_normal(3))))
    logits = cc.dense(cc.flatten(h), g.param("fc", rng.standard_normal((4, 48))))
    g.output(logits, "logits")
    g.output(cc.cross_entropy(logits, labels), "loss")
    g.output(labels, "labels_out")                          # an input returned as is: copied
    feeds = [{"x": rng.standard_normal((2, 1, 6, 6)), "labels": np.array([1, 3])}]
    exp = export_c(g, tmp_path, name="mixed", weights_file=True, test_inputs=feeds)
    lib = (tmp_path / "mixed.c").read_text()
    assert "const int64_t *restrict labels" in lib and "double *restrict loss" in lib
    assert "const union { unsigned char bytes[216]; double v[27]; } mixed_p_w" in (tmp_path / "mixed_weights.c").read_text()
    sh([gcc(), *STRICT, "-O2", "-o", "harness", "mixed_test.c", "mixed.c", "mixed_weights.c", "-lm"], tmp_path)
    run = sh(["./harness"], tmp_path)
    assert max_error(run.stdout) <= 1e-12, run.stdout
    assert exp.arena_bytes == exp.plan.arena_bytes


def test_export_rejects_training_graphs_and_bad_names(tmp_path):
    g = lenet5()
    with pytest.raises(cc.ConvcError, match="C identifier"):
        export_c(g, tmp_path, name="my-model")
    w = g.value("fc3_b")
    g.assign(w, cc.add(w, 1.0))
    with pytest.raises(cc.ConvcError, match="training step"):
        export_c(g, tmp_path)


def test_arm_cross_compile_and_size_agree(exported, tmp_path):
    need_arm()
    g, exp = exported
    for src in lib_sources(exp):
        sh([*ARM, *STRICT, src, "-o", str(tmp_path / (src[:-2] + ".o"))], exp.dir)
    objs = sorted(str(p) for p in tmp_path.glob("*.o"))
    out = sh(["arm-none-eabi-size", "-B", *objs], tmp_path).stdout.splitlines()[1:]
    text, data, bss = (sum(int(line.split()[i]) for line in out) for i in range(3))
    rep = size_report(g, name=exp.name, tools=toolchain(prefer_arm=True), passes=exp.passes)
    assert "arm-none-eabi-gcc" in rep.toolchain
    assert abs(rep.flash - (text + data)) <= FLASH_MARGIN * (text + data), (rep.flash, text + data)
    assert bss + data == rep.static_ram == exp.arena_bytes
    weights = sum(g.node(p)["type"].nbytes for p in exp.plan.params)
    assert sum(r.const for r in rep.rows) == weights and rep.const >= weights
    assert sum(r.code for r in rep.rows) + rep.entry_code + rep.other_code == rep.code
    assert all(r.code > 0 for r in rep.rows), [r.node for r in rep.rows if r.code <= 0]
    # inlined into NAME_run_with_arena, every node's locals (the fused kernels' tiles) are in its frame
    assert rep.stack >= max(r.stack for r in rep.rows) > 0 and rep.ram == rep.static_ram + rep.stack
    table = rep.table()
    assert f"flash: {rep.flash:,} bytes" in table and f"RAM:   {rep.ram:,} bytes" in table


def main(argv) -> int:
    """``convc export ARGV...`` through the one command line."""
    return cli_main(["export", *argv])


def test_cli(tmp_path, capsys):
    parser = build_parser()
    args = parser.parse_args(["export", "lenet5", "-o", str(tmp_path / "a"), "--name", "net", "--weights-file"])
    assert args.fn(args) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["net.c", "net.h", "net_test.c", "net_weights.c"]
    # a model file with build(), one with a module-level graph, one with neither
    (tmp_path / "m1.py").write_text("from convc.models import lenet5\ndef build():\n    return lenet5(seed=3)\n")
    (tmp_path / "m2.py").write_text("import convc.models\ngraph = convc.models.mobilenet_tiny()\n")
    (tmp_path / "m3.py").write_text("x = 1\n")
    assert load_model(str(tmp_path / "m1.py")).name == "lenet5"
    assert load_model(str(tmp_path / "m2.py")).name == "mobilenet_tiny"
    capsys.readouterr()
    assert main([str(tmp_path / "m3.py"), "-o", str(tmp_path / "b")]) == 2
    assert "neither build()" in capsys.readouterr().err
    assert main(["no_such_model", "-o", str(tmp_path / "b")]) == 2
    assert "lenet5" in capsys.readouterr().err             # lists the bundled models
    assert main([str(tmp_path / "m1.py"), "--size"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^flash: [\d,]+ bytes = code [\d,]+ \+ const data [\d,]+$", out, re.M), out
    arena = export_c(lenet5(seed=3), tmp_path / "c", harness=False).arena_bytes
    assert re.search(rf"^RAM: +[\d,]+ bytes = static {arena:,} ", out, re.M), out


def _nearest_float32(q: Fraction) -> np.float32:
    """Round a rational to float32 exactly (ties to even), as a C compiler reads a literal."""
    f = np.float32(float(q))
    with np.errstate(over="ignore"):
        cands = [c for c in (np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf)))
                 if np.isfinite(c)]
    return min(cands, key=lambda c: (abs(Fraction(float(c)) - q), int(c.view(np.uint32)) & 1))


def test_weight_literals_read_back_exactly():
    rng = np.random.default_rng(5)
    edge = [0.0, -0.0, 1 / 3, 0.1, 1e-45, 1.17549435e-38, 3.4028235e38, -2.5e-12, 16777217.0, 123456789.0]
    values = np.concatenate([np.array(edge), rng.standard_normal(3000) * 10.0 ** rng.integers(-30, 30, 3000)])
    for dtype, ctype in ((np.float32, "float"), (np.float64, "double")):
        a = values.astype(dtype)
        lits = ", ".join(c_literals(a, per_line=50)).split(", ")
        assert len(lits) == a.size
        for lit, v in zip(lits, a):
            assert re.fullmatch(r"-?[0-9.]+(e[+-]?[0-9]+)?" + ("f" if ctype == "float" else ""), lit), lit
            q = Fraction(lit.lstrip("-").rstrip("f"))       # rounding is symmetric: sign apart
            back = _nearest_float32(q) if ctype == "float" else np.float64(float(q))   # float(): correctly rounded
            back = -back if lit.startswith("-") else back
            assert back == v and np.signbit(back) == np.signbit(v), (lit, repr(v))
    assert c_literals(np.array([np.nan, np.inf, -np.inf], np.float32)) == ["NAN, INFINITY, -INFINITY"]
    assert c_literals(np.array([5, -2**63], np.int64)) == ["INT64_C(5), INT64_MIN"]

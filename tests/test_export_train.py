"""Training export (``convc/export_train.py``): ``export_c(model, train=True)``
and ``convc export --train`` write the training step as static C99 that builds
with the strict flags, whose harness passes on the host and under ASan/UBSan,
whose float64 step matches PyTorch's SGD (momentum) and Adam within 1e-10,
whose checkpoint round-trips, and which cross-compiles for a Cortex-M4F with a
size report that agrees with ``arm-none-eabi-size``.

A small LeNet-style net keeps the suite fast; LeNet itself goes through the
command line. The ARM check skips without arm-none-eabi-gcc unless
CONVC_REQUIRE_ARM=1 (set by .ci/run).
"""
from __future__ import annotations

import ctypes
import re
import shutil

import numpy as np
import pytest

import convc as cc
from convc.export_train import COMMIT, early_commits, train_size_report, training_graphs
from convc.export import toolchain
from test_export import ARM, STRICT, gcc, main, max_error, need_arm, sh

# -O0: as thorough for ASan/UBSan here, and four times faster to build than -O1 -g
SANITIZE = ["-O0", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
QUICK = ["-O0"]         # builds whose speed does not matter (the main harness test builds with -O2)
OPTIMIZERS = {"sgd-momentum": lambda: cc.SGD(lr=0.05, momentum=0.9), "adam": lambda: cc.Adam(lr=0.01)}


def small_lenet(batch=2, dtype="float32", seed=0) -> cc.Graph:
    """LeNet's structure at a tenth of its size: conv3x3 (4, pad 1) + ReLU, max
    pool, conv3x3 (6) + ReLU, max pool, dense 16 + ReLU, dense 10; 1x12x12 in."""
    rng = np.random.default_rng(seed)
    g = cc.Graph("small_lenet")

    def param(name, shape):
        return g.param(name, rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:])), dtype)
    x = g.input("x", (batch, 1, 12, 12), dtype)
    h = cc.max_pool(cc.relu(cc.conv(x, param("c1_w", (4, 1, 3, 3)), param("c1_b", (4,)), padding=1)), 2)
    h = cc.max_pool(cc.relu(cc.conv(h, param("c2_w", (6, 4, 3, 3)), param("c2_b", (6,)))), 2)
    h = cc.relu(cc.dense(cc.flatten(h), param("f1_w", (16, 24)), param("f1_b", (16,))))
    g.output(cc.dense(h, param("f2_w", (10, 16)), param("f2_b", (10,))), "logits")
    return g


def build_harness(exp, flags=("-O2",)):
    sh([gcc(), *STRICT, *flags, "-o", "harness", f"{exp.name}_test.c", f"{exp.name}.c", "-lm"], exp.dir)
    return sh(["./harness"], exp.dir, check=False)


@pytest.fixture(scope="module", params=list(OPTIMIZERS))
def exported(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"train-{request.param}")
    return request.param, cc.export_c(small_lenet(), out, name="tnet", train=True,
                                      optimizer=OPTIMIZERS[request.param]())


def test_harness_builds_strict_passes_on_host_and_under_sanitizers(exported):
    opt, exp = exported
    for flags in (["-O2"], SANITIZE) if opt == "adam" else (["-O2"],):     # one sanitized build covers the code
        run = build_harness(exp, flags)
        assert run.returncode == 0 and run.stdout.rstrip().endswith("OK"), run.stdout + run.stderr[-3000:]
        assert "runtime error" not in run.stderr and max_error(run.stdout) <= 1e-4
        assert len(re.findall(r"^step \d: loss ", run.stdout, re.M)) == 3
        assert "checkpoint round trip: ok" in run.stdout
        assert re.search(r"^labels = -1: returned [1-9]\d*$", run.stdout, re.M), run.stdout


def test_harness_detects_a_wrong_step(exported, tmp_path):
    """The harness is a real check: a library that never writes c1_w's new
    value fails it (the later losses and the params differ)."""
    opt, exp = exported
    if opt != "sgd-momentum":
        pytest.skip("one optimizer proves the harness can fail")
    for f in exp.files:
        shutil.copy(f, tmp_path / f.name)
    lib = tmp_path / "tnet.c"
    text = lib.read_text()
    line = re.search(r"^ +node_\w+\([^\n]*/\* the new c1_w, written in place[^\n]*\n", text, re.M)
    assert line, "no call writes c1_w"
    lib.write_text(text[:line.start()] + text[line.end():])
    sh([gcc(), "-std=c99", *QUICK, "-o", "harness", "tnet_test.c", "tnet.c", "-lm"], tmp_path)
    run = sh(["./harness"], tmp_path, check=False)
    assert run.returncode == 1 and "FAIL" in run.stdout and max_error(run.stdout) > 1e-4, run.stdout


def test_header_documents_the_api(exported):
    _, exp = exported
    h = (exp.dir / "tnet.h").read_text()
    assert "int tnet_train_step(const float *x, const int64_t *labels, float *loss);" in h
    assert "int tnet_predict(const float *x, float *logits);" in h
    assert "int tnet_get_params(unsigned char *dst);" in h and "int tnet_set_params(const unsigned char *src);" in h
    macros = dict(re.findall(r"^#define (\w+) (\d+)", h, re.M))
    lib = exp.library
    assert int(macros["TNET_PARAMS_BYTES"]) == lib.state_bytes == exp.params_bytes
    assert int(macros["TNET_TRAINED_BYTES"]) == sum(small_lenet().node(p)["type"].nbytes
                                                    for p in small_lenet().param_names)
    assert int(macros["TNET_ARENA_BYTES"]) == max(lib.step_plan.arena_bytes, lib.predict_plan.arena_bytes)
    assert int(macros["TNET_X_SIZE"]) == 2 * 144 and int(macros["TNET_LABELS_SIZE"]) == 2
    # the checkpoint layout table: back to back, trained params first, in the order the library copies them
    rows = layout(h)
    assert [r[2] for r in rows[:8]] == small_lenet().param_names
    assert all(a[0] + a[1] == b[0] for a, b in zip(rows, rows[1:])) and rows[-1][0] + rows[-1][1] == lib.state_bytes


def layout(header: str) -> list[tuple[int, int, str]]:
    """(offset, bytes, name) of each checkpoint item, from NAME.h's table."""
    return [(int(o), int(b), n) for o, b, n in re.findall(r"^ \*\s+(\d+)\s+(\d+)\s+([\w.]+): float", header, re.M)]


def test_params_live_in_ram_once_and_predict_shares_the_code(exported):
    _, exp = exported
    text = (exp.dir / "tnet.c").read_text()
    lib = exp.library
    for s in lib.state:             # one non-const array per trained param / state item, nothing const of it
        sym = s["var"].removesuffix(".v")
        assert len(re.findall(rf"^static (?!const)[^\n]*\b{sym}\b", text, re.M)) == 1, sym
        assert not re.search(rf"^static const [^\n]*\b{sym}\b", text, re.M), sym
    assert re.search(r"^static float tnet_s_c1_w_momentum\[36\];|^static float tnet_s_c1_w_adam_m\[36\];", text,
                     re.M), "zero optimizer state is .bss (no initializer)"
    # the updates' elementwise chains write over their dead inputs (AFTER_COMMIT: inplace_elementwise)
    assert lib.step_plan.inplace and all(lib.step.node(n)["op"] in ("mul", "add", "sub")
                                         for n in lib.step_plan.inplace), lib.step_plan.inplace
    # predict's forward nodes call the step's functions: fewer functions than the two schedules' nodes
    fns = re.findall(r"^static (?:void|int) (node_\w+)\(", text, re.M)
    assert len(fns) < len(lib.step_plan.order) + len(lib.predict_plan.order)
    predict = text[text.index("int tnet_predict("):]
    called = set(re.findall(r"\b(node_\w+)\(", predict[:predict.index("\n}\n")]))
    step = text[text.index("int tnet_train_step("):]
    assert called & set(re.findall(r"\b(node_\w+)\(", step[:step.index("\n}\n")])), "no shared node function"


def test_updates_are_committed_in_place_after_the_checks():
    step, predict, trained = training_graphs(small_lenet(), optimizer=cc.Adam())
    from convc.export_train import TRAIN_PASSES
    from convc.passes import run as run_passes
    from convc.schedule import plan as make_plan

    gs = run_passes(step, TRAIN_PASSES)
    gc, commits = early_commits(gs)
    p = make_plan(gc)
    assert not gc.assigns and set(commits.values()) == set(gs.assigns)
    pos = {n: i for i, n in enumerate(p.order)}
    check = pos[next(n for n in p.order if gc.node(n)["op"] == "cross_entropy")]
    for label, param in commits.items():
        writer = gc.outputs[label]
        assert label == COMMIT + param and p.storage[writer] == ("output", label)
        assert pos[writer] > check
        # nothing reads the old value after the new one is written
        readers = [u for u in gc.nx.successors(param) if u in pos]
        assert all(pos[u] <= pos[writer] for u in readers), (param, writer)
    # the Adam moments are written by the node that computes them (it does not read them); a param by a copy
    assert any(not gc.outputs[f"{COMMIT}{m}"].endswith(".commit") for m in gs.assigns if m.endswith(".adam_m"))
    assert gc.outputs[f"{COMMIT}c1_w"] == "c1_w.commit"
    # the arena is smaller than with every new value alive until a copy after the last node
    assert p.arena_bytes < make_plan(gs).arena_bytes


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_float64_steps_match_torch_and_the_checkpoint_round_trips(opt, tmp_path):
    torch = pytest.importorskip("torch")
    g = small_lenet(batch=3, dtype="float64", seed=1)
    exp = cc.export_c(g, tmp_path, name="t64", train=True, optimizer=OPTIMIZERS[opt](), harness=False)
    sh([gcc(), *STRICT, "-O1", "-shared", "-fPIC", "-o", "libt64.so", "t64.c", "-lm"], tmp_path)
    so = ctypes.CDLL(str(tmp_path / "libt64.so"))
    dbl, i64 = ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_int64)

    # the same net in torch, with the same weights
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(4, 6, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                              torch.nn.Linear(24, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10)).double()
    tp = [net[0].weight, net[0].bias, net[3].weight, net[3].bias, net[7].weight, net[7].bias, net[9].weight,
          net[9].bias]
    with torch.no_grad():
        for t, n in zip(tp, g.param_names):
            t.copy_(torch.from_numpy(np.array(g.node(n)["value"])))
    o = OPTIMIZERS[opt]()
    topt = torch.optim.SGD(net.parameters(), lr=o.lr, momentum=o.momentum) if opt.startswith("sgd") else \
        torch.optim.Adam(net.parameters(), lr=o.lr)
    rng = np.random.default_rng(7)
    batches = [(rng.standard_normal((3, 1, 12, 12)), rng.integers(0, 10, 3)) for _ in range(2)]
    rows = layout((tmp_path / "t64.h").read_text())
    blob = (ctypes.c_ubyte * exp.params_bytes)()
    assert so.t64_get_params(blob) == 0
    first = bytes(blob)
    losses = []
    for x, y in batches:
        loss = ctypes.c_double()
        xs, ys = np.ascontiguousarray(x), np.ascontiguousarray(y, np.int64)
        assert so.t64_train_step(xs.ctypes.data_as(dbl), ys.ctypes.data_as(i64), ctypes.byref(loss)) == 0
        losses.append(loss.value)
        topt.zero_grad()
        want = torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
        want.backward()
        topt.step()
        assert abs(loss.value - want.item()) <= 1e-10 * max(1.0, abs(want.item())), (loss.value, want.item())
        assert so.t64_get_params(blob) == 0
        got = {n: np.frombuffer(bytes(blob)[o_:o_ + b], np.float64) for o_, b, n in rows}
        for t, n in zip(tp, g.param_names):
            w = t.detach().numpy().reshape(-1)
            assert np.max(np.abs(got[n] - w)) <= 1e-10 * max(1.0, np.max(np.abs(w))), n
    # checkpoint round trip: back to the first state, the first step again gives the same loss, bit for bit
    assert so.t64_set_params((ctypes.c_ubyte * exp.params_bytes).from_buffer_copy(first)) == 0
    assert so.t64_get_params(blob) == 0 and bytes(blob) == first
    loss = ctypes.c_double()
    x, y = (np.ascontiguousarray(a) for a in (batches[0][0], batches[0][1].astype(np.int64)))
    assert so.t64_train_step(x.ctypes.data_as(dbl), y.ctypes.data_as(i64), ctypes.byref(loss)) == 0
    assert loss.value == losses[0]
    # predict reads the trained params
    out = np.zeros((3, 10))
    assert so.t64_predict(x.ctypes.data_as(dbl), out.ctypes.data_as(dbl)) == 0
    assert so.t64_get_params(blob) == 0
    now = {n: np.frombuffer(bytes(blob)[o_:o_ + b], np.float64).reshape(g.node(n)["type"].shape)
           for o_, b, n in rows if n in g.param_names}
    ref = cc.reference.evaluate(g, {"x": x}, now)["logits"]
    assert np.max(np.abs(out - ref)) <= 1e-12


def test_trainer_exports_its_current_state(tmp_path):
    g = small_lenet(batch=2)
    labels = g.input("labels", (2,), "int64")
    t = cc.Trainer(g, cc.cross_entropy(g.value(g.outputs["logits"]), labels), optimizer=cc.SGD(lr=0.05, momentum=0.9),
                   target="numpy")
    rng = np.random.default_rng(3)
    t.step({"x": rng.standard_normal((2, 1, 12, 12)).astype(np.float32), "labels": np.array([1, 7])})
    exp = cc.export_c(t, tmp_path, name="tr", train=True)
    run = build_harness(exp, QUICK)
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout
    # the library starts from the Trainer's weights and momentum, not the graph's initial ones
    sh([gcc(), *STRICT, *QUICK, "-shared", "-fPIC", "-o", "libtr.so", "tr.c", "-lm"], tmp_path)
    blob = (ctypes.c_ubyte * exp.params_bytes)()
    assert ctypes.CDLL(str(tmp_path / "libtr.so")).tr_get_params(blob) == 0
    state = {**t.params, **t.optimizer_state()}
    for o, b, n in layout((tmp_path / "tr.h").read_text()):
        assert np.array_equal(np.frombuffer(bytes(blob)[o:o + b], np.float32), state[n].reshape(-1)), n
    assert not np.array_equal(t.params["c1_w"], g.node("c1_w")["value"])


def test_refusals(tmp_path, monkeypatch):
    with monkeypatch.context() as m:        # rendering is capped by this host's memory, as the inference export
        m.setenv("CONVC_MAX_MEMORY", "64K")
        with pytest.raises(cc.ConvcError, match="training export of graph 'small_lenet_train'.*as C literals"):
            cc.export_c(small_lenet(), tmp_path, train=True)
    g = small_lenet()
    g.output(cc.relu(g.value(g.outputs["logits"])), "second")
    with pytest.raises(cc.ConvcError, match="2 outputs"):
        cc.export_c(g, tmp_path, train=True)
    with pytest.raises(cc.ConvcError, match="int8"):
        cc.export_c(small_lenet(), tmp_path, train=True, int8=True)
    with pytest.raises(cc.ConvcError, match="fold_batch_norm"):
        cc.export_c(small_lenet(), tmp_path, train=True, passes=["fold_batch_norm"])
    with pytest.raises(cc.ConvcError, match="loss 'hinge'"):
        cc.export_c(small_lenet(), tmp_path, train=True, loss="hinge")
    with pytest.raises(cc.ConvcError, match="for train=True"):
        cc.export_c(small_lenet(), tmp_path, optimizer=cc.Adam())
    with pytest.raises(cc.ConvcError, match="training step"):
        step, _, _ = training_graphs(small_lenet())
        cc.export_c(step, tmp_path)


def test_mse_loss(tmp_path):
    exp = cc.export_c(small_lenet(), tmp_path, name="m", train=True, loss="mse", optimizer=cc.SGD(lr=0.01))
    assert "int m_train_step(const float *x, const float *targets, float *loss);" in (tmp_path / "m.h").read_text()
    run = build_harness(exp, QUICK)
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout


def test_cli(tmp_path, capsys):
    """convc export --train: LeNet itself (--batch rebuilds it) written out, and
    --size of a model file with training RAM beside inference RAM (host
    compiler or arm-none-eabi-gcc)."""
    assert main(["lenet5", "--train", "--optimizer", "adam", "--lr", "0.001", "--batch", "2", "-o", str(tmp_path),
                 "--name", "lt"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lt.c", "lt.h", "lt_test.c"]
    h = (tmp_path / "lt.h").read_text()
    assert "int lt_train_step(const float *x, const int64_t *labels, float *loss);" in h
    macros = dict(re.findall(r"^#define (\w+) (\d+)", h, re.M))
    assert int(macros["LT_X_SIZE"]) == 2 * 28 * 28 and int(macros["LT_TRAINED_BYTES"]) == 61706 * 4
    assert int(macros["LT_PARAMS_BYTES"]) == 3 * 61706 * 4 + 8         # params, Adam's m and v, its step count
    model = tmp_path / "small.py"
    model.write_text("from test_export_train import small_lenet\ndef build():\n    return small_lenet()\n")
    capsys.readouterr()
    assert main([str(model), "--train", "--momentum", "0.9", "--size"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"^training RAM: ([\d,]+) bytes = params ([\d,]+) \+ optimizer state ([\d,]+) \+ arena ([\d,]+)",
                  out, re.M)
    assert m, out
    ram, params, state, arena = (int(v.replace(",", "")) for v in m.groups())
    assert params == state == 4 * sum(small_lenet().node(p)["type"].size for p in small_lenet().param_names)
    assert arena > 0 and ram > params + state + arena
    assert re.search(r"^inference RAM: [\d,]+ bytes", out, re.M) and re.search(r"^flash +[\d,]+ +[\d,]+$", out, re.M)
    assert main(["lenet5", "--lr", "0.1", "-o", str(tmp_path / "b")]) == 2
    assert "for --train" in capsys.readouterr().err
    assert main([str(model), "--train", "--optimizer", "adam", "--momentum", "0.9", "-o", str(tmp_path / "c")]) == 2
    assert main([str(model), "--train", "--batch", "4", "-o", str(tmp_path / "c")]) == 2
    assert "--batch rebuilds a bundled model" in capsys.readouterr().err


def test_arm_cross_compile_and_size_agree(exported, tmp_path):
    need_arm()
    opt, exp = exported
    if opt != "adam":
        pytest.skip("one optimizer is enough for the cross build")
    sh([*ARM, *STRICT, "tnet.c", "-o", str(tmp_path / "tnet.o")], exp.dir)
    text, data, bss = (int(v) for v in sh(["arm-none-eabi-size", "-B", str(tmp_path / "tnet.o")],
                                          tmp_path).stdout.splitlines()[1].split()[:3])
    rep = train_size_report(small_lenet(), name="tnet", tools=toolchain(prefer_arm=True), optimizer=OPTIMIZERS[opt]())
    assert "arm-none-eabi-gcc" in rep.toolchain
    assert rep.static_ram == data + bss >= rep.state + rep.arena
    assert rep.flash == text + data and rep.code > 0
    assert (rep.state, rep.arena) == (exp.library.state_bytes, exp.library.arena_bytes)
    table = rep.table()
    assert f"training RAM: {rep.ram:,} bytes" in table and "inference RAM:" in table
    # the inference export of the same graph keeps its weights in flash: its static RAM is the arena alone
    assert rep.inference.static_ram == rep.inference.arena < rep.static_ram

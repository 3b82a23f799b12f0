"""Modules and Trainers pickle: unpickled in another process (spawn, fork)
they compute exactly what the original computes, from the compile cache or
rebuilt there (issue 17, item 3)."""
from __future__ import annotations

import multiprocessing
import pickle
import shutil
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

import convc as cc
import helpers
from convc.runtime import build, cache
from convc.runtime.module import PICKLE_FORMAT, StateVersionError, pickled


def _net(seed: int = 0) -> cc.Graph:
    """A conv net whose default pipeline folds params (the Winograd kernel
    transform of the 3x3 conv) and keeps others (the dense layer)."""
    rng = np.random.default_rng(seed)
    g = cc.Graph("travel")
    x = g.input("x", (2, 8, 12, 12))
    h = cc.relu(cc.conv(x, g.param("w1", rng.standard_normal((16, 8, 3, 3)) * 0.2, "float32"),
                        g.param("b1", rng.standard_normal(16) * 0.1, "float32"), padding=1))
    h = cc.max_pool(h, 2)
    y = cc.dense(cc.flatten(h), g.param("fc", rng.standard_normal((5, 16 * 36)) * 0.05, "float32"))
    g.output(y, "y")
    return g


def _feeds(seed: int = 1) -> dict:
    return {"x": np.random.default_rng(seed).standard_normal((2, 8, 12, 12)).astype(np.float32)}


def _train_graph(seed: int = 0):
    rng = np.random.default_rng(seed)
    g = cc.Graph("travel_train")
    x = g.input("x", (4, 1, 8, 8))
    labels = g.input("labels", (4,), "int64")
    h = cc.relu(cc.conv(x, g.param("w", rng.standard_normal((3, 1, 3, 3)) * 0.3, "float32"),
                        g.param("b", np.zeros(3), "float32")))
    logits = cc.dense(cc.flatten(h), g.param("fc", rng.standard_normal((5, 3 * 36)) * 0.1, "float32"))
    g.output(logits, "logits")
    return g, cc.cross_entropy(logits, labels)


def _batches(n: int, seed: int = 2) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, 1, 8, 8)).astype(np.float32), "labels": rng.integers(0, 5, 4)}
            for _ in range(n)]


# -- what the child processes do (top level: a spawned child imports them) -------------------------
def _run(mod, feeds):
    return mod.run(feeds)


def _describe(mod):
    """What a child sees of an unpickled module: its kind, target, library
    and device, and the compile-cache counters of that process."""
    return dict(cls=type(mod).__name__, target=mod.target, library=str(getattr(mod, "library_path", "")),
                device=getattr(mod, "device", None), stats=dict(cache.STATS))


def _trainer_then_step(trainer, batch):
    """The unpickled Trainer's state, then the step it takes on ``batch``."""
    before = dict(params=trainer.params, optimizer=trainer.optimizer_state(), steps=trainer.steps)
    loss = trainer.step(batch)
    return before, dict(loss=loss, params=trainer.params, optimizer=trainer.optimizer_state(), steps=trainer.steps)


@pytest.fixture(scope="module")
def spawned():
    """One worker process started with spawn (a fresh interpreter: nothing
    of this process's modules, libraries or OpenCL context)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


def _exactly(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, f"{what}: {k}"
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{what}: {k} differs")


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_process_pool_maps_a_module_over_batches(method):
    """Runs first: forked before this process starts other helper threads.
    The parent runs the module's parallel loop on two threads before the
    pool forks: libgomp's team then exists only in the parent, and a forked
    child that used it would wait forever (runtime/threads.py runs forked
    children on one thread)."""
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"the {method} start method is not available on this platform")
    mod = cc.compile(_net(), target="c")
    assert "omp parallel" in mod.source
    batches = [_feeds(seed) for seed in range(4)]
    threads = cc.get_num_threads()
    cc.set_num_threads(2)
    try:
        expected = [mod.run(feeds) for feeds in batches]
    finally:
        cc.set_num_threads(threads)
    pool = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context(method))
    try:
        results = list(pool.map(_run, [mod] * len(batches), batches, timeout=120))
    finally:
        workers = list(pool._processes.values())        # a hung worker must not hang the test run
        pool.shutdown(wait=False, cancel_futures=True)
        for w in workers:
            w.join(timeout=30)
            if w.is_alive():
                w.kill()
    for want, res in zip(expected, results):
        _exactly(want, res, f"{method} worker")


@pytest.mark.parametrize("target", helpers.TARGETS)
def test_module_round_trip_in_a_spawned_process(target, spawned):
    mod = cc.compile(_net(), target=target)
    # values set after compile travel too: a param the compiled graph keeps
    # (fc) and one only a folded constant reads (w1, under Winograd on C)
    rng = np.random.default_rng(5)
    mod.set_params({"fc": rng.standard_normal((5, 16 * 36)) * 0.05, "w1": rng.standard_normal((16, 8, 3, 3)) * 0.2})
    feeds = _feeds()
    here = mod.run(feeds)
    data = pickle.dumps(mod)
    assert b"cffi" not in data and b"_lib" not in data, "a pickled module must not hold cffi objects"
    there = spawned.submit(_run, mod, feeds).result(timeout=600)
    _exactly(here, there, f"{target} module unpickled in a spawned process")
    seen = spawned.submit(_describe, mod).result(timeout=600)
    assert (seen["cls"], seen["target"]) == (type(mod).__name__, target)
    if target != "numpy":           # the child found the library in the (shared) compile cache
        assert seen["library"] == str(mod.library_path)
    if target == "opencl":          # the device was chosen again, in the child
        assert seen["device"] == mod.device
    again = pickle.loads(data)      # and in this process, from the bytes
    _exactly(here, again.run(feeds), f"{target} module unpickled in-process")
    _exactly(mod.get_params(), again.get_params(), f"{target} params after the round trip")


@pytest.mark.parametrize("optimizer, target", [(cc.SGD(lr=0.1, momentum=0.9, weight_decay=1e-3), "c"),
                                               (cc.Adam(lr=0.01), "c"), (cc.Adam(lr=0.01), "opencl")],
                         ids=["sgd_momentum-c", "adam-c", "adam-opencl"])
def test_trainer_round_trip_continues_exactly(optimizer, target, spawned):
    if target not in helpers.TARGETS:
        pytest.skip(f"no OpenCL device: {helpers.OPENCL_MISSING}")
    g, loss = _train_graph()
    trainer = cc.Trainer(g, loss, optimizer=optimizer, target=target)
    batches = _batches(3)
    for b in batches[:2]:
        trainer.step(b)
    state = dict(params=trainer.params, optimizer=trainer.optimizer_state(), steps=trainer.steps)
    assert state["optimizer"] and all(np.any(v != 0) for v in state["optimizer"].values())
    there_before, there_after = spawned.submit(_trainer_then_step, trainer, batches[2]).result(timeout=600)
    here = pickle.loads(pickle.dumps(trainer))
    for what, other in (("spawned", there_before), ("in-process", dict(
            params=here.params, optimizer=here.optimizer_state(), steps=here.steps))):
        assert other["steps"] == state["steps"] == 2, what
        _exactly(state["params"], other["params"], f"{what}: trained params")
        _exactly(state["optimizer"], other["optimizer"], f"{what}: optimizer state")
    # the next step: the one the original takes, bit for bit
    loss_here = trainer.step(batches[2])
    assert there_after["loss"] == loss_here and there_after["steps"] == trainer.steps == 3
    _exactly(trainer.params, there_after["params"], "params after the next step")
    _exactly(trainer.optimizer_state(), there_after["optimizer"], "optimizer state after the next step")
    assert here.step(batches[2]) == loss_here
    _exactly(trainer.predict({"x": batches[0]["x"]}), here.predict({"x": batches[0]["x"]}), "predict")


def test_what_travels_is_the_graph_as_compiled():
    """The graph as cc.compile was given it, before the passes (they run
    again where the module is unpickled), not later changes to it."""
    g = _net(3)
    mod = cc.compile(g, target="c")
    given = set(g.nx)
    extra = cc.relu(g.value("x"))
    g.output(extra, "extra")                        # after compile: not part of the module
    again = pickle.loads(pickle.dumps(mod))
    assert list(again.outputs) == ["y"]
    assert set(again.source_graph().nx) == given and extra.name not in again.source_graph().nx
    assert "conv" in {d["op"] for _, d in again.source_graph().nx.nodes(data=True)}      # before the passes
    assert sorted(d["op"] for _, d in again.graph.nx.nodes(data=True)) == \
        sorted(d["op"] for _, d in mod.graph.nx.nodes(data=True))                         # the same passes ran
    _exactly(mod.run(_feeds()), again.run(_feeds()), "round trip")


def test_a_deleted_cache_entry_is_rebuilt():
    mod = cc.compile(_net(1), target="c")
    feeds = _feeds()
    data = pickle.dumps(mod)
    shutil.rmtree(mod.library_path.parent)              # the entry: library, source, manifest
    compiles = cache.STATS["compiles"]
    again = pickle.loads(data)
    assert cache.STATS["compiles"] == compiles + 1
    assert again.library_path.is_file()
    _exactly(mod.run(feeds), again.run(feeds), "rebuilt module")


def test_a_native_library_is_keyed_on_the_cpu(monkeypatch):
    """-march=native means another thing on another CPU: the cache key names
    what it means here (the compiler's target macros), so an unpickled module
    on another machine is never handed a library built for this one."""
    g = _net(2)
    first = cc.compile(g, target="c")
    portable = cc.compile(g, target="c", native=False)
    monkeypatch.setattr(build, "native_target", lambda cc_: "#define __SOME_OTHER_CPU__ 1")
    compiles = cache.STATS["compiles"]
    other = cc.compile(g, target="c")
    assert cache.STATS["compiles"] == compiles + 1 and other.library_path != first.library_path
    assert cc.compile(g, target="c", native=False).library_path == portable.library_path    # not native: same
    assert cache.STATS["compiles"] == compiles + 1


@pytest.mark.parametrize("kind", ["module", "trainer"])
def test_a_pickle_from_another_convc_version_is_refused(kind):
    if kind == "module":
        obj = cc.compile(_net(), target="numpy")
    else:
        g, loss = _train_graph()
        obj = cc.Trainer(g, loss)
    fn, (k, fmt, version, payload) = obj.__reduce__()
    assert (k, fmt, version) == (kind, PICKLE_FORMAT, cc.__version__)

    class FromElsewhere:                        # what another convc would have written
        def __init__(self, fmt, version):
            self.args = fmt, version

        def __reduce__(self):
            return fn, (k, *self.args, payload)

    for fmt_, version_ in ((PICKLE_FORMAT + 1, "9.0.0"), (PICKLE_FORMAT, "0.0.1")):
        data = pickle.dumps(FromElsewhere(fmt_, version_))
        with pytest.raises(StateVersionError, match=rf"written by convc {version_} \(pickle format {fmt_}\), "
                                                    rf"this is convc {cc.__version__}"):
            pickle.loads(data)
    assert isinstance(pickle.loads(pickle.dumps(obj)), type(obj))


def test_the_version_check_comes_before_the_payload():
    """A payload another convc wrote may use classes this one lacks: the
    error must still be the version error, not an unpickling crash."""
    fn, (kind, _, _, _) = pickled("module", {})
    with pytest.raises(StateVersionError):
        fn(kind, PICKLE_FORMAT + 1, "9.0.0", b"\x80\x05not a pickle this convc can read")
    assert issubclass(StateVersionError, cc.ConvcError)

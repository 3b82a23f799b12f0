"""Schedule and memory plan (``convc.schedule.plan``).

Lifetimes are recomputed here from the graph and the plan's order (not taken
from the plan's own Buffer.start/end), so the no-overlap property checks the
plan against the graph, not against itself.
"""
from __future__ import annotations

import random

import networkx as nx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convc as cc
from convc.codegen.c import generate
from convc.schedule import plan as make_plan

ALIGN = 64


def align(n):
    return (n + ALIGN - 1) // ALIGN * ALIGN


def lenet(batch=1):
    rng = np.random.default_rng(0)
    r = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)  # noqa: E731
    g = cc.Graph("lenet")
    x = g.input("x", (batch, 1, 28, 28))
    h = cc.relu(cc.conv(x, r(6, 1, 5, 5), r(6), name="conv1"), name="relu1")       # 6x24x24
    h = cc.max_pool(h, 2, name="pool1")                                             # 6x12x12
    h = cc.relu(cc.conv(h, r(16, 6, 5, 5), r(16), name="conv2"), name="relu2")     # 16x8x8
    h = cc.max_pool(h, 2, name="pool2")                                             # 16x4x4
    h = cc.flatten(h, name="flat")                                                  # 256
    h = cc.relu(cc.dense(h, r(120, 256), r(120), name="fc1"), name="relu3")
    g.output(cc.dense(h, r(10, 120), r(10), name="fc2"), "logits")
    return g


def check_plan(g, p):
    """Plan invariants, with lifetimes derived from the graph."""
    live = set()
    for n in g.outputs.values():
        live |= {n} | nx.ancestors(g.nx, n)
    compute = {n for n in live if g.node(n)["op"] not in ("input", "param")}
    # order: every live compute node once, after all of its inputs; a reshape of
    # an intermediate is instead an alias: no code, its input's buffer
    assert sorted(p.order + list(p.aliases)) == sorted(compute), "order must hold exactly the live compute nodes"
    for a, src in p.aliases.items():
        assert g.node(a)["op"] in ("reshape", "flatten") and g.node(src)["op"] not in ("reshape", "flatten"), a
        assert p.storage[a] == p.storage[src] and a not in g.outputs.values(), a
    step = {n: i for i, n in enumerate(p.order)}
    for n in p.order:
        for i in g.inputs_of(n):
            i = p.aliases.get(i, i)
            if i in step:
                assert step[i] < step[n], f"{n} scheduled before its input {i}"
    # buffers: every live compute node that is not an output (or an alias) lives in the arena
    outs = set(g.outputs.values())
    by_node = {b.node: b for b in p.buffers}
    assert set(by_node) == compute - outs - set(p.aliases), (set(by_node) ^ (compute - outs - set(p.aliases)))
    for b in p.buffers:
        assert b.nbytes == g.node(b.node)["type"].nbytes
        assert b.offset >= 0 and b.offset % ALIGN == 0, (b.node, b.offset)
        assert b.offset + b.nbytes <= p.arena_bytes, (b.node, b.offset, b.nbytes, p.arena_bytes)
        assert p.storage[b.node] == ("arena", b.offset)
    # lifetimes from the graph: written at its step, read up to its last reader's step
    life = {}
    for n in by_node:
        views = [n] + [a for a, src in p.aliases.items() if src == n]
        readers = [step[u] for v in views for u in g.nx.successors(v) if u in step]
        life[n] = (step[n], max(readers))
    bufs = list(p.buffers)
    for i, a in enumerate(bufs):
        for b in bufs[i + 1:]:
            (s1, e1), (s2, e2) = life[a.node], life[b.node]
            if s1 <= e2 and s2 <= e1:         # both alive at some step
                disjoint = a.offset + a.nbytes <= b.offset or b.offset + b.nbytes <= a.offset
                assert disjoint, (f"{a.node} [{a.offset},{a.offset + a.nbytes}) life {life[a.node]} overlaps "
                                  f"{b.node} [{b.offset},{b.offset + b.nbytes}) life {life[b.node]}")
    return life


# -- LeNet ----------------------------------------------------------------------------------
def test_lenet_arena_reuses_memory():
    g = lenet()
    p = make_plan(g)
    check_plan(g, p)
    # intermediates (fc2 is the output): conv1, relu1 6*24*24*4 = 13824; pool1 6*12*12*4 = 3456;
    # conv2, relu2 16*8*8*4 = 4096; pool2 16*4*4*4 = 1024 (flat is pool2's buffer under a
    # second name); fc1, relu3 120*4 = 480 -> 512 aligned
    assert p.aliases == {"flat": "pool2"}
    hand = 2 * 13824 + 3456 + 2 * 4096 + 1024 + 2 * 512
    assert hand == 41344
    assert p.intermediate_bytes == hand
    assert p.arena_bytes < p.intermediate_bytes
    # conv1 and relu1 must coexist (relu reads conv): the peak cannot be below that
    assert p.arena_bytes >= 2 * 13824
    # on a chain the live set is (producer, consumer); the largest pair is conv1 + relu1
    # and every later pair packs below it
    assert p.arena_bytes == 2 * 13824


def test_lenet_c_matches_torch_and_reference():
    g = lenet(batch=2)
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2, 1, 28, 28)).astype(np.float32)
    got = cc.compile(g, target="c")(x=a)
    ref = cc.compile(g, target="numpy")(x=a)
    v = lambda n: torch.from_numpy(g.node(n)["value"])  # noqa: E731
    params = {n: v(n) for n in g.param_names}
    ins = {n: g.inputs_of(n) for n in ("conv1", "conv2", "fc1", "fc2")}
    t = torch.from_numpy(a)
    t = F.max_pool2d(F.relu(F.conv2d(t, params[ins["conv1"][1]], params[ins["conv1"][2]])), 2)
    t = F.max_pool2d(F.relu(F.conv2d(t, params[ins["conv2"][1]], params[ins["conv2"][2]])), 2)
    t = F.relu(F.linear(t.flatten(1), params[ins["fc1"][1]], params[ins["fc1"][2]]))
    want = F.linear(t, params[ins["fc2"][1]], params[ins["fc2"][2]]).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_plan_of_hand_built_diamond():
    """x -> a=relu(x) -> b=tanh(a), c=sigmoid(a) -> d=add(b,c) -> out=relu(d).
    Order a, b, c, d, out: a lives steps 0..2, b 1..3, c 2..3, d 3..4.
    a, b, c are alive together at step 2, so they need 3 slots; d can reuse a's."""
    g = cc.Graph("diamond")
    x = g.input("x", (4, 16))                    # 256 bytes per buffer
    a = cc.relu(x, name="a")
    b = cc.tanh(a, name="b")
    c = cc.sigmoid(a, name="c")
    d = cc.add(b, c, name="d")
    g.output(cc.relu(d, name="out"), "y")
    p = make_plan(g)
    life = check_plan(g, p)
    assert p.order == ["a", "b", "c", "d", "out"]
    assert life == {"a": (0, 2), "b": (1, 3), "c": (2, 3), "d": (3, 4)}
    assert p.intermediate_bytes == 4 * 256
    assert p.arena_bytes == 3 * 256
    offs = {b.node: b.offset for b in p.buffers}
    assert len({offs["a"], offs["b"], offs["c"]}) == 3 and offs["d"] not in (offs["b"], offs["c"])


# -- random DAGs ----------------------------------------------------------------------------------
def random_graph(seed, n_ops=None):
    """A random DAG of relu/sigmoid/add/mul/concat/conv/max_pool on (1, C, 6, 6)
    tensors, with 1-3 outputs picked at random (the rest may be dead)."""
    rnd = random.Random(seed)
    rng = np.random.default_rng(seed)
    g = cc.Graph(f"rand{seed}")
    vals = []
    for i in range(rnd.randint(1, 3)):
        vals.append(g.input(f"x{i}", (1, rnd.randint(1, 4), 6, 6)))
    for _ in range(n_ops or rnd.randint(3, 14)):
        kind = rnd.choice(("relu", "sigmoid", "add", "mul", "concat", "conv", "conv", "pool"))
        a = rnd.choice(vals[-4:] if rnd.random() < 0.7 else vals)
        if kind == "relu":
            v = cc.relu(a)
        elif kind == "sigmoid":
            v = cc.sigmoid(a)
        elif kind in ("add", "mul"):
            same = [b for b in vals if b.shape == a.shape]
            b = rnd.choice(same)
            if b is a and rnd.random() < 0.5:
                b = rng.standard_normal((a.shape[1], 1, 1)).astype(np.float32)   # broadcast constant
            v = (cc.add if kind == "add" else cc.mul)(a, b)
        elif kind == "concat":
            others = [b for b in vals if b.shape[2:] == a.shape[2:] and b.shape[1] + a.shape[1] <= 12]
            picks = [a] + rnd.sample(others, min(len(others), rnd.randint(1, 2)))
            v = cc.concat(picks, axis=1)
        elif kind == "conv":
            c_out = rnd.randint(1, 6)
            w = (rng.standard_normal((c_out, a.shape[1], 3, 3)) * 0.3).astype(np.float32)
            v = cc.conv(a, w, padding="same")
        else:
            if a.shape[2] < 4:
                v = cc.relu(a)
            else:
                v = cc.max_pool(a, 3, 1, 1)      # keeps 6x6
        vals.append(v)
    ops = [v for v in vals if v.op != "input"]
    outs = rnd.sample(ops, min(len(ops), rnd.randint(1, 3)))
    if ops[-1] not in outs and rnd.random() < 0.5:
        outs.append(ops[-1])
    for i, v in enumerate(outs):
        g.output(v, f"y{i}")
    return g


@pytest.mark.parametrize("chunk", range(4))
def test_random_dags_never_overlap_live_buffers(chunk):
    reused = 0
    for seed in range(chunk * 60, chunk * 60 + 60):
        g = random_graph(seed)
        p = make_plan(g)
        try:
            check_plan(g, p)
        except AssertionError as e:
            raise AssertionError(f"random graph seed={seed}:\n{g}\n{e}") from None
        reused += p.arena_bytes < p.intermediate_bytes
    assert reused > 5, "the random graphs should exercise reuse"


@pytest.mark.parametrize("seed", [3, 11, 17, 29, 1001])
def test_random_dags_c_matches_reference(seed):
    g = random_graph(seed, n_ops=14)
    rng = np.random.default_rng(seed)
    feeds = {n: rng.standard_normal(g.node(n)["type"].shape).astype(np.float32) for n in g.input_names}
    ref = cc.compile(g, target="numpy").run(feeds)
    got = cc.compile(g, target="c").run(feeds)
    assert set(got) == set(ref) == set(g.outputs)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=f"seed {seed} output {k}\n{g}")


# -- special output arrangements -------------------------------------------------------------------
def _run_both(g, feeds):
    return cc.compile(g, target="numpy").run(feeds), cc.compile(g, target="c").run(feeds)


def test_output_also_consumed_by_another_node():
    g = cc.Graph("consumed")
    x = g.input("x", (1, 2, 5, 5))
    w = np.arange(18, dtype=np.float32).reshape(1, 2, 3, 3) / 10
    r = cc.relu(x, name="r")
    g.output(r, "first")
    c = cc.conv(r, w, padding=1, name="c")
    g.output(cc.add(c, r, name="s"), "second")        # broadcast (1,1,5,5) + (1,2,5,5)
    a = np.random.default_rng(0).standard_normal((1, 2, 5, 5)).astype(np.float32)
    tr = F.relu(torch.from_numpy(a))
    want2 = (F.conv2d(tr, torch.from_numpy(w), padding=1) + tr).numpy()
    for res in _run_both(g, {"x": a}):
        np.testing.assert_allclose(res["first"], tr.numpy(), rtol=1e-6)
        np.testing.assert_allclose(res["second"], want2, rtol=1e-5, atol=1e-6)


def test_output_that_is_a_graph_input():
    g = cc.Graph("passthru")
    x = g.input("x", (2, 3))
    g.output(x, "echo")
    g.output(cc.tanh(x), "t")
    a = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    for res in _run_both(g, {"x": a}):
        np.testing.assert_array_equal(res["echo"], a)
        assert not np.shares_memory(res["echo"], a)
        np.testing.assert_allclose(res["t"], np.tanh(a), rtol=1e-6)


def test_only_output_is_a_graph_input():
    g = cc.Graph("identity")
    g.output(g.input("x", (4,)), "y")
    a = np.arange(4, dtype=np.float32)
    for res in _run_both(g, {"x": a}):
        np.testing.assert_array_equal(res["y"], a)


def test_output_that_is_a_param():
    g = cc.Graph("paramout")
    x = g.input("x", (2, 3))
    w = g.param("w", np.arange(6, dtype=np.float32).reshape(2, 3))
    g.output(w, "weights")
    g.output(cc.mul(x, w), "prod")
    a = np.full((2, 3), 2.0, np.float32)
    for res in _run_both(g, {"x": a}):
        np.testing.assert_array_equal(res["weights"], np.arange(6, dtype=np.float32).reshape(2, 3))
        np.testing.assert_array_equal(res["prod"], 2 * np.arange(6, dtype=np.float32).reshape(2, 3))
        res["weights"][:] = -1                     # the caller's copy, not the graph's param
    np.testing.assert_array_equal(cc.compile(g, target="numpy").run({"x": a})["weights"][0], [0, 1, 2])


def test_same_node_output_under_two_names():
    g = cc.Graph("twonames")
    x = g.input("x", (3, 4))
    s = cc.sigmoid(x, name="s")
    g.output(s, "a")
    g.output(s, "b")
    g.output(cc.relu(s), "c")
    a = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    want = torch.sigmoid(torch.from_numpy(a)).numpy()
    for res in _run_both(g, {"x": a}):
        np.testing.assert_allclose(res["a"], want, rtol=1e-6)
        np.testing.assert_allclose(res["b"], want, rtol=1e-6)
        np.testing.assert_allclose(res["c"], want, rtol=1e-6)
        assert not np.shares_memory(res["a"], res["b"])
        res["a"][:] = 0
        np.testing.assert_allclose(res["b"], want, rtol=1e-6)


def test_output_names_that_swap_node_names():
    """Output 'z' is node y and output 'y' is node z: storage must follow output names."""
    g = cc.Graph("swap")
    x = g.input("x", (2, 2))
    y = cc.relu(x, name="y")
    z = cc.mul(y, 3.0, name="z")
    g.output(y, "z")
    g.output(z, "y")
    a = np.array([[-1, 2], [3, -4]], np.float32)
    for res in _run_both(g, {"x": a}):
        np.testing.assert_array_equal(res["z"], np.maximum(a, 0))
        np.testing.assert_array_equal(res["y"], 3 * np.maximum(a, 0))
    mod = cc.compile(g, target="c")
    z_out, y_out = mod(x=a)                       # tuple in output declaration order
    np.testing.assert_array_equal(z_out, np.maximum(a, 0))


def test_dead_nodes_are_not_computed():
    g = cc.Graph("prune")
    x = g.input("x", (1, 1, 6, 6))
    live = cc.relu(x, name="alive_relu")
    wd = g.param("dead_weight", np.ones((4, 1, 3, 3), np.float32))
    d1 = cc.conv(x, wd, name="dead_conv")
    d2 = cc.sigmoid(d1, name="dead_sigmoid")
    cc.add(d2, 1.0, name="dead_add")
    cc.tanh(live, name="dead_tanh")               # dead branch hanging off a live node
    g.output(live, "y")
    p = make_plan(g)
    check_plan(g, p)
    assert p.order == ["alive_relu"]
    assert "dead_weight" not in p.params and p.params_bytes == 0
    src = generate(g).text
    assert "node_alive_relu" in src
    const = [n for n in g.inputs_of("dead_add") if n != "dead_sigmoid"]
    assert len(const) == 1
    for name in ("dead_weight", "dead_conv", "dead_sigmoid", "dead_add", "dead_tanh", const[0]):
        assert name not in src, [ln for ln in src.splitlines() if name in ln]
    a = np.linspace(-1, 1, 36, dtype=np.float32).reshape(1, 1, 6, 6)
    for res in _run_both(g, {"x": a}):
        assert set(res) == {"y"}
        np.testing.assert_array_equal(res["y"], np.maximum(a, 0))


def test_dead_nodes_are_not_evaluated_by_the_reference(monkeypatch):
    from convc.ops import get_op
    g = cc.Graph("dead_ref")
    x = g.input("x", (3,))
    cc.tanh(x, name="unused")
    g.output(cc.relu(x), "y")
    calls = []
    tanh = get_op("tanh")
    monkeypatch.setattr(type(tanh), "reference", lambda self, attrs, v: calls.append(1) or np.tanh(v))
    cc.compile(g, target="numpy").run({"x": np.zeros(3, np.float32)})
    assert calls == []

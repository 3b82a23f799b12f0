"""Schedule and memory plan (``convc.schedule.plan``).

Lifetimes are recomputed here from the graph and the plan's order (not taken
from the plan's own Buffer.start/end), so the no-overlap property checks the
plan against the graph, not against itself.
"""
from __future__ import annotations

import random
import re

import networkx as nx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convc as cc
import helpers
from convc import schedule
from convc.codegen.c import generate
from convc.codegen.opencl import generate as generate_cl
from convc.passes import PIPELINES, run as run_passes
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
    # an intermediate is instead an alias: no code, its input's buffer; so is a
    # joined concat: its inputs were written in its slices
    assert sorted(p.order + list(p.aliases) + p.joins) == sorted(compute), "order must hold the live compute nodes"
    for a, src in p.aliases.items():
        assert g.node(a)["op"] in ("reshape", "flatten") and g.node(src)["op"] not in ("reshape", "flatten"), a
        assert p.storage[a] == p.storage[src] and a not in g.outputs.values(), a
    check_views(g, p)
    step = {n: i for i, n in enumerate(p.order)}

    def writers(n):         # the scheduled nodes that write n's bytes
        n = p.aliases.get(n, n)
        if n in p.joins:
            return {w for i in g.inputs_of(n) for w in writers(i)}
        return {n} if n in step else set()
    for n in p.order:
        for i in g.inputs_of(n):
            for w in writers(i):
                assert step[w] < step[n], f"{n} scheduled before {w}, which writes its input {i}"
    # buffers: every live compute node that is not an output, an alias or a view lives in the arena
    outs = set(g.outputs.values())
    # (and a node's scratch, alive while it runs)
    by_node = {b.node: b for b in p.buffers}
    owners = compute - outs - set(p.aliases) - set(p.views)
    assert set(by_node) == owners | {f"{n} workspace" for n in p.workspace}, set(by_node) ^ owners
    for b in p.buffers:
        assert b.offset >= 0 and b.offset % ALIGN == 0, (b.node, b.offset)
        assert b.offset + b.nbytes <= p.arena_bytes, (b.node, b.offset, b.nbytes, p.arena_bytes)
        if b.node.endswith(" workspace"):
            assert p.workspace[b.node[:-len(" workspace")]] == b.offset
        else:
            assert b.nbytes == g.node(b.node)["type"].nbytes
            assert p.storage[b.node] == ("arena", b.offset)
    # lifetimes from the graph: first written by a node that writes into it, read up to
    # the last reader of it, of a view in it, or of a reshape of either
    life = {f"{n} workspace": (step[n], step[n]) for n in p.workspace}
    for n in owners:
        inside = [n] + [v for v, (h, _) in p.views.items() if h == n]
        names = inside + [a for a, src in p.aliases.items() if src in inside]
        readers = [step[u] for v in names for u in g.nx.successors(v) if u in step]
        life[n] = (min(step[w] for w in writers(n)), max(readers))
    bufs = list(p.buffers)
    for i, a in enumerate(bufs):
        for b in bufs[i + 1:]:
            (s1, e1), (s2, e2) = life[a.node], life[b.node]
            if s1 <= e2 and s2 <= e1:         # both alive at some step
                disjoint = a.offset + a.nbytes <= b.offset or b.offset + b.nbytes <= a.offset
                assert disjoint, (f"{a.node} [{a.offset},{a.offset + a.nbytes}) life {life[a.node]} overlaps "
                                  f"{b.node} [{b.offset},{b.offset + b.nbytes}) life {life[b.node]}")
    return life


def check_views(g, p):
    """Each joined concat's inputs sit back to back in its buffer (nested when
    the concat is itself a view), and only where the rule allows it."""
    final = set(g.outputs.values()) | set(g.assigns.values())
    root = lambda n: p.aliases.get(n, n)  # noqa: E731
    for c in p.joins:
        d = g.node(c)
        assert d["op"] == "concat" and all(e == 1 for e in d["type"].shape[:d["attrs"]["axis"]]), c
        srcs = [root(i) for i in g.inputs_of(c)]
        assert len(set(srcs)) == len(srcs), c
        host, at = p.views.get(c, (c, 0))
        for r in srcs:
            assert g.node(r)["op"] not in ("input", "param") and r not in final, (c, r)
            assert p.views[r] == (host, at), (c, r, p.views[r], (host, at))
            at += g.node(r)["type"].nbytes
        assert at == p.views.get(c, (c, 0))[1] + d["type"].nbytes
    joined = {root(i) for c in p.joins for i in g.inputs_of(c)}
    assert set(p.views) == joined | {a for a, src in p.aliases.items() if src in joined}
    for v, (h, at) in p.views.items():
        kind, where = p.storage[h]
        assert kind in ("arena", "output") and h not in p.views
        assert p.storage[v] == (("arena", where + at) if kind == "arena" else (kind, where)), v
    # the producers' slices of one buffer never overlap
    leaves = sorted((h, at, at + g.node(v)["type"].nbytes, v) for v, (h, at) in p.views.items()
                    if v not in p.joins and v not in p.aliases)
    for (h1, _, e1, v1), (h2, s2, _, v2) in zip(leaves, leaves[1:]):
        assert h1 != h2 or e1 <= s2, (v1, v2)


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
    # on the op record itself: activations may share one class (relu's reference is live here)
    monkeypatch.setattr(tanh, "reference", lambda attrs, v: calls.append(1) or np.tanh(v))
    cc.compile(g, target="numpy").run({"x": np.zeros(3, np.float32)})
    assert calls == []


# -- concat inputs written in their slices ------------------------------------------------------
def fire_net(batch=1, hw=16, blocks=2, name="fire", concat_out=False):
    """SqueezeNet-like fire modules: squeeze 1x1 + ReLU, then expand 1x1 and
    expand 3x3 (+ ReLU) both feeding a channel concat; a 1x1 conv + ReLU at
    the end (or the last concat is the output)."""
    rng = np.random.default_rng(0)
    r = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    g = cc.Graph(name)
    h, c = g.input("x", (batch, 16, hw, hw)), 16
    for i in range(blocks):          # expand convs of 64K+ MACs: big enough for GEMM/Winograd lowering
        s = cc.relu(cc.conv(h, r(8, c, 1, 1), r(8)), name=f"sq{i}")
        e1 = cc.relu(cc.conv(s, r(32, 8, 1, 1), r(32)), name=f"e1_{i}")
        e3 = cc.relu(cc.conv(s, r(32, 8, 3, 3), r(32), padding=1), name=f"e3_{i}")
        h, c = cc.concat([e1, e3], axis=1, name=f"cat{i}"), 64
    g.output(h if concat_out else cc.relu(cc.conv(h, r(10, c, 1, 1), r(10)), name="head"), "y")
    return g


def arena_pointer(src, var):
    """The byte offset of arena pointer ``var`` in the generated C."""
    m = re.search(rf"\*{var} = \(\w+ \*\)\(arena \+ (\d+)\);", src)
    assert m, f"no arena pointer {var}"
    return int(m.group(1))


def call_args(src, node):
    """The arguments of node ``node``'s call (its own function, or one it
    shares with a node of the same code: the call then names it)."""
    m = re.search(rf"^\s*node_{node}\((.*)\);$", src, re.M) or \
        re.search(rf"^\s*node_\w+\((.*)\);   /\* node {node} \*/$", src, re.M)
    assert m, f"no call of node_{node}"
    return [a.strip() for a in m.group(1).split(",")]


def test_fire_concat_producers_write_into_their_slices(monkeypatch):
    g = fire_net()
    p = make_plan(g)
    check_plan(g, p)
    slice_bytes = 32 * 16 * 16 * 4
    assert p.joins == ["cat0", "cat1"] and "cat0" not in p.order
    assert p.views == {"e1_0": ("cat0", 0), "e3_0": ("cat0", slice_bytes),
                       "e1_1": ("cat1", 0), "e3_1": ("cat1", slice_bytes)}
    # the concat's buffer is written from its first producer on and freed after its last reader
    step = {n: i for i, n in enumerate(p.order)}
    (reader,) = g.nx.successors("cat0")
    cat0 = next(b for b in p.buffers if b.node == "cat0")
    assert (cat0.start, cat0.end) == (step["e1_0"], step[reader])
    src = generate(g).text
    assert "node_cat" not in src                   # no code, no copy
    base = arena_pointer(src, "t_cat0")
    assert arena_pointer(src, call_args(src, "e1_0")[-1]) == base
    assert arena_pointer(src, call_args(src, "e3_0")[-1]) == base + slice_bytes
    assert call_args(src, reader)[0] == "t_cat0"   # its reader reads the whole buffer
    # OpenCL: pointers are offsets into the arena argument; no kernel for the concat
    cl = generate_cl(g)
    assert "cat0" not in " ".join(re.findall(r"__kernel void (\w+)", cl.kernels))
    at = cl.plan.storage["cat0"][1] + slice_bytes
    assert re.search(rf"node_e3_0\(.*, \(__global float \*\)\(arena \+ {at}\)\);", cl.kernels)
    # what it saves: the expand outputs' own buffers (and the concat's copy)
    monkeypatch.setattr(schedule, "concat_slices", lambda *args: {})
    copied = make_plan(g)
    assert copied.joins == [] and len(copied.order) == len(p.order) + 2
    assert p.intermediate_bytes == copied.intermediate_bytes - 4 * slice_bytes
    assert p.arena_bytes < copied.arena_bytes


FIRE_PIPELINES = {"none": "none", "default": "default",        # default: expand 1x1 as GEMM, 3x3 as Winograd
                  "im2col": [p for p in PIPELINES["default"] if p != "conv_to_winograd"]}     # 3x3 as im2col + GEMM


@pytest.mark.parametrize("pipeline", list(FIRE_PIPELINES))
def test_fire_modules_match_the_reference(pipeline):
    passes = FIRE_PIPELINES[pipeline]
    g = fire_net()
    a = np.random.default_rng(1).standard_normal((1, 16, 16, 16)).astype(np.float32)
    want = cc.compile(g, target="numpy")(x=a)
    lowered = run_passes(g, passes)
    p = make_plan(lowered)
    check_plan(lowered, p)
    assert p.joins == ["cat0", "cat1"], p.joins
    # what computes the slices (seen through the GEMM's unflattening reshape): a GEMM
    # writes its slice itself where bias and ReLU are fused into it, else the last of them does
    def computed_by(n):
        n = p.aliases.get(n, n)
        op = lowered.node(n)["op"]
        return computed_by(lowered.inputs_of(n)[0]) if op in ("relu", "add") else op
    producers = [computed_by(i) for c in p.joins for i in lowered.inputs_of(c)]
    assert producers == {"none": ["conv", "conv"] * 2, "default": ["matmul", "winograd_conv"] * 2,
                         "im2col": ["matmul", "matmul"] * 2}[pipeline]
    for target in [t for t in helpers.TARGETS if t != "numpy"]:
        mod = cc.compile(g, target=target, passes=passes)
        assert not any(n.startswith("cat") for n in mod.plan.order)
        # default: the 3x3 expands run as Winograd F(4x4, 3x3), whose float32 rounding is
        # about 1e-5 of max |y| (tests/test_winograd_f43.py measures it)
        helpers.assert_close(mod(x=a), want, atol=3e-5 * max(1.0, float(np.abs(want).max())),
                             what=f"{target}, passes={pipeline}")


def test_concat_output_is_the_callers_array():
    """A concat that is a graph output: its producers write into the caller's
    output array at their offsets."""
    g = fire_net(blocks=1, name="fire_out", concat_out=True)
    p = make_plan(g)
    check_plan(g, p)
    assert p.joins == ["cat0"] and p.storage["cat0"] == ("output", "y")
    assert p.storage["e3_0"] == ("output", "y") and p.views["e3_0"] == ("cat0", 32 * 256 * 4)
    src = generate(g).text
    assert "node_cat0" not in src
    assert call_args(src, "e1_0")[-1] == "out_y" and call_args(src, "e3_0")[-1] == f"(out_y + {32 * 256})"
    cl = generate_cl(g).kernels
    assert re.search(r"node_e3_0\(.*, \(out_y \+ 8192\)\);", cl) and "node_cat0" not in cl
    a = np.random.default_rng(2).standard_normal((1, 16, 16, 16)).astype(np.float32)
    want = cc.compile(g, target="numpy")(x=a)
    for target in [t for t in helpers.TARGETS if t != "numpy"]:
        for passes in ("none", "default"):
            helpers.assert_close(cc.compile(g, target=target, passes=passes)(x=a), want,
                                 what=f"{target} passes={passes}")


def check_targets(g, passes=("none", "default"), seed=0):
    """Every compiled target and pipeline against the reference interpreter."""
    rng = np.random.default_rng(seed)
    feeds = {n: rng.standard_normal(g.node(n)["type"].shape).astype(np.float32) for n in g.input_names}
    want = cc.compile(g, target="numpy").run(feeds)
    for target in [t for t in helpers.TARGETS if t != "numpy"]:
        for pl in passes:
            got = cc.compile(g, target=target, passes=pl).run(feeds)
            for k in want:
                helpers.assert_close(got[k], want[k], what=f"{g.name}: {target}, passes={pl}, output {k}")


def planned(g):
    p = make_plan(g)
    check_plan(g, p)
    return p


def branches(shape=(1, 2, 4, 4), name="g"):
    g = cc.Graph(name)
    x = g.input("x", shape)
    return g, x, cc.relu(x, name="a"), cc.sigmoid(x, name="b")


def test_concat_stays_a_copy_when_its_slices_interleave():
    g = fire_net(batch=2, name="fire2")           # channel concat with N=2: each slice is two blocks
    p = planned(g)
    assert p.joins == [] and p.views == {} and "cat0" in p.order
    assert "node_cat0" in generate(g).text
    g, x, a, b = branches((1, 2, 4, 4))
    g.output(cc.tanh(cc.concat([a, b], axis=2, name="c")), "y")    # along H with 2 channels
    assert planned(g).joins == []
    check_targets(g)


def test_concat_along_the_first_axis_is_always_contiguous():
    g, x, a, b = branches((2, 3, 4, 4))
    g.output(cc.tanh(cc.concat([a, b], axis=0, name="c")), "y")
    p = planned(g)
    assert p.joins == ["c"] and p.views == {"a": ("c", 0), "b": ("c", 2 * 3 * 16 * 4)}
    check_targets(g)


@pytest.mark.parametrize("case", ["graph input", "param", "same input twice", "same input through a reshape",
                                  "graph output", "assigned to a param"])
def test_concat_stays_a_copy_when_an_input_cannot_be_placed(case):
    g, x, a, b = branches()
    if case == "graph input":
        ins = [a, x]
    elif case == "param":
        ins = [a, g.param("w", np.ones((1, 2, 4, 4), np.float32))]
    elif case == "same input twice":
        ins = [a, b, a]
    elif case == "same input through a reshape":
        ins = [a, cc.reshape(a, (1, 2, 4, 4), name="ra")]
    elif case == "graph output":
        g.output(a, "a_out")
        ins = [a, b]
    else:
        w = g.param("w", np.zeros((1, 2, 4, 4), np.float32))
        g.assign(w, a)
        ins = [a, b]
    g.output(cc.tanh(cc.concat(ins, axis=1, name="c"), name="t"), "y")
    p = planned(g)
    assert p.joins == [] and p.views == {} and "c" in p.order, case
    if case != "assigned to a param":
        check_targets(g)


def test_other_readers_of_a_placed_input_read_its_slice():
    """``a`` is read by the concat, by ``b`` (which writes the next slice of the
    same buffer) and by ``late``, after the concat's reader: the concat's buffer
    must live until then, or the smaller buffers of the pooled branch, placed
    after it, would be put over ``a``'s slice."""
    g = cc.Graph("readers")
    x = g.input("x", (1, 4, 8, 8))
    a = cc.relu(x, name="a")
    b = cc.tanh(a, name="b")                      # reads slice 0, writes slice 1
    c = cc.concat([a, b], axis=1, name="c")
    q = cc.relu(cc.max_pool(cc.sigmoid(c, name="s"), 2, name="pooled"), name="q")
    g.output(cc.tanh(q), "y1")
    g.output(cc.mul(cc.relu(a, name="late"), 2.0), "y2")
    p = planned(g)
    assert p.joins == ["c"] and p.views == {"a": ("c", 0), "b": ("c", 1024)}
    step = {n: i for i, n in enumerate(p.order)}
    cbuf = next(buf for buf in p.buffers if buf.node == "c")
    assert (cbuf.start, cbuf.end) == (step["a"], step["late"]) and step["late"] > step["q"]
    check_targets(g)


def test_an_input_placed_in_one_concat_is_copied_by_another():
    g, x, a, b = branches()
    d = cc.mul(x, 3.0, name="d")
    c1 = cc.concat([a, b], axis=1, name="c1")
    c2 = cc.concat([d, a], axis=1, name="c2")     # a is c1's already: c2 copies it from there
    g.output(cc.add(cc.tanh(c1), cc.sigmoid(c2)), "y")
    p = planned(g)
    assert p.joins == ["c1"] and "c2" in p.order and p.views["a"] == ("c1", 0)
    step = {n: i for i, n in enumerate(p.order)}
    assert next(buf for buf in p.buffers if buf.node == "c1").end >= step["c2"]
    check_targets(g)


def test_nested_concats_share_one_buffer():
    g, x, a, b = branches()
    d = cc.mul(x, 3.0, name="d")
    c1 = cc.concat([a, b], axis=1, name="c1")
    c2 = cc.concat([c1, d], axis=1, name="c2")
    g.output(cc.tanh(c1, name="t1"), "y1")        # c1 is read on its own too
    g.output(cc.sigmoid(c2, name="t2"), "y2")
    p = planned(g)
    assert p.joins == ["c1", "c2"]
    assert p.views == {"a": ("c2", 0), "b": ("c2", 128), "c1": ("c2", 0), "d": ("c2", 256)}
    src = generate(g).text
    assert arena_pointer(src, "t_c1") == arena_pointer(src, "t_c2") == arena_pointer(src, "t_a")
    check_targets(g)
    g, x, a, b = branches(name="nested_out")     # the outer concat is the graph output
    c1 = cc.concat([a, b], axis=1, name="c1")
    g.output(cc.concat([cc.mul(x, 3.0, name="d"), c1], axis=1, name="c2"), "y")
    p = planned(g)
    assert p.storage["b"] == ("output", "y") and p.views["b"] == ("c2", 256)
    check_targets(g)


def test_concat_of_reshapes_places_their_sources():
    """An SSD-style head: flattened conv outputs joined along axis 1 (batch 1);
    the convs write into the joined buffer and the reshapes stay names."""
    rng = np.random.default_rng(5)
    g = cc.Graph("heads")
    x = g.input("x", (1, 3, 6, 6))
    h1 = cc.conv(x, rng.standard_normal((4, 3, 3, 3)).astype(np.float32), padding=1, name="h1")
    h2 = cc.conv(x, rng.standard_normal((2, 3, 1, 1)).astype(np.float32), name="h2")
    f1, f2 = cc.flatten(h1, name="f1"), cc.flatten(h2, name="f2")
    c = cc.concat([f1, f2], axis=1, name="c")
    g.output(cc.softmax(cc.reshape(c, (1, 6, 36), name="r"), axis=1), "y")
    p = planned(g)
    assert p.joins == ["c"] and p.aliases == {"f1": "h1", "f2": "h2", "r": "c"}
    assert p.views == {"h1": ("c", 0), "h2": ("c", 576), "f1": ("c", 0), "f2": ("c", 576)}
    check_targets(g)


@pytest.mark.parametrize("seed", [10, 18, 59])
def test_random_dags_with_joined_concats_match_the_reference(seed):
    """Random DAGs whose plan joins concats (nested in 18 and 59, into an output in 10)."""
    g = random_graph(seed, n_ops=14)
    assert planned(g).joins
    check_targets(g, passes=("none",), seed=seed)


@pytest.mark.parametrize("passes", ["embedded", "default"])
def test_export_writes_concat_inputs_into_their_slices(passes, tmp_path):
    """The embedded export binds the same views: producers write into the
    concat's buffer in the arena, or into the caller's output array."""
    import shutil
    import subprocess

    from convc.export import export_c

    if not shutil.which("gcc"):
        pytest.skip("gcc is not installed")
    for g in (fire_net(), fire_net(blocks=1, name="fire_out", concat_out=True)):
        exp = export_c(g, tmp_path / g.name, name="fire", passes=passes)
        assert exp.plan.joins and not any(n.startswith("cat") for n in exp.plan.order)
        lib = (tmp_path / g.name / "fire.c").read_text()
        assert "node_cat" not in lib
        cmd = ["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O2", "-o", "harness",
               "-DFIRE_TEST_TOLERANCE=1e-4", "fire_test.c", "fire.c", "-lm"]    # the bound asserted below
        for c in (cmd, ["./harness"]):
            run = subprocess.run(c, cwd=tmp_path / g.name, capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        m = re.search(r"^max_error (\S+)$", run.stdout, re.M)
        assert m and float(m.group(1)) <= 1e-4, run.stdout
        if shutil.which("arm-none-eabi-gcc"):        # the Cortex-M4F build of the same library
            arm = ["arm-none-eabi-gcc", "-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16",
                   "-std=c99", "-Wall", "-Wextra", "-Werror", "-Os", "-c", "fire.c"]
            run = subprocess.run(arm, cwd=tmp_path / g.name, capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, run.stderr[-2000:]

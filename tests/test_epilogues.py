"""Epilogues (convc/ops/epilogue.py) on every producer, the fuse_epilogues
pass that builds them after the lowerings, and fold_params (weight-only work
done at compile time)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convc as cc
from convc.passes import run as run_passes
from helpers import TARGETS, assert_close

ELEMENTWISE = {"add", "relu", "clip", "silu", "sigmoid", "mul", "leaky_relu", "hardswish", "tanh"}


def ops(g) -> Counter:
    return Counter(g.node(n)["op"] for n in g.nx.nodes)


# (name, producer op the pipeline must make, passes, conv shape: c_in, c_out, k, stride, n, transposed)
PRODUCERS = [
    ("direct", "conv", ["fuse_epilogues"], (3, 4, 3, 1, 6, False)),
    ("depthwise", "conv", ["conv_to_gemm", "fuse_epilogues"], (8, 8, 3, 2, 9, "depthwise")),
    ("winograd", "winograd_conv", ["conv_to_winograd", "fuse_epilogues"], (8, 8, 3, 1, 7, False)),
    ("gemm_im2col", "matmul", ["conv_to_gemm", "fuse_epilogues"], (16, 24, 3, 2, 15, False)),
    ("gemm_1x1", "matmul", ["conv_to_gemm", "fuse_epilogues"], (32, 48, 1, 1, 12, False)),
    ("col2im", "col2im", ["transposed_to_matmul", "fuse_epilogues"], (6, 5, 4, 2, 5, True)),
]
ACTS = [("relu", {}), ("silu", {}), ("clip", {"min": 0.0, "max": 6.0}), ("leaky_relu", {"negative_slope": -0.3})]
TORCH_ACTS = {"relu": F.relu, "silu": F.silu, "clip": lambda t: torch.clamp(t, 0, 6),
              "leaky_relu": lambda t: F.leaky_relu(t, -0.3)}


CASES = [(p, a, r) for p in PRODUCERS for a in ACTS for r in (False, True)]
CASE_IDS = [f"{p[0]}-{a[0]}-{'bias+residual' if r else 'bias'}" for p, a, r in CASES]


def add_producer_case(g, i, spec, act, residual, passes, feeds, want):
    """Case ``i`` in graph ``g``: conv (or conv_transpose) + bias, + residual,
    then the activation as separate nodes, float64, rewritten by ``passes``
    into one producer, and the gradients of x, w, b (and the residual) of
    L = sum(y * G) through it. Records feeds and torch's answers."""
    c_in, c_out, k, stride, n, kind = spec
    rng = np.random.default_rng(i)
    groups = c_in if kind == "depthwise" else 1
    x = rng.standard_normal((2, c_in, n, n))
    if kind is True:
        w = rng.standard_normal((c_in, c_out, k, k))
        tconv = lambda tx, tw, tb: F.conv_transpose2d(tx, tw, tb, stride=stride, padding=1)  # noqa: E731
    else:
        w = rng.standard_normal((c_out, c_in // groups, k, k))
        tconv = lambda tx, tw, tb: F.conv2d(tx, tw, tb, stride=stride, padding=k // 2, groups=groups)  # noqa: E731
    b = rng.standard_normal(c_out)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    ty = tconv(tx, tw, tb)
    r, G = rng.standard_normal(tuple(ty.shape)), rng.standard_normal(tuple(ty.shape))
    tr = torch.tensor(r, requires_grad=True)
    ty = TORCH_ACTS[act[0]](ty + tr if residual else ty)
    ty.backward(torch.tensor(G))

    sub = cc.Graph("epilogue")             # built alone, rewritten, then copied into g
    gx, gr = sub.input("x", x.shape, "float64"), sub.input("r", r.shape, "float64")
    gw, gb = sub.param("w", w), sub.param("b", b)
    y = (cc.conv_transpose(gx, gw, gb, stride=stride, padding=1, name="conv") if kind is True else
         cc.conv(gx, gw, gb, stride=stride, padding=k // 2, groups=groups, name="conv"))
    if residual:
        y = cc.add(y, gr, name="skip")
    sub.output(sub.add(act[0], [y], act[1], "act"), "y")
    fused = run_passes(sub, passes)
    names = {n: f"c{i}_{n}" for n in fused.nx.nodes}
    for n in fused.topological_order():
        d = fused.node(n)
        if d["op"] == "input":
            g.input(names[n], d["type"].shape, "float64")
        elif d["op"] == "param":
            g.param(names[n], d["value"])
        else:
            g.add(d["op"], [g.value(names[s]) for s in fused.inputs_of(n)], dict(d["attrs"]), names[n])
    yv = g.value(names[fused.outputs["y"]])
    g.output(yv, f"c{i}_y")
    wrt = [g.value(names[v]) for v in ("x", "w", "b")] + ([g.value(names["r"])] if residual else [])
    Gv = g.input(f"c{i}_G", G.shape, "float64")
    for key, d in zip(("dx", "dw", "db", "dr"), cc.grad(yv, wrt, grad_output=Gv)):
        g.output(d, f"c{i}_{key}")
    feeds.update({f"c{i}_x": x, f"c{i}_r": r, f"c{i}_G": G})
    want[i] = {"y": ty.detach().numpy(), "dx": tx.grad.numpy(), "dw": tw.grad.numpy(), "db": tb.grad.numpy(),
               **({"dr": tr.grad.numpy()} if residual else {})}
    return fused


@pytest.fixture(scope="module")
def producer_runs():
    """Every case in one graph, compiled once per target."""
    g, feeds, want, fused = cc.Graph("epilogues"), {}, {}, {}
    for i, ((name, op, passes, spec), act, residual) in enumerate(CASES):
        fused[i] = add_producer_case(g, i, spec, act, residual, passes, feeds, want)
    got = {t: cc.compile(g, target=t, passes="none").run(feeds) for t in TARGETS}
    return fused, got, want


@pytest.mark.parametrize("i", range(len(CASES)), ids=CASE_IDS)
def test_epilogue_on_every_producer(producer_runs, i):
    (name, op, passes, spec), act, residual = CASES[i]
    fused, got, want = producer_runs
    g = fused[i]
    counts = ops(g)
    assert not (ELEMENTWISE & set(counts)), f"{name}: left behind {dict(counts)}"
    (p,) = [n for n in g.nx.nodes if g.node(n)["op"] == op]
    a = g.node(p)["attrs"]
    assert a["activation"] == act[0] and bool(a.get("residual")) == residual
    assert ") then " in str(g), "print(g) shows the epilogue"
    for t in TARGETS:      # value and float64 gradients through the fused producer
        for k, w in want[i].items():
            assert_close(got[t][f"c{i}_{k}"], w, rtol=1e-9, atol=1e-10, what=f"{CASE_IDS[i]} {k} [{t}]")


def test_dense_and_matmul_epilogues():
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal((5, 7)), rng.standard_normal((4, 7)), rng.standard_normal(4)
    r = rng.standard_normal((5, 4))
    g = cc.Graph("dense")
    gx, gr = g.input("x", x.shape, "float64"), g.input("r", r.shape, "float64")
    y = cc.hardswish(cc.add(cc.dense(gx, g.param("w", w), g.param("b", b)), gr))
    g.output(y, "y")
    a = rng.standard_normal((2, 3, 6, 5))
    bm = rng.standard_normal((3, 6, 1))
    ga = g.input("a", a.shape, "float64")
    z = cc.sigmoid(cc.add(cc.matmul(ga, g.param("m", rng.standard_normal((2, 3, 5, 4)))), g.param("rowb", bm)))
    g.output(z, "z")
    fused = run_passes(g, ["fuse_epilogues"])
    assert not (ELEMENTWISE & set(ops(fused)))
    ref = cc.compile(g, target="numpy").run({"x": x, "r": r, "a": a})
    tx = torch.tensor(x)
    want = F.hardswish(F.linear(tx, torch.tensor(w), torch.tensor(b)) + torch.tensor(r)).numpy()
    assert_close(ref["y"], want, rtol=1e-12, atol=1e-12, what="dense reference")
    for t in TARGETS:
        got = cc.compile(fused, target=t, passes="none").run({"x": x, "r": r, "a": a})
        assert_close(got["y"], ref["y"], rtol=1e-12, atol=1e-12, what=f"dense epilogue [{t}]")
        assert_close(got["z"], ref["z"], rtol=1e-12, atol=1e-12, what=f"matmul row bias + sigmoid [{t}]")


def resnet_block(c=16, n=14, seed=0, with_bn=True):
    """conv-bn-relu-conv-bn + identity, relu (ResNet's basic block), float32."""
    rng = np.random.default_rng(seed)
    g = cc.Graph("block")
    x = g.input("x", (1, c, n, n))

    def bn(v, i):
        if not with_bn:
            return v
        return cc.batch_norm(v, g.param(f"m{i}", rng.standard_normal(c).astype(np.float32) * 0.1),
                             g.param(f"v{i}", rng.uniform(0.5, 2, c).astype(np.float32)),
                             g.param(f"g{i}", rng.uniform(0.5, 2, c).astype(np.float32)),
                             g.param(f"be{i}", rng.standard_normal(c).astype(np.float32)))
    w = lambda i: g.param(f"w{i}", rng.standard_normal((c, c, 3, 3)).astype(np.float32) * 0.1)  # noqa: E731
    h = cc.relu(bn(cc.conv(x, w(1), padding=1), 1))
    h = bn(cc.conv(h, w(2), padding=1), 2)
    g.output(cc.relu(cc.add(h, x)), "y")
    return g


def test_no_lowering_leaves_a_bias_or_activation_node_behind():
    from convc import models
    for g, pipelines in ((models.lenet5(), ("default", "train", "embedded")),
                         (models.mobilenet_tiny(), ("default", "train", "embedded")),
                         # training keeps batch_norm (its params train), which sits between conv and relu
                         (resnet_block(), ("default", "embedded"))):
        for pipeline in pipelines:
            lowered = run_passes(g, pipeline)
            left = ELEMENTWISE & set(ops(lowered))
            assert not left, f"{g.name} [{pipeline}]: {left} left as nodes:\n{lowered}"
    lenet = cc.compile(models.lenet5())
    assert not (ELEMENTWISE & set(ops(lenet.graph)))
    assert "node_conv1_relu_bias" not in lenet.source and "node_conv1_relu_relu" not in lenet.source


def test_resnet_block_fuses_bn_residual_and_relu_and_matches():
    g = resnet_block()
    lowered = run_passes(g, "default")
    counts = ops(lowered)
    assert counts["add"] == 0 and counts["relu"] == 0 and counts["batch_norm"] == 0, counts
    assert counts["winograd_kernel"] == 0, "the kernel transform is folded at compile time"
    res = [n for n in lowered.nx.nodes if lowered.node(n)["attrs"].get("residual")]
    assert len(res) == 1
    a = np.random.default_rng(1).standard_normal((1, 16, 14, 14)).astype(np.float32)
    want = cc.compile(g, target="numpy")(x=a)
    for t in TARGETS[1:]:
        assert_close(cc.compile(g, target=t)(x=a), want, rtol=1e-4, atol=1e-4, what=f"resnet block [{t}]")


def test_silu_and_hardswish_written_as_products_become_one_epilogue():
    rng = np.random.default_rng(2)
    g = cc.Graph("gated")
    x = g.input("x", (1, 8, 10, 10))
    c1 = cc.conv(x, g.param("w1", rng.standard_normal((8, 8, 1, 1)).astype(np.float32)), name="c1")
    s = cc.mul(c1, cc.sigmoid(c1))                                   # how exporters write SiLU
    c2 = cc.conv(s, g.param("w2", rng.standard_normal((8, 8, 3, 3)).astype(np.float32)), padding=1, name="c2")
    h = cc.mul(cc.hardsigmoid(c2), c2)                               # and HardSwish
    g.output(h, "y")
    lowered = run_passes(g, ["fuse_epilogues"])
    acts = sorted(lowered.node(n)["attrs"].get("activation", "") for n in lowered.nx.nodes
                  if lowered.node(n)["op"] == "conv")
    assert acts == ["hardswish", "silu"] and not (ELEMENTWISE & set(ops(lowered)))
    a = rng.standard_normal((1, 8, 10, 10)).astype(np.float32)
    want = cc.compile(g, target="numpy")(x=a)
    assert_close(cc.compile(g)(x=a), want, rtol=1e-4, atol=1e-5, what="silu/hardswish")


def test_fold_params_folds_weight_transforms_and_set_params_refolds():
    g = resnet_block(with_bn=False)          # (BN folding makes new weights: w1 would be gone)
    folded, reports = cc.passes.report(g, "default")
    rep = next(r for r in reports if r.name == "fold_params")
    assert any(n.endswith(".folded") for n in rep.added) and rep.after["params"] > rep.before["params"]
    assert ops(folded)["winograd_kernel"] == 0
    assert ops(run_passes(g, "train"))["winograd_kernel"] > 0, "training keeps the transform per run"
    a = np.random.default_rng(4).standard_normal((1, 16, 14, 14)).astype(np.float32)
    for t in TARGETS[1:]:
        mod = cc.compile(g, target=t)
        new = {k: v * 0.5 for k, v in g_params(g, ("w1", "w2")).items()}
        mod.set_params(new)
        g2 = g.copy()
        for k, v in new.items():
            g2.nx.nodes[k]["value"] = v
        assert_close(mod(x=a), cc.compile(g2, target="numpy")(x=a), rtol=1e-4, atol=1e-4,
                     what=f"set_params reaches the folded Winograd kernels [{t}]")


def g_params(g, names):
    return {n: g.node(n)["value"] for n in names}

"""``cc.Trainer``: compiled training steps against torch.optim step by step,
the update living in the generated code (assigns), determinism, predict(),
and float32 training that actually learns."""
from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import convc as cc
from convc.reference import evaluate

TARGETS = ("numpy", "c")
N, C_OUT, CLASSES = 4, 3, 3
STEPS = 5


# -- a small conv net, in convc and in torch -----------------------------------------

def init_params(seed: int = 0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return {"w1": (rng.standard_normal((C_OUT, 1, 3, 3)) / 3).astype(dtype),
            "b1": (rng.standard_normal(C_OUT) * 0.1).astype(dtype),
            "w2": (rng.standard_normal((CLASSES, C_OUT * 9)) / 5).astype(dtype),
            "b2": (rng.standard_normal(CLASSES) * 0.1).astype(dtype)}


def build_net(params: dict, dtype: str = "float64", name: str = "smallnet"):
    """x (4, 1, 6, 6) -> conv 3x3 pad 1 + relu -> max_pool 2 -> flatten -> dense -> logits;
    loss = cross_entropy(logits, labels). Returns (graph, loss)."""
    g = cc.Graph(name)
    x = g.input("x", (N, 1, 6, 6), dtype)
    labels = g.input("labels", (N,), "int64")
    P = {k: g.param(k, v, dtype) for k, v in params.items()}
    h = cc.max_pool(cc.relu(cc.conv(x, P["w1"], P["b1"], padding=1)), 2)
    logits = cc.dense(cc.flatten(h), P["w2"], P["b2"])
    g.output(logits, "logits")
    return g, cc.cross_entropy(logits, labels)


def torch_loss(T: dict, x, labels):
    h = F.max_pool2d(F.relu(F.conv2d(torch.tensor(x), T["w1"], T["b1"], padding=1)), 2)
    return F.cross_entropy(F.linear(h.flatten(1), T["w2"], T["b2"]), torch.tensor(labels))


def batches(count: int = STEPS, seed: int = 1, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((N, 1, 6, 6)).astype(dtype),
             "labels": rng.integers(0, CLASSES, N).astype(np.int64)} for _ in range(count)]


def torch_run(make_optimizer, data, trained=("w1", "b1", "w2", "b2")):
    """Losses (before each update) and params after each step, torch.optim in float64."""
    T = {k: torch.tensor(v, requires_grad=k in trained) for k, v in init_params().items()}
    opt = make_optimizer([T[k] for k in trained])
    losses, history = [], []
    for b in data:
        opt.zero_grad()
        loss = torch_loss(T, b["x"], b["labels"])
        loss.backward()
        opt.step()
        losses.append(loss.item())
        history.append({k: t.detach().numpy().copy() for k, t in T.items()})
    return losses, history


OPTIMIZERS = {
    "sgd": (lambda: cc.SGD(lr=0.1),
            lambda ps: torch.optim.SGD(ps, lr=0.1)),
    "sgd_momentum_wd": (lambda: cc.SGD(lr=0.05, momentum=0.9, weight_decay=0.01),
                        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01)),
    "adam": (lambda: cc.Adam(lr=0.01),
             lambda ps: torch.optim.Adam(ps, lr=0.01)),
    "adam_wd_betas": (lambda: cc.Adam(lr=0.02, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.05),
                      lambda ps: torch.optim.Adam(ps, lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05)),
}


def assert_params_close(got: dict, want: dict, what: str, rtol=1e-9, atol=1e-12):
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, err_msg=f"{what}: param {k}")


# -- 1. step by step against torch.optim -------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_trainer_matches_torch_optim_step_by_step(opt, target):
    make_cc, make_torch = OPTIMIZERS[opt]
    g, loss = build_net(init_params())
    trainer = cc.Trainer(g, loss, optimizer=make_cc(), target=target)
    assert trainer.param_names == ["w1", "b1", "w2", "b2"]
    data = batches()
    want_losses, want_params = torch_run(make_torch, data)
    for i, b in enumerate(data):
        got = trainer.step(b)
        assert isinstance(got, float)
        np.testing.assert_allclose(got, want_losses[i], rtol=1e-9, err_msg=f"{opt} [{target}] loss of step {i}")
        assert_params_close(trainer.params, want_params[i], f"{opt} [{target}] after step {i}")
    assert trainer.steps == STEPS
    # the run really trained: the final params moved away from the initial ones
    init = init_params()
    assert all(np.abs(trainer.params[k] - init[k]).max() > 1e-4 for k in init), f"{opt}: params did not move"


@pytest.mark.parametrize("target", TARGETS)
def test_trainer_with_a_subset_of_params(target):
    """Only the named params train (here the classifier head); the conv stays put."""
    g, loss = build_net(init_params())
    trainer = cc.Trainer(g, loss, params=["w2", g.value("b2")], optimizer=cc.SGD(lr=0.1, momentum=0.5),
                         target=target)
    assert trainer.param_names == ["w2", "b2"]
    data = batches(3)
    want_losses, want_params = torch_run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.5), data,
                                         trained=("w2", "b2"))
    for i, b in enumerate(data):
        np.testing.assert_allclose(trainer.step(b), want_losses[i], rtol=1e-9, err_msg=f"[{target}] step {i}")
    assert set(trainer.params) == {"w2", "b2"}
    assert_params_close(trainer.params, {k: want_params[-1][k] for k in ("w2", "b2")}, f"[{target}] head only")
    # the conv weights, not trained, are still the initial ones inside the step module
    frozen = trainer.step_module.get_params(["w1", "b1"])
    init = init_params()
    np.testing.assert_array_equal(frozen["w1"], init["w1"])
    np.testing.assert_array_equal(frozen["b1"], init["b1"])


# -- 2. the update happens in the generated code ----------------------------------------

@pytest.mark.parametrize("opt", ["sgd_momentum_wd", "adam"])
def test_update_is_compiled_into_the_step_module(opt):
    g, loss = build_net(init_params())
    trainer = cc.Trainer(g, loss, optimizer=OPTIMIZERS[opt][0](), target="c")
    tg = trainer.train_graph
    assert tg is not g and trainer.step_module.target == "c"
    # every trained param (and the optimizer state) is assigned inside the graph
    state = {"sgd_momentum_wd": [f"{p}.momentum" for p in trainer.param_names],
             "adam": ["adam.step"] + [f"{p}.{s}" for p in trainer.param_names for s in ("adam_m", "adam_v")]}[opt]
    assert set(tg.assigns) == set(trainer.param_names) | set(state), tg.assigns
    assert not g.assigns, "the user's graph must not be changed by the Trainer"
    src = trainer.step_module.source
    for p in trainer.param_names:
        new = tg.assigns[p]
        assert tg.node(new)["op"] == ("adam_step" if opt == "adam" else "sub"), (p, tg.node(new)["op"])
        assert p in nx.ancestors(tg.nx, new), f"the update of {p} must read {p}"
        assert new in src, f"the update node {new} of {p} is not in the generated C"
    assert "conv_grad_kernel" in str(tg) and "conv_grad_kernel" not in str(g)
    if opt == "adam":
        assert "sqrt" in src and "sqrt" not in trainer.predict_module.source
        assert "adam_step" in src
    # the original graph has no update and its source has no state writes
    assert "assign" not in str(g) and "assign" in str(tg)


def test_params_change_only_through_step():
    g, loss = build_net(init_params())
    trainer = cc.Trainer(g, loss, optimizer=cc.SGD(lr=0.1, momentum=0.9), target="c")
    data = batches(3)
    p0 = trainer.params
    assert_params_close(p0, init_params(), "before any step", rtol=0, atol=0)
    p0["w1"][...] = 123.0                                   # params returns copies
    p1 = trainer.params
    np.testing.assert_array_equal(p1["w1"], init_params()["w1"])
    trainer.predict(data[0])                                # predicting does not train
    assert_params_close(trainer.params, init_params(), "after predict", rtol=0, atol=0)
    trainer.step(data[0])
    p2 = trainer.params
    assert all(not np.array_equal(p2[k], p1[k]) for k in p1), "every param must change in a step"
    assert_params_close(trainer.params, p2, "read twice", rtol=0, atol=0)
    # running the compiled step module itself (no Python arithmetic) is what updates the weights
    trainer.step_module.run(data[1])
    p3 = trainer.params
    assert all(not np.array_equal(p3[k], p2[k]) for k in p2)
    # ... and neither the user's graph nor the training graph's stored values moved
    for k, v in init_params().items():
        np.testing.assert_array_equal(g.node(k)["value"], v)
        np.testing.assert_array_equal(trainer.train_graph.node(k)["value"], v)


# -- 3. determinism -----------------------------------------------------------------------

@pytest.mark.parametrize("opt", ["sgd_momentum_wd", "adam"])
def test_two_trainers_from_one_seed_are_bitwise_equal(opt):
    data = batches(6, seed=7)
    runs = []
    for _ in range(2):
        g, loss = build_net(init_params(seed=3))
        trainer = cc.Trainer(g, loss, optimizer=OPTIMIZERS[opt][0](), target="c")
        losses = [trainer.step(b) for b in data]
        runs.append((losses, trainer.params))
    (l1, p1), (l2, p2) = runs
    assert l1 == l2, f"loss sequences differ: {l1} vs {l2}"
    assert len(set(l1)) == len(l1), "the losses should change from step to step"
    for k in p1:
        assert p1[k].tobytes() == p2[k].tobytes(), f"param {k} differs between identical runs"


# -- 4. predict ---------------------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
def test_predict_uses_the_trained_weights(target):
    g, loss = build_net(init_params())
    trainer = cc.Trainer(g, loss, optimizer=cc.Adam(lr=0.05), target=target)
    data = batches(4)
    for b in data:
        trainer.step(b)
    feeds = batches(1, seed=99)[0]
    got = trainer.predict(feeds)["logits"]
    untrained = cc.compile(g, target="numpy").run(feeds)["logits"]
    assert np.abs(got - untrained).max() > 1e-3, "predict() gave the untrained network's output"
    fresh = evaluate(g, feeds, params=trainer.params)["logits"]
    np.testing.assert_allclose(got, fresh, rtol=1e-12, atol=1e-14, err_msg=f"[{target}]")
    # the same with torch as the oracle of the forward pass
    T = {k: torch.tensor(v) for k, v in trainer.params.items()}
    h = F.max_pool2d(F.relu(F.conv2d(torch.tensor(feeds["x"]), T["w1"], T["b1"], padding=1)), 2)
    np.testing.assert_allclose(got, F.linear(h.flatten(1), T["w2"], T["b2"]).numpy(), rtol=1e-10)


def test_predict_needs_only_the_inputs_of_the_outputs():
    g, loss = build_net(init_params())
    trainer = cc.Trainer(g, loss, optimizer=cc.SGD(lr=0.1), target="numpy")
    b = batches(1)[0]
    trainer.step(b)
    got = trainer.predict({"x": b["x"]})["logits"]       # the logits do not read the labels
    np.testing.assert_allclose(got, evaluate(g, b, params=trainer.params)["logits"], rtol=1e-12)


@pytest.mark.parametrize("target", [
    "numpy",
    "c",
])
def test_predict_when_the_loss_reads_a_param_the_outputs_do_not(target):
    rng = np.random.default_rng(5)
    g = cc.Graph("features_and_head")
    x = g.input("x", (4, 3), "float64")
    t = g.input("t", (4, 2), "float64")
    feat = cc.dense(x, g.param("w", rng.standard_normal((2, 3))))
    g.output(feat, "feat")
    head = cc.dense(feat, g.param("head", rng.standard_normal((2, 2))))      # read by the loss only
    trainer = cc.Trainer(g, cc.mse_loss(head, t), optimizer=cc.SGD(lr=0.1), target=target)
    feeds = {"x": rng.standard_normal((4, 3)), "t": rng.standard_normal((4, 2))}
    trainer.step(feeds)
    got = trainer.predict(feeds)["feat"]
    np.testing.assert_allclose(got, feeds["x"] @ trainer.params["w"].T, rtol=1e-12)


# -- 5. float32 training learns ------------------------------------------------------------

def separable_data(seed: int, n: int = 8):
    """Class 0: bright left half; class 1: bright right half (+ noise)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    x = rng.standard_normal((n, 1, 4, 4)) * 0.3
    x[labels == 0, :, :, :2] += 1.0
    x[labels == 1, :, :, 2:] += 1.0
    return x.astype(np.float32), labels.astype(np.int64)


@pytest.mark.parametrize("opt", [pytest.param(lambda: cc.SGD(lr=0.2, momentum=0.9), id="sgd"),
                                 pytest.param(lambda: cc.Adam(lr=0.05), id="adam")])
def test_float32_training_reduces_the_loss(opt):
    rng = np.random.default_rng(0)
    g = cc.Graph("separable")
    x = g.input("x", (8, 1, 4, 4))
    labels = g.input("labels", (8,), "int64")
    w = g.param("w", (rng.standard_normal((2, 1, 3, 3)) * 0.3).astype(np.float32))
    b = g.param("b", np.zeros(2, np.float32))
    wd = g.param("wd", (rng.standard_normal((2, 2 * 4 * 4)) * 0.1).astype(np.float32))
    logits = cc.dense(cc.flatten(cc.relu(cc.conv(x, w, b, padding="same"))), wd)
    g.output(logits, "logits")
    trainer = cc.Trainer(g, cc.cross_entropy(logits, labels), optimizer=opt(), target="c")
    losses = []
    for step in range(40):
        xb, yb = separable_data(step)
        losses.append(trainer.step({"x": xb, "labels": yb}))
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:5]), f"loss did not fall enough: {losses}"
    assert {v.dtype for v in trainer.params.values()} == {np.dtype(np.float32)}
    xt, yt = separable_data(1000)
    pred = np.argmax(trainer.predict({"x": xt, "labels": yt})["logits"], axis=1)
    assert np.mean(pred == yt) >= 0.875, f"held-out accuracy {np.mean(pred == yt)}"


# -- 6. misuse is reported ------------------------------------------------------------------

def test_trainer_rejects_a_bad_loss():
    g, loss = build_net(init_params())
    logits = g.value(g.outputs["logits"])
    with pytest.raises(cc.GraphError, match="scalar"):
        cc.Trainer(g, logits)                                   # not a scalar
    other, other_loss = build_net(init_params(), name="other")
    with pytest.raises(cc.GraphError):
        cc.Trainer(g, other_loss)                               # a Value of another graph
    g2 = cc.Graph("no_params")
    x = g2.input("x", (2, 2), "float64")
    g2.output(x, "x_out")
    with pytest.raises(cc.GraphError, match="no params"):
        cc.Trainer(g2, cc.mse_loss(x, np.zeros((2, 2))))       # only a constant to train

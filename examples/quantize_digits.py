"""Post-training int8 quantization of the digits CNN (examples/train_digits.py):
train it in float through compiled C, calibrate on 200 training images,
run the quantize_int8 pass, compile both graphs to C and compare their test
accuracy (issue 15's target: int8 within 1 point of float).

    pip install ".[examples]" && python examples/quantize_digits.py
"""
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

import convc as cc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_digits import BATCH, SEED, build  # noqa: E402  (the same net and param names)

EVAL_BATCH = 40
"""Batch of the compiled evaluation graphs: divides the 200 calibration and
the 360 test images."""


def data():
    """(images (1797, 1, 8, 8) in [0, 1], labels, train indices, test indices),
    split as train_digits.py splits them."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(labels))
    return images, labels, order[360:], order[:360]


def train(images, labels, train_idx, epochs: int) -> dict:
    """Float training with Adam through compiled C; returns the trained params."""
    rng = np.random.default_rng(SEED)
    g, logits = build(BATCH, np.random.default_rng(SEED))
    y = g.input("labels", (BATCH,), "int64")
    trainer = cc.Trainer(g, cc.cross_entropy(logits, y), optimizer=cc.Adam(lr=3e-3))
    for _ in range(epochs):
        perm = rng.permutation(train_idx)
        for s in range(len(perm) // BATCH):
            idx = perm[s * BATCH:(s + 1) * BATCH]
            trainer.step({"x": images[idx], "labels": labels[idx]})
    return trainer.params


def accuracy(mod, images, labels) -> float:
    logits = np.concatenate([mod(x=images[i:i + EVAL_BATCH]) for i in range(0, len(images), EVAL_BATCH)])
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def float_graph(epochs: int = 15):
    """The trained float net at the evaluation batch, and the data."""
    images, labels, train_idx, test_idx = data()
    params = train(images, labels, train_idx, epochs)
    g, _ = build(EVAL_BATCH, np.random.default_rng(SEED))
    for name, value in params.items():
        if name in g.nx and g.node(name)["op"] == "param":
            g.nx.nodes[name]["value"] = np.asarray(value, np.float32).reshape(g.node(name)["type"].shape)
    return g, (images, labels, train_idx, test_idx)


def run(epochs: int = 15, calibration: int = 200, configs=({},), report: bool = False) -> dict:
    """Train, then quantize with ``calibration`` training images once per
    ``configs`` entry (keyword arguments of cc.quantize: observer,
    per_channel, ...); returns the test accuracies {"float": ..., "int8":
    [one per config]} (and the first config's report)."""
    g, (images, labels, train_idx, test_idx) = float_graph(epochs)
    cal = images[train_idx[:calibration]]
    res = {"float": accuracy(cc.compile(g, target="c"), images[test_idx], labels[test_idx]), "int8": []}
    for i, opts in enumerate(configs):
        g8, rep = cc.quantize(g, cal, report=True, **opts)
        res["int8"].append(accuracy(cc.compile(g8, target="c"), images[test_idx], labels[test_idx]))
        if report and i == 0:
            res["report"] = rep
    return res


CONFIGS = ({}, dict(observer="percentile"), dict(per_channel=False))
"""What main() compares: the defaults (min/max, per-channel weights), the
percentile observer (99.99), per-tensor weights."""


def main():
    t0 = time.perf_counter()
    res = run(configs=CONFIGS, report=True)
    print(res["report"])
    print()
    print("test accuracy on 360 held-out digits (200 calibration images)")
    print(f"  float32                                {res['float']:.2%}")
    for opts, acc in zip(CONFIGS, res["int8"]):
        what = ", ".join(f"{k}={v}" for k, v in opts.items()) or "defaults: minmax, per-channel"
        print(f"  int8 ({what:31}) {acc:.2%}  ({100 * (acc - res['float']):+.2f} points)")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0 if res["float"] - res["int8"][0] <= 0.01 else 1


if __name__ == "__main__":
    sys.exit(main())

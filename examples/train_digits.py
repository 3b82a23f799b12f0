"""Train a small CNN on scikit-learn's bundled 8×8 digits entirely through
compiled C: forward, backward (the g and h ops) and the optimizer update run
in one generated function per step.

    pip install ".[examples]" && python examples/train_digits.py
"""
import sys
import time

import numpy as np
from sklearn.datasets import load_digits

import convc as cc

BATCH, EPOCHS, SEED = 32, 15, 0


def build(batch: int, rng: np.random.Generator) -> tuple[cc.Graph, cc.Value]:
    """The net; the same builder (same param names) serves training and evaluation."""
    g = cc.Graph("digits")
    x = g.input("x", (batch, 1, 8, 8))

    def param(name, shape):
        fan_in = int(np.prod(shape[1:]))
        return g.param(name, rng.standard_normal(shape) * np.sqrt(2.0 / fan_in), "float32")

    h = cc.relu(cc.conv(x, param("conv1_w", (16, 1, 3, 3)), g.param("conv1_b", np.zeros(16, np.float32)), padding=1))
    h = cc.max_pool(h, 2)                                                     # 16 x 4 x 4
    h = cc.relu(cc.conv(h, param("conv2_w", (32, 16, 3, 3)), g.param("conv2_b", np.zeros(32, np.float32)), padding=1))
    h = cc.max_pool(h, 2)                                                     # 32 x 2 x 2
    h = cc.relu(cc.dense(cc.flatten(h), param("fc1_w", (64, 128)), g.param("fc1_b", np.zeros(64, np.float32))))
    logits = cc.dense(h, param("fc2_w", (10, 64)), g.param("fc2_b", np.zeros(10, np.float32)))
    g.output(logits, "logits")
    return g, logits


def progress(done, total, text, width=30):
    filled = int(width * done / total)
    sys.stdout.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}")
    sys.stdout.flush()


def main():
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]              # (1797, 1, 8, 8) in [0, 1]
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(labels))
    n_test = 360
    test, train = order[:n_test], order[n_test:]

    g, logits = build(BATCH, np.random.default_rng(SEED))
    y = g.input("labels", (BATCH,), "int64")
    t0 = time.perf_counter()
    trainer = cc.Trainer(g, cc.cross_entropy(logits, y), optimizer=cc.Adam(lr=3e-3))
    print(f"compiled forward + backward + Adam to C in {time.perf_counter() - t0:.2f} s "
          f"({trainer.train_graph.nx.number_of_nodes()} nodes)")

    steps_per_epoch = len(train) // BATCH
    step_times = []
    for epoch in range(EPOCHS):
        perm = rng.permutation(train)
        losses = []
        for s in range(steps_per_epoch):
            idx = perm[s * BATCH:(s + 1) * BATCH]
            t = time.perf_counter()
            losses.append(trainer.step({"x": images[idx], "labels": labels[idx]}))
            step_times.append(time.perf_counter() - t)
            progress(s + 1, steps_per_epoch, f"epoch {epoch + 1:2d}/{EPOCHS} loss {np.mean(losses):.4f}")
        print()

    evaluation, _ = build(n_test, np.random.default_rng(SEED))
    mod = cc.compile(evaluation, target="c")
    mod.set_params(trainer.params)
    predicted = np.argmax(mod(x=images[test]), axis=1)
    accuracy = float(np.mean(predicted == labels[test]))
    print(f"test accuracy: {accuracy:.2%} on {n_test} held-out digits")
    print(f"time per training step (batch {BATCH}): {np.median(step_times) * 1e3:.2f} ms (median)")
    return 0 if accuracy >= 0.97 else 1


if __name__ == "__main__":
    sys.exit(main())

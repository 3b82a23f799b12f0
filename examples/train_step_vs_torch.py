"""Time one training step of the digits CNN (batch 32, Adam) in convc's
generated C against PyTorch eager on the same net, side by side, in one run.

    pip install ".[test]" && python examples/train_step_vs_torch.py
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import convc as cc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_digits import BATCH, build  # noqa: E402


def median_time(fn, repeat=200, warmup=20):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


rng = np.random.default_rng(0)
x = rng.random((BATCH, 1, 8, 8), dtype=np.float32)
labels = rng.integers(0, 10, BATCH).astype(np.int64)

g, logits = build(BATCH, np.random.default_rng(0))
trainer = cc.Trainer(g, cc.cross_entropy(logits, g.input("labels", (BATCH,), "int64")), optimizer=cc.Adam(lr=1e-3))
t_convc = median_time(lambda: trainer.step({"x": x, "labels": labels}))

params = {n: torch.tensor(g.node(n)["value"], requires_grad=True) for n in trainer.param_names}
opt = torch.optim.Adam(params.values(), lr=1e-3)
tx, ty = torch.from_numpy(x), torch.from_numpy(labels)


def torch_step():
    opt.zero_grad()
    h = F.max_pool2d(F.relu(F.conv2d(tx, params["conv1_w"], params["conv1_b"], padding=1)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, params["conv2_w"], params["conv2_b"], padding=1)), 2)
    h = F.relu(F.linear(h.flatten(1), params["fc1_w"], params["fc1_b"]))
    loss = F.cross_entropy(F.linear(h, params["fc2_w"], params["fc2_b"]), ty)
    loss.backward()
    opt.step()


rows = []
for threads in sorted({1, torch.get_num_threads()}):
    torch.set_num_threads(threads)
    rows.append((threads, median_time(torch_step)))
print(f"digits CNN, batch {BATCH}, Adam, one step (median):")
print(f"  convc (generated C, 1 thread): {t_convc * 1e3:7.3f} ms")
for threads, t in rows:
    print(f"  PyTorch eager, {threads} thread(s):  {t * 1e3:7.3f} ms   -> convc is {t / t_convc:.2f}x")

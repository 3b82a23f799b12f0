"""LeNet-5 forward and one Adam training step on the opencl target, checked
against the numpy reference. Run by tests/test_opencl.py under oclgrind
(out-of-bounds, uninitialised-read and data-race checks); prints OK."""
import sys

import numpy as np

import convc as cc
from convc.models import lenet5

batch = int(sys.argv[1]) if len(sys.argv) > 1 else 2
rng = np.random.default_rng(0)
x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
labels = rng.integers(0, 10, size=batch)

g = lenet5(batch=batch)
mod = cc.compile(g, target="opencl")
got, want = mod(x=x), cc.compile(g, target="numpy")(x=x)
err = float(np.max(np.abs(got - want)))
print(f"device {mod.device}; forward max abs error {err:.2e}")
assert err < 1e-4, err

out = g.value(g.outputs["logits"])
lab = g.input("labels", (batch,), "int64")
loss = cc.cross_entropy(out, lab)
steps = {t: cc.Trainer(g, loss, optimizer=cc.Adam(lr=1e-3), target=t) for t in ("opencl", "numpy")}
feeds = {"x": x, "labels": labels.astype(np.int64)}
losses = {t: tr.step(feeds) for t, tr in steps.items()}
print(f"training step loss opencl {losses['opencl']:.6f} numpy {losses['numpy']:.6f}")
assert abs(losses["opencl"] - losses["numpy"]) < 1e-4 * max(1.0, abs(losses["numpy"]))
for n, p in steps["opencl"].params.items():
    q = steps["numpy"].params[n]
    assert np.allclose(p, q, rtol=1e-3, atol=1e-5), (n, float(np.max(np.abs(p - q))))
print("OK")

"""A convolutional autoencoder whose decoder is the book's reconstruction
R = h(K, H, s) (Eq 7): the encoder is H = relu(c(K, V, s) + b) and the decoder
applies the transpose of the SAME kernel K, ``conv_grad_input`` (h). Trained
on scikit-learn's 8×8 digits with Adam, entirely in generated C.

    pip install ".[examples]" && python examples/autoencoder.py [out.png]
"""
import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

import convc as cc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pngio import write_png  # noqa: E402

BATCH, EPOCHS, STRIDE = 64, 30, 2

digits = load_digits()
images = (digits.images / 16.0).astype(np.float32)[:, None]          # (1797, 1, 8, 8)
rng = np.random.default_rng(0)

g = cc.Graph("autoencoder")
v = g.input("v", (BATCH, 1, 8, 8))
k = g.param("K", rng.standard_normal((3, 1, 4, 4)) * 0.2, "float32")    # 3 feature maps: 48 numbers for 64 pixels
b = g.param("b", np.zeros(3, np.float32))
h = cc.relu(cc.conv(v, k, b, stride=STRIDE, padding=1, name="encode"))            # H: 3 x 4 x 4
r = cc.conv_grad_input(k, h, (8, 8), stride=STRIDE, padding=1, name="decode")    # R = h(K, H, s)
g.output(r, "reconstruction")
loss = cc.mse_loss(r, v)

trainer = cc.Trainer(g, loss, optimizer=cc.Adam(lr=1e-2))
ops = sorted({trainer.train_graph.node(n)["op"] for n in trainer.train_graph.nx})
print("training graph ops:", ", ".join(ops))

steps = len(images) // BATCH
first = None
for epoch in range(EPOCHS):
    perm = rng.permutation(len(images))
    err = np.mean([trainer.step({"v": images[perm[i * BATCH:(i + 1) * BATCH]]}) for i in range(steps)])
    first = err if first is None else first
    if epoch % 5 == 0 or epoch == EPOCHS - 1:
        print(f"epoch {epoch + 1:2d}: reconstruction error (MSE) {err:.5f}")
print(f"reconstruction error fell from {first:.5f} to {err:.5f}")

sample = images[:BATCH]
recon = trainer.predict({"v": sample})["reconstruction"]
grid = np.concatenate([np.concatenate(list(sample[:16, 0]), axis=1),
                       np.concatenate(list(np.clip(recon[:16, 0], 0, 1)), axis=1)], axis=0)
out = sys.argv[1] if len(sys.argv) > 1 else "autoencoder.png"
write_png(out, np.kron(grid, np.ones((4, 4))))
print("wrote", out, "(top: originals, bottom: reconstructions)")
sys.exit(0 if err < first / 2 else 1)

"""PyTorch to convc, two ways.

1. ``cc.from_torch``: export a model once (torch.export), get a convc Graph
   with the weights as params named after the state dict, compile it to C
   and call it on numpy arrays -- no PyTorch needed at run time.
2. ``torch.compile(model, backend="convc")``: keep writing PyTorch; the
   graph TorchDynamo captures runs as convc C (ops convc lacks stay in
   PyTorch), and with autograd the backward graph does too. After ``pip
   install convc`` torch finds the backend by its entry point: nothing
   imports convc.torch_backend before the torch.compile calls below.

Run: python examples/from_torch.py
"""
import numpy as np
import torch
import torch.nn.functional as F

import convc as cc
from convc.bench_torch import resnet_style

torch.manual_seed(0)
model = resnet_style(width=8, stages=2).eval()          # basic blocks with residual adds, batch norm
x = torch.randn(1, 3, 32, 32)
with torch.no_grad():
    want = model(x).numpy()

# 1. torch.export -> convc Graph -> C
g = cc.from_torch(model, (x,))
print(f"graph {g.name}: {len(g.param_names)} params, e.g. {', '.join(sorted(g.param_names)[:3])}")
mod = cc.compile(g)
y = mod(input=x.numpy())
print(f"from_torch: max |convc - torch| = {np.abs(y - want).max():.2e}")

# 2. torch.compile with the convc backend: inference ...
fast = torch.compile(model, backend="convc", dynamic=False)     # static shapes: one C module per shape
with torch.no_grad():
    y2 = fast(x)
print(f"torch.compile inference: max |convc - torch| = {(y2 - torch.from_numpy(want)).abs().max():.2e}")

# ... and training: forward and backward graphs compile to C; the optimizer stays PyTorch's
net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                          torch.nn.Linear(4 * 3 * 3, 3)).double()
train = torch.compile(net, backend="convc", dynamic=False)
opt = torch.optim.SGD(net.parameters(), lr=0.5)
data, labels = torch.randn(8, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (8,))
for step in range(5):
    opt.zero_grad()
    loss = F.cross_entropy(train(data), labels)
    loss.backward()
    opt.step()
    print(f"step {step}: loss {loss.item():.4f}")
from convc import torch_backend  # noqa: E402  (only now: what the backend made of the graphs)
forward, backward = torch_backend.reports[-2:]
print(f"convc parts: forward {forward.parts}, backward {backward.parts} (nodes each); "
      f"left to PyTorch: {sorted(forward.eager) + sorted(backward.eager)}")

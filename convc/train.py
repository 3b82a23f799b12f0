"""Compiled training: forward, backward (``cc.grad``) and the optimizer
update in ONE generated entry point; weights and optimizer state live in the
module between steps.

>>> trainer = cc.Trainer(g, loss, optimizer=cc.SGD(lr=0.05, momentum=0.9))   # doctest: +SKIP
>>> for xb, yb in batches:                                                    # doctest: +SKIP
...     loss_value = trainer.step({"x": xb, "labels": yb})
>>> probs = trainer.predict({"x": xb})                                        # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np

from .autodiff import grad
from .errors import GraphError
from .ir import Graph, Value
from .ops.elementwise import add, mul, sub
from .ops.optim import adam_step


@dataclass
class SGD:
    """PyTorch's SGD: v = momentum*v + (g + weight_decay*p); p -= lr*v."""
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0

    def build(self, g: Graph, params: list[Value], grads: list[Value]):
        for p, dp in zip(params, grads):
            d = add(dp, mul(p, self.weight_decay)) if self.weight_decay else dp
            if self.momentum:
                v = g.param(f"{p.name}.momentum", np.zeros(p.shape), p.dtype)
                d = add(mul(v, self.momentum), d)
                g.assign(v, d)
            g.assign(p, sub(p, mul(d, self.lr)))


@dataclass
class Adam:
    """PyTorch's Adam (L2 weight decay added to the gradient)."""
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def build(self, g: Graph, params: list[Value], grads: list[Value]):
        t = g.param("adam.step", np.zeros(()), "float64")
        t1 = add(t, 1.0)
        g.assign(t, t1)
        for p, dp in zip(params, grads):
            d = add(dp, mul(p, self.weight_decay)) if self.weight_decay else dp
            m = g.param(f"{p.name}.adam_m", np.zeros(p.shape), p.dtype)
            v = g.param(f"{p.name}.adam_v", np.zeros(p.shape), p.dtype)
            m1 = add(mul(m, self.beta1), mul(d, 1 - self.beta1))
            v1 = add(mul(v, self.beta2), mul(mul(d, d), 1 - self.beta2))
            g.assign(m, m1)
            g.assign(v, v1)
            g.assign(p, adam_step(p, m1, v1, t1, self.lr, self.beta1, self.beta2, self.eps))


def training_graph(graph: Graph, loss: Value, params=None, optimizer=None) -> tuple[Graph, list[str]]:
    """The training step of ``loss`` as one graph (what :class:`Trainer`
    compiles and ``export_c(train=True)`` exports): a copy of ``graph`` whose
    only output is ``loss``, with the gradients (``cc.grad``) and the
    optimizer's update as ``assign``s of the params and of the optimizer's
    state. ``params``: Values or names to train, default every non-constant
    float param that reaches ``loss``. Returns (the graph, the names of the
    trained params); ``graph`` is not changed."""
    if not isinstance(loss, Value) or loss.graph is not graph:
        raise GraphError("Trainer: loss must be a Value of the given graph")
    if loss.type.size != 1:
        raise GraphError(f"Trainer: loss %{loss.name} must be a scalar, got shape {loss.shape}")
    if params is None:
        up = nx.ancestors(graph.nx, loss.name)
        names = [n for n in graph.param_names if n in up and not graph.node(n).get("const")
                 and graph.node(n)["type"].dtype != "int64"]
    else:
        names = [p.name if isinstance(p, Value) else str(p) for p in params]
    if not names:
        raise GraphError("Trainer: no params to train")
    tg = graph.copy(f"{graph.name}_train")
    tg.outputs = {"loss": loss.name}
    ps = [tg.value(n) for n in names]
    (optimizer or SGD()).build(tg, ps, grad(tg.value(loss.name), ps))
    return tg, names


class Trainer:
    """Train the params of ``graph`` that ``loss`` depends on.

    ``params``: Values (or names) to train; default every non-constant float
    param that reaches ``loss``. ``optimizer``: :class:`SGD` or :class:`Adam`.
    ``step(batch)`` runs forward + backward + update in generated code and
    returns the loss; ``params`` returns numpy copies; ``predict(inputs)`` runs
    the graph's own outputs with the trained weights. A Trainer pickles
    (weights, optimizer state, step count; rebuilt through ``cc.compile`` in
    the process that unpickles it) and continues exactly where it was.
    """

    def __init__(self, graph: Graph, loss: Value, params=None, optimizer=None, target: str = "c", **compile_args):
        from .api import compile

        self.graph = graph
        self.optimizer = optimizer or SGD()
        tg, self.param_names = training_graph(graph, loss, params, self.optimizer)
        # what a pickled Trainer carries besides the step module's params: the
        # given graph is the part of tg that grad and the optimizer did not add
        self._given = dict(name=graph.name, nodes=list(graph.nx), outputs=dict(graph.outputs),
                           assigns=dict(graph.assigns), counter=dict(graph._counter), loss=loss.name,
                           target=target, compile_args=dict(compile_args))
        self.train_graph = tg
        compile_args.setdefault("passes", "train")
        self.step_module = compile(tg, target=target, **compile_args)
        self.predict_module = compile(graph, target=target, passes=compile_args["passes"])
        self.steps = 0

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Copies of the optimizer's state as the step module holds it
        (momentum buffers, Adam moments, Adam's step count ``adam.step``)."""
        names = [n for n in self.train_graph.assigns if n not in self.param_names]
        return self.step_module.get_params(names)

    def __reduce__(self):
        """Pickle as the recipe: the graph given (trained weights as they
        are now), the loss, the params trained, the optimizer with its
        state (read from the step module), the target, the compile options
        and the step count. Unpickling builds the Trainer again in that
        process (through ``cc.compile`` and the compile cache) and restores
        the state, so the next ``step`` is the step this Trainer would take.
        A pickle from another convc raises ``StateVersionError``."""
        from .runtime.module import pickled

        tg = self.step_module.source_graph()          # the train graph with the values the step module holds
        given = self._given
        g = Graph(given["name"])
        g.nx = tg.nx.subgraph(given["nodes"]).copy()
        g.outputs, g.assigns, g._counter = dict(given["outputs"]), dict(given["assigns"]), dict(given["counter"])
        state = {n: tg.node(n)["value"] for n in tg.assigns if n not in g.nx}
        return pickled("trainer", dict(graph=g, given=given, param_names=self.param_names,
                                       optimizer=self.optimizer, state=state, steps=self.steps))

    @classmethod
    def _from_state(cls, s: dict) -> "Trainer":
        """The Trainer ``__reduce__`` described, built in this process."""
        given, g = s["given"], s["graph"]
        t = cls(g, g.value(given["loss"]), params=s["param_names"], optimizer=s["optimizer"], target=given["target"],
                **given["compile_args"])
        t.step_module.set_params(s["state"])
        t.steps = s["steps"]
        return t

    def step(self, batch: dict) -> float:
        """One optimisation step on ``batch`` (input name -> array); returns the loss."""
        need = set(self.step_module.inputs)
        loss = self.step_module.run({k: v for k, v in batch.items() if k in need})["loss"]
        self.steps += 1
        return float(loss)

    @property
    def params(self) -> dict[str, np.ndarray]:
        """Current values of the trained params (copies)."""
        return self.step_module.get_params(self.param_names)

    def predict(self, inputs: dict) -> dict[str, np.ndarray]:
        """The graph's outputs for ``inputs`` with the current weights."""
        used = set(self.predict_module.param_names)
        self.predict_module.set_params({k: v for k, v in self.params.items() if k in used})
        return self.predict_module.run(inputs)

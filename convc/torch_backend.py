"""``torch.compile(model, backend="convc")``: TorchDynamo hands convc the
FX graph of a model; AOTAutograd lowers it to ATen (the forward, and with
autograd the backward graph too); each graph is cut into the parts convc
can take (``CapabilityBasedPartitioner`` asking
:func:`convc.torch_frontend.node_support`) and the rest, which stays in
PyTorch. Every convc part is imported with
:func:`convc.torch_frontend.fx_to_graph`, compiled to C, and called with the
torch tensors viewed as numpy arrays (no copy for contiguous CPU tensors;
outputs come back through ``torch.from_numpy``, no copy either).

In the backward graph ``convolution_backward`` becomes convc's ``h``
(``conv_grad_input``), ``g`` (``conv_grad_kernel``) and the bias sum, and
the activations' and pools' backward ops become convc's, so
``loss.backward()`` runs convc's C.

The backend is registered with TorchDynamo when this module is imported,
and through the ``torch_dynamo_backends`` entry point (pyproject.toml), so
the string ``"convc"`` works after ``pip install convc`` without an import.

>>> fast = torch.compile(model, backend="convc")     # doctest: +SKIP
>>> y = fast(x)                                        # doctest: +SKIP
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import ConvcError
from .torch_frontend import INPUT_DTYPES, _meta_type, decompositions, fx_to_graph, node_support

# ops that only move or view data: a part made of these alone stays in PyTorch
_NO_COMPUTE = {"aten.view.default", "aten._unsafe_view.default", "aten.reshape.default", "aten.permute.default",
               "aten.t.default", "aten.transpose.int", "aten.alias.default", "aten.clone.default",
               "aten.detach.default", "aten.unsqueeze.default", "aten.squeeze.dim", "aten.squeeze.dims",
               "aten.squeeze.default", "aten.expand.default", "aten.slice.Tensor", "aten._to_copy.default",
               "getitem"}


@dataclass
class Report:
    """What one compiled graph became: ``parts`` (the node count of each
    convc part), ``eager`` ({ATen op: (count, reason convc gave for the
    first)} left to PyTorch), ``refused`` (parts convc could not compile
    after all, with why: they run in PyTorch), ``modules`` (the compiled
    convc modules, one per part)."""
    parts: list[int] = field(default_factory=list)
    eager: dict = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    modules: list = field(default_factory=list, repr=False)


reports: list[Report] = []          # one per graph compiled in this process, oldest first


def convc_backend(gm, example_inputs, options: dict | None = None, mode: str | None = None):
    """The TorchDynamo backend: AOTAutograd with :func:`compile_fx` as the
    forward, backward and inference compiler. ``torch.compile(model,
    backend="convc", options={...})`` passes ``options``: ``target`` ("c"
    or "opencl") and ``passes`` (a convc pipeline name). Use
    ``dynamic=False``: convc compiles static shapes (a graph with symbolic
    sizes leaves those nodes to PyTorch)."""
    from torch._dynamo.backends.common import aot_autograd
    options = dict(options or {})
    unknown = set(options) - {"target", "passes"}
    if unknown or mode not in (None, "default"):
        raise ConvcError(f"torch.compile(backend='convc'): unknown option(s) {sorted(unknown)} or mode {mode!r}; "
                         f"options are target ('c', 'opencl') and passes (a pipeline name)")

    def compiler(g, inputs):
        return compile_fx(g, inputs, **options)

    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler, decompositions=decompositions())(
        gm, example_inputs)


def compile_fx(gm, example_inputs=None, target: str = "c", passes: str = "default"):
    """Compile an ATen FX graph: the parts convc supports run as convc C,
    the rest in PyTorch. Returns the rewritten GraphModule's forward, boxed
    (called with one list of arguments, as AOTAutograd calls compilers' results)."""
    from torch._functorch.aot_autograd import make_boxed_func
    from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
    from torch.fx.passes.operator_support import OperatorSupportBase

    report = Report()
    reports.append(report)
    _detach_pool_indices(gm)
    why: dict = {}

    class Support(OperatorSupportBase):
        def is_node_supported(self, submodules, node) -> bool:
            reason = "kept in PyTorch" if node.meta.get("convc_eager") else node_support(node)
            if reason is not None and node.op == "call_function" and node.target is not operator.getitem:
                why.setdefault(node, reason)
            return reason is None

    partitioner = CapabilityBasedPartitioner(gm, Support(), allows_single_node_partition=True)
    parts = [p for p in partitioner.propose_partitions()
             if any(_key(n) not in _NO_COMPUTE for n in p.nodes)]
    for node, reason in why.items():
        k = _key(node)
        count, first = report.eager.get(k, (0, reason))
        report.eager[k] = (count + 1, first)
    if not parts:
        return make_boxed_func(gm.forward)
    fused = partitioner.fuse_partitions(parts, prefix="convc_part_")
    for node in list(fused.graph.nodes):
        if node.op == "call_module" and node.target.startswith("convc_part_"):
            sub = getattr(fused, node.target)
            try:
                part = ConvcPart(sub, node.args, name=f"{node.target}", target=target, passes=passes)
            except ConvcError as e:          # convc refused after all: this part stays in PyTorch
                report.refused.append(f"{node.target}: {e}")
                continue
            setattr(fused, node.target, part)
            report.parts.append(part.size)
            report.modules.append(part.module)
    fused.recompile()
    return make_boxed_func(fused.forward)


def _key(node) -> str:
    return "getitem" if node.target is operator.getitem else str(node.target)


def _detach_pool_indices(gm) -> None:
    """Max pools whose indices are read (the forward graph of training saves
    them for the backward): the indices come from a copy of the pool that
    stays in PyTorch, so the pool itself (values only) can run in convc --
    convc's max_pool gradient finds the arg-max again and never reads them."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not str(node.target).startswith("aten.max_pool"):
            continue
        if not str(node.target).endswith("_with_indices.default"):
            continue
        taken = [u for u in node.users if u.target is operator.getitem and u.args[1] == 1]
        if not taken:
            continue
        with gm.graph.inserting_after(node):
            twin = gm.graph.call_function(node.target, node.args, node.kwargs)
        twin.meta = dict(node.meta, convc_eager=True)
        for u in taken:
            u.args = (twin, 1)
    gm.graph.lint()
    gm.recompile()


class ConvcPart(torch.nn.Module):
    """One convc part of a partitioned graph: the sub-GraphModule's graph
    compiled to C; called with the part's torch tensors, returns torch
    tensors in the sub-GraphModule's output structure."""

    def __init__(self, sub, outer_args, name: str, target: str = "c", passes: str = "default"):
        from .api import compile as cc_compile
        super().__init__()
        placeholders, self.order = {}, []
        phs = [n for n in sub.graph.nodes if n.op == "placeholder"]
        for i, (ph, arg) in enumerate(zip(phs, outer_args)):
            t = _meta_type(arg) if hasattr(arg, "meta") else None
            if t is None or t[1] not in INPUT_DTYPES:
                raise ConvcError(f"{name}: input {i} is not a float tensor of static shape")
            placeholders[ph] = ("input", f"in{i}", t[0], INPUT_DTYPES[t[1]])
            self.order.append(f"in{i}")
        graph, self.outs = fx_to_graph(sub, placeholders, name)
        self.size = sum(1 for n in sub.graph.nodes if n.op == "call_function")
        out_node = next(n for n in sub.graph.nodes if n.op == "output")
        self.single = not isinstance(out_node.args[0], (tuple, list))
        self.module = cc_compile(graph, target=target, passes=passes)
        self.graph = graph

    def forward(self, *args):
        feeds = {n: _as_numpy(t) for n, t in zip(self.order, args)}
        res = self.module.run({n: a for n, a in feeds.items() if n in self.module.inputs})
        outs = [args[self.order.index(o[1])] if isinstance(o, tuple) else torch.from_numpy(res[o])
                for o in self.outs]
        return outs[0] if self.single else tuple(outs)


def _as_numpy(t) -> np.ndarray:
    """A numpy view of a CPU tensor (a contiguous copy only when it is strided)."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.numpy()


def register() -> None:
    """Register ``"convc"`` with TorchDynamo (done when this module is imported)."""
    from torch._dynamo import list_backends, register_backend
    if "convc" not in list_backends(exclude_tags=()):
        register_backend(name="convc")(convc_backend)


register()

"""The converters of ONNX's reductions, the pools made of them, and the
normalisations: ReduceSum/Mean/Max/Min/Prod/L1/L2/SumSquare/LogSumExp (axes
an attribute before opset 13 (ReduceSum) or 18 (the others), an input from
then on), GlobalMaxPool, LpPool, LRN, InstanceNormalization,
GroupNormalization, LayerNormalization, LpNormalization."""
from __future__ import annotations

from ..ops.normalize import lrn
from .importer import _Unsupported, converts


@converts("LRN", size=None, alpha=1e-4, beta=0.75, bias=1.0)
def _lrn(im, node, ins, at):
    x = im.value(ins[0])
    if at["size"] is None:
        raise _Unsupported("attribute size is required")
    if len(x.shape) < 3:
        raise _Unsupported(f"LRN takes (N, C, D1, ...), got shape {x.shape}")
    return [lrn(x, at["size"], at["alpha"], at["beta"], at["bias"], name=im.name(node))]

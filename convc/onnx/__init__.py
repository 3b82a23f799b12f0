"""ONNX in and out: :func:`from_onnx` turns an ONNX model into a convc
:class:`~convc.ir.Graph`, :func:`to_onnx` writes a graph of ONNX-expressible
ops as an ONNX model. Needs the optional ``onnx`` package
(``pip install 'convc[onnx]'``), imported on first use.

The package's parts:

* :mod:`.importer`: :func:`from_onnx`, the walk over the ONNX graph, the
  converter registry (:func:`converts`) and the helpers converters share;
* :mod:`.converters`: the float ops' converters; :mod:`.quantized`: the
  quantized ops' (QDQ and QOperator formats);
* :mod:`.exporter`: :func:`to_onnx`;
* :mod:`.validate`: what an ONNX file must satisfy before anything is
  imported (names, order, versions, sizes, the constant-folding budget);
* :mod:`.conformance`: ONNX's backend node tests run through convc
  (``python -m convc.onnx.conformance``).

The commands ``convc run`` and ``convc compile`` are in :mod:`convc.cli`.

>>> g = cc.from_onnx("model.onnx", input_shapes={"x": (1, 3, 32, 32)})   # doctest: +SKIP
>>> model = cc.to_onnx(g)                                                  # doctest: +SKIP
"""
from .importer import STATIC_INPUTS, OnnxImportError, c_name, converts, from_onnx, node_name
from . import converters, quantized
from .exporter import exports, to_onnx
from .validate import OnnxOpsetWarning

_REGISTERED = (converters, quantized)     # importing them registers their converters with the importer
from . import ops_reduce  # noqa: E402  (reductions, LRN, normalisations)
_REGISTERED += (ops_reduce,)
from . import ops_tensor  # noqa: E402  (DepthToSpace, SpaceToDepth, Tile, Gather, Cast, Where, Einsum)
_REGISTERED += (ops_tensor,)
from . import ops_math  # noqa: E402  (Pow, PRelu, Sum, Mean, Max, Min; the unary math is the activation table's)
_REGISTERED += (ops_math,)

__all__ = ["OnnxImportError", "OnnxOpsetWarning", "STATIC_INPUTS", "c_name", "converts", "exports", "from_onnx",
           "node_name", "to_onnx"]

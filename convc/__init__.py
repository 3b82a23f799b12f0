"""convc: a small graph compiler for convolutional networks.

Declare a network as a :class:`Graph`, compile it with :func:`compile` to C
(rendered from Jinja templates, built at run time through cffi) or run it on
the numpy reference interpreter, and call the resulting module on arrays.
"""
# ruff: noqa: E402, F401
__version__ = "0.1.0"

from .errors import CompileError, ConvcError, GraphError, InputError, ValidationError
from .ir import Graph, TensorType, Value

# op builders
from .ops.conv import conv, depthwise_conv, flattened_conv, separable_conv, spatial_separable_conv
from .ops.transpose import conv_grad_input, conv_grad_kernel, conv_transpose
from .ops.unshared import local_conv, tiled_conv
from .ops.layout import channel_shuffle, dilate, downsample, pad
from .ops.pool import avg_pool, global_avg_pool, lp_pool, max_pool
from .ops.resize import resize
from .ops.elementwise import (add, clip, div, gelu, hardsigmoid, hardswish, leaky_relu, mul, relu, relu6, sigmoid,
                              silu, sub, tanh)
from .ops.elementwise import (abs, elu, erf, exp, log, mish, neg, reciprocal, selu, softplus,  # noqa: A004
                              softsign, sqrt, thresholded_relu)
from .ops.elementwise import maximum, minimum, pow, prelu  # noqa: A004
from .ops.tensor import concat, expand, flatten, reduce_sum, reshape, slice_axis, transpose
from .ops.indexing import cast, take, where
from .ops.rearrange import depth_to_space, einsum, space_to_depth, tile
from .ops.linear import dense, matmul, softmax
from .ops.norm import batch_norm
from .ops.normalize import group_norm, instance_norm, layer_norm, lp_normalize, lrn, standardize
from .ops.reduce import global_max_pool, reduce
from .ops.loss import cross_entropy, mse_loss
from .ops.quantized import dequantize, qconv, quantize
from .ops.quantized import (lookup_table, qadd, qavg_pool, qconcat, qconv_transpose, qdense, qglobal_avg_pool, qlookup,
                            qmatmul)
from .calibration import calibrate, quantize  # noqa: F811  (on a Graph: post-training quantization; on a Value: the op)

# compiling, costing, differentiating, training, passes, interchange
from .api import compile  # noqa: A001
from .runtime.threads import get_num_threads, set_num_threads
from .runtime.module import StateVersionError  # a pickled module or Trainer from another convc release
from .cost import cost
from .explain import explain
from .export_opencl import export_opencl
from .tuner import tune
from .autodiff import grad
from .train import SGD, Adam, Trainer
from . import passes
from .matrix import conv_matrix
from .onnx import from_onnx, to_onnx
from .torch_frontend import from_torch, TorchImportError     # torch imported on first use


def __getattr__(name):
    # cc.export_c, imported on first use so that `python -m convc.export` runs
    # the module once, as __main__, without a second copy in sys.modules.
    if name == "export_c":
        from .export import export_c
        return export_c
    raise AttributeError(f"module 'convc' has no attribute {name!r}")

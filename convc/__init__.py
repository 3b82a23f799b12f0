"""convc: a small graph compiler for convolutional networks.

Declare a network as a :class:`Graph`, compile it with :func:`compile` to C
(rendered from Jinja templates, built at run time through cffi) or run it on
the numpy reference interpreter, and call the resulting module on arrays.
"""
__version__ = "0.1.0"

from .errors import CompileError, ConvcError, GraphError, InputError, ValidationError  # noqa: E402,F401
from .ir import Graph, TensorType, Value  # noqa: E402,F401
from .ops.conv import (conv, depthwise_conv, flattened_conv, separable_conv,  # noqa: E402,F401
                       spatial_separable_conv)
from .ops.transpose import conv_grad_input, conv_grad_kernel, conv_transpose  # noqa: E402,F401
from .ops.unshared import local_conv, tiled_conv  # noqa: E402,F401
from .ops.layout import channel_shuffle, dilate, downsample, pad  # noqa: E402,F401
from .ops.pool import avg_pool, global_avg_pool, max_pool  # noqa: E402,F401
from .ops.elementwise import add, div, leaky_relu, mul, relu, sigmoid, sub, tanh  # noqa: E402,F401
from .ops.tensor import concat, flatten, reshape  # noqa: E402,F401
from .ops.linear import dense, matmul, softmax  # noqa: E402,F401
from .api import compile  # noqa: E402,F401,A001
from .cost import cost  # noqa: E402,F401
from .ops.loss import cross_entropy, mse_loss  # noqa: E402,F401
from .ops.tensor import expand, reduce_sum, slice_axis, transpose  # noqa: E402,F401
from .autodiff import grad  # noqa: E402,F401
from .train import SGD, Adam, Trainer  # noqa: E402,F401
from .ops.norm import batch_norm  # noqa: E402,F401
from . import passes  # noqa: E402,F401
from .matrix import conv_matrix  # noqa: E402,F401


def __getattr__(name):
    # cc.export_c, imported on first use so that `python -m convc.export` runs
    # the module once, as __main__, without a second copy in sys.modules.
    if name == "export_c":
        from .export import export_c
        return export_c
    raise AttributeError(f"module 'convc' has no attribute {name!r}")


from .ops.elementwise import clip  # noqa: E402,F401
from .onnx import from_onnx, to_onnx  # noqa: E402,F401

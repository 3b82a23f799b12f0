"""Op definitions: one module per family, each op defined in one class."""
from .registry import OPS, Op, get_op, register  # noqa: F401
from . import (conv, pool, elementwise, tensor, linear, transpose, unshared, layout,  # noqa: F401,E402
               loss, optim, columns, norm, fused, fft)  # (importing registers the ops)
from . import winograd  # noqa: F401,E402  (registers winograd_kernel, winograd_conv)
from . import resize  # noqa: F401,E402  (registers resize, resize_grad)
from . import blocked  # noqa: F401,E402  (registers to_blocked, from_blocked, block_weights, conv_nchwc, ...)
from . import quantized  # noqa: F401,E402  (registers quantize, dequantize, qconv)
from . import qgemm  # noqa: F401,E402  (registers qgemm_columns, qgemm_weights, qgemm_bias, qgemm)
from . import normalize  # noqa: F401,E402  (registers lrn, standardize and their gradients)
from . import reduce  # noqa: F401,E402  (registers reduce, reduce_grad)
from . import indexing  # noqa: F401,E402  (registers cast, where, take, take_grad)
from . import rearrange  # noqa: F401,E402  (depth_to_space, space_to_depth, tile, einsum: composites)
from . import memory  # noqa: F401,E402  (registers crop, paste, depthwise_inplace, pointwise_inplace)

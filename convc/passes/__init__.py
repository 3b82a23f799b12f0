"""Lowering passes. Each pass is a named ``Graph -> Graph`` function in its
own module; ``run`` applies a pipeline (see ``PIPELINES``)."""
from .manager import PASSES, PIPELINES, PassError, PassReport, decline, register, report, resolve, run  # noqa: F401
from ..tuning import note  # noqa: F401,E402  (a line for the running pass's report notes)
from . import cleanup, factor, fft, fusion, gemm, grouped, im2col, strided, tiled, transposed  # noqa: F401,E402  (registers the passes)
from . import winograd  # noqa: F401,E402  (registers conv_to_winograd)
from . import blocked  # noqa: F401,E402  (registers to_blocked_layout)
from . import quantize  # noqa: F401,E402  (registers split_int8_epilogues, quantize_int8, cancel_requantize)
from . import qdq  # noqa: F401,E402  (registers fold_qdq)
from . import qgemm  # noqa: F401,E402  (registers qconv_to_gemm)
from . import memory  # noqa: F401,E402  (registers inplace_elementwise, inplace_depthwise, inplace_pointwise, patch_first_stages)

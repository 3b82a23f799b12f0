"""Op definitions: one module per family, each op defined in one class."""
from .registry import OPS, Op, get_op, register  # noqa: F401
from . import conv  # noqa: F401,E402  (registers the ops)

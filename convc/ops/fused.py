"""``fused_separable``: a depthwise conv (+ bias, + activation) and the
pointwise 1×1 conv after it, in ONE kernel. For each output row, the
depthwise results of all channels go into a small tile (C_mid × W_out)
instead of a full intermediate tensor, and the pointwise product reads them
from there. Made by the ``fuse_separable`` pass, not by users."""
from __future__ import annotations


from ..errors import RuleError
from ..ir import TensorType
from . import activations
from .conv import Conv, conv_geometry
from .epilogue import Epilogue
from .registry import Op, flag, register, same_dtype
from .window import axes_context


def _split(attrs, prefix):
    """The attrs of one half (``dw_`` or ``pw_``) as conv attrs."""
    return {k[len(prefix):]: v for k, v in attrs.items() if k.startswith(prefix)}


@register
class FusedSeparable(Op):
    name = "fused_separable"
    arity = (3, 5)
    inputs = ("x", "w_dw", "w_pw", "b_dw", "b_pw")

    def arg_names(self, n, attrs=None):
        return ["x", "w_dw", "w_pw"] + (["b_dw"] if attrs["dw_bias"] else []) + (["b_pw"] if attrs["pw_bias"] else [])

    def _types(self, attrs, types):
        x, w_dw, w_pw = types[:3]
        rest = list(types[3:])
        b_dw = rest.pop(0) if attrs["dw_bias"] else None
        b_pw = rest.pop(0) if attrs["pw_bias"] else None
        if rest:
            raise RuleError("more inputs than dw_bias/pw_bias announce")
        return x, w_dw, w_pw, b_dw, b_pw

    def normalize(self, attrs, types):
        x, w_dw, w_pw, b_dw, b_pw = self._types(attrs, types)
        if len(x.shape) != 4:
            raise RuleError("fused_separable is 2D")
        dw = dict(_split(attrs, "dw_"), groups=x.shape[1])
        dw.pop("bias", None)
        dw_attrs, mid = conv_geometry(dw, x, w_dw)
        if w_pw.shape[1:] != (mid[1], 1, 1):
            raise RuleError(f"pointwise weight must be (C_out, {mid[1]}, 1, 1), got {w_pw.shape}")
        out = dict(attrs)
        for k in ("stride", "padding", "dilation"):
            out["dw_" + k] = dw_attrs[k]
        out["dw_flip"] = flag(attrs.get("dw_flip", False), "dw_flip")
        names = {"activation"} | {p for a in activations.TABLE.values() for p in a.params}
        for prefix in ("dw_", "pw_"):         # each half's activation: a record of the table
            half = {k[len(prefix):]: out.pop(k) for k in list(out) if k[len(prefix):] in names and k.startswith(prefix)}
            out.update({prefix + k: v for k, v in activations.normalize_fused(half).items()})
        return out

    def infer(self, attrs, types):
        x, w_dw, w_pw, b_dw, b_pw = self._types(attrs, types)
        same_dtype(types)
        _, mid = conv_geometry(dict(_split(attrs, "dw_"), groups=x.shape[1]), x, w_dw)
        if b_dw is not None and b_dw.shape != (mid[1],):
            raise RuleError(f"depthwise bias must be ({mid[1]},), got {b_dw.shape}")
        if b_pw is not None and b_pw.shape != (w_pw.shape[0],):
            raise RuleError(f"pointwise bias must be ({w_pw.shape[0]},), got {b_pw.shape}")
        return TensorType((x.shape[0], w_pw.shape[0]) + mid[2:], x.dtype)

    def _halves(self, attrs, x_shape):
        dw = _split(attrs, "dw_")
        dw.pop("bias")
        dw["groups"] = x_shape[1]
        pw = {k: v for k, v in _split(attrs, "pw_").items() if k != "bias"}
        pw.update(stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), groups=1, flip=False)
        return dw, pw

    def reference(self, attrs, x, w_dw, w_pw, *biases):
        biases = list(biases)
        b_dw = biases.pop(0) if attrs["dw_bias"] else None
        b_pw = biases.pop(0) if attrs["pw_bias"] else None
        dw, pw = self._halves(attrs, x.shape)
        mid = Conv.reference(Conv, dw, x, w_dw, b_dw)
        return Conv.reference(Conv, pw, mid, w_pw, b_pw)

    def context(self, attrs, types, out):
        from ..codegen.env import CTYPES
        x, w_dw, w_pw, b_dw, b_pw = self._types(attrs, types)
        c_mid = w_dw.shape[0]
        T = CTYPES[out.dtype]
        return dict(N=x.shape[0], C_IN=x.shape[1], C_MID=c_mid, MULT=c_mid // x.shape[1], C_OUT=w_pw.shape[0],
                    flip=attrs["dw_flip"], dw_bias=attrs["dw_bias"], pw_bias=attrs["pw_bias"],
                    dw_ep=Epilogue.of(_split(attrs, "dw_"), T), pw_ep=Epilogue.of(_split(attrs, "pw_"), T),
                    par=[("n", "N", x.shape[0]), ("oy", "OUT_Y", out.shape[2])],
                    axes=axes_context(x.shape[2:], out.shape[2:], w_dw.shape[2:], attrs["dw_stride"],
                                      attrs["dw_dilation"], attrs["dw_padding"]))

    def workspace(self, attrs, types, out, target="c"):
        """OpenCL: one row tile (C_MID x OUT_X) per work-item (n, oy); C
        keeps the tile on the stack."""
        if target != "opencl":
            return 0
        return out.shape[0] * out.shape[2] * self.context(attrs, types, out)["C_MID"] * out.shape[3]

    def macs(self, attrs, types, out):
        x, w_dw, w_pw = types[:3]
        plane = out.shape[0] * out.shape[2] * out.shape[3]
        return plane * w_dw.shape[0] * w_dw.shape[2] * w_dw.shape[3] + plane * w_pw.shape[0] * w_pw.shape[1]



"""``fft_conv``: the same function as ``conv`` (unit stride, 1D or 2D),
computed through the convolution theorem: every input plane and kernel is
zero-padded to a power-of-two size at least the padded input (so the
circular correlation never wraps), transformed by a radix-2 FFT, multiplied
(kernel conjugated: cross-correlation) and summed over input channels, then
transformed back. Made by the ``conv_to_fft`` pass."""
from __future__ import annotations

from ..errors import RuleError
from .conv import Conv
from .registry import register
from .window import axes_context


def fft_size(n: int) -> int:
    f = 1
    while f < n:
        f *= 2
    return f


@register
class FFTConv(Conv):
    name = "fft_conv"
    template = "fft_conv"

    def normalize(self, attrs, types):
        attrs = super().normalize(attrs, types)
        if any(s != 1 for s in attrs["stride"]):
            raise RuleError(f"fft_conv needs unit stride, got {attrs['stride']}")
        if len(types[0].shape) not in (3, 4):
            raise RuleError("fft_conv is 1D or 2D")
        if attrs.get("activation") or attrs.get("residual"):
            raise RuleError("fft_conv takes no epilogue (fused activation or residual)")
        return attrs

    def context(self, attrs, types, out):
        x, w = types[:2]
        g = attrs["groups"]
        bias = "none" if len(types) == 2 else ("tied" if len(types[2].shape) == 1 else "untied")
        axes = axes_context(x.shape[2:], out.shape[2:], w.shape[2:], attrs["stride"], attrs["dilation"],
                            attrs["padding"])
        for a, (lo, hi) in zip(axes, attrs["padding"]):
            a["f"] = fft_size(a["i"] + lo + hi)
        if len(axes) == 1:       # a 1D transform is a 2D one with one row
            axes = [dict(l="y", U="Y", i=1, o=1, k=1, s=1, d=1, p=0, f=1)] + axes
        return dict(N=x.shape[0], C_IN=x.shape[1], C_OUT=w.shape[0], GROUPS=g, C_IN_G=x.shape[1] // g,
                    C_OUT_G=w.shape[0] // g, flip=attrs["flip"], bias=bias, axes=axes)

    def workspace(self, attrs, types, out, target="c"):
        """Real and imaginary spectra of every input plane, every kernel and
        one accumulator."""
        ctx = self.context(attrs, types, out)
        plane = ctx["axes"][0]["f"] * ctx["axes"][1]["f"]
        return 2 * plane * (ctx["N"] * ctx["C_IN"] + ctx["C_OUT"] * ctx["C_IN_G"] + 1)

    def macs(self, attrs, types, out):
        """Real multiplications of the transforms and the spectral products."""
        x, w = types[:2]
        ctx = self.context(attrs, types, out)
        fy, fx = ctx["axes"][0]["f"], ctx["axes"][1]["f"]
        plane = fy * fx
        logs = max(1, (plane - 1).bit_length())
        ffts = x.shape[0] * x.shape[1] + w.shape[0] * w.shape[1] + out.shape[0] * out.shape[1]
        return ffts * 2 * plane * logs + 4 * plane * out.shape[0] * w.shape[0] * w.shape[1]

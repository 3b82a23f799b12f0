"""``conv_to_fft``: convolution through the convolution theorem."""
from __future__ import annotations

from ..ir import Graph
from ..ops.fft import fft_size
from .manager import decline, register
from .rewrite import attrs, fresh, ins, rewrite

MAX_SPECTRA_BYTES = 64 << 20     # the generated kernel keeps every spectrum in static memory


def _fft(g: Graph, n: str):
    if g.node(n)["op"] != "conv":
        return None
    a = attrs(g, n)
    x, w, *b = ins(g, n)
    if len(x.shape) not in (3, 4):
        return decline(n, f"{len(x.shape) - 2}D; fft_conv is 1D or 2D")
    if any(s != 1 for s in a["stride"]):
        return decline(n, f"stride {a['stride']}; fft_conv needs 1")
    if a.get("activation") or a.get("residual"):
        return decline(n, f"a fused {a.get('activation') or 'residual'}; fft_conv has no epilogue")
    plane = 1
    for size, (lo, hi) in zip(x.shape[2:], a["padding"]):
        plane *= fft_size(size + lo + hi)
    spectra = (x.shape[0] * x.shape[1] + w.shape[0] * w.shape[1] + 1) * plane * 2
    if spectra * (8 if x.dtype == "float64" else 4) > MAX_SPECTRA_BYTES:
        return decline(n, f"spectra of {spectra * (8 if x.dtype == 'float64' else 4):,} B, above "
                          f"MAX_SPECTRA_BYTES {MAX_SPECTRA_BYTES:,} (static memory)")
    return g.add("fft_conv", [x, w, *b], dict(a), fresh(g, f"{n}.fft"))


@register
def conv_to_fft(g: Graph) -> Graph:
    """A unit-stride 1D/2D conv becomes ``fft_conv``: FFT of the zero-padded
    planes, a pointwise product with the conjugated kernel spectra, inverse
    FFT. O(n log n) per plane whatever the kernel size: worth it for large
    kernels (compare the MACs); float32 results carry FFT rounding error."""
    return rewrite(g, _fft)

"""A numpy-only PNG writer for the examples (grayscale, 8 bit)."""
import struct
import zlib

import numpy as np


def write_png(path, image):
    """Write a 2D array as an 8-bit grayscale PNG, scaled to its own min..max."""
    a = np.asarray(image, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    a = np.zeros_like(a) if hi == lo else (a - lo) / (hi - lo)
    px = (a * 255 + 0.5).astype(np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in px)      # filter type 0 per row

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", px.shape[1], px.shape[0], 8, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                + chunk(b"IEND", b""))

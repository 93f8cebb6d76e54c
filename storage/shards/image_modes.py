"""Pillow images of any mode → 8-bit gray ('L') or RGB, without silent clipping.

Pillow's `convert('L')` clips 16- and 32-bit integer images at 255 (a 16-bit PNG whose values
reach 65535 comes out almost all white) and has no meaningful scale for float images. Here:
16-bit modes (`I;16`, `I;16B`, `I;16L`, and `I`, which is how 16-bit PNGs decode in some Pillow
versions) are scaled by 255/65535 with rounding; `I` values outside 0..65535 and float (`F`) images
are refused with a message; every other mode (1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr, LAB, HSV)
goes through Pillow's own conversion (palettes expanded, alpha dropped).
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_8bit(im: Image.Image, mode: str) -> Image.Image:
    """`im` as an 8-bit image of `mode` ('L' or 'RGB'). Raises ValueError for modes without an 8-bit scale."""
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im)
        if a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise ValueError(f"a {im.mode} image with values in {int(a.min())}..{int(a.max())}, outside the 16-bit "
                             "range 0..65535; convert it to 8 or 16 bits first")
        im = Image.fromarray(((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif im.mode == "F":
        raise ValueError("a floating-point (mode F) image has no 8-bit scale; convert it to 8 or 16 bits first")
    return im if im.mode == mode else im.convert(mode)

"""Pad-to-square-then-resize without ever building the padded square (pure PIL / numpy; no torch).

MGM's `pad` preprocessing centres the photo on a square canvas of side max(w, h) filled with the mean
colour and resizes that canvas to the HR side with PIL bicubic. Built literally, the canvas of a
16000 x 1 upload is 16000 x 16000 (1 GB as a PIL image, several GB with the numpy copies around it):
the cost grew with the square of the upload's long side. `padded_square_resize` gives the *same bytes*
in memory bounded by the output size (plus bands of ~BAND_BYTES), never by the canvas.

Why it is bit-identical (Pillow's `ImagingResample`, libImaging/Resample.c): a resize that changes
both sides runs two separable passes, horizontal first, each rounding to uint8:
    T = H(canvas)   (side rows x `size` columns),   out = V(T)   (`size` x `size`).
H treats every row on its own and V every column on its own, and the filter taps of each pass depend
only on (input length, box, output length) = (side, 0..side, size) - never on the other axis. So:
  * H is applied to bands of canvas rows (a side-wide band, resized to `size` x band with the height
    unchanged, which Pillow runs as the horizontal pass alone). Rows that are pure padding all give one
    and the same row `fill_row` (computed once, by H of a one-row canvas). Columns of T whose taps see
    only padding equal `fill_row` in every row, so only the columns that can see the photo are kept.
  * V is applied to bands of T's columns (a side-tall strip rebuilt from `fill_row` and the kept
    columns, resized to strip-width x `size`, which Pillow runs as the vertical pass alone).
Each band runs exactly the taps and the integer arithmetic of the one-shot resize on exactly the same
input values, so every output byte is the same. tests/test_image_bounds.py checks it against the
literal path on many shapes (wide, tall, odd, up- and downscaling, side == size).

Cost: memory ~ BAND_BYTES + size x (rows of the photo) x 3 for a wide photo, size x size x 7 for the
output; time ~ the photo's pixels x taps (wide) plus size x side x taps for the vertical pass. A tall
photo (h > w) must run the horizontal pass over side-wide canvas rows (time ~ h x side, ~3 s at
h = 12000 on one core); past TALL_EXACT_SIDE (never an ordinary photo: within the 40 MP limit it is at
least 3.6 : 1) the same banded code runs on the transposed photo and the result is transposed back.
That applies the vertical pass first: same taps, but the intermediate uint8 rounding happens in the
other order, so pixels may differ by a level or two from the literal path (tested on a moderate
analogue). Photos up to SMALL_CANVAS pixels of canvas take the literal path itself.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

BICUBIC = Image.Resampling.BICUBIC
BAND_BYTES = 8 << 20   # working-band budget of the bounded paths
SMALL_CANVAS = 4 << 20  # canvases up to this many pixels (16 MB as RGB) are still built literally
TALL_EXACT_SIDE = 12000  # a taller photo (h > w) takes the transposed, close-not-exact route


def expand_to_square(img: Image.Image, fill) -> Image.Image:
    """Centre the image on a square canvas (the official `pad` geometry: offset = (long - short) // 2)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def rgb_region(img: Image.Image, box: tuple[int, int, int, int], factor=1) -> Image.Image:
    """img.crop(box).convert("RGB"), shrunk by an integer `factor` (int or (fx, fy); Image.reduce, box
    averaging), built band by band so that no full-size copy of a large or non-RGB image is ever made."""
    x0, y0, x1, y1 = box
    fx, fy = (factor, factor) if isinstance(factor, int) else factor
    fx, fy = max(1, int(fx)), max(1, int(fy))
    if fx == fy == 1 and (x1 - x0) * (y1 - y0) * 4 <= BAND_BYTES:
        region = img.crop(box)
        return region if region.mode == "RGB" else region.convert("RGB")
    out = Image.new("RGB", (math.ceil((x1 - x0) / fx), math.ceil((y1 - y0) / fy)))
    rows = max(1, BAND_BYTES // (8 * max(1, x1 - x0) * fy)) * fy  # a multiple of fy: bands reduce alike
    for y in range(y0, y1, rows):
        band = img.crop((x0, y, x1, min(y + rows, y1)))
        if band.mode != "RGB":
            band = band.convert("RGB")
        out.paste(band.reduce((fx, fy)) if fx * fy > 1 else band, (0, (y - y0) // fy))
    return out


def _fill_row(side: int, size: int, fill) -> np.ndarray:
    """H(one canvas row of pure padding): (size, 3) uint8."""
    return np.asarray(Image.new("RGB", (side, 1), tuple(fill)).resize((size, 1), BICUBIC))[0]


def padded_square_resize(img: Image.Image, size: int, fill) -> Image.Image:
    """== expand_to_square(img.convert("RGB"), fill).resize((size, size), BICUBIC), byte for byte,
    in memory bounded by `size` (see the module docstring). One exception, documented there: a tall
    photo with a side over TALL_EXACT_SIDE is resized vertical-pass first (through its transpose), which
    keeps time bounded too and differs from the literal result by rounding only (a level or two)."""
    w, h = img.size
    side = max(w, h)
    fill = tuple(fill)
    if side * side <= SMALL_CANVAS:  # ordinary photos: the literal path, cheap enough
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        return expand_to_square(rgb, fill).resize((size, size), BICUBIC)
    if h > w and side > TALL_EXACT_SIDE:
        return _banded(img, size, fill, transposed=True).transpose(Image.Transpose.TRANSPOSE)
    return _banded(img, size, fill, transposed=False)


def _banded(img: Image.Image, size: int, fill: tuple, transposed: bool) -> Image.Image:
    """The two passes in bands, on img (or on its transpose, read band by band: never copied whole)."""
    w, h = img.size
    if transposed:
        w, h = h, w
    side = max(w, h)
    left, top = (side - w) // 2, (side - h) // 2
    fill_row = _fill_row(side, size, fill)

    # Columns of T whose taps may reach the photo's columns [left, left + w): a generous bound on
    # Pillow's support (bicubic: 2 input pixels, x the scale when shrinking); the others are fill_row.
    scale = side / size
    reach = 2.0 * max(scale, 1.0) + 2.0
    c0 = max(0, math.floor((left - reach) / scale - 0.5))
    c1 = min(size, math.ceil((left + w + reach) / scale - 0.5) + 1)

    # Horizontal pass over the canvas rows that hold the photo, in bands.
    t_img = np.empty((h, c1 - c0, 3), np.uint8)
    rows = max(1, BAND_BYTES // (8 * side))
    for y in range(0, h, rows):
        y1 = min(y + rows, h)
        if transposed:
            band = rgb_region(img, (y, 0, y1, w)).transpose(Image.Transpose.TRANSPOSE)
        else:
            band = rgb_region(img, (0, y, w, y1))
        if w != side:
            canvas = Image.new("RGB", (side, band.height), fill)
            canvas.paste(band, (left, 0))
            band = canvas
        t_img[y:y1] = np.asarray(band.resize((size, band.height), BICUBIC))[:, c0:c1]
        del band

    # Vertical pass over T's columns, in strips rebuilt from fill_row and the kept columns.
    out = np.empty((size, size, 3), np.uint8)
    cols = max(1, BAND_BYTES // (8 * side))
    for x0 in range(0, size, cols):
        x1 = min(size, x0 + cols)
        strip = np.empty((side, x1 - x0, 3), np.uint8)
        strip[:] = fill_row[x0:x1]
        a, b = max(x0, c0), min(x1, c1)
        if a < b:
            strip[top:top + h, a - x0:b - x0] = t_img[:, a - c0:b - c0]
        out[:, x0:x1] = np.asarray(Image.fromarray(strip).resize((x1 - x0, size), BICUBIC))
        del strip
    return Image.fromarray(out)

"""A colour bar with its scale and unit under a map, so a colour can be read as a number."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BAR_HEIGHT = 12
_PAD, _TEXT = 6, 14
LEGEND_HEIGHT = _PAD + BAR_HEIGHT + 2 * _TEXT + _PAD  # pixels the strip adds below the map


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def with_colorbar(image: Image.Image, cmap: str, vmin: float, vmax: float, label: str) -> Image.Image:
    """`image` with a legend strip below: the colour ramp from vmin to vmax (left to right), its ends and
    middle as numbers, and `label` (what the colour means, with its unit)."""
    from .heatmap import colorize
    w = image.width
    font = _font(12)
    pad, text_h = _PAD, _TEXT
    out = Image.new("RGB", (w, image.height + LEGEND_HEIGHT), (255, 255, 255))
    out.paste(image.convert("RGB"), (0, 0))
    x0, x1 = 8, max(9, w - 8)
    ramp = colorize(np.linspace(0.0, 1.0, x1 - x0)[None, :].repeat(BAR_HEIGHT, 0), cmap, 0.0, 1.0)
    y = image.height + pad
    out.paste(Image.fromarray(ramp), (x0, y))
    draw = ImageDraw.Draw(out)
    draw.rectangle([x0 - 1, y - 1, x1, y + BAR_HEIGHT], outline=(80, 80, 80))
    ty = y + BAR_HEIGHT + 2
    for frac, anchor in ((0.0, "la"), (0.5, "ma"), (1.0, "ra")):
        value = vmin + frac * (vmax - vmin)
        draw.text((x0 + frac * (x1 - x0), ty), f"{value:.3g}", fill=(40, 40, 40), font=font, anchor=anchor)
    draw.text((w / 2, ty + text_h), label, fill=(40, 40, 40), font=font, anchor="ma")
    return out

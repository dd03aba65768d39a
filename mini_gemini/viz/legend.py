"""A colour bar with its scale and unit under a map, so a colour can be read as a number.

The strip scales with the picture (its text is about 1/40 of the picture's width, at least 14 px), so that it
stays legible when the page shows the picture at the width of its panel.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)
LABEL_LINES = 2           # lines kept for the label (a longer one is cut with "…")
_GREY = (150, 150, 150)   # what a faded ramp is drawn over (a stand-in for the photo)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def font_size(width: int) -> int:
    """Text size (px) of the strip under a picture `width` px wide."""
    return max(14, round(width / 40))


def legend_height(width: int) -> int:
    """Pixels the strip adds below a picture `width` px wide: padding, the bar, the numbers, two label lines."""
    f = font_size(width)
    return round(0.5 * f) + f + round(1.4 * f) + LABEL_LINES * round(1.3 * f) + round(0.4 * f)


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def with_colorbar(image: Image.Image, cmap: str, vmin: float, vmax: float, label: str, *,
                  fade: float | None = None, open_top: bool = False) -> Image.Image:
    """`image` with a legend strip below (`legend_height(image.width)` px): the colour ramp from vmin to vmax
    (left to right) with five ticks and their numbers, and `label` (what the colour means, with its unit; wrapped
    to two lines).

    fade: the maximum opacity of a map whose opacity follows its value (`heatmap.overlay(fade=True)`): the ramp
        is then drawn the same way over grey, clear at the low end.
    open_top: the map's values go above vmax (shown as vmax's colour): the last number reads "vmax+" ("and more").
    """
    from .heatmap import FADE_GAMMA, colorize
    w = image.width
    f = font_size(w)
    font = _font(f)
    bar, pad = f, round(0.5 * f)
    out = Image.new("RGB", (w, image.height + legend_height(w)), (255, 255, 255))
    out.paste(image.convert("RGB"), (0, 0))
    x0, x1 = round(0.6 * f) + 8, max(round(0.6 * f) + 9, w - round(0.6 * f) - 8)
    t = np.linspace(0.0, 1.0, x1 - x0)[None, :].repeat(bar, 0)
    ramp = colorize(t, cmap, 0.0, 1.0).astype(np.float32)
    if fade is not None:
        a = (fade * t ** FADE_GAMMA)[..., None]
        ramp = np.asarray(_GREY, np.float32) * (1 - a) + ramp * a
    y = image.height + pad
    out.paste(Image.fromarray((ramp + 0.5).astype(np.uint8)), (x0, y))
    draw = ImageDraw.Draw(out)
    draw.rectangle([x0 - 1, y - 1, x1, y + bar], outline=(80, 80, 80))
    ty = y + bar + round(0.2 * f)
    for frac in TICKS:
        x = x0 + frac * (x1 - x0)
        draw.line([(x, y + bar), (x, y + bar + round(0.2 * f))], fill=(80, 80, 80), width=max(1, f // 12))
        text = _fmt(vmin + frac * (vmax - vmin)) + ("+" if open_top and frac == 1.0 else "")
        anchor = "la" if frac == 0.0 else "ra" if frac == 1.0 else "ma"
        draw.text((x, ty), text, fill=(30, 30, 30), font=font, anchor=anchor)
    ly = ty + round(1.4 * f)
    for line in _wrap(label, font, w - 2 * x0 + 16):
        draw.text((w / 2, ly), line, fill=(30, 30, 30), font=font, anchor="ma")
        ly += round(1.3 * f)
    return out


def _wrap(label: str, font, width: int) -> list[str]:
    """`label` in at most LABEL_LINES lines that fit `width` px (the last one cut with "…" if need be)."""
    def fits(s: str) -> bool:
        return font.getlength(s) <= width
    words = label.split()
    lines: list[str] = []
    while words and len(lines) < LABEL_LINES:
        n = len(words)
        while n > 1 and not fits(" ".join(words[:n])):
            n -= 1
        lines.append(" ".join(words[:n]))
        words = words[n:]
    if words:
        last = lines[-1] + " " + " ".join(words)
        while last and not fits(last + "…"):
            last = last[:-1]
        lines[-1] = last.rstrip() + "…"
    return lines

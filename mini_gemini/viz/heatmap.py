"""Mining maps -> pictures in the photo's own geometry (pure numpy / PIL; no model, no Gradio).

Geometry, as the preprocessing lays it out: the photo (w x h) is centred on a square canvas of side
max(w, h) (`pad_box`), and every view's tokens tile that square evenly. "Square units" (u, v) below run
over [0, 1) across that canvas.

    plain model:  one view, n x n LR tokens over the whole square
    HD model:     g x g crops (row-major), each n x n tokens over its cell of the square, plus an
                  optional global view (first in model order) with n x n tokens over the whole square

Each LR token mines a P x P window of HR candidates that subdivides the token's own cell, row-major.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..inputs.padding import SMALL_CANVAS, rgb_region

CROPS, GLOBAL = "crops", "global"
METRICS = ("focus", "max weight")
DEFAULT_FILL = (122, 116, 104)  # the processor's padding colour (CLIP mean x 255)


# ---- geometry -------------------------------------------------------------------------------------
def pad_box(width: int, height: int) -> tuple[int, int, int]:
    """(left, top, side): where the photo sits on the square canvas that the processor pads it to."""
    side = max(width, height)
    return (side - width) // 2, (side - height) // 2, side


@dataclass(frozen=True)
class Layout:
    """How one image's visual tokens tile the padded square."""
    side: int                   # n: LR tokens per view side
    patch: int                  # P: HR candidates per LR token side
    grid: int = 1               # g: HD crops per side (1 = plain)
    global_view: bool = False   # HD: a global view comes first in model order

    @classmethod
    def from_config(cls, config) -> Layout:
        """From an MGMConfig (duck-typed: vision.image_size/patch_size, patch_side, image_grid, image_global)."""
        grid = int(config.image_grid)
        return cls(side=config.vision.image_size // config.vision.patch_size, patch=config.patch_side,
                   grid=grid, global_view=bool(config.image_global) and grid > 1)

    @property
    def views(self) -> int:
        return self.grid ** 2 + (1 if self.global_view else 0)

    @property
    def tokens(self) -> int:
        return self.side ** 2

    def choices(self) -> tuple[str, ...]:
        """The maps this layout can show: the crops (or the only view), and the global view if any."""
        return (CROPS, GLOBAL) if self.global_view else (CROPS,)

    def _check(self, which: str):
        if which not in self.choices():
            raise ValueError(f"this model has no {which!r} view; choose from {self.choices()}")

    def rows(self, which: str = CROPS) -> int:
        """Token rows (= columns) of the map `which` over the whole square."""
        self._check(which)
        return self.side if which == GLOBAL else self.side * self.grid

    def token_at(self, u: float, v: float, which: str = CROPS) -> tuple[int, int]:
        """(view, token) whose cell holds the square point (u, v), in model order."""
        rows = self.rows(which)
        col = min(max(int(math.floor(u * rows)), 0), rows - 1)
        row = min(max(int(math.floor(v * rows)), 0), rows - 1)
        if which == GLOBAL:
            return 0, row * self.side + col
        n, off = self.side, 1 if self.global_view else 0
        return off + (row // n) * self.grid + col // n, (row % n) * n + col % n

    def cell(self, view: int, token: int) -> tuple[float, float, float, float]:
        """(u0, v0, u1, v1): the square-unit box of one token (its P x P candidates subdivide it)."""
        if not (0 <= view < self.views and 0 <= token < self.tokens):
            raise IndexError(f"no token {token} in view {view} (views {self.views}, tokens {self.tokens})")
        r, c = divmod(token, self.side)
        if self.global_view and view == 0:
            rows, row, col = self.side, r, c
        else:
            i, j = divmod(view - (1 if self.global_view else 0), self.grid)
            rows, row, col = self.side * self.grid, i * self.side + r, j * self.side + c
        return col / rows, row / rows, (col + 1) / rows, (row + 1) / rows


def assemble(values: np.ndarray, layout: Layout, which: str = CROPS) -> np.ndarray:
    """(V, N) per-token values in model order -> (rows, rows) map over the padded square.

    `crops` places each crop's n x n map in its cell of the g x g grid; `global` is the global view's map.
    """
    values = np.asarray(values)
    if values.shape[:2] != (layout.views, layout.tokens):
        raise ValueError(f"expected ({layout.views}, {layout.tokens}, ...) values, got {values.shape}")
    n, g = layout.side, layout.grid
    grids = values.reshape(layout.views, n, n, *values.shape[2:])
    if which == GLOBAL:
        layout._check(which)
        return grids[0]
    crops = grids[1:] if layout.global_view else grids
    rows = [np.concatenate(list(crops[i * g:(i + 1) * g]), axis=1) for i in range(g)]
    return np.concatenate(rows, axis=0)


def to_photo(square_map: np.ndarray, width: int, height: int,
             out_size: tuple[int, int] | None = None) -> np.ndarray:
    """A map over the padded square -> the same map over the photo alone (padding cut away).

    Each output pixel takes the value of the map cell under its centre (nearest: token cells stay
    sharp and honest). out_size = (out_w, out_h), default the photo's own size.
    """
    ri, ci = photo_cells(square_map.shape[:2], width, height, out_size)
    return square_map[ri[:, None], ci[None, :]]


def photo_cells(shape: tuple[int, int], width: int, height: int,
                out_size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(row index (out_h,), column index (out_w,)): the cell of a (rows, cols) map over the padded square under
    the centre of each output pixel of the photo shown at out_size (what `to_photo` samples)."""
    out_w, out_h = out_size or (width, height)
    left, top, side = pad_box(width, height)
    rows, cols = shape
    xs = ((np.arange(out_w) + 0.5) * width / out_w + left) / side
    ys = ((np.arange(out_h) + 0.5) * height / out_h + top) / side
    ci = np.clip(np.floor(xs * cols).astype(int), 0, cols - 1)
    ri = np.clip(np.floor(ys * rows).astype(int), 0, rows - 1)
    return ri, ci


def display_size(width: int, height: int, low: int = 384, high: int = 640) -> tuple[int, int]:
    """Size to show a photo at: its long side brought into [low, high], aspect kept."""
    long = max(width, height)
    scale = min(max(long, low), high) / long
    return max(1, round(width * scale)), max(1, round(height * scale))


def click_to_token(x: float, y: float, display: tuple[int, int], photo: tuple[int, int], layout: Layout,
                   which: str = CROPS) -> tuple[int, int]:
    """A click at pixel (x, y) of the photo shown at `display` size -> (view, token) under it."""
    (dw, dh), (w, h) = display, photo
    left, top, side = pad_box(w, h)
    px, py = (x + 0.5) * w / dw, (y + 0.5) * h / dh     # the clicked pixel's centre, in photo pixels
    return layout.token_at((px + left) / side, (py + top) / side, which)


def cell_in_photo(layout: Layout, view: int, token: int, photo: tuple[int, int],
                  display: tuple[int, int] | None = None) -> tuple[float, float, float, float]:
    """A token's cell as (x0, y0, x1, y1) in photo pixels (or display pixels); may reach into the padding."""
    w, h = photo
    dw, dh = display or photo
    left, top, side = pad_box(w, h)
    u0, v0, u1, v1 = layout.cell(view, token)
    sx, sy = dw / w, dh / h
    return ((u0 * side - left) * sx, (v0 * side - top) * sy, (u1 * side - left) * sx, (v1 * side - top) * sy)


# ---- scalars per token ----------------------------------------------------------------------------
def token_scores(attn: np.ndarray, metric: str = "focus") -> np.ndarray:
    """(..., P*P) mining weights -> (...) one number per LR token.

    focus = 1 - H(a) / log(P*P): 0 when the weights are spread evenly (nothing in particular was mined),
    1 when all weight sits on one HR candidate. "max weight" is the largest single weight, in [1/P*P, 1].
    """
    a = np.asarray(attn, dtype=np.float64)
    if metric == "max weight":
        return a.max(-1)
    if metric != "focus":
        raise ValueError(f"unknown metric {metric!r}; choose from {METRICS}")
    k = a.shape[-1]
    if k == 1:
        return np.ones(a.shape[:-1])
    entropy = -(a * np.log(np.clip(a, 1e-12, None))).sum(-1)
    return np.clip(1.0 - entropy / math.log(k), 0.0, 1.0)


# ---- pictures -------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _lut(cmap: str) -> np.ndarray:
    """(256, 3) uint8: the colormap's 256 colours as RGB bytes."""
    import matplotlib  # only the colormap registry: no figures, no fonts, no backend
    return (matplotlib.colormaps[cmap](np.arange(256))[:, :3] * 255 + 0.5).astype(np.uint8)


def scaled(values: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Values -> float32 in [0, 1] over [vmin, vmax] (default: their range; all 0 when it is empty; NaN -> 0)."""
    v = np.asarray(values, dtype=np.float64)
    lo = float(np.nanmin(v)) if vmin is None else vmin
    hi = float(np.nanmax(v)) if vmax is None else vmax
    t = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    return np.clip(np.nan_to_num(t), 0.0, 1.0).astype(np.float32)


def colorize(values: np.ndarray, cmap: str = "inferno", vmin: float | None = None,
             vmax: float | None = None) -> np.ndarray:
    """Values -> uint8 RGB through a matplotlib colormap, scaled to [vmin, vmax] (default: their range).

    The colormap's own 256-entry table, indexed as matplotlib indexes it (min(floor(t * 256), 255)): the
    same bytes as `colormaps[cmap](t)`, without its float64 RGBA array."""
    idx = np.minimum((scaled(values, vmin, vmax) * 256).astype(np.intp), 255)
    return _lut(cmap)[idx]


FADE_GAMMA = 0.6  # opacity = alpha * t ** FADE_GAMMA: middling values stay visible, zero stays clear


def overlay(photo: Image.Image, square_map: np.ndarray, *, cmap: str = "inferno", alpha: float = 0.6,
            size: tuple[int, int] | None = None, vmin: float | None = None, vmax: float | None = None,
            mark: tuple[float, float, float, float] | None = None, fade: bool = False,
            base: Image.Image | None = None) -> Image.Image:
    """The map (over the padded square) blended over the photo, at `size` (default display_size).

    fade: the opacity follows the value (alpha * t ** FADE_GAMMA, t = the value scaled to [vmin, vmax]): the
        photo stays as it is where the map is at its low end, and the colour covers it where the map is high.
        Otherwise every pixel is blended with `alpha`.
    mark: a box in output pixels to outline (the selected token).
    base: the photo already resized to `size` (RGB), when the caller keeps one.
    The map is coloured at its own resolution, then each output pixel takes the colour of the cell under
    its centre (nearest: token cells stay sharp and honest).
    """
    w, h = photo.size
    size = size or display_size(w, h)
    t = scaled(square_map, vmin, vmax)
    ri, ci = photo_cells(t.shape[:2], w, h, size)
    cells = ri[:, None], ci[None, :]  # one gather per map, straight into a contiguous (out_h, out_w) array
    heat = Image.fromarray(colorize(t, cmap, 0.0, 1.0)[cells])
    a = alpha * t ** FADE_GAMMA if fade else np.full(t.shape, alpha, np.float32)
    mask = Image.fromarray((np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)[cells])
    # PIL blends in C: photo * (1 - mask / 255) + heat * mask / 255, rounded
    out = Image.composite(heat, base if base is not None else display_rgb(photo, size), mask)
    if mark is not None:
        draw = ImageDraw.Draw(out)
        x0, y0, x1, y1 = mark
        box = [round(x0), round(y0), max(round(x1) - 1, round(x0)), max(round(y1) - 1, round(y0))]
        draw.rectangle(box, outline=(255, 255, 255), width=3)
        draw.rectangle(box, outline=(0, 160, 255), width=1)
    return out


def outline_boxes(picture: Image.Image, boxes, photo_size: tuple[int, int]) -> None:
    """Outline each box (4 (x, y) points in pixels of the photo, e.g. a line of text OCR read) on `picture`, which
    shows the photo at its own size, with its number (1, 2, ...) on a dark tag at its top-left corner; the lines
    and the numbers grow with the picture, so they stay readable when it is shown at the width of a panel."""
    sx, sy = picture.width / photo_size[0], picture.height / photo_size[1]
    draw = ImageDraw.Draw(picture)
    width = max(2, round(picture.width / 320))
    font = _font(max(12, round(picture.width / 55)))
    for n, box in enumerate(boxes, 1):
        points = [(x * sx, y * sy) for x, y in box]
        draw.polygon(points, outline=(0, 0, 0), width=width + 2)
        draw.polygon(points, outline=(0, 255, 120), width=width)
        x, y = min(p[0] for p in points), min(p[1] for p in points)
        tag = draw.textbbox((x, y), str(n), font=font, anchor="lb")
        tag = (tag[0] - 3, tag[1] - 2, tag[2] + 3, tag[3] + 1)
        if tag[1] < 0:  # no room above the box: the tag goes inside it
            tag = (tag[0], tag[1] - tag[1], tag[2], tag[3] - tag[1])
        draw.rectangle(tag, fill=(0, 0, 0))
        draw.text((tag[0] + 3, tag[3] - 1), str(n), fill=(0, 255, 120), font=font, anchor="lb")


def display_rgb(photo: Image.Image, size: tuple[int, int]) -> Image.Image:
    """photo.convert("RGB").resize(size, BILINEAR), without a full-size RGB copy of a large photo
    (identical for RGB photos and small ones; a large non-RGB one is box-shrunk first, in bands)."""
    if photo.mode == "RGB":
        return photo.resize(size, Image.Resampling.BILINEAR)
    w, h = photo.size
    if w * h <= SMALL_CANVAS:
        return photo.convert("RGB").resize(size, Image.Resampling.BILINEAR)
    factor = (max(1, w // (2 * size[0])), max(1, h // (2 * size[1])))
    return rgb_region(photo, (0, 0, w, h), factor).resize(size, Image.Resampling.BILINEAR)


def padded_crop(photo: Image.Image, box: tuple[float, float, float, float], size: int,
                fill=DEFAULT_FILL) -> Image.Image:
    """The box (photo pixels, may reach into the padding) cut from the padded photo, resized to size x size.

    Small photos: literally (canvas, paste, bicubic resize of the box). Larger ones never build the
    side x side canvas: only the canvas region that the box's filter taps reach is built (padding and
    all), box-shrunk by an integer factor first when the box is over 4x the output; the same picture up
    to resampling rounding, in memory ~ the output size.
    """
    w, h = photo.size
    left, top, side = pad_box(w, h)
    x0, y0, x1, y1 = box
    bx0, by0, bx1, by1 = x0 + left, y0 + top, x1 + left, y1 + top  # canvas coordinates
    if side * side <= SMALL_CANVAS:
        canvas = Image.new("RGB", (side, side), tuple(fill))
        canvas.paste(photo.convert("RGB"), (left, top))
        return canvas.resize((size, size), Image.Resampling.BICUBIC, box=(bx0, by0, bx1, by1))
    scale = max(bx1 - bx0, by1 - by0) / size
    f = max(1, int(scale // 2))
    reach = 2.0 * max(scale, 1.0) + 2.0

    def span(a, b, origin):  # the region's [start, end) on one axis, its start on the photo's f-lattice
        start = max(0, origin + f * math.floor((math.floor(a - reach) - origin) / f))
        return start, min(side, math.ceil(b + reach))
    rx0, rx1 = span(bx0, bx1, left)
    ry0, ry1 = span(by0, by1, top)
    sub = Image.new("RGB", (math.ceil((rx1 - rx0) / f), math.ceil((ry1 - ry0) / f)), tuple(fill))
    px0, py0, px1, py1 = max(rx0, left), max(ry0, top), min(rx1, left + w), min(ry1, top + h)
    if px0 < px1 and py0 < py1:
        part = rgb_region(photo, (px0 - left, py0 - top, px1 - left, py1 - top), f)
        sub.paste(part, (round((px0 - rx0) / f), round((py0 - ry0) / f)))
    sw, sh = sub.size
    fbox = (min(max((bx0 - rx0) / f, 0.0), sw), min(max((by0 - ry0) / f, 0.0), sh),
            min(max((bx1 - rx0) / f, 0.0), sw), min(max((by1 - ry0) / f, 0.0), sh))
    return sub.resize((size, size), Image.Resampling.BICUBIC, box=fbox)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def zoom(photo: Image.Image, layout: Layout, view: int, token: int, weights: np.ndarray, *,
         cmap: str = "inferno", panel: int = 256, fill=DEFAULT_FILL) -> Image.Image:
    """Side by side: the token's cell of the photo with its P x P candidate grid, and the candidates'
    weights as a heat grid (scaled 0 .. max, each cell labelled). The strongest candidate is outlined."""
    p = layout.patch
    grid = np.asarray(weights, dtype=np.float64).reshape(p, p)
    crop = padded_crop(photo, cell_in_photo(layout, view, token, photo.size), panel, fill)
    heat = Image.fromarray(colorize(grid, cmap, 0.0, max(float(grid.max()), 1e-12))).resize(
        (panel, panel), Image.Resampling.NEAREST)
    gap = 12
    out = Image.new("RGB", (2 * panel + gap, panel), (255, 255, 255))
    out.paste(crop, (0, 0))
    out.paste(heat, (panel + gap, 0))
    draw = ImageDraw.Draw(out)
    step = panel / p
    for k in range(1, p):  # the candidate grid over the photo crop
        t = round(k * step)
        draw.line([(t, 0), (t, panel - 1)], fill=(255, 255, 255), width=1)
        draw.line([(0, t), (panel - 1, t)], fill=(255, 255, 255), width=1)
    best = divmod(int(grid.argmax()), p)
    for x_off in (0, panel + gap):
        r, c = best
        draw.rectangle([x_off + round(c * step), round(r * step), x_off + round((c + 1) * step) - 1,
                        round((r + 1) * step) - 1], outline=(0, 160, 255), width=2)
    if step >= 22:  # room for labels
        font = _font(max(8, min(14, int(step / 3.2))))
        colors = colorize(grid, cmap, 0.0, max(float(grid.max()), 1e-12)).reshape(-1, 3)
        for k, wgt in enumerate(grid.reshape(-1)):
            r, c = divmod(k, p)
            lum = 0.299 * colors[k][0] + 0.587 * colors[k][1] + 0.114 * colors[k][2]
            draw.text((panel + gap + (c + 0.5) * step, (r + 0.5) * step), f"{wgt:.2f}", anchor="mm",
                      font=font, fill=(0, 0, 0) if lum > 140 else (255, 255, 255))
    return out


def save_npz(path, attns, gains=None, answers=None, answer_tokens=None):
    """Raw maps as .npz: image{k} = (views, N, P*P) float32 mining weights (and gain{k} = (views, N)); with an
    answer's attribution, answer{k} = (answer tokens, views, n*P, n*P) float32, each answer token's map over image
    k's HR pixels per view (`ImageAttribution.hr_map`, geometry of `hr_map.mined_pixels` per view), for the images
    the answer saw (`answers`: {k: map}), and answer_tokens = the tokens' text (a unicode array)."""
    arrays = {f"image{k}": np.asarray(a, dtype=np.float32) for k, a in enumerate(attns)}
    for k, g in enumerate(gains or []):
        arrays[f"gain{k}"] = np.asarray(g, dtype=np.float32)
    for k, m in (answers or {}).items():
        arrays[f"answer{k}"] = np.asarray(m, dtype=np.float32)
    if answer_tokens is not None:
        arrays["answer_tokens"] = np.array(list(answer_tokens), dtype=str)
    np.savez_compressed(path, **arrays)
    return path

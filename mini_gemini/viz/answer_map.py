"""Answer maps (`modeling.attribution`) over the photo: one map over the padded square from the per-view maps,
the picture of a map laid over the photo, and the "where the answer drew on" summary in words ("top-right 41 %,
centre 20 %").

Geometry as in `hr_map.mined_pixels` (model order, row-major; `heatmap` for the padded square). Numpy and PIL.
"""
from __future__ import annotations

import numpy as np

from .heatmap import CROPS, Layout, display_size, outline_boxes, overlay, pad_box
from .hr_map import tile_views
from .legend import with_colorbar

TOP_PERCENTILE = 99.5   # the top of the colour scale: a few brightest pixels never wash the rest out
EVEN_LABEL = "times an even spread (1 = as if the answer drew on every part of this picture alike)"

REGIONS = (("top-left", "top", "top-right"), ("left", "centre", "right"),
           ("bottom-left", "bottom", "bottom-right"))


def square_map(maps: np.ndarray, layout: Layout) -> np.ndarray:
    """(V, n*P, n*P) per-view answer maps -> (g*n*P, g*n*P) one map over the padded square, float32.

    The crops tile the square (row-major); the global view (HD), at half their resolution, is spread evenly
    over the g x g fine pixels under each of its pixels (value / g^2), so the square map's mass is the sum
    of the views' masses: hr(pixel) = sum of r_i * a_i(pixel) over the LR tokens of every view whose window
    holds the pixel.

    Raises:
        ValueError: `maps` does not match the layout.
    """
    m = np.asarray(maps, dtype=np.float32)
    side = layout.side * layout.patch
    if m.shape != (layout.views, side, side):
        raise ValueError(f"expected ({layout.views}, {side}, {side}) maps, got {m.shape}")
    g = layout.grid
    crops = m[1:] if layout.global_view else m
    out = np.concatenate([np.concatenate(list(crops[i * g:(i + 1) * g]), axis=1) for i in range(g)], axis=0)
    if layout.global_view:
        out = out + np.repeat(np.repeat(m[0], g, axis=0), g, axis=1) / (g * g)
    return out


def _overlap(cells: int, lo: float, hi: float) -> np.ndarray:
    """(cells, 3): the fraction of each of `cells` equal cells of [0, 1) lying in each third of [lo, hi)."""
    edges = np.linspace(0.0, 1.0, cells + 1)
    thirds = lo + (hi - lo) * np.arange(4) / 3
    a = np.maximum(edges[:-1, None], thirds[None, :-1])
    b = np.minimum(edges[1:, None], thirds[None, 1:])
    return np.clip(b - a, 0, None) * cells


def region_shares(square: np.ndarray, width: int, height: int) -> list[tuple[str, float]]:
    """Share of a non-negative map over the padded square that falls in each ninth of the photo (padding cut
    away), largest first; [] when the map holds no mass over the photo. Exact: each map cell counts with
    the fraction of its area inside each ninth."""
    m = np.clip(np.nan_to_num(np.asarray(square, dtype=np.float64)), 0, None)
    left, top, side = pad_box(width, height)
    rows = _overlap(m.shape[0], top / side, (top + height) / side)       # (R, 3) photo rows' thirds
    cols = _overlap(m.shape[1], left / side, (left + width) / side)
    ninths = rows.T @ m @ cols                                            # (3, 3)
    total = float(ninths.sum())
    if total <= 0:
        return []
    shares = [(REGIONS[i][j], float(ninths[i, j]) / total) for i in range(3) for j in range(3)]
    return sorted(shares, key=lambda s: -s[1])


def top_regions(maps: np.ndarray, layout: Layout, width: int, height: int, top: int = 3,
                min_share: float = 0.05) -> str:
    """Where an answer map's mass lies on a `width` x `height` photo, in words: "top-right 41 %, centre 20 %".

    Args:
        maps: (V, n*P, n*P) one answer token's (or the whole answer's) map, `ImageAttribution.hr_map[t]` or
            `.answer_map()`.
        top: at most this many regions; regions under `min_share` are left out.
    Returns "" when the map holds no mass over the photo.
    """
    shares = region_shares(square_map(maps, layout), width, height)
    return ", ".join(f"{name} {round(100 * share)} %" for name, share in shares[:top]
                     if share >= min_share)


def relative_to_even(square: np.ndarray) -> np.ndarray:
    """A non-negative map divided by its mean: 1 where it is as high as an even spread of its mass, 10 where ten
    times that (float32; all zeros when the map holds no mass)."""
    m = np.clip(np.nan_to_num(np.asarray(square, dtype=np.float32)), 0, None)
    mean = float(m.mean()) if m.size else 0.0
    return m / mean if mean > 0 else np.zeros_like(m)


def picture(photo, maps: np.ndarray, layout: Layout, which: str = CROPS, *, cmap: str = "inferno",
            alpha: float = 0.85, size: tuple[int, int] | None = None, base=None, mark=None, boxes=(),
            label: str = EVEN_LABEL):
    """An answer map laid over the photo with its colour bar: (PIL RGB picture, the map shown, its colour range).

    Args:
        photo: the PIL photo the map is about.
        maps: (V, n*P, n*P) one token's (or the whole answer's) per-view map (`ImageAttribution.hr_map[t]`,
            `.answer_map()`).
        which: the crops (the only view of a plain model) or the global view (HD), as `hr_map.tile_views`.
        alpha: the opacity of the map's top colour; the opacity follows the value (`heatmap.overlay(fade=True)`),
            so the photo shows through where the answer drew on nothing.
        size: the picture's size without its colour bar (default `heatmap.display_size`); base: the photo already
            resized to it; mark: a box (output pixels) to outline; boxes: regions of the photo to outline and number
            (4 (x, y) points each, photo pixels: the lines OCR read).
    Returns:
        (picture with the legend strip below, the shown map over the padded square in "times an even spread",
        (0, top of the colour scale)).
    """
    shown = relative_to_even(tile_views(np.asarray(maps, dtype=np.float32), layout, which))
    top = float(np.percentile(shown, TOP_PERCENTILE)) if shown.size else 0.0
    top = max(top, 1e-6)
    size = size or display_size(*photo.size)
    over = overlay(photo, shown, cmap=cmap, alpha=alpha, size=size, vmin=0.0, vmax=top, fade=True, base=base,
                   mark=mark)
    if boxes:
        outline_boxes(over, boxes, photo.size)
    return with_colorbar(over, cmap, 0.0, top, label, fade=alpha, open_top=bool(shown.max() > top)), shown, (0.0, top)


# ---- in words (the MCP tool's summary, the OpenAI endpoint's `mgm_mining_summary`) ------------------------------
def image_summary(maps: np.ndarray, layout: Layout, width: int, height: int, attention: float | None = None) -> dict:
    """Where an answer map's mass lies on one photo, as numbers.

    Args:
        maps: (V, n*P, n*P) the whole answer's map (`ImageAttribution.answer_map()`).
        width, height: the photo's size in pixels.
        attention: the share of the answer's attention on this image (mean over its tokens of the relevance summed
            over the image's visual tokens), if known.
    Returns:
        {"width", "height", "regions": [{"region", "share"}] all nine, largest first ([] when the map holds no
        mass over the photo), "attention": the share given, or None}.
    """
    shares = region_shares(square_map(maps, layout), width, height)
    return {"width": int(width), "height": int(height),
            "regions": [{"region": name, "share": share} for name, share in shares],
            "attention": None if attention is None else float(attention)}


def describe(summary: dict, number: int, top: int = 3, min_share: float = 0.05) -> str:
    """One sentence on image `number` from its `image_summary`: "Image 1 (640×480 px): the answer drew on the
    top-right 41 %, centre 20 % (39 % of its attention went to this image)." (regions under `min_share` left out)."""
    parts = [f"{s['region']} {round(100 * s['share'])} %" for s in summary["regions"][:top] if s["share"] >= min_share]
    where = ("the answer drew on the " + ", ".join(parts)) if parts else "the answer drew on no part of it in particular"
    given = f" ({round(100 * summary['attention'])} % of its attention went to this image)" \
        if summary["attention"] is not None else ""
    return f"Image {number} ({summary['width']}×{summary['height']} px): {where}{given}."


def ablation(prob, prob_no_mining) -> dict | None:
    """How much the answer owed to mining, from each answer token's probability with and without the mined detail
    (`Attribution.prob`, `.prob_no_mining`): {"median_ratio": median of p_without / p_with, "halved": how many
    tokens lost half their probability or more, "tokens"}; None without the ablation."""
    if prob_no_mining is None:
        return None
    p = np.asarray(prob, dtype=np.float64)
    q = np.asarray(prob_no_mining, dtype=np.float64)
    return {"median_ratio": float(np.median(q / np.maximum(p, 1e-12))), "halved": int(np.sum(q <= 0.5 * p)),
            "tokens": int(len(p))}


def describe_ablation(numbers: dict | None) -> str:
    """"Without the mined detail its words would be 0.13× as likely (median over 5 tokens; 2 of 5 lose half their
    probability or more)."."""
    if numbers is None:
        return ""
    n = numbers["tokens"]
    return (f"Without the mined detail its words would be {numbers['median_ratio']:.2g}× as likely (median over {n} "
            f"token{'s' if n != 1 else ''}; {numbers['halved']} of {n} lose half their probability or more).")


def answer_summary(attribution, seen: list, chosen: list, numbers: dict, layout: Layout) -> dict:
    """Where an answer looked in the chosen images, and how much it owed to mining, as numbers and words.

    Args:
        attribution: the answer's `modeling.attribution.Attribution`.
        seen: the images the model saw for the answer, in slot order (objects with `.image`, a PIL photo), as
            `ChatSession.images_seen` gives them; chosen: those of them to describe (by identity).
        numbers: id(image) -> its number in the conversation ("Image k").
    Returns:
        {"method": "answer_attention" | "answer_relevancy", "layers": [start, stop), "images": [{"image": k,
        **image_summary}], "ablation": `ablation(...)` or None, "text": one sentence per image, then the ablation's}.
    """
    images = []
    for im in chosen:
        at = next(i for i, s in enumerate(seen) if s is im)
        a = attribution.images[at]
        share = float(a.relevance.sum((1, 2)).mean()) if attribution.method == "attention" else None
        images.append({"image": numbers[id(im)], **image_summary(a.answer_map().numpy(), layout, *im.image.size,
                                                                 attention=share)})
    abl = ablation(attribution.prob.numpy(), None if attribution.prob_no_mining is None else
                   attribution.prob_no_mining.numpy())
    text = " ".join([describe(s, s["image"]) for s in images] + ([describe_ablation(abl)] if abl else []))
    return {"method": f"answer_{attribution.method}", "layers": list(attribution.layers), "images": images,
            "ablation": abl, "text": text}

"""Answer maps (`modeling.attribution`) over the photo: one map over the padded square from the per-view maps,
and the "where the answer drew on" summary in words ("top-right 41 %, centre 20 %").

Geometry as in `hr_map.mined_pixels` (model order, row-major; `heatmap` for the padded square). Pure numpy.
"""
from __future__ import annotations

import numpy as np

from .heatmap import Layout, pad_box

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

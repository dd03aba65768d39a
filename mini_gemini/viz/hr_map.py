"""The map of mined high-resolution pixels: every LR token's mining weights spread over its own P x P
window of the HR feature map, so the picture shows WHICH HR positions were taken, not one block per token.

Resolution: the HR feature map's (P per LR token): 64 x 64 for the demo model (8 x 8 tokens, P = 8),
192 x 192 for MGM at 768 px (24 x 24 tokens, P = 8), per view in HD (the 2 x 2 crops tile a 384 x 384 map;
the global view is 192 x 192 over the whole square). Geometry as in `heatmap` (model order, row-major).
"""
from __future__ import annotations

import numpy as np

from .heatmap import CROPS, GLOBAL, Layout


def mined_pixels(attn: np.ndarray, layout: Layout, which: str = CROPS) -> np.ndarray:
    """(V, N, P*P) mining weights -> (rows*P, rows*P) map over the padded square, float32.

    Each value is the weight a (0..1) that the LR token over that HR position gave it; the P*P weights of
    one token sum to 1, so an even spread shows 1/P^2 everywhere in the token's cell.

    Raises:
        ValueError: `attn` does not match the layout (views, tokens, P*P).
    """
    a = np.asarray(attn, dtype=np.float32)
    n, p = layout.side, layout.patch
    if a.shape != (layout.views, layout.tokens, p * p):
        raise ValueError(f"expected ({layout.views}, {layout.tokens}, {p * p}) weights, got {a.shape}")
    # (V, n, n, P, P) -> per view an (n*P, n*P) picture: token rows, then candidate rows inside each
    per_view = a.reshape(layout.views, n, n, p, p).transpose(0, 1, 3, 2, 4).reshape(layout.views, n * p, n * p)
    return tile_views(per_view, layout, which)


def tile_views(per_view: np.ndarray, layout: Layout, which: str = CROPS) -> np.ndarray:
    """(V, n*P, n*P) one HR-resolution map per view (model order) -> the map of `which` over the padded square:
    the crops tiled row-major (g*n*P square; a plain model's one view as it is), or the global view (n*P).

    Raises:
        ValueError: the maps do not match the layout, or `which` is a view the layout does not have.
    """
    m = np.asarray(per_view)
    side = layout.side * layout.patch
    if m.shape != (layout.views, side, side):
        raise ValueError(f"expected ({layout.views}, {side}, {side}) maps, got {m.shape}")
    if which == GLOBAL:
        if not layout.global_view:
            raise ValueError(f"this model has no {GLOBAL!r} view; choose from {layout.choices()}")
        return m[0]
    crops = m[1:] if layout.global_view else m
    g = layout.grid
    rows = [np.concatenate(list(crops[i * g:(i + 1) * g]), axis=1) for i in range(g)]
    return np.concatenate(rows, axis=0)

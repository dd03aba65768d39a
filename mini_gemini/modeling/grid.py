"""The HD grid: cutting a picture or a feature map into g x g crops, row-major (DESIGN.md 1.3)."""
from __future__ import annotations

import torch


def grid_crops(x: torch.Tensor, g: int) -> torch.Tensor:
    """(..., C, H, W) -> (..., g*g, C, H/g, W/g): the g x g crops in row-major order (top-left first).

    The LR image (preprocessing) and the HR feature map (the model, for the crops' mining) are cut alike.

    Raises:
        ValueError: H or W is not a multiple of g.
    """
    *lead, c, h, w = x.shape
    if h % g or w % g:
        raise ValueError(f"a {h}x{w} map cannot be cut into a {g}x{g} grid")
    crops = x.reshape(*lead, c, g, h // g, g, w // g)
    n = len(lead)
    # (..., C, gi, h, gj, w) -> (..., gi, gj, C, h, w)
    crops = crops.permute(*range(n), n + 1, n + 3, n, n + 2, n + 4)
    return crops.reshape(*lead, g * g, c, h // g, w // g)

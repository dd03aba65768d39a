"""Where patch info mining picked out high-resolution detail, in words: shares of mining focus per ninth of the
photo (pure numpy; no model, no Gradio).

The measure is question-agnostic: it describes how the image was encoded, whatever was asked. The MCP tool and the
OpenAI endpoint say where the answer looked instead (`answer_map.answer_summary`, from its attribution); they fall
back to this where the answer cannot be attributed (`--llm-server`).
"""
from __future__ import annotations

import numpy as np

from . import heatmap as hm

REGIONS = (("top-left", "top", "top-right"), ("left", "centre", "right"),
           ("bottom-left", "bottom", "bottom-right"))
MIN_SHARE = 0.05      # regions below this share are not named
EVEN_SHARE = 0.15     # the largest share below this: mining was about equally selective everywhere


def region_shares(square_map: np.ndarray, width: int, height: int) -> list[tuple[str, float]]:
    """Share of a non-negative per-token map (over the padded square) falling in each ninth of the photo
    (padding cut away), largest first.

    Args:
        square_map: (n, n) float values over the padded square (e.g. `heatmap.assemble` of token scores).
        width, height: the photo's size in pixels (fixes where the padding is).
    Returns:
        [(region name, share in [0, 1])] for the nine regions, summing to 1; [] when the map is all zero.
    """
    photo = np.clip(np.nan_to_num(hm.to_photo(square_map, width, height, out_size=(90, 90))), 0, None)
    total = float(photo.sum())
    if total <= 0:
        return []
    shares = [(REGIONS[i][j], float(photo[30 * i:30 * (i + 1), 30 * j:30 * (j + 1)].sum()) / total)
              for i in range(3) for j in range(3)]
    return sorted(shares, key=lambda s: -s[1])


def image_summary(attn, gain, width: int, height: int, layout: hm.Layout) -> dict:
    """The mining of one image as numbers.

    The measure is the mining focus of each LR token (1 - entropy of its weights over its HR candidates,
    `heatmap.token_scores`): high where the token picked out particular high-resolution detail (an edge, a
    digit, a word), low where it spread its attention. The mining gain is all but even over a photo (mined
    features are about as large as the tokens they refine), so it is given as a range only.

    Args:
        attn: (views, LR tokens, P*P) mining weights (float; a torch tensor or numpy array).
        gain: (views, LR tokens) mining gain.
        width, height: the photo's size in pixels.
        layout: how the tokens tile the padded square (`heatmap.Layout.from_config(model.config)`).
    Returns:
        {"width", "height", "regions": [{"region", "share"}] largest first (all nine, or [] when no token
        picked out anything), "mean_focus" (0 = spread evenly, 1 = a single candidate), "gain_min", "gain_max"}.
    """
    focus = hm.assemble(hm.token_scores(np.asarray(attn, dtype=np.float32), "focus"), layout, hm.CROPS)
    gain = np.asarray(gain, dtype=np.float32)
    return {"width": int(width), "height": int(height),
            "regions": [{"region": name, "share": share} for name, share in region_shares(focus, width, height)],
            "mean_focus": float(np.mean(focus)), "gain_min": float(gain.min()), "gain_max": float(gain.max())}


def describe(summary: dict, number: int, top: int = 3) -> str:
    """One sentence on image `number` from its `image_summary`: the regions where its tokens mined most
    selectively (at most `top`, those with at least MIN_SHARE), the mean focus and the gain's range."""
    shares = summary["regions"]
    if not shares:
        where = "no token picked out particular high-resolution detail"
    elif shares[0]["share"] < EVEN_SHARE:
        where = "mining was about equally selective all over the image"
    else:
        parts = [f"{s['region']} {s['share']:.0%}" for s in shares[:top] if s["share"] >= MIN_SHARE]
        where = "its tokens picked out high-resolution detail most in the " + ", ".join(parts)
    return (f"Image {number} ({summary['width']}×{summary['height']} px): {where} (shares of mining focus); mean "
            f"focus {summary['mean_focus']:.2f} (0 = attention spread evenly over the HR candidates, 1 = a single "
            f"one), mining gain {summary['gain_min']:.2f}–{summary['gain_max']:.2f}.")

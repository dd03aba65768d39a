"""The patch-info-mining panel: maps laid over the photo, the clicked token's candidates, downloads."""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import numpy as np

from ..viz import heatmap as hm
from . import server
from .server import session_of

# ---- mining panel ---------------------------------------------------------------------------------
def _layout() -> hm.Layout:
    return hm.Layout.from_config(server.LOADER.engine.model.config)


def _which(layout: hm.Layout, which) -> str:
    return which if which in layout.choices() else hm.CROPS


def _maps(entry, layout: hm.Layout, which: str, metric: str):
    scores = hm.token_scores(entry.attn.numpy(), metric)
    return hm.assemble(scores, layout, which), hm.assemble(entry.gain.numpy(), layout, which)


def _panel_images(entry, layout, which, metric, cmap, alpha, mark=None):
    attn_map, gain_map = _maps(entry, layout, which, metric)
    photo = entry.image
    size = hm.display_size(*photo.size)
    box = hm.cell_in_photo(layout, *mark, photo.size, size) if mark else None
    over = hm.overlay(photo, attn_map, cmap=cmap, alpha=alpha, size=size, mark=box)
    gain = hm.overlay(photo, gain_map, cmap="magma", alpha=alpha, size=size, mark=box)
    return over, gain, attn_map, gain_map


def _caption(k: int, layout: hm.Layout, which: str, metric: str, attn_map, gain_map) -> str:
    pp = layout.patch ** 2
    what = {"focus": f"*focus* = 1 − H(a)/log {pp}, where a are the token's weights over its "
                     f"{layout.patch}×{layout.patch} = {pp} high-resolution candidates: 0 means it spread its "
                     "attention evenly (nothing in particular was mined), 1 that it took a single candidate",
            "max weight": f"the largest of the token's {pp} candidate weights (from 1/{pp} = even spread "
                          "to 1 = a single candidate)"}[metric]
    view = {hm.CROPS: "the 2×2 HD crops, each over its quarter" if layout.grid > 1 else "its tokens",
            hm.GLOBAL: "the global view over the whole image"}[which]
    return (f"**Image {k}**, {view}: one cell per low-resolution token. Colour = {what}; range "
            f"{attn_map.min():.3f} … {attn_map.max():.3f}. **Mining gain** (right) = |mined − x| / |x|, how much "
            f"the token changed by taking in HR detail; range {gain_map.min():.3f} … {gain_map.max():.3f}. "
            "Click the left picture to inspect one token.")


def _image_choices(session) -> list[str]:
    return [f"Image {k + 1}" for k in range(len(session.images))]


def _entry(session, label):
    images = session.images
    try:
        k = int(str(label).split()[-1])
    except (ValueError, IndexError):
        return None, 0
    return (images[k - 1], k) if 1 <= k <= len(images) else (None, 0)


def panel_ui(label, which, metric, cmap, alpha, selected, request: gr.Request, new_turn: bool = False):
    """Re-draw the mining panel (after a turn, or when a control changed); a clicked token stays selected."""
    session, ex = session_of(request)
    drawn_for = tuple(map(id, session.images))
    choices = _image_choices(session)
    if (new_turn and len(choices) > ex.images_seen) or label not in choices:
        label = choices[-1] if choices else None  # a turn brought new images: show the newest
    ex.images_seen = len(choices)  # a turn without new images (or one that failed) leaves the choice alone
    entry, k = _entry(session, label)
    dropdown = gr.Dropdown(choices=choices, value=label)
    off = gr.DownloadButton(value=None, interactive=False)
    if entry is None:
        return dropdown, None, None, "Send an image to see where patch info mining looked.", None, "", off, off, None
    layout = _layout()
    which = _which(layout, which)
    mark = tuple(selected[1:]) if selected and selected[0] == (entry.key, which) else None
    over, gain, attn_map, gain_map = _panel_images(entry, layout, which, metric, cmap, float(alpha), mark)
    if tuple(map(id, session.images)) != drawn_for:
        # Undo/Clear/a new turn changed the conversation while this was drawn: its own redraw is queued
        # behind, so leave the panel alone rather than let a stale picture land after it.
        return tuple(gr.skip() for _ in range(9))
    for old in ex.downloads:
        old.unlink(missing_ok=True)
    png = ex.new_file(f"mining-image{k}-{which}", ".png")
    over.save(png)
    npz = hm.save_npz(ex.new_file("mining-maps", ".npz"), [im.attn.numpy() for im in session.images],
                      [im.gain.numpy() for im in session.images])
    ex.downloads = [png, Path(npz)]
    zoomed, zoom_text = _zoom(entry, k, layout, *mark, cmap) if mark else \
        (None, "Click a point on the left picture: the LR token there and its HR candidates' weights show here.")
    return (dropdown, over, gain, _caption(k, layout, which, metric, attn_map, gain_map), zoomed, zoom_text,
            gr.DownloadButton(value=str(png), interactive=True), gr.DownloadButton(value=str(npz), interactive=True),
            selected if mark else None)


def panel_after_turn(label, which, metric, cmap, alpha, selected, request: gr.Request):
    return panel_ui(label, which, metric, cmap, alpha, selected, request, new_turn=True)


def click_ui(label, which, metric, cmap, alpha, evt: gr.SelectData, request: gr.Request):
    session, _ = session_of(request)
    entry, k = _entry(session, label)
    if entry is None or not evt.index:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    layout = _layout()
    which = _which(layout, which)
    photo = entry.image
    view, token = hm.click_to_token(evt.index[0], evt.index[1], hm.display_size(*photo.size), photo.size,
                                    layout, which)
    over, _, _, _ = _panel_images(entry, layout, which, metric, cmap, float(alpha), mark=(view, token))
    zoomed, text = _zoom(entry, k, layout, view, token, cmap)
    return over, zoomed, text, ((entry.key, which), view, token)


def _zoom(entry, k: int, layout: hm.Layout, view: int, token: int, cmap: str):
    """The zoomed candidates of one token, and what they say."""
    weights = entry.attn[view, token].numpy()
    zoomed = hm.zoom(entry.image, layout, view, token, weights, cmap=cmap)
    row, col = divmod(token, layout.side)
    where = "global view" if (layout.global_view and view == 0) else \
        (f"crop {view - (1 if layout.global_view else 0) + 1} of {layout.grid ** 2}" if layout.grid > 1 else "")
    best = np.argsort(weights)[::-1][:3]
    top = ", ".join(f"({b // layout.patch}, {b % layout.patch}) = {weights[b]:.3f}" for b in best)
    focus = float(hm.token_scores(weights, "focus"))
    text = (f"**Image {k}**{', ' + where if where else ''}, LR token row {row}, column {col} (view {view}, token "
            f"{token}): the same crop of the photo with its {layout.patch}×{layout.patch} HR candidates, and their "
            f"weights. Strongest (row, col) = weight: {top}. Focus {focus:.3f}; an even spread would give each "
            f"{1 / layout.patch ** 2:.3f}.")
    return zoomed, text


def heatmap_gallery(session) -> list:
    layout, out = _layout(), []
    for k, entry in enumerate(session.images, 1):
        over, gain, _, _ = _panel_images(entry, layout, hm.CROPS, "focus", "inferno", 0.6)
        out += [(over, f"Image {k}: mining focus"), (gain, f"Image {k}: mining gain")]
    return out

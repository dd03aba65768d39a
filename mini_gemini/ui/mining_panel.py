"""The patch-info-mining panel: maps laid over the photo, the clicked token's candidates, downloads."""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import numpy as np

from ..viz import heatmap as hm
from ..viz.hr_map import mined_pixels
from ..viz.legend import with_colorbar
from . import server
from .markup import literal
from .server import session_of

# ---- mining panel ---------------------------------------------------------------------------------
PANEL_SIZE = (640, 960)  # the panel's pictures: long side brought into this range (shown as wide as the panel;
                         # full size when expanded)
TOP_PERCENTILE = 99.5    # the mined map's colour scale ends here: a few near-1 weights never wash the rest out


def layout() -> hm.Layout:
    return hm.Layout.from_config(server.LOADER.engine.model.config)


def which_of(layout: hm.Layout, which) -> str:
    return which if which in layout.choices() else hm.CROPS


def shown_size(photo) -> tuple[int, int]:
    """The size the panel draws a photo's maps at (clicks on them are mapped back through it)."""
    return hm.display_size(*photo.size, *PANEL_SIZE)


MINED = "mined HR pixels"
MAPS = (MINED, *hm.METRICS)  # the mining map: mined pixels (default), or one value per LR token
_LEGEND = {MINED: "mining weight of each high-resolution position (1/{pp} = an even spread)",
           "focus": "focus: 0 = weights spread evenly, 1 = all on one high-resolution position",
           "max weight": "largest weight of the token's high-resolution positions"}
GAIN_LEGEND = "mining gain: how much the token changed (0.1 = by a tenth)"


def _maps(entry, layout: hm.Layout, which: str, metric: str):
    """(mining map over the padded square, its colour range, whether values go above it), and the gain map."""
    open_top = False
    if metric == MINED:
        attn_map = mined_pixels(entry.attn.numpy(), layout, which)
        top = float(np.percentile(attn_map, TOP_PERCENTILE))
        open_top = bool(attn_map.max() > top)
        scale = (0.0, max(top, 1e-6))
    else:
        attn_map = hm.assemble(hm.token_scores(entry.attn.numpy(), metric), layout, which)
        scale = (float(attn_map.min()), float(attn_map.max()))
    return attn_map, scale, open_top, hm.assemble(entry.gain.numpy(), layout, which)


def panel_images(entry, layout, which, metric, cmap, alpha, mark=None, size=None):
    """The two overlays (opacity following the value: the photo shows where the map is low), each with its
    colour bar below (clicks below the photo are ignored); and the maps they show. size: default the panel's."""
    attn_map, (lo, hi), open_top, gain_map = _maps(entry, layout, which, metric)
    photo = entry.image
    size = size or shown_size(photo)
    base = hm.display_rgb(photo, size)
    box = hm.cell_in_photo(layout, *mark, photo.size, size) if mark else None
    over = hm.overlay(photo, attn_map, cmap=cmap, alpha=alpha, size=size, mark=box, vmin=lo, vmax=hi, fade=True,
                      base=base)
    g_lo, g_hi = float(gain_map.min()), float(gain_map.max())
    gain = hm.overlay(photo, gain_map, cmap="magma", alpha=alpha, size=size, mark=box, vmin=g_lo, vmax=g_hi,
                      fade=True, base=base)
    if entry.ocr is not None and entry.ocr.lines:  # the text OCR read: its boxes, a layer over the map
        hm.outline_boxes(over, [line.box for line in entry.ocr.lines], photo.size)
    over = with_colorbar(over, cmap, lo, hi, _LEGEND[metric].format(pp=layout.patch ** 2), fade=alpha,
                         open_top=open_top)
    gain = with_colorbar(gain, "magma", g_lo, g_hi, GAIN_LEGEND, fade=alpha)
    return over, gain, attn_map, gain_map


def ocr_caption(ocr) -> str:
    """What OCR read in the image, numbered as the boxes are, with the time it took."""
    if ocr is None:
        return ""
    if not ocr.lines:
        return f" **Text read (OCR):** none found ({ocr.seconds:.2f} s)."
    listed = "; ".join(f"{n}. “{literal(line.text)}”" for n, line in enumerate(ocr.lines, 1))
    return f" **Text read (OCR)**, green numbered boxes, in {ocr.seconds:.2f} s: {listed}."


def _caption(k: int, layout: hm.Layout, which: str, metric: str, attn_map, gain_map) -> str:
    """What the mining maps show, in plain words (the formulas are in `formulas`)."""
    p, pp = layout.patch, layout.patch ** 2
    view = {hm.CROPS: "the four HD crops, each over its quarter of the picture" if layout.grid > 1 else
            "the whole picture", hm.GLOBAL: "the global view over the whole picture"}[which]
    if metric == MINED:
        what = (f"Bright = the high-resolution details the model took in, whatever was asked: each small square "
                f"of the picture (a low-resolution token) looks at its own {p}×{p} high-resolution positions and "
                f"weighs them; the map shows every weight where it was taken ({attn_map.shape[0]}×"
                f"{attn_map.shape[1]} over {view}).")
    elif metric == "focus":
        what = (f"One cell per low-resolution token over {view}: bright = the token took its detail from a few "
                f"of its {pp} high-resolution positions, clear = it spread its attention evenly.")
    else:
        what = (f"One cell per low-resolution token over {view}: its largest weight, from 1/{pp} (even spread) to "
                "1 (a single position).")
    return (f"**Image {k}.** {what} Range {attn_map.min():.3f} … {attn_map.max():.3f}. **Below:** how much each "
            f"token changed by taking in that detail, range {gain_map.min():.3f} … {gain_map.max():.3f}. Click "
            "the mining map to inspect one token.")


def formulas(layout: hm.Layout) -> str:
    """How the mining maps are computed (the fold under their caption)."""
    pp = layout.patch ** 2
    return ("- LR token i (x, from CLIP) looks at its own P×P window of the high-resolution features h_j (ConvNeXt), "
            f"P×P = {pp}: a_ij = softmax_j(q_i · k_j / √C), q = Linear(LayerNorm(x)), k_j = Linear(LayerNorm(h_j)); "
            "mined_i = Σ_j a_ij v_j; the LLM sees projector(x_i + mined_i).\n"
            "- Mined HR pixels: a_ij at the position of candidate j (each token's weights sum to 1).\n"
            f"- Focus = 1 − H(a_i) / log {pp}; max weight = max_j a_ij.\n"
            "- Mining gain = |mined_i| / |x_i| = |(x_i + mined_i) − x_i| / |x_i|.\n"
            "- The opacity follows the value: the photo stays visible where the map is at its low end.")


def _image_choices(session) -> list[str]:
    return [f"Image {k + 1}" for k in range(len(session.images))]


def entry_of(session, label):
    images = session.images
    try:
        k = int(str(label).split()[-1])
    except (ValueError, IndexError):
        return None, 0
    return (images[k - 1], k) if 1 <= k <= len(images) else (None, 0)


def panel_ui(label, which, metric, cmap, alpha, selected, request: gr.Request, new_turn: bool = False):
    """Re-draw the mining panel (after a turn, or when a control changed); a clicked token stays selected.

    Outputs: the image choice, the mining map, the gain map, their caption and formulas, the clicked token's
    picture and text, the two downloads, the clicked token."""
    session, ex = session_of(request)
    drawn_for = tuple(map(id, session.images))
    choices = _image_choices(session)
    if (new_turn and len(choices) > ex.images_seen) or label not in choices:
        label = choices[-1] if choices else None  # a turn brought new images: show the newest
    ex.images_seen = len(choices)  # a turn without new images (or one that failed) leaves the choice alone
    entry, k = entry_of(session, label)
    dropdown = gr.Dropdown(choices=choices, value=label)
    off = gr.DownloadButton(value=None, interactive=False)
    if entry is None:
        return (dropdown, None, None, "Send an image to see where patch info mining looked.", "", None, "", off, off,
                None)
    lay = layout()
    which = which_of(lay, which)
    mark = tuple(selected[1:]) if selected and selected[0] == (entry.key, which) else None
    over, gain, attn_map, gain_map = panel_images(entry, lay, which, metric, cmap, float(alpha), mark)
    if tuple(map(id, session.images)) != drawn_for:
        # Undo/Clear/a new turn changed the conversation while this was drawn: its own redraw is queued
        # behind, so leave the panel alone rather than let a stale picture land after it.
        return tuple(gr.skip() for _ in range(10))
    # the shown overlay is also the PNG download; all are files of the client's folder (see Extras.keep_render)
    png, gain_png = png_files(ex, [(f"mining-image{k}-" + ({hm.CROPS: "hd-crops", hm.GLOBAL: "global"}[which]
                                                            if lay.grid > 1 else "map"), over),
                                   (f"mining-gain-image{k}", gain)])
    npz = ex.new_file("mining-maps", ".npz")
    hm.save_npz(npz, [im.attn.numpy() for im in session.images], [im.gain.numpy() for im in session.images])
    ex.keep_render("panel", [png, gain_png, npz])
    zoomed, zoom_text = _zoom(entry, k, lay, *mark, cmap) if mark else \
        (None, "Click a point on the mining map: the low-resolution token there and the weights of its "
               "high-resolution positions show here.")
    if zoomed is not None:
        (zoomed,) = png_files(ex, [("mining-zoom", zoomed)])
        ex.keep_render("zoom", [zoomed])
        zoomed = str(zoomed)
    return (dropdown, str(png), str(gain_png),
            _caption(k, lay, which, metric, attn_map, gain_map) + ocr_caption(entry.ocr), formulas(lay), zoomed,
            zoom_text, gr.DownloadButton(value=str(png), interactive=True),
            gr.DownloadButton(value=str(npz), interactive=True), selected if mark else None)


def panel_after_turn(label, which, metric, cmap, alpha, selected, request: gr.Request):
    return panel_ui(label, which, metric, cmap, alpha, selected, request, new_turn=True)


def click_ui(label, which, metric, cmap, alpha, evt: gr.SelectData, request: gr.Request):
    session, ex = session_of(request)
    entry, k = entry_of(session, label)
    if entry is None or not evt.index:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    lay = layout()
    which = which_of(lay, which)
    photo = entry.image
    display = shown_size(photo)
    if evt.index[1] >= display[1]:  # a click on the colour bar below the photo
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    view, token = hm.click_to_token(evt.index[0], evt.index[1], display, photo.size, lay, which)
    over, _, _, _ = panel_images(entry, lay, which, metric, cmap, float(alpha), mark=(view, token))
    zoomed, text = _zoom(entry, k, lay, view, token, cmap)
    over, zoomed = png_files(ex, [("mining-click", over), ("mining-zoom", zoomed)])
    ex.keep_render("click", [over, zoomed])
    return str(over), str(zoomed), text, ((entry.key, which), view, token)


def _zoom(entry, k: int, lay: hm.Layout, view: int, token: int, cmap: str):
    """The zoomed candidates of one token, and what they say."""
    weights = entry.attn[view, token].numpy()
    zoomed = hm.zoom(entry.image, lay, view, token, weights, cmap=cmap)
    row, col = divmod(token, lay.side)
    where = "global view" if (lay.global_view and view == 0) else \
        (f"crop {view - (1 if lay.global_view else 0) + 1} of {lay.grid ** 2}" if lay.grid > 1 else "")
    best = np.argsort(weights)[::-1][:3]
    top = ", ".join(f"({b // lay.patch}, {b % lay.patch}) = {weights[b]:.3f}" for b in best)
    focus = float(hm.token_scores(weights, "focus"))
    text = (f"**Image {k}**{', ' + where if where else ''}, LR token row {row}, column {col} (view {view}, token "
            f"{token}): the same crop of the photo with its {lay.patch}×{lay.patch} HR candidates, and their "
            f"weights. Strongest (row, col) = weight: {top}. Focus {focus:.3f}; an even spread would give each "
            f"{1 / lay.patch ** 2:.3f}.")
    return zoomed, text


def png_files(ex, pictures: list) -> list[Path]:
    """Each (name, PIL picture) saved as a new PNG file of the client's folder (Gradio serves a copy of it).
    compress_level 1: a photo-sized map compresses to about the same size as at the default level, in ~half the
    time."""
    paths = []
    for stem, picture in pictures:
        path = ex.new_file(stem, ".png")
        picture.save(path, format="PNG", compress_level=1)
        paths.append(path)
    return paths

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
def _layout() -> hm.Layout:
    return hm.Layout.from_config(server.LOADER.engine.model.config)


def _which(layout: hm.Layout, which) -> str:
    return which if which in layout.choices() else hm.CROPS


MINED = "mined HR pixels"
MAPS = (MINED, *hm.METRICS)  # the left map: mined pixels (default), or one value per LR token
_LEGEND = {MINED: "mining weight of each HR position (each LR token's weights sum to 1)",
           "focus": "focus: 0 = weights spread evenly, 1 = all on one HR candidate",
           "max weight": "largest HR candidate weight of the LR token"}
GAIN_LEGEND = "mining gain: change of the LR token, |mined - x| / |x|"


def _maps(entry, layout: hm.Layout, which: str, metric: str):
    """(left map over the padded square, its colour range), and the gain map: float arrays."""
    if metric == MINED:
        attn_map = mined_pixels(entry.attn.numpy(), layout, which)
        scale = (0.0, float(attn_map.max()))
    else:
        attn_map = hm.assemble(hm.token_scores(entry.attn.numpy(), metric), layout, which)
        scale = (float(attn_map.min()), float(attn_map.max()))
    return attn_map, scale, hm.assemble(entry.gain.numpy(), layout, which)


def _panel_images(entry, layout, which, metric, cmap, alpha, mark=None):
    """The two overlays at display size, each with its colour bar below (clicks below the photo are
    ignored); and the maps they show."""
    attn_map, (lo, hi), gain_map = _maps(entry, layout, which, metric)
    photo = entry.image
    size = hm.display_size(*photo.size)
    box = hm.cell_in_photo(layout, *mark, photo.size, size) if mark else None
    over = hm.overlay(photo, attn_map, cmap=cmap, alpha=alpha, size=size, mark=box, vmin=lo, vmax=hi)
    g_lo, g_hi = float(gain_map.min()), float(gain_map.max())
    gain = hm.overlay(photo, gain_map, cmap="magma", alpha=alpha, size=size, mark=box, vmin=g_lo, vmax=g_hi)
    if entry.ocr is not None and entry.ocr.lines:  # the text OCR read: its boxes, a layer over the map
        draw_text_boxes(over, entry.ocr, photo.size)
    over = with_colorbar(over, cmap, lo, hi, _LEGEND[metric])
    gain = with_colorbar(gain, "magma", g_lo, g_hi, GAIN_LEGEND)
    return over, gain, attn_map, gain_map


def draw_text_boxes(picture, ocr, photo_size) -> None:
    """Outline every line of text OCR read (green boxes, its number beside it) on `picture`, which shows the
    photo at its own size; boxes come in photo pixels."""
    from PIL import ImageDraw
    sx, sy = picture.width / photo_size[0], picture.height / photo_size[1]
    draw = ImageDraw.Draw(picture)
    for n, line in enumerate(ocr.lines, 1):
        points = [(x * sx, y * sy) for x, y in line.box]
        draw.polygon(points, outline=(0, 255, 120), width=2)
        draw.text((points[0][0] + 2, points[0][1] - 12), str(n), fill=(0, 255, 120))


def ocr_caption(ocr) -> str:
    """What OCR read in the image, numbered as the boxes are, with the time it took."""
    if ocr is None:
        return ""
    if not ocr.lines:
        return f" **Text read (OCR):** none found ({ocr.seconds:.2f} s)."
    listed = "; ".join(f"{n}. “{literal(line.text)}”" for n, line in enumerate(ocr.lines, 1))
    return f" **Text read (OCR)**, green boxes, in {ocr.seconds:.2f} s: {listed}."


def _caption(k: int, layout: hm.Layout, which: str, metric: str, attn_map, gain_map) -> str:
    p, pp = layout.patch, layout.patch ** 2
    view = {hm.CROPS: "the four HD crops, each over its quarter of the picture" if layout.grid > 1 else
            "the whole picture", hm.GLOBAL: "the global view over the whole picture"}[which]
    if metric == MINED:
        what = (f"Bright = the high-resolution details the model took in. Each low-resolution token looks at "
                f"its own {p}×{p} window of the high-resolution features and weighs those {pp} positions; the "
                f"map shows every weight at its position ({attn_map.shape[0]}×{attn_map.shape[1]} over "
                f"{view}). An even spread gives each position {1 / pp:.3f}.")
    elif metric == "focus":
        what = (f"One cell per low-resolution token over {view}: bright = the token took its detail from a few "
                f"of its {pp} high-resolution candidates, dark = it spread its attention evenly. (Focus = "
                f"1 − H(a)/log {pp} of the token's weights a.)")
    else:
        what = (f"One cell per low-resolution token over {view}: its largest candidate weight, from "
                f"1/{pp} (even spread) to 1 (a single candidate).")
    return (f"**Image {k}.** {what} Range {attn_map.min():.3f} … {attn_map.max():.3f}. **Right:** how much each "
            f"token changed by taking in that detail (mining gain |mined − x| / |x|), range "
            f"{gain_map.min():.3f} … {gain_map.max():.3f}. Click the left picture to inspect one token.")


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
    # the shown overlay is also the PNG download; all are files of the client's folder (see Extras.keep_render)
    png, gain_png = _png_files(ex, [(f"mining-image{k}-" + ({hm.CROPS: "hd-crops", hm.GLOBAL: "global"}[which]
                                                            if layout.grid > 1 else "map"), over),
                                    (f"mining-gain-image{k}", gain)])
    npz = ex.new_file("mining-maps", ".npz")
    hm.save_npz(npz, [im.attn.numpy() for im in session.images], [im.gain.numpy() for im in session.images])
    ex.keep_render("panel", [png, gain_png, npz])
    zoomed, zoom_text = _zoom(entry, k, layout, *mark, cmap) if mark else \
        (None, "Click a point on the left picture: the LR token there and its HR candidates' weights show here.")
    if zoomed is not None:
        (zoomed,) = _png_files(ex, [("mining-zoom", zoomed)])
        ex.keep_render("zoom", [zoomed])
        zoomed = str(zoomed)
    return (dropdown, str(png), str(gain_png),
            _caption(k, layout, which, metric, attn_map, gain_map) + ocr_caption(entry.ocr), zoomed, zoom_text,
            gr.DownloadButton(value=str(png), interactive=True), gr.DownloadButton(value=str(npz), interactive=True),
            selected if mark else None)


def panel_after_turn(label, which, metric, cmap, alpha, selected, request: gr.Request):
    return panel_ui(label, which, metric, cmap, alpha, selected, request, new_turn=True)


def click_ui(label, which, metric, cmap, alpha, evt: gr.SelectData, request: gr.Request):
    session, ex = session_of(request)
    entry, k = _entry(session, label)
    if entry is None or not evt.index:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    layout = _layout()
    which = _which(layout, which)
    photo = entry.image
    display = hm.display_size(*photo.size)
    if evt.index[1] >= display[1]:  # a click on the colour bar below the photo
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    view, token = hm.click_to_token(evt.index[0], evt.index[1], display, photo.size, layout, which)
    over, _, _, _ = _panel_images(entry, layout, which, metric, cmap, float(alpha), mark=(view, token))
    zoomed, text = _zoom(entry, k, layout, view, token, cmap)
    over, zoomed = _png_files(ex, [("mining-click", over), ("mining-zoom", zoomed)])
    ex.keep_render("click", [over, zoomed])
    return str(over), str(zoomed), text, ((entry.key, which), view, token)


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


def heatmap_gallery(session, ex) -> list:
    """(PNG file, caption) of the mining focus and gain of every image of the conversation (for `/chat`)."""
    layout, pictures, captions = _layout(), [], []
    for k, entry in enumerate(session.images, 1):
        over, gain, _, _ = _panel_images(entry, layout, hm.CROPS, "focus", "inferno", 0.6)
        pictures += [(f"focus-image{k}", over), (f"gain-image{k}", gain)]
        captions += [f"Image {k}: mining focus", f"Image {k}: mining gain"]
    files = _png_files(ex, pictures)
    ex.keep_render("gallery", files)
    return [(str(f), c) for f, c in zip(files, captions)]


def _png_files(ex, pictures: list) -> list[Path]:
    """Each (name, PIL picture) saved as a new PNG file of the client's folder (Gradio serves a copy of it)."""
    paths = []
    for stem, picture in pictures:
        path = ex.new_file(stem, ".png")
        picture.save(path, format="PNG")
        paths.append(path)
    return paths

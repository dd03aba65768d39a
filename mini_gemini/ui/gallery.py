"""The heatmaps gallery of `/chat`: for every image of the conversation its mining focus and mining gain, and for
every image the latest answer saw, where that answer looked.

`/chat` draws the gallery after every turn, for up to 8 users at once (issue #23), so it is made cheap:
- the mining maps depend only on the picture (whatever was asked): each is drawn once per picture for the whole
  server (kept, encoded, for the RECENT_PICTURES last pictures) and written once per picture and client;
- the answer map is drawn once per turn (its attribution pass is `ChatSession.explain`, one forward);
- pictures are JPEG (4:4:4, quality 90: ~1 ms for a 640-px map where PNG took ~50 ms; the colour bar's text
  stays sharp), in `heatmap.display_size` (long side 384-640 px).
"""
from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict

from ..errors import AttributionUnavailable, SessionBusyError
from ..viz import answer_map
from ..viz import heatmap as hm
from .mining_panel import layout, panel_images
from .zerogpu import explain_turn

log = logging.getLogger(__name__)
RECENT_PICTURES = 32   # pictures whose gallery maps are kept (two JPEGs of ~60 kB each)
_drawn: OrderedDict[tuple, tuple[bytes, bytes]] = OrderedDict()
_lock = threading.Lock()


def jpeg(picture) -> bytes:
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=90, subsampling=0)
    return buf.getvalue()


def mining_pictures(entry, lay: hm.Layout) -> tuple[tuple, bytes, bytes]:
    """(what they show, mining focus, mining gain) of one picture, the maps as JPEG bytes, drawn once per picture
    (and the OCR boxes drawn on it)."""
    key = (entry.key, lay, len(entry.ocr.lines) if entry.ocr is not None else -1)
    with _lock:
        hit = _drawn.get(key)
        if hit is not None:
            _drawn.move_to_end(key)
            return (key, *hit)
    focus, gain, _, _ = panel_images(entry, lay, hm.CROPS, "focus", "inferno", 0.8,
                                     size=hm.display_size(*entry.image.size))
    drawn = jpeg(focus), jpeg(gain)
    with _lock:
        _drawn[key] = drawn
        while len(_drawn) > RECENT_PICTURES:
            _drawn.popitem(last=False)
    return (key, *drawn)


def heatmap_gallery(session, ex) -> list[tuple[str, str]]:
    """(file, caption) of every image of the conversation: "Image k: mining focus", "Image k: mining gain", and,
    for the images the latest answer saw, "Image k: where the answer looked" (the whole answer)."""
    lay, out = layout(), []
    images = session.images
    answer = _answer_maps(session, lay)
    answers = []
    for k, entry in enumerate(images, 1):
        key, focus, gain = mining_pictures(entry, lay)
        out.append((str(ex.kept_file(("focus", key), f"focus-image{k}", ".jpg", focus)), f"Image {k}: mining focus"))
        out.append((str(ex.kept_file(("gain", key), f"gain-image{k}", ".jpg", gain)), f"Image {k}: mining gain"))
        picture = answer.get(id(entry))
        if picture is not None:
            path = ex.new_file(f"answer-image{k}", ".jpg")
            path.write_bytes(jpeg(picture))
            answers.append(path)
            out.append((str(path), f"Image {k}: where the answer looked"))
    ex.keep_render("gallery", answers)
    return out


def _answer_maps(session, lay: hm.Layout) -> dict:
    """id(image entry) -> the picture of where the latest answer looked in it (the whole answer); {} when there is
    no answer, or no attribution here (`--llm-server`)."""
    turns = session.turns
    if not turns or not turns[-1].token_ids or session.engine.llm_server is not None:
        return {}
    seen = session.images_seen(turns[-1])
    if not seen:  # a text-only answer: nothing to map, so no attribution pass
        return {}
    try:
        attribution = explain_turn(session.id, turns, "attention", None, ablation=False)  # the map only: one forward
    except (AttributionUnavailable, SessionBusyError) as e:
        log.info("no answer map for the gallery: %s", e)
        return {}
    out = {}
    for entry, image in zip(seen, attribution.images):
        picture, _, _ = answer_map.picture(entry.image, image.answer_map().numpy(), lay, hm.CROPS,
                                           size=hm.display_size(*entry.image.size))
        out[id(entry)] = picture
    return out

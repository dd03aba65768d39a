"""The text in a turn's images (GenOptions.ocr, as the official demo's "Use OCR"): read once per picture per
conversation, outside the model's lock, and kept on the picture's `ImageEntry.ocr`."""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from .types import ImageEntry, Note, Turn

if TYPE_CHECKING:
    from .session import ChatSession


def read_pending(session: ChatSession, images: list[ImageEntry], cancel: threading.Event | None = None
                 ) -> list[Note]:
    """Read the pictures among `images` that have no OCR result yet; notes name each picture by its number in
    the conversation. OcrUnavailable propagates; other failures become notes (and an empty result, so a broken
    picture is not read again every turn)."""
    from ..inputs.ocr import OcrResult, OcrUnavailable

    everything = session.images
    pending: dict[str, ImageEntry] = {}
    for im in images:
        if im.ocr is None:
            pending.setdefault(im.key, im)
    notes = []
    for key, im in pending.items():
        if cancel is not None and cancel.is_set():
            break
        number = next((k + 1 for k, e in enumerate(everything) if e.key == key), 0)
        try:
            result = session.engine.read_text(im.image)
        except OcrUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - the answer goes on without this picture's text
            result = OcrResult()
            notes.append(Note("ocr", f"Image {number}: its text could not be read (OCR failed: "
                                     f"{type(e).__name__})."))
        else:
            n = len(result.lines)
            found = f"{n} line{'s' if n != 1 else ''} of text read" if n else "no text found"
            cut = (" Only its first lines go into the message (too much text for the prompt)."
                   if result.truncated else "")
            notes.append(Note("ocr", f"Image {number}: {found} (OCR, {result.seconds:.2f} s).{cut}"))
        for e in everything + images:
            if e.key == key:
                e.ocr = result
    return notes


def read_for_turn(session: ChatSession, turn: Turn) -> list[Note]:
    """For a turn with `ocr`: read the images the prompt holds up to this turn (not read yet), add the notes to
    the turn and return them. Never fails the turn: without the OCR extra, a note says so."""
    if not turn.ocr:
        return []
    turns = session.turns
    upto = next((i for i, t in enumerate(turns) if t is turn), len(turns) - 1)
    start = turns[upto - 1].window_start if upto > 0 else 0  # the oldest turn the model may still see
    images = [im for t in turns[start:upto + 1] for im in t.images]
    try:
        notes = read_pending(session, images, session.cancel_event)
    except Exception as e:  # noqa: BLE001 - OcrUnavailable, or the engine failing to load
        notes = [Note("ocr", f"{e} The message goes without the images' text.")]
    turn.notes += notes
    return notes

"""The `/chat` API endpoint for scripts (gradio_client): one turn, the reply with its notes, heatmaps."""
from __future__ import annotations

import json
import logging
import os
import time

import gradio as gr

from ..chat import clean_text
from .markup import split_image_prompt
from .mining_panel import heatmap_gallery
from .server import session_of, user_error
from .turns import gen_options, run_turn

log = logging.getLogger(__name__)
TIMINGS_LOG = os.environ.get("MGM_LOG_TIMINGS", "").lower() in ("1", "true", "yes", "on")


# ---- API ------------------------------------------------------------------------------------------
def api_chat(message: str, images: list | None, generate_image: bool, temperature: float, request: gr.Request):
    """One chat turn for API clients. Each client (its Gradio session) has its own history.

    Returns (reply text, generated image or None, gallery of mining heatmaps for every image so far); the
    reply ends with the turn's notes, if any, each a paragraph starting with "Note: ".
    """
    files = [f if isinstance(f, str) else getattr(f, "path", None) or f.get("path") for f in (images or [])]
    if not clean_text(message).strip() and not files:
        raise user_error("Send a message, an image, or both.")
    handler = time.monotonic()
    session, ex = session_of(request)
    live = None
    for live in run_turn(session, ex, message or "", files, bool(generate_image), gen_options(temperature or 0.0)):
        if live.error is None:
            yield api_reply(live.text, []), None, []
    if live.error:
        raise gr.Error(live.error, print_exception=False)  # already logged, in one line, by run_turn
    answer = live.turn.assistant if live.turn is not None else live.text
    if live.turn is not None and TIMINGS_LOG:  # MGM_LOG_TIMINGS=1: where the turn's time went (the benchmark reads it)
        log.info("timings %s", json.dumps({"session": session.id, "handler": handler, **live.turn.stamps}))
    yield api_reply(answer, live.notices), live.image_file, heatmap_gallery(session)


def api_reply(answer: str, notices: list) -> str:
    """The answer, then what the user should know about the turn (message cut, image not drawn, ...): API
    clients have no other place to see it. Each note is its own paragraph starting with "Note: "."""
    text, prompt = split_image_prompt(answer)
    return "\n\n".join(([text] if text else []) + ([f"Image prompt: {prompt}"] if prompt else []) +
                       [f"Note: {n}" for n in notices])

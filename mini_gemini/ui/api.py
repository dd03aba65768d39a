"""The `/chat` API endpoint for scripts (gradio_client): one turn, the reply with its notes, heatmaps."""
from __future__ import annotations

import json
import logging
import os
import time

import gradio as gr

from ..chat import clean_text
from .gallery import heatmap_gallery
from .markup import split_image_prompt
from .params import MAX_TEMPERATURE, temperature_param
from .server import session_of, user_error
from .turns import gen_options, run_turn

log = logging.getLogger(__name__)
API_UPDATES_PER_S = 4   # streamed /chat updates per second after the first (the page's chat streams ~20)
TIMINGS_LOG = os.environ.get("MGM_LOG_TIMINGS", "").lower() in ("1", "true", "yes", "on")
# what /chat takes, said to a client whose call Gradio could not even read (see params.CheckedBlocks)
CHAT_SHAPE = ("/chat takes 4 values: message (text), images (a list of files uploaded with the call, e.g. "
              "gradio_client's handle_file(path), or empty), generate_image (true or false) and temperature (a "
              f"number from 0 to {MAX_TEMPERATURE}).")

# ---- API ------------------------------------------------------------------------------------------
def api_chat(message: str, images: list | None, generate_image: bool, temperature: float, request: gr.Request):
    """One chat turn for API clients. Each client (its Gradio session) has its own history.

    Returns (reply text, generated image or None, gallery of heatmaps: for every image so far its mining focus and
    gain, and where the answer looked in each image it saw — see `gallery.heatmap_gallery`); the
    reply ends with the turn's notes, if any, each a paragraph starting with "Note: ". A value of the wrong
    type is refused in one sentence (gr.Error) that says what to send.
    """
    message, generate_image = message or "", bool(generate_image)  # types checked by params.CheckedBlocks
    temperature = temperature_param(temperature)
    files = [f if isinstance(f, str) else getattr(f, "path", None) or f.get("path") for f in (images or [])]
    if not clean_text(message).strip() and not files:
        raise user_error("Send a message, an image, or both.")
    handler = time.monotonic()
    session, ex = session_of(request)
    live = None
    sent = None
    for live in run_turn(session, ex, message, files, generate_image, gen_options(temperature), display=False):
        # the first text at once, then at most API_UPDATES_PER_S updates: each costs the server and every client
        # CPU (Gradio serialises it, the client parses it), which many users at once feel as first-token delay
        if live.error is None and live.text and (sent is None or time.monotonic() - sent >= 1 / API_UPDATES_PER_S):
            sent = time.monotonic()
            yield api_reply(live.text, [], asked=live.asked), None, []
    if live.error:
        raise gr.Error(live.error, print_exception=False)  # already logged, in one line, by run_turn
    answer = live.turn.assistant if live.turn is not None else live.text
    if live.turn is not None and TIMINGS_LOG:  # MGM_LOG_TIMINGS=1: where the turn's time went (the benchmark reads it)
        log.info("timings %s", json.dumps({"session": session.id, "handler": handler, **live.turn.stamps}))
    yield api_reply(answer, live.notices, asked=live.asked), live.image_file, heatmap_gallery(session, ex)


def api_reply(answer: str, notices: list, *, asked: bool) -> str:
    """The answer, then what the user should know about the turn (message cut, image not drawn, ...): API
    clients have no other place to see it. Each note is its own paragraph starting with "Note: ". Only a turn
    that `asked` for an image has an "Image prompt: " paragraph; any other answer is given as written."""
    text, prompt = split_image_prompt(answer, asked=asked)
    return "\n\n".join(([text] if text else []) + ([f"Image prompt: {prompt}"] if prompt else []) +
                       [f"Note: {n}" for n in notices])

"""Agents as users: the chat served as a Model Context Protocol tool (`python app.py --mcp`).

Gradio serves the app's public endpoints as MCP tools at /gradio_api/mcp/ (streamable HTTP). With
`--mcp` (or MGM_MCP_SERVER=1 / GRADIO_MCP_SERVER=True) the app adds one endpoint made for agents,
`chat_about_image`, and serves it, and only it, over MCP. The `/chat` endpoint stays for gradio_client
scripts, but it is not an MCP tool: its `images` parameter is a Gradio file list whose schema agents
cannot fill.

Every parameter of the tool is a plain string or number. The image is text: an http(s) URL
(fetched under the guards of `mini_gemini.inputs.remote`: public addresses only, pinned, bounded), a
data URL, or base64; the bytes then pass the same checks as a browser upload
(`ChatSession.prepare_images`). Turns run in the same queue and concurrency group as the browser's.
The tool answers with one text (answer, notes, mining summary, session id): Gradio's MCP bridge hands
several outputs to most clients as the repr of a Python list, so a drawn picture cannot come back next
to the text: image generation stays a feature of the page and of `/chat`.

Sessions: Gradio's MCP transport is stateless (it issues no `Mcp-Session-Id`), and all MCP calls reach
the app through one internal client, so the conversation is chosen by the `session_id` parameter: the
first call returns a new id, and passing it back continues that conversation. Ids are secrets (whoever
has one can read the conversation); they live in their own namespace, apart from browser sessions, and
are forgotten like any idle conversation (least recently used first).
"""
from __future__ import annotations

import logging
import re
import secrets
import sys
from types import SimpleNamespace

import gradio as gr

from ..chat import clean_text
from ..errors import AttributionUnavailable, ImageError, SessionBusyError
from ..inputs.remote import image_bytes
from ..viz import heatmap as hm
from ..viz.answer_map import answer_summary
from ..viz.mining_summary import describe, image_summary, region_shares  # noqa: F401 - region_shares re-exported
from . import server
from .api import api_reply
from .params import MAX_TEMPERATURE, temperature_param
from .server import session_of, user_error
from .settings import TURNS_AT_ONCE
from .turns import gen_options, run_turn
from .zerogpu import explain_turn

log = logging.getLogger(__name__)
TOOL_NAME = "chat_about_image"
# what the tool takes, said to a client whose call Gradio could not even read (see params.CheckedBlocks)
TOOL_SHAPE = ("chat_about_image takes message (text), image (text: an http(s) URL, a data URL or base64; or "
              f"empty), session_id (text, or empty) and temperature (a number from 0 to {MAX_TEMPERATURE}).")
MCP_PATH = "/gradio_api/mcp/"
SESSION_PREFIX = "mcp-"         # engine session ids of MCP conversations (browser ones are Gradio hashes)
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{8,128}")
INSTALL = "pip install 'mcp>=1.21,<2'   (or: pip install 'gradio[mcp]')"


def chat_about_image(message: str, image: str | None = None, session_id: str | None = None,
                     temperature: float = 0.2) -> str:
    """Ask Mini-Gemini (a vision-language model) about an image, in a conversation that remembers earlier turns and images. Besides the answer it says where in the image the answer looked (its attention to the image, carried down to high-resolution pixels through patch info mining), with each region's share, and how much the answer's words owed to the mined detail.

    Args:
        message: What to ask or say, e.g. "What is written on the sign?". May be empty when an image is sent.
        image: Optional image for this turn: an http(s) URL of a public image, a data URL (data:image/png;base64,...) or the file's bytes in base64. PNG, JPEG, WebP, GIF or BMP, at most 20 MB and 40 megapixels. Leave empty to ask about the images sent before in this conversation.
        session_id: Leave empty to start a new conversation; to continue one, pass the session_id that an earlier call returned (keep it private: it gives access to the conversation).
        temperature: Sampling temperature from 0 (greedy, reproducible) to 1.5; default 0.2.

    Returns:
        One text, in paragraphs: the model's answer; notes about the turn, each starting with "Note: " (message cut, image resized, ...); a paragraph starting with "Mining summary" (for each image of this turn, or the latest one, the regions the answer drew on most, e.g. "the answer drew on the right 41 %, centre 20 %", the share of its attention the image got, and how likely its words would be without the mined detail); and a last line "session_id: <id> (turn N ...)" with the id to pass back to continue the conversation.
    """
    text = message or ""  # types checked by params.CheckedBlocks
    source = (image or "").strip()
    if not clean_text(text).strip() and not source:
        raise user_error("Send a message, an image, or both.")
    temperature = temperature_param(temperature)
    sid = _session_id(session_id or "")
    session, ex = session_of(SimpleNamespace(session_hash=SESSION_PREFIX + sid))
    loaded = []
    if source:
        try:  # fetched or decoded here, then checked like an upload; nothing is read from the server's disk
            loaded = session.prepare_images([image_bytes(source)])
        except ImageError as e:
            log.info("refused an MCP image: %s", e)
            raise user_error(str(e)) from e
    live = None
    try:
        for update in run_turn(session, ex, text, loaded, False, gen_options(temperature)):
            live = update  # the turn as it ends
    finally:
        for failed in ex.failed:  # no input box to give the images back to: do not keep them
            if failed.typed:
                failed.typed["files"] = []
    if live is None:
        raise user_error("There is no answer (the turn did not start).")
    if live.error:
        raise user_error(live.error)
    answer = live.turn.assistant if live.turn is not None else live.text
    turn_images = list(live.turn.images) if live.turn is not None else []
    # one text: Gradio's MCP bridge turns several outputs into the repr of a list for most clients
    return "\n\n".join([api_reply(answer, live.notices, asked=live.asked), mining_summary(session, turn_images),
                        f"session_id: {sid} (turn {len(session.turns)} of this conversation; pass this session_id "
                        "to continue it, or leave it empty to start a new one)"])


def _session_id(value: str) -> str:
    sid = value.strip()
    if not sid:
        return secrets.token_urlsafe(18)
    if not _SESSION_ID.fullmatch(sid):
        raise user_error("session_id must be one returned by an earlier call (8 to 128 letters, digits, - or _), "
                       "or empty to start a new conversation.")
    return sid


# ---- mining summary ------------------------------------------------------------------------------------
def describe_image(entry, number: int, layout: hm.Layout, top: int = 3) -> str:
    """One line on image `number`: the regions where its tokens mined most selectively, with their share
    (`mini_gemini.viz.mining_summary`; question-agnostic: what is said where the answer cannot be attributed)."""
    w, h = entry.image.size
    return describe(image_summary(entry.attn.float().numpy(), entry.gain.float().numpy(), w, h, layout), number, top)


def mining_summary(session, turn_images: list) -> str:
    """Where the answer looked in this turn's images (or in the conversation's latest image if the turn sent none):
    the regions its answer map weighs most and how much its words owed to mining (`viz.answer_map`); where the
    answer cannot be attributed (`--llm-server`), the question-agnostic mining focus, saying why."""
    images = session.images
    numbers = {id(im): k for k, im in enumerate(images, 1)}
    chosen = [im for im in turn_images if id(im) in numbers]
    earlier = not chosen and bool(images)
    if earlier:
        chosen = images[-1:]
    if not chosen:
        return "Mining summary: no image in this conversation yet."
    layout = hm.Layout.from_config(server.LOADER.engine.model.config)
    head = "Mining summary" + (" (no image in this turn; the latest one)" if earlier else "")
    turn = session.turns[-1] if session.turns else None
    seen = session.images_seen(turn) if turn is not None else []
    try:
        if turn is None or not all(im in seen for im in chosen):
            raise AttributionUnavailable("the answer did not see that image (it was left out to fit the context)")
        attribution = explain_turn(session.id, session.turns, "attention", None)
    except (AttributionUnavailable, SessionBusyError) as e:
        lines = [describe_image(im, numbers[id(im)], layout) for im in chosen]
        return (f"{head}: where the answer looked is not known here ({str(e).rstrip('.')}); where mining picked out "
                "detail, whatever was asked: " + " ".join(lines))
    return f"{head}, where the answer looked: " + answer_summary(attribution, seen, chosen, numbers, layout)["text"]


# ---- wiring ------------------------------------------------------------------------------------------
def add_tool() -> None:
    """The tool's endpoint (hidden components, like `/chat`'s); call inside the app's Blocks."""
    with gr.Row(visible=False):
        # no bounds on the number: Gradio would refuse a value out of them with a traceback; the tool checks it
        inputs = [gr.Textbox(label="message", value=None), gr.Textbox(label="image", value=None),
                  gr.Textbox(label="session_id", value=None), gr.Number(label="temperature", value=0.2)]
        output = gr.Textbox(label="reply")
        button = gr.Button("mcp")
    # the browser's queue: the same concurrency group and limit as a chat turn in the page
    button.click(chat_about_image, inputs, output, api_name=TOOL_NAME, concurrency_id="model",
                 concurrency_limit=TURNS_AT_ONCE, show_progress="hidden")


def serve(demo: gr.Blocks, **launch_kwargs) -> None:
    """Launch with the MCP server on, offering `chat_about_image` only; returns once the server is up
    (the caller blocks with `demo.block_thread()`)."""
    try:
        import mcp  # noqa: F401
    except ImportError:
        sys.exit(f"--mcp needs the `mcp` package: {INSTALL}")
    demo.launch(mcp_server=True, prevent_thread_lock=True, **launch_kwargs)
    only_our_tool(demo)
    log.info("MCP tool %s at %s%s", TOOL_NAME, str(demo.local_url or "").rstrip("/"), MCP_PATH)


def only_our_tool(demo: gr.Blocks) -> None:
    """Take every other endpoint (e.g. `/chat`, whose file-list schema agents cannot fill) off the MCP
    server: not listed, not callable over MCP. They stay API endpoints."""
    srv = getattr(demo, "mcp_server_obj", None)
    if srv is None:
        raise RuntimeError(getattr(demo, "mcp_error", None) or "the MCP server did not start")
    keep = {tool: ep for tool, ep in srv.tool_to_endpoint.items() if ep.lstrip("/") == TOOL_NAME}
    srv.tool_to_endpoint.clear()
    srv.tool_to_endpoint.update(keep)

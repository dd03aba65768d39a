"""A stateless request's messages as the engine's conversation: history `Turn`s and the message to answer.

    history, last = build(engine, request)
    session = engine.stateless_session(history)
    events = session.chat(last.text, last.images, generate_image=..., options=...)

Messages become turns the way the app's own conversations hold them, so the prompt is the one the same
conversation would get in the app:

- a user message starts a turn (text parts joined with newlines, its images in order, numbered "Image k:"
  across the conversation by the prompt builder); consecutive user messages are one turn; the assistant
  message after it is the turn's answer;
- system (and developer) messages have no slot in MGM's templates (their system prompts are fixed): their
  text is put before the first user message's text;
- an assistant message's text is the answer as the model wrote it (kept as sent: it is what the model reads);
- a picture this server drew, sent back inside an assistant message as a markdown data-URL image, is taken out
  of the answer text (the model never wrote it) and marks the turn as one that asked for an image.

Images are fetched (http(s) URLs through `inputs.remote.fetch`: public addresses only, size and time limits),
decoded (`inputs.images.load_image`: the app's byte and pixel limits) and, for the history, encoded through
`Engine.encode_image`, which keeps recent pictures by content hash: a follow-up that resends its images does not
encode them again. The engine's stateless sessions then continue the kept KV cache with the longest common
prompt prefix, so the follow-up prefills only its new tokens.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..chat import turn_images
from ..chat.types import MAX_USER_CHARS, Turn, clean_text
from ..errors import ImageError
from ..inputs.images import LoadedImage, load_image
from ..inputs.remote import image_bytes
from .protocol import APIError, ChatRequest, ImagePart, Message

if TYPE_CHECKING:
    from ..chat.engine import Engine

# a picture this server returned ("![prompt](data:image/png;base64,...)"), with the blank line before it
DRAWN_IMAGE = re.compile(r"\s*!\[[^\]\n]*\]\(data:image/[A-Za-z0-9.+-]+;base64,[A-Za-z0-9+/=]*\)")
TOO_LARGE = ("too_big", "too_many_pixels")   # ImageError kinds answered with 413


@dataclass
class UserTurn:
    """A user turn being gathered from the messages."""
    texts: list[str] = field(default_factory=list)
    images: list[ImagePart] = field(default_factory=list)
    answer: list[str] | None = None       # the assistant's text parts; None while unanswered
    want_image: bool = False


@dataclass
class LastMessage:
    """The message to answer: its text and its decoded images."""
    text: str
    images: list[LoadedImage]


def group(messages: list[Message]) -> list[UserTurn]:
    """The messages as user turns (see the module docstring). The last turn is unanswered.

    Raises:
        APIError: 400 for an assistant message before any user message.
    """
    system = [m.text for m in messages if m.role == "system" and m.text.strip()]
    turns: list[UserTurn] = []
    for m in messages:
        if m.role == "user":
            if not turns or turns[-1].answer is not None:
                turns.append(UserTurn())
            turns[-1].texts.append(m.text)
            turns[-1].images += m.images
        elif m.role == "assistant":
            if not turns:
                raise APIError(400, f"`{m.where}`: an assistant message must come after a user message.",
                               param=m.where, code="invalid_message_order")
            text, drawn = DRAWN_IMAGE.subn("", m.text)
            turns[-1].want_image = turns[-1].want_image or drawn > 0
            turns[-1].answer = (turns[-1].answer or []) + [text]
    if system:
        turns[0].texts.insert(0, "\n".join(system))
    return turns


def _text(parts: list[str]) -> str:
    """A turn's text as the engine keeps it: parts joined, control characters dropped, cut at MAX_USER_CHARS."""
    return clean_text("\n".join(p for p in parts if p))[:MAX_USER_CHARS]


def image_error(e: ImageError, where: str) -> APIError:
    """An image problem as the API's error: 413 when it is too large, else 400."""
    status = 413 if e.kind in TOO_LARGE else 400
    return APIError(status, f"`{where}`: {e}", param=where, code=f"image_{e.kind}")


def load(part: ImagePart, fetched: dict) -> LoadedImage:
    """Fetch (or decode) and check one image; the same URL twice in a request is fetched once.

    Raises:
        APIError: 400 (unreadable, not allowed, unreachable) or 413 (too many bytes or pixels).
    """
    if part.url not in fetched:
        try:
            fetched[part.url] = load_image(image_bytes(part.url))
        except ImageError as e:
            raise image_error(e, part.where) from e
    return fetched[part.url]


def build(engine: Engine, request: ChatRequest) -> tuple[list[Turn], LastMessage]:
    """The history turns (images encoded) and the message to answer (images decoded, not yet encoded).

    Raises:
        APIError: 400 / 413 for a message order or an image the engine cannot take (the message names where it
            is in the request: `messages[2].content[1]`), 500 / 503 when encoding an image failed.
    """
    turns = group(request.messages)
    count = sum(len(t.images) for t in turns)
    if count > engine.images_per_session:
        raise APIError(400, f"This conversation has {count} images; this server takes at most "
                            f"{engine.images_per_session} per conversation. Send fewer images.",
                       param="messages", code="too_many_images")
    fetched: dict[str, LoadedImage] = {}
    history: list[Turn] = []
    for t in turns[:-1]:
        loaded = [load(p, fetched) for p in t.images]
        try:
            entries = turn_images.encode(engine, loaded, [im for h in history for im in h.images])
        except ImageError as e:
            raise APIError(503 if e.kind == "oom" else 500, str(e), type="server_error", code=e.kind) from e
        history.append(Turn(user=_text(t.texts), images=entries, assistant="\n".join(t.answer or []),
                            want_image=t.want_image))
    last = turns[-1]  # its text is cleaned and cut by the session, with a note when it is cut
    return history, LastMessage("\n".join(p for p in last.texts if p), [load(p, fetched) for p in last.images])

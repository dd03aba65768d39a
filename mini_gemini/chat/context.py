"""Fitting a conversation into the model's context: which turns the model sees, and cutting a message that is
too long on its own (each with a note saying so).

The window is a function of the history alone: the turn being answered starts from the window of the turn
before it (`Turn.window_start`, 0 for the first) and moves it forward only when the prompt does not fit, by a
quarter of the context more than needed, so that the following turns keep this prefix (and their KV cache)
instead of shifting the window on every turn. A session rebuilt from the same turns therefore sees exactly
the same prompt, whatever Undo, Regenerate, Stop or errors happened on the way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..modeling.chat_template import Prompt, PromptTurn
from .failures import DoesNotFit
from .types import GenOptions, ImageEntry, Note, Turn

if TYPE_CHECKING:
    from .engine import Engine

ANSWER_ROOM = 128             # tokens the context must leave for the answer before old turns are dropped


@dataclass
class Fitted:
    """What the model sees for the answer: the prompt and its ids (IMAGE_TOKEN_INDEX slots), the images in
    slot order, the most new tokens, notes for the user, and the index of the oldest turn in view."""
    prompt: Prompt
    ids: list[int]
    images: list[ImageEntry]
    max_new: int
    notes: list[Note]
    window_start: int


def build(engine: Engine, turns: list[Turn], start: int = 0):
    """(Prompt, ids, images, length in model positions) of turns[start:], as the model will see them; images
    keep their conversation numbers ("Image k:")."""
    view = turns[start:]
    pturns = [PromptTurn(t.user, len(t.images), t.assistant, ocr=t.ocr, generate_image=t.want_image,
                         image_texts=tuple(im.ocr.prompt_texts() if im.ocr is not None else () for im in t.images))
              for t in view]
    first_image = 1 + sum(len(t.images) for t in turns[:start])
    prompt, ids = engine.build_prompt(pturns, first_image)
    images = [im for t in view for im in t.images]
    length = len(ids) + sum(im.tokens.shape[0] - 1 for im in images)
    return prompt, ids, images, length


def window_before(turns: list[Turn]) -> int:
    """Where the window of the last turn starts looking: the previous turn's window (0 for the first turn)."""
    return min(turns[-2].window_start, len(turns) - 1) if len(turns) >= 2 else 0


def fit(engine: Engine, turns: list[Turn], options: GenOptions) -> Fitted:
    """Choose the turns the model sees to answer turns[-1] (dropping the oldest when the context is full) and,
    if the message alone is too long, cut it (turns[-1].user is shortened then).

    Raises:
        DoesNotFit: the message does not fit even on its own.
    """
    ctx = engine.max_context
    turn = turns[-1]
    need = max(1, min(options.max_new_tokens, ANSWER_ROOM, ctx // 4))
    last = len(turns) - 1
    start = before = window_before(turns)
    prompt, ids, images, length = build(engine, turns, start)
    if length + need > ctx and start < last:
        # Drop a quarter of the context more than needed, so that the next turns keep this prefix
        # (and their KV cache) instead of shifting the window on every turn.
        target = ctx - need - ctx // 4
        while start < last and length > target:
            start += 1
            prompt, ids, images, length = build(engine, turns, start)
    notes = []
    if length + need > ctx and turn.user:
        full, lo, hi = turn.user, 0, len(turn.user)
        while lo < hi:  # the longest start of the message that fits
            mid = (lo + hi + 1) // 2
            turn.user = full[:mid]
            if build(engine, turns, start)[3] + need <= ctx:
                lo = mid
            else:
                hi = mid - 1
        turn.user = full[:lo]
        prompt, ids, images, length = build(engine, turns, start)
        notes.append(Note("message", f"Your message was shortened to {lo:,} characters to fit the model's context "
                                     f"of {ctx:,} tokens."))
    if length + min(need, 16) > ctx:
        raise DoesNotFit("This message does not fit the model's context even on its own; send fewer "
                         "images or a shorter message, or clear the conversation.")
    if start > before:
        notes.append(Note("context", f"The conversation outgrew the model's context ({ctx:,} tokens): the {start} "
                                     "oldest turn(s) are no longer seen by the model."))
    return Fitted(prompt, ids, images, min(options.max_new_tokens, ctx - length), notes, start)

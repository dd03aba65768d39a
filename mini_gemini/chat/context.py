"""Fitting a conversation into the model's context: which turns the model sees, and cutting a message
that is too long on its own (each with a note saying so)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .failures import DoesNotFit
from .templates import Turn as PromptTurn
from .types import GenOptions, Note, Turn

if TYPE_CHECKING:
    from .engine import Engine
    from .session import ChatSession

ANSWER_ROOM = 128             # tokens the context must leave for the answer before old turns are dropped


def build(engine: Engine, turns: list[Turn]):
    """(Prompt, ids, images, length in model positions) of these turns, as the model will see them."""
    pturns = [PromptTurn(t.user, len(t.images), t.assistant, ocr=t.ocr, generate_image=t.want_image,
                         image_texts=tuple(im.ocr.prompt_texts() if im.ocr is not None else () for im in t.images))
              for t in turns]
    prompt, ids = engine.build_prompt(pturns)
    images = [im for t in turns for im in t.images]
    length = len(ids) + sum(im.tokens.shape[0] - 1 for im in images)
    return prompt, ids, images, length

def fit(session: ChatSession, turn: Turn, options: GenOptions):
    """Choose the turns the model sees (dropping the oldest when the context is full) and, if the
    message alone is too long, cut it. Returns prompt, ids, images, max new tokens and notices."""
    ctx = session.engine.max_context
    need = max(1, min(options.max_new_tokens, ANSWER_ROOM, ctx // 4))
    last = len(session.turns) - 1
    first = min(session.dropped, last)
    prompt, ids, images, length = build(session.engine, session.turns[first:])
    if length + need > ctx and first < last:
        # Drop a quarter of the context more than needed, so that the next turns keep this prefix
        # (and their KV cache) instead of shifting the window on every turn.
        target = ctx - need - ctx // 4
        while first < last and length > target:
            first += 1
            prompt, ids, images, length = build(session.engine, session.turns[first:])
    notices = []
    if length + need > ctx and turn.user:
        full, lo, hi = turn.user, 0, len(turn.user)
        while lo < hi:  # the longest start of the message that fits
            mid = (lo + hi + 1) // 2
            turn.user = full[:mid]
            if build(session.engine, session.turns[first:])[3] + need <= ctx:
                lo = mid
            else:
                hi = mid - 1
        turn.user = full[:lo]
        prompt, ids, images, length = build(session.engine, session.turns[first:])
        notices.append(Note("message", f"Your message was shortened to {lo:,} characters to fit the model's context of "
                       f"{ctx:,} tokens."))
    if length + min(need, 16) > ctx:
        raise DoesNotFit("This message does not fit the model's context even on its own; send fewer "
                          "images or a shorter message, or clear the conversation.")
    if first > session.dropped:
        notices.append(Note("context", f"The conversation outgrew the model's context ({ctx:,} tokens): the {first} oldest "
                       f"turn(s) are no longer seen by the model."))
    session.dropped = first
    return prompt, ids, images, min(options.max_new_tokens, ctx - length), notices


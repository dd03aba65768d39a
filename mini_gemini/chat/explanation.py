"""What explaining an answer needs besides its attribution (`ChatSession.explain`): the answer's tokens as the
words a user reads, and the same question answered again without the mined high-resolution detail.

The mining-free answer is issue #17's ablation made visible: the prompt the model saw for the turn, with every
image's visual tokens = projector(x) (its LR tokens before mining, `ImageEntry.lr_features`) instead of
projector(x + mined). It is written through the engine's scheduler like any answer (so it waits its turn with
the others), keeps no KV cache and is never put into the history.
"""
from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..errors import AttributionUnavailable
from .kv_store import CacheOwner
from .run import Request
from .types import Event, GenOptions, ImageEntry

if TYPE_CHECKING:
    from .detokenizer import Detokenizer
    from .engine import Engine

NO_MINING = "#no-mining"   # appended to an image's key: its mining-free tokens are another picture to any cache


def token_texts(detokenizer: Detokenizer, ids) -> list[str]:
    """Each answer token's part of the answer's text: "".join(result) is the decoded text (special tokens left
    out), the leading space of a word kept on its token. A token inside a multi-byte character (sentencepiece
    byte fallback) gets "" and the token that completes the character gets all of it.

    Args:
        detokenizer: the engine's `Detokenizer` (`engine.detokenizer`).
        ids: the answer's token ids (`Turn.token_ids`).
    Returns: one string per id.
    """
    ids = [int(i) for i in ids]
    pieces: list[str] = []
    done = 0   # the pieces of ids[:done] are final
    for i in range(len(ids)):
        start = max(0, done - 8)   # a few tokens before, so that a word's leading space survives decoding
        before, now = detokenizer.decode(ids[start:done]), detokenizer.decode(ids[start:i + 1])
        if now.endswith("\ufffd") and i + 1 < len(ids):  # half a character: the next token completes it
            pieces.append("")
            continue
        pieces.append(now[len(before):] if now.startswith(before) else detokenizer.decode(ids[done:i + 1]))
        done = i + 1
    return pieces


def unmined_images(engine: Engine, images: list[ImageEntry]) -> list[ImageEntry]:
    """Copies of `images` whose visual tokens are projector(x): the LR tokens without the mined detail.

    Raises:
        AttributionUnavailable: an image kept no LR tokens (`ImageEntry.lr_features` is None).
    """
    out = []
    for im in images:
        if im.lr_features is None:
            raise AttributionUnavailable("This picture kept no low-resolution tokens, so it cannot be seen without "
                                         "its mined detail; send it again.")
        out.append(dataclasses.replace(im, key=im.key + NO_MINING, notes=[],
                                       tokens=engine.runner.unmined_tokens(im.lr_features, im.tokens.dtype)))
    return out


def answer_without_mining(engine: Engine, session_id: str, prompt_ids: list[int], images: list[ImageEntry],
                          options: GenOptions) -> Iterator[Event]:
    """Write an answer to `prompt_ids` with the mining-free visual tokens of `images` (see the module docstring).

    Returns a generator of "notice" (its place in the queue) and "delta" (text) events, then "done" with text = the
    whole answer and data = its token ids; closing it stops the answer, iterating it raises what the run raises
    (e.g. out of memory).
    Raises:
        AttributionUnavailable: an image kept no LR tokens (see `unmined_images`), at once.
    """
    plain = unmined_images(engine, images)
    length = len(prompt_ids) + sum(int(im.tokens.shape[0]) - 1 for im in plain)
    owner = CacheOwner(f"{session_id}{NO_MINING}")
    engine.kv_store.drop(owner)   # a dropped owner's cache is never kept: this answer leaves nothing behind
    request = Request(list(prompt_ids), plain, options, max(1, min(options.max_new_tokens, engine.max_context - length)),
                      stop_texts=engine.detokenizer.stop_texts + options.stop, owner=owner)
    return _written(engine.start_run(request, threading.Event()))


def _written(run) -> Iterator[Event]:
    try:
        for delta in run:
            yield delta if isinstance(delta, Event) else Event("delta", delta)
    except GeneratorExit:  # the consumer left: stop the model
        run.abort()
        raise
    yield Event("done", run.text, list(run.ids))

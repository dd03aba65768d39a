"""Answering a turn: fit the conversation into the context, write the answer (a `Run`), settle it into the turn,
then draw an image when the turn asked for one.

Whatever fails leaves the history as it was (`restore`), with one "error" event that says what to do.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from . import context, image_turn
from .failures import DoesNotFit, explain, free_memory, is_oom
from .run import Request, Run
from .types import Event, GenOptions, Note, Turn

if TYPE_CHECKING:
    from .session import ChatSession


def respond(session: ChatSession, turn: Turn, options: GenOptions, restore: Callable[[], None],
            started: dict | None = None) -> Iterator[Event]:
    """Stream the answer to `turn` (the session's last turn). `restore` undoes the turn's changes on failure.
    `started`: monotonic times of the turn's earlier stages ("start", "images", "ocr") for `Turn.stamps`."""
    eng = session.engine
    stamps = dict(started or {})
    stamps.setdefault("start", time.monotonic())

    def fail(message: str, kind: str) -> Event:
        restore()
        return Event("error", message, kind)

    try:
        try:
            fitted = context.fit(eng, session.turns, options)
        except DoesNotFit as e:
            yield fail(str(e), "too_long")
            return
        except Exception as e:  # noqa: BLE001
            yield fail(explain(e), "internal")
            return
        turn.prompt, turn.prompt_ids, turn.window_start = fitted.prompt.text, list(fitted.ids), fitted.window_start
        for n in fitted.notes:
            turn.notes.append(n)
            yield Event("notice", n)

        request = Request(fitted.ids, fitted.images, options, fitted.max_new,
                          stop_texts=eng.detokenizer.stop_texts + options.stop, owner=session.cache_owner)
        run = eng.start_run(request, session.cancel_event)
        try:
            for delta in run:  # text, or a notice (e.g. the place in the queue)
                yield delta if isinstance(delta, Event) else Event("delta", delta)
        except GeneratorExit:  # the consumer went away (client disconnected): stop the model
            run.abort()
            settle(turn, run, stopped=True)
            raise
        except Exception as e:  # noqa: BLE001 - any failure must leave the history usable
            run.abort()
            free_memory(e)
            yield fail(explain(e), "oom" if is_oom(e) else "internal")
            return
        settle(turn, run, stopped=session.cancel_event.is_set())
        turn.stamps = {**stamps, **run.stamps}
        if turn.cancelled:
            yield Event("notice", "Stopped; the partial answer is kept." if turn.assistant else
                                  "Stopped before the answer began.")
        elif turn.want_image:
            try:
                yield from image_turn.generate_image(session, turn, fitted.ids, fitted.images, options)
            except GeneratorExit:
                raise
            except Exception as e:  # noqa: BLE001 - the text answer stays whatever happens here
                turn.notes.append(Note("imagegen", f"Image generation failed: {explain(e)} The text answer is kept."))
                yield Event("notice", turn.notes[-1])
        for n in eng.task_notes(session.turns):  # a question or picture outside what the model knows
            turn.notes.append(n)
            yield Event("notice", n)
        yield Event("done", data=turn)
    finally:
        if turn.assistant is None:  # left before any answer existed: as if the turn never started
            restore()


def settle(turn: Turn, run: Run, stopped: bool = False) -> None:
    """Write the run's answer into the turn (ids, text, prompt positions served from the cache)."""
    turn.token_ids, turn.assistant, turn.cached_tokens = run.ids, run.text, run.cached
    if stopped:
        turn.cancelled = True
        turn.notes.append(Note("stopped", "stopped"))

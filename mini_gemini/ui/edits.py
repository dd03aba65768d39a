"""Edits of the history (Undo, Clear, Regenerate) racing a streaming turn: the page ends showing what the
engine holds, whatever order Gradio delivers the two events' updates in.

Gradio sends a generator's updates, then a "completed" message that repeats its last value; the chat it shows
is the last value the page applied. An edit (Undo while an image is drawn) and the stream run at once, each
rendering the chat from the engine, and nothing orders their messages. So one `EditGate` per client orders
them itself:

1. While an edit is under way, the stream yields no chat (what it would show is about to change).
2. The stream's last word is rendered once no edit is under way; if an edit began while it was on its way
   out, the stream renders and yields once more. So its last value (and Gradio's repeat of it) shows what
   the engine holds after every edit that began before the stream was done.
3. An edit renders its own result only when every stream that was open when it made its change has been
   delivered: the page has run that stream's follow-up (`delivered`, called from its `.then` event), so the
   stream's messages, its "completed" one included, are on the page before the edit's result is sent.

Streams that begin after an edit render from the engine as it is then; they are not waited for.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
DELIVERY_WAIT_S = 30.0  # how long an edit waits for the page to have a stream's end (a page gone never says)


class EditGate:
    """Orders, for one client, a streaming turn's chat updates and the results of edits of its history."""

    def __init__(self):
        self._cond = threading.Condition()
        self._editing = 0            # edits under way
        self._edits = 0              # edits begun so far (a stream compares counts to see a new one)
        self._next_id = 0
        self._open: set[int] = set()      # streams not yet delivered to the page
        self._finished: set[int] = set()  # streams that yielded their last value, awaiting delivery

    # ---- the stream's side -------------------------------------------------------------------------
    def open_stream(self) -> int:
        """Register a stream at its start; returns its id."""
        with self._cond:
            self._next_id += 1
            self._open.add(self._next_id)
            return self._next_id

    def editing(self) -> bool:
        """Whether an edit is under way (the stream then yields no chat)."""
        with self._cond:
            return self._editing > 0

    def last_words(self, stream: int, render: Callable[[], T]) -> Iterator[T]:
        """The stream's last values: `render()` once no edit is under way, again while edits began since."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._editing == 0)
                seen, shown = self._edits, render()
            yield shown
            with self._cond:
                if self._edits == seen:
                    self._finished.add(stream)
                    return

    def abandon_stream(self, stream: int) -> None:
        """The stream was closed before its end (its client went away): no follow-up will say it was delivered,
        and no edit waits for it."""
        with self._cond:
            self._open.discard(stream)
            self._finished.discard(stream)
            self._cond.notify_all()

    def delivered(self) -> None:
        """The page has the end of every finished stream (called by the streams' `.then` event)."""
        with self._cond:
            self._open -= self._finished
            self._finished.clear()
            self._cond.notify_all()

    # ---- the edit's side ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def edit(self) -> Iterator[None]:
        """Make an edit of the history inside this block; on leaving it, wait (at most DELIVERY_WAIT_S) until
        the streams open at that moment are on the page. Render the edit's result after the block."""
        with self._cond:
            self._editing += 1
            self._edits += 1
        try:
            yield
        finally:
            with self._cond:
                self._editing -= 1
                waiting = set(self._open)
                self._cond.notify_all()
        self.wait_delivered(waiting)

    def wait_delivered(self, streams: set[int] | None = None) -> None:
        """Wait until `streams` (default: every open stream) are on the page, at most DELIVERY_WAIT_S."""
        with self._cond:
            streams = set(self._open) if streams is None else streams
            if not self._cond.wait_for(lambda: not (streams & self._open), timeout=DELIVERY_WAIT_S):
                log.info("a streaming turn's end was not confirmed by the page in %.0f s; going on", DELIVERY_WAIT_S)
                self._open -= streams

    def streaming(self) -> bool:
        """Whether a stream of this client is not yet on the page."""
        with self._cond:
            return bool(self._open)

"""One answer being written: what it is written from (`Request`) and the hand-over between whoever writes it
(the scheduler, a `generate` thread, a remote LLM server) and whoever reads it (the session).

The producer side is three calls: `halted` (should I stop?), `deliver(ids)` (new token ids) and `finish(error,
cached)` (the answer ended). The consumer iterates the run for text deltas (decoded by `AnswerText`, so a stop
text is found on the text as shown), then reads `ids`, `text` and `cached`; `abort()` stops the producer and
settles what was written.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from .detokenizer import AnswerText, Detokenizer
from .kv_store import CacheOwner, cache_units
from .types import Event, GenOptions, ImageEntry, Note


@dataclass
class Request:
    """What one answer is written from.

    prompt_ids: the prompt's token ids, IMAGE_TOKEN_INDEX where an image goes;
    images: one `ImageEntry` per slot, in order (their `tokens` are spliced in);
    options: sampling options (`GenOptions`, already checked); max_new: most new tokens;
    stop_texts: texts that end the answer (found on the decoded text); suppress_tokens: ids never written;
    lstrip: drop the answer's leading space; anchor: ids the answer continues (decoded with it);
    owner: the conversation whose KV cache it continues and keeps (None: none kept by name).
    """
    prompt_ids: list[int]
    images: list[ImageEntry]
    options: GenOptions
    max_new: int
    stop_texts: tuple[str, ...] = ()
    suppress_tokens: tuple[int, ...] = ()
    lstrip: bool = True
    anchor: tuple[int, ...] = ()
    owner: CacheOwner | None = None
    units: list = field(init=False, repr=False)

    def __post_init__(self):
        self.units = cache_units(self.prompt_ids, self.images)


class Run:
    """One answer between its producer and its consumer (see the module docstring). Subclasses say how the
    production starts (`start`: returns how many conversations wait ahead, 0 when it starts at once).

    Args:
        request: what to write.
        detokenizer: turns the ids into the text shown.
        cancel: the conversation's Stop button (set: the producer stops at its next step).
    """

    def __init__(self, request: Request, detokenizer: Detokenizer, cancel: threading.Event):
        self.request = request
        self.cancel = cancel
        self.answer = AnswerText(detokenizer, request.stop_texts, request.lstrip, request.anchor)
        self.halt = threading.Event()   # the consumer left, or a stop text was written
        self.ids: list[int] = []        # the answer's ids and text, once settled
        self.text = ""
        self.cached = 0                 # prompt positions the producer did not have to compute
        self.stamps: dict[str, float] = {}   # monotonic times: "submitted", "admitted", "first_token", "finished"
        self._delivered: list[int] = []
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._settled = False

    # ---- producer side -------------------------------------------------------------------------------------
    @property
    def halted(self) -> bool:
        """Whether the producer should stop: Stop was pressed, the consumer left or a stop text was written."""
        return self.halt.is_set() or self.cancel.is_set()

    def admitted(self) -> None:
        """The producer starts on this answer (it has its place; the prompt is computed next)."""
        self.stamps.setdefault("admitted", time.monotonic())

    def deliver(self, ids: list[int]) -> None:
        """New token ids of the answer, in order."""
        self.stamps.setdefault("first_token", time.monotonic())
        self._delivered.extend(ids)
        self._queue.put(list(ids))

    def finish(self, error: BaseException | None = None, cached: int | None = None) -> None:
        """The answer ended: all its ids were delivered (or `error` ended it). Called once."""
        if cached is not None:
            self.cached = cached
        self.stamps.setdefault("finished", time.monotonic())
        self._error = error
        self._done.set()
        self._queue.put(None)

    def wait_done(self, timeout: float | None = None) -> bool:
        """Wait until `finish` was called (at most `timeout` seconds); returns whether it was."""
        return self._done.wait(timeout)

    # ---- consumer side -------------------------------------------------------------------------------------
    def start(self) -> int:
        raise NotImplementedError

    def waiting_text(self, ahead: int) -> str:
        return f"Waiting: {ahead} conversation{'s' if ahead != 1 else ''} ahead."

    def __iter__(self) -> Iterator[str | Event]:
        """Text deltas as the answer is written; first, when it has to wait for a place, one "notice" `Event`
        with a `Note` of kind "queue". Raises the producer's error at the end, if any."""
        self.stamps["submitted"] = time.monotonic()
        ahead = self.start()
        if ahead:
            yield Event("notice", Note("queue", self.waiting_text(ahead)))
        yield from self.answer.deltas(self._chunks(), self.halt)
        self._settle()
        yield from self.answer.rest(self.text)

    def _chunks(self) -> Iterator[list[int]]:
        """Token ids as they come, several deliveries at once when the consumer fell behind."""
        while True:
            items = [self._queue.get()]
            while items[-1] is not None:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            ids = [i for chunk in items if chunk is not None for i in chunk]
            if ids:
                yield ids
            if items[-1] is None:
                return

    def _settle(self):
        if self._settled:
            return
        self._done.wait()
        self._settled = True
        if self._error is not None:
            raise self._error
        self.ids, self.text = self.answer.settle(self._delivered)

    def abort(self) -> None:
        """Stop the producer (the consumer left or failed) and settle `ids` / `text` from what was written."""
        self.halt.set()
        if self.started:
            try:
                self._settle()
            except Exception:  # noqa: BLE001 - the run is being abandoned anyway
                pass

    @property
    def started(self) -> bool:
        """Whether `start` was called (a producer exists that will call `finish`)."""
        raise NotImplementedError


class LocalRun(Run):
    """An answer of the built-in engine: handed to the engine's scheduler (batched, or one at a time)."""

    def __init__(self, request: Request, detokenizer: Detokenizer, cancel: threading.Event, scheduler):
        super().__init__(request, detokenizer, cancel)
        self.scheduler = scheduler
        self._submitted = False

    def start(self) -> int:
        self._submitted = True
        return self.scheduler.submit(self)

    def waiting_text(self, ahead: int) -> str:
        return (f"Waiting: {ahead} conversation{'s' if ahead != 1 else ''} ahead (the server writes "
                f"{self.scheduler.max_active} answer{'s' if self.scheduler.max_active != 1 else ''} at a time).")

    @property
    def started(self) -> bool:
        return self._submitted

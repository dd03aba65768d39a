"""A conversation: its turns and images, one turn at a time, streamed as `Event`s.

The session owns its history (`turns`), its Stop button (`cancel`) and its turn lock; answering a turn is
`answer.respond`, images of a new turn are `turn_images`, the text in them `turn_ocr`. Everything it derives
from the history (the turns the model sees, the images' numbers) is recomputed from the history, so that
Undo, Regenerate, Clear, Stop and errors leave it exactly as if the remaining history had been built afresh.

Locks (always taken in this order): the session's turn lock (one turn at a time per conversation) -> the
model runner's lock (one model run at a time) -> bookkeeping locks held for microseconds (sessions, caches).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..errors import AttributionUnavailable, ImageError, SessionBusyError
from ..inputs.images import LoadedImage
from . import answer, turn_images, turn_ocr
from .kv_store import CacheOwner
from .types import ABOUT_MESSAGE, MAX_USER_CHARS, Event, GenOptions, ImageEntry, Note, Turn, clean_text

if TYPE_CHECKING:
    from .engine import Engine

BUSY_WAIT_S = 10.0            # how long a new turn waits for the previous one of the same conversation


class _Busy(Exception):
    pass


class ChatSession:
    """One conversation over an `Engine`'s model (made by `Engine.session(id)`).

    Attributes:
        id: the session id.
        turns: the history (`Turn`s), oldest first; read it, change it only through the methods below.
        cache_owner: the key of this conversation's KV cache in the engine's store (a new one after Clear);
            None for a stateless session (`Engine.stateless_session`): its answers share caches by prompt prefix.
    """

    def __init__(self, engine: Engine, session_id: str, *, expired: bool = False, stateless: bool = False):
        self.engine, self.id = engine, session_id
        self.turns: list[Turn] = []
        self.stateless = stateless
        self.cache_owner = None if stateless else CacheOwner(session_id)
        self._cancel = threading.Event()
        self._busy = threading.Lock()   # one turn at a time
        self._closed = False
        self._expired = expired         # dropped by the engine's LRU before: the next turn says so

    # ---- history --------------------------------------------------------------------------------
    @property
    def images(self) -> list[ImageEntry]:
        """Every image of the conversation, in order (Image 1, Image 2, ...)."""
        return [im for t in self.turns for im in t.images]

    @property
    def dropped(self) -> int:
        """How many of the oldest turns the model no longer saw in the last answer (to fit its context)."""
        return self.turns[-1].window_start if self.turns else 0

    @property
    def cancel_event(self) -> threading.Event:
        """Set while Stop is pressed for the turn in progress (runs stop at their next step)."""
        return self._cancel

    def snapshot(self) -> list[Turn]:
        """The history, safe to hand to another process (ZeroGPU workers): visual tokens moved to the CPU."""
        for im in self.images:
            im.tokens = im.tokens.cpu()
            if im.lr_features is not None:
                im.lr_features = im.lr_features.cpu()
        return list(self.turns)

    def adopt(self, turns: list[Turn]) -> None:
        """Take over a history made elsewhere (`snapshot` of the same conversation in another process).
        The KV cache is dropped: it described the old history."""
        self.turns = list(turns)
        self._new_cache_owner()

    def cancel(self):
        """Stop the answer being written (the partial answer is kept) or the image being drawn."""
        self._cancel.set()

    def undo(self) -> Turn | None:
        """Remove the last turn (a turn in progress is stopped first). The KV cache stays: the turns before are
        still a prefix of it."""
        with self._exclusive():
            return self.turns.pop() if self.turns else None

    def clear(self):
        """Forget the whole conversation (a turn in progress is stopped first)."""
        with self._exclusive():
            self._reset()

    def close(self, expired: bool = False):
        """End the session: stop any turn and free history, images and KV cache (no waiting). `expired`: closed
        by the engine's LRU (its next turn, if any, says so)."""
        self._closed = True
        self._expired = self._expired or expired
        self.cancel()
        if self._busy.acquire(blocking=False):
            try:
                self._reset()
            finally:
                self._busy.release()
        else:  # the running turn resets the session when it ends
            self._new_cache_owner()

    def _reset(self):
        self.turns = []
        self._new_cache_owner()

    def _new_cache_owner(self):
        if self.cache_owner is not None:
            self.engine.kv_store.drop(self.cache_owner)
            self.cache_owner = CacheOwner(self.id)

    @contextlib.contextmanager
    def _exclusive(self):
        if not self._busy.acquire(blocking=False):
            self.cancel()
            if not self._busy.acquire(timeout=BUSY_WAIT_S):
                raise SessionBusyError("This conversation is still busy with a turn; try again in a moment.")
        try:
            yield
        finally:
            self._busy.release()

    @contextlib.contextmanager
    def _turn_lock(self):
        if not self._busy.acquire(timeout=BUSY_WAIT_S):
            raise _Busy()
        self._cancel.clear()  # a Stop from here on (even while images are encoded) ends this turn
        try:
            yield
        finally:
            if self._closed:  # closed while this turn ran: free everything now
                self._reset()
            self._busy.release()

    def _open(self) -> list[Event]:
        """Start a turn on this session: registered with the engine again if it was closed; the notice to give
        when it had expired."""
        notices = []
        if self._expired:
            self._expired = False
            notices.append(Event("notice", "This conversation had expired (the server keeps a limited number) "
                                           "and starts afresh."))
        self._closed = False
        if not self.stateless:
            self.engine.touch(self)
        return notices

    # ---- a turn ---------------------------------------------------------------------------------
    def chat(self, text: str, images=(), *, generate_image: bool = False,
             options: GenOptions | None = None) -> Iterator[Event]:
        """Add a user turn (text and any images) and stream the answer.

        Args:
            text: the user's message (control characters dropped; cut at MAX_USER_CHARS with a note).
            images: paths, bytes, file objects or PIL images (decoded by `inputs.images.load_image`), or
                `LoadedImage`s a caller has decoded already (`prepare_images`).
            generate_image: ask for an image (" <GEN>" is added, as the official demo does; SDXL draws it).
            options: sampling, length, stop strings, OCR and image-generation options (`GenOptions`, made valid).

        Yields:
            `Event`s: "notice" (a `Note`), "delta" (answer text), "progress" (image drawing, fraction in
            data), "image" (PIL image in data, its prompt in text), then "done" (the `Turn`) — or one
            "error" (a message for the user; data = a short tag such as "too_many", "oom", "busy").

        An empty message without images does nothing. Problems (an unreadable image, a message that cannot
        fit, a model failure) end the turn with one "error" event and leave the history as it was. Nothing
        is raised: the generator is closed (client gone) → the model stops at its next step.
        """
        options = (options or GenOptions()).checked()
        text = clean_text(text)
        images = _as_list(images)
        if not text.strip() and not images:
            return  # nothing to answer
        if not text.strip():
            text = ""
        try:
            with self._turn_lock():
                yield from self._chat(text, images, generate_image, options)
        except _Busy:
            yield Event("error", "This conversation is still answering the previous message; wait for it to "
                                 "finish or press Stop.", "busy")

    def regenerate(self, options: GenOptions | None = None, *, generate_image: bool | None = None
                   ) -> Iterator[Event]:
        """Answer the last user turn again (a new sample when temperature > 0).

        Args:
            options: sampling and image-generation options for the new answer.
            generate_image: whether to draw an image this time (None: as the turn first asked).
        Yields:
            `Event`s as `chat` does; an error leaves the previous answer in place.
        """
        options = (options or GenOptions()).checked()
        try:
            with self._turn_lock():
                if not self.turns:
                    return
                yield from self._open()
                turn = self.turns[-1]
                saved = dataclasses.replace(turn, notes=list(turn.notes))

                def restore():
                    for f in dataclasses.fields(Turn):
                        setattr(turn, f.name, getattr(saved, f.name))

                turn.assistant, turn.token_ids, turn.cancelled = None, [], False
                if generate_image is not None:
                    turn.want_image = bool(generate_image)
                turn.image_prompt = turn.generated_image = None
                turn.ocr = options.ocr
                turn.notes = [n for n in turn.notes if getattr(n, "kind", None) in ABOUT_MESSAGE  # still true
                              or (turn.ocr and getattr(n, "kind", None) == "ocr")]
                for n in turn_ocr.read_for_turn(self, turn):
                    yield Event("notice", n)
                yield from answer.respond(self, turn, options, restore)
        except _Busy:
            yield Event("error", "This conversation is still answering; wait for it to finish or press Stop.", "busy")

    def _chat(self, text: str, images: list, generate_image: bool, options: GenOptions) -> Iterator[Event]:
        stamps = {"start": time.monotonic()}
        yield from self._open()
        notes = []
        if len(text) > MAX_USER_CHARS:
            text = text[:MAX_USER_CHARS]
            notes.append(Note("message", f"Your message was cut to its first {MAX_USER_CHARS:,} characters."))
        try:
            entries = turn_images.encode(self.engine, self.prepare_images(images), self.images)
        except ImageError as e:
            yield Event("error", str(e), e.kind)
            return
        stamps["images"] = time.monotonic()
        first = len(self.images) + 1
        for k, im in enumerate(entries):
            notes += [Note("image", f"Image {first + k}: {note}.") for note in im.notes]
        turn = Turn(user=text, images=entries, want_image=bool(generate_image), notes=notes, ocr=options.ocr)
        for n in notes:
            yield Event("notice", n)
        self.turns.append(turn)
        for n in turn_ocr.read_for_turn(self, turn):  # GenOptions.ocr: the images' text, read before the prompt
            yield Event("notice", n)
        if turn.ocr:
            stamps["ocr"] = time.monotonic()

        def restore():
            if self.turns and self.turns[-1] is turn:
                self.turns.pop()

        yield from answer.respond(self, turn, options, restore, stamps)

    def prepare_images(self, sources) -> list[LoadedImage]:
        """Check and decode the images of a new turn, before anything is encoded.

        The one place where input images are checked (count, context room) and decoded: callers that want
        to report a bad file at once (the app) call it first and pass the result to `chat`.

        Args:
            sources: paths, bytes, file objects, PIL images or `LoadedImage`s (kept as they are).
        Returns:
            One `LoadedImage` per source (RGB, EXIF applied, notes on what was done to it).
        Raises:
            ImageError: too many images, or a file that cannot be used; the message names the image
                ("Image 2 of 3: ...") and says what to do, `kind` tags it.
        """
        return turn_images.prepare(self.engine, _as_list(sources), len(self.images))

    def explain(self, turn: Turn | int = -1, *, method: str = "attention", layers: tuple[int, int] | None = None,
                ablation: bool = True):
        """Where an answer looked: its attribution over the visual tokens and the high-resolution pixels of every
        image the model saw for it, and each answer token's probability with and without the mined detail
        (`modeling.attribution.Attribution`). One extra pass over the conversation, under the model's lock; the
        engine keeps the last few results (`Engine.attribution`), so asking again (another word, another view) costs
        nothing.

        Args:
            turn: the `Turn` (or its index in `turns`; default the last one).
            method: "attention" (answer rows of the LLM's attention, mean over heads and `layers`) or "relevancy"
                (gradient-weighted, Chefer et al.; a backward pass per answer token: small models only).
            layers: [start, stop) LLM layers; None: `modeling.attribution.default_layers`.
            ablation: also each token's probability without the mined detail (a second forward); False skips it
                (prob_no_mining is then None, unless a kept result has it).
        Returns:
            `Attribution`: per image of the prompt (in slot order, `images_seen(turn)`) the relevance (A, V, N) and
            HR maps (A, V, side*P, side*P), float32; prob and prob_no_mining (A,).
        Raises:
            AttributionUnavailable: the turn has no answer, or the LLM runs on a server (its layers are not here).
            SessionBusyError: a turn is being answered in this conversation.
            ValueError: an unknown method or a bad layer range.
        """
        if self.engine.llm_server is not None:
            raise AttributionUnavailable("Answer attribution needs the LLM's layers, and with --llm-server they run "
                                         "on the server; the mining maps of each image still work.")
        if not self._busy.acquire(timeout=BUSY_WAIT_S):
            raise SessionBusyError("This conversation is still answering; ask where it looked once it is done.")
        try:
            t = self.turns[turn] if isinstance(turn, int) else turn
            if t not in self.turns or not t.token_ids:
                raise AttributionUnavailable("That answer is not there any more, or it has no tokens to explain.")
            key = (self.id, id(t), tuple(t.prompt_ids), tuple(t.token_ids), method, layers)
            images = self.images_seen(t)
            if not ablation:  # a kept result with the ablation serves as well
                kept = self.engine.attribution(key + (True,), None)
                if kept is not None:
                    return kept
            return self.engine.attribution(key + (ablation,), lambda: self.engine.runner.explain(
                t.prompt_ids, images, t.token_ids, method, layers, ablation))
        finally:
            self._busy.release()

    def answer_without_mining(self, turn: Turn | int = -1, options: GenOptions | None = None) -> Iterator[Event]:
        """The same question answered again without the mined high-resolution detail: the prompt the model saw for
        `turn`, every image's visual tokens = projector(x) from its LR tokens (`ImageEntry.lr_features`) instead of
        projector(x + mined). Written by the engine like any answer (queued with the others), never put into the
        history, no KV cache kept (`chat.explanation`). Works with `--llm-server` too (the projector is here).

        Args:
            turn: the `Turn` (or its index in `turns`; default the last one).
            options: sampling and length (default: greedy, `GenOptions(temperature=0)`).
        Yields:
            "notice" (the place in the queue), "delta" (text), then "done" (text = the answer, data = its ids).
            Closing the generator stops the answer.
        Raises:
            AttributionUnavailable: the turn has no answer, or an image kept no LR tokens.
            SessionBusyError: a turn is being answered in this conversation.
            whatever the run raises (e.g. out of memory), while iterating.
        """
        from .explanation import answer_without_mining
        options = (options or GenOptions(temperature=0.0)).checked()
        if not self._busy.acquire(timeout=BUSY_WAIT_S):
            raise SessionBusyError("This conversation is still answering; ask again once it is done.")
        try:  # what the model saw, taken under the turn lock; the answer itself is written without it
            t = self.turns[turn] if isinstance(turn, int) else turn
            if t not in self.turns or not t.token_ids:
                raise AttributionUnavailable("That answer is not there any more, or it has no tokens.")
            prompt_ids, images = list(t.prompt_ids), self.images_seen(t)
        finally:
            self._busy.release()
        return answer_without_mining(self.engine, self.id, prompt_ids, images, options)

    def images_seen(self, turn: Turn) -> list[ImageEntry]:
        """The images the model saw for `turn`'s answer, in the prompt's slot order (its window of the history)."""
        idx = next(i for i, t in enumerate(self.turns) if t is turn)
        return [im for t in self.turns[turn.window_start:idx + 1] for im in t.images]

    def read_text(self) -> list:
        """The text in every image of the conversation, in the order of `images` (Image 1, 2, ...): one
        `inputs.ocr.OcrResult` each (lines with text, confidence and box = 4 (x, y) points in pixels of
        `images[k].image`; seconds). Pictures not read yet are read now (once per picture per session,
        the result kept on their `ImageEntry.ocr`), outside the model's lock; a turn need not be running.
        Raises inputs.ocr.OcrUnavailable (message with the install line) without the `ocr` extra.
        """
        images = self.images
        turn_ocr.read_pending(self, images)
        return [im.ocr for im in images]


def _as_list(images) -> list:
    """`images` as a list: one path / bytes / PIL image, or any iterable of them."""
    if images is None:
        return []
    if isinstance(images, (str, bytes, bytearray, os.PathLike)) or hasattr(images, "getpixel") \
            or hasattr(images, "read"):
        return [images]
    return list(images)

"""A conversation: its turns and images, one turn at a time, streamed as `Event`s.

Locks (always taken in this order): the session's turn lock (one turn at a time per conversation) -> the
engine's compute lock (one model run at a time) -> the engine's state lock (bookkeeping only).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from typing import TYPE_CHECKING, Callable, Iterator

from ..constants import GEN_TAG
from ..inputs.images import ImageError, LoadedImage, load_image
from . import image_turn
from .failures import DoesNotFit, ImageProblem, explain, free_memory, is_oom
from .generation import LLMRun
from .templates import Turn as PromptTurn
from .types import ABOUT_MESSAGE, MAX_USER_CHARS, Event, GenOptions, ImageEntry, Note, Turn, clean_text

if TYPE_CHECKING:
    from .engine import Engine

ANSWER_ROOM = 128             # tokens the context must leave for the answer before old turns are dropped
BUSY_WAIT_S = 10.0            # how long a new turn waits for the previous one of the same conversation


class _Busy(Exception):
    pass


class ChatSession:
    def __init__(self, engine: Engine, session_id: str):
        self.engine, self.id = engine, session_id
        self.turns: list[Turn] = []
        self.kv = None                  # (DynamicCache, items it covers) or None
        self.dropped = 0                # oldest turns left out of the prompt to fit the context
        self._cancel = threading.Event()
        self._busy = threading.Lock()   # one turn at a time
        self._closed = False
        self._expired = False           # closed by the engine's LRU, not by the user

    # ---- history --------------------------------------------------------------------------------
    @property
    def images(self) -> list[ImageEntry]:
        return [im for t in self.turns for im in t.images]

    def cancel(self):
        """Stop the answer being written (the partial answer is kept) or the image being drawn."""
        self._cancel.set()

    def undo(self) -> Turn | None:
        """Remove the last turn (a turn in progress is stopped first)."""
        with self._exclusive():
            return self.turns.pop() if self.turns else None

    def clear(self):
        """Forget the whole conversation (a turn in progress is stopped first)."""
        with self._exclusive():
            self._reset()

    def close(self):
        """End the session: stop any turn and free history, images and KV cache (no waiting)."""
        self._closed = True
        self.cancel()
        if self._busy.acquire(blocking=False):
            try:
                self._reset()
            finally:
                self._busy.release()
        # else: the running turn resets the session when it ends
        self.engine._forget(self)

    def _reset(self):
        self.turns, self.kv, self.dropped = [], None, 0

    @contextlib.contextmanager
    def _exclusive(self):
        if not self._busy.acquire(blocking=False):
            self.cancel()
            if not self._busy.acquire(timeout=BUSY_WAIT_S):
                raise RuntimeError("This conversation is still busy with a turn; try again in a moment.")
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
                self.engine._forget(self)
            self._busy.release()

    # ---- a turn ---------------------------------------------------------------------------------
    def chat(self, text: str, images=(), *, generate_image: bool = False,
             options: GenOptions | None = None) -> Iterator[Event]:
        """Add a user turn (text and any images) and stream the answer.

        Images: paths, bytes, file objects or PIL images (decoded by `images.load_image`), or
        `LoadedImage`s a caller has decoded already.

        An empty message without images does nothing. Problems (an unreadable image, a message that
        cannot fit, a model failure) end the turn with one "error" event and leave the history as it was.
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

    def regenerate(self, options: GenOptions | None = None) -> Iterator[Event]:
        """Answer the last user turn again (a new sample when temperature > 0)."""
        options = (options or GenOptions()).checked()
        try:
            with self._turn_lock():
                if not self.turns:
                    return
                turn = self.turns[-1]
                saved = dataclasses.replace(turn, notes=list(turn.notes))

                def restore():
                    for f in dataclasses.fields(Turn):
                        setattr(turn, f.name, getattr(saved, f.name))

                turn.assistant, turn.token_ids, turn.cancelled = None, [], False
                turn.image_prompt = turn.generated_image = None
                turn.notes = [n for n in turn.notes if getattr(n, "kind", None) in ABOUT_MESSAGE]  # still true
                self.engine._touch(self)
                yield from self._respond(turn, options, restore)
        except _Busy:
            yield Event("error", "This conversation is still answering; wait for it to finish or press Stop.", "busy")

    def _chat(self, text: str, images: list, generate_image: bool, options: GenOptions) -> Iterator[Event]:
        eng = self.engine
        self._closed = False
        if self._expired:  # dropped by the LRU (this object, or an earlier one with the same id)
            self._expired = False
            yield Event("notice", "This conversation had expired (the server keeps a limited number) and "
                                  "starts afresh.")
        eng._touch(self)
        notes = []
        if len(text) > MAX_USER_CHARS:
            text = text[:MAX_USER_CHARS]
            notes.append(Note("message", f"Your message was cut to its first {MAX_USER_CHARS:,} characters."))
        try:
            entries = self._images(images)
        except ImageProblem as e:
            yield Event("error", str(e), e.kind)
            return
        first = len(self.images) + 1
        for k, im in enumerate(entries):
            notes += [Note("image", f"Image {first + k}: {note}.") for note in im.notes]
        turn = Turn(user=text, images=entries, want_image=bool(generate_image), notes=notes)
        for n in notes:
            yield Event("notice", n)
        self.turns.append(turn)

        def restore():
            if self.turns and self.turns[-1] is turn:
                self.turns.pop()

        yield from self._respond(turn, options, restore)

    def _images(self, sources: list) -> list[ImageEntry]:
        eng = self.engine
        if not sources:
            return []
        if len(self.images) + len(sources) > eng.images_per_session:
            raise ImageProblem(f"This conversation can hold at most {eng.images_per_session} images; clear it "
                                "to start a new one.", "too_many")
        if len(sources) * eng.tokens_per_image + 16 > eng.max_context:
            raise ImageProblem(f"Too many images for the model's context: each takes {eng.tokens_per_image} "
                                f"tokens of {eng.max_context}. Send fewer images at once.", "too_many")
        loaded = []
        for k, src in enumerate(sources):
            where = f"Image {k + 1} of {len(sources)}: " if len(sources) > 1 else ""
            if isinstance(src, LoadedImage):  # decoded (and hashed) by the caller already: not again
                loaded.append(src)
                continue
            try:
                loaded.append(load_image(src))
            except ImageError as e:
                raise ImageProblem(where + str(e), e.kind) from e
            except MemoryError as e:
                raise ImageProblem(where + "The image is too large to decode here. Please send a smaller "
                                    "one.", "too_many_pixels") from e
            except Exception as e:  # noqa: BLE001 - e.g. a source of a type nobody expected
                raise ImageProblem(f"{where}Could not read the image ({type(e).__name__}: {e}). Please send a "
                                    "PNG, JPEG, WebP, GIF or BMP file.", "unreadable") from e
        known = {im.key: im for im in self.images}
        entries = []
        for li in loaded:
            im = known.get(li.key)
            if im is None:  # a picture new to this conversation: encode it (once)
                try:
                    tokens, attn, gain = eng.encode(li.image)
                except Exception as e:  # noqa: BLE001
                    free_memory(e)
                    raise ImageProblem(explain(e), "oom" if is_oom(e) else "internal") from e
                im = ImageEntry(li.key, li.image, tokens, attn, gain)
                known[li.key] = im
            entries.append(ImageEntry(im.key, im.image, im.tokens, im.attn, im.gain, list(li.notes)))
        return entries

    # ---- prompt ---------------------------------------------------------------------------------
    def _prompt(self, turns: list[Turn]):
        pturns = [PromptTurn(t.user + (GEN_TAG if t.want_image else ""), len(t.images), t.assistant)
                  for t in turns]
        prompt, ids = self.engine.build_prompt(pturns)
        images = [im for t in turns for im in t.images]
        length = len(ids) + sum(im.tokens.shape[0] - 1 for im in images)
        return prompt, ids, images, length

    def _fit(self, turn: Turn, options: GenOptions):
        """Choose the turns the model sees (dropping the oldest when the context is full) and, if the
        message alone is too long, cut it. Returns prompt, ids, images, max new tokens and notices."""
        ctx = self.engine.max_context
        need = max(1, min(options.max_new_tokens, ANSWER_ROOM, ctx // 4))
        last = len(self.turns) - 1
        first = min(self.dropped, last)
        prompt, ids, images, length = self._prompt(self.turns[first:])
        if length + need > ctx and first < last:
            # Drop a quarter of the context more than needed, so that the next turns keep this prefix
            # (and their KV cache) instead of shifting the window on every turn.
            target = ctx - need - ctx // 4
            while first < last and length > target:
                first += 1
                prompt, ids, images, length = self._prompt(self.turns[first:])
        notices = []
        if length + need > ctx and turn.user:
            full, lo, hi = turn.user, 0, len(turn.user)
            while lo < hi:  # the longest start of the message that fits
                mid = (lo + hi + 1) // 2
                turn.user = full[:mid]
                if self._prompt(self.turns[first:])[3] + need <= ctx:
                    lo = mid
                else:
                    hi = mid - 1
            turn.user = full[:lo]
            prompt, ids, images, length = self._prompt(self.turns[first:])
            notices.append(Note("message", f"Your message was shortened to {lo:,} characters to fit the model's context of "
                           f"{ctx:,} tokens."))
        if length + min(need, 16) > ctx:
            raise DoesNotFit("This message does not fit the model's context even on its own; send fewer "
                              "images or a shorter message, or clear the conversation.")
        if first > self.dropped:
            notices.append(Note("context", f"The conversation outgrew the model's context ({ctx:,} tokens): the {first} oldest "
                           f"turn(s) are no longer seen by the model."))
        self.dropped = first
        return prompt, ids, images, min(options.max_new_tokens, ctx - length), notices

    # ---- generation -----------------------------------------------------------------------------
    def _respond(self, turn: Turn, options: GenOptions, restore: Callable[[], None]) -> Iterator[Event]:
        dropped = self.dropped

        def fail(message: str, kind: str) -> Event:
            restore()
            self.dropped, self.kv = dropped, None
            return Event("error", message, kind)

        try:
            try:
                prompt, ids, images, max_new, notices = self._fit(turn, options)
            except DoesNotFit as e:
                yield fail(str(e), "too_long")
                return
            except Exception as e:  # noqa: BLE001
                yield fail(explain(e), "internal")
                return
            turn.prompt, turn.prompt_ids = prompt.text, list(ids)
            for n in notices:
                turn.notes.append(n)
                yield Event("notice", n)

            run = LLMRun(self, ids, images, options, max_new, stop_texts=self.engine.stop_texts)
            try:
                for delta in run:
                    yield Event("delta", delta)
            except GeneratorExit:  # the consumer went away (client disconnected): stop the model
                run.abort()
                self._settle(turn, run, stopped=True)
                raise
            except Exception as e:  # noqa: BLE001 - any failure must leave the history usable
                run.abort()
                free_memory(e)
                yield fail(explain(e), "oom" if is_oom(e) else "internal")
                return
            self._settle(turn, run)
            if turn.cancelled:
                yield Event("notice", "Stopped; the partial answer is kept.")
            elif turn.want_image:
                try:
                    yield from image_turn.generate_image(self, turn, ids, images, options)
                except GeneratorExit:
                    raise
                except Exception as e:  # noqa: BLE001 - the text answer stays whatever happens here
                    turn.notes.append(Note("imagegen", f"Image generation failed: {explain(e)} The text answer is kept."))
                    yield Event("notice", turn.notes[-1])
            yield Event("done", data=turn)
        finally:
            if turn.assistant is None:  # left before any answer existed: as if the turn never started
                restore()

    def _settle(self, turn: Turn, run: LLMRun, stopped: bool = False):
        turn.token_ids, turn.assistant, turn.cached_tokens = run.ids, run.text, run.cached
        if stopped or self._cancel.is_set():
            turn.cancelled = True
            turn.notes.append(Note("stopped", "stopped"))



def _as_list(images) -> list:
    """`images` as a list: one path / bytes / PIL image, or any iterable of them."""
    if images is None:
        return []
    if isinstance(images, (str, bytes, bytearray, os.PathLike)) or hasattr(images, "getpixel") \
            or hasattr(images, "read"):
        return [images]
    return list(images)


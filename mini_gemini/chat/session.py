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

from ..errors import ImageError, SessionBusyError
from ..inputs.images import LoadedImage, load_image
from . import context, image_turn
from .failures import DoesNotFit, explain, free_memory, is_oom
from .generation import LLMRun
from .types import ABOUT_MESSAGE, MAX_USER_CHARS, Event, GenOptions, ImageEntry, Note, Turn, clean_text

if TYPE_CHECKING:
    from .engine import Engine

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

    def snapshot(self) -> list[Turn]:
        """The history, safe to hand to another process (ZeroGPU workers): visual tokens moved to the CPU."""
        for im in self.images:
            im.tokens = im.tokens.cpu()
        return list(self.turns)

    def adopt(self, turns: list[Turn]) -> None:
        """Take over a history made elsewhere (`snapshot` of the same conversation in another process).
        The KV cache is dropped: it described the old history."""
        self.turns, self.kv = list(turns), None

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
                self.engine._forget(self)
            self._busy.release()

    # ---- a turn ---------------------------------------------------------------------------------
    def chat(self, text: str, images=(), *, generate_image: bool = False,
             options: GenOptions | None = None) -> Iterator[Event]:
        """Add a user turn (text and any images) and stream the answer.

        Args:
            text: the user's message (control characters dropped; cut at MAX_USER_CHARS with a note).
            images: paths, bytes, file objects or PIL images (decoded by `inputs.images.load_image`), or
                `LoadedImage`s a caller has decoded already (`prepare_images`).
            generate_image: ask for an image (" <GEN>" is added, as the official demo does; SDXL draws it).
            options: sampling, length, OCR and image-generation options (`GenOptions`, made valid first).

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
                self.engine._touch(self)
                for n in self._read_texts(turn):
                    yield Event("notice", n)
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
        except ImageError as e:
            yield Event("error", str(e), e.kind)
            return
        first = len(self.images) + 1
        for k, im in enumerate(entries):
            notes += [Note("image", f"Image {first + k}: {note}.") for note in im.notes]
        turn = Turn(user=text, images=entries, want_image=bool(generate_image), notes=notes, ocr=options.ocr)
        for n in notes:
            yield Event("notice", n)
        self.turns.append(turn)
        for n in self._read_texts(turn):  # GenOptions.ocr: the images' text, read before the prompt is built
            yield Event("notice", n)

        def restore():
            if self.turns and self.turns[-1] is turn:
                self.turns.pop()

        yield from self._respond(turn, options, restore)

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
        eng = self.engine
        sources = _as_list(sources)
        if not sources:
            return []
        if len(self.images) + len(sources) > eng.images_per_session:
            raise ImageError(f"This conversation can hold at most {eng.images_per_session} images; clear it "
                             "to start a new one." if len(sources) <= eng.images_per_session else
                             f"Send at most {eng.images_per_session} images at once.", "too_many")
        if len(sources) * eng.tokens_per_image + 16 > eng.max_context:
            raise ImageError(f"Too many images for the model's context: each takes {eng.tokens_per_image} "
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
                raise ImageError(where + str(e), e.kind) from e
            except MemoryError as e:
                raise ImageError(where + "The image is too large to decode here. Please send a smaller "
                                 "one.", "too_many_pixels") from e
            except Exception as e:  # noqa: BLE001 - e.g. a source of a type nobody expected
                raise ImageError(f"{where}Could not read the image ({type(e).__name__}). Please send a "
                                 "PNG, JPEG, WebP, GIF or BMP file.", "unreadable") from e
        return loaded

    def _images(self, sources: list) -> list[ImageEntry]:
        eng = self.engine
        loaded = self.prepare_images(sources)
        known = {im.key: im for im in self.images}
        entries = []
        for li in loaded:
            im = known.get(li.key)
            if im is None:  # a picture new to this conversation: encode it (once)
                try:
                    tokens, attn, gain = eng.encode(li.image)
                except Exception as e:  # noqa: BLE001
                    free_memory(e)
                    raise ImageError(explain(e), "oom" if is_oom(e) else "internal") from e
                im = ImageEntry(li.key, li.image, tokens, attn, gain)
                known[li.key] = im
            entries.append(ImageEntry(im.key, im.image, im.tokens, im.attn, im.gain, list(li.notes), ocr=im.ocr))
        return entries

    # ---- OCR --------------------------------------------------------------------------------------
    def read_text(self) -> list:
        """The text in every image of the conversation, in the order of `images` (Image 1, 2, ...): one
        `inputs.ocr.OcrResult` each (lines with text, confidence and box = 4 (x, y) points in pixels of
        `images[k].image`; seconds). Pictures not read yet are read now (once per picture per session,
        the result kept on their `ImageEntry.ocr`), outside the model's lock; a turn need not be running.
        Raises inputs.ocr.OcrUnavailable (message with the install line) without the `ocr` extra.
        """
        images = self.images
        self._ocr_pending(images)
        return [im.ocr for im in images]

    def _ocr_pending(self, images: list[ImageEntry], cancel: threading.Event | None = None) -> list[Note]:
        """Read the pictures among `images` that have no OCR result yet; notes name each picture by its
        number in the conversation. OcrUnavailable propagates; other failures become notes (and an empty
        result, so a broken picture is not read again every turn)."""
        from ..inputs.ocr import OcrResult, OcrUnavailable

        everything = self.images
        pending: dict[str, ImageEntry] = {}
        for im in images:
            if im.ocr is None:
                pending.setdefault(im.key, im)
        notes = []
        for key, im in pending.items():
            if cancel is not None and cancel.is_set():
                break
            number = next((k + 1 for k, e in enumerate(everything) if e.key == key), 0)
            try:
                result = self.engine.read_text(im.image)
            except OcrUnavailable:
                raise
            except Exception as e:  # noqa: BLE001 - the answer goes on without this picture's text
                result = OcrResult()
                notes.append(Note("ocr", f"Image {number}: its text could not be read (OCR failed: "
                                         f"{type(e).__name__})."))
            else:
                n = len(result.lines)
                found = f"{n} line{'s' if n != 1 else ''} of text read" if n else "no text found"
                cut = (" Only its first lines go into the message (too much text for the prompt)."
                       if result.truncated else "")
                notes.append(Note("ocr", f"Image {number}: {found} (OCR, {result.seconds:.2f} s).{cut}"))
            for e in everything + images:
                if e.key == key:
                    e.ocr = result
        return notes

    def _read_texts(self, turn: Turn) -> list[Note]:
        """For a turn with `ocr`: read the images the prompt holds up to this turn (not read yet), add the
        notes to the turn and return them. Never fails the turn: without the OCR extra, a note says so."""
        if not turn.ocr:
            return []
        upto = next((i for i, t in enumerate(self.turns) if t is turn), len(self.turns) - 1)
        images = [im for t in self.turns[min(self.dropped, upto):upto + 1] for im in t.images]
        try:
            notes = self._ocr_pending(images, self._cancel)
        except Exception as e:  # noqa: BLE001 - OcrUnavailable, or the engine failing to load
            notes = [Note("ocr", f"{e} The message goes without the images' text.")]
        turn.notes += notes
        return notes

    # ---- generation -----------------------------------------------------------------------------
    def _respond(self, turn: Turn, options: GenOptions, restore: Callable[[], None]) -> Iterator[Event]:
        dropped = self.dropped

        def fail(message: str, kind: str) -> Event:
            restore()
            self.dropped, self.kv = dropped, None
            return Event("error", message, kind)

        try:
            try:
                prompt, ids, images, max_new, notices = context.fit(self, turn, options)
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

            run = self.engine.start_run(self, ids, images, options, max_new, stop_texts=self.engine.stop_texts)
            try:
                for delta in run:  # text, or a notice (e.g. the place in the queue)
                    yield delta if isinstance(delta, Event) else Event("delta", delta)
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


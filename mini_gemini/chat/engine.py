"""Chat sessions over one loaded model: history, images, streaming, caches and image generation.

The CLI, the app and the API all talk to the model through `Engine` / `ChatSession`; nothing here
knows about Gradio. A turn streams `Event`s (notice, delta, progress, image, error, done):

    engine = Engine(model, ImageGenerator(...))          # the generator is optional
    session = engine.session("some-id")
    for ev in session.chat("What is this?", ["photo.jpg"], options=GenOptions(temperature=0)):
        ...                                               # ev.kind, ev.text, ev.data

Speed: every image is encoded once per session (tokens and mining maps kept with it), and the LLM's
KV cache is kept between turns: a follow-up re-uses the longest common prefix of its prompt with what
the cache holds, so it only prefills its new tokens. The decode loop is the LLM's own `generate`; the
streamer only queues token ids, text is decoded by the consumer. Results never depend on the caches.

Locks (always taken in this order, never the other way round): a session's turn lock (one turn at a
time per conversation) -> the engine's compute lock (one model run at a time) -> the engine's state lock
(session and cache bookkeeping, held for microseconds). The tokenizer has its own lock: transformers'
fast tokenizers switch backend state per call, which is not safe across threads.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import queue
import re
import threading
import unicodedata
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from ..constants import GEN_TAG, IMAGE_PROMPT_CLOSE, IMAGE_PROMPT_OPEN, IMAGE_TOKEN_INDEX
from ..inputs.images import ImageError, LoadedImage, load_image
from .templates import Turn as PromptTurn
from .templates import build_prompt, tokenize

MAX_USER_CHARS = 16_000       # longer messages are cut (with a notice) before anything else
MAX_IMAGE_PROMPT_TOKENS = 77  # SDXL's text encoders read 77 tokens
ANSWER_ROOM = 128             # tokens the context must leave for the answer before old turns are dropped
BUSY_WAIT_S = 10.0            # how long a new turn waits for the previous one of the same conversation
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")           # sentencepiece byte-fallback tokens
_USER_NOTE = re.compile(r"Image \d+: |Your message was ")  # notes about the user's turn, not the answer


@dataclass
class GenOptions:
    temperature: float = 0.2
    top_p: float = 0.7
    max_new_tokens: int = 512
    seed: int | None = None
    # image generation (SDXL)
    steps: int = 30
    guidance: float = 5.0
    image_seed: int | None = None
    width: int | None = None
    height: int | None = None
    negative_prompt: str | None = None

    def checked(self) -> "GenOptions":
        """A copy with every value in its valid range (sliders and API callers send anything)."""
        def num(x, lo, hi, default, cast=float):
            try:
                x = float(x)
            except (TypeError, ValueError):
                return default
            return cast(min(max(x, lo), hi)) if math.isfinite(x) else default

        def opt_int(x):
            try:
                return None if x is None else int(x)
            except (TypeError, ValueError, OverflowError):
                return None

        return dataclasses.replace(
            self, temperature=num(self.temperature, 0.0, 10.0, 0.0), top_p=num(self.top_p, 1e-3, 1.0, 1.0),
            max_new_tokens=num(self.max_new_tokens, 1, 1 << 20, 512, int), seed=opt_int(self.seed),
            steps=num(self.steps, 1, 500, 30, int), guidance=num(self.guidance, 0.0, 50.0, 5.0),
            image_seed=opt_int(self.image_seed), width=opt_int(self.width), height=opt_int(self.height))


@dataclass(eq=False)  # identity, not field, equality: entries hold tensors
class ImageEntry:
    key: str
    image: Any                 # PIL RGB
    tokens: torch.Tensor       # (V*N, D) visual tokens, on the model's device
    attn: torch.Tensor         # (V, N, P*P) mining weights, float32 on CPU
    gain: torch.Tensor         # (V, N) mining gain per LR token, float32 on CPU
    notes: list[str] = field(default_factory=list)


@dataclass(eq=False)  # identity equality: two turns with the same text are still two turns
class Turn:
    user: str
    images: list[ImageEntry] = field(default_factory=list)
    assistant: str | None = None
    token_ids: list[int] = field(default_factory=list)   # the answer's token ids (stop token left out)
    prompt: str = ""                  # the full prompt string given to the tokenizer
    want_image: bool = False
    image_prompt: str | None = None
    generated_image: Any = None       # PIL image from SDXL
    cancelled: bool = False
    notes: list[str] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)  # the prompt's ids, image slots as IMAGE_TOKEN_INDEX
    cached_tokens: int = 0            # prompt positions served from the KV cache (not prefilled again)


@dataclass
class Event:
    kind: str          # "notice" | "delta" | "progress" | "image" | "error" | "done"
    text: str = ""
    data: Any = None   # progress: fraction; image: PIL image; error: a short tag; done: the Turn


def clean_text(text: str) -> str:
    """Drop control characters (C0/C1 except newline and tab) and lone surrogates.

    Format characters (category Cf) stay: emoji sequences need the zero-width joiner and right-to-left
    text needs its direction marks.
    """
    text = (text or "").replace("\r\n", "\n").replace("\r", "\n")
    return "".join(c for c in text if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cs"))


class _Busy(Exception):
    pass


class _DoesNotFit(Exception):
    pass


class _Stopped(Exception):
    """Raised from SDXL's progress callback to stop a drawing nobody waits for any more."""


# ---- the LLM run ----------------------------------------------------------------------------------
class _TokenStream:
    """The streamer `generate` feeds: one queue.put per decoding step, nothing more (no decoding)."""

    def __init__(self):
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self._prompt = True

    def put(self, value):
        if self._prompt:  # generate first hands over the prompt ids (empty with inputs_embeds)
            self._prompt = False
            return
        self.queue.put(value)

    def end(self):
        self.queue.put(None)

    def chunks(self) -> Iterator[list[int]]:
        """Token ids as they come, several steps at once when the consumer fell behind."""
        done = False
        while not done:
            items = [self.queue.get()]
            while True:
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            ids: list[int] = []
            for item in items:
                if item is None:
                    done = True
                    break
                ids.extend(item.reshape(-1).tolist())
            if ids:
                yield ids


class _Halt(StoppingCriteria):
    """Ends generation once any of `events` is set: one flag read per step."""

    def __init__(self, *events: threading.Event):
        self.events = events
        self._flags: dict = {}

    def __call__(self, input_ids, scores, **kwargs):
        stop = any(e.is_set() for e in self.events)
        key = (input_ids.shape[0], input_ids.device, stop)
        if key not in self._flags:
            self._flags[key] = torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)
        return self._flags[key]


class _LLMRun:
    """One `llm.generate` in a worker thread. Iterate it for text deltas; then `ids` and `text` hold the
    answer. `abort()` stops the model and waits for the worker (at most one decoding step)."""

    def __init__(self, session: "ChatSession", ids: list[int], images: list[ImageEntry], options: GenOptions,
                 max_new: int, *, stop_texts: tuple[str, ...] = (), extra: dict | None = None,
                 lstrip: bool = True, anchor: list[int] = ()):
        self.session, self.engine = session, session.engine
        self.prompt_ids, self.images, self.options, self.max_new = ids, images, options, max_new
        self.items = _items(ids, images)
        self.stop_texts, self.extra, self.lstrip = tuple(stop_texts), extra or {}, lstrip
        # ids the answer continues (decoded with it, so that e.g. a word's leading space survives)
        self.anchor = list(anchor)[-8:]
        while self.anchor and self.anchor[0] in session.engine.byte_ids:  # never start inside a byte run
            self.anchor.pop(0)
        self.halt = threading.Event()   # set when the consumer left or a stop text was written
        self.ids: list[int] = []
        self.text = ""
        self.cached = 0
        self._result: list[int] | None = None
        self._error: BaseException | None = None
        self._stream = _TokenStream()
        self._thread = threading.Thread(target=self._work, daemon=True, name=f"mgm-generate-{session.id[:8]}")
        self._finished = False

    # worker thread
    def _work(self):
        eng, s = self.engine, self.session
        try:
            while not eng._compute.acquire(timeout=0.05):  # waiting for another conversation's turn
                if self.halt.is_set() or s._cancel.is_set():
                    return
            try:
                self._generate()
            finally:
                eng._compute.release()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._error = e
        finally:
            self._stream.end()

    @torch.no_grad()
    def _generate(self):
        eng, s = self.engine, self.session
        model, o = eng.model, self.options
        embeds = model.embed(self.prompt_ids, [im.tokens for im in self.images])
        cache, covered = s.kv if s.kv is not None else (None, [])
        s.kv = None  # the cache is about to change: if this run fails, nobody may reuse it
        reuse = _common_prefix(covered, self.items, embeds.shape[1] - 1) if cache is not None else 0
        if reuse and cache.get_seq_length() > reuse:
            try:
                cache.crop(reuse - cache.get_seq_length())
            except Exception:  # noqa: BLE001 - e.g. a sliding window that cannot roll back: start afresh
                reuse = 0
            if cache.get_seq_length() != reuse:
                reuse = 0
        if not reuse:
            cache = DynamicCache(config=model.config.llm)
        self.cached = reuse
        if o.seed is not None:
            torch.manual_seed(o.seed)
        sampling = dict(do_sample=True, temperature=o.temperature, top_p=o.top_p) if o.temperature > 0 else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        out = model.llm.generate(
            inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
            cache=cache, max_new_tokens=self.max_new, eos_token_id=eng.stop_ids or None, pad_token_id=eng.pad_id,
            streamer=self._stream, stopping_criteria=StoppingCriteriaList([_Halt(s._cancel, self.halt)]),
            **sampling, **self.extra)
        new = out[0].tolist()  # with inputs_embeds, generate returns the new tokens only
        # what the cache now holds: the prompt and all new tokens but the last (never fed back)
        s.kv = (cache, (self.items + [("t", t) for t in new])[:cache.get_seq_length()])
        eng._keep_kv(s)
        self._result = new

    # consumer side
    def __iter__(self) -> Iterator[str]:
        eng = self.engine
        tok = eng.model.tokenizer
        self._thread.start()
        ids: list[int] = list(self.anchor)
        # Incremental detokenisation (as vLLM does it): decode a short window starting a little before
        # the new tokens and emit what it adds. The window ends where the text is final: not inside a
        # run of byte-fallback tokens (a later byte can turn the run into one character, or into "\ufffd"s)
        # and not on half a character.
        prefix, read = 0, len(ids)
        raw, out = "", ""          # raw: text decoded so far; out: text handed out so far
        for chunk in self._stream.chunks():
            ids += chunk
            end = len(ids)
            while end > read and ids[end - 1] in eng.byte_ids:
                end -= 1
            if end <= read:
                continue
            with eng._tok_lock:
                before = tok.decode(ids[prefix:read], skip_special_tokens=True)
                now = tok.decode(ids[prefix:end], skip_special_tokens=True)
            if len(now) <= len(before) or now.endswith("\ufffd"):  # nothing new, or half a character
                continue
            raw += now[len(before):]
            prefix, read = read, end
            text, hit = self._visible(raw, final=False)
            if hit:
                self.halt.set()
            if len(text) > len(out):
                yield text[len(out):]
                out = text
        self._finish()
        if len(self.text) > len(out) and self.text.startswith(out):
            yield self.text[len(out):]

    def _visible(self, raw: str, final: bool) -> tuple[str, bool]:
        """The answer as shown: leading space dropped (`lstrip`), cut at a stop text; while streaming,
        trailing space and a possible start of a stop text are held back."""
        text = raw.lstrip() if self.lstrip else raw
        cuts = [i for i in (text.find(s) for s in self.stop_texts) if i >= 0]
        if cuts:
            return text[:min(cuts)].rstrip(), True
        text = text.rstrip()
        if not final:
            for s in self.stop_texts:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        return text[:-k].rstrip(), False
        return text, False

    def _finish(self):
        if self._finished:
            return
        self._thread.join()
        self._finished = True
        if self._error is not None:
            raise self._error
        tok, eng = self.engine.model.tokenizer, self.engine
        ids = list(self._result or [])
        while ids and ids[-1] in eng.stop_ids:
            ids.pop()
        with eng._tok_lock:
            base = tok.decode(self.anchor, skip_special_tokens=True)

            def decode(new):
                full = tok.decode(self.anchor + new, skip_special_tokens=True)
                return full[len(base):] if full.startswith(base) else tok.decode(new, skip_special_tokens=True)
            text, hit = self._visible(decode(ids), final=True)
            if hit:  # keep the ids up to the stop text (the model may have run a step or two past it)
                for k in range(1, len(ids) + 1):
                    if self._visible(decode(ids[:k]), final=True)[1]:
                        ids = ids[:k]
                        break
        self.ids, self.text = ids, text

    def abort(self):
        """Stop the model (the consumer left or failed) and settle `ids` / `text` from what was made."""
        self.halt.set()
        if self._thread.is_alive() or self._thread.ident is not None:
            try:
                self._finish()
            except Exception:  # noqa: BLE001 - the run is being abandoned anyway
                pass


# ---- engine -----------------------------------------------------------------------------------------
class Engine:
    """One model, many sessions. Model runs are serialised; sessions and KV caches are bounded (LRU)."""

    def __init__(self, model, image_generator=None, *, max_context: int | None = None,
                 max_sessions: int = 256, kv_sessions: int = 4, images_per_session: int = 16):
        self.model, self.imagegen = model, image_generator
        llm_ctx = getattr(model.config.llm, "max_position_embeddings", None) or 4096
        self.max_context = min(max_context or llm_ctx, llm_ctx)
        self.max_sessions, self.kv_sessions = max(1, max_sessions), max(0, kv_sessions)
        self.images_per_session = images_per_session
        self.sessions: OrderedDict[str, ChatSession] = OrderedDict()
        self._kv_owners: OrderedDict[str, None] = OrderedDict()
        # ids the LRU dropped (bounded): a caller that looks its session up by id is told it expired
        self._expired_ids: OrderedDict[str, None] = OrderedDict()
        self._compute = threading.Lock()     # one model run (encode / generate) at a time
        self._state = threading.Lock()       # sessions and KV bookkeeping; never held while waiting
        self._tok_lock = threading.RLock()   # the tokenizer is not thread safe
        tok = model.tokenizer
        self.stop_ids, self.stop_texts = self._stops(tok, model.template.stop_strings)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # sentencepiece byte-fallback tokens ("<0x0A>"): streaming waits for the end of a run of them
        self.byte_ids = frozenset(i for t, i in tok.get_vocab().items() if _BYTE_TOKEN.fullmatch(t))

    @staticmethod
    def _stops(tok, strings):
        """Stop strings that are single tokens become eos ids (free in the decode loop); others stay text."""
        ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
        texts = []
        vocab = tok.get_vocab()
        for s in strings:
            enc = vocab.get(s)
            if enc is not None and enc != tok.unk_token_id:
                ids.append(enc)
            else:
                texts.append(s)
        return sorted(set(ids)), tuple(texts)

    @property
    def tokens_per_image(self) -> int:
        return self.model.config.views * self.model.config.tokens_per_view

    # ---- sessions -------------------------------------------------------------------------------
    def session(self, session_id: str | None = None) -> "ChatSession":
        """The session with this id (created on first use); the least recently used ones are dropped."""
        session_id = session_id or uuid.uuid4().hex
        with self._state:
            s = self.sessions.pop(session_id, None)
            if s is None:
                s = ChatSession(self, session_id)
                s._expired = session_id in self._expired_ids  # its next turn says so
                self._expired_ids.pop(session_id, None)
            self.sessions[session_id] = s
            evicted = self._evict()
        for old in evicted:  # outside the state lock: closing may touch it
            old.close()
        return s

    def _evict(self) -> list["ChatSession"]:
        """Drop the least recently used sessions beyond `max_sessions` (under the state lock)."""
        evicted = [self.sessions.popitem(last=False)[1] for _ in range(len(self.sessions) - self.max_sessions)]
        for old in evicted:
            old._expired = True
            self._expired_ids[old.id] = None
        while len(self._expired_ids) > 4 * self.max_sessions + 64:
            self._expired_ids.popitem(last=False)
        return evicted

    def end_session(self, session_id: str):
        """Forget a session: its history, images and KV cache are released."""
        with self._state:
            s = self.sessions.pop(session_id, None)
        if s is not None:
            s.close()

    def _touch(self, session: "ChatSession"):
        """Mark the session as used (LRU); a closed one whose id is still free is registered again."""
        with self._state:
            current = self.sessions.get(session.id)
            if current is session:
                self.sessions.move_to_end(session.id)
                return
            if current is not None:  # the id went to a new session meanwhile: this one runs unmanaged
                return
            self.sessions[session.id] = session
            self._expired_ids.pop(session.id, None)
            evicted = self._evict()
        for old in evicted:
            old.close()

    def _keep_kv(self, session: "ChatSession"):
        """Record that `session` holds a KV cache; drop the least recently used beyond `kv_sessions`."""
        with self._state:
            self._kv_owners.pop(session.id, None)
            if session._closed or self.sessions.get(session.id) is not session or self.kv_sessions == 0:
                session.kv = None
                return
            self._kv_owners[session.id] = None
            while len(self._kv_owners) > self.kv_sessions:
                sid, _ = self._kv_owners.popitem(last=False)
                if sid in self.sessions:
                    self.sessions[sid].kv = None

    def _forget(self, session: "ChatSession"):
        with self._state:
            if self.sessions.get(session.id) is session:
                del self.sessions[session.id]
            self._kv_owners.pop(session.id, None)
            session.kv = None

    # ---- model work -----------------------------------------------------------------------------
    def encode(self, pil) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One image -> (visual tokens (V*N, D), mining weights (V, N, P*P) and gain (V, N), float32 CPU)."""
        views = self.model.processor(pil)
        with self._compute, torch.no_grad():
            enc = self.model.encode_images(views.lr[None], views.hr[None])
        return enc.tokens[0], enc.attn[0].float().cpu(), enc.gain[0].float().cpu()

    def _build(self, turns: list[PromptTurn]):
        """(Prompt, token ids) for prompt turns, under the tokenizer lock."""
        with self._tok_lock:
            prompt = build_prompt(self.model.template, turns)
            return prompt, tokenize(prompt, self.model.tokenizer)


# ---- sessions ---------------------------------------------------------------------------------------
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
                turn.notes = [n for n in turn.notes if _USER_NOTE.match(n)]  # about the message, still true
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
            notes.append(f"Your message was cut to its first {MAX_USER_CHARS:,} characters.")
        try:
            entries = self._images(images)
        except _ImageProblem as e:
            yield Event("error", str(e), e.kind)
            return
        first = len(self.images) + 1
        for k, im in enumerate(entries):
            notes += [f"Image {first + k}: {note}." for note in im.notes]
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
            raise _ImageProblem(f"This conversation can hold at most {eng.images_per_session} images; clear it "
                                "to start a new one.", "too_many")
        if len(sources) * eng.tokens_per_image + 16 > eng.max_context:
            raise _ImageProblem(f"Too many images for the model's context: each takes {eng.tokens_per_image} "
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
                raise _ImageProblem(where + str(e), e.kind) from e
            except MemoryError as e:
                raise _ImageProblem(where + "The image is too large to decode here. Please send a smaller "
                                    "one.", "too_many_pixels") from e
            except Exception as e:  # noqa: BLE001 - e.g. a source of a type nobody expected
                raise _ImageProblem(f"{where}Could not read the image ({type(e).__name__}: {e}). Please send a "
                                    "PNG, JPEG, WebP, GIF or BMP file.", "unreadable") from e
        known = {im.key: im for im in self.images}
        entries = []
        for li in loaded:
            im = known.get(li.key)
            if im is None:  # a picture new to this conversation: encode it (once)
                try:
                    tokens, attn, gain = eng.encode(li.image)
                except Exception as e:  # noqa: BLE001
                    _free_memory(e)
                    raise _ImageProblem(_explain(e), "oom" if _is_oom(e) else "internal") from e
                im = ImageEntry(li.key, li.image, tokens, attn, gain)
                known[li.key] = im
            entries.append(ImageEntry(im.key, im.image, im.tokens, im.attn, im.gain, list(li.notes)))
        return entries

    # ---- prompt ---------------------------------------------------------------------------------
    def _prompt(self, turns: list[Turn]):
        pturns = [PromptTurn(t.user + (GEN_TAG if t.want_image else ""), len(t.images), t.assistant)
                  for t in turns]
        prompt, ids = self.engine._build(pturns)
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
            notices.append(f"Your message was shortened to {lo:,} characters to fit the model's context of "
                           f"{ctx:,} tokens.")
        if length + min(need, 16) > ctx:
            raise _DoesNotFit("This message does not fit the model's context even on its own; send fewer "
                              "images or a shorter message, or clear the conversation.")
        if first > self.dropped:
            notices.append(f"The conversation outgrew the model's context ({ctx:,} tokens): the {first} oldest "
                           f"turn(s) are no longer seen by the model.")
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
            except _DoesNotFit as e:
                yield fail(str(e), "too_long")
                return
            except Exception as e:  # noqa: BLE001
                yield fail(_explain(e), "internal")
                return
            turn.prompt, turn.prompt_ids = prompt.text, list(ids)
            for n in notices:
                turn.notes.append(n)
                yield Event("notice", n)

            run = _LLMRun(self, ids, images, options, max_new, stop_texts=self.engine.stop_texts)
            try:
                for delta in run:
                    yield Event("delta", delta)
            except GeneratorExit:  # the consumer went away (client disconnected): stop the model
                run.abort()
                self._settle(turn, run, stopped=True)
                raise
            except Exception as e:  # noqa: BLE001 - any failure must leave the history usable
                run.abort()
                _free_memory(e)
                yield fail(_explain(e), "oom" if _is_oom(e) else "internal")
                return
            self._settle(turn, run)
            if turn.cancelled:
                yield Event("notice", "Stopped; the partial answer is kept.")
            elif turn.want_image:
                try:
                    yield from self._image_generation(turn, ids, images, options)
                except GeneratorExit:
                    raise
                except Exception as e:  # noqa: BLE001 - the text answer stays whatever happens here
                    turn.notes.append(f"Image generation failed: {_explain(e)} The text answer is kept.")
                    yield Event("notice", turn.notes[-1])
            yield Event("done", data=turn)
        finally:
            if turn.assistant is None:  # left before any answer existed: as if the turn never started
                restore()

    def _settle(self, turn: Turn, run: _LLMRun, stopped: bool = False):
        turn.token_ids, turn.assistant, turn.cached_tokens = run.ids, run.text, run.cached
        if stopped or self._cancel.is_set():
            turn.cancelled = True
            turn.notes.append("stopped")

    def _image_generation(self, turn: Turn, ids, images, options: GenOptions) -> Iterator[Event]:
        from ..imagegen import extract_image_prompt
        prompt = extract_image_prompt(turn.assistant)
        if prompt is None:
            prompt = yield from self._write_image_prompt(turn, ids, images, options)
            if prompt is None:
                return
        turn.image_prompt = prompt
        yield from self._draw(turn, prompt, options)

    def _write_image_prompt(self, turn: Turn, ids, images, options: GenOptions):
        """The model wrote no complete <h>...</h>: continue its answer, from a forced "<h>" or from its
        own unclosed one, so that the LLM itself writes the image prompt (small checkpoints often skip
        the tag). Returns the prompt, or None when no image is to be drawn."""
        from ..imagegen import extract_image_prompt
        eng = self.engine
        tok = eng.model.tokenizer
        answer = turn.assistant
        unclosed = answer.rfind(IMAGE_PROMPT_OPEN) > answer.rfind(IMAGE_PROMPT_CLOSE)  # cut off mid-prompt
        with eng._tok_lock:
            opener = [] if unclosed else tok(IMAGE_PROMPT_OPEN, add_special_tokens=False).input_ids
            head = tok.decode(turn.token_ids + opener, skip_special_tokens=True).strip()
            specials = sorted(set(tok.all_special_ids))
        lead = head[len(answer):] if head.startswith(answer) else \
            "" if unclosed else (" " if answer else "") + IMAGE_PROMPT_OPEN
        cont = ids + turn.token_ids + opener
        room = eng.max_context - len(_items(cont, images))
        if room >= 2:
            # special tokens are suppressed: the model cannot end its turn before it closed the prompt
            run = _LLMRun(self, cont, images, options, min(MAX_IMAGE_PROMPT_TOKENS, room), lstrip=False,
                          anchor=turn.token_ids + opener,
                          stop_texts=(IMAGE_PROMPT_CLOSE,), extra=dict(suppress_tokens=specials))
            started = False
            try:
                for delta in run:
                    if not started:
                        started = True
                        yield Event("delta", lead)
                    yield Event("delta", delta)
            except GeneratorExit:
                run.abort()
                turn.cancelled = True
                raise
            except Exception as e:  # noqa: BLE001
                run.abort()
                self.kv = None
                _free_memory(e)
                turn.notes.append(f"Could not write an image prompt: {_explain(e)}")
                yield Event("notice", turn.notes[-1])
                return None
            wrote = bool(run.text.strip())
            if wrote:
                turn.token_ids = turn.token_ids + opener + run.ids
                turn.assistant = answer + lead + run.text
            if self._cancel.is_set():
                turn.cancelled = True
                turn.notes.append("stopped")
                yield Event("notice", "Stopped; no image was drawn.")
                return None
            if wrote:
                turn.assistant += IMAGE_PROMPT_CLOSE
                yield Event("delta", IMAGE_PROMPT_CLOSE)
                prompt = extract_image_prompt(turn.assistant)
                if prompt:
                    return prompt
        fallback = turn.user.strip()
        if not fallback:
            turn.notes.append("The model wrote no image prompt, so no image was drawn.")
            yield Event("notice", turn.notes[-1])
            return None
        turn.notes.append("The model wrote no image prompt; your message was used instead.")
        yield Event("notice", turn.notes[-1])
        return fallback

    def _draw(self, turn: Turn, prompt: str, options: GenOptions) -> Iterator[Event]:
        gen = self.engine.imagegen
        if gen is None:
            turn.notes.append("Image generation is not available here: start with --sdxl MODEL (a hub id or a "
                              "local folder) to enable it. The text answer is kept.")
            yield Event("notice", turn.notes[-1])
            return
        yield Event("progress", "Generating the image…", 0.0)
        events: queue.SimpleQueue = queue.SimpleQueue()
        gone = threading.Event()

        def report(fraction, message=""):
            if gone.is_set() or self._cancel.is_set():
                raise _Stopped("stopped")
            events.put(("progress", fraction, message))

        def work():
            try:
                kw = dict(steps=options.steps, guidance=options.guidance, seed=options.image_seed,
                          width=options.width, height=options.height)
                if options.negative_prompt is not None:
                    kw["negative_prompt"] = options.negative_prompt
                events.put(("image", gen.generate(prompt, progress=report, **kw), ""))
            except BaseException as e:  # noqa: BLE001 - reported below
                events.put(("error", e, ""))

        worker = threading.Thread(target=work, daemon=True, name=f"mgm-sdxl-{self.id[:8]}")
        worker.start()
        try:
            while True:
                kind, value, msg = events.get()
                if kind != "progress":
                    break
                yield Event("progress", msg or "Generating the image…", float(value))
        except GeneratorExit:
            gone.set()  # the drawing stops at its next step; nobody waits for it
            raise
        worker.join()
        if kind == "image":
            turn.generated_image = value
            yield Event("image", prompt, value)
        elif self._cancel.is_set():
            turn.cancelled = True
            turn.notes.append("Image generation stopped; the text answer is kept.")
            yield Event("notice", turn.notes[-1])
        else:
            from ..imagegen import ImageGenError
            why = str(value) if isinstance(value, ImageGenError) else _explain(value)
            turn.notes.append(f"Image generation failed: {why} The text answer is kept.")
            yield Event("notice", turn.notes[-1])


class _ImageProblem(Exception):
    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def _as_list(images) -> list:
    """`images` as a list: one path / bytes / PIL image, or any iterable of them."""
    if images is None:
        return []
    if isinstance(images, (str, bytes, bytearray, os.PathLike)) or hasattr(images, "getpixel") \
            or hasattr(images, "read"):
        return [images]
    return list(images)


def _items(ids, images):
    """The prompt as cache units: ("t", id) for text, (image key, j) for the image's j-th visual token."""
    out, k = [], 0
    for i in ids:
        if i == IMAGE_TOKEN_INDEX:
            im = images[k]
            k += 1
            out.extend((im.key, j) for j in range(im.tokens.shape[0]))
        else:
            out.append(("t", i))
    return out


def _common_prefix(a, b, limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError))


def _free_memory(e: BaseException):
    if _is_oom(e) and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _explain(e: BaseException) -> str:
    if _is_oom(e):
        return ("The model ran out of memory on this turn. Your conversation is kept: try a shorter message, "
                "fewer images, or clear the chat.")
    return f"Something went wrong while answering ({type(e).__name__}: {e}). Your conversation is kept; try again."

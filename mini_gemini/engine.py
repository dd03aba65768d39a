"""Chat sessions over one loaded model: history, images, streaming, caches and image generation.

The CLI, the app and the API all talk to the model through `Engine` / `ChatSession`; nothing here
knows about Gradio. A turn streams `Event`s (notice, delta, progress, image, error, done).

Speed: every image is encoded once per session (tokens and mining maps kept with it), and the LLM's
KV cache is kept between turns: a follow-up re-uses the longest common prefix of the new prompt with
what the cache holds, so it only prefills its new tokens. Results never depend on the caches.
"""
from __future__ import annotations

import queue
import threading
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from .constants import GEN_TAG, IMAGE_PROMPT_CLOSE, IMAGE_PROMPT_OPEN, IMAGE_TOKEN_INDEX
from .images import ImageError, load_image
from .templates import Turn as PromptTurn
from .templates import build_prompt, tokenize

MAX_USER_CHARS = 16_000       # longer messages are cut (with a notice) before anything else
MAX_IMAGE_PROMPT_TOKENS = 77  # SDXL's text encoders read 77 tokens


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


@dataclass
class ImageEntry:
    key: str
    image: Any                 # PIL RGB
    tokens: torch.Tensor       # (V*N, D) visual tokens, on the model's device
    attn: torch.Tensor         # (V, N, P*P) mining weights, float32 on CPU
    notes: list[str] = field(default_factory=list)


@dataclass
class Turn:
    user: str
    images: list[ImageEntry] = field(default_factory=list)
    assistant: str | None = None
    token_ids: list[int] = field(default_factory=list)
    prompt: str = ""                  # the full prompt string given to the tokenizer
    want_image: bool = False
    image_prompt: str | None = None
    generated_image: Any = None       # PIL image from SDXL
    cancelled: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass
class Event:
    kind: str          # "notice" | "delta" | "progress" | "image" | "error" | "done"
    text: str = ""
    data: Any = None


def clean_text(text: str) -> str:
    """Drop control and format characters except newline and tab; keep every script and emoji."""
    text = (text or "").replace("\r\n", "\n").replace("\r", "\n")
    return "".join(c for c in text if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cs"))


class _Stop(StoppingCriteria):
    """Ends generation on cancel, or when the decoded tail holds one of `strings`."""

    def __init__(self, cancel: threading.Event, tokenizer=None, strings=(), start: int = 0):
        self.cancel, self.tok, self.strings, self.start = cancel, tokenizer, strings, start

    def __call__(self, input_ids, scores, **kwargs):
        done = self.cancel.is_set()
        if not done and self.strings:
            tail = self.tok.decode(input_ids[0, max(self.start, input_ids.shape[1] - 8):])
            done = any(s in tail for s in self.strings)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class Engine:
    """One model, many sessions. Generation is serialised by a lock; sessions are bounded (LRU)."""

    def __init__(self, model, image_generator=None, *, max_context: int | None = None,
                 max_sessions: int = 256, kv_sessions: int = 4, images_per_session: int = 16):
        self.model, self.imagegen = model, image_generator
        llm_ctx = getattr(model.config.llm, "max_position_embeddings", None) or 4096
        self.max_context = min(max_context or llm_ctx, llm_ctx)
        self.lock = threading.RLock()
        self.max_sessions, self.kv_sessions, self.images_per_session = max_sessions, kv_sessions, images_per_session
        self.sessions: OrderedDict[str, ChatSession] = OrderedDict()
        self._kv_owners: OrderedDict[str, None] = OrderedDict()
        tok = model.tokenizer
        self.stop_ids, self.stop_texts = self._stops(tok, model.template.stop_strings)

    @staticmethod
    def _stops(tok, strings):
        """Stop strings that are single tokens become eos ids (free in the decode loop); others stay text."""
        ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
        texts = []
        for s in strings:
            enc = tok.convert_tokens_to_ids(s) if s in tok.get_vocab() else None
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
        import uuid
        session_id = session_id or uuid.uuid4().hex
        with self.lock:
            s = self.sessions.pop(session_id, None) or ChatSession(self, session_id)
            self.sessions[session_id] = s
            while len(self.sessions) > self.max_sessions:
                _, old = self.sessions.popitem(last=False)
                old.close()
        return s

    def end_session(self, session_id: str):
        with self.lock:
            s = self.sessions.pop(session_id, None)
        if s is not None:
            s.close()

    def _keep_kv(self, session: "ChatSession"):
        with self.lock:
            self._kv_owners.pop(session.id, None)
            self._kv_owners[session.id] = None
            while len(self._kv_owners) > self.kv_sessions:
                sid, _ = self._kv_owners.popitem(last=False)
                if sid in self.sessions:
                    self.sessions[sid].kv = None

    # ---- model work (under the lock) ------------------------------------------------------------
    def encode(self, pil) -> tuple[torch.Tensor, torch.Tensor]:
        views = self.model.processor(pil)
        with self.lock:
            tokens, attn = self.model.encode_images(views.lr[None], views.hr[None])
        return tokens[0], attn[0].float().cpu()


class ChatSession:
    def __init__(self, engine: Engine, session_id: str):
        self.engine, self.id = engine, session_id
        self.turns: list[Turn] = []
        self.kv = None                  # (DynamicCache, items it covers)
        self.dropped = 0                # oldest turns left out of the prompt to fit the context
        self._cancel = threading.Event()

    # ---- history --------------------------------------------------------------------------------
    @property
    def images(self) -> list[ImageEntry]:
        return [im for t in self.turns for im in t.images]

    def cancel(self):
        self._cancel.set()

    def undo(self) -> Turn | None:
        return self.turns.pop() if self.turns else None

    def clear(self):
        self.turns, self.kv, self.dropped = [], None, 0

    def close(self):
        self.cancel()
        self.clear()

    # ---- a turn ---------------------------------------------------------------------------------
    def chat(self, text: str, images=(), *, generate_image: bool = False,
             options: GenOptions | None = None) -> Iterator[Event]:
        """Add a user turn (text and any images) and stream the answer."""
        options = options or GenOptions()
        text = clean_text(text)
        if not text.strip() and not images:
            return  # nothing to answer
        if len(text) > MAX_USER_CHARS:
            text = text[:MAX_USER_CHARS]
            yield Event("notice", f"Your message was cut to its first {MAX_USER_CHARS:,} characters.")
        entries = []
        try:
            if len(self.images) + len(images) > self.engine.images_per_session:
                raise ImageError(f"This conversation can hold at most {self.engine.images_per_session} "
                                 "images; clear it to start a new one.", "too_many")
            budget = self.engine.max_context - 64
            if (len(self.images) + len(images)) * self.engine.tokens_per_image > budget:
                raise ImageError(f"Too many images for the model's context: each takes "
                                 f"{self.engine.tokens_per_image} tokens of {self.engine.max_context}. "
                                 "Send fewer images or clear the conversation.", "too_many")
            for src in images:
                entries.append(self._image(src))
        except ImageError as e:
            yield Event("error", str(e))
            return
        for im in entries:
            for note in im.notes:
                yield Event("notice", f"Image {len(self.images) + entries.index(im) + 1}: {note}.")
        turn = Turn(user=text, images=entries, want_image=generate_image)
        self.turns.append(turn)
        yield from self._respond(turn, options)

    def regenerate(self, options: GenOptions | None = None) -> Iterator[Event]:
        """Answer the last user turn again (a new sample when temperature > 0)."""
        if not self.turns:
            return
        turn = self.turns[-1]
        turn.assistant, turn.token_ids, turn.cancelled = None, [], False
        turn.image_prompt = turn.generated_image = None
        turn.notes = []
        yield from self._respond(turn, options or GenOptions())

    def _image(self, src) -> ImageEntry:
        loaded = load_image(src)
        for im in self.images:  # the same picture again: reuse its encoding
            if im.key == loaded.key:
                return ImageEntry(im.key, im.image, im.tokens, im.attn, loaded.notes)
        tokens, attn = self.engine.encode(loaded.image)
        return ImageEntry(loaded.key, loaded.image, tokens, attn, loaded.notes)

    # ---- prompt ---------------------------------------------------------------------------------
    def _prompt(self, turns: list[Turn]):
        tpl = self.engine.model.template
        pturns = [PromptTurn(t.user + (GEN_TAG if t.want_image else ""), len(t.images), t.assistant)
                  for t in turns]
        prompt = build_prompt(tpl, pturns)
        ids = tokenize(prompt, self.engine.model.tokenizer)
        images = [im for t in turns for im in t.images]
        return prompt, ids, images

    def _fit(self, turn: Turn, options: GenOptions):
        """Drop the oldest turns (and if need be cut the message) until prompt + answer fit the context."""
        ctx, per_image = self.engine.max_context, self.engine.tokens_per_image
        notices = []
        first = 0
        while True:
            prompt, ids, images = self._prompt(self.turns[first:])
            length = len(ids) + len(images) * (per_image - 1)
            room = ctx - length
            if room >= min(options.max_new_tokens, 128) or first == len(self.turns) - 1:
                break
            first += 1
        if room < 16 and turn.user:  # the message alone is too long: cut it to fit
            keep = max(0, int(len(turn.user) * (length - (ctx - min(options.max_new_tokens, 128))) / max(length, 1)))
            turn.user = turn.user[:max(0, len(turn.user) - keep - 16)]
            notices.append(f"Your message was shortened to {len(turn.user):,} characters to fit the model's "
                           f"context of {ctx} tokens.")
            prompt, ids, images = self._prompt(self.turns[first:])
            length = len(ids) + len(images) * (per_image - 1)
            room = ctx - length
        if room < 1:
            raise ValueError("This message does not fit the model's context even alone; shorten it or send "
                             "fewer images.")
        if first > self.dropped:
            notices.append(f"The conversation outgrew the model's context ({ctx} tokens): the "
                           f"{first} oldest turn(s) are no longer seen by the model.")
        self.dropped = first
        return prompt, ids, images, min(options.max_new_tokens, room), notices

    # ---- generation -----------------------------------------------------------------------------
    def _respond(self, turn: Turn, options: GenOptions) -> Iterator[Event]:
        self._cancel.clear()
        try:
            prompt, ids, images, max_new, notices = self._fit(turn, options)
        except ValueError as e:
            self.turns.remove(turn)
            yield Event("error", str(e))
            return
        for n in notices:
            turn.notes.append(n)
            yield Event("notice", n)
        turn.prompt = prompt.text
        text = ""
        try:
            for kind, value in self._generate(ids, images, options, max_new):
                if kind == "delta":
                    text += value
                    yield Event("delta", value)
                else:
                    turn.token_ids = value
        except Exception as e:  # noqa: BLE001 — any failure must leave the history usable
            self.kv = None
            self.turns.remove(turn)
            yield Event("error", _explain(e))
            return
        finally:
            if turn in self.turns and turn.assistant is None:  # also when the consumer went away
                turn.assistant = text.strip()
                turn.cancelled = self._cancel.is_set()
        turn.assistant = self._decode(turn.token_ids)
        if self._cancel.is_set():
            turn.cancelled = True
            turn.notes.append("stopped")
            yield Event("notice", "Stopped; the partial answer is kept.")
        if turn.want_image and not turn.cancelled:
            yield from self._image_generation(turn, ids, images, options)
        yield Event("done", data=turn)

    def _decode(self, token_ids) -> str:
        return self.engine.model.tokenizer.decode(token_ids, skip_special_tokens=True).strip()

    def _generate(self, ids, images, options: GenOptions, max_new: int, *, stop_texts=None,
                  min_new: int = 0, bad_ids=None):
        """Run the LLM in a worker thread; yields ("delta", text) pieces then ("ids", new token ids)."""
        eng = self.engine
        model, tok = eng.model, eng.model.tokenizer
        items = _items(ids, images)
        result: dict = {}
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        stops = stop_texts if stop_texts is not None else eng.stop_texts

        def work():
            try:
                with eng.lock, torch.no_grad():
                    embeds = model.embed(ids, [im.tokens for im in images])
                    cache, covered = self.kv if self.kv is not None else (None, [])
                    reuse = _common_prefix(covered, items, embeds.shape[1] - 1)
                    if cache is None or reuse == 0:
                        cache = DynamicCache(config=model.config.llm)
                    elif cache.get_seq_length() > reuse:
                        cache.crop(reuse - cache.get_seq_length())
                    if options.seed is not None:
                        torch.manual_seed(options.seed)
                    sampling = dict(do_sample=True, temperature=options.temperature, top_p=options.top_p) \
                        if options.temperature > 0 else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
                    out = model.llm.generate(
                        inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long,
                                                                        device=embeds.device),
                        cache=cache, max_new_tokens=max_new, min_new_tokens=min_new or None,
                        eos_token_id=eng.stop_ids or None,
                        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                        streamer=streamer, bad_words_ids=bad_ids,
                        stopping_criteria=StoppingCriteriaList([_Stop(self._cancel, tok, stops)]), **sampling)
                    new = out[0].tolist()
                    covered_items = items + [("t", t) for t in new]
                    self.kv = (cache, covered_items[:cache.get_seq_length()])
                    eng._keep_kv(self)
                    result["ids"] = new
            except BaseException as e:  # noqa: BLE001 — reported to the consumer below
                result["error"] = e
            finally:
                streamer.end()

        worker = threading.Thread(target=work, daemon=True, name=f"generate-{self.id[:8]}")
        worker.start()
        finished = False
        try:
            for piece in streamer:
                if piece:
                    yield "delta", piece
            finished = True
        finally:
            if not finished:
                self._cancel.set()  # the consumer went away (client disconnected): stop the model
            worker.join()
        if "error" in result:
            raise result["error"]
        ids_out = result["ids"]
        while ids_out and ids_out[-1] in eng.stop_ids:
            ids_out = ids_out[:-1]
        yield "ids", ids_out

    def _image_generation(self, turn: Turn, ids, images, options: GenOptions) -> Iterator[Event]:
        from .imagegen import ImageGenError, extract_image_prompt
        prompt = extract_image_prompt(turn.assistant)
        if prompt is None:
            # The model wrote no <h>...</h>: continue its answer from a forced "<h>" so the LLM itself
            # writes the image prompt (small checkpoints often skip the tag).
            tok = self.engine.model.tokenizer
            opener = tok(IMAGE_PROMPT_OPEN, add_special_tokens=False).input_ids
            cont_ids = ids + turn.token_ids + opener
            bad = [[i] for i in sorted(set(tok.all_special_ids))] or None
            new = []
            try:
                for kind, value in self._generate(cont_ids, images, GenOptions(temperature=0.0), MAX_IMAGE_PROMPT_TOKENS,
                                                  stop_texts=(IMAGE_PROMPT_CLOSE,), min_new=2, bad_ids=bad):
                    if kind == "ids":
                        new = value
            except Exception as e:  # noqa: BLE001
                turn.notes.append(f"Could not write an image prompt: {_explain(e)}")
                yield Event("notice", turn.notes[-1])
                return
            written = tok.decode(new, skip_special_tokens=True).split(IMAGE_PROMPT_CLOSE)[0].strip()
            if not written:
                written = turn.user.strip()
                turn.notes.append("The model wrote no image prompt; your message was used instead.")
                yield Event("notice", turn.notes[-1])
            turn.token_ids = turn.token_ids + opener + new
            turn.assistant = (turn.assistant + " " if turn.assistant else "") + \
                f"{IMAGE_PROMPT_OPEN}{written}{IMAGE_PROMPT_CLOSE}"
            prompt = written
        turn.image_prompt = prompt
        gen = self.engine.imagegen
        if gen is None:
            turn.notes.append("Image generation is not available here: start with --sdxl MODEL (a hub id or a "
                              "local folder) to enable it. The text answer is kept.")
            yield Event("notice", turn.notes[-1])
            return
        yield Event("progress", "Generating the image…", 0.0)
        events: queue.Queue = queue.Queue()

        def work():
            try:
                kw = dict(steps=options.steps, guidance=options.guidance, seed=options.image_seed,
                          width=options.width, height=options.height)
                if options.negative_prompt is not None:
                    kw["negative_prompt"] = options.negative_prompt
                img = gen.generate(prompt, progress=lambda f, m="": events.put(("progress", f, m)), **kw)
                events.put(("image", img, None))
            except BaseException as e:  # noqa: BLE001
                events.put(("error", e, None))

        worker = threading.Thread(target=work, daemon=True, name=f"sdxl-{self.id[:8]}")
        worker.start()
        while True:
            kind, value, msg = events.get()
            if kind == "progress":
                yield Event("progress", msg or "Generating the image…", float(value))
                continue
            if kind == "image":
                turn.generated_image = value
                yield Event("image", prompt, value)
            else:
                why = str(value) if isinstance(value, ImageGenError) else _explain(value)
                turn.notes.append(f"Image generation failed: {why} The text answer is kept.")
                yield Event("notice", turn.notes[-1])
            break
        worker.join()


def _items(ids, images):
    """The prompt as cache units: ("t", id) for text, (image key, n tokens) for an image slot."""
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


def _explain(e: BaseException) -> str:
    if isinstance(e, torch.OutOfMemoryError) or isinstance(e, MemoryError):
        return ("The model ran out of memory on this turn. Your conversation is kept: try a shorter message, "
                "fewer images, or clear the chat.")
    return f"Something went wrong while answering ({type(e).__name__}: {e}). Your conversation is kept; try again."

"""Chat sessions over one loaded model: history, images, streaming, caches and image generation.

The CLI, the app and the API all talk to the model through `Engine` / `ChatSession`; nothing here
knows about Gradio. A turn streams `Event`s (notice, delta, progress, image, error, done):

    engine = Engine(model, ImageGenerator(...))          # the generator is optional
    session = engine.session("some-id")
    for ev in session.chat("What is this?", ["photo.jpg"], options=GenOptions(temperature=0)):
        ...                                               # ev.kind, ev.text, ev.data

Speed: every image is encoded once per session (tokens and mining maps kept with it), and the LLM's
KV cache is kept between turns: a follow-up re-uses the longest common prefix of its prompt with what
the cache holds, so it only prefills its new tokens. Results never depend on the caches.

Many conversations at once: the engine's scheduler (chat/scheduler.py) owns the LLM; every answer being
written advances one token per round, all of them in one batched forward, newcomers' prompts prefilled in
the next round; at most `max_active` answers at once (each with its KV cache), more wait in a queue and are
told their place. Text is decoded by each consumer, not by the scheduler.

Locks (always taken in this order, never the other way round): a session's turn lock (one turn at a
time per conversation) -> the engine's compute lock (one model run: an image encoding, one scheduler round,
or a whole `generate` on the fallback path) -> the scheduler's queue lock -> the engine's state lock
(session and cache bookkeeping, held for microseconds). The tokenizer has its own lock: transformers'
fast tokenizers switch backend state per call, which is not safe across threads.
"""
from __future__ import annotations

import re
import threading
import uuid
from collections import OrderedDict

import torch

from .session import ChatSession
from .templates import Turn as PromptTurn
from .templates import build_prompt, tokenize
from .types import MAX_USER_CHARS, Event, GenOptions, ImageEntry, Note, Turn, clean_text  # noqa: F401 - public

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")           # sentencepiece byte-fallback tokens


class Engine:
    """One model, many sessions (conversations). Sessions and KV caches are bounded (least recently used
    ones are dropped, with a notice on their next turn).

    Args:
        model: a `MiniGemini` with its `.processor` (as `load_pretrained` returns it).
        image_generator: an `ImageGenerator` (SDXL) for turns that ask for an image, or None.
        max_context: tokens the model may see (default and upper bound: the LLM's max_position_embeddings).
        max_sessions: conversations kept; kv_sessions: conversations that keep a KV cache between turns;
        images_per_session: images one conversation may hold.

    Use `session(id)` for a conversation, `end_session(id)` to free one, `cancel(id)` to stop its turn.
    """

    #: The OCR reader for GenOptions.ocr (inputs.ocr.OcrReader or anything with `read(pil) -> OcrResult`);
    #: None: the process-wide default (`inputs.ocr.get_reader()`, models loaded once, on first use).
    ocr_reader = None

    def __init__(self, model, image_generator=None, *, max_context: int | None = None,
                 max_sessions: int = 256, kv_sessions: int = 4, images_per_session: int = 16,
                 llm_server=None, max_active: int = 8):
        self.model, self.imagegen = model, image_generator
        llm_ctx = getattr(model.config.llm, "max_position_embeddings", None) or 4096
        self.max_context = min(max_context or llm_ctx, llm_ctx)
        # llm_server: URL of a vLLM server that runs the LLM (see chat/remote.py); None: the built-in engine
        self.llm_server = None
        if llm_server:
            from .remote import LLMServer
            self.llm_server = llm_server if isinstance(llm_server, LLMServer) else LLMServer(str(llm_server))
            try:
                self.llm_server.model()
                if self.llm_server.max_model_len:
                    self.max_context = min(self.max_context, int(self.llm_server.max_model_len))
            except Exception:  # noqa: BLE001 - not up yet: asked again on the first answer
                pass
        elif getattr(model, "llm_layers", True) is False:
            raise ValueError("This model was loaded without its LLM layers (load_pretrained(llm_layers=False)); "
                             "give the engine the LLM server that runs them (llm_server=URL).")
        self.max_sessions, self.kv_sessions = max(1, max_sessions), max(0, kv_sessions)
        self.images_per_session = images_per_session
        self.sessions: OrderedDict[str, ChatSession] = OrderedDict()
        self._kv_owners: OrderedDict[str, None] = OrderedDict()
        # ids the LRU dropped (bounded): a caller that looks its session up by id is told it expired
        self._expired_ids: OrderedDict[str, None] = OrderedDict()
        self._compute = threading.Lock()     # one model run (encode / a scheduler round / generate) at a time
        # built-in engine: at most `max_active` answers are written at once, one token each per scheduler round
        # (chat/scheduler.py); more wait in a queue. 0: one whole answer at a time, as `generate` writes it.
        self.max_active = max(0, int(max_active))
        self._scheduler = None
        self._encoders = 0                   # image encodings waiting for the model (the scheduler yields to them)
        self._state = threading.Lock()       # sessions and KV bookkeeping; never held while waiting
        self._tok_lock = threading.RLock()   # the tokenizer is not thread safe
        tok = model.processor.tokenizer
        self.stop_ids, self.stop_texts = self._stops(tok, model.processor.template.stop_strings)
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

    def has_session(self, session_id: str) -> bool:
        """Whether a conversation with this id is held (not ended, not dropped by the LRU)."""
        with self._state:
            return session_id in self.sessions

    def cancel(self, session_id: str) -> bool:
        """Stop the turn running in this conversation, if any (the partial answer is kept). Returns whether
        the conversation exists; never creates one."""
        with self._state:
            s = self.sessions.get(session_id)
        if s is not None:
            s.cancel()
        return s is not None

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
    def start_run(self, session: "ChatSession", ids, images, options, max_new: int, **kw):
        """The LLM run of one answer (iterate it for text deltas; then .ids / .text / .cached; .abort()):
        on the vLLM server when the engine has `llm_server`, else the built-in one."""
        if self.llm_server is not None:
            from .remote import RemoteRun
            return RemoteRun(session, ids, images, options, max_new, **kw)
        from .generation import LLMRun
        return LLMRun(session, ids, images, options, max_new, **kw)

    def _scheduler_for(self, run):
        """The scheduler that serves `run` (created on first use), or None when the run must use `generate`
        itself: the engine has max_active=0, the LLM instance carries a custom `generate` (a wrapper, a test's
        fault injection) or the run asks for generate options the scheduler does not implement."""
        if self.max_active <= 0 or "generate" in vars(self.model.llm) or set(run.extra) - {"suppress_tokens"}:
            return None
        with self._state:
            if self._scheduler is None:
                from .scheduler import Scheduler
                self._scheduler = Scheduler(self, self.max_active)
            return self._scheduler

    def encode(self, pil) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One image -> (visual tokens (V*N, D), mining weights (V, N, P*P) and gain (V, N), float32 CPU).
        Takes the model between two scheduler rounds (answers being written pause for one encoding)."""
        views = self.model.processor.image_processor(pil)
        with self._state:
            self._encoders += 1
        try:
            with self._compute, torch.no_grad():
                enc = self.model.encode_images(views.pixel_values[None], views.pixel_values_aux[None])
        finally:
            with self._state:
                self._encoders -= 1
        return enc.image_features[0], enc.attn[0].float().cpu(), enc.gain[0].float().cpu()

    def build_prompt(self, turns: list[PromptTurn]):
        """(Prompt, token ids) for prompt turns, under the tokenizer lock."""
        with self._tok_lock:
            prompt = build_prompt(self.model.processor.template, turns)
            return prompt, tokenize(prompt, self.model.processor.tokenizer)

    # ---- OCR (runs on its own lock, never under the compute lock) -------------------------------
    def ocr_unavailable_reason(self) -> str | None:
        """None when GenOptions.ocr can work here; otherwise a user-facing sentence with the install line."""
        if self.ocr_reader is not None:
            return None
        from ..inputs.ocr import ocr_unavailable_reason
        return ocr_unavailable_reason()

    def read_text(self, pil):
        """The text lines in one image: an `inputs.ocr.OcrResult` (boxes in pixels of `pil`, seconds taken).
        Raises inputs.ocr.OcrUnavailable when the OCR extra is not installed."""
        reader = self.ocr_reader
        if reader is None:
            from ..inputs.ocr import get_reader
            reader = get_reader()
        return reader.read(pil)


"""Chat sessions over one loaded model: history, images, streaming, caches and image generation.

The CLI, the app and the API all talk to the model through `Engine` / `ChatSession`; nothing here knows about
Gradio. A turn streams `Event`s (notice, delta, progress, image, error, done):

    engine = Engine(model, ImageGenerator(...))          # the generator is optional
    session = engine.session("some-id")
    for ev in session.chat("What is this?", ["photo.jpg"], options=GenOptions(temperature=0)):
        ...                                               # ev.kind, ev.text, ev.data

The engine is made of parts that each own one piece of state:

- `runner` (`ModelRunner`): the model and its lock; image encoding, embedding, the packed forward;
- `detokenizer` (`Detokenizer`): the tokenizer behind its lock, stop ids and texts;
- `kv_store` (`KVStore`): the KV caches kept between answers (a follow-up prefills only its new tokens);
- `scheduler` (`Scheduler`, or `SerialScheduler` with max_active=0): who writes the answers;
- `sessions` (`SessionTable`): the conversations held;
- `llm_server` (`LLMServer`): the LLM on a vLLM server instead of the built-in one, when given.

Results never depend on the caches. Locks are always taken in this order: a session's turn lock -> the runner's
lock -> bookkeeping locks (sessions, caches, queue), held for microseconds.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future

from ..inputs.images import LoadedImage
from .detokenizer import Detokenizer
from .kv_store import KVStore
from .run import LocalRun, Request, Run
from .runner import EncodedImage, ModelRunner
from .scheduler import Scheduler, SerialScheduler
from .session import ChatSession
from .session_table import SessionTable
from .types import MAX_USER_CHARS, Event, GenOptions, ImageEntry, Note, Turn, clean_text  # noqa: F401 - public

RECENT_IMAGES = 32   # encoded pictures kept for any conversation (a stateless API resends its images every turn)
RECENT_ATTRIBUTIONS = 4  # answer attributions kept (each holds HR maps: answer tokens x views x (side*P)^2 floats)
# how the note on an image prompt of a model not trained to write them begins (first showing, later ones)
IMAGE_PROMPT_NOTES = ("This small demo model was never trained to write image prompts",
                      "An image prompt from the demo model")


class Engine:
    """One model, many sessions (conversations). Sessions and KV caches are bounded (least recently used
    ones are dropped, with a notice on their next turn).

    Args:
        model: a `MiniGemini` with its `.processor` (as `load_pretrained` returns it).
        image_generator: an `ImageGenerator` (SDXL) for turns that ask for an image, or None.
        max_context: tokens the model may see (default and upper bound: the LLM's max_position_embeddings).
        max_sessions: conversations kept; kv_sessions: conversations that keep a KV cache between turns;
        images_per_session: images one conversation may hold.
        llm_server: URL (or `LLMServer`) of a vLLM server that runs the LLM (see chat/remote.py).
        max_active: answers written at once by the batching scheduler (more wait in a queue); 0: one whole
            answer at a time with the LLM's own `generate`.
        anonymous_caches: KV caches kept for requests that belong to no conversation (a stateless API), reused
            by the longest common prefix of their prompts.

    Use `session(id)` for a conversation, `end_session(id)` to free one, `cancel(id)` to stop its turn.
    """

    #: The OCR reader for GenOptions.ocr (inputs.ocr.OcrReader or anything with `read(pil) -> OcrResult`);
    #: None: the process-wide default (`inputs.ocr.get_reader()`, models loaded once, on first use).
    ocr_reader = None

    def __init__(self, model, image_generator=None, *, max_context: int | None = None,
                 max_sessions: int = 256, kv_sessions: int = 4, images_per_session: int = 16,
                 llm_server=None, max_active: int = 8, anonymous_caches: int = 4):
        self.model, self.imagegen = model, image_generator
        llm_ctx = getattr(model.config.llm, "max_position_embeddings", None) or 4096
        self.max_context = min(max_context or llm_ctx, llm_ctx)
        self.llm_server = None
        if llm_server:
            from .remote import LLMServer
            self.llm_server = llm_server if isinstance(llm_server, LLMServer) else LLMServer(str(llm_server))
            try:
                self.llm_server.model()
                if self.llm_server.max_model_len:
                    self.limit_context(int(self.llm_server.max_model_len))
            except Exception:  # noqa: BLE001 - not up yet: asked again on the first answer
                pass
        elif getattr(model, "llm_layers", True) is False:
            raise ValueError("This model was loaded without its LLM layers (load_pretrained(llm_layers=False)); "
                             "give the engine the LLM server that runs them (llm_server=URL).")
        self.images_per_session = images_per_session
        self.max_active = max(0, int(max_active))
        self.runner = ModelRunner(model)
        self.detokenizer = Detokenizer(model.processor)
        self.kv_store = KVStore(kv_sessions, anonymous=anonymous_caches)
        self.scheduler = Scheduler(self.runner, self.kv_store, self.detokenizer.stop_ids, self.max_active) \
            if self.max_active else SerialScheduler(self.runner, self.kv_store, self.detokenizer.stop_ids,
                                                    self.detokenizer.pad_id)
        self.sessions: SessionTable[ChatSession] = SessionTable(
            max_sessions, lambda sid, expired: ChatSession(self, sid, expired=expired))
        self.task_scope = model.config.task_scope
        self._recent: OrderedDict[str, EncodedImage] = OrderedDict()   # image key -> its encoding
        self._encoding: dict[str, Future] = {}                         # image key -> its encoding under way
        self._attributions: OrderedDict = OrderedDict()                # (session, turn, ...) -> Attribution
        self._in_scope: OrderedDict[str, bool] = OrderedDict()         # image key -> like the task's pictures
        self._lock = threading.Lock()

    @property
    def tokens_per_image(self) -> int:
        return self.model.config.views * self.model.config.tokens_per_view

    def limit_context(self, tokens: int) -> None:
        """Lower the context the model may see (e.g. to an LLM server's max_model_len)."""
        self.max_context = min(self.max_context, int(tokens))

    # ---- sessions -------------------------------------------------------------------------------
    def session(self, session_id: str | None = None) -> ChatSession:
        """The session with this id (created on first use); the least recently used ones are dropped."""
        s, evicted = self.sessions.get(session_id)
        for old in evicted:  # outside the table's lock: closing may wait for nothing, but touches caches
            old.close(expired=True)
        return s

    def stateless_session(self, turns: list[Turn] = ()) -> ChatSession:
        """A conversation for one request of a stateless API (the OpenAI endpoint): it starts with `turns` (the
        history the client sent, images encoded through `encode_image`), is not held by the engine, and its
        answers continue whichever kept KV cache shares the longest prefix with their prompt (`anonymous_caches`
        of them are kept), so a follow-up that resends its conversation prefills only its new tokens."""
        s = ChatSession(self, "stateless", stateless=True)
        s.adopt(list(turns))
        return s

    def has_session(self, session_id: str) -> bool:
        """Whether a conversation with this id is held (not ended, not dropped by the LRU)."""
        return self.sessions.lookup(session_id) is not None

    def cancel(self, session_id: str) -> bool:
        """Stop the turn running in this conversation, if any (the partial answer is kept). Returns whether
        the conversation exists; never creates one."""
        s = self.sessions.lookup(session_id)
        if s is not None:
            s.cancel()
        return s is not None

    def end_session(self, session_id: str):
        """Forget a session: its history, images and KV cache are released."""
        s = self.sessions.remove(session_id)
        if s is not None:
            s.close()

    def touch(self, session: ChatSession) -> None:
        """A turn starts on `session`: mark it used (held again if it had been dropped and its id is free)."""
        for old in self.sessions.touch(session.id, session):
            old.close(expired=True)

    # ---- model work -----------------------------------------------------------------------------
    def start_run(self, request: Request, cancel: threading.Event) -> Run:
        """The run that writes the answer to `request` (iterate it for text deltas): on the LLM server when the
        engine has one, else the built-in scheduler. `cancel`: the conversation's Stop button."""
        if self.llm_server is not None:
            from .remote import RemoteRun
            gen_cfg = getattr(self.model.llm, "generation_config", None)
            return RemoteRun(request, self.detokenizer, cancel, self.llm_server, self.runner.embed,
                             self.detokenizer.stop_ids, top_k=getattr(gen_cfg, "top_k", None),
                             on_max_model_len=self.limit_context)
        return LocalRun(request, self.detokenizer, cancel, self.scheduler)

    def encode_image(self, image: LoadedImage) -> EncodedImage:
        """A decoded picture's visual tokens and mining maps. Recent pictures (by content hash) are not encoded
        again, whichever conversation sent them, and a picture being encoded for one conversation is waited for
        by another that sends it at the same time (one encoding, not several).

        Raises:
            whatever the encoding raises (e.g. out of memory); a waiting conversation gets the same error.
        """
        if not image.key:
            return self.runner.encode(image.image)
        with self._lock:
            hit = self._recent.get(image.key)
            if hit is not None:
                self._recent.move_to_end(image.key)
                return hit
            pending = self._encoding.get(image.key)
            mine = pending is None
            if mine:
                pending = self._encoding[image.key] = Future()
        if not mine:
            return pending.result()
        try:
            enc = self.runner.encode(image.image)
        except BaseException as e:
            with self._lock:
                del self._encoding[image.key]
            pending.set_exception(e)
            raise
        with self._lock:
            self._recent[image.key] = enc
            while len(self._recent) > RECENT_IMAGES:
                self._recent.popitem(last=False)
            del self._encoding[image.key]
        pending.set_result(enc)
        return enc

    def attribution(self, key, compute):
        """The attribution cached under `key`, or `compute()`'s (kept: the RECENT_ATTRIBUTIONS last ones); with
        `compute` None, the cached one or None."""
        with self._lock:
            hit = self._attributions.get(key)
            if hit is not None:
                self._attributions.move_to_end(key)
                return hit
        if compute is None:
            return None
        result = compute()
        with self._lock:
            self._attributions[key] = result
            while len(self._attributions) > RECENT_ATTRIBUTIONS:
                self._attributions.popitem(last=False)
        return result

    def build_prompt(self, turns, first_image: int = 1):
        """(Prompt, token ids) for `PromptTurn`s (see `modeling.chat_template.build_prompt`)."""
        return self.detokenizer.prompt(turns, first_image)

    # ---- what the model knows ---------------------------------------------------------------------
    def task_notes(self, turns: list[Turn]) -> list[Note]:
        """Notes for the answer to turns[-1] when the model declares a task (`MGMConfig.task_scope`, e.g. the
        bundled demo model) and the question or a picture in view is outside it, or the turn asked for an image
        from a model that declares it was not trained to write image prompts. The first such note of each kind
        in a conversation says what the model knows and how to get a real one; later ones are short."""
        scope = self.task_scope
        if scope is None or not turns:
            return []
        turn = turns[-1]
        earlier = [n for t in turns[:-1] for n in t.notes if getattr(n, "kind", None) == "task"]
        notes = []
        if turn.want_image and not scope.image_prompts:  # its image prompt is no description of anything
            if any(n.startswith(IMAGE_PROMPT_NOTES) for n in earlier):
                notes.append(Note("task", IMAGE_PROMPT_NOTES[1] + " again: it means nothing, nor does its picture."))
            else:
                notes.append(Note("task", IMAGE_PROMPT_NOTES[0] + ": the image prompt it wrote describes nothing, "
                                          "and the picture drawn from it means nothing. For real image prompts, load "
                                          "a real checkpoint, e.g. `--model YanweiLi/MGM-2B`."))
        start = turn.window_start
        pictures = [im for t in turns[start:] for im in t.images]
        if scope.covers_question(turn.user) and all(self._picture_in_scope(im) for im in pictures):
            return notes
        told = any(not n.startswith(IMAGE_PROMPT_NOTES) for n in earlier)
        if told:
            return [Note("task", "Outside the demo model's task again: this answer means nothing.")] + notes
        return [Note("task", "This is a small demo model: it only knows " + scope.summary + ". This question or "
                             "picture is outside that, so the answer means nothing. To ask about your own photos, "
                             "load a real checkpoint, e.g. `--model YanweiLi/MGM-2B` (downloaded on first use; "
                             "offline, the folder of a copy fetched before with `hf download YanweiLi/MGM-2B`).")] + notes

    def _picture_in_scope(self, im: ImageEntry) -> bool:
        with self._lock:
            known = self._in_scope.get(im.key)
        if known is None:
            known = self.task_scope.covers_picture(im.image)
            with self._lock:
                self._in_scope[im.key] = known
                while len(self._in_scope) > 4 * RECENT_IMAGES:
                    self._in_scope.popitem(last=False)
        return known

    # ---- OCR (never under the model's lock) ---------------------------------------------------------
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

"""One LLM run: served by the engine's scheduler (chat/scheduler.py; or, as a fallback, `generate` in a
worker thread), token ids streamed, text decoded incrementally by the consumer, KV reuse.

The scheduler (or `generate`'s streamer) only queues token ids; text is decoded by the consumer. A
session's KV cache is reused by the longest common prefix of the new prompt with what the cache holds
(`items`), so a follow-up only prefills its new tokens; results never depend on the cache.
"""
from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Iterator

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from ..constants import IMAGE_TOKEN_INDEX
from ..modeling.model import sampling_kwargs
from .types import GenOptions, ImageEntry

if TYPE_CHECKING:
    from .session import ChatSession


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
                ids.extend(item if isinstance(item, list) else item.reshape(-1).tolist())
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


class AnswerText:
    """Token ids -> the answer's text, shared by every kind of LLM run (built-in or remote).

    `feed(ids)` takes new ids as they come and returns the text to show now (incremental detokenisation, as
    vLLM does it: a short window decoded from a little before the new tokens, ending where the text is final,
    i.e. not inside a run of byte-fallback tokens nor on half a character); `hit` turns true once a stop text
    was written (the run should then stop its model). `settle(ids)` gives the final (ids, text): trailing stop
    ids dropped, text cut at a stop text and ids cut to the token that completed it. `rest(text)` is what the
    stream still owes once the final text is known. `anchor`: ids the answer continues (decoded with it, so
    that e.g. a word's leading space survives)."""

    def __init__(self, engine, stop_texts=(), lstrip: bool = True, anchor=()):
        self.engine, self.stop_texts, self.lstrip = engine, tuple(stop_texts), lstrip
        self.anchor = list(anchor)[-8:]
        while self.anchor and self.anchor[0] in engine.byte_ids:  # never start inside a byte run
            self.anchor.pop(0)
        self.hit = False
        self._ids: list[int] = list(self.anchor)
        self._prefix, self._read = 0, len(self._ids)
        self._raw, self._out = "", ""    # raw: text decoded so far; out: text handed out so far

    def feed(self, chunk) -> str:
        eng = self.engine
        tok = eng.model.processor.tokenizer
        ids = self._ids
        ids += chunk
        end = len(ids)
        while end > self._read and ids[end - 1] in eng.byte_ids:
            end -= 1
        if end <= self._read:
            return ""
        with eng._tok_lock:
            before = tok.decode(ids[self._prefix:self._read], skip_special_tokens=True)
            now = tok.decode(ids[self._prefix:end], skip_special_tokens=True)
        if len(now) <= len(before) or now.endswith("\ufffd"):  # nothing new, or half a character
            return ""
        self._raw += now[len(before):]
        self._prefix, self._read = self._read, end
        text, hit = self.visible(self._raw, final=False)
        self.hit = self.hit or hit
        if len(text) > len(self._out):
            delta, self._out = text[len(self._out):], text
            return delta
        return ""

    def deltas(self, chunks, halt: threading.Event) -> Iterator[str]:
        """The text to show as token-id chunks arrive; `halt` is set once a stop text was written."""
        for chunk in chunks:
            delta = self.feed(chunk)
            if self.hit:
                halt.set()
            if delta:
                yield delta

    def rest(self, text: str) -> Iterator[str]:
        if len(text) > len(self._out) and text.startswith(self._out):
            yield text[len(self._out):]
            self._out = text

    def visible(self, raw: str, final: bool) -> tuple[str, bool]:
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

    def settle(self, new_ids) -> tuple[list[int], str]:
        eng = self.engine
        tok = eng.model.processor.tokenizer
        ids = list(new_ids)
        while ids and ids[-1] in eng.stop_ids:
            ids.pop()
        with eng._tok_lock:
            base = tok.decode(self.anchor, skip_special_tokens=True)

            def decode(new):
                full = tok.decode(self.anchor + new, skip_special_tokens=True)
                return full[len(base):] if full.startswith(base) else tok.decode(new, skip_special_tokens=True)
            text, hit = self.visible(decode(ids), final=True)
            if hit:  # keep the ids up to the stop text (the model may have run a step or two past it)
                for k in range(1, len(ids) + 1):
                    if self.visible(decode(ids[:k]), final=True)[1]:
                        ids = ids[:k]
                        break
        return ids, text


class LLMRun:
    """One answer of the built-in engine. Iterate it for text deltas; then `ids` and `text` hold the answer.
    `abort()` stops the model and waits for it (at most one decoding step).

    It is served by the engine's scheduler (chat/scheduler.py: every active answer advances one token per
    round, batched with the others). While all places are taken, the iteration first yields one
    `Event("notice", Note("queue", ...))` saying how many conversations wait ahead; everything else it
    yields is text. A custom `generate` installed on the LLM instance (a wrapper, a test's fault injection),
    generate options the scheduler does not know (`extra` beyond suppress_tokens), or `Engine(max_active=0)`
    run the answer as before instead: one `llm.generate` in a worker thread, under the engine's model lock.
    """

    def __init__(self, session: ChatSession, ids: list[int], images: list[ImageEntry], options: GenOptions,
                 max_new: int, *, stop_texts: tuple[str, ...] = (), extra: dict | None = None,
                 lstrip: bool = True, anchor: list[int] = ()):
        self.session, self.engine = session, session.engine
        self.prompt_ids, self.images, self.options, self.max_new = ids, images, options, max_new
        self.items = items(ids, images)
        self.stop_texts, self.extra, self.lstrip = tuple(stop_texts), extra or {}, lstrip
        self.answer = AnswerText(session.engine, stop_texts, lstrip, anchor)  # ids -> text shown, stop texts
        self.halt = threading.Event()   # set when the consumer left or a stop text was written
        self.ids: list[int] = []
        self.text = ""
        self.cached = 0
        self._result: list[int] | None = None
        self._error: BaseException | None = None
        self._stream = _TokenStream()
        self._thread = threading.Thread(target=self._work, daemon=True, name=f"mgm-generate-{session.id[:8]}")
        self._finished = False
        self._scheduled = False         # served by the engine's scheduler (else: generate in _thread)
        self._done = threading.Event()  # set by the scheduler when the request ended
        self.waiting_ahead = 0          # conversations that were queued ahead of this one when it came

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
        cache, reuse = take_cache(s, self.items, embeds.shape[1] - 1)
        if not reuse:
            cache = DynamicCache(config=model.config.llm)
        self.cached = reuse
        if o.seed is not None:
            torch.manual_seed(o.seed)
        sampling = sampling_kwargs(o.temperature, o.top_p)
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
        scheduler = self.engine._scheduler_for(self)
        if scheduler is None:
            self._thread.start()
        else:
            self._scheduled = True
            self.waiting_ahead = ahead = scheduler.submit(self)
            if ahead:
                from .types import Event, Note
                yield Event("notice", Note("queue", f"Waiting: {ahead} conversation{'s' if ahead != 1 else ''} "
                                                    f"ahead (the server writes {scheduler.max_active} answers "
                                                    "at a time)."))
        yield from self.answer.deltas(self._stream.chunks(), self.halt)
        self._finish()
        yield from self.answer.rest(self.text)

    def _finish(self):
        if self._finished:
            return
        if self._scheduled:
            self._done.wait()
        else:
            self._thread.join()
        self._finished = True
        if self._error is not None:
            raise self._error
        self.ids, self.text = self.answer.settle(self._result or [])

    def abort(self):
        """Stop the model (the consumer left or failed) and settle `ids` / `text` from what was made."""
        self.halt.set()
        if self._scheduled or self._thread.is_alive() or self._thread.ident is not None:
            try:
                self._finish()
            except Exception:  # noqa: BLE001 - the run is being abandoned anyway
                pass


def items(ids, images):
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


def take_cache(session, items: list, limit: int):
    """The session's KV cache cropped to the longest common prefix (at most `limit` units) of what it holds
    with `items`, and that length; (None, 0) when nothing can be reused. The session's cache is taken: if
    the run fails, nobody may reuse a cache it was changing."""
    cache, covered = session.kv if session.kv is not None else (None, [])
    session.kv = None
    if cache is None:
        return None, 0
    reuse = common_prefix(covered, items, limit)
    if reuse and cache.get_seq_length() > reuse:
        try:
            cache.crop(reuse - cache.get_seq_length())
        except Exception:  # noqa: BLE001 - e.g. a sliding window that cannot roll back: start afresh
            return None, 0
    if not reuse or cache.get_seq_length() != reuse:
        return None, 0
    return cache, reuse


def common_prefix(a, b, limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


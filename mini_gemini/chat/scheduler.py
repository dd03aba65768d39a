"""A fair built-in engine: one thread owns the LLM and advances every active answer by one step per round.

Every answer (`LLMRun`) becomes a request with its own KV cache (the session's `DynamicCache`, reused by the
longest common prefix as before). Each round the scheduler

1. ends the requests whose consumer pressed Stop or left (session cancel, the run's halt event);
2. admits waiting requests while fewer than `Engine.max_active` are active (the others stay queued, FIFO,
   and were told their place when they arrived); newcomers bring their uncached prompt, bounded per round
   by `PREFILL_TOKENS` so that one round never stalls the others for long (after idling, the first
   round waits `ADMIT_WINDOW_S`, 2 ms, so that users arriving at the same moment share one prefill);
3. runs ONE forward of the LLM over all active requests, packed into one sequence: each newcomer's prompt
   suffix and one token for every request already decoding. Linear layers, norms and the MLP see all the
   tokens at once; attention is computed per request over its own cache (`_ragged_attention`, no padding,
   no copies), with its own positions and causal / sliding-window mask;
4. turns each request's logits into its next token with the same logits processing `generate` uses
   (suppress_tokens, temperature, top-k 50, top-p; a seeded `torch.Generator` per request), streams the
   token to its consumer and ends it on a stop id, at max_new_tokens, or when its consumer halts it.

The prompt prefix every conversation starts with (the template's system prompt, learnt as the common prefix
of two prompts prefilled from scratch) is computed once and shared: a new conversation starts from a copy
of its keys/values and prefills only the rest (as vLLM's prefix caching does), so newcomers get their
first token sooner. Like the session's own KV reuse, it changes speed, not answers.

A request that fails (its step, its sampling, its prompt) ends alone with its error: when the packed forward
raises, every cache is rolled back to where it was and the requests are stepped one by one, so only the
faulty one fails. Memory stays bounded: at most `max_active` caches grow at once.

Greedy answers do not depend on who else is served: every request attends only to its own keys, and its
positions and masks are those it would have alone. (The matrix products of a packed step run over more rows
than a lone one, so logits may differ in the last bits of float precision, as in every batching server:
only a greedy choice between two tokens whose logits tie to ~1e-6 could go the other way. The tests compare
answers token for token, on prompts whose answers never come near such a tie.)
"""
from __future__ import annotations

import atexit
import collections
import threading
import time
import weakref
from typing import TYPE_CHECKING

import torch
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

from .generation import common_prefix, take_cache

if TYPE_CHECKING:
    from .engine import Engine
    from .generation import LLMRun

SHARED_MIN = 16        # shortest prompt prefix worth sharing between conversations
PREFILL_TOKENS = 2048   # prompt tokens newcomers may bring into one round (the first newcomer always comes in)
ADMIT_WINDOW_S = 0.002  # after idling, how long the first newcomer waits for others arriving at the same time
IDLE_EXIT_S = 2.0       # the scheduler thread ends after this long without work (a new request restarts it)
TOP_K = 50              # generate's default top-k when sampling (the legacy path got it from there)

RAGGED = "mgm_ragged"   # the attention implementation name used during packed steps
_local = threading.local()


def _ragged_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention of a packed step: each request's queries against its own cache only.

    query: (1, H, T, d) for all packed tokens; the keys and values each request attends to were handed over
    by `_Packed.update` (its cache with its new tokens appended)."""
    packed: _Packed | None = getattr(_local, "packed", None)
    if packed is None:  # not inside a scheduler step (should not happen): plain sdpa
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    window = kwargs.pop("sliding_window", None)
    outs = []
    for (off, n), pos, (k, v) in zip(packed.spans, packed.positions, packed.kv[module.layer_idx]):
        q = query[:, :, off:off + n]
        mask = None
        if n == 1:
            if window and k.shape[2] > window:
                k, v = k[:, :, -window:], v[:, :, -window:]
        elif k.shape[2] != n or (window and n > window):
            # prompt suffix after cached tokens: causal mask by absolute positions (and the window)
            qpos = torch.arange(pos, pos + n, device=q.device)[:, None]
            kpos = torch.arange(pos + n - k.shape[2], pos + n, device=q.device)[None, :]
            allowed = kpos <= qpos
            if window:
                allowed &= (qpos - kpos) < window
            mask = allowed[None, None]
        out, _ = sdpa_attention_forward(module, q, k, v, mask, **kwargs)
        outs.append(out)
    return torch.cat(outs, dim=1), None


AttentionInterface.register(RAGGED, _ragged_attention)


class _Packed:
    """What the model sees as its cache during a packed step: every request's own DynamicCache; `update`
    appends each request's slice of the new keys/values to its cache and keeps the result for attention."""
    is_compileable = False

    def __init__(self, caches, spans, positions):
        self.caches, self.spans, self.positions = caches, spans, positions
        self.kv: dict[int, list] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.kv[layer_idx] = [c.update(key_states[:, :, off:off + n], value_states[:, :, off:off + n], layer_idx)
                              for c, (off, n) in zip(self.caches, self.spans)]
        return key_states, value_states


class _Request:
    """One answer being written: its run, cache, position and the token to feed next."""

    def __init__(self, run: LLMRun):
        self.run, self.session = run, run.session
        self.cache = None
        self.pos = 0                     # tokens the cache holds (absolute position of the next input)
        self.prompt: torch.Tensor | None = None   # (n, D) uncached prompt embeddings, until prefilled
        self.new: list[int] = []
        self.share = False
        self.processors = None
        self.generator = None
        o = run.options
        self.sample = o.temperature > 0

    def stopped(self) -> bool:
        return self.run.halt.is_set() or self.session._cancel.is_set()

    def prepare(self, model, shared=None):
        """Embed the prompt and take the session's cache, cropped to the longest common prefix (as before);
        without one, start from the prefix all conversations share (`shared`: items, per-layer keys/values)."""
        run, s = self.run, self.session
        embeds = model.embed(run.prompt_ids, [im.tokens for im in run.images])[0]
        cache, reuse = take_cache(s, run.items, embeds.shape[0] - 1)
        if not reuse:
            cache = DynamicCache(config=model.config.llm)
            n = common_prefix(shared[0], run.items, embeds.shape[0] - 1) if shared is not None else 0
            if n >= SHARED_MIN:  # e.g. the template's system prompt, computed once for everybody
                for layer, (k, v) in enumerate(shared[1]):
                    cache.update(k[:, :, :n], v[:, :, :n], layer)
                reuse = n
        self.cache, self.pos, self.prompt = cache, reuse, embeds[reuse:]
        self.share = reuse == 0          # prefilled from scratch: may teach the scheduler the shared prefix
        run.cached = reuse
        o = run.options
        procs = LogitsProcessorList()
        suppress = run.extra.get("suppress_tokens")
        if suppress:
            procs.append(SuppressTokensLogitsProcessor(suppress, device=embeds.device))
        if self.sample:
            procs += [TemperatureLogitsWarper(o.temperature), TopKLogitsWarper(TOP_K), TopPLogitsWarper(o.top_p)]
            if o.seed is not None:
                self.generator = torch.Generator(device=embeds.device).manual_seed(o.seed)
        self.processors = procs

    def next_token(self, logits: torch.Tensor) -> int:
        scores = self.processors(_NO_IDS, logits[None]) if self.processors else logits[None]
        if self.sample:
            probs = torch.softmax(scores, dim=-1)
            return int(torch.multinomial(probs, 1, generator=self.generator)[0, 0])
        return int(torch.argmax(scores, dim=-1)[0])

    def rollback(self, length: int):
        """Cut every layer of the cache back to `length` tokens (after a failed step)."""
        for layer in self.cache.layers:
            extra = layer.get_seq_length() - length
            if extra > 0:
                if type(layer) is not DynamicLayer:
                    raise RuntimeError("this cache cannot be rolled back")
                layer.crop(-extra)


_NO_IDS = torch.zeros(1, 0, dtype=torch.long)


_SCHEDULERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_all():
    """At interpreter exit: let every scheduler thread end (a thread left inside torch while the process
    tears down its thread pools aborts the process)."""
    for s in list(_SCHEDULERS):
        s._closing = True
        with s._cv:
            s._cv.notify_all()
        thread = s._thread
        if thread is not None:
            thread.join(5)


class Scheduler:
    """Continuous batching over one engine's model (see the module docstring)."""

    def __init__(self, engine: Engine, max_active: int):
        self.engine, self.max_active = engine, max(1, int(max_active))
        self.waiting: collections.deque[_Request] = collections.deque()
        self.active: list[_Request] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        _SCHEDULERS.add(self)
        # the prompt prefix every conversation starts with (the template's system prompt): (items, [(k, v)])
        self.shared = None
        self._last_fresh: list = []      # items of the last prompt prefilled from scratch
        self.rounds = 0                  # statistics: scheduler rounds run, most requests stepped at once
        self.peak_batch = 0

    # ---- consumer side ----------------------------------------------------------------------------
    def submit(self, run: LLMRun) -> int:
        """Queue a run. Returns how many conversations wait ahead of it for a free place (0: it starts now)."""
        req = _Request(run)
        with self._cv:
            free = self.max_active - len(self.active)
            ahead = len(self.waiting) - free + 1 if len(self.waiting) >= free else 0
            self.waiting.append(req)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=Scheduler._loop, args=(weakref.ref(self),), daemon=True,
                                                name="mgm-scheduler")
                self._thread.start()
            self._cv.notify()
        return max(0, ahead)

    def load(self) -> tuple[int, int]:
        """(answers being written, conversations waiting)."""
        with self._cv:
            return len(self.active), len(self.waiting)

    # ---- the scheduler thread ---------------------------------------------------------------------
    @staticmethod
    def _loop(ref: weakref.ref):
        """The scheduler thread. While idle it holds only a weak reference: an engine nobody uses any more
        is freed (with its sessions and caches) even while the thread waits for work."""
        fresh = True  # a busy period starts
        while True:
            self = ref()
            if self is None:
                return
            with self._cv:
                if not self.active and not self.waiting and not self._closing:
                    cv, fresh = self._cv, True
                    del self
                    cv.wait(IDLE_EXIT_S)
                    self = ref()
                    if self is None:
                        return
                if fresh and self.waiting and ADMIT_WINDOW_S and not self._closing:
                    # a busy period starts: let those arriving together share the first prefill
                    self._cv.wait(ADMIT_WINDOW_S)
                fresh = False
                dropped = None
                if self._closing:  # the process is ending: nobody will read the answers
                    dropped, self.waiting = list(self.waiting) + list(self.active), collections.deque()
                    self._thread = None
                elif not self.active and not self.waiting:
                    self._thread = None
                    return
            if dropped is not None:
                for r in dropped:
                    self._finish(r, RuntimeError("the server is shutting down"))
                return
            self._serve()
            del self

    def _serve(self):
        """One round under the model lock; then give a waiting image encoding its turn."""
        eng = self.engine
        try:
            with eng._compute, torch.inference_mode():
                self._round()
        except BaseException as e:  # noqa: BLE001 - never leave a consumer waiting forever
            for r in list(self.active):
                self._finish(r, e)
        if eng._encoders:  # let a waiting image encoding take the model between two rounds
            deadline = time.monotonic() + 0.05
            while eng._encoders and not eng._compute.locked() and time.monotonic() < deadline:
                time.sleep(0.0005)

    def _round(self):
        for r in [r for r in self.active if r.stopped()]:
            self._finish(r)
        newcomers = []
        with self._cv:
            gone = [r for r in self.waiting if r.stopped()]  # Stop pressed (or consumer gone) while queued
            for r in gone:
                self.waiting.remove(r)
            budget = PREFILL_TOKENS
            while self.waiting and len(self.active) + len(newcomers) < self.max_active:
                r = self.waiting[0]
                size = len(r.run.items)
                if newcomers and size > budget:
                    break
                newcomers.append(self.waiting.popleft())
                budget -= size
        for r in gone:
            self._finish(r, started=False)
        model = self.engine.model
        for r in newcomers:
            try:
                r.prepare(model, self.shared)
            except Exception as e:  # noqa: BLE001 - this request only
                self._finish(r, e)
                continue
            with self._cv:
                self.active.append(r)
        if self.active:
            self.peak_batch = max(self.peak_batch, len(self.active))
            self._step(list(self.active))
            self.rounds += 1

    def _step(self, batch: list[_Request]):
        lengths = [r.cache.get_seq_length() for r in batch]
        try:
            logits = self._forward(batch)
        except Exception as e:  # noqa: BLE001 - find whose step failed: roll back, then one by one
            for r, n in zip(batch, lengths):
                try:
                    r.rollback(n)
                except Exception as err:  # noqa: BLE001
                    self._finish(r, err if len(batch) > 1 else e)
            if len(batch) == 1:
                if batch[0] in self.active:
                    self._finish(batch[0], e)
                return
            for r in batch:
                if r in self.active:
                    self._step([r])
            return
        for r in batch:
            if r.share:
                self._learn_prefix(r)
        eng = self.engine
        plain = logits.argmax(-1).tolist()  # greedy answers without logits processing: one argmax for all
        for r, row, best in zip(batch, logits, plain):
            try:
                tok = r.next_token(row) if r.sample or r.processors else best
            except Exception as e:  # noqa: BLE001 - e.g. probabilities that are not numbers: this one only
                self._finish(r, e)
                continue
            r.new.append(tok)
            r.run._stream.queue.put([tok])
            if tok in eng.stop_ids or len(r.new) >= r.run.max_new or r.stopped():
                self._finish(r)

    def _learn_prefix(self, r: _Request):
        """After a prompt was prefilled from scratch: the prefix it shares with the previous such prompt (at
        least SHARED_MIN text tokens: the system prompt, say) becomes the shared prefix, its keys/values copied."""
        r.share = False
        items = r.run.items
        n = common_prefix(self._last_fresh, items, r.pos)
        self._last_fresh = items
        n = next((i for i in range(n) if items[i][0] != "t"), n)  # text only: images are per conversation
        if n < SHARED_MIN or (self.shared is not None and common_prefix(self.shared[0], items, n) >= n):
            return
        layers = r.cache.layers
        if not all(type(layer) is DynamicLayer and layer.get_seq_length() >= n for layer in layers):
            return  # e.g. sliding-window layers: not shared
        self.shared = (items[:n], [(layer.keys[:, :, :n].clone(), layer.values[:, :, :n].clone()) for layer in layers])

    def _forward(self, batch: list[_Request]) -> torch.Tensor:
        """One packed forward over `batch`; returns (len(batch), vocab) float32 logits of each last token."""
        llm = self.engine.model.llm
        device = self.engine.model.device
        spans, positions, parts, off = [], [], [], 0
        for r in batch:
            n = r.prompt.shape[0] if r.prompt is not None else 1
            spans.append((off, n))
            positions.append(r.pos)
            off += n
        pos_ids = torch.cat([torch.arange(p, p + n) for p, (_, n) in zip(positions, spans)])[None].to(device)
        if all(r.prompt is None for r in batch):  # decoding only: token ids, as generate feeds them
            inputs = dict(input_ids=torch.tensor([[r.new[-1] for r in batch]], device=device))
        else:
            embed = llm.get_input_embeddings()
            for r in batch:
                parts.append(r.prompt if r.prompt is not None else embed(torch.tensor([r.new[-1]], device=device)))
            inputs = dict(inputs_embeds=torch.cat(parts)[None])
        packed = _Packed([r.cache for r in batch], spans, positions)
        keep = torch.tensor([o + n - 1 for o, n in spans], device=device)
        cfg = llm.config
        previous = cfg._attn_implementation_internal
        cfg._attn_implementation_internal = RAGGED
        _local.packed = packed
        try:
            out = llm(**inputs, position_ids=pos_ids, cache=packed, use_cache=True, logits_to_keep=keep)
        finally:
            cfg._attn_implementation_internal = previous
            _local.packed = None
        for r, (_, n) in zip(batch, spans):
            r.pos += n
            r.prompt = None
        return out.logits[0].float()

    def _finish(self, r: _Request, error: BaseException | None = None, started: bool = True):
        """End a request: hand the session its cache (or drop it after an error) and wake the consumer."""
        with self._cv:
            if r in self.active:
                self.active.remove(r)
        run, s = r.run, r.session
        if error is not None:
            run._error = error
            s.kv = None
        elif started and r.cache is not None:
            try:
                # what the cache now holds: the prompt and all new tokens but the last (never fed back)
                s.kv = (r.cache, (run.items + [("t", t) for t in r.new])[:r.cache.get_seq_length()])
                self.engine._keep_kv(s)
            except Exception:  # noqa: BLE001 - bookkeeping only: the answer stands
                s.kv = None
            run._result = r.new
        r.cache = r.prompt = None
        run._stream.end()
        run._done.set()

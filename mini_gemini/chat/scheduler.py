"""Who writes the answers of the built-in engine: a fair batching scheduler, or one answer at a time.

`Scheduler` (continuous batching): one thread owns the LLM and advances every active answer by one token per
round. Each round it

1. ends the requests whose consumer pressed Stop or left (`Run.halted`);
2. admits waiting requests while fewer than `max_active` are active (the others stay queued, FIFO, and were told
   their place when they arrived); newcomers bring their uncached prompt, bounded per round by `PREFILL_TOKENS`
   so that one round never stalls the others for long (after idling, the first round waits `ADMIT_WINDOW_S`,
   2 ms, so that users arriving at the same moment share one prefill);
3. runs ONE packed forward of the LLM over all active requests (`ModelRunner.forward`);
4. turns each request's logits into its next token with the same logits processing `generate` uses
   (suppress_tokens, temperature, top-k 50, top-p; a seeded `torch.Generator` per request), delivers the token
   to its run and ends it on a stop id, at its max_new tokens, or when it is halted.

A request that fails (its step, its sampling, its prompt) ends alone with its error: when the packed forward
raises, every cache is rolled back to where it was and the requests are stepped one by one, so only the faulty
one fails. Memory stays bounded: at most `max_active` caches grow at once.

Greedy answers do not depend on who else is served: every request attends only to its own keys, and its
positions and masks are those it would have alone. (The matrix products of a packed step run over more rows
than a lone one, so logits may differ in the last bits of float precision, as in every batching server: only a
greedy choice between two tokens whose logits tie to ~1e-6 could go the other way.)

`SerialScheduler` (`Engine(max_active=0)`): one whole answer at a time with the LLM's own `generate`, in a
worker thread per answer.

Both take what they need as objects of their own - the `ModelRunner` (the model and its lock), the `KVStore`
(caches between answers) and the stop ids - and talk to an answer only through its `Run` interface.
"""
from __future__ import annotations

import atexit
import collections
import threading
import weakref

import torch
from transformers import (
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .kv_store import KVStore, rollback
from .run import Run
from .runner import ModelRunner, StepInput

PREFILL_TOKENS = 2048   # prompt tokens newcomers may bring into one round (the first newcomer always comes in)
ADMIT_WINDOW_S = 0.002  # after idling, how long the first newcomer waits for others arriving at the same time
IDLE_EXIT_S = 2.0       # the scheduler thread ends after this long without work (a new request restarts it)
TOP_K = 50              # generate's default top-k when sampling
_NO_IDS = torch.zeros(1, 0, dtype=torch.long)


class Sequence:
    """One answer inside the scheduler: its run, cache, position, and the tokens written so far."""

    def __init__(self, run: Run):
        self.run, self.request = run, run.request
        self.cache = None
        self.pos = 0                      # positions the cache holds (absolute position of the next input)
        self.prompt: torch.Tensor | None = None   # (n, D) uncached prompt embeddings, until prefilled
        self.new: list[int] = []
        self.fresh = False                # prefilled from scratch: may teach the store the shared prefix
        self.reused = 0                   # prompt positions the cache held already
        self.sample = run.request.options.temperature > 0
        self.processors = LogitsProcessorList()
        self.generator: torch.Generator | None = None

    @property
    def owner_name(self) -> str:
        """The conversation this answer belongs to ("" without one)."""
        return self.request.owner.name if self.request.owner is not None else ""

    def prepare(self, runner: ModelRunner, kv_store: KVStore):
        """Embed the prompt and take a cache that holds as much of it as possible."""
        req = self.request
        embeds = runner.embed(req.prompt_ids, [im.tokens for im in req.images])
        self.cache, self.pos = kv_store.take(req.owner, req.units, embeds.shape[0] - 1,
                                             runner.model.config.llm)
        self.prompt, self.fresh, self.reused = embeds[self.pos:], self.pos == 0, self.pos
        o = req.options
        if req.suppress_tokens:
            self.processors.append(SuppressTokensLogitsProcessor(list(req.suppress_tokens), device=embeds.device))
        if self.sample:
            self.processors += [TemperatureLogitsWarper(o.temperature), TopKLogitsWarper(TOP_K),
                                TopPLogitsWarper(o.top_p)]
            if o.seed is not None:
                self.generator = torch.Generator(device=embeds.device).manual_seed(o.seed)

    def step_input(self) -> StepInput:
        return StepInput(self.cache, self.pos, self.prompt, self.new[-1] if self.prompt is None else None)

    def advance(self, n: int):
        """The step fed `n` positions into the cache."""
        self.pos += n
        self.prompt = None

    def next_token(self, logits: torch.Tensor) -> int:
        """The next token from this request's (vocab,) logits, as `generate` would choose it."""
        scores = self.processors(_NO_IDS, logits[None]) if self.processors else logits[None]
        if self.sample:
            probs = torch.softmax(scores, dim=-1)
            return int(torch.multinomial(probs, 1, generator=self.generator)[0, 0])
        return int(torch.argmax(scores, dim=-1)[0])


_SCHEDULERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_all():
    """At interpreter exit: let every scheduler thread end (a thread left inside torch while the process tears
    down its thread pools aborts the process)."""
    for s in list(_SCHEDULERS):
        s.close()


class Scheduler:
    """Continuous batching over one model (see the module docstring).

    Args:
        runner: the model and its lock.
        kv_store: where caches are taken from and handed back to.
        stop_ids: token ids that end an answer.
        max_active: answers written at once; more wait in a queue.
    """

    def __init__(self, runner: ModelRunner, kv_store: KVStore, stop_ids, max_active: int = 8):
        self.runner, self.kv_store = runner, kv_store
        self.stop_ids = frozenset(stop_ids)
        self.max_active = max(1, int(max_active))
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.active: list[Sequence] = []
        self.peak_batch = 0               # most answers stepped at once (the benchmark reports it)
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        _SCHEDULERS.add(self)

    # ---- consumer side ---------------------------------------------------------------------------------------
    def submit(self, run: Run) -> int:
        """Queue a run. Returns how many conversations wait ahead of it for a free place (0: it starts now)."""
        seq = Sequence(run)
        with self._cv:
            free = self.max_active - len(self.active)
            ahead = len(self.waiting) - free + 1 if len(self.waiting) >= free else 0
            self.waiting.append(seq)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=Scheduler._loop, args=(weakref.ref(self),), daemon=True,
                                                name="mgm-scheduler")
                self._thread.start()
            self._cv.notify()
        return max(0, ahead)

    def close(self):
        """End the scheduler thread (process exit): answers still waiting or being written end with an error."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    # ---- the scheduler thread ------------------------------------------------------------------------------
    @staticmethod
    def _loop(ref: weakref.ref):
        """The scheduler thread. While idle it holds only a weak reference: an engine nobody uses any more is
        freed (with its sessions and caches) even while the thread waits for work."""
        fresh = True  # a busy period starts
        while True:
            self = ref()
            if self is None:
                return
            with self._cv:
                if not self.active and not self.waiting and not self._closing:
                    cv, fresh = self._cv, True
                    with self.runner.lock:
                        self.runner.end_packed()
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
                    self.active, self._thread = [], None
                elif not self.active and not self.waiting:
                    self._thread = None
                    return
            if dropped is not None:
                for s in dropped:
                    self._end(s, RuntimeError("the server is shutting down"), keep=False)
                return
            self._serve()
            del self

    def _serve(self):
        """One round under the model's lock; then let a waiting image encoding take the model."""
        try:
            with self.runner.lock, torch.inference_mode():
                self._round()
        except BaseException as e:  # noqa: BLE001 - never leave a consumer waiting forever
            for s in list(self.active):
                self._end(s, e)
        self.runner.let_encoders_in()

    def _round(self):
        for s in [s for s in self.active if s.run.halted]:
            self._end(s)
        newcomers = []
        with self._cv:
            gone = [s for s in self.waiting if s.run.halted]  # Stop pressed (or consumer gone) while queued
            for s in gone:
                self.waiting.remove(s)
            budget = PREFILL_TOKENS
            while self.waiting and len(self.active) + len(newcomers) < self.max_active:
                size = len(self.waiting[0].request.units)
                if newcomers and size > budget:
                    break
                newcomers.append(self.waiting.popleft())
                budget -= size
        for s in gone:
            self._end(s, keep=False)
        for s in newcomers:
            s.run.admitted()
            try:
                s.prepare(self.runner, self.kv_store)
            except Exception as e:  # noqa: BLE001 - this request only
                self._end(s, e)
                continue
            with self._cv:
                self.active.append(s)
        if self.active:
            self.peak_batch = max(self.peak_batch, len(self.active))
            self._step(list(self.active))

    def _step(self, batch: list[Sequence]):
        lengths = [s.pos for s in batch]
        try:
            logits = self.runner.forward([s.step_input() for s in batch])
        except Exception as e:  # noqa: BLE001 - find whose step failed: roll back, then one by one
            for s, n in zip(batch, lengths):
                try:
                    rollback(s.cache, n)
                except Exception as err:  # noqa: BLE001
                    self._end(s, err if len(batch) > 1 else e)
            if len(batch) == 1:
                if batch[0] in self.active:
                    self._end(batch[0], e)
                return
            for s in batch:
                if s in self.active:
                    self._step([s])
            return
        for s in batch:
            s.advance(s.prompt.shape[0] if s.prompt is not None else 1)
            if s.fresh:
                s.fresh = False
                self.kv_store.learn_prefix(s.request.units, s.cache, s.pos)
        plain = logits.argmax(-1).tolist()  # greedy answers without logits processing: one argmax for all
        for s, row, best in zip(batch, logits, plain):
            try:
                tok = s.next_token(row) if s.sample or s.processors else best
            except Exception as e:  # noqa: BLE001 - e.g. probabilities that are not numbers: this one only
                self._end(s, e)
                continue
            s.new.append(tok)
            s.run.deliver([tok])
            if (tok in self.stop_ids and not s.request.options.ignore_eos) or len(s.new) >= s.request.max_new \
                    or s.run.halted:
                self._end(s)

    def _end(self, s: Sequence, error: BaseException | None = None, keep: bool = True):
        """End an answer: hand its cache back to the store (not after an error) and tell its run."""
        with self._cv:
            if s in self.active:
                self.active.remove(s)
        if error is None and keep and s.cache is not None:
            try:
                self.kv_store.put(s.request.owner, s.cache, s.request.units, s.new)
            except Exception:  # noqa: BLE001 - bookkeeping only: the answer stands
                pass
        s.cache = s.prompt = None
        s.run.finish(error, s.reused)


class _Halt(StoppingCriteria):
    """Ends `generate` once the run is halted: one flag read per step."""

    def __init__(self, run: Run):
        self.run = run
        self._flags: dict = {}

    def __call__(self, input_ids, scores, **kwargs):
        stop = self.run.halted
        key = (input_ids.shape[0], input_ids.device, stop)
        if key not in self._flags:
            self._flags[key] = torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)
        return self._flags[key]


class _Deliver:
    """The streamer `generate` feeds: each step's token handed to the run (the prompt, sent first, skipped)."""

    def __init__(self, run: Run):
        self.run, self._prompt = run, True

    def put(self, value):
        if self._prompt:  # generate first hands over the prompt ids (empty with inputs_embeds)
            self._prompt = False
            return
        self.run.deliver(value.reshape(-1).tolist())

    def end(self):
        pass


class SerialScheduler:
    """One whole answer at a time, with the LLM's own `generate` in a worker thread (`Engine(max_active=0)`).

    Args: as `Scheduler` (without max_active: one answer at a time; the others wait for the model's lock).
    """
    max_active = 1

    def __init__(self, runner: ModelRunner, kv_store: KVStore, stop_ids, pad_id: int | None):
        self.runner, self.kv_store = runner, kv_store
        self.stop_ids, self.pad_id = sorted(stop_ids), pad_id

    def submit(self, run: Run) -> int:
        threading.Thread(target=self._work, args=(run,), daemon=True, name="mgm-generate").start()
        return 0

    def _work(self, run: Run):
        error, cached = None, 0
        try:
            while not self.runner.lock.acquire(timeout=0.05):  # another conversation's answer is being written
                if run.halted:
                    return
            try:
                if run.halted:  # stopped while it waited: nothing to write
                    return
                run.admitted()
                with torch.no_grad():
                    cached = self._generate(run)
            finally:
                self.runner.lock.release()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            error = e
        finally:
            run.finish(error, cached)

    def _generate(self, run: Run) -> int:
        req, runner = run.request, self.runner
        embeds = runner.embed(req.prompt_ids, [im.tokens for im in req.images])
        # share=False: only the conversation's own cache, exactly as generate would continue it
        cache, reuse = self.kv_store.take(req.owner, req.units, embeds.shape[0] - 1, runner.model.config.llm,
                                          share=False)
        o = req.options
        new = runner.generate(embeds, cache, max_new_tokens=req.max_new, temperature=o.temperature, top_p=o.top_p,
                              seed=o.seed, eos_token_id=[] if o.ignore_eos else self.stop_ids,
                              pad_token_id=self.pad_id,
                              suppress_tokens=req.suppress_tokens, streamer=_Deliver(run),
                              stopping_criteria=StoppingCriteriaList([_Halt(run)]))
        self.kv_store.put(req.owner, cache, req.units, new)
        return reuse

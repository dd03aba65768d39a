"""Process-wide settings for a server that keeps one engine for its lifetime (the app, `mgm-serve`).

    engine = Engine(model, max_active=8)
    settle(engine)          # once, before the first request

- CPU threads: a small model (fewer than SMALL_MODEL_PARAMS weights: the bundled demo model, tiny test checkpoints)
  is served on one torch thread. Its ops take microseconds, so a second thread saves nothing, and while other
  requests' Python work (HTTP, decoding pictures) keeps the other cores busy, every parallel op waits for a busy
  core to join it. Measured through the app with a 0.3M-weight Llama, 8 users at once on this project's 2-core
  CPU (`python -m mini_gemini.bench --app-only`): all 8 answers in 0.42-0.48x the serial time on one thread,
  0.54-0.57x on two; their batched decode 0.23 s against 0.8-0.9 s (README, Benchmark).
  A real checkpoint keeps torch's default (its image encoding and prefill are arithmetic that two threads halve),
  and so does any process started with OMP_NUM_THREADS set (the user's choice).
- Garbage collection: everything loaded so far lives as long as the server, so it is moved out of the collector's
  sight (`gc.freeze`); full collections then scan only what requests create (they took 60-440 ms over the whole
  heap, stalling every user at once).
"""
from __future__ import annotations

import gc
import logging
import os

log = logging.getLogger(__name__)
# weights (parameters and buffers, e.g. int8 tables) below which one thread serves: the demo model has 1.5M, while
# the benchmark's 23.6M-weight speed model already answers sooner on two (first token 202 vs 270 ms, one user)
SMALL_MODEL_PARAMS = 10_000_000


def model_size(model) -> int:
    """Number of weights of `model`: its parameters and buffers (int8 layers keep their tables as buffers), each
    tensor counted once (tied weights share storage)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.device.type == "meta" or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel()
    return total


def cpu_threads(model) -> int | None:
    """torch intra-op threads to serve `model` with: 1 for a model on the CPU with fewer than SMALL_MODEL_PARAMS
    weights; None (leave torch's setting) for a larger model, a model on a GPU, or when OMP_NUM_THREADS is set."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    first = next(iter(model.parameters()), None)
    if first is None or first.device.type != "cpu":
        return None
    return 1 if model_size(model) < SMALL_MODEL_PARAMS else None


def settle(engine) -> None:
    """Apply this module's settings for serving `engine` (see the module docstring); call once, after loading and
    before the first request. Changes process-wide state: torch's thread count and the collector's generations."""
    import torch
    threads = cpu_threads(engine.model)
    if threads is not None and torch.get_num_threads() != threads:
        log.info("serving on %d CPU thread: the model is small (%.1fM weights), a second thread would only wait "
                 "(set OMP_NUM_THREADS to choose)", threads, model_size(engine.model) / 1e6)
        torch.set_num_threads(threads)
    gc.collect()
    gc.freeze()

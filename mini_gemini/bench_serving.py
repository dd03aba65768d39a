"""Serving figures of `python -m mini_gemini.bench`: many users at once through the Engine (built-in
scheduler, or the LLM on a vLLM server), relative to one user and to serving them one after another."""
from __future__ import annotations

import threading
import time

import torch

# ---- many users at once ---------------------------------------------------------------------------
SERVING_PROMPTS = ("What is in the picture?", "Describe a red square.", "Hello there!", "Count to ten, please.",
                   "What colour is the sky?", "Tell me a story about a cat.", "Is it round?",
                   "Why is the circle blue?")


def serving_figures(engine, prompts=SERVING_PROMPTS, users=(1, 4, 8), new_tokens: int = 96, repeat: int = 7,
                    ignore_eos: bool = False) -> dict:
    """First-token latency and total time when `k` users send at once, through `engine` (greedy, each user a
    different prompt, one thread each, fresh conversations), relative to one user alone.

    ttft_p50/p95_x{k}: the median / 95th percentile of the k first-token times (from the common start to the
    first text delta) over one user's first-token time (the median over the same k prompts, each sent alone the same
    way: one thread started at the same signal). all_answers_x{k}: the time until all k answers are complete
    over the time the same k prompts take one after another. Each figure is the median of `repeat` runs
    (the machine may be shared). ignore_eos: every answer runs to `new_tokens` (random weights)."""
    import numpy as np

    from .chat.engine import GenOptions
    options = GenOptions(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=ignore_eos)

    def one(text, t0, out, k):
        first, n = None, 0
        for ev in engine.session().chat(text, options=options):
            if ev.kind == "delta" and first is None:
                first = time.perf_counter() - t0
            elif ev.kind == "done":
                n = len(ev.data.token_ids)
            elif ev.kind == "error":
                raise RuntimeError(ev.text)
        out[k] = (first if first is not None else time.perf_counter() - t0, time.perf_counter() - t0, n)

    def crowd(k):
        out, start = [None] * k, threading.Barrier(k + 1)

        def work(i):
            start.wait()
            one(prompts[i], t0, out, i)
        threads = [threading.Thread(target=work, args=(i,)) for i in range(k)]
        for t in threads:
            t.start()
        t0 = time.perf_counter()
        start.wait()
        for t in threads:
            t.join()
        return out, time.perf_counter() - t0

    def alone(i):
        out, start = [None], threading.Barrier(2)

        def work():
            start.wait()
            one(prompts[i], t0, out, 0)
        thread = threading.Thread(target=work)
        thread.start()
        t0 = time.perf_counter()
        start.wait()
        thread.join()
        return out[0]

    crowd(min(2, max(users)))  # warm-up
    runs: dict = {}
    for _ in range(repeat):
        solo = [alone(i) for i in range(max(users))]
        runs.setdefault("ttft_1_user_s", []).append(float(np.median([f for f, _, _ in solo])))
        for k in users:
            base = float(np.median([f for f, _, _ in solo[:k]]))
            out, total = crowd(k)
            firsts = [f for f, _, _ in out]
            runs.setdefault(f"ttft_p50_x{k}", []).append(float(np.percentile(firsts, 50)) / base)
            runs.setdefault(f"ttft_p95_x{k}", []).append(float(np.percentile(firsts, 95)) / base)
            runs.setdefault(f"all_answers_x{k}", []).append(total / sum(t for _, t, _ in solo[:k]))
            runs.setdefault(f"tokens_x{k}", []).append(sum(n for _, _, n in out))
        runs.setdefault("serial_8_s", []).append(sum(t for _, t, _ in solo[:8]))
    return {k: round(float(np.median(v)), 3) for k, v in runs.items()}


def bench_serving(new_tokens: int = 96, baseline: bool = True, threads: int | None = 1) -> dict:
    """`serving_figures` for the built-in engine (its scheduler: every answer advances one token per round,
    batched) on the bundled tiny Llama demo checkpoint; with `baseline`, also for the engine serving one
    whole answer at a time (`max_active=0`, as before the scheduler).

    threads: torch's intra-op threads while measuring (None: as they are). On a 2-core machine shared with
    other jobs, a 2-thread OpenMP team stalls for a scheduler time slice (tens to hundreds of ms) whenever
    its second thread is not running - for both engines, at random - so the figures are taken with one."""
    from .chat.engine import Engine
    from .modeling.loading import load_pretrained
    from .resources import demo_model_path
    torch.manual_seed(0)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        model = load_pretrained(str(demo_model_path()), device="cpu")
        results = {f"serving_{k}": v for k, v in serving_figures(Engine(model), new_tokens=new_tokens).items()}
        if baseline:
            results.update({f"serving_before_{k}": v for k, v in
                            serving_figures(Engine(model, max_active=0), users=(1, 8), new_tokens=new_tokens,
                                            repeat=3).items()})
        results["serving_threads"] = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    return results


def bench_serving_vllm(url: str, checkpoint: str, new_tokens: int = 96) -> dict:
    """`serving_figures` with the LLM served by vLLM at `url` (which must serve `checkpoint`'s LLM, as
    `mgm-export-llm` writes it); the towers, mining and projector run here. Also the built-in engine on the
    same checkpoint, side by side in this run."""
    from .chat.engine import Engine
    from .modeling.loading import load_pretrained
    local = load_pretrained(checkpoint, device="cpu")
    remote = load_pretrained(checkpoint, device="cpu", llm_layers=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as bench_serving: a 2-thread team stalls at random on a shared 2-core machine
    try:
        results = {f"vllm_{k}": v for k, v in serving_figures(Engine(remote, llm_server=url),
                                                               new_tokens=new_tokens, repeat=3).items()}
        results.update({f"vllm_builtin_{k}": v for k, v in serving_figures(Engine(local), new_tokens=new_tokens,
                                                                            repeat=3).items()})
    finally:
        torch.set_num_threads(before)
    return results



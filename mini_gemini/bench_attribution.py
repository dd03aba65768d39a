"""Cost of answer attribution (`modeling.attribution`), measured side by side in one process, as ratios.

    python -m mini_gemini.bench_attribution [--shape 2b-6|2b|small] [--answer-tokens 32] [--relevancy] [--json]
    (also run by `python -m mini_gemini.bench`; skip it there with --no-attribution)

The conversation: one 336-px image (576 visual tokens) in a short question, then an answer of `answer_tokens`
tokens. The model: MGM-2B's LLM and projector with their true shapes (Gemma-2B: width 2048, 8 query heads /
1 KV head of 256, MLP 16384, vocabulary 256000), random weights, fp32 (bf16 arithmetic is emulated on CPUs
without AVX-512-BF16 and would time the emulation). `--shape 2b` has all 18 layers (2.5 B parameters, ~10 GB
in fp32: more than a shared 24 GB machine reliably has free); the default `2b-6` keeps every shape but only 6
of the 18 layers (1.2 B parameters, 4.7 GB). Both ratios are per layer, so fewer layers leave them as they are
or make them worse: the fixed costs (the answer rows' logits over the 256000-word vocabulary, the HR maps)
weigh more against a shallower model, a larger share of its layers lies in the default range (4 of 6 against
10 of 18), and the peak extra memory (one layer's activations at a time) is divided by fewer weights. The
measured passes never run the vision towers (the engine keeps every image's visual tokens and mining weights),
so the model is built with small towers: only the LLM and projector count as "weights" below (the real
towers would add ~0.5 B parameters and make the memory ratio smaller still).

- attribution_pass_ratio: `explain_answer(method="attention")` (one forward over prompt + answer keeping the
  answer rows of the default layer range, then the HR maps) ÷ one prefill of the same conversation (prompt +
  answer, KV cache kept, last logits only, as the engine prefills) (goal <= 1.5).
  attribution_pass_cpu_ratio: the same in this process's CPU time (less swayed by other work on the machine).
- attribution_peak_ratio: the pass's peak extra memory (RSS high-water mark over the RSS before it) ÷ the
  weights (goal <= 0.10). prefill_peak_ratio: the same for the prefill, for comparison.
- attribution_ablation_ratio: `explain_answer` with the mining ablation (one more forward) ÷ the prefill.
- relevancy_pass_ratio (--relevancy): method="relevancy" over all layers for a 4-token answer ÷ the prefill of
  that conversation; it grows with the answer (one backward per answer token).
`--shape small` measures the same ratios at a quarter of the width and half the depth (head counts and the
sequence kept), for a quick look; the report names the shape.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time

import torch

GOALS = {"attribution_pass_ratio": "<= 1.5", "attribution_peak_ratio": "<= 0.10"}


SHAPES = ("2b-6", "2b", "small")


def attribution_model(shape: str = "2b-6"):
    """MGM-2B's LLM and projector (fp32, random) with small vision towers that still give 576 tokens per image;
    `shape` as in the module docstring."""
    from .bench_models import mgm_2b_config
    from .modeling.config import MGMConfig
    from .modeling.model import MiniGemini
    cfg = mgm_2b_config()
    if shape == "2b-6":
        cfg.update(num_hidden_layers=6)
    elif shape == "small":
        cfg.update(hidden_size=512, intermediate_size=4096, num_hidden_layers=9, head_dim=64)
    elif shape != "2b":
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    cfg.update(mm_vision_tower_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=336, patch_size=14),
               mm_vision_tower_aux_config=dict(depths=[1, 1, 1, 1], dims=[8, 8, 8, 8]),
               mm_hidden_size=64, mm_hidden_size_aux=32)
    torch.manual_seed(0)
    return MiniGemini(MGMConfig.from_dict(cfg)).eval().requires_grad_(False)


def _rss() -> dict:
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.startswith(("VmRSS", "VmHWM"))}


def _peak(fn) -> int:
    """Peak extra bytes of `fn()` over the RSS before it (VmHWM reset via /proc/self/clear_refs)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    base = _rss()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
    fn()
    return _rss()["VmHWM"] - base


def measure(shape: str = "2b-6", answer_tokens: int = 32, repeat: int = 5, relevancy: bool = False) -> dict:
    """Run the measurements in this process (see the module docstring); returns the figures."""
    from .constants import IMAGE_TOKEN_INDEX
    from .modeling.attribution import ImageEvidence, explain_answer
    model = attribution_model(shape)
    llm, d = model.llm, model.config.llm.hidden_size
    weights = sum(p.numel() * p.element_size() for m in (model.llm, model.mm_projector) for p in m.parameters())
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.llm.vocab_size
    n_tok = model.config.tokens_per_view
    p2 = model.config.patch_side ** 2
    tokens = torch.randn(n_tok, d, generator=gen)
    attn = torch.rand(1, n_tok, p2, generator=gen).softmax(-1)
    ev = ImageEvidence(tokens, attn)
    ev_ablation = ImageEvidence(tokens, attn, torch.randn(n_tok, d, generator=gen))
    text = torch.randint(10, vocab - 10, (40,), generator=gen).tolist()
    ids = text[:20] + [IMAGE_TOKEN_INDEX] + text[20:]            # ~20 tokens of template, the image, a question
    answer = torch.randint(10, vocab - 10, (answer_tokens,), generator=gen).tolist()
    embeds = model.embed(ids + answer[:-1], [tokens])

    def prefill(e=embeds):
        with torch.no_grad():
            llm(inputs_embeds=e, use_cache=True, logits_to_keep=1)

    def attribution():
        explain_answer(model, ids, [ev], answer)

    def with_ablation():
        explain_answer(model, ids, [ev_ablation], answer)

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def timed_both(fn) -> tuple[float, float]:
        """(wall, CPU) seconds: the CPU time of this process is less swayed by other work on a shared machine."""
        t, c = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - t, time.process_time() - c

    prefill(), attribution()  # warm-up
    # Rounds of the three passes side by side, the order reversed every other round so that a drift in the
    # machine's load does not favour one; each round gives its own ratios, the median round is reported.
    passes = {"prefill": prefill, "attribution": attribution, "ablation": with_ablation}
    rounds = []
    for r in range(repeat):
        order = list(passes) if r % 2 == 0 else list(reversed(passes))
        rounds.append({name: timed_both(passes[name]) for name in order})

    def median_ratio(name: str, clock: int = 0) -> float:
        ratios = sorted(rd[name][clock] / rd["prefill"][clock] for rd in rounds)
        return ratios[len(ratios) // 2]
    best = {k: min(rd[k][0] for rd in rounds) for k in passes}
    peak_prefill, peak_attr = _peak(prefill), _peak(attribution)
    out = {"attribution_pass_ratio": round(median_ratio("attribution"), 3),
           "attribution_peak_ratio": round(peak_attr / weights, 4),
           "prefill_peak_ratio": round(peak_prefill / weights, 4),
           "attribution_pass_cpu_ratio": round(median_ratio("attribution", 1), 3),
           "attribution_ablation_ratio": round(median_ratio("ablation"), 3),
           "attribution_prefill_s": round(best["prefill"], 2), "attribution_pass_s": round(best["attribution"], 2),
           "attribution_peak_mb": round(peak_attr / 1e6, 1), "attribution_weights_gb": round(weights / 1e9, 2),
           "attribution_sequence": embeds.shape[1], "attribution_answer_tokens": answer_tokens,
           "attribution_shape": shape, "attribution_threads": torch.get_num_threads()}
    if relevancy:
        short = answer[:4]
        e_short = model.embed(ids + short[:-1], [tokens])
        t_pre = min(timed(lambda: prefill(e_short)) for _ in range(2))
        t_rel = timed(lambda: explain_answer(model, ids, [ev], short, method="relevancy"))
        p_rel = _peak(lambda: explain_answer(model, ids, [ev], short, method="relevancy"))
        out.update(relevancy_pass_ratio=round(t_rel / t_pre, 2), relevancy_peak_ratio=round(p_rel / weights, 3),
                   relevancy_answer_tokens=len(short))
    return out


def bench_attribution(shape: str = "2b-6", answer_tokens: int = 32, relevancy: bool = False) -> dict:
    """`measure` in a fresh process (so that its peak memory is its own); returns the figures."""
    code = (f"import json; from mini_gemini.bench_attribution import measure; "
            f"print(json.dumps(measure({shape!r}, {answer_tokens}, relevancy={relevancy})))")
    # the child imports this very package: hand it our import path
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(sys.path)))
    if out.returncode:
        raise RuntimeError(f"the attribution benchmark ended with code {out.returncode} (-9: killed, most likely "
                           f"out of memory; try --shape small): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="2b-6")
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--relevancy", action="store_true", help="also time method='relevancy' (slow at 2b)")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    args = ap.parse_args(argv)
    from .bench_models import report
    report(bench_attribution(args.shape, args.answer_tokens, args.relevancy), GOALS, args.json)


if __name__ == "__main__":
    main()

"""Speed and memory, measured side by side in one run and reported as ratios.

    python -m mini_gemini.bench [--json] [--skip-load] [--load-only] [--upload-only] [--serving-only]
                                [--no-serving] [--app-only] [--cpu-real-size] [--no-attribution]
                                [--llm-server URL --checkpoint CKPT] [--workdir DIR]

With --json, the figures are also printed as one JSON object on the last line of the output.

- load_memory_ratio: peak memory of loading a random checkpoint with MGM-2B's true shapes (bf16)
  ÷ its file size (goal <= 1.2). Measured in a fresh process: peak RSS minus the RSS before loading.
- decode_ratio: the VLM's decode tokens/s ÷ the bare LLM's, same weights and context length (goal >= 0.95).
- followup_ttft_ratio: time to first token of a follow-up on the same image ÷ the first turn's
  (goal <= 0.25; re-encoding and re-prefilling, as the official demo does, gives about 1.0).
- mining_overhead: image encoding with the mining maps kept ÷ without (goal <= 1.03).
- upload_peak_mb: peak extra memory (RSS high-water mark over the RSS with the decoded image already
  held, in a fresh process) of preprocessing + heatmap overlay + zoom for a 16000x1 and a 40000x1000
  image, worst of MGM's 768 px and HD 1536 px HR sides (goal < 100; padding at full resolution cost
  +3.5 GB and ~22 GB). Per image and HR side under upload_peak_detail.
- attribution_*: answer attribution's extra pass ÷ one prefill, and its peak memory ÷ the weights, at MGM-2B's
  shapes (`bench_attribution`; goals <= 1.5 and <= 0.10).
- serving_*: many users at once through the Engine (bundled tiny Llama demo checkpoint, greedy, 96 new
  tokens, each user a different short prompt, one thread each): serving_ttft_p50_x{k} / _p95_x{k} = the
  median / 95th-percentile first-token time of k users sending at once ÷ one user's alone (goal for k=8:
  p95 <= 3); serving_all_answers_x{k} = time until all k answers are complete ÷ the same k prompts served one
  after another (goal for k=8: <= 0.6). serving_before_*: the same for the engine writing one whole answer
  at a time (Engine(max_active=0), as before the scheduler).
- openai_followup_ttft_ratio: the same follow-up ratio through the OpenAI-compatible endpoint, the client
  resending the whole conversation (goal <= 0.25; mini_gemini/bench_openai.py).
- app_*: 8 users at once through the app's `/chat` over HTTP, each with a 640x420 PNG, in a fresh conversation
  (tiny Llama, greedy, 96 new tokens; `--app-only` runs just these): app_ttft_p95_x8 = 95th-percentile first-token
  time ÷ one user's alone (goal <= 3), app_all_answers_x8 = all 8 answers ÷ the same turns one after another (goal
  <= 0.5), app_answers_equal (goal True), app_breakdown_*_s = where a concurrent user's first-token time went.
  openai_*: the same through the app's `/v1/chat/completions` (same goals). app_floor_*: the first-token figures of
  a bare Gradio app with the same `/chat` and no model, same clients, same run (Gradio's own cost). mini_gemini/bench_app.py.
The speed model is built on the fly, large enough for CPU timings to mean something.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

# the checkpoints measured and the report format live in bench_models (re-exported: scripts import them from here)
from .bench_models import (  # noqa: F401
    mgm_2b_config,
    mgm_7b_hd_config,
    report,
    speed_model,
    write_random_checkpoint,
)


def _best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


# ---- loading memory -------------------------------------------------------------------------------
_MEASURE = r"""
import json, sys, threading, time, torch
from mini_gemini.modeling.loading import load_pretrained
def rss():
    with open('/proc/self/status') as f:
        return {l.split(':')[0]: int(l.split()[1]) * 1024 for l in f if l.startswith(('VmRSS', 'VmHWM'))}
base = rss()['VmRSS']
t = time.perf_counter()
model = load_pretrained(sys.argv[1], device='cpu', dtype=torch.bfloat16)
took = time.perf_counter() - t
params = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({'base': base, 'peak': rss()['VmHWM'], 'params_bytes': params, 'seconds': took}))
"""


def bench_load_memory(workdir: Path) -> dict:
    ckpt = workdir / "mgm-2b-random-bf16"
    if not (ckpt / "config.json").exists():
        print("writing a random MGM-2B-shaped checkpoint (bf16, ~6 GB)…", file=sys.stderr)
        write_random_checkpoint(ckpt, mgm_2b_config())
    size = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    # the child imports this very package: hand it our import path
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(ckpt)], capture_output=True, text=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(sys.path)))
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    m = json.loads(out.stdout.strip().splitlines()[-1])
    return {"load_memory_ratio": round((m["peak"] - m["base"]) / size, 3), "checkpoint_gb": round(size / 1e9, 2),
            "load_peak_gb": round((m["peak"] - m["base"]) / 1e9, 2), "load_seconds": round(m["seconds"], 1)}


# ---- memory of huge / odd uploads -----------------------------------------------------------------
UPLOAD_SIZES = ((16000, 1), (40000, 1000))
UPLOAD_MODELS = {"768": (336, 768, 1, False), "hd1536": (336, 1536, 2, True)}  # lr, hr, grid, global view

_MEASURE_UPLOAD = r"""
import json, sys, time
import numpy as np
from PIL import Image
from mini_gemini.modeling.image_processing import ImageProcessor
from mini_gemini.viz import heatmap as hm
def status():
    with open('/proc/self/status') as f:
        return {l.split(':')[0]: int(l.split()[1]) * 1024 for l in f if l.startswith(('VmRSS', 'VmHWM'))}
def trim():  # hand freed heap back, so that the baseline holds no reusable slack from earlier work
    try:
        import ctypes
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass
def reset_peak():
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # VmHWM := VmRSS (Linux >= 4.0)
        return True
    except OSError:
        return False
def work(img, lr, hr, grid, glob):
    ImageProcessor(lr, hr, grid, glob)(img)
    layout = hm.Layout(side=lr // 14, patch=hr // 4 // grid // (lr // 14), grid=grid, global_view=glob)
    scores = np.random.default_rng(0).random((layout.views, layout.tokens))
    square = hm.assemble(scores, layout)
    hm.overlay(img, square, mark=hm.cell_in_photo(layout, 0, 0, img.size, hm.display_size(*img.size)))
    for view, token in ((0, 0), (layout.views - 1, layout.tokens // 2)):
        hm.zoom(img, layout, view, token, np.full(layout.patch ** 2, 1 / layout.patch ** 2))
sizes, models = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for spec in models.values():  # warm-up: imports, lazy tables, allocator arenas
    work(Image.new('RGB', (64, 48), (10, 200, 30)), *spec)
out = {}
for w, h in sizes:
    img = Image.new('RGB', (w, h), (10, 200, 30))  # the decoded upload: held before the baseline
    img.putpixel((w // 2, h // 2), (255, 255, 255))
    for name, spec in models.items():
        trim()
        base = status()['VmRSS']
        exact = reset_peak()
        t = time.perf_counter()
        work(img, *spec)
        out.setdefault(f'{w}x{h}', {})[name] = {'peak_mb': round((status()['VmHWM'] - base) / 1e6, 1),
                                                'seconds': round(time.perf_counter() - t, 2), 'peak_reset': exact}
    del img
print(json.dumps(out))
"""


def bench_upload_memory(sizes=UPLOAD_SIZES, models=None) -> dict:
    """Peak extra memory of preprocessing + heatmaps for huge, odd uploads, measured in a fresh process
    (VmHWM reset through /proc/self/clear_refs before each; where that is refused, the figure is an
    upper bound: the process's earlier peak counts too)."""
    # the child imports this very package: hand it our import path
    out = subprocess.run([sys.executable, "-c", _MEASURE_UPLOAD, json.dumps(sizes), json.dumps(models or UPLOAD_MODELS)],
                         capture_output=True, text=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(sys.path)))
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    detail = json.loads(out.stdout.strip().splitlines()[-1])
    worst = max(m["peak_mb"] for d in detail.values() for m in d.values())
    return {"upload_peak_mb": worst, "upload_peak_detail": detail}


# ---- speed ----------------------------------------------------------------------------------------
def bench_speed(new_tokens: int = 48) -> dict:
    import numpy as np
    from PIL import Image

    from .chat.engine import Engine, GenOptions
    torch.manual_seed(0)
    model = speed_model()
    engine = Engine(model)
    img = Image.fromarray((np.random.RandomState(0).rand(480, 640, 3) * 255).astype("uint8"))
    greedy = dict(temperature=0.0)

    # mining overhead: the encoder with maps kept (what the engine runs) vs a pass that drops them
    views = model.processor.image_processor(img)
    lr, hr = views.pixel_values[None], views.pixel_values_aux[None]

    def without_maps():
        with torch.no_grad():
            x = model.vision_tower(lr.flatten(0, 1))
            mined, _ = model.mining(x, model.vision_tower_aux(hr))
            model.mm_projector(mined)

    def with_maps():
        with torch.no_grad():
            enc = model.encode_images(lr, hr)
            enc.attn.float().cpu(), enc.gain.cpu()
    t_with, t_without = _interleaved(with_maps, without_maps, 15)

    # time to first token: first turn (encode + full prefill) vs follow-up (cached image and KV)
    def first_turn():
        s = engine.session()
        list(s.chat("Describe the image.", [img], options=GenOptions(max_new_tokens=1, **greedy)))
        return s
    def followup(s):
        list(s.chat("And what colour is it?", options=GenOptions(max_new_tokens=1, **greedy)))
    first_turn()
    t_first = _best(first_turn)
    sessions = [first_turn() for _ in range(3)]
    t_follow = min(_time(lambda s=s: followup(s)) for s in sessions)

    # decode speed: VLM through the engine vs the bare LLM's generate, same context length. A hook on the
    # LLM's forward stamps every decode step, so the rate spans the whole loop (streamer, stopping checks,
    # logits processing) but not the prefill or the image encoding.
    s = first_turn()
    turn = s.turns[-1]
    context = len(turn.prompt_ids) - 1 + engine.tokens_per_image + len(turn.token_ids)
    ids = torch.randint(10, model.config.llm.vocab_size - 10, (1, context))
    stamps = []

    def stamp(module, args, kwargs):
        x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if x is not None and x.shape[1] == 1:
            stamps.append(time.perf_counter())
    hook = model.llm.register_forward_pre_hook(stamp, with_kwargs=True)

    def rate(run):
        stamps.clear()
        run()
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    def bare():
        def work():
            with torch.no_grad():
                model.llm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                   do_sample=False, pad_token_id=0)
        # In a worker thread, as the engine runs it: torch's CPU threading differs between the main thread
        # and others, and the comparison must only see the engine's own extra work.
        t = threading.Thread(target=work)
        t.start()
        t.join()

    def vlm():
        sess = engine.session()
        list(sess.chat("Describe the image.", [img], options=GenOptions(max_new_tokens=new_tokens, ignore_eos=True,
                                                                        **greedy)))
        engine.end_session(sess.id)
    model.llm.generation_config.eos_token_id = None  # no early stop: both run the full length
    rates_bare, rates_vlm = [], []
    for _ in range(5):  # alternate, so that both see the same machine load
        rates_bare.append(rate(bare))
        rates_vlm.append(rate(vlm))
    hook.remove()
    bare_rate, vlm_rate = sorted(rates_bare)[2], sorted(rates_vlm)[2]
    return {"decode_ratio": round(vlm_rate / bare_rate, 3), "bare_llm_tok_s": round(bare_rate, 1),
            "vlm_tok_s": round(vlm_rate, 1), "followup_ttft_ratio": round(t_follow / t_first, 3),
            "first_ttft_s": round(t_first, 3), "followup_ttft_s": round(t_follow, 3),
            "mining_overhead": round(t_with / t_without, 3), "context_tokens": context,
            "threads": torch.get_num_threads()}


from .bench_serving import bench_serving, bench_serving_vllm, serving_figures  # noqa: E402,F401 - re-exported


def _interleaved(a, b, repeat: int) -> tuple[float, float]:
    """Best times of `a` and `b`, run alternately so that both see the same machine load."""
    a(), b()  # warm-up
    ta, tb = [], []
    for _ in range(repeat):
        ta.append(_time(a))
        tb.append(_time(b))
    return min(ta), min(tb)


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    ap.add_argument("--skip-load", action="store_true", help="skip the MGM-2B loading-memory measurement")
    ap.add_argument("--load-only", action="store_true")
    ap.add_argument("--upload-only", action="store_true", help="only the huge-upload memory figure")
    ap.add_argument("--serving-only", action="store_true", help="only the many-users-at-once figures")
    ap.add_argument("--no-serving", action="store_true", help="skip the many-users-at-once figures")
    ap.add_argument("--app-only", action="store_true", help="only the many-users-at-once figures through the app")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mgm-bench"))
    ap.add_argument("--llm-server", metavar="URL", help="also measure serving with the LLM on this vLLM server "
                    "(it must serve the LLM of --checkpoint, see mgm-export-llm)")
    ap.add_argument("--checkpoint", help="the MGM checkpoint whose LLM the --llm-server serves")
    ap.add_argument("--cpu-real-size", action="store_true",
                    help="only the real-size CPU figures: int8 path vs float32 on an MGM-2B-shaped checkpoint (bench_cpu)")
    ap.add_argument("--no-attribution", action="store_true",
                    help="skip the answer-attribution cost (MGM-2B shapes, 6 layers, fp32: ~5 GB, several minutes)")
    args = ap.parse_args(argv)
    if args.llm_server and not args.checkpoint:
        ap.error("--llm-server needs --checkpoint (the MGM checkpoint whose LLM it serves)")
    results = {}
    if args.cpu_real_size:
        from .bench_cpu import bench_cpu_real_size
        results.update(bench_cpu_real_size(Path(args.workdir)))
        args.skip_load = args.no_serving = True
    if args.serving_only or args.app_only:
        args.load_only = args.upload_only = False
        args.skip_load = True
    only = args.cpu_real_size or args.load_only or args.upload_only or args.serving_only or args.app_only
    if not (args.cpu_real_size or args.load_only or args.serving_only or args.app_only):
        results.update(bench_upload_memory())
    if not only:
        results.update(bench_speed())
        from .bench_openai import bench_openai
        results.update(bench_openai())
    if not (args.no_serving or args.load_only or args.upload_only or args.app_only):
        results.update(bench_serving())
    if not (args.no_serving or args.load_only or args.upload_only or args.serving_only):
        from .bench_app import bench_app  # through the app's /chat, as users meet it
        results.update(bench_app())
    if args.llm_server:
        results.update(bench_serving_vllm(args.llm_server, args.checkpoint))
    if not (args.skip_load or args.upload_only or args.serving_only):
        results.update(bench_load_memory(Path(args.workdir)))
    goals = {"load_memory_ratio": "<= 1.2", "decode_ratio": ">= 0.95", "followup_ttft_ratio": "<= 0.25",
             "mining_overhead": "<= 1.03", "upload_peak_mb": "< 100", "serving_ttft_p95_x8": "<= 3",
             "serving_all_answers_x8": "<= 0.6", "app_ttft_p95_x8": "<= 3", "app_all_answers_x8": "<= 0.5",
             "app_answers_equal": "True", "cpu_first_token_s": "<= 20", "cpu_decode_vs_bound": ">= 0.8",
             "openai_followup_ttft_ratio": "<= 0.25", "openai_ttft_p95_x8": "<= 3", "openai_all_answers_x8": "<= 0.5",
             "openai_answers_equal": "True"}
    if not (only or args.no_attribution):  # answer attribution's extra pass vs a prefill (bench_attribution)
        from . import bench_attribution
        results.update(bench_attribution.bench_attribution())
        goals.update(bench_attribution.GOALS)
    report(results, goals, args.json)


if __name__ == "__main__":
    main()

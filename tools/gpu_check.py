#!/usr/bin/env python
"""One prepared check of Mini-Gemini's CUDA paths: one command, one JSON report and a readable summary.

    python tools/gpu_check.py [--device cuda|cpu] [--quick] [--json-out FILE] [--only a,b] [--workdir DIR]

On a GPU machine without network (see README, "GPU check"): fetch the wheels here with
`bash tools/fetch_gpu_wheels.sh`, carry the repository with tools/gpu_wheels/, run
`python3 tools/gpu_check.py --json-out $OUT/gpu_check.json`; the wheels of the packages that machine lacks
(diffusers, spaces, bitsandbytes and their small dependencies) are installed from that folder first, with
`pip install --no-index --find-links`. `--device cpu --quick` runs the same code paths on the CPU with small
shapes (CI runs it: tests/test_gpu_check.py). Exit status 1 when a check fails, 2 for bad arguments.

Checks (every one goes through the product's public API: load_pretrained, Engine, ImageGenerator, the app's
ZeroGPU function; nothing is re-implemented here):

- parity: tiny checkpoints of every family (gemma, vicuna, llama3, mistral, mixtral, yi), 336 and HD, loaded
  in bf16 and fp16 on the device against the same checkpoint in fp32 on the CPU: visual tokens, mining
  weights, prompt logits and greedy tokens (8 steps). --quick: one dtype per layout (336 in bf16, HD in fp16).
- size_2b, size_7b_hd: random weights with MGM-2B's and MGM-7B-HD's true shapes (bf16, written on the local
  disk, `mini_gemini.bench.write_random_checkpoint`): load time, peak memory ÷ weight bytes; one image turn
  through `Engine` / `session.chat`: image encoding, time to first token, decode tokens/s ÷ the bound
  (memory bandwidth measured in this run by a copy ÷ bytes read per token: the LLM's weights once plus the
  KV cache); the scheduler with 8 users at once (`bench_serving.serving_figures`: first-token p95 ÷ one
  user's, all answers ÷ serial). --quick: the same configs with tiny shapes.
- quant_4bit, quant_8bit (bitsandbytes, CUDA only; on a CPU the loader's own refusal is reported as
  "skipped: needs CUDA"), device_map_auto: the 7B-HD checkpoint loads and answers an image turn; memory ÷
  the unquantised load's, prompt logits against the bf16 model's (a figure; random weights have no
  "right" answer).
- imagegen: the tiny SDXL pipeline renders through `ImageGenerator` in the device's default dtype (fp16 on
  CUDA) and matches an fp32 render of the same seed on the same device within 1 pixel level on average (fp16
  against fp32 on this CPU: 0.04 levels, at most 1); an `Engine` turn with generate_image draws on the device.
- imagegen_offload (CUDA only): `offload="always"` (model CPU offload) renders the same image, using less
  GPU memory.
- zerogpu: the app's `@spaces.GPU` function (`mini_gemini.ui.zerogpu.turn_events`) decorated by the real
  `spaces` package outside a Space (a pass-through there), run on the device: a turn, and a turn as a
  ZeroGPU worker runs it (stale history adopted, history handed back); its tokens equal `session.chat`'s.

Tolerances of the parity check, for a tensor a (device, low precision) against b (CPU, fp32, same weights:
the checkpoint is saved in the low dtype, so both hold exactly the same values and only arithmetic differs).
With u the unit roundoff (bf16 2^-8 = 3.9e-3, fp16 2^-11 = 4.9e-4), every tolerance is C x u:

| figure | measure | C | bf16 | fp16 | worst on this CPU, 24 cases: bf16 (C) / fp16 (C) |
|---|---|---|---|---|---|
| visual tokens | ‖a-b‖/‖b‖ | 48 | 0.19 | 0.023 | 0.050 (13) / 0.0061 (12) |
| mining weights | max abs (probabilities) | 8 | 0.031 | 0.0039 | 0.011 (2.7) / 0.0008 (1.6) |
| prompt logits | ‖a-b‖/‖b‖ | 128 | 0.5 | 0.0625 | 0.17 (44) / 0.015 (30) |
| greedy tokens | logit gap ÷ rms logit | 192 | 0.75 | 0.094 | 0.29 (75) / 0.0041 (8) |

Rounding errors grow with depth and the tiny models are made sensitive on purpose (`testing.tiny.liven`:
large gains, so that one pixel changes the answer): their amplification C (error ÷ u) is about the same for
both dtypes, about 13 for the visual tokens and 30-44 for the logits, on the CPU in PyTorch's own kernels.
The tolerances allow about 3x that for the GPU's kernels (other reduction orders, flash attention rounding
its softmax to the low dtype); a real fault (a wrong layout, lost scaling, a mask or position bug, NaN)
gives errors of order 1. Greedy tokens: the device's greedy tokens are replayed on the fp32 model (teacher
forcing) and at every step the token the device chose must be within `gap` of the fp32 model's best logit
(gap = its tolerance x the rms of the fp32 logits, about 1 here; a random token lies about 3 below the
best): two decoders may only part ways at a near tie, where the gap is at most twice the logit error. Later
steps are still compared, each on the device's own prefix; whether all steps are identical is reported too.
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's mini_gemini, also where the package is not installed
os.environ.setdefault("HF_HUB_OFFLINE", "1")          # nothing may wait on a network that is not there
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHECKS = ("parity", "size_2b", "size_7b_hd", "quant_4bit", "quant_8bit", "device_map_auto", "imagegen",
          "imagegen_offload", "zerogpu")
FAMILIES = ("gemma", "vicuna", "llama3", "mistral", "mixtral", "yi")
UNIT_ROUNDOFF = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}
TOLERANCE_C = {"tokens": 48, "attn": 8, "logits": 128, "gap": 192}
GREEDY_STEPS = 8
# Packages the GPU machine lacks, installed from the carried wheels: module -> distribution. spaces and
# bitsandbytes go without their dependencies: spaces requires gradio, which it never imports outside a
# Space, and bitsandbytes requires torch, whose own pins pip cannot check offline (torch, numpy and packaging
# are there, or this script would not run); the others bring theirs from the folder where they are missing.
WHEEL_PACKAGES = {"diffusers": "diffusers", "bitsandbytes": "bitsandbytes", "pydantic": "pydantic",
                  "spaces": "spaces", "transformers": "transformers"}
NO_DEPS = ("bitsandbytes", "spaces", "transformers")
# Installed but too old: upgraded from the wheels (the GPU image has transformers 5.17; the engine hands the
# KV cache over as `cache=`, 5.24's name; 5.24's requirements hold there: its huggingface_hub 1.33 >= 1.31,
# the rest as 5.17's).
MIN_VERSIONS = {"transformers": "5.24"}
NEEDS_CUDA = "needs CUDA"


def tolerances(dtype_name: str) -> dict:
    """The parity tolerances of one dtype (see the module docstring): C x unit roundoff."""
    u = UNIT_ROUNDOFF[dtype_name]
    return {k: c * u for k, c in TOLERANCE_C.items()}


# ---- the report ---------------------------------------------------------------------------------------
class Skip(Exception):
    """A check that cannot run here; the message says why."""


class Report:
    """Per check: status (pass / fail / skipped), reason, seconds and figures; written after every check."""

    def __init__(self, args, device: str):
        self.t0 = time.perf_counter()
        self.path = Path(args.json_out) if args.json_out else None
        self.data = {"device": device, "quick": bool(args.quick), "environment": environment(device),
                     "checks": {}, "ok": None, "seconds": None}

    def log(self, message: str):
        print(f"[{time.perf_counter() - self.t0:7.1f} s] {message}", file=sys.stderr, flush=True)

    @contextmanager
    def check(self, name: str):
        """Run a block as check `name`; it fills the yielded dict `figures`, may set `figures['_missed']`
        (goals a figure did not meet, reported, not failed), raises Skip, or raises to fail."""
        self.log(f"{name}: start")
        entry = {"status": "pass", "reason": None, "seconds": None, "figures": {}}
        self.data["checks"][name] = entry
        t = time.perf_counter()
        try:
            yield entry["figures"]
        except Skip as e:
            entry.update(status="skipped", reason=str(e))
        except Exception as e:  # noqa: BLE001 - every failure is reported, and the next check runs
            entry.update(status="fail", reason=f"{type(e).__name__}: {e}",
                         traceback=traceback.format_exc().splitlines()[-25:])
        finally:
            entry["seconds"] = round(time.perf_counter() - t, 2)
            missed = entry["figures"].pop("_missed", None)
            if missed:
                entry["missed_goals"] = missed
            self.log(f"{name}: {entry['status']}" + (f" ({entry['reason']})" if entry["reason"] else ""))
            free_memory()
            self.write()

    def write(self):
        checks = self.data["checks"].values()
        self.data["ok"] = all(c["status"] != "fail" for c in checks)
        self.data["seconds"] = round(time.perf_counter() - self.t0, 1)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=1, default=str))


def environment(device: str) -> dict:
    import torch
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "threads": torch.get_num_threads()}
    for mod in ("transformers", "accelerate", "timm", "diffusers", "bitsandbytes", "spaces"):
        env[mod] = _version(mod)
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2 ** 30, 1), capability=f"{p.major}.{p.minor}")
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def _version(module: str):
    from importlib import metadata
    try:
        return metadata.version(WHEEL_PACKAGES.get(module, module))
    except metadata.PackageNotFoundError:
        return None


def summary(report: dict) -> str:
    """The readable part: one line per check, its main figures, and the verdict."""
    env = report["environment"]
    where = env.get("gpu") or env.get("cpu")
    lines = [f"GPU check on {report['device']} ({where}; torch {env['torch']}, transformers {env['transformers']})"
             + (" --quick" if report["quick"] else "")]
    for name, c in report["checks"].items():
        head = f"  {name:<17} {c['status'].upper():<7} {c['seconds']:>6.1f} s"
        if c["reason"]:
            head += f"  {c['reason']}"
        lines.append(head)
        shown = {k: v for k, v in c["figures"].items() if not isinstance(v, (dict, list))}
        if shown:
            lines.append("      " + ", ".join(f"{k}={v}" for k, v in shown.items()))
        for k, v in c["figures"].items():  # parity: the worst case per dtype, and its tolerances
            if k.startswith(("worst_", "tolerance_")):
                lines.append(f"      {k}: " + ", ".join(f"{a}={b}" for a, b in v.items()))
        for goal in c.get("missed_goals", []):
            lines.append(f"      missed goal: {goal}")
    failed = [n for n, c in report["checks"].items() if c["status"] == "fail"]
    lines.append(f"{'FAILED: ' + ', '.join(failed) if failed else 'all checks passed or skipped'} "
                 f"({report['seconds']} s)")
    return "\n".join(lines)


# ---- helpers ------------------------------------------------------------------------------------------
def free_memory(wait_s: float = 5.0):
    """Collect garbage until no model is left, for at most `wait_s` (an engine's scheduler thread may hold it
    a moment after the last answer), then hand the freed GPU memory back: every check starts clean."""
    import torch

    from mini_gemini.modeling.model import MiniGemini
    deadline = time.monotonic() + wait_s
    while True:
        gc.collect()
        if not any(isinstance(o, MiniGemini) for o in gc.get_objects()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: str):
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of a block in bytes, above what was in use when it started: the CUDA allocator's
    high-water mark on a GPU, the process's RSS high-water mark on the CPU (Linux; reset through
    /proc/self/clear_refs, where that is refused the figure is an upper bound). `.held` is what stays in
    use after the block."""

    def __init__(self, device: str):
        self.device, self.peak, self.held = device, None, None

    def __enter__(self):
        import torch
        free_memory()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _trim_heap()
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
            self.base = _status()["VmRSS"]
        return self

    def __exit__(self, *exc):
        import torch
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
            self.held = torch.cuda.memory_allocated(self.device) - self.base
        else:
            s = _status()
            self.peak, self.held = s["VmHWM"] - self.base, s["VmRSS"] - self.base
        return False


def _status() -> dict:
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.startswith(("VmRSS", "VmHWM"))}


def _trim_heap():
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def test_image(size=(640, 480), seed: int = 0):
    """A fixed photo-sized RGB image of noise (PIL)."""
    import numpy as np
    from PIL import Image
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


def rel_err(a, b) -> float:
    """‖a-b‖ / ‖b‖ in float64 (NaN stays NaN, so that `not err <= tol` fails it)."""
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def within(value: float, limit: float) -> bool:
    return value == value and value <= limit  # NaN fails


def run_turn(session, text, images=(), **options):
    """One `session.chat` turn, timed: (turn, events, seconds to the first text delta, seconds to done)."""
    from mini_gemini.chat import GenOptions
    t = time.perf_counter()
    first, done, turn, events = None, None, None, []
    for ev in session.chat(text, images, generate_image=options.pop("generate_image", False),
                           options=GenOptions(**dict(dict(temperature=0.0), **options))):
        events.append(ev)
        if ev.kind == "delta" and first is None and ev.text:
            first = time.perf_counter() - t
        elif ev.kind == "done":
            done, turn = time.perf_counter() - t, ev.data
        elif ev.kind == "error":
            raise RuntimeError(f"the turn failed: {ev.text} ({ev.data})")
    if turn is None:
        raise RuntimeError(f"the turn ended without a done event: {[e.kind for e in events]}")
    return turn, events, first if first is not None else done, done


def tiny_engine(device: str, dtype=None, family: str = "vicuna", image_generator=None):
    """A tiny checkpoint written and loaded through load_pretrained on `device`, in an Engine."""
    from mini_gemini.chat import Engine
    from mini_gemini.modeling.loading import load_pretrained, save_pretrained
    from mini_gemini.testing.tiny import build_tiny
    folder = Path(tempfile.mkdtemp(prefix=f"mgm-{family}-"))
    save_pretrained(build_tiny(family), folder)
    return Engine(load_pretrained(str(folder), device=device, dtype=dtype), image_generator)


# ---- wheels -------------------------------------------------------------------------------------------
def install_wheels(folder: Path, log) -> dict:
    """Install, from `folder` only (no index), the packages of WHEEL_PACKAGES this Python lacks (NO_DEPS
    without their dependencies). Returns {module: "present" / "installed" / "missing" / why it failed}."""
    from packaging.version import Version
    state = {}
    for m in WHEEL_PACKAGES:
        if importlib.util.find_spec(m) is None:
            state[m] = "missing"
        elif m in MIN_VERSIONS and Version(_version(m)) < Version(MIN_VERSIONS[m]):
            state[m] = f"{_version(m)} < {MIN_VERSIONS[m]}"
        else:
            state[m] = "present"
    missing = [m for m, what in state.items() if what != "present"]
    if not missing:
        return state
    if not folder.is_dir() or not any(folder.glob("*.whl")):
        log(f"wheels: {', '.join(missing)} missing and no wheels in {folder} (bash tools/fetch_gpu_wheels.sh)")
        return state
    base = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(folder), "-q",
            "--disable-pip-version-check", "--no-warn-script-location"]
    for module in missing:
        spec = WHEEL_PACKAGES[module] + (f">={MIN_VERSIONS[module]}" if module in MIN_VERSIONS else "")
        cmd = base + (["--no-deps"] if module in NO_DEPS else []) + [spec]
        out = subprocess.run(cmd, capture_output=True, text=True)
        importlib.invalidate_caches()
        ok = out.returncode == 0 and importlib.util.find_spec(module) is not None and \
            (module not in MIN_VERSIONS or Version(_version(module)) >= Version(MIN_VERSIONS[module]))
        state[module] = "installed" if ok else f"install failed: {(out.stderr or out.stdout).strip()[-400:]}"
        log(f"wheels: {module} {state[module]}")
    return state


# ---- 1. parity ----------------------------------------------------------------------------------------
def check_parity(device: str, quick: bool, work: Path, fig: dict, log):
    import torch

    from mini_gemini.chat.templates import Turn
    from mini_gemini.modeling.loading import load_pretrained, save_pretrained
    from mini_gemini.testing.tiny import build_tiny
    img = test_image((64, 48))
    cases = [(f, hd, dt) for f in FAMILIES for hd in (False, True) for dt in ("bfloat16", "float16")
             if not quick or dt == ("float16" if hd else "bfloat16")]
    failures, built = [], {}
    for family, hd, dt in cases:
        if (family, hd) not in built:
            built = {(family, hd): build_tiny(family, hd=hd)}  # one at a time
        name = f"{family}-{'hd' if hd else '336'}-{dt}"
        folder = work / f"parity-{name}"
        # saved in the low dtype: the CPU fp32 reference holds exactly the device's weights
        save_pretrained(copy.deepcopy(built[family, hd]).to(getattr(torch, dt)), folder)
        ref = load_pretrained(str(folder), device="cpu", dtype=torch.float32)
        dev = load_pretrained(str(folder), device=device, dtype=getattr(torch, dt))
        p = ref.processor
        ids = p.tokenize(p.build_prompt([Turn("Describe the image.", 1)]))
        views = p.images(img)
        lr, hr = views.pixel_values[None], views.pixel_values_aux[None]
        with torch.no_grad():
            er, ed = ref.encode_images(lr, hr), dev.encode_images(lr, hr)
            lref = ref.llm(inputs_embeds=ref.embed(ids, [er.image_features[0]])).logits[0].float()
            ldev = dev.llm(inputs_embeds=dev.embed(ids, [ed.image_features[0]])).logits[0].float().cpu()
        greedy_dev = dev.generate(ids, [ed.image_features[0]], max_new_tokens=GREEDY_STEPS).tolist()
        greedy_ref = ref.generate(ids, [er.image_features[0]], max_new_tokens=GREEDY_STEPS).tolist()
        with torch.no_grad():  # the device's tokens replayed on the fp32 model
            forced = ref.llm(inputs_embeds=ref.embed(ids + greedy_dev[:-1], [er.image_features[0]])) \
                .logits[0, -len(greedy_dev):].float() if greedy_dev else lref[-1:]
        gaps = [float(forced[k].max() - forced[k, t]) for k, t in enumerate(greedy_dev)]
        tol = tolerances(dt)
        rms = float(lref.pow(2).mean().sqrt())
        row = {"tokens_rel": rel_err(ed.image_features.float(), er.image_features),
               "attn_abs": float((ed.attn.float().cpu() - er.attn.float()).abs().max()),
               "logits_rel": rel_err(ldev, lref), "greedy_gap": max(gaps, default=0.0),
               "greedy_identical": greedy_dev == greedy_ref, "greedy_steps": len(greedy_dev),
               "visual_tokens": int(ed.image_features.shape[1]),
               "on_device": str(ed.image_features.device), "dtype": str(ed.image_features.dtype)}
        limits = {"tokens_rel": tol["tokens"], "attn_abs": tol["attn"], "logits_rel": tol["logits"],
                  "greedy_gap": tol["gap"] * rms}
        bad = [f"{k} {row[k]:.4g} > {v:.4g}" for k, v in limits.items() if not within(row[k], v)]
        if not row["on_device"].startswith(device.split(":")[0]) or row["dtype"] != f"torch.{dt}":
            bad.append(f"ran on {row['on_device']} in {row['dtype']}")
        fig[name] = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}
        if bad:
            failures.append(f"{name}: {'; '.join(bad)}")
        log(f"parity {name}: " + ", ".join(f"{k}={fig[name][k]}" for k in
                                           ("tokens_rel", "attn_abs", "logits_rel", "greedy_gap",
                                            "greedy_identical")) + (" FAIL" if bad else ""))
        del ref, dev
        shutil.rmtree(folder, ignore_errors=True)
    for dt in sorted({dt for _, _, dt in cases}):
        rows = [fig[f"{f}-{'hd' if hd else '336'}-{d}"] for f, hd, d in cases if d == dt]
        fig[f"worst_{dt}"] = {k: max(r[k] for r in rows) for k in ("tokens_rel", "attn_abs", "logits_rel",
                                                                    "greedy_gap")}
        fig[f"worst_{dt}"]["greedy_identical"] = f"{sum(r['greedy_identical'] for r in rows)}/{len(rows)}"
        fig[f"tolerance_{dt}"] = {k: round(v, 5) for k, v in tolerances(dt).items()}
    fig["cases"] = len(cases)
    if failures:
        raise AssertionError(" | ".join(failures))


# ---- 2. real sizes ------------------------------------------------------------------------------------
def real_config(shape: str, quick: bool) -> tuple[dict, str]:
    """(config.json dict, stand-in tokenizer family) of MGM-2B or MGM-7B-HD; --quick: the same family and
    layout with tiny shapes (`testing.tiny.tiny_config`)."""
    from mini_gemini.bench_models import mgm_2b_config, mgm_7b_hd_config
    family = {"2b": "gemma", "7b_hd": "vicuna"}[shape]
    if not quick:
        return (mgm_2b_config() if shape == "2b" else mgm_7b_hd_config()), family
    from mini_gemini.testing.tiny import tiny_config
    from mini_gemini.testing.tiny_tokenizer import build_tokenizer
    cfg = tiny_config(family, build_tokenizer(family), hd=shape == "7b_hd")
    # the true vocabulary, as at full size: random weights write ids the stand-in tokenizer does not know
    cfg["vocab_size"] = (mgm_2b_config() if shape == "2b" else mgm_7b_hd_config())["vocab_size"]
    return cfg, family


def checkpoint_bytes(cfg: dict) -> int:
    """Bytes of a bf16 checkpoint of `cfg`'s shapes (counted on a model without storage)."""
    from accelerate import init_empty_weights

    from mini_gemini.modeling.config import MGMConfig
    from mini_gemini.modeling.loading import official_state_dict
    from mini_gemini.modeling.model import MiniGemini
    with init_empty_weights():
        model = MiniGemini(MGMConfig.from_dict(cfg))
    return sum(t.numel() * 2 for t in official_state_dict(model).values())


def memory_bandwidth(device: str, quick: bool) -> float:
    """Bytes per second a copy moves (read + written) on `device`: the best of several copies of a buffer
    far larger than any cache (1 GiB on a GPU, 128 MiB on a CPU)."""
    import torch
    n = (128 << 20 if quick or not device.startswith("cuda") else 1 << 30) // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(8):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n * 4 / best


def bytes_per_token(model, context: int) -> int:
    """Bytes one decode step must read: the LLM's weights (the output head once; the input embedding only
    as the head when they are tied, else one row) plus the KV cache of `context` tokens."""
    llm = model.llm
    seen, total = set(), 0
    embed = llm.get_input_embeddings().weight
    head = llm.get_output_embeddings().weight if llm.get_output_embeddings() is not None else None
    for p in llm.parameters():
        if id(p) in seen or (p is embed and p is not head):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    c = llm.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    kv = 2 * c.num_hidden_layers * kv_heads * head_dim * context * embed.element_size()
    return total + kv


def check_size(shape: str, device: str, quick: bool, work: Path, fig: dict, log, keep: dict):
    import torch

    from mini_gemini.bench_models import write_random_checkpoint
    from mini_gemini.bench_serving import serving_figures
    from mini_gemini.chat import Engine
    from mini_gemini.modeling.loading import load_pretrained
    cfg, tok_family = real_config(shape, quick)
    folder = work / f"mgm-{shape}-random-bf16"
    free, need = shutil.disk_usage(work).free, checkpoint_bytes(cfg)
    if free < need + (1 << 30):
        raise RuntimeError(f"{need / 1e9:.1f} GB of weights do not fit the {free / 1e9:.1f} GB free in {work}: "
                           "give --workdir a folder with room (e.g. /dev/shm, which is memory)")
    t = time.perf_counter()
    write_random_checkpoint(folder, cfg, tokenizer=tok_family, device="cuda" if device.startswith("cuda") else "cpu")
    fig["write_s"] = round(time.perf_counter() - t, 1)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    fig["weights_gb"] = round(size / 1e9, 3)
    fig["disk_free_gb_before"] = round(free / 1e9, 1)
    keep["folder"] = folder
    log(f"{shape}: wrote {size / 1e9:.2f} GB in {fig['write_s']} s")

    with PeakMemory(device) as mem:
        t = time.perf_counter()
        model = load_pretrained(str(folder), device=device, dtype=torch.bfloat16)
        sync(device)
        fig["load_s"] = round(time.perf_counter() - t, 2)
    fig["load_peak_gb"] = round(mem.peak / 1e9, 3)
    fig["load_peak_ratio"] = round(mem.peak / size, 3)
    if device.startswith("cuda"):  # what earlier checks left allocated (their models should be gone)
        fig["gpu_in_use_before_gb"] = round(mem.base / 1e9, 3)
    keep["load_peak"], keep["load_held"] = mem.peak, mem.held
    log(f"{shape}: loaded in {fig['load_s']} s, peak {fig['load_peak_gb']} GB for {fig['weights_gb']} GB")
    if model.device.type != device.split(":")[0]:
        raise AssertionError(f"the model is on {model.device}, not {device}")

    engine = Engine(model)
    img = test_image()
    new_tokens = 8 if quick else 64
    # warm-up: kernels, cuDNN's choice of convolution algorithms, the scheduler's thread
    # every answer runs to its max_new_tokens (ignore_eos): random weights may write an end token at any step, and
    # speed figures need a known length (as mini_gemini.bench does)
    run_turn(engine.session(), "Describe the image.", [img], max_new_tokens=2, ignore_eos=True)

    encode_times = []
    for _ in range(3):
        t = time.perf_counter()
        engine.runner.encode(img)  # returns the mining maps on the CPU: the device has finished
        encode_times.append(time.perf_counter() - t)
    fig["image_encode_s"] = round(min(encode_times), 4)

    # Times to the end of fresh image turns of 1 and of N tokens (best of 2): the first is the time to the first
    # token (image encoding, prefill, one step), their difference N - 1 decode steps. Stream deltas would say
    # when text shows, but random weights write ids the stand-in tokenizer decodes to nothing.
    def best(tokens):
        runs = [run_turn(engine.session(), "Describe the image.", [img], max_new_tokens=tokens, ignore_eos=True)
                for _ in range(2)]
        return min(runs, key=lambda r: r[3])
    turn1, turn = best(1), best(new_tokens)
    ttft, done = turn1[3], turn[3]
    turn = turn[0]
    n = len(turn.token_ids)
    if n != new_tokens:
        raise AssertionError(f"the turn wrote {n} tokens, not {new_tokens}")
    image = turn.images[0]
    fig["visual_tokens"] = int(image.tokens.shape[0])
    fig["prompt_tokens"] = len(turn.prompt_ids) - 1 + fig["visual_tokens"]
    fig["ttft_s"] = round(ttft, 4)
    fig["turn_s"] = round(done, 4)
    # (on tiny --quick models both times are a few ms and their noise can swap them: no figure then)
    decode = (n - 1) / (done - ttft) if done > ttft else None
    bw = memory_bandwidth(device, quick)
    per_token = bytes_per_token(model, fig["prompt_tokens"] + n // 2)
    bound = bw / per_token
    fig.update(decode_tok_s=decode and round(decode, 2), bandwidth_gb_s=round(bw / 1e9, 1),
               bytes_per_token_gb=round(per_token / 1e9, 4), decode_bound_tok_s=round(bound, 2),
               decode_of_bound=decode and round(decode / bound, 3), decode_tokens=n)
    if decode is None and not quick:
        raise AssertionError(f"{n} tokens took no longer than 1 ({done:.3f} s vs {ttft:.3f} s)")
    log(f"{shape}: encode {fig['image_encode_s']} s, ttft {fig['ttft_s']} s, decode {decode} tok/s "
        f"(bound {bound:.1f})")
    # text-only prompt logits, kept as the reference of the quantised loads
    ids = model.processor.tokenize(model.processor.build_prompt([_prompt_turn("Count to ten, please.")]))
    with torch.no_grad():
        keep["ref_logits"] = model.llm(inputs_embeds=model.embed(ids)).logits[0].float().cpu()
    keep["ref_ids"] = ids

    serving = serving_figures(engine, users=(1, 8), new_tokens=6 if quick else 32, repeat=1 if quick else 2,
                              ignore_eos=True)
    fig.update({f"serving_{k}": v for k, v in serving.items() if k.endswith(("x8", "_s")) or k == "tokens_x1"})
    expected = 8 * (6 if quick else 32)
    if serving.get("tokens_x8") != expected:
        raise AssertionError(f"8 users got {serving.get('tokens_x8')} tokens in all, not {expected}")
    log(f"{shape}: serving p95 x8 {serving['ttft_p95_x8']}, all answers x8 {serving['all_answers_x8']}")
    if not quick:
        goals = {"load_peak_ratio": (fig["load_peak_ratio"], 1.2, "<="),
                 "serving_ttft_p95_x8": (fig["serving_ttft_p95_x8"], 3.0, "<="),
                 "serving_all_answers_x8": (fig["serving_all_answers_x8"], 0.6, "<=")}
        fig["_missed"] = [f"{k} {v} (goal {op} {g})" for k, (v, g, op) in goals.items() if not v <= g]
    if fig["load_peak_ratio"] > 1.5 and not quick:
        raise AssertionError(f"loading peaked at {fig['load_peak_ratio']} x the weights (weights held twice?)")


def _prompt_turn(text: str):
    from mini_gemini.modeling.chat_template import PromptTurn
    return PromptTurn(text, 0)


# ---- 3. quantised and spread --------------------------------------------------------------------------
def check_variant(kind: str, device: str, quick: bool, fig: dict, log, big: dict):
    import torch

    from mini_gemini.chat import Engine
    from mini_gemini.errors import ModelLoadError
    from mini_gemini.modeling.loading import load_pretrained
    folder = big.get("folder")
    if folder is None or not (Path(folder) / "config.json").exists():
        raise RuntimeError("no 7B-HD checkpoint: size_7b_hd did not write one (run it in the same call)")
    kw = {"quant_4bit": dict(load_in_4bit=True), "quant_8bit": dict(load_in_8bit=True),
          "device_map_auto": dict(device_map="auto")}[kind]
    with PeakMemory(device) as mem:
        t = time.perf_counter()
        try:
            model = load_pretrained(str(folder), device=device, dtype=torch.bfloat16, **kw)
        except ModelLoadError as e:
            if "quant" in kind and not device.startswith("cuda"):
                raise Skip(f"{NEEDS_CUDA} (the loader says: {e})") from e
            raise
        sync(device)
        fig["load_s"] = round(time.perf_counter() - t, 2)
    fig["load_peak_gb"] = round(mem.peak / 1e9, 3)
    fig["held_gb"] = round(mem.held / 1e9, 3)
    if device.startswith("cuda"):
        fig["gpu_in_use_before_gb"] = round(mem.base / 1e9, 3)
    if big.get("load_held"):
        fig["held_vs_bf16"] = round(mem.held / big["load_held"], 3)
        fig["peak_vs_bf16"] = round(mem.peak / big["load_peak"], 3)
    placed = sorted({str(p.device) for p in model.parameters()})
    fig["devices"] = placed
    if "quant" in kind:
        linear = model.llm.model.layers[0].self_attn.q_proj
        fig["layer_type"] = type(linear).__name__
        fig["weight_dtype"] = str(linear.weight.dtype)
        if not type(linear).__module__.startswith("bitsandbytes"):
            raise AssertionError(f"the decoder layers are {type(linear).__name__}, not bitsandbytes layers")
    with torch.no_grad():
        logits = model.llm(inputs_embeds=model.embed(big["ref_ids"])).logits[0].float().cpu()
    fig["logits_rel_vs_bf16"] = round(rel_err(logits, big["ref_logits"]), 4)
    if not torch.isfinite(logits).all():
        raise AssertionError("non-finite logits")
    engine = Engine(model)
    new_tokens = 4 if quick else 16
    turn, _, _, done = run_turn(engine.session(), "Describe the image.", [test_image()], max_new_tokens=new_tokens,
                                ignore_eos=True)
    fig.update(answer_tokens=len(turn.token_ids), answer_s=round(done, 3))
    if len(turn.token_ids) != new_tokens:
        raise AssertionError(f"the answer has {len(turn.token_ids)} tokens, not {new_tokens}")
    log(f"{kind}: held {fig['held_gb']} GB ({fig.get('held_vs_bf16')} x bf16), answered {new_tokens} tokens")


# ---- 4. image generation ------------------------------------------------------------------------------
def check_imagegen(device: str, quick: bool, work: Path, fig: dict, log, keep: dict):
    import numpy as np
    import torch

    from mini_gemini.imagegen import ImageGenerator
    from mini_gemini.testing.tiny_sdxl import build_tiny_sdxl
    folder = build_tiny_sdxl(work / "sdxl-tiny", seed=0)
    keep["sdxl"] = folder
    steps = 2 if quick else 8
    prompt = "a photo of a red cat on a blue sea"
    gen = ImageGenerator(str(folder), device=device, offload="never")
    with PeakMemory(device) as mem:
        image = gen.generate(prompt, steps=steps, seed=0)
    a = np.asarray(image).astype(np.float64)
    fig.update(dtype=str(gen.dtype), size=list(image.size), pixel_std=round(float(a.std()), 2),
               peak_gb=round(mem.peak / 1e9, 4))
    keep["image"], keep["peak"] = a, mem.peak
    if image.size != (gen.native_size(),) * 2 or not a.std() > 1.0:
        raise AssertionError(f"the render is {image.size} with pixel std {a.std():.2f} (blank or broken)")
    if gen.dtype != torch.float32:  # the same seed in float32 on the same device: the same picture
        ref = ImageGenerator(str(folder), device=device, dtype=torch.float32, offload="never")
        b = np.asarray(ref.generate(prompt, steps=steps, seed=0)).astype(np.float64)
        fig["vs_float32_mean_abs"] = round(float(np.abs(a - b).mean()), 3)  # pixel levels, 0..255
        fig["vs_float32_max_abs"] = round(float(np.abs(a - b).max()), 1)
        if not fig["vs_float32_mean_abs"] <= 1.0:  # fp16 on this CPU: 0.04 levels (max 1); bf16: 0.6 (max 5)
            raise AssertionError(f"{gen.dtype} render differs from float32's by {fig['vs_float32_mean_abs']} levels")
        del ref
    # through the engine: a turn asking for a picture is drawn on the device
    engine = tiny_engine(device, image_generator=gen)
    turn, events, _, _ = run_turn(engine.session(), "Please generate an image of a cat.", generate_image=True,
                                  max_new_tokens=8, steps=steps, image_seed=0)
    drawn = [e for e in events if e.kind == "image"]
    if not drawn or turn.generated_image is None:
        raise AssertionError(f"no image was drawn in the engine's turn: {[str(n) for n in turn.notes]}")
    fig["engine_turn_image"] = list(drawn[0].data.size)
    log(f"imagegen: {gen.dtype} render std {fig['pixel_std']}, vs fp32 {fig.get('vs_float32_mean_abs', 0)} levels")


def check_imagegen_offload(device: str, quick: bool, fig: dict, log, keep: dict):
    import numpy as np

    from mini_gemini.imagegen import ImageGenerator
    folder = keep.get("sdxl")
    if folder is None:
        raise RuntimeError("no tiny SDXL: the imagegen check did not build one")
    steps = 2 if quick else 8
    gen = ImageGenerator(str(folder), device=device, offload="always")
    with PeakMemory(device) as mem:
        image = gen.generate("a photo of a red cat on a blue sea", steps=steps, seed=0)
    fig["offloaded"] = gen.offloaded
    if not device.startswith("cuda"):
        if gen.offloaded:
            raise AssertionError("the CPU generator says it offloads")
        raise Skip(f"{NEEDS_CUDA} (on the CPU offload='always' renders without offload, as designed)")
    if not gen.offloaded:
        raise AssertionError("offload='always' did not enable model CPU offload")
    a = np.asarray(image).astype(np.float64)
    fig["vs_no_offload_max_abs"] = round(float(np.abs(a - keep["image"]).max()), 1)
    fig["peak_gb"] = round(mem.peak / 1e9, 4)
    fig["peak_vs_no_offload"] = round(mem.peak / max(keep["peak"], 1), 3)
    if not fig["vs_no_offload_max_abs"] <= 2.0:
        raise AssertionError(f"the offloaded render differs by {fig['vs_no_offload_max_abs']} levels")
    log(f"imagegen_offload: peak {fig['peak_gb']} GB ({fig['peak_vs_no_offload']} x without offload)")


# ---- 5. ZeroGPU ---------------------------------------------------------------------------------------
def check_zerogpu(device: str, fig: dict, log):
    import inspect

    from mini_gemini.chat import GenOptions
    try:
        import spaces
    except ImportError as e:
        raise RuntimeError(f"the spaces package is not installed ({e}); pip install spaces") from e
    from mini_gemini.ui import zerogpu
    fig["spaces"] = _version("spaces")
    fig["spaces_zero_gpu"] = os.environ.get("SPACES_ZERO_GPU")
    if zerogpu.spaces is not spaces:
        raise AssertionError("mini_gemini.ui.zerogpu did not pick up the spaces package")
    # outside a Space the decorator hands the function back: it runs here, in this process, on `device`
    if not inspect.isgeneratorfunction(zerogpu.turn_events):
        raise AssertionError(f"spaces.GPU wrapped the turn ({zerogpu.turn_events!r}): this is not a pass-through")
    engine = tiny_engine(device)
    zerogpu.use_engine(lambda: engine)
    options = GenOptions(temperature=0.0, max_new_tokens=8)
    img = test_image((64, 48))
    session = engine.session("zerogpu-check")
    events = list(zerogpu.turn_events(session.id, session.turns, "What is in the image?", [img], False, options,
                                      False))
    done = [e for e in events if getattr(e, "kind", None) == "done"]
    if not done or any(isinstance(e, zerogpu.Handoff) for e in events):
        raise AssertionError(f"events: {[getattr(e, 'kind', type(e).__name__) for e in events]}")
    tokens = session.turns[0].images[0].tokens
    fig["visual_tokens_on"] = str(tokens.device)
    if tokens.device.type != device.split(":")[0]:
        raise AssertionError(f"the decorated turn encoded the image on {tokens.device}, not {device}")
    direct = engine.session("direct")
    reference = [e for e in direct.chat("What is in the image?", [img], options=options) if e.kind == "done"]
    fig["same_tokens_as_session_chat"] = done[0].data.token_ids == reference[0].data.token_ids
    if not fig["same_tokens_as_session_chat"]:
        raise AssertionError("the decorated turn answered differently from session.chat")
    # as a ZeroGPU worker runs it: its engine holds another history, adopts the caller's, hands the new one back
    history = list(session.turns)
    events = list(zerogpu.turn_events(session.id, history, "And its colour?", [], False, options, False))
    handoff = [e for e in events if isinstance(e, zerogpu.Handoff)]
    if len(handoff) != 1 or len(handoff[0].turns) != 2:
        kinds = [getattr(e, "kind", type(e).__name__) for e in events]
        raise AssertionError(f"no handoff of a 2-turn history: {kinds}")
    fig["handoff_turns"] = len(handoff[0].turns)
    fig["handoff_tokens_on"] = str(handoff[0].turns[0].images[0].tokens.device)  # snapshot: moved to the CPU
    zerogpu.use_engine(None)
    log(f"zerogpu: turn on {fig['visual_tokens_on']}, handoff of {fig['handoff_turns']} turns")


# ---- main ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", help="cuda (default when a GPU is there), cuda:N or cpu")
    ap.add_argument("--quick", action="store_true", help="small shapes (CI on a CPU)")
    ap.add_argument("--json-out", help="also write the JSON report here (rewritten after every check)")
    ap.add_argument("--only", help=f"comma-separated checks to run (of {', '.join(CHECKS)})")
    ap.add_argument("--workdir", help="where checkpoints are written (default: a new folder in the temp dir)")
    ap.add_argument("--wheels", default=str(ROOT / "tools" / "gpu_wheels"),
                    help="folder of wheels to install missing packages from on a GPU (default tools/gpu_wheels)")
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    only = [c.strip() for c in args.only.split(",")] if args.only else list(CHECKS)
    if unknown := [c for c in only if c not in CHECKS]:
        ap.error(f"unknown checks: {', '.join(unknown)} (choose from {', '.join(CHECKS)})")

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda, but torch sees no CUDA GPU here (use --device cpu --quick)")
    wheels = None
    if device.startswith("cuda"):  # the GPU machine has no registry: bring what it lacks from the folder
        wheels = install_wheels(Path(args.wheels), lambda m: print(m, file=sys.stderr, flush=True))
    report = Report(args, device)
    if wheels is not None:
        report.data["environment"]["wheels"] = wheels
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mgm-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    log = report.log
    big, sdxl = {}, {}
    try:
        if "parity" in only:
            with report.check("parity") as fig:
                check_parity(device, args.quick, work, fig, log)
        for shape in ("2b", "7b_hd"):
            if f"size_{shape}" in only:
                keep = big if shape == "7b_hd" else {}
                with report.check(f"size_{shape}") as fig:
                    check_size(shape, device, args.quick, work, fig, log, keep)
                if shape == "2b" and keep.get("folder") and not args.keep:
                    shutil.rmtree(keep["folder"], ignore_errors=True)  # room on the disk for the 7B
        for kind in ("quant_4bit", "quant_8bit", "device_map_auto"):
            if kind in only:
                with report.check(kind) as fig:
                    if "size_7b_hd" not in only:
                        raise RuntimeError("needs size_7b_hd in the same run (it writes the checkpoint)")
                    check_variant(kind, device, args.quick, fig, log, big)
        if "imagegen" in only or "imagegen_offload" in only:
            with report.check("imagegen") as fig:
                check_imagegen(device, args.quick, work, fig, log, sdxl)
        if "imagegen_offload" in only:
            with report.check("imagegen_offload") as fig:
                check_imagegen_offload(device, args.quick, fig, log, sdxl)
        if "zerogpu" in only:
            with report.check("zerogpu") as fig:
                check_zerogpu(device, fig, log)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        report.write()
    print(summary(report.data))
    print(json.dumps(report.data, default=str))
    return 0 if report.data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

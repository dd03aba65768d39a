"""Real size on a CPU: MGM-2B's shapes, one photo, the int8 path (`quantization="int8"`) next to float32.

    python -m mini_gemini.bench --cpu-real-size [--json]

A random checkpoint with MGM-2B's true shapes (Gemma-2B + CLIP-L/336 + ConvNeXt-L/768, bf16 on disk; see
`bench.write_random_checkpoint`) is loaded in a fresh process per path, and one 640x480 photo is asked about
through the engine (`Engine(model).session().chat`, greedy, DECODE_TOKENS new tokens; the scheduler's path).
Hooks on the model time the stages of that one turn:

- cpu_encode_s: the vision towers, mining and projector (from CLIP's first call to the projector's return);
- cpu_prefill_s: the LLM's forward over the whole prompt (~600 tokens, 576 of them visual);
- cpu_first_token_s: from `chat()` to the end of that forward (preprocessing, encode, prefill);
- cpu_decode_tok_s: decode steps per second (stamps at every one-token forward of the LLM);
- cpu_decode_vs_bound: that rate ÷ (memory read bandwidth ÷ bytes of LLM weights one decode step reads), the
  bandwidth measured in the same process right before (a 1 GB float32 sum, best of 5: the machine's best
  read rate, so the ratio errs low);
- cpu_peak_gb: peak resident memory of the process above what it held before loading; cpu_weights_gb: the
  bytes of the loaded model's parameters and buffers; cpu_load_s: time to load.

The float32 path's figures carry the suffix `_fp32`. Both runs happen in the same invocation, one after the
other, on the same checkpoint and photo.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

DECODE_TOKENS = 12

_CHILD = r"""
import json, sys, time, threading
import numpy as np, torch
from PIL import Image
from mini_gemini.modeling.loading import load_pretrained
from mini_gemini.chat.engine import Engine
from mini_gemini.chat.types import GenOptions

def rss():
    with open('/proc/self/status') as f:
        return {l.split(':')[0]: int(l.split()[1]) * 1024 for l in f if l.startswith(('VmRSS', 'VmHWM'))}

path, quant, new_tokens = sys.argv[1], (sys.argv[2] if sys.argv[2] != 'none' else None), int(sys.argv[3])
base = rss()['VmRSS']
t = time.perf_counter()
model = load_pretrained(path, device='cpu', dtype=torch.float32, quantization=quant)
load_s = time.perf_counter() - t
seen, weights = set(), 0
for tensor in list(model.parameters()) + list(model.buffers()):
    if tensor.data_ptr() not in seen:
        seen.add(tensor.data_ptr())
        weights += tensor.numel() * tensor.element_size()

# bytes one decode step reads: every LLM weight, the token table only where it is also the output head
llm = model.llm
emb = llm.get_input_embeddings()
tied = bool(getattr(llm.config, 'tie_word_embeddings', False))
skip = set() if tied else {t.data_ptr() for t in list(emb.parameters()) + list(emb.buffers())}
seen, step_bytes = set(), 0
for tensor in list(llm.parameters()) + list(llm.buffers()):
    p = tensor.data_ptr()
    if p not in seen and p not in skip:
        seen.add(p)
        step_bytes += tensor.numel() * tensor.element_size()

marks = {}
def first(key):
    def hook(*args, **kwargs):
        marks.setdefault(key, time.perf_counter())
    return hook
model.vision_tower.register_forward_pre_hook(first('encode_start'))
model.mm_projector.register_forward_hook(first('encode_end'))
stamps = []
def pre(module, args, kwargs):
    x = kwargs.get('input_ids') if kwargs.get('input_ids') is not None else kwargs.get('inputs_embeds')
    if x is not None and x.shape[1] > 1:
        marks.setdefault('prefill_start', time.perf_counter())
    elif x is not None:
        stamps.append(time.perf_counter())
def post(module, args, kwargs, out):
    if 'prefill_start' in marks:
        marks.setdefault('prefill_end', time.perf_counter())
llm.register_forward_pre_hook(pre, with_kwargs=True)
llm.register_forward_hook(post, with_kwargs=True)

big = torch.ones(250_000_000)
def bandwidth():
    best = min(timeit_once() for _ in range(5))
    return big.numel() * 4 / best
def timeit_once():
    t = time.perf_counter(); big.sum(); return time.perf_counter() - t
bw = bandwidth()
del big

engine = Engine(model)
img = Image.fromarray((np.random.RandomState(0).rand(480, 640, 3) * 255).astype('uint8'))
session = engine.session()
t0 = time.perf_counter()
# ignore_eos: no early stop, the full DECODE_TOKENS are written
list(session.chat('Describe the image in detail.', [img],
                  options=GenOptions(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)))
turn = session.turns[-1]
ctx = len(turn.prompt_ids) - 1 + engine.tokens_per_image + len(turn.token_ids)
rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float('nan')
out = dict(encode_s=marks['encode_end'] - marks['encode_start'],
           prefill_s=marks['prefill_end'] - marks['prefill_start'],
           first_token_s=marks['prefill_end'] - t0, decode_tok_s=rate,
           decode_bound_tok_s=bw / step_bytes, decode_vs_bound=rate / (bw / step_bytes),
           bandwidth_gbps=bw / 1e9, step_gb=step_bytes / 1e9, weights_gb=weights / 1e9,
           peak_gb=(rss()['VmHWM'] - base) / 1e9, load_s=load_s, context_tokens=ctx,
           threads=torch.get_num_threads())
print(json.dumps(out))
"""


def _run(ckpt: Path, quantization: str | None, new_tokens: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", _CHILD, str(ckpt), quantization or "none", str(new_tokens)],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_cpu_real_size(workdir: Path, new_tokens: int = DECODE_TOKENS, quantization: str = "int8") -> dict:
    """The figures described in this module's docstring, for `quantization` and for float32 (suffix _fp32)."""
    from .bench_models import mgm_2b_config, write_random_checkpoint
    ckpt = workdir / "mgm-2b-random-bf16"
    if not (ckpt / "config.json").exists():
        print("writing a random MGM-2B-shaped checkpoint (bf16, ~6 GB)…", file=sys.stderr)
        write_random_checkpoint(ckpt, mgm_2b_config())
    results = {}
    for quant, suffix in ((quantization, ""), (None, "_fp32")):
        m = _run(ckpt, quant, new_tokens)
        results.update({f"cpu_{k}{suffix}": (round(v, 3) if isinstance(v, float) else v) for k, v in m.items()})
    results["cpu_quantization"] = quantization
    results["cpu_first_token_speedup"] = round(results["cpu_first_token_s_fp32"] / results["cpu_first_token_s"], 2)
    return results

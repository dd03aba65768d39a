"""Benchmark figure of the OpenAI-compatible endpoint (part of `python -m mini_gemini.bench`).

openai_followup_ttft_ratio: time to first token of a follow-up through `/v1/chat/completions` (the client resends
the whole conversation, image included, as stateless APIs do) ÷ the first turn's (a picture never seen before:
decoding, encoding, full prefill), on the benchmark's speed model (CLIP 336 px, ConvNeXt 768 px, a 6-layer
Llama), streamed over loopback HTTP. Goal <= 0.25: the endpoint finds the picture's encoding by content hash and
continues the kept KV cache with the longest common prefix, so the follow-up prefills only its new tokens.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import time


def _png_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def stream_ttft(url: str, body: dict) -> tuple[float, str]:
    """(seconds from sending the request to the first content of a streamed answer, the whole answer)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"the endpoint answered {resp.status}: {resp.read()[:300]!r}")
    first, text = None, []
    while True:
        line = resp.readline()
        if not line or line.strip() == b"data: [DONE]":
            break
        if not line.startswith(b"data: "):
            continue
        event = json.loads(line[6:])
        if "error" in event:
            raise RuntimeError(event["error"]["message"])
        for choice in event.get("choices", []):
            piece = choice["delta"].get("content")
            if piece:
                first = first if first is not None else time.perf_counter() - t0
                text.append(piece)
    conn.close()
    return (first if first is not None else time.perf_counter() - t0), "".join(text)


def bench_openai(repeat: int = 3) -> dict:
    """The follow-up / first-turn time-to-first-token ratio through the endpoint (best of `repeat` each, the two
    kinds alternating); each first turn sends a picture the server has not seen."""
    import numpy as np
    import torch
    from PIL import Image

    from .bench_models import speed_model
    from .chat.engine import Engine
    from .serve.openai_api import BackgroundServer, OpenAIServer
    torch.manual_seed(0)
    engine = Engine(speed_model())
    greedy = {"temperature": 0, "max_tokens": 1}

    def picture(k: int) -> str:
        return _png_data_url(Image.fromarray((np.random.RandomState(k).rand(480, 640, 3) * 255).astype("uint8")))

    def first_turn(url: str, k: int):
        ask = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": picture(k)}},
                                           {"type": "text", "text": "Describe the image."}]}
        t, answer = stream_ttft(url, {"messages": [ask], **greedy})
        return t, [ask, {"role": "assistant", "content": answer}]

    def followup(url: str, history: list) -> float:
        return stream_ttft(url, {"messages": history + [{"role": "user", "content": "And what colour is it?"}],
                                 **greedy})[0]

    with BackgroundServer(OpenAIServer(engine, model_name="speed-model")) as bg:
        followup(bg.url, first_turn(bg.url, 100)[1])  # warm-up: threads, allocator, HTTP stack
        firsts, follows = [], []
        for k in range(repeat):
            t, history = first_turn(bg.url, k)
            firsts.append(t)
            follows.append(followup(bg.url, history))
    t_first, t_follow = min(firsts), min(follows)
    return {"openai_followup_ttft_ratio": round(t_follow / t_first, 3), "openai_first_ttft_s": round(t_first, 3),
            "openai_followup_ttft_s": round(t_follow, 3)}


if __name__ == "__main__":
    print(json.dumps(bench_openai()))

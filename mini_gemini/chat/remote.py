"""The LLM served by a vLLM server: our process encodes the images (towers, mining, projector: the heatmaps
keep working), splices the visual tokens into the text embeddings as the built-in engine does, and sends the
sequence of embeddings to vLLM's OpenAI-compatible `/v1/completions` (`prompt_embeds`); the answer streams
back as token ids, which become text exactly as in the built-in run (`generation.AnswerText`).

    engine = Engine(model, llm_server="http://127.0.0.1:8000")   # or --llm-server / MGM_LLM_SERVER

The server is started from the LLM part of the checkpoint (`python -m mini_gemini.export_llm CKPT OUT`):

    vllm serve OUT --enable-prompt-embeds [--tensor-parallel-size N] ...

What goes over the wire (see tools/VLLM_NOTES.md for the checks behind each point):
- `prompt_embeds`: base64 of `torch.save` of the (L, hidden) tensor `MiniGemini.embed` gives (for Gemma
  already multiplied by sqrt(hidden), which is what vLLM expects), in the model's dtype;
- greedy when temperature is 0, else temperature / top_p / top_k / seed (vLLM's sampler is not transformers':
  only greedy answers are token-for-token the built-in ones);
- `ignore_eos` + `stop_token_ids` = the engine's stop ids, so the server stops exactly where the built-in
  engine does (not on another eos its generation_config may list);
- stop *texts* are found here, on our own decoding (as in the built-in run); when one is written, or the user
  presses Stop, or the consumer leaves, the HTTP connection is closed, which aborts the request in vLLM;
- `suppress_tokens` (the image-prompt continuation: no special token before the prompt is closed) becomes
  `logit_bias` -100 for those ids (vLLM clamps biases to +-100; with logits of ordinary size that token is
  never chosen, greedy or sampled, but it is a bias, not a mask);
- multi-turn: every turn sends its whole prompt (vLLM's prefix cache, hashed on the embeddings, re-uses the
  KV of whole blocks of the previous turns); `cached` reports its hits when the server counts them
  (`--enable-prompt-tokens-details`).
"""
from __future__ import annotations

import base64
import io
import json
import os
import threading

import torch

from ..errors import MGMError
from .detokenizer import Detokenizer
from .run import Request, Run


class LLMServerError(MGMError, RuntimeError):
    """The vLLM server could not be reached or refused a request; the message says which and why."""


class LLMServer:
    """A vLLM OpenAI-compatible server: its URL, one HTTP connection pool, the served model's name and length
    (asked once, from /v1/models)."""

    def __init__(self, url: str, *, api_key: str | None = None, model: str | None = None, timeout: float = 600):
        import httpx
        url = url.strip().rstrip("/")
        if "://" not in url:
            url = "http://" + url
        if url.endswith("/v1"):
            url = url[:-3]
        self.url, self._model, self.max_model_len = url, model, None
        api_key = api_key or os.environ.get("MGM_LLM_SERVER_API_KEY") or None  # `vllm serve --api-key`
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=url, headers=headers, trust_env=False,
                                   timeout=httpx.Timeout(timeout, connect=10.0),
                                   limits=httpx.Limits(max_connections=256, max_keepalive_connections=32))
        self._lock = threading.Lock()

    def __repr__(self):
        return f"LLMServer({self.url!r})"

    def model(self) -> str:
        """The served model's name (the first one /v1/models lists), asked once."""
        with self._lock:
            if self._model is None or self.max_model_len is None:
                import httpx
                try:
                    r = self.client.get("/v1/models", timeout=30)
                except httpx.HTTPError as e:
                    raise LLMServerError(f"The LLM server at {self.url} cannot be reached ({type(e).__name__}: {e}). "
                                         "Is it running (and is the URL right)?") from e
                if r.status_code != 200:
                    raise LLMServerError(f"The LLM server at {self.url} answered /v1/models with HTTP "
                                         f"{r.status_code}: {r.text[:300]}")
                data = r.json().get("data") or []
                if not data:
                    raise LLMServerError(f"The LLM server at {self.url} serves no model.")
                entry = next((d for d in data if d.get("id") == self._model), data[0])
                self._model = self._model or entry["id"]
                self.max_model_len = entry.get("max_model_len")
            return self._model

    def close(self):
        self.client.close()


def encode_embeds(embeds: torch.Tensor) -> str:
    """(1, L, D) or (L, D) -> base64 of torch.save of the (L, D) tensor (what vLLM's `prompt_embeds` takes)."""
    t = embeds.detach().reshape(-1, embeds.shape[-1]).to("cpu").clone()  # own storage: nothing else is saved
    buf = io.BytesIO()
    torch.save(t, buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class RemoteRun(Run):
    """One answer from the vLLM server (a `Run`): a worker thread sends the request and delivers the streamed
    token ids; Stop, a stop text or a consumer that leaves close the connection (vLLM then drops the request).

    Args:
        request: what to write (`suppress_tokens` become a logit bias).
        detokenizer, cancel: as for every `Run`.
        server: the `LLMServer`.
        embed: the function that turns the prompt into its (L, D) embeddings (`ModelRunner.embed`).
        stop_ids: token ids that end the answer.
        top_k: the LLM's generation-config top-k, applied when sampling as transformers' generate applies it.
        on_max_model_len: called with the server's context length once it is known.
    """

    def __init__(self, request: Request, detokenizer: Detokenizer, cancel: threading.Event, server: LLMServer,
                 embed, stop_ids, top_k: int | None = None, on_max_model_len=None):
        super().__init__(request, detokenizer, cancel)
        self.server, self.embed, self.stop_ids, self.top_k = server, embed, list(stop_ids), top_k
        self.on_max_model_len = on_max_model_len
        self._response = None
        self._thread = threading.Thread(target=self._work, daemon=True, name="mgm-remote")

    def start(self) -> int:
        self._thread.start()
        return 0

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def body(self, embeds: torch.Tensor) -> dict:
        """The /v1/completions body for these (L, D) embeddings."""
        req = self.request
        o = req.options
        body = {"model": self.server.model(), "prompt_embeds": encode_embeds(embeds),
                "max_tokens": int(req.max_new), "stream": True, "stream_options": {"include_usage": True},
                "return_token_ids": True, "ignore_eos": True,
                "stop_token_ids": [] if o.ignore_eos else list(self.stop_ids),
                "skip_special_tokens": True}
        if o.temperature > 0:
            body.update(temperature=float(o.temperature), top_p=float(o.top_p), top_k=int(self.top_k or -1))
            if o.seed is not None:
                body["seed"] = int(o.seed)
        else:
            body.update(temperature=0.0, top_p=1.0, top_k=-1)
        if req.suppress_tokens:
            body["logit_bias"] = {str(int(t)): -100.0 for t in req.suppress_tokens}
        return body

    # worker thread: the HTTP stream
    def _work(self):
        error, cached = None, 0
        try:
            if self.halted:
                return
            req = self.request
            self.admitted()
            with torch.no_grad():
                embeds = self.embed(req.prompt_ids, [im.tokens for im in req.images])
            body = self.body(embeds)
            del embeds
            if self.server.max_model_len and self.on_max_model_len is not None:  # known now if it was down before
                self.on_max_model_len(int(self.server.max_model_len))
            threading.Thread(target=self._watch, daemon=True, name="mgm-remote-watch").start()
            cached = self._stream(body)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            if not self.halted:  # a closed connection after Stop is no error
                error = e
        finally:
            self.finish(error, cached)

    def _stream(self, body: dict) -> int:
        """Deliver the streamed ids; returns the prompt positions the server had cached (when it says)."""
        import httpx
        server, cached = self.server, 0
        try:
            with server.client.stream("POST", "/v1/completions", content=json.dumps(body),
                                      headers={"Content-Type": "application/json"}) as r:
                self._response = r
                if r.status_code != 200:
                    raise LLMServerError(_refusal(server, r))
                for line in r.iter_lines():
                    if self.halted:
                        return cached  # leaving the block closes the connection: vLLM aborts the request
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return cached
                    event = json.loads(data)
                    if event.get("error"):
                        raise LLMServerError(f"The LLM server failed: {event['error'].get('message', event['error'])}")
                    usage = event.get("usage") or {}
                    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or cached)
                    for choice in event.get("choices") or ():
                        new = choice.get("token_ids") or []
                        if new:
                            self.deliver(list(new))
        except httpx.HTTPError as e:
            if self.halted:
                return cached
            raise LLMServerError(f"Lost the LLM server at {server.url} ({type(e).__name__}: {e}).") from e
        finally:
            self._response = None
        return cached

    def _watch(self):
        """Close the connection as soon as Stop is pressed or a stop text was written, even while the server
        sends nothing (e.g. the request still waits in vLLM's queue)."""
        while not self.wait_done(0.05):
            if self.halted:
                r = self._response
                if r is not None:
                    try:
                        r.close()
                    except Exception:  # noqa: BLE001 - the worker notices either way
                        pass
                return


def _refusal(server: LLMServer, r) -> str:
    r.read()
    try:
        detail = r.json().get("error", {})
        detail = detail.get("message", detail) if isinstance(detail, dict) else detail
    except Exception:  # noqa: BLE001
        detail = r.text[:500]
    return f"The LLM server at {server.url} refused the request (HTTP {r.status_code}): {detail}"

"""The OpenAI chat-completions protocol, on its own: request validation, response and chunk objects, errors.

Nothing here runs the model or knows about HTTP frameworks: `parse_request` turns a decoded JSON body into a
`ChatRequest` (or raises `APIError` with the HTTP status and one sentence that names the field and what it must
be), and the `completion` / `chunk` / `error_body` functions build the objects the `openai` clients parse.

Request fields (https://platform.openai.com/docs/api-reference/chat/create):

- `messages` (required): roles "system" / "developer" (text), "user" (text and `image_url` parts), "assistant"
  (text). Several images per message and per conversation. A message's text parts are joined with newlines.
- `model`: any string (one model is served; `/v1/models` names it).
- `stream`, `stream_options.include_usage`; `max_completion_tokens` (or the older `max_tokens`); `temperature`
  (0 to 2; 0 = greedy), `top_p` (0 to 1), `seed`, `stop` (a string or up to 16 strings), `n` (1 only).
- accepted when they ask for nothing: `logprobs` false, `top_logprobs`, `tools` / `functions` empty,
  `response_format` {"type": "text"}, `logit_bias` empty, `presence_penalty` / `frequency_penalty` 0; other
  values are refused (400), as this server cannot honour them. Unknown fields are ignored.
- extensions: `mgm_generate_image` (bool: the model writes an image prompt and Stable Diffusion XL draws it;
  the picture comes back as a data URL in the message content; `mgm_image_options` sets its "steps" (1-500),
  "guidance" (0-50), "width" / "height" (px) and "negative_prompt"; `seed` seeds the drawing too),
  `mgm_mining_summary` (bool: where the answer looked in its images, from its attribution carried down through
  patch info mining, as a field `mgm_mining_summary` of the response), `ignore_eos` (bool, as
  vLLM: write `max_tokens` tokens whatever the model writes).
"""
from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field

from ..chat.types import MAX_IMAGE_SIDE, MAX_STOP, MAX_STOP_CHARS, GenOptions

MAX_TEMPERATURE = 2.0          # OpenAI's range
MAX_QUEUE = 64                 # answers that may wait for a place in the scheduler (the page's queue is as long)
MAX_BODY_BYTES = 64 << 20      # a request body (the images in base64, each at most 20 MB decoded)
SYSTEM_ROLES = ("system", "developer")
IMAGE_SCHEMES = ("http://", "https://", "data:")


class APIError(Exception):
    """An error answered in OpenAI's format: `{"error": {"message", "type", "param", "code"}}` with `status`.

    Types used: "invalid_request_error" (400, 404, 413), "authentication_error" (401), "rate_limit_error" (429),
    "server_error" (500), "service_unavailable" (503).
    """

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# ---- the request --------------------------------------------------------------------------------------------
@dataclass
class ImagePart:
    """An image of a message: its URL (http(s) or data URL) and where it was in the request."""
    url: str
    where: str                      # e.g. "messages[2].content[1]"


@dataclass
class Message:
    role: str                       # "system" (also for "developer"), "user" or "assistant"
    text: str
    images: list[ImagePart] = field(default_factory=list)
    where: str = ""


@dataclass
class ChatRequest:
    messages: list[Message]
    options: GenOptions
    model: str | None = None
    stream: bool = False
    include_usage: bool = False
    generate_image: bool = False
    mining_summary: bool = False


def json_type(value) -> str:
    """The JSON name of a decoded value's type, for messages ("a string", "an array", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _number(body: dict, name: str, lo: float, hi: float, label: str | None = None) -> float | None:
    value, label = body.get(name), label or name
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(label, f"`{label}` must be a number from {lo:g} to {hi:g}, not {json_type(value)}.", "invalid_type")
    if not lo <= value <= hi:
        raise bad(label, f"`{label}` must be a number from {lo:g} to {hi:g}; got {value:g}.")
    return float(value)


def _integer(body: dict, name: str, lo: int | None = None, hi: int | None = None,
             label: str | None = None) -> int | None:
    value, label = body.get(name), label or name
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(label, f"`{label}` must be an integer, not {json_type(value)}.", "invalid_type")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad(label, f"`{label}` must be {'at least ' + str(lo) if hi is None else f'from {lo} to {hi}'}; "
                         f"got {value}.")
    return value


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, f"`{name}` must be true or false, not {json_type(value)}.", "invalid_type")
    return value


def _unsupported(body: dict, name: str, ok, what: str) -> None:
    value = body.get(name)
    if value is not None and not ok(value):
        raise bad(name, f"`{name}` {what} is not supported by this server; leave it out.", "unsupported_parameter")


def _image_options(body: dict) -> dict:
    value = body.get("mgm_image_options")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad("mgm_image_options", "`mgm_image_options` must be an object such as {\"steps\": 30}, not "
                                       f"{json_type(value)}.", "invalid_type")
    where = "mgm_image_options"
    out = {}
    for key, lo, hi in (("steps", 1, 500), ("width", 8, MAX_IMAGE_SIDE), ("height", 8, MAX_IMAGE_SIDE)):
        n = _integer(value, key, lo, hi, label=f"{where}.{key}")
        if n is not None:
            out[key] = n
    guidance = _number(value, "guidance", 0.0, 50.0, label=f"{where}.guidance")
    if guidance is not None:
        out["guidance"] = guidance
    negative = value.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise bad(where, f"`{where}.negative_prompt` must be a string, not {json_type(negative)}.", "invalid_type")
    if negative is not None:
        out["negative_prompt"] = negative
    unknown = sorted(set(value) - {"steps", "width", "height", "guidance", "negative_prompt"})
    if unknown:
        raise bad(where, f"`{where}` has unknown keys {unknown}: it takes steps, guidance, width, height and "
                         "negative_prompt.")
    return out


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise bad("stop", f"`stop` must be a string or an array of strings, not {json_type(value)}.", "invalid_type")
    if len(items) > MAX_STOP:
        raise bad("stop", f"`stop` may hold at most {MAX_STOP} strings; got {len(items)}.")
    for k, s in enumerate(items):
        if not isinstance(s, str):
            raise bad("stop", f"`stop[{k}]` must be a string, not {json_type(s)}.", "invalid_type")
        if not s or len(s) > MAX_STOP_CHARS:
            raise bad("stop", f"`stop[{k}]` must be 1 to {MAX_STOP_CHARS} characters long.")
    return tuple(items)


def _content(msg: dict, where: str, role: str) -> tuple[str, list[ImagePart]]:
    """(text, images) of a message's `content`: a string, or an array of text / image_url parts."""
    content = msg.get("content")
    if content is None:
        if role == "assistant":
            return "", []
        raise bad(f"{where}.content", f"`{where}.content` is missing: give the message's text (a string) or an "
                                      "array of content parts.", "missing_content")
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise bad(f"{where}.content", f"`{where}.content` must be a string or an array of content parts, not "
                                      f"{json_type(content)}.", "invalid_type")
    texts, images = [], []
    for k, part in enumerate(content):
        at = f"{where}.content[{k}]"
        if not isinstance(part, dict):
            raise bad(at, f"`{at}` must be an object such as {{\"type\": \"text\", \"text\": \"...\"}}, not "
                          f"{json_type(part)}.", "invalid_type")
        kind = part.get("type")
        if kind == "text" or (kind == "refusal" and role == "assistant"):
            key = "text" if kind == "text" else "refusal"
            text = part.get(key)
            if not isinstance(text, str):
                raise bad(at, f"`{at}.{key}` must be a string, not {json_type(text)}.", "invalid_type")
            texts.append(text)
        elif kind == "image_url":
            if role != "user":
                raise bad(at, f"`{at}`: only user messages may carry images (this one is from the {role}).")
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str):
                raise bad(at, f"`{at}.image_url` must be an object with a `url` string (an http(s) URL or a data "
                              f"URL), not {json_type(url if isinstance(ref, dict) else ref)}.", "invalid_type")
            if not url.strip()[:8].lower().startswith(IMAGE_SCHEMES):
                raise bad(at, f"`{at}.image_url.url` must be an http(s) URL or a data URL "
                              "(data:image/png;base64,...).", "invalid_image_url")
            images.append(ImagePart(url.strip(), at))
        else:
            raise bad(at, f"`{at}` has type {kind!r}: this server reads \"text\" and \"image_url\" parts only.",
                      "unsupported_content")
    return "\n".join(texts), images


def _messages(body: dict) -> list[Message]:
    raw = body.get("messages")
    if raw is None:
        raise bad("messages", "`messages` is missing: send the conversation as an array of messages, the last "
                              "one from the user.", "missing_messages")
    if not isinstance(raw, list) or not raw:
        raise bad("messages", "`messages` must be a non-empty array of messages, not "
                              f"{'an empty array' if raw == [] else json_type(raw)}.", "invalid_type")
    out = []
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad(where, f"`{where}` must be an object with a `role` and a `content`, not {json_type(msg)}.",
                      "invalid_type")
        role = msg.get("role")
        if not isinstance(role, str):
            raise bad(f"{where}.role", f"`{where}.role` must be \"system\", \"user\" or \"assistant\", not "
                                       f"{json_type(role)}.", "invalid_type")
        if role not in SYSTEM_ROLES + ("user", "assistant"):
            raise bad(f"{where}.role", f"`{where}.role` is {role!r}: this server takes \"system\", \"developer\", "
                                       "\"user\" and \"assistant\" messages (no tools).", "unsupported_role")
        if role == "assistant" and msg.get("tool_calls"):
            raise bad(f"{where}.tool_calls", f"`{where}.tool_calls`: tool calls are not supported by this server.",
                      "unsupported_parameter")
        role = "system" if role in SYSTEM_ROLES else role
        text, images = _content(msg, where, role)
        out.append(Message(role, text, images, where))
    if out[-1].role != "user":
        raise bad(f"messages[{len(out) - 1}]", "The last message must be the user's (the one to answer); it is "
                                               f"from the {out[-1].role}.", "invalid_last_message")
    if not out[-1].text.strip() and not out[-1].images:
        raise bad(f"messages[{len(out) - 1}]", "The last user message is empty: give it some text, an image or "
                                               "both.", "empty_message")
    return out


def parse_request(body, *, max_tokens: int) -> ChatRequest:
    """Validate a decoded JSON body (see the module docstring).

    Args:
        body: the decoded JSON.
        max_tokens: the answer length when the request gives none (the server's --max-new-tokens).
    Raises:
        APIError: 400, naming the field and what it must be.
    """
    if not isinstance(body, dict):
        raise APIError(400, f"The request body must be a JSON object, not {json_type(body)}.", code="invalid_type")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"`model` must be a string, not {json_type(model)}.", "invalid_type")
    n = _integer(body, "n", 1)
    if n not in (None, 1):
        raise bad("n", f"`n` must be 1: this server writes one answer per request (got {n}).")
    _unsupported(body, "logprobs", lambda v: v is False, "true")
    _unsupported(body, "top_logprobs", lambda v: False, "")
    _unsupported(body, "tools", lambda v: v == [], "(tool calling)")
    _unsupported(body, "functions", lambda v: v == [], "(function calling)")
    _unsupported(body, "response_format", lambda v: isinstance(v, dict) and v.get("type") == "text",
                 "other than {\"type\": \"text\"}")
    _unsupported(body, "logit_bias", lambda v: v == {}, "")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, -2.0, 2.0):
            raise bad(name, f"`{name}` is not supported by this server; leave it out or 0.", "unsupported_parameter")
    stream = _boolean(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad("stream_options", f"`stream_options` must be an object, not {json_type(opts)}.", "invalid_type")
    include_usage = _boolean(opts or {}, "include_usage") if stream else False
    length = _integer(body, "max_completion_tokens", 1)
    length = length if length is not None else _integer(body, "max_tokens", 1)
    temperature = _number(body, "temperature", 0.0, MAX_TEMPERATURE)
    top_p = _number(body, "top_p", 0.0, 1.0)
    seed = _integer(body, "seed")
    defaults = GenOptions()
    options = GenOptions(temperature=defaults.temperature if temperature is None else temperature,
                         top_p=defaults.top_p if top_p is None else top_p,
                         max_new_tokens=length or max_tokens, seed=seed, image_seed=seed, stop=_stop(body),
                         ignore_eos=_boolean(body, "ignore_eos"), **_image_options(body))
    return ChatRequest(_messages(body), options.checked(), model, stream, include_usage,
                       _boolean(body, "mgm_generate_image"), _boolean(body, "mgm_mining_summary"))


# ---- the answer -----------------------------------------------------------------------------------------------
def completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def completion(cid: str, model: str, content: str, finish_reason: str, usage: dict, extra: dict) -> dict:
    """A `chat.completion` object (non-streamed answer); `extra`: the mgm_* fields."""
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage, **extra}


def chunk(cid: str, model: str, created: int, delta: dict | None, finish_reason: str | None = None,
          usage: dict | None = None, include_usage: bool = False, extra: dict | None = None) -> dict:
    """A `chat.completion.chunk` object: one choice with `delta` (None: the usage chunk, with no choice)."""
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": finish_reason}]}
    if include_usage:  # as OpenAI: every chunk has "usage", null except on the last one
        out["usage"] = usage
    return {**out, **(extra or {})}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int, image_tokens: int) -> dict:
    """The `usage` object. prompt_tokens counts every position the model read (text and visual tokens);
    `prompt_tokens_details.cached_tokens` those served from a kept KV cache, `image_tokens` the visual ones."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens, "image_tokens": image_tokens}}

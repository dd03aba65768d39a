"""The OpenAI-compatible endpoint (mini_gemini/serve), driven by the real `openai` Python client over loopback:
in this process (uvicorn in a thread, tiny checkpoints from the conftest fixture), as the headless `python -m
mini_gemini.serve` command, and inside the running app next to `/chat`.

Answers are compared with the engine's own (a fresh `Engine` on the same weights: no kept cache), token for
token for greedy decoding and for seeded sampling."""
import base64
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from types import SimpleNamespace

import pytest
from helpers import ROOT, endless, free_port, launch_app, on_llm_forward, stop_process
from PIL import Image

from mini_gemini.chat.engine import Engine, GenOptions
from mini_gemini.inputs import remote
from mini_gemini.modeling.loading import load_pretrained
from mini_gemini.serve.openai_api import BackgroundServer, ModelUnavailable, OpenAIServer, loader_engine

openai = pytest.importorskip("openai", reason="the endpoint tests use the openai client: pip install openai")

EXAMPLES = ROOT / "assets" / "examples"
RED, BLUE = Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (30, 44), (20, 40, 210))
PUBLIC = "93.184.216.34"   # a public address the fake resolver hands out; connections land on a loopback server


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(image) -> str:
    raw = image.read_bytes() if hasattr(image, "read_bytes") else png(image)
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def user(text, *images) -> dict:
    """A user message: its images (data URLs, or any URL strings) first, then the text."""
    parts = [{"type": "image_url", "image_url": {"url": im if isinstance(im, str) else data_url(im)}}
             for im in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def engine_answers(model, turns, options, generate_image=False):
    """The turns' answers from a fresh engine (one conversation, no kept cache): [(Turn, events)]."""
    session = Engine(model).session()
    out = []
    for text, images in turns:
        events = list(session.chat(text, images, options=options, generate_image=generate_image))
        done = [e.data for e in events if e.kind == "done"]
        assert done, [e.text for e in events if e.kind == "error"]
        out.append(done[0])
    return out


def wait_for(condition, timeout=60.0):
    """Wait until `condition()` holds (polled; fails the test after `timeout` s)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, tiny_sdxl):
    """The endpoint in this process over a tiny Llama (vicuna template) with a tiny SDXL."""
    from mini_gemini.imagegen import ImageGenerator
    ckpt = tiny_checkpoint("vicuna")
    model = load_pretrained(ckpt, device="cpu", dtype="float32")
    engine = Engine(model, ImageGenerator(str(tiny_sdxl), device="cpu"))
    server = OpenAIServer(engine, model_name="tiny-vicuna", max_tokens=24, max_body_bytes=4 << 20)
    with BackgroundServer(server) as bg:
        client = openai.OpenAI(base_url=bg.url + "/v1", api_key="unused", max_retries=0)
        yield SimpleNamespace(url=bg.url, server=server, engine=engine, model=model, ckpt=ckpt, client=client)


GREEDY = dict(temperature=0, max_tokens=24)


# ---- answers ----------------------------------------------------------------------------------------------------
def test_models_and_a_greedy_answer_equal_the_engine_with_usage(tiny):
    assert [m.id for m in tiny.client.models.list()] == ["tiny-vicuna"]
    r = tiny.client.chat.completions.create(model="tiny-vicuna", messages=[user("What is in the picture?", RED)],
                                            **GREEDY)
    (turn,) = engine_answers(tiny.model, [("What is in the picture?", [RED])], GenOptions(temperature=0,
                                                                                          max_new_tokens=24))
    assert r.choices[0].message.content == turn.assistant and r.choices[0].message.role == "assistant"
    assert r.model == "tiny-vicuna" and r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    per_image = tiny.engine.tokens_per_image
    assert r.usage.completion_tokens == len(turn.token_ids)
    assert r.usage.prompt_tokens == len(turn.prompt_ids) - 1 + per_image
    assert r.usage.prompt_tokens_details.image_tokens == per_image
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == ("length" if len(turn.token_ids) == 24 else "stop")
    assert r.mgm_notes == []


def test_streaming_gives_the_same_answer_in_chunks_then_usage(tiny):
    messages = [user("Describe the colours.", BLUE)]
    whole = tiny.client.chat.completions.create(model="m", messages=messages, **GREEDY)
    chunks = list(tiny.client.chat.completions.create(model="m", messages=messages, stream=True,
                                                      stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len([c for c in chunks if c.choices]) > 3
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(tiny.client.chat.completions.create(model="m", messages=messages, stream=True, **GREEDY))
    assert all(c.choices for c in plain) and "".join(c.choices[0].delta.content or "" for c in plain) == text


def test_multi_turn_with_several_images_equals_one_engine_conversation_and_reuses_the_cache(tiny):
    """Each request resends the conversation so far (with the endpoint's own earlier answers): the answers equal
    those of one engine conversation (images numbered "Image k:"), and a follow-up prefills only its new tokens."""
    turns = [("What is in the first picture?", [RED]), ("And what about Image 2?", [BLUE]),
             ("Which of the two is larger?", []), ("Compare them once more.", [RED, BLUE])]
    opts = GenOptions(temperature=0, max_new_tokens=16)
    reference = engine_answers(tiny.model, turns, opts)
    assert "Image 2:" in reference[1].prompt
    messages, got = [], []
    for (text, images), ref in zip(turns, reference):
        messages.append(user(text, *images))
        r = tiny.client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=16)
        got.append(r)
        assert r.choices[0].message.content == ref.assistant
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
    # the text-only follow-up continues the kept cache of the turn before: everything but the new message
    follow = got[2].usage
    assert follow.prompt_tokens_details.cached_tokens >= got[1].usage.prompt_tokens
    assert follow.prompt_tokens_details.image_tokens == 2 * tiny.engine.tokens_per_image
    assert got[3].usage.prompt_tokens_details.image_tokens == 4 * tiny.engine.tokens_per_image


def test_string_content_system_message_and_a_repeated_image_url(tiny):
    """A system message's text goes before the first user message's text; content may be a plain string; the
    same picture twice is one encoding (its content hash), numbered twice."""
    r = tiny.client.chat.completions.create(model="m", messages=[
        {"role": "system", "content": "Be brief."}, user("Compare the two.", RED, RED)], **GREEDY)
    (turn,) = engine_answers(tiny.model, [("Be brief.\nCompare the two.", [RED, RED])],
                             GenOptions(temperature=0, max_new_tokens=24))
    assert r.choices[0].message.content == turn.assistant
    r2 = tiny.client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hello there"}],
                                             **GREEDY)
    (turn2,) = engine_answers(tiny.model, [("Hello there", [])], GenOptions(temperature=0, max_new_tokens=24))
    assert r2.choices[0].message.content == turn2.assistant


def test_stop_strings_end_the_answer_where_they_first_appear(tiny):
    messages = [user("Tell me a long story.", RED)]
    full = tiny.client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=40)
    text = full.choices[0].message.content
    start = next(k for k in range(4, len(text) - 3) if text[k:k + 3].strip() and text.find(text[k:k + 3]) == k)
    stop = text[start:start + 3]
    (ref,) = engine_answers(tiny.model, [("Tell me a long story.", [RED])],
                            GenOptions(temperature=0, max_new_tokens=40, stop=("never-written-xyz", stop)))
    assert ref.assistant == text[:start].rstrip()  # the engine shows answers without trailing spaces
    for stream in (False, True):
        r = tiny.client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=40,
                                                stop=["never-written-xyz", stop], stream=stream)
        if stream:
            chunks = list(r)
            got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            got, finish = r.choices[0].message.content, [r.choices[0].finish_reason]
        assert got == ref.assistant and finish == ["stop"]


def test_seeded_sampling_repeats_and_equals_the_engine(tiny):
    messages = [user("Say something.", BLUE)]
    sample = dict(model="m", messages=messages, temperature=1.0, top_p=1.0, max_tokens=24)
    a = tiny.client.chat.completions.create(seed=7, **sample).choices[0].message.content
    b = tiny.client.chat.completions.create(seed=7, **sample).choices[0].message.content
    c = tiny.client.chat.completions.create(seed=8, **sample).choices[0].message.content
    (turn,) = engine_answers(tiny.model, [("Say something.", [BLUE])],
                             GenOptions(temperature=1.0, top_p=1.0, max_new_tokens=24, seed=7))
    assert a == b == turn.assistant and c != a


def test_max_completion_tokens_and_ignore_eos_give_that_many_tokens(tiny):
    r = tiny.client.chat.completions.create(model="m", messages=[user("Hi", RED)], temperature=0,
                                            max_completion_tokens=7, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"


# ---- images --------------------------------------------------------------------------------------------------
class _ImageHost:
    """A loopback HTTP server that the guarded fetcher reaches as the public host images.example.com."""

    def __init__(self, routes):
        import http.server
        owner = self
        self.routes, self.requests = routes, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                owner.requests.append(self.path)
                status, headers, body = owner.routes.get(self.path, (404, {}, b""))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_http_image_urls_go_through_the_guarded_fetcher(tiny, monkeypatch):
    host = _ImageHost({"/red.png": (200, {"Content-Type": "image/png"}, png(RED)),
                       "/to-local": (302, {"Location": "http://127.0.0.1:9/x.png"}, b"")})

    def resolve(name, port):
        if name == "images.example.com":
            return [PUBLIC]
        if name[0].isdigit():  # an address literal resolves to itself
            return [name]
        raise socket.gaierror(f"unknown host {name}")

    def connect(ip, port, timeout):
        assert ip == PUBLIC, f"tried to connect to {ip}"
        return socket.create_connection(("127.0.0.1", host.httpd.server_address[1]), timeout=timeout)

    monkeypatch.setattr(remote, "_resolve", resolve)
    monkeypatch.setattr(remote, "_connect", connect)
    try:
        by_url = tiny.client.chat.completions.create(
            model="m", messages=[user("What is it?", "http://images.example.com/red.png")], **GREEDY)
        by_data = tiny.client.chat.completions.create(model="m", messages=[user("What is it?", RED)], **GREEDY)
        assert by_url.choices[0].message.content == by_data.choices[0].message.content
        assert host.requests == ["/red.png"]
        for url, words in [("http://images.example.com/to-local", "local or private"),
                           ("http://127.0.0.1:8/a.png", "local or private"),
                           ("http://images.example.com/missing.png", "HTTP 404"),
                           ("http://nowhere.example.org/a.png", "Could not find the host")]:
            with pytest.raises(openai.BadRequestError) as err:
                tiny.client.chat.completions.create(model="m", messages=[user("What?", url)], **GREEDY)
            assert words in err.value.body["message"] and err.value.body["param"] == "messages[0].content[0]"
    finally:
        host.close()


def test_mining_summary_and_notes_are_opt_in_fields(tiny):
    r = tiny.client.chat.completions.create(model="m", messages=[user("Where?", RED, BLUE)],
                                            extra_body={"mgm_mining_summary": True}, **GREEDY)
    summary = r.mgm_mining_summary
    assert summary["method"] == "answer_attention" and [s["image"] for s in summary["images"]] == [1, 2]
    first = summary["images"][0]
    assert (first["width"], first["height"]) == RED.size
    assert sum(s["share"] for s in first["regions"]) == pytest.approx(1.0)
    assert summary["text"].startswith("Image 1 (40×30 px): the answer drew on") and "Image 2 (30×44 px)" in summary["text"]
    # where the answer looked: the answer map of the engine's own attribution of the same answer
    session = Engine(tiny.model).session()
    events = list(session.chat("Where?", [RED, BLUE], options=GenOptions(temperature=0, max_new_tokens=24)))
    turn = [e.data for e in events if e.kind == "done"][0]
    attribution = session.explain()
    from mini_gemini.viz import heatmap as hm
    from mini_gemini.viz.answer_map import answer_summary
    want = answer_summary(attribution, session.images_seen(turn), turn.images, {id(im): k for k, im in
                                                                                 enumerate(turn.images, 1)},
                          hm.Layout.from_config(tiny.model.config))
    assert summary["text"] == want["text"] and summary["layers"] == want["layers"]
    for got, exp in zip(summary["images"], want["images"]):
        assert [g["region"] for g in got["regions"]] == [e["region"] for e in exp["regions"]]
        assert [g["share"] for g in got["regions"]] == pytest.approx([e["share"] for e in exp["regions"]], abs=1e-6)
        assert got["attention"] == pytest.approx(exp["attention"], abs=1e-6)
    assert summary["ablation"]["tokens"] == len(turn.token_ids)
    later = tiny.client.chat.completions.create(model="m", messages=[
        user("Where?", RED, BLUE), {"role": "assistant", "content": "Here."}, user("And now?")],
        extra_body={"mgm_mining_summary": True}, **GREEDY)
    assert [s["image"] for s in later.mgm_mining_summary["images"]] == [2]  # no image in the turn: the latest
    plain = tiny.client.chat.completions.create(model="m", messages=[user("Where?", RED)], **GREEDY)
    assert "mgm_mining_summary" not in plain.model_extra


def test_generated_image_comes_back_as_a_data_url_and_round_trips_as_history(tiny):
    """mgm_generate_image: the model writes the image prompt and tiny SDXL draws it; resending that answer (with
    its picture) as history gives the same follow-up as one engine conversation."""
    options = {"mgm_generate_image": True, "mgm_image_options": {"steps": 2}}
    first = user("Please draw a cat.", RED)
    r = tiny.client.chat.completions.create(model="m", messages=[first], temperature=0, max_tokens=6,
                                            seed=0, extra_body=options)
    content = r.choices[0].message.content
    head, _, tail = content.partition("\n\n![")
    alt, _, url = tail.partition("](data:image/png;base64,")
    assert alt == r.mgm_image_prompt and r.mgm_image_prompt and url.endswith(")")
    drawn = Image.open(io.BytesIO(base64.b64decode(url[:-1])))
    assert drawn.format == "PNG" and drawn.size == (64, 64)
    opts = GenOptions(temperature=0, max_new_tokens=6, steps=2, seed=0, image_seed=0)
    session = Engine(tiny.model, tiny.engine.imagegen).session()
    ref = [e for e in session.chat("Please draw a cat.", [RED], generate_image=True, options=opts)]
    assert head == ref[-1].data.assistant and r.mgm_image_prompt == ref[-1].data.image_prompt
    streamed = list(tiny.client.chat.completions.create(model="m", messages=[first], temperature=0, max_tokens=6,
                                                        seed=0, stream=True, extra_body=options))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == content
    follow = tiny.client.chat.completions.create(model="m", messages=[
        first, {"role": "assistant", "content": content}, user("What did you draw?")], **GREEDY)
    ref2 = list(session.chat("What did you draw?", options=GenOptions(temperature=0, max_new_tokens=24)))
    assert follow.choices[0].message.content == ref2[-1].data.assistant


# ---- errors -------------------------------------------------------------------------------------------------
OK = [{"role": "user", "content": "Hi"}]
BAD_REQUESTS = [
    (dict(messages=OK, n=2), "n", "must be 1"),
    (dict(messages=OK, temperature="hot"), "temperature", "must be a number from 0 to 2, not a string"),
    (dict(messages=OK, temperature=3), "temperature", "got 3"),
    (dict(messages=OK, top_p=1.5), "top_p", "from 0 to 1"),
    (dict(messages=OK, max_tokens=0), "max_tokens", "at least 1"),
    (dict(messages=OK, max_tokens="many"), "max_tokens", "must be an integer, not a string"),
    (dict(messages=OK, seed=1.5), "seed", "must be an integer"),
    (dict(messages=OK, stop=5), "stop", "a string or an array of strings"),
    (dict(messages=OK, stop=["a", 3]), "stop", "`stop[1]` must be a string"),
    (dict(messages=OK, stream="yes"), "stream", "true or false"),
    (dict(messages=OK, logprobs=True), "logprobs", "not supported"),
    (dict(messages=OK, tools=[{"type": "function", "function": {"name": "f"}}]), "tools", "not supported"),
    (dict(messages=OK, response_format={"type": "json_object"}), "response_format", "not supported"),
    (dict(messages=OK, presence_penalty=0.5), "presence_penalty", "not supported"),
    (dict(messages=OK, extra_body={"mgm_mining_summary": "yes"}), "mgm_mining_summary", "true or false"),
    (dict(messages=OK, extra_body={"mgm_image_options": {"steps": 0}}), "mgm_image_options.steps", "from 1 to 500"),
    (dict(messages=[]), "messages", "non-empty array"),
    (dict(messages="Hi"), "messages", "not a string"),
    (dict(messages=[{"role": "user", "content": 5}]), "messages[0].content", "not a number"),
    (dict(messages=[{"role": "user"}]), "messages[0].content", "is missing"),
    (dict(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]), "messages[0].role", "no tools"),
    (dict(messages=[{"role": 3, "content": "x"}]), "messages[0].role", "not a number"),
    (dict(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]), "messages[1]",
     "last message must be the user's"),
    (dict(messages=[{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Hi"}]), "messages[0]",
     "must come after a user message"),
    (dict(messages=[{"role": "user", "content": "  "}]), "messages[0]", "empty"),
    (dict(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
     "messages[0].content[0]", "\"text\" and \"image_url\" parts only"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": 7}]}]),
     "messages[0].content[0]", "not a number"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]),
     "messages[0].content[0]", "http(s) URL or a data URL"),
    (dict(messages=[user("What?", "data:image/png;base64,bm90IGFuIGltYWdl")]), "messages[0].content[0]",
     "not an image"),
    (dict(messages=[user("What?", "data:image/png;base64,@@@")]), "messages[0].content[0]", "valid base64"),
    (dict(messages=[{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}, *OK]),
     "messages[0].content[0]", "only user messages may carry images"),
    (dict(messages=[user("Many", *[RED] * 17)]), "messages", "at most 16"),
]


@pytest.mark.parametrize("request_kwargs,param,words", BAD_REQUESTS,
                         ids=[f"{p}:{w[:24]}" for _, p, w in BAD_REQUESTS])
def test_a_bad_parameter_or_image_is_a_400_naming_the_field(tiny, request_kwargs, param, words):
    with pytest.raises(openai.BadRequestError) as err:
        tiny.client.chat.completions.create(model="m", **request_kwargs)
    e = err.value
    assert e.status_code == 400 and e.body["type"] == "invalid_request_error"
    assert e.body["param"] == param and words in e.body["message"], e.body


def _raw(url, body: bytes, headers=None, method="POST", path="/v1/chat/completions"):
    req = urllib.request.Request(url + path, data=body if method == "POST" else None, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bodies_that_are_not_json_objects_too_large_requests_and_unknown_paths(tiny):
    status, body = _raw(tiny.url, b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = _raw(tiny.url, b"[1, 2]")
    assert status == 400 and "must be a JSON object, not an array" in body["error"]["message"]
    big = json.dumps({"messages": [user("Hi", "data:image/png;base64," + "A" * (5 << 20))]}).encode()
    status, body = _raw(tiny.url, big)
    assert status == 413 and body["error"]["code"] == "request_too_large" and "4 MB" in body["error"]["message"]
    huge = Image.new("RGB", (8000, 6000), (1, 2, 3))  # 48 megapixels: over the 40 MP limit, a small PNG
    with pytest.raises(openai.APIStatusError) as err:
        tiny.client.chat.completions.create(model="m", messages=[user("What?", huge)], **GREEDY)
    assert err.value.status_code == 413 and "megapixels" in err.value.body["message"]
    status, body = _raw(tiny.url, b"", method="GET", path="/v1/embeddings")
    assert status == 404 and "/v1/chat/completions" in body["error"]["message"]
    status, body = _raw(tiny.url, b"", method="GET", path="/v1/chat/completions")
    assert status == 405 and "takes POST requests, not GET" in body["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        tiny.client.models.retrieve("some-other-model")
    assert tiny.client.models.retrieve("tiny-vicuna").id == "tiny-vicuna"


def test_api_key_401_and_503_while_the_model_loads(tiny):
    from mini_gemini.ui.server import Loader
    from mini_gemini.ui.settings import parse_args
    keyed = OpenAIServer(tiny.engine, model_name="k", api_key="s3cret")
    loading = Loader(parse_args(["--model", str(tiny.ckpt), "--sdxl", "none"]))  # the app's loader, not started
    waiting = OpenAIServer(loader_engine(loading), model_name="later")
    with BackgroundServer(keyed) as a, BackgroundServer(waiting) as b:
        client = openai.OpenAI(base_url=a.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            client.chat.completions.create(model="k", messages=OK, **GREEDY)
        assert err.value.status_code == 401 and "Authorization: Bearer" in err.value.body["message"]
        status, body = _raw(a.url, b"", method="GET", path="/v1/models")  # no key at all
        assert status == 401 and body["error"]["type"] == "authentication_error"
        ok = openai.OpenAI(base_url=a.url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.chat.completions.create(model="k", messages=OK, **GREEDY).choices[0].message.content is not None
        late = openai.OpenAI(base_url=b.url + "/v1", api_key="x", max_retries=0)
        for call in (lambda: late.models.list(), lambda: late.chat.completions.create(model="x", messages=OK)):
            with pytest.raises(openai.InternalServerError) as err:
                call()
            assert err.value.status_code == 503 and "still loading (Starting…)" in err.value.body["message"]
        loading.failure = "The app could not load any model (OSError: disk full)."
        loading.done.set()
        with pytest.raises(openai.InternalServerError) as err:
            late.chat.completions.create(model="x", messages=OK)
        assert err.value.status_code == 503 and "disk full" in err.value.body["message"]
        loading.engine = tiny.engine
        assert late.chat.completions.create(model="x", messages=OK, **GREEDY).model == "later"
    with pytest.raises(ModelUnavailable):
        loader_engine(SimpleNamespace(done=threading.Event(), stage="x"))()


def test_image_generation_off_is_a_400(tiny):
    with BackgroundServer(OpenAIServer(Engine(tiny.model), model_name="plain")) as bg:
        client = openai.OpenAI(base_url=bg.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="m", messages=OK, extra_body={"mgm_generate_image": True})
        assert err.value.body["param"] == "mgm_generate_image" and "--sdxl" in err.value.body["message"]


def test_image_generation_known_unavailable_is_a_400_with_its_reason(tiny, tmp_path):
    """An SDXL the server found it cannot have (here: its folder is missing) is refused before any answer is
    written, as when it is off, with the reason and no answer without the picture asked for."""
    from mini_gemini.imagegen import ImageGenerator
    sdxl = ImageGenerator(str(tmp_path / "no-sdxl"), device="cpu")
    assert sdxl.check_source()  # what the app does at start
    engine = Engine(tiny.model, sdxl)
    forwards = []
    with BackgroundServer(OpenAIServer(engine, model_name="plain")) as bg, \
            on_llm_forward(tiny.model, lambda kwargs, output: forwards.append(1)):
        client = openai.OpenAI(base_url=bg.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="m", messages=OK, extra_body={"mgm_generate_image": True})
        body = err.value.body
        assert body["code"] == "image_generation_unavailable" and "does not exist" in body["message"], body
        assert not forwards  # nothing was answered
        assert client.chat.completions.create(model="m", messages=OK, **GREEDY).choices[0].message.content


# ---- a full queue and clients that leave ---------------------------------------------------------------------
@pytest.fixture
def busy(tiny):
    """An endpoint whose engine writes one answer at a time and lets none wait (max_queue=0), over a model
    that never stops by itself; counts the LLM's forwards."""
    engine = Engine(tiny.model, max_active=1)
    server = OpenAIServer(engine, model_name="busy", max_queue=0)
    forwards, started = [0], threading.Event()

    def count(kwargs, output):
        forwards[0] += 1
        if forwards[0] == 3:
            started.set()
    with endless(tiny.model), on_llm_forward(tiny.model, count), BackgroundServer(server) as bg:
        yield SimpleNamespace(url=bg.url, server=server, forwards=forwards, started=started,
                              client=openai.OpenAI(base_url=bg.url + "/v1", api_key="x", max_retries=0))


LONG = 1500   # tokens an endless answer would write if nothing stopped it (the tiny model's context is 2048)


def test_a_full_engine_answers_429_and_a_client_leaving_mid_stream_stops_its_answer(busy):
    with busy.client.chat.completions.create(model="m", messages=OK, temperature=0, max_tokens=LONG,
                                             stream=True) as stream:
        first = next(iter(stream))
        assert first.choices[0].delta.role == "assistant"
        with pytest.raises(openai.RateLimitError) as err:
            busy.client.chat.completions.create(model="m", messages=OK, temperature=0, max_tokens=4)
        assert err.value.status_code == 429 and err.value.body["code"] == "queue_full"
    # leaving the `with` closed the connection: the answer stops at the scheduler's next step
    wait_for(lambda: busy.server.in_flight == 0)
    assert busy.forwards[0] < LONG // 2, busy.forwards[0]
    r = busy.client.chat.completions.create(model="m", messages=OK, temperature=0, max_tokens=5)
    assert r.usage.completion_tokens == 5  # the place is free again


def test_a_client_leaving_a_non_streamed_request_stops_its_answer(busy):
    body = json.dumps({"model": "m", "messages": OK, "temperature": 0, "max_tokens": LONG}).encode()
    host, port = busy.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port))
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    assert busy.started.wait(60)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_for(lambda: busy.server.in_flight == 0)
    assert busy.forwards[0] < LONG // 2, busy.forwards[0]


# ---- the headless command ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def headless(tiny, tmp_path_factory):
    """`python -m mini_gemini.serve` on the tiny checkpoint, with an API key and a 1 MB body limit."""
    port, log = free_port(), tmp_path_factory.mktemp("serve") / "serve.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mini_gemini.serve", "--model", str(tiny.ckpt), "--port",
                                 str(port), "--api-key", "k3y", "--sdxl", "none", "--device", "cpu",
                                 "--max-new-tokens", "24", "--max-body-mb", "1", "--served-model-name", "tiny"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mgm-serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.3)
        yield SimpleNamespace(url=url, client=openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0))
    finally:
        stop_process(proc)


def test_headless_server_answers_as_the_engine_and_checks_its_key(tiny, headless):
    assert [m.id for m in headless.client.models.list()] == ["tiny"]
    turns = [("What is it?", [RED]), ("And the second one, Image 2?", [BLUE])]
    reference = engine_answers(tiny.model, turns, GenOptions(temperature=0, max_new_tokens=24))
    messages = []
    for (text, images), ref in zip(turns, reference):
        messages.append(user(text, *images))
        stream = headless.client.chat.completions.create(model="tiny", messages=messages, temperature=0, stream=True)
        text_got = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text_got == ref.assistant  # max_tokens from --max-new-tokens 24
        messages.append({"role": "assistant", "content": text_got})
    stranger = openai.OpenAI(base_url=headless.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.chat.completions.create(model="tiny", messages=OK)
    with pytest.raises(openai.APIStatusError) as err:
        headless.client.chat.completions.create(model="tiny", messages=[user("Hi", "data:image/png;base64," +
                                                                            "A" * (2 << 20))])
    assert err.value.status_code == 413
    with pytest.raises(openai.BadRequestError) as err:
        headless.client.chat.completions.create(model="tiny", messages=OK, n=3)
    assert err.value.body["param"] == "n"


def test_headless_command_refuses_a_model_it_cannot_load(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mini_gemini.serve", "--model", str(tmp_path / "none"), "--port",
                          str(free_port()), "--sdxl", "none"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 2 and "could not load" in out.stderr


# ---- inside the app -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app(tiny_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openai-app")
    ckpt = tiny_checkpoint("vicuna")
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1",
               MGM_API_KEY="app-key")
    proc, url = launch_app(["--model", ckpt, "--sdxl", "none", "--device", "cpu", "--max-new-tokens", "32"], tmp,
                           tmp / "app.log", env=env)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="app-key", max_retries=0)
        wait_for(lambda: _ready(client), timeout=180)  # the page is up at once; the model loads behind it
        yield SimpleNamespace(url=url, ckpt=ckpt, client=client)
    finally:
        stop_process(proc)


def _ready(client) -> bool:
    try:
        client.models.list()
        return True
    except openai.InternalServerError as e:
        assert e.status_code == 503, e
        return False


def test_the_app_serves_v1_on_its_port_with_the_same_greedy_answers_as_chat(app):
    from gradio_client import Client, handle_file
    path = EXAMPLES / "squares-1.png"
    assert [m.id for m in app.client.models.list()] == [str(app.ckpt)]
    r = app.client.chat.completions.create(model=str(app.ckpt), messages=[user("What is here?", path)],
                                           temperature=0)
    reply, _, _ = Client(app.url, verbose=False).predict("What is here?", [handle_file(str(path))], False, 0.0,
                                                         api_name="/chat")
    assert r.choices[0].message.content == reply.split("\n\nNote: ")[0]
    streamed = app.client.chat.completions.create(model="x", messages=[user("What is here?", path)], temperature=0,
                                                  stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == r.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=app.url + "/v1", api_key="other", max_retries=0).models.list()

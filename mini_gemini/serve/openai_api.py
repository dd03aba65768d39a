"""The OpenAI-compatible endpoint: `POST /v1/chat/completions` and `GET /v1/models` over an `Engine` (FastAPI).

    server = OpenAIServer(engine, model_name="YanweiLi/MGM-2B", api_key=None)
    app.include_router(server.router())          # the app mounts it on Gradio's FastAPI; mgm-serve on its own

Each request is a conversation of its own (`Engine.stateless_session`, built from its messages by
`serve.conversation`): nothing is kept per client, and two clients never see each other's turns. What is kept
is shared by content only: the encodings of recent pictures (by content hash) and the KV caches of recent
answers (by prompt prefix), so a follow-up that resends its conversation prefills only its new tokens, with the
same result as from scratch.

HTTP statuses (bodies in OpenAI's error format, `protocol.APIError`): 400 a parameter or image that cannot be
used (the message names the field); 401 a missing or wrong key when the server has one (`Authorization: Bearer
KEY`); 413 a body over `max_body_bytes` or an image over the byte or pixel limit; 429 when the engine is full
(see `OpenAIServer`); 503 while the model loads (in the app) or when it ran out of memory; 500 anything else.

A streamed answer is sent as server-sent events, `data: {chat.completion.chunk}` lines ending with
`data: [DONE]`; an error after the first chunk is one `data: {"error": {...}}` event. A client that disconnects
(streamed or not) stops the answer: the session's Stop is pressed, and the scheduler drops the answer at its next
step.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .protocol import (
    MAX_BODY_BYTES,
    MAX_QUEUE,
    APIError,
    ChatRequest,
    chunk,
    completion,
    completion_id,
    parse_request,
    usage,
)

if TYPE_CHECKING:
    from ..chat.engine import Engine
    from ..chat.session import ChatSession
    from ..chat.types import Turn

log = logging.getLogger(__name__)

END = ("end",)                  # the worker thread is done

# the engine's error tags -> (HTTP status, OpenAI error type, code)
ENGINE_ERRORS = {"too_long": (400, "invalid_request_error", "context_length_exceeded"),
                 "too_many": (400, "invalid_request_error", "too_many_images"),
                 "too_big": (413, "invalid_request_error", "image_too_big"),
                 "too_many_pixels": (413, "invalid_request_error", "image_too_many_pixels"),
                 "busy": (429, "rate_limit_error", "busy"),
                 "oom": (503, "service_unavailable", "out_of_memory"),
                 "internal": (500, "server_error", "internal")}


class ModelUnavailable(Exception):
    """The model cannot answer yet (loading) or at all (it failed to load): 503 with this message."""


@dataclass
class Final:
    """What the worker knows once the answer is complete."""
    content: str
    finish_reason: str
    usage: dict
    extra: dict = field(default_factory=dict)     # mgm_image_prompt, mgm_mining_summary


def png_data_url(image) -> str:
    """A PIL image as a `data:image/png;base64,...` URL."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_markdown(data_url: str, prompt: str | None) -> str:
    """The drawn picture as it goes into the message content (a markdown image, after a blank line)."""
    alt = " ".join((prompt or "generated image").replace("[", "(").replace("]", ")").split())
    return f"\n\n![{alt}]({data_url})"


# ---- what the model read and wrote ------------------------------------------------------------------------
def mining_summary(engine: Engine, session: ChatSession, turn: Turn) -> dict:
    """Where this answer looked in its images (the turn's own, or the conversation's latest image when the turn sent
    none), from its attribution (`ChatSession.explain`, one extra pass after the answer): the regions of each image
    its map weighs most, the share of its attention each image got, and how much its words owed to mining
    (`viz.answer_map.answer_summary`). With `--llm-server` the LLM's layers are elsewhere: the question-agnostic
    mining focus of each image instead (`viz.mining_summary`, "method": "mining_focus", with a "why").

    Returns:
        {"method": "answer_attention", "layers": [start, stop), "images": [{"image": k, "width", "height",
        "regions": [{"region", "share"}], "attention"}], "ablation": {"median_ratio", "halved", "tokens"},
        "text": one sentence per image and one on mining}; or the mining-focus summary (see `focus_summary`).
    """
    from ..errors import AttributionUnavailable
    from ..viz import heatmap as hm
    from ..viz.answer_map import answer_summary
    images = session.images
    numbers = {id(im): k for k, im in enumerate(images, 1)}
    seen = session.images_seen(turn)
    chosen = [im for im in turn.images if id(im) in numbers] or [im for im in images[-1:] if im in seen]
    if not chosen:
        return {"method": "answer_attention", "images": [], "text": "No image in this conversation."}
    try:
        attribution = session.explain(turn)
    except AttributionUnavailable as e:
        return focus_summary(engine, chosen, numbers, why=str(e))
    return answer_summary(attribution, seen, chosen, numbers, hm.Layout.from_config(engine.model.config))


def focus_summary(engine: Engine, chosen: list, numbers: dict, why: str) -> dict:
    """The question-agnostic summary: shares of mining focus per region of each image (`viz.mining_summary`), as
    the answer could not be attributed here (`why`).

    Returns:
        {"method": "mining_focus", "why", "images": [{"image": k, "width", "height", "regions": [{"region",
        "share"}], "mean_focus", "gain_min", "gain_max"}], "text": one sentence per image}.
    """
    from ..viz import heatmap as hm
    from ..viz.mining_summary import describe, image_summary
    layout = hm.Layout.from_config(engine.model.config)
    out = []
    for im in chosen:
        w, h = im.image.size
        out.append({"image": numbers[id(im)], **image_summary(im.attn.float().numpy(), im.gain.float().numpy(),
                                                              w, h, layout)})
    return {"method": "mining_focus", "why": why, "images": out, "text": " ".join(describe(s, s["image"]) for s in out)}


# ---- one answer, written in a thread --------------------------------------------------------------------------
class Answer:
    """One request's turn on the engine, run in a thread of its own (the engine's API blocks); its events cross
    to the event loop through an asyncio queue as tuples: ("delta", text), ("notice", text), ("progress", x),
    ("image", data URL, prompt), ("error", message, tag), ("fail", APIError), ("done", Final), then END.

    `cancel()` (the client left) presses the session's Stop; the thread still runs the turn to its end, which
    comes at the scheduler's next step. `release` is called once the thread is done (the admission slot).
    """

    def __init__(self, engine: Engine, request: ChatRequest, loop: asyncio.AbstractEventLoop,
                 release: Callable[[], None]):
        self.engine, self.request, self.loop, self.release = engine, request, loop, release
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stopped = threading.Event()
        self.session: ChatSession | None = None

    def start(self) -> Answer:
        try:
            threading.Thread(target=self._run, daemon=True, name="mgm-openai").start()
        except BaseException:
            self.release()
            raise
        return self

    def cancel(self) -> None:
        self.stopped.set()
        if self.session is not None:
            self.session.cancel()

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody reads the answer
            self.cancel()

    def _run(self) -> None:
        try:
            for item in self._items():
                self._put(item)
        except APIError as e:
            self._put(("fail", e))
        except Exception as e:  # noqa: BLE001 - answered as a 500, logged with its traceback
            log.exception("an OpenAI request failed")
            self._put(("fail", APIError(500, f"Something went wrong while answering ({type(e).__name__}: {e}).",
                                        type="server_error", code="internal")))
        finally:
            self.release()
            self._put(END)

    def _items(self):
        from . import conversation  # torch and the engine's modules: not imported by mounting the routes
        eng, req = self.engine, self.request
        history, last = conversation.build(eng, req)
        if self.stopped.is_set():
            return
        self.session = session = eng.stateless_session(history)
        events = session.chat(last.text, last.images, generate_image=req.generate_image, options=req.options)
        done = None
        try:
            for ev in events:
                if self.stopped.is_set():  # a Stop pressed before the turn began is cleared by it: press again
                    session.cancel()
                if ev.kind == "delta":
                    yield ("delta", ev.text)
                elif ev.kind == "notice":
                    yield ("notice", str(ev.text))
                elif ev.kind == "progress":
                    yield ("progress", float(ev.data or 0.0))
                elif ev.kind == "image":
                    yield ("image", png_data_url(ev.data), ev.text)
                elif ev.kind == "error":
                    yield ("error", ev.text, ev.data)
                elif ev.kind == "done":
                    done = ev.data
        finally:
            events.close()
        if done is not None:  # once the turn has ended (its lock free): the summary may take the model again
            yield ("done", self._final(session, done))

    def _final(self, session: ChatSession, turn: Turn) -> Final:
        eng, req = self.engine, self.request
        in_view = [im for t in session.turns[turn.window_start:] for im in t.images]
        image_tokens = sum(int(im.tokens.shape[0]) for im in in_view)
        prompt_tokens = len(turn.prompt_ids) - len(in_view) + image_tokens
        room = min(req.options.max_new_tokens, eng.max_context - prompt_tokens)
        finish = "length" if len(turn.token_ids) >= room else "stop"
        extra = {}
        if req.generate_image:
            extra["mgm_image_prompt"] = turn.image_prompt
        if req.mining_summary:
            extra["mgm_mining_summary"] = mining_summary(eng, session, turn)
        return Final(turn.assistant or "", finish,
                     usage(prompt_tokens, len(turn.token_ids), turn.cached_tokens, image_tokens), extra)


def engine_error(message: str, tag) -> APIError:
    """An engine "error" event as the API's error (image tags as `conversation.image_error` maps them)."""
    status, kind, code = ENGINE_ERRORS.get(tag, (400, "invalid_request_error", f"image_{tag}"))
    return APIError(status, message, type=kind, code=code)


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read already: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class EventStream(StreamingResponse):
    """Server-sent events; `on_close` runs however the response ends (the client may have gone)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


# ---- the routes -------------------------------------------------------------------------------------------
class OpenAIServer:
    """`/v1/chat/completions` and `/v1/models` over one engine.

    Args:
        engine: the `Engine`, or a function that returns it and raises `ModelUnavailable` while there is none
            (the app: while the model loads).
        model_name: the id `/v1/models` lists and answers carry (a string, or a function giving it).
        api_key: when set, every request must carry `Authorization: Bearer <api_key>` (else 401).
        max_tokens: the answer length when a request gives none.
        max_queue: how many answers may wait for a place in the scheduler. A request is refused with 429 when
            this server already has `engine.scheduler.max_active + max_queue` requests in progress (being
            answered, or fetching and encoding their images), or when `max_queue` answers (of any client, the
            app's page included) wait in the scheduler's queue (`engine.scheduler.waiting`).
        max_body_bytes: the largest request body (413 above it).
    """

    def __init__(self, engine, *, model_name, api_key: str | None = None, max_tokens: int = 512,
                 max_queue: int = MAX_QUEUE, max_body_bytes: int = MAX_BODY_BYTES):
        self.get_engine: Callable[[], Engine] = engine if callable(engine) else (lambda: engine)
        self.get_name: Callable[[], str] = model_name if callable(model_name) else (lambda: str(model_name))
        self.api_key = api_key or None
        self.max_tokens, self.max_queue, self.max_body_bytes = int(max_tokens), max(0, int(max_queue)), max_body_bytes
        self.created = int(time.time())
        self.in_flight = 0
        self._lock = threading.Lock()

    def router(self) -> APIRouter:
        """The routes: POST /v1/chat/completions, GET /v1/models and /v1/models/{id}; anything else under /v1
        is answered in OpenAI's error format (404, or 405 for a known path with another method)."""
        r = APIRouter()
        r.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"], include_in_schema=False)
        r.add_api_route("/v1/models", self.models, methods=["GET"], include_in_schema=False)
        r.add_api_route("/v1/models/{model_id:path}", self.model, methods=["GET"], include_in_schema=False)
        r.add_api_route("/v1/{path:path}", self.unknown, methods=["GET", "POST", "PUT", "DELETE", "PATCH"],
                        include_in_schema=False)
        return r

    # ---- checks -----------------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Missing or wrong API key: send it as the header `Authorization: Bearer <key>` "
                                "(the key the server was started with, --api-key).",
                           type="authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def _engine(self) -> Engine:
        try:
            return self.get_engine()
        except ModelUnavailable as e:
            raise APIError(503, str(e), type="service_unavailable", code="model_not_ready",
                           headers={"Retry-After": "5"}) from e

    async def _body(self, request: Request):
        limit = self.max_body_bytes
        data, size = bytearray(), 0
        async for part in request.stream():  # past the limit the rest is read and dropped: the client then
            size += len(part)                 # gets the 413, not a connection reset in the middle of its upload
            if size <= limit:
                data += part
        if size > limit:
            raise APIError(413, f"The request body is larger than this server's limit of {limit >> 20} MB; send "
                                "fewer or smaller images.", code="request_too_large")
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"The request body is not valid JSON ({e}).", code="invalid_json") from e

    def _admit(self, engine: Engine) -> None:
        sched = engine.scheduler
        waiting = len(getattr(sched, "waiting", ()))
        with self._lock:
            if self.in_flight >= sched.max_active + self.max_queue or (self.max_queue and waiting >= self.max_queue):
                raise APIError(429, f"The server is busy ({self.in_flight} requests in progress, {waiting} waiting "
                                    "for the model); try again in a moment.", type="rate_limit_error",
                               code="queue_full", headers={"Retry-After": "1"})
            self.in_flight += 1

    def _release(self) -> None:
        with self._lock:
            self.in_flight -= 1

    @staticmethod
    def _error(e: APIError) -> JSONResponse:
        log.info("refused (%d): %s", e.status, " ".join(e.message.split())[:300])
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    # ---- endpoints ---------------------------------------------------------------------------------------
    async def models(self, request: Request):
        try:
            self._authorize(request)
            self._engine()
        except APIError as e:
            return self._error(e)
        return {"object": "list", "data": [self._card()]}

    async def model(self, model_id: str, request: Request):
        try:
            self._authorize(request)
            self._engine()
            if model_id != self.get_name():
                raise APIError(404, f"The model {model_id!r} does not exist here; this server serves "
                                    f"{self.get_name()!r}.", param="model", code="model_not_found")
        except APIError as e:
            return self._error(e)
        return self._card()

    def _card(self) -> dict:
        return {"id": self.get_name(), "object": "model", "created": self.created, "owned_by": "mini-gemini-studio"}

    async def unknown(self, path: str, request: Request):
        known = {"chat/completions": "POST", "models": "GET"}.get(path.strip("/"))
        if known:
            return self._error(APIError(405, f"/v1/{path.strip('/')} takes {known} requests, not {request.method}.",
                                        code="method_not_allowed", headers={"Allow": known}))
        return self._error(APIError(404, f"There is no endpoint /v1/{path} here; this server offers "
                                         "POST /v1/chat/completions and GET /v1/models.", code="unknown_url"))

    async def chat_completions(self, request: Request):
        try:
            self._authorize(request)
            body = await self._body(request)
            req = parse_request(body, max_tokens=self.max_tokens)
            engine = self._engine()
            if req.generate_image and engine.imagegen is None:
                raise APIError(400, "Image generation is off on this server: start it with --sdxl MODEL (e.g. "
                                    "stabilityai/stable-diffusion-xl-base-1.0) to use mgm_generate_image.",
                               param="mgm_generate_image", code="image_generation_off")
            why = engine.imagegen.unavailable if req.generate_image else None
            if why:  # known already (not cached and offline, a failed load): say so rather than answer without it
                raise APIError(400, f"Image generation is unavailable on this server now: {why}",
                               param="mgm_generate_image", code="image_generation_unavailable")
            self._admit(engine)
        except APIError as e:
            return self._error(e)
        answer = Answer(engine, req, asyncio.get_running_loop(), self._release).start()
        name = self.get_name()
        try:
            head = await self._until(answer, request, ("delta",) if req.stream else ())
        except BaseException:
            answer.cancel()
            raise
        if head is None:  # the client left before the answer began
            return JSONResponse({}, status_code=499)
        kind = head[-1][0]
        if kind == "fail":
            return self._error(head[-1][1])
        if kind == "error":
            return self._error(engine_error(head[-1][1], head[-1][2]))
        if req.stream:
            return EventStream(self._events(answer, head, req, name), answer.cancel)
        return self._complete(head, name)

    async def _until(self, answer: Answer, request: Request, early: tuple[str, ...]) -> list | None:
        """The answer's items up to its end ("done", "error", "fail", END), or up to the first item of a kind in
        `early`; None when the client disconnected first (the answer is then cancelled)."""
        items = []
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while True:
                get = asyncio.ensure_future(answer.queue.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    answer.cancel()
                    return None
                item = get.result()
                if item is END:
                    return items + [("fail", APIError(500, "The answer ended without a result.",
                                                      type="server_error", code="internal"))]
                items.append(item)
                if item[0] in ("done", "error", "fail") + early:
                    return items
        finally:
            gone.cancel()

    def _complete(self, items: list, name: str) -> JSONResponse:
        final: Final = items[-1][1]
        notes = [it[1] for it in items if it[0] == "notice"]
        content = final.content + "".join(image_markdown(it[1], it[2]) for it in items if it[0] == "image")
        return JSONResponse(completion(completion_id(), name, content, final.finish_reason, final.usage,
                                       {"mgm_notes": notes, **final.extra}))

    async def _events(self, answer: Answer, head: list, req: ChatRequest, name: str) -> AsyncIterator[str]:
        cid, created, notes = completion_id(), int(time.time()), []
        with_usage = req.include_usage

        def content(text: str) -> str:
            return sse(chunk(cid, name, created, {"content": text}, include_usage=with_usage))

        yield sse(chunk(cid, name, created, {"role": "assistant", "content": ""}, include_usage=with_usage))
        pending = list(head)
        while True:
            item = pending.pop(0) if pending else await answer.queue.get()
            kind = item[0]
            if item is END:
                yield "data: [DONE]\n\n"
                return
            if kind == "delta" and item[1]:
                yield content(item[1])
            elif kind == "notice":
                notes.append(item[1])
            elif kind == "progress":  # a comment line: keeps the connection busy while a picture is drawn
                yield f": drawing {item[1]:.0%}\n\n"
            elif kind == "image":
                yield content(image_markdown(item[1], item[2]))
            elif kind in ("error", "fail"):
                err = item[1] if kind == "fail" else engine_error(item[1], item[2])
                log.info("stream ended by an error (%d): %s", err.status, err.message[:300])
                yield sse(err.body())
                yield "data: [DONE]\n\n"
                return
            elif kind == "done":
                final: Final = item[1]
                yield sse(chunk(cid, name, created, {}, final.finish_reason, include_usage=with_usage,
                                extra={"mgm_notes": notes, **final.extra}))
                if with_usage:
                    yield sse(chunk(cid, name, created, None, usage=final.usage, include_usage=True))
                yield "data: [DONE]\n\n"
                return


# ---- serving ------------------------------------------------------------------------------------------------
def create_app(server: OpenAIServer) -> FastAPI:
    """A FastAPI app with only the endpoint (mgm-serve), open to browser clients of other origins (CORS), and
    `GET /health`."""
    from fastapi.middleware.cors import CORSMiddleware
    app = FastAPI(title="Mini-Gemini OpenAI-compatible server", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])
    app.include_router(server.router())
    app.add_api_route("/health", lambda: {"status": "ok"}, methods=["GET"], include_in_schema=False)
    return app


def loader_engine(loader) -> Callable[[], Engine]:
    """The engine of the app's background `Loader` (`done`, `engine`, `stage`, `failure`), or ModelUnavailable
    while it loads or when it failed."""
    def get() -> Engine:
        if not loader.done.is_set():
            raise ModelUnavailable(f"The model is still loading ({loader.stage}); try again in a moment.")
        if loader.engine is None:
            raise ModelUnavailable(loader.failure or "No model could be loaded on this server.")
        return loader.engine
    return get


def mount_in_app(app: FastAPI, loader, args) -> OpenAIServer:
    """Serve the endpoint from the app's own process, on its port, over the app's engine (same model, same
    scheduler and limits as the page).

    Args:
        app: the app's FastAPI (Gradio's `demo.app`, once launched).
        loader: the app's background loader (`done`, `engine`, `stage`, `failure`, `demo`): 503 until it is done.
        args: the app's options (`model`, `api_key`, `max_new_tokens`). The model id is `--model` as given, or
            "demo" when the app runs on the bundled demo model.
    """
    server = OpenAIServer(loader_engine(loader), model_name=lambda: "demo" if loader.demo else str(args.model),
                          api_key=args.api_key, max_tokens=args.max_new_tokens)
    app.include_router(server.router())
    return server


class BackgroundServer:
    """The endpoint served by uvicorn in a thread of this process (a notebook, the benchmark, tests):

        with BackgroundServer(OpenAIServer(engine, model_name="m")) as bg:
            client = openai.OpenAI(base_url=bg.url + "/v1", api_key="none")

    Args:
        server: the routes to serve (`create_app(server)`).
        host, port: where to listen; port 0 takes a free one (`url` says which).
    """

    def __init__(self, server: OpenAIServer, host: str = "127.0.0.1", port: int = 0):
        import uvicorn
        self.server = server
        self._uvicorn = uvicorn.Server(uvicorn.Config(create_app(server), host=host, port=port, log_level="warning",
                                                      timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self._uvicorn.run, daemon=True, name="mgm-openai-server")
        self.url = ""

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        """Start serving; returns once the port is open. Raises RuntimeError if it does not open in `timeout` s."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the OpenAI-compatible server did not start (is the port free?)")
            time.sleep(0.01)
        host, port = self._uvicorn.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(10)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

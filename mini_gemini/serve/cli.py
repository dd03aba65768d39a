"""The OpenAI-compatible server alone, without the Gradio page (for servers that need no UI):

    mgm-serve --model YanweiLi/MGM-2B --port 8000 [--api-key KEY] [--sdxl none] [--host 0.0.0.0]
    python -m mini_gemini.serve --model demo --port 8000

Then `POST /v1/chat/completions`, `GET /v1/models` (and `GET /health`) at http://HOST:PORT. The model is loaded
before the port opens; a model that cannot be loaded is an error (exit status 2), never a silent fallback.
Every option also comes from the environment: MGM_MODEL, MGM_SDXL, MGM_DEVICE, MGM_DTYPE, MGM_TEMPLATE,
MGM_LOAD_IN_4BIT, MGM_LOAD_IN_8BIT, MGM_LLM_SERVER, MGM_API_KEY, MGM_MAX_NEW_TOKENS, MGM_HOST, MGM_PORT.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..constants import DEFAULT_SDXL
from ..model_flags import add_model_flags, check_model_flags
from ..resources import resolve_model_name
from .protocol import MAX_BODY_BYTES, MAX_QUEUE

DEFAULT_MODEL = "YanweiLi/MGM-2B"   # as the app
log = logging.getLogger("mini_gemini.serve")


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    ap = argparse.ArgumentParser(prog="mgm-serve" if Path(sys.argv[0]).stem == "mgm-serve" else
                                 "python -m mini_gemini.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(ap, default_model=DEFAULT_MODEL, from_env=True, default_sdxl=DEFAULT_SDXL)
    ap.add_argument("--host", default=env("MGM_HOST", "127.0.0.1"), help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=int(env("MGM_PORT", "8000")), help="port to listen on (default 8000)")
    ap.add_argument("--api-key", default=env("MGM_API_KEY") or None,
                    help="require `Authorization: Bearer KEY` on every request (env MGM_API_KEY)")
    ap.add_argument("--served-model-name", help="the model id /v1/models lists (default: --model as given)")
    ap.add_argument("--max-new-tokens", type=int, default=int(env("MGM_MAX_NEW_TOKENS", "512")),
                    help="answer length when a request gives no max_tokens (default 512)")
    ap.add_argument("--max-active", type=int, default=8,
                    help="answers written at once by the batching scheduler (default 8; 0: one whole answer at a "
                         "time with the LLM's generate)")
    ap.add_argument("--max-queue", type=int, default=MAX_QUEUE,
                    help=f"answers that may wait for a place (default {MAX_QUEUE}); more get HTTP 429")
    ap.add_argument("--max-body-mb", type=int, default=MAX_BODY_BYTES >> 20,
                    help=f"largest request body in MB (default {MAX_BODY_BYTES >> 20}); larger ones get HTTP 413")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return ap


def _log_to_console(level: str) -> None:
    ours = logging.getLogger("mini_gemini")
    if not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[mgm-serve] %(message)s"))
        ours.addHandler(handler)
        ours.propagate = False
    ours.setLevel(level.upper())


def main(argv=None) -> int:
    ap = build_parser()
    args = check_model_flags(ap, ap.parse_args(argv))
    _log_to_console(args.log_level)
    try:
        import uvicorn

        from .openai_api import OpenAIServer, create_app
    except ImportError as e:
        print(f"error: the server needs FastAPI and uvicorn ({e}): pip install 'mini-gemini-studio[serve]'",
              file=sys.stderr)
        return 2
    from ..chat.engine import Engine
    from ..chat.serving import settle
    from ..modeling.loading import ModelLoadError, load_pretrained
    log.info("loading %s …", args.model)
    try:
        model = load_pretrained(resolve_model_name(args.model), device=args.device, dtype=args.dtype,
                                load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit,
                                template=args.template, llm_layers=not args.llm_server)
    except (ModelLoadError, ValueError, OSError) as e:
        print(f"error: could not load {args.model}: {e}", file=sys.stderr)
        return 2
    imagegen = None
    if str(args.sdxl or "").lower() not in ("", "none", "off"):
        from ..imagegen import ImageGenerator
        imagegen = ImageGenerator(args.sdxl, device=args.device)  # loads on first use
    engine = Engine(model, imagegen, llm_server=args.llm_server, max_active=args.max_active)
    settle(engine)  # CPU threads for the model's size; what was loaded out of the collector's sight
    name = args.served_model_name or args.model
    server = OpenAIServer(engine, model_name=name, api_key=args.api_key, max_tokens=args.max_new_tokens,
                          max_queue=args.max_queue, max_body_bytes=args.max_body_mb << 20)
    log.info("serving %s at http://%s:%d/v1 (POST /v1/chat/completions, GET /v1/models)%s", name, args.host,
             args.port, "; an API key is required" if args.api_key else "")
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=5)
    return 0

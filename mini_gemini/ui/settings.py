"""Command-line options of the app (every one also from the environment) and fixed UI settings."""
from __future__ import annotations

import argparse
import os

from ..constants import DEFAULT_SDXL
from ..model_flags import add_model_flags, check_model_flags
from ..model_flags import env_flag as _env_flag

# chat turns let through to the engine at once: as many as it writes at once (Engine.max_active), so that the
# others wait in Gradio's queue, shown their place, instead of holding a worker thread each
TURNS_AT_ONCE = 8
CACHE_SWEEP_S = 600  # how often Gradio looks for cached files older than --cache-max-age
DEFAULT_MODEL = "YanweiLi/MGM-2B"
RED_SQUARE = "What digit is in the red square?"
CMAPS = ["inferno", "viridis", "magma", "jet", "coolwarm", "gray"]
CSS = """
#mgm-banner {background: #fff4e5; border: 1px solid #f0ad4e; border-radius: 8px; padding: 4px 14px;}
#mgm-banner * {color: #5c3c00 !important;}
#mgm-status {font-size: 0.92em; opacity: 0.85;}
#mgm-switch-note, #mgm-switch-note * {font-size: 0.85rem !important; opacity: 0.9;}
"""


def parse_args(argv=None) -> argparse.Namespace:
    env = os.environ.get
    ap = argparse.ArgumentParser(description="Mini-Gemini web demo (Gradio).")
    add_model_flags(ap, default_model=DEFAULT_MODEL, from_env=True, default_sdxl=DEFAULT_SDXL)
    ap.add_argument("--max-new-tokens", type=int, default=int(env("MGM_MAX_NEW_TOKENS", "512")),
                    help="default answer length (the UI has a slider)")
    ap.add_argument("--host", default=env("GRADIO_SERVER_NAME"), help="address to listen on")
    ap.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "0")) or None,
                    help="port to listen on (default 7860, or the next free one)")
    ap.add_argument("--cache-max-age", type=int, metavar="SECONDS", default=int(env("MGM_CACHE_MAX_AGE", "3600")),
                    help="Gradio's cached files (uploads, pictures shown) older than this are deleted, whatever "
                         "their session; a client's own go as soon as it leaves (default 3600; 0 = only then)")
    ap.add_argument("--share", action="store_true", default=_env_flag("MGM_SHARE"), help="public gradio.live link")
    ap.add_argument("--mcp", action="store_true",
                    default=_env_flag("MGM_MCP_SERVER") or _env_flag("GRADIO_MCP_SERVER"),
                    help="also serve the chat as an MCP tool for agents at /gradio_api/mcp/ "
                         "(needs the mcp package; see mini_gemini.ui.mcp)")
    ap.add_argument("--api-key", default=env("MGM_API_KEY") or None,
                    help="require `Authorization: Bearer KEY` on the OpenAI-compatible /v1 endpoint (env MGM_API_KEY)")
    return check_model_flags(ap, ap.parse_args(argv))

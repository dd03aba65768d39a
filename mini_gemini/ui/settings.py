"""Command-line options of the app (every one also from the environment) and fixed UI settings."""
from __future__ import annotations

import argparse
import os

from ..imagegen import DEFAULT_SDXL

TURNS_AT_ONCE = 16  # chat turns let through to the engine at once (its own limit is Engine.max_active)
DEFAULT_MODEL = "YanweiLi/MGM-2B"
RED_SQUARE = "What digit is in the red square?"
CMAPS = ["inferno", "viridis", "magma", "jet", "coolwarm", "gray"]
CSS = """
#mgm-banner {background: #fff4e5; border: 1px solid #f0ad4e; border-radius: 8px; padding: 4px 14px;}
#mgm-banner * {color: #5c3c00 !important;}
#mgm-status {font-size: 0.92em; opacity: 0.85;}
"""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def parse_args(argv=None) -> argparse.Namespace:
    env = os.environ.get
    ap = argparse.ArgumentParser(description="Mini-Gemini web demo (Gradio).")
    ap.add_argument("--model", default=env("MGM_MODEL", DEFAULT_MODEL), help="hub id or local checkpoint folder")
    ap.add_argument("--sdxl", default=env("MGM_SDXL", DEFAULT_SDXL),
                    help="Stable Diffusion XL hub id or folder for image generation; 'none' turns it off")
    ap.add_argument("--device", default=env("MGM_DEVICE"), help="cuda, cuda:1, cpu (default: cuda if available)")
    ap.add_argument("--dtype", default=env("MGM_DTYPE"), choices=["float32", "float16", "bfloat16"],
                    help="weights dtype (default: bfloat16/float16 on GPU, float32 on CPU)")
    ap.add_argument("--template", default=env("MGM_TEMPLATE"), help="override the chat template")
    quant = ap.add_mutually_exclusive_group()
    quant.add_argument("--load-in-4bit", action="store_true", default=_env_flag("MGM_LOAD_IN_4BIT"),
                       help="quantise the LLM to 4 bits (bitsandbytes, CUDA only)")
    quant.add_argument("--load-in-8bit", action="store_true", default=_env_flag("MGM_LOAD_IN_8BIT"),
                       help="quantise the LLM to 8 bits (bitsandbytes, CUDA only)")
    ap.add_argument("--max-new-tokens", type=int, default=int(env("MGM_MAX_NEW_TOKENS", "512")),
                    help="default answer length (the UI has a slider)")
    ap.add_argument("--llm-server", metavar="URL", default=env("MGM_LLM_SERVER") or None,
                    help="run the LLM on this vLLM server (see README: Serving the LLM with vLLM), "
                         "e.g. http://127.0.0.1:8000")
    ap.add_argument("--host", default=env("GRADIO_SERVER_NAME"), help="address to listen on")
    ap.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "0")) or None,
                    help="port to listen on (default 7860, or the next free one)")
    ap.add_argument("--share", action="store_true", default=_env_flag("MGM_SHARE"), help="public gradio.live link")
    ap.add_argument("--mcp", action="store_true",
                    default=_env_flag("MGM_MCP_SERVER") or _env_flag("GRADIO_MCP_SERVER"),
                    help="also serve the chat as an MCP tool for agents at /gradio_api/mcp/ "
                         "(needs the mcp package; see mini_gemini.ui.mcp)")
    args = ap.parse_args(argv)
    if args.load_in_4bit and args.load_in_8bit:
        ap.error("choose one of --load-in-4bit and --load-in-8bit")
    return args

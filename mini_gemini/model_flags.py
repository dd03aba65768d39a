"""The model options the CLI and the app share: one definition, the same names, help and checks.

    add_model_flags(parser, default_model="demo")                    # CLI
    add_model_flags(parser, default_model=..., from_env=True)        # app: MGM_MODEL, MGM_DEVICE, ... as defaults
"""
from __future__ import annotations

import argparse
import os

from .constants import DEFAULT_SDXL

DTYPES = ("float32", "float16", "bfloat16")
QUANTIZE = ("none", "int8")


def env_flag(name: str) -> bool:
    """An on/off environment variable: 1, true, yes or on (any case) is on."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def add_model_flags(ap: argparse.ArgumentParser, *, default_model: str, from_env: bool = False,
                    default_sdxl: str | None = None) -> None:
    """Add --model, --sdxl, --device, --dtype, --template, --load-in-4bit | --load-in-8bit, --quantize and
    --llm-server.

    from_env: defaults come from MGM_MODEL, MGM_SDXL, MGM_DEVICE, MGM_DTYPE, MGM_TEMPLATE, MGM_LOAD_IN_4BIT,
    MGM_LOAD_IN_8BIT, MGM_QUANTIZE (MGM_LLM_SERVER is read either way). `check_model_flags` refuses two
    quantisations at once.
    """
    env = os.environ.get if from_env else (lambda name, default=None: default)
    ap.add_argument("--model", default=env("MGM_MODEL", default_model),
                    help="hub id (YanweiLi/MGM-2B), local checkpoint folder, or 'demo' (the bundled model)")
    ap.add_argument("--sdxl", default=env("MGM_SDXL", default_sdxl),
                    help=f"Stable Diffusion XL hub id or folder for image generation (default {DEFAULT_SDXL}); "
                         "'none' turns it off")
    ap.add_argument("--device", default=env("MGM_DEVICE"), help="cuda, cuda:1, cpu (default: cuda if available)")
    ap.add_argument("--dtype", default=env("MGM_DTYPE"), choices=list(DTYPES),
                    help="weights dtype (default: bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--template", default=env("MGM_TEMPLATE"),
                    help="chat template override (gemma, vicuna_v1, llama_3, mistral_instruct, chatml_direct)")
    quant = ap.add_mutually_exclusive_group()
    quant.add_argument("--load-in-4bit", action="store_true", default=from_env and env_flag("MGM_LOAD_IN_4BIT"),
                       help="quantise the LLM to 4 bits (bitsandbytes, CUDA only)")
    quant.add_argument("--load-in-8bit", action="store_true", default=from_env and env_flag("MGM_LOAD_IN_8BIT"),
                       help="quantise the LLM to 8 bits (bitsandbytes, CUDA only)")
    ap.add_argument("--quantize", choices=list(QUANTIZE), default=env("MGM_QUANTIZE", "none") or "none",
                    help="int8: CPU inference with 8-bit weights and activations, quantized while loading "
                         "(about 4x less memory than float32, faster prefill, encoding and decode; README: CPU)")
    ap.add_argument("--llm-server", metavar="URL", default=os.environ.get("MGM_LLM_SERVER") or None,
                    help="run the LLM on this vLLM server (started on `mgm-export-llm` output with "
                         "--enable-prompt-embeds; README: Serving the LLM with vLLM), e.g. http://127.0.0.1:8000; "
                         "env MGM_LLM_SERVER")


def check_model_flags(ap: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Refuse what argparse cannot see (both quantisations on through the environment)."""
    if args.load_in_4bit and args.load_in_8bit:
        ap.error("choose one of --load-in-4bit and --load-in-8bit")
    if args.quantize not in QUANTIZE:
        ap.error(f"--quantize (MGM_QUANTIZE) must be one of {', '.join(QUANTIZE)}")
    if args.quantize != "none" and (args.load_in_4bit or args.load_in_8bit):
        ap.error("--quantize is for CPU inference, --load-in-4bit/--load-in-8bit for a GPU: choose one")
    return args


def quantization_arg(args: argparse.Namespace) -> str | None:
    """`load_pretrained`'s quantization= for the parsed flags (None for --quantize none)."""
    q = getattr(args, "quantize", "none")
    return None if q in (None, "none") else q

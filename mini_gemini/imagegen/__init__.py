"""Images from prompts the LLM writes: `<h>...</h>` extraction and the SDXL pipeline (diffusers).

Imported on first use (torch, diffusers), except the default model id.
"""
from importlib import import_module

from ..constants import DEFAULT_SDXL  # noqa: F401

_NAMES = ("NEGATIVE_PROMPT", "FittedPrompt", "ImageGenerator", "ImageGenError", "extract_image_prompt",
          "fit_to_tokens")


def __getattr__(name):
    if name in _NAMES:
        return getattr(import_module(".generator", __name__), name)
    raise AttributeError(f"module 'mini_gemini.imagegen' has no attribute {name!r}")

"""Images from prompts the LLM writes: `<h>...</h>` extraction and the SDXL pipeline (diffusers)."""
from .generator import (DEFAULT_SDXL, NEGATIVE_PROMPT, FittedPrompt, ImageGenerator, ImageGenError,  # noqa: F401
                        extract_image_prompt, fit_to_tokens)

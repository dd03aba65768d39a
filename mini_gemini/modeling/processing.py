"""One object that turns a conversation into model inputs: tokenizer, image processor and chat template.

As transformers' `processing_llava.py`: the model holds weights only; `MGMProcessor` owns everything that
prepares its inputs, and is saved and loaded with the checkpoint (tokenizer files; the image processor and
the template are derived from `config.json`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .chat_template import Prompt, PromptTurn, Template, build_prompt, tokenize

if TYPE_CHECKING:
    from .image_processing import ImageProcessor, Views


@dataclass
class MGMProcessor:
    """Args:
        tokenizer: the checkpoint's transformers tokenizer (loaded as the official stack loads it).
        image_processor: pads, resizes and normalises images into the LR and HR tensors.
        template: the chat template (one of `mini_gemini.modeling.chat_template.TEMPLATES`).
    """
    tokenizer: Any
    image_processor: ImageProcessor
    template: Template

    def build_prompt(self, turns: list[PromptTurn], first_image: int = 1) -> Prompt:
        """The prompt of a conversation (`PromptTurn`s with their image counts) in this template; `first_image`:
        the conversation number of the first image in `turns` (see `chat_template.build_prompt`)."""
        return build_prompt(self.template, turns, first_image)

    def tokenize(self, prompt: Prompt) -> list[int]:
        """Prompt -> token ids with one IMAGE_TOKEN_INDEX (-200) slot per image, as the official
        `tokenizer_image_token` gives them."""
        return tokenize(prompt, self.tokenizer)

    def images(self, image) -> Views:
        """One PIL image -> `Views` (pixel_values (V, 3, S, S), pixel_values_aux (3, S_aux, S_aux))."""
        return self.image_processor(image)

    def save_pretrained(self, out_dir) -> None:
        """Write the tokenizer files (the rest of the processor is derived from config.json)."""
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out_dir)

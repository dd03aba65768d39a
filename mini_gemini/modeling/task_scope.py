"""What a checkpoint says it was trained to answer (optional `mgm_task_scope` in its config.json).

Real MGM checkpoints answer anything and carry no scope. The bundled demo model was trained on one synthetic
task only (digits and coloured squares, `assets/demo-model/README.md`): its config.json declares the task, so
that every front end (CLI, app, `/chat`, MCP, the OpenAI endpoint) can tell the user when a question or a
picture is outside it and the answer means nothing.

    "mgm_task_scope": {
        "summary": "questions about the digits and coloured squares of pictures like the examples ...",
        "question_words": ["digit", "number", "square", "colour", "color"],
        "picture": {"colours": 12, "min_share": 0.85},
        "image_prompts": false
    }

`image_prompts` (default true) says whether the model was trained to write image prompts (`<h>...</h>`, for
image generation): when false, a turn that asks for an image gets a note that the prompt means nothing.
A question is in scope when it holds one of `question_words`. A picture is in scope when it is made of a few
flat colours like the task's scenes: downscaled to 64 x 64 (nearest) with 16 levels per channel, its
`colours` most frequent colours cover at least `min_share` of the pixels (scenes: >= 0.90 even as JPEG at
quality 70; photos: ~0.5, e.g. matplotlib's grace_hopper.jpg 0.53).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCOPE_KEY = "mgm_task_scope"


@dataclass(frozen=True)
class TaskScope:
    summary: str
    question_words: tuple[str, ...] = ()
    colours: int = 12
    min_share: float = 0.85
    image_prompts: bool = True     # trained to write image prompts (<h>...</h>) when asked for an image

    @classmethod
    def from_config(cls, raw: dict) -> TaskScope | None:
        """The scope a config.json declares (`mgm_task_scope`), or None (the model answers anything).

        Raises:
            ValueError: the entry is there but malformed (says which field).
        """
        entry = raw.get(SCOPE_KEY)
        if not entry:
            return None
        if not isinstance(entry, dict) or not isinstance(entry.get("summary"), str):
            raise ValueError(f"config.json's {SCOPE_KEY} must be an object with a 'summary' string")
        picture = entry.get("picture") or {}
        image_prompts = entry.get("image_prompts", True)
        if not isinstance(image_prompts, bool):
            raise ValueError(f"config.json's {SCOPE_KEY}.image_prompts must be true or false")
        return cls(summary=entry["summary"], question_words=tuple(str(w).lower() for w in entry.get("question_words", ())),
                   colours=int(picture.get("colours", 12)), min_share=float(picture.get("min_share", 0.85)),
                   image_prompts=image_prompts)

    def covers_question(self, text: str) -> bool:
        """Whether a question belongs to the task (holds one of its words; no words declared: every question)."""
        words = (text or "").lower()
        return not self.question_words or any(w in words for w in self.question_words)

    def covers_picture(self, image) -> bool:
        """Whether a PIL image looks like the task's pictures (a few flat colours; see the module docstring)."""
        return flat_colour_share(image, self.colours) >= self.min_share


def flat_colour_share(image, colours: int = 12) -> float:
    """Share of an image's pixels (64 x 64 nearest downscale, 16 levels per channel) in its `colours` most
    frequent colours: 1.0 for a picture of `colours` flat areas or fewer, about 0.5 for a photo."""
    from PIL import Image
    small = np.asarray(image.convert("RGB").resize((64, 64), Image.NEAREST)) >> 4
    codes = (small[..., 0].astype(np.int64) * 16 + small[..., 1]) * 16 + small[..., 2]
    counts = np.sort(np.bincount(codes.ravel(), minlength=4096))[::-1]
    return float(counts[:colours].sum() / counts.sum())

"""What a conversation is made of: generation options, turns, images in a turn, notes and stream events.

These are plain records shared by the engine, the CLI and the app; nothing here runs the model.
"""
from __future__ import annotations

import dataclasses
import math
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import torch

MAX_USER_CHARS = 16_000       # longer messages are cut (with a notice) before anything else


class Note(str):
    """A note about a turn: its text (it *is* the string) and a `kind` saying what it is about.

    Kinds: "image" (an input image: EXIF applied, frame used, ...), "message" (the user's text was cut),
    "context" (old turns left out), "stopped", "expired", "imagegen" (image generation), "image_prompt".
    Notes of kinds in `ABOUT_MESSAGE` describe the user's message and stay true when the answer is redone.
    """
    kind: str

    def __new__(cls, kind: str, text: str) -> "Note":
        note = super().__new__(cls, text)
        note.kind = kind
        return note

    def __reduce__(self):  # pickles (ZeroGPU workers) keep the kind
        return (Note, (self.kind, str(self)))

    @property
    def text(self) -> str:
        return str(self)


ABOUT_MESSAGE = frozenset({"image", "message"})

@dataclass
class GenOptions:
    temperature: float = 0.2
    top_p: float = 0.7
    max_new_tokens: int = 512
    seed: int | None = None
    # image generation (SDXL)
    steps: int = 30
    guidance: float = 5.0
    image_seed: int | None = None
    width: int | None = None
    height: int | None = None
    negative_prompt: str | None = None

    def checked(self) -> "GenOptions":
        """A copy with every value in its valid range (sliders and API callers send anything)."""
        def num(x, lo, hi, default, cast=float):
            try:
                x = float(x)
            except (TypeError, ValueError):
                return default
            return cast(min(max(x, lo), hi)) if math.isfinite(x) else default

        def opt_int(x):
            try:
                return None if x is None else int(x)
            except (TypeError, ValueError, OverflowError):
                return None

        return dataclasses.replace(
            self, temperature=num(self.temperature, 0.0, 10.0, 0.0), top_p=num(self.top_p, 1e-3, 1.0, 1.0),
            max_new_tokens=num(self.max_new_tokens, 1, 1 << 20, 512, int), seed=opt_int(self.seed),
            steps=num(self.steps, 1, 500, 30, int), guidance=num(self.guidance, 0.0, 50.0, 5.0),
            image_seed=opt_int(self.image_seed), width=opt_int(self.width), height=opt_int(self.height))


@dataclass(eq=False)  # identity, not field, equality: entries hold tensors
class ImageEntry:
    key: str
    image: Any                 # PIL RGB
    tokens: torch.Tensor       # (V*N, D) visual tokens, on the model's device
    attn: torch.Tensor         # (V, N, P*P) mining weights, float32 on CPU
    gain: torch.Tensor         # (V, N) mining gain per LR token, float32 on CPU
    notes: list[Note] = field(default_factory=list)


@dataclass(eq=False)  # identity equality: two turns with the same text are still two turns
class Turn:
    user: str
    images: list[ImageEntry] = field(default_factory=list)
    assistant: str | None = None
    token_ids: list[int] = field(default_factory=list)   # the answer's token ids (stop token left out)
    prompt: str = ""                  # the full prompt string given to the tokenizer
    want_image: bool = False
    image_prompt: str | None = None
    generated_image: Any = None       # PIL image from SDXL
    cancelled: bool = False
    notes: list[Note] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)  # the prompt's ids, image slots as IMAGE_TOKEN_INDEX
    cached_tokens: int = 0            # prompt positions served from the KV cache (not prefilled again)


@dataclass
class Event:
    kind: str          # "notice" | "delta" | "progress" | "image" | "error" | "done"
    text: str = ""
    data: Any = None   # progress: fraction; image: PIL image; error: a short tag; done: the Turn


def clean_text(text: str) -> str:
    """Drop control characters (C0/C1 except newline and tab) and lone surrogates.

    Format characters (category Cf) stay: emoji sequences need the zero-width joiner and right-to-left
    text needs its direction marks.
    """
    text = (text or "").replace("\r\n", "\n").replace("\r", "\n")
    return "".join(c for c in text if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cs"))

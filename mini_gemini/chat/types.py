"""What a conversation is made of: generation options, turns, images in a turn, notes and stream events.

These are plain records shared by the engine, the CLI and the app; nothing here runs the model.
"""
from __future__ import annotations

import dataclasses
import math
import unicodedata
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the records import without torch
    import torch

MAX_USER_CHARS = 16_000       # longer messages are cut (with a notice) before anything else
# Sampling divides the (float32) logits by the temperature: below about 1e-37 that overflows to inf and the
# probabilities become NaN. Far above that, 1e-4 already makes sampling greedy in effect (a logit lead of
# 0.01 is a factor e**100), so every temperature below it is greedy decoding, with a wide margin.
MIN_TEMPERATURE = 1e-4
MAX_IMAGE_SIDE = 4096         # generated images: wider or taller requests are clamped (SDXL's native is 1024)
MAX_STOP, MAX_STOP_CHARS = 16, 256   # user stop strings kept per request, and their length (OpenAI allows 4)


class Note(str):
    """A note about a turn: its text (it *is* the string) and a `kind` saying what it is about.

    Kinds: "image" (an input image: EXIF applied, frame used, ...), "message" (the user's text was cut),
    "context" (old turns left out), "stopped", "expired", "imagegen" (image generation), "image_prompt",
    "ocr" (text read in the images for the message: lines found and seconds taken, or why not), "queue" (the
    place in the queue), "task" (the question or picture is outside what the model was trained for).
    Notes of kinds in `ABOUT_MESSAGE` describe the user's message and stay true when the answer is redone.
    """
    kind: str

    def __new__(cls, kind: str, text: str) -> Note:
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
    # OCR assist (official demo's "Use OCR"): read the text in the images (once per image per session) and
    # append it to the user's message as "Reference OCR Token: ..."; needs the `ocr` extra (inputs/ocr.py)
    ocr: bool = False
    # texts that end the answer where they first appear (not shown), besides the template's own (OpenAI `stop`)
    stop: tuple[str, ...] = ()
    # write max_new_tokens tokens whatever the model writes (benchmarks; vLLM's and OpenAI servers' `ignore_eos`)
    ignore_eos: bool = False

    def checked(self) -> GenOptions:
        """A copy with every value in its valid range (sliders and API callers send anything).

        Every value is accepted and made one that works; nothing is refused:
        - numbers are clamped to their range (temperature 0..10, top_p 1e-3..1, max_new_tokens 1..2**20,
          steps 1..500, guidance 0..50, width/height 8..MAX_IMAGE_SIDE px); +-inf go to the nearest end,
          NaN and values that are not numbers give the default (greedy for the temperature);
        - a temperature below MIN_TEMPERATURE (including denormals such as 1e-45 or 5e-324) means greedy
          decoding (0.0): sampling at such a temperature divides the logits by it, which overflows
          float32 to inf (and 5e-324 is 0 in float32: a division by zero), so the probabilities become
          NaN; greedy is what sampling tends to as the temperature goes to 0;
        - seeds are integers taken modulo 2**64 (what torch's generators accept); non-numbers give None;
        - `ocr` is a bool: the strings "1", "true", "yes", "on" (any case) are True, other strings False;
        - `stop`: a string or a list of strings; empty strings and non-strings are left out, at most MAX_STOP
          strings of at most MAX_STOP_CHARS characters each are kept.
        """
        def num(x, lo, hi, default, cast=float):
            try:
                x = float(x)
            except (TypeError, ValueError, OverflowError):
                return default
            return default if math.isnan(x) else cast(min(max(x, lo), hi))

        def opt_int(x, lo=None, hi=None, modulo=None):
            try:
                x = None if x is None else int(x)
            except (TypeError, ValueError, OverflowError):
                return None
            if x is None:
                return None
            if modulo is not None:
                x %= modulo
            if lo is not None:
                x = min(max(x, lo), hi)
            return x

        temperature = num(self.temperature, 0.0, 10.0, 0.0)
        if temperature < MIN_TEMPERATURE:
            temperature = 0.0
        return dataclasses.replace(
            self, temperature=temperature, top_p=num(self.top_p, 1e-3, 1.0, 1.0),
            max_new_tokens=num(self.max_new_tokens, 1, 1 << 20, 512, int), seed=opt_int(self.seed, modulo=1 << 64),
            steps=num(self.steps, 1, 500, 30, int), guidance=num(self.guidance, 0.0, 50.0, 5.0),
            image_seed=opt_int(self.image_seed, modulo=1 << 64),
            width=opt_int(self.width, 8, MAX_IMAGE_SIDE), height=opt_int(self.height, 8, MAX_IMAGE_SIDE),
            ocr=self.ocr.strip().lower() in ("1", "true", "yes", "on") if isinstance(self.ocr, str) else bool(self.ocr),
            stop=_stop_strings(self.stop), ignore_eos=self.ignore_eos is True)


def _stop_strings(stop) -> tuple[str, ...]:
    if isinstance(stop, str):
        stop = (stop,)
    try:
        items = list(stop or ())
    except TypeError:
        return ()
    return tuple(dict.fromkeys(s[:MAX_STOP_CHARS] for s in items if isinstance(s, str) and s))[:MAX_STOP]


@dataclass(eq=False)  # identity, not field, equality: entries hold tensors
class ImageEntry:
    key: str
    image: Any                 # PIL RGB
    tokens: torch.Tensor       # (V*N, D) visual tokens, on the model's device
    attn: torch.Tensor         # (V, N, P*P) mining weights, float32 on CPU
    gain: torch.Tensor         # (V, N) mining gain per LR token, float32 on CPU
    notes: list[Note] = field(default_factory=list)
    # inputs.ocr.OcrResult once the image's text was read (GenOptions.ocr), shared by every entry of the same
    # picture in the session: lines (text, confidence, box as 4 (x, y) points in pixels of `image`), seconds
    ocr: Any = None
    lr_features: torch.Tensor | None = None   # (V*N, C) the LR tokens before mining (the mining ablation uses them)


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
    ocr: bool = False                 # the message carries the images' text ("Reference OCR Token", GenOptions.ocr)
    # the index of the oldest turn the model saw when it wrote this answer (older ones were left out to fit the
    # context); the next turn's window starts from here, so the window is a function of the history alone
    window_start: int = 0
    # when each stage of the turn happened (time.monotonic()): start, images, ocr, submitted, admitted, first_token,
    # finished; `timings` gives the seconds spent in each
    stamps: dict = field(default_factory=dict)

    @property
    def timings(self) -> dict[str, float]:
        """Seconds spent in each stage of the turn: images (checking and encoding the new pictures), ocr (reading
        their text), queue (waiting for a place with the model), prefill (from the place to the first token),
        first_token (from the start of the turn to its first token) and total (to the end of the answer). Stages
        that did not happen are left out."""
        at = self.stamps
        out = {}
        for name, a, b in (("images", "start", "images"), ("ocr", "images", "ocr"), ("queue", "submitted", "admitted"),
                           ("prefill", "admitted", "first_token"), ("first_token", "start", "first_token"),
                           ("total", "start", "finished")):
            if a in at and b in at:
                out[name] = round(at[b] - at[a], 6)
        return out


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

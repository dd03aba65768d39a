"""OCR assist: read the printed text in an image and hand it to the model as "Reference OCR Token".

The official MGM demo runs PaddleOCR (`use_angle_cls=True, lang="ch"`) over the user's image, keeps the
lines whose confidence is above 0.1, joins their text with ", " and (official CLI, `mgm/serve/cli.py`)
appends ``"\\nReference OCR Token: " + text + "\\n"`` to the user's message of every turn. This module
does the reading with RapidOCR (PyPI `rapidocr` 3.x on `onnxruntime`), which runs PaddleOCR's models
exported to ONNX and ships them inside its wheel: it works offline, on CPU, with no model download.

The dependency is optional:

    pip install "mini-gemini-studio[ocr]"      # or: pip install rapidocr onnxruntime

    from mini_gemini.inputs.ocr import get_reader, format_ocr_tokens, ocr_available
    if ocr_available():
        result = get_reader().read(pil_image)      # OcrResult: lines (text, confidence, box), seconds
        suffix = format_ocr_tokens([result.texts]) # "\\nReference OCR Token: STOP, Main St\\n"

Without it, `ocr_available()` is False, `ocr_unavailable_reason()` says why and what to install, and
`OcrReader.read` raises `OcrUnavailable` (a RuntimeError) with that message.

Coordinates: boxes are 4 (x, y) points in pixels of the image that was passed to `read` (origin at the
top-left corner, x to the right, y down; values within [0, width] x [0, height]), in the order
top-left, top-right, bottom-right, bottom-left of the text line (a rotated quadrilateral for slanted
text). Lines come in reading order: top to bottom, then left to right.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from PIL import Image

# --- constants (with where they come from) ---------------------------------------------------------

#: Lines at or below this confidence are dropped. Official: `[res[1][0] for res in result[0]
#: if res[1][1] > 0.1]` in mgm/serve/cli.py and mgm/serve/model_worker.py (strictly greater).
MIN_CONFIDENCE = 0.1

#: Text put before / after the recognised text; official mgm/serve/cli.py:
#: `inp = inp + '\nReference OCR Token: ' + str_in_image + '\n'` (only when the text is not empty).
OCR_LABEL = "Reference OCR Token: "
OCR_PREFIX = "\n" + OCR_LABEL
OCR_SUFFIX = "\n"
#: Official join of the kept lines: `', '.join(result)`.
OCR_JOIN = ", "

#: Images whose longer side exceeds this many pixels are downscaled (aspect kept) before reading, and
#: the boxes mapped back. This project's choice: it bounds the cost of a photo from a modern phone
#: (4000 x 3000 -> 1600 x 1200) while keeping ~12 px letters of a 1600 px screenshot readable.
DEFAULT_MAX_SIDE = 1600

#: RapidOCR's own bound (`Global.max_side_len`, 2000 in its config.yaml), raised so that the reader's
#: `max_side` is the knob that counts; it stays as a backstop for a reader configured without limit.
ENGINE_MAX_SIDE = 8192

#: At most this many characters of one image's recognised text go into a prompt (whole lines, in
#: reading order). This project's choice, not the official code's (which has no limit): the text is
#: repeated in every user turn (official CLI), and a page of small print (~3,000+ characters, ~1,000
#: tokens) would otherwise fill a 4k context in a few turns. 2,000 characters are ~500-700 tokens.
MAX_PROMPT_CHARS = 2000

#: onnxruntime threads per session when none are asked for: at most 4, so that OCR running beside the
#: language model (it runs off the model's lock) does not take every core of a CPU-only machine.
DEFAULT_MAX_THREADS = 4

INSTALL_HINT = 'pip install "mini-gemini-studio[ocr]"  (or: pip install rapidocr onnxruntime)'


class OcrUnavailable(RuntimeError):
    """The OCR engine cannot be used here (a package is missing or failed to load). `str(err)` names
    the missing piece and the install line, and can be shown to users as is."""


# --- results ---------------------------------------------------------------------------------------

Point = tuple[float, float]


@dataclass(frozen=True)
class OcrLine:
    """One recognised line of text.

    text: the recognised characters (one line, no newline).
    confidence: the recogniser's score in [0, 1] (mean character probability).
    box: 4 (x, y) points in pixels of the input image: top-left, top-right, bottom-right, bottom-left.
    """
    text: str
    confidence: float
    box: tuple[Point, Point, Point, Point]

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """Axis-aligned bounds (left, top, right, bottom) in pixels, e.g. for drawing a rectangle."""
        xs = [p[0] for p in self.box]
        ys = [p[1] for p in self.box]
        return (min(xs), min(ys), max(xs), max(ys))

    def to_dict(self) -> dict:
        return {"text": self.text, "confidence": round(self.confidence, 4),
                "box": [[round(x, 1), round(y, 1)] for x, y in self.box]}


@dataclass(frozen=True)
class OcrResult:
    """What one image holds.

    lines: the kept lines (confidence > the reader's min_confidence), in reading order.
    seconds: wall-clock time of the read (conversion, downscaling and the three ONNX models).
    width, height: size in pixels of the image that was read (the box coordinates refer to it).
    scale: the factor the image was resized by before the models saw it (1.0 = full size,
        0.4 = a 4000 px photo read at 1600 px); boxes are already mapped back to full size.
    """
    lines: tuple[OcrLine, ...] = ()
    seconds: float = 0.0
    width: int = 0
    height: int = 0
    scale: float = 1.0

    @property
    def texts(self) -> list[str]:
        return [line.text for line in self.lines]

    @property
    def text(self) -> str:
        """The lines joined as the official code joins them (", "); "" when nothing was read."""
        return OCR_JOIN.join(self.texts)

    def prompt_texts(self, max_chars: int | None = MAX_PROMPT_CHARS) -> tuple[str, ...]:
        """The line texts to put in a prompt: whole lines in reading order while their joined length
        stays within `max_chars` (None: all). See `MAX_PROMPT_CHARS`."""
        out, used = [], 0
        for text in self.texts:
            cost = len(text) + (len(OCR_JOIN) if out else 0)
            if max_chars is not None and used + cost > max_chars:
                break
            out.append(text)
            used += cost
        return tuple(out)

    @property
    def truncated(self) -> bool:
        """Whether `prompt_texts()` leaves lines out (the image holds more text than a prompt takes)."""
        return len(self.prompt_texts()) < len(self.lines)

    def to_dict(self) -> dict:
        """JSON-ready: {"lines": [{"text", "confidence", "box": [[x, y] x 4]}], "seconds", "width",
        "height", "scale"}."""
        return {"lines": [line.to_dict() for line in self.lines], "seconds": round(self.seconds, 3),
                "width": self.width, "height": self.height, "scale": round(self.scale, 4)}


# --- availability ----------------------------------------------------------------------------------

_missing_lock = threading.Lock()
_missing: list[str | None] = []  # cached answer of _find_missing(): [None] = all there


def _find_missing() -> str | None:
    with _missing_lock:
        if not _missing:
            import importlib.util
            gone = [name for name in ("rapidocr", "onnxruntime") if importlib.util.find_spec(name) is None]
            _missing.append(f"{' and '.join(gone)} {'is' if len(gone) == 1 else 'are'} not installed"
                            if gone else None)
        return _missing[0]


def ocr_unavailable_reason() -> str | None:
    """None when OCR can run here; otherwise a user-facing sentence with the install line."""
    missing = _find_missing()
    if missing is None:
        return None
    return f"OCR is unavailable: {missing}. Install it with: {INSTALL_HINT}"


def ocr_available() -> bool:
    """True when the OCR packages are installed (cheap: nothing is imported or loaded)."""
    return _find_missing() is None


# --- the shared engine -----------------------------------------------------------------------------

_engines: dict[int, _Engine] = {}
_engines_lock = threading.Lock()


class _Engine:
    """One RapidOCR instance (detector + angle classifier + recogniser ONNX sessions) and the lock that
    serialises its use: concurrent reads would only fight over the same cores."""

    def __init__(self, threads: int):
        try:
            import onnxruntime  # noqa: F401  (rapidocr imports it only when a model loads)
            from rapidocr import RapidOCR
        except Exception as err:  # ImportError, or a broken native library
            raise OcrUnavailable(f"OCR is unavailable: cannot import rapidocr/onnxruntime ({err}). "
                                 f"Install it with: {INSTALL_HINT}") from err
        params = {
            "Global.text_score": 0.0,           # keep every line: the reader filters (> min_confidence)
            "Global.max_side_len": ENGINE_MAX_SIDE,
            "Global.log_level": "error",       # "no text found" is an answer, not a warning
            "EngineConfig.onnxruntime.intra_op_num_threads": threads,
            "EngineConfig.onnxruntime.inter_op_num_threads": 1,
        }
        self.ocr = RapidOCR(params=params)
        self.lock = threading.Lock()
        self.threads = threads
        self._load_models()

    def _load_models(self) -> None:
        """Create the three ONNX sessions now (RapidOCR would wait for the first image with text)."""
        for name in ("_load_det_model", "_load_cls_model", "_load_rec_model"):
            loader = getattr(self.ocr, name, None)
            if loader is not None:
                loader()


def _default_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(DEFAULT_MAX_THREADS, cores))


def _get_engine(threads: int | None) -> _Engine:
    threads = _default_threads() if threads is None else int(threads)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    engine = _engines.get(threads)
    if engine is None:
        with _engines_lock:
            engine = _engines.get(threads)
            if engine is None:
                reason = ocr_unavailable_reason()
                if reason is not None:
                    raise OcrUnavailable(reason)
                engine = _engines[threads] = _Engine(threads)
    return engine


# --- the reader ------------------------------------------------------------------------------------


class OcrReader:
    """Reads the text lines of PIL images.

    min_confidence: lines scoring at or below it are dropped (official: 0.1).
    max_side: the longer side, in pixels, above which an image is downscaled before reading.
    threads: onnxruntime threads (None: min(4, usable cores)). Readers with the same `threads` share
        one set of loaded models; the models load on the first `read` (or `load()`), once per process.

    `read` may be called from several threads; reads on the same models run one at a time.
    """

    def __init__(self, min_confidence: float = MIN_CONFIDENCE, max_side: int = DEFAULT_MAX_SIDE,
                 threads: int | None = None):
        if not 0.0 <= float(min_confidence) < 1.0:
            raise ValueError(f"min_confidence must be in [0, 1), got {min_confidence}")
        if int(max_side) < 32:
            raise ValueError(f"max_side must be at least 32 pixels, got {max_side}")
        self.min_confidence = float(min_confidence)
        self.max_side = int(max_side)
        self.threads = threads

    @staticmethod
    def available() -> bool:
        """True when rapidocr and onnxruntime are installed (see `ocr_unavailable_reason`)."""
        return ocr_available()

    def load(self) -> OcrReader:
        """Load the ONNX models now (otherwise the first read does). Raises OcrUnavailable."""
        _get_engine(self.threads)
        return self

    def read(self, image: Image.Image) -> OcrResult:
        """The text lines of `image` (any PIL mode; transparency is composited on white).

        Returns an OcrResult (no lines when the image holds no readable text).
        Raises OcrUnavailable when the OCR packages are missing, TypeError for a non-PIL input and
        ValueError for an empty (0-pixel) image.
        """
        if not isinstance(image, Image.Image):
            raise TypeError(f"OcrReader.read takes a PIL.Image.Image, got {type(image).__name__}")
        width, height = image.size
        if width < 1 or height < 1:
            raise ValueError(f"cannot read text in an empty image ({width} x {height})")
        engine = _get_engine(self.threads)
        start = time.perf_counter()
        pixels, scale = _prepare(image, self.max_side)
        with engine.lock:
            out = engine.ocr(pixels)
        lines = _lines(out, scale, width, height, self.min_confidence)
        return OcrResult(lines=tuple(lines), seconds=time.perf_counter() - start,
                         width=width, height=height, scale=scale)


def _prepare(image: Image.Image, max_side: int):
    """(BGR uint8 array of shape (h, w, 3), scale) - the layout RapidOCR expects for arrays."""
    import numpy as np

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        image = flat
    elif image.mode != "RGB":
        image = image.convert("RGB")
    scale = 1.0
    longer = max(image.size)
    if longer > max_side:
        scale = max_side / longer
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)
    return np.ascontiguousarray(np.asarray(image)[:, :, ::-1]), scale


def _lines(out, scale: float, width: int, height: int, min_confidence: float) -> list[OcrLine]:
    boxes = getattr(out, "boxes", None)
    texts = getattr(out, "txts", None)
    scores = getattr(out, "scores", None)
    if boxes is None or texts is None or scores is None:
        return []
    lines = []
    for box, text, score in zip(boxes, texts, scores):
        text = " ".join(str(text).split())  # one line, single spaces
        score = float(score)
        if not text or not math.isfinite(score) or score <= min_confidence:
            continue
        points = tuple((min(max(float(x) / scale, 0.0), float(width)),
                        min(max(float(y) / scale, 0.0), float(height))) for x, y in box)
        if len(points) != 4:
            continue
        lines.append(OcrLine(text=text, confidence=score, box=points))
    return lines


_default_reader: OcrReader | None = None
_default_lock = threading.Lock()


def get_reader() -> OcrReader:
    """The process-wide reader with the official settings (min_confidence 0.1, max_side 1600, default
    threads). Created on first use, thread-safe; its models load on its first read. Raises
    OcrUnavailable when the packages are missing."""
    global _default_reader
    if _default_reader is None:
        with _default_lock:
            if _default_reader is None:
                reason = ocr_unavailable_reason()
                if reason is not None:
                    raise OcrUnavailable(reason)
                _default_reader = OcrReader()
    return _default_reader


# --- prompt text -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageText:
    """The recognised texts of one image, with the number it has in the prompt ("Image k:", 1-based)."""
    number: int
    texts: Sequence[str] = field(default_factory=tuple)


def ocr_token_lines(images: Iterable[ImageText], numbered: bool) -> list[tuple[str, str]]:
    """The "Reference OCR Token" lines as (label, text) pairs, without prefix or newlines; images with
    no text are left out. label: "Image k: " when `numbered`, else "". text: the image's texts joined
    with ", " (recognised text: untrusted, to be tokenised as ordinary text).

    numbered: say whose text it is - use it exactly when the prompt numbers its images, i.e. when the
    whole prompt holds two or more images (the official CLI's rule for "Image k:")."""
    out = []
    for item in images:
        texts = [" ".join(str(t).split()) for t in item.texts]
        joined = OCR_JOIN.join(t for t in texts if t)
        if joined:
            out.append((f"Image {item.number}: " if numbered else "", joined))
    return out


def format_ocr_tokens(texts: Sequence[Sequence[str]] | Sequence[ImageText],
                      numbered: bool | None = None) -> str:
    """The text appended to a user message: "" when no image has text, otherwise one line per image:

    one image (the official CLI string, character for character):
        "\\nReference OCR Token: STOP, Main St\\n"
    several images (this project's extension; the official CLI reads one image only):
        "\\nReference OCR Token: Image 1: STOP, Main St\\nReference OCR Token: Image 2: Coffee 3.50\\n"

    Each image gets its own "Reference OCR Token: " line, labelled with the number the prompt gives
    that image ("Image k:" before its <image> slot), so the model can tell whose text it is and no
    separator inside a recognised text (",", ";") can blur the border between images. Images
    without text get no line; the numbers stay those of the prompt (e.g. only "Image 2: ...").

    texts: per image, its recognised line texts (a list of lists, image k+1 at index k), or
        ImageText items carrying explicit prompt numbers.
    numbered: label the lines with "Image k: "; default: when two or more images are given (pass
        True when the prompt holds more images than those given here, e.g. earlier turns' images).
    Whitespace runs inside a text (newlines included) become single spaces: every line stays a line.
    """
    if isinstance(texts, str) or any(isinstance(t, str) for t in texts):
        raise TypeError("format_ocr_tokens takes one list of texts per image, e.g. [['STOP', 'Main St']]")
    items = [t if isinstance(t, ImageText) else ImageText(k + 1, tuple(t)) for k, t in enumerate(texts)]
    if numbered is None:
        numbered = len(items) >= 2
    lines = ocr_token_lines(items, numbered)
    if not lines:
        return ""
    return "\n" + "".join(OCR_LABEL + label + text + OCR_SUFFIX for label, text in lines)

"""Images with printed words, drawn here, for the OCR tests and figures (no files, no downloads).

Fonts are the DejaVu faces matplotlib ships in its data folder (sans, serif, mono; regular, bold,
oblique), so every machine with the project's requirements can draw the same pictures.

    from ocr_images import drawn_set, word_scores
    for sample in drawn_set():                 # 12 DrawnText, deterministic
        result = reader.read(sample.image)
        score = word_scores(sample.words, result.texts)
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from functools import cache, lru_cache

from PIL import Image, ImageDraw, ImageFont

FONT_FILES = {
    "sans": "DejaVuSans.ttf",
    "sans-bold": "DejaVuSans-Bold.ttf",
    "sans-oblique": "DejaVuSans-Oblique.ttf",
    "serif": "DejaVuSerif.ttf",
    "serif-bold": "DejaVuSerif-Bold.ttf",
    "mono": "DejaVuSansMono.ttf",
}

# short, common, unambiguous words (no "l"/"I"/"1" or "O"/"0" look-alike traps on their own)
VOCABULARY = (
    "OPEN CLOSED EXIT STOP SALE PUSH PULL NO PARKING WELCOME MENU COFFEE TEA BREAD "
    "Station Garden Market Street Avenue Bakery Museum Library Harbour Bridge Ticket Office "
    "north south east west today tomorrow morning evening fresh daily price only "
    "12 25 48 2024 3.50 7.99 10:30"
).split()


@cache
def font_path(style: str) -> str:
    import matplotlib
    path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", FONT_FILES[style])
    if not os.path.exists(path):
        raise FileNotFoundError(f"matplotlib's font {path} is missing")
    return path


@lru_cache(maxsize=64)
def _font(style: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(font_path(style), size)


@dataclass
class DrawnText:
    image: Image.Image
    lines: list[str]          # the text as drawn, one entry per printed line
    font: str
    size: int                 # font size in pixels
    angle: float              # degrees, counter-clockwise

    @property
    def words(self) -> list[str]:
        return [w for line in self.lines for w in line.split()]


def draw_text(lines: list[str], font: str = "sans", size: int = 40, angle: float = 0.0,
              ink=(20, 20, 20), paper=(250, 250, 245), margin: int | None = None) -> DrawnText:
    """A picture of `lines` printed in `font` at `size` px, rotated by `angle` degrees (the canvas
    grows to keep the corners; the new area gets the paper colour)."""
    f = _font(font, size)
    margin = size if margin is None else margin
    gap = size // 2
    boxes = [f.getbbox(line) for line in lines]
    width = max(b[2] for b in boxes) + 2 * margin
    height = sum(b[3] for b in boxes) + gap * (len(lines) - 1) + 2 * margin
    image = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(image)
    y = margin
    for line, box in zip(lines, boxes):
        draw.text((margin, y), line, font=f, fill=ink)
        y += box[3] + gap
    if angle:
        image = image.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=paper)
    return DrawnText(image, list(lines), font, size, angle)


def scene(text: DrawnText, canvas=(640, 480), seed: int = 0) -> DrawnText:
    """`text` pasted at a random place of a photo-sized canvas with a soft gradient and a few plain
    shapes (clutter that is not text). The canvas grows when the text block is larger."""
    rng = random.Random(seed)
    w = max(canvas[0], text.image.width + 20)
    h = max(canvas[1], text.image.height + 20)
    top = tuple(rng.randint(150, 255) for _ in range(3))
    bottom = tuple(rng.randint(90, 200) for _ in range(3))
    image = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(image)
    for y in range(h):
        t = y / max(1, h - 1)
        draw.line([(0, y), (w, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))
    for _ in range(4):
        x0, y0 = rng.randint(0, w - 60), rng.randint(0, h - 60)
        x1, y1 = x0 + rng.randint(20, 120), y0 + rng.randint(20, 120)
        fill = tuple(rng.randint(60, 220) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    x = rng.randint(0, w - text.image.width)
    y = rng.randint(0, h - text.image.height)
    image.paste(text.image, (x, y))
    return DrawnText(image, text.lines, text.font, text.size, text.angle)


def drawn_set(n: int = 12, seed: int = 0) -> list[DrawnText]:
    """`n` photo-sized pictures (640 x 480) each holding a printed sign: the fonts in turn, sizes
    16-56 px, angles within +-8 degrees, dark ink on light paper or light ink on dark paper; 1-3
    lines of 1-3 words. Deterministic per seed."""
    rng = random.Random(seed)
    styles = list(FONT_FILES)
    sizes = [16, 24, 32, 40, 56, 20, 28]
    angles = [0.0, 0.0, 3.0, -4.0, 8.0, -2.0, -8.0, 5.0]
    out = []
    for i in range(n):
        lines = [" ".join(rng.sample(VOCABULARY, rng.randint(1, 3))) for _ in range(rng.randint(1, 3))]
        dark_paper = i % 5 == 4
        ink, paper = ((235, 235, 230), (30, 40, 70)) if dark_paper else \
            ((rng.randint(0, 60), rng.randint(0, 60), rng.randint(0, 90)), (250, 250, 245))
        sign = draw_text(lines, font=styles[i % len(styles)], size=sizes[i % len(sizes)],
                         angle=angles[i % len(angles)], ink=ink, paper=paper, margin=sizes[i % len(sizes)] // 2)
        out.append(scene(sign, seed=seed * 1000 + i))
    return out


def _norm(word: str) -> str:
    return re.sub(r"^[^\w]+|[^\w]+$", "", word)  # strip punctuation at the ends ("STOP," -> "STOP")


def word_scores(truth: list[str], texts: list[str]) -> dict:
    """Word-level comparison of the drawn words with recognised line texts.

    recall: share of drawn words found among the recognised words (exact, case-sensitive, each
    recognised word used at most once); precision: share of recognised words that were drawn.
    """
    want = [_norm(w) for w in truth if _norm(w)]
    got = [_norm(w) for t in texts for w in t.split() if _norm(w)]
    pool = list(got)
    hits = 0
    for w in want:
        if w in pool:
            pool.remove(w)
            hits += 1
    return {"words": len(want), "found": hits, "recognised": len(got),
            "recall": hits / len(want) if want else 1.0,
            "precision": hits / len(got) if got else (1.0 if not want else 0.0)}

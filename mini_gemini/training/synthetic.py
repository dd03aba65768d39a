"""A synthetic "small detail" task: coloured squares, one of which holds a tiny digit.

Each scene is a square image on a plain background with 3-5 non-overlapping squares of distinct
colours (red, green, blue, yellow, purple, orange). Inside one of them sits a digit 0-9 whose height is
4-7% of the image side, black or white, in one of several fonts (DejaVu from matplotlib's bundled
fonts, and Pillow's default font). At the LR side (64 px for the demo model) the digit is 2-5 px tall
and unreadable; at the HR side (256 px) it is 10-18 px tall and readable. Colour and count questions
need only the LR view.

Everything is deterministic given a seed: `scene(seed, index)` draws the same scene every time.
Scenes vary square sizes, positions, colour shades, background, font, digit size/position and the
rendering size, so that a model trained here also reads scenes drawn by other code.

    python -m mini_gemini.synthetic --out /tmp/scenes --n 8      # write a few examples (PNG + JSON)
"""
from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# Each colour has a few shades (pure web colours and softer ones); a little jitter is added on top.
COLOURS = {
    "red": [(255, 0, 0), (220, 40, 40), (200, 30, 50)],
    "green": [(0, 128, 0), (0, 200, 0), (60, 180, 75), (30, 150, 60)],
    "blue": [(0, 0, 255), (30, 90, 220), (40, 60, 200)],
    "yellow": [(255, 255, 0), (240, 210, 40), (250, 230, 60)],
    "purple": [(128, 0, 128), (150, 80, 200), (120, 40, 160)],
    "orange": [(255, 165, 0), (255, 120, 20), (240, 140, 40)],
}
COLOUR_NAMES = tuple(COLOURS)
DIGIT_QUESTIONS = ("What digit is in the {c} square?", "What number is written in the {c} square?",
                   "Which digit is inside the {c} square?", "Read the digit in the {c} square.",
                   "What is the digit in the {c} square?")
COLOUR_QUESTIONS = ("What colour is the square with the digit?", "What color is the square with the digit?",
                    "Which square has a digit in it?", "What colour is the square that holds the number?",
                    "What color is the square with the number in it?")
COUNT_QUESTIONS = ("How many squares are there?", "How many squares are in the image?",
                   "How many squares do you see?", "Count the squares.")
PRESENCE_QUESTIONS = ("Is there {a} {c} square?", "Is there {a} {c} square in the picture?",
                      "Do you see {a} {c} square?")
SUFFIX = " Answer the question using a single word or phrase."

FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSerif.ttf",
              "DejaVuSans-Oblique.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono-Bold.ttf")


@lru_cache(maxsize=None)
def _font_dir() -> str:
    import matplotlib
    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf")


@lru_cache(maxsize=4096)
def _font(name: str, size: int):
    if name == "pillow-default":
        return ImageFont.load_default(size)
    return ImageFont.truetype(os.path.join(_font_dir(), name), size)


def font_names() -> list[str]:
    return list(FONT_FILES) + ["pillow-default"]


@dataclass
class Square:
    colour: str
    rgb: tuple
    box: tuple  # (x0, y0, x1, y1) in pixels, x1/y1 exclusive


@dataclass
class Scene:
    image: Image.Image
    squares: list[Square]
    digit: int
    digit_square: int           # index into squares
    digit_box: tuple            # (x0, y0, x1, y1) ink box of the digit, pixels
    font: str
    background: tuple
    meta: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.image.size[0]

    def square_of_digit(self) -> Square:
        return self.squares[self.digit_square]


def _jitter(rgb, rng, amount):
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _background(rng: random.Random) -> tuple:
    """Plain, low-saturation backgrounds (white, greys, pale tints, dark greys) that no square matches."""
    kind = rng.random()
    if kind < 0.35:
        return (255, 255, 255) if rng.random() < 0.5 else _jitter((245, 245, 245), rng, 10)
    if kind < 0.75:
        g = rng.randint(150, 235)
    else:
        g = rng.randint(20, 90)
    tint = [rng.randint(-12, 12) for _ in range(3)]
    return tuple(max(0, min(255, g + t)) for t in tint)


def _place_squares(rng: random.Random, side: int, n: int):
    """Non-overlapping boxes (with a small gap); side 14-32% of the image. None if they do not fit."""
    boxes = []
    for _ in range(n):
        for _try in range(200):
            s = int(side * rng.uniform(0.14, 0.32))
            x0, y0 = rng.randint(0, side - s), rng.randint(0, side - s)
            box = (x0, y0, x0 + s, y0 + s)
            gap = int(side * 0.015)
            if all(box[0] >= b[2] + gap or b[0] >= box[2] + gap or box[1] >= b[3] + gap or b[1] >= box[3] + gap
                   for b in boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def _digit_font(rng: random.Random, digit: int, height: float):
    """A font whose rendered digit ink is about `height` px tall."""
    name = rng.choice(font_names())
    probe = _font(name, 100)
    x0, y0, x1, y1 = probe.getbbox(str(digit))
    size = max(4, round(100 * height / max(1, y1 - y0)))
    return name, _font(name, size)


def draw_scene(rng: random.Random) -> Scene:
    side = rng.choice((256, 256, 256, 320, 384, 448, 512))
    bg = _background(rng)
    n = rng.randint(3, 5)
    boxes = None
    while boxes is None:
        boxes = _place_squares(rng, side, n)
    names = rng.sample(COLOUR_NAMES, n)
    squares = [Square(c, _jitter(rng.choice(COLOURS[c]), rng, 15), b) for c, b in zip(names, boxes)]
    img = Image.new("RGB", (side, side), bg)
    draw = ImageDraw.Draw(img)
    for sq in squares:
        draw.rectangle((sq.box[0], sq.box[1], sq.box[2] - 1, sq.box[3] - 1), fill=sq.rgb)

    k = rng.randrange(n)
    digit = rng.randrange(10)
    sq = squares[k]
    height = side * rng.uniform(0.04, 0.07)
    font_name, font = _digit_font(rng, digit, height)
    bx0, by0, bx1, by1 = font.getbbox(str(digit))
    w, h = bx1 - bx0, by1 - by0
    margin = max(1, int(0.01 * side))
    x = rng.randint(sq.box[0] + margin, max(sq.box[0] + margin, sq.box[2] - margin - w))
    y = rng.randint(sq.box[1] + margin, max(sq.box[1] + margin, sq.box[3] - margin - h))
    ink = (0, 0, 0) if rng.random() < 0.5 else (255, 255, 255)
    draw.text((x - bx0, y - by0), str(digit), fill=ink, font=font)
    return Scene(img, squares, digit, k, (x, y, x + w, y + h), font_name, bg,
                 meta=dict(ink=ink, digit_height=h / side))


def scene(seed: int, index: int) -> Scene:
    """The scene number `index` of the stream `seed` (independent of any other draw)."""
    return draw_scene(random.Random(f"mgm-synthetic-{seed}-{index}"))


# ---- questions ---------------------------------------------------------------------------------
def digit_question(sc: Scene, rng: random.Random) -> tuple[str, str]:
    q = rng.choice(DIGIT_QUESTIONS).format(c=sc.square_of_digit().colour)
    return (q + SUFFIX if rng.random() < 0.3 else q), str(sc.digit)


OTHER_MIX = (0.4, 0.3, 0.3)  # colour of the digit's square, count, presence (yes/no)


def other_question(sc: Scene, rng: random.Random, mix: tuple[float, float, float] = OTHER_MIX) -> tuple[str, str]:
    """Questions the LR view alone can answer: the digit square's colour, counts, presence (yes/no), drawn
    with the weights `mix` (normalised)."""
    w = [x / sum(mix) for x in mix]
    r = rng.random()
    if r < w[0]:
        q, a = rng.choice(COLOUR_QUESTIONS), sc.square_of_digit().colour
    elif r < w[0] + w[1]:
        q, a = rng.choice(COUNT_QUESTIONS), str(len(sc.squares))
    else:
        present = {s.colour for s in sc.squares}
        c = rng.choice(COLOUR_NAMES)
        article = "an" if c == "orange" and rng.random() < 0.5 else "a"
        q, a = rng.choice(PRESENCE_QUESTIONS).format(a=article, c=c), "Yes" if c in present else "No"
    return q, a


def sample(seed: int, index: int, digit_fraction: float = 0.6) -> dict:
    """One training example: {'image', 'question', 'answer', 'kind', 'scene'}."""
    sc = scene(seed, index)
    rng = random.Random(f"mgm-question-{seed}-{index}")
    if rng.random() < digit_fraction:
        (q, a), kind = digit_question(sc, rng), "digit"
    else:
        (q, a), kind = other_question(sc, rng), "other"
    return dict(image=sc.image, question=q, answer=a, kind=kind, scene=sc)


def token_targets(sc: Scene, grid: int):
    """Per-LR-token labels for the towers' auxiliary loss (row-major over a grid x grid token map).

    colour: index into COLOUR_NAMES of the square under the token's centre, len(COLOUR_NAMES) for the
    background. digit: the digit for the token whose cell holds the digit's centre, 10 for cells the
    digit does not touch, -100 (ignored) for cells that hold only part of it.
    """
    side = sc.size
    cell = side / grid
    colour, digit = [], []
    dx0, dy0, dx1, dy1 = sc.digit_box
    cx, cy = (dx0 + dx1) / 2, (dy0 + dy1) / 2
    for i in range(grid):
        for j in range(grid):
            px, py = (j + 0.5) * cell, (i + 0.5) * cell
            c = len(COLOUR_NAMES)
            for sq in sc.squares:
                if sq.box[0] <= px < sq.box[2] and sq.box[1] <= py < sq.box[3]:
                    c = COLOUR_NAMES.index(sq.colour)
            colour.append(c)
            x0, y0, x1, y1 = j * cell, i * cell, (j + 1) * cell, (i + 1) * cell
            if x0 <= cx < x1 and y0 <= cy < y1:
                digit.append(sc.digit)
            elif dx1 > x0 and dx0 < x1 and dy1 > y0 and dy0 < y1:
                digit.append(-100)
            else:
                digit.append(10)
    return colour, digit


def write_llava_json(out: str | Path, n: int, seed: int = 0, digit_fraction: float = 0.6) -> Path:
    """Write n examples as PNGs plus a LLaVA-format data.json ([{id, image, conversations}])."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        s = sample(seed, i, digit_fraction)
        name = f"images/{seed}-{i:06d}.png"
        s["image"].save(out / name)
        records.append(dict(id=f"{seed}-{i}", image=name, conversations=[
            {"from": "human", "value": "<image>\n" + s["question"]}, {"from": "gpt", "value": s["answer"]}]))
    path = out / "data.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(write_llava_json(args.out, args.n, args.seed))


if __name__ == "__main__":
    main()


_TASK_WORDS = ("digit", "number", "square", "colour", "color")


def is_task_question(text: str) -> bool:
    """Whether a question belongs to this task (digits and coloured squares), as the demo model was trained
    on; anything else (e.g. "What is in this picture?") gets an answer that means nothing."""
    words = (text or "").lower()
    return any(w in words for w in _TASK_WORDS)

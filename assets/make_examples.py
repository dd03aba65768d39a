"""Draw the app's example images: scenes of 3-5 coloured squares, one of them red with a small digit.

The digit is drawn as the synthetic task (mini_gemini/synthetic.py) draws it: 4-7 % of the image side.

The question "What digit is in the red square?" needs detail that a 336 px view barely resolves, which is
what patch info mining is for (and the task the bundled demo model is trained on).

    python assets/make_examples.py        # rewrites assets/examples/*.png (deterministic)
"""
from __future__ import annotations

import random
from pathlib import Path

import matplotlib
from PIL import Image, ImageDraw, ImageFont

OUT = Path(__file__).resolve().parent / "examples"
COLOURS = {"red": (220, 40, 40), "blue": (40, 90, 220), "green": (40, 170, 80), "yellow": (240, 200, 40),
           "purple": (140, 60, 180), "orange": (245, 140, 30)}
# (file, width, height, number of squares, digit, seed): landscape, portrait and square scenes
SCENES = [("squares-1.png", 512, 384, 4, "7", 1), ("squares-2.png", 384, 512, 3, "3", 2),
          ("squares-3.png", 448, 448, 5, "5", 3)]


def _place(rng: random.Random, w: int, h: int, sizes: list[int]) -> list[tuple[int, int, int]]:
    """Non-overlapping squares (x, y, side) with a margin between them, by rejection sampling."""
    boxes: list[tuple[int, int, int]] = []
    for s in sizes:
        for _ in range(1000):
            x, y = rng.randint(8, w - s - 8), rng.randint(8, h - s - 8)
            if all(x + s + 12 < bx or bx + bs + 12 < x or y + s + 12 < by or by + bs + 12 < y
                   for bx, by, bs in boxes):
                boxes.append((x, y, s))
                break
        else:
            raise RuntimeError("could not place the squares; use fewer or smaller ones")
    return boxes


def draw_scene(width: int, height: int, n: int, digit: str, seed: int) -> Image.Image:
    rng = random.Random(seed)
    img = Image.new("RGB", (width, height), (236, 234, 228))
    draw = ImageDraw.Draw(img)
    others = rng.sample([c for c in COLOURS if c != "red"], n - 1)
    boxes = _place(rng, width, height, [rng.randint(64, 110) for _ in range(n)])
    for (x, y, s), name in zip(boxes, ["red"] + others):
        draw.rectangle([x, y, x + s - 1, y + s - 1], fill=COLOURS[name])
        if name == "red":  # the small digit: ~5.5 % of the long side tall (the demo model's task), inside
            font = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf"),
                                      size=round(0.075 * max(width, height)))
            left, top, right, bottom = draw.textbbox((0, 0), digit, font=font)
            dx = rng.randint(x + 4 - left, x + s - 4 - right)
            dy = rng.randint(y + 4 - top, y + s - 4 - bottom)
            draw.text((dx, dy), digit, font=font, fill=(255, 255, 255))
    return img


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for name, w, h, n, digit, seed in SCENES:
        draw_scene(w, h, n, digit, seed).save(OUT / name, optimize=True)
        print(OUT / name)


if __name__ == "__main__":
    main()

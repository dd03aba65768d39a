"""The bundled demo model reads a tiny digit through the HR branch, via the public inference path."""
import math
import os
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from mini_gemini.training.synthetic import Scene, Square

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo-model"
PURE = {"red": (255, 0, 0), "green": (0, 170, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
        "purple": (128, 0, 128), "orange": (255, 165, 0)}


def other_layout(rng: random.Random) -> Scene:
    """Held-out scenes from layout code the training never used: squares on a jittered 3 x 3 grid,
    pure colours, a different set of image sizes, DejaVu Sans or Pillow's default font."""
    import matplotlib
    side = rng.choice((300, 400, 600))
    img = Image.new("RGB", (side, side), rng.choice(((255, 255, 255), (235, 235, 235), (210, 210, 210))))
    draw = ImageDraw.Draw(img)
    n = rng.randint(3, 5)
    cell = side / 3
    squares = []
    for pos, name in zip(rng.sample(range(9), n), rng.sample(sorted(PURE), n)):
        s = int(cell * rng.uniform(0.5, 0.85))
        x0 = int((pos % 3) * cell + rng.uniform(0, cell - s))
        y0 = int((pos // 3) * cell + rng.uniform(0, cell - s))
        draw.rectangle((x0, y0, x0 + s - 1, y0 + s - 1), fill=PURE[name])
        squares.append(Square(name, PURE[name], (x0, y0, x0 + s, y0 + s)))
    k, digit = rng.randrange(n), rng.randrange(10)
    target = side * rng.uniform(0.045, 0.065)
    use_default = rng.random() < 0.5
    path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
    size = 4
    while True:  # grow the font until the digit's ink is as tall as wanted
        font = ImageFont.load_default(size) if use_default else ImageFont.truetype(path, size)
        bx0, by0, bx1, by1 = font.getbbox(str(digit))
        if by1 - by0 >= target:
            break
        size += 1
    sq = squares[k].box
    w, h = bx1 - bx0, by1 - by0
    x, y = rng.randint(sq[0] + 2, sq[2] - 2 - w), rng.randint(sq[1] + 2, sq[3] - 2 - h)
    draw.text((x - bx0, y - by0), str(digit), font=font, fill=rng.choice(((0, 0, 0), (255, 255, 255))))
    return Scene(img, squares, digit, k, (x, y, x + w, y + h), "other", img.getpixel((0, 0)))


@pytest.fixture(scope="module")
def demo():
    if not (DEMO / "config.json").exists():
        pytest.fail(f"{DEMO} is missing; train it with the recipe in assets/demo-model/README.md")
    from mini_gemini import load_pretrained
    torch.set_num_threads(1)
    return load_pretrained(str(DEMO), device="cpu")


def test_shipped_files_are_small_and_complete():
    files = {p.name for p in DEMO.iterdir()}
    assert {"config.json", "README.md", "tokenizer.json"} <= files
    assert any(f.endswith(".safetensors") for f in files)
    assert sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file()) <= 25 * 2 ** 20


def _chat(model, question, image):
    from mini_gemini.chat.engine import Engine, GenOptions
    events = list(Engine(model).session().chat(question, [image], options=GenOptions(temperature=0, max_new_tokens=4)))
    return [e for e in events if e.kind == "done"][0].data.assistant.strip()


def test_answers_with_a_numeral_through_the_public_path(demo):
    cfg = demo.config
    assert cfg.lr_size * 4 <= cfg.image_size_aux  # LR side at most a quarter of the HR side
    sc = other_layout(random.Random("doc-example"))
    assert _chat(demo, f"What digit is in the {sc.square_of_digit().colour} square?", sc.image) in \
        [str(d) for d in range(10)]


@pytest.fixture(scope="module")
def heldout(demo):
    from mini_gemini.training.train import evaluate
    return evaluate(demo, scenes=[other_layout(random.Random(f"heldout-{i}")) for i in range(40)])


def test_mining_looks_at_the_digit(heldout):
    # the token holding the digit puts its mining weight on the digit's HR cells, far above uniform
    assert heldout["mining_on_digit"] > 2 * heldout["mining_on_digit_uniform"], heldout
    assert 0 < heldout["mining_inside_square"] <= 1


def test_reads_small_digits_on_held_out_scenes(heldout):
    assert heldout["accuracy"] >= 0.85, heldout

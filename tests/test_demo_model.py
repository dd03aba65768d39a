"""The bundled demo model reads a tiny digit through the HR branch, via the public inference path."""
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


def test_names_the_colour_of_the_square_with_the_digit(demo):
    # an LR question (the colour is plain at 64 px) about the square the HR branch finds the digit in
    scenes = [other_layout(random.Random(f"colour-{i}")) for i in range(30)]
    got = [_chat(demo, "What colour is the square with the digit?", sc.image).rstrip(".") for sc in scenes]
    right = sum(g.lower() == sc.square_of_digit().colour for g, sc in zip(got, scenes))
    assert right >= 27, list(zip(got, [sc.square_of_digit().colour for sc in scenes]))


def test_counts_the_squares_and_says_whether_a_colour_is_there(demo):
    # LR questions about every square, not only the digit's: half the colours asked are absent
    count = [other_layout(random.Random(f"count-{i}")) for i in range(30)]
    got = [_chat(demo, "How many squares are there?", sc.image).rstrip(".") for sc in count]
    right = sum(g == str(len(sc.squares)) for g, sc in zip(got, count))
    assert right >= 27, list(zip(got, [len(sc.squares) for sc in count]))
    asked = []
    for i in range(30):
        rng = random.Random(f"presence-{i}")
        sc = other_layout(rng)
        present = sorted({s.colour for s in sc.squares})
        colour = rng.choice(present if i % 2 == 0 else sorted(set(PURE) - set(present)))
        answer = "Yes" if i % 2 == 0 else "No"
        asked.append((_chat(demo, f"Is there a {colour} square?", sc.image).rstrip("."), answer))
    assert sum(g == a for g, a in asked) >= 27, asked


# ---- one conversation, many pictures: the engine keeps earlier images and answers in the prompt -------------
EXAMPLES = DEMO.parent / "examples"
GREEDY = dict(temperature=0, max_new_tokens=4)


def _turn(session, question, images=()):
    from mini_gemini.chat.engine import GenOptions
    events = list(session.chat(question, list(images), options=GenOptions(**GREEDY)))
    done = [e for e in events if e.kind == "done"]
    assert done, events
    return done[0].data.assistant.strip().rstrip(".")


def test_the_three_examples_in_one_conversation(demo):
    from mini_gemini.chat.engine import Engine
    session = Engine(demo).session()
    got = [_turn(session, "What digit is in the red square?", [EXAMPLES / f"squares-{k}.png"]) for k in (1, 2, 3)]
    assert got == ["7", "3", "5"]
    # and back to an earlier picture by its number, after a text-only turn
    _turn(session, "Thanks! My children drew these pictures for a game; we play it every evening.")
    assert _turn(session, "What digit is in the red square of Image 2?") == "3"


def _conversation(rng: random.Random):
    """Turns (question, new images, right answer or None) over three pictures from `other_layout`,
    phrased and ordered by this test's own code (not the training generator)."""
    a, b, c = (other_layout(rng) for _ in range(3))

    def digit_q(sc):
        return f"What digit is in the {sc.square_of_digit().colour} square?", str(sc.digit)

    def colour_q(sc):
        return "What colour is the square with the digit?", sc.square_of_digit().colour

    def count_q(sc):
        return "How many squares are there?", str(len(sc.squares))

    def yes_no_q(sc):
        colour = rng.choice(sorted(PURE))
        return f"Is there a {colour} square?", "Yes" if colour in {s.colour for s in sc.squares} else "No"

    qa, qb, qc = digit_q(a), digit_q(b), rng.choice((count_q, yes_no_q, colour_q))(c)
    back = rng.choice((a, b))
    k = 1 if back is a else 2
    q_back, ans_back = digit_q(back)
    q_back = (q_back[:-1] + f" of Image {k}?") if rng.random() < 0.5 else f"In Image {k}, " + q_back[0].lower() + q_back[1:]
    turns = [(qa[0], [a.image], qa[1])]
    if rng.random() < 0.5:
        turns.append(("By the way, we drew these on a rainy afternoon and the children loved it.", [], None))
    turns += [(qb[0], [b.image], qb[1]), (q_back, [], ans_back), (qc[0], [c.image], qc[1])]
    q2, a2 = colour_q(b)
    turns.append((q2[:-1] + " in Image 2?", [], a2))
    return turns


def test_multi_image_conversations_drawn_by_other_code(demo):
    from mini_gemini.chat.engine import Engine
    engine = Engine(demo)
    right = total = 0
    wrong = []
    for i in range(6):
        session = engine.session()
        for question, images, answer in _conversation(random.Random(f"conversation-{i}")):
            got = _turn(session, question, images)
            if answer is None:
                continue
            total += 1
            right += got.lower() == answer.lower()
            if got.lower() != answer.lower():
                wrong.append((i, question, answer, got))
        engine.end_session(session.id)
    assert right / total >= 0.8, (right, total, wrong)

"""Evaluation through the inference path (Engine chat, greedy): held-out single-image questions with
mining statistics, and multi-turn, multi-image conversations."""
from __future__ import annotations

import json
import math

import torch

from ..modeling.model import MiniGemini
from .models import hr_disabled

EVAL_SEED = 12345
EVAL_NEW_TOKENS = 4   # answers are a word or a digit


def held_out_question(sc, seed: int, index: int, kind: str = "digit") -> tuple[str, str]:
    """(question, right answer) asked about held-out scene `index` of stream `seed` (`synthetic.scene`):
    a digit question, or (kind "other") a colour / count / yes-no one. The same every time."""
    import random

    from .synthetic import digit_question, other_question
    rng = random.Random(f"eval-{seed}-{index}")
    return digit_question(sc, rng) if kind == "digit" else other_question(sc, rng)


def is_right(answer: str, expected: str) -> bool:
    """The scoring of `evaluate`: the answer, without surrounding spaces and a final full stop, equals the
    expected one, ignoring case."""
    return answer.strip().rstrip(".").lower() == expected.lower()


def mining_focus(model: MiniGemini, sc, attn: torch.Tensor) -> dict:
    """Where mining looks, for the queried square: attn is (N, P*P) of one image (V = 1).

    inside_square: mean attention mass on HR candidates inside the square, over the LR tokens whose cell
    overlaps the square. on_digit: for the LR token holding the digit's centre, the mass on candidates
    that touch the digit, next to what uniform attention would give.
    """
    n, pp = attn.shape
    grid, p = int(math.isqrt(n)), int(math.isqrt(pp))
    side = sc.size
    cell, sub = side / grid, side / grid / p
    x0, y0, x1, y1 = sc.square_of_digit().box
    dx0, dy0, dx1, dy1 = sc.digit_box
    cx, cy = (dx0 + dx1) / 2, (dy0 + dy1) / 2
    inside, on_digit, uniform = [], None, None
    for t in range(n):
        i, j = divmod(t, grid)
        tx0, ty0 = j * cell, i * cell
        if not (tx0 < x1 and tx0 + cell > x0 and ty0 < y1 and ty0 + cell > y0):
            continue
        a = attn[t]
        mask_sq = torch.zeros(pp, dtype=torch.bool)
        mask_dg = torch.zeros(pp, dtype=torch.bool)
        for c in range(pp):
            ci, cj = divmod(c, p)
            px0, py0 = tx0 + cj * sub, ty0 + ci * sub
            mx, my = px0 + sub / 2, py0 + sub / 2
            mask_sq[c] = x0 <= mx < x1 and y0 <= my < y1
            mask_dg[c] = px0 < dx1 and px0 + sub > dx0 and py0 < dy1 and py0 + sub > dy0
        inside.append(a[mask_sq].sum().item())
        if tx0 <= cx < tx0 + cell and ty0 <= cy < ty0 + cell:
            on_digit, uniform = a[mask_dg].sum().item(), mask_dg.float().mean().item()
    return dict(inside_square=sum(inside) / max(1, len(inside)), on_digit=on_digit, on_digit_uniform=uniform)


@torch.no_grad()
def evaluate(model: MiniGemini, n: int = 200, seed: int = EVAL_SEED, kind: str = "digit", scenes=None,
             progress: bool = False) -> dict:
    """Accuracy through the inference path (Engine chat, greedy, 4 new tokens) on held-out scenes.

    kind: "digit" (with mining statistics) or "other" (colour / count / yes-no, also reported apart in
    "by_kind")."""
    from ..chat.engine import Engine, GenOptions
    from .synthetic import COLOUR_NAMES, scene
    engine = Engine(model)
    opts = GenOptions(temperature=0, max_new_tokens=EVAL_NEW_TOKENS)
    right, focus, rows, by_kind = 0, [], [], {}
    items = scenes if scenes is not None else [scene(seed, i) for i in range(n)]
    for i, sc in enumerate(items):
        q, a = held_out_question(sc, seed, i, kind)
        session = engine.session()
        events = list(session.chat(q, [sc.image], options=opts))
        done = [e for e in events if e.kind == "done"]
        got = done[0].data.assistant if done else ""
        ok = is_right(got, a)
        right += ok
        rows.append((q, a, got))
        if kind != "digit":  # colour / count / yes-no, told apart by the right answer
            t = by_kind.setdefault("colour" if a in COLOUR_NAMES else "yes/no" if a in ("Yes", "No") else "count",
                                   [0, 0])
            t[0] += ok
            t[1] += 1
        if kind == "digit":  # the mining maps the engine kept when it encoded the image
            focus.append(mining_focus(model, sc, session.images[0].attn[0]))
        engine.end_session(session.id)
        if progress and (i + 1) % 50 == 0:
            print(f"  {i + 1}/{len(items)}: acc {right / (i + 1):.3f}", flush=True)
    res = dict(accuracy=right / len(items), n=len(items), examples=rows[:5])
    if by_kind:
        res["by_kind"] = {k: round(r / m, 3) for k, (r, m) in sorted(by_kind.items())}
    if focus:
        res["mining_inside_square"] = sum(f["inside_square"] for f in focus) / len(focus)
        od = [f for f in focus if f["on_digit"] is not None]
        res["mining_on_digit"] = sum(f["on_digit"] for f in od) / max(1, len(od))
        res["mining_on_digit_uniform"] = sum(f["on_digit_uniform"] for f in od) / max(1, len(od))
    return res


def report(model: MiniGemini, n: int, conversations: int | None = None) -> dict:
    """Held-out accuracy on digit questions (with mining statistics), on colour/count/yes-no questions,
    on multi-turn multi-image conversations (`conversations`, default n // 2) and the app's three
    examples asked in one conversation."""
    digit = evaluate(model, n, kind="digit", progress=True)
    other = evaluate(model, n, kind="other")
    res = {k: v for k, v in digit.items() if k != "examples"}
    res.update(other_accuracy=other["accuracy"], other_by_kind=other["by_kind"], hr_disabled=hr_disabled(model), examples=digit["examples"][:3])
    n_conv = n // 2 if conversations is None else conversations
    if n_conv:
        conv = evaluate_conversations(model, n_conv)
        res["conversations"] = {k: v for k, v in conv.items() if k != "examples"}
    res["examples_in_one_conversation"] = examples_in_one_conversation(model)
    print(json.dumps(res))
    return res


@torch.no_grad()
def examples_in_one_conversation(model: MiniGemini) -> list[str] | None:
    """The app's examples 1 -> 2 -> 3 in one conversation, "What digit is in the red square?" each time
    (right: 7, 3, 5); None when the pictures are not there."""
    from ..chat.engine import Engine, GenOptions
    from ..resources import examples_dir
    paths = [examples_dir() / f"squares-{k}.png" for k in (1, 2, 3)]
    if not all(p.exists() for p in paths):
        return None
    session, got = Engine(model).session(), []
    for p in paths:
        events = list(session.chat("What digit is in the red square?", [p],
                                   options=GenOptions(temperature=0, max_new_tokens=4)))
        done = [e for e in events if e.kind == "done"]
        got.append(done[0].data.assistant.strip() if done else "")
    return got


@torch.no_grad()
def evaluate_conversations(model: MiniGemini, n: int = 60, seed: int = EVAL_SEED, conversations=None,
                           digit_fraction: float = 0.6, max_new_tokens: int = 4) -> dict:
    """Multi-turn, multi-image conversations through the Engine (greedy), one session each: every turn
    brings its images and question, the model's own answers stay in the history.

    conversations: dicts as `conversations.chat_sample` returns (default: n of them, stream `seed`).
    Returns the accuracy over all questions about an image, split by kind (digit / other), by which
    image is asked about (the newest one / an earlier one) and by turn (first / later), and the share
    of conversations answered right in every turn.
    """
    from ..chat.engine import Engine, GenOptions
    from .conversations import chat_sample
    engine = Engine(model)
    opts = GenOptions(temperature=0, max_new_tokens=max_new_tokens)
    convs = conversations if conversations is not None else [chat_sample(seed, i, digit_fraction) for i in range(n)]
    tally: dict[str, list[int]] = {}

    def count(name, ok):
        t = tally.setdefault(name, [0, 0])
        t[0] += ok
        t[1] += 1

    examples = []
    for c in convs:
        session, pos, every = engine.session(), 0, True
        for t, (turn, (k, kind)) in enumerate(zip(c["turns"], c["asked"])):
            images = c["images"][pos:pos + turn.n_images]
            pos += turn.n_images
            events = list(session.chat(turn.user, images, options=opts))
            done = [e for e in events if e.kind == "done"]
            got = done[0].data.assistant if done else ""
            if kind == "chatter":
                continue
            ok = got.strip().rstrip(".").lower() == turn.assistant.lower()
            every &= ok
            count("all", ok)
            count(kind, ok)
            count("newest image" if k == pos else "earlier image", ok)
            count("first turn" if t == 0 else "later turns", ok)
            if len(examples) < 8 and t:
                examples.append((turn.user, turn.assistant, got))
        count("conversations all right", every)
        engine.end_session(session.id)
    res = {name: round(r / max(1, m), 4) for name, (r, m) in tally.items()}
    res.update(accuracy=res["all"], n_questions=tally["all"][1], n_conversations=len(convs), examples=examples)
    return res

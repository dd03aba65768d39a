"""Multi-turn, multi-image conversations about the synthetic scenes (mini_gemini.training.synthetic).

Users keep one conversation open: a new picture in a later turn, a question about an earlier one
("What digit is in the red square of Image 2?"), a long text-only turn before the next picture. Each
conversation here is a list of `modeling.chat_template.PromptTurn`s plus the images in prompt order, so the prompt is
exactly what the engine builds at inference (images numbered "Image 1:", "Image 2:", ... once the prompt
holds two or more; earlier answers in the history).

Which image a question is about:
- it names it ("... of Image 2?", "In Image 2, ...", "In the second image, ...", "Look at Image 2. ..."),
- or it does not, and then it is about the newest image of the conversation (the one the turn brings,
  or the last one brought before a text-only turn).
A turn that brings two images always names the one it asks about. Text-only turns that ask nothing
(greetings, long stories) are answered "OK.".

    chat_sample(seed, index) -> {"images", "turns", "asked": [(image number or None, kind)], "scenes"}
    quiz_sample(seed, index) -> the same, for a quiz: 1-4 pictures in the first turn, then 3-8 questions

A quiz is the dense form of the same skill: every question of it names its picture once there are two or
more, so one sequence teaches the picture-to-name binding and the LR questions (colour, count, yes/no)
several times over for the price of encoding its pictures once.
"""
from __future__ import annotations

import random

from ..modeling.chat_template import PromptTurn
from .synthetic import COLOUR_NAMES, SUFFIX, digit_question, other_question, scene

ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")
CHATTER_ANSWER = "OK."
CHATTER = (
    "Hello!", "Hi there.", "Thanks, that was helpful.", "Great, thank you!", "Let me show you another picture.",
    "I have a few more images for you.", "I made these pictures for a small game with my children.",
    "Each picture has some coloured squares on a plain background, and one square holds a small number.",
    "We play it every evening after dinner, and the children try to find the number before anyone else.",
    "Sometimes the number is very small, so we need a magnifying glass to read it.",
    "My daughter likes the red squares best, my son prefers the blue and the green ones.",
    "Yesterday it rained all day, so we stayed inside and drew many new pictures.",
    "Could you help me check our answers? We are not always sure that we read the numbers right.",
    "The weather is nice today and we might go to the park later.",
    "I am writing a long message here to see whether you still remember the pictures from before.",
    "Tell me a story about a cat who lives in a big city and likes to read books at night.",
    "What is the capital of France?", "How are you today?", "Can you see the pictures I sent?",
    "This is not about the images at all, just a note before the next question.",
    "Please keep the earlier images in mind, I will ask about them again.",
)


def _lower_first(q: str) -> str:
    return q[0].lower() + q[1:]


def refer(q: str, k: int, rng: random.Random) -> str:
    """The question `q` about image number k (1-based), phrased one of several ways."""
    r = rng.random()
    if r < 0.65 or k > len(ORDINALS):
        name = f"Image {k}"                                  # as the prompt labels it ("Image 2:")
    elif r < 0.8:
        name = f"the {ORDINALS[k - 1]} image"
    elif r < 0.9:
        name = f"the {ORDINALS[k - 1]} picture" if rng.random() < 0.5 else f"picture {k}"
    else:
        name = f"image {k}"
    body, end = q[:-1], q[-1]
    style = rng.random()
    if style < 0.45:
        for here in (" in the image", " in the picture"):
            if here in body:
                return body.replace(here, f" in {name}") + end
        if body.endswith("square") and " in the " in body and rng.random() < 0.6:  # "... in the red square of Image 2"
            return f"{body} of {name}{end}"
        return f"{body} in {name}{end}"
    if style < 0.8:
        return f"In {name}, {_lower_first(q)}"
    if style < 0.9:
        return f"Look at {name}. {q}"
    return f"About {name}: {_lower_first(q)}" if rng.random() < 0.5 else f"For {name}: {q}"


LIST_QUESTIONS = ("What colours are the squares?", "Which colours do the squares have?",
                  "List the colours of the squares.")


def question(sc, kind: str, rng: random.Random) -> tuple[str, str]:
    if kind == "list":  # every colour present, in COLOUR_NAMES order: a dense lesson in what is there
        present = {s.colour for s in sc.squares}
        return rng.choice(LIST_QUESTIONS), ", ".join(c for c in COLOUR_NAMES if c in present)
    if kind == "digit":
        q, a = digit_question(sc, rng)
        return q.replace(SUFFIX, ""), a
    return other_question(sc, rng)


def _pictures(scene_fn, seed: int, tag: str):
    """(rng, j) -> Scene: `scene_fn(rng)` when given, else picture j of the training stream `seed` under `tag`."""
    if scene_fn is None:
        return lambda rng, j: scene(seed, f"{tag}-{j}")
    return lambda rng, j: scene_fn(rng)


def chatter(rng: random.Random) -> str:
    return " ".join(rng.sample(CHATTER, rng.randint(1, 3)))


def chat_sample(seed: int, index: int, digit_fraction: float = 0.6, max_images: int = 4,
                scene_fn=None, earlier: float = 0.3) -> dict:
    """One conversation (deterministic per seed, index). `scene_fn(rng) -> Scene` draws its pictures
    (default: the training generator's scene stream `seed`); `earlier`: the chance that a turn after the
    first picture brings no new picture (a question about an earlier one, or chatter)."""
    rng = random.Random(f"mgm-chat-{seed}-{index}")
    scene_fn = _pictures(scene_fn, seed, f"chat-{index}")
    images, scenes, turns, asked = [], [], [], []
    n_turns = rng.choice((1, 2, 2, 3, 3, 3, 4, 4, 5))
    for t in range(n_turns):
        r = rng.random()
        kind = "digit" if rng.random() < digit_fraction else "other"
        room = max_images - len(images)
        if t == 0 and r < 0.15 and n_turns > 1:      # a text-only opening
            turns.append(PromptTurn(chatter(rng), 0, CHATTER_ANSWER))
            asked.append((None, "chatter"))
            continue
        if images and (room == 0 or r < earlier):     # a question about an earlier image, no new image
            if rng.random() < 0.15:
                turns.append(PromptTurn(chatter(rng), 0, CHATTER_ANSWER))
                asked.append((None, "chatter"))
                continue
            k = rng.randint(1, len(images)) if rng.random() < 0.75 else len(images)
            q, a = question(scenes[k - 1], kind, rng)
            q = refer(q, k, rng) if k < len(images) or rng.random() < 0.5 else q
            turns.append(PromptTurn(q, 0, a))
            asked.append((k, kind))
            continue
        if room == 0:
            break
        n_new = 2 if room >= 2 and rng.random() < 0.2 else 1
        for _ in range(n_new):
            if images and rng.random() < 0.08:        # the same picture again
                old = rng.randrange(len(images))
                images.append(images[old])
                scenes.append(scenes[old])
            else:
                sc = scene_fn(rng, len(scenes))
                images.append(sc.image)
                scenes.append(sc)
        if n_new == 2 or rng.random() < 0.25:
            k = rng.randint(1, len(images)) if rng.random() < 0.3 else len(images) - rng.randrange(n_new)
            q, a = question(scenes[k - 1], kind, rng)
            q = refer(q, k, rng)
        else:
            k = len(images)
            q, a = question(scenes[k - 1], kind, rng)
        if rng.random() < 0.2:
            q += SUFFIX
        turns.append(PromptTurn(q, n_new, a))
        asked.append((k, kind))
    if not images:  # only chatter was drawn: end with a picture and a question about it
        sc = scene_fn(rng, 0)
        images.append(sc.image)
        scenes.append(sc)
        kind = "digit" if rng.random() < digit_fraction else "other"
        q, a = question(sc, kind, rng)
        turns.append(PromptTurn(q, 1, a))
        asked.append((1, kind))
    return dict(images=images, turns=turns, asked=asked, scenes=scenes)


def quiz_sample(seed: int, index: int, digit_fraction: float = 0.6, max_images: int = 4, scene_fn=None,
                list_fraction: float = 0.0) -> dict:
    """A quiz (deterministic per seed, index): 1-`max_images` pictures in the first turn, then 3-8 questions
    about them, each about one picture (named when there are several), all answers learnt.
    list_fraction: share of "What colours are the squares?" questions (answer: "blue, green, red"), which
    teach the LLM to gather every colour present, what yes/no and count questions rest on."""
    rng = random.Random(f"mgm-quiz-{seed}-{index}")
    scene_fn = _pictures(scene_fn, seed, f"quiz-{index}")
    n_images = rng.randint(1, max_images)
    scenes = [scene_fn(rng, j) for j in range(n_images)]
    turns, asked = [], []
    for t in range(rng.randint(3, 8)):
        k = rng.randint(1, n_images)
        kind = "digit" if rng.random() < digit_fraction else "other"
        if list_fraction and rng.random() < list_fraction:
            kind = "list"
        q, a = question(scenes[k - 1], kind, rng)
        if n_images > 1:
            q = refer(q, k, rng)
        turns.append(PromptTurn(q, n_images if t == 0 else 0, a))
        asked.append((k, kind))
    return dict(images=[sc.image for sc in scenes], turns=turns, asked=asked, scenes=scenes)

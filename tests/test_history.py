"""What is derived from a conversation's history follows every edit of it (issue 20, part 1).

- Undo, Regenerate, Clear, Stop and errors leave a session exactly as if its remaining history had been built
  afresh: a property test runs random sequences of those operations, then compares the next prompt (ids) and
  answer with a session that was given the same turns one by one.
- After old turns are left out to fit the context, images keep their conversation numbers ("Image 6:").
- An empty answer (Stop before the first token) never makes a malformed prompt, in any template.
"""
import contextlib
import random

import pytest
from helpers import fault_at, kinds, run
from PIL import Image

from mini_gemini.chat.engine import Engine, GenOptions
from mini_gemini.constants import IMAGE_TOKEN_INDEX
from mini_gemini.modeling.chat_template import TEMPLATES, PromptTurn, build_prompt
from mini_gemini.testing.tiny import build_tiny

SHORT = GenOptions(temperature=0.0, max_new_tokens=6)
COLOURS = [(220, 30, 30), (30, 30, 220), (30, 160, 30), (200, 200, 40), (140, 40, 160), (240, 140, 40)]


def picture(k: int) -> Image.Image:
    return Image.new("RGB", (40 + 4 * k, 24 + 2 * k), COLOURS[k % len(COLOURS)])


@pytest.fixture(scope="module")
def small():
    """A tiny Llama whose context (256) a few turns with images outgrow: old turns get left out."""
    return build_tiny("vicuna", context=256)


@contextlib.contextmanager
def stop_while_encoding(model, session):
    """The user presses Stop while the turn's picture is being encoded (before any token is written)."""
    handle = model.vision_tower.register_forward_hook(lambda *a: session.cancel())
    try:
        yield
    finally:
        handle.remove()


def rebuilt(engine: Engine, turns) -> object:
    """A new session given `turns` one by one, each answer then made the one the history holds (so that a
    stopped or regenerated answer is part of it exactly as shown)."""
    s = engine.session()
    for t in turns:
        events, got = run(s, t.user, [im.image for im in t.images], generate_image=t.want_image, options=SHORT)
        assert got is not None, [e.text for e in kinds(events, "error")]
        got.assistant, got.token_ids = t.assistant, list(t.token_ids)
    return s


def operations(rng: random.Random, n: int) -> list[tuple]:
    ops, k = [], 0
    for _ in range(n):
        kind = rng.choices(["text", "image", "undo", "regenerate", "clear", "stop", "stop-early", "error"],
                           weights=[5, 3, 3, 2, 1, 2, 1, 2])[0]
        if kind in ("image", "stop-early"):
            k += 1
        ops.append((kind, k))
    return ops


def apply(engine: Engine, s, op: tuple, step: int):
    kind, k = op
    text = f"Message {step}: tell me about the picture and the colours you see there."
    if kind == "text":
        run(s, text, options=SHORT)
    elif kind == "image":
        run(s, text, [picture(k)], options=SHORT)
    elif kind == "undo":
        s.undo()
    elif kind == "regenerate":
        list(s.regenerate(SHORT))
    elif kind == "clear":
        s.clear()
    elif kind == "stop":  # Stop pressed as the answer starts: the partial answer is kept
        for ev in s.chat(text, options=GenOptions(temperature=0.0, max_new_tokens=6)):
            if ev.kind == "delta":
                s.cancel()
    elif kind == "stop-early":  # Stop pressed while the picture is encoded: the answer is empty
        with stop_while_encoding(engine.model, s):
            run(s, text, [picture(k)], options=SHORT)
    elif kind == "error":  # the device fails mid-answer: nothing of the turn is kept
        with fault_at(engine.model, RuntimeError("device lost"), at=3):
            events, turn = run(s, text, options=SHORT)
        assert turn is None and kinds(events, "error")


@pytest.mark.parametrize("seed", range(6))
def test_any_sequence_of_edits_leaves_the_session_as_if_built_afresh(small, seed):
    engine = Engine(small)
    rng = random.Random(seed)
    s = engine.session()
    for step, op in enumerate(operations(rng, 14)):
        apply(engine, s, op, step)
    fresh = rebuilt(Engine(small), s.turns)
    a = run(s, "What is in Image 1 now?", options=SHORT)[1]
    b = run(fresh, "What is in Image 1 now?", options=SHORT)[1]
    assert a.prompt == b.prompt and a.prompt_ids == b.prompt_ids and a.window_start == b.window_start
    assert a.token_ids == b.token_ids  # and the answer too: no cache or count outlived an edit


def test_undo_after_an_overflow_brings_the_turns_back_into_view(small):
    engine = Engine(small)
    s = engine.session()
    for k in range(8):
        run(s, f"Turn {k}: what colour is the square in this picture, and how big is it?", [picture(k)],
            options=SHORT)
    assert s.dropped > 0
    for _ in range(5):
        s.undo()
    turn = run(s, "Which colours did you see?", options=SHORT)[1]
    assert turn.window_start == 0 and turn.prompt_ids.count(IMAGE_TOKEN_INDEX) == 3  # all 3 turns in view
    assert all(t.user in turn.prompt for t in s.turns[:-1])


def test_images_keep_their_conversation_numbers_when_old_turns_are_left_out(small):
    engine = Engine(small)
    s = engine.session()
    for k in range(8):
        run(s, f"Turn {k}: what colour is this square?", [picture(k)], options=SHORT)
    turn = run(s, "What colour is the square of Image 6?", options=SHORT)[1]
    assert turn.window_start > 0
    shown = [im for t in s.turns[turn.window_start:] for im in t.images]
    first = 1 + sum(len(t.images) for t in s.turns[:turn.window_start])
    labels = [f"Image {first + j}:" for j in range(len(shown))]
    assert all(label in turn.prompt for label in labels)
    assert "Image 1:" not in turn.prompt and "Image 6:" in turn.prompt
    assert turn.prompt.index("Image 6:") < turn.prompt.index("Turn 5:")  # the sixth picture, where it was sent


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_an_empty_answer_is_written_as_an_empty_message(name):
    """The prompt with an empty answer is the prompt with a one-word answer, without the word: the template's
    structure (role, separators) is all there."""
    def prompt(answer):
        return build_prompt(name, [PromptTurn("What is it?", 1, answer), PromptTurn("And now?")]).text
    assert prompt("") == prompt("WORD").replace("WORD", "")
    assert "ASSISTANT:USER:" not in prompt("") and "<start_of_turn>model\n<start_of_turn>user" not in prompt("")


@pytest.mark.parametrize("max_active", [8, 0], ids=["scheduler", "generate"])
def test_stop_before_the_first_token_keeps_a_well_formed_history(small, max_active):
    s = Engine(small, max_active=max_active).session()
    with stop_while_encoding(small, s):
        events, _ = run(s, "Tell me a story.", [picture(0)], options=SHORT)
    (turn,) = s.turns
    assert turn.cancelled and turn.assistant == "" and kinds(events, "done")
    nxt = run(s, "Hello?", options=SHORT)[1]
    assert "ASSISTANT: </s>USER: Hello?" in nxt.prompt

"""A model that declares its task (the bundled demo model's `mgm_task_scope`) gets a note on every answer to a
question or about a picture outside it, through every front end: the engine, the CLI (and so `/chat`, MCP and the
OpenAI endpoint, which all answer through the engine). The note is short after its first showing."""
import json
import os
import subprocess
import sys

import matplotlib
import pytest
from helpers import ROOT, kinds, run
from PIL import Image

from mini_gemini.chat.engine import Engine, GenOptions
from mini_gemini.modeling.loading import load_pretrained
from mini_gemini.modeling.task_scope import flat_colour_share
from mini_gemini.resources import examples_dir

GREEDY = GenOptions(temperature=0.0, max_new_tokens=8)
PHOTO = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")  # a real photo, from a package


@pytest.fixture(scope="module")
def demo():
    return load_pretrained("demo", device="cpu")  # by name, as in Python scripts (the CLI's --model demo)


def task_notes(turn):
    return [n for n in turn.notes if n.kind == "task"]


def test_pictures_are_told_apart_by_their_flat_colours():
    example = Image.open(examples_dir() / "squares-1.png")
    assert flat_colour_share(example) == pytest.approx(1.0)
    assert flat_colour_share(Image.open(PHOTO)) < 0.7


def test_outside_questions_and_pictures_get_a_note_short_after_the_first(demo):
    s = Engine(demo).session()
    example = examples_dir() / "squares-1.png"
    turn = run(s, "What digit is in the red square?", [example], options=GREEDY)[1]
    assert task_notes(turn) == []                                   # the task: no note
    events, turn = run(s, "What is in this picture?", options=GREEDY)  # an outside question
    (note,) = task_notes(turn)
    assert "only knows questions about the digits and coloured squares" in note and "YanweiLi/MGM-2B" in note
    assert note in [e.text for e in kinds(events, "notice")]
    turn = run(s, "What colour is her suit?", [PHOTO], options=GREEDY)[1]  # a task word, about a photo
    (short,) = task_notes(turn)
    assert short == "Outside the demo model's task again: this answer means nothing."
    # a new conversation is told in full again
    turn = run(Engine(demo).session(), "What colour is her suit?", [PHOTO], options=GREEDY)[1]
    assert "only knows" in task_notes(turn)[0]


def test_a_model_without_a_declared_task_gets_no_note(tiny_checkpoint):
    model = load_pretrained(str(tiny_checkpoint("vicuna")), device="cpu")
    assert model.config.task_scope is None
    turn = run(Engine(model).session(), "What is in this picture?", [PHOTO], options=GREEDY)[1]
    assert task_notes(turn) == []


def test_the_cli_gives_the_note(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mini_gemini.cli", "--model", "demo", "--image", PHOTO,
                          "--prompt", "What is in this picture?", "--json"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert any("only knows questions about the digits" in n for n in result["notes"])


def test_an_image_prompt_from_a_model_not_trained_to_write_them_gets_a_note(demo, tiny_checkpoint):
    assert demo.config.task_scope.image_prompts is False  # declared with the model (assets/demo-model)
    s = Engine(demo).session()
    example = examples_dir() / "squares-1.png"
    turn = run(s, "What digit is in the red square?", [example], generate_image=True, options=GREEDY)[1]
    (note,) = task_notes(turn)  # the question is the demo model's task: the one note is about the prompt
    assert note.startswith("This small demo model was never trained to write image prompts") and "MGM-2B" in note
    turn = run(s, "What digit is in the red square?", options=GREEDY)[1]
    assert task_notes(turn) == []  # no image asked for: no note
    turn = run(s, "Draw it bigger", generate_image=True, options=GREEDY)[1]  # outside the task too
    assert [n.split(":")[0] for n in task_notes(turn)] == ["This is a small demo model",
                                                          "An image prompt from the demo model again"]
    # a model that declares no such thing gets no note
    model = load_pretrained(str(tiny_checkpoint("vicuna")), device="cpu")
    turn = run(Engine(model).session(), "Draw a cat", generate_image=True, options=GREEDY)[1]
    assert task_notes(turn) == []


def test_the_image_prompts_flag_must_be_a_boolean():
    from mini_gemini.modeling.task_scope import TaskScope
    assert TaskScope.from_config({"mgm_task_scope": {"summary": "x"}}).image_prompts is True
    with pytest.raises(ValueError, match="image_prompts"):
        TaskScope.from_config({"mgm_task_scope": {"summary": "x", "image_prompts": "no"}})

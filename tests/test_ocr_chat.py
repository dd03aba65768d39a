"""OCR assist in conversations: where "Reference OCR Token" lands in the prompt of every template (as the
official `mgm/serve/cli.py` puts it), its tokenisation, and the engine (read once per picture, off the
model's lock, notes with the time, the per-image results the app draws).

The engine tests use a stand-in reader (no OCR packages needed); one test runs the real reader.
"""
import threading
from collections import Counter

import pytest
from helpers import kinds, run
from test_templates import L3_ASST, L3_USER, LLAMA3_SYS, VICUNA_SYS, official_chunks
from PIL import Image

from mini_gemini.chat.engine import Engine, GenOptions
from mini_gemini.modeling.chat_template import TEMPLATES, PromptTurn, build_prompt, tokenize
from mini_gemini.constants import IMAGE_TOKEN_INDEX
from mini_gemini.inputs import ocr
from mini_gemini.inputs.ocr import OcrLine, OcrResult
from mini_gemini.modeling.loading import load_pretrained
from mini_gemini.testing.tiny_tokenizer import FAMILIES, build_tokenizer, family_template


SIGN = ("STOP", "Main St")
OCR = "\nReference OCR Token: STOP, Main St\n"  # official: '\nReference OCR Token: ' + ', '.join(texts) + '\n'

# the official CLI appends the OCR text to the user's input of every turn, before the image slots are put
# in front of the first one: "<image>\n" + "What is written?" + OCR
EXPECTED = {
    "vicuna_v1": VICUNA_SYS + " USER: <image>\nWhat is written?" + OCR + " ASSISTANT: A stop sign.</s>"
                 "USER: Where is it?" + OCR + " ASSISTANT:",
    "gemma": "<start_of_turn>user\n<image>\nWhat is written?" + OCR + "<end_of_turn>\n<start_of_turn>model\n"
             "A stop sign.<end_of_turn>\n<eos><start_of_turn>user\nWhere is it?" + OCR + "<end_of_turn>\n"
             "<start_of_turn>model\n",
    "llama_3": LLAMA3_SYS + L3_USER + "<image>\nWhat is written?" + OCR + "<|eot_id|>" + L3_ASST
               + "A stop sign.<|eot_id|>" + L3_USER + "Where is it?" + OCR + "<|eot_id|>" + L3_ASST,
    "mistral_instruct": "[INST] <image>\nWhat is written?" + OCR + " [/INST] A stop sign. </s>"
                        "<s>[INST] Where is it?" + OCR + " [/INST]",
    "chatml_direct": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\n"
                     "What is written?" + OCR + "<|im_end|><|im_start|>assistant\nA stop sign.<|im_end|>"
                     "<|im_start|>user\nWhere is it?" + OCR + "<|im_end|><|im_start|>assistant\n",
}


def official_cli(template, inputs, answers, n_images, ocr_text, gen=False):
    """The official CLI's steps, re-stated: inp + OCR (+ ' <GEN>'), then '<image>\\n' x n before the first
    input; the conversation is then written by the template (checked against the official strings in
    test_templates.py)."""
    turns = []
    for k, inp in enumerate(inputs):
        if ocr_text:
            inp = inp + "\nReference OCR Token: " + ocr_text + "\n"
        if gen:
            inp = inp + " <GEN>"
        turns.append(PromptTurn(inp, n_images if k == 0 else 0, answers[k]))
    return build_prompt(template, turns).text


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_one_image_every_template(name):
    turns = [PromptTurn("What is written?", 1, "A stop sign.", image_texts=(SIGN,), ocr=True),
             PromptTurn("Where is it?", ocr=True)]
    p = build_prompt(name, turns)
    assert p.text == EXPECTED[name]
    assert p.text == official_cli(name, ["What is written?", "Where is it?"], ["A stop sign.", None], 1,
                                  "STOP, Main St")
    # the recognised text is user (untrusted) text, the label is the template's
    assert [x.text for x in p.pieces if x.kind == "user"].count("STOP, Main St") == 2
    assert p.n_images == 1


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_two_images_say_whose_text_it_is(name):
    turns = [PromptTurn("Compare the signs.", 2, image_texts=(SIGN, ("EXIT",)), ocr=True)]
    p = build_prompt(name, turns)
    expected_ocr = "Image 1: STOP, Main St\nReference OCR Token: Image 2: EXIT"
    assert p.text == official_cli(name, ["Compare the signs."], [None], 2, expected_ocr)
    assert "Image 1:<image>\nImage 2:<image>\nCompare the signs.\nReference OCR Token: Image 1: STOP, Main St\n" \
           "Reference OCR Token: Image 2: EXIT\n" in p.text


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_with_image_generation_the_ocr_text_comes_first(name):
    # official CLI: `inp = inp + OCR` and then `inp = inp + ' <GEN>'`
    p = build_prompt(name, [PromptTurn("Draw it.", 1, image_texts=(SIGN,), ocr=True, generate_image=True)])
    assert p.text == official_cli(name, ["Draw it."], [None], 1, "STOP, Main St", gen=True)
    assert "Draw it." + OCR + " <GEN>" in p.text


def test_images_over_several_turns():
    turns = [PromptTurn("Read it.", 1, "STOP.", image_texts=(SIGN,), ocr=True),
             PromptTurn("And this?", 1, "Nothing.", image_texts=((),), ocr=True),  # no text in image 2
             PromptTurn("A third?", 1, "EXIT.", image_texts=(["EXIT"],), ocr=True),
             PromptTurn("Thanks.", ocr=False)]  # OCR off for this turn: nothing added
    p = build_prompt("vicuna_v1", turns)
    line1 = "\nReference OCR Token: Image 1: STOP, Main St\n"
    line13 = line1 + "Reference OCR Token: Image 3: EXIT\n"
    assert p.text == (VICUNA_SYS + " USER: Image 1:<image>\nRead it." + line1 + " ASSISTANT: STOP.</s>"
                      "USER: Image 2:<image>\nAnd this?" + line1 + " ASSISTANT: Nothing.</s>"
                      "USER: Image 3:<image>\nA third?" + line13 + " ASSISTANT: EXIT.</s>"
                      "USER: Thanks. ASSISTANT:")


def test_no_text_or_ocr_off_changes_nothing():
    plain = build_prompt("gemma", [PromptTurn("What is it?", 1)]).text
    assert build_prompt("gemma", [PromptTurn("What is it?", 1, image_texts=(SIGN,))]).text == plain  # ocr off
    assert build_prompt("gemma", [PromptTurn("What is it?", 1, image_texts=((),), ocr=True)]).text == plain
    assert build_prompt("gemma", [PromptTurn("What is it?", 1, ocr=True)]).text == plain  # not read
    with pytest.raises(ValueError, match="image_texts"):
        build_prompt("gemma", [PromptTurn("What is it?", 1, image_texts=(SIGN, SIGN), ocr=True)])
    with pytest.raises(ValueError, match="image_texts"):
        build_prompt("gemma", [PromptTurn("What is it?", 1, image_texts=("STOP",), ocr=True)])


@pytest.mark.parametrize("family", FAMILIES)
def test_tokens_are_the_official_ones_and_read_text_cannot_control(family):
    tok = build_tokenizer(family)
    name = family_template(family)
    benign = build_prompt(name, [PromptTurn("What is written?", 2, image_texts=(SIGN, ("Coffee 3.50",)), ocr=True)])
    assert tokenize(benign, tok) == official_chunks(benign.text, tok)
    # a photo of a sign that reads "<image>" or "</s>" must not become an image slot or a control token
    evil = ("<image>", "</s>", "<|im_end|>", "<end_of_turn>", "<|eot_id|>", *tok.all_special_tokens)
    dirty = build_prompt(name, [PromptTurn("What is written?", 2, image_texts=(evil, ("EXIT",)), ocr=True)])
    clean = build_prompt(name, [PromptTurn("What is written?", 2, image_texts=(("a",), ("EXIT",)), ocr=True)])
    ids_dirty, ids_clean = tokenize(dirty, tok), tokenize(clean, tok)
    ctrl = set(tok.get_added_vocab().values()) | set(tok.all_special_ids)
    assert Counter(i for i in ids_dirty if i in ctrl) == Counter(i for i in ids_clean if i in ctrl)
    assert ids_dirty.count(IMAGE_TOKEN_INDEX) == 2


# ---------------------------------------------------------------------------------------------- engine

def _result(*texts, seconds=0.25, size=(40, 24)):
    lines = tuple(OcrLine(t, 0.9, ((1.0, 2.0), (30.0, 2.0), (30.0, 12.0), (1.0, 12.0))) for t in texts)
    return OcrResult(lines=lines, seconds=seconds, width=size[0], height=size[1])


class FakeReader:
    """Reads a text chosen by the image's colour; records calls and whether the model lock was held."""

    def __init__(self, engine, by_colour):
        self.engine, self.by_colour, self.calls, self.under_lock = engine, by_colour, [], []

    def read(self, pil):
        self.calls.append(pil.size)
        self.under_lock.append(self.engine.runner.lock.locked())
        texts = self.by_colour.get(pil.getpixel((0, 0)), ())
        if texts == "boom":
            raise RuntimeError("the OCR model broke")
        return _result(*texts, size=pil.size)


RED, BLUE, GREY = (Image.new("RGB", (40, 24), c) for c in ((220, 30, 30), (30, 30, 220), (128, 128, 128)))
OPTS = GenOptions(temperature=0.0, max_new_tokens=2, ocr=True)


@pytest.fixture(scope="module")
def vicuna(tiny_checkpoint):
    return load_pretrained(str(tiny_checkpoint("vicuna")), device="cpu")


@pytest.fixture
def engine(vicuna):
    eng = Engine(vicuna)
    eng.ocr_reader = FakeReader(eng, {(220, 30, 30): SIGN, (30, 30, 220): ("EXIT",), (128, 128, 128): "boom"})
    return eng


def test_engine_puts_the_text_where_the_official_cli_does(engine):
    s = engine.session()
    events, turn = run(s, "What is written?", [RED], options=OPTS)
    template = engine.model.processor.template
    assert turn.ocr and turn.prompt == official_cli(template, ["What is written?"], [None], 1, "STOP, Main St")
    ocr_notes = [n for n in turn.notes if n.kind == "ocr"]
    assert [str(n) for n in ocr_notes] == ["Image 1: 2 lines of text read (OCR, 0.25 s)."]
    assert any(e.text == ocr_notes[0] for e in kinds(events, "notice"))
    # what the app draws: per image, the lines with their boxes in pixels of the image
    assert s.images[0].ocr.texts == ["STOP", "Main St"] and s.images[0].ocr.lines[0].box[0] == (1.0, 2.0)
    assert engine.ocr_reader.under_lock == [False]  # read off the model's lock


def test_each_picture_is_read_once_per_session(engine):
    s = engine.session()
    _, t1 = run(s, "What is written?", [RED], options=OPTS)
    _, t2 = run(s, "And here?", [BLUE], options=OPTS)
    _, t3 = run(s, "The first again.", [RED], options=OPTS)  # the same picture, sent again
    _, t4 = run(s, "Thanks.", options=OPTS)
    assert engine.ocr_reader.calls == [(40, 24), (40, 24)]
    assert [n for n in t3.notes + t4.notes if n.kind == "ocr"] == []  # nothing read: no time to report
    both = "\nReference OCR Token: Image 1: STOP, Main St\nReference OCR Token: Image 2: EXIT\n"
    assert t2.prompt.endswith("And here?" + both + " ASSISTANT:")
    assert t4.prompt.endswith("Thanks." + both + "Reference OCR Token: Image 3: STOP, Main St\n ASSISTANT:")
    assert [r.texts for r in s.read_text()] == [list(SIGN), ["EXIT"], list(SIGN)]
    assert s.images[0].ocr is s.images[2].ocr
    # another conversation reads for itself (sessions share nothing)
    run(engine.session(), "What is written?", [RED], options=OPTS)
    assert len(engine.ocr_reader.calls) == 3


def test_ocr_off_reads_nothing_and_adds_nothing(engine):
    s = engine.session()
    _, turn = run(s, "What is written?", [RED], options=GenOptions(temperature=0.0, max_new_tokens=2))
    assert engine.ocr_reader.calls == [] and not turn.ocr and "Reference OCR Token" not in turn.prompt
    assert s.images[0].ocr is None
    assert [r.texts for r in s.read_text()] == [list(SIGN)]  # the app can still ask for the boxes


def test_regenerate_follows_the_new_setting(engine):
    s = engine.session()
    _, turn = run(s, "What is written?", [RED], options=GenOptions(temperature=0.0, max_new_tokens=2))
    events = list(s.regenerate(options=OPTS))
    assert turn.ocr and OCR in turn.prompt and [str(n) for n in turn.notes if n.kind == "ocr"]
    events = list(s.regenerate(options=GenOptions(temperature=0.0, max_new_tokens=2)))
    assert kinds(events, "done") and not turn.ocr and "Reference OCR Token" not in turn.prompt
    assert [n for n in turn.notes if n.kind == "ocr"] == []
    assert len(engine.ocr_reader.calls) == 1


def test_a_failing_reader_leaves_the_answer(engine):
    s = engine.session()
    _, turn = run(s, "What is written?", [GREY, RED], options=OPTS)
    assert turn is not None and turn.assistant is not None
    notes = [str(n) for n in turn.notes if n.kind == "ocr"]
    assert notes[0] == "Image 1: its text could not be read (OCR failed: RuntimeError)."
    assert "\nReference OCR Token: Image 2: STOP, Main St\n" in turn.prompt and "Image 1: STOP" not in turn.prompt
    run(s, "Again?", options=OPTS)
    assert len(engine.ocr_reader.calls) == 2  # the broken picture is not read again every turn


def test_without_the_ocr_extra_a_note_says_how_to_install(vicuna, monkeypatch):
    monkeypatch.setattr(ocr, "_missing", ["rapidocr and onnxruntime are not installed"])
    monkeypatch.setattr(ocr, "_default_reader", None)
    eng = Engine(vicuna)
    assert "pip install" in eng.ocr_unavailable_reason()
    _, turn = run(eng.session(), "What is written?", [RED], options=OPTS)
    assert turn is not None and turn.assistant is not None and "Reference OCR Token" not in turn.prompt
    (note,) = [str(n) for n in turn.notes if n.kind == "ocr"]
    assert 'pip install "mini-gemini-studio[ocr]"' in note and "without the images' text" in note


def test_a_long_text_is_cut_at_whole_lines(engine):
    engine.ocr_reader.by_colour[(30, 30, 220)] = tuple(f"line {k:04d} of a long page" for k in range(400))
    _, turn = run(engine.session(), "Summarise.", [BLUE], options=OPTS)
    body = turn.prompt.split("Reference OCR Token: ")[1].split("\n")[0]
    assert len(body) <= ocr.MAX_PROMPT_CHARS and body.endswith("of a long page")
    assert "Only its first lines go into the message" in str([n for n in turn.notes if n.kind == "ocr"][0])


def test_gen_options_ocr_is_a_bool():
    assert GenOptions(ocr="true").checked().ocr is True
    assert GenOptions(ocr="false").checked().ocr is False
    assert GenOptions(ocr=1).checked().ocr is True and GenOptions(ocr=None).checked().ocr is False


def test_ocr_does_not_wait_for_the_model(engine):
    import torch

    from mini_gemini.chat.types import ImageEntry
    from mini_gemini.chat.types import Turn as ChatTurn

    s = engine.session()
    entry = ImageEntry("k", RED, torch.zeros(1, 1), torch.zeros(1, 1, 1), torch.zeros(1, 1))
    s.turns = [ChatTurn("x", images=[entry], assistant="y")]
    got = []
    with engine.runner.lock:  # another conversation's model run holds the lock
        reader = threading.Thread(target=lambda: got.append(s.read_text()))
        reader.start()
        reader.join(10)
        assert not reader.is_alive(), "OCR waited for the model lock"
    assert [r.texts for r in got[0]] == [list(SIGN)] and entry.ocr is got[0][0]


def test_real_reader_through_the_engine(vicuna):
    pytest.importorskip("rapidocr", reason="OCR extra not installed (pip install rapidocr onnxruntime)")
    pytest.importorskip("onnxruntime", reason="OCR extra not installed (pip install rapidocr onnxruntime)")
    from ocr_images import draw_text

    eng = Engine(vicuna)
    eng.ocr_reader = ocr.OcrReader(threads=1)
    sign = draw_text(["FRESH BREAD", "Market Street"], font="serif-bold", size=40).image
    s = eng.session()
    _, turn = run(s, "What does the sign say?", [sign], options=OPTS)
    assert "\nReference OCR Token: " in turn.prompt
    read = turn.prompt.split("Reference OCR Token: ")[1].split("\n")[0]
    assert all(w in read.split(", ") or w in read for w in ["FRESH", "BREAD", "Market", "Street"])
    (result,) = s.read_text()
    for line in result.lines:
        assert all(0 <= x <= sign.width and 0 <= y <= sign.height for x, y in line.box)


# ------------------------------------------------------------------------------------------------- CLI

class _ColourReader:
    def read(self, pil):
        return _result(*({(220, 30, 30): SIGN}.get(pil.getpixel((0, 0)), ())), size=pil.size)


def test_cli_ocr_flag_and_json(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import json

    from mini_gemini.cli import main
    monkeypatch.setattr(Engine, "ocr_reader", _ColourReader())
    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    RED.save(red)
    BLUE.save(blue)
    args = ["--model", str(tiny_checkpoint("gemma")), "--image", str(red), "--image", str(blue),
            "--prompt", "What is written?", "--json", "--max-new-tokens", "2"]
    assert main(args + ["--ocr"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert "What is written?\nReference OCR Token: Image 1: STOP, Main St\n<end_of_turn>" in out["prompt"]
    first, second = out["ocr"]
    assert first["texts"] == ["STOP", "Main St"] and first["lines"][0]["box"] == [[1.0, 2.0], [30.0, 2.0],
                                                                                   [30.0, 12.0], [1.0, 12.0]]
    assert second["texts"] == [] and second["lines"] == [] and second["seconds"] == 0.25
    assert "[Image 1: 2 lines of text read (OCR, 0.25 s).]" in captured.err
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ocr"] is None and "Reference OCR Token" not in out["prompt"]

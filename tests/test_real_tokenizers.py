"""Real tokenizer files give the ids and answer texts MGM's official stack gives.

The goldens (tests/data/golden_token_ids.json) were written once by tools/make_golden_ids.py with MGM's pins
(transformers 4.36.2, tokenizers 0.15.0, sentencepiece 0.1.99), loading each folder as mgm/model/builder.py
does and tokenising with tokenizer_image_token; these tests need none of that stack. Each variant folder
(sentencepiece only / tokenizer.json only / both; `legacy` absent, null, true, false; ChatML and Llama 3
tokens; Mixtral) is assembled from the real files in tests/data/tokenizers/ as the JSON describes it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mini_gemini.modeling.chat_template import PromptTurn, build_prompt, tokenize
from mini_gemini.modeling.loading import _load_tokenizer
from mini_gemini.testing.tokenizer_folders import assemble as assemble_folder

DATA = Path(__file__).parent / "data"
STORE = DATA / "tokenizers"
GOLDEN = json.loads((DATA / "golden_token_ids.json").read_text(encoding="utf-8"))
# the LLM family the project loads each golden folder for (the goldens' "mixtral" folders were loaded
# as MGM-8x7B's, fast; all others as Llama-architecture checkpoints, use_fast=False)
FAMILY = {"llama2": "llama", "chatml": "llama", "llama3": "llama", "mixtral": "mixtral"}


def assemble(variant: dict, dest: Path) -> Path:
    """The variant's tokenizer folder, laid out as tools/make_golden_ids.py lays it out."""
    return assemble_folder(variant, dest, STORE)


_TOKENIZERS: dict[str, object] = {}


@pytest.fixture(scope="module")
def tokenizer_for(tmp_path_factory):
    def get(name: str):
        if name not in _TOKENIZERS:
            variant = GOLDEN["variants"][name]
            folder = assemble(variant, tmp_path_factory.mktemp(name))
            _TOKENIZERS[name] = _load_tokenizer(folder, FAMILY[variant["family"]])
        return _TOKENIZERS[name]
    yield get
    _TOKENIZERS.clear()


def _case_id(c: dict) -> str:
    return f"{c['variant']}-{c['template']}-{c['conversation']}"


def test_real_files_are_the_ones_the_goldens_were_made_from():
    for rel, sha in GOLDEN["store"].items():
        assert hashlib.sha256((STORE / rel).read_bytes()).hexdigest() == sha, rel


def test_goldens_cover_the_issue():
    """Three families, every legacy flavour, all five templates, images and several turns."""
    fams = {v["family"] for v in GOLDEN["variants"].values()}
    assert {"llama2", "chatml", "llama3", "mixtral"} <= fams
    assert {c["template"] for c in GOLDEN["cases"]} == {"vicuna_v1", "llama_3", "mistral_instruct",
                                                         "chatml_direct", "gemma"}
    cfgs = [v["write"].get("tokenizer_config.json", {}) for v in GOLDEN["variants"].values()]
    assert any("legacy" not in c for c in cfgs) and any(c.get("legacy") is None and "legacy" in c for c in cfgs)
    assert any(c.get("legacy") is True for c in cfgs) and any(c.get("legacy") is False for c in cfgs)
    # the issue's case: a Llama 2 sentencepiece folder without `legacy`, two-turn vicuna_v1
    case = next(c for c in GOLDEN["cases"] if c["variant"] == "llama2-sp-nolegacy-minimal"
                and c["template"] == "vicuna_v1" and c["conversation"] == "two_turn_image")
    assert "It says STOP.</s>USER: And the colour? ASSISTANT:" in case["prompt"]
    after = case["input_ids"].index(2)
    assert case["input_ids"][after:after + 4] == [2, 3148, 1001, 29901]


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=_case_id)
def test_prompt_ids_equal_official(case, tokenizer_for):
    prompt = build_prompt(case["template"], [PromptTurn(**t) for t in case["turns"]])
    assert prompt.text == case["prompt"]
    ids = tokenize(prompt, tokenizer_for(case["variant"]))
    if ids != case["input_ids"]:
        k = next((i for i, (a, b) in enumerate(zip(ids, case["input_ids"])) if a != b),
                 min(len(ids), len(case["input_ids"])))
        pytest.fail(f"ids differ from the official stack at position {k}: "
                    f"project {ids[max(0, k - 3):k + 4]} official {case['input_ids'][max(0, k - 3):k + 4]}")


@pytest.mark.parametrize("name", sorted(GOLDEN["decode"]))
def test_answer_text_equals_official(name, tokenizer_for):
    """The official CLI keeps an answer as batch_decode(ids, skip_special_tokens=True)[0].strip()."""
    tok = tokenizer_for(name)
    for d in GOLDEN["decode"][name]:
        assert tok.batch_decode([d["ids"]], skip_special_tokens=True)[0].strip() == d["text"], d["name"]


def test_one_changed_id_is_noticed(tokenizer_for):
    case = GOLDEN["cases"][0]
    ids = tokenize(build_prompt(case["template"], [PromptTurn(**t) for t in case["turns"]]),
                   tokenizer_for(case["variant"]))
    assert ids == case["input_ids"]
    for k in (0, len(ids) // 2, len(ids) - 1):
        changed = list(case["input_ids"])
        changed[k] += 1
        assert ids != changed


@pytest.mark.parametrize("name", ["llama2-sp-nolegacy-minimal", "llama2-sp-legacy-false",
                                  "chatml-sp-nobos-nolegacy", "mixtral-sp-legacy-false"])
def test_saved_and_reloaded_tokenizer_keeps_the_ids(name, tokenizer_for, tmp_path):
    """save_pretrained writes transformers 5's files (no tokenizer.model, no legacy/add_bos_token keys);
    loading them again must still give the official ids."""
    variant = GOLDEN["variants"][name]
    tokenizer_for(name).save_pretrained(tmp_path)
    again = _load_tokenizer(tmp_path, FAMILY[variant["family"]])
    for case in (c for c in GOLDEN["cases"] if c["variant"] == name):
        prompt = build_prompt(case["template"], [PromptTurn(**t) for t in case["turns"]])
        assert tokenize(prompt, again) == case["input_ids"], _case_id(case)


@pytest.mark.parametrize("name,tiny_family", [("llama2-sp-nolegacy-minimal", "vicuna"),
                                              ("mixtral-sp-legacy-false", "mixtral")])
def test_two_turn_chat_on_a_checkpoint_with_a_real_tokenizer(name, tiny_family, tmp_path):
    """A tiny checkpoint carrying real tokenizer files, loaded by load_pretrained and chatted with twice:
    the second prompt holds the first answer as the official CLI keeps it
    (batch_decode(ids, skip_special_tokens=True)[0].strip()) and is tokenised whole, with official ids."""
    from PIL import Image

    from mini_gemini.chat.engine import Engine
    from mini_gemini.chat.types import GenOptions
    from mini_gemini.modeling.config import MGMConfig
    from mini_gemini.modeling.loading import load_pretrained, save_pretrained
    from mini_gemini.modeling.model import MiniGemini
    from mini_gemini.testing.tiny import liven, tiny_config

    variant = GOLDEN["variants"][name]
    real = tmp_path / "tok"
    real.mkdir()
    tok = _load_tokenizer(assemble(variant, real), FAMILY[variant["family"]])
    model = liven(MiniGemini(MGMConfig.from_dict(tiny_config(tiny_family, tok))).eval().requires_grad_(False))
    ckpt = tmp_path / "ckpt"
    save_pretrained(model, ckpt)  # no processor: no tokenizer files written
    assemble(variant, ckpt)       # the real ones, as a released checkpoint carries them
    loaded = load_pretrained(str(ckpt), device="cpu", dtype="float32")
    session = Engine(loaded).session()
    options = GenOptions(temperature=0.0, max_new_tokens=6)
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    turns = []
    for text, images in (("What is written on the sign?", [image]), ("And the colour?", [])):
        done = [ev.data for ev in session.chat(text, images, options=options) if ev.kind == "done"]
        assert len(done) == 1, "the turn did not finish"
        turns.append(done[0])
    first, second = turns
    ptok, template = loaded.processor.tokenizer, loaded.processor.template
    answer = ptok.batch_decode([first.token_ids], skip_special_tokens=True)[0].strip()
    assert first.assistant == answer
    expected = build_prompt(template, [PromptTurn(user="What is written on the sign?", n_images=1, assistant=answer),
                                       PromptTurn(user="And the colour?", n_images=0, assistant=None)])
    assert second.prompt == expected.text
    assert second.prompt_ids == tokenize(expected, ptok)
    if template.name == "vicuna_v1" and answer:  # the issue's ids: "</s>USER:" -> 2, ▁US, ER, :
        k = second.prompt_ids.index(2)
        assert second.prompt_ids[k:k + 4] == [2, 3148, 1001, 29901]

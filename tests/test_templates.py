"""Chat templates, prompt building, tokenisation around <image>, and the tiny family tokenizers.

The expected prompt strings are written out from the official `mgm/conversation.py` (`get_prompt`) and
`mgm/serve/cli.py` (images before the user text, "Image k:" when the prompt holds two or more).
"""

import os
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from mini_gemini.constants import IMAGE_TOKEN_INDEX
from mini_gemini.modeling.chat_template import TEMPLATES, PromptTurn, build_prompt, select_template, tokenize
from mini_gemini.testing.tiny_tokenizer import FAMILIES, build_tokenizer, family_template

VICUNA_SYS = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
LLAMA3_SYS = ("<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision assistant. "
              "You are able to understand the visual content that the user provides, and assist the user with "
              "a variety of tasks using natural language.<|eot_id|>")
L3_USER, L3_ASST = "<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>system<|end_header_id|>\n\n"

ONE_IMAGE = [PromptTurn("What is in the image?", 1, "A red circle."), PromptTurn("What colour is it?")]
EXPECTED_ONE_IMAGE = {
    "gemma": "<start_of_turn>user\n<image>\nWhat is in the image?<end_of_turn>\n<start_of_turn>model\n"
             "A red circle.<end_of_turn>\n<eos><start_of_turn>user\nWhat colour is it?<end_of_turn>\n"
             "<start_of_turn>model\n",
    "vicuna_v1": VICUNA_SYS + " USER: <image>\nWhat is in the image? ASSISTANT: A red circle.</s>"
                 "USER: What colour is it? ASSISTANT:",
    "llama_3": LLAMA3_SYS + L3_USER + "<image>\nWhat is in the image?<|eot_id|>" + L3_ASST
               + "A red circle.<|eot_id|>" + L3_USER + "What colour is it?<|eot_id|>" + L3_ASST,
    "mistral_instruct": "[INST] <image>\nWhat is in the image? [/INST] A red circle. </s>"
                        "<s>[INST] What colour is it? [/INST]",
    "chatml_direct": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\n"
                     "What is in the image?<|im_end|><|im_start|>assistant\nA red circle.<|im_end|>"
                     "<|im_start|>user\nWhat colour is it?<|im_end|><|im_start|>assistant\n",
}

TWO_IMAGES = [PromptTurn("Compare them.", 1, "The first is red."), PromptTurn("And this one?", 1)]
EXPECTED_TWO_IMAGES = {
    "gemma": "<start_of_turn>user\nImage 1:<image>\nCompare them.<end_of_turn>\n<start_of_turn>model\n"
             "The first is red.<end_of_turn>\n<eos><start_of_turn>user\nImage 2:<image>\nAnd this one?"
             "<end_of_turn>\n<start_of_turn>model\n",
    "vicuna_v1": VICUNA_SYS + " USER: Image 1:<image>\nCompare them. ASSISTANT: The first is red.</s>"
                 "USER: Image 2:<image>\nAnd this one? ASSISTANT:",
    "llama_3": LLAMA3_SYS + L3_USER + "Image 1:<image>\nCompare them.<|eot_id|>" + L3_ASST
               + "The first is red.<|eot_id|>" + L3_USER + "Image 2:<image>\nAnd this one?<|eot_id|>" + L3_ASST,
    "mistral_instruct": "[INST] Image 1:<image>\nCompare them. [/INST] The first is red. </s>"
                        "<s>[INST] Image 2:<image>\nAnd this one? [/INST]",
    "chatml_direct": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\nImage 1:<image>\n"
                     "Compare them.<|im_end|><|im_start|>assistant\nThe first is red.<|im_end|>"
                     "<|im_start|>user\nImage 2:<image>\nAnd this one?<|im_end|><|im_start|>assistant\n",
}

TYPED_CONTROLS = ("<image>", "<start_of_turn>", "<end_of_turn>", "</s>", "<s>", "<eos>", "<bos>", "<|eot_id|>",
                  "<|start_header_id|>", "<|begin_of_text|>", "[INST]", "<|im_end|>", "<|im_start|>")


@pytest.fixture(scope="module")
def tokenizers():
    return {f: build_tokenizer(f) for f in FAMILIES}


def official_chunks(text, tok):
    """Independent re-statement of the official tokenizer_image_token chunk algorithm."""
    chunks = [tok(c).input_ids for c in text.split("<image>")]
    starts_with_bos = len(chunks[0]) > 0 and chunks[0][0] == tok.bos_token_id
    out = [tok.bos_token_id] if starts_with_bos else []
    for i, ids in enumerate(chunks):
        if i > 0:
            out.append(IMAGE_TOKEN_INDEX)
        out += ids[1:] if starts_with_bos else ids
    return out


def control_ids(tok):
    return set(tok.get_added_vocab().values()) | set(tok.all_special_ids)


# --------------------------------------------------------------------------------------- prompt strings

def test_template_names_and_stop_strings():
    assert set(TEMPLATES) == {"gemma", "vicuna_v1", "llama_3", "mistral_instruct", "chatml_direct"}
    assert TEMPLATES["gemma"].stop_strings == ("<end_of_turn>", "<eos>")
    assert TEMPLATES["llama_3"].stop_strings == ("<|eot_id|>",)
    assert TEMPLATES["chatml_direct"].stop_strings == ("<|im_end|>",)


@pytest.mark.parametrize("name", sorted(EXPECTED_ONE_IMAGE))
def test_prompt_one_image(name):
    p = build_prompt(name, ONE_IMAGE)
    assert p.text == EXPECTED_ONE_IMAGE[name]
    assert p.n_images == 1
    assert "".join(x.text for x in p.pieces) == p.text
    assert [x.text for x in p.pieces if x.kind == "user"] == ["What is in the image?", "A red circle.",
                                                              "What colour is it?"]


@pytest.mark.parametrize("name", sorted(EXPECTED_TWO_IMAGES))
def test_prompt_two_images_numbered(name):
    p = build_prompt(TEMPLATES[name], TWO_IMAGES)
    assert p.text == EXPECTED_TWO_IMAGES[name]
    assert p.n_images == 2 and [x.text for x in p.pieces if x.kind == "image"] == ["<image>", "<image>"]


def test_first_turn_prompt_and_two_images_in_one_turn():
    p = build_prompt("vicuna_v1", [PromptTurn("Which is brighter?", 2)])
    assert p.text == VICUNA_SYS + " USER: Image 1:<image>\nImage 2:<image>\nWhich is brighter? ASSISTANT:"
    p = build_prompt("gemma", [PromptTurn("Hi")])
    assert p.text == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n" and p.n_images == 0


def test_typed_image_text_is_user_text_not_a_slot():
    p = build_prompt("chatml_direct", [PromptTurn("is <image> here?", 1)])
    assert p.n_images == 1
    assert "Image 1:" not in p.text  # only real image slots count for the numbering
    assert [x.text for x in p.pieces if x.kind == "user"] == ["is <image> here?"]


def test_build_prompt_rejects_bad_input():
    with pytest.raises(ValueError, match="gemma"):
        build_prompt("no_such_template", [PromptTurn("hi")])
    with pytest.raises(ValueError, match="last turn"):
        build_prompt("gemma", [PromptTurn("a"), PromptTurn("b")])


# ------------------------------------------------------------------------------------------ tokenisation

@pytest.mark.parametrize("family", FAMILIES)
def test_tokenize_matches_official_chunks(family, tokenizers):
    tok = tokenizers[family]
    name = family_template(family)
    conversations = [
        [PromptTurn("Describe the picture.")],
        ONE_IMAGE,
        TWO_IMAGES,
        [PromptTurn(" two  spaces\nand a line", 2, "Blue and green 😀."), PromptTurn("مرحبا? 3 squares", 1)],
    ]
    for turns in conversations:
        p = build_prompt(name, turns)
        ids = tokenize(p, tok)
        assert ids == official_chunks(p.text, tok)
        assert ids.count(IMAGE_TOKEN_INDEX) == p.n_images
        assert (ids[0] == tok.bos_token_id) == (family != "yi")  # Yi adds no bos
        assert ids.count(tok.bos_token_id) == (0 if family == "yi" else 1) + p.text.count(tok.bos_token)


@pytest.mark.parametrize("family", FAMILIES)
def test_typed_control_strings_stay_text(family, tokenizers):
    tok = tokenizers[family]
    name = family_template(family)
    evil = "look " + " ".join(TYPED_CONTROLS) + " " + " ".join(tok.all_special_tokens)
    clean = [PromptTurn("look", 1, "fine."), PromptTurn("and now?", 1)]
    dirty = [PromptTurn(evil, 1, "fine. " + evil), PromptTurn("and " + evil, 1)]
    ids_clean = tokenize(build_prompt(name, clean), tok)
    ids_dirty = tokenize(build_prompt(name, dirty), tok)
    ctrl = control_ids(tok)
    # the same control tokens (the template's own) and the same two image slots, nothing more
    assert Counter(i for i in ids_dirty if i in ctrl) == Counter(i for i in ids_clean if i in ctrl)
    assert ids_dirty.count(IMAGE_TOKEN_INDEX) == 2
    text = tok.decode([i for i in ids_dirty if i >= 0], skip_special_tokens=True)
    assert text.count("<image>") == 3 and text.count("<|im_end|>") >= 3


def test_typed_added_token_that_is_not_special_stays_text():
    tok = build_tokenizer("vicuna")
    tok.add_tokens(["<start_of_turn>"])  # an added token without the special flag: split_special_tokens skips it
    added_id = tok.convert_tokens_to_ids("<start_of_turn>")
    ids = tokenize(build_prompt("vicuna_v1", [PromptTurn("say <start_of_turn> now", 1)]), tok)
    assert added_id not in ids and ids.count(IMAGE_TOKEN_INDEX) == 1
    assert "<start_of_turn>" in tok.decode([i for i in ids if i >= 0])


# ------------------------------------------------------------------------------------- template selection

def test_select_template_from_config_and_tokenizer(tokenizers):
    from transformers import GemmaConfig, LlamaConfig

    llama = {"model_type": "mgm", "architectures": ["MGMLlamaForCausalLM"], "_name_or_path": "MGM-2B"}
    assert select_template(llama, tokenizers["vicuna"]).name == "vicuna_v1"  # path says 2b: ignored
    assert select_template(llama, tokenizers["llama3"]).name == "llama_3"
    assert select_template(llama, tokenizers["yi"]).name == "chatml_direct"
    assert select_template({"model_type": "mgm_gemma", "architectures": ["MGMGemmaForCausalLM"]},
                           tokenizers["gemma"]).name == "gemma"
    assert select_template({"model_type": "mgm_mixtral"}, tokenizers["mixtral"]).name == "mistral_instruct"
    assert select_template({"architectures": ["MGMMistralForCausalLM"]}, tokenizers["mistral"]).name \
        == "mistral_instruct"
    assert select_template(GemmaConfig(), tokenizers["gemma"]).name == "gemma"
    assert select_template(LlamaConfig(), tokenizers["llama3"]).name == "llama_3"
    assert select_template(llama, tokenizers["vicuna"], override="chatml_direct").name == "chatml_direct"
    with pytest.raises(ValueError, match="vicuna_v1"):
        select_template(llama, tokenizers["vicuna"], override="vicuna")
    with pytest.raises(ValueError, match="gpt2"):
        select_template({"model_type": "gpt2"}, tokenizers["vicuna"])


# ---------------------------------------------------------------------------------------- tiny tokenizers

EXPECTED_SPECIALS = {
    "gemma": ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>", "<pad>", "<unk>"]),
    "vicuna": ("<s>", "</s>", ["<unk>"]),
    "mistral": ("<s>", "</s>", ["<unk>"]),
    "mixtral": ("<s>", "</s>", ["<unk>"]),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", ["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]),
    "yi": ("<|startoftext|>", "<|im_end|>", ["<|im_start|>", "<|endoftext|>", "<unk>"]),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_tokenizer_family_behaviour(family, tokenizers, tmp_path):
    from transformers import AutoTokenizer

    tok = tokenizers[family]
    bos, eos, others = EXPECTED_SPECIALS[family]
    assert (tok.bos_token, tok.eos_token) == (bos, eos)
    assert 300 < len(tok) <= 2000
    for s in [bos, eos, *others]:
        ids = tok(s, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] in tok.all_special_ids, s
    plain = tok("[INST] red", add_special_tokens=False).input_ids
    assert control_ids(tok).isdisjoint(plain)  # "[INST]" is plain text in every family
    assert (tok("red").input_ids[:1] == [tok.bos_token_id]) == (family != "yi")

    text = "Hello 😀 مرحبا שלום \x00\x07\ttab ünïcödé 漢字 red"
    ids = tok(text).input_ids
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    probe = "<|im_start|>user\n<start_of_turn></s> blue 7 😀"
    assert again(probe).input_ids == tok(probe).input_ids
    assert (again.bos_token, again.eos_token, len(again)) == (bos, eos, len(tok))


def test_family_templates_and_determinism():
    from mini_gemini.testing import tiny_tokenizer

    assert {f: family_template(f) for f in FAMILIES} == {
        "gemma": "gemma", "vicuna": "vicuna_v1", "llama3": "llama_3", "mistral": "mistral_instruct",
        "mixtral": "mistral_instruct", "yi": "chatml_direct"}
    with pytest.raises(ValueError, match="llama3"):
        build_tokenizer("llama")
    first = build_tokenizer("llama3").get_vocab()
    tiny_tokenizer._build_json.cache_clear()  # retrain from scratch
    assert build_tokenizer("llama3").get_vocab() == first

"""The tiny random models are worth testing with: their greedy answers depend on the prompt and on the
image, and the token-for-token comparisons with tests/reference.py fail when a single prompt id or a
single pixel is wrong (a model answering the same token to everything would hide both)."""
import numpy as np
import pytest
import torch
from PIL import Image

from reference import FAMILY_TEMPLATE, Reference, official_prompt

from mini_gemini.chat.detokenizer import stop_tables
from mini_gemini.chat.engine import Engine, GenOptions
from mini_gemini.modeling.chat_template import PromptTurn, build_prompt, tokenize
from mini_gemini.constants import IMAGE_TOKEN_INDEX
from mini_gemini.modeling.loading import load_pretrained
from mini_gemini.testing.tiny import build_tiny

FAMILIES = ["gemma", "vicuna", "llama3", "mistral", "mixtral", "yi"]
CONFIGS = [(f, hd) for f in FAMILIES for hd in (False, True)]
PROMPTS = ["What is in the image?", "Describe the image in detail.", "How many shapes are there?"]
QUESTION = PROMPTS[0]
PIXELS = [(0, 0), (15, 22), (29, 44), (7, 30), (20, 5)]   # (row, col) in the 45 x 30 test image


def noise(seed=0, w=45, h=30) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def one_pixel_changed(arr, row, col) -> Image.Image:
    out = arr.copy()
    out[row, col] = 255 - out[row, col]
    return Image.fromarray(out)


def greedy(model, text, images, n=8):
    """n greedy tokens with the stop tokens suppressed (so that every answer has n tokens to compare)."""
    ids = tokenize(build_prompt(model.processor.template, [PromptTurn(text, len(images))]), model.processor.tokenizer)
    feats = []
    for im in images:
        v = model.processor.image_processor(im)
        feats.append(model.encode_images(v.pixel_values[None], v.pixel_values_aux[None]).image_features[0])
    stops, _ = stop_tables(model.processor.tokenizer, model.processor.template.stop_strings)
    return model.generate(ids, feats, max_new_tokens=n, suppress_tokens=sorted(stops)).tolist()


@pytest.mark.parametrize("family,hd", CONFIGS)
def test_greedy_answers_depend_on_prompt_and_image(family, hd):
    model = build_tiny(family, hd=hd)
    images = [Image.fromarray(noise(0)), Image.fromarray(noise(1))]
    answers = {(p, i): greedy(model, p, [im]) for p in PROMPTS for i, im in enumerate(images)}
    for (p, i), a in answers.items():
        assert len(a) == 8 and len(set(a)) >= 4, (p, i, a)          # not one token over and over
    for i in range(len(images)):                                      # each prompt has its own answer
        per_prompt = [tuple(answers[p, i]) for p in PROMPTS]
        assert len(set(per_prompt)) == len(PROMPTS), per_prompt
    for p in PROMPTS:                                                 # each image has its own answer
        assert answers[p, 0] != answers[p, 1], p
    # a lost image (the same question without it) is answered differently
    assert greedy(model, QUESTION, []) != answers[QUESTION, 0]


def test_tiny_models_are_deterministic():
    a, b = build_tiny("vicuna", seed=3), build_tiny("vicuna", seed=3)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    assert not torch.equal(build_tiny("vicuna", seed=4).llm.lm_head.weight, a.llm.lm_head.weight)


@pytest.mark.parametrize("family,hd", CONFIGS)
def test_reference_comparison_fails_on_one_wrong_id_or_pixel(family, hd, tiny_checkpoint):
    """test_matches_reference / the CLI and engine tests compare greedy tokens (6 here, as there) with
    the reference. Those comparisons hold on the right inputs and must break when our stack gets a single
    prompt id or a single pixel wrong, or loses the image."""
    folder = tiny_checkpoint(family, hd=hd)
    model = load_pretrained(str(folder), device="cpu", dtype=torch.float32)
    ref = Reference(folder)
    template = FAMILY_TEMPLATE[family]
    stop = ref.stop_ids(template)
    arr = noise(0)
    image = Image.fromarray(arr)
    events = list(Engine(model).session().chat(QUESTION, [image],
                                               options=GenOptions(temperature=0.0, max_new_tokens=6)))
    ours = events[-1].data.token_ids
    ids = ref.tokenize(official_prompt(template, QUESTION))
    tokens, _ = ref.encode(image)
    assert ref.greedy(ids, [tokens], 6, stop) == ours and len(ours) >= 3     # right inputs: equal

    # one wrong prompt id, at each position of the prompt in turn: most are seen, the last always
    text_positions = [k for k, i in enumerate(ids) if i != IMAGE_TOKEN_INDEX]
    vocab = len(ref.tokenizer)
    seen = []
    for k in text_positions:
        wrong = list(ids)
        wrong[k] = (wrong[k] + 1) % vocab
        seen.append(ref.greedy(wrong, [tokens], 6, stop) != ours)
    assert seen[-1]
    assert sum(seen) >= 2 / 3 * len(seen), f"{sum(seen)} of {len(seen)} single-id changes seen"

    # one wrong pixel (inverted), at several places: most are seen
    seen_px = [ref.greedy(ids, [ref.encode(one_pixel_changed(arr, r, c))[0]], 6, stop) != ours for r, c in PIXELS]
    assert sum(seen_px) >= 3, f"{sum(seen_px)} of {len(PIXELS)} single-pixel changes seen"

    # a lost image: the question without it
    assert ref.greedy(ref.tokenize(official_prompt(template, QUESTION, 0)), [], 6, stop) != ours

"""Answer attribution through the engine (`ChatSession.explain`): the same result as the model-level
`explain_answer` on the prompt the model saw, the images in its window, the ablation from the kept LR tokens."""
import pytest
import torch
from helpers import run
from PIL import Image

from mini_gemini.chat.engine import Engine, GenOptions
from mini_gemini.errors import AttributionUnavailable
from mini_gemini.modeling.attribution import ImageEvidence, explain_answer
from mini_gemini.modeling.loading import load_pretrained

GREEDY = GenOptions(temperature=0.0, max_new_tokens=6)
RED, BLUE = Image.new("RGB", (40, 24), (220, 30, 30)), Image.new("RGB", (20, 36), (30, 30, 220))


@pytest.mark.parametrize("family, hd", [("vicuna", False), ("gemma", True)])
def test_explain_equals_the_model_level_attribution_of_what_the_model_saw(tiny_checkpoint, family, hd):
    model = load_pretrained(str(tiny_checkpoint(family, hd=hd)), device="cpu")
    s = Engine(model).session()
    run(s, "What is in the first image?", [RED], options=GREEDY)
    run(s, "And this one?", [BLUE], options=GREEDY)
    turn = s.turns[-1]
    got = s.explain()
    assert s.explain() is got  # kept: another word or view costs nothing
    images = s.images_seen(turn)
    assert [im.key for im in images] == [im.key for im in s.images]
    with torch.no_grad():
        plain = []
        for im in (RED, BLUE):  # projector(x), from a fresh encoding: the ablation the engine made from its LR tokens
            v = model.processor.image_processor(im)
            plain.append(model.encode_images(v.pixel_values[None], v.pixel_values_aux[None], mining=False)
                         .image_features[0])
    want = explain_answer(model, turn.prompt_ids, [ImageEvidence(im.tokens, im.attn, p) for im, p in zip(images, plain)],
                          turn.token_ids)
    assert got.answer_ids == turn.token_ids and len(got.images) == 2
    for a, b in zip(got.images, want.images):
        assert torch.allclose(a.relevance, b.relevance, atol=1e-6) and torch.allclose(a.hr_map, b.hr_map, atol=1e-6)
    assert torch.allclose(got.prob, want.prob, atol=1e-6)
    assert torch.allclose(got.prob_no_mining, want.prob_no_mining, atol=1e-5)


def test_explain_says_why_when_it_cannot(tiny_checkpoint):
    model = load_pretrained(str(tiny_checkpoint("vicuna")), device="cpu")
    s = Engine(model).session()
    with pytest.raises(IndexError):
        s.explain()
    run(s, "Hello", [RED], options=GREEDY)
    with pytest.raises(ValueError, match="unknown attribution method"):
        s.explain(method="saliency")
    old = s.turns[-1]
    s.undo()
    with pytest.raises(AttributionUnavailable, match="not there any more"):
        s.explain(old)


def test_answer_without_mining_is_written_from_the_lr_tokens_and_kept_nowhere(tiny_checkpoint):
    """The same question answered again with the visual tokens = projector(x): the greedy answer of a plain
    `generate` over those tokens, streamed like any answer; the history and the kept caches stay as they were."""
    from helpers import stop_ids_of

    from mini_gemini.chat.explanation import token_texts
    model = load_pretrained(str(tiny_checkpoint("vicuna")), device="cpu")
    engine = Engine(model)
    s = engine.session()
    run(s, "What is in the first image?", [RED], options=GREEDY)
    run(s, "And this one?", [BLUE], options=GREEDY)
    turn = s.turns[-1]
    history, answer, held = list(s.turns), turn.assistant, engine.kv_store.holders()
    events = list(s.answer_without_mining(options=GREEDY))
    done = events[-1]
    assert done.kind == "done" and [e.kind for e in events[:-1]] == ["delta"] * (len(events) - 1)
    assert done.text == "".join(e.text for e in events[:-1])
    with torch.no_grad():
        plain = []
        for im in (RED, BLUE):
            v = model.processor.image_processor(im)
            plain.append(model.encode_images(v.pixel_values[None], v.pixel_values_aux[None], mining=False)
                         .image_features[0])
        ids = model.generate(turn.prompt_ids, plain, max_new_tokens=GREEDY.max_new_tokens).tolist()
    stops = stop_ids_of(model)
    want = ids[:next((i for i, t in enumerate(ids) if t in stops), len(ids))]
    assert done.data == want and want != turn.token_ids  # this tiny model answers otherwise without the mined detail
    assert s.turns == history and turn.assistant == answer and engine.kv_store.holders() == held
    # each answer token's text, for the words a user clicks: together they are the decoded answer
    pieces = token_texts(engine.detokenizer, turn.token_ids)
    assert len(pieces) == len(turn.token_ids) and "".join(pieces).strip() == turn.assistant


def test_token_texts_keep_spaces_and_whole_characters(tiny_checkpoint):
    from mini_gemini.chat.explanation import token_texts
    engine = Engine(load_pretrained(str(tiny_checkpoint("vicuna")), device="cpu"))
    text = "The cat sat, naïvely — 猫 ok."
    ids = engine.detokenizer.text_ids(text)
    pieces = token_texts(engine.detokenizer, ids)
    assert "".join(pieces) == engine.detokenizer.decode(ids) and len(pieces) == len(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_explain_without_the_ablation_runs_one_forward_and_reuses_a_kept_result(tiny_checkpoint):
    model = load_pretrained(str(tiny_checkpoint("vicuna")), device="cpu")
    s = Engine(model).session()
    run(s, "Hello", [RED], options=GREEDY)
    forwards = []
    handle = model.llm.register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        plain = s.explain(ablation=False)
        assert plain.prob_no_mining is None and len(forwards) == 1
        full = s.explain()
        assert full.prob_no_mining is not None and len(forwards) == 3
        assert s.explain(ablation=False) is full and len(forwards) == 3  # the kept result serves
        assert torch.equal(plain.images[0].hr_map, full.images[0].hr_map)
    finally:
        handle.remove()

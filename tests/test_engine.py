"""Chat engine on tiny models: multi-turn results equal a fresh prompt (the caches only change speed),
streaming, cancel, undo / regenerate, context overflow and image generation."""
import io
import threading

import pytest
import torch
from helpers import ENGINE_PATHS, endless, kinds, run, scripted
from PIL import Image

from mini_gemini.chat.detokenizer import stop_tables
from mini_gemini.chat.engine import Engine, GenOptions
from mini_gemini.chat.templates import Turn as PromptTurn
from mini_gemini.chat.templates import build_prompt, tokenize
from mini_gemini.constants import IMAGE_TOKEN_INDEX
from mini_gemini.modeling.loading import load_pretrained
from mini_gemini.testing.tiny import build_tiny

GREEDY = GenOptions(temperature=0.0, max_new_tokens=8)
RED, BLUE = Image.new("RGB", (40, 24), (220, 30, 30)), Image.new("RGB", (20, 36), (30, 30, 220))


# ---- helpers ------------------------------------------------------------------------------------------
def reference(model, turns, max_new):
    """Greedy answer from a prompt built from scratch: no engine, no KV cache, images encoded afresh.

    turns: [(user, [PIL images], assistant or None)]."""
    prompt = build_prompt(model.processor.template, [PromptTurn(u, len(ims), a) for u, ims, a in turns])
    ids = tokenize(prompt, model.processor.tokenizer)
    feats = []
    for _, ims, _ in turns:
        for im in ims:
            v = model.processor.image_processor(im)
            feats.append(model.encode_images(v.pixel_values[None], v.pixel_values_aux[None])[0][0])
    stop_ids, _ = stop_tables(model.processor.tokenizer, model.processor.template.stop_strings)
    with torch.no_grad():
        emb = model.embed(ids, feats)
        out = model.llm.generate(inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.long),
                                 max_new_tokens=max_new, do_sample=False, temperature=None, top_p=None, top_k=None,
                                 eos_token_id=stop_ids, pad_token_id=model.processor.tokenizer.pad_token_id)
    new = out[0].tolist()
    while new and new[-1] in stop_ids:
        new.pop()
    return new


def prefill_counter(model):
    """Counts the positions each generate call prefills (the first forward, the one with inputs_embeds)."""
    counts = []

    def hook(module, args, kwargs):
        emb = kwargs.get("inputs_embeds")
        if emb is not None:
            counts.append(emb.shape[1])
    return counts, model.llm.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.fixture(scope="module")
def vicuna(tiny_checkpoint):
    return load_pretrained(str(tiny_checkpoint("vicuna")), device="cpu")


# ---- multi-turn = fresh prompt, caches reused ---------------------------------------------------------
@pytest.mark.parametrize("family, hd", [("vicuna", False), ("llama3", True)])
def test_multi_turn_equals_fresh_prompt_and_reuses_caches(tiny_checkpoint, family, hd):
    model = load_pretrained(str(tiny_checkpoint(family, hd=hd)), device="cpu")
    encodes = []
    real_encode = model.encode_images
    model.encode_images = lambda *a: encodes.append(1) or real_encode(*a)
    counts, handle = prefill_counter(model)
    try:
        s = Engine(model).session("s")
        history, engine_encodes, prev_length = [], 0, 0
        plan = [("What is in the first image?", [RED]), ("And what about this second one?", [BLUE]),
                ("Compare the two images.", []), ("Look at the red one again.", [RED])]
        for k, (text, images) in enumerate(plan):
            counts.clear()
            before = len(encodes)
            events, turn = run(s, text, images, options=GREEDY)
            prefilled, engine_encodes = list(counts), engine_encodes + len(encodes) - before
            assert turn is not None and not kinds(events, "error")
            history.append((text, images, None))
            assert turn.token_ids == reference(model, history, GREEDY.max_new_tokens), f"turn {k}"
            history[-1] = (text, images, turn.assistant)
            assert "".join(e.text for e in kinds(events, "delta")) == turn.assistant
            # the engine's own ids: one slot per image in view, numbered as the official CLI does
            n_images = sum(len(ims) for _, ims, _ in history)
            assert turn.prompt_ids.count(IMAGE_TOKEN_INDEX) == n_images
            assert (f"Image {n_images}:" in turn.prompt) == (n_images >= 2)
            # prefill covers exactly what the cache did not hold
            length = len(turn.prompt_ids) + n_images * (Engine(model).tokens_per_image - 1)
            assert prefilled == [length - turn.cached_tokens]
            if k == 2:  # a text-only follow-up prefills only its new tokens: the whole last prompt is reused
                assert turn.cached_tokens >= prev_length
            prev_length = length
        assert "What is in the first image?" in s.turns[-1].prompt  # new images never reset the chat
        assert engine_encodes == 2  # the red picture given twice was encoded once
    finally:
        handle.remove()


def test_sampling_is_reproducible_with_a_seed(vicuna):
    opts = GenOptions(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=123)
    eng = Engine(vicuna)
    a = run(eng.session("a"), "Describe a square.", options=opts)[1]
    b = run(eng.session("b"), "Describe a square.", options=opts)[1]
    greedy = run(eng.session("c"), "Describe a square.", options=GenOptions(temperature=0, max_new_tokens=12))[1]
    assert a.token_ids == b.token_ids
    assert a.token_ids != greedy.token_ids  # sampling really sampled
    assert len(run(eng.session("d"), "Describe a square.",
                   options=GenOptions(temperature=0, max_new_tokens=3))[1].token_ids) <= 3


@ENGINE_PATHS
def test_text_stop_strings_end_and_trim_the_answer(vicuna, max_active):
    eng = Engine(vicuna, max_active=max_active)
    # "###" is not one token: it is matched on the decoded text
    with scripted(vicuna, "Hello there ###USER: more text"):
        events, turn = run(eng.session(), "hi", options=GenOptions(temperature=0, max_new_tokens=64, stop="###"))
    assert turn.assistant == "Hello there"
    assert "".join(e.text for e in kinds(events, "delta")) == "Hello there"  # the stop text never streams
    assert "###" in vicuna.processor.tokenizer.decode(turn.token_ids) and "more" not in vicuna.processor.tokenizer.decode(turn.token_ids)


# ---- cancel, undo, regenerate ---------------------------------------------------------------------------
@ENGINE_PATHS
def test_cancel_from_another_thread_keeps_the_partial_answer(vicuna, max_active):
    eng = Engine(vicuna, max_active=max_active)
    s = eng.session()
    first_delta = threading.Event()
    threading.Thread(target=lambda: first_delta.wait(30) and s.cancel(), daemon=True).start()
    events = []
    with endless(vicuna):
        for ev in s.chat("Tell me a long story.", options=GenOptions(temperature=0, max_new_tokens=400)):
            events.append(ev)
            if ev.kind == "delta":
                first_delta.set()
    turn = kinds(events, "done")[0].data
    assert turn.cancelled and "stopped" in turn.notes
    assert 0 < len(turn.token_ids) < 400
    assert turn.assistant and "".join(e.text for e in kinds(events, "delta")) == turn.assistant
    assert any("Stopped" in e.text for e in kinds(events, "notice"))
    assert eng.runner.lock.acquire(timeout=30)  # the model was let go (no run still writing)
    eng.runner.lock.release()
    nxt = run(s, "Go on.", options=GenOptions(temperature=0, max_new_tokens=3))[1]
    assert nxt is not None and not nxt.cancelled and turn.assistant in nxt.prompt  # partial answer is history


def test_undo_and_regenerate(vicuna):
    s = Engine(vicuna).session()
    run(s, "What colour is the square?", [RED], options=GREEDY)
    second = run(s, "How many shapes are there?", options=GREEDY)[1]
    assert s.undo() is second and len(s.turns) == 1
    again = run(s, "How many shapes are there?", options=GREEDY)[1]
    assert again.token_ids == second.token_ids  # the cache was cut back correctly
    events = list(s.regenerate(GREEDY))
    regen = kinds(events, "done")[0].data
    assert regen is again and len(s.turns) == 2 and regen.token_ids == second.token_ids
    assert regen.cached_tokens > 0  # its prompt was still in the cache
    sampled = GenOptions(temperature=1.0, max_new_tokens=8, seed=5)
    first = list(kinds(list(s.regenerate(sampled)), "done")[0].data.token_ids)
    assert kinds(list(s.regenerate(sampled)), "done")[0].data.token_ids == first
    s.undo()
    s.undo()
    assert s.undo() is None and s.turns == []
    assert list(s.regenerate()) == []  # nothing to regenerate
    run(s, "Hello", options=GREEDY)
    assert s.engine.kv_store.holds(s.cache_owner)
    s.clear()
    assert s.turns == [] and not s.engine.kv_store.holds(s.cache_owner) and s.engine.kv_store.holders() == []


# ---- context overflow -----------------------------------------------------------------------------------
def test_context_overflow_drops_oldest_turns_with_a_notice():
    model = build_tiny("vicuna", context=256)
    eng = Engine(model)
    s = eng.session()
    opts = GenOptions(temperature=0, max_new_tokens=16)
    texts = [f"Turn {w}: what colour is the {w} square in this picture, and which one is bigger?"
             for w in ("zero", "one", "two", "three", "four", "five", "six", "seven")]
    dropped_at = None
    for k, text in enumerate(texts):
        events, turn = run(s, text, [RED] if k == 0 else [], options=opts)
        assert turn is not None, [e.text for e in events]
        kept = s.turns[s.dropped:]
        n_images = sum(len(t.images) for t in kept)
        length = len(turn.prompt_ids) + n_images * (eng.tokens_per_image - 1)
        assert length + len(turn.token_ids) <= 256
        assert turn.prompt.startswith("A chat between a curious user")  # the system part always stays
        assert turn.prompt.count("<image>") == turn.prompt_ids.count(IMAGE_TOKEN_INDEX) == n_images
        if any("outgrew" in e.text for e in kinds(events, "notice")):
            dropped_at = dropped_at if dropped_at is not None else k
            assert texts[0] not in turn.prompt
        hist = [(t.user, [RED] * len(t.images), t.assistant) for t in kept[:-1]]
        hist.append((text, [RED] * len(turn.images), None))
        assert turn.token_ids == reference(model, hist, 16)
        if dropped_at is not None and k == dropped_at + 1:  # dropped with slack: the next turn reuses the cache
            assert turn.cached_tokens > len(turn.prompt_ids) // 2
    assert dropped_at is not None and s.dropped > 0 and len(s.turns) == len(texts)


# ---- image generation ------------------------------------------------------------------------------------
@ENGINE_PATHS
def test_forced_h_prompt_renders_a_png_with_tiny_sdxl(vicuna, tiny_sdxl, tmp_path, max_active):
    from mini_gemini.imagegen import ImageGenerator, extract_image_prompt
    eng = Engine(vicuna, ImageGenerator(str(tiny_sdxl), device="cpu"), max_active=max_active)
    opts = GenOptions(temperature=0, max_new_tokens=6, steps=2, image_seed=0)
    events, turn = run(eng.session(), "Please generate an image of a cat.", generate_image=True, options=opts)
    assert " <GEN>" in turn.prompt
    assert turn.image_prompt and turn.image_prompt.strip()
    # the LLM wrote it after a forced <h>, and it is part of the answer (cut to what SDXL reads, if longer)
    written = extract_image_prompt(turn.assistant)
    assert turn.assistant.endswith("</h>") and written.startswith(turn.image_prompt)
    assert (written != turn.image_prompt) == any(n.kind == "image_prompt" and "shortened" in n for n in turn.notes)
    assert "".join(e.text for e in kinds(events, "delta")) == turn.assistant
    assert kinds(events, "progress") and not kinds(events, "error")
    (image_event,) = kinds(events, "image")
    assert image_event.text == turn.image_prompt and turn.generated_image is image_event.data
    buf = io.BytesIO()
    image_event.data.save(buf, "PNG")
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(buf).size == (64, 64)


class FakeImageGenerator:
    def __init__(self):
        self.prompts = []

    def generate(self, prompt, progress=None, **kw):
        self.prompts.append(prompt)
        progress(0.5, "half")
        return Image.new("RGB", (8, 8))


@ENGINE_PATHS
def test_model_written_h_prompt_is_used(vicuna, max_active):
    gen = FakeImageGenerator()
    with scripted(vicuna, "Sure! <h>a red cat on a mat</h>") as calls:
        events, turn = run(Engine(vicuna, gen, max_active=max_active).session(), "Draw a cat", generate_image=True,
                           options=GenOptions(temperature=0, max_new_tokens=32))
    assert gen.prompts == ["a red cat on a mat"] and turn.image_prompt == "a red cat on a mat"
    assert len(calls) == 1  # no continuation needed
    assert kinds(events, "image") and any(e.data == 0.5 for e in kinds(events, "progress"))


@ENGINE_PATHS
def test_long_image_prompts_are_cut_to_sdxl_clip_tokens_and_the_user_is_told(vicuna, tiny_sdxl, max_active):
    from mini_gemini.imagegen import ImageGenerator
    gen = ImageGenerator(str(tiny_sdxl), device="cpu")
    eng = Engine(vicuna, gen, max_active=max_active)
    long = " ".join(["a beautiful red cat on the blue sea at night, photo of a green tree"] * 8)
    opts = GenOptions(temperature=0, max_new_tokens=400, steps=1, image_seed=0)
    cases = {
        "closed by the model": (("Sure! <h>" + long + "</h>",), "Draw a cat"),
        "the user's message": (("Sure!", " "), long),  # the model writes only spaces: no prompt of its own
    }
    for name, (texts, message) in cases.items():
        with scripted(vicuna, *texts):
            events, turn = run(eng.session(), message, generate_image=True, options=opts)
        fitted = gen.fit_prompt(long)
        assert fitted.cut and turn.image_prompt == fitted.text, name  # the text actually drawn
        assert long.startswith(turn.image_prompt) and len(turn.image_prompt) < len(long)
        (note,) = [n for n in turn.notes if n.kind == "image_prompt" and "shortened" in n]
        assert f"shortened to {fitted.tokens} CLIP tokens" in note and "at most 75" in note, name
        assert note.endswith(fitted.text) and note in [e.text for e in kinds(events, "notice")]
        (image,) = kinds(events, "image")
        assert image.text == turn.image_prompt and gen.last_prompt == turn.image_prompt, name
        if message != long:
            assert long in turn.assistant  # the answer keeps what the model wrote
    with scripted(vicuna, "Sure! <h>a red cat</h>"):  # a short prompt: drawn as written, no note
        events, turn = run(eng.session(), "Draw a cat", generate_image=True, options=opts)
    assert turn.image_prompt == "a red cat" and not [n for n in turn.notes if n.kind == "image_prompt"]
    # continued after a forced <h>: the model writes at most MAX_IMAGE_PROMPT_TOKENS tokens, and what it wrote
    # is drawn as SDXL reads it
    from mini_gemini.chat.image_turn import MAX_IMAGE_PROMPT_TOKENS
    from mini_gemini.imagegen import extract_image_prompt
    with scripted(vicuna, "Sure!", " " + long + "</h>"):
        events, turn = run(eng.session(), "Draw a cat", generate_image=True, options=opts)
    written = extract_image_prompt(turn.assistant)
    assert long.startswith(written) and len(vicuna.processor.tokenizer(
        written, add_special_tokens=False).input_ids) <= MAX_IMAGE_PROMPT_TOKENS + 1
    assert turn.image_prompt == gen.fit_prompt(written).text == gen.last_prompt


@ENGINE_PATHS
def test_unclosed_h_prompt_is_continued_by_the_model(vicuna, max_active):
    gen = FakeImageGenerator()
    eng = Engine(vicuna, gen, kv_sessions=0, max_active=max_active)  # no cache: every prefill is the whole prompt
    with scripted(vicuna, "Sure! <h>a red", " cat on a mat</h> and more words") as calls:
        events, turn = run(eng.session(), "Draw a cat", generate_image=True,
                           options=GenOptions(temperature=0, max_new_tokens=64))
    # the continuation was not ended by the (tempting) stop tokens: special tokens are banned while it is written
    assert gen.prompts == ["a red cat on a mat"] and turn.assistant == "Sure! <h>a red cat on a mat</h>"
    assert "".join(e.text for e in kinds(events, "delta")) == turn.assistant
    # the continuation started from the answer as written (no second <h>)
    assert calls[1]["inputs_embeds"].shape[1] == calls[0]["inputs_embeds"].shape[1] + len(turn.token_ids) - len(
        vicuna.processor.tokenizer(" cat on a mat</h>", add_special_tokens=False).input_ids)


@ENGINE_PATHS
def test_diffusion_failure_or_missing_pipeline_keeps_the_text_answer(vicuna, tmp_path, max_active):
    from mini_gemini.imagegen import ImageGenerator

    class Broken:
        def generate(self, prompt, **kw):
            raise RuntimeError("CUDA error: device-side assert")
    for gen, note in [(ImageGenerator(str(tmp_path / "no-sdxl"), device="cpu"), "does not exist"),
                      (Broken(), "device-side assert"), (None, "not enabled")]:
        events, turn = run(Engine(vicuna, gen, max_active=max_active).session(), "Draw a dog.", generate_image=True,
                           options=GREEDY)
        assert turn is not None and not kinds(events, "error") and not kinds(events, "image")
        assert turn.assistant is not None and turn.image_prompt
        assert any(note in n for n in turn.notes) and any(note in e.text for e in kinds(events, "notice"))
        assert "text answer is kept" in turn.notes[-1]
    s = Engine(vicuna, Broken(), max_active=max_active).session()
    half_transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 128))
    run(s, "Draw a dog.", [half_transparent], generate_image=True, options=GREEDY)
    regen = [e.data for e in s.regenerate(GREEDY) if e.kind == "done"][0]
    assert sum("device-side assert" in n for n in regen.notes) == 1  # notes of the old answer are gone
    assert regen.notes[0] == "Image 1: transparency composited on white."  # notes of the message stay


@ENGINE_PATHS
def test_regenerate_follows_the_image_switch(vicuna, max_active):
    """Regenerate with the image switch now off draws nothing; switched on again, it draws."""
    gen = FakeImageGenerator()
    s = Engine(vicuna, gen, max_active=max_active).session()
    events, turn = run(s, "Draw a cat", generate_image=True, options=GREEDY)
    assert kinds(events, "image") and len(gen.prompts) == 1
    again = list(s.regenerate(GREEDY, generate_image=False))
    assert not kinds(again, "image") and len(gen.prompts) == 1
    assert s.turns[-1].generated_image is None and s.turns[-1].image_prompt is None
    assert kinds(list(s.regenerate(GREEDY, generate_image=True)), "image") and len(gen.prompts) == 2
    kept = list(s.regenerate(GREEDY))  # None: as the turn last asked
    assert kinds(kept, "image") and len(gen.prompts) == 3


def test_a_picture_sent_by_many_conversations_at_once_is_encoded_once(vicuna):
    """Eight conversations send the same new picture at the same moment: one encoding serves them all (the
    others wait for it), and every one gets the same visual tokens."""
    eng = Engine(vicuna)
    calls, gate, asked, everyone = [], threading.Event(), [], threading.Event()
    real, real_ask = vicuna.encode_images, eng.encode_image

    def slow(*a, **kw):  # the first encoding holds on until every conversation has asked for the picture
        calls.append(1)
        gate.wait(60)
        return real(*a, **kw)

    def ask(image):
        asked.append(1)
        if len(asked) == 8:
            everyone.set()
        return real_ask(image)
    vicuna.encode_images, eng.encode_image = slow, ask
    picture = Image.new("RGB", (33, 21), (10, 200, 90))
    turns = [None] * 8
    try:
        threads = [threading.Thread(target=lambda k=k: turns.__setitem__(k, run(eng.session(), "Hi", [picture],
                                                                                 options=GREEDY)[1]))
                   for k in range(8)]
        for t in threads:
            t.start()
        assert everyone.wait(60)
        gate.set()
        for t in threads:
            t.join(120)
    finally:
        vicuna.encode_images = real
    assert len(calls) == 1 and all(t is not None for t in turns)
    assert all(t.images[0].tokens is turns[0].images[0].tokens for t in turns)

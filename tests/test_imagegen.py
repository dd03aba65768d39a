"""Image generation: prompt extraction, a tiny random SDXL rendered on the CPU, and load errors."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from mini_gemini.imagegen import (DEFAULT_SDXL, NEGATIVE_PROMPT, ImageGenError, ImageGenerator, fit_to_tokens,
                                  extract_image_prompt)
from mini_gemini.testing.tiny_sdxl import IMAGE_SIZE, build_tiny_sdxl


# ------------------------------------------------------------------------------------- prompt extraction

@pytest.mark.parametrize("text, expected", [
    ("Here is a cat.", None),                                       # no tags at all
    ("", None),
    ("Sure! <h>   </h>", None),                                     # blank prompt
    ("Sure! <h></h>", None),
    ("Sure! <h> a red fox in snow </h> Enjoy.", "a red fox in snow"),
    ("<h>first</h> then <h>second\nline</h> end", "second\nline"),  # the last pair wins; newlines kept
    ("<h>done</h> and <h>cut off mid-sent", "done"),                # unclosed tail does not count
    ("<h>never closed", None),
    ("stray </h> only", None),
    ("<h>outer <h>inner</h>", "inner"),                             # nearest opening tag before the close
    ("<h>a <b>bold</b> cat</h>", "a <b>bold</b> cat"),              # other markup inside is kept
    ("<h1>Title</h1> <hr> no prompt here", None),                   # look-alike HTML tags are not <h>
])
def test_extract_image_prompt(text, expected):
    assert extract_image_prompt(text) == expected


def test_negative_prompt_is_a_list_of_defects():
    items = [s.strip() for s in NEGATIVE_PROMPT.split(",")]
    assert len(items) >= 10 and all(items)
    assert {"blurry", "watermark", "extra limbs", "low quality"} <= set(items)


# ------------------------------------------------------------------------------------------- tiny SDXL

@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl") / "sdxl", seed=0)


@pytest.fixture(scope="module")
def generator(tiny_sdxl_dir):
    return ImageGenerator(str(tiny_sdxl_dir), device="cpu").load()


def test_tiny_sdxl_layout(tiny_sdxl_dir):
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (tiny_sdxl_dir / part).is_dir(), part
    assert (tiny_sdxl_dir / "model_index.json").is_file()


def test_lazy_and_load_progress(tiny_sdxl_dir):
    gen = ImageGenerator(str(tiny_sdxl_dir), device="cpu")
    assert not gen.loaded                                            # nothing until first use
    calls = []
    gen.load(progress=lambda f, m: calls.append(f))
    assert gen.loaded and gen.dtype == torch.float32 and not gen.offloaded
    assert calls[0] == 0.0 and calls[-1] == 1.0 and calls == sorted(calls)
    assert gen.native_size() == IMAGE_SIZE
    unet = gen._pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == (gen._pipe.text_encoder.config.hidden_size
                                        + gen._pipe.text_encoder_2.config.hidden_size)


def test_generate_image_deterministic_with_progress(generator, tmp_path):
    calls = []
    img = generator.generate("a photo of a red cat", steps=3, seed=7,
                             progress=lambda f, m: calls.append((f, m)))
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    assert img.size == (IMAGE_SIZE, IMAGE_SIZE)
    fractions = [f for f, _ in calls]
    assert len(fractions) == 3 + 1                                   # one per step, then the decode
    assert all(a < b for a, b in zip(fractions, fractions[1:])) and fractions[-1] == 1.0
    assert generator.last_seed == 7

    again = generator.generate("a photo of a red cat", steps=3, seed=7)
    assert np.array_equal(np.asarray(img), np.asarray(again))
    other = generator.generate("a photo of a red cat", steps=3, seed=8)
    assert not np.array_equal(np.asarray(img), np.asarray(other))

    path = tmp_path / "out.png"
    img.save(path)
    with Image.open(path) as loaded:
        assert np.array_equal(np.asarray(loaded.convert("RGB")), np.asarray(img))


def test_size_rounded_to_multiple_of_8(generator):
    img = generator.generate("a tree", steps=2, seed=0, width=83, height=45)
    assert img.size == (80, 48)


LONG_PROMPT = " ".join(["a beautiful red cat on the blue sea at night, photo of a green tree"] * 8)


def test_fit_to_tokens_cuts_after_the_last_whole_word_that_fits():
    words = lambda text: len(text.split()) + text.count(",")  # noqa: E731 - a "tokenizer": words and commas
    assert fit_to_tokens("  a red cat  ", words, 3) == ("a red cat", 3, 3, False)
    assert fit_to_tokens("a red cat, on a mat", words, 4) == ("a red cat,", 4, 4, True)
    assert fit_to_tokens("a red cat, on a mat", words, 3) == ("a red", 2, 3, True)
    assert fit_to_tokens("abcdefgh ij", len, 5) == ("abcde", 5, 5, True)  # one long first word: cut inside it


def test_long_prompt_is_cut_to_the_clip_tokens_sdxl_reads(generator):
    tok, tok2 = generator._pipe.tokenizer, generator._pipe.tokenizer_2
    assert len(tok(LONG_PROMPT, verbose=False).input_ids) > tok.model_max_length  # diffusers would cut it
    fitted = generator.fit_prompt(LONG_PROMPT)
    assert fitted.cut and fitted.limit == tok.model_max_length - 2 == 75
    assert LONG_PROMPT.startswith(fitted.text) and LONG_PROMPT[len(fitted.text)] == " "  # whole words
    for t in (tok, tok2):
        ids = t(fitted.text, verbose=False).input_ids  # start and end marks included: nothing is left out
        assert len(ids) <= t.model_max_length and len(ids) - 2 <= fitted.tokens
    next_word = LONG_PROMPT[:LONG_PROMPT.index(" ", len(fitted.text) + 1)]
    assert len(tok(next_word, add_special_tokens=False, verbose=False).input_ids) > 75  # the longest that fits
    assert generator.fit_prompt("a red cat") == ("a red cat", 3, 75, False)  # whole-word merges
    one_word = generator.fit_prompt("x" * 300)
    assert one_word.cut and one_word.text == "x" * one_word.tokens and 0 < one_word.tokens <= 75
    # generate draws exactly the fitted text
    img = generator.generate(LONG_PROMPT, steps=2, seed=1)
    assert generator.last_prompt == fitted.text
    assert np.array_equal(np.asarray(img), np.asarray(generator.generate(fitted.text, steps=2, seed=1)))


def test_concurrent_generate_is_serialised(generator):
    results, errors = [None, None], []

    def work(i):
        try:
            results[i] = np.asarray(generator.generate("the sea at night", steps=2, seed=3))
        except Exception as e:  # pragma: no cover - reported by the assert below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert np.array_equal(results[0], results[1])                   # interleaved steps would break this


def test_failure_during_diffusion_is_an_imagegen_error(generator, monkeypatch):
    with pytest.raises(ImageGenError, match="empty"):
        generator.generate("   ")

    def broken_unet(*args, **kwargs):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(generator._pipe.unet, "forward", broken_unet)
    with pytest.raises(ImageGenError, match="simulated kernel failure"):
        generator.generate("a cat", steps=2, seed=0)
    monkeypatch.undo()
    assert generator.generate("a cat", steps=2, seed=0).size == (IMAGE_SIZE, IMAGE_SIZE)  # still usable


# ------------------------------------------------------------------------------------------ load errors

@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_missing_folder_names_download_command(tmp_path, tiny_sdxl_dir, offline):
    gen = ImageGenerator(str(tmp_path / "no-such-sdxl"), device="cpu")
    with pytest.raises(ImageGenError, match=f"hf download {DEFAULT_SDXL}"):
        gen.load()
    assert not gen.loaded
    gen.model = str(tiny_sdxl_dir)                                   # a failed load can be retried
    assert gen.load().loaded


def test_folder_without_model_index(tmp_path, offline):
    with pytest.raises(ImageGenError, match="model_index.json"):
        ImageGenerator(str(tmp_path), device="cpu").load()


def test_uncached_hub_id_offline(offline):
    gen = ImageGenerator("mini-gemini-tests/no-such-sdxl", device="cpu")
    with pytest.raises(ImageGenError, match="hf download mini-gemini-tests/no-such-sdxl"):
        gen.generate("a cat", steps=1)
    assert not gen.loaded


def test_default_model_not_cached_message_and_retry(monkeypatch, tiny_sdxl_dir):
    # What a user without the SDXL download sees (simulated, so that a cached SDXL is never loaded here).
    from diffusers import StableDiffusionXLPipeline
    from huggingface_hub.errors import LocalEntryNotFoundError
    real = StableDiffusionXLPipeline.from_pretrained.__func__
    fail = {"on": True}

    calls = []

    def fake(cls, source, **kwargs):
        calls.append(source)
        if fail["on"]:
            raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache")
        return real(cls, str(tiny_sdxl_dir), **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "from_pretrained", classmethod(fake))
    gen = ImageGenerator(device="cpu")
    assert gen.model == DEFAULT_SDXL
    with pytest.raises(ImageGenError) as info:
        gen.load()
    assert f"`hf download {DEFAULT_SDXL}`" in str(info.value) and "--sdxl" in str(info.value)
    assert not gen.loaded and "stacktrace" not in str(info.value)
    fail["on"] = False
    with pytest.raises(ImageGenError):  # nothing changed here since: the hub is not asked again
        gen.load()
    assert len(calls) == 1
    import huggingface_hub  # the download happened (`hf download`): the pipeline's index is in the cache now
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name, **kw: f"/cache/{repo}/{name}")
    assert gen.load().loaded and gen.native_size() == IMAGE_SIZE and len(calls) == 2


def test_a_failed_load_is_remembered_until_its_cause_changes(tmp_path, monkeypatch):
    """Offline with nothing cached: one clear sentence, no second trip to the hub, and the generator says
    it is unavailable; once the cause changes (the folder appears), it loads."""
    from diffusers import StableDiffusionXLPipeline
    calls = []
    real = StableDiffusionXLPipeline.from_pretrained.__func__
    monkeypatch.setattr(StableDiffusionXLPipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **kw: calls.append(a) or real(cls, *a, **kw)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = ImageGenerator("no-such-org/no-such-sdxl", device="cpu")
    with pytest.raises(ImageGenError) as first:
        hub.load()
    message = str(first.value)
    assert "hf download no-such-org/no-such-sdxl" in message and "stacktrace" not in message.lower()
    assert hub.unavailable == message and len(calls) == 1
    with pytest.raises(ImageGenError, match="not downloaded"):
        hub.load()
    assert len(calls) == 1  # remembered: the hub is not asked again while nothing changed

    folder = tmp_path / "sdxl"
    local = ImageGenerator(str(folder), device="cpu")
    with pytest.raises(ImageGenError, match="does not exist"):
        local.load()
    assert local.unavailable and not local.loaded
    build_tiny_sdxl(folder, seed=0)  # the cause changed
    assert local.unavailable is None
    assert local.load().loaded and local.failure is None


def test_an_sdxl_that_cannot_be_had_is_known_before_anyone_asks(tmp_path, monkeypatch, tiny_sdxl_dir):
    """Offline (or with the hub out of reach) and nothing in the cache: `check_source` says so without loading
    anything, and the first image request fails at once with that sentence (no trip to diffusers)."""
    import socket

    import huggingface_hub.constants
    from diffusers import StableDiffusionXLPipeline
    calls = []
    monkeypatch.setattr(StableDiffusionXLPipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **kw: calls.append(a)))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gen = ImageGenerator(DEFAULT_SDXL, device="cpu")
    why = gen.check_source()
    assert why and "is not downloaded" in why and "HF_HUB_OFFLINE" in why and f"hf download {DEFAULT_SDXL}" in why
    assert gen.unavailable == why
    with pytest.raises(ImageGenError, match="is not downloaded"):
        gen.generate("a cat", steps=1)
    assert calls == []
    # online, but the hub's host does not answer (a closed port on this machine stands for it)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{closed}")
    gen = ImageGenerator(DEFAULT_SDXL, device="cpu")
    assert "cannot be reached" in gen.check_source(timeout=2) and gen.unavailable
    # a local folder that is not there, or one that is
    assert "does not exist" in ImageGenerator(str(tmp_path / "none"), device="cpu").check_source()
    assert ImageGenerator(str(tiny_sdxl_dir), device="cpu").check_source() is None
    assert calls == []

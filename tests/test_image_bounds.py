"""Huge and odd uploads: preprocessing and heatmaps cost memory by the model's HR size, not the upload's.

The padded square is never built for large photos (mini_gemini/inputs/padding.py); these tests hold the
banded path to the literal one byte for byte (forcing it onto small images), check the documented
close-not-exact route for very tall photos on a moderate analogue, answer 16000x1 and 40000x1000
images through the engine, and measure peak memory in a fresh process.
"""
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

import mini_gemini.inputs.padding as padding
from mini_gemini.chat.engine import Engine, GenOptions
from mini_gemini.modeling.image_processing import ImageProcessor, expand_to_square
from mini_gemini.testing.tiny import build_tiny
from mini_gemini.viz import heatmap as hm

FILL = (122, 116, 104)


def noise(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def literal(img, size, fill=FILL):
    return np.asarray(expand_to_square(img.convert("RGB"), fill).resize((size, size), Image.Resampling.BICUBIC))


@pytest.fixture
def banded(monkeypatch):
    """Send every image down the banded path, with bands of a few rows / columns."""
    monkeypatch.setattr(padding, "SMALL_CANVAS", 0)
    monkeypatch.setattr(padding, "BAND_BYTES", 20_000)


# ---- exactness --------------------------------------------------------------------------------------
SHAPES = [(45, 30), (30, 45), (300, 7), (7, 300), (500, 1), (1, 500), (999, 2), (2, 999), (64, 63), (63, 64),
          (100, 64), (33, 17), (1000, 999), (640, 480), (480, 640), (3, 2), (1, 1), (64, 64)]


@pytest.mark.parametrize("size", [37, 64, 336])
def test_banded_resize_is_the_literal_one_byte_for_byte(banded, size):
    for k, (w, h) in enumerate(SHAPES):  # wide, tall, odd, up- and downscaling, side == size
        img = noise(w, h, k)
        assert np.array_equal(np.asarray(padding.padded_square_resize(img, size, FILL)), literal(img, size)), (w, h)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "1", "CMYK"])
def test_banded_resize_converts_like_the_literal_path(banded, mode):
    img = noise(300, 20).convert(mode)
    assert np.array_equal(np.asarray(padding.padded_square_resize(img, 64, FILL)), literal(img, 64))


def test_moderate_analogues_of_extreme_uploads_are_exact():
    """16000x1 and 40000x1000 in miniature, through the default thresholds' banded path."""
    for w, h, size in [(2100, 1, 336), (4100, 100, 336), (2100, 1, 64)]:
        img = noise(w, h)
        assert np.array_equal(np.asarray(padding.padded_square_resize(img, size, FILL)), literal(img, size))


def test_very_tall_photos_take_the_transposed_route_close_to_the_literal(monkeypatch):
    monkeypatch.setattr(padding, "TALL_EXACT_SIDE", 0)  # an analogue of a > 8192 px tall panorama
    for w, h, size in [(1, 2100, 336), (20, 2400, 336), (300, 2100, 336)]:
        img = noise(w, h)
        got = np.asarray(padding.padded_square_resize(img, size, FILL)).astype(int)
        diff = np.abs(got - literal(img, size))
        assert diff.max() <= 2 and diff.mean() < 0.05, (w, h, diff.max(), diff.mean())


def test_processor_views_equal_the_padded_clip_path(monkeypatch):
    """The model's tensors: new path == CLIP's processor on the literally padded image, exactly."""
    monkeypatch.setattr(padding, "SMALL_CANVAS", 0)
    for (lr, hr, grid, glob), (w, h) in itertools.product(
            [(32, 64, 1, False), (32, 64, 2, True), (336, 768, 1, False)], [(45, 30), (30, 45), (2100, 3), (3, 900)]):
        proc = ImageProcessor(lr, hr, grid, glob)
        img = noise(w, h)
        old = proc.clip(proc.pad(img), return_tensors="pt")["pixel_values"][0]
        assert torch.equal(proc(img).pixel_values_aux, old), (lr, hr, w, h)


def test_normalize_is_clips_rescale_and_normalize():
    proc = ImageProcessor(336, 768)
    img = noise(768, 768, 3)
    assert torch.equal(proc.normalize(img), proc.clip(img, return_tensors="pt")["pixel_values"][0])


# ---- heatmaps ---------------------------------------------------------------------------------------
def test_zoom_crop_without_the_canvas_matches_the_literal_crop(monkeypatch):
    layout = hm.Layout(side=4, patch=2, grid=2, global_view=True)
    for w, h in [(300, 40), (40, 300), (1000, 3), (90, 600)]:
        img = noise(w, h)
        for view, token in [(0, 0), (1, 5), (4, 15)]:
            box = hm.cell_in_photo(layout, view, token, (w, h))
            monkeypatch.setattr(hm, "SMALL_CANVAS", 1 << 40)
            ref = np.asarray(hm.padded_crop(img, box, 256))
            monkeypatch.setattr(hm, "SMALL_CANVAS", 0)
            assert np.array_equal(np.asarray(hm.padded_crop(img, box, 256)), ref), (w, h, view, token)


def test_zoom_crop_of_a_huge_cell_is_shrunk_first_and_close(monkeypatch):
    ramp = np.linspace(0, 255, 3000)
    img = Image.fromarray(np.stack([ramp[None, :].repeat(200, 0)] * 3, -1).astype(np.uint8))  # smooth 3000x200
    layout = hm.Layout(side=2, patch=2)
    box = hm.cell_in_photo(layout, 0, 2, img.size)  # a 1500 px cell into a 64 px panel: factor 11
    monkeypatch.setattr(hm, "SMALL_CANVAS", 1 << 40)
    ref = np.asarray(hm.padded_crop(img, box, 64)).astype(int)
    monkeypatch.setattr(hm, "SMALL_CANVAS", 0)
    got = np.asarray(hm.padded_crop(img, box, 64)).astype(int)
    assert np.abs(got - ref).mean() < 2.0


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_overlay_base_is_unchanged(mode):
    img = noise(120, 80).convert(mode)
    square = np.arange(16.0).reshape(4, 4)
    expect = np.asarray(img.convert("RGB").resize((60, 40), Image.Resampling.BILINEAR), dtype=np.float32)
    got = np.asarray(hm.overlay(img, square, alpha=0.0, size=(60, 40)), dtype=np.float32)
    assert np.abs(got - expect).max() <= 1


# ---- answered, and bounded ----------------------------------------------------------------------------
@pytest.mark.parametrize("hd", [False, True])
def test_extreme_aspect_uploads_are_answered(hd):
    engine = Engine(build_tiny("vicuna", hd=hd))
    for size in [(16000, 1), (40000, 1000), (1, 16000), (1000, 40000)]:
        img = Image.new("RGB", size, (20, 180, 60))
        session = engine.session()
        events = list(session.chat("What is in the image?", [img],
                                   options=GenOptions(temperature=0.0, max_new_tokens=3)))
        assert [e.kind for e in events if e.kind not in ("delta", "notice")] == ["done"], (size, events)
        hr = engine.model.processor.image_processor(img).pixel_values_aux
        if size[0] < size[1]:
            hr = hr.transpose(1, 2)
        assert torch.equal(hr[:, 0], hr[:, -1])  # padding on both sides of the photo's long axis
        if min(size) * hr.shape[1] >= max(size):  # the photo is >= 1 HR pixel thick: a band through the middle
            assert not torch.equal(hr[:, hr.shape[1] // 2], hr[:, 0])


def test_extreme_aspect_uploads_cost_bounded_memory():
    """Preprocessing + overlay + zoom for 16000x1 and 40000x1000 at MGM's 768 px HR side: peak extra RSS
    (fresh process, after the decoded image is held) far below the old path's GBs."""
    from mini_gemini.bench import bench_upload_memory
    result = bench_upload_memory(models={"768": (336, 768, 1, False)})
    assert result["upload_peak_mb"] < 100, result

"""The Gradio app: mining-map geometry (exact values), text shown literally, the start-up fallback, and
the /chat API of a real app process (tiny MGM + tiny SDXL) driven with gradio_client.

`start_app` keeps one app process per (model, SDXL) for the whole test session; test_browser.py uses it too.
"""
import atexit
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mini_gemini.viz import heatmap as hm
from mini_gemini.viz.legend import legend_height
from helpers import launch_app, stop_process

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "assets" / "examples" / "squares-1.png"
QUESTION = "What digit is in the red square?"
FOLLOW_UP = "And which colour is the largest square?"


# ---- geometry of the maps ---------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(200, 100), (101, 300), (64, 64), (7, 2)])
def test_pad_box_is_where_preprocessing_puts_the_photo(size):
    from mini_gemini.modeling.image_processing import expand_to_square
    left, top, side = hm.pad_box(*size)
    square = expand_to_square(Image.new("RGB", size, (255, 0, 0)), (0, 0, 0))
    assert square.size == (side, side)
    assert square.getbbox() == (left, top, left + size[0], top + size[1])


def test_to_photo_cuts_the_padding_away():
    m = np.array([[0, 1], [2, 3]])
    # landscape 200 x 100 sits at rows 50..150 of a 200 px square: its top half is map row 0, bottom row 1
    out = hm.to_photo(m, 200, 100)
    assert out.shape == (100, 200)
    assert (out[:50, :100] == 0).all() and (out[:50, 100:] == 1).all()
    assert (out[50:, :100] == 2).all() and (out[50:, 100:] == 3).all()
    # portrait 100 x 200 on a 4 x 4 map: the photo spans square columns 50..150 = map columns 1 and 2
    m4 = np.arange(16).reshape(4, 4)
    out = hm.to_photo(m4, 100, 200)
    assert (out[:, :50] == m4[np.arange(200) // 50, 1][:, None]).all()
    assert (out[:, 50:] == m4[np.arange(200) // 50, 2][:, None]).all()
    # another output size samples the same geometry
    assert (hm.to_photo(m, 200, 100, (20, 10)) == np.array([[0] * 10 + [1] * 10] * 5 + [[2] * 10 + [3] * 10] * 5)).all()


def test_hd_crops_and_global_are_placed_where_they_belong():
    layout = hm.Layout(side=2, patch=3, grid=2, global_view=True)
    assert layout.views == 5 and layout.choices() == (hm.CROPS, hm.GLOBAL)
    values = np.array([[10 * v + t for t in range(4)] for v in range(5)])   # view v, token t
    assert hm.assemble(values, layout, hm.GLOBAL).tolist() == [[0, 1], [2, 3]]
    assert hm.assemble(values, layout, hm.CROPS).tolist() == [[10, 11, 20, 21], [12, 13, 22, 23],
                                                              [30, 31, 40, 41], [32, 33, 42, 43]]
    plain = hm.Layout(side=2, patch=3)
    assert hm.assemble(values[:1], plain).tolist() == [[0, 1], [2, 3]]
    with pytest.raises(ValueError):
        hm.assemble(values[:1], plain, hm.GLOBAL)


def test_token_at_and_cells_agree():
    hd = hm.Layout(side=4, patch=2, grid=2, global_view=True)
    # (0.8, 0.3) on the 8 x 8 crop grid: row 2, column 6 -> top-right crop (view 2), local (2, 2) = token 10
    assert hd.token_at(0.8, 0.3, hm.CROPS) == (2, 10)
    assert hd.token_at(0.8, 0.3, hm.GLOBAL) == (0, 7)
    assert hd.cell(2, 10) == (0.75, 0.25, 0.875, 0.375)
    for layout in (hd, hm.Layout(side=3, patch=2), hm.Layout(side=2, patch=2, grid=2)):
        for which in layout.choices():
            views = [0] if which == hm.GLOBAL else range(1 if layout.global_view else 0, layout.views)
            for view in views:
                for token in range(layout.tokens):
                    u0, v0, u1, v1 = layout.cell(view, token)
                    assert layout.token_at((u0 + u1) / 2, (v0 + v1) / 2, which) == (view, token)


def test_click_maps_to_the_token_under_it():
    plain = hm.Layout(side=4, patch=2)
    # photo 200 x 100 shown at 400 x 200; the square is 200 px with the photo at rows 50..150
    assert hm.click_to_token(399, 0, (400, 200), (200, 100), plain) == (0, 7)      # row 1, column 3
    assert hm.click_to_token(0, 199, (400, 200), (200, 100), plain) == (0, 8)      # row 2, column 0
    assert hm.click_to_token(200, 100, (400, 200), (200, 100), plain) == (0, 10)   # the centre: row 2, column 2
    hd = hm.Layout(side=4, patch=2, grid=2, global_view=True)
    assert hm.click_to_token(399, 0, (400, 200), (200, 100), hd) == (2, 11)         # crop grid row 2, column 7
    assert hm.click_to_token(399, 0, (400, 200), (200, 100), hd, hm.GLOBAL) == (0, 7)
    # a token's cell in photo pixels reaches into the padding above the photo
    assert hm.cell_in_photo(plain, 0, 0, (200, 100)) == (0.0, -50.0, 50.0, 0.0)
    assert hm.cell_in_photo(plain, 0, 10, (200, 100), (400, 200)) == (200.0, 100.0, 300.0, 200.0)


def test_token_scores():
    k = 16
    uniform, onehot = np.full(k, 1 / k), np.eye(k)[3]
    assert hm.token_scores(uniform, "focus") == pytest.approx(0.0, abs=1e-9)
    assert hm.token_scores(onehot, "focus") == pytest.approx(1.0)
    assert hm.token_scores(uniform, "max weight") == pytest.approx(1 / k)
    half = np.array([0.5, 0.5, 0.0, 0.0])
    assert hm.token_scores(half, "focus") == pytest.approx(0.5)   # 1 - log 2 / log 4


def test_overlay_and_zoom_pictures():
    photo = Image.new("RGB", (200, 100), (0, 0, 0))
    hot = np.array([[0.0, 0.0], [0.0, 1.0]])
    out = hm.overlay(photo, hot, cmap="gray", alpha=1.0, size=(200, 100))
    assert out.size == (200, 100)
    assert out.getpixel((150, 75)) == (255, 255, 255) and out.getpixel((50, 25)) == (0, 0, 0)
    assert out.getpixel((150, 25)) == (0, 0, 0)   # top right: map row 0

    photo = Image.new("RGB", (64, 64), (0, 0, 255))
    photo.paste((255, 0, 0), (32, 32, 64, 64))                   # token 3's cell is red
    layout = hm.Layout(side=2, patch=2)
    z = hm.zoom(photo, layout, 0, 3, np.array([0.1, 0.2, 0.3, 0.4]), panel=64)
    assert z.size == (64 * 2 + 12, 64)
    assert z.getpixel((16, 16)) == (255, 0, 0)
    assert np.asarray(hm.zoom(photo, layout, 0, 0, np.full(4, 0.25), panel=64))[20, 20].tolist() == [0, 0, 255]


def test_npz_holds_the_raw_maps(tmp_path):
    a0, a1 = np.random.rand(1, 16, 16), np.random.rand(5, 16, 16)
    hm.save_npz(tmp_path / "maps.npz", [a0, a1], [a0[..., 0], a1[..., 0]])
    z = np.load(tmp_path / "maps.npz")
    assert sorted(z.files) == ["gain0", "gain1", "image0", "image1"]
    assert z["image1"].shape == (5, 16, 16) and z["image1"].dtype == np.float32
    assert np.allclose(z["image0"], a0)


# ---- text shown as text, options, start-up fallback ----------------------------------------------
@pytest.fixture(scope="module")
def app_module():
    """The UI's pieces under the names these tests use."""
    from types import SimpleNamespace

    from mini_gemini.resources import demo_model_path
    from mini_gemini.ui import markup, server, settings
    return SimpleNamespace(literal=markup.literal, parse_args=settings.parse_args, Loader=server.Loader,
                           DEMO_MODEL=demo_model_path())


def test_literal_shows_markup_as_typed(app_module):
    literal = app_module.literal
    assert literal('<img src=x onerror="a()"> & <script>b()</script>') == \
        '&lt;img src=x onerror="a()"> &amp; &lt;script>b()&lt;/script>'
    assert literal("use `<b>` here") == "use `<b>` here"                      # code spans stay literal
    fence = "```html\n<script>x</script>\n```"
    assert literal(f"before <i>\n{fence}\nafter <u>") == f"before &lt;i>\n{fence}\nafter &lt;u>"
    assert literal("![x](http://e/p.png)") == "!\\[x](http://e/p.png)"       # no remote picture


def test_options_come_from_the_environment(app_module, monkeypatch):
    monkeypatch.setenv("MGM_MODEL", "/models/mine")
    monkeypatch.setenv("MGM_SDXL", "none")
    monkeypatch.setenv("MGM_LOAD_IN_8BIT", "1")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    args = app_module.parse_args([])
    assert (args.model, args.sdxl, args.load_in_8bit, args.port) == ("/models/mine", "none", True, 7999)
    assert app_module.parse_args(["--model", "x/y", "--port", "1234"]).model == "x/y"


def test_missing_model_falls_back_with_a_banner(app_module, tmp_path):
    missing = tmp_path / "no-such-model"
    loader = app_module.Loader(app_module.parse_args(["--model", str(missing), "--sdxl", "none",
                                                      "--device", "cpu"]))
    loader._run()
    assert loader.engine is not None and loader.engine.imagegen is None
    assert "Could not load" in loader.banner and str(missing) in loader.banner
    assert "bundled demo model" in loader.banner


# ---- the running app --------------------------------------------------------------------------------
_APPS: dict = {}
LOGS: dict = {}  # URL of a started app -> its log file (stdout and stderr)


def start_app(model_dir, sdxl_dir, tmp_dir: Path, max_new_tokens: int = 96) -> str:
    """URL of an app process serving this model (started once per test session)."""
    key = (str(model_dir), str(sdxl_dir))
    if key not in _APPS:
        proc, _APPS[key] = launch_app(["--model", model_dir, "--sdxl", sdxl_dir, "--device", "cpu",
                                       "--max-new-tokens", max_new_tokens], tmp_dir, tmp_dir / "app.log")
        LOGS[_APPS[key]] = tmp_dir / "app.log"
        atexit.register(stop_process, proc)
    return _APPS[key]


@pytest.fixture(scope="module")
def app_url(tiny_checkpoint, tiny_sdxl, tmp_path_factory):
    return start_app(tiny_checkpoint("vicuna"), tiny_sdxl, tmp_path_factory.mktemp("app"))


def _client(url):
    from gradio_client import Client
    return Client(url, verbose=False)


def test_api_sessions_follow_ups_heatmaps_and_images(app_url):
    from gradio_client import handle_file
    alone = _client(app_url).predict(FOLLOW_UP, [], False, 0.0, api_name="/chat")
    assert alone[2] == [] and alone[1] is None

    a, b = _client(app_url), _client(app_url)
    reply, image, gallery = a.predict(QUESTION, [handle_file(str(EXAMPLE))], False, 0.0, api_name="/chat")
    assert isinstance(reply, str) and image is None
    assert [g["caption"] for g in gallery] == ["Image 1: mining focus", "Image 1: mining gain",
                                               "Image 1: where the answer looked"]
    for g in gallery:  # real pictures, in the photo's own geometry (512 x 384)
        with Image.open(g["image"]) as im:
            assert im.size == (512, 384 + legend_height(512))  # the photo's shape, and a colour bar

    # B never sees A's history: same answer as a fresh client, and no heatmaps of A's image
    b_reply, _, b_gallery = b.predict(FOLLOW_UP, [], False, 0.0, api_name="/chat")
    assert b_reply == alone[0] and b_gallery == []
    # A's follow-up is answered with its first turn (image and all) in view
    a_reply, _, a_gallery = a.predict(FOLLOW_UP, [], False, 0.0, api_name="/chat")
    assert a_reply != alone[0]
    assert [g["caption"] for g in a_gallery] == [g["caption"] for g in gallery]
    # the mining maps are the picture's (drawn once, the same file again); where the answer looked is this answer's
    assert [g["image"] for g in a_gallery[:2]] == [g["image"] for g in gallery[:2]]
    with Image.open(gallery[2]["image"]) as first, Image.open(a_gallery[2]["image"]) as second:
        assert first.size == second.size
        diff = np.abs(np.asarray(first, dtype=np.int16) - np.asarray(second, dtype=np.int16))[:384]
        assert diff.max() > 40, "the answer maps of two questions about one picture are the same"

    # generate_image=True returns a real PNG drawn by the (tiny) SDXL
    reply, image, _ = b.predict("Draw a red square on a white table.", [], True, 0.0, api_name="/chat")
    # the reply shows the prompt the LLM wrote as such, never its raw tags
    assert image is not None and "\n\nImage prompt: " in reply and "<h>" not in reply and "</h>" not in reply
    with open(image, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(image) as im:
        assert im.size == (64, 64)


def test_api_reports_bad_images_and_keeps_history(app_url, tmp_path):
    from gradio_client import handle_file
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    c = _client(app_url)
    first = c.predict("Hello", [], False, 0.0, api_name="/chat")
    with pytest.raises(Exception, match="damaged or incomplete"):
        c.predict("And this?", [handle_file(str(bad))], False, 0.0, api_name="/chat")
    # the failed turn left no trace: asking again continues from the first turn only
    again = c.predict("Hello", [], False, 0.0, api_name="/chat")
    fresh = _client(app_url)
    fresh.predict("Hello", [], False, 0.0, api_name="/chat")
    assert again[0] == fresh.predict("Hello", [], False, 0.0, api_name="/chat")[0]
    assert first[0]


def test_the_page_serves_the_examples_and_config(app_url):
    with urllib.request.urlopen(app_url + "/config", timeout=10) as r:
        config = json.load(r)
    endpoints = [d.get("api_name") for d in config["dependencies"] if d.get("api_visibility") == "public"]
    assert endpoints == ["chat"]   # the UI's own events are not part of the public API


def test_the_demo_model_asked_for_by_name_still_says_what_it_is(app_module):
    loader = app_module.Loader(app_module.parse_args(["--model", "demo", "--sdxl", "none", "--device", "cpu"]))
    loader.start().wait()
    assert loader.demo and loader.engine is not None
    assert "bundled demo model" in loader.banner and "`demo`" in loader.banner
    assert "What digit is in the red square?" in loader.banner and "YanweiLi/MGM-2B" in loader.banner


def test_mined_pixels_map_puts_each_weight_at_its_hr_position():
    """The map of mined HR pixels: token t's P x P weights land in t's own cell, candidate (r, c) at row
    r, column c of it; HD crops tile the square row-major and the global view covers it whole."""
    from mini_gemini.viz.hr_map import mined_pixels
    from mini_gemini.viz.legend import legend_height, with_colorbar
    layout = hm.Layout(side=2, patch=3, grid=2, global_view=True)
    attn = np.random.default_rng(0).random((5, 4, 9)).astype(np.float32)
    crops = mined_pixels(attn, layout)
    assert crops.shape == (12, 12) and crops.dtype == np.float32
    for view in range(1, 5):
        gi, gj = divmod(view - 1, 2)
        for token in range(4):
            ti, tj = divmod(token, 2)
            for k in range(9):
                r, c = divmod(k, 3)
                assert crops[gi * 6 + ti * 3 + r, gj * 6 + tj * 3 + c] == attn[view, token, k]
    glob = mined_pixels(attn, layout, hm.GLOBAL)
    assert glob.shape == (6, 6) and glob[3 + 2, 0 + 1] == attn[0, 2, 7]   # token 2 = row 1, col 0; k 7 = (2, 1)
    plain = hm.Layout(side=8, patch=8)                                   # the demo model: 64 x 64
    assert mined_pixels(np.full((1, 64, 64), 1 / 64, np.float32), plain).shape == (64, 64)
    with pytest.raises(ValueError):
        mined_pixels(attn[:, :, :4], layout)
    with pytest.raises(ValueError):
        mined_pixels(attn[1:], hm.Layout(side=2, patch=3, grid=2), hm.GLOBAL)
    # the legend strip: the ramp from vmin (left) to vmax (right) under the picture
    from PIL import Image
    shown = with_colorbar(Image.new("RGB", (200, 100), (0, 0, 0)), "gray", 0.0, 0.5, "mining weight")
    assert shown.size == (200, 100 + legend_height(200))
    ramp = np.asarray(shown)[100 + 7 + 7].astype(int)                    # a row through the colour bar
    assert ramp[25].sum() < ramp[100].sum() < ramp[175].sum()


# ---- a newcomer's second look ----------------------------------------------------------------------------
def test_image_generation_that_cannot_work_is_switched_off_at_start_with_its_reason(app_module, monkeypatch,
                                                                                   tmp_path):
    import huggingface_hub.constants

    from mini_gemini.ui import app
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline, nothing cached: the default SDXL cannot be had
    loader = app_module.Loader(app_module.parse_args(["--model", "demo", "--device", "cpu"])).start()
    engine = loader.wait()
    switch, why = app.image_switch(engine)
    assert switch.interactive is False and switch.value is False
    assert why.startswith("unavailable: Stable Diffusion XL") and "HF_HUB_OFFLINE" in why
    note = app.switch_note(why, "")
    assert note.visible and "Generate an image" in note.value and "hf download" in note.value


def _log_once(url: str, text: str, timeout: float = 180) -> list[str]:
    """The app's "[app ...]" log lines, once one of them holds `text` (the model loads after the page is up)."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in LOGS[url].read_text().splitlines() if line.startswith("[app")]
        if any(text in line for line in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.2)


def test_the_terminal_says_what_happens_from_the_start(newcomer_app):
    lines = _log_once(newcomer_app, "Ready: ")
    assert lines[0].endswith("Mini-Gemini Studio is starting: importing Gradio…")
    stages = ["Building the page", "Starting the web server", "The page is up", "Importing torch…",
              "Importing transformers…", "Finding ", "Loading the weights", "Checking that Stable Diffusion XL",
              "Ready: "]
    seen = [next(i for i, line in enumerate(lines) if stage in line) for stage in stages]
    assert seen == sorted(seen)  # every stage said, in order, before the next one begins


def test_the_demo_model_by_name_and_an_unavailable_sdxl_are_said_at_once(newcomer_app):
    from gradio_client import Client
    reply = Client(newcomer_app, verbose=False).predict("Draw the squares.", [], True, 0.0, api_name="/chat")[0]
    assert "Note: Image generation failed:" in reply and "does not exist" in reply
    assert "Note: This small demo model was never trained to write image prompts" in reply

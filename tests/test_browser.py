"""The app in a real browser (Debian's Chromium driven by Playwright): upload, streamed answer, mining
heatmap, click -> zoomed candidates, an inline generated image, markup shown as text, Undo and Clear.

Screenshots go to artifacts/screenshots/ (look at them: they are the check that the page looks right).
"""
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from mini_gemini.modeling.config import MGMConfig
from mini_gemini.viz import heatmap as hm
from mini_gemini.viz.legend import legend_height
from test_app import EXAMPLE, QUESTION, ROOT, start_app

SHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
XSS = 'Is this safe? <img src=x onerror="window.__xss=1"> <script>window.__xss=2</script>'
WAIT = 60_000  # ms; CI machines are slow and shared

# Records, on every change of the chat, the length of the last answer and whether diffusion progress showed.
WATCH = """() => {
  window.__lens = []; window.__drawing = false;
  const chat = document.querySelector('#mgm-chat');
  new MutationObserver(() => {
    const rows = chat.querySelectorAll('.bot-row');
    window.__lens.push(rows.length ? rows[rows.length - 1].innerText.length : 0);
    if (/Drawing: step|Generating the image/.test(chat.innerText)) window.__drawing = true;
  }).observe(chat, {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def browser_page(tiny_checkpoint, tiny_sdxl, tmp_path_factory):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Python Playwright is not installed")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium)")
    url = start_app(tiny_checkpoint("vicuna"), tiny_sdxl, tmp_path_factory.mktemp("app"))
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(WAIT)
        page.goto(url)
        page.wait_for_selector("#mgm-status :text('Ready')")
        yield page
        browser.close()


def _set_slider(page, elem_id: str, value):
    """Type a value into a slider's number box, until the slider itself shows it (the page may still be
    wiring its components up when the first keystrokes arrive)."""
    box, track = page.locator(f"#{elem_id} input[type=number]"), page.locator(f"#{elem_id} input[type=range]")
    for _ in range(20):
        box.fill(str(value))
        box.press("Enter")
        page.wait_for_timeout(150)
        if float(track.input_value()) == float(value) and float(box.input_value()) == float(value):
            return
    pytest.fail(f"could not set {elem_id} to {value}")


def _send(page, text: str, files=()):
    if files:
        page.set_input_files("#mgm-input input[type=file]", [str(f) for f in files])
        page.wait_for_selector("#mgm-input img, #mgm-input .thumbnail-item")
    before = page.locator("#mgm-chat .user-row").count()
    page.fill("#mgm-input textarea", text)
    page.press("#mgm-input textarea", "Enter")
    # the message shows (and the input locks) at the turn's start; the input unlocks at its end
    page.wait_for_function(f"document.querySelectorAll('#mgm-chat .user-row').length > {before}")
    page.wait_for_selector("#mgm-input textarea:enabled")


def test_chat_heatmap_zoom_image_and_markup(browser_page, tiny_checkpoint):
    page = browser_page
    page.click("text=Generation settings")
    _set_slider(page, "mgm-temp", 0)          # greedy: the tiny model then never stops early by chance
    _set_slider(page, "mgm-steps", 20)       # long enough for the progress to be seen

    # 1. upload, ask, and watch the answer stream in
    page.evaluate(WATCH)
    _send(page, QUESTION, [EXAMPLE])
    lens = page.evaluate("window.__lens")
    growth = sorted({n for n in lens if n > 0})
    assert len(growth) >= 3, f"the answer did not stream: lengths seen {lens}"
    assert page.locator("#mgm-chat .user-row img").count() == 1     # the image is shown in its turn
    assert QUESTION in page.locator("#mgm-chat .user-row").last.inner_text()

    # 2. the mined HR pixels of the image, in the photo's geometry, at HR-feature resolution
    cfg = MGMConfig.from_dict(json.loads((tiny_checkpoint("vicuna") / "config.json").read_text()))
    layout_px = hm.Layout.from_config(cfg).side * hm.Layout.from_config(cfg).patch
    overlay = page.locator("#mgm-overlay img")
    overlay.wait_for()
    page.wait_for_selector("#mgm-gain img")
    natural = page.evaluate("() => { const i = document.querySelector('#mgm-overlay img');"
                            " return [i.naturalWidth, i.naturalHeight]; }")
    tall = 480 + legend_height(640)
    assert natural == [640, tall]              # the photo's shape (512 x 384 drawn at 640 wide), and its colour bar
    shown = page.evaluate("() => document.querySelector('#mgm-overlay img').getBoundingClientRect().width")
    panel = page.evaluate("() => document.querySelector('#mgm-panel').getBoundingClientRect().width")
    assert shown > 0.85 * panel, (shown, panel)  # as wide as the panel
    caption = page.locator("#mgm-caption").inner_text()
    assert "high-resolution details" in caption and f"{layout_px}×{layout_px}" in caption
    page.screenshot(path=str(SHOTS / "01-answer-and-heatmap.png"), full_page=True)

    # where the answer looked: its words, the whole answer's map; a click on a word shows that word's map
    page.wait_for_selector("#mgm-answer-map img")
    page.wait_for_selector("#mgm-answer-caption :text('Where the whole answer')")
    words = page.locator("#mgm-words .token")
    assert words.count() >= 2
    whole = page.locator("#mgm-answer-map img").get_attribute("src")
    words.nth(1).click()
    page.wait_for_selector(f"#mgm-answer-caption :text('token 2 of {words.count()}')")
    assert page.locator("#mgm-answer-map img").get_attribute("src") != whole
    page.click("#mgm-again")
    page.wait_for_selector("#mgm-without-mining :text('Without mining')")
    page.wait_for_selector("#mgm-with-mining :text('With mining')")
    page.screenshot(path=str(SHOTS / "01b-where-the-answer-looked.png"), full_page=True)

    # 3. click the centre of one LR token's cell: that token's candidates appear, zoomed
    layout = hm.Layout.from_config(cfg)
    token = 2 * layout.side + 2                                    # row 2, column 2: holds part of the red square
    x0, y0, x1, y1 = hm.cell_in_photo(layout, 0, token, (512, 384), (640, 480))
    overlay.scroll_into_view_if_needed()
    box = overlay.bounding_box()
    # Gradio maps a click to natural pixels through the scale of the shown picture (never above 1)
    scale = min(box["width"] / 640, box["height"] / tall, 1)
    left = box["x"] + (box["width"] - 640 * scale) / 2
    top = box["y"] + (box["height"] - tall * scale) / 2
    page.mouse.click(left + (x0 + x1) / 2 * scale, top + (y0 + y1) / 2 * scale)
    page.wait_for_selector("#mgm-zoom img")
    page.wait_for_selector(f"#mgm-zoom-text :text('token {token})')")
    text = page.locator("#mgm-zoom-text").inner_text()
    assert f"row 2, column 2 (view 0, token {token})" in text
    weights = [float(w) for w in re.findall(r"= (0\.\d+)", text)]
    assert len(weights) == 3 and weights == sorted(weights, reverse=True)
    page.screenshot(path=str(SHOTS / "02-token-candidates.png"), full_page=True)

    # the raw maps download as .npz: image0 = (views, N, P*P) float32 weights summing to 1 per token
    with page.expect_download() as download:
        page.click("text=Download maps (.npz)")
    maps = np.load(download.value.path())
    assert maps["image0"].shape == (layout.views, layout.tokens, layout.patch ** 2)
    assert maps["image0"].dtype == np.float32 and np.allclose(maps["image0"].sum(-1), 1, atol=1e-4)
    with page.expect_download() as download:
        page.click("text=Download PNG")
    with Image.open(download.value.path()) as im:
        assert im.format == "PNG" and im.size == (640, tall)  # with its colour bar

    # 4. ask for a picture: progress while diffusing, then the image inline with the prompt the LLM wrote
    page.check("#mgm-gen input")
    page.evaluate(WATCH)
    _send(page, "Draw the squares as a painting.")
    page.wait_for_selector("#mgm-chat .bot-row img")
    size = page.evaluate("() => { const im = [...document.querySelectorAll('#mgm-chat .bot-row img')].pop();"
                         " return [im.naturalWidth, im.naturalHeight]; }")
    assert size == [64, 64]                                         # the tiny SDXL's native size
    assert "Image prompt:" in page.locator("#mgm-chat .bot-row").last.inner_text()
    assert page.evaluate("window.__drawing"), "no progress was shown while the image was drawn"
    page.screenshot(path=str(SHOTS / "03-generated-image.png"), full_page=True)

    # 5. markup in a message is shown as typed and never runs
    page.uncheck("#mgm-gen input")
    _send(page, XSS)
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert page.locator("#mgm-chat img[src='x'], #mgm-chat script").count() == 0
    shown = page.locator("#mgm-chat .user-row").last.inner_text()
    assert '<img src=x onerror="window.__xss=1">' in shown and "<script>window.__xss=2</script>" in shown
    page.screenshot(path=str(SHOTS / "04-markup-as-text.png"), full_page=True)

    # 6. Undo drops the last exchange; Clear empties the chat and the mining panel
    users = page.locator("#mgm-chat .user-row")
    n = users.count()
    page.click("#mgm-undo")
    page.wait_for_function(f"document.querySelectorAll('#mgm-chat .user-row').length === {n - 1}")
    assert "window.__xss" not in page.locator("#mgm-chat").inner_text()
    page.click("#mgm-clear")
    page.wait_for_function("document.querySelectorAll('#mgm-chat .user-row').length === 0")
    page.wait_for_selector("#mgm-overlay img", state="detached")
    assert page.evaluate("typeof window.__xss") == "undefined"
    page.screenshot(path=str(SHOTS / "05-cleared.png"), full_page=True)

    # 7. an example fills the input with its picture and question
    page.locator(".gallery-item, [data-testid='examples'] button, .example").first.click()
    page.wait_for_function(f"document.querySelector('#mgm-input textarea').value === {json.dumps(QUESTION)}")
    page.wait_for_selector("#mgm-input img")


# Records whether raw image-prompt tags ever showed in the answer being written (the rows after the last
# message) while the chat changed. (An earlier answer that asked for no image is shown as written, tags and all.)
WATCH_TAGS = """() => {
  window.__rawTags = false;
  const chat = document.querySelector('#mgm-chat');
  new MutationObserver(() => {
    const rows = [...chat.querySelectorAll('.user-row, .bot-row')];
    let i = rows.length - 1;
    while (i >= 0 && !rows[i].classList.contains('user-row')) i--;
    const answer = rows.slice(i + 1).map(r => r.innerText).join('\\n');
    if (/<\\/?h>/.test(answer)) window.__rawTags = true;
  }).observe(chat, {subtree: true, childList: true, characterData: true});
}"""


def test_errors_keep_the_panel_and_the_input_and_image_prompts_show_as_such(browser_page, tmp_path):
    page = browser_page
    page.reload()
    page.wait_for_selector("#mgm-status :text('Ready')")
    # an empty chat: nothing to stop, redo or undo
    for button in ("#mgm-stop", "#mgm-regen", "#mgm-undo", "#mgm-clear"):
        assert page.locator(button).is_disabled(), button
    page.click("text=Generation settings")
    _set_slider(page, "mgm-temp", 0)
    _set_slider(page, "mgm-steps", 2)

    # two pictures in two turns; the panel follows the newest, then the user picks Image 1
    second = ROOT / "assets" / "examples" / "squares-2.png"
    _send(page, QUESTION, [EXAMPLE])
    _send(page, QUESTION, [second])
    page.wait_for_function("document.querySelector('#mgm-image input').value === 'Image 2'")
    assert page.locator("#mgm-regen").is_enabled() and page.locator("#mgm-undo").is_enabled()
    page.click("#mgm-image input")
    page.keyboard.press("ControlOrMeta+a")
    page.keyboard.type("Image 1")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('#mgm-image input').value === 'Image 1'")
    page.wait_for_selector("#mgm-caption :text('Image 1.')")

    # a broken file: an error in the chat, and the panel and the typed text stay as they were
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a picture" * 20)
    typed = "And what about this one?"
    _send(page, typed, [broken])
    page.wait_for_selector("#mgm-chat :text('Error:')")
    page.wait_for_function(f"document.querySelector('#mgm-input textarea').value === {json.dumps(typed)}")
    assert page.locator("#mgm-input img").count() == 0  # the broken file is not offered again
    page.wait_for_timeout(1500)  # the panel's redraw after the turn has run
    assert page.locator("#mgm-image input").input_value() == "Image 1"
    assert "Image 1." in page.locator("#mgm-caption").inner_text()
    page.screenshot(path=str(SHOTS / "06-error-keeps-panel-and-text.png"), full_page=True)
    # Regenerate after the failed message redoes nothing: the earlier answer stays, the text stays
    answers = page.locator("#mgm-chat .bot-row").all_inner_texts()
    page.click("#mgm-regen") if page.locator("#mgm-regen").is_enabled() else None
    page.wait_for_timeout(1000)
    assert page.locator("#mgm-chat .bot-row").all_inner_texts() == answers
    assert page.locator("#mgm-input textarea").input_value() == typed

    # an image prompt is shown as such while streaming and after, never as raw <h> tags
    page.fill("#mgm-input textarea", "")
    page.check("#mgm-gen input")
    page.evaluate(WATCH_TAGS)
    _send(page, "Draw the squares as a painting.")
    page.wait_for_selector("#mgm-chat .bot-row img")
    last = page.locator("#mgm-chat .bot-row").last.inner_text()
    assert "Image prompt:" in last and "<h>" not in last and "</h>" not in last
    assert not page.evaluate("window.__rawTags"), "raw <h> tags showed while the answer streamed"
    page.screenshot(path=str(SHOTS / "07-image-prompt-shown-as-such.png"), full_page=True)
    page.uncheck("#mgm-gen input")


def test_a_newcomer_sees_the_demo_banner_and_why_a_switch_is_off_in_a_compact_row(browser_page, newcomer_app):
    """`--model demo` by name, offline, with an SDXL it cannot have: the banner says what the model is, the
    switch is off from the start, and the reason is a note under the controls: the buttons stay one short row."""
    page = browser_page.context.browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.set_default_timeout(WAIT)
        page.goto(newcomer_app)
        page.wait_for_selector("#mgm-status :text('Ready')")
        page.wait_for_selector("#mgm-switch-note :text('unavailable')")
        banner = page.locator("#mgm-banner").inner_text()
        assert "This is the bundled demo model" in banner and "YanweiLi/MGM-2B" in banner
        assert page.locator("#mgm-gen input").is_disabled()
        assert "does not exist" in page.locator("#mgm-switch-note").inner_text()
        boxes = [page.locator(f"#mgm-{b}").bounding_box() for b in ("stop", "regen", "undo", "clear")]
        assert len({round(b["y"]) for b in boxes}) == 1  # one row
        assert all(b["height"] < 48 for b in boxes), boxes  # short buttons, not slabs
        gen = page.locator("#mgm-gen").bounding_box()
        assert gen["height"] < 80, gen  # the switch holds no long explanation
        page.screenshot(path=str(SHOTS / "08-newcomer-offline.png"), full_page=True)
    finally:
        page.close()

"""The app's answer map (ui/answer_panel.py), its handlers called as Gradio calls them: the words of the latest answer,
the map of the whole answer and of a clicked word (the same pictures as `viz.answer_map.picture` of
`ChatSession.explain`), the method and layers, the answer without mining, and what it says with `--llm-server`."""
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from mini_gemini.chat.engine import Engine, GenOptions
from mini_gemini.viz import answer_map
from mini_gemini.viz import heatmap as hm

PHOTO = Image.fromarray((np.random.default_rng(3).random((60, 80, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def app(tiny_checkpoint):
    """The app's loader over a tiny Llama (as `python app.py --model CKPT` has it), set as the app's own."""
    from mini_gemini.ui import server
    from mini_gemini.ui.settings import parse_args
    args = parse_args(["--model", str(tiny_checkpoint("vicuna")), "--sdxl", "none", "--device", "cpu"])
    loader = server.Loader(args).start()
    loader.wait()
    saved = server.ARGS, server.LOADER
    server.ARGS, server.LOADER = args, loader
    yield loader.engine
    server.ARGS, server.LOADER = saved


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _expected(engine, entry, maps, alpha=0.8):
    from mini_gemini.ui.mining_panel import shown_size
    lay = hm.Layout.from_config(engine.model.config)
    picture, _, _ = answer_map.picture(entry.image, maps, lay, hm.CROPS, cmap="inferno", alpha=alpha,
                                       size=shown_size(entry.image))
    return np.asarray(picture)


def test_clicking_a_word_shows_where_that_word_looked(app):
    from mini_gemini.chat.explanation import token_texts
    from mini_gemini.ui.answer_panel import answer_ui, default_range, word_ui
    request = SimpleNamespace(session_hash="panel-words")
    engine = app
    session = engine.session("panel-words")
    empty = answer_ui(None, "crops", "inferno", 0.8, "attention", 0, 1, None, request)
    assert empty[0] == [] and empty[1] is None and "Ask about an image" in empty[2]
    list(session.chat("What is in the picture?", [PHOTO], options=GenOptions(temperature=0, max_new_tokens=6)))
    turn = session.turns[-1]
    assert len(turn.token_ids) >= 3
    first, last = default_range(engine, "attention")
    words, path, caption, formulas, word = answer_ui("Image 1", "crops", "inferno", 0.8, "attention", first, last,
                                                     None, request)
    pieces = token_texts(engine.detokenizer, turn.token_ids)
    assert [w[0] for w in words] == [p if p.strip() else (p or "·") for p in pieces]
    assert all(w[1] != "clicked" for w in words) and word is None
    attribution = session.explain()
    entry = session.images[0]
    whole = _png(path)
    assert np.array_equal(whole, _expected(engine, entry, attribution.images[0].answer_map().numpy()))
    assert "Where the whole answer" in caption and "Bright = where the answer drew its detail from" in caption
    assert "Σ_i r_i · a_i(pixel)" in formulas and f"layers {first}–{last}" in formulas

    # a click on the third word: that word's map, and the word marked
    chosen = word_ui(gr.SelectData(None, {"index": 2, "value": [pieces[2], None]}), request)
    words, path, caption, _, word = answer_ui("Image 1", "crops", "inferno", 0.8, "attention", first, last, chosen,
                                              request)
    assert word == chosen and [w[1] == "clicked" for w in words] == [i == 2 for i in range(len(pieces))]
    clicked = _png(path)
    assert np.array_equal(clicked, _expected(engine, entry, attribution.images[0].hr_map[2].numpy()))
    assert not np.array_equal(clicked, whole)
    assert f"token 3 of {len(pieces)}" in caption and "would have probability" in caption

    # relevancy over one layer: another attribution, its own map (the engine keeps both)
    _, path, _, formulas, _ = answer_ui("Image 1", "crops", "inferno", 0.8, "relevancy", 1, 1, chosen, request)
    relevancy = session.explain(method="relevancy", layers=(1, 2))
    assert np.array_equal(_png(path), _expected(engine, entry, relevancy.images[0].hr_map[2].numpy()))
    assert "Chefer" in formulas

    # a new answer: the old word choice no longer applies (the whole answer again)
    list(session.chat("And now?", options=GenOptions(temperature=0, max_new_tokens=4)))
    words, _, caption, _, _ = answer_ui("Image 1", "crops", "inferno", 0.8, "attention", first, last, chosen, request)
    assert all(w[1] != "clicked" for w in words) and "Where the whole answer" in caption


def test_the_answer_again_without_mining_side_by_side(app):
    from mini_gemini.ui.answer_panel import compare_reset_ui, without_mining_ui
    request = SimpleNamespace(session_hash="panel-compare")
    session = app.session("panel-compare")
    list(session.chat("What is in the picture?", [PHOTO], options=GenOptions(temperature=0, max_new_tokens=6)))
    shown = list(without_mining_ui(0.0, 0.7, 6, request))
    left, right = shown[-1]
    want = [e for e in session.answer_without_mining(options=GenOptions(temperature=0, max_new_tokens=6))][-1].text
    assert left.startswith("**With mining**") and session.turns[-1].assistant in left
    assert right.startswith("**Without mining**") and right.split("\n\n", 1)[1].startswith(want)
    assert len(session.turns) == 1
    assert compare_reset_ui() == ("", "")


def test_with_an_llm_server_the_panel_says_why_there_is_no_answer_map(app):
    from mini_gemini.ui import server
    from mini_gemini.ui.answer_panel import answer_ui, controls
    local = app.session("panel-remote-history")
    list(local.chat("What is in the picture?", [PHOTO], options=GenOptions(temperature=0, max_new_tokens=4)))
    remote = Engine(app.model, llm_server="http://127.0.0.1:9")   # its LLM "on a server": never reached here
    remote.session("panel-remote").adopt(local.turns)
    saved = server.LOADER.engine
    server.LOADER.engine = remote
    try:
        words, path, caption, _, _ = answer_ui("Image 1", "crops", "inferno", 0.8, "attention", 0, 1, None,
                                               SimpleNamespace(session_hash="panel-remote"))
        method, _, _ = controls(remote)
    finally:
        server.LOADER.engine = saved
    assert path is None and len(words) == len(local.turns[-1].token_ids)
    assert "not available with `--llm-server`" in caption and "run on the server" in caption
    assert method.choices == [("attention", "attention")] and "the LLM runs on the server" in method.info


def test_the_readme_figure_is_made_by_its_command(tmp_path):
    """`python tools/answer_map_figure.py` (the README's figure): the demo model reads the digit beside the real photo,
    and not without the mined detail."""
    import os
    import subprocess
    import sys

    from helpers import ROOT
    out = tmp_path / "figure.png"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "answer_map_figure.py"), "--out", str(out)],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith(f"{out}: '3' (") and "without mining '3'" not in run.stdout
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (1100, 620)

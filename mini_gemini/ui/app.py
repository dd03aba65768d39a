"""Mini-Gemini web demo: chat about images, see what patch info mining looked at, get images drawn.

    python app.py [--model M] [--sdxl S|none] [--device D] [--dtype T] [--load-in-4bit | --load-in-8bit]
                  [--port P] [--share] [--mcp] [--llm-server URL]

Every option also comes from the environment (MGM_MODEL, MGM_SDXL, MGM_DEVICE, MGM_DTYPE, MGM_TEMPLATE,
MGM_LOAD_IN_4BIT, MGM_LOAD_IN_8BIT, MGM_MAX_NEW_TOKENS, MGM_SHARE, MGM_MCP_SERVER, MGM_LLM_SERVER, and Gradio's
GRADIO_SERVER_NAME / GRADIO_SERVER_PORT / GRADIO_MCP_SERVER). The page is up at once; the model loads in
the background with a progress line.
If the requested model cannot be had, the app runs on the bundled demo model and says why in a banner.

The app talks to the model only through the engine's public API (`mini_gemini.chat`); every browser tab and every API client
gets its own conversation (keyed by Gradio's session hash). API: the named endpoint `/chat`; with
`--mcp`, agents get the MCP tool `chat_about_image` (mini_gemini.ui.mcp); OpenAI clients `/v1/chat/completions`
(mini_gemini.serve).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from typing import TYPE_CHECKING

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home unless asked for
import gradio as gr

from ..inputs.images import MAX_FILE_BYTES
from ..resources import examples_dir
from ..serve.openai_api import mount_in_app
from ..viz import heatmap as hm
from . import mcp, server
from .answer_panel import (
    COLOURS,
    NOTHING,
    answer_ui,
    compare_reset_ui,
    controls,
    method_layers_ui,
    whole_answer_ui,
    without_mining_ui,
    word_ui,
)
from .api import CHAT_SHAPE, api_chat
from .console import log_to_console
from .markup import code, literal
from .mining_panel import MAPS, MINED, click_ui, panel_after_turn, panel_ui
from .params import CheckedBlocks
from .server import Loader, end_session
from .settings import CACHE_SWEEP_S, CMAPS, CSS, RED_SQUARE, TURNS_AT_ONCE, parse_args
from .turns import buttons_ui, chat_ui, clear_ui, regenerate_ui, stop_ui, turn_shown_ui, undo_ui

if TYPE_CHECKING:
    from ..chat import Engine


def model_info(engine: Engine | None) -> str:
    if engine is None:
        return ""
    m, c = engine.model, engine.model.config
    layout = hm.Layout.from_config(c)
    hd = f"HD: 2×2 crops of {c.lr_size} px + a global view" if c.image_grid > 1 else f"{c.lr_size} px"
    gen = engine.imagegen
    sdxl = "off" if gen is None else f"{code(gen.model)} " + (
        "(ready)" if gen.loaded else "(**unavailable**, see the note under the switches)" if gen.unavailable
        else "(loads on first use)")
    return (f"**Model** {literal(str(m.name_or_path))} · LLM family **{c.family}** · template "
            f"`{m.processor.template.name}`  \n"
            f"**LR** {hd} → {layout.side}×{layout.side} tokens per view · **HR** {c.image_size_aux} px → "
            f"{layout.patch}×{layout.patch} candidates per LR token  \n"
            f"**Visual tokens per image** {engine.tokens_per_image} ({c.views} view{'s' if c.views > 1 else ''}) · "
            f"{m.device} · {str(m.dtype).replace('torch.', '')} · **image generation** {sdxl}")


def watch_loading(progress=gr.Progress()):
    """Progress line while the model loads; then the banner, the model panel, the HD view switch, the two
    switches with the note saying why one is off, and the answer map's method and layer range."""
    while not server.LOADER.done.wait(0.3):
        progress(server.LOADER.fraction, desc=server.LOADER.stage)
        yield (f"Loading: {literal(server.LOADER.stage)} ({time.monotonic() - server.LOADER.started:.0f} s)",
               *(gr.skip() for _ in range(9)))
    engine = server.LOADER.engine
    if engine is None:
        yield (f"**Error:** {literal(server.LOADER.failure)}", gr.Markdown(visible=False), "",
               *(gr.skip() for _ in range(7)))
        return
    layout = hm.Layout.from_config(engine.model.config)
    (gen, gen_why), (ocr, ocr_why) = image_switch(engine), ocr_switch(engine, demo=server.LOADER.demo)
    yield (f"Ready: {literal(str(engine.model.name_or_path))}",
           gr.Markdown(server.LOADER.banner, visible=bool(server.LOADER.banner)), model_info(engine),
           gr.Radio(choices=list(layout.choices()), value=hm.CROPS, visible=layout.global_view),
           gen, ocr, switch_note(gen_why, ocr_why), *controls(engine))


def ocr_switch(engine: Engine, demo: bool) -> tuple[gr.Checkbox, str]:
    """"Read text (OCR)": on for real checkpoints, off for the demo model (it was not trained with OCR text,
    and OCR would read its digits for it); unavailable, with the install line, without the OCR extra. Returns
    the switch and why it is off ("" when it is on offer as usual)."""
    why = engine.ocr_unavailable_reason()
    if why:
        return gr.Checkbox(value=False, interactive=False), f"unavailable: {why}"
    return gr.Checkbox(value=not demo, interactive=True), "off for the demo model: it reads its digits itself" \
        if demo else ""


def image_switch(engine: Engine) -> tuple[gr.Checkbox, str]:
    """The "Generate an image" switch as image generation stands: off while it cannot work (not configured,
    Stable Diffusion XL neither cached nor reachable, or its last load failed and nothing has changed since).
    Returns the switch and why it is off ("" when it can be used)."""
    gen = engine.imagegen
    if gen is None:
        return gr.Checkbox(value=False, interactive=False), "off: start the app with --sdxl MODEL to enable it"
    why = gen.unavailable
    if why:
        return gr.Checkbox(value=False, interactive=False), f"unavailable: {why}"
    return gr.Checkbox(interactive=True), ""


def switch_note(gen_why: str, ocr_why: str) -> gr.Markdown:
    """One small line under the switches and buttons for each switch that is off, saying why (in the
    switches' own `info` it would stretch the whole row into tall columns)."""
    lines = [f"**{name}:** {literal(why)}" for name, why in (("Generate an image", gen_why),
                                                              ("Read text (OCR)", ocr_why)) if why]
    return gr.Markdown("  \n".join(lines), visible=bool(lines))


def imagegen_state_ui():
    """After a turn: the switch, its note and the model panel follow what image generation can do now."""
    engine = server.LOADER.engine
    if engine is None:
        return gr.skip(), gr.skip(), gr.skip()
    gen, gen_why = image_switch(engine)
    return gen, model_info(engine), switch_note(gen_why, ocr_switch(engine, demo=server.LOADER.demo)[1])


# ---- the page -------------------------------------------------------------------------------------
def _examples() -> list:
    return [{"text": RED_SQUARE, "files": [str(p)]} for p in sorted(examples_dir().glob("*.png"))]


def build_demo() -> gr.Blocks:
    age = server.ARGS.cache_max_age  # Gradio deletes its cached files older than this (a client's go when it leaves)
    with CheckedBlocks(title="Mini-Gemini", shapes={"chat": CHAT_SHAPE, mcp.TOOL_NAME: mcp.TOOL_SHAPE},
                       delete_cache=(min(age, CACHE_SWEEP_S), age) if age > 0 else None) as demo:
        gr.Markdown("## Mini-Gemini — chat with images, see what patch info mining looked at")
        banner = gr.Markdown(visible=False, elem_id="mgm-banner")
        status = gr.Markdown("Loading the model…", elem_id="mgm-status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                chatbot = gr.Chatbot(height=520, label="Chat", sanitize_html=True, render_markdown=True,
                                     feedback_options=None, elem_id="mgm-chat",
                                     buttons=["copy"], placeholder="Upload an image (or paste one) and ask about it.")
                textbox = gr.MultimodalTextbox(file_types=["image"], file_count="multiple", sources=["upload"],
                                               placeholder="Ask about an image: type, upload or paste…",
                                               show_label=False, elem_id="mgm-input")
                # the switches, then the buttons, each on a row of its own; why a switch is off goes in a note
                # below them (as a switch's `info` it stretched the buttons into tall slabs)
                with gr.Row(equal_height=True, elem_id="mgm-switches"):
                    gen_cb = gr.Checkbox(label="Generate an image", value=False, elem_id="mgm-gen", min_width=150)
                    ocr_cb = gr.Checkbox(label="Read text (OCR)", value=False, interactive=False, elem_id="mgm-ocr",
                                         min_width=150)
                with gr.Row(equal_height=True, elem_id="mgm-buttons"):
                    stop_btn = gr.Button("Stop", size="sm", interactive=False, elem_id="mgm-stop", min_width=70)
                    regen_btn = gr.Button("Regenerate", size="sm", interactive=False, elem_id="mgm-regen", min_width=70)
                    undo_btn = gr.Button("Undo", size="sm", interactive=False, elem_id="mgm-undo", min_width=70)
                    clear_btn = gr.Button("Clear", size="sm", interactive=False, elem_id="mgm-clear", min_width=70)
                switches_note = gr.Markdown(visible=False, elem_id="mgm-switch-note")
                with gr.Accordion("Generation settings", open=False):
                    temperature = gr.Slider(0.0, 1.5, value=0.2, step=0.05, label="Temperature (0 = greedy)",
                                            elem_id="mgm-temp")
                    top_p = gr.Slider(0.05, 1.0, value=0.7, step=0.05, label="Top-p")
                    max_new = gr.Slider(16, 2048, value=server.ARGS.max_new_tokens, step=16, label="Max new tokens",
                                        elem_id="mgm-max-new")
                    steps = gr.Slider(1, 60, value=30, step=1, label="Image generation steps (SDXL)",
                                      elem_id="mgm-steps")
                gr.Examples(_examples(), inputs=textbox, label="Examples (small digits in coloured squares)")
                model_md = gr.Markdown(elem_id="mgm-model")
            with gr.Column(scale=1, elem_id="mgm-panel"):
                with gr.Row():
                    image_dd = gr.Dropdown(choices=[], value=None, label="Image", elem_id="mgm-image", scale=1)
                    which = gr.Radio([hm.CROPS], value=hm.CROPS, label="Map of", visible=False, scale=1)
                    cmap = gr.Dropdown(CMAPS, value="inferno", label="Colormap", scale=1)
                    opacity = gr.Slider(0.0, 1.0, value=0.8, step=0.05, label="Opacity (top of the scale)", scale=1)
                gr.Markdown("### Where the answer looked")
                words = gr.HighlightedText(label="The latest answer: click a word", show_legend=True,
                                           show_inline_category=False, combine_adjacent=False, color_map=COLOURS,
                                           interactive=False, elem_id="mgm-words")
                with gr.Row(equal_height=True):
                    whole_btn = gr.Button("Whole answer", size="sm", elem_id="mgm-whole", scale=0, min_width=120)
                    method = gr.Radio(["attention"], value="attention", label="Method", elem_id="mgm-method", scale=2)
                    first_layer = gr.Slider(0, 1, value=0, step=1, label="From LLM layer", elem_id="mgm-first", scale=1)
                    last_layer = gr.Slider(0, 1, value=0, step=1, label="To LLM layer", elem_id="mgm-last", scale=1)
                answer_img = gr.Image(show_label=False, type="filepath", format="png", interactive=False,
                                      elem_id="mgm-answer-map", buttons=["fullscreen", "download"])
                answer_md = gr.Markdown(NOTHING, elem_id="mgm-answer-caption")
                with gr.Accordion("How this map is computed", open=False):
                    answer_how = gr.Markdown(elem_id="mgm-answer-how")
                again_btn = gr.Button("Answer again without mining", size="sm", elem_id="mgm-again")
                with gr.Row(equal_height=False):
                    with_md = gr.Markdown(elem_id="mgm-with-mining")
                    without_md = gr.Markdown(elem_id="mgm-without-mining")
                gr.Markdown("### What patch info mining picked out (whatever was asked)")
                metric = gr.Radio(list(MAPS), value=MINED, label="Mining map", elem_id="mgm-metric")
                gr.Markdown("**What the model mined** (click a point to inspect it)")
                overlay_img = gr.Image(show_label=False, type="pil", format="png", interactive=False,
                                       elem_id="mgm-overlay", buttons=["fullscreen", "download"])
                gr.Markdown("**How much each token changed** (mining gain)")
                gain_img = gr.Image(show_label=False, type="pil", format="png", interactive=False,
                                    elem_id="mgm-gain", buttons=["fullscreen", "download"])
                caption = gr.Markdown("Send an image to see where patch info mining looked.", elem_id="mgm-caption")
                with gr.Accordion("How these maps are computed", open=False):
                    mining_how = gr.Markdown(elem_id="mgm-mining-how")
                gr.Markdown("**The clicked token:** its part of the photo | the weights of its high-resolution "
                            "candidates")
                zoom_img = gr.Image(show_label=False, type="pil", format="png", interactive=False,
                                    elem_id="mgm-zoom", height=300)
                zoom_md = gr.Markdown(elem_id="mgm-zoom-text")
                with gr.Row():
                    dl_png = gr.DownloadButton("Download PNG", interactive=False, size="sm")
                    dl_npz = gr.DownloadButton("Download maps (.npz)", interactive=False, size="sm")
        selected = gr.State(None)
        word = gr.State(None)

        # The API endpoint's own (hidden) inputs and outputs.
        with gr.Row(visible=False):
            api_msg = gr.Textbox(label="message")
            # no file_types: Gradio would refuse other files with a traceback in the log; the engine checks them
            api_files = gr.File(label="images", file_count="multiple", type="filepath")
            api_gen = gr.Checkbox(label="generate_image")
            api_temp = gr.Number(label="temperature", value=0.2)  # no bounds: api_chat checks (Gradio: traceback)
            api_reply = gr.Textbox(label="reply")
            api_image = gr.Image(label="generated image", type="filepath", format="png")
            api_gallery = gr.Gallery(label="heatmaps", format="png")
            api_btn = gr.Button("api")

        # Turns share one queue. The engine writes up to 8 answers at once, a token each in turn (the one
        # after waits with its place shown); past TURNS_AT_ONCE Gradio's queue shows the place instead.
        model = dict(concurrency_id="model", concurrency_limit=TURNS_AT_ONCE, api_visibility="private")
        private = dict(api_visibility="private")
        panel_in = [image_dd, which, metric, cmap, opacity, selected]
        panel_out = [image_dd, overlay_img, gain_img, caption, mining_how, zoom_img, zoom_md, dl_png, dl_npz, selected]
        answer_in = [image_dd, which, cmap, opacity, method, first_layer, last_layer, word]
        answer_out = [words, answer_img, answer_md, answer_how, word]
        settings = [temperature, top_p, max_new, steps]

        demo.load(watch_loading, None, [status, banner, model_md, which, gen_cb, ocr_cb, switches_note, method,
                                        first_layer, last_layer],
                  concurrency_limit=None,
                  show_progress="minimal", **private)
        history_buttons = [regen_btn, undo_btn, clear_btn]
        sent = textbox.submit(chat_ui, [textbox, gen_cb, ocr_cb, *settings], [chatbot, textbox, stop_btn],
                              show_progress="hidden", **model)
        # after a turn or an edit: the mining panel (it picks the image), then the answer map of that image
        sent.then(turn_shown_ui, None, history_buttons, **private)  # also tells an Undo waiting for it
        sent.then(compare_reset_ui, None, [with_md, without_md], **private)
        sent.then(panel_after_turn, panel_in, panel_out, **private).then(answer_ui, answer_in, answer_out, **model)
        sent.then(imagegen_state_ui, None, [gen_cb, model_md, switches_note], **private)
        again = regen_btn.click(regenerate_ui, [gen_cb, ocr_cb, *settings], [chatbot, textbox, stop_btn],
                                show_progress="hidden", **model)
        again.then(turn_shown_ui, None, history_buttons, **private)
        again.then(compare_reset_ui, None, [with_md, without_md], **private)
        again.then(panel_ui, panel_in, panel_out, **private).then(answer_ui, answer_in, answer_out, **model)
        again.then(imagegen_state_ui, None, [gen_cb, model_md, switches_note], **private)
        stop_btn.click(stop_ui, None, None, queue=False, **private)
        undone = undo_btn.click(undo_ui, None, chatbot, **private)
        undone.then(compare_reset_ui, None, [with_md, without_md], **private)
        undone.then(panel_ui, panel_in, panel_out, **private).then(answer_ui, answer_in, answer_out, **model)
        undone.then(buttons_ui, None, history_buttons, **private)
        cleared = clear_btn.click(clear_ui, None, [chatbot, selected], **private)
        cleared.then(compare_reset_ui, None, [with_md, without_md], **private)
        cleared.then(panel_ui, panel_in, panel_out, **private).then(answer_ui, answer_in, answer_out, **model)
        cleared.then(buttons_ui, None, history_buttons, **private)
        for control in (image_dd, which, cmap):
            control.input(panel_ui, panel_in, panel_out, **private).then(answer_ui, answer_in, answer_out, **model)
        metric.input(panel_ui, panel_in, panel_out, **private)
        opacity.release(panel_ui, panel_in, panel_out, **private).then(answer_ui, answer_in, answer_out, **model)
        overlay_img.select(click_ui, panel_in[:-1], [overlay_img, zoom_img, zoom_md, selected], **private)
        # the answer map: a word, the whole answer, the method (its default layers) or the layers changed
        words.select(word_ui, None, word, **private).then(answer_ui, answer_in, answer_out, **model)
        whole_btn.click(whole_answer_ui, None, word, **private).then(answer_ui, answer_in, answer_out, **model)
        method.input(method_layers_ui, method, [first_layer, last_layer], **private).then(
            answer_ui, answer_in, answer_out, **model)
        for layer in (first_layer, last_layer):
            layer.release(answer_ui, answer_in, answer_out, **model)
        again_btn.click(without_mining_ui, [temperature, top_p, max_new], [with_md, without_md],
                        show_progress="minimal", **model)
        # preprocess=False: api_chat takes the values as sent (checked by CheckedBlocks, uploads by Gradio); gr.File's
        # own preprocessing would leave an empty temp file in Gradio's cache for every image, forever
        api_btn.click(api_chat, [api_msg, api_files, api_gen, api_temp], [api_reply, api_image, api_gallery],
                      api_name="chat", concurrency_id="model", concurrency_limit=TURNS_AT_ONCE, preprocess=False,
                      api_description="Chat turn: (message, images, generate_image, temperature) -> "
                                      "(reply, generated image or None, gallery of mining heatmaps). Notes "
                                      "about the turn end the reply, each a paragraph starting 'Note: '.")
        if server.ARGS.mcp:
            mcp.add_tool()  # the agents' endpoint, only when it is served
        demo.unload(end_session)
    return demo


def main(argv=None):
    """Parse the options, start loading the model in the background, and serve the page (blocks)."""
    log = log_to_console()
    server.ARGS = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a clean exit: the temp folder is removed
    server.LOADER = Loader(server.ARGS)  # started once the page is up
    log.info("Building the page…")
    demo = server.BLOCKS = build_demo()
    demo.queue(default_concurrency_limit=8, max_size=64)
    gr.set_static_paths([str(examples_dir())])
    launch = dict(server_name=server.ARGS.host, server_port=server.ARGS.port, share=server.ARGS.share,
                  max_file_size=MAX_FILE_BYTES, allowed_paths=[str(examples_dir())], css=CSS,
                  footer_links=["api", "gradio"])
    log.info("Starting the web server…")
    if server.ARGS.mcp:
        mcp.serve(demo, **launch)
    else:
        demo.launch(mcp_server=False, prevent_thread_lock=True, **launch)
    # the OpenAI-compatible endpoint at /v1 on the same port, over the same engine (503 while it loads)
    mount_in_app(demo.app, server.LOADER, server.ARGS)
    # The page is up: now import torch and load the model (in the background), the page shows progress.
    log.info("The page is up (its address is above); the model loads in the background:")
    server.LOADER.start()
    demo.block_thread()


if __name__ == "__main__":
    main()

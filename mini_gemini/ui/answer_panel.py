"""Where the answer looked: the latest answer's words (click one, or "whole answer"), its map over the photo at
high resolution (`ChatSession.explain` carried down through the mining weights), the method and layer range, and
the same question answered again without mining, side by side.

The attribution runs once per answer, method and layer range (the engine keeps the last few), so clicking
through the words costs a picture each, not a pass of the model.
"""
from __future__ import annotations

import logging

import gradio as gr
import numpy as np

from ..errors import AttributionUnavailable, SessionBusyError
from ..viz import answer_map
from ..viz import heatmap as hm
from . import server
from .markup import literal
from .mining_panel import entry_of, layout, png_files, shown_size, which_of
from .server import session_of
from .turns import gen_options
from .zerogpu import explain_turn, unmined_events

log = logging.getLogger(__name__)
METHOD_NAMES = ("attention", "relevancy")
# Relevancy takes a backward pass per answer token (modeling/attribution.py, `answer_relevancy`: measured 11x
# one prefill for a 4-token answer on MGM-2B's shapes, ~4 GB for the whole of it): offered for LLMs up to
# MGM-2B's size at one view of 336 px, for answers up to this many tokens.
RELEVANCY_MAX_PARAMS = 3.0e9
RELEVANCY_MAX_TOKENS = 48
COLOURS = {"clicked": "#3b82f6", "owed to mining": "#f59e0b"}   # the words' highlight colours, by what they mean
OWED = 0.5   # a word "owed to mining": its probability at least halves without the mined detail
NOTHING = "Ask about an image: once the model has answered, its words show here. Click one to see where it looked."


# ---- what the model affords ---------------------------------------------------------------------------------
def relevancy_unavailable(engine) -> str:
    """Why relevancy is not offered for this model ("" when it is)."""
    cfg = engine.model.config
    if engine.llm_server is not None:
        return "the LLM runs on the server"
    if cfg.views > 1:
        return f"HD models see {cfg.views} views: relevancy's per-word backward pass would be too slow"
    from ..modeling.quantization import is_quantized
    if is_quantized(engine.model):
        return "int8 layers (--quantize int8) have no backward pass"
    llm = engine.model.llm
    size = sum(p.numel() for p in llm.parameters()) + sum(b.numel() for b in llm.buffers())
    if size > RELEVANCY_MAX_PARAMS:
        return f"an LLM of {size / 1e9:.1f} B parameters is too large for its per-word backward pass"
    return ""


def layer_count(engine) -> int:
    return int(engine.model.config.llm.num_hidden_layers)


def default_range(engine, method: str) -> tuple[int, int]:
    """The default layers (first, last), both included, for `method` (`modeling.attribution.default_layers`)."""
    from ..modeling.attribution import default_layers
    start, stop = default_layers(layer_count(engine), method)
    return start, stop - 1


def controls(engine) -> tuple[gr.Radio, gr.Slider, gr.Slider]:
    """The method switch and the layer sliders for this model (after it loaded)."""
    why = relevancy_unavailable(engine)
    n = layer_count(engine)
    first, last = default_range(engine, "attention")
    method = gr.Radio(choices=list(METHOD_NAMES) if not why else ["attention"], value="attention",
                      info="relevancy: attention × its gradient (Chefer et al.), slower" if not why else
                      f"relevancy not offered: {why}")
    return (method, gr.Slider(minimum=0, maximum=n - 1, value=first, step=1, interactive=n > 1),
            gr.Slider(minimum=0, maximum=n - 1, value=last, step=1, interactive=n > 1))


def method_layers_ui(method):
    """The method changed: the layer range goes to that method's default."""
    engine = server.LOADER.engine
    if engine is None:
        return gr.skip(), gr.skip()
    first, last = default_range(engine, method if method in METHOD_NAMES else "attention")
    return first, last


# ---- the words ----------------------------------------------------------------------------------------------
def turn_key(turn) -> tuple:
    """What a word choice belongs to: this answer of this turn (a regenerated answer is another one)."""
    return id(turn), tuple(turn.token_ids)


def words_value(pieces: list[str], clicked: int | None, owed: list[bool]) -> list[tuple[str, str | None]]:
    """The answer as (token text, category) spans for the clickable words: the clicked one, the ones owed to
    mining, the rest plain. A token without text of its own (inside a character) shows as "·"."""
    out = []
    for i, (text, o) in enumerate(zip(pieces, owed)):
        out.append((text if text.strip() else (text or "·"), "clicked" if i == clicked else
                    "owed to mining" if o else None))
    return out


# ---- the map ------------------------------------------------------------------------------------------------
def _layers(first, last, n: int) -> tuple[int, int]:
    lo, hi = sorted((int(round(float(first))), int(round(float(last)))))
    lo, hi = min(max(lo, 0), n - 1), min(max(hi, 0), n - 1)
    return lo, hi + 1


def answer_ui(label, which, cmap, alpha, method, first, last, word, request: gr.Request):
    """Re-draw the answer map: after a turn, or when the image, view, colours, method, layers or word changed.

    Outputs: the words, the map, its caption, the formulas, the word choice."""
    session, ex = session_of(request)
    engine = server.LOADER.engine
    turn = session.turns[-1] if session.turns else None
    if turn is None or not turn.token_ids:
        return [], None, NOTHING, "", None
    pieces = engine_pieces(engine, turn.token_ids)
    key = turn_key(turn)
    clicked = word[1] if word and tuple(word[0]) == key and 0 <= word[1] < len(pieces) else None
    if engine.llm_server is not None:
        return (words_value(pieces, None, [False] * len(pieces)), None,
                "**Where the answer looked is not available with `--llm-server`:** it reads the attention of the "
                "LLM's layers, and those run on the server, which sends back only the words. The mining maps below "
                "are computed here and still work, and so does “Answer again without mining”.", "", None)
    method = method if method in METHOD_NAMES and not (method == "relevancy" and relevancy_unavailable(engine)) \
        else "attention"
    note = ""
    if method == "relevancy" and len(turn.token_ids) > RELEVANCY_MAX_TOKENS:
        method, note = "attention", (f" (Relevancy is offered for answers of up to {RELEVANCY_MAX_TOKENS} tokens, "
                                     f"this one has {len(turn.token_ids)}: shown with attention.)")
    layers = _layers(first, last, layer_count(engine))
    try:
        attribution = explain_turn(session.id, session.turns, method, layers)
    except (AttributionUnavailable, SessionBusyError, ValueError) as e:
        return words_value(pieces, clicked, [False] * len(pieces)), None, literal(str(e)), "", word
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: the chat and the mining maps stay usable
        log.exception("the answer could not be attributed")
        return (words_value(pieces, clicked, [False] * len(pieces)), None,
                f"Where the answer looked could not be computed ({literal(type(e).__name__)}: {literal(str(e))}).",
                "", word)
    owed = owed_to_mining(attribution)
    words = words_value(pieces, clicked, owed)
    entry, k = entry_of(session, label)
    seen = session.images_seen(turn)
    at = next((i for i, im in enumerate(seen) if im is entry), None)
    if entry is None or at is None:
        why = "There is no image in this conversation." if entry is None else \
            (f"The latest answer did not see Image {k} (it was left out to fit the model's context): choose another "
             "image.")
        return words, None, why, "", word
    lay = layout()
    which = which_of(lay, which)
    image = attribution.images[at]
    maps = image.answer_map(None if clicked is None else [clicked]).numpy()
    size = shown_size(entry.image)
    picture, shown, (_, top) = answer_map.picture(entry.image, maps, lay, which, cmap=cmap, alpha=float(alpha),
                                                  size=size, boxes=ocr_boxes(entry))
    (path,) = png_files(ex, [(f"answer-map-image{k}", picture)])
    ex.keep_render("answer", [path])
    caption = answer_caption(k, pieces, clicked, attribution, at, lay, which, entry.image.size, maps, top) + note
    return words, str(path), caption, answer_formulas(method, attribution.layers, lay), word


def engine_pieces(engine, ids) -> list[str]:
    from ..chat.explanation import token_texts
    return token_texts(engine.detokenizer, ids)


def owed_to_mining(attribution) -> list[bool]:
    """Per answer token: its probability at least halves without the mined detail (all False without the
    ablation)."""
    if attribution.prob_no_mining is None:
        return [False] * len(attribution.answer_ids)
    p, q = attribution.prob.numpy(), attribution.prob_no_mining.numpy()
    return [bool(b <= OWED * a) for a, b in zip(p, q)]


def ocr_boxes(entry) -> list:
    return [line.box for line in entry.ocr.lines] if entry.ocr is not None and entry.ocr.lines else []


def _quote(text: str) -> str:
    return "“" + literal(text.strip() or text) + "”"


def answer_caption(k: int, pieces: list[str], clicked: int | None, attribution, at: int, lay: hm.Layout,
                   which: str, photo_size, maps: np.ndarray, top: float) -> str:
    """What the answer map shows, in plain words first."""
    image = attribution.images[at]
    tokens = range(len(pieces)) if clicked is None else [clicked]
    mass = float(image.relevance[list(tokens)].sum((1, 2)).mean())
    who = "the whole answer (all its words together)" if clicked is None else \
        f"the word {_quote(pieces[clicked])} (token {clicked + 1} of {len(pieces)})"
    where = answer_map.top_regions(maps, lay, *photo_size)
    view = {hm.CROPS: "the four HD crops, each over its quarter of the picture" if lay.grid > 1 else
            "the whole picture", hm.GLOBAL: "the global view over the whole picture"}[which]
    share = (f"It gave {round(100 * mass)} % of its attention to Image {k}." if attribution.method == "attention" else
             f"Its relevancy on Image {k} sums to {mass:.3g}.")
    lines = [f"**Where {who} looked in Image {k}.** Bright = where the answer drew its detail from; where the "
             f"photo shows through, it drew on nothing there. {share}" + (f" Most in: {where}." if where else ""),
             f"Map of {view}; the colours run from 0 to {top:.3g} times an even spread (the brightest "
             f"{100 - answer_map.TOP_PERCENTILE:g} % of pixels get the top colour)."]
    if attribution.prob_no_mining is not None:
        p, q = attribution.prob.numpy(), attribution.prob_no_mining.numpy()
        if clicked is None:
            owed = sum(owed_to_mining(attribution))
            ratio = float(np.median(q / np.maximum(p, 1e-12)))
            lines.append(f"**Without the mined detail** the answer's words would be {ratio:.2g}× as likely (median "
                         f"over its {len(p)} token{'s' if len(p) != 1 else ''}); {owed} of {len(p)} (orange) lose half "
                         "their probability or more.")
        else:
            lines.append(f"**Without the mined detail** {_quote(pieces[clicked])} would have probability "
                         f"{_prob(q[clicked])} instead of {_prob(p[clicked])}.")
    return "\n\n".join(lines)


def _prob(p: float) -> str:
    return f"{p:.2f}" if p >= 0.095 else f"{p:.2g}"


def answer_formulas(method: str, layers: tuple[int, int], lay: hm.Layout) -> str:
    """How the answer map is computed (the fold under the caption)."""
    p = lay.patch
    how = ("r_i = the attention from the position that wrote the word to visual token i, averaged over the heads "
           f"and over LLM layers {layers[0]}–{layers[1] - 1} (the middle of the network, where the image's "
           "information flows into the text: Kaduri et al. 2024, FastV)" if method == "attention" else
           "r_i = Chefer, Gur & Wolf's relevancy (ICCV 2021): per layer the positive part of attention × its "
           f"gradient for the word's logit, averaged over heads, rolled out over layers {layers[0]}–{layers[1] - 1}")
    return (f"- {how}; the whole answer averages its words' maps.\n"
            f"- Carried down through patch info mining: hr(pixel) = Σ_i r_i · a_i(pixel), over the LR tokens i whose "
            f"{p}×{p} window holds the pixel, a_i = token i's mining weights over its window (they sum to 1).\n"
            "- Shown as hr / mean(hr): “times an even spread”; the opacity follows the value, so the photo stays "
            "visible where nothing was drawn on.\n"
            "- Without mining: each word's probability, teacher-forced, with the visual tokens projector(x) instead "
            "of projector(x + mined).")


# ---- the word choice --------------------------------------------------------------------------------------
def word_ui(evt: gr.SelectData, request: gr.Request):
    """A click on a word of the answer: that word's map (a click on the clicked word: the whole answer)."""
    session, _ = session_of(request)
    if not session.turns or evt.index is None:
        return gr.skip()
    key = turn_key(session.turns[-1])
    index = evt.index if isinstance(evt.index, int) else evt.index[0]
    return [key, int(index)]


def whole_answer_ui():
    return None


# ---- the same question without mining ---------------------------------------------------------------------
def compare_reset_ui():
    """A new answer (or an edit of the history): the comparison belongs to the old one."""
    return "", ""


def without_mining_ui(temperature, top_p, max_new_tokens, request: gr.Request):
    """Answer the latest question again without the mined detail; both answers side by side (streamed)."""
    session, _ = session_of(request)
    if not session.turns or not session.turns[-1].token_ids:
        yield "", "Ask a question about an image first."
        return
    turn = session.turns[-1]
    options = gen_options(temperature, top_p, max_new_tokens)
    setting = f"temperature {options.checked().temperature:g}" if options.checked().temperature else "greedy"
    left = (f"**With mining** (the answer in the chat)\n\n{literal(turn.assistant or '')}")
    head = f"**Without mining** (visual tokens = projector(x), {setting})\n\n"
    text = ""
    yield left, head + "…"
    try:
        for ev in unmined_events(session.id, session.turns, options):
            if ev.kind == "delta":
                text += ev.text
                yield left, head + literal(text) + " …"
            elif ev.kind == "notice":
                yield left, head + literal(str(ev.text))
            elif ev.kind == "done":
                text = ev.text
    except (AttributionUnavailable, SessionBusyError) as e:
        yield left, head + literal(str(e))
        return
    same = " (the same words)" if text.strip() == (turn.assistant or "").strip() else ""
    yield left, head + literal(text) + same


"""Answer attribution (modeling.attribution): attention rows, relevancy, HR maps through mining, mining ablation.

References are computed here the plain way: eager attention with output_attentions=True (full L x L), Chefer
et al.'s rollout on full matrices, Python loops over pixels, and a hand-built forward for the ablation.
"""
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from mini_gemini.chat.templates import Turn
from mini_gemini.modeling.attribution import (
    ImageEvidence,
    answer_attention,
    answer_relevancy,
    default_layers,
    explain_answer,
    hr_maps,
    image_positions,
)
from mini_gemini.modeling.loading import load_pretrained
from mini_gemini.testing.tiny import build_tiny
from mini_gemini.viz import heatmap as hm
from mini_gemini.viz.answer_map import square_map, top_regions
from mini_gemini.viz.hr_map import mined_pixels

FAMILIES = ("gemma", "vicuna", "llama3", "mistral", "mixtral", "yi")
DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo-model"


def _pictures(seed: int, n: int = 2):
    rng = np.random.RandomState(seed)
    sizes = [(40, 30), (24, 48), (32, 32)]
    return [Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")) for w, h in sizes[:n]]


def _conversation(model, seed: int = 0):
    """Two images in two turns, a 3-token answer: (prompt ids, [ImageEvidence], answer ids, encodings)."""
    proc = model.processor
    pics = _pictures(seed)
    prompt = proc.build_prompt([Turn("Look at this picture.", n_images=1, assistant="A picture."),
                                Turn("And this one, what is in it?", n_images=1)])
    ids = proc.tokenize(prompt)
    evidence = []
    for pic in pics:
        v = proc.images(pic)
        with torch.no_grad():
            enc = model.encode_images(v.pixel_values[None], v.pixel_values_aux[None])
            plain = model.encode_images(v.pixel_values[None], v.pixel_values_aux[None], mining=False)
        evidence.append(ImageEvidence(enc.image_features[0], enc.attn[0], plain.image_features[0]))
    answer = proc.tokenizer("a red cat", add_special_tokens=False)["input_ids"][:3]
    assert len(answer) == 3
    return ids, evidence, answer, pics


def _eager(llm, **kwargs):
    previous = llm.config._attn_implementation
    llm.set_attn_implementation("eager")
    try:
        return llm(**kwargs, output_attentions=True, use_cache=False)
    finally:
        llm.set_attn_implementation(previous)


def _positions(model, ids, evidence, answer):
    spans = image_positions(ids, [len(e.image_features) for e in evidence])
    embeds = model.embed(list(ids) + answer[:-1], [e.image_features for e in evidence])
    start = embeds.shape[1] - len(answer)
    return embeds, torch.arange(start, start + len(answer)), torch.cat(spans)


@pytest.fixture(scope="module", params=[(f, hd) for f in FAMILIES for hd in (False, True)],
                ids=lambda p: f"{p[0]}{'-hd' if p[1] else ''}")
def tiny(request, tiny_checkpoint):
    family, hd = request.param
    return load_pretrained(str(tiny_checkpoint(family, hd=hd)), device="cpu")


# ---- attention rows ------------------------------------------------------------------------------------
def test_attention_rows_are_the_eager_attention_weights(tiny):
    ids, evidence, answer, _ = _conversation(tiny)
    embeds, rows, cols = _positions(tiny, ids, evidence, answer)
    n = tiny.llm.config.num_hidden_layers
    ref = _eager(tiny.llm, inputs_embeds=embeds)
    full = torch.stack(ref.attentions)[:, 0]                                 # (layers, H, L, L)
    expect = full[:, :, rows][..., cols]                                      # (layers, H, A, K)
    got, logits = answer_attention(tiny.llm, embeds, rows, cols, (0, n), per_head=True)
    assert got.shape == expect.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expect, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(logits, ref.logits[0, rows].float(), atol=1e-4, rtol=1e-4)
    # the result object: mean over heads and the layer range, split per image into (A, V, N)
    res = explain_answer(tiny, ids, evidence, answer, layers=(1, n))
    rel = expect[1:].mean((0, 1))
    off = 0
    for e, im in zip(evidence, res.images):
        v, nt = e.attn.shape[:2]
        torch.testing.assert_close(im.relevance, rel[:, off:off + v * nt].reshape(3, v, nt), atol=2e-6, rtol=1e-4)
        off += v * nt
    torch.testing.assert_close(res.image_share, rel.sum(-1), atol=1e-5, rtol=1e-4)
    probs = ref.logits[0, rows].float().softmax(-1).gather(-1, torch.tensor(answer)[:, None])[:, 0]
    torch.testing.assert_close(res.prob, probs, atol=1e-5, rtol=1e-4)
    # the model's attention implementation is back as it was
    assert tiny.llm.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", ["mistral", "mixtral"])
def test_attention_rows_honour_the_sliding_window(family):
    model = build_tiny(family, sliding_window=8)
    ids, evidence, answer, _ = _conversation(model)
    embeds, rows, cols = _positions(model, ids, evidence, answer)
    ref = torch.stack(_eager(model.llm, inputs_embeds=embeds).attentions)[:, 0]
    got, _ = answer_attention(model.llm, embeds, rows, torch.arange(embeds.shape[1]), (0, 2), per_head=True)
    torch.testing.assert_close(got, ref[:, :, rows], atol=2e-6, rtol=1e-4)
    # each row sees only its own last 8 positions: the images (far back) get nothing
    keys = torch.arange(embeds.shape[1])
    outside = (keys[None, :] > rows[:, None]) | (keys[None, :] <= rows[:, None] - 8)
    assert got[..., outside].abs().max() == 0 and got[..., ~outside].min() > 0
    assert got[..., cols].abs().max() == 0


# ---- relevancy (Chefer et al. 2021) ----------------------------------------------------------------------
@pytest.mark.parametrize("family,layers", [("gemma", (0, 2)), ("vicuna", (1, 2)), ("mixtral", (0, 2)),
                                           ("mistral", (0, 1))])
def test_relevancy_against_the_full_rollout(family, layers, tiny_checkpoint):
    model = load_pretrained(str(tiny_checkpoint(family)), device="cpu")
    ids, evidence, answer, _ = _conversation(model, seed=3)
    embeds, rows, cols = _positions(model, ids, evidence, answer)
    got, _ = answer_relevancy(model.llm, embeds, rows, cols, answer, layers)
    # reference: full L x L matrices, R = I; R <- R + mean_h((grad A * A)^+) R, layer by layer upwards
    x = embeds.detach().clone().requires_grad_()
    with torch.enable_grad():
        out = _eager(model.llm, inputs_embeds=x)
        seq = x.shape[1]
        for t, (row, target) in enumerate(zip(rows.tolist(), answer)):
            grads = torch.autograd.grad(out.logits[0, row, target], out.attentions, retain_graph=True)
            r = torch.eye(seq)
            for layer in range(*layers):
                a_bar = (grads[layer][0] * out.attentions[layer][0]).clamp(min=0).mean(0)
                r = r + a_bar @ r
            torch.testing.assert_close(got[t], r[row, cols].detach(), atol=1e-6, rtol=1e-4)
    assert got.abs().sum() > 0


# ---- down through mining ----------------------------------------------------------------------------------
def _loop_hr(rel: torch.Tensor, attn: torch.Tensor) -> np.ndarray:
    """hr[t, v, pixel] by looping over pixels: find the LR token whose window holds it, and its candidate."""
    a_, v_, n_ = rel.shape
    p = math.isqrt(attn.shape[-1])
    side = math.isqrt(n_)
    out = np.zeros((a_, v_, side * p, side * p), np.float32)
    for t in range(a_):
        for v in range(v_):
            for y in range(side * p):
                for x in range(side * p):
                    token = (y // p) * side + x // p
                    cand = (y % p) * p + x % p
                    out[t, v, y, x] = float(rel[t, v, token]) * float(attn[v, token, cand])
    return out


def test_hr_map_against_a_loop(tiny):
    ids, evidence, answer, _ = _conversation(tiny, seed=1)
    res = explain_answer(tiny, ids, evidence, answer)
    layout = hm.Layout.from_config(tiny.config)
    for e, im in zip(evidence, res.images):
        assert im.hr_map.dtype == torch.float32
        assert im.hr_map.shape == (3, layout.views, layout.side * layout.patch, layout.side * layout.patch)
        np.testing.assert_allclose(im.hr_map.numpy(), _loop_hr(im.relevance, e.attn), rtol=1e-6, atol=1e-9)
        # mass of each view = the relevance of its tokens (the mining weights sum to 1)
        torch.testing.assert_close(im.hr_map.sum((-1, -2)), im.relevance.sum(-1), rtol=1e-4, atol=1e-7)
        # with relevance 1 everywhere, the per-view maps are the mined-pixels picture of viz.hr_map
        ones = hr_maps(torch.ones(1, *e.attn.shape[:2]), e.attn)[0].numpy()
        crops = ones.copy()
        if layout.global_view:
            np.testing.assert_array_equal(ones[0], mined_pixels(e.attn.numpy(), layout, hm.GLOBAL))
            crops[0] = 0
        np.testing.assert_allclose(square_map(crops, layout), mined_pixels(e.attn.numpy(), layout, hm.CROPS))


def test_square_map_against_the_layout_geometry(tiny):
    """One map over the padded square: every fine pixel gets r * a of the token of each view whose window holds
    it, found through Layout.token_at / Layout.cell (the heatmaps' own geometry); the global view's share is
    spread over the g x g fine pixels under it."""
    ids, evidence, answer, _ = _conversation(tiny, seed=2)
    res = explain_answer(tiny, ids, evidence, answer)
    layout = hm.Layout.from_config(tiny.config)
    p, g = layout.patch, layout.grid
    rel, attn = res.images[0].relevance[1], evidence[0].attn
    got = square_map(res.images[0].hr_map[1].numpy(), layout)
    rows = layout.rows(hm.CROPS) * p
    assert got.shape == (rows, rows)
    expect = np.zeros((rows, rows))
    for y in range(rows):
        for x in range(rows):
            u, v = (x + 0.5) / rows, (y + 0.5) / rows
            for which in layout.choices():
                view, token = layout.token_at(u, v, which)
                u0, v0, u1, v1 = layout.cell(view, token)
                cand = int((v - v0) / (v1 - v0) * p) * p + int((u - u0) / (u1 - u0) * p)
                share = 1 / g ** 2 if which == hm.GLOBAL else 1
                expect[y, x] += float(rel[view, token]) * float(attn[view, token, cand]) * share
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-9)
    assert got.sum() == pytest.approx(float(rel.sum()), rel=1e-4)


def test_top_regions_in_words():
    layout = hm.Layout(side=4, patch=2, grid=2, global_view=True)
    maps = np.zeros((5, 8, 8), np.float32)
    maps[2, 1, 6] = 0.6     # crop 1 = the top-right quarter: its top-right corner
    maps[0, 4, 4] = 0.4     # global view, the centre of the square
    assert top_regions(maps, layout, 300, 300) == "top-right 60 %, centre 40 %"
    # a wide photo: the padded band above it (the crop's pixel) is cut away; the global pixel covers photo
    # rows 0.5-0.875 of its height: 19 of the 34 summary rows in the bottom third, 15 in the middle one
    assert top_regions(maps, layout, 300, 100) == "bottom 56 %, centre 44 %"
    assert top_regions(np.zeros((5, 8, 8)), layout, 10, 10) == ""


# ---- the mining ablation ------------------------------------------------------------------------------------
def test_mining_ablation_against_a_direct_computation(tiny):
    ids, evidence, answer, pics = _conversation(tiny, seed=4)
    res = explain_answer(tiny, ids, evidence, answer)
    # by hand: the LR tower's tokens straight into the projector, no mining
    plain = []
    for pic in pics:
        v = tiny.processor.images(pic)
        with torch.no_grad():
            x = tiny.vision_tower(v.pixel_values)                              # (V, N, C)
            plain.append(tiny.mm_projector(x).reshape(-1, tiny.config.llm.hidden_size))
    for e, mine in zip(evidence, plain):
        torch.testing.assert_close(e.image_features_no_mining, mine)
        assert (e.image_features_no_mining - e.image_features).abs().max() > 1e-3
    embeds, rows, _ = _positions(tiny, ids, [ImageEvidence(p, e.attn) for p, e in zip(plain, evidence)], answer)
    with torch.no_grad():
        logits = _eager(tiny.llm, inputs_embeds=embeds).logits[0, rows].float()
    expect = logits.softmax(-1).gather(-1, torch.tensor(answer)[:, None])[:, 0]
    torch.testing.assert_close(res.prob_no_mining, expect, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(res.prob_no_mining, res.prob)
    # without the projector(x) features there is no ablation
    bare = [ImageEvidence(e.image_features, e.attn) for e in evidence]
    assert explain_answer(tiny, ids, bare, answer).prob_no_mining is None


def test_errors_say_what_is_wrong(tiny_checkpoint):
    model = load_pretrained(str(tiny_checkpoint("vicuna")), device="cpu")
    ids, evidence, answer, _ = _conversation(model)
    with pytest.raises(ValueError, match="method"):
        explain_answer(model, ids, evidence, answer, method="saliency")
    with pytest.raises(ValueError, match="layers"):
        explain_answer(model, ids, evidence, answer, layers=(1, 1))
    with pytest.raises(ValueError, match="no answer"):
        explain_answer(model, ids, evidence, [])
    with pytest.raises(ValueError, match="2 image slots but 1"):
        explain_answer(model, ids, evidence[:1], answer)
    assert default_layers(18) == (4, 14) and default_layers(32) == (8, 24) and default_layers(2) == (0, 2)
    assert default_layers(40, "relevancy") == (0, 40)


# ---- the demo model: where the digit was read ------------------------------------------------------------------
COLOURS = {"red": (228, 26, 28), "green": (30, 150, 50), "blue": (35, 60, 220), "yellow": (245, 225, 30),
           "purple": (130, 40, 150), "orange": (250, 140, 20)}
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf")


def held_out_scene(rng: random.Random):
    """A scene drawn by this test's own code (not the training generator): 3-5 squares of distinct colours at
    random non-overlapping places on a plain canvas (square or not: the processor pads it), one holding a
    small digit. Returns (image, colour of the digit's square, its box (x0, y0, x1, y1), digit)."""
    import matplotlib
    w = rng.choice((288, 360, 420, 480))
    h = rng.choice((w, w, int(w * rng.uniform(0.8, 0.95))))
    img = Image.new("RGB", (w, h), rng.choice(((255, 255, 255), (238, 238, 238), (215, 215, 220))))
    draw = ImageDraw.Draw(img)
    side = max(w, h)
    n = rng.randint(3, 5)
    boxes = []
    while len(boxes) < n:
        s = int(side * rng.uniform(0.2, 0.3))
        x0, y0 = rng.randint(0, w - s), rng.randint(0, h - s)
        box = (x0, y0, x0 + s, y0 + s)
        if all(box[2] + 6 <= o[0] or o[2] + 6 <= box[0] or box[3] + 6 <= o[1] or o[3] + 6 <= box[1] for o in boxes):
            boxes.append(box)
    names = rng.sample(sorted(COLOURS), n)
    for name, box in zip(names, boxes):
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=COLOURS[name])
    k, digit = rng.randrange(n), rng.randrange(10)
    font_path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", rng.choice(FONTS))
    size, target = 4, side * rng.uniform(0.05, 0.065)
    while True:
        font = ImageFont.truetype(font_path, size)
        fx0, fy0, fx1, fy1 = font.getbbox(str(digit))
        if fy1 - fy0 >= target:
            break
        size += 1
    box = boxes[k]
    x = rng.randint(box[0] + 3, box[2] - 3 - (fx1 - fx0))
    y = rng.randint(box[1] + 3, box[3] - 3 - (fy1 - fy0))
    draw.text((x - fx0, y - fy0), str(digit), font=font, fill=rng.choice(((0, 0, 0), (255, 255, 255))))
    return img, names[k], box, digit


@pytest.fixture(scope="module")
def demo():
    if not (DEMO / "config.json").exists():
        pytest.fail(f"{DEMO} is missing; train it with the recipe in assets/demo-model/README.md")
    return load_pretrained(str(DEMO), device="cpu")


def _digit_attribution(model, scene, method):
    img, colour, box, _ = scene
    proc = model.processor
    v = proc.images(img)
    with torch.no_grad():
        enc = model.encode_images(v.pixel_values[None], v.pixel_values_aux[None])
        plain = model.encode_images(v.pixel_values[None], v.pixel_values_aux[None], mining=False)
    ids = proc.tokenize(proc.build_prompt([Turn(f"What digit is in the {colour} square?", n_images=1)]))
    answer = model.generate(ids, [enc.image_features[0]], max_new_tokens=3).tolist()
    words = [proc.tokenizer.decode([t]).strip() for t in answer]
    t = next((i for i, w in enumerate(words) if w.isdigit()), None)
    if t is None:
        return None
    res = explain_answer(model, ids, [ImageEvidence(enc.image_features[0], enc.attn[0], plain.image_features[0])],
                         answer, method=method)
    layout = hm.Layout.from_config(model.config)
    square = square_map(res.images[0].hr_map[t].numpy(), layout)            # over the padded square
    left, top, side = hm.pad_box(*img.size)
    s = square.shape[0] / side
    inside = np.zeros(square.shape, bool)
    inside[round((box[1] + top) * s):round((box[3] + top) * s), round((box[0] + left) * s):round((box[2] + left) * s)] = True
    peak_inside = bool(inside.flat[square.argmax()])
    # share of the map's mass (padding included) inside the square ÷ the square's share of the photo's area
    ratio = (square[inside].sum() / square.sum()) / ((box[2] - box[0]) * (box[3] - box[1]) / (img.size[0] * img.size[1]))
    return peak_inside, ratio, float(res.prob_no_mining[t] / res.prob[t])


@pytest.mark.parametrize("method", ["attention", "relevancy"])
def test_the_digit_token_points_at_the_digits_square(demo, method):
    scenes = [held_out_scene(random.Random(f"attribution-heldout-{i}")) for i in range(40)]
    got = [_digit_attribution(demo, sc, method) for sc in scenes]
    hits = [g is not None and g[0] and g[1] >= 3 for g in got]
    assert sum(hits) >= 0.9 * len(scenes), [(g and (g[0], round(g[1], 1))) for g in got]
    # without mining, the digit's probability falls by at least half in the median scene
    falls = sorted(g[2] if g is not None else 1.0 for g in got)
    assert np.median(falls) <= 0.5, falls

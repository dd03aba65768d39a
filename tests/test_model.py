"""The model core: image views, encode_images (HD included), splicing, family choice, and, above all,
token-for-token agreement with tests/reference.py (an independent re-implementation of the official code)."""
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from reference import FAMILY_TEMPLATE, Reference, official_prompt

from mini_gemini.constants import IMAGE_TOKEN_INDEX
from mini_gemini.modeling.loading import load_pretrained, save_pretrained
from mini_gemini.modeling.image_processing import ImageProcessor
from mini_gemini.testing.tiny import build_tiny

FILL = (122, 116, 104)  # int(CLIP mean * 255)
QUESTION = "What is in the image?"


def noise_image(w=45, h=30, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def spice(model, seed=1):
    """Make the vision side discriminative: random tiny models have ConvNeXt layer scales of 1e-6
    (blocks barely act), plain LayerNorms and near-uniform mining attention."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("vision_tower", "mining")) and p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
            if name.endswith("gamma"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for lin in (model.mining.query[1], model.mining.key[1]):
            lin.weight.mul_(4)
    return model


@pytest.fixture(scope="module")
def spiced_checkpoint(tmp_path_factory):
    made = {}

    def make(family, hd=False):
        if (family, hd) not in made:
            out = tmp_path_factory.mktemp(f"spiced-{family}{'-hd' if hd else ''}")
            made[family, hd] = save_pretrained(spice(build_tiny(family, hd=hd)), out)
        return made[family, hd]
    return make


@pytest.fixture(scope="module")
def hd_model():
    return spice(build_tiny("vicuna", hd=True))


# ---- preprocessing -----------------------------------------------------------------------------------
@pytest.mark.parametrize("size,box", [((40, 20), (0, 10, 40, 30)), ((20, 40), (10, 0, 30, 40)),
                                      ((41, 20), (0, 10, 41, 30)), ((16, 16), (0, 0, 16, 16))])
def test_pad_geometry_and_mean_fill(size, box):
    proc = ImageProcessor(32, 64)
    padded = np.asarray(proc.pad(Image.new("RGB", size, (255, 0, 0))))
    side = max(size)
    assert padded.shape == (side, side, 3)
    x0, y0, x1, y1 = box
    inside = np.zeros((side, side), bool)
    inside[y0:y1, x0:x1] = True
    assert (padded[inside] == (255, 0, 0)).all()
    assert (padded[~inside] == FILL).all()


@pytest.mark.parametrize("hd", [False, True])
def test_views_match_reference_and_lr_comes_from_hr(hd, tiny_checkpoint):
    ref = Reference(tiny_checkpoint("gemma", hd=hd))
    proc = ImageProcessor(32, 128 if hd else 64, grid=2 if hd else 1, global_view=hd)
    img = noise_image()
    views = proc(img)
    images, aux = ref.preprocess(img)                      # official order: crops, then global
    if hd:
        images = torch.cat([images[-1:], images[:-1]])     # our views: global first
    assert views.pixel_values_aux.shape == aux.shape and views.pixel_values.shape == images.shape == (5 if hd else 1, 3, 32, 32)
    torch.testing.assert_close(views.pixel_values_aux, aux, atol=2e-6, rtol=0)
    torch.testing.assert_close(views.pixel_values, images, atol=2e-6, rtol=0)
    # the padding is the mean colour (as 0-255 integers), normalised with the CLIP mean and std
    fill = (torch.tensor(FILL) / 255 - torch.tensor(proc.mean)) / torch.tensor(proc.std)
    torch.testing.assert_close(views.pixel_values_aux[:, 0, :], fill[:, None].expand(3, views.pixel_values_aux.shape[-1]), atol=1e-5, rtol=0)
    # LR is derived from the HR tensor (so both see the same pixels), not resized from the image again
    big = F.interpolate(views.pixel_values_aux[None], size=(64 if hd else 32,) * 2, mode="bilinear", align_corners=False)
    expect = big if not hd else F.interpolate(big, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(views.pixel_values[:1], expect, atol=1e-6, rtol=0)


@pytest.mark.parametrize("quadrant", range(4))
def test_hd_mark_in_image_changes_only_its_crop_and_global(quadrant):
    proc = ImageProcessor(32, 128, grid=2, global_view=True)
    base = np.full((128, 128, 3), 90, np.uint8)
    marked = base.copy()
    r, c = divmod(quadrant, 2)
    marked[r * 64 + 20:r * 64 + 44, c * 64 + 20:c * 64 + 44] = (250, 10, 10)
    a, b = proc(Image.fromarray(base)).pixel_values, proc(Image.fromarray(marked)).pixel_values
    changed = [i for i in range(5) if not torch.equal(a[i], b[i])]
    assert changed == [0, 1 + quadrant]  # global view first, then the crops row-major


# ---- encode_images ----------------------------------------------------------------------------------
@pytest.mark.parametrize("hd", [False, True])
def test_encode_shapes_and_batch_independence(hd, hd_model):
    model = hd_model if hd else spice(build_tiny("gemma"))
    views = model.config.views
    assert views == (5 if hd else 1)
    batch = [model.processor.image_processor(noise_image(seed=s)) for s in (0, 1)]
    lr, hr = torch.stack([v.pixel_values for v in batch]), torch.stack([v.pixel_values_aux for v in batch])
    enc = model.encode_images(lr, hr)
    n, p2 = model.config.tokens_per_view, model.config.patch_side ** 2
    assert (n, p2) == (16, 16)
    assert enc.image_features.shape == (2, views * n, model.config.llm.hidden_size)
    assert enc.attn.shape == (2, views, n, p2) and enc.gain.shape == (2, views, n)
    torch.testing.assert_close(enc.attn.sum(-1), torch.ones(2, views, n))
    one = model.encode_images(lr[1:], hr[1:])
    torch.testing.assert_close(one.image_features[0], enc.image_features[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one.attn[0], enc.attn[1], atol=1e-6, rtol=1e-5)


class _FixedMap(torch.nn.Module):
    def __init__(self, hr_map):
        super().__init__()
        self.hr_map = torch.nn.Parameter(hr_map, requires_grad=False)

    def forward(self, pixels):
        return self.hr_map.expand(pixels.shape[0], -1, -1, -1)


@pytest.mark.parametrize("quadrant", range(4))
def test_hd_mark_in_hr_map_changes_only_its_crop_and_global(quadrant, hd_model):
    """A change in one quadrant of the HR feature map reaches that crop's mining and the global view's;
    the other crops' mining maps stay bit-identical."""
    views = hd_model.processor.image_processor(noise_image())
    side, ca = 32, hd_model.config.mm_hidden_size_aux        # tiny HD: 128 / 4 = 32, two 16-wide crops
    torch.manual_seed(0)
    base = torch.randn(1, ca, side, side)
    marked = base.clone()
    r, c = divmod(quadrant, 2)
    marked[:, :, r * 16 + 5:r * 16 + 11, c * 16 + 5:c * 16 + 11] += 3.0
    real = hd_model.vision_tower_aux
    try:
        hd_model.vision_tower_aux = _FixedMap(base)
        a = hd_model.encode_images(views.pixel_values[None], views.pixel_values_aux[None]).attn[0]
        hd_model.vision_tower_aux = _FixedMap(marked)
        b = hd_model.encode_images(views.pixel_values[None], views.pixel_values_aux[None]).attn[0]
    finally:
        hd_model.vision_tower_aux = real
    changed = [i for i in range(5) if not torch.equal(a[i], b[i])]
    assert changed == [0, 1 + quadrant]
    # and inside the changed crop, only the LR tokens over the mark (rows/cols 1-2 of its 4 x 4 grid)
    moved = (a[1 + quadrant] - b[1 + quadrant]).abs().amax(-1).reshape(4, 4) > 0
    assert moved[1:3, 1:3].all() and moved.sum() == 4


# ---- language side ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family,scale", [("vicuna", 1.0), ("gemma", 64 ** 0.5)])
def test_embed_splices_image_tokens_in_order(family, scale):
    """Visual tokens replace the slots in order. Gemma: the official (transformers 4) Gemma multiplied
    every input embedding by sqrt(hidden), visual tokens included, so they get that factor too."""
    model = build_tiny(family)
    d = model.config.llm.hidden_size
    a, b = torch.randn(3, d), torch.randn(2, d)
    ids = [1, 40, IMAGE_TOKEN_INDEX, 41, 42, IMAGE_TOKEN_INDEX, 43]
    out = model.embed(ids, [a, b])
    assert out.shape == (1, 5 + 3 + 2, d)
    table = model.llm.get_input_embeddings().weight * scale       # text rows: the LLM's own embedding
    expect = torch.cat([table[[1, 40]], a * scale, table[[41, 42]], b * scale, table[[43]]])
    torch.testing.assert_close(out[0], expect, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="2 image slots but 1"):
        model.embed(ids, [a])


@pytest.mark.parametrize("family,folder_name,llm_class,template", [
    ("vicuna", "MGM-2B", "LlamaForCausalLM", "vicuna_v1"),        # the official code would pick gemma
    ("gemma", "MGM-8x7B-HD", "GemmaForCausalLM", "gemma"),         # ... mistral_instruct
    ("llama3", "MGM-34B", "LlamaForCausalLM", "llama_3"),          # ... chatml_direct
])
def test_family_and_template_come_from_config_not_path(family, folder_name, llm_class, template,
                                                       tiny_checkpoint, tmp_path):
    folder = tmp_path / folder_name
    shutil.copytree(tiny_checkpoint(family), folder)
    model = load_pretrained(str(folder), device="cpu")
    assert type(model.llm).__name__ == llm_class
    assert model.processor.template.name == template


# ---- fidelity: our stack == the reference, token for token ------------------------------------------
@pytest.mark.parametrize("family,hd", [("gemma", False), ("vicuna", False), ("llama3", False),
                                       ("mistral", False), ("mixtral", False), ("yi", False),
                                       ("llama3", True)])
def test_matches_reference(family, hd, spiced_checkpoint):
    from mini_gemini.chat.engine import Engine, GenOptions
    from mini_gemini.modeling.chat_template import PromptTurn, build_prompt, tokenize
    folder = spiced_checkpoint(family, hd)
    model = load_pretrained(str(folder), device="cpu", dtype=torch.float32)
    ref = Reference(folder)
    template = FAMILY_TEMPLATE[family]
    assert model.processor.template.name == template
    img = noise_image()

    # visual tokens and mining maps
    tokens, attn = ref.encode(img)
    views = model.processor.image_processor(img)
    enc = model.encode_images(views.pixel_values[None], views.pixel_values_aux[None])
    assert enc.attn.shape == (1, 5 if hd else 1, 16, 16)
    assert attn.std() > 0.03  # mining is far from uniform, so a mapping error could not hide
    torch.testing.assert_close(enc.attn[0], attn, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(enc.image_features[0], tokens, atol=1e-5, rtol=1e-4)

    # prompt ids and the next-token logits over the spliced sequence
    prompt = official_prompt(template, QUESTION)
    ids = tokenize(build_prompt(model.processor.template, [PromptTurn(QUESTION, 1)]), model.processor.tokenizer)
    assert ids == ref.tokenize(prompt)
    with torch.no_grad():
        ours = model.llm(inputs_embeds=model.embed(ids, [enc.image_features[0]])).logits[0, -1]
        theirs = ref.llm(inputs_embeds=ref.embed(ids, [tokens])[None]).logits[0, -1]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)

    # greedy answer through the engine (what the CLI and the app use) and through model.generate
    expect = ref.greedy(ref.tokenize(prompt), [tokens], 6, ref.stop_ids(template))
    session = Engine(model).session()
    events = list(session.chat(QUESTION, [img], options=GenOptions(temperature=0.0, max_new_tokens=6)))
    assert [e.kind for e in events if e.kind not in ("delta", "notice")] == ["done"], events
    turn = events[-1].data
    assert turn.prompt == prompt
    assert turn.token_ids == expect
    torch.testing.assert_close(session.images[0].attn, attn, atol=2e-6, rtol=1e-4)
    generated = model.generate(ids, [enc.image_features[0]], max_new_tokens=6).tolist()
    assert generated[:len(expect)] == expect
    assert len(generated) == 6 or generated[len(expect)] in ref.stop_ids(template)

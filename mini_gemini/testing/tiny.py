"""Tiny random checkpoints in the official MGM layout, built from the real classes (for tests and demos).

    python -m mini_gemini.tiny --family gemma --out /tmp/mgm-gemma [--hd] [--seed 0]
    python -m mini_gemini.tiny --sdxl --out /tmp/sdxl-tiny
"""
from __future__ import annotations

import argparse

import torch

from ..modeling.config import DEFAULT_VISION_TOWER, DEFAULT_VISION_TOWER_AUX, FAMILIES, MGMConfig
from ..modeling.model import MiniGemini

# tiny family -> MGM LLM family
LLM_FAMILY = {"gemma": "gemma", "vicuna": "llama", "llama3": "llama", "yi": "llama", "mistral": "mistral",
              "mixtral": "mixtral"}

TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                 image_size=32, patch_size=8, projection_dim=16, hidden_act="quick_gelu")
TINY_CONVNEXT = dict(depths=[1, 1, 1, 1], dims=[8, 16, 24, 32])


def tiny_config(family: str, tokenizer, hd: bool = False, context: int = 2048, **overrides) -> dict:
    """An official-layout config.json dict for a tiny MGM of `family`."""
    llm_family = LLM_FAMILY[family]
    config_cls, model_type, arch = FAMILIES[llm_family]
    llm = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=llm_family == "gemma")
    if llm_family == "gemma":
        llm["head_dim"] = 16
    if llm_family == "mixtral":
        llm.update(num_local_experts=4, num_experts_per_tok=2)
    clip = dict(TINY_CLIP, **overrides.pop("clip", {}))
    aux = dict(TINY_CONVNEXT, **overrides.pop("convnext", {}))
    grid = 2 if hd else 1
    cfg = config_cls(**llm).to_dict()
    cfg.update(model_type=model_type, architectures=[arch],
               mm_vision_tower=DEFAULT_VISION_TOWER, mm_vision_tower_aux=DEFAULT_VISION_TOWER_AUX,
               mm_vision_tower_config=clip, mm_vision_tower_aux_config=aux,
               mm_projector_type="mlp2x_gelu", mm_hidden_size=clip["hidden_size"],
               mm_hidden_size_aux=sum(aux["dims"]), mm_vision_select_layer=-2, mm_vision_select_feature="patch",
               image_size_aux=clip["image_size"] * 2 * grid, image_grid=grid, image_global=hd,
               image_aspect_ratio="pad", mm_use_im_start_end=False, mm_use_im_patch_token=False)
    cfg.update(overrides)
    return cfg


def build_tiny(family: str, hd: bool = False, seed: int = 0, **overrides) -> MiniGemini:
    from ..modeling.image_processing import ImageProcessor
    from ..modeling.processing import MGMProcessor
    from ..modeling.chat_template import TEMPLATES
    from .tiny_tokenizer import build_tokenizer, family_template
    if family not in LLM_FAMILY:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(LLM_FAMILY)}")
    tok = build_tokenizer(family)
    config = MGMConfig.from_dict(tiny_config(family, tok, hd, **overrides))
    torch.manual_seed(seed)
    model = MiniGemini(config).eval().requires_grad_(False)
    model.processor = MGMProcessor(tok, ImageProcessor.from_config(config), TEMPLATES[family_template(family)])
    return liven(model, seed)


# Per-matrix gains (std = gain / sqrt(fan_in)) of the LLM re-initialisation in `liven`.
_LLM_GAINS = {"q_proj": 2.0, "k_proj": 2.0, "v_proj": 1.0, "o_proj": 1.0, "gate_proj": 1.0, "up_proj": 1.0,
              "down_proj": 1.5, "gate_up_proj": 1.0, "gate": 1.0, "lm_head": 1.0}
_TEXT_STD, _IMAGE_STD = 0.2, 0.7
_CLIP_GAIN = 3.0


@torch.no_grad()
def liven(model: MiniGemini, seed: int = 0) -> MiniGemini:
    """Re-initialise a tiny model's weights so that its greedy answers depend on the prompt and the image.

    With the stock initialisation (std 0.02 everywhere, ConvNeXt layer scales of 1e-6, Gemma's tied head)
    the LLM's blocks barely act and every prompt gets the same answer (tiny gemma: token 262, "\n", over
    and over), so a test comparing greedy tokens could not notice a wrong prompt id or a lost image.
    Here, deterministically from `seed`:
    - every LLM matrix gets std gain / sqrt(fan_in) (`_LLM_GAINS`): attention peaked enough to pick out
      context tokens, blocks whose output outweighs the token embedding (std `_TEXT_STD`, after Gemma's
      sqrt(hidden) factor), so that the answer depends on the whole prompt, not on its last token;
    - logits get a spread of about 1 (lm_head; Gemma's tied head through its final norm, whose channel
      factors get random signs so that the head does not favour repeating the input token);
    - the CLIP blocks get gain `_CLIP_GAIN` and the ConvNeXt blocks real layer scales, so that a change
      of a single pixel reaches the visual tokens;
    - the projector's output gets `_IMAGE_STD` times the text embeddings' scale (measured on a fixed
      noise input), so that visual tokens weigh in the answer.
    Only values change: the architecture, config.json and the official weight layout stay as they were.
    """
    g = torch.Generator().manual_seed(10_000 + seed)
    text_std, image_std = _TEXT_STD, _IMAGE_STD
    llm = model.llm
    hidden = model.config.llm.hidden_size
    gemma = model.config.family == "gemma"
    for name, p in llm.named_parameters():
        leaf = name.split(".")[-1] if not name.endswith(".weight") else name.split(".")[-2]
        if name == "model.embed_tokens.weight":
            p.normal_(0, text_std / (hidden ** 0.5 if gemma else 1.0), generator=g)
        elif p.ndim >= 2 and leaf in _LLM_GAINS:
            p.normal_(0, _LLM_GAINS[leaf] / p.shape[-1] ** 0.5, generator=g)
    if gemma:
        # Tied head: logits = norm(h) . E, and h carries the input token's own embedding, so the head
        # favours repeating the last token. Gemma's final norm scales channel c by (1 + weight_c):
        # with half of those factors negative the self term cancels on average (no echo loops), and
        # their size gives the logits their spread.
        emb = llm.model.embed_tokens.weight
        sign = torch.where(torch.randperm(hidden, generator=g) % 2 == 0, 1.0, -1.0)
        llm.model.norm.weight.copy_(sign * _LLM_GAINS["lm_head"] / (hidden ** 0.5 * emb.std()) - 1.0)
    for name, p in model.vision_tower_aux.named_parameters():
        if name.endswith("gamma"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    # CLIP: blocks that act (a small change of one patch is not washed out on its way to the LLM)
    for name, p in model.vision_tower.named_parameters():
        if ".encoder.layers." in name and name.endswith(("_proj.weight", "fc1.weight", "fc2.weight")):
            p.normal_(0, _CLIP_GAIN / p.shape[-1] ** 0.5, generator=g)
    # the projector's output to the scale of the text embeddings, measured on a fixed noise image
    views = model.config.views
    s, s_aux = model.config.lr_size, model.config.image_size_aux
    probe = torch.Generator().manual_seed(0)
    lr = torch.randn(1, views, 3, s, s, generator=probe)
    hr = torch.randn(1, 3, s_aux, s_aux, generator=probe)
    out = model.encode_images(lr, hr).image_features
    last = model.mm_projector[-1] if isinstance(model.mm_projector, torch.nn.Sequential) else model.mm_projector
    factor = image_std * text_std / (hidden ** 0.5 if gemma else 1.0) / out.std().clamp_min(1e-6)
    last.weight.mul_(factor)
    last.bias.mul_(factor)
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(LLM_FAMILY))
    ap.add_argument("--hd", action="store_true", help="HD variant: 2x2 grid + global view")
    ap.add_argument("--sdxl", action="store_true", help="write a tiny Stable Diffusion XL pipeline instead")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.sdxl:
        from .tiny_sdxl import build_tiny_sdxl
        print(build_tiny_sdxl(args.out, seed=args.seed))
        return
    if not args.family:
        ap.error("--family is required (or --sdxl)")
    from ..modeling.loading import save_pretrained
    print(save_pretrained(build_tiny(args.family, args.hd, args.seed), args.out))


if __name__ == "__main__":
    main()

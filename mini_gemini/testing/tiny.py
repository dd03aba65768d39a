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
    from ..chat.templates import TEMPLATES
    from .tiny_tokenizer import build_tokenizer, family_template
    if family not in LLM_FAMILY:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(LLM_FAMILY)}")
    tok = build_tokenizer(family)
    config = MGMConfig.from_dict(tiny_config(family, tok, hd, **overrides))
    torch.manual_seed(seed)
    model = MiniGemini(config).eval().requires_grad_(False)
    model.processor = MGMProcessor(tok, ImageProcessor.from_config(config), TEMPLATES[family_template(family)])
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

"""The models the benchmarks measure (random checkpoints with official MGM shapes, the CPU-sized speed model) and
the one format they report in. Shared by `bench`, `bench_cpu`, `bench_attribution`, `bench_openai` and
`tools/gpu_check.py`; re-exported by `mini_gemini.bench`."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def mgm_2b_config() -> dict:
    """MGM-2B's config.json fields that fix its shapes (Gemma-2B + CLIP-L/336 + ConvNeXt-L at 768)."""
    from transformers import GemmaConfig

    cfg = GemmaConfig(vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                      num_attention_heads=8, num_key_value_heads=1, head_dim=256, max_position_embeddings=8192,
                      tie_word_embeddings=True).to_dict()
    return _with_mgm_fields(cfg, "mgm_gemma", "MGMGemmaForCausalLM", image_size_aux=768, image_grid=1,
                            image_global=False)


def _with_mgm_fields(cfg: dict, model_type: str, architecture: str, **images) -> dict:
    """An LLM config dict with the official MGM fields (CLIP-L/336 + ConvNeXt-L towers, mlp2x_gelu projector)."""
    from .modeling.config import DEFAULT_VISION_TOWER, DEFAULT_VISION_TOWER_AUX
    cfg.update(model_type=model_type, architectures=[architecture], mm_vision_tower=DEFAULT_VISION_TOWER,
               mm_vision_tower_aux=DEFAULT_VISION_TOWER_AUX, mm_projector_type="mlp2x_gelu", mm_hidden_size=1024,
               mm_hidden_size_aux=2880, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
               image_aspect_ratio="pad", mm_use_im_start_end=False, mm_use_im_patch_token=False, **images)
    return cfg


def mgm_7b_hd_config() -> dict:
    """MGM-7B-HD's config.json fields that fix its shapes (Vicuna-7B-v1.5 + CLIP-L/336 in a 2 x 2 grid with a
    global view + ConvNeXt-L at 1536; DESIGN.md section 1.3): 5 x 576 = 2880 visual tokens."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=False).to_dict()
    return _with_mgm_fields(cfg, "mgm", "MGMLlamaForCausalLM", image_size_aux=1536, image_grid=2, image_global=True)


def write_random_checkpoint(out: Path, cfg: dict, dtype=torch.bfloat16, shard_bytes: int = 2 << 30,
                            tokenizer: str = "gemma", device: str = "cpu") -> int:
    """Write a random checkpoint of `cfg`'s shapes without ever holding all of it in memory.

    Args:
        out: folder to write (created if needed): config.json, safetensors shards of at most `shard_bytes`
            (with an index when there are several) and a stand-in tokenizer.
        cfg: an official config.json dict (e.g. `mgm_2b_config()`, `mgm_7b_hd_config()`).
        dtype: the weights' dtype on disk.
        tokenizer: the tiny tokenizer family written as a stand-in (`testing.tiny_tokenizer.FAMILIES`; its
            ids are small, so it fits any vocabulary): shapes are what matters here.
        device: where the random numbers are drawn ("cuda" is much faster for billions of them; the values
            differ from the CPU's for the same seed).

    Returns:
        The bytes of all weights written.
    """
    from accelerate import init_empty_weights
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from .modeling.config import MGMConfig
    from .modeling.loading import official_state_dict
    from .modeling.model import MiniGemini
    from .testing.tiny_tokenizer import build_tokenizer
    out.mkdir(parents=True, exist_ok=True)
    with init_empty_weights():
        model = MiniGemini(MGMConfig.from_dict(cfg))
    meta = official_state_dict(model)  # names and shapes only (meta tensors)
    split = split_torch_state_dict_into_shards({k: v.to(dtype) for k, v in meta.items()},
                                               filename_pattern="model{suffix}.safetensors", max_shard_size=shard_bytes)
    gen = torch.Generator(device=device).manual_seed(0)
    total = 0
    for filename, keys in split.filename_to_tensors.items():
        shard = {k: (torch.randn(meta[k].shape, generator=gen, device=device) * 0.02).to(dtype).cpu() for k in keys}
        total += sum(t.numel() * t.element_size() for t in shard.values())
        save_file(shard, out / filename, metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename}))
    (out / "config.json").write_text(json.dumps(dict(cfg, torch_dtype=str(dtype).replace("torch.", "")), default=str))
    build_tokenizer(tokenizer).save_pretrained(out)
    return total


def speed_model():
    """A CPU-sized MGM: real CLIP/ConvNeXt/Llama classes, 336/768 px inputs, a 512-wide 6-layer LLM."""
    from .testing.tiny import build_tiny
    return build_tiny("vicuna", clip=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                          num_attention_heads=4, image_size=336, patch_size=14),
                      convnext=dict(depths=[1, 1, 3, 1], dims=[48, 96, 192, 384]), image_size_aux=768,
                      hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                      num_key_value_heads=8)


def report(results: dict, goals: dict, as_json: bool = False) -> None:
    """One line per figure (with its goal, if any); with `as_json`, all of them as one JSON object last."""
    for k, v in results.items():
        print(f"{k:>28}: {v}" + (f"   (goal {goals[k]})" if k in goals else ""))
    if as_json:
        print(json.dumps(results))

"""A tiny, randomly initialised Stable Diffusion XL pipeline for tests and offline demos.

It is built from the same classes as stabilityai/stable-diffusion-xl-base-1.0 (two CLIP text encoders,
an SDXL-style UNet with "text_time" added conditioning, an AutoencoderKL with an 8x down-scale and an
Euler scheduler) and saved in the diffusers layout, so that `StableDiffusionXLPipeline.from_pretrained`
and everything downstream of it run unchanged. The pictures it draws are noise; what matters is that the
plumbing (prompt encoding, conditioning shapes, sampling, decoding) is the real one.

    from mini_gemini.testing.tiny_sdxl import build_tiny_sdxl
    build_tiny_sdxl("/tmp/tiny-sdxl")   # then ImageGenerator("/tmp/tiny-sdxl")
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Native size 64 px -> 8 x 8 latents, so a few sampling steps on a CPU take well under a second.
IMAGE_SIZE = 64
VAE_SCALE = 8                      # same 8x down-scale as the real SDXL VAE (4 blocks)
TIME_EMBED_DIM = 8                 # addition_time_embed_dim (SDXL: 256)
TEXT1_HIDDEN, TEXT2_HIDDEN = 32, 48  # SDXL: 768 (CLIP ViT-L) and 1280 (OpenCLIP bigG)
TEXT2_PROJECTION = 32              # pooled text embedding width of text_encoder_2 (SDXL: 1280)
MAX_TOKENS = 77                    # CLIP context length, as in SDXL

# Words that get whole-word BPE merges, so that common prompt words become single tokens.
_WORDS = ("a", "an", "the", "of", "and", "in", "on", "with", "photo", "picture", "painting", "cat", "dog",
          "red", "blue", "green", "sky", "sea", "tree", "house", "city", "night", "sun", "beautiful")


def _byte_alphabet() -> list[str]:
    """The 256 printable characters that byte-level BPE uses for the 256 byte values (GPT-2 / CLIP scheme):
    printable bytes map to themselves, the others to code points from 256 upwards."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small CLIP-style BPE vocabulary: every byte with and without the end-of-word mark "</w>", merges
    that assemble the words in _WORDS left to right, and the two special tokens last (as in CLIP)."""
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merge = (left, right)
            left = left + right
            if merge not in merges:
                merges.append(merge)
                tokens.append(left)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    return vocab, merges


def build_tiny_sdxl(out_dir, seed: int = 0) -> Path:
    """Build a tiny random StableDiffusionXLPipeline, save it to `out_dir` (diffusers layout) and return
    the folder. The same seed gives the same weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out = Path(out_dir)
    vocab, merges = _vocab_and_merges()
    # Both SDXL tokenizers are CLIP BPE tokenizers; they differ only in the pad token on the real model.
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)
    tokenizer_2 = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)

    def text_config(hidden: int, projection: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=projection,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_TOKENS, hidden_act="gelu",
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )

    # Seed once before building everything, so the whole pipeline is a function of `seed`; the global RNG
    # state is restored afterwards so callers' randomness is not disturbed.
    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config(TEXT1_HIDDEN, TEXT1_HIDDEN))
        text_encoder_2 = CLIPTextModelWithProjection(text_config(TEXT2_HIDDEN, TEXT2_PROJECTION))
        unet = UNet2DConditionModel(
            sample_size=IMAGE_SIZE // VAE_SCALE,
            in_channels=4, out_channels=4,
            block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            # SDXL cross-attends to the two encoders' penultimate hidden states concatenated on channels ...
            cross_attention_dim=TEXT1_HIDDEN + TEXT2_HIDDEN,
            # ... and adds an embedding of 6 size/crop numbers (each TIME_EMBED_DIM wide) plus the pooled
            # text embedding of text_encoder_2 to the timestep embedding.
            addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT2_PROJECTION,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=IMAGE_SIZE, scaling_factor=0.13025,  # SDXL VAE's latent scale
        )
    finally:
        torch.random.set_rng_state(rng_state)

    # The scheduler settings of SDXL base 1.0.
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False,
    )
    pipe.save_pretrained(out)
    # transformers 5 reads tokenizer.json; the vocab.json / merges.txt pair is what transformers 4's
    # (slow) CLIPTokenizer needs, so the folder loads with either.
    for name in ("tokenizer", "tokenizer_2"):
        (out / name / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
        (out / name / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out

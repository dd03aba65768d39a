"""The Mini-Gemini model: two vision towers, patch info mining, a projector and a causal LM.

    LR image (336) -> CLIP ViT      -> 576 tokens x 1024 ─┐ queries
    HR image (768) -> ConvNeXt-L    -> 192 x 192 x 2880 ──┴ keys/values -> mining -> projector -> LLM

The LLM is an unmodified transformers causal LM; visual tokens enter as `inputs_embeds` where the
prompt has an image slot (IMAGE_TOKEN_INDEX), so decoding runs the bare LLM's own loop.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.models.convnext import ConvNeXt
from torch import nn
from transformers import (CLIPVisionModel, GemmaForCausalLM, LlamaForCausalLM, MistralForCausalLM,
                          MixtralForCausalLM)

from .config import MGMConfig
from ..constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from .grid import grid_crops
from .mining import PatchInfoMining

LLM_CLASSES = {"gemma": GemmaForCausalLM, "llama": LlamaForCausalLM, "mistral": MistralForCausalLM,
               "mixtral": MixtralForCausalLM}


def sampling_kwargs(temperature: float, top_p: float) -> dict:
    """`generate` arguments for sampling at `temperature` with nucleus `top_p`, or greedy decoding when
    temperature is 0 (the generation config's own sampling settings are switched off then)."""
    if temperature > 0:
        return dict(do_sample=True, temperature=temperature, top_p=top_p)
    return dict(do_sample=False, temperature=None, top_p=None, top_k=None)


class Encoded(NamedTuple):
    image_features: torch.Tensor  # (B, V*N, D) visual tokens for the LLM
    attn: torch.Tensor    # (B, V, N, P*P) mining weights of every LR token over its HR window
    gain: torch.Tensor    # (B, V, N) relative change mining made to each LR token
    mined: torch.Tensor | None = None        # (B, V*N, C) the tokens the projector read (x + mined, or x)
    hr_features: torch.Tensor | None = None  # (B, C_aux, H, W) the HR tower's map (before any grid cut)
    lr_features: torch.Tensor | None = None  # (B, V*N, C) the LR tokens x before mining (projector(x): the ablation)


class MGMOutput(NamedTuple):
    loss: torch.Tensor | None          # mean cross-entropy over the label positions (labels given), else None
    logits: list | None                # labels not given: per sequence (L_i, vocab) float logits, else None
    first_token_accuracy: torch.Tensor | None  # share of answers whose first token is predicted right (labels)


class CLIPTower(nn.Module):
    """LR encoder: hidden states of `select_layer`, patch tokens only (CLS dropped)."""

    def __init__(self, config, select_layer: int = -2, select_feature: str = "patch"):
        super().__init__()
        self.clip = CLIPVisionModel(config)
        self.select_layer, self.select_feature = select_layer, select_feature

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.clip(pixel_values=pixels, output_hidden_states=True)
        h = out.hidden_states[self.select_layer]
        return h[:, 1:] if self.select_feature == "patch" else h


class ConvNeXtTower(nn.Module):
    """HR encoder: a timm ConvNeXt's stem and four stages; every stage resized to stage 0, concatenated."""

    def __init__(self, depths, dims):
        super().__init__()
        trunk = ConvNeXt(depths=tuple(depths), dims=tuple(dims), num_classes=0)
        self.vision_stem, self.vision_stages = trunk.stem, trunk.stages  # norm_pre and head are unused

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.vision_stem(pixels)
        feats = []
        for stage in self.vision_stages:
            x = stage(x)
            feats.append(x)
        size = feats[0].shape[-2:]
        # Resize in fp32 as the reference does, then back to the tower's dtype.
        feats = [feats[0]] + [F.interpolate(f.float(), size=size, mode="bilinear", align_corners=False).to(f.dtype)
                              for f in feats[1:]]
        return torch.cat(feats, dim=1)


def build_projector(kind: str, dim: int, hidden: int) -> nn.Module:
    """`linear` or `mlp{N}x_gelu` (MGM uses mlp2x_gelu: Linear, GELU, Linear)."""
    if kind == "linear":
        return nn.Linear(dim, hidden)
    m = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if not m:
        raise ValueError(f"Unsupported mm_projector_type {kind!r}")
    layers = [nn.Linear(dim, hidden)]
    for _ in range(int(m.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(hidden, hidden)]
    return nn.Sequential(*layers)


class MiniGemini(nn.Module):
    def __init__(self, config: MGMConfig):
        super().__init__()
        self.config = config
        self.llm = LLM_CLASSES[config.family](config.llm)
        self.vision_tower = CLIPTower(config.vision, config.select_layer, config.select_feature)
        self.vision_tower_aux = ConvNeXtTower(config.aux_depths, config.aux_dims)
        self.mining = PatchInfoMining(config.vision.hidden_size, config.mm_hidden_size_aux)
        self.mm_projector = build_projector(config.projector_type, config.vision.hidden_size,
                                            config.llm.hidden_size)
        # Set by the loader: the MGMProcessor (tokenizer, image processor, chat template).
        self.processor = None

    @property
    def device(self) -> torch.device:
        return next(self.mm_projector.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.mm_projector.parameters()).dtype

    # ---- vision ---------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, pixel_values_aux: torch.Tensor, *,
                      mining: bool = True) -> Encoded:
        """Encode images: both towers, patch info mining (DESIGN.md section 1.2) and the projector.

        Args:
            pixel_values: (B, V, 3, S, S) LR views in model order (HD: global first, then the grid row-major).
            pixel_values_aux: (B, 3, S_aux, S_aux) the HR image.
            mining: False gives the mining ablation: visual tokens = projector(x) instead of
                projector(x + mined); the weights and gain are still those mining computed (unused).

        Returns:
            `Encoded`: image_features (B, V*N, D) in the LLM's dtype, mining weights (B, V, N, P*P), mining
            gain (B, V, N), the projector's input (B, V*N, C), the HR tower's map (B, C_aux, H, W) and the LR
            tokens before mining (B, V*N, C).
        Gradients flow when the caller allows them (training); inference callers wrap it in no_grad.
        """
        lr, hr = pixel_values, pixel_values_aux
        b, v = lr.shape[:2]
        clip_p = next(self.vision_tower.parameters())
        conv_p = next(self.vision_tower_aux.parameters())
        x = self.vision_tower(lr.flatten(0, 1).to(clip_p.device, clip_p.dtype))          # (B*V, N, C)
        hr_map = self.vision_tower_aux(hr.to(conv_p.device, conv_p.dtype))                # (B, Ca, H, W)
        hr_features = hr_map
        mine_p = next(self.mining.parameters())
        x, hr_map = x.to(mine_p.device, mine_p.dtype), hr_map.to(mine_p.device, mine_p.dtype)
        g = self.config.image_grid
        if g > 1:
            maps = [grid_crops(hr_map, g)]                                                # (B, g*g, Ca, h, w)
            if self.config.image_global:
                glob = F.interpolate(hr_map.float(), scale_factor=1 / g, mode="bilinear", align_corners=False)
                maps.insert(0, glob.to(hr_map.dtype)[:, None])
            hr_map = torch.cat(maps, dim=1).flatten(0, 1)                                  # (B*V, Ca, h, w)
        mined, attn = self.mining(x, hr_map)
        # How much HR detail each LR token took in: |mined - x| / |x| (the heatmaps' "mining gain").
        gain = (mined - x).float().norm(dim=-1) / x.float().norm(dim=-1).clamp_min(1e-6)
        proj_p = next(self.mm_projector.parameters())
        read = mined if mining else x
        tokens = self.mm_projector(read.to(proj_p.device, proj_p.dtype))
        return Encoded(tokens.reshape(b, -1, tokens.shape[-1]), attn.reshape(b, v, *attn.shape[1:]),
                       gain.reshape(b, v, -1), read.reshape(b, -1, read.shape[-1]), hr_features,
                       x.reshape(b, -1, x.shape[-1]))

    # ---- language -------------------------------------------------------------------------------
    def embed(self, input_ids, image_tokens=()) -> torch.Tensor:
        """Token ids with IMAGE_TOKEN_INDEX slots -> embeddings with the visual tokens spliced in.

        Args:
            input_ids: sequence of ints (or a tensor), -200 (IMAGE_TOKEN_INDEX) where an image goes.
            image_tokens: one (T, D) tensor per slot, in order (`image_features` of `encode_images`).

        Returns:
            (1, L, D) tensor in the LLM's dtype, L = len(input_ids) + sum(T - 1); scaled as the LLM's own
            embedding layer scales (Gemma's sqrt(hidden) included, for text and visual tokens alike).

        Raises:
            ValueError: the number of slots and of image tensors differ.
        """
        embed = self.llm.get_input_embeddings()
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=embed.weight.device).flatten()
        slots = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
        if len(slots) != len(image_tokens):
            raise ValueError(f"The prompt has {len(slots)} image slots but {len(image_tokens)} images were given")
        text = embed(ids.clamp(min=0))
        # Gemma: the transformers-4 model the checkpoints were tuned with multiplied every input embedding,
        # visual tokens included, by sqrt(hidden); transformers 5 moved that factor into the token
        # embedding (`embed_scale`), so the visual tokens must get it here.
        scale = getattr(embed, "embed_scale", None)
        parts, start = [], 0
        for slot, feats in zip(slots, image_tokens):
            feats = feats.to(text.device, text.dtype)
            parts += [text[start:slot], feats * torch.as_tensor(scale).to(feats) if scale is not None else feats]
            start = slot + 1
        parts.append(text[start:])
        return torch.cat(parts)[None]

    def forward(self, input_ids: list, labels: list | None = None, *, pixel_values: torch.Tensor | None = None,
                pixel_values_aux: torch.Tensor | None = None, image_features: list | None = None,
                length_slack: float = 1.25) -> MGMOutput:
        """The model on a batch of conversations: the loss on the labelled positions (training), or the logits.

        Args:
            input_ids: B token id sequences (lists or 1-D tensors), IMAGE_TOKEN_INDEX where an image goes.
            labels: B label sequences as long as `input_ids` (IGNORE_INDEX where no loss is taken, IGNORE_INDEX at
                image slots); None: return the logits instead.
            pixel_values, pixel_values_aux: every image of the batch in slot order, (N, V, 3, S, S) and
                (N, 3, S_aux, S_aux) (`encode_images`); or
            image_features: the images' visual tokens already computed, one (T, D) tensor per slot in order.
            length_slack: sequences whose lengths are within this factor run padded together (a short question
                never pays for a long conversation).

        Returns:
            `MGMOutput`. With labels: loss = mean cross-entropy over the positions whose next token is labelled
            (logits are computed on those positions only) and the share of answers whose first token is right
            under teacher forcing. Without: the (L_i, vocab) logits of each sequence (L_i counts every visual token).
        Raises:
            ValueError: images and slots do not match.
        """
        if image_features is None:
            image_features = []
            if pixel_values is not None:
                image_features = list(self.encode_images(pixel_values, pixel_values_aux).image_features)
        embeds, full, k = [], [], 0
        for b, ids in enumerate(input_ids):
            ids = [int(i) for i in ids]
            n = ids.count(IMAGE_TOKEN_INDEX)
            mine = image_features[k:k + n]
            k += n
            embeds.append(self.embed(ids, mine)[0])
            if labels is not None:  # expand each image slot's label into one per visual token
                lab, j = [], 0
                for t, y in zip(ids, labels[b]):
                    if t == IMAGE_TOKEN_INDEX:
                        lab += [IGNORE_INDEX] * mine[j].shape[0]
                        j += 1
                    else:
                        lab.append(int(y))
                full.append(torch.tensor(lab))
        if k != len(image_features):
            raise ValueError(f"The batch has {k} image slots but {len(image_features)} images were given")
        if labels is None:
            head, decoder = self.llm.get_output_embeddings(), self.llm.get_decoder()
            return MGMOutput(None, [head(decoder(inputs_embeds=e[None]).last_hidden_state[0]).float()
                                    for e in embeds], None)
        loss, acc = self._answer_loss(embeds, full, length_slack)
        return MGMOutput(loss, None, acc)

    def _answer_loss(self, embeds: list, labels: list, slack: float):
        """Mean cross-entropy over the labelled positions and first-answer-token accuracy (see `forward`)."""
        dev = self.device
        decoder, head = self.llm.get_decoder(), self.llm.get_output_embeddings()
        order = sorted(range(len(embeds)), key=lambda i: embeds[i].shape[0])
        groups = [[order[0]]]
        for i in order[1:]:
            if embeds[i].shape[0] > slack * embeds[groups[-1][0]].shape[0]:
                groups.append([])
            groups[-1].append(i)
        total, count, hits, rows = 0.0, 0, 0, 0
        for g in groups:
            length = max(embeds[i].shape[0] for i in g)
            x = torch.zeros(len(g), length, embeds[0].shape[-1], dtype=embeds[0].dtype, device=dev)
            mask = torch.zeros(len(g), length, dtype=torch.long, device=dev)
            y = torch.full((len(g), length), IGNORE_INDEX, dtype=torch.long, device=dev)
            for r, i in enumerate(g):
                x[r, :embeds[i].shape[0]], mask[r, :embeds[i].shape[0]], y[r, :len(labels[i])] = \
                    embeds[i], 1, labels[i]
            hidden = decoder(inputs_embeds=x, attention_mask=mask).last_hidden_state[:, :-1]
            target = y[:, 1:]
            sel = target != IGNORE_INDEX
            logits = head(hidden[sel]).float()
            gold = target[sel]
            total = total + F.cross_entropy(logits, gold, reduction="sum")
            count += len(gold)
            row = sel.nonzero()[:, 0]
            first = torch.ones_like(row, dtype=torch.bool)
            first[1:] = row[1:] != row[:-1]
            hits += (logits[first].argmax(-1) == gold[first]).sum().item()
            rows += int(first.sum())
        return total / max(1, count), torch.tensor(hits / max(1, rows))

    @torch.no_grad()
    def generate(self, input_ids, image_tokens=(), *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, **kwargs) -> torch.Tensor:
        """Decode with the LLM's own `generate` from spliced embeddings; returns the new token ids."""
        embeds = self.embed(input_ids, image_tokens)
        tok = self.processor.tokenizer if self.processor is not None else None
        sampling = sampling_kwargs(temperature, top_p)
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long,
                                                                                device=embeds.device),
                                max_new_tokens=max_new_tokens,
                                pad_token_id=tok.pad_token_id if tok is not None and tok.pad_token_id is not None
                                else (tok.eos_token_id if tok is not None else None),
                                eos_token_id=tok.eos_token_id if tok is not None else None,
                                **sampling, **kwargs)
        return out[0]

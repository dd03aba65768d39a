"""The official checkpoint layout: transformers-4 weight names <-> this model's modules, and reading the
weight files (safetensors read tensor by tensor; pytorch_model*.bin; sharded with an index)."""
from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import torch

from ..errors import ModelLoadError
from .model import MiniGemini

# official prefix <-> our module path; anything else belongs to the LLM (`llm.` + its own name)
_PREFIXES = [
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower.clip."),  # transformers 5 CLIP has no vision_model.
    ("model.vision_tower_aux.", "vision_tower_aux."),
    ("model.mm_projector.", "mm_projector."),
    ("model.vlm_uni_query_projector.", "mining.query."),
    ("model.vlm_uni_aux_projector.", "mining.key."),
    ("model.vlm_uni_val_projector.", "mining.value."),
]
# Mixtral: checkpoints keep one Linear per expert (w1 gate, w3 up, w2 down); transformers 5 fuses them.
_MOE = re.compile(r"(model\.layers\.\d+)\.block_sparse_moe\.(?:experts\.(\d+)\.(w[123])|gate)\.weight")
_FUSED = re.compile(r"llm\.(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
# The LLM's parts left out by load_pretrained(llm_layers=False) (our names).
LLM_ONLY_PREFIXES = ("llm.model.layers.", "llm.lm_head.")
# Stored buffers that transformers 5 recomputes instead of loading.
IGNORED_KEYS = re.compile(r".*(\.position_ids|rotary_emb\.inv_freq)$")

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors",
                "pytorch_model.bin.index.json", "pytorch_model.bin")
HUB_METADATA = ["*.json", "*.model", "*.txt", "*.tiktoken"]




# ---- names ----------------------------------------------------------------------------------------
def to_internal(key: str):
    """Official name -> (our parameter name, slot) where slot = (expert, 'gate'|'up'|'down') for Mixtral."""
    m = _MOE.fullmatch(key)
    if m:
        layer, expert, w = m.groups()
        if expert is None:
            return f"llm.{layer}.mlp.gate.weight", None
        part = {"w1": "gate", "w3": "up", "w2": "down"}[w]
        fused = "down_proj" if part == "down" else "gate_up_proj"
        return f"llm.{layer}.mlp.experts.{fused}", (int(expert), part)
    for official, ours in _PREFIXES:
        if key.startswith(official):
            return ours + key[len(official):], None
    return "llm." + key, None


def to_official(name: str, tensor: torch.Tensor):
    """Our parameter -> [(official name, tensor)], splitting fused Mixtral experts."""
    m = _FUSED.fullmatch(name)
    if m:
        layer, kind = m.groups()
        out = []
        for e in range(tensor.shape[0]):
            base = f"{layer}.block_sparse_moe.experts.{e}"
            if kind == "down_proj":
                out.append((f"{base}.w2.weight", tensor[e]))
            else:
                gate, up = tensor[e].chunk(2, dim=0)
                out += [(f"{base}.w1.weight", gate), (f"{base}.w3.weight", up)]
        return out
    if name.startswith("llm."):  # the LLM keeps its own names; only the MoE router is renamed
        return [(re.sub(r"\.mlp\.gate\.weight$", ".block_sparse_moe.gate.weight", name[4:]), tensor)]
    for official, ours in _PREFIXES:
        if name.startswith(ours):
            return [(official + name[len(ours):], tensor)]
    raise KeyError(name)


def is_moe(model: MiniGemini) -> bool:
    return model.config.family == "mixtral"


def official_state_dict(model: MiniGemini) -> dict:
    sd, moe = {}, is_moe(model)
    tied = has_tied_embeddings(model)
    for name, t in model.state_dict().items():
        if tied and name == "llm.lm_head.weight":
            continue  # tied to embed_tokens: transformers-4 checkpoints leave it out
        if not moe and name.startswith("llm."):
            sd[name[4:]] = t
            continue
        for k, v in to_official(name, t):
            sd[k] = v.contiguous()
    return sd


def has_tied_embeddings(model: MiniGemini) -> bool:
    return bool(getattr(model.config.llm, "tie_word_embeddings", False))


# ---- files ----------------------------------------------------------------------------------------
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors(path):
    """Yield (name, tensor) from a .safetensors file, one tensor at a time.

    Plain reads into a fresh tensor rather than a memory map: the process then never holds the file's
    pages on top of the weights, which keeps peak memory at about the size of the weights.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ModelLoadError(f"{path} is not a safetensors file (too short); download it again.")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise ModelLoadError(f"{path} has a corrupt safetensors header; download it again.")
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        base = 8 + n
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = info["data_offsets"]
            t = torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]])
            if t.numel() * t.element_size() != end - start or base + end > size:
                raise ModelLoadError(f"{path}: tensor {name} is truncated; download the file again.")
            f.seek(base + start)
            if end > start:
                f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy()))
            yield name, t


def read_weights(path):
    path = str(path)
    if path.endswith(".safetensors"):
        yield from read_safetensors(path)
    else:
        yield from torch.load(path, map_location="cpu", mmap=True, weights_only=True).items()


def weight_files(folder: Path) -> list[Path]:
    for name in WEIGHT_FILES:
        p = folder / name
        if p.exists():
            if name.endswith(".index.json"):
                shards = json.loads(p.read_text())["weight_map"].values()
                return [folder / s for s in dict.fromkeys(shards)]
            return [p]
    raise ModelLoadError(f"No weights in {folder}: expected one of {', '.join(WEIGHT_FILES)}.")



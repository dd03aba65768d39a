"""An independent reference of the official MGM inference path, used only to check mini_gemini.

It is written from the official code's behaviour (mgm/serve/cli.py, mgm/mm_utils.py, mgm/model/mgm_arch.py,
the CLIP and OpenCLIP encoders, mgm/conversation.py) and shares no code with the package: it reads the
checkpoint files itself, runs the two vision towers as plain tensor functions over the stored weights,
follows the official tensor layout (HD: crops first, global last in the image tensor; global first in the
visual tokens), and decodes greedily with one full forward of the LLM per step (no `generate`, no cache).
Slow and simple on purpose; fine for the tiny checkpoints of the tests.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MEAN = (0.48145466, 0.4578275, 0.40821073)   # OpenAI CLIP processor
STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SLOT = -200

# official conversation templates, reduced to what one user turn needs: (head, before user msg, after)
_SYSTEM_VICUNA = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_SYSTEM_LLAMA3 = ("<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision "
                  "assistant. You are able to understand the visual content that the user provides, and "
                  "assist the user with a variety of tasks using natural language.")
# the text each template writes around the first user message; the answer starts right after
ONE_TURN = {
    "vicuna_v1": (_SYSTEM_VICUNA + " USER: ", " ASSISTANT:"),
    "llama_3": (_SYSTEM_LLAMA3 + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n",
                "<|eot_id|><|start_header_id|>system<|end_header_id|>\n\n"),
    "chatml_direct": ("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n",
                      "<|im_end|><|im_start|>assistant\n"),
    "gemma": ("<start_of_turn>user\n", "<end_of_turn>\n<start_of_turn>model\n"),
    "mistral_instruct": ("[INST] ", " [/INST]"),
}
STOP_STRINGS = {"vicuna_v1": ["</s>"], "llama_3": ["<|eot_id|>"], "chatml_direct": ["<|im_end|>"],
                "gemma": ["<end_of_turn>", "<eos>"], "mistral_instruct": ["</s>"]}
FAMILY_TEMPLATE = {"gemma": "gemma", "vicuna": "vicuna_v1", "llama3": "llama_3", "mistral": "mistral_instruct",
                   "mixtral": "mistral_instruct", "yi": "chatml_direct"}


def official_prompt(template: str, text: str, n_images: int = 1) -> str:
    """The prompt string of the official CLI for a first turn with `n_images` images."""
    head, tail = ONE_TURN[template]
    prompt = head + "<image>\n" * n_images + text + tail
    if prompt.count("<image>") >= 2:  # the CLI numbers the images when there are several
        parts = prompt.split("<image>")
        prompt = "".join(p + f"Image {i + 1}:<image>" for i, p in enumerate(parts[:-1])) + parts[-1]
    return prompt


# ---- checkpoint files ----------------------------------------------------------------------------
def read_checkpoint(folder) -> tuple[dict, dict]:
    """config.json and every stored tensor (official names), from safetensors or .bin, sharded or not."""
    from safetensors.torch import load_file
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    files = []
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index).exists():
            files = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            break
        if (folder / single).exists():
            files = [single]
            break
    weights = {}
    for name in files:
        path = folder / name
        weights.update(load_file(path) if name.endswith(".safetensors")
                       else torch.load(path, map_location="cpu", weights_only=True))
    return config, weights


def _sub(weights: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v.float() for k, v in weights.items() if k.startswith(prefix)}


# ---- the two towers as tensor functions ----------------------------------------------------------
def clip_features(w: dict, cfg: dict, pixels: torch.Tensor, select_layer: int) -> torch.Tensor:
    """CLIP ViT hidden state after `select_layer` (hidden_states indexing), patch tokens only."""
    heads = cfg["num_attention_heads"]
    eps = cfg.get("layer_norm_eps", 1e-5)
    n_layers = cfg["num_hidden_layers"]
    patch = w["embeddings.patch_embedding.weight"]
    x = F.conv2d(pixels, patch, stride=patch.shape[-1]).flatten(2).transpose(1, 2)      # (B, g*g, C)
    b, _, c = x.shape
    x = torch.cat([w["embeddings.class_embedding"].expand(b, 1, c), x], 1)
    x = x + w["embeddings.position_embedding.weight"]
    x = F.layer_norm(x, (c,), w["pre_layrnorm.weight"], w["pre_layrnorm.bias"], eps)
    # hidden_states[0] is the input of layer 0, hidden_states[i] the output of layer i-1
    run = select_layer if select_layer >= 0 else n_layers + 1 + select_layer
    for i in range(run):
        p = f"encoder.layers.{i}."
        h = F.layer_norm(x, (c,), w[p + "layer_norm1.weight"], w[p + "layer_norm1.bias"], eps)

        def split(t):
            return t.reshape(b, -1, heads, c // heads).transpose(1, 2)
        q, k, v = (split(F.linear(h, w[p + f"self_attn.{n}_proj.weight"], w[p + f"self_attn.{n}_proj.bias"]))
                   for n in "qkv")
        a = ((q * (c // heads) ** -0.5) @ k.transpose(-1, -2)).softmax(-1) @ v
        a = a.transpose(1, 2).reshape(b, -1, c)
        x = x + F.linear(a, w[p + "self_attn.out_proj.weight"], w[p + "self_attn.out_proj.bias"])
        h = F.layer_norm(x, (c,), w[p + "layer_norm2.weight"], w[p + "layer_norm2.bias"], eps)
        h = F.linear(h, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"])
        h = h * torch.sigmoid(1.702 * h)                                                  # quick_gelu
        x = x + F.linear(h, w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
    return x[:, 1:]


def _ln_channels(x, weight, bias, eps=1e-6):
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, bias, eps).permute(0, 3, 1, 2)


def convnext_features(w: dict, pixels: torch.Tensor) -> torch.Tensor:
    """OpenCLIP ConvNeXt stem + 4 stages; stages 1-3 resized bilinearly to stage 0 and concatenated."""
    x = F.conv2d(pixels, w["vision_stem.0.weight"], w["vision_stem.0.bias"], stride=4)
    x = _ln_channels(x, w["vision_stem.1.weight"], w["vision_stem.1.bias"])
    stages = []
    for s in range(4):
        p = f"vision_stages.{s}."
        if p + "downsample.0.weight" in w:
            x = _ln_channels(x, w[p + "downsample.0.weight"], w[p + "downsample.0.bias"])
            x = F.conv2d(x, w[p + "downsample.1.weight"], w[p + "downsample.1.bias"], stride=2)
        n_blocks = len({k.split(".")[3] for k in w if k.startswith(p + "blocks.")})
        for j in range(n_blocks):
            q = f"{p}blocks.{j}."
            dw = w[q + "conv_dw.weight"]
            y = F.conv2d(x, dw, w[q + "conv_dw.bias"], padding=dw.shape[-1] // 2, groups=x.shape[1])
            y = y.permute(0, 2, 3, 1)
            y = F.layer_norm(y, (y.shape[-1],), w[q + "norm.weight"], w[q + "norm.bias"], 1e-6)
            y = F.linear(F.gelu(F.linear(y, w[q + "mlp.fc1.weight"], w[q + "mlp.fc1.bias"])),
                         w[q + "mlp.fc2.weight"], w[q + "mlp.fc2.bias"])
            x = x + (y * w[q + "gamma"]).permute(0, 3, 1, 2)
        stages.append(x)
    size = stages[0].shape[-2:]
    return torch.cat([stages[0]] + [F.interpolate(t, size=size, mode="bilinear", align_corners=False)
                                    for t in stages[1:]], 1)


def _proj(w: dict, name: str, x):
    x = F.layer_norm(x, (x.shape[-1],), w[f"{name}.0.weight"], w[f"{name}.0.bias"], 1e-5)
    return F.linear(x, w[f"{name}.1.weight"], w[f"{name}.1.bias"])


def unified_resampler(w: dict, images: torch.Tensor, aux: torch.Tensor):
    """Official patch info mining. images (B, N, C), aux (B, Ca, H, W) -> (mined features, weights)."""
    side = int(images.shape[1] ** 0.5)
    p = aux.shape[-1] // side
    # every P x P block of the map, blocks row-major; inside a block, channel-major then row-major pixels
    blocks = F.unfold(aux, kernel_size=p, stride=p)                                   # (B, Ca*P*P, N)
    blocks = blocks.reshape(aux.shape[0], aux.shape[1], p * p, -1).permute(0, 3, 2, 1)  # (B, N, P*P, Ca)
    q = _proj(w, "vlm_uni_query_projector", images)
    k = _proj(w, "vlm_uni_aux_projector", blocks)
    v = _proj(w, "vlm_uni_val_projector", blocks)
    att = (q[:, :, None] @ (k.transpose(-1, -2) / math.sqrt(k.shape[-1]))).nan_to_num()
    weights = att.softmax(-1)
    return (weights @ v).mean(2), weights[:, :, 0]


# ---- the model ---------------------------------------------------------------------------------------
def _llm_classes(model_type: str):
    import transformers as T
    return {"mgm_gemma": (T.GemmaConfig, T.GemmaForCausalLM), "mgm": (T.LlamaConfig, T.LlamaForCausalLM),
            "mgm_mistral": (T.MistralConfig, T.MistralForCausalLM),
            "mgm_mixtral": (T.MixtralConfig, T.MixtralForCausalLM)}[model_type]


def _llm_state(weights: dict, n_experts: int) -> dict:
    """The checkpoint's LLM tensors under transformers-5 names (Mixtral experts fused: gate|up, down)."""
    towers = ("model.vision_tower", "model.mm_projector", "model.vlm_uni_")
    sd = {k: v for k, v in weights.items() if not k.startswith(towers)}
    for layer in sorted({k.split(".")[2] for k in sd if ".block_sparse_moe." in k}, key=int):
        base = f"model.layers.{layer}.block_sparse_moe."
        e = [f"{base}experts.{i}." for i in range(n_experts)]
        sd[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([sd.pop(x + "w1.weight"), sd.pop(x + "w3.weight")]) for x in e])
        sd[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack([sd.pop(x + "w2.weight") for x in e])
        sd[f"model.layers.{layer}.mlp.gate.weight"] = sd.pop(base + "gate.weight")
    return sd


class Reference:
    def __init__(self, folder):
        from transformers import AutoTokenizer
        from transformers.utils import logging
        self.cfg, weights = read_checkpoint(folder)
        cfg = self.cfg
        self.clip = _sub(weights, "model.vision_tower.vision_tower.vision_model.")
        self.conv = _sub(weights, "model.vision_tower_aux.")
        self.mine = {k[len("model."):]: v.float() for k, v in weights.items()
                     if k.startswith(("model.vlm_uni_", "model.mm_projector."))}
        self.clip_cfg = cfg["mm_vision_tower_config"]
        self.lr = self.clip_cfg["image_size"]
        self.hr = cfg["image_size_aux"]
        self.grid = cfg.get("image_grid", 1)
        self.global_view = cfg.get("image_global", False)

        config_cls, model_cls = _llm_classes(cfg["model_type"])
        fields = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures")}
        llm_cfg = config_cls(**fields)
        llm_cfg._attn_implementation = "eager"
        self.llm = model_cls(llm_cfg).eval()
        sd = _llm_state(weights, cfg.get("num_local_experts", 0))
        missing, unexpected = self.llm.load_state_dict(sd, strict=False)
        allowed = {"lm_head.weight"} if cfg.get("tie_word_embeddings") else set()
        assert set(missing) <= allowed and not unexpected, (missing, unexpected)
        if missing:
            self.llm.lm_head.weight = self.llm.model.embed_tokens.weight
        # The official Gemma (transformers 4.38+) multiplied every input embedding by sqrt(hidden), the
        # visual tokens included. Transformers 5 scales inside the token embedding, so text is already
        # scaled here and only the visual tokens need the factor.
        self.image_scale = torch.tensor(cfg["hidden_size"] ** 0.5) if cfg["model_type"] == "mgm_gemma" else 1.0
        level = logging.get_verbosity()
        logging.set_verbosity_error()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        logging.set_verbosity(level)

    # official process_images ('pad') + the CLI's LR/HD tensors
    def pad(self, image: Image.Image) -> Image.Image:
        image = image.convert("RGB")
        w, h = image.size
        side = max(w, h)
        out = Image.new("RGB", (side, side), tuple(int(m * 255) for m in MEAN))
        out.paste(image, ((side - w) // 2, (side - h) // 2))
        return out

    def preprocess(self, image: Image.Image):
        """-> images (V, 3, S, S) in official order (HD: crops row-major, then global), images_aux (3, H, H)."""
        sq = self.pad(image).resize((self.hr, self.hr), Image.BICUBIC)
        x = (np.asarray(sq, dtype=np.float64) * (1 / 255)).astype(np.float32)
        x = (x - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
        aux = torch.from_numpy(x).permute(2, 0, 1).contiguous()
        g, s = self.grid, self.lr
        lr = F.interpolate(aux[None], size=(s * g, s * g), mode="bilinear", align_corners=False)[0]
        if g == 1:
            return lr[None], aux
        crops = [lr[:, r * s:(r + 1) * s, c * s:(c + 1) * s] for r in range(g) for c in range(g)]
        if self.global_view:
            crops.append(F.interpolate(lr[None], size=(s, s), mode="bilinear", align_corners=False)[0])
        return torch.stack(crops), aux

    @torch.no_grad()
    def encode(self, image: Image.Image):
        """-> visual tokens (V*N, D) and mining weights (V, N, P*P), both in token order (global first)."""
        images, aux = self.preprocess(image)
        select = self.cfg.get("mm_vision_select_layer", -2)
        feats = clip_features(self.clip, self.clip_cfg, images, select)                # (V, N, C)
        aux_map = convnext_features(self.conv, aux[None])                               # (1, Ca, H, W)
        g = self.grid
        if g == 1:
            mined, weights = unified_resampler(self.mine, feats, aux_map)
            x = feats + mined
        else:
            side = aux_map.shape[-1] // g
            crops = torch.cat([aux_map[:, :, r * side:(r + 1) * side, c * side:(c + 1) * side]
                               for r in range(g) for c in range(g)])
            mined, weights = unified_resampler(self.mine, feats[:g * g], crops)
            x = feats[:g * g] + mined
            if self.global_view:
                small = F.interpolate(aux_map, scale_factor=1 / g, mode="bilinear", align_corners=False)
                gm, gw = unified_resampler(self.mine, feats[g * g:], small)
                x = torch.cat([feats[g * g:] + gm, x])
                weights = torch.cat([gw, weights])
        m = self.mine
        tokens = F.linear(F.gelu(F.linear(x, m["mm_projector.0.weight"], m["mm_projector.0.bias"])),
                          m["mm_projector.2.weight"], m["mm_projector.2.bias"])
        return tokens.flatten(0, 1), weights

    # official tokenizer_image_token
    def tokenize(self, prompt: str) -> list[int]:
        chunks = [self.tokenizer(c).input_ids for c in prompt.split("<image>")]
        bos = self.tokenizer.bos_token_id
        keep_bos = bool(chunks[0]) and chunks[0][0] == bos
        ids = [bos] if keep_bos else []
        for i, c in enumerate(chunks):
            if i:
                ids.append(IMAGE_SLOT)
            ids.extend(c[1:] if keep_bos else c)
        return ids

    def stop_ids(self, template: str) -> set[int]:
        vocab = self.tokenizer.get_vocab()
        return {self.tokenizer.eos_token_id} | {vocab[s] for s in STOP_STRINGS[template] if s in vocab}

    def embed(self, ids: list[int], image_tokens: list) -> torch.Tensor:
        """(L, D) input embeddings: text chunks through the token embedding, visual tokens in the slots."""
        emb = self.llm.get_input_embeddings()
        chunks, k, run = [], 0, []
        for i in ids + [None]:
            if i is None or i == IMAGE_SLOT:
                if run:
                    chunks.append(emb(torch.tensor(run)))
                run = []
                if i == IMAGE_SLOT:
                    chunks.append(image_tokens[k] * self.image_scale)
                    k += 1
            else:
                run.append(i)
        return torch.cat(chunks)

    @torch.no_grad()
    def greedy(self, ids: list[int], image_tokens: list, max_new: int, stop: set[int]) -> list[int]:
        """Greedy answer (stop token not included), one full forward per new token."""
        emb = self.llm.get_input_embeddings()
        seq = self.embed(ids, image_tokens)
        out = []
        for _ in range(max_new):
            nxt = int(self.llm(inputs_embeds=seq[None]).logits[0, -1].argmax())
            if nxt in stop:
                break
            out.append(nxt)
            seq = torch.cat([seq, emb(torch.tensor([nxt]))])
        return out

    def answer(self, image_list, text: str, template: str, max_new: int):
        """(prompt, new token ids, [mining weights per image]) for one first turn, as the official CLI."""
        prompt = official_prompt(template, text, len(image_list))
        encoded = [self.encode(im) for im in image_list]
        ids = self.tokenize(prompt)
        new = self.greedy(ids, [t for t, _ in encoded], max_new, self.stop_ids(template))
        return prompt, new, [w for _, w in encoded]

"""The models training starts from: the demo architecture (random), checkpoints, the LR-only ablation,
and which parameters each stage trains."""
from __future__ import annotations

import torch
from torch import nn

from ..modeling.model import MiniGemini

from ..constants import IGNORE_INDEX  # noqa: E402,F401 - one home; re-exported for the training modules
HR_OFF_KEY = "mgm_train_hr_disabled"  # config.json flag of an LR-only ablation checkpoint
STAGES = {0: "towers + everything", 1: "mining + projector", 2: "mining + projector + LLM"}
DEFAULT_LR = {0: 1e-3, 1: 1e-3, 2: 2e-5}


# ---- the demo model --------------------------------------------------------------------------------
DEMO_CLIP = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                 image_size=64, patch_size=8, projection_dim=64, hidden_act="quick_gelu")
DEMO_CONVNEXT = dict(depths=[1, 1, 2, 1], dims=[16, 32, 64, 96])
DEMO_LLM = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, max_position_embeddings=512)


def build_demo_model(seed: int = 0) -> MiniGemini:
    """The demo architecture: LR 64 px (patch 8 -> 8x8 tokens), HR 256 px (ConvNeXt stage 0 64x64, P = 8),
    a 3-layer Llama (the shipped demo model has 4: `--reset-llm --llm-layers 4`) with the vicuna_v1
    template; random weights, float32, trainable."""
    from ..modeling.chat_template import TEMPLATES
    from ..modeling.config import MGMConfig
    from ..modeling.image_processing import ImageProcessor
    from ..modeling.processing import MGMProcessor
    from ..testing.tiny import tiny_config
    from ..testing.tiny_tokenizer import build_tokenizer
    tok = build_tokenizer("vicuna")
    cfg = tiny_config("vicuna", tok, clip=dict(DEMO_CLIP), convnext=dict(DEMO_CONVNEXT), image_size_aux=256,
                      **DEMO_LLM)
    config = MGMConfig.from_dict(cfg)
    torch.manual_seed(seed)
    model = MiniGemini(config)
    # timm starts ConvNeXt's layer scale at 1e-6, which keeps a from-scratch 5-block tower close to the
    # identity for the few hundred steps trained here: start it at 1.
    # timm also draws its conv/linear weights with std 0.02; from scratch that left the tower on a loss
    # plateau (chance-level digits) for ~1000 steps, while PyTorch's default fan-in init leaves it after a
    # few hundred (measured on 32 px digit crops).
    for name, p in model.vision_tower_aux.named_parameters():
        if name.endswith("gamma"):
            p.data.fill_(1.0)
    for m in model.vision_tower_aux.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.reset_parameters()
    model.processor = MGMProcessor(tok, ImageProcessor.from_config(config), TEMPLATES["vicuna_v1"])
    return model


def reset_llm(model: MiniGemini, seed: int = 0, layers: int | None = None) -> MiniGemini:
    """Draw the LLM's weights afresh (PyTorch's default init for linear and embedding layers, norms at 1),
    keeping the towers, mining and projector; `layers`: rebuild it with that many decoder layers (the
    config follows, so the saved checkpoint loads as any other).

    Why: an LLM trained long on one kind of question stops learning others. The demo model's LLM, after
    900 steps of mostly digit questions, stayed at its prior on colour/count/yes-no questions through
    13,000 more examples of them, while the same 3-layer LLM drawn afresh learnt them from the same
    frozen visual tokens (model card, "Conversations").
    """
    torch.manual_seed(seed)
    if layers is not None and layers != model.config.llm.num_hidden_layers:
        from ..modeling.model import LLM_CLASSES
        model.config.llm.num_hidden_layers = layers
        if getattr(model.config.llm, "layer_types", None):
            model.config.llm.layer_types = model.config.llm.layer_types[:1] * layers
        model.llm = LLM_CLASSES[model.config.family](model.config.llm)
    for m in model.llm.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.reset_parameters()
        elif type(m).__name__.endswith("RMSNorm"):  # Gemma's norm scales by (1 + weight): its identity is 0
            m.weight.data.fill_(0.0 if type(m).__name__.startswith("Gemma") else 1.0)
    return model


def disable_hr(model: MiniGemini) -> MiniGemini:
    """LR-only ablation: the HR tower yields zeros (not computed), so mining adds the same vector to every
    token and no HR detail reaches the LLM; the visual token count is unchanged."""
    tower, c = model.vision_tower_aux, model.config.mm_hidden_size_aux
    side = model.config.image_size_aux // 4

    def zeros(pixels):
        return pixels.new_zeros(pixels.shape[0], c, side, side)
    tower.forward = zeros
    model.config.raw[HR_OFF_KEY] = True
    return model


def hr_disabled(model: MiniGemini) -> bool:
    return bool(model.config.raw.get(HR_OFF_KEY))


def load_for_training(init: str, seed: int = 0) -> MiniGemini:
    if init == "demo":
        return build_demo_model(seed)
    from ..modeling.loading import load_pretrained
    model = load_pretrained(init, device="cpu", dtype=torch.float32)
    if hr_disabled(model):
        disable_hr(model)
    return model


def set_stage(model: MiniGemini, stage: int) -> list[nn.Parameter]:
    """Freeze/unfreeze per stage; returns the trainable parameters."""
    if stage not in STAGES:
        raise ValueError(f"--stage must be one of {sorted(STAGES)} ({STAGES})")
    model.requires_grad_(stage == 0)
    model.mining.requires_grad_(True)
    model.mm_projector.requires_grad_(True)
    if stage == 2:
        model.llm.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]

"""MGM configuration: the official `config.json` read into an LLM config plus the vision settings.

An official checkpoint's config.json is the LLM's own config with MGM fields added (`mm_*`,
`image_size_aux`, `image_grid`, ...). The towers are named by paths that only existed on the authors'
disk (`model_zoo/OpenAI/...`); their weights live in the checkpoint, so all we need from those names is
the architecture, which is a known constant. Small self-describing checkpoints may carry the tower
shapes themselves (`mm_vision_tower_config`, `mm_vision_tower_aux_config`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from transformers import (CLIPVisionConfig, GemmaConfig, LlamaConfig, MistralConfig, MixtralConfig,
                          PretrainedConfig)

# family -> (transformers config class, official model_type, official architecture name)
FAMILIES = {
    "gemma": (GemmaConfig, "mgm_gemma", "MGMGemmaForCausalLM"),
    "llama": (LlamaConfig, "mgm", "MGMLlamaForCausalLM"),
    "mistral": (MistralConfig, "mgm_mistral", "MGMMistralForCausalLM"),
    "mixtral": (MixtralConfig, "mgm_mixtral", "MGMMixtralForCausalLM"),
}
_MODEL_TYPES = {mt: fam for fam, (_, mt, _) in FAMILIES.items()}
_ARCHS = {arch: fam for fam, (_, _, arch) in FAMILIES.items()}

# CLIP ViT-L/14 at 336 px: the LR tower of every released MGM checkpoint.
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                  layer_norm_eps=1e-5)
# OpenCLIP ConvNeXt trunks (timm names), keyed by a fragment of the official tower name.
CONVNEXT = {
    "convnext-large-d-320": dict(depths=[3, 3, 27, 3], dims=[192, 384, 768, 1536]),
    "convnext-base-w-320": dict(depths=[3, 3, 27, 3], dims=[128, 256, 512, 1024]),
    "convnext-xxlarge": dict(depths=[3, 4, 30, 3], dims=[384, 768, 1536, 3072]),
}
DEFAULT_VISION_TOWER = "model_zoo/OpenAI/clip-vit-large-patch14-336"
DEFAULT_VISION_TOWER_AUX = "model_zoo/OpenAI/openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup"


def family_of(cfg: dict) -> str:
    """The LLM family, from `model_type` or `architectures` (never from the checkpoint's name)."""
    mt = cfg.get("model_type", "")
    if mt in _MODEL_TYPES:
        return _MODEL_TYPES[mt]
    for arch in cfg.get("architectures") or []:
        if arch in _ARCHS:
            return _ARCHS[arch]
    if mt in FAMILIES:  # a plain LLM type (gemma/llama/...) with MGM fields added by hand
        return mt
    raise ValueError(
        f"Unsupported architecture: model_type={mt!r}, architectures={cfg.get('architectures')}. "
        f"Mini-Gemini checkpoints use model_type one of {sorted(_MODEL_TYPES)} "
        f"(LLM families: {', '.join(FAMILIES)}).")


def _clip_config(cfg: dict) -> CLIPVisionConfig:
    if cfg.get("mm_vision_tower_config"):
        return CLIPVisionConfig(**cfg["mm_vision_tower_config"])
    name = str(cfg.get("mm_vision_tower", DEFAULT_VISION_TOWER)).lower()
    if "clip-vit-large-patch14-336" in name or "clip-vit-large-patch14" in name and "336" in name:
        return CLIPVisionConfig(**CLIP_L_336)
    try:  # a real tower id or folder (e.g. a user's own training run); only its config is read
        return CLIPVisionConfig.from_pretrained(cfg["mm_vision_tower"])
    except Exception as e:
        raise ValueError(f"Unknown LR vision tower {cfg.get('mm_vision_tower')!r}: add its shape to "
                         "config.json as `mm_vision_tower_config` (a CLIPVisionConfig dict).") from e


def _convnext_config(cfg: dict) -> dict:
    if cfg.get("mm_vision_tower_aux_config"):
        aux = cfg["mm_vision_tower_aux_config"]
        return dict(depths=list(aux["depths"]), dims=list(aux["dims"]))
    name = str(cfg.get("mm_vision_tower_aux", DEFAULT_VISION_TOWER_AUX)).lower().replace("_", "-")
    for key, shape in CONVNEXT.items():
        if key in name:
            return copy.deepcopy(shape)
    raise ValueError(f"Unknown HR vision tower {cfg.get('mm_vision_tower_aux')!r}: add its shape to "
                     "config.json as `mm_vision_tower_aux_config` ({'depths': [...], 'dims': [...]}).")


@dataclass
class MGMConfig:
    family: str
    llm: PretrainedConfig
    vision: CLIPVisionConfig
    aux_depths: list
    aux_dims: list
    image_size_aux: int = 768
    image_grid: int = 1
    image_global: bool = False
    select_layer: int = -2
    select_feature: str = "patch"
    projector_type: str = "mlp2x_gelu"
    image_aspect_ratio: str = "pad"
    raw: dict = field(default_factory=dict)  # every original field, written back on save

    @property
    def lr_size(self) -> int:
        """Side of the LR image the CLIP tower sees, per view (336)."""
        return self.vision.image_size

    @property
    def tokens_per_view(self) -> int:
        return (self.vision.image_size // self.vision.patch_size) ** 2

    @property
    def views(self) -> int:
        return self.image_grid ** 2 + (1 if self.image_global and self.image_grid > 1 else 0)

    @property
    def patch_side(self) -> int:
        """P: each LR token mines a P x P window of the HR map (stage 0 is 1/4 of the HR side)."""
        lr_side = self.vision.image_size // self.vision.patch_size
        return self.image_size_aux // 4 // self.image_grid // lr_side

    @property
    def mm_hidden_size_aux(self) -> int:
        return sum(self.aux_dims)

    @property
    def task_scope(self):
        """What the checkpoint says it was trained to answer (`task_scope.TaskScope`), or None: anything."""
        from .task_scope import TaskScope
        return TaskScope.from_config(self.raw)

    @classmethod
    def from_dict(cls, cfg: dict) -> "MGMConfig":
        family = family_of(cfg)
        config_cls, model_type, _ = FAMILIES[family]
        llm_fields = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "auto_map")}
        llm = config_cls(**llm_fields)
        vision = _clip_config(cfg)
        aux = _convnext_config(cfg)
        if cfg.get("mm_projector_type", "mlp2x_gelu") is None:
            raise ValueError("config.json has no mm_projector_type")
        mgm = cls(family=family, llm=llm, vision=vision, aux_depths=aux["depths"], aux_dims=aux["dims"],
                  image_size_aux=int(cfg.get("image_size_aux", 768)),
                  image_grid=int(cfg.get("image_grid", 1) or 1),
                  image_global=bool(cfg.get("image_global", False)),
                  select_layer=int(cfg.get("mm_vision_select_layer", -2)),
                  select_feature=cfg.get("mm_vision_select_feature", "patch"),
                  projector_type=cfg.get("mm_projector_type", "mlp2x_gelu"),
                  image_aspect_ratio=cfg.get("image_aspect_ratio", "pad"), raw=dict(cfg))
        mgm.check()
        return mgm

    def check(self):
        if self.select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"mm_vision_select_feature {self.select_feature!r} is not supported")
        if self.image_aspect_ratio != "pad":
            raise ValueError(f"image_aspect_ratio {self.image_aspect_ratio!r} is not supported (only 'pad')")
        aux_map = self.image_size_aux // 4 // self.image_grid
        lr_side = self.vision.image_size // self.vision.patch_size
        towers = self.assumed_towers_note
        if aux_map % lr_side:
            raise ValueError(f"config.json does not fit together: the HR map side (image_size_aux {self.image_size_aux}"
                             f" / 4 / image_grid {self.image_grid} = {aux_map}) is not a multiple of the LR tower's "
                             f"{lr_side} x {lr_side} token grid." + towers)
        declared = self.raw.get("mm_hidden_size_aux")
        if declared is not None and declared != self.mm_hidden_size_aux:
            raise ValueError(f"config.json says mm_hidden_size_aux={declared} but the HR tower "
                             f"(dims {self.aux_dims}) gives {self.mm_hidden_size_aux}." + towers)

    @property
    def assumed_towers_note(self) -> str:
        """Without explicit tower shapes the released towers are assumed: said when the numbers disagree."""
        if self.raw.get("mm_vision_tower_config") and self.raw.get("mm_vision_tower_aux_config"):
            return ""
        return (" config.json has no mm_vision_tower_config / mm_vision_tower_aux_config, so the towers were "
                "taken to be the released ones (CLIP ViT-L/14-336, OpenCLIP ConvNeXt-L); for other tower sizes "
                "add those two entries.")

    def to_dict(self) -> dict:
        """The official config.json layout: the LLM's fields plus the MGM fields."""
        _, model_type, arch = FAMILIES[self.family]
        out = dict(self.raw)
        out.update(self.llm.to_dict())
        out.update(model_type=model_type, architectures=[arch],
                   mm_vision_tower=self.raw.get("mm_vision_tower", DEFAULT_VISION_TOWER),
                   mm_vision_tower_aux=self.raw.get("mm_vision_tower_aux", DEFAULT_VISION_TOWER_AUX),
                   mm_projector_type=self.projector_type, mm_hidden_size=self.vision.hidden_size,
                   mm_hidden_size_aux=self.mm_hidden_size_aux, mm_vision_select_layer=self.select_layer,
                   mm_vision_select_feature=self.select_feature, image_size_aux=self.image_size_aux,
                   image_grid=self.image_grid, image_global=self.image_global,
                   image_aspect_ratio=self.image_aspect_ratio,
                   mm_use_im_start_end=self.raw.get("mm_use_im_start_end", False),
                   mm_use_im_patch_token=self.raw.get("mm_use_im_patch_token", False))
        out.pop("transformers_version", None)
        return out

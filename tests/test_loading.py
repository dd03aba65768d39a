"""Checkpoints in the official layout: exact names, bit-exact round trips, shards, and clear errors."""
import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mini_gemini.modeling.config import MGMConfig
from mini_gemini.modeling.loading import ModelLoadError, load_pretrained, save_pretrained
from mini_gemini.testing.tiny import build_tiny


def stored_keys(folder) -> set:
    keys = set()
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            keys |= set(h.keys())
    for f in sorted(folder.glob("*.bin")):
        keys |= set(torch.load(f, weights_only=True))
    return keys


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def rewrite(folder, edit):
    """Apply `edit` to the single model.safetensors of a copied checkpoint."""
    sd = load_file(folder / "model.safetensors")
    edit(sd)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


def copy_of(tiny_checkpoint, tmp_path, family="vicuna", **kw):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint(family, **kw), dst)
    return dst


# ---- names ---------------------------------------------------------------------------------------
OFFICIAL = [
    r"model\.vision_tower\.vision_tower\.vision_model\.(embeddings|pre_layrnorm|encoder|post_layernorm)\..+",
    r"model\.vision_tower_aux\.vision_stem\.[01]\.(weight|bias)",
    r"model\.vision_tower_aux\.vision_stages\.\d\.(downsample\.[01]\.(weight|bias)|blocks\.\d+\..+)",
    r"model\.mm_projector\.[02]\.(weight|bias)",
    r"model\.vlm_uni_(query|aux|val)_projector\.[01]\.(weight|bias)",
    r"model\.embed_tokens\.weight", r"model\.norm\.weight", r"lm_head\.weight",
    r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight",
    r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight",
    r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight",
    r"model\.layers\.\d+\.block_sparse_moe\.(gate|experts\.\d+\.w[123])\.weight",
]


@pytest.mark.parametrize("family,hd", [("gemma", False), ("vicuna", False), ("mixtral", True)])
def test_written_names_are_the_official_ones(family, hd, tiny_checkpoint):
    keys = stored_keys(tiny_checkpoint(family, hd=hd))
    odd = [k for k in keys if not any(re.fullmatch(p, k) for p in OFFICIAL)]
    assert not odd, odd
    for prefix in ("model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight",
                   "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.bias",
                   "model.vision_tower_aux.vision_stem.0.weight", "model.vision_tower_aux.vision_stages.3.blocks.0.gamma",
                   "model.vision_tower_aux.vision_stages.1.downsample.1.weight", "model.mm_projector.2.bias",
                   "model.vlm_uni_query_projector.0.weight", "model.vlm_uni_aux_projector.1.weight",
                   "model.vlm_uni_val_projector.1.bias", "model.embed_tokens.weight", "model.norm.weight"):
        assert prefix in keys
    assert ("lm_head.weight" in keys) == (family != "gemma")      # Gemma ties it to embed_tokens
    if family == "mixtral":
        for e in range(4):
            for w in ("w1", "w2", "w3"):
                assert f"model.layers.1.block_sparse_moe.experts.{e}.{w}.weight" in keys
        assert "model.layers.0.block_sparse_moe.gate.weight" in keys
        assert not [k for k in keys if k.startswith("model.layers.") and ".mlp." in k]
    cfg = json.loads((tiny_checkpoint(family, hd=hd) / "config.json").read_text())
    assert cfg["model_type"] == {"gemma": "mgm_gemma", "vicuna": "mgm", "mixtral": "mgm_mixtral"}[family]
    assert cfg["image_grid"] == (2 if hd else 1) and cfg["image_global"] == hd


def test_mixtral_experts_are_split_as_gate_up_down(tiny_checkpoint):
    model = build_tiny("mixtral")          # the same seed as the fixture's checkpoint
    sd = load_file(tiny_checkpoint("mixtral") / "model.safetensors")
    experts = model.llm.model.layers[0].mlp.experts
    inter = experts.gate_up_proj.shape[1] // 2
    for e in range(4):
        base = f"model.layers.0.block_sparse_moe.experts.{e}."
        assert torch.equal(sd[base + "w1.weight"], experts.gate_up_proj[e, :inter])
        assert torch.equal(sd[base + "w3.weight"], experts.gate_up_proj[e, inter:])
        assert torch.equal(sd[base + "w2.weight"], experts.down_proj[e])


# ---- round trips ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,hd", [("gemma", False), ("mixtral", False), ("vicuna", True)])
def test_save_load_round_trip_is_bit_exact(family, hd, tiny_checkpoint, tmp_path):
    original = build_tiny(family, hd=hd)
    loaded = load_pretrained(str(tiny_checkpoint(family, hd=hd)), device="cpu", dtype=torch.float32)
    assert_same_state(original, loaded)
    if family == "gemma":
        assert loaded.llm.lm_head.weight.data_ptr() == loaded.llm.model.embed_tokens.weight.data_ptr()
    # and again: what we write from a loaded model is what we read
    again = save_pretrained(loaded, tmp_path / "again")
    assert stored_keys(again) == stored_keys(tiny_checkpoint(family, hd=hd))
    assert_same_state(loaded, load_pretrained(str(again), device="cpu", dtype=torch.float32))


@pytest.mark.parametrize("safe", [True, False])
def test_sharded_checkpoints_with_index_load(safe, tmp_path):
    original = build_tiny("mixtral")
    out = save_pretrained(original, tmp_path / "sharded", max_shard_size="100KB", safe_serialization=safe)
    ext = "safetensors" if safe else "bin"
    shards = sorted(out.glob(f"*.{ext}"))
    assert len(shards) > 2
    index = json.loads((out / f"{'model.safetensors' if safe else 'pytorch_model.bin'}.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert set(index["weight_map"]) == stored_keys(out)
    assert_same_state(original, load_pretrained(str(out), device="cpu", dtype=torch.float32))


def test_old_transformers_buffers_are_ignored(tiny_checkpoint, tmp_path):
    """Checkpoints saved with transformers 4 may hold position_ids / rotary inv_freq buffers."""
    folder = copy_of(tiny_checkpoint, tmp_path)

    def add(sd):
        sd["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
        sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    rewrite(folder, add)
    load_pretrained(str(folder), device="cpu")


# ---- errors ----------------------------------------------------------------------------------------------
def test_missing_and_unexpected_weights_are_named(tiny_checkpoint, tmp_path):
    folder = copy_of(tiny_checkpoint, tmp_path)
    rewrite(folder, lambda sd: sd.pop("model.mm_projector.0.bias"))
    with pytest.raises(ModelLoadError, match=r"missing weights: model\.mm_projector\.0\.bias"):
        load_pretrained(str(folder), device="cpu")
    rewrite(folder, lambda sd: sd.update({"model.mm_projector.0.bias": torch.zeros(64),
                                          "model.extra_head.weight": torch.zeros(3)}))
    with pytest.raises(ModelLoadError, match=r"unexpected weights: model\.extra_head\.weight"):
        load_pretrained(str(folder), device="cpu")


def test_missing_expert_slice_is_named(tiny_checkpoint, tmp_path):
    folder = copy_of(tiny_checkpoint, tmp_path, family="mixtral")
    rewrite(folder, lambda sd: sd.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(ModelLoadError) as err:
        load_pretrained(str(folder), device="cpu")
    assert "missing weights: model.layers.1.block_sparse_moe.experts.2.w3.weight." in str(err.value)


def test_paths_that_are_not_checkpoints(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_pretrained(str(tmp_path / "nowhere" / "MGM-2B"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_pretrained(str(tmp_path / "empty"), device="cpu")


def test_unsupported_architecture(tiny_checkpoint, tmp_path):
    folder = copy_of(tiny_checkpoint, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="mgm_phi", architectures=["MGMPhiForCausalLM"])
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="Unsupported architecture.*mgm_phi"):
        load_pretrained(str(folder), device="cpu")


def test_offline_hub_id_not_cached_says_how_to_get_it(monkeypatch, tmp_path):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="hf download someone/not-cached-mgm"):
        load_pretrained("someone/not-cached-mgm", device="cpu")


@pytest.mark.parametrize("hd", [False, True])
def test_model_zoo_tower_names_map_to_the_released_shapes(hd):
    cfg = dict(model_type="mgm", architectures=["MGMLlamaForCausalLM"], hidden_size=4096,
               mm_vision_tower="model_zoo/OpenAI/clip-vit-large-patch14-336",
               mm_vision_tower_aux="model_zoo/OpenAI/openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup",
               mm_hidden_size=1024, mm_hidden_size_aux=2880, mm_projector_type="mlp2x_gelu",
               mm_vision_select_layer=-2, mm_vision_select_feature="patch", image_aspect_ratio="pad",
               image_size_aux=1536 if hd else 768, image_grid=2 if hd else 1, image_global=hd)
    c = MGMConfig.from_dict(cfg)
    v = c.vision
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.image_size, v.patch_size,
            v.intermediate_size) == (1024, 24, 16, 336, 14, 4096)
    assert c.aux_dims == [192, 384, 768, 1536] and c.aux_depths == [3, 3, 27, 3]
    assert c.mm_hidden_size_aux == 2880 and c.lr_size == 336
    assert (c.tokens_per_view, c.patch_side, c.views) == (576, 8, 5 if hd else 1)


def test_tiny_checkpoint_without_tower_shapes_fails_clearly(tiny_checkpoint, tmp_path):
    """Without the *_config entries the released tower shapes are assumed; tiny weights must then be
    refused with a message naming the problem, never loaded into mis-shaped towers."""
    folder = copy_of(tiny_checkpoint, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    for k in ("mm_vision_tower_config", "mm_vision_tower_aux_config"):
        cfg.pop(k)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="mm_vision_tower_config"):
        load_pretrained(str(folder), device="cpu")
    # sizes that fit the released towers: the weights themselves are refused, by name and shape
    cfg.update(image_size_aux=768)
    for k in ("mm_hidden_size", "mm_hidden_size_aux"):
        cfg.pop(k)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as err:
        load_pretrained(str(folder), device="cpu")
    msg = str(err.value)
    assert "wrong shapes: " in msg and "mm_vision_tower_config" in msg
    assert "model.vision_tower.vision_tower.vision_model.embeddings.class_embedding [32] where config.json " \
           "gives [1024]" in msg

"""Load and save Mini-Gemini checkpoints in the official layout (transformers-4 weight names).

Loading builds the model on the meta device and streams each stored tensor straight into its final
place, so the weights exist once in memory. It is strict: a missing or unexpected weight is an error
that names it. Saving writes the same layout, so other MGM tools read what we write.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device

from ..errors import ModelLoadError
from ..resources import resolve_model_name
from .config import MGMConfig
from .model import MiniGemini
from .image_processing import ImageProcessor
from .processing import MGMProcessor
from .quantization import FORMATS as QUANTIZATION_FORMATS, Int8Loader, is_quantized

from .checkpoint_format import (  # noqa: F401 - the official names and files, re-exported
    LLM_ONLY_PREFIXES, HUB_METADATA, IGNORED_KEYS, WEIGHT_FILES, is_moe, has_tied_embeddings, official_state_dict, read_safetensors,
    read_weights, to_internal, to_official, weight_files)

log = logging.getLogger(__name__)

# ---- locating a checkpoint ------------------------------------------------------------------------
def resolve(name_or_path: str, revision: str | None = None) -> Path:
    """A local folder, or a hub id fetched into (or found in) the Hugging Face cache."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise ModelLoadError(f"{name_or_path} is a file; pass the folder that holds config.json.")
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1
    if looks_local:
        raise ModelLoadError(f"Model folder not found: {name_or_path}. Pass a folder with config.json and "
                             "the weights, or a Hugging Face model id such as YanweiLi/MGM-2B.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    try:
        folder = Path(snapshot_download(name_or_path, revision=revision,
                                        allow_patterns=HUB_METADATA + ["*.safetensors"]))
        if not any(folder.glob("*.safetensors")):  # older repos only have pytorch_model*.bin
            folder = Path(snapshot_download(name_or_path, revision=revision, allow_patterns=HUB_METADATA + ["*.bin"]))
        return folder
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as e:
        raise ModelLoadError(f"{name_or_path} was not found on the Hugging Face hub (or needs a login: "
                             f"`hf auth login`). Check the id, e.g. YanweiLi/MGM-2B. ({type(e).__name__})") from e
    except (LocalEntryNotFoundError, OSError) as e:
        raise ModelLoadError(
            f"{name_or_path} is not in the local Hugging Face cache and the hub cannot be reached. "
            f"On a machine with internet run `hf download {name_or_path}` (it fills the cache that this "
            f"app reads; copy ~/.cache/huggingface if needed), then run with HF_HUB_OFFLINE=1; or pass a local "
            f"folder. The bundled demo model (`--model demo`) works offline. ({type(e).__name__})") from e


# ---- loading --------------------------------------------------------------------------------------
def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _default_dtype(device: str) -> torch.dtype:
    if str(device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _plan_devices(model, device_map, dtype):
    """device_map 'auto' / 'balanced' / a dict -> {module prefix: device} (accelerate decides)."""
    if isinstance(device_map, dict):
        return device_map
    from accelerate import infer_auto_device_map
    layer_classes = {type(m).__name__ for m in model.modules()
                     if type(m).__name__.endswith(("DecoderLayer", "EncoderLayer", "Stage"))}
    return infer_auto_device_map(model, no_split_module_classes=sorted(layer_classes), dtype=dtype)


def _device_for(name: str, plan: dict):
    best, dev = -1, None
    for prefix, d in plan.items():
        if (prefix == "" or name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
            best, dev = len(prefix), d
    if dev is None:
        raise ModelLoadError(f"device_map gives no device for {name}")
    if dev == "disk":
        raise ModelLoadError("device_map puts weights on disk; give more max_memory or use a smaller dtype.")
    return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)


def load_weights(model: MiniGemini, files, dtype: torch.dtype, plan: dict, quantization: str | None = None):
    """Stream the checkpoint's tensors into a meta-initialised model (strict, official names).

    quantization="int8": the layers `quantization.Int8Loader` covers are swapped for int8 ones first and each of
    their tensors is quantized as it arrives (the float model's names and shapes are still what is checked).
    """
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    dropped = not getattr(model, "llm_layers", True)  # load_pretrained(llm_layers=False)
    tied = has_tied_embeddings(model) and not dropped
    if tied:
        shapes.pop("llm.lm_head.weight", None)
    quant = Int8Loader(model, tied) if quantization else None
    expected = set(shapes)
    fused: dict[str, set] = {}       # fused Mixtral tensor -> official expert keys filled so far
    unexpected, wrong_shape, bad, seen = [], [], set(), set()
    for file in files:
        if not Path(file).exists():
            raise ModelLoadError(f"Missing weight shard {file}; download the checkpoint again.")
        for key, t in read_weights(file):
            name, slot = to_internal(key)
            if IGNORED_KEYS.fullmatch(key) or (tied and name == "llm.lm_head.weight") or \
                    (dropped and name.startswith(LLM_ONLY_PREFIXES)):
                continue
            if name not in expected:
                unexpected.append(key)
                continue
            want = shapes[name]
            if slot is not None:  # one expert's gate / up / down inside the fused tensor
                want = want[1:] if slot[1] == "down" else (want[1] // 2, want[2])
            if tuple(t.shape) != want:
                wrong_shape.append(f"{key} {list(t.shape)} where config.json gives {list(want)}")
                bad.add(name)
                continue
            if quant is not None and quant.take(name, t, slot):
                if slot is None:
                    seen.add(name)
                else:  # one expert's piece: what is absent is reported piece by piece, as below
                    fused.setdefault(name, set()).add(key)
                continue
            device = _device_for(name, plan)
            value = t.to(dtype) if t.is_floating_point() else t
            if slot is None:  # dtype given, else accelerate casts to the meta model's default fp32
                set_module_tensor_to_device(model, name, device, value=value, dtype=value.dtype)
                seen.add(name)
                continue
            # Fill one expert's slice of a fused Mixtral tensor.
            expert, part = slot
            if name not in fused:
                set_module_tensor_to_device(model, name, device, value=torch.empty(shapes[name], dtype=dtype,
                                                                                   device=device), dtype=dtype)
                fused[name] = set()
            p = model.get_parameter(name).data
            half = p.shape[1] // 2
            rows = {"down": slice(None), "gate": slice(0, half), "up": slice(half, None)}[part]
            p[expert, rows].copy_(value)
            fused[name].add(key)
    # Report what is absent under the checkpoint's own names (for Mixtral: the absent expert slices).
    missing = []
    for name in sorted(expected - seen - bad):
        keys = [k for k, _ in to_official(name, torch.empty(shapes[name], device="meta"))]
        missing += [k for k in keys if k not in fused.get(name, ())]
    if missing or unexpected or wrong_shape:
        def show(keys):
            return ", ".join(keys[:8]) + (f" (and {len(keys) - 8} more)" if len(keys) > 8 else "")
        parts = []
        if wrong_shape:
            parts.append(f"wrong shapes: {show(wrong_shape)}")
        if missing:
            parts.append(f"missing weights: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected weights: {show(unexpected)}")
        hint = model.config.assumed_towers_note if wrong_shape else ""
        raise ModelLoadError("The checkpoint does not match its config.json — " + "; ".join(parts) +
                             ". Nothing was initialised at random; check that the files are complete." + hint)
    if quant is not None:
        quant.finish(model)
    elif tied:
        model.llm.tie_weights()


def _quantize(model: MiniGemini, bits: int, dtype: torch.dtype):
    """bitsandbytes 4/8-bit for the LLM's decoder Linear layers (towers, projectors and lm_head stay).

    The layers are swapped in place, still holding their weights on the CPU; bitsandbytes quantises each
    weight when it is moved to the GPU afterwards (Int8Params only from the CPU: weights already on a
    GPU would stay unquantised and be converted again at every forward)."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ModelLoadError("4/8-bit loading needs bitsandbytes: pip install bitsandbytes") from e
    for module in list(model.llm.model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            bias = child.bias is not None
            # device="meta": the layer's own fresh weight is replaced below, so it is never allocated (on
            # the CPU that would be an fp32 copy of the whole LLM, randomly initialised layer by layer)
            if bits == 4:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=bias, compute_dtype=dtype,
                                      quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4", module=q)
            else:
                q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=bias,
                                        has_fp16_weights=False, threshold=6.0, device="meta")
                q.weight = bnb.nn.Int8Params(child.weight.data, requires_grad=False, has_fp16_weights=False)
            if bias:
                q.bias = child.bias
            setattr(module, child_name, q)


def load_pretrained(name_or_path: str, *, device: str | None = None, dtype: torch.dtype | str | None = None,
                    device_map=None, load_in_4bit: bool = False, load_in_8bit: bool = False,
                    template: str | None = None, revision: str | None = None,
                    llm_layers: bool = True, quantization: str | None = None) -> MiniGemini:
    """Load an MGM checkpoint (hub id or folder) with its processor (tokenizer, image processor, template).

    Args:
        name_or_path: a hub id ("YanweiLi/MGM-2B", fetched into or read from the Hugging Face cache), a
            folder in the official layout (config.json, safetensors or .bin shards with an index, tokenizer), or
            "demo" (the bundled demo model, as `--model demo`).
        device: "cuda", "cuda:1", "cpu" (default: cuda when available).
        dtype: torch dtype or its name (default: bfloat16 on CUDA, float32 on CPU).
        device_map: None (everything on `device`), "auto" (accelerate spreads it over GPUs and CPU), or a dict.
        load_in_4bit / load_in_8bit: quantise the LLM's decoder linear layers with bitsandbytes (CUDA only;
            the model goes whole onto `device`, `device_map` is not used).
        template: chat template name overriding the one chosen from the config and tokenizer.
        revision: hub revision (branch, tag or commit).
        quantization: None (weights in `dtype`) or "int8": CPU inference with 8-bit weights and activations
            (modeling/quantization.py: the LLM, its head and embedding, and the vision towers' Linear layers),
            quantized tensor by tensor while loading; about 4x less memory than float32, faster prefill,
            image encoding and decode (README: CPU). CPU only.

    Returns:
        `MiniGemini` in eval mode, without gradients, with `.processor` (`MGMProcessor`) and `.name_or_path`.

    Raises:
        ModelLoadError: not found, offline and not cached, not an MGM checkpoint, or a missing, unexpected or
            mis-shaped weight (named in the message).

    llm_layers=False: leave out the LLM's decoder layers and output head (only its token embedding and final
    norm are loaded), for a process whose LLM runs on a server (`Engine(model, llm_server=URL)`): the towers,
    mining and projector work as usual, the model cannot generate by itself.
    """
    from .chat_template import select_template
    folder = resolve(resolve_model_name(str(name_or_path)), revision)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ModelLoadError(f"{folder} has no config.json; it is not a Mini-Gemini checkpoint.")
    try:
        config = MGMConfig.from_dict(json.loads(cfg_path.read_text()))
    except ValueError as e:
        raise ModelLoadError(str(e)) from e
    quant = 4 if load_in_4bit else 8 if load_in_8bit else 0
    if quant and not torch.cuda.is_available():
        raise ModelLoadError("4/8-bit loading (bitsandbytes) needs a CUDA GPU; load without it on CPU.")
    device = device or _default_device()
    if quantization is not None:
        if quantization not in QUANTIZATION_FORMATS:
            raise ModelLoadError(f"Unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATION_FORMATS)}.")
        if quant or device_map is not None or not str(device).startswith("cpu"):
            raise ModelLoadError(f"quantization={quantization!r} is for CPU inference; on a GPU use "
                                 "--load-in-8bit / --load-in-4bit instead.")
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                 "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
    dtype = dtype or _default_dtype(device)

    with init_empty_weights(include_buffers=False):
        model = MiniGemini(config)
    if not llm_layers:
        model.llm.model.layers = torch.nn.ModuleList()
        model.llm.lm_head = None
        model.llm_layers = False
    if quant:
        # bitsandbytes quantises while moving weights from the CPU to the GPU: load on the CPU, then move
        # the quantised model whole onto `device` (a device_map is not used: a 4-bit 7B fits one GPU)
        if device_map is not None:
            log.warning("load_in_4bit / load_in_8bit: device_map=%r is not used; the quantised model goes on %s",
                        device_map, device)
        plan = {"": "cpu"}
    else:
        plan = _plan_devices(model, device_map, dtype) if device_map is not None else {"": device}
    load_weights(model, weight_files(folder), dtype, plan, quantization)
    if quant:
        _quantize(model, quant, dtype)
        model.to(device)
    elif device_map is not None:
        from accelerate import dispatch_model
        dispatch_model(model, device_map=plan)
    else:
        model.to(device)  # moves the buffers; the weights are already there
    model.eval().requires_grad_(False)

    tokenizer = _load_tokenizer(folder, config.family)
    model.processor = MGMProcessor(tokenizer, ImageProcessor.from_config(config),
                                   select_template(config.raw, tokenizer, template))
    model.name_or_path = str(name_or_path)
    return model


def _load_tokenizer(folder: Path, family: str | None = None):
    """The checkpoint's tokenizer, giving the ids and texts of MGM's official stack (see official_tokenizer)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    from .official_tokenizer import align_with_official
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # it reads our config.json and warns that `mgm_*` is no tokenizer type
    try:
        return align_with_official(AutoTokenizer.from_pretrained(folder), folder, family)
    except Exception as e:
        raise ModelLoadError(f"Could not load the tokenizer from {folder}: {e}. The checkpoint needs its "
                             "tokenizer files (tokenizer.json or tokenizer.model + tokenizer_config.json).") from e
    finally:
        hf_logging.set_verbosity(level)


# ---- saving ---------------------------------------------------------------------------------------
def save_pretrained(model: MiniGemini, out_dir, *, max_shard_size: str | int = "5GB", safe_serialization=True):
    """Write a checkpoint in the official layout: config.json, the weights under their transformers-4 names
    (sharded with an index past `max_shard_size`) and the tokenizer files.

    Args:
        model: a `MiniGemini` (its `.processor` supplies the tokenizer).
        out_dir: folder to write (created if needed).
        max_shard_size: "5GB" or a number of bytes.
        safe_serialization: safetensors (True) or pytorch_model*.bin (False).

    Returns:
        The folder, as a Path.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    if is_quantized(model):
        raise ModelLoadError("This model was loaded with quantization (int8 weights); saving it would lose the "
                             "float weights. Load the checkpoint without quantization to save it.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = official_state_dict(model)
    pattern = "model{suffix}.safetensors" if safe_serialization else "pytorch_model{suffix}.bin"
    split = split_torch_state_dict_into_shards(sd, filename_pattern=pattern, max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        shard = {k: sd[k].detach().cpu().contiguous() for k in keys}
        if safe_serialization:
            from safetensors.torch import save_file
            save_file(shard, out / filename, metadata={"format": "pt"})
        else:
            torch.save(shard, out / filename)
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
                 "weight_map": split.tensor_to_filename}
        (out / (pattern.format(suffix="") + ".index.json")).write_text(json.dumps(index, indent=2, sort_keys=True))
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = str(model.dtype).replace("torch.", "")
    cfg.pop("dtype", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
    if model.processor is not None:
        model.processor.save_pretrained(out)
    return out

"""Write what a vLLM server needs to serve the LLM inside an MGM checkpoint.

    python -m mini_gemini.export_llm CHECKPOINT OUT      # or: mgm-export-llm CHECKPOINT OUT
    vllm serve OUT --enable-prompt-embeds                # then: mgm --llm-server http://HOST:8000 ...

Every MGM checkpoint holds a plain Gemma / Llama / Mistral / Mixtral next to its vision towers and projectors.
OUT gets:
- config.json: the LLM's own config (architectures GemmaForCausalLM / LlamaForCausalLM / MistralForCausalLM /
  MixtralForCausalLM, model_type gemma / llama / mistral / mixtral, the LLM's fields, no `mm_*` / image fields);
- the tokenizer files (and generation_config.json when the checkpoint has one);
- the LLM's weights under the names vLLM reads (the transformers-4 names the checkpoints already use:
  `model.embed_tokens.*`, `model.layers.*`, `model.norm.*`, `lm_head.*`; Mixtral's experts as
  `block_sparse_moe.experts.N.w1/w2/w3`, which vLLM's Mixtral loads), with a model.safetensors.index.json.

Nothing is loaded as a model and the checkpoint is not copied where that can be avoided:
- a safetensors shard that holds only LLM tensors is hard-linked (no extra disk; a copy where OUT is on
  another file system, or with --copy);
- from a shard that also holds tower / projector tensors, only the LLM tensors are written, their bytes
  copied straight from the file in ranges (no decoding, memory stays small whatever the shard size);
- pytorch_model*.bin checkpoints (older repos) are read with a memory map and written as safetensors;
- tokenizer and small json files are hard-linked too (or copied).
The vision towers, mining and projector are not written: they keep running in the MGM process, which sends
vLLM the spliced embeddings (`--llm-server`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
from pathlib import Path

from ..errors import ModelLoadError
from .config import FAMILIES, family_of

# official name prefixes of everything that is not the LLM (see loading._PREFIXES)
NOT_LLM = ("model.vision_tower.", "model.vision_tower_aux.", "model.mm_projector.", "model.vlm_uni_",
           "model.image_newline")
_STALE = (".rotary_emb.inv_freq", ".position_ids")  # buffers that loaders recompute
LLM_ARCH = {"gemma": "GemmaForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "mixtral": "MixtralForCausalLM"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                   "generation_config.json")


def is_llm_key(key: str) -> bool:
    return not key.startswith(NOT_LLM) and not key.endswith(_STALE)


def llm_config(raw: dict) -> dict:
    """The official MGM config.json -> the LLM's own config.json (what vLLM / transformers read)."""
    family = family_of(raw)
    config_cls = FAMILIES[family][0]
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "auto_map")}
    llm = config_cls(**fields).to_dict()
    known = set(config_cls().to_dict())
    out = {k: v for k, v in llm.items() if k in known and not k.startswith("mm_")}
    dtype = raw.get("torch_dtype") or raw.get("dtype") or llm.get("dtype")
    if dtype:
        out["dtype"] = out["torch_dtype"] = str(dtype).replace("torch.", "")
    out.pop("transformers_version", None)
    out.update(architectures=[LLM_ARCH[family]], model_type=config_cls.model_type)
    if family == "gemma" and out.get("hidden_act"):
        # what transformers runs (it reads the released "gelu" as the tanh approximation); vLLM reads this field
        out["hidden_activation"] = out["hidden_act"]
    return out


def _link_or_copy(src: Path, dst: Path, copy: bool) -> str:
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    if not copy:
        try:
            os.link(src.resolve(), dst)
            return "linked"
        except OSError:
            pass
    shutil.copyfile(src, dst)
    return "copied"


def _st_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ModelLoadError(f"{path} is not a safetensors file (too short).")
        (n,) = struct.unpack("<Q", head)
        header = json.loads(f.read(n))
    return header, 8 + n


def _write_st_subset(src: Path, keys: list[str], header: dict, base: int, dst: Path, chunk: int = 64 << 20):
    """Write the tensors `keys` of safetensors file `src` to `dst`, copying their bytes in ranges."""
    new, offset = {"__metadata__": {"format": "pt"}}, 0
    for k in keys:
        start, end = header[k]["data_offsets"]
        new[k] = {"dtype": header[k]["dtype"], "shape": header[k]["shape"], "data_offsets": [offset, offset + end - start]}
        offset += end - start
    blob = json.dumps(new, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    tmp = dst.with_name(dst.name + ".part")
    with open(src, "rb") as fi, open(tmp, "wb") as fo:
        fo.write(struct.pack("<Q", len(blob)))
        fo.write(blob)
        for k in keys:
            start, end = header[k]["data_offsets"]
            fi.seek(base + start)
            left = end - start
            while left:
                buf = fi.read(min(chunk, left))
                if not buf:
                    raise ModelLoadError(f"{src}: tensor {k} is truncated; download the file again.")
                fo.write(buf)
                left -= len(buf)
    os.replace(tmp, dst)
    return offset


def export_llm(checkpoint, out, *, copy: bool = False, log=print) -> Path:
    """Write the LLM of an MGM checkpoint (folder or hub id) to `out` in the layout vLLM serves. Returns `out`."""
    from .loading import resolve, weight_files
    folder = resolve(str(checkpoint))
    out = Path(out)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ModelLoadError(f"{folder} has no config.json; it is not a Mini-Gemini checkpoint.")
    if out.resolve() == folder.resolve():
        raise ModelLoadError("OUT must be another folder than the checkpoint.")
    raw = json.loads(cfg_path.read_text())
    try:
        config = llm_config(raw)
    except ValueError as e:
        raise ModelLoadError(str(e)) from e
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.safetensors")) + list(out.glob("*.safetensors.index.json")):
        old.unlink()  # an earlier export's shards would be served too

    weight_map, total, how = {}, 0, {}
    for src in weight_files(folder):
        if not src.exists():
            raise ModelLoadError(f"Missing weight shard {src}; download the checkpoint again.")
        if src.suffix == ".safetensors":
            header, base = _st_header(src)
            header.pop("__metadata__", None)
            keys = sorted((k for k in header if is_llm_key(k)), key=lambda k: header[k]["data_offsets"][0])
            if not keys:
                continue
            dst = out / src.name
            if len(keys) == len(header):
                how[src.name] = _link_or_copy(src, dst, copy)
                size = sum(header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in keys)
            else:
                size = _write_st_subset(src, keys, header, base, dst)
                how[src.name] = f"{len(keys)} of {len(header)} tensors written"
        else:  # pytorch_model*.bin
            import torch
            from safetensors.torch import save_file
            sd = torch.load(src, map_location="cpu", mmap=True, weights_only=True)
            part = {k: v.contiguous().clone() for k, v in sd.items() if is_llm_key(k)}
            del sd
            if not part:
                continue
            dst = out / (src.name.split(".")[0].replace("pytorch_model", "model") + ".safetensors")
            save_file(part, dst, metadata={"format": "pt"})
            keys, size = list(part), sum(t.numel() * t.element_size() for t in part.values())
            how[src.name] = f"{len(keys)} tensors converted to {dst.name}"
            del part
        total += size
        weight_map.update({k: dst.name for k in keys})
    if not weight_map:
        raise ModelLoadError(f"No LLM weights found in {folder}.")
    if "model.embed_tokens.weight" not in weight_map:
        raise ModelLoadError(f"{folder} holds no model.embed_tokens.weight: not an MGM checkpoint in the official layout.")
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    for name in TOKENIZER_FILES:
        if (folder / name).exists():
            how[name] = _link_or_copy(folder / name, out / name, copy)
    if not any((out / n).exists() for n in ("tokenizer.json", "tokenizer.model")):
        log(f"warning: {folder} has no tokenizer.json / tokenizer.model; vLLM needs the tokenizer files.")
    for name, what in how.items():
        log(f"  {name}: {what}")
    log(f"{len(weight_map)} LLM tensors ({total / 2**30:.2f} GiB), {config['architectures'][0]}, written to {out}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mgm-export-llm", description=__doc__.split("\n\n")[0],
                                 epilog="Then: vllm serve OUT --enable-prompt-embeds, and run MGM with "
                                        "--llm-server http://HOST:PORT.")
    ap.add_argument("checkpoint", help="MGM checkpoint folder or hub id (YanweiLi/MGM-2B)")
    ap.add_argument("out", help="folder to write the LLM to (vLLM's --model)")
    ap.add_argument("--copy", action="store_true", help="copy files instead of hard-linking them")
    args = ap.parse_args(argv)
    try:
        export_llm(args.checkpoint, args.out, copy=args.copy)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

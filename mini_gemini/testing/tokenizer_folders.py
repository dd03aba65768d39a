"""Tokenizer folders as checkpoints write them, assembled from the real files stored in tests/data/tokenizers
(sentencepiece only / tokenizer.json only / both; `legacy` absent, null, true, false; added chat tokens).

Shared by the golden-id generator (tools/make_golden_ids.py, run with MGM's old pins) and the tests.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path


def _sp_proto_module():
    try:  # sentencepiece >= 0.2 ships a module that works with current protobuf
        from sentencepiece import sentencepiece_model_pb2
        return sentencepiece_model_pb2
    except Exception:  # sentencepiece 0.1.99 + new protobuf: use the copy transformers carries
        from transformers.convert_slow_tokenizer import import_protobuf
        return import_protobuf()


def assemble(variant: dict, dest: Path, store: Path) -> Path:
    """Lay out one variant's tokenizer folder in `dest` (which must exist)."""
    for name, src in variant["files"].items():
        shutil.copyfile(store / src, dest / name)
    for name, content in variant["write"].items():
        content = dict(content)
        base = content.pop("__from__", None)
        if base is not None:
            content = {**json.loads((store / base).read_text(encoding="utf-8")), **content}
        (dest / name).write_text(json.dumps(content, indent=2, ensure_ascii=False), encoding="utf-8")
    if variant.get("sp_normalizer_patch"):
        proto = _sp_proto_module().ModelProto()
        proto.ParseFromString((dest / "tokenizer.model").read_bytes())
        for key, value in variant["sp_normalizer_patch"].items():
            setattr(proto.normalizer_spec, key, value)
        (dest / "tokenizer.model").write_bytes(proto.SerializeToString())
    patch = variant.get("tokenizer_json_patch")
    if patch:
        path = dest / "tokenizer.json"
        tj = json.loads(path.read_text(encoding="utf-8"))
        tj["added_tokens"] = tj.get("added_tokens", []) + patch.get("add_tokens", [])
        if "post_processor" in patch:
            tj["post_processor"] = patch["post_processor"]
        path.write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    return dest

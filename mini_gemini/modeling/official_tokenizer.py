"""Tokenizers that give the ids MGM's official stack gives (transformers 4.36.2 / tokenizers 0.15.0 /
sentencepiece 0.1.99), built with transformers 5.

transformers 5 has no slow sentencepiece Llama tokenizer any more and reads a folder differently from 4.36:
it treats a missing `legacy` as False, orders the BPE merges of a tokenizer.model by piece id (Llama's "▁▁"
then merges first: "a  b" gets other ids), adds no bos when tokenizer_config.json has no `add_bos_token`,
rewrites a tokenizer.json's normaliser/pre-tokeniser from `legacy`, and skips `clean_up_tokenization_spaces`
for BPE. `align_with_official` puts back what the official loader (`mgm/model/builder.py`) gets.
"""

from __future__ import annotations

import json
from pathlib import Path

# mgm/model/builder.py: "8x7b" (Mixtral) and "2b" (Gemma) load the default (fast) tokenizer, every other
# checkpoint AutoTokenizer.from_pretrained(path, use_fast=False) (the slow sentencepiece LlamaTokenizer).
OFFICIAL_FAST_FAMILIES = frozenset({"mixtral", "gemma"})
_SP_LLAMA_CLASSES = frozenset({"LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer",
                               "CodeLlamaTokenizerFast"})


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _sp_proto(path: Path):
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto


def _bpe_from_sentencepiece(proto):
    """The BPE model transformers 4.36 converts a sentencepiece BPE model to: merges ordered by the score
    of the piece they make (stable, ties in piece-id order), which is how sentencepiece itself merges."""
    from tokenizers.models import BPE
    pieces = [(p.piece, p.score) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    ranked = []
    for piece, score in pieces:
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                  if piece[:k] in vocab and piece[k:] in vocab]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        ranked.extend((score, lr) for lr in splits)
    ranked.sort(key=lambda item: item[0], reverse=True)  # sorted() is stable: equal scores keep their order
    spec = proto.trainer_spec
    unk = spec.unk_piece if spec.unk_id >= 0 else None
    return BPE(vocab=vocab, merges=[lr for _, lr in ranked], unk_token=unk, fuse_unk=True,
               byte_fallback=spec.byte_fallback, dropout=None)


def _written_specials(json_file: Path) -> set[str] | None:
    """The special tokens a tokenizer.json's TemplateProcessing puts around a single text (None: no such
    post-processor)."""
    post = _read_json(json_file).get("post_processor") or {}
    steps = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "TemplateProcessing":
            return {item["SpecialToken"]["id"] for item in step.get("single", []) if "SpecialToken" in item}
    return None


def _llama_decoder():
    from tokenizers import decoders
    return decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                              decoders.Strip(" ", 1, 0)])


def _is_sentencepiece_style(folder: Path, tok) -> bool:
    if (folder / "tokenizer.model").exists():
        return True
    model = getattr(tok.backend_tokenizer, "model", None)  # a converted sentencepiece model falls back to bytes
    return type(model).__name__ == "BPE" and bool(getattr(model, "byte_fallback", False))


def align_with_official(tok, folder, family: str | None = None):
    """Make `tok` (from AutoTokenizer.from_pretrained(folder) under transformers 5) encode and decode as the
    official MGM loader's tokenizer for this folder and LLM family does. Returns `tok`."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    folder = Path(folder)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return tok
    cfg = _read_json(folder / "tokenizer_config.json")
    cls_name = str(cfg.get("tokenizer_class") or type(tok).__name__)
    llama_sp = cls_name in _SP_LLAMA_CLASSES and _is_sentencepiece_style(folder, tok)

    if llama_sp:
        sp_file, json_file = folder / "tokenizer.model", folder / "tokenizer.json"
        slow = family not in OFFICIAL_FAST_FAMILIES and sp_file.exists()
        if slow:  # 4.36's slow LlamaTokenizer: the sentencepiece model, legacy missing/None -> True
            legacy = cfg.get("legacy")
            legacy = True if legacy is None else bool(legacy)
            proto = _sp_proto(sp_file)
            backend.model = _bpe_from_sentencepiece(proto)
            charsmap = proto.normalizer_spec.precompiled_charsmap
            backend.normalizer = normalizers.Precompiled(charsmap) if charsmap else None
            scheme = ("always" if proto.normalizer_spec.add_dummy_prefix else "never") if legacy else "first"
            backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
            backend.decoder = _llama_decoder()
        elif json_file.exists():  # 4.36's LlamaTokenizerFast: tokenizer.json as written, whatever `legacy` says
            legacy = True
            written = Tokenizer.from_file(str(json_file))
            backend.model = written.model
            backend.normalizer = written.normalizer
            backend.pre_tokenizer = written.pre_tokenizer
            backend.decoder = written.decoder
        else:  # 4.36's converter from tokenizer.model: always prepends "▁" to each text
            legacy = True
            backend.model = _bpe_from_sentencepiece(_sp_proto(sp_file))
            backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
            backend.pre_tokenizer = None
            backend.decoder = _llama_decoder()
        tok.legacy = legacy  # saved with the tokenizer, so that a reload takes the same path
        # bos/eos as 4.36's Llama classes add them (add_bos_token defaults to True there)
        add_bos, add_eos = bool(cfg.get("add_bos_token", True)), bool(cfg.get("add_eos_token", False))
        if not slow and json_file.exists():  # a folder saved by transformers 5 has no add_*_token keys:
            written = _written_specials(json_file)  # its tokenizer.json says what it adds
            if written is not None:
                add_bos = bool(cfg.get("add_bos_token", str(tok.bos_token) in written))
                add_eos = bool(cfg.get("add_eos_token", str(tok.eos_token) in written))
        for name, value in (("add_bos_token", add_bos), ("add_eos_token", add_eos)):
            try:  # keep the attributes (written by save_pretrained) in step; the post-processor is set below
                setattr(tok, name, value)
            except (AttributeError, TypeError, ValueError):
                pass
        specials, single = [], "$A:0"
        if add_bos and tok.bos_token is not None:
            single = f"{tok.bos_token}:0 {single}"
            specials.append((tok.bos_token, tok.bos_token_id))
        if add_eos and tok.eos_token is not None:
            single = f"{single} {tok.eos_token}:0"
            specials.append((tok.eos_token, tok.eos_token_id))
        pair = single + " " + single.replace("$A:0", "$B:1").replace(":0", ":1")
        backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    # decoding: clean_up_tokenization_spaces as 4.36 read it (absent: False for Llama classes, True otherwise)
    clean = cfg.get("clean_up_tokenization_spaces")
    if clean is None:
        clean = not cls_name.startswith(("Llama", "CodeLlama", "Gemma"))
    tok.clean_up_tokenization_spaces = bool(clean)
    if clean:  # transformers 5 otherwise skips the clean-up for BPE models
        tok.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    return tok

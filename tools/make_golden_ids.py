#!/usr/bin/env python
"""Write tests/data/golden_token_ids.json: prompt ids and answer texts as the official MGM stack makes them.

Run it in a side environment that holds MGM's pins, never in the project's own:

    python -m venv /tmp/venv-official
    /tmp/venv-official/bin/pip install transformers==4.36.2 tokenizers==0.15.0 sentencepiece==0.1.99 protobuf
    /tmp/venv-official/bin/python tools/make_golden_ids.py

(torch is not needed.) What the official stack does, and what this script reproduces:

* `mgm/model/builder.py` loads the tokenizer with `AutoTokenizer.from_pretrained(path, use_fast=False)` for
  Llama-architecture checkpoints (Vicuna, Llama 3, Yi) and with the default (fast) for Mixtral 8x7B and
  Gemma 2B; `OFFICIAL_USE_FAST` below follows it per family.
* prompts are written by `mgm/conversation.py` (`get_prompt()`), images are put in front of the first user
  message by `mgm/serve/cli.py` ("<image>\\n" per image) and, with two or more images in the prompt, each
  "<image>" becomes "Image k:<image>"; `official_prompt()` below rebuilds these strings.
* ids come from `mgm.mm_utils.tokenizer_image_token`; `image_token_ids()` below re-implements it.
* the CLI keeps each answer as `tokenizer.batch_decode(output_ids, skip_special_tokens=True)[0].strip()`.

The real tokenizer files live once under tests/data/tokenizers/<base>/ (see PROVENANCE there); every
variant folder (sentencepiece only, tokenizer.json only, both; `legacy` true/false/absent/null; added
ChatML tokens ...) is described in the output's "variants" and assembled into a temporary folder by
`assemble()`: the tests assemble them the same way from the JSON alone.

Gemma has no golden here: transformers 4.36.2 (MGM's pin) has no Gemma tokenizer at all, and no real
Gemma 1 tokenizer file is available from the package registries (npm's gemma3 package is Gemma 3, a
different vocabulary). The gemma *template* is still covered with the other tokenizers.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "tests" / "data" / "tokenizers"
OUT = ROOT / "tests" / "data" / "golden_token_ids.json"
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200

# ----------------------------------------------------------------------------------------------------
# tokenizer folders


def _decoder_entry(content: str, special: bool = True) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special}


def _old_added_token(content: str) -> dict:
    # how transformers 4.2x-4.33 wrote special tokens into tokenizer_config.json (e.g. Vicuna v1.5)
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}


_SP_DECODER = {"0": _decoder_entry("<unk>"), "1": _decoder_entry("<s>"), "2": _decoder_entry("</s>")}


def _sp_config(legacy="absent", **extra) -> dict:
    """A tokenizer_config.json as transformers 4.34+ writes it for a Llama sentencepiece tokenizer."""
    cfg = {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": copy.deepcopy(_SP_DECODER),
           "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>",
           "model_max_length": 4096, "pad_token": None, "sp_model_kwargs": {},
           "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>"}
    if legacy != "absent":
        cfg["legacy"] = legacy
    cfg.update(extra)
    return cfg


# Vicuna-v1.5-style config of the 4.31 era: no `legacy` key, special tokens as AddedToken dicts
_VICUNA_OLD_CONFIG = {
    "add_bos_token": True, "add_eos_token": False, "bos_token": _old_added_token("<s>"),
    "clean_up_tokenization_spaces": False, "eos_token": _old_added_token("</s>"), "model_max_length": 4096,
    "pad_token": None, "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
    "unk_token": _old_added_token("<unk>")}
_VICUNA_OLD_SPECIAL_MAP = {"bos_token": _old_added_token("<s>"), "eos_token": _old_added_token("</s>"),
                           "pad_token": "<unk>", "unk_token": _old_added_token("<unk>")}

# ChatML tokens added on top of a Llama sentencepiece vocabulary, as Yi / Nous-Hermes-2 folders carry them
_CHATML_IDS = {"<|im_start|>": 32000, "<|im_end|>": 32001}


def _chatml_config(legacy="absent") -> dict:
    cfg = _sp_config(legacy, eos_token="<|im_end|>", pad_token="<unk>")
    for tok, i in _CHATML_IDS.items():
        cfg["added_tokens_decoder"][str(i)] = _decoder_entry(tok)
    cfg["additional_special_tokens"] = list(_CHATML_IDS)
    return cfg


_CHATML_JSON_ADD = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                     "normalized": False, "special": True} for tok, i in _CHATML_IDS.items()]

# the later Llama 3 files: bos added by the post-processor, eos of the instruct model
_LLAMA3_BOS_POST = {"type": "Sequence", "processors": [
    {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
    {"type": "TemplateProcessing",
     "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}}],
     "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
              {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
     "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000],
                                              "tokens": ["<|begin_of_text|>"]}}}]}


def _variants() -> dict[str, dict]:
    """name -> {family, files: {dest: store path}, write: {dest: json}, tokenizer_json_patch, note}."""
    V: dict[str, dict] = {}

    def add(name, family, files, write, patch=None, sp_patch=None, note=""):
        V[name] = {"family": family, "files": files, "write": write, "tokenizer_json_patch": patch,
                   "sp_normalizer_patch": sp_patch, "note": note}

    l2_sp = {"tokenizer.model": "llama2/tokenizer.model"}
    l2_js = {"tokenizer.json": "llama2/tokenizer.json"}
    add("llama2-sp-nolegacy-minimal", "llama2", l2_sp, {"tokenizer_config.json": {"tokenizer_class": "LlamaTokenizer"}},
        note="the issue's folder: tokenizer.model + a config with only tokenizer_class")
    add("llama2-sp-nolegacy-vicuna", "llama2", l2_sp,
        {"tokenizer_config.json": _VICUNA_OLD_CONFIG, "special_tokens_map.json": _VICUNA_OLD_SPECIAL_MAP},
        note="Vicuna-v1.5-style (transformers 4.31) config, no legacy key")
    add("llama2-sp-legacy-null", "llama2", l2_sp, {"tokenizer_config.json": _sp_config(None)})
    add("llama2-sp-legacy-true", "llama2", l2_sp, {"tokenizer_config.json": _sp_config(True)})
    add("llama2-sp-legacy-false", "llama2", l2_sp, {"tokenizer_config.json": _sp_config(False)})
    add("llama2-both-nolegacy", "llama2", {**l2_sp, **l2_js}, {"tokenizer_config.json": _sp_config()})
    add("llama2-both-legacy-true", "llama2", {**l2_sp, **l2_js}, {"tokenizer_config.json": _sp_config(True)})
    add("llama2-both-legacy-false", "llama2", {**l2_sp, **l2_js}, {"tokenizer_config.json": _sp_config(False)})
    add("llama2-json-nolegacy", "llama2", l2_js, {"tokenizer_config.json": _sp_config()},
        note="no tokenizer.model: use_fast=False cannot build the slow class, the fast one is used")
    add("llama2-json-legacy-false", "llama2", l2_js, {"tokenizer_config.json": _sp_config(False)})

    add("chatml-sp-nolegacy", "chatml", l2_sp,
        {"tokenizer_config.json": _chatml_config(), "added_tokens.json": dict(_CHATML_IDS)},
        note="Llama 2 vocabulary + <|im_start|>/<|im_end|> added (Yi / Nous-Hermes-2 layout), no legacy key")
    add("chatml-sp-legacy-false", "chatml", l2_sp,
        {"tokenizer_config.json": _chatml_config(False), "added_tokens.json": dict(_CHATML_IDS)})
    add("chatml-sp-nobos-nolegacy", "chatml", l2_sp,
        {"tokenizer_config.json": {**_chatml_config(), "add_bos_token": False}, "added_tokens.json": dict(_CHATML_IDS)},
        note="as Nous-Hermes-2-Yi-34B: add_bos_token false, so prompts start without a bos")
    add("chatml-sp-nodummy-nolegacy", "chatml", l2_sp,
        {"tokenizer_config.json": _chatml_config(), "added_tokens.json": dict(_CHATML_IDS)},
        sp_patch={"add_dummy_prefix": False},
        note="Yi-style sentencepiece model: add_dummy_prefix false (no '▁' put in front of a text)")
    add("chatml-both-nolegacy", "chatml", {**l2_sp, **l2_js}, {"tokenizer_config.json": _chatml_config()},
        patch={"add_tokens": _CHATML_JSON_ADD})

    l3 = {"tokenizer.json": "llama3/tokenizer.json", "tokenizer_config.json": "llama3/tokenizer_config.json"}
    add("llama3-base", "llama3", l3, {}, note="Meta-Llama-3 files as first released (the fast tokenizer adds no bos)")
    add("llama3-instruct-bos", "llama3", {"tokenizer.json": "llama3/tokenizer.json"},
        {"tokenizer_config.json": {"__from__": "llama3/tokenizer_config.json", "eos_token": "<|eot_id|>"}},
        patch={"post_processor": _LLAMA3_BOS_POST},
        note="later Llama 3 instruct files: post-processor adds <|begin_of_text|>, eos <|eot_id|>")

    m_sp = {"tokenizer.model": "mistral/tokenizer.model"}
    m_js = {"tokenizer.json": "mistral/tokenizer.json"}
    m_cfg = {"tokenizer_config.json": "mistral/tokenizer_config.json"}
    add("mixtral-both-legacy-true", "mixtral", {**m_sp, **m_js, **m_cfg}, {}, note="Mixtral-8x7B-Instruct layout")
    add("mixtral-sp-legacy-true", "mixtral", {**m_sp, **m_cfg}, {})
    add("mixtral-sp-nolegacy", "mixtral", m_sp, {"tokenizer_config.json": _sp_config()})
    add("mixtral-sp-legacy-false", "mixtral", m_sp, {"tokenizer_config.json": _sp_config(False)})
    add("mixtral-json-legacy-true", "mixtral", {**m_js, **m_cfg}, {})
    add("mixtral-json-legacy-false", "mixtral", m_js, {"tokenizer_config.json": _sp_config(False)})
    return V


OFFICIAL_USE_FAST = {"llama2": False, "chatml": False, "llama3": False, "mixtral": True}  # builder.py: "8x7b" -> fast
NATIVE_TEMPLATE = {"llama2": "vicuna_v1", "chatml": "chatml_direct", "llama3": "llama_3", "mixtral": "mistral_instruct"}


sys.path.insert(0, str(ROOT))  # the folder layout is shared with the tests (no torch needed)
from mini_gemini.testing.tokenizer_folders import assemble as _assemble  # noqa: E402


def assemble(variant: dict, dest: Path, store: Path = STORE) -> Path:
    """Lay out one variant's tokenizer folder in `dest` (which must exist)."""
    return _assemble(variant, dest, store)


# ----------------------------------------------------------------------------------------------------
# official prompts (facts from mgm/conversation.py and mgm/serve/cli.py, written anew)

_L3_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
              "that the user provides, and assist the user with a variety of tasks using natural language.")
TEMPLATE_FACTS = {
    "vicuna_v1": dict(style="two", sep=" ", sep2="</s>", roles=("USER", "ASSISTANT"),
                      system="A chat between a curious user and an artificial intelligence assistant. The "
                             "assistant gives helpful, detailed, and polite answers to the user's questions."),
    "llama_3": dict(style="llama_3", sep="<|eot_id|>", sep2=None,
                    roles=("<|start_header_id|>user<|end_header_id|>\n\n",
                           "<|start_header_id|>system<|end_header_id|>\n\n"),
                    system="<|start_header_id|>system<|end_header_id|>\n\n" + _L3_SYSTEM),
    "mistral_instruct": dict(style="llama_2", sep="<s>", sep2="</s>", roles=("USER", "ASSISTANT"), system=""),
    "chatml_direct": dict(style="mpt", sep="<|im_end|>", sep2=None,
                          roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
                          system="<|im_start|>system\nAnswer the questions."),
    "gemma": dict(style="gemma", sep="", sep2="<eos>", roles=("user", "model"), system=""),
}


def official_prompt(template: str, turns: list[dict]) -> str:
    f = TEMPLATE_FACTS[template]
    user_role, bot_role = f["roles"]
    msgs: list[tuple[str, str | None]] = []
    for k, t in enumerate(turns):
        text = t["user"]
        if k == 0 and t["n_images"]:  # the CLI: all images go in front of the first message
            text = (IMAGE_TOKEN + "\n") * t["n_images"] + text
        assert k == 0 or not t["n_images"], "the official CLI only takes images with the first message"
        msgs.append((user_role, text))
        msgs.append((bot_role, t["assistant"]))
    style, sep, sep2 = f["style"], f["sep"], f["sep2"]
    out = ""
    if style == "two":
        out = f["system"] + sep
        for i, (role, m) in enumerate(msgs):
            out += f"{role}: {m}{(sep, sep2)[i % 2]}" if m else f"{role}:"
    elif style in ("mpt", "llama_3"):
        out = f["system"] + sep
        for role, m in msgs:
            out += f"{role}{m}{sep}" if m else role
    elif style == "gemma":
        out = f["system"] + sep
        for i, (role, m) in enumerate(msgs):
            out += f"<start_of_turn>{role}\n{m}<end_of_turn>\n{(sep, sep2)[i % 2]}" if m \
                else f"<start_of_turn>{role}\n"
    elif style == "llama_2":
        for i, (role, m) in enumerate(msgs):
            if not m:
                continue
            if i == 0 and f["system"]:
                m = f"<<SYS>>\n{f['system']}\n<</SYS>>\n\n" + m
            out += f"{sep}[INST] {m} [/INST]" if i % 2 == 0 else f" {m} {sep2}"
        out = out.lstrip(sep)  # str.lstrip with a character set, as the official code does
    else:
        raise ValueError(style)
    if out.count(IMAGE_TOKEN) >= 2:  # the CLI's numbering of several images
        parts = out.split(IMAGE_TOKEN)
        out = "".join(p + f"Image {k + 1}:{IMAGE_TOKEN}" for k, p in enumerate(parts[:-1])) + parts[-1]
    return out


def image_token_ids(prompt: str, tokenizer) -> list[int]:
    """What `tokenizer_image_token(prompt, tokenizer)` returns, as a list."""
    chunks = [list(tokenizer(c).input_ids) for c in prompt.split(IMAGE_TOKEN)]
    # with a bos in front of the first chunk: keep it once, and drop the first token of every chunk
    # (the official separator [-200] * (offset + 1) loses its first `offset` slots the same way)
    offset = 1 if chunks[0] and chunks[0][0] == tokenizer.bos_token_id else 0
    ids = chunks[0][:offset]
    for k, c in enumerate(chunks):
        if k:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(c[offset:])
    return ids


CONVERSATIONS = {
    "one_image": [dict(user="What is written on the sign?", n_images=1, assistant=None)],
    "two_turn_image": [dict(user="What is written on the sign?", n_images=1, assistant="It says STOP."),
                       dict(user="And the colour?", n_images=0, assistant=None)],
    "two_images": [dict(user="Compare the two pictures.", n_images=2, assistant="The first is red, the second is blue."),
                   dict(user="Which one is larger?", n_images=0, assistant=None)],
    "text_only": [dict(user="  Hello,  world!\nTranslate 'über' → «café» 日本語 😀 in 3 words; 12345 + 0.5 = ?",
                       n_images=0, assistant=None)],
    "text_edge": [dict(user="Tabs\there,   three spaces, trailing  \n\nلغة عربية, ñandú, Ωμέγα, 🇫🇷 e\u0301 "
                            "▁literal ▁ mark, 007 1,234,567.89", n_images=0, assistant=None)],
    "three_turns": [dict(user="Describe it.", n_images=1, assistant="A cat sits on a mat.\n\nIt looks happy 🙂."),
                    dict(user="Why  happy?", n_images=0, assistant="Because it's purring - 100%!"),
                    dict(user="Thanks\n", n_images=0, assistant=None)],
}
# every template for these conversations, the family's own template for all of them
CROSS_CONVERSATIONS = ("two_turn_image", "two_images")


# ----------------------------------------------------------------------------------------------------
# decode cases


def _decode_cases(tok) -> list[dict]:
    def enc(text):
        return list(tok(text, add_special_tokens=False).input_ids)

    bos, eos, unk = tok.bos_token_id, tok.eos_token_id, tok.unk_token_id
    emoji = enc("😀")
    seqs = {
        "answer_eos": enc("It says STOP.") + [eos],
        "leading_spaces": enc("   three leading spaces"),
        "bytes_unicode": enc("café 😀 日本語\nnew line\n\n  indented") + [eos],
        "partial_utf8": enc("ok ") + emoji[:-1],
        "bos_text_eos_text": ([bos] if bos is not None else []) + enc("Hello") + [eos] + enc("world"),
        "cleanup_spaces": enc("Hello , world . It 's fine ! Do n't ? I 'm sure , we 've done it ."),
        "digits_punct": enc("3.14159, 2^10=1024; x_y-z/w (a) [b] {c} \"q\" 'r'") + [eos],
        "only_eos": [eos],
        "empty": [],
        "piece_then_space": enc(" ") + enc("x") + enc(" "),
    }
    if unk is not None:
        seqs["with_unk"] = enc("a") + [unk] + enc("b")
    for name, s in [("im_end_mid", "<|im_end|>"), ("eot_mid", "<|eot_id|>"), ("header_mid", "<|start_header_id|>")]:
        tid = tok.convert_tokens_to_ids(s)
        if s in tok.get_vocab() and tid is not None and tid != unk:
            seqs[name] = enc("first") + [tid] + enc("second")
    out = []
    for name, ids in seqs.items():
        ids = [i for i in ids if i is not None]
        text = tok.batch_decode([ids], skip_special_tokens=True)[0].strip()
        out.append({"name": name, "ids": ids, "text": text})
    return out


# ----------------------------------------------------------------------------------------------------


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def derive_llama2_json(tmp: Path) -> None:
    """llama2/tokenizer.json as transformers 4.36 writes it (slow -> fast conversion of tokenizer.model)."""
    from transformers import LlamaTokenizerFast
    d = tmp / "derive"
    d.mkdir()
    shutil.copyfile(STORE / "llama2" / "tokenizer.model", d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps(_sp_config(True)))
    fast = LlamaTokenizerFast.from_pretrained(d)
    fast.backend_tokenizer.save(str(STORE / "llama2" / "tokenizer.json"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    import tokenizers
    import transformers
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    versions = {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__}
    import sentencepiece
    versions["sentencepiece"] = sentencepiece.__version__
    if versions != {"transformers": "4.36.2", "tokenizers": "0.15.0", "sentencepiece": "0.1.99"}:
        print(f"warning: not MGM's pinned stack: {versions}", file=sys.stderr)
    hf_logging.set_verbosity_error()

    variants = _variants()
    cases, decodes, loaded = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not (STORE / "llama2" / "tokenizer.json").exists():
            derive_llama2_json(tmp)
        for name, v in variants.items():
            folder = tmp / name
            folder.mkdir()
            assemble(v, folder)
            use_fast = OFFICIAL_USE_FAST[v["family"]]
            v["official_load"] = f"AutoTokenizer.from_pretrained(path, use_fast={use_fast})"
            try:
                tok = AutoTokenizer.from_pretrained(str(folder), use_fast=use_fast)
            except Exception as e:  # no tokenizer.model: the slow class cannot be built at all
                if use_fast:
                    raise
                tok = AutoTokenizer.from_pretrained(str(folder))
                v["official_load"] += (f" fails ({type(e).__name__}: {e}); golden from the same stack's "
                                       "AutoTokenizer.from_pretrained(path) (fast)")
            v["official_class"] = type(tok).__name__
            if not tok.is_fast:  # the 4.36 fast classes keep `legacy` but do not use it
                v["official_legacy"] = tok.legacy
            v["official_clean_up_tokenization_spaces"] = tok.clean_up_tokenization_spaces
            v["official_adds_bos"] = bool(tok("a").input_ids[:1] == [tok.bos_token_id])
            loaded[name] = type(tok).__name__
            native = NATIVE_TEMPLATE[v["family"]]
            for conv_name, turns in CONVERSATIONS.items():
                templates = list(TEMPLATE_FACTS) if conv_name in CROSS_CONVERSATIONS else [native]
                for template in templates:
                    prompt = official_prompt(template, turns)
                    cases.append({"variant": name, "template": template, "conversation": conv_name,
                                  "official_pair": template == native, "turns": turns, "prompt": prompt,
                                  "input_ids": image_token_ids(prompt, tok)})
            decodes[name] = _decode_cases(tok)
            print(f"{name:28s} {type(tok).__name__:24s} legacy={getattr(tok, 'legacy', '-')}", file=sys.stderr)

    store_files = sorted(p for p in STORE.rglob("*") if p.is_file() and p.name != "PROVENANCE.md")
    doc = {
        "about": "Golden ids from MGM's pinned stack; made by tools/make_golden_ids.py (see its docstring). "
                 "input_ids hold -200 for each image slot. decode.text = "
                 "tokenizer.batch_decode([ids], skip_special_tokens=True)[0].strip().",
        "stack": versions,
        "image_token_index": IMAGE_TOKEN_INDEX,
        "store": {str(p.relative_to(STORE)): _sha256(p) for p in store_files},
        "variants": variants,
        "cases": cases,
        "decode": decodes,
    }
    args.out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(variants)} variants, {len(cases)} prompt cases, "
          f"{sum(map(len, decodes.values()))} decode cases", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

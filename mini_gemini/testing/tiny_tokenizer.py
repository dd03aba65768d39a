"""Tiny but real fast tokenizers, one per LLM family that MGM builds on.

Each is a BPE trained (deterministically, in a few milliseconds) on a small built-in English corpus,
wrapped in a transformers fast tokenizer with the family's special tokens and bos/eos behaviour:

- gemma:   sentencepiece-like, no prefix space, byte fallback; <pad> <eos> <bos> <unk> first,
           <start_of_turn> / <end_of_turn> special; <bos> is added.
- vicuna, mistral, mixtral: Llama-2 sentencepiece-like (legacy): "▁" prepended to every text segment,
           byte fallback; <unk> <s> </s>; <s> is added; "[INST]" is plain text.
- llama3:  byte-level BPE with the Llama-3 split regex; <|begin_of_text|> is added; <|end_of_text|>,
           <|start_header_id|>, <|end_header_id|>, <|eot_id|> (eos, as Llama-3-Instruct) special.
- yi:      Yi's Llama-style sentencepiece with chatml tokens, as Nous-Hermes-2-Yi-34B ships it:
           bos <|startoftext|>, eos <|im_end|>, pad <unk>, <|im_start|> special, and NO bos added
           (Yi's tokenizer_config sets add_bos_token=false, so MGM-34B prompts start without one).

Ids are small (specials first, except llama3 whose specials follow the BPE vocab as in the real one);
the real vocabularies are not reproduced, only their behaviour. Any Unicode text can be encoded and
decoded: the sentencepiece-like families fall back to byte tokens, llama3 is byte-level.
"""

from __future__ import annotations

from functools import lru_cache

FAMILIES = ("gemma", "vicuna", "llama3", "mistral", "mixtral", "yi")

_FAMILY_TEMPLATE = {"gemma": "gemma", "vicuna": "vicuna_v1", "llama3": "llama_3",
                    "mistral": "mistral_instruct", "mixtral": "mistral_instruct", "yi": "chatml_direct"}


def family_template(family: str) -> str:
    """Name of the chat template (see templates.TEMPLATES) that a family's MGM checkpoint uses."""
    _check(family)
    return _FAMILY_TEMPLATE[family]


def _check(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown tokenizer family {family!r}; choose one of: {', '.join(FAMILIES)}")


# Template words, digits, colours and shapes, so that prompts of the tiny tests use real merges.
_CORPUS = """\
A chat between a curious user and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the user's questions.
You are a helpful language and vision assistant.
You are able to understand the visual content that the user provides,
and assist the user with a variety of tasks using natural language.
Answer the questions. Answer the question using a single word or phrase.
USER: What is in the image? ASSISTANT: The image shows a red circle on a white background.
user model system assistant USER ASSISTANT [INST] [/INST] <h> </h> <GEN> Image 1: Image 2: Image 3:
Describe the image in detail. What colour is the square? What color is the circle?
The square is blue. The circle is green. The triangle is yellow. The star is orange.
red green blue yellow orange purple pink brown black white gray grey cyan magenta
Red Green Blue Yellow Orange Purple Pink Brown Black White Gray
circle square triangle star line dot box shape shapes object objects picture photo
There are 2 circles and 3 squares. How many shapes are there? There are 5 shapes.
0 1 2 3 4 5 6 7 8 9 10 11 12 20 42 100 256 336 768 1024 2024
zero one two three four five six seven eight nine ten first second third left right top bottom
Which one is bigger? The left one is bigger than the right one. It is small, large, big and tiny.
Please generate an image of a cat sitting on a mat. Here is an image of a dog in a park.
Reference OCR Token: STOP, EXIT, OPEN
Compare the two images. The first image is darker than the second image.
A photo of a city at night with lights. A painting of a mountain and a lake under the sky.
I do not know. Yes. No. Maybe. Thank you! Sure, here it is: a short answer.
the a an of in on at to and or is are was were be this that these those it its with for from by
what where when why how who which can could would should will do does did have has had not
"""


def _corpus_lines() -> list[str]:
    return [line for line in _CORPUS.splitlines() if line.strip()]


def _sentencepiece_like(specials: list[str], prepend: str, vocab_size: int, with_newline: bool):
    """BPE on "▁"-marked words with byte fallback, specials at ids 0.., then the 256 byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=True)
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre
    lines = _corpus_lines()
    if with_newline:  # gemma has newline pieces; Llama-2 has none and falls back to <0x0A>
        lines = ["\n".join(lines[i:i + 3]) for i in range(0, len(lines), 3)]
    trainer_tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    trained = trainer_tok.get_vocab()
    merges = _merges(trainer_tok)

    vocab = {tok: i for i, tok in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for tok, _ in sorted(trained.items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.pre_tokenizer = pre
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prepend != "never":  # undo the prefix space that encoding added
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _merges(tok) -> list[tuple[str, str]]:
    import json

    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


# the split pattern of Llama-3's tokenizer.json (tiktoken cl100k-style)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = _corpus_lines()
    tok.train_from_iterator(["\n".join(text[i:i + 3]) for i in range(0, len(text), 3)], trainer)
    return tok


@lru_cache(maxsize=None)
def _build_json(family: str) -> tuple[str, dict]:
    """The backend tokenizer (as JSON, so that each caller gets a fresh copy) and the wrapper kwargs."""
    if family == "gemma":
        specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
        tok = _sentencepiece_like(specials, prepend="never", vocab_size=700, with_newline=True)
        kw = dict(bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
                  extra_special_tokens=["<start_of_turn>", "<end_of_turn>"], add_bos_token=True)
    elif family in ("vicuna", "mistral", "mixtral"):
        specials = ["<unk>", "<s>", "</s>"]
        tok = _sentencepiece_like(specials, prepend="always", vocab_size=700, with_newline=False)
        kw = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>", add_bos_token=True)
    elif family == "yi":
        specials = ["<unk>", "<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tok = _sentencepiece_like(specials, prepend="always", vocab_size=700, with_newline=False)
        kw = dict(bos_token="<|startoftext|>", eos_token="<|im_end|>", unk_token="<unk>", pad_token="<unk>",
                  extra_special_tokens=["<|endoftext|>", "<|im_start|>"], add_bos_token=False)
    elif family == "llama3":
        tok = _byte_level(vocab_size=900)
        # the first ten of Llama-3's 256 special tokens, in their real order
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
                    "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|reserved_special_token_4|>", "<|eot_id|>"]
        kw = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                  pad_token="<|reserved_special_token_0|>",  # what MGM's training sets for llama_3
                  extra_special_tokens=[s for s in specials if s not in ("<|begin_of_text|>", "<|eot_id|>",
                                                                         "<|reserved_special_token_0|>")],
                  add_bos_token=True)
    else:
        _check(family)
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok.to_str(), kw


def build_tokenizer(family: str):
    """A small real `PreTrainedTokenizerFast` that behaves like the family's tokenizer (see module doc)."""
    _check(family)
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend_json, kw = _build_json(family)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(backend_json), add_eos_token=False,
                                   clean_up_tokenization_spaces=False, model_max_length=4096, **kw)

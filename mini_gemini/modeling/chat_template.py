"""Chat templates, prompt building and tokenisation around the `<image>` placeholder.

The five templates reproduce, character for character, the prompt strings that the official MGM code
(`mgm/conversation.py`, `get_prompt()`) writes for its checkpoints, quirks included. Images are placed
as the official CLI does: one "<image>\\n" per image before the user text of the turn that brings them,
and when the prompt holds two or more images each placeholder is preceded by "Image k:" (k = 1, 2, ...).

A prompt is kept as typed pieces (template structure / untrusted user text / image slot) so that text a
user types - "<image>", "</s>", "<|im_end|>" ... - can never become an image slot or a control token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..constants import GEN_TAG, IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from ..inputs.ocr import OCR_LABEL, OCR_SUFFIX, ImageText, ocr_token_lines

# ----------------------------------------------------------------------------------------------------
# templates


@dataclass(frozen=True)
class Template:
    name: str
    system: str
    roles: tuple[str, str]  # (user, assistant) as written into the prompt
    style: str              # "two" | "llama_2" | "llama_3" | "mpt" | "gemma" (official SeparatorStyle)
    sep: str
    sep2: str | None
    stop_strings: tuple[str, ...]  # text that ends the assistant's answer


_LLAVA_SYSTEM = ("You are a helpful language and vision assistant. "
                 "You are able to understand the visual content that the user provides, "
                 "and assist the user with a variety of tasks using natural language.")

TEMPLATES: dict[str, Template] = {t.name: t for t in [
    Template("gemma", system="", roles=("user", "model"), style="gemma",
             sep="", sep2="<eos>", stop_strings=("<end_of_turn>", "<eos>")),
    Template("vicuna_v1",
             system="A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
             roles=("USER", "ASSISTANT"), style="two", sep=" ", sep2="</s>", stop_strings=("</s>",)),
    # the official template labels the assistant header "system" (sic); the checkpoints were tuned so
    Template("llama_3", system="<|start_header_id|>system<|end_header_id|>\n\n" + _LLAVA_SYSTEM,
             roles=("<|start_header_id|>user<|end_header_id|>\n\n",
                    "<|start_header_id|>system<|end_header_id|>\n\n"),
             style="llama_3", sep="<|eot_id|>", sep2=None, stop_strings=("<|eot_id|>",)),
    Template("mistral_instruct", system="", roles=("USER", "ASSISTANT"), style="llama_2",
             sep="<s>", sep2="</s>", stop_strings=("</s>",)),
    Template("chatml_direct", system="<|im_start|>system\nAnswer the questions.",
             roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), style="mpt",
             sep="<|im_end|>", sep2=None, stop_strings=("<|im_end|>",)),
]}


def get_template(template: Template | str) -> Template:
    if isinstance(template, Template):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; choose one of: {', '.join(TEMPLATES)}")
    return TEMPLATES[template]


# ----------------------------------------------------------------------------------------------------
# prompts

PieceKind = Literal["template", "user", "image"]


@dataclass(frozen=True)
class Piece:
    text: str
    kind: PieceKind  # "template": structure we write; "user": untrusted message text; "image": one slot


@dataclass
class PromptTurn:
    """One exchange. The `n_images` images brought in this turn go before the user text.

    The user message is written as the official CLI writes it:
        "<image>\n" x n_images + user + OCR text (when `ocr`) + " <GEN>" (when `generate_image`)
    OCR text (official CLI: `inp + '\nReference OCR Token: ' + ', '.join(texts) + '\n'`, appended to every
    user turn): the texts of every image of the prompt up to and including this turn, one
    "Reference OCR Token: " line per image that has text; when the prompt holds two or more images each
    line starts with the image's number, as its slot does ("Image 2: ..."); see
    `inputs.ocr.format_ocr_tokens`. Recognised text is untrusted: it is tokenised as ordinary text.

    image_texts: per image of this turn, in order, its recognised line texts (missing entries or None:
        no text). Only used by turns with `ocr` (this one or a later one).
    """
    user: str
    n_images: int = 0
    assistant: str | None = None
    image_texts: tuple = ()
    ocr: bool = False
    generate_image: bool = False


@dataclass
class Prompt:
    text: str
    pieces: list[Piece] = field(default_factory=list)

    @property
    def n_images(self) -> int:
        return sum(p.kind == "image" for p in self.pieces)


def _user_pieces(turn: PromptTurn, image_texts: list[ImageText], numbered: bool) -> list[Piece]:
    pieces = [Piece(IMAGE_TOKEN, "image"), Piece("\n", "template")] * turn.n_images
    pieces.append(Piece(turn.user, "user"))
    if turn.ocr:
        lines = ocr_token_lines(image_texts, numbered)
        if lines:
            pieces.append(Piece("\n", "template"))
            for label, text in lines:
                pieces += [Piece(OCR_LABEL + label, "template"), Piece(text, "user"), Piece(OCR_SUFFIX, "template")]
    if turn.generate_image:
        pieces.append(Piece(GEN_TAG, "template"))
    return pieces


def build_prompt(template: Template | str, turns: list[PromptTurn], first_image: int = 1) -> Prompt:
    """The prompt the official `get_prompt()` + CLI would write for these turns.

    Args:
        template: a `Template` or its name.
        turns: the exchanges in order; only the last may leave `assistant=None` (the prompt then ends with the
            open assistant header). An empty answer ("") is written as an empty message of the assistant, so that
            the prompt stays well formed (the official code writes it like an open one: "ASSISTANT:USER: ...").
        first_image: the conversation number of the first image in `turns` (1 unless older turns, with their
            images, were left out to fit the context): images keep the numbers the conversation gave them.

    Images are numbered ("Image k:" before each slot, and on its OCR line) when the conversation up to the last
    of these turns holds two or more images, as the official CLI numbers them.

    Raises:
        ValueError: no turns, a negative image count, an open answer before the last turn, or `image_texts` that
            do not match the turn's images.
    """
    tpl = get_template(template)
    if not turns:
        raise ValueError("build_prompt needs at least one PromptTurn")
    if first_image < 1:
        raise ValueError(f"first_image must be >= 1, got {first_image}")
    messages: list[tuple[str, list[Piece] | None]] = []
    n_images = sum(max(t.n_images, 0) for t in turns)
    numbered = first_image - 1 + n_images >= 2  # as the "Image k:" slots below
    image_texts: list[ImageText] = []  # OCR texts of the images so far, in prompt order, with their numbers
    for i, turn in enumerate(turns):
        if turn.n_images < 0:
            raise ValueError(f"turn {i}: n_images must be >= 0, got {turn.n_images}")
        if turn.assistant is None and i != len(turns) - 1:
            raise ValueError(f"turn {i}: only the last turn may leave the assistant answer open (None)")
        texts = list(turn.image_texts or ())
        if len(texts) > turn.n_images or any(isinstance(t, str) for t in texts):
            raise ValueError(f"turn {i}: image_texts must hold one list of texts per image of the turn "
                             f"({turn.n_images}), got {turn.image_texts!r}")
        texts += [()] * (turn.n_images - len(texts))
        for t in texts:
            image_texts.append(ImageText(first_image + len(image_texts), tuple(t or ())))
        # the official code tests messages for truthiness: an empty user message is written like an open one
        body = _user_pieces(turn, image_texts, numbered)
        user = body if any(p.text for p in body) else None
        messages.append((tpl.roles[0], user))
        messages.append((tpl.roles[1], None if turn.assistant is None else [Piece(turn.assistant, "user")]))

    pieces: list[Piece] = []
    t = lambda s: pieces.append(Piece(s, "template"))  # noqa: E731
    if tpl.style == "two":
        seps = (tpl.sep, tpl.sep2)
        t(tpl.system + tpl.sep)
        for i, (role, msg) in enumerate(messages):
            if msg:
                t(role + ": ")
                pieces.extend(msg)
                t(seps[i % 2])
            else:
                t(role + ":")
    elif tpl.style in ("llama_3", "mpt"):  # same layout, the role strings carry the headers
        t(tpl.system + tpl.sep)
        for role, msg in messages:
            if msg:
                t(role)
                pieces.extend(msg)
                t(tpl.sep)
            else:
                t(role)
    elif tpl.style == "gemma":
        seps = (tpl.sep, tpl.sep2)
        t(tpl.system + tpl.sep)
        for i, (role, msg) in enumerate(messages):
            t("<start_of_turn>" + role + "\n")
            if msg:
                pieces.extend(msg)
                t("<end_of_turn>\n" + seps[i % 2])
    elif tpl.style == "llama_2":
        if messages[0][1] is None:
            raise ValueError("the first turn needs a user message or an image (llama_2-style templates)")
        for i, (_role, msg) in enumerate(messages):
            if not msg:
                continue
            if i == 0 and tpl.system:
                msg = [Piece(f"<<SYS>>\n{tpl.system}\n<</SYS>>\n\n", "template")] + msg
            if i % 2 == 0:
                t(tpl.sep + "[INST] ")
                pieces.extend(msg)
                t(" [/INST]")
            else:
                t(" ")
                pieces.extend(msg)
                t(" " + tpl.sep2)
        # official: ret.lstrip(sep) - strips leading characters of the set "<s>", i.e. the first "<s>"
        first = pieces[0]
        pieces[0] = Piece(first.text.lstrip(tpl.sep), first.kind)
    else:
        raise ValueError(f"template {tpl.name!r} has an unknown style {tpl.style!r}")

    # official CLI: with >= 2 images, number them in order of appearance (here: their conversation numbers)
    if numbered:
        labelled, k = [], first_image
        for p in pieces:
            if p.kind == "image":
                labelled.append(Piece(f"Image {k}:", "template"))
                k += 1
            labelled.append(p)
        pieces = labelled
    pieces = _merge(pieces)
    return Prompt("".join(p.text for p in pieces), pieces)


def _merge(pieces: list[Piece]) -> list[Piece]:
    """Drop empty pieces and join neighbouring template pieces (tidier, same text)."""
    out: list[Piece] = []
    for p in pieces:
        if not p.text:
            continue
        if out and p.kind == "template" and out[-1].kind == "template":
            out[-1] = Piece(out[-1].text + p.text, "template")
        else:
            out.append(p)
    return out


# ----------------------------------------------------------------------------------------------------
# tokenisation


def _special_strings(tokenizer) -> set[str]:
    strings = set(tokenizer.get_added_vocab()) if hasattr(tokenizer, "get_added_vocab") else set()
    strings.update(getattr(tokenizer, "all_special_tokens", []))
    return {s for s in strings if s}


def _plain_ids(tokenizer, text: str, control_ids: set[int]) -> list[int]:
    """Token ids of `text` as ordinary text: no special tokens added, none recognised."""
    ids = list(tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids)
    if control_ids.isdisjoint(ids):
        return ids
    # split_special_tokens leaves added tokens that are not flagged special; run the backend's
    # normaliser, pre-tokeniser and model directly so that no added token can be matched
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"cannot tokenise {text!r} as plain text with {type(tokenizer).__name__}: "
                         "use a fast tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True))")
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    splits = [s for s, _ in backend.pre_tokenizer.pre_tokenize_str(text)] if backend.pre_tokenizer else [text]
    return [tok.id for s in splits for tok in backend.model.tokenize(s)]


def _special_wrap(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds before and after a text (e.g. bos), found by encoding a probe."""
    probe = "a"
    full = list(tokenizer(probe).input_ids)
    plain = list(tokenizer(probe, add_special_tokens=False).input_ids)
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    raise ValueError("cannot tell which special tokens this tokenizer adds around a text")


def tokenize(prompt: Prompt, tokenizer) -> list[int]:
    """Token ids of `prompt`, image slots as IMAGE_TOKEN_INDEX.

    Matches the official `tokenizer_image_token(prompt.text, tokenizer)`: the text between image slots
    is tokenised chunk by chunk (special tokens added to each chunk), and when the first chunk starts
    with bos, that bos is kept once and the first token of every chunk is dropped.
    User pieces holding "<image>" or a special/added token string are tokenised on their own as plain
    text, so typed control strings stay ordinary text (the price, on such rare prompts only: a
    sentencepiece tokenizer may write a prefix "▁" at the piece's borders).
    """
    specials = _special_strings(tokenizer) | {IMAGE_TOKEN}
    control_ids: set[int] | None = None
    wrap: tuple[list[int], list[int]] | None = None

    chunks: list[list[Piece]] = [[]]
    for p in prompt.pieces:
        if p.kind == "image":
            chunks.append([])
        else:
            chunks[-1].append(p)

    chunk_ids: list[list[int]] = []
    for chunk in chunks:
        risky = [p.kind == "user" and any(s in p.text for s in specials) for p in chunk]
        if not any(risky):  # the ordinary path: exactly the official per-chunk call
            chunk_ids.append(list(tokenizer("".join(p.text for p in chunk)).input_ids))
            continue
        if control_ids is None:
            control_ids = set(tokenizer.get_added_vocab().values()) | set(tokenizer.all_special_ids)
            wrap = _special_wrap(tokenizer)
        ids: list[int] = []
        run = ""  # consecutive safe text, tokenised together as the official call would
        for p, r in zip(chunk, risky):
            if not r:
                run += p.text
                continue
            if run:
                ids += tokenizer(run, add_special_tokens=False).input_ids
                run = ""
            ids += _plain_ids(tokenizer, p.text, control_ids)
        if run:
            ids += tokenizer(run, add_special_tokens=False).input_ids
        chunk_ids.append(wrap[0] + ids + wrap[1])

    out: list[int] = []
    offset = 0
    if chunk_ids[0] and chunk_ids[0][0] == tokenizer.bos_token_id:
        offset = 1
        out.append(chunk_ids[0][0])
    for k, ids in enumerate(chunk_ids):
        if k:
            out.append(IMAGE_TOKEN_INDEX)
        out.extend(ids[offset:])
    return out


# ----------------------------------------------------------------------------------------------------
# template selection


def _config_get(config: Any, key: str, default=None):
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def _has_token(tokenizer, token: str) -> bool:
    return tokenizer is not None and token in tokenizer.get_vocab()


def select_template(config, tokenizer, override: str | None = None) -> Template:
    """The chat template for a checkpoint, decided from its config and tokenizer (never its path).

    gemma -> gemma; mistral / mixtral -> mistral_instruct; llama -> llama_3 when the tokenizer has the
    llama-3 header tokens, chatml_direct when it has "<|im_start|>" (Yi), else vicuna_v1.
    `override` (a template name) wins.
    """
    if override is not None:
        return get_template(override)
    model_type = str(_config_get(config, "model_type", "") or "").lower()
    archs = " ".join(_config_get(config, "architectures", None) or []).lower()
    desc = f"{model_type} {archs}"
    if "gemma" in desc:
        return TEMPLATES["gemma"]
    if "mistral" in desc or "mixtral" in desc:
        return TEMPLATES["mistral_instruct"]
    is_llama = "llama" in desc or model_type == "mgm"
    if _has_token(tokenizer, "<|start_header_id|>"):
        return TEMPLATES["llama_3"]
    if _has_token(tokenizer, "<|im_start|>"):
        return TEMPLATES["chatml_direct"]
    if is_llama:
        return TEMPLATES["vicuna_v1"]
    raise ValueError(f"cannot tell the chat template of a model with model_type={model_type!r}, "
                     f"architectures={archs!r}; pass one of: {', '.join(TEMPLATES)}")

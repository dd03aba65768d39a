"""The tokenizer on the chat side: prompts to ids, answer ids to text, and the tables a decoding loop needs.

transformers' fast tokenizers switch backend state per call (truncation, padding), which is not safe across
threads; every use goes through one `Detokenizer` and its lock. `AnswerText` turns the token ids of one answer
into the text shown, incrementally, for every kind of LLM run (built-in or remote).
"""
from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Iterator

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")           # sentencepiece byte-fallback tokens


def stop_tables(tokenizer, strings: Iterable[str]) -> tuple[list[int], tuple[str, ...]]:
    """(stop ids, stop texts): the eos id and every stop string that is one token of the vocabulary become ids
    (free in the decoding loop); the others stay texts, found on the decoded answer."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    texts = []
    vocab = tokenizer.get_vocab()
    for s in strings:
        enc = vocab.get(s)
        if enc is not None and enc != tokenizer.unk_token_id:
            ids.append(enc)
        else:
            texts.append(s)
    return sorted(set(ids)), tuple(texts)


class Detokenizer:
    """The processor's tokenizer and template behind one lock.

    Attributes (read only):
        stop_ids: token ids that end an answer (eos and the template's one-token stop strings).
        stop_texts: the template's stop strings that are not one token (matched on the decoded text).
        pad_id: the id `generate` pads with (pad, else eos).
        byte_ids: sentencepiece byte-fallback ids ("<0x0A>"): streaming waits for the end of a run of them.
        special_ids: every special token id (banned while the model writes an image prompt).
    """

    def __init__(self, processor):
        self.processor = processor
        tok = processor.tokenizer
        self._lock = threading.RLock()
        self.stop_ids, self.stop_texts = stop_tables(tok, processor.template.stop_strings)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.byte_ids = frozenset(i for t, i in tok.get_vocab().items() if _BYTE_TOKEN.fullmatch(t))
        self.special_ids = tuple(sorted(set(tok.all_special_ids)))

    def prompt(self, turns, first_image: int = 1):
        """(Prompt, token ids with IMAGE_TOKEN_INDEX slots) of `PromptTurn`s in the processor's template."""
        with self._lock:
            prompt = self.processor.build_prompt(turns, first_image)
            return prompt, self.processor.tokenize(prompt)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens left out."""
        with self._lock:
            return self.processor.tokenizer.decode(list(ids), skip_special_tokens=True)

    def decode_pair(self, ids: list[int], prefix: int, read: int, end: int) -> tuple[str, str]:
        """(text of ids[prefix:read], text of ids[prefix:end]) under one lock (incremental detokenisation)."""
        with self._lock:
            tok = self.processor.tokenizer
            return (tok.decode(ids[prefix:read], skip_special_tokens=True),
                    tok.decode(ids[prefix:end], skip_special_tokens=True))

    def text_ids(self, text: str) -> list[int]:
        """Token ids of `text` as a continuation (no special tokens added)."""
        with self._lock:
            return list(self.processor.tokenizer(text, add_special_tokens=False).input_ids)


class AnswerText:
    """Token ids -> the answer's text, shared by every kind of LLM run (built-in or remote).

    `feed(ids)` takes new ids as they come and returns the text to show now (incremental detokenisation, as
    vLLM does it: a short window decoded from a little before the new tokens, ending where the text is final,
    i.e. not inside a run of byte-fallback tokens nor on half a character); `hit` turns true once a stop text
    was written (the run should then stop its model). `settle(ids)` gives the final (ids, text): trailing stop
    ids dropped, text cut at a stop text and ids cut to the token that completed it. `rest(text)` is what the
    stream still owes once the final text is known. `anchor`: ids the answer continues (decoded with it, so
    that e.g. a word's leading space survives)."""

    def __init__(self, detokenizer: Detokenizer, stop_texts=(), lstrip: bool = True, anchor=()):
        self.detok, self.stop_texts, self.lstrip = detokenizer, tuple(stop_texts), lstrip
        self.anchor = list(anchor)[-8:]
        while self.anchor and self.anchor[0] in detokenizer.byte_ids:  # never start inside a byte run
            self.anchor.pop(0)
        self.hit = False
        self._ids: list[int] = list(self.anchor)
        self._prefix, self._read = 0, len(self._ids)
        self._raw, self._out = "", ""    # raw: text decoded so far; out: text handed out so far

    def feed(self, chunk) -> str:
        ids = self._ids
        ids += chunk
        end = len(ids)
        while end > self._read and ids[end - 1] in self.detok.byte_ids:
            end -= 1
        if end <= self._read:
            return ""
        before, now = self.detok.decode_pair(ids, self._prefix, self._read, end)
        if len(now) <= len(before) or now.endswith("\ufffd"):  # nothing new, or half a character
            return ""
        self._raw += now[len(before):]
        self._prefix, self._read = self._read, end
        text, hit = self.visible(self._raw, final=False)
        self.hit = self.hit or hit
        if len(text) > len(self._out):
            delta, self._out = text[len(self._out):], text
            return delta
        return ""

    def deltas(self, chunks: Iterable[list[int]], halt: threading.Event) -> Iterator[str]:
        """The text to show as token-id chunks arrive; `halt` is set once a stop text was written."""
        for chunk in chunks:
            delta = self.feed(chunk)
            if self.hit:
                halt.set()
            if delta:
                yield delta

    def rest(self, text: str) -> Iterator[str]:
        if len(text) > len(self._out) and text.startswith(self._out):
            yield text[len(self._out):]
            self._out = text

    def visible(self, raw: str, final: bool) -> tuple[str, bool]:
        """The answer as shown: leading space dropped (`lstrip`), cut at a stop text; while streaming,
        trailing space and a possible start of a stop text are held back."""
        text = raw.lstrip() if self.lstrip else raw
        cuts = [i for i in (text.find(s) for s in self.stop_texts) if i >= 0]
        if cuts:
            return text[:min(cuts)].rstrip(), True
        text = text.rstrip()
        if not final:
            for s in self.stop_texts:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        return text[:-k].rstrip(), False
        return text, False

    def settle(self, new_ids) -> tuple[list[int], str]:
        ids = list(new_ids)
        while ids and ids[-1] in self.detok.stop_ids:
            ids.pop()
        base = self.detok.decode(self.anchor)

        def decode(new):
            full = self.detok.decode(self.anchor + new)
            return full[len(base):] if full.startswith(base) else self.detok.decode(new)
        text, hit = self.visible(decode(ids), final=True)
        if hit:  # keep the ids up to the stop text (the model may have run a step or two past it)
            for k in range(1, len(ids) + 1):
                if self.visible(decode(ids[:k]), final=True)[1]:
                    ids = ids[:k]
                    break
        return ids, text

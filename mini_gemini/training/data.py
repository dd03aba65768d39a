"""Training examples: conversations -> token ids with answer-only labels, the synthetic datasets (single
questions, multi-turn multi-image conversations), LLaVA-format JSON, and the batch collator."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch

from ..modeling.chat_template import PromptTurn, build_prompt, tokenize
from ..constants import IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from ..modeling.model import MiniGemini
from .models import IGNORE_INDEX


def encode_conversation(model: MiniGemini, turns: list[PromptTurn]) -> tuple[list[int], list[int]]:
    """Token ids (image slots as IMAGE_TOKEN_INDEX) and labels: only the assistant answers are learnt.

    Each answer's tokens are those between the prompt that ends with the open assistant header and the
    prompt that holds the answer, both built as inference builds them. Such a prefix differs from the
    whole conversation's prompt only where the whole one numbers its images ("Image 1:" before the first
    image once the prompt holds two or more, a label the prefix lacks while it holds one): positions
    after the prefix's first image are shifted by that difference.
    """
    tpl, tok = model.processor.template, model.processor.tokenizer
    ids = tokenize(build_prompt(tpl, turns), tok)
    labels = [IGNORE_INDEX] * len(ids)
    for k, turn in enumerate(turns):
        if not turn.assistant:
            continue
        open_ids = tokenize(build_prompt(tpl, turns[:k] + [PromptTurn(turn.user, turn.n_images, None)]), tok)
        done_ids = tokenize(build_prompt(tpl, turns[:k + 1]), tok) if k + 1 < len(turns) else ids
        start = len(open_ids)
        while start > 0 and open_ids[start - 1] != done_ids[start - 1]:  # a merge across the border
            start -= 1
        first = done_ids.index(IMAGE_TOKEN_INDEX) if IMAGE_TOKEN_INDEX in done_ids else len(done_ids)
        shift = ids.index(IMAGE_TOKEN_INDEX) - first if first < len(done_ids) else 0
        for i in range(start, len(done_ids)):
            j = i + shift if i > first else i
            if ids[j] != done_ids[i]:
                raise ValueError(f"turn {k}: cannot place the answer's tokens in the conversation's prompt")
            labels[j] = ids[j]
    return ids, labels


def llava_turns(conversations: list[dict]) -> list[PromptTurn]:
    """LLaVA conversations ([{from: human|gpt, value}]) -> Turns; "<image>" marks where images go."""
    turns: list[PromptTurn] = []
    for msg in conversations:
        who, text = msg.get("from"), msg.get("value", "")
        if who in ("human", "user"):
            n = text.count(IMAGE_TOKEN)
            text = text.replace(IMAGE_TOKEN + "\n", "").replace("\n" + IMAGE_TOKEN, "").replace(IMAGE_TOKEN, "")
            turns.append(PromptTurn(text.strip(), n, None))
        elif who in ("gpt", "assistant"):
            if not turns or turns[-1].assistant is not None:
                raise ValueError("a gpt message must follow a human message")
            turns[-1].assistant = text
        else:
            raise ValueError(f"unknown speaker {who!r} (expected human/gpt)")
    if not turns or turns[-1].assistant is None:
        raise ValueError("the conversation must end with a gpt answer")
    return turns


class SyntheticData(torch.utils.data.Dataset):
    """The synthetic small-digit task (mini_gemini.synthetic); example i is always the same."""

    def __init__(self, length: int, seed: int = 0, digit_fraction: float = 0.6):
        self.length, self.seed, self.digit_fraction = length, seed, digit_fraction

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        from .synthetic import sample
        s = sample(self.seed, i, self.digit_fraction)
        return dict(images=[s["image"]], turns=[PromptTurn(s["question"], 1, s["answer"])], scene=s["scene"])


class ChatMixData(SyntheticData):
    """Single-image questions mixed with multi-turn, multi-image conversations and quizzes
    (`conversations.py`): a quiz with probability `quiz_fraction`, else a conversation with probability
    `chat_fraction`, else a single question.

    pool: when > 0, every picture is one of `pool` scenes (stream `seed`), and each example names its
    pictures in "keys" - so a frozen visual side encodes each picture once (`Collate(cache=...)`).
    """

    def __init__(self, length: int, seed: int = 0, digit_fraction: float = 0.6, chat_fraction: float = 0.5,
                 pool: int = 0, earlier: float = 0.3, quiz_fraction: float = 0.0, list_fraction: float = 0.0,
                 other_mix: tuple[float, float, float] | None = None):
        super().__init__(length, seed, digit_fraction)
        from .synthetic import OTHER_MIX
        self.other_mix = other_mix or OTHER_MIX  # single questions: weights of colour / count / yes-no
        self.chat_fraction, self.pool, self.earlier = chat_fraction, pool, earlier
        self.quiz_fraction, self.list_fraction = quiz_fraction, list_fraction

    def _scene(self, rng: random.Random):
        from .synthetic import scene
        k = rng.randrange(self.pool)
        sc = scene(self.seed, f"pool-{k}")
        sc.meta["key"] = (self.seed, k)
        return sc

    def __getitem__(self, i):
        from .conversations import chat_sample, quiz_sample
        from .synthetic import digit_question, other_question
        rng = random.Random(f"mgm-mix-{self.seed}-{i}")
        chat = rng.random() < self.chat_fraction
        quiz = bool(self.quiz_fraction) and rng.random() < self.quiz_fraction
        if not (chat or quiz):
            if not self.pool:
                return dict(super().__getitem__(i), scene=None)  # stage 2 only: no per-token targets
            sc = self._scene(rng)
            if rng.random() < self.digit_fraction:
                q, a = digit_question(sc, rng)
            else:
                q, a = other_question(sc, rng, self.other_mix)
            return dict(images=[sc.image], turns=[PromptTurn(q, 1, a)], scene=None, keys=[sc.meta["key"]])
        pictures = self._scene if self.pool else None
        if quiz:
            c = quiz_sample(self.seed, i, self.digit_fraction, scene_fn=pictures, list_fraction=self.list_fraction)
        else:
            c = chat_sample(self.seed, i, self.digit_fraction, scene_fn=pictures, earlier=self.earlier)
        keys = [sc.meta["key"] for sc in c["scenes"]] if self.pool else None
        return dict(images=c["images"], turns=c["turns"], scene=None, keys=keys)


class LlavaData(torch.utils.data.Dataset):
    """A LLaVA-format JSON list: {"image": path or [paths] (optional), "conversations": [...]}."""

    def __init__(self, path, image_folder=None):
        self.records = json.loads(Path(path).read_text())
        if not isinstance(self.records, list):
            raise ValueError(f"{path}: expected a JSON list of {{image, conversations}} records")
        self.folder = Path(image_folder) if image_folder else Path(path).parent

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        from PIL import Image
        rec = self.records[i]
        paths = rec.get("image") or []
        paths = [paths] if isinstance(paths, str) else paths
        images = [Image.open(self.folder / p).convert("RGB") for p in paths]
        turns = llava_turns(rec["conversations"])
        if sum(t.n_images for t in turns) != len(images):
            if len(images) == 1 and not any(t.n_images for t in turns):
                turns[0].n_images = 1  # LLaVA data without a "<image>" mark: the image goes first
            else:
                raise ValueError(f"record {rec.get('id', i)}: {len(images)} images but "
                                 f"{sum(t.n_images for t in turns)} <image> marks")
        return dict(images=images, turns=turns, scene=None)


class Collate:
    """Examples -> a batch: image tensors, ids/labels per example, per-token aux targets when known."""

    def __init__(self, model: MiniGemini, max_len: int = 2048, cache: dict | None = None):
        """cache: visual tokens by picture key, filled by `train.forward` (frozen visual side only; the
        DataLoader must run in this process, --workers 0). Pictures it holds are not processed again."""
        self.model, self.max_len, self.cache = model, max_len, cache

    def __call__(self, examples):
        from .synthetic import token_targets
        proc = self.model.processor.image_processor
        keyed = self.cache is not None and all(ex.get("keys") for ex in examples)
        lr, hr, ids, labels, n_images, keys, new_keys = [], [], [], [], [], [], []
        for ex in examples:
            for j, im in enumerate(ex["images"]):
                if keyed:
                    keys.append(ex["keys"][j])
                    if keys[-1] in self.cache or keys[-1] in new_keys:
                        continue
                    new_keys.append(keys[-1])
                v = proc(im)
                lr.append(v.pixel_values)
                hr.append(v.pixel_values_aux)
            i, y = encode_conversation(self.model, ex["turns"])
            ids.append(i[:self.max_len])
            labels.append(y[:self.max_len])
            n_images.append(len(ex["images"]))
        batch = dict(lr=torch.stack(lr) if lr else None, hr=torch.stack(hr) if hr else None, ids=ids,
                     labels=labels, n_images=n_images)
        if keyed:
            batch.update(cache=self.cache, keys=keys, new_keys=new_keys)
        if all(ex["scene"] is not None for ex in examples):
            grid = int(math.isqrt(self.model.config.tokens_per_view))
            targets = [token_targets(ex["scene"], grid) for ex in examples]
            batch["colour"] = torch.tensor([t[0] for t in targets])
            batch["digit"] = torch.tensor([t[1] for t in targets])
            side = self.model.config.image_size_aux // 4
            batch["hr_digit"] = torch.stack([hr_targets(ex["scene"], side) for ex in examples])
        return batch


def hr_targets(sc, side: int) -> torch.Tensor:
    """(side, side) labels on the HR map: the digit where a position's centre is on the digit's ink box,
    -100 on a one-cell ring around it (borderline), 10 elsewhere."""
    pos = (torch.arange(side) + 0.5) * sc.size / side
    x0, y0, x1, y1 = sc.digit_box
    cell = sc.size / side
    inx, iny = (pos >= x0) & (pos < x1), (pos >= y0) & (pos < y1)
    nearx, neary = (pos >= x0 - cell) & (pos < x1 + cell), (pos >= y0 - cell) & (pos < y1 + cell)
    t = torch.full((side, side), 10, dtype=torch.long)
    t[neary[:, None] & nearx[None, :]] = IGNORE_INDEX
    t[iny[:, None] & inx[None, :]] = sc.digit
    return t

"""Train or fine-tune Mini-Gemini on `accelerate` (single process here; `accelerate launch` for many GPUs).

Stages (as in the paper; the encoders stay frozen in both):
    stage 1  alignment:           train mm_projector + the mining projections; LLM frozen
    stage 2  instruction tuning:  also train the LLM
A tiny model trained from scratch cannot see anything with random frozen encoders, so it first runs
    stage 0  towers:              train everything, towers included, with an auxiliary per-token loss
                                  (colour under each LR token; the digit in the token that holds it),
                                  optionally after training the HR tower alone on digit crops
                                  (--hr-pretrain-steps)

    # the bundled demo model (synthetic small-digit task), from scratch on a CPU
    # (assets/demo-model/README.md has the exact run and its results)
    python -m mini_gemini.train --init demo --data synthetic --stage 0 --hr-pretrain-steps 8000 \
        --hr-pretrain-scenes 32000 --steps 300 --lr 1e-3 --warmup 0.05 --batch-size 16 --digit-fraction 0.8 \
        --out /tmp/demo-s0
    python -m mini_gemini.train --init /tmp/demo-s0 --data synthetic --stage 2 --steps 600 --lr 1e-3 \
        --warmup 0.05 --batch-size 16 --digit-fraction 0.8 --seed 2 --out /tmp/demo-s2
    python -m mini_gemini.train --init /tmp/demo-s2 --eval-only --eval 100     # held-out accuracy
    # LR-only ablation (HR map zeroed, same token count): add --no-hr to every command

    # fine-tune a released checkpoint on your own LLaVA-format data ([{image, conversations}, ...])
    accelerate launch -m mini_gemini.train --init YanweiLi/MGM-2B --data data.json --image-folder imgs/ \\
        --stage 2 --lr 2e-5 --batch-size 4 --grad-accum 8 --mixed-precision bf16 --out runs/mgm-2b-ft

Loss is on the assistant's answer tokens only (labels -100 elsewhere). Prompts go through
templates.build_prompt / tokenize and images through the model's processor, mining and model.embed,
exactly as at inference. `--save-every N` writes checkpoint-N/ (save_pretrained layout plus
trainer_state.pt); `--resume` continues from the newest one in --out.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..constants import IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from ..modeling.model import MiniGemini
from ..chat.templates import Turn, build_prompt, tokenize

IGNORE_INDEX = -100
HR_OFF_KEY = "mgm_train_hr_disabled"  # config.json flag of an LR-only ablation checkpoint
STAGES = {0: "towers + everything", 1: "mining + projector", 2: "mining + projector + LLM"}
DEFAULT_LR = {0: 1e-3, 1: 1e-3, 2: 2e-5}


# ---- the demo model --------------------------------------------------------------------------------
DEMO_CLIP = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                 image_size=64, patch_size=8, projection_dim=64, hidden_act="quick_gelu")
DEMO_CONVNEXT = dict(depths=[1, 1, 2, 1], dims=[16, 32, 64, 96])
DEMO_LLM = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, max_position_embeddings=512)


def build_demo_model(seed: int = 0) -> MiniGemini:
    """The demo architecture: LR 64 px (patch 8 -> 8x8 tokens), HR 256 px (ConvNeXt stage 0 64x64, P = 8),
    a 3-layer Llama with the vicuna_v1 template; random weights, float32, trainable."""
    from ..modeling.config import MGMConfig
    from ..modeling.image_processing import ImageProcessor
    from ..modeling.processing import MGMProcessor
    from ..chat.templates import TEMPLATES
    from ..testing.tiny import tiny_config
    from ..testing.tiny_tokenizer import build_tokenizer
    tok = build_tokenizer("vicuna")
    cfg = tiny_config("vicuna", tok, clip=dict(DEMO_CLIP), convnext=dict(DEMO_CONVNEXT), image_size_aux=256,
                      **DEMO_LLM)
    config = MGMConfig.from_dict(cfg)
    torch.manual_seed(seed)
    model = MiniGemini(config)
    # timm starts ConvNeXt's layer scale at 1e-6, which keeps a from-scratch 5-block tower close to the
    # identity for the few hundred steps trained here: start it at 1.
    # timm also draws its conv/linear weights with std 0.02; from scratch that left the tower on a loss
    # plateau (chance-level digits) for ~1000 steps, while PyTorch's default fan-in init leaves it after a
    # few hundred (measured on 32 px digit crops).
    for name, p in model.vision_tower_aux.named_parameters():
        if name.endswith("gamma"):
            p.data.fill_(1.0)
    for m in model.vision_tower_aux.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.reset_parameters()
    model.processor = MGMProcessor(tok, ImageProcessor.from_config(config), TEMPLATES["vicuna_v1"])
    return model


def disable_hr(model: MiniGemini) -> MiniGemini:
    """LR-only ablation: the HR tower yields zeros (not computed), so mining adds the same vector to every
    token and no HR detail reaches the LLM; the visual token count is unchanged."""
    tower, c = model.vision_tower_aux, model.config.mm_hidden_size_aux
    side = model.config.image_size_aux // 4

    def zeros(pixels):
        return pixels.new_zeros(pixels.shape[0], c, side, side)
    tower.forward = zeros
    model.config.raw[HR_OFF_KEY] = True
    return model


def hr_disabled(model: MiniGemini) -> bool:
    return bool(model.config.raw.get(HR_OFF_KEY))


def load_for_training(init: str, seed: int = 0) -> MiniGemini:
    if init == "demo":
        return build_demo_model(seed)
    from ..modeling.loading import load_pretrained
    model = load_pretrained(init, device="cpu", dtype=torch.float32)
    if hr_disabled(model):
        disable_hr(model)
    return model


def set_stage(model: MiniGemini, stage: int) -> list[nn.Parameter]:
    """Freeze/unfreeze per stage; returns the trainable parameters."""
    if stage not in STAGES:
        raise ValueError(f"--stage must be one of {sorted(STAGES)} ({STAGES})")
    model.requires_grad_(stage == 0)
    model.mining.requires_grad_(True)
    model.mm_projector.requires_grad_(True)
    if stage == 2:
        model.llm.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


# ---- examples --------------------------------------------------------------------------------------
def encode_conversation(model: MiniGemini, turns: list[Turn]) -> tuple[list[int], list[int]]:
    """Token ids (image slots as IMAGE_TOKEN_INDEX) and labels: only the assistant answers are learnt.

    Each answer's tokens are those between the prompt that ends with the open assistant header and the
    prompt that holds the answer, both built as inference builds them.
    """
    tpl, tok = model.processor.template, model.processor.tokenizer
    ids = tokenize(build_prompt(tpl, turns), tok)
    labels = [IGNORE_INDEX] * len(ids)
    for k, turn in enumerate(turns):
        if not turn.assistant:
            continue
        open_ids = tokenize(build_prompt(tpl, turns[:k] + [Turn(turn.user, turn.n_images, None)]), tok)
        done_ids = tokenize(build_prompt(tpl, turns[:k + 1]), tok) if k + 1 < len(turns) else ids
        start = len(open_ids)
        while start > 0 and open_ids[start - 1] != ids[start - 1]:  # a merge across the border
            start -= 1
        for i in range(start, len(done_ids)):
            labels[i] = ids[i]
    return ids, labels


def llava_turns(conversations: list[dict]) -> list[Turn]:
    """LLaVA conversations ([{from: human|gpt, value}]) -> Turns; "<image>" marks where images go."""
    turns: list[Turn] = []
    for msg in conversations:
        who, text = msg.get("from"), msg.get("value", "")
        if who in ("human", "user"):
            n = text.count(IMAGE_TOKEN)
            text = text.replace(IMAGE_TOKEN + "\n", "").replace("\n" + IMAGE_TOKEN, "").replace(IMAGE_TOKEN, "")
            turns.append(Turn(text.strip(), n, None))
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
        return dict(images=[s["image"]], turns=[Turn(s["question"], 1, s["answer"])], scene=s["scene"])


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

    def __init__(self, model: MiniGemini, max_len: int = 2048):
        self.model, self.max_len = model, max_len

    def __call__(self, examples):
        from .synthetic import token_targets
        proc = self.model.processor.image_processor
        lr, hr, ids, labels, n_images = [], [], [], [], []
        for ex in examples:
            for im in ex["images"]:
                v = proc(im)
                lr.append(v.pixel_values)
                hr.append(v.pixel_values_aux)
            i, y = encode_conversation(self.model, ex["turns"])
            ids.append(i[:self.max_len])
            labels.append(y[:self.max_len])
            n_images.append(len(ex["images"]))
        batch = dict(lr=torch.stack(lr) if lr else None, hr=torch.stack(hr) if hr else None, ids=ids,
                     labels=labels, n_images=n_images)
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


# ---- HR tower pre-training on digit crops -----------------------------------------------------------
def hr_crops(n: int, seed: int, model: MiniGemini, cells: int = 2):
    """n HR crops of cells x cells LR-token windows (aligned to the token grid) around the digit, with the
    per-window digit labels of `token_targets` (the digit, 10 = none, -100 = partly touched).

    Returns (n, 3, cells*W, cells*W) float16 pixels and (n, cells*cells) labels; W = HR side / LR grid.
    """
    from .synthetic import scene, token_targets
    grid = int(math.isqrt(model.config.tokens_per_view))
    win = model.config.image_size_aux // grid
    xs, ys = [], []
    for i in range(n):
        sc = scene(seed, i)
        hr = model.processor.image_processor(sc.image).pixel_values_aux
        digit = torch.tensor(token_targets(sc, grid)[1]).view(grid, grid)
        r, c = ((digit >= 0) & (digit < 10)).nonzero()[0].tolist()
        rng = random.Random(f"hr-crop-{seed}-{i}")  # the digit's window at a random place in the crop
        r0 = min(max(0, r - rng.randrange(cells)), grid - cells)
        c0 = min(max(0, c - rng.randrange(cells)), grid - cells)
        xs.append(hr[:, r0 * win:(r0 + cells) * win, c0 * win:(c0 + cells) * win].half())
        ys.append(digit[r0:r0 + cells, c0:c0 + cells].flatten())
    return torch.stack(xs), torch.stack(ys)


def pretrain_hr(model: MiniGemini, steps: int, batch_size: int = 64, lr: float = 3e-3, n_scenes: int = 16000,
                seed: int = 0, cells: int = 2, augment: bool = False, log=print) -> float:
    """Teach the from-scratch ConvNeXt to read digits before anything else (stage 0 only).

    Trained alone on token-aligned crops, a linear head on each window's mean feature must give the digit
    in that window (or none): exactly what mining later needs from the HR map. Reading digits through the
    LLM's answer loss alone stayed at chance in the first demo runs. `augment` permutes the colour channels
    and inverts the image at random (new square colours, the other ink), against over-fitting the crops.
    Returns held-out window accuracy on digit windows.
    """
    tower = model.vision_tower_aux
    x, y = hr_crops(n_scenes, seed + 1000, model, cells)
    n_val = min(500, n_scenes // 10)
    p = model.config.image_size_aux // 4 // int(math.isqrt(model.config.tokens_per_view))
    head = nn.Linear(model.config.mm_hidden_size_aux, 11)
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    gen = torch.Generator().manual_seed(seed)

    def logits(xb):
        f = F.avg_pool2d(tower(xb.float()), p)                       # (B, C, cells, cells): per window
        return head(f.permute(0, 2, 3, 1).flatten(1, 2))             # (B, cells*cells, 11)

    def val_acc():
        with torch.no_grad():
            got = torch.cat([logits(x[j:min(j + 100, n_val)]).argmax(-1) for j in range(0, n_val, 100)])
        t = y[:n_val]
        m = (t >= 0) & (t < 10)
        return (got[m] == t[m]).float().mean().item()

    tower.train()
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(n_val, len(x), (batch_size,), generator=gen)
        xb = x[idx].float()
        if augment:
            perm = torch.stack([torch.randperm(3, generator=gen) for _ in idx])
            xb = xb[torch.arange(len(idx))[:, None], perm]
            xb = torch.where(torch.rand(len(idx), 1, 1, 1, generator=gen) < 0.5, -xb, xb)
        t = y[idx].flatten()
        ce = F.cross_entropy(logits(xb).flatten(0, 1), t, ignore_index=IGNORE_INDEX, reduction="none")
        w = torch.where(t == 10, 1.0, 3.0) * (t != IGNORE_INDEX)
        loss = (ce * w).sum() / w.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(json.dumps(dict(hr_pretrain_step=step + 1, loss=round(loss.item(), 4), val_digit_acc=round(val_acc(), 4),
                                time=round(time.time() - t0, 1))), flush=True)
    return val_acc()


# ---- the forward pass ------------------------------------------------------------------------------
class AuxHeads(nn.Module):
    """Stage 0 only (not saved with the model): per visual token, the colour under it and its digit."""

    def __init__(self, dim: int, aux_dim: int | None = None, n_colours: int = 7, n_digits: int = 11):
        super().__init__()
        self.colour, self.digit = nn.Linear(dim, n_colours), nn.Linear(dim, n_digits)
        # On the HR map itself: the digit at every stage-0 position it covers (a dense, direct signal
        # that teaches the from-scratch ConvNeXt to read digits far faster than through mining alone).
        self.hr = nn.Linear(aux_dim, n_digits) if aux_dim else None

    def hr_loss(self, hr_map, target):
        logits = self.hr(hr_map.float().permute(0, 2, 3, 1)).flatten(0, 2)
        t = target.flatten().to(logits.device)
        ce = F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="none")
        pos, neg = (t >= 0) & (t < 10), t == 10
        return ce[pos].mean() + 0.2 * ce[neg].mean() if pos.any() else 0.2 * ce[neg].mean()

    def forward(self, tokens, colour, digit):
        tokens = tokens.float()
        lc = F.cross_entropy(self.colour(tokens).flatten(0, 1), colour.flatten().to(tokens.device))
        d = digit.flatten().to(tokens.device)
        per = F.cross_entropy(self.digit(tokens).flatten(0, 1), d, ignore_index=IGNORE_INDEX, reduction="none")
        w = torch.where(d == 10, 1.0, 8.0) * (d != IGNORE_INDEX)  # the one digit token among ~60 blanks
        return lc + (per * w).sum() / w.sum().clamp_min(1)


def forward(model: MiniGemini, batch, aux: AuxHeads | None = None, aux_weight: float = 1.0):
    """Language-model loss on the answers (+ the auxiliary loss); returns (loss, stats)."""
    dev = model.device
    images = []
    enc = None
    hr_map = {}
    if batch["lr"] is not None:
        hook = None
        if aux is not None and aux.hr is not None and "hr_digit" in batch and not hr_disabled(model):
            hook = model.vision_tower_aux.register_forward_hook(lambda m, i, o: hr_map.__setitem__("x", o))
        try:
            enc = model.encode_images(batch["lr"].to(dev), batch["hr"].to(dev))
        finally:
            if hook is not None:
                hook.remove()
        images = list(enc.image_features)
    # model.embed expands each image slot into that image's tokens; the labels are expanded to match
    embeds, full, k = [], [], 0
    for ids, y, n in zip(batch["ids"], batch["labels"], batch["n_images"]):
        mine = images[k:k + n]
        embeds.append(model.embed(ids, mine)[0])
        lab, j = [], 0
        for t, v in zip(ids, y):
            if t == IMAGE_TOKEN_INDEX:
                lab += [IGNORE_INDEX] * mine[j].shape[0]
                j += 1
            else:
                lab.append(v)
        full.append(torch.tensor(lab))
        k += n
    length = max(e.shape[0] for e in embeds)
    x = torch.zeros(len(embeds), length, embeds[0].shape[-1], dtype=embeds[0].dtype, device=dev)
    mask = torch.zeros(len(embeds), length, dtype=torch.long, device=dev)
    y = torch.full((len(embeds), length), IGNORE_INDEX, dtype=torch.long, device=dev)
    for i, (e, lab) in enumerate(zip(embeds, full)):
        x[i, :e.shape[0]], mask[i, :e.shape[0]], y[i, :len(lab)] = e, 1, lab
    out = model.llm(inputs_embeds=x, attention_mask=mask)
    logits = out.logits[:, :-1].float()
    target = y[:, 1:]
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX)
    # first answer token right under teacher forcing: a cheap running accuracy
    first = (target != IGNORE_INDEX).int().argmax(1)
    rows = torch.arange(len(embeds), device=dev)
    acc = (logits[rows, first].argmax(-1) == target[rows, first]).float().mean()
    stats = dict(lm=lm.item(), acc=acc.item())
    loss = lm
    if aux is not None and enc is not None and "colour" in batch:
        la = aux(enc.image_features, batch["colour"], batch["digit"])
        if "x" in hr_map:
            lh = aux.hr_loss(hr_map["x"], batch["hr_digit"])
            la = la + lh
            stats["hr_aux"] = lh.item()
        loss = loss + aux_weight * la
        stats["aux"] = la.item()
    return loss, stats


# ---- checkpoints -----------------------------------------------------------------------------------
def save_checkpoint(model, out: Path, *, dtype=None, state: dict | None = None) -> Path:
    from ..modeling.loading import save_pretrained
    out.mkdir(parents=True, exist_ok=True)
    if dtype is not None and dtype != model.dtype:
        orig = model.dtype
        save_pretrained(model.to(dtype), out)
        model.to(orig)
    else:
        save_pretrained(model, out)
    if state is not None:
        torch.save(state, out / "trainer_state.pt")
    return out


def latest_checkpoint(out: Path) -> Path | None:
    cks = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    cks = [c for c in cks if (c / "trainer_state.pt").exists()]
    return cks[-1] if cks else None


# ---- training --------------------------------------------------------------------------------------
def train(args) -> MiniGemini:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    out = Path(args.out)
    resume = latest_checkpoint(out) if args.resume else None
    if args.resume and resume is None:
        print(f"--resume: no checkpoint-*/trainer_state.pt in {out}; starting from --init")
    model = load_for_training(str(resume) if resume else args.init, args.seed)
    if args.no_hr and not hr_disabled(model):
        disable_hr(model)
    if args.hr_pretrain_steps and args.stage == 0 and resume is None and not hr_disabled(model):
        pretrain_hr(model, args.hr_pretrain_steps, seed=args.seed, cells=args.hr_pretrain_cells,
                    n_scenes=args.hr_pretrain_scenes, augment=args.hr_pretrain_augment)
    model.train()
    params = set_stage(model, args.stage)
    aux = AuxHeads(model.config.llm.hidden_size, None if hr_disabled(model) else model.config.mm_hidden_size_aux) \
        if args.stage == 0 and args.aux_weight > 0 else None
    if aux is not None:
        params += list(aux.parameters())
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.stage]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    warm = max(1, int(args.warmup * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))

    acc = Accelerator(gradient_accumulation_steps=args.grad_accum, mixed_precision=args.mixed_precision,
                      cpu=not torch.cuda.is_available())
    per_step = args.batch_size * args.grad_accum * acc.num_processes
    if args.data == "synthetic":
        data = SyntheticData(args.steps * per_step, seed=args.seed, digit_fraction=args.digit_fraction)
    else:
        data = LlavaData(args.data, args.image_folder)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=args.data != "synthetic",
                                         collate_fn=Collate(model, args.max_len), num_workers=args.workers)
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    if aux is not None:
        aux = aux.to(acc.device)
    step = 0
    if resume is not None:
        st = torch.load(resume / "trainer_state.pt", map_location="cpu", weights_only=False)
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        if aux is not None and st.get("aux"):
            aux.load_state_dict(st["aux"])
        step = st["step"]
        torch.set_rng_state(st["rng"])
        acc.print(f"resumed from {resume} at step {step}")
    raw = acc.unwrap_model(model)
    bar = tqdm(total=args.steps, initial=step, disable=not acc.is_local_main_process, desc=f"stage {args.stage}")
    t0, ema = time.time(), None
    micro = 0
    while step < args.steps:
        skip = (step * args.grad_accum) % max(1, len(loader))
        batches = acc.skip_first_batches(loader, skip) if skip else loader
        for batch in batches:
            with acc.accumulate(model):
                loss, stats = forward(raw, batch, aux, args.aux_weight)
                acc.backward(loss)
                if acc.sync_gradients and args.clip > 0:
                    acc.clip_grad_norm_(params, args.clip)
                opt.step()
                sched.step()
                opt.zero_grad()
            micro += 1
            if not acc.sync_gradients:
                continue
            step += 1
            ema = stats if ema is None else {k: 0.9 * ema.get(k, v) + 0.1 * v for k, v in stats.items()}
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in ema.items()})
            if args.log_every and step % args.log_every == 0:
                line = json.dumps(dict(step=step, time=round(time.time() - t0, 1), lr=sched.get_last_lr()[0],
                                       **{k: round(v, 4) for k, v in stats.items()},
                                       **{f"ema_{k}": round(v, 4) for k, v in ema.items()}))
                acc.print(line, flush=True)
                if acc.is_main_process:
                    out.mkdir(parents=True, exist_ok=True)
                    with open(out / "train_log.jsonl", "a") as f:
                        f.write(line + "\n")
            if args.save_every and step % args.save_every == 0 and acc.is_main_process:
                save_checkpoint(raw, out / f"checkpoint-{step}", state=dict(
                    optimizer=opt.state_dict(), scheduler=sched.state_dict(), step=step,
                    aux=aux.state_dict() if aux is not None else None, rng=torch.get_rng_state()))
            if step >= args.steps:
                break
    bar.close()
    acc.wait_for_everyone()
    if acc.is_main_process:
        raw.eval().requires_grad_(False)
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.save_dtype]
        save_checkpoint(raw, out, dtype=dtype)
        acc.print(f"saved {out} ({time.time() - t0:.0f} s)")
    return raw


# ---- evaluation ------------------------------------------------------------------------------------
EVAL_SEED = 12345


def mining_focus(model: MiniGemini, sc, attn: torch.Tensor) -> dict:
    """Where mining looks, for the queried square: attn is (N, P*P) of one image (V = 1).

    inside_square: mean attention mass on HR candidates inside the square, over the LR tokens whose cell
    overlaps the square. on_digit: for the LR token holding the digit's centre, the mass on candidates
    that touch the digit, next to what uniform attention would give.
    """
    n, pp = attn.shape
    grid, p = int(math.isqrt(n)), int(math.isqrt(pp))
    side = sc.size
    cell, sub = side / grid, side / grid / p
    x0, y0, x1, y1 = sc.square_of_digit().box
    dx0, dy0, dx1, dy1 = sc.digit_box
    cx, cy = (dx0 + dx1) / 2, (dy0 + dy1) / 2
    inside, on_digit, uniform = [], None, None
    for t in range(n):
        i, j = divmod(t, grid)
        tx0, ty0 = j * cell, i * cell
        if not (tx0 < x1 and tx0 + cell > x0 and ty0 < y1 and ty0 + cell > y0):
            continue
        a = attn[t]
        mask_sq = torch.zeros(pp, dtype=torch.bool)
        mask_dg = torch.zeros(pp, dtype=torch.bool)
        for c in range(pp):
            ci, cj = divmod(c, p)
            px0, py0 = tx0 + cj * sub, ty0 + ci * sub
            mx, my = px0 + sub / 2, py0 + sub / 2
            mask_sq[c] = x0 <= mx < x1 and y0 <= my < y1
            mask_dg[c] = px0 < dx1 and px0 + sub > dx0 and py0 < dy1 and py0 + sub > dy0
        inside.append(a[mask_sq].sum().item())
        if tx0 <= cx < tx0 + cell and ty0 <= cy < ty0 + cell:
            on_digit, uniform = a[mask_dg].sum().item(), mask_dg.float().mean().item()
    return dict(inside_square=sum(inside) / max(1, len(inside)), on_digit=on_digit, on_digit_uniform=uniform)


@torch.no_grad()
def evaluate(model: MiniGemini, n: int = 200, seed: int = EVAL_SEED, kind: str = "digit", scenes=None,
             progress: bool = False) -> dict:
    """Accuracy through the inference path (Engine chat, greedy, 4 new tokens) on held-out scenes."""
    import random as _random

    from ..chat.engine import Engine, GenOptions
    from .synthetic import digit_question, other_question, scene
    engine = Engine(model)
    opts = GenOptions(temperature=0, max_new_tokens=4)
    right, focus, rows = 0, [], []
    items = scenes if scenes is not None else [scene(seed, i) for i in range(n)]
    for i, sc in enumerate(items):
        rng = _random.Random(f"eval-{seed}-{i}")
        q, a = digit_question(sc, rng) if kind == "digit" else other_question(sc, rng)
        session = engine.session()
        events = list(session.chat(q, [sc.image], options=opts))
        done = [e for e in events if e.kind == "done"]
        got = done[0].data.assistant if done else ""
        right += got.strip().rstrip(".").lower() == a.lower()
        rows.append((q, a, got))
        if kind == "digit":  # the mining maps the engine kept when it encoded the image
            focus.append(mining_focus(model, sc, session.images[0].attn[0]))
        engine.end_session(session.id)
        if progress and (i + 1) % 50 == 0:
            print(f"  {i + 1}/{len(items)}: acc {right / (i + 1):.3f}", flush=True)
    res = dict(accuracy=right / len(items), n=len(items), examples=rows[:5])
    if focus:
        res["mining_inside_square"] = sum(f["inside_square"] for f in focus) / len(focus)
        od = [f for f in focus if f["on_digit"] is not None]
        res["mining_on_digit"] = sum(f["on_digit"] for f in od) / max(1, len(od))
        res["mining_on_digit_uniform"] = sum(f["on_digit_uniform"] for f in od) / max(1, len(od))
    return res


# ---- command line ----------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", default="demo", help="'demo' (the tiny demo architecture, random) or a checkpoint "
                                                  "folder / hub id to fine-tune")
    ap.add_argument("--data", default="synthetic", help="'synthetic' or a LLaVA-format JSON file")
    ap.add_argument("--image-folder", help="folder the JSON's image paths are relative to (default: its folder)")
    ap.add_argument("--stage", type=int, default=2, choices=sorted(STAGES))
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, help="peak learning rate (default per stage: 1e-3, 1e-3, 2e-5)")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--warmup", type=float, default=0.03, help="fraction of steps")
    ap.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    ap.add_argument("--aux-weight", type=float, default=1.0, help="stage 0: weight of the per-token aux loss")
    ap.add_argument("--hr-pretrain-steps", type=int, default=0,
                    help="stage 0: first train the HR tower alone on token-aligned digit crops for N steps")
    ap.add_argument("--hr-pretrain-cells", type=int, default=2,
                    help="crop side in LR-token windows (1: just the digit's window, 4x cheaper per step)")
    ap.add_argument("--hr-pretrain-scenes", type=int, default=16000, help="scenes to cut the crops from")
    ap.add_argument("--hr-pretrain-augment", action="store_true",
                    help="random colour-channel permutation and inversion of the crops")
    ap.add_argument("--digit-fraction", type=float, default=0.6, help="synthetic: share of digit questions")
    ap.add_argument("--no-hr", action="store_true", help="LR-only ablation: the HR branch feeds zeros")
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    ap.add_argument("--save-dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint-N in --out")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="where the trained model (and checkpoint-N/) go")
    ap.add_argument("--eval", type=int, default=0, help="after training, evaluate on N held-out questions")
    ap.add_argument("--eval-only", action="store_true", help="only evaluate --init (N = --eval, default 200)")
    return ap.parse_args(argv)


def report(model: MiniGemini, n: int) -> dict:
    """Held-out accuracy on digit questions (with mining statistics) and on colour/count questions."""
    digit = evaluate(model, n, kind="digit", progress=True)
    other = evaluate(model, n, kind="other")
    res = {k: v for k, v in digit.items() if k != "examples"}
    res.update(other_accuracy=other["accuracy"], hr_disabled=hr_disabled(model), examples=digit["examples"][:3])
    print(json.dumps(res))
    return res


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.eval_only:
        model = load_for_training(args.init)
        if args.no_hr and not hr_disabled(model):
            disable_hr(model)
        report(model.eval().requires_grad_(False), args.eval or 200)
        return model
    if not args.out:
        raise SystemExit("--out is required to train (or pass --eval-only)")
    model = train(args)
    if args.eval:
        report(model, args.eval)
    return model


if __name__ == "__main__":
    main()

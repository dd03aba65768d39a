"""Stage 0 helpers for a from-scratch model: the HR tower pre-trained alone on digit crops, and the
auxiliary per-token heads."""
from __future__ import annotations

import json
import math
import random
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.model import MiniGemini
from .models import IGNORE_INDEX


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

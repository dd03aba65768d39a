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
    # multi-turn, multi-image conversations and quizzes (conversations.py) mixed with single questions; the
    # mining output of each pooled scene is computed once, the projector and a fresh LLM learn (the model
    # card's "Conversations" section has the exact chain of runs behind the shipped weights)
    python -m mini_gemini.train --init assets/demo-model --reset-llm --llm-layers 4 --data synthetic --stage 2 \
        --steps 3000 --lr 1.5e-3 --batch-size 16 --digit-fraction 0.3 --chat-fraction 0.4 --quiz-fraction 0.4 \
        --list-fraction 0.25 --earlier-fraction 0.45 --scene-pool 4000 --cache-visual --train-projector \
        --seed 8 --out /tmp/demo-chat

    # fine-tune a released checkpoint on your own LLaVA-format data ([{image, conversations}, ...])
    accelerate launch -m mini_gemini.train --init YanweiLi/MGM-2B --data data.json --image-folder imgs/ \\
        --stage 2 --lr 2e-5 --batch-size 4 --grad-accum 8 --mixed-precision bf16 --out runs/mgm-2b-ft

The package: models.py (demo architecture, loading, stages), data.py (examples, datasets, collator),
conversations.py (multi-turn multi-image synthetic chats), towers.py (stage 0 helpers), evaluate.py
(accuracy through the Engine), synthetic.py (the scenes); this file: the loss, the loop, the CLI.

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

import sys

import torch

from ..modeling.model import MiniGemini

# the pieces live in their own modules; re-exported here for `from mini_gemini.training.train import ...`
from .data import ChatMixData, Collate, LlavaData, SyntheticData, encode_conversation, hr_targets, llava_turns  # noqa: F401
from .evaluate import EVAL_SEED, evaluate, evaluate_conversations, mining_focus, report  # noqa: F401
from .models import (  # noqa: F401
    DEFAULT_LR,
    DEMO_CLIP,
    DEMO_CONVNEXT,
    DEMO_LLM,
    HR_OFF_KEY,
    IGNORE_INDEX,
    STAGES,
    build_demo_model,
    disable_hr,
    hr_disabled,
    load_for_training,
    reset_llm,
    set_stage,
)
from .towers import AuxHeads, hr_crops, pretrain_hr  # noqa: F401


# ---- the forward pass ------------------------------------------------------------------------------
def forward(model: MiniGemini, batch, aux: AuxHeads | None = None, aux_weight: float = 1.0):
    """Language-model loss on the answers (`MiniGemini.forward` with labels) + the auxiliary loss; returns
    (loss, stats)."""
    dev = model.device
    images = []
    enc = None
    if batch.get("cache") is not None:  # frozen visual side: each picture's tokens computed once
        cache, learn_projector = batch["cache"], any(p.requires_grad for p in model.mm_projector.parameters())
        if batch["lr"] is not None:
            with torch.no_grad():
                new = model.encode_images(batch["lr"].to(dev), batch["hr"].to(dev))
            # with a trainable projector the cache holds its input (the mined tokens), else its output
            cache.update(zip(batch["new_keys"], new.mined if learn_projector else new.image_features))
        images = [cache[key] for key in batch["keys"]]
        if learn_projector:
            images = list(model.mm_projector(torch.stack(images)) if len({i.shape for i in images}) == 1
                          else [model.mm_projector(i) for i in images])
    elif batch["lr"] is not None:
        enc = model.encode_images(batch["lr"].to(dev), batch["hr"].to(dev))
        images = list(enc.image_features)
    out = model(batch["ids"], batch["labels"], image_features=images)
    lm, acc = out.loss, out.first_token_accuracy
    stats = dict(lm=lm.item(), acc=acc.item())
    loss = lm
    if aux is not None and enc is not None and "colour" in batch:
        la = aux(enc.image_features, batch["colour"], batch["digit"])
        if aux.hr is not None and "hr_digit" in batch and not hr_disabled(model):
            lh = aux.hr_loss(enc.hr_features, batch["hr_digit"])
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
    if args.reset_llm and resume is None:
        reset_llm(model, args.seed, layers=args.llm_layers or None)
    elif args.llm_layers:
        raise SystemExit("--llm-layers needs --reset-llm")
    if args.hr_pretrain_steps and args.stage == 0 and resume is None and not hr_disabled(model):
        pretrain_hr(model, args.hr_pretrain_steps, seed=args.seed, cells=args.hr_pretrain_cells,
                    n_scenes=args.hr_pretrain_scenes, augment=args.hr_pretrain_augment)
    model.train()
    params = set_stage(model, args.stage)
    if args.cache_visual:  # stage 2 with the visual side frozen: only the LLM learns
        if args.stage != 2 or args.workers:
            raise SystemExit("--cache-visual needs --stage 2 and --workers 0")
        model.mining.requires_grad_(False)
        model.mm_projector.requires_grad_(args.train_projector)
        params = [p for p in model.parameters() if p.requires_grad]
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
    if args.data == "synthetic" and args.chat_fraction > 0:
        data = ChatMixData(args.steps * per_step, seed=args.seed, digit_fraction=args.digit_fraction,
                           chat_fraction=args.chat_fraction, pool=args.scene_pool, earlier=args.earlier_fraction,
                           quiz_fraction=args.quiz_fraction, list_fraction=args.list_fraction,
                           other_mix=args.other_mix)
    elif args.data == "synthetic":
        data = SyntheticData(args.steps * per_step, seed=args.seed, digit_fraction=args.digit_fraction)
    else:
        data = LlavaData(args.data, args.image_folder)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=args.data != "synthetic",
                                         collate_fn=Collate(model, args.max_len, {} if args.cache_visual else None), num_workers=args.workers)
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


# ---- command line ----------------------------------------------------------------------------------
def _mix(text: str) -> tuple[float, float, float]:
    """--other-mix "COLOUR,COUNT,YESNO": three weights, none negative, not all zero."""
    try:
        mix = tuple(float(x) for x in text.split(","))
    except ValueError:
        mix = ()
    if len(mix) != 3 or min(mix) < 0 or sum(mix) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give three weights for colour, count and yes/no, e.g. 0.2,0.3,0.5")
    return mix


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
    ap.add_argument("--chat-fraction", type=float, default=0.0,
                    help="synthetic: share of multi-turn, multi-image conversations (conversations.py)")
    ap.add_argument("--earlier-fraction", type=float, default=0.3,
                    help="synthetic conversations: chance that a later turn brings no picture and asks about an "
                         "earlier one (or chats)")
    ap.add_argument("--quiz-fraction", type=float, default=0.0,
                    help="synthetic with --chat-fraction: share of quizzes (1-4 pictures, then 3-8 questions "
                         "naming them; conversations.quiz_sample)")
    ap.add_argument("--list-fraction", type=float, default=0.0,
                    help="synthetic quizzes: share of \"What colours are the squares?\" questions")
    ap.add_argument("--other-mix", type=_mix, default=None,
                    metavar="COLOUR,COUNT,YESNO",
                    help="synthetic with --chat-fraction: weights of the single non-digit questions (default "
                         "0.4,0.3,0.3: synthetic.OTHER_MIX)")
    ap.add_argument("--llm-layers", type=int, default=0,
                    help="with --reset-llm: the LLM's number of layers (0: as in --init)")
    ap.add_argument("--scene-pool", type=int, default=0,
                    help="synthetic with --chat-fraction: draw every picture from this many scenes (0: all new)")
    ap.add_argument("--cache-visual", action="store_true",
                    help="stage 2 with mining and projector frozen: each picture's visual tokens are computed "
                         "once and cached (with --scene-pool, pictures recur); only the LLM learns")
    ap.add_argument("--train-projector", action="store_true",
                    help="with --cache-visual: cache the mined tokens instead and train the projector too")
    ap.add_argument("--reset-llm", action="store_true",
                    help="draw the LLM's weights afresh before training (keeps towers, mining, projector)")
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


def cli(argv=None) -> int:
    """Console entry point (`mgm-train`, `python -m mini_gemini.train`): `main` returns the model, the
    shell wants an exit status."""
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(cli())

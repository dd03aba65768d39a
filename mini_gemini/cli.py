"""Chat with a Mini-Gemini model in the terminal, or answer one prompt.

    python -m mini_gemini.cli --model YanweiLi/MGM-2B --image photo.jpg --prompt "What is written here?"
    python -m mini_gemini.cli --model demo --image a.png --image b.png          # interactive chat
    python -m mini_gemini.cli --model DIR --image x.png --prompt "Draw it" --generate-image --json

`--json` prints one JSON object as the last line (text, token_ids, prompt, image_prompt, image_path).
`--save-mining FILE.npz` writes one array per image (image0, image1, ...), shaped (views, LR tokens, P*P).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .resources import resolve_model_name  # noqa: F401 - `demo` -> the bundled model's folder


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mini_gemini.cli", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="hub id (YanweiLi/MGM-2B), local folder, or 'demo'")
    ap.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    ap.add_argument("--prompt", help="answer this and exit (without it: interactive chat)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--template", help="chat template override (gemma, vicuna_v1, llama_3, mistral_instruct, "
                                       "chatml_direct)")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    ap.add_argument("--save-mining", metavar="FILE.npz", help="write the mining weights of every image")
    ap.add_argument("--generate-image", action="store_true", help="ask the model for an image (SDXL)")
    ap.add_argument("--sdxl", default=None, help="SDXL model id or folder (default: stable-diffusion-xl-base-1.0)")
    ap.add_argument("--out-dir", default=".", help="where generated images are written")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--load-in-4bit", action="store_true")
    ap.add_argument("--load-in-8bit", action="store_true")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .chat.engine import Engine, GenOptions
    from .modeling.loading import ModelLoadError, load_pretrained
    try:
        model = load_pretrained(resolve_model_name(args.model), device=args.device, dtype=args.dtype,
                                load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit,
                                template=args.template)
    except (ModelLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    imagegen = None
    if args.generate_image or args.sdxl:
        from .imagegen import DEFAULT_SDXL, ImageGenerator
        imagegen = ImageGenerator(args.sdxl or DEFAULT_SDXL, device=args.device)
    engine = Engine(model, imagegen)
    session = engine.session()
    options = GenOptions(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                         seed=args.seed, image_seed=args.seed)
    out_dir = Path(args.out_dir)

    def run_turn(text, images, stream: bool):
        """One turn; returns the finished Turn or None after an error (already reported)."""
        done = None
        for ev in session.chat(text, images, generate_image=args.generate_image, options=options):
            if ev.kind == "delta" and stream:
                print(ev.text, end="", flush=True)
            elif ev.kind in ("notice", "progress") and ev.text:
                print(f"[{ev.text}]", file=sys.stderr)
            elif ev.kind == "error":
                print(f"error: {ev.text}", file=sys.stderr)
            elif ev.kind == "done":
                done = ev.data
        if stream:
            print()
        return done

    def finish(turn):
        image_path = None
        if turn.generated_image is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            n = len(list(out_dir.glob("mgm-image-*.png")))
            image_path = out_dir / f"mgm-image-{n}.png"
            turn.generated_image.save(image_path)
            print(f"[image written to {image_path}]", file=sys.stderr)
        if args.save_mining and session.images:
            from .viz.heatmap import save_npz  # the same image{k} arrays the app's download holds
            save_npz(args.save_mining, [im.attn.numpy() for im in session.images])
        return image_path

    if args.prompt is not None:
        turn = run_turn(args.prompt, args.image, stream=not args.json)
        if turn is None:
            return 1
        image_path = finish(turn)
        if args.json:
            print(json.dumps({"text": turn.assistant, "token_ids": turn.token_ids, "prompt": turn.prompt,
                              "image_prompt": turn.image_prompt,
                              "image_path": str(image_path) if image_path else None,
                              "notes": turn.notes}, ensure_ascii=False))
        return 0

    print(f"Mini-Gemini ({model.config.family}, template {model.processor.template.name}). Empty line or Ctrl-D to quit; "
          "'/image PATH' adds an image to your next message.", file=sys.stderr)
    pending = list(args.image)
    while True:
        try:
            text = input("USER: ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            break
        if text.startswith("/image "):
            pending.append(text[7:].strip())
            continue
        if not text.strip():
            break
        print("ASSISTANT: ", end="", flush=True)
        try:
            turn = run_turn(text, pending, stream=True)
        except KeyboardInterrupt:
            session.cancel()
            print("\n[stopped]", file=sys.stderr)
            continue
        pending = []
        if turn is not None:
            finish(turn)
    return 0


if __name__ == "__main__":
    sys.exit(main())

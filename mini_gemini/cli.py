"""Chat with a Mini-Gemini model in the terminal, or answer one prompt.

    python -m mini_gemini.cli --model YanweiLi/MGM-2B --image photo.jpg --prompt "What is written here?"
    python -m mini_gemini.cli --model demo --image a.png --image b.png          # interactive chat
    python -m mini_gemini.cli --model DIR --image x.png --prompt "Draw it" --generate-image --json

`--json` prints one JSON object as the last line (text, token_ids, prompt, input_ids = the prompt's ids with
-200 for each image, image_prompt, image_path); when anything fails it is one object with an `error` field
(the message, also written to stderr) and an `error_kind` (a short tag: "usage", "model", "empty_message",
an image's problem such as "unsupported" or "too_big", "too_long", "write", "internal", ...), and the exit
status is not 0.
`--ocr` reads the text in the images (needs: pip install "mini-gemini-studio[ocr]") and adds it to every message
as the official demo does ("Reference OCR Token: ..."); the JSON object then has "ocr": one entry per image,
{"texts": [...], "lines": [{"text", "confidence", "box": [[x, y] x 4] in image pixels}], "seconds", "width",
"height", "scale"} (null for an image not read), else "ocr" is null.
`--save-mining FILE.npz` writes one array per image (image0, image1, ...), shaped (views, LR tokens, P*P), into a
new file of exactly that name (an existing file is never overwritten: the run stops with an error first).
`--explain` also attributes each answer (`ChatSession.explain`: where it looked, one extra pass after it; says where
on stderr): with it `--save-mining` adds answer0, answer1, ... (answer tokens, views, side*P, side*P) float32, each
answer token's high-resolution map per view of the images the answer saw, and answer_tokens (their text), and
`--json` adds answer_tokens, answer_token_prob and answer_token_prob_no_mining (each answer token's probability with
and without the mined detail), explain_method, explain_layers and answer_summary.
Generated images go to `--out-dir` as mgm-image-N.png, N a number not in use there: no file is ever replaced.
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from .files import exclusive_file, new_file, replacing_file
from .model_flags import add_model_flags
from .resources import resolve_model_name  # noqa: F401 - `demo` -> the bundled model's folder


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=None if Path(sys.argv[0]).stem == "mgm" else "python -m mini_gemini.cli",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(ap, default_model="demo")
    ap.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    ap.add_argument("--prompt", help="answer this and exit (without it: interactive chat)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sampling temperature; 0 (and anything below 1e-4) = greedy (default 0)")
    ap.add_argument("--top-p", type=float, default=0.7, help="nucleus sampling mass when sampling (default 0.7)")
    ap.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit in tokens (default 512)")
    ap.add_argument("--seed", type=int, default=None, help="seed for sampling and image generation")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    ap.add_argument("--save-mining", metavar="FILE.npz", help="write the mining weights of every image to this new "
                                                              "file (refused if it exists)")
    ap.add_argument("--explain", nargs="?", const="attention", choices=("attention", "relevancy"), metavar="METHOD",
                    help="attribute each answer to the images' high-resolution pixels (where it looked) and to mining "
                         "(its words' probability without the mined detail); METHOD attention (default) or relevancy "
                         "(a backward pass per answer token: small models, short answers)")
    ap.add_argument("--explain-layers", metavar="START:STOP", type=_layer_range,
                    help="LLM layers [START, STOP) whose attention --explain reads (default: the middle half for "
                         "attention, all for relevancy)")
    ap.add_argument("--generate-image", action="store_true", help="ask the model for an image (SDXL)")
    ap.add_argument("--ocr", action="store_true", help="read the text in the images (OCR) and add it to every "
                                                       "message as the official demo does (needs the ocr extra)")
    ap.add_argument("--out-dir", default=".", help="where generated images are written (as mgm-image-N.png, a new N "
                                                   "each time: no file there is ever replaced)")
    return ap


def _layer_range(text: str) -> tuple[int, int]:
    try:
        start, stop = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"give the layers as START:STOP, e.g. 4:14 (got {text!r})") from None
    return start, stop


EMPTY_MESSAGE = ("Nothing to answer: the message is empty (or only spaces and control characters) and no image "
                 "was given.")


def _fail(message: str, kind: str, as_json: bool, code: int = 1, **extra) -> int:
    """Report a failure: "error: ..." on stderr and, with --json, one JSON object on stdout."""
    print(f"error: {message}", file=sys.stderr)
    if as_json:
        print(json.dumps({"error": message, "error_kind": kind, **extra}, ensure_ascii=False), flush=True)
    return code


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    # known before parsing, so that even a usage error gives its JSON line (argparse accepts "--js" too)
    as_json = any(len(a) > 3 and "--json".startswith(a) for a in argv)
    try:
        return _main(argv, as_json)
    except KeyboardInterrupt:
        return _fail("interrupted", "interrupted", as_json, 130)
    except Exception as e:  # noqa: BLE001 - with --json every failure still ends with its JSON line
        if not as_json:
            raise
        traceback.print_exc()
        return _fail(f"{type(e).__name__}: {e}", "internal", as_json)


def _main(argv: list[str], as_json: bool) -> int:
    parser = build_parser()
    if as_json:
        def usage_error(message):
            parser.print_usage(sys.stderr)
            raise SystemExit(_fail(message, "usage", True, 2))
        parser.error = usage_error
    args = parser.parse_args(argv)
    from .chat.engine import Engine, GenOptions
    from .chat.types import clean_text
    from .errors import AttributionUnavailable
    if args.prompt is not None and not args.image and not clean_text(args.prompt).strip():
        return _fail(EMPTY_MESSAGE, "empty_message", as_json)  # known before the model is loaded
    if args.save_mining and Path(args.save_mining).exists():  # said before the model loads; never overwritten
        return _fail(f"{args.save_mining} already exists and would be overwritten: give --save-mining a new file "
                     "name (or remove that file).", "write", as_json)
    if args.explain and args.llm_server:  # known before the model loads
        return _fail("--explain needs the LLM's layers in this process; with --llm-server they run on the server.",
                     "usage", as_json, 2)
    from .modeling.loading import ModelLoadError, load_pretrained
    from .model_flags import quantization_arg
    try:
        model = load_pretrained(resolve_model_name(args.model), device=args.device, dtype=args.dtype,
                                load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit,
                                quantization=quantization_arg(args), template=args.template,
                                llm_layers=not args.llm_server)  # with a server, the LLM's layers run there
    except (ModelLoadError, ValueError, OSError) as e:
        return _fail(str(e), "model", as_json, 2)
    if args.explain_layers is not None:  # known before any answer is written
        n_layers = model.config.llm.num_hidden_layers
        start, stop = args.explain_layers
        if not 0 <= start < stop <= n_layers:
            return _fail(f"--explain-layers {start}:{stop} is not a range of this LLM's {n_layers} layers: give "
                         f"START:STOP with 0 <= START < STOP <= {n_layers}.", "usage", as_json, 2)
    imagegen = None
    if args.generate_image or args.sdxl:
        from .imagegen import DEFAULT_SDXL, ImageGenerator
        imagegen = ImageGenerator(args.sdxl or DEFAULT_SDXL, device=args.device)
        why = imagegen.check_source()  # said now, not after the answer (offline, nothing cached: no picture)
        if why:
            print(f"[image generation unavailable: {why}]", file=sys.stderr)
    engine = Engine(model, imagegen, llm_server=args.llm_server)
    session = engine.session()
    options = GenOptions(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                         seed=args.seed, image_seed=args.seed, ocr=args.ocr)
    out_dir = Path(args.out_dir)

    failure: dict = {}  # the last turn's error: {"error": message, "error_kind": tag}

    def run_turn(text, images, stream: bool):
        """One turn; returns the finished Turn or None after an error (already printed, kept in `failure`)."""
        done = None
        failure.clear()
        for ev in session.chat(text, images, generate_image=args.generate_image, options=options):
            if ev.kind == "delta" and stream:
                print(ev.text, end="", flush=True)
            elif ev.kind in ("notice", "progress") and ev.text:
                print(f"[{ev.text}]", file=sys.stderr)
            elif ev.kind == "error":
                print(f"error: {ev.text}", file=sys.stderr)
                failure.update(error=ev.text, error_kind=ev.data or "internal")
            elif ev.kind == "done":
                done = ev.data
        if stream:
            print()
        if done is None and not failure:  # the engine answers nothing at all to an empty message
            failure.update(error=EMPTY_MESSAGE, error_kind="empty_message")
            print(f"error: {failure['error']}", file=sys.stderr)
        return done

    mining_written = []  # --save-mining: made by this run (then each turn rewrites it), else must not exist

    def explain(turn) -> dict | None:
        """--explain: the answer's attribution, with what --save-mining and --json take from it (None without it)."""
        if not args.explain or not turn.token_ids:
            return None
        from .chat.explanation import token_texts
        from .viz import heatmap as hm
        from .viz.answer_map import answer_summary
        attribution = session.explain(turn, method=args.explain, layers=args.explain_layers)
        seen = session.images_seen(turn)
        numbers = {id(im): k for k, im in enumerate(session.images, 1)}
        summary = answer_summary(attribution, seen, seen, numbers, hm.Layout.from_config(model.config))
        print(f"[where the answer looked: {summary['text']}]", file=sys.stderr)
        return {"attribution": attribution, "tokens": token_texts(engine.detokenizer, attribution.answer_ids),
                "maps": {numbers[id(im)] - 1: a.hr_map.numpy() for im, a in zip(seen, attribution.images)},
                "summary": summary}

    def finish(turn):
        """Write the turn's picture (a new name in --out-dir, never over a file there) and the mining maps; returns
        (the picture's path or None, --explain's result or None)."""
        image_path = None
        if turn.generated_image is not None:
            with new_file(out_dir, "mgm-image", ".png") as (image_path, f):
                turn.generated_image.save(f, format="PNG")
            print(f"[image written to {image_path}]", file=sys.stderr)
        explained = explain(turn)
        if args.save_mining and session.images:
            from .viz.heatmap import save_npz  # the one writer: the app's download holds the same arrays
            opened = replacing_file(args.save_mining) if mining_written else exclusive_file(args.save_mining)
            with opened as f:
                save_npz(f, [im.attn.numpy() for im in session.images], [im.gain.numpy() for im in session.images],
                         explained["maps"] if explained else None, explained["tokens"] if explained else None)
            mining_written.append(True)
        return image_path, explained

    if args.prompt is not None:
        turn = run_turn(args.prompt, args.image, stream=not args.json)
        if turn is None:
            if args.json:
                print(json.dumps(failure, ensure_ascii=False), flush=True)
            return 1
        try:
            image_path, explained = finish(turn)
        except OSError as e:  # --out-dir or --save-mining cannot be written; the answer is still given
            return _fail(f"Could not write the output: {e}", "write", as_json, 1, text=turn.assistant,
                         token_ids=turn.token_ids)
        except (AttributionUnavailable, ValueError) as e:  # --explain could not attribute this answer
            return _fail(str(e), "explain", as_json, 1, text=turn.assistant, token_ids=turn.token_ids)
        if args.json:
            result = {"text": turn.assistant, "token_ids": turn.token_ids, "prompt": turn.prompt,
                      "input_ids": turn.prompt_ids, "image_prompt": turn.image_prompt,
                      "image_path": str(image_path) if image_path else None,
                      "notes": turn.notes,
                      "ocr": [dict(im.ocr.to_dict(), texts=im.ocr.texts) if im.ocr is not None else None
                              for im in session.images] if args.ocr else None}
            if explained is not None:
                a = explained["attribution"]
                result.update(answer_tokens=explained["tokens"], answer_token_prob=a.prob.tolist(),
                              answer_token_prob_no_mining=None if a.prob_no_mining is None else a.prob_no_mining.tolist(),
                              explain_method=a.method, explain_layers=list(a.layers),
                              answer_summary=explained["summary"]["text"])
            print(json.dumps(result, ensure_ascii=False))
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
            try:
                finish(turn)
            except OSError as e:
                print(f"error: could not write the output: {e}", file=sys.stderr)
            except (AttributionUnavailable, ValueError) as e:
                print(f"error: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

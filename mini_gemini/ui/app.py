"""Mini-Gemini web demo: chat about images, see what patch info mining looked at, get images drawn.

    python app.py [--model M] [--sdxl S|none] [--device D] [--dtype T] [--load-in-4bit | --load-in-8bit]
                  [--port P] [--share]

Every option also comes from the environment (MGM_MODEL, MGM_SDXL, MGM_DEVICE, MGM_DTYPE, MGM_TEMPLATE,
MGM_LOAD_IN_4BIT, MGM_LOAD_IN_8BIT, MGM_MAX_NEW_TOKENS, MGM_SHARE, and Gradio's GRADIO_SERVER_NAME /
GRADIO_SERVER_PORT). The page is up at once; the model loads in the background with a progress line.
If the requested model cannot be had, the app runs on the bundled demo model and says why in a banner.

The app talks to the model only through `mini_gemini.engine`; every browser tab and every API client
gets its own conversation (keyed by Gradio's session hash). API: the named endpoint `/chat`.
"""
from __future__ import annotations

import argparse
import atexit
import hashlib
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

try:  # Hugging Face ZeroGPU: `spaces.GPU` borrows a GPU per call there and is a no-op elsewhere
    import spaces
except ImportError:
    spaces = None

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home unless asked for
import gradio as gr
import numpy as np

from mini_gemini.viz import heatmap as hm
from mini_gemini.chat.engine import MAX_USER_CHARS, Engine, Event, GenOptions, clean_text
from mini_gemini.imagegen import DEFAULT_SDXL, ImageGenerator
from mini_gemini.inputs.images import MAX_FILE_BYTES, ImageError, load_image
from mini_gemini.modeling.loading import ModelLoadError, load_pretrained, resolve
from mini_gemini.resources import demo_model_path, examples_dir, resolve_model_name

EXAMPLES = examples_dir()
DEMO_MODEL = demo_model_path()
DEFAULT_MODEL = "YanweiLi/MGM-2B"
RED_SQUARE = "What digit is in the red square?"
MAX_FAILED = 20  # failed messages a conversation keeps on show (they hold the user's text)
CMAPS = ["inferno", "viridis", "magma", "jet", "coolwarm", "gray"]
CSS = """
#mgm-banner {background: #fff4e5; border: 1px solid #f0ad4e; border-radius: 8px; padding: 4px 14px;}
#mgm-banner * {color: #5c3c00 !important;}
#mgm-status {font-size: 0.92em; opacity: 0.85;}
"""


# ---- options --------------------------------------------------------------------------------------
def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def parse_args(argv=None) -> argparse.Namespace:
    env = os.environ.get
    ap = argparse.ArgumentParser(description="Mini-Gemini web demo (Gradio).")
    ap.add_argument("--model", default=env("MGM_MODEL", DEFAULT_MODEL), help="hub id or local checkpoint folder")
    ap.add_argument("--sdxl", default=env("MGM_SDXL", DEFAULT_SDXL),
                    help="Stable Diffusion XL hub id or folder for image generation; 'none' turns it off")
    ap.add_argument("--device", default=env("MGM_DEVICE"), help="cuda, cuda:1, cpu (default: cuda if available)")
    ap.add_argument("--dtype", default=env("MGM_DTYPE"), choices=["float32", "float16", "bfloat16"],
                    help="weights dtype (default: bfloat16/float16 on GPU, float32 on CPU)")
    ap.add_argument("--template", default=env("MGM_TEMPLATE"), help="override the chat template")
    quant = ap.add_mutually_exclusive_group()
    quant.add_argument("--load-in-4bit", action="store_true", default=_env_flag("MGM_LOAD_IN_4BIT"),
                       help="quantise the LLM to 4 bits (bitsandbytes, CUDA only)")
    quant.add_argument("--load-in-8bit", action="store_true", default=_env_flag("MGM_LOAD_IN_8BIT"),
                       help="quantise the LLM to 8 bits (bitsandbytes, CUDA only)")
    ap.add_argument("--max-new-tokens", type=int, default=int(env("MGM_MAX_NEW_TOKENS", "512")),
                    help="default answer length (the UI has a slider)")
    ap.add_argument("--host", default=env("GRADIO_SERVER_NAME"), help="address to listen on")
    ap.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "0")) or None,
                    help="port to listen on (default 7860, or the next free one)")
    ap.add_argument("--share", action="store_true", default=_env_flag("MGM_SHARE"), help="public gradio.live link")
    args = ap.parse_args(argv)
    if args.load_in_4bit and args.load_in_8bit:
        ap.error("choose one of --load-in-4bit and --load-in-8bit")
    return args


# ---- model loading (in the background) ------------------------------------------------------------
class Loader:
    """Loads the model in a thread so that the page, with its progress line, is up at once."""

    def __init__(self, args):
        self.args = args
        self.stage, self.fraction, self.started = "Starting…", 0.0, time.monotonic()
        self.engine: Engine | None = None
        self.banner = ""          # markdown: why the model in use is not the one asked for
        self.failure = ""         # nothing at all could be loaded
        self.done = threading.Event()

    def start(self) -> "Loader":
        threading.Thread(target=self._run, daemon=True, name="load-model").start()
        return self

    def _set(self, stage: str, fraction: float):
        self.stage, self.fraction = stage, fraction
        print(f"[app] {stage}", flush=True)

    def _run(self):
        a = self.args
        try:
            try:
                model = self._load(resolve_model_name(a.model), quant=True)
            except Exception as e:  # noqa: BLE001 — whatever went wrong, the app still starts
                why = str(e) if isinstance(e, ModelLoadError) else f"{type(e).__name__}: {e}"
                print(f"[app] could not load {a.model}: {why}", flush=True)
                model, what = self._fallback()
                hub_id = a.model if _looks_like_hub_id(a.model) else DEFAULT_MODEL
                self.banner = (f"**Could not load {_code(a.model)}.** {literal(why)}\n\n{what} To chat with real "
                               f"weights, start with `python app.py --model /path/to/checkpoint`, or with a hub id "
                               f"such as {_code(hub_id)} once it is in the Hugging Face cache (`hf download "
                               f"{hub_id}` on a machine with internet access fills it).")
            sdxl = None if str(a.sdxl).lower() in ("", "none", "off") else \
                ImageGenerator(a.sdxl, device=a.device)  # loads on first use
            self.engine = Engine(model, sdxl)
            self._set(f"Ready: {model.name_or_path}", 1.0)
        except Exception as e:  # noqa: BLE001
            self.failure = f"The app could not load any model ({type(e).__name__}: {e})."
            self._set(self.failure, 1.0)
        finally:
            self.done.set()

    def _load(self, name: str, quant: bool = False):
        a = self.args
        self._set(f"Finding {name} (local folder, Hugging Face cache or download)…", 0.05)
        folder = resolve(name)
        device = a.device or ("cuda" if _cuda() else "cpu")
        self._set(f"Loading the weights of {name} onto {device}…", 0.3)
        model = load_pretrained(str(folder), device=device, dtype=a.dtype, template=a.template,
                                load_in_4bit=quant and a.load_in_4bit, load_in_8bit=quant and a.load_in_8bit)
        model.name_or_path = name
        return model

    def _fallback(self):
        if (DEMO_MODEL / "config.json").exists():
            model = self._load(str(DEMO_MODEL))
            model.name_or_path = "bundled demo model (assets/demo-model)"
            return model, ("The app runs on the **bundled demo model** instead: a small model trained only to "
                           f"answer “{RED_SQUARE}” on scenes like the examples.")
        from mini_gemini.testing.tiny import build_tiny
        self._set("Building a tiny random model…", 0.6)
        model = build_tiny("vicuna").to(self.args.device or ("cuda" if _cuda() else "cpu"))
        model.name_or_path = "tiny random model"
        return model, ("No demo model is bundled yet (`assets/demo-model/` is missing), so the app runs on a "
                       "**tiny random model**: everything works end to end, but its answers are noise.")

    def wait(self) -> Engine:
        self.done.wait()
        if self.engine is None:
            raise gr.Error(self.failure or "The model is not loaded.")
        return self.engine


def _looks_like_hub_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name or "") is not None and not Path(name).exists()


def _code(text: str) -> str:
    """Inline code for Markdown (its content is shown literally)."""
    return "`" + str(text).replace("`", "'") + "`"


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


# ---- text shown as text ---------------------------------------------------------------------------
# Fenced code blocks and inline code spans: Markdown shows their content literally already.
# (A misjudged boundary is harmless: text taken for code reaches the chatbot's HTML sanitizer.)
_CODE = re.compile(r"^ {0,3}(`{3,}|~{3,})[^\n]*\n.*?(?:^ {0,3}\1[ \t]*$|\Z)"      # fenced block
                   r"|(`+)(?!`)(?:(?!\n[ \t]*\n).)+?(?<!`)\2(?!`)", re.M | re.S)  # span, within a paragraph


def literal(text: str) -> str:
    """Text for the chat's Markdown renderer with every HTML tag shown as typed, never interpreted.

    Outside code, `&` and `<` become entities (and `![` loses its image meaning, so no remote picture is
    fetched). The chatbot's own HTML sanitizer stays on as a second line of defence.
    """
    out, last = [], 0
    for m in _CODE.finditer(text or ""):
        out += [_escape(text[last:m.start()]), m.group(0)]
        last = m.end()
    out.append(_escape((text or "")[last:]))
    return "".join(out)


def _escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace("![", "!\\[")


_IMAGE_PROMPT = re.compile(r"\s*<h>.*?(?:</h>|\Z)", re.S)


# ---- per-session display state ----------------------------------------------------------------------
@dataclass
class View:
    """What the chat shows for one engine turn beyond the engine's own record."""
    notices: list = field(default_factory=list)
    image_file: str | None = None       # the generated picture (PNG)


@dataclass
class Failed:
    """A message that got an error instead of an answer: shown in the chat, not part of the history."""
    position: int                       # shown before engine turn `position`
    user: str
    files: list
    error: str


_workdir: Path | None = None


def workdir() -> Path:
    """This process's temp folder (display copies, generated images, downloads); removed at exit."""
    global _workdir
    if _workdir is None:
        _workdir = Path(tempfile.mkdtemp(prefix="mgm-app-"))
        atexit.register(shutil.rmtree, _workdir, ignore_errors=True)
    return _workdir


class Extras:
    def __init__(self, sid: str):
        self.folder = workdir() / hashlib.sha256(sid.encode()).hexdigest()[:20]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.views: list[View] = []         # parallel to the engine session's turns
        self.failed: list[Failed] = []
        self.display: dict[str, str] = {}   # image key -> display copy
        self.count = 0
        self.downloads: list[Path] = []

    def new_file(self, stem: str, suffix: str) -> Path:
        self.count += 1
        return self.folder / f"{stem}-{self.count}{suffix}"

    def fail(self, failed: Failed):
        """Show a message that got an error; only the last MAX_FAILED stay (a client may fail forever)."""
        self.failed.append(failed)
        del self.failed[:-MAX_FAILED]

    def sync(self, n_turns: int):
        del self.views[n_turns:]
        self.views += [View() for _ in range(n_turns - len(self.views))]
        self.failed = [f for f in self.failed if f.position <= n_turns]

    def show(self, image, key: str) -> str:
        """A display copy of an input image (as the model saw it, EXIF applied), saved once per picture."""
        if key not in self.display:
            im = image.copy()
            im.thumbnail((1280, 1280))
            path = self.new_file("input", ".png" if im.width * im.height <= 1_500_000 else ".jpg")
            im.save(path)
            self.display[key] = str(path)
        return self.display[key]


EXTRAS: dict[str, Extras] = {}
_extras_lock = threading.Lock()


def session_of(request: gr.Request | None):
    """This client's engine session and display state (created on first use; idle ones are dropped)."""
    engine = LOADER.wait()
    sid = getattr(request, "session_hash", None) or "anonymous"
    session = engine.session(sid)
    with _extras_lock:
        if sid not in EXTRAS:
            for old in [k for k in EXTRAS if k not in engine.sessions]:  # the engine dropped them (LRU)
                shutil.rmtree(EXTRAS.pop(old).folder, ignore_errors=True)
            EXTRAS[sid] = Extras(sid)
        ex = EXTRAS[sid]
    ex.sync(len(session.turns))
    return session, ex


def end_session(request: gr.Request):
    sid = getattr(request, "session_hash", None)
    if sid and LOADER.engine is not None:
        LOADER.engine.end_session(sid)
    with _extras_lock:
        ex = EXTRAS.pop(sid, None)
    if ex is not None:
        shutil.rmtree(ex.folder, ignore_errors=True)


# ---- chat rendering -------------------------------------------------------------------------------
def _text(markdown: str) -> dict:
    # A text part given as a dict: Gradio would run a plain string through inspect.cleandoc, which eats
    # the indentation of code in answers.
    return {"type": "text", "text": markdown}


def _user_message(text: str, files: list, first: int) -> dict:
    content = [{"path": f, "alt_text": f"Image {first + k}"} for k, f in enumerate(files)]
    if text or not content:
        content.append(_text(literal(text)))
    return {"role": "user", "content": content}


def _answer_messages(answer: str, notices: list, prompt: str | None, image_file: str | None,
                     progress=None, error: str | None = None) -> list[dict]:
    msgs = []
    shown = _IMAGE_PROMPT.sub("", answer or "").strip() if (prompt or image_file or progress) else (answer or "")
    parts = [literal(shown)] if shown.strip() else []
    parts += [f"> *Note:* {literal(n)}" for n in notices]
    if error:
        parts.append(f"**Error:** {literal(error)}")
    if parts:
        msgs.append({"role": "assistant", "content": [_text("\n\n".join(parts))]})
    if progress is not None:
        text, fraction = progress
        msgs.append({"role": "assistant", "content": [_text(f"Image prompt: {literal(prompt or '')}")],
                     "metadata": {"title": f"{text} ({fraction:.0%})", "status": "pending"}})
    if image_file:
        msgs.append({"role": "assistant", "content": [{"path": image_file, "alt_text": prompt or "generated image"},
                                                      _text(f"**Image prompt:** {literal(prompt or '')}")]})
    return msgs


def render(session, ex: Extras, upto: int | None = None) -> list[dict]:
    """The chat as Gradio messages, from the engine's history (turns[:upto]) and the display state."""
    turns = session.turns[:upto]
    msgs, first = [], 1
    for i in range(len(turns) + 1):
        for f in ex.failed:
            if f.position == i:
                msgs += [_user_message(f.user, f.files, first)] + _answer_messages("", [], None, None, error=f.error)
        if i == len(turns):
            break
        t, v = turns[i], ex.views[i] if i < len(ex.views) else View()
        files = [ex.show(im.image, im.key) for im in t.images]
        msgs.append(_user_message(t.user, files, first))
        first += len(files)
        msgs += _answer_messages(t.assistant or "", v.notices, t.image_prompt, v.image_file)
    return msgs


@dataclass
class Live:
    """The turn being answered, as streamed so far."""
    user: str
    files: list
    first: int
    text: str = ""
    notices: list = field(default_factory=list)
    progress: tuple | None = None
    prompt: str | None = None
    image_file: str | None = None
    error: str | None = None
    turn: object = None
    history: int = 0                    # engine turns shown before this one

    def messages(self) -> list[dict]:
        return [_user_message(self.user, self.files, self.first)] + _answer_messages(
            self.text, self.notices, self.prompt, self.image_file, self.progress, self.error)


# ---- running a turn -------------------------------------------------------------------------------
def _gpu(fn):
    return spaces.GPU(duration=120)(fn) if spaces is not None else fn


@_gpu
def _events(sid: str, turns: list, text: str, images: list, generate_image: bool, options: GenOptions,
            regenerate: bool):
    """The engine's events for one turn. Under ZeroGPU this runs in a forked GPU worker whose engine
    holds stale sessions: it adopts the caller's history, and hands the new one back at the end."""
    session = LOADER.wait().session(sid)
    adopted = session.turns is not turns
    if adopted:
        session.turns, session.kv = turns, None
    events = session.regenerate(options) if regenerate else \
        session.chat(text, images, generate_image=generate_image, options=options)
    try:
        yield from events
    finally:
        events.close()  # a client that went away closes us: the engine then stops generating
    if adopted:
        for im in session.images:
            im.tokens = im.tokens.cpu()
        yield Event("state", data=session.turns)


def run_turn(session, ex: Extras, text: str, files: list, generate_image: bool, options: GenOptions,
             regenerate: bool = False):
    """Stream one turn; yields the Live state whenever it changed (at most ~20 times a second for text)."""
    if regenerate:
        while ex.failed and ex.failed[-1].position == len(session.turns):
            ex.failed.pop()
        if not session.turns:
            return
        t = session.turns[-1]
        n_history, images = len(session.turns) - 1, []
        live = Live(clean_text(t.user), [ex.show(im.image, im.key) for im in t.images],
                    len(session.images) - len(t.images) + 1, history=n_history)
    else:
        n_history, images = len(session.turns), []
        # the engine reads no more than MAX_USER_CHARS either; what is shown (and kept on failure) is bounded
        live = Live(clean_text(text)[:MAX_USER_CHARS], [], len(session.images) + 1, history=n_history)
        limit = session.engine.images_per_session
        if len(session.images) + len(files) > limit:  # refused before decoding: each decode costs memory
            live.error = (f"Send at most {limit} images at once." if len(files) > limit else
                          f"This conversation can hold at most {limit} images; clear it to start a new one.")
        for k, path in enumerate(files if live.error is None else []):  # decode first: errors come at once
            try:
                loaded = load_image(path)
            except Exception as e:  # noqa: BLE001 - whatever the file does, the user gets a message
                where = f"Image {k + 1} of {len(files)}: " if len(files) > 1 else ""
                live.user = (live.user + "\n\n" if live.user else "") + f"(file: {Path(str(path)).name})"
                live.error = where + _image_error(e)
                break
            images.append(loaded)  # the engine takes the decoded image and its key as they are
            live.files.append(ex.show(loaded.image, loaded.key))
            live.notices += [f"Image {live.first + k}: {n}." for n in loaded.notes]
        if live.error is not None:
            live.files = []
            ex.fail(Failed(len(session.turns), live.user, [], live.error))
            yield live
            return
    yield live
    events = _events(session.id, session.turns, text, images, generate_image, options, regenerate)
    last = 0.0
    try:
        for ev in events:
            if ev.kind == "delta":
                live.text += ev.text
                if time.monotonic() - last < 0.05:
                    continue
            elif ev.kind == "notice":
                if ev.text not in live.notices:
                    live.notices.append(ev.text)
            elif ev.kind == "progress":
                live.progress = (ev.text, float(ev.data or 0.0))
                if live.prompt is None and len(session.turns) > live.history:  # the prompt the LLM wrote
                    live.prompt = session.turns[live.history].image_prompt
            elif ev.kind == "image":
                path = ex.new_file("generated", ".png")
                ev.data.save(path, format="PNG")
                live.image_file, live.prompt, live.progress = str(path), ev.text, None
            elif ev.kind == "error":
                live.error = ev.text
            elif ev.kind == "done":
                live.turn = ev.data
                live.text = ev.data.assistant or live.text
                live.prompt = ev.data.image_prompt or live.prompt
            elif ev.kind == "state":  # ZeroGPU: the worker's history replaces ours
                session.turns, session.kv = ev.data, None
                continue
            last = time.monotonic()
            yield live
    finally:
        events.close()
        live.progress = None
        ex.sync(len(session.turns))
        if live.error:
            ex.fail(Failed(len(session.turns), live.user, live.files, live.error))
        elif len(session.turns) > n_history:
            ex.views[n_history] = View(list(live.notices), live.image_file)
    yield live


def _image_error(e: Exception) -> str:
    """What to tell the user about a file that could not be decoded (never a server path)."""
    if isinstance(e, ImageError):
        return str(e)
    if isinstance(e, MemoryError):
        return "The image is too large to decode here. Please send a smaller one."
    return f"Could not read the image ({type(e).__name__}). Please send a PNG, JPEG, WebP, GIF or BMP file."


def _options(temperature, top_p=0.7, max_new_tokens=None, steps=30) -> GenOptions:
    return GenOptions(temperature=float(temperature), top_p=float(top_p),
                      max_new_tokens=int(max_new_tokens or ARGS.max_new_tokens), steps=int(steps))


def _files(message) -> tuple[str, list]:
    message = message or {}
    files = [f if isinstance(f, str) else (f.get("path") if isinstance(f, dict) else getattr(f, "path", None))
             for f in (message.get("files") or [])]
    return message.get("text") or "", [f for f in files if f]


def chat_ui(message, generate_image, temperature, top_p, max_new_tokens, steps, request: gr.Request):
    text, files = _files(message)
    if not clean_text(text).strip() and not files:
        yield gr.skip(), gr.skip()
        return
    session, ex = session_of(request)
    yield from _stream(session, ex, lambda: run_turn(session, ex, text, files, generate_image,
                                                     _options(temperature, top_p, max_new_tokens, steps)))


def regenerate_ui(temperature, top_p, max_new_tokens, steps, request: gr.Request):
    session, ex = session_of(request)
    yield from _stream(session, ex, lambda: run_turn(session, ex, "", [], False,
                                                     _options(temperature, top_p, max_new_tokens, steps),
                                                     regenerate=True))


def _stream(session, ex, start):
    """Chatbot + textbox updates while a turn streams; the textbox is locked until it ends."""
    locked = gr.MultimodalTextbox(value=None, interactive=False)
    turn = start()
    try:
        for live in turn:
            yield render(session, ex, upto=live.history) + live.messages(), locked
    except Exception as e:  # noqa: BLE001 — the history must stay usable whatever happened
        ex.fail(Failed(len(session.turns), "", [], f"Something went wrong ({type(e).__name__}: {e})."))
    finally:
        turn.close()  # also when the client went away: the engine then stops generating
    yield render(session, ex), gr.MultimodalTextbox(value=None, interactive=True)


def stop_ui(request: gr.Request):
    if LOADER.engine is not None:
        sid = getattr(request, "session_hash", None)
        if sid in LOADER.engine.sessions:
            LOADER.engine.sessions[sid].cancel()


def undo_ui(request: gr.Request):
    """Drop the last exchange (a failed message first); a turn still running is stopped by the engine."""
    session, ex = session_of(request)
    if ex.failed and ex.failed[-1].position == len(session.turns):
        ex.failed.pop()
    else:
        try:
            session.undo()
        except RuntimeError as e:  # the running turn did not stop in time
            raise gr.Error(str(e)) from e
        ex.sync(len(session.turns))
    return render(session, ex)


def clear_ui(request: gr.Request):
    session, ex = session_of(request)
    try:
        session.clear()
    except RuntimeError as e:
        raise gr.Error(str(e)) from e
    ex.failed, ex.views = [], []
    return render(session, ex), None


# ---- mining panel ---------------------------------------------------------------------------------
def _layout() -> hm.Layout:
    return hm.Layout.from_config(LOADER.engine.model.config)


def _which(layout: hm.Layout, which) -> str:
    return which if which in layout.choices() else hm.CROPS


def _maps(entry, layout: hm.Layout, which: str, metric: str):
    scores = hm.token_scores(entry.attn.numpy(), metric)
    return hm.assemble(scores, layout, which), hm.assemble(entry.gain.numpy(), layout, which)


def _panel_images(entry, layout, which, metric, cmap, alpha, mark=None):
    attn_map, gain_map = _maps(entry, layout, which, metric)
    photo = entry.image
    size = hm.display_size(*photo.size)
    box = hm.cell_in_photo(layout, *mark, photo.size, size) if mark else None
    over = hm.overlay(photo, attn_map, cmap=cmap, alpha=alpha, size=size, mark=box)
    gain = hm.overlay(photo, gain_map, cmap="magma", alpha=alpha, size=size, mark=box)
    return over, gain, attn_map, gain_map


def _caption(k: int, layout: hm.Layout, which: str, metric: str, attn_map, gain_map) -> str:
    pp = layout.patch ** 2
    what = {"focus": f"*focus* = 1 − H(a)/log {pp}, where a are the token's weights over its "
                     f"{layout.patch}×{layout.patch} = {pp} high-resolution candidates: 0 means it spread its "
                     "attention evenly (nothing in particular was mined), 1 that it took a single candidate",
            "max weight": f"the largest of the token's {pp} candidate weights (from 1/{pp} = even spread "
                          "to 1 = a single candidate)"}[metric]
    view = {hm.CROPS: "the 2×2 HD crops, each over its quarter" if layout.grid > 1 else "its tokens",
            hm.GLOBAL: "the global view over the whole image"}[which]
    return (f"**Image {k}**, {view}: one cell per low-resolution token. Colour = {what}; range "
            f"{attn_map.min():.3f} … {attn_map.max():.3f}. **Mining gain** (right) = |mined − x| / |x|, how much "
            f"the token changed by taking in HR detail; range {gain_map.min():.3f} … {gain_map.max():.3f}. "
            "Click the left picture to inspect one token.")


def _image_choices(session) -> list[str]:
    return [f"Image {k + 1}" for k in range(len(session.images))]


def _entry(session, label):
    images = session.images
    try:
        k = int(str(label).split()[-1])
    except (ValueError, IndexError):
        return None, 0
    return (images[k - 1], k) if 1 <= k <= len(images) else (None, 0)


def panel_ui(label, which, metric, cmap, alpha, selected, request: gr.Request, new_turn: bool = False):
    """Re-draw the mining panel (after a turn, or when a control changed); a clicked token stays selected."""
    session, ex = session_of(request)
    drawn_for = tuple(map(id, session.images))
    choices = _image_choices(session)
    if new_turn or label not in choices:
        label = choices[-1] if choices else None
    entry, k = _entry(session, label)
    dropdown = gr.Dropdown(choices=choices, value=label)
    off = gr.DownloadButton(value=None, interactive=False)
    if entry is None:
        return dropdown, None, None, "Send an image to see where patch info mining looked.", None, "", off, off, None
    layout = _layout()
    which = _which(layout, which)
    mark = tuple(selected[1:]) if selected and selected[0] == (entry.key, which) else None
    over, gain, attn_map, gain_map = _panel_images(entry, layout, which, metric, cmap, float(alpha), mark)
    if tuple(map(id, session.images)) != drawn_for:
        # Undo/Clear/a new turn changed the conversation while this was drawn: its own redraw is queued
        # behind, so leave the panel alone rather than let a stale picture land after it.
        return tuple(gr.skip() for _ in range(9))
    for old in ex.downloads:
        old.unlink(missing_ok=True)
    png = ex.new_file(f"mining-image{k}-{which}", ".png")
    over.save(png)
    npz = hm.save_npz(ex.new_file("mining-maps", ".npz"), [im.attn.numpy() for im in session.images],
                      [im.gain.numpy() for im in session.images])
    ex.downloads = [png, Path(npz)]
    zoomed, zoom_text = _zoom(entry, k, layout, *mark, cmap) if mark else \
        (None, "Click a point on the left picture: the LR token there and its HR candidates' weights show here.")
    return (dropdown, over, gain, _caption(k, layout, which, metric, attn_map, gain_map), zoomed, zoom_text,
            gr.DownloadButton(value=str(png), interactive=True), gr.DownloadButton(value=str(npz), interactive=True),
            selected if mark else None)


def panel_after_turn(label, which, metric, cmap, alpha, selected, request: gr.Request):
    return panel_ui(label, which, metric, cmap, alpha, selected, request, new_turn=True)


def click_ui(label, which, metric, cmap, alpha, evt: gr.SelectData, request: gr.Request):
    session, _ = session_of(request)
    entry, k = _entry(session, label)
    if entry is None or not evt.index:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    layout = _layout()
    which = _which(layout, which)
    photo = entry.image
    view, token = hm.click_to_token(evt.index[0], evt.index[1], hm.display_size(*photo.size), photo.size,
                                    layout, which)
    over, _, _, _ = _panel_images(entry, layout, which, metric, cmap, float(alpha), mark=(view, token))
    zoomed, text = _zoom(entry, k, layout, view, token, cmap)
    return over, zoomed, text, ((entry.key, which), view, token)


def _zoom(entry, k: int, layout: hm.Layout, view: int, token: int, cmap: str):
    """The zoomed candidates of one token, and what they say."""
    weights = entry.attn[view, token].numpy()
    zoomed = hm.zoom(entry.image, layout, view, token, weights, cmap=cmap)
    row, col = divmod(token, layout.side)
    where = "global view" if (layout.global_view and view == 0) else \
        (f"crop {view - (1 if layout.global_view else 0) + 1} of {layout.grid ** 2}" if layout.grid > 1 else "")
    best = np.argsort(weights)[::-1][:3]
    top = ", ".join(f"({b // layout.patch}, {b % layout.patch}) = {weights[b]:.3f}" for b in best)
    focus = float(hm.token_scores(weights, "focus"))
    text = (f"**Image {k}**{', ' + where if where else ''}, LR token row {row}, column {col} (view {view}, token "
            f"{token}): the same crop of the photo with its {layout.patch}×{layout.patch} HR candidates, and their "
            f"weights. Strongest (row, col) = weight: {top}. Focus {focus:.3f}; an even spread would give each "
            f"{1 / layout.patch ** 2:.3f}.")
    return zoomed, text


def model_info(engine: Engine | None) -> str:
    if engine is None:
        return ""
    m, c = engine.model, engine.model.config
    layout = hm.Layout.from_config(c)
    hd = f"HD: 2×2 crops of {c.lr_size} px + a global view" if c.image_grid > 1 else f"{c.lr_size} px"
    sdxl = f"{_code(engine.imagegen.model)} (loads on first use)" if engine.imagegen else "off"
    return (f"**Model** {literal(str(m.name_or_path))} · LLM family **{c.family}** · template "
            f"`{m.processor.template.name}`  \n"
            f"**LR** {hd} → {layout.side}×{layout.side} tokens per view · **HR** {c.image_size_aux} px → "
            f"{layout.patch}×{layout.patch} candidates per LR token  \n"
            f"**Visual tokens per image** {engine.tokens_per_image} ({c.views} view{'s' if c.views > 1 else ''}) · "
            f"{m.device} · {str(m.dtype).replace('torch.', '')} · **image generation** {sdxl}")


def watch_loading(progress=gr.Progress()):
    """Progress line while the model loads; then the banner, the model panel and the HD view switch."""
    while not LOADER.done.wait(0.3):
        progress(LOADER.fraction, desc=LOADER.stage)
        yield (f"Loading: {literal(LOADER.stage)} ({time.monotonic() - LOADER.started:.0f} s)", gr.skip(), gr.skip(),
               gr.skip(), gr.skip())
    engine = LOADER.engine
    if engine is None:
        yield f"**Error:** {literal(LOADER.failure)}", gr.Markdown(visible=False), "", gr.skip(), gr.skip()
        return
    layout = hm.Layout.from_config(engine.model.config)
    yield (f"Ready: {literal(str(engine.model.name_or_path))}",
           gr.Markdown(LOADER.banner, visible=bool(LOADER.banner)), model_info(engine),
           gr.Radio(choices=list(layout.choices()), value=hm.CROPS, visible=layout.global_view),
           gr.Checkbox(interactive=engine.imagegen is not None,
                       info=None if engine.imagegen else "off: start the app with --sdxl MODEL to enable it"))


# ---- API ------------------------------------------------------------------------------------------
def api_chat(message: str, images: list | None, generate_image: bool, temperature: float, request: gr.Request):
    """One chat turn for API clients. Each client (its Gradio session) has its own history.

    Returns (reply text, generated image or None, gallery of mining heatmaps for every image so far); the
    reply ends with the turn's notes, if any, each a paragraph starting with "Note: ".
    """
    files = [f if isinstance(f, str) else getattr(f, "path", None) or f.get("path") for f in (images or [])]
    if not clean_text(message).strip() and not files:
        raise gr.Error("Send a message, an image, or both.")
    session, ex = session_of(request)
    live = None
    for live in run_turn(session, ex, message or "", files, bool(generate_image), _options(temperature or 0.0)):
        if live.error is None:
            yield live.text, None, []
    if live.error:
        raise gr.Error(live.error)
    answer = live.turn.assistant if live.turn is not None else live.text
    yield api_reply(answer, live.notices), live.image_file, heatmap_gallery(session)


def api_reply(answer: str, notices: list) -> str:
    """The answer, then what the user should know about the turn (message cut, image not drawn, ...): API
    clients have no other place to see it. Each note is its own paragraph starting with "Note: "."""
    return "\n\n".join(([answer] if answer else []) + [f"Note: {n}" for n in notices])


def heatmap_gallery(session) -> list:
    layout, out = _layout(), []
    for k, entry in enumerate(session.images, 1):
        over, gain, _, _ = _panel_images(entry, layout, hm.CROPS, "focus", "inferno", 0.6)
        out += [(over, f"Image {k}: mining focus"), (gain, f"Image {k}: mining gain")]
    return out


# ---- the page -------------------------------------------------------------------------------------
def _examples() -> list:
    return [{"text": RED_SQUARE, "files": [str(p)]} for p in sorted(EXAMPLES.glob("*.png"))]


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="Mini-Gemini") as demo:
        gr.Markdown("## Mini-Gemini — chat with images, see what patch info mining looked at")
        banner = gr.Markdown(visible=False, elem_id="mgm-banner")
        status = gr.Markdown("Loading the model…", elem_id="mgm-status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                chatbot = gr.Chatbot(height=520, label="Chat", sanitize_html=True, render_markdown=True,
                                     feedback_options=None, elem_id="mgm-chat",
                                     buttons=["copy"], placeholder="Upload an image (or paste one) and ask about it.")
                textbox = gr.MultimodalTextbox(file_types=["image"], file_count="multiple", sources=["upload"],
                                               placeholder="Ask about an image: type, upload or paste…",
                                               show_label=False, elem_id="mgm-input")
                with gr.Row(equal_height=True):
                    gen_cb = gr.Checkbox(label="Generate an image", value=False, elem_id="mgm-gen", min_width=150)
                    stop_btn = gr.Button("Stop", size="sm", elem_id="mgm-stop", min_width=70)
                    regen_btn = gr.Button("Regenerate", size="sm", elem_id="mgm-regen", min_width=70)
                    undo_btn = gr.Button("Undo", size="sm", elem_id="mgm-undo", min_width=70)
                    clear_btn = gr.Button("Clear", size="sm", elem_id="mgm-clear", min_width=70)
                with gr.Accordion("Generation settings", open=False):
                    temperature = gr.Slider(0.0, 1.5, value=0.2, step=0.05, label="Temperature (0 = greedy)",
                                            elem_id="mgm-temp")
                    top_p = gr.Slider(0.05, 1.0, value=0.7, step=0.05, label="Top-p")
                    max_new = gr.Slider(16, 2048, value=ARGS.max_new_tokens, step=16, label="Max new tokens",
                                        elem_id="mgm-max-new")
                    steps = gr.Slider(1, 60, value=30, step=1, label="Image generation steps (SDXL)",
                                      elem_id="mgm-steps")
                gr.Examples(_examples(), inputs=textbox, label="Examples (small digits in coloured squares)")
                model_md = gr.Markdown(elem_id="mgm-model")
            with gr.Column(scale=1):
                gr.Markdown("### Patch info mining")
                with gr.Row():
                    image_dd = gr.Dropdown(choices=[], value=None, label="Image", elem_id="mgm-image", scale=1)
                    which = gr.Radio([hm.CROPS], value=hm.CROPS, label="Map of", visible=False, scale=1)
                    metric = gr.Radio(list(hm.METRICS), value="focus", label="Per-token value", scale=1)
                with gr.Row():
                    cmap = gr.Dropdown(CMAPS, value="inferno", label="Colormap")
                    opacity = gr.Slider(0.0, 1.0, value=0.6, step=0.05, label="Opacity")
                with gr.Row():
                    overlay_img = gr.Image(label="Mining attention (click a point)", type="pil", format="png",
                                           interactive=False, elem_id="mgm-overlay")
                    gain_img = gr.Image(label="Mining gain", type="pil", format="png", interactive=False,
                                        elem_id="mgm-gain")
                caption = gr.Markdown("Send an image to see where patch info mining looked.", elem_id="mgm-caption")
                zoom_img = gr.Image(label="Token under the click: photo crop | HR candidate weights", type="pil",
                                    format="png", interactive=False, elem_id="mgm-zoom", height=300)
                zoom_md = gr.Markdown(elem_id="mgm-zoom-text")
                with gr.Row():
                    dl_png = gr.DownloadButton("Download PNG", interactive=False, size="sm")
                    dl_npz = gr.DownloadButton("Download maps (.npz)", interactive=False, size="sm")
        selected = gr.State(None)

        # The API endpoint's own (hidden) inputs and outputs.
        with gr.Row(visible=False):
            api_msg = gr.Textbox(label="message")
            api_files = gr.File(label="images", file_count="multiple", file_types=["image"], type="filepath")
            api_gen = gr.Checkbox(label="generate_image")
            api_temp = gr.Number(label="temperature", value=0.2)
            api_reply = gr.Textbox(label="reply")
            api_image = gr.Image(label="generated image", type="filepath", format="png")
            api_gallery = gr.Gallery(label="heatmaps", format="png")
            api_btn = gr.Button("api")

        # Turns share one queue: two run at once (the engine serialises model runs, so the second one
        # waits there or draws its image meanwhile); later ones see their place in the queue.
        model = dict(concurrency_id="model", concurrency_limit=2, api_visibility="private")
        private = dict(api_visibility="private")
        panel_in = [image_dd, which, metric, cmap, opacity, selected]
        panel_out = [image_dd, overlay_img, gain_img, caption, zoom_img, zoom_md, dl_png, dl_npz, selected]
        settings = [temperature, top_p, max_new, steps]

        demo.load(watch_loading, None, [status, banner, model_md, which, gen_cb], concurrency_limit=None,
                  show_progress="minimal", **private)
        sent = textbox.submit(chat_ui, [textbox, gen_cb, *settings], [chatbot, textbox], show_progress="hidden",
                              **model)
        sent.then(panel_after_turn, panel_in, panel_out, **private)
        again = regen_btn.click(regenerate_ui, settings, [chatbot, textbox], show_progress="hidden", **model)
        again.then(panel_ui, panel_in, panel_out, **private)
        stop_btn.click(stop_ui, None, None, queue=False, **private)
        undo_btn.click(undo_ui, None, chatbot, **private).then(panel_ui, panel_in, panel_out, **private)
        clear_btn.click(clear_ui, None, [chatbot, selected], **private).then(panel_ui, panel_in, panel_out,
                                                                          **private)
        for control in (image_dd, which, metric, cmap):
            control.input(panel_ui, panel_in, panel_out, **private)
        opacity.release(panel_ui, panel_in, panel_out, **private)
        overlay_img.select(click_ui, panel_in[:-1], [overlay_img, zoom_img, zoom_md, selected], **private)
        api_btn.click(api_chat, [api_msg, api_files, api_gen, api_temp], [api_reply, api_image, api_gallery],
                      api_name="chat", concurrency_id="model", concurrency_limit=2,
                      api_description="Chat turn: (message, images, generate_image, temperature) -> "
                                      "(reply, generated image or None, gallery of mining heatmaps). Notes "
                                      "about the turn end the reply, each a paragraph starting 'Note: '.")
        demo.unload(end_session)
    return demo


ARGS = parse_args([])
LOADER: Loader


def main(argv=None):
    global ARGS, LOADER
    ARGS = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a clean exit: the temp folder is removed
    LOADER = Loader(ARGS).start()
    demo = build_demo()
    demo.queue(default_concurrency_limit=8, max_size=64)
    gr.set_static_paths([str(EXAMPLES)])
    demo.launch(server_name=ARGS.host, server_port=ARGS.port, share=ARGS.share, max_file_size=MAX_FILE_BYTES,
                allowed_paths=[str(EXAMPLES)], css=CSS, footer_links=["api", "gradio"])


if __name__ == "__main__":
    main()

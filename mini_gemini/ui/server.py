"""The app's server-side state: the model loaded in the background, and each client's display state.

`ARGS` and `LOADER` are set by `mini_gemini.ui.app.main`; each browser tab or API client has its own
engine session (keyed by Gradio's session hash) and its own `Extras` (display copies, failed messages)."""
from __future__ import annotations

import atexit
import hashlib
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr
from gradio import processing_utils
from gradio.utils import get_upload_folder

from ..errors import ModelLoadError
from ..files import create_new
from ..resources import demo_model_path, resolve_model_name
from .edits import EditGate
from .markup import code, literal
from .settings import DEFAULT_MODEL, RED_SQUARE, TURNS_AT_ONCE, parse_args
from .zerogpu import use_engine

if TYPE_CHECKING:
    from ..chat import Engine

log = logging.getLogger(__name__)
MAX_FAILED = 20  # failed messages a conversation keeps on show (they hold the user's text)
ARGS = parse_args([])   # replaced by main()
LOADER: Loader | None = None
BLOCKS: gr.Blocks | None = None  # the app's page (set by main): whose upload route received which files
# ZeroGPU (ui/zerogpu.py): the decorated functions (a turn, an attribution) find the engine through the app's loader,
# at call time
use_engine(lambda: LOADER.wait())

DEMO_MODEL = ("It is a small model trained only on scenes like the examples, to answer “" + RED_SQUARE + "”, which "
              "colour the square with the digit is, how many squares there are and whether a colour is there, "
              "across the pictures of one conversation (“… of Image 2?”); its answers to anything else, and the "
              "image prompts it writes, mean nothing.")


class Loader:
    """Loads the model in a thread so that the page, with its progress line, is up at once."""

    def __init__(self, args):
        self.args = args
        self.stage, self.fraction, self.started = "Starting…", 0.0, time.monotonic()
        self.engine: Engine | None = None
        self.banner = ""          # markdown: why the model in use is not the one asked for
        self.failure = ""         # nothing at all could be loaded
        self.done = threading.Event()
        self.demo = False         # the bundled demo model is in use (it knows one task only)

    def start(self) -> Loader:
        threading.Thread(target=self._run, daemon=True, name="load-model").start()
        return self

    def _set(self, stage: str, fraction: float):
        self.stage, self.fraction = stage, fraction
        log.info(stage)

    def _run(self):
        a = self.args
        try:
            try:
                model = self._load(resolve_model_name(a.model), quant=True, remote=bool(getattr(a, "llm_server", None)))
            except Exception as e:  # noqa: BLE001 — whatever went wrong, the app still starts
                why = str(e) if isinstance(e, ModelLoadError) else f"{type(e).__name__}: {e}"
                log.warning("could not load %s: %s", a.model, why)
                model, what = self._fallback()
                hub_id = a.model if _looks_like_hub_id(a.model) else DEFAULT_MODEL
                self.banner = (f"**Could not load {code(a.model)}.** {literal(why)}\n\n{what} To chat with real "
                               f"weights, start with `python app.py --model /path/to/checkpoint`, or with a hub id "
                               f"such as {code(hub_id)} once it is in the Hugging Face cache (`hf download "
                               f"{hub_id}` on a machine with internet access fills it).")
            from ..chat import Engine  # torch and friends load here, in the background, not before the page
            from ..imagegen import ImageGenerator
            sdxl = None if str(a.sdxl).lower() in ("", "none", "off") else \
                ImageGenerator(a.sdxl, device=a.device)  # loads on first use
            # the LLM server serves the checkpoint asked for, not the fallback model
            server = getattr(a, "llm_server", None) if getattr(model, "llm_layers", True) is False else None
            if sdxl is not None:
                self._set("Checking that Stable Diffusion XL can be had (cached or reachable)…", 0.9)
                sdxl.check_source()  # unavailable (offline, not cached): the switch says so at once
            self.engine = Engine(model, sdxl, llm_server=server, max_active=TURNS_AT_ONCE)
            if self.demo and not self.banner:  # asked for by name: say what it is all the same
                self.banner = (f"**This is the bundled demo model** ({code(a.model)}). {DEMO_MODEL} To chat about "
                               "your own photos, start with `python app.py --model YanweiLi/MGM-2B` (downloaded "
                               "on first use) or `--model /path/to/checkpoint`.")
            from ..chat.serving import settle
            settle(self.engine)  # CPU threads for the model's size; what was loaded out of the collector's sight
            self._set(f"Ready: {model.name_or_path}", 1.0)
        except Exception as e:  # noqa: BLE001
            self.failure = f"The app could not load any model ({type(e).__name__}: {e})."
            self._set(self.failure, 1.0)
        finally:
            self.done.set()

    def _load(self, name: str, quant: bool = False, remote: bool = False):
        from ..model_flags import quantization_arg
        self._set("Importing torch…", 0.02)  # the two slowest imports, each said (the terminal is not silent)
        import torch  # noqa: F401
        self._set("Importing transformers…", 0.04)
        from ..modeling.loading import load_pretrained, resolve
        a = self.args
        self.demo = Path(name).resolve() == demo_model_path().resolve()  # the bundled one-task model
        self._set(f"Finding {name} (local folder, Hugging Face cache or download)…", 0.05)
        folder = resolve(name)
        device = a.device or ("cuda" if _cuda() else "cpu")
        self._set(f"Loading the weights of {name} onto {device}…", 0.3)
        model = load_pretrained(str(folder), device=device, dtype=a.dtype, template=a.template,
                                load_in_4bit=quant and a.load_in_4bit, load_in_8bit=quant and a.load_in_8bit,
                                quantization=quantization_arg(a) if quant else None,
                                llm_layers=not remote)  # remote: the LLM's layers run on the --llm-server
        model.name_or_path = name
        return model

    def _fallback(self):
        """The bundled demo model (it ships with the package; a checkout without it cannot run offline)."""
        if not (demo_model_path() / "config.json").exists():
            raise ModelLoadError(f"The bundled demo model is missing ({demo_model_path()}); reinstall the package "
                                 "or restore assets/demo-model from the repository.")
        model = self._load(str(demo_model_path()))
        model.name_or_path = "bundled demo model (assets/demo-model)"
        return model, f"The app runs on the **bundled demo model** instead. {DEMO_MODEL}"

    def wait(self) -> Engine:
        self.done.wait()
        if self.engine is None:
            raise gr.Error(self.failure or "The model is not loaded.")
        return self.engine


def _looks_like_hub_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name or "") is not None and not Path(name).exists()


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


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
    typed: dict | None = None           # what the user had in the input box, to give back to them


_workdir: Path | None = None
KEEP_RENDERS = 3  # mining-panel pictures and downloads kept per client and kind (older ones are deleted)
KEPT_FILES = 64   # files a client is shown again and again (a picture's gallery maps), the least recent deleted


def workdir() -> Path:
    """This process's temp folder (display copies, generated images, downloads); removed at exit."""
    global _workdir
    if _workdir is None:
        _workdir = Path(tempfile.mkdtemp(prefix="mgm-app-"))
        atexit.register(shutil.rmtree, _workdir, ignore_errors=True)
    return _workdir


class Extras:
    """A client's display state beside its engine session: display copies, failed messages, the files shown
    to it (in its own folder; Gradio serves copies of them from its cache) and the order of its chat updates.

    Disk stays bounded: the mining panel's older pictures and downloads are deleted as new ones come
    (KEEP_RENDERS kept), and `close` (the client left, or the engine dropped its conversation) deletes its
    folder, Gradio's cached copies of its files and the files it uploaded."""

    def __init__(self, sid: str):
        self.folder = workdir() / hashlib.sha256(sid.encode()).hexdigest()[:20]
        self.folder.mkdir(parents=True, exist_ok=True)
        # in every file name: Gradio caches a served file under its content's hash and its name, so no other
        # client ever has the same cached file (one client's leaving never deletes another's picture)
        self.tag = secrets.token_hex(4)
        self.lock = threading.RLock()       # views, failed messages, files: several events of a client at once
        self.gate = EditGate()              # chat updates of a streaming turn vs edits of the history
        self.views: list[View] = []         # parallel to the engine session's turns
        self.failed: list[Failed] = []
        self.display: dict[str, str] = {}   # image key -> display copy
        self.renders: dict[str, list[list[Path]]] = {}  # kind -> files of its latest renders, newest last
        self.kept: OrderedDict[object, Path] = OrderedDict()  # what a file shows -> the file (`kept_file`)
        self.uploads: set[str] = set()      # files this client sent (paths in Gradio's upload folder)
        self.images_seen = 0                # images the mining panel has offered so far
        self.closed = False

    def new_file(self, stem: str, suffix: str) -> Path:
        """A new, empty file of this client's folder (`folder/stem-TAG-N.suffix`) for the caller to write: the
        name is taken atomically, so two events of one client writing at once never share (or replace) a file."""
        if self.closed:
            raise RuntimeError("this client's session has ended")
        path, fd = create_new(self.folder, f"{stem}-{self.tag}", suffix)
        os.close(fd)
        return path

    def keep_render(self, kind: str, paths: list) -> None:
        """Files of a new render of `kind` (the mining panel's pictures, its downloads, /chat's gallery): the
        renders before the last KEEP_RENDERS are deleted, with Gradio's copies (the page shows the newest;
        one or two before it may still be on their way to it)."""
        with self.lock:
            renders = self.renders.setdefault(kind, [])
            renders.append([Path(p) for p in paths])
            old, renders[:] = renders[:-KEEP_RENDERS], renders[-KEEP_RENDERS:]
        for files in old:
            for path in files:
                _discard(path)

    def kept_file(self, key, stem: str, suffix: str, data: bytes) -> Path:
        """The file of this client that holds `data` for `key` (what it shows: a picture's mining map, say), written
        the first time only; kept until the client leaves (the KEPT_FILES most recent ones)."""
        with self.lock:
            path = self.kept.get(key)
            if path is not None and path.is_file():
                self.kept.move_to_end(key)
                return path
            path = self.new_file(stem, suffix)
            path.write_bytes(data)
            self.kept[key] = path
            old = []
            while len(self.kept) > KEPT_FILES:
                old.append(self.kept.popitem(last=False)[1])
        for p in old:
            _discard(p)
        return path

    def note_uploads(self, files: list) -> None:
        """Remember the files a message sent (deleted when this client's session ends)."""
        with self.lock:
            self.uploads.update(str(f) for f in files if isinstance(f, (str, Path)))

    def fail(self, failed: Failed):
        """Show a message that got an error; only the last MAX_FAILED stay (a client may fail forever)."""
        with self.lock:
            self.failed.append(failed)
            del self.failed[:-MAX_FAILED]

    def sync(self, n_turns: int):
        with self.lock:
            del self.views[n_turns:]
            self.views += [View() for _ in range(n_turns - len(self.views))]
            self.failed = [f for f in self.failed if f.position <= n_turns]

    def settle(self, position: int, n_turns: int, view: View | None) -> None:
        """After a turn: the views follow the history's `n_turns` turns, and turn `position` (if still
        there) gets `view`."""
        with self.lock:
            self.sync(n_turns)
            if view is not None and position < n_turns:
                self.views[position] = view

    def show(self, image, key: str) -> str:
        """A display copy of an input image (as the model saw it, EXIF applied), saved once per picture."""
        with self.lock:
            if key not in self.display:
                im = image.copy()
                im.thumbnail((1280, 1280))
                path = self.new_file("input", ".jpg")
                im.save(path, quality=92)  # a display copy: JPEG writes in ~1 ms where PNG takes ~30 ms
                self.display[key] = str(path)
            return self.display[key]

    def close(self, shared_uploads: set[str] = frozenset()) -> None:
        """Delete this client's files: Gradio's cached copies of what it was shown, its folder, and the files it
        uploaded (but not those in `shared_uploads`, which another client sent too)."""
        with self.lock:
            self.closed = True
            uploads = self.uploads - set(shared_uploads)
        for path in sorted(self.folder.glob("*")):
            _discard(path)
        shutil.rmtree(self.folder, ignore_errors=True)
        for upload in uploads:
            _discard_upload(upload)


def _gradio_cache() -> Path:
    return Path(get_upload_folder())


def _discard(path: Path) -> None:
    """Delete one of the app's files and the copy Gradio serves it from (in its cache, named by the file's
    content and name; asked of Gradio itself, which makes the copy if it was never served)."""
    if not path.is_file():
        return
    try:
        cached = Path(processing_utils.save_file_to_cache(str(path), str(_gradio_cache())))
    except OSError:
        cached = None
    path.unlink(missing_ok=True)
    if cached is not None and cached != path:
        _remove_with_folder(cached)


def _discard_upload(upload: str) -> None:
    """Delete a file a client uploaded: only one Gradio received through its upload route (never a file of the
    app, an example or a file Gradio keeps)."""
    blocks = BLOCKS
    if blocks is None or upload not in blocks.upload_file_set:
        return
    if any(upload in getattr(b, "keep_in_cache", ()) for b in blocks.blocks.values()):
        return
    blocks.upload_file_set.discard(upload)
    _remove_with_folder(Path(upload))


def _remove_with_folder(path: Path) -> None:
    """Remove a file of Gradio's cache and its folder (one per content hash) once that is empty."""
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass  # another file is there, or it is gone already


EXTRAS: dict[str, Extras] = {}
_extras_lock = threading.Lock()


def user_error(message: str, detail: str = "") -> gr.Error:
    """An error the user caused (a bad file, a busy conversation, a wrong-typed API value): shown to them, one
    line in the server log (with `detail`, for the log only) and no traceback; the server keeps serving."""
    log.info("refused: %s%s", " ".join(str(message).split())[:300], f" ({detail})" if detail else "")
    return gr.Error(message, print_exception=False)


def session_of(request: gr.Request | None):
    """This client's engine session and display state (created on first use; idle ones are dropped)."""
    engine = LOADER.wait()
    sid = getattr(request, "session_hash", None) or "anonymous"
    session = engine.session(sid)
    with _extras_lock:
        gone = []
        if sid not in EXTRAS:
            gone = [k for k in EXTRAS if not engine.has_session(k)]  # the engine dropped them (LRU)
            EXTRAS[sid] = Extras(sid)
        ex = EXTRAS[sid]
    for old in gone:
        _close_extras(old)
    ex.sync(len(session.turns))
    return session, ex


def end_session(request: gr.Request):
    """The client left (its page closed, its API client closed): its conversation and its files go."""
    sid = getattr(request, "session_hash", None)
    if sid and LOADER.engine is not None:
        LOADER.engine.end_session(sid)
    if sid:
        _close_extras(sid)


def _close_extras(sid: str) -> None:
    with _extras_lock:
        ex = EXTRAS.pop(sid, None)
        others = set().union(*(other.uploads for other in EXTRAS.values())) if ex is not None else set()
    if ex is not None:
        ex.close(shared_uploads=others)

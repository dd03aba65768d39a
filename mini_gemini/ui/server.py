"""The app's server-side state: the model loaded in the background, and each client's display state.

`ARGS` and `LOADER` are set by `mini_gemini.ui.app.main`; each browser tab or API client has its own
engine session (keyed by Gradio's session hash) and its own `Extras` (display copies, failed messages)."""
from __future__ import annotations

import atexit
import logging
import hashlib
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr

from ..errors import ModelLoadError
from ..resources import demo_model_path, resolve_model_name
from .markup import code, literal
from .settings import DEFAULT_MODEL, RED_SQUARE, parse_args

if TYPE_CHECKING:
    from ..chat import Engine

log = logging.getLogger(__name__)
MAX_FAILED = 20  # failed messages a conversation keeps on show (they hold the user's text)
ARGS = parse_args([])   # replaced by main()
LOADER: "Loader | None" = None

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

    def start(self) -> "Loader":
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
            self.engine = Engine(model, sdxl, llm_server=server)
            self._set(f"Ready: {model.name_or_path}", 1.0)
        except Exception as e:  # noqa: BLE001
            self.failure = f"The app could not load any model ({type(e).__name__}: {e})."
            self._set(self.failure, 1.0)
        finally:
            self.done.set()

    def _load(self, name: str, quant: bool = False, remote: bool = False):
        from ..model_flags import quantization_arg
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
        return model, ("The app runs on the **bundled demo model** instead: a small model trained only on "
                       f"scenes like the examples, to answer “{RED_SQUARE}”, which colour the square with the "
                       "digit is, how many squares there are and whether a colour is there, across the "
                       "pictures of one conversation (“… of Image 2?”).")

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
        self.images_seen = 0                # images the mining panel has offered so far

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


def user_error(message: str) -> gr.Error:
    """An error the user caused (a bad file, a busy conversation): shown to them, one line in the server log
    and no traceback; the server keeps serving."""
    log.info("refused: %s", " ".join(str(message).split())[:300])
    return gr.Error(message, print_exception=False)


def session_of(request: gr.Request | None):
    """This client's engine session and display state (created on first use; idle ones are dropped)."""
    engine = LOADER.wait()
    sid = getattr(request, "session_hash", None) or "anonymous"
    session = engine.session(sid)
    with _extras_lock:
        if sid not in EXTRAS:
            for old in [k for k in EXTRAS if not engine.has_session(k)]:  # the engine dropped them (LRU)
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

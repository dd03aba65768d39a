"""Running a chat turn for the UI: stream the engine's events into chat messages; Stop, Undo, Clear."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from ..chat import MAX_USER_CHARS, GenOptions, clean_text
from ..errors import ImageError, SessionBusyError
from . import server
from .markup import answer_messages, user_bubble, render
from .server import Extras, Failed, View, session_of, user_error
from .zerogpu import Handoff, turn_events

log = logging.getLogger(__name__)

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
    asked: bool = False                 # the turn asked for an image (only then has it an image prompt)

    def messages(self) -> list[dict]:
        return [user_bubble(self.user, self.files, self.first)] + answer_messages(
            self.text, self.notices, self.prompt, self.image_file, self.progress, self.error, asked=self.asked)


# ---- running a turn -------------------------------------------------------------------------------
def run_turn(session, ex: Extras, text: str, files: list, generate_image: bool, options: GenOptions,
             regenerate: bool = False, display: bool = True):
    """Stream one turn; yields the Live state whenever it changed (at most ~20 times a second for text).
    display: make the display copies of the pictures the chat shows (API clients see no chat: False)."""
    if regenerate:
        while ex.failed and ex.failed[-1].position == len(session.turns):
            ex.failed.pop()
        if not session.turns:
            return
        t = session.turns[-1]
        n_history, images = len(session.turns) - 1, []
        live = Live(clean_text(t.user), [ex.show(im.image, im.key) for im in t.images],
                    len(session.images) - len(t.images) + 1, history=n_history, asked=bool(generate_image))
    else:
        n_history, images = len(session.turns), []
        # the engine reads no more than MAX_USER_CHARS either; what is shown (and kept on failure) is bounded
        live = Live(clean_text(text)[:MAX_USER_CHARS], [], len(session.images) + 1, history=n_history,
                    asked=bool(generate_image))
        ex.note_uploads(files)  # deleted when the client's session ends
        try:  # checked and decoded by the engine first, so that a bad file is reported at once
            images = session.prepare_images(files)
        except ImageError as e:
            names = ", ".join(Path(str(f)).name for f in files)
            live.user = (live.user + "\n\n" if live.user else "") + f"(file: {names})"
            live.error = str(e)
            log.info("refused an upload: %s", e)  # a user error: one line, no traceback
        for k, loaded in enumerate(images):  # the engine takes the decoded images and their keys as they are
            if display:
                live.files.append(ex.show(loaded.image, loaded.key))
            live.notices += [f"Image {live.first + k}: {n}." for n in loaded.notes]
        if live.error is not None:
            live.files = []
            # the text goes back to the input box; the files do not (one of them is what failed)
            ex.fail(Failed(len(session.turns), live.user, [], live.error, {"text": text, "files": []}))
            yield live
            return
    yield live
    events = turn_events(session.id, session.turns, text, images, generate_image, options, regenerate)
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
                live.asked = ev.data.want_image
                live.text = ev.data.assistant or live.text
                live.prompt = ev.data.image_prompt or live.prompt
            elif isinstance(ev, Handoff):  # ZeroGPU: the worker's history replaces ours
                session.adopt(ev.turns)
                continue
            last = time.monotonic()
            yield live
    finally:
        events.close()
        live.progress = None
        n_turns = len(session.turns)
        if live.error:
            ex.sync(n_turns)
            ex.fail(Failed(n_turns, live.user, live.files, live.error,
                           None if regenerate else {"text": text, "files": list(files)}))
        else:
            ex.settle(n_history, n_turns, View(list(live.notices), live.image_file))
    yield live


def gen_options(temperature, top_p=0.7, max_new_tokens=None, steps=30, ocr=False) -> GenOptions:
    """The page's settings as GenOptions; values are taken as sent (`GenOptions.checked`, applied by the
    session, makes any of them one that works: a crafted event cannot fail the turn with a traceback)."""
    return GenOptions(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens or server.ARGS.max_new_tokens,
                      steps=steps, ocr=bool(ocr))


def _files(message) -> tuple[str, list]:
    message = message or {}
    files = [f if isinstance(f, str) else (f.get("path") if isinstance(f, dict) else getattr(f, "path", None))
             for f in (message.get("files") or [])]
    return message.get("text") or "", [f for f in files if f]


def chat_ui(message, generate_image, read_text, temperature, top_p, max_new_tokens, steps, request: gr.Request):
    text, files = _files(message)
    if not clean_text(text).strip() and not files:
        yield gr.skip(), gr.skip(), gr.skip()
        return
    session, ex = session_of(request)
    yield from _stream(session, ex, lambda: run_turn(session, ex, text, files, generate_image,
                                                     gen_options(temperature, top_p, max_new_tokens, steps,
                                                              read_text)))


def regenerate_ui(generate_image, read_text, temperature, top_p, max_new_tokens, steps, request: gr.Request):
    """Answer the last message again, following the switches as they are now. When the last message
    failed, nothing is redone (the answer before it was not asked for): its text goes back to the input."""
    session, ex = session_of(request)
    if ex.gate.streaming():  # the answer being written is the one to redo: stop it, and let its end reach the page
        session.cancel()
        ex.gate.wait_delivered()
    if ex.failed and ex.failed[-1].position == len(session.turns):
        failed = ex.failed[-1]
        gr.Info("Your last message got an error, so there is no answer to redo: its text is back in the "
                "input box, to fix and send again.")
        yield render(session, ex), gr.MultimodalTextbox(value=failed.typed or {"text": "", "files": []},
                                                        interactive=True), gr.skip()
        return
    yield from _stream(session, ex, lambda: run_turn(session, ex, "", [], bool(generate_image),
                                                     gen_options(temperature, top_p, max_new_tokens, steps,
                                                              read_text),
                                                     regenerate=True))


def _stream(session, ex, start):
    """Chatbot + textbox + Stop button updates while a turn streams; the textbox is locked (and Stop
    enabled) until it ends. Undo or Clear meanwhile: see ui/edits.py (the chat then ends as the engine has it)."""
    locked, stop_on = gr.MultimodalTextbox(value=None, interactive=False), gr.Button(interactive=True)
    before = ex.failed[-1] if ex.failed else None
    gate = ex.gate
    stream = gate.open_stream()
    turn = start()
    try:
        for live in turn:
            if gate.editing():  # the history is being changed: what this turn shows is about to go
                continue
            yield render(session, ex, upto=live.history) + live.messages(), locked, stop_on
    except Exception as e:  # noqa: BLE001 — the history must stay usable whatever happened
        log.exception("a turn failed")
        ex.fail(Failed(len(session.turns), "", [], f"Something went wrong ({type(e).__name__}: {e})."))
    except GeneratorExit:  # the client went away: nothing more reaches it
        gate.abandon_stream(stream)
        raise
    finally:
        turn.close()  # also when the client went away: the engine then stops generating
    # a message that failed goes back into the input box, so that nothing the user typed is lost
    typed = ex.failed[-1].typed if ex.failed and ex.failed[-1] is not before else None
    unlocked = gr.MultimodalTextbox(value=typed, interactive=True)
    try:
        for shown in gate.last_words(stream, lambda: render(session, ex)):
            yield shown, unlocked, gr.Button(interactive=False)
    except GeneratorExit:
        gate.abandon_stream(stream)
        raise


def buttons_ui(request: gr.Request):
    """Regenerate, Undo and Clear are enabled only when there is something for them to act on."""
    session, ex = session_of(request)
    redo = bool(session.turns) and not (ex.failed and ex.failed[-1].position == len(session.turns))
    anything = bool(session.turns or ex.failed)
    return gr.Button(interactive=redo), gr.Button(interactive=anything), gr.Button(interactive=anything)


def turn_shown_ui(request: gr.Request):
    """After a turn's stream: the page has all of it (an edit waiting for that may now show its result); then
    the buttons as `buttons_ui` sets them."""
    _, ex = session_of(request)
    ex.gate.delivered()
    return buttons_ui(request)


def stop_ui(request: gr.Request):
    if server.LOADER.engine is not None:
        server.LOADER.engine.cancel(getattr(request, "session_hash", None) or "")


def undo_ui(request: gr.Request):
    """Drop the last exchange (a failed message first); a turn still running is stopped by the engine. The
    chat shown is the engine's, after any streaming turn's last update (ui/edits.py)."""
    session, ex = session_of(request)
    with ex.gate.edit():
        if ex.failed and ex.failed[-1].position == len(session.turns):
            with ex.lock:
                ex.failed.pop()
        else:
            try:
                session.undo()
            except SessionBusyError as e:  # the running turn did not stop in time
                raise user_error(str(e)) from e
            ex.sync(len(session.turns))
    return render(session, ex)


def clear_ui(request: gr.Request):
    """Forget the conversation (a running turn is stopped first); shown as Undo's result is (ui/edits.py)."""
    session, ex = session_of(request)
    with ex.gate.edit():
        try:
            session.clear()
        except SessionBusyError as e:
            raise user_error(str(e)) from e
        with ex.lock:
            ex.failed, ex.views = [], []
    return render(session, ex), None

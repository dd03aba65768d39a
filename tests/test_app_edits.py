"""The page's chat follows every edit of the history, and shows each answer as written.

The UI's handlers run in this process on a tiny model and a tiny SDXL, driven the way Gradio drives them: a
consumer thread iterates a turn's stream (each value it takes is a message sent to the page), then runs the
stream's follow-up event; Undo or Clear is clicked from another thread while the turn streams.

The page shows the last chat value it applied, and Gradio does not order the messages of two events (a
stream's updates, the "completed" message that repeats its last value, an edit's result) against each other.
So the page ends right, whatever the order, only if every value that can come last is the engine's history:
the stream's last value and the edit's result both; and the edit's result must come after the stream is done.
"""
import threading
from types import SimpleNamespace

import pytest
from helpers import endless

from mini_gemini.ui.markup import render

MAX_NEW = 16


@pytest.fixture(scope="module")
def ui(tiny_checkpoint, tiny_sdxl):
    """The app's server state with a loaded engine (tiny vicuna MGM + tiny SDXL), as `app.main` sets it up."""
    from mini_gemini.ui import server, settings, turns
    args = settings.parse_args(["--model", str(tiny_checkpoint("vicuna")), "--sdxl", str(tiny_sdxl), "--device",
                                "cpu", "--max-new-tokens", str(MAX_NEW)])
    mp = pytest.MonkeyPatch()
    mp.setattr(server, "ARGS", args)
    mp.setattr(server, "LOADER", server.Loader(args).start())
    server.LOADER.wait()
    yield SimpleNamespace(server=server, turns=turns, engine=server.LOADER.engine)
    mp.undo()


_ids = iter(range(10**6))


def client():
    return SimpleNamespace(session_hash=f"edits-{next(_ids)}")


def send(ui, request, text, generate_image=False, steps=2, max_new_tokens=MAX_NEW):
    """One message through the page's handlers, consumed as Gradio does; returns the chat values sent."""
    shown = [update[0] for update in ui.turns.chat_ui({"text": text, "files": []}, generate_image, False, 0.0, 0.7,
                                                      max_new_tokens, steps, request)]
    ui.turns.turn_shown_ui(request)  # the stream's follow-up event (`.then`)
    return shown


def user_texts(chat) -> list[str]:
    return [part["text"] for m in chat if m["role"] == "user" for part in m["content"] if "text" in part]


class Page:
    """A turn streaming to the page (a consumer thread, as Gradio's), with an edit clicked meanwhile."""

    def __init__(self, ui, request, text, generate_image, steps, ready):
        self.ui, self.request, self.messages, self.lock = ui, request, [], threading.Lock()
        self.ready, self.started = ready, threading.Event()
        self.thread = threading.Thread(target=self._consume, args=(text, generate_image, steps))
        self.thread.start()

    def _send(self, who, value):
        with self.lock:
            self.messages.append((who, value))

    def _consume(self, text, generate_image, steps):
        stream = self.ui.turns.chat_ui({"text": text, "files": []}, generate_image, False, 0.0, 0.7, 1500, steps,
                                       self.request)
        last = None
        for chat, _, _ in stream:
            self._send("stream", chat)
            last = chat
            if self.ready(chat):
                self.started.set()
        self._send("completed", last)  # Gradio's "completed" message repeats the stream's last value
        self.ui.turns.turn_shown_ui(self.request)  # the page runs the follow-up once it has that message
        self.started.set()

    def edit(self, handler):
        assert self.started.wait(120), "the turn never reached the moment of the edit"
        result = handler(self.request)
        self._send("edit", result[0] if isinstance(result, tuple) else result)
        self.thread.join(120)
        return self.messages


def drawing(chat) -> bool:
    return any("%" in str(m.get("metadata", {}).get("title", "")) for m in chat)


def writing(chat) -> bool:
    last = chat[-1] if chat else {}
    return last.get("role") == "assistant" and len(last["content"][0].get("text", "")) > 20


@pytest.mark.parametrize("edit", ["undo", "clear"])
@pytest.mark.parametrize("moment", ["image drawing", "answer streaming"])
def test_an_edit_racing_a_streaming_turn_ends_with_the_engines_history(ui, edit, moment):
    request = client()
    send(ui, request, "What digit is in the red square?")
    session, ex = ui.server.session_of(request)
    (kept,) = session.turns
    if moment == "image drawing":  # many steps: the drawing is still on when the edit comes
        page = Page(ui, request, "Draw the squares as a painting.", True, 500, drawing)
        messages = page.edit(getattr(ui.turns, f"{edit}_ui"))
    else:
        with endless(ui.engine.model):  # an answer that would run to 1500 tokens
            page = Page(ui, request, "Tell me a very long story.", False, 2, writing)
            messages = page.edit(getattr(ui.turns, f"{edit}_ui"))
    assert not page.thread.is_alive()
    held = render(session, ex)  # what the engine holds now, as the page shows it
    assert session.turns == ([kept] if edit == "undo" else [])
    assert user_texts(held) == (["What digit is in the red square?"] if edit == "undo" else [])
    whos = [w for w, _ in messages]
    # every value that may be the last one the page applies is the engine's history
    assert dict(messages)["edit"] == held
    stream_values = [v for w, v in messages if w == "stream"]
    assert stream_values[-1] == held and dict(messages)["completed"] == held
    # and the edit's result was sent only once the page had all of the stream (its follow-up ran)
    assert whos.index("completed") < whos.index("edit")


def test_the_stream_shows_nothing_of_a_turn_being_undone_once_the_edit_began(ui):
    """While Undo waits for the running turn to stop, the stream sends no chat that still holds it."""
    request = client()
    session, ex = ui.server.session_of(request)
    page = Page(ui, request, "Draw the squares as a painting.", True, 500, drawing)
    messages = page.edit(ui.turns.undo_ui)
    edit_began = next(i for i, (w, v) in enumerate(messages) if w == "stream" and v == [])
    assert all(v == [] for w, v in messages[edit_began:] if w in ("stream", "completed", "edit"))
    assert session.turns == []


def test_regenerate_during_a_stream_redoes_the_answer_after_the_stream_ended(ui):
    request = client()
    session, ex = ui.server.session_of(request)
    with endless(ui.engine.model):
        page = Page(ui, request, "Tell me a very long story.", False, 2, writing)

        def regenerate(req):
            return list(ui.turns.regenerate_ui(False, False, 0.0, 0.7, MAX_NEW, 2, req))[-1]
        messages = page.edit(regenerate)
    (turn,) = session.turns
    assert len(turn.token_ids) == MAX_NEW and not turn.cancelled  # answered again, to its (short) length
    assert "Stopped; the partial answer is kept." in str(dict(messages)["completed"])  # not run to its end first
    whos = [w for w, _ in messages]
    assert whos.index("completed") < whos.index("edit") and dict(messages)["edit"] == render(session, ex)


# ---- one answer, shown as written ---------------------------------------------------------------------
HTML = "Write <h>Title</h> for a heading; a lone <h> opens one."


def test_only_a_turn_that_asked_for_an_image_has_an_image_prompt(ui):
    from mini_gemini.chat.types import Turn
    from mini_gemini.ui.markup import answer_messages, split_image_prompt
    assert split_image_prompt(HTML, asked=False) == (HTML, None)
    assert split_image_prompt("A cat. <h>a red cat</h>", asked=True) == ("A cat.", "a red cat")
    assert split_image_prompt("Here: <h>a red cat", asked=True) == ("Here:", "a red cat")  # still streaming
    shown = answer_messages(HTML, [], None, None, asked=False)
    (message,) = shown
    text = message["content"][0]["text"]
    assert text == "Write &lt;h>Title&lt;/h> for a heading; a lone &lt;h> opens one." and "Image prompt" not in text
    # the chat as rendered from the history: the turn's own flag decides
    request = client()
    session, ex = ui.server.session_of(request)
    session.adopt([Turn(user="How do I write a heading?", assistant=HTML),
                   Turn(user="Draw a cat", assistant="Sure. <h>a red cat</h>", want_image=True, image_prompt="a red cat")])
    chat = render(session, ex)
    answers = [m["content"][0]["text"] for m in chat if m["role"] == "assistant"]
    assert answers[0] == text
    assert answers[1] == "Sure.\n\n*Image prompt:* a red cat"

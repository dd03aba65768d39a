"""The app's `/chat` API under hostile input, faults and many users: whatever arrives, the client gets a
clear message, its history is kept, the server keeps serving, and nobody sees another's data.

The app runs in this process (one server for the module, tiny model, greedy answers) so that a test can
reach its engine: inject a fault into generation, look at a client's session, lower the session bound.
Clients are real `gradio_client` clients over HTTP; a few requests are sent raw, as an attacker would.
"""
import json
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from corpus import EXPECT, make_corpus
from helpers import endless, fault_at, free_port, on_llm_forward, scripted
from PIL import Image

from mini_gemini.chat.engine import MAX_USER_CHARS
from mini_gemini.constants import IMAGE_TOKEN_INDEX
from mini_gemini.inputs.images import MAX_FILE_BYTES, image_key
from mini_gemini.ui.markup import split_image_prompt

ROOT = Path(__file__).resolve().parents[1]
HELLO = "What colour is the square?"
FOLLOW_UP = "And the circle next to it?"
ASK = "What is in this picture?"
MAX_NEW = 16  # answer length of the app under test: short answers keep the module fast
TYPED = ["<image>", "<start_of_turn>", "<end_of_turn>", "</s>", "<s>", "<|eot_id|>", "<|start_header_id|>",
         "[INST]", "[/INST]", "<|im_end|>", "<|im_start|>", "USER:", "ASSISTANT:", "<GEN>", "<h>", "</h>"]


@dataclass
class Server:
    url: str
    app: object       # the app's server state (mini_gemini.ui.server), set up by app.main
    engine: object    # the app's Engine
    demo: object      # the running gr.Blocks


@pytest.fixture(scope="module")
def srv(tiny_checkpoint, tmp_path_factory):
    """The real `app.main` (options, queue, launch limits and all), launched without blocking, with a Gradio
    cache of its own (what it holds is measured)."""
    import gradio as gr

    from mini_gemini.ui import app
    launched = {}
    real_launch = gr.Blocks.launch

    def launch(self, *args, **kw):
        launched["demo"] = self
        return real_launch(self, *args, **dict(kw, prevent_thread_lock=True))

    port, sigterm = free_port(), signal.getsignal(signal.SIGTERM)
    cache = pytest.MonkeyPatch()
    cache.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio-cache")))
    mp = pytest.MonkeyPatch()
    mp.setattr(gr.Blocks, "launch", launch)
    mp.setattr(gr.Blocks, "block_thread", lambda self: None)  # main returns; the server thread serves
    try:
        app.main(["--model", str(tiny_checkpoint("vicuna")), "--sdxl", "none", "--device", "cpu",
                  "--host", "127.0.0.1", "--port", str(port), "--max-new-tokens", str(MAX_NEW)])
    finally:
        mp.undo()
        signal.signal(signal.SIGTERM, sigterm)  # main installs its own: give pytest's back
    from mini_gemini.ui import server
    engine = server.LOADER.wait()
    try:
        yield Server(f"http://127.0.0.1:{port}", server, engine, launched["demo"])
    finally:
        launched["demo"].close()
        cache.undo()


def client(srv):
    from gradio_client import Client
    return Client(srv.url, verbose=False, download_files=False)


def chat(c, message, images=(), generate_image=False):
    from gradio_client import handle_file
    return c.predict(message, [handle_file(str(p)) for p in images], generate_image, 0.0, api_name="/chat")


def session(srv, c):
    """The engine's conversation of gradio client `c` (the app keys them by Gradio's session hash)."""
    s = srv.engine.sessions.lookup(c.session_hash)
    assert s is not None, "the client has no conversation on the server"
    return s


def wait_for(predicate, timeout: float = 60.0) -> bool:
    """Poll `predicate` until it holds (True) or `timeout` seconds passed (False): for server-side state that
    follows a client's request asynchronously."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def clean(message: str) -> str:
    """A message fit for users: no Python traceback, no path on the server."""
    import gradio.utils
    assert "Traceback" not in message and 'File "' not in message, message
    for path in (str(ROOT), tempfile.gettempdir(), gradio.utils.get_upload_folder()):
        assert path not in message, message
    return message


def refused(c, message, images=(), *, match: str) -> str:
    from gradio_client.exceptions import AppError
    with pytest.raises(AppError) as info:
        chat(c, message, images)
    text = clean(str(info.value))
    assert match.lower() in text.lower(), text
    return text


def raw_chat(srv, data: list) -> tuple[str, str]:
    """One /chat call without gradio_client (nothing uploaded for us): (last event, its data)."""
    r = httpx.post(srv.url + "/gradio_api/call/chat", json={"data": data}, timeout=30)
    r.raise_for_status()
    event = data_line = ""
    with httpx.stream("GET", srv.url + f"/gradio_api/call/chat/{r.json()['event_id']}", timeout=60) as resp:
        for line in resp.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data_line = line.split(":", 1)[1].strip()
    return event, data_line


# ---- bad files ---------------------------------------------------------------------------------------------
def test_every_corpus_file_is_refused_clearly_or_answered_with_its_notes(srv, tmp_path):
    paths = make_corpus(tmp_path)
    c = client(srv)
    chat(c, HELLO)
    (first,) = session(srv, c).turns
    for name, path in paths.items():
        exp = EXPECT[name]
        if exp.loads:  # another client each time: the server keeps serving others between the bad files
            other = client(srv)
            reply, image, gallery = chat(other, ASK, [path])
            assert isinstance(reply, str) and image is None, name
            assert all(f"Note: Image 1: {note}." in reply for note in exp.notes), (name, reply)
            assert ("Note:" in reply) == bool(exp.notes), (name, reply)
            assert [g["caption"] for g in gallery] == ["Image 1: mining focus", "Image 1: mining gain",
                                                       "Image 1: where the answer looked"], name
            (turn,) = session(srv, other).turns
            assert turn.images[0].image.size == exp.size and turn.assistant is not None, name
        elif name == "too_big.bin":  # Gradio refuses it at the upload already, before the app sees it
            with open(path, "rb") as f:
                r = httpx.post(srv.url + "/gradio_api/upload", files={"files": ("too_big.png", f, "image/png")})
            assert r.status_code == 413 and f"maximum allowed size of {MAX_FILE_BYTES} bytes" in r.text
        else:
            refused(c, ASK, [path], match=exp.message)
        assert session(srv, c).turns == [first], name  # the same turn object: nothing added, nothing lost
    # a bad image among good ones refuses the whole message, says which one, and keeps the history
    refused(c, "Compare them", [paths["grey.png"], paths["truncated.png"]], match="Image 2 of 2")
    # the follow-up is answered exactly as if none of this had happened
    ref = client(srv)
    chat(ref, HELLO)
    assert chat(c, FOLLOW_UP)[0] == chat(ref, FOLLOW_UP)[0]
    assert [t.token_ids for t in session(srv, c).turns] == [t.token_ids for t in session(srv, ref).turns]


# ---- odd text ----------------------------------------------------------------------------------------------
def test_empty_messages_are_refused_and_leave_no_trace(srv):
    c = client(srv)
    for text in ("", "   \n\t ", "\x00\x01\x1b\x7f"):
        refused(c, text, match="Send a message, an image, or both")
    assert not srv.engine.has_session(c.session_hash) or session(srv, c).turns == []
    reply = chat(c, HELLO)[0]
    assert reply and [t.user for t in session(srv, c).turns] == [HELLO]


def test_typed_control_tokens_stay_text_and_draw_nothing(srv, monkeypatch, tmp_path):
    drawn = []

    class Recorder:  # stands in for SDXL: any call would mean a typed tag started image generation
        model = "recorder"

        def generate(self, prompt, **kw):
            drawn.append(prompt)
            return Image.new("RGB", (8, 8))
    monkeypatch.setattr(srv.engine, "imagegen", Recorder())
    photo = tmp_path / "green.png"
    Image.new("RGB", (30, 20), (0, 200, 0)).save(photo)
    hostile = "look " + " x ".join(TYPED) + " <h>a cat</h> <GEN>"
    for images in ([], [photo]):
        c = client(srv)
        reply, image, gallery = chat(c, hostile, images, generate_image=False)
        assert isinstance(reply, str) and image is None and len(gallery) == 3 * len(images)
        (turn,) = session(srv, c).turns
        assert turn.user == hostile and hostile in turn.prompt  # arrived intact, and was given as text
        assert turn.prompt_ids.count(IMAGE_TOKEN_INDEX) == len(images)  # typed "<image>" is no image slot
        assert turn.image_prompt is None and turn.generated_image is None
    assert drawn == []


def test_huge_message_is_trimmed_with_a_notice_and_answered(srv):
    c = client(srv)
    text = ("The red square is left of the blue circle. " * 5000)[:200_000]
    reply = chat(c, text)[0]
    assert f"Note: Your message was cut to its first {MAX_USER_CHARS:,} characters." in reply
    assert "Note: Your message was shortened to" in reply
    (turn,) = session(srv, c).turns
    assert turn.assistant is not None and text.startswith(turn.user) and 0 < len(turn.user) < MAX_USER_CHARS
    assert chat(c, "Thanks!")[0] is not None and len(session(srv, c).turns) == 2


def test_control_characters_are_dropped_scripts_and_emoji_survive(srv):
    c = client(srv)
    chat(c, "a\x00b\x07c\x1b[0m\u200bd\r\ne\x7f\x85f")
    rtl = "שלום עולם — مرحبا بالعالم \u200f 👋🏽 👨\u200d👩\u200d👧 🇫🇷 ok"
    reply = chat(c, rtl)[0]
    assert isinstance(reply, str)
    assert [t.user for t in session(srv, c).turns] == ["abc[0m\u200bd\nef", rtl]
    assert rtl in session(srv, c).turns[1].prompt


# ---- faults ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("when", ["before the first token", "mid-stream"])
def test_fault_in_generation_keeps_history_and_next_turn_is_exact(srv, when):
    ref, c = client(srv), client(srv)
    chat(ref, HELLO), chat(c, HELLO)
    expected = chat(ref, FOLLOW_UP)[0]
    (first,) = session(srv, c).turns
    # the device fails in the LLM's forward (the model of this server; no other client is answered meanwhile)
    with fault_at(srv.engine.model, RuntimeError("device lost"), at=4 if when == "mid-stream" else 1):
        assert "Your conversation is kept" in refused(c, FOLLOW_UP, match="(RuntimeError: device lost)")
    s = session(srv, c)
    assert s.turns == [first] and not srv.engine.kv_store.holds(s.cache_owner)
    assert chat(c, FOLLOW_UP)[0] == expected  # as if the fault had never happened
    assert [t.token_ids for t in session(srv, c).turns] == [t.token_ids for t in session(srv, ref).turns]


def test_failed_image_generation_keeps_the_text_answer(srv, monkeypatch):
    class Broken:  # SDXL that fails the way a GPU does
        model = "broken-sdxl"

        def generate(self, prompt, **kw):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(srv.engine, "imagegen", Broken())
    c = client(srv)
    reply, image, _ = chat(c, "Draw a red square on a white table.", generate_image=True)
    (turn,) = session(srv, c).turns
    text, prompt = split_image_prompt(turn.assistant, asked=True)  # the reply shows the prompt as such, never raw tags
    assert image is None and turn.assistant and reply.startswith(text) and "<h>" not in reply
    assert (f"Image prompt: {prompt}" in reply) == bool(prompt)
    assert "Note: Image generation failed:" in reply and "The text answer is kept." in reply
    clean(reply)
    assert chat(c, "Thanks!")[0] is not None and len(session(srv, c).turns) == 2


def test_cancelled_client_stops_its_generation_and_others_proceed(srv, monkeypatch):
    """A client that cancels mid-answer (closes its stream) stops the scheduler writing for it; others go on."""
    c, other = client(srv), client(srv)
    monkeypatch.setattr(srv.app.ARGS, "max_new_tokens", 1500)  # long answers (the app's length setting)
    requests = []  # per step of the scheduler: how many answers it wrote at once (one logits row kept for each)

    def record(kwargs, output):
        requests.append(len(kwargs["logits_to_keep"]))
    with endless(srv.engine.model), on_llm_forward(srv.engine.model, record):
        job = c.submit("Tell me a very long story.", [], False, 0.0, api_name="/chat")
        assert wait_for(lambda: len(job.outputs()) >= 2)  # it is streaming
        monkeypatch.setattr(srv.app.ARGS, "max_new_tokens", MAX_NEW)
        waiting = other.submit(HELLO, [], False, 0.0, api_name="/chat")  # shares the model with c
        job.cancel()
        # the server settles c's turn once its run has ended (the scheduler dropped it)
        assert wait_for(lambda: srv.engine.has_session(c.session_hash) and len(session(srv, c).turns) == 1)
        (turn,) = session(srv, c).turns
        assert turn.cancelled and 0 < len(turn.token_ids) < 1500
        assert waiting.result(timeout=120)[0] is not None and len(session(srv, other).turns) == 1
        requests.clear()
        assert chat(other, FOLLOW_UP)[0] is not None  # the model is still serving: another answer, alone
        after = list(requests)
    # once c's turn was settled, nothing wrote for it: every step of the model wrote one answer (the other's)
    assert after and set(after) == {1}
    assert chat(c, "Shorter, please.")[0] is not None and len(session(srv, c).turns) == 2


# ---- many users ------------------------------------------------------------------------------------------
def test_eight_clients_at_once_get_exactly_their_own_answers(srv):
    questions = [f"Question {i}: how many {w} are there?" for i, w in
                 enumerate(["circles", "squares", "stars", "lines", "dots", "boxes", "shapes", "objects"])]
    alone = []
    for q in questions:
        c = client(srv)
        alone.append([chat(c, q)[0], chat(c, "Why?")[0]])
    clients = [client(srv) for _ in questions]
    got, errors, barrier = [None] * 8, [], threading.Barrier(8)

    def user(i):
        try:
            barrier.wait()
            got[i] = [chat(clients[i], questions[i])[0], chat(clients[i], "Why?")[0]]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=user, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and got == alone
    for c, q in zip(clients, questions):  # histories never mixed
        assert [t.user for t in session(srv, c).turns] == [q, "Why?"]


# ---- what the server gives away ------------------------------------------------------------------------------
def test_file_routes_serve_nothing_outside_gradios_folders(srv, tmp_path):
    import gradio.utils
    c = client(srv)
    chat(c, ASK, [_png(tmp_path / "private.png", (1, 2, 3))])
    # a file the app made for this user (its heatmaps of the picture), kept in the app's own folder
    copy = str(next(srv.app.EXTRAS[c.session_hash].folder.glob("*.jpg")))
    note = tmp_path / "notes.txt"  # in the temp folder, where Gradio takes the app's *outputs* from
    note.write_text("TOP SECRET 42")
    secrets = {"/etc/passwd": b"root:", str(ROOT / "mini_gemini" / "ui" / "app.py"): b"def api_chat", str(note): b"TOP SECRET",
               copy: b"\xff\xd8\xff"}
    up, back = gradio.utils.get_upload_folder(), "../" * 8
    for path, marker in secrets.items():
        rel = path.lstrip("/")
        for route in (f"/gradio_api/file={path}", "/gradio_api/file=%2F" + rel.replace("/", "%2F"),
                      f"/gradio_api/file={back}{rel}", "/gradio_api/file=" + "..%2F" * 8 + rel,
                      "/gradio_api/file=" + "%2e%2e/" * 8 + rel, f"/gradio_api/file={up}/{back}{rel}",
                      f"/gradio_api/file={ROOT}/assets/examples/{back}{rel}", f"/gradio_api/file=file://{path}",
                      f"/gradio_api/file={srv.url}/gradio_api/file={path}", f"/file={path}",
                      f"/static/{back}{rel}", f"/assets/{back}{rel}", f"/gradio_api/{back}{rel}"):
            r = httpx.get(srv.url + route, timeout=10)
            assert r.status_code in (403, 404) and marker not in r.content, (route, r.status_code)
    for route in ("/gradio_api/file=app.py", "/gradio_api/file=/proc/self/environ",
                  f"/gradio_api/file={srv.app.workdir()}", f"/gradio_api/file={up}"):
        assert httpx.get(srv.url + route, timeout=10).status_code in (403, 404), route
    # what is served: the public examples
    r = httpx.get(f"{srv.url}/gradio_api/file={ROOT}/assets/examples/squares-1.png", timeout=10)
    assert r.status_code == 200 and r.content[:4] == b"\x89PNG"


def test_images_must_be_uploaded_not_named(srv, tmp_path):
    """A server-side path passed as an `images` entry is refused, whatever the form: nothing is read."""
    other = client(srv)
    chat(other, ASK, [_png(tmp_path / "theirs.png", (7, 8, 9))])
    # a picture the app made for another user (its heatmaps), kept in the app's own folder
    theirs = str(next(srv.app.EXTRAS[other.session_hash].folder.glob("*.jpg")))
    local = _png(tmp_path / "local.png", (200, 0, 0))             # on the server's disk, never uploaded
    keys = {image_key(Image.open(p).convert("RGB")) for p in (theirs, local)}
    for path in ("/etc/passwd", str(ROOT / "app.py"), str(local), str(theirs), "../../../../etc/passwd"):
        for item in ({"path": path, "meta": {"_type": "gradio.FileData"}}, {"path": path}, path,
                     {"path": path, "url": f"{srv.url}/gradio_api/file={path}", "meta": {"_type": "gradio.FileData"}}):
            event, data = raw_chat(srv, [ASK, [item], False, 0.0])
            assert event == "error", (item, event, data)
            assert "root:" not in data and "def api_chat" not in data and "mining" not in data, item
    for s in srv.engine.sessions.values():  # no conversation saw those pixels but their owner's
        assert not ({im.key for im in s.images} & keys) or s.id == other.session_hash


def _png(path: Path, colour) -> Path:
    Image.new("RGB", (24, 24), colour).save(path)
    return path


def test_uploads_over_the_limit_are_refused_clearly(srv):
    config = httpx.get(srv.url + "/config", timeout=10).json()
    assert srv.demo.max_file_size == MAX_FILE_BYTES and config.get("max_file_size") == MAX_FILE_BYTES
    big = b"\x89PNG\r\n\x1a\n" + bytes(MAX_FILE_BYTES)
    r = httpx.post(srv.url + "/gradio_api/upload", files={"files": ("big.png", big, "image/png")}, timeout=60)
    assert r.status_code == 413 and "File size exceeded maximum allowed size" in r.text
    r = httpx.post(srv.url + "/gradio_api/upload", files={"files": ("small.png", big[:1000], "image/png")})
    assert r.status_code == 200 and json.loads(r.text)[0].endswith("small.png")


# ---- bounded memory --------------------------------------------------------------------------------------
def test_too_many_images_are_refused_before_any_is_decoded(srv, monkeypatch, tmp_path):
    decoded = []
    from mini_gemini.chat import turn_images  # where every upload is decoded
    real = turn_images.load_image
    monkeypatch.setattr(turn_images, "load_image", lambda src, **kw: decoded.append(src) or real(src, **kw))
    c = client(srv)
    chat(c, HELLO)
    many = [_png(tmp_path / f"p{i}.png", (i, i, i)) for i in range(srv.engine.images_per_session + 1)]
    refused(c, ASK, many, match=f"at most {srv.engine.images_per_session} images")
    assert decoded == [] and len(session(srv, c).turns) == 1


def test_failed_messages_kept_for_display_are_bounded(srv, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    c = client(srv)
    for _ in range(srv.app.MAX_FAILED + 5):
        refused(c, "x" * 50_000, [bad], match="not an image")
    ex = srv.app.EXTRAS[c.session_hash]
    assert len(ex.failed) == srv.app.MAX_FAILED
    assert all(len(f.user) <= MAX_USER_CHARS + 100 for f in ex.failed)


def test_sessions_stay_within_the_engines_bound(srv, monkeypatch, tmp_path):
    monkeypatch.setattr(srv.engine.sessions, "max_sessions", 3)
    clients = [client(srv) for _ in range(6)]
    for i, c in enumerate(clients):
        chat(c, f"Hello from user {i}", [_png(tmp_path / f"u{i}.png", (i * 40, 0, 0))])
        assert len(srv.engine.sessions) <= 3 and len(srv.app.EXTRAS) <= 3
    assert srv.engine.sessions.ids() == [c.session_hash for c in clients[-3:]]
    assert len([p for p in Path(srv.app.workdir()).iterdir() if p.is_dir()]) <= 3  # their files went too
    # a dropped client may come back: it is told, and starts afresh
    reply = chat(clients[0], "Hello again")[0]
    assert "Note: This conversation had expired" in reply
    assert [t.user for t in session(srv, clients[0]).turns] == ["Hello again"]


def test_a_user_error_is_one_log_line_not_a_traceback(srv, tmp_path, capfd):
    """A text file sent as an image: the client is told what to send instead, the server log gets one line
    (no traceback), and the conversation goes on."""
    notes = tmp_path / "notes.txt"
    notes.write_text("hello, I am not a picture")
    import logging
    lines, logged = [], threading.Event()
    handler = logging.Handler()

    def emit(record):
        lines.append(record.getMessage() + (" +traceback" if record.exc_info else ""))
        if "not an image" in lines[-1]:
            logged.set()
    handler.emit = emit
    ours = logging.getLogger("mini_gemini")
    ours.addHandler(handler)
    try:
        c = client(srv)
        capfd.readouterr()
        refused(c, ASK, [notes], match="PNG, JPEG, WebP, GIF or BMP")
        assert logged.wait(60)  # the server's own log lines come from its worker threads
    finally:
        ours.removeHandler(handler)
    assert "Traceback" not in "".join(capfd.readouterr())  # Gradio printed none
    about = [line for line in lines if "not an image" in line]
    assert len(about) == 1 and "+traceback" not in about[0]
    assert chat(c, HELLO)[0] is not None


# ---- one answer, shown as written -------------------------------------------------------------------------
HTML = "Write <h>Title</h> for a heading; a lone <h> opens one."


def test_an_answer_is_given_as_written_unless_its_turn_asked_for_an_image(srv, monkeypatch):
    monkeypatch.setattr(srv.app.ARGS, "max_new_tokens", 200)  # room for the whole scripted answer
    with scripted(srv.engine.model, HTML):  # a model explaining HTML, in a turn that asked for no image
        reply = chat(client(srv), "How do I write a heading?")[0]
    assert reply == HTML
    with scripted(srv.engine.model, "Sure. <h>a red square</h>"):
        reply = chat(client(srv), "Draw a red square.", generate_image=True)[0]
    # only here is there an image prompt (not drawn: this server has no image generation)
    assert reply.startswith("Sure.\n\nImage prompt: a red square\n\nNote: ") and "<h>" not in reply


# ---- wrong-typed values -------------------------------------------------------------------------------------
WRONG = {  # /chat's parameters: message, images, generate_image, temperature
    "message": [5, 2.5, True, ["x"], {"text": "hi"}],
    "images": ["photo.png", 3, {"x": 1}, [1, 2], ["photo.png"], [{"path": "x.png"}], [None],
               [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}]],
    "generate_image": ["yes", "true", 1, 0, [True], {"on": True}],
    "temperature": ["hot", "0.5", "nan", True, [0.5], {"t": 1}, -0.1, 2, 99, 1e308],
}
GOOD = {"message": "Hello", "images": [], "generate_image": False, "temperature": 0.0}


def test_every_wrong_typed_value_gets_one_sentence_and_one_log_line(srv, capfd):
    import logging
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage() + (" +traceback" if record.exc_info else ""))
    ours = logging.getLogger("mini_gemini")
    ours.addHandler(handler)
    capfd.readouterr()
    try:
        for name, values in WRONG.items():
            for value in values:
                before = len(lines)
                event, data = raw_chat(srv, [value if k == name else v for k, v in GOOD.items()])
                assert event == "error", (name, value, data)
                message = json.loads(data)["error"]
                assert message and name in message and message.rstrip(")").endswith(".") and "\n" not in message, \
                    (name, value, message)
                clean(message)
                assert wait_for(lambda n=before: len(lines) > n)
                assert len([line for line in lines[before:] if line.startswith("refused:")]) == 1, lines[before:]
                assert "+traceback" not in " ".join(lines[before:])
    finally:
        ours.removeHandler(handler)
    out = capfd.readouterr()
    assert "Traceback" not in out.out + out.err
    event, data = raw_chat(srv, ["Hello"])  # too few values: what /chat takes, in one sentence
    assert event == "error" and "/chat takes 4 values" in json.loads(data)["error"]
    assert raw_chat(srv, list(GOOD.values()))[0] == "complete"  # and the right types are answered


# ---- bounded disk ------------------------------------------------------------------------------------------
def _photo(path: Path, seed: int) -> Path:
    """A 256 x 256 picture of noise (a PNG of about 190 kB, as a photo's would be)."""
    import numpy as np
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(path)
    return path


def _cache_files() -> dict:
    import gradio.utils
    return {p: p.stat().st_size for p in Path(gradio.utils.get_upload_folder()).rglob("*") if p.is_file()}


def test_files_of_clients_that_left_or_were_dropped_are_deleted(srv, monkeypatch, tmp_path):
    before = _cache_files()
    # clients come, each with its own picture, and leave (their page or API client closes)
    clients = [client(srv) for _ in range(6)]
    for i, c in enumerate(clients):
        reply, _, gallery = chat(c, ASK, [_photo(tmp_path / f"photo{i}.png", i)])
        assert reply and len(gallery) == 3
    grown = {p: n for p, n in _cache_files().items() if p not in before}
    assert sum(grown.values()) > 6 * 150_000  # each left its upload and its heatmaps in Gradio's cache
    for c in clients:
        c.close()
    assert wait_for(lambda: not any(c.session_hash in srv.app.EXTRAS for c in clients))
    # nothing of theirs is left, once the server has dealt with their leaving
    assert wait_for(lambda: not [p for p in _cache_files() if p not in before]), \
        [p for p in _cache_files() if p not in before]
    # clients the server drops (it keeps a bounded number of conversations) lose their files too
    monkeypatch.setattr(srv.engine.sessions, "max_sessions", 2)
    stay = [client(srv) for _ in range(5)]
    for i, c in enumerate(stay):
        chat(c, ASK, [_photo(tmp_path / f"stay{i}.png", 100 + i)])
    assert sorted(srv.app.EXTRAS) == sorted(c.session_hash for c in stay[-2:])
    held = {p: n for p, n in _cache_files().items() if p not in before}
    uploads = {str(f) for c in stay[-2:] for f in srv.app.EXTRAS[c.session_hash].uploads}
    assert {str(p) for p in held if str(p) in srv.demo.upload_file_set} == uploads  # only the two kept ones'
    assert len(held) == 2 * (1 + 3) and sum(held.values()) < 2 * 1_000_000  # each: its upload and three maps
    for c in stay:
        c.close()

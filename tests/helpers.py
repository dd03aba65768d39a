"""Small helpers shared by the engine, robustness, app and API tests."""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mini_gemini.chat.engine import Engine

ROOT = Path(__file__).resolve().parents[1]


def run(session, *args, **kw):
    """All events of one turn, plus the finished Turn (or None)."""
    events = list(session.chat(*args, **kw))
    done = [e.data for e in events if e.kind == "done"]
    return events, (done[0] if done else None)


def kinds(events, kind):
    return [e for e in events if e.kind == kind]


class FaultyStreamer:
    """Wraps generate's streamer and fails after `after` puts: the device breaks mid-answer,
    with the KV cache already half written."""

    def __init__(self, streamer, after: int = 3):
        self.streamer, self.after, self.n = streamer, after, 0

    def put(self, value):
        self.n += 1
        if self.n > self.after:
            raise RuntimeError("device lost")
        self.streamer.put(value)

    def end(self):
        self.streamer.end()


def no_eos(monkeypatch, model):
    """Make the model unable to end its answer, so that it runs until max_new_tokens."""
    real = model.llm.generate
    stop_ids, _ = Engine._stops(model.processor.tokenizer, model.processor.template.stop_strings)

    def generate(*args, **kw):
        kw["suppress_tokens"] = sorted(set(kw.get("suppress_tokens") or []) | set(stop_ids))
        return real(*args, **kw)
    monkeypatch.setattr(model.llm, "generate", generate)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_app(args: list, cwd: Path, log_path: Path, timeout: float = 180, env: dict | None = None):
    """`python app.py ARGS --host 127.0.0.1 --port P` in a subprocess, once its page answers:
    (process, URL). Fails the test with the app's log if it exits or does not come up in time."""
    port = free_port()
    env = env or dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:  # the child keeps its own handle
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), *map(str, args), "--host", "127.0.0.1",
                                 "--port", str(port)], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the app exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/config", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    stop_process(proc)
    pytest.fail(f"the app did not start in time:\n{log_path.read_text()[-3000:]}")


def stop_process(proc) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()

"""Small helpers shared by the engine, robustness, app and API tests."""
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mini_gemini.chat.detokenizer import stop_tables

ROOT = Path(__file__).resolve().parents[1]


def run(session, *args, **kw):
    """All events of one turn, plus the finished Turn (or None)."""
    events = list(session.chat(*args, **kw))
    done = [e.data for e in events if e.kind == "done"]
    return events, (done[0] if done else None)


def kinds(events, kind):
    return [e for e in events if e.kind == kind]


ENGINE_PATHS = pytest.mark.parametrize("max_active", [8, 0], ids=["scheduler", "generate"])
"""Run a test on both ways the built-in engine writes answers: the batching scheduler (the default) and
one whole answer at a time with the LLM's own `generate` (`Engine(max_active=0)`)."""


@contextlib.contextmanager
def on_llm_forward(model, hook):
    """Call `hook(kwargs, output)` after every forward of the model's LLM, on whatever path runs it (a scheduler
    step, a `generate` step); it may change `output.logits` in place, or raise to fail that forward."""
    handle = model.llm.register_forward_hook(lambda module, args, kwargs, output: hook(kwargs, output),
                                             with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def fault_at(model, error: BaseException, at: int = 1, only=lambda kwargs: True):
    """The device fails at the `at`-th forward of the LLM from now (1: the prefill of the next answer; 4: mid-
    answer, with the KV cache already half written), once; `only(kwargs)` picks the forwards that count."""
    calls = [0]

    def hook(kwargs, output):
        if only(kwargs):
            calls[0] += 1
            if calls[0] == at:
                raise error
    with on_llm_forward(model, hook):
        yield calls


def stop_ids_of(model) -> list[int]:
    return stop_tables(model.processor.tokenizer, model.processor.template.stop_strings)[0]


@contextlib.contextmanager
def endless(model):
    """The model never writes a stop token (its logits are -inf there): every answer runs to its length."""
    stops = stop_ids_of(model)

    def hook(kwargs, output):
        output.logits[..., stops] = float("-inf")
    with on_llm_forward(model, hook):
        yield


@contextlib.contextmanager
def scripted(model, *texts):
    """The model 'writes' texts[0] in its first answer from now, texts[1] in the next, ...: each forward's logits
    make the scripted token the only choice (then a stop token once the text is written). From the second
    answer on (the image-prompt continuation, which must not end early: special tokens suppressed), every stop
    token is also made tempting (above the scripted token), and the last scripted token repeats. Yields the list of each answer's first forward kwargs."""
    tok = model.processor.tokenizer
    scripts = [tok(t, add_special_tokens=False).input_ids for t in texts]
    stops = stop_ids_of(model)
    calls, state = [], {"run": -1, "i": 0}

    def hook(kwargs, output):
        if kwargs.get("inputs_embeds") is not None:  # a prefill: the next answer starts
            calls.append(kwargs)
            state["run"], state["i"] = state["run"] + 1, 0
        script = scripts[min(state["run"], len(scripts) - 1)]
        logits = output.logits
        logits.fill_(0.0)
        if state["i"] < len(script) or (state["run"] > 0 and script):
            logits[..., script[min(state["i"], len(script) - 1)]] = 100.0  # a continuation repeats its last token
            if state["run"] > 0:
                logits[..., stops] = 200.0
        else:
            logits[..., stops] = 100.0
        state["i"] += 1
    with on_llm_forward(model, hook):
        yield calls


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


def side_env_python(variable: str, script: str, venv: str, what: str) -> str:
    """The python of a side environment (vLLM, lmms-eval: their pins differ from ours): from `variable`, or made
    by `tools/<script>` in `venv` on CI; the test is skipped (saying how to make one) when there is none."""
    import subprocess
    py = os.environ.get(variable, "").strip() or None
    if py is None and os.environ.get("CI", "").lower() == "true":
        out = subprocess.run(["bash", str(ROOT / "tools" / script), venv], capture_output=True, text=True,
                             timeout=1800)
        assert out.returncode == 0, out.stderr[-3000:]
        py = out.stdout.strip().splitlines()[-1]
    if py is None:
        pytest.skip(f"no {what} environment: set {variable} to the python of one (bash tools/{script} {venv} "
                    "prints it)")
    if not Path(py).exists():
        pytest.fail(f"{variable}={py} does not exist")
    return py

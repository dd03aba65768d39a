"""Hugging Face ZeroGPU: the part of a chat turn that runs on the GPU, as one decorated generator.

On a ZeroGPU Space, `spaces.GPU` runs the decorated function in a forked worker that holds a GPU for the
call; anywhere else (`spaces` not installed, or installed outside a Space) the decorator hands back the
function itself. This module imports neither gradio nor the app's server, so that the decorated path runs
(and is checked, tools/gpu_check.py) where only the model's packages are installed; the app says where the
engine is with `use_engine`.

    use_engine(lambda: engine)
    for ev in turn_events(session_id, session.turns, "What is this?", images, False, GenOptions(), False):
        ...   # the engine's Events, then a Handoff when the call ran in a ZeroGPU worker
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..chat import GenOptions

if TYPE_CHECKING:
    from ..chat import Engine

try:  # Hugging Face ZeroGPU: `spaces.GPU` borrows a GPU per call there and is a no-op elsewhere
    import spaces
except ImportError:
    spaces = None

GPU_SECONDS = 120  # the longest a turn may hold a ZeroGPU GPU (`spaces.GPU(duration=...)`)

_engine_source: Callable[[], Engine] | None = None


@dataclass
class Handoff:
    """The history a ZeroGPU worker hands back at the end of a turn (not an engine event)."""
    turns: list


def use_engine(source: Callable[[], Engine] | None) -> None:
    """Say where `turn_events` finds the engine: `source()` is called at the start of every turn, in the
    process that runs it (a forked ZeroGPU worker inherits this setting). The app passes its loader's
    `wait` (which raises the app's error while no model is loaded); None forgets the source."""
    global _engine_source
    _engine_source = source


def gpu(fn):
    """`fn` as ZeroGPU runs it: `spaces.GPU(duration=GPU_SECONDS)(fn)` where `spaces` is installed (outside
    a Space that is `fn` itself), else `fn`."""
    return spaces.GPU(duration=GPU_SECONDS)(fn) if spaces is not None else fn


@gpu
def turn_events(sid: str, turns: list, text: str, images: list, generate_image: bool, options: GenOptions,
                regenerate: bool):
    """The engine's events for one turn of conversation `sid` (`ChatSession.chat`, or `regenerate`).

    Args:
        sid: the session id; turns: the caller's history of it (`ChatSession.turns`); text / images /
            generate_image / options: as `ChatSession.chat` takes them; regenerate: answer the last turn again.

    Yields:
        The engine's `Event`s; then, when the engine's session held another history than `turns` (a ZeroGPU
        worker, forked with stale sessions: it adopts the caller's history first), one `Handoff` with the
        new history (`ChatSession.snapshot`) for the caller to adopt.

    Raises:
        RuntimeError: `use_engine` was never called.
    """
    if _engine_source is None:
        raise RuntimeError("No engine to run the turn: call mini_gemini.ui.zerogpu.use_engine(...) first.")
    session = _engine_source().session(sid)
    adopted = session.turns is not turns
    if adopted:
        session.adopt(turns)
    events = session.regenerate(options, generate_image=generate_image) if regenerate else \
        session.chat(text, images, generate_image=generate_image, options=options)
    try:
        yield from events
    finally:
        events.close()  # a client that went away closes us: the engine then stops generating
    if adopted:
        yield Handoff(session.snapshot())


def _session_with(sid: str, turns: list):
    """The engine's session `sid` holding the caller's history (a ZeroGPU worker adopts it)."""
    if _engine_source is None:
        raise RuntimeError("No engine to run on: call mini_gemini.ui.zerogpu.use_engine(...) first.")
    session = _engine_source().session(sid)
    if session.turns is not turns:
        session.adopt(turns)
    return session


@gpu
def explain_turn(sid: str, turns: list, method: str, layers: tuple[int, int] | None, ablation: bool = True):
    """`ChatSession.explain` of the last answer of conversation `sid` (history `turns`), where the model runs.
    Returns the `modeling.attribution.Attribution` (CPU tensors); raises what `explain` raises."""
    return _session_with(sid, turns).explain(method=method, layers=layers, ablation=ablation)


@gpu
def unmined_events(sid: str, turns: list, options: GenOptions):
    """The events of `ChatSession.answer_without_mining` for the last answer of conversation `sid` (history
    `turns`), where the model runs; the history is not changed, so nothing is handed back."""
    events = _session_with(sid, turns).answer_without_mining(options=options)
    try:
        yield from events
    finally:
        events.close()

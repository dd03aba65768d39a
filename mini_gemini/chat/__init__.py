"""Conversations over a loaded model: templates and tokenisation, sessions, streaming, caches, image turns.

    engine = Engine(model)                    # one model, many sessions
    session = engine.session("some-id")
    for event in session.chat("What is this?", ["photo.jpg"], options=GenOptions(temperature=0)): ...

The records (`GenOptions`, `Turn`, `Event`, `Note`) import at once; `Engine` / `ChatSession` (torch,
transformers) on first use.
"""
from importlib import import_module

from .types import MAX_USER_CHARS, Event, GenOptions, ImageEntry, Note, Turn, clean_text

__all__ = ["Engine", "ChatSession", "Event", "GenOptions", "ImageEntry", "Note", "Turn", "MAX_USER_CHARS",
           "clean_text"]


def __getattr__(name):
    if name in ("Engine", "ChatSession"):
        return getattr(import_module(".engine" if name == "Engine" else ".session", __name__), name)
    raise AttributeError(f"module 'mini_gemini.chat' has no attribute {name!r}")

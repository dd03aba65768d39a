"""Conversations over a loaded model: templates and tokenisation, sessions, streaming, caches, image turns.

    engine = Engine(model)                    # one model, many sessions
    session = engine.session("some-id")
    for event in session.chat("What is this?", ["photo.jpg"], options=GenOptions(temperature=0)): ...
"""
from .engine import Engine
from .session import ChatSession
from .types import MAX_USER_CHARS, Event, GenOptions, ImageEntry, Note, Turn, clean_text

__all__ = ["Engine", "ChatSession", "Event", "GenOptions", "ImageEntry", "Note", "Turn", "MAX_USER_CHARS",
           "clean_text"]

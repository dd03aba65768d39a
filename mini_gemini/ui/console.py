"""The app's progress and refusals on stderr, one line each, from the first moment (importing nothing heavy).

`python app.py` calls `log_to_console` before it imports Gradio and torch (several seconds each), so that the
terminal says what is happening all along: importing, building the page, serving, loading the model.
"""
from __future__ import annotations

import logging
import time

_START = time.monotonic()


class _Elapsed(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"[app {record.created - _STARTED_AT:5.1f}s] {record.getMessage()}"


_STARTED_AT = time.time() - (time.monotonic() - _START)


def log_to_console() -> logging.Logger:
    """Send the package's log lines (INFO and up) to stderr as "[app 12.3s] message" (seconds since start);
    returns the package's logger. Calling it again changes nothing."""
    ours = logging.getLogger("mini_gemini")
    if not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(_Elapsed())
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False
    return ours

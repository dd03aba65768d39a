"""Kept for scripts written against `from mini_gemini.engine import Engine, GenOptions`: the engine lives
in `mini_gemini.chat` now."""
from .chat.engine import *  # noqa: F401,F403
from .chat.engine import Engine, Event, GenOptions, MAX_USER_CHARS, clean_text  # noqa: F401

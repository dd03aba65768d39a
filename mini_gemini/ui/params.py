"""Values sent to the app's endpoints: a wrong-typed one is refused in one sentence, never with a traceback.

Left to itself, Gradio makes text of anything (`gr.Textbox` runs `str()` on a number or a list), passes "yes" on
as a checkbox's value, and meets a malformed file list or a file that was not uploaded with a traceback in the
server log and `{"error": null}` for the client. `CheckedBlocks` checks every value of every event against its
component before Gradio reads it, and turns what Gradio still refuses into a sentence saying what to send:
one sentence for the client, one line in the log (`server.user_error`). Ranges are the handlers' to check
(`temperature_param`).
"""
from __future__ import annotations

import math
from numbers import Real

import gradio as gr

from .server import user_error

MAX_TEMPERATURE = 1.5     # the page's slider goes as far; sampling above it gives noise
DEFAULT_TEMPERATURE = 0.2


def temperature_param(value) -> float:
    """The sampling temperature: a number from 0 to MAX_TEMPERATURE (null: DEFAULT_TEMPERATURE). Raises gr.Error
    (one sentence) for another type, a non-finite number or one out of range."""
    if value is None:
        return DEFAULT_TEMPERATURE
    if not _is_number(value) or not math.isfinite(value) or not 0.0 <= value <= MAX_TEMPERATURE:
        raise user_error(f"temperature must be a number from 0 to {MAX_TEMPERATURE} (0 = greedy), not "
                         f"{_kind(value)}.")
    return float(value)


def wrong_type(component, value) -> str | None:
    """Why `value` cannot be `component`'s (a sentence naming the parameter by its label), or None. Null is
    always accepted (the handler's default)."""
    if value is None:
        return None
    name = getattr(component, "label", None) or type(component).__name__
    if isinstance(component, gr.Textbox) and not isinstance(value, str):
        return f"{name} must be text (a string), not {_kind(value)}."
    if isinstance(component, gr.Checkbox) and not isinstance(value, bool):
        return f"{name} must be true or false, not {_kind(value)}."
    if isinstance(component, (gr.Number, gr.Slider)) and not _is_number(value):
        return f"{name} must be a number, not {_kind(value)}."
    return None


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _kind(value) -> str:
    """How a wrong value is named back to its sender: its JSON type, and the value itself when short."""
    kind = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            tuple: "a list", dict: "an object"}.get(type(value), type(value).__name__)
    shown = repr(value) if isinstance(value, (bool, int, float, str)) else ""
    return f"{kind} ({shown[:40]})" if shown else kind


class CheckedBlocks(gr.Blocks):
    """Blocks whose events refuse a wrong-typed value in one sentence (`wrong_type`), and answer a call that
    Gradio itself cannot read (a file that was not uploaded with the call, a malformed file list, too few
    values) with one sentence naming what the endpoint takes (`shapes`: api_name -> that sentence; other
    events get a general one). One log line each, no traceback."""

    def __init__(self, *args, shapes: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.shapes = dict(shapes or {})

    async def preprocess_data(self, block_fn, inputs, state, *args, **kwargs):
        props = set(getattr(block_fn, "component_prop_inputs", ()) or ())
        for i, (component, value) in enumerate(zip(block_fn.inputs, inputs)):
            problem = None if i in props else wrong_type(component, value)
            if problem:
                raise user_error(problem)
        try:
            return await super().preprocess_data(block_fn, inputs, state, *args, **kwargs)
        except gr.Error as e:
            if not e.print_exception:  # already one sentence and no traceback
                raise
            raise user_error(str(e)) from None
        except Exception as e:  # noqa: BLE001 - a call Gradio cannot read: said in one sentence, no traceback
            shape = self.shapes.get(getattr(block_fn, "api_name", None)) or \
                "The values sent do not fit this event's inputs."
            raise user_error(shape, detail=_reason(e)) from None


def _reason(error: Exception) -> str:
    """For the log: the first line of what Gradio said (pydantic's follow-up lines left out)."""
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:200]}"

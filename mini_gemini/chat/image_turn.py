"""The image-generation part of a turn: find (or have the LLM write) the image prompt, then draw it."""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..constants import IMAGE_PROMPT_CLOSE, IMAGE_PROMPT_OPEN
from ..imagegen import ImageGenError, extract_image_prompt
from .failures import explain, free_memory
from .kv_store import cache_units
from .run import Request
from .types import Event, GenOptions, Note, Turn

if TYPE_CHECKING:
    from .session import ChatSession

# The most LLM tokens the model may write to complete an image prompt (a bound on generation only). What
# SDXL reads is counted in its own CLIP tokens (77 with the start and end marks): every prompt, whoever
# wrote it, is cut to that before drawing (ImageGenerator.fit_prompt), and the user is told (see draw).
MAX_IMAGE_PROMPT_TOKENS = 77


class _Stopped(Exception):
    """Raised from SDXL's progress callback to stop a drawing nobody waits for any more."""


def generate_image(session: ChatSession, turn: Turn, ids, images, options: GenOptions) -> Iterator[Event]:
    prompt = extract_image_prompt(turn.assistant)
    if prompt is None:
        prompt = yield from write_image_prompt(session, turn, ids, images, options)
        if prompt is None:
            return
    turn.image_prompt = prompt
    yield from draw(session, turn, prompt, options)

def write_image_prompt(session: ChatSession, turn: Turn, ids, images, options: GenOptions):
    """The model wrote no complete <h>...</h>: continue its answer, from a forced "<h>" or from its
    own unclosed one, so that the LLM itself writes the image prompt (small checkpoints often skip
    the tag). Returns the prompt, or None when no image is to be drawn."""
    eng = session.engine
    detok = eng.detokenizer
    answer = turn.assistant
    unclosed = answer.rfind(IMAGE_PROMPT_OPEN) > answer.rfind(IMAGE_PROMPT_CLOSE)  # cut off mid-prompt
    opener = [] if unclosed else detok.text_ids(IMAGE_PROMPT_OPEN)
    head = detok.decode(turn.token_ids + opener).strip()
    lead = head[len(answer):] if head.startswith(answer) else \
        "" if unclosed else (" " if answer else "") + IMAGE_PROMPT_OPEN
    cont = ids + turn.token_ids + opener
    room = eng.max_context - len(cache_units(cont, images))
    if room >= 2:
        # special tokens are suppressed: the model cannot end its turn before it closed the prompt
        request = Request(cont, images, options, min(MAX_IMAGE_PROMPT_TOKENS, room), stop_texts=(IMAGE_PROMPT_CLOSE,),
                          suppress_tokens=detok.special_ids, lstrip=False, anchor=tuple(turn.token_ids + opener),
                          owner=session.cache_owner)
        run = eng.start_run(request, session.cancel_event)
        started = False
        try:
            for delta in run:
                if isinstance(delta, Event):  # a notice (e.g. the place in the queue), not text
                    yield delta
                    continue
                if not started:
                    started = True
                    yield Event("delta", lead)
                yield Event("delta", delta)
        except GeneratorExit:
            run.abort()
            turn.cancelled = True
            raise
        except Exception as e:  # noqa: BLE001 - the run took the conversation's cache: nothing stale is kept
            run.abort()
            free_memory(e)
            turn.notes.append(Note("image_prompt", f"Could not write an image prompt: {explain(e)}"))
            yield Event("notice", turn.notes[-1])
            return None
        wrote = bool(run.text.strip())
        if wrote:
            turn.token_ids = turn.token_ids + opener + run.ids
            turn.assistant = answer + lead + run.text
        if session.cancel_event.is_set():
            turn.cancelled = True
            turn.notes.append(Note("stopped", "stopped"))
            yield Event("notice", "Stopped; no image was drawn.")
            return None
        if wrote:
            turn.assistant += IMAGE_PROMPT_CLOSE
            yield Event("delta", IMAGE_PROMPT_CLOSE)
            prompt = extract_image_prompt(turn.assistant)
            if prompt:
                return prompt
    fallback = turn.user.strip()
    if not fallback:
        turn.notes.append(Note("image_prompt", "The model wrote no image prompt, so no image was drawn."))
        yield Event("notice", turn.notes[-1])
        return None
    turn.notes.append(Note("image_prompt", "The model wrote no image prompt; your message was used instead."))
    yield Event("notice", turn.notes[-1])
    return fallback

def draw(session: ChatSession, turn: Turn, prompt: str, options: GenOptions) -> Iterator[Event]:
    gen = session.engine.imagegen
    if gen is None:
        turn.notes.append(Note("imagegen_off", "Image generation is not enabled on this server; the text answer is kept."))
        yield Event("notice", turn.notes[-1])
        return
    yield Event("progress", "Generating the image…", 0.0)
    events: queue.SimpleQueue = queue.SimpleQueue()
    gone = threading.Event()

    def report(fraction, message=""):
        if gone.is_set() or session.cancel_event.is_set():
            raise _Stopped("stopped")
        events.put(("progress", fraction, message))

    def work():
        try:
            drawn = prompt
            fit = getattr(gen, "fit_prompt", None)  # the CLIP tokens SDXL reads (loads the pipeline if needed)
            if fit is not None:
                fitted = fit(prompt, progress=report)
                drawn = fitted.text
                events.put(("prompt", fitted, ""))
            kw = dict(steps=options.steps, guidance=options.guidance, seed=options.image_seed,
                      width=options.width, height=options.height)
            if options.negative_prompt is not None:
                kw["negative_prompt"] = options.negative_prompt
            events.put(("image", gen.generate(drawn, progress=report, **kw), ""))
        except BaseException as e:  # noqa: BLE001 - reported below
            events.put(("error", e, ""))

    worker = threading.Thread(target=work, daemon=True, name=f"mgm-sdxl-{session.id[:8]}")
    worker.start()
    try:
        while True:
            kind, value, msg = events.get()
            if kind == "prompt":
                yield from _fitted(turn, value)
                continue
            if kind != "progress":
                break
            yield Event("progress", msg or "Generating the image…", float(value))
    except GeneratorExit:
        gone.set()  # the drawing stops at its next step; nobody waits for it
        raise
    worker.join()
    if kind == "image":
        turn.generated_image = value
        yield Event("image", turn.image_prompt, value)
    elif session.cancel_event.is_set():
        turn.cancelled = True
        turn.notes.append(Note("stopped", "Image generation stopped; the text answer is kept."))
        yield Event("notice", turn.notes[-1])
    else:
        why = str(value) if isinstance(value, ImageGenError) else explain(value)
        turn.notes.append(Note("imagegen", f"Image generation failed: {why} The text answer is kept."))
        yield Event("notice", turn.notes[-1])


def _fitted(turn: Turn, fitted) -> Iterator[Event]:
    """The prompt as SDXL reads it becomes the turn's image prompt; say so when it had to be shortened."""
    turn.image_prompt = fitted.text
    if fitted.cut:
        turn.notes.append(Note("image_prompt", f"The image prompt was shortened to {fitted.tokens} CLIP tokens "
                                               f"(Stable Diffusion XL reads at most {fitted.limit}); the image "
                                               f"shows: {fitted.text}"))
        yield Event("notice", turn.notes[-1])

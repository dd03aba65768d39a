"""How failures during a turn are told to the user: out of memory, or anything unexpected."""
from __future__ import annotations

import torch


class DoesNotFit(Exception):
    """The message does not fit the model's context even on its own."""


def is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError))


def free_memory(e: BaseException):
    if is_oom(e) and torch.cuda.is_available():
        torch.cuda.empty_cache()


def explain(e: BaseException) -> str:
    if is_oom(e):
        return ("The model ran out of memory on this turn. Your conversation is kept: try fewer or smaller images, a "
                "shorter message, or clear the chat.")
    return f"Something went wrong while answering ({type(e).__name__}: {e}). Your conversation is kept; try again."

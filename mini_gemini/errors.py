"""The project's exceptions: one base class, so a caller can catch everything we raise on purpose.

Each message is written for the person who caused it: what is wrong and what to do. `ImageError.kind` is
a stable machine-readable tag for API clients.
"""
from __future__ import annotations


class MGMError(Exception):
    """Base class of every error this package raises on purpose."""


class ModelLoadError(MGMError, RuntimeError):
    """A checkpoint cannot be found, read or matched to the model (missing, unexpected or mis-shaped weights)."""


class ImageError(MGMError, ValueError):
    """A problem with an input image, worded for end users.

    `kind`: "empty", "too_big" (bytes), "too_many_pixels", "damaged", "unsupported", "unreadable",
    "too_many" (images), or "oom" / "internal" when encoding it failed.
    """

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(message)
        self.kind = kind


class ImageGenError(MGMError, RuntimeError):
    """Image generation failed for a reason the user can act on; the message says what to do."""


class SessionBusyError(MGMError, RuntimeError):
    """A conversation is still busy with a turn that did not stop in time; try again in a moment."""


class AttributionUnavailable(MGMError, RuntimeError):
    """An answer cannot be attributed here (no answer yet, or the LLM's layers run on a server); says why."""

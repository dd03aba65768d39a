"""The images of a new turn: checked against the conversation's limits, decoded, and encoded once per picture.

A picture is known by its content hash (`LoadedImage.key`): the same picture sent again in a conversation is
not encoded again, and the engine keeps recent encodings for every conversation (`Engine.encode_image`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ImageError
from ..inputs.images import LoadedImage, load_image
from .failures import explain, free_memory, is_oom
from .types import ImageEntry

if TYPE_CHECKING:
    from .engine import Engine


def prepare(engine: Engine, sources: list, held: int) -> list[LoadedImage]:
    """Check the count and context room of a turn's images, then decode them (see `ChatSession.prepare_images`).

    Args:
        engine: gives the limits (`images_per_session`, `tokens_per_image`, `max_context`).
        sources: paths, bytes, file objects, PIL images or `LoadedImage`s (kept as they are).
        held: images the conversation holds already.
    Raises:
        ImageError: the message names the image ("Image 2 of 3: ...") and says what to do; `kind` tags it.
    """
    if not sources:
        return []
    if held + len(sources) > engine.images_per_session:
        raise ImageError(f"This conversation can hold at most {engine.images_per_session} images; clear it "
                         "to start a new one." if len(sources) <= engine.images_per_session else
                         f"Send at most {engine.images_per_session} images at once.", "too_many")
    if len(sources) * engine.tokens_per_image + 16 > engine.max_context:
        raise ImageError(f"Too many images for the model's context: each takes {engine.tokens_per_image} "
                         f"tokens of {engine.max_context}. Send fewer images at once.", "too_many")
    loaded = []
    for k, src in enumerate(sources):
        where = f"Image {k + 1} of {len(sources)}: " if len(sources) > 1 else ""
        if isinstance(src, LoadedImage):  # decoded (and hashed) by the caller already: not again
            loaded.append(src)
            continue
        try:
            loaded.append(load_image(src))
        except ImageError as e:
            raise ImageError(where + str(e), e.kind) from e
        except MemoryError as e:
            raise ImageError(where + "The image is too large to decode here. Please send a smaller "
                             "one.", "too_many_pixels") from e
        except Exception as e:  # noqa: BLE001 - e.g. a source of a type nobody expected
            raise ImageError(f"{where}Could not read the image ({type(e).__name__}). Please send a "
                             "PNG, JPEG, WebP, GIF or BMP file.", "unreadable") from e
    return loaded


def encode(engine: Engine, loaded: list[LoadedImage], known: list[ImageEntry]) -> list[ImageEntry]:
    """`ImageEntry`s for the turn's decoded images: a picture the conversation holds (`known`) is reused, a new
    one is encoded. Each entry carries its own notes (what was done to that upload).

    Raises:
        ImageError: the encoding failed ("oom" or "internal"); nothing is added.
    """
    by_key = {im.key: im for im in known}
    entries = []
    for li in loaded:
        im = by_key.get(li.key)
        if im is None:  # a picture new to this conversation
            try:
                enc = engine.encode_image(li)
            except Exception as e:  # noqa: BLE001
                free_memory(e)
                raise ImageError(explain(e), "oom" if is_oom(e) else "internal") from e
            im = ImageEntry(li.key, li.image, enc.tokens, enc.attn, enc.gain, lr_features=enc.lr_features)
            by_key[li.key] = im
        entries.append(ImageEntry(im.key, im.image, im.tokens, im.attn, im.gain, list(li.notes), ocr=im.ocr,
                                  lr_features=im.lr_features))
    return entries

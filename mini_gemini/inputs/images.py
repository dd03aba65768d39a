"""Safe decoding of untrusted image files: the one entry point for the CLI, the app and the API.

Whatever arrives (a path, raw bytes, an upload's file object or an already-open PIL image) comes out
either as a fully loaded, detached RGB image, or as an `ImageError` whose message can be shown to the
user as is. The guards run cheapest first, so hostile input is refused before it costs memory:

    bytes on disk / in the stream   (os.stat, bounded read)       -> max_bytes
    width x height from the header  (Image.open, before .load())  -> max_pixels
    decoding the first frame        (.load(), truncation errors)  -> "damaged or incomplete"

Only PNG, JPEG, WebP, GIF and BMP are decoded: Pillow reads many more formats, but every extra
decoder is extra attack surface for a public demo, and those five are what users actually upload.
`ImageFile.LOAD_TRUNCATED_IMAGES` is never touched: a cut-off upload must fail loudly rather than be
silently padded with grey.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import ExifTags, Image, ImageOps

from ..errors import ImageError  # noqa: F401 - raised here, re-exported for callers

MAX_FILE_BYTES = 20 * 1024 * 1024  # 20 MB
MAX_PIXELS = 40_000_000  # e.g. 8000 x 5000; the decoded RGB copy is then at most 120 MB

# Pillow format ids we decode. Pillow's JPEG opener also returns the multi-picture JPEGs many cameras
# write (format "MPO"); "MPO" itself must not be listed: it is registered only once all plugins load.
SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
SUPPORTED_TEXT = "PNG, JPEG, WebP, GIF or BMP"

NOTE_ANIMATED = "animated image: only the first frame is used"
NOTE_ANIMATED_CURRENT = "animated image: only the current frame is used"
NOTE_EXIF = "EXIF orientation applied"
NOTE_ALPHA = "transparency composited on white"




@dataclass
class LoadedImage:
    image: Image.Image  # mode "RGB", fully loaded, no file handle, no metadata (orientation applied)
    notes: list[str] = field(default_factory=list)  # user-facing remarks about what was changed
    key: str = ""  # image_key(image): equal pixels <=> equal key, for caching features by content


# ----------------------------------------------------------------------------- messages


def _fmt_bytes(n: int) -> str:
    # Rounded up, so a file just over a 20 MB limit reads "20.1 MB", never "20.0 MB" or "20 MB".
    for unit, size in (("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            if n % size == 0:
                return f"{n // size} {unit}"
            return f"{math.ceil(n * 10 / size) / 10:.1f} {unit}"
    return f"{n} bytes"


def _advice(max_bytes: int) -> str:
    return f"Please upload a {SUPPORTED_TEXT} image under {_fmt_bytes(max_bytes)}."


def _too_many_pixels(what: str, max_pixels: int) -> ImageError:
    return ImageError(
        f"The image is too large ({what}); the limit is {max_pixels / 1e6:g} megapixels. "
        "Please resize it to fewer pixels and upload it again.",
        "too_many_pixels",
    )


def _damaged(max_bytes: int) -> ImageError:
    return ImageError(
        "The image could not be read: the file is damaged or incomplete (perhaps the upload was "
        f"cut off). Please try again, or re-save it as a {SUPPORTED_TEXT} image under "
        f"{_fmt_bytes(max_bytes)}.",
        "damaged",
    )


# Formats we recognise by their first bytes, to tell "damaged PNG" from "not an image at all" and to
# name the unsupported format the user sent (a phone's HEIC photo is the common case).
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"),
)
_FTYP_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"hevc": "HEIC", b"heim": "HEIC", b"heis": "HEIC",
                b"mif1": "HEIC", b"msf1": "HEIC", b"avif": "AVIF", b"avis": "AVIF"}
_UNSUPPORTED_NAMES = {"TIFF": "TIFF images", "PDF": "PDF documents", "SVG": "SVG (vector) images",
                      "HEIC": "HEIC/HEIF photos", "AVIF": "AVIF images"}


def _sniff(data: bytes) -> str | None:
    """Best guess of the file type from its first bytes (None = unknown)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(data[8:12])
    if b"<svg" in data[:4096].lower():
        return "SVG"
    return None


def _unsupported(data: bytes, max_bytes: int) -> ImageError:
    kind = _sniff(data)
    if kind in SUPPORTED_FORMATS:  # it starts like an image we read, but its header is broken
        return _damaged(max_bytes)
    if kind in _UNSUPPORTED_NAMES:
        what = f"{_UNSUPPORTED_NAMES[kind]} are not supported."
    else:
        what = "This file is not an image, or is in a format that is not supported."
    return ImageError(f"{what} {_advice(max_bytes)}", "unsupported")


# ----------------------------------------------------------------------------- reading bytes


def _read_bounded(f, max_bytes: int, expected: int = 1 << 16) -> bytes:
    """Read at most max_bytes + 1 bytes, so an endless or huge stream cannot exhaust memory.

    Reads in chunks: f.read(n) allocates n bytes up front, so asking for max_bytes at once would
    cost 20 MB for every 1 KB upload. `expected` (the stat size of a path) sizes the first chunk.
    """
    chunks, total, want = [], 0, expected + 1
    while total <= max_bytes:
        chunk = f.read(min(want, max_bytes + 1 - total))
        want = 1 << 16
        if not chunk:
            break
        if isinstance(chunk, str):
            raise TypeError("load_image needs a binary file object (open the file with 'rb')")
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _too_big(size: int, max_bytes: int, exact: bool = True) -> ImageError:
    size_text = _fmt_bytes(size) if exact else f"more than {_fmt_bytes(max_bytes)}"
    return ImageError(f"The file is too large ({size_text}). {_advice(max_bytes)}", "too_big")


def _read_source(source, max_bytes: int) -> bytes:
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            size = os.stat(path).st_size
            if size > max_bytes:  # refuse from the metadata alone, without reading the file
                raise _too_big(size, max_bytes)
            with open(path, "rb") as f:
                data = _read_bounded(f, max_bytes, expected=size)
        except OSError as e:
            reason = e.strerror or type(e).__name__
            raise ImageError(f"Could not open the file '{path}': {reason}. Please check the path "
                             "and try again.", "unreadable") from e
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) > max_bytes:
            raise _too_big(len(source), max_bytes)
        return bytes(source)  # no copy for bytes; bytearray / memoryview become immutable
    elif hasattr(source, "read"):
        data = _read_bounded(source, max_bytes)
    else:
        raise TypeError(f"load_image cannot read a {type(source).__name__}; pass a path, bytes, a "
                        "binary file object or a PIL image")
    if len(data) > max_bytes:  # we stopped reading at max_bytes + 1, so the true size is unknown
        raise _too_big(len(data), max_bytes, exact=False)
    return data


# ----------------------------------------------------------------------------- pixels


def _check_pixels(im: Image.Image, max_pixels: int) -> None:
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ValueError(f"invalid image size {w}x{h}")  # reported as damaged by the caller
    if w * h > max_pixels:
        raise _too_many_pixels(f"{w}x{h} pixels", max_pixels)
    # Pillow warns above Image.MAX_IMAGE_PIXELS (and refuses above twice that); treat its limit as
    # an outer bound too, without touching the global warnings filters (not thread safe).
    if Image.MAX_IMAGE_PIXELS is not None and w * h > Image.MAX_IMAGE_PIXELS:
        raise _too_many_pixels(f"{w}x{h} pixels", Image.MAX_IMAGE_PIXELS)


def _bomb(e: Exception, max_pixels: int) -> ImageError:
    m = re.search(r"\((\d+) pixels\)", str(e))  # Pillow's message carries the pixel count
    what = f"{int(m.group(1)) / 1e6:g} megapixels" if m else "too many pixels"
    return _too_many_pixels(what, max_pixels)


def _high_bit_depth_to_l(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float greyscale -> 8-bit L, scaling the range instead of clipping to white."""
    a = np.asarray(im)
    if im.mode.startswith("I;16"):
        lo, hi = 0, 65535
    else:  # "I" or "F": 16-bit data stored wide is the common case; otherwise stretch what is there
        lo, hi = float(a.min()), float(a.max())
        if im.mode == "F" and 0.0 <= lo and hi <= 1.0:
            lo, hi = 0.0, 1.0
        elif 0 <= lo and hi <= 65535:
            lo, hi = 0, 65535
    f = a.astype(np.float32)  # in-place from here on: one float copy, not one per operation
    f -= lo
    f *= 255.0 / max(hi - lo, 1e-12)
    f += 0.5
    np.clip(f, 0, 255, out=f)
    return Image.fromarray(f.astype(np.uint8))  # 2-D uint8 -> mode "L"


def _to_rgb(im: Image.Image, notes: list[str], owned: bool = False) -> Image.Image:
    """Any mode -> an RGB image that owns its pixels: a new one, or `im` itself when it is RGB already and
    `owned` (decoded here, nobody else holds it: a 40 MP upload then costs one full-size copy, not two)."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _high_bit_depth_to_l(im).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")  # also turns a palette / colour-key transparency into alpha
        alpha = rgba.getchannel("A")
        if alpha.getextrema()[0] == 255:  # declared but unused transparency: nothing to composite
            return rgba.convert("RGB")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=alpha)
        notes.append(NOTE_ALPHA)
        return out
    if im.mode == "RGB":
        # owned: a plain Image around the same pixel core (no copy), detached from the decoder's file
        return im._new(im.im) if owned else im.copy()
    return im.convert("RGB")  # 1, L, P, CMYK, YCbCr, ...


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # malformed EXIF is common in the wild; it must not reject the picture
        return 1


def _is_animated(im: Image.Image) -> bool:
    # An MPO's extra frames are previews / stereo views of the same photo, not an animation.
    return bool(getattr(im, "is_animated", False)) and im.format != "MPO"


def _finish(im: Image.Image, notes: list[str], owned: bool = False) -> LoadedImage:
    """Loaded image of any mode -> detached RGB LoadedImage, orientation applied, metadata dropped.
    `owned`: `im` was decoded here and may become the result itself (see `_to_rgb`)."""
    if _orientation(im) in (2, 3, 4, 5, 6, 7, 8):
        im = ImageOps.exif_transpose(im)
        notes.append(NOTE_EXIF)
        owned = True  # a new image already
    rgb = _to_rgb(im, notes, owned)
    # Drop EXIF & co: the orientation is already applied, and a second exif_transpose downstream
    # (or a second load_image) must not rotate the picture again.
    rgb.info = {}
    return LoadedImage(image=rgb, notes=notes, key=image_key(rgb))


def _decode(data: bytes, max_bytes: int, max_pixels: int) -> LoadedImage:
    if not data:
        raise ImageError(f"The file is empty (0 bytes). {_advice(max_bytes)}", "empty")
    try:
        im = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _bomb(e, max_pixels) from e
    except MemoryError:
        raise
    except Exception as e:  # Pillow raises many types on hostile headers; all mean "can't read it"
        raise _unsupported(data, max_bytes) from e
    try:
        _check_pixels(im, max_pixels)  # before any pixel is decoded: no memory spike
        im.load()  # the first frame only; raises on truncated data (never padded)
        animated = _is_animated(im)
        loaded = _finish(im, [NOTE_ANIMATED] if animated else [], owned=not animated)
    except ImageError:
        im.close()
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        im.close()
        raise _bomb(e, max_pixels) from e
    except MemoryError:
        im.close()
        raise
    except Exception as e:
        im.close()
        raise _damaged(max_bytes) from e
    im.close()  # the file; the pixels live on in the result
    return loaded


# ----------------------------------------------------------------------------- public API


def image_key(img: Image.Image) -> str:
    """sha256 over mode, size and pixels: equal pixels <=> equal key (metadata is ignored).

    Meant for load_image's RGB output; other modes are hashed after a plain convert("RGB").
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    digest = hashlib.sha256(f"RGB {w}x{h}\n".encode())
    rows = max(1, (1 << 22) // max(1, 3 * w))  # hash ~4 MB strips: no second full copy in memory
    for y in range(0, h, rows):
        digest.update(img.crop((0, y, w, min(h, y + rows))).tobytes())
    return digest.hexdigest()


def load_image(source, *, max_bytes: int = MAX_FILE_BYTES, max_pixels: int = MAX_PIXELS) -> LoadedImage:
    """Decode a path, bytes, binary file object or PIL image into an RGB LoadedImage, or raise ImageError.

    A file object is read from its current position. A PIL image is never modified or closed.
    """
    if isinstance(source, Image.Image):
        try:
            _check_pixels(source, max_pixels)
            source.load()  # a lazily opened image reads its file here; an in-memory one is a no-op
            return _finish(source, [NOTE_ANIMATED_CURRENT] if _is_animated(source) else [])
        except ImageError:
            raise
        except MemoryError:
            raise
        except Exception as e:
            raise _damaged(max_bytes) from e
    return _decode(_read_source(source, max_bytes), max_bytes, max_pixels)

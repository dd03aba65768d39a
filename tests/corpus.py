"""The project's own corpus of awkward and hostile image files (generated here; never users' files).

    from corpus import EXPECT, make_corpus      # tests/ on sys.path (pytest does this)
    paths = make_corpus(tmp_path)              # {"empty.png": Path, ...}, all tiny on disk
    EXPECT["truncated.png"].error              # -> "damaged" (an ImageError.kind)

Each `Expect` says either how the file loads through `mini_gemini.images.load_image` (RGB size,
notes, a few probe pixels) or which `ImageError.kind` it raises and a phrase of the message.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mini_gemini.inputs.images import MAX_FILE_BYTES

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)
ANIMATED = "animated image: only the first frame is used"
EXIF = "EXIF orientation applied"
ALPHA = "transparency composited on white"


@dataclass(frozen=True)
class Expect:
    size: tuple[int, int] | None = None  # (w, h) of the loaded RGB image
    notes: tuple[str, ...] = ()  # exactly the notes load_image reports, in order
    pixels: tuple = ()  # ((x, y), (r, g, b)) probes; compare with `tol`
    tol: int = 2  # per-channel tolerance of the probes (lossy JPEG needs more)
    error: str | None = None  # ImageError.kind when the file must be refused
    message: str = ""  # a phrase the user-facing message must contain

    @property
    def loads(self) -> bool:
        return self.error is None


EXPECT: dict[str, Expect] = {
    # refused
    "empty.png": Expect(error="empty", message="empty"),
    "truncated.jpg": Expect(error="damaged", message="the file is damaged or incomplete"),
    "truncated.png": Expect(error="damaged", message="the file is damaged or incomplete"),
    "not_an_image.png": Expect(error="unsupported", message="PNG, JPEG, WebP, GIF or BMP"),
    "unsupported.svg": Expect(error="unsupported", message="SVG"),
    "photo.heic": Expect(error="unsupported", message="HEIC"),
    "scan.tiff": Expect(error="unsupported", message="TIFF"),
    "bomb_40000.png": Expect(error="too_many_pixels", message="too large"),
    "too_big.bin": Expect(error="too_big", message="under 20 MB"),
    # loaded
    "one_pixel.png": Expect(size=(1, 1), pixels=(((0, 0), (10, 200, 30)),)),
    "wide_6000x12.png": Expect(size=(6000, 12), pixels=(((0, 0), RED), ((5999, 11), BLUE))),
    "tall_12x6000.png": Expect(size=(12, 6000), pixels=(((0, 0), RED), ((11, 5999), BLUE))),
    "grey16.png": Expect(size=(256, 4), pixels=(((0, 0), BLACK), ((128, 1), (128,) * 3), ((255, 3), WHITE))),
    "grey.png": Expect(size=(8, 8), pixels=(((3, 3), (77, 77, 77)),)),
    "grey_alpha.png": Expect(size=(16, 8), notes=(ALPHA,), pixels=(((2, 2), WHITE), ((12, 2), (50, 50, 50)))),
    "bilevel.png": Expect(size=(16, 16), pixels=(((2, 2), BLACK), ((10, 2), WHITE), ((10, 10), BLACK))),
    "cmyk.jpg": Expect(size=(32, 32), pixels=(((16, 16), RED),), tol=12),
    "palette_transparent.png": Expect(size=(16, 8), notes=(ALPHA,), pixels=(((2, 2), WHITE), ((12, 2), GREEN))),
    "rgba.png": Expect(size=(30, 10), notes=(ALPHA,),
                       pixels=(((5, 5), WHITE), ((15, 5), (127, 127, 127)), ((25, 5), BLUE))),
    "rgba_opaque.png": Expect(size=(8, 8), pixels=(((4, 4), RED),)),
    "plain.bmp": Expect(size=(5, 3), pixels=(((0, 0), (1, 2, 3)),)),
    "animated.gif": Expect(size=(16, 16), notes=(ANIMATED,), pixels=(((8, 8), RED),)),
    "animated.webp": Expect(size=(16, 16), notes=(ANIMATED,), pixels=(((8, 8), RED),)),
    "animated.png": Expect(size=(16, 16), notes=(ANIMATED,), pixels=(((8, 8), RED),)),
    "multi_picture.jpg": Expect(size=(16, 16), pixels=(((8, 8), RED),), tol=12),  # MPO: not an animation
    # stored 60x30 with red left / blue right; orientation 6 = turn 90 deg clockwise -> red on top
    "exif_rotated.jpg": Expect(size=(30, 60), notes=(EXIF,), pixels=(((15, 5), RED), ((15, 55), BLUE)), tol=12),
}


def png_header_only(width: int, height: int) -> bytes:
    """A valid-looking PNG whose IHDR claims width x height but carries almost no pixel data.

    Decoding it would need width*height*3 bytes; refusing it must happen from the header alone.
    """
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(1024)))
            + chunk(b"IEND", b""))


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _halves(size, left, right, mode="RGB") -> Image.Image:
    w, h = size
    im = Image.new(mode, size, left)
    im.paste(right, (w // 2, 0, w, h))
    return im


def _files() -> dict[str, bytes | None]:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    jpg, png = _encode(noise, "JPEG", quality=90), _encode(noise, "PNG")

    wide = Image.new("RGB", (6000, 12), RED)
    wide.paste(BLUE, (3000, 0, 6000, 12))

    grey16 = Image.fromarray((np.arange(256, dtype=np.uint16) * 257)[None].repeat(4, 0))  # mode I;16
    assert grey16.mode == "I;16"

    bilevel = Image.new("1", (16, 16), 0)
    bilevel.paste(1, (8, 0, 16, 8))
    bilevel.paste(1, (0, 8, 8, 16))

    palette = Image.new("P", (16, 8), 0)
    palette.putpalette([*BLACK, *GREEN] + [0] * (254 * 3))
    palette.paste(1, (8, 0, 16, 8))

    rgba = Image.new("RGBA", (30, 10), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 128), (10, 0, 20, 10))
    rgba.paste((*BLUE, 255), (20, 0, 30, 10))

    red, blue = Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)
    anim = dict(save_all=True, append_images=[blue], duration=100, loop=0)

    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned, rotate 90 degrees clockwise to view

    return {
        "empty.png": b"",
        "truncated.jpg": jpg[: len(jpg) // 2],
        "truncated.png": png[: len(png) // 2],
        "not_an_image.png": b"Hello! This is a text file that someone renamed to .png\n" * 4,
        "unsupported.svg": b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" '
                           b'height="10"><rect width="10" height="10" fill="red"/></svg>\n',
        "photo.heic": struct.pack(">I", 24) + b"ftypheic" + b"\x00\x00\x00\x00mif1heic" + bytes(64),
        "scan.tiff": _encode(Image.new("RGB", (4, 4), RED), "TIFF"),
        "bomb_40000.png": png_header_only(40000, 40000),
        "too_big.bin": None,  # written sparse by make_corpus
        "one_pixel.png": _encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"),
        "wide_6000x12.png": _encode(wide, "PNG"),
        "tall_12x6000.png": _encode(wide.transpose(Image.Transpose.TRANSPOSE), "PNG"),
        "grey16.png": _encode(grey16, "PNG"),
        "grey.png": _encode(Image.new("L", (8, 8), 77), "PNG"),
        "grey_alpha.png": _encode(_halves((16, 8), (0, 0), (50, 255), "LA"), "PNG"),
        "bilevel.png": _encode(bilevel, "PNG"),
        "cmyk.jpg": _encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95),
        "palette_transparent.png": _encode(palette, "PNG", transparency=0),
        "rgba.png": _encode(rgba, "PNG"),
        "rgba_opaque.png": _encode(Image.new("RGBA", (8, 8), (*RED, 255)), "PNG"),
        "plain.bmp": _encode(Image.new("RGB", (5, 3), (1, 2, 3)), "BMP"),
        "animated.gif": _encode(red, "GIF", **anim),
        "animated.webp": _encode(red, "WEBP", lossless=True, **anim),
        "animated.png": _encode(red, "PNG", **anim),
        "multi_picture.jpg": _encode(red, "MPO", save_all=True, append_images=[blue], quality=95),
        "exif_rotated.jpg": _encode(_halves((60, 30), RED, BLUE), "JPEG", quality=95, exif=exif),
    }


def make_corpus(directory) -> dict[str, Path]:
    """Write every case of EXPECT into `directory` (a few hundred KB; too_big.bin is sparse)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = _files()
    assert files.keys() == EXPECT.keys()
    paths = {}
    for name, data in files.items():
        path = paths[name] = directory / name
        if data is None:  # one byte over the default limit, without writing 20 MB to disk
            with open(path, "wb") as f:
                f.truncate(MAX_FILE_BYTES + 1)
        else:
            path.write_bytes(data)
    return paths

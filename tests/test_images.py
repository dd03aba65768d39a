"""mini_gemini.images: every file of the hostile corpus, through every kind of source."""

import io
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from corpus import EXPECT, make_corpus, png_header_only
from mini_gemini.inputs import images
from mini_gemini.inputs.images import ImageError, LoadedImage, image_key, load_image


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def _as_source(path: Path, kind: str):
    if kind == "path":
        return path
    if kind == "str":
        return str(path)
    if kind == "bytes":
        return path.read_bytes()
    return io.BytesIO(path.read_bytes())  # "fileobj"


@pytest.fixture
def load_spy(monkeypatch):
    """Records every ImageFile.load call, i.e. every attempt to decode pixels from a file."""
    calls = []
    original = ImageFile.ImageFile.load

    def spy(self):
        calls.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


@pytest.mark.parametrize("source_kind", ["path", "str", "bytes", "fileobj"])
@pytest.mark.parametrize("name", list(EXPECT))
def test_corpus(corpus, name, source_kind):
    expect = EXPECT[name]
    source = _as_source(corpus[name], source_kind)
    if not expect.loads:
        with pytest.raises(ImageError) as info:
            load_image(source)
        err = info.value
        assert err.kind == expect.error
        assert expect.message in str(err)
        assert "Please" in str(err)  # always tells the user what to do
        assert "<" not in str(err) and "Errno" not in str(err)  # no reprs or raw OS errors leak out
        return
    out = load_image(source)
    assert isinstance(out, LoadedImage)
    im = out.image
    assert im.mode == "RGB" and im.size == expect.size
    assert not isinstance(im, ImageFile.ImageFile) and im.info == {}  # detached, metadata dropped
    assert out.notes == list(expect.notes)
    for xy, rgb in expect.pixels:
        got = im.getpixel(xy)
        assert max(abs(a - b) for a, b in zip(got, rgb)) <= expect.tol, (xy, got, rgb)
    assert out.key == image_key(im)


def test_messages_read_well(corpus):
    with pytest.raises(ImageError) as info:
        load_image(corpus["empty.png"])
    assert str(info.value) == ("The file is empty (0 bytes). "
                               "Please upload a PNG, JPEG, WebP, GIF or BMP image under 20 MB.")
    with pytest.raises(ImageError, match=r"too large \(20\.1 MB\)"):  # 1 byte over must not read "20 MB"
        load_image(corpus["too_big.bin"])
    with pytest.raises(ImageError, match="under 1 KB"):  # the advice follows the limit in force
        load_image(corpus["truncated.png"], max_bytes=1024)
    assert issubclass(ImageError, ValueError)


def test_bomb_refused_from_header_alone(corpus, load_spy):
    assert corpus["bomb_40000.png"].stat().st_size < 200  # tiny file, 4.8 GB of pixels if decoded
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match="1600 megapixels") as info:
            load_image(corpus["bomb_40000.png"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.kind == "too_many_pixels"
    assert load_spy == []  # no pixel decoding was attempted
    assert peak < 2 * 1024 * 1024


def test_own_pixel_limit_checked_before_decode(load_spy):
    data = png_header_only(2000, 2000)  # under Pillow's own limit: only our check can refuse it
    with pytest.raises(ImageError, match="2000x2000 pixels.*limit is 1 megapixels") as info:
        load_image(data, max_pixels=1_000_000)
    assert info.value.kind == "too_many_pixels" and load_spy == []
    # ... and the same header under a larger limit does reach the decoder (and is found incomplete)
    with pytest.raises(ImageError, match="damaged or incomplete"):
        load_image(data, max_pixels=5_000_000)
    assert load_spy == [(2000, 2000)]


@pytest.mark.parametrize("action", ["ignore", "error"])
def test_pillow_bomb_warning_and_error_become_image_error(monkeypatch, load_spy, action):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter(action)  # "error": Pillow's DecompressionBombWarning is raised, not shown
        for side in (40, 100):  # 1600 px: Pillow only warns; 10000 px: Pillow raises
            with pytest.raises(ImageError) as info:
                load_image(png_header_only(side, side), max_pixels=10**9)
            assert info.value.kind == "too_many_pixels"
    assert load_spy == []


def test_too_big_path_refused_without_opening(corpus, monkeypatch):
    def no_open(*args, **kwargs):
        raise AssertionError("the file must not be opened")

    monkeypatch.setattr(images, "open", no_open, raising=False)  # shadows the builtin in the module
    with pytest.raises(ImageError) as info:
        load_image(corpus["too_big.bin"])
    assert info.value.kind == "too_big"


def test_file_object_read_is_bounded():
    class Endless(io.RawIOBase):
        read_total = 0

        def readable(self):
            return True

        def read(self, n=-1):
            n = 1 << 16 if n is None or n < 0 else min(n, 1 << 16)
            self.read_total += n
            return b"\x89PNG" * (n // 4) + b"\x00" * (n % 4)

    stream = Endless()
    with pytest.raises(ImageError, match="too large") as info:
        load_image(stream, max_bytes=100_000)
    assert info.value.kind == "too_big"
    assert stream.read_total <= 100_001


def test_bytes_over_limit(corpus):
    data = corpus["one_pixel.png"].read_bytes()
    assert load_image(data, max_bytes=len(data)).image.size == (1, 1)  # the limit is inclusive
    with pytest.raises(ImageError, match="under 60 bytes") as info:
        load_image(data, max_bytes=60)
    assert info.value.kind == "too_big"


@pytest.mark.parametrize("mode, values, expected", [
    ("I", np.array([[0, 32768, 65535]], dtype=np.int32), [0, 128, 255]),  # 16-bit data stored wide
    ("I", np.array([[-100, 0, 100]], dtype=np.int32), [0, 128, 255]),  # unknown range: stretched
    ("F", np.array([[0.0, 0.5, 1.0]], dtype=np.float32), [0, 128, 255]),
])
def test_high_bit_depth_scaled_not_clipped(mode, values, expected):
    im = Image.fromarray(values)
    assert im.mode == mode
    out = load_image(im).image
    assert [out.getpixel((x, 0)) for x in range(3)] == [(v, v, v) for v in expected]


def test_pil_source_is_not_modified(corpus):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    out = load_image(rgba)
    assert rgba.mode == "RGBA" and rgba.getpixel((0, 0)) == (255, 0, 0, 0)
    assert out.image.getpixel((0, 0)) == (255, 255, 255) and out.notes == ["transparency composited on white"]
    rgb = Image.new("RGB", (4, 4), (1, 2, 3))
    assert load_image(rgb).image is not rgb
    with pytest.raises(ImageError, match="too large"):
        load_image(rgb, max_pixels=15)


def test_pil_source_lazy_file_and_orientation_applied_once(corpus):
    with Image.open(corpus["exif_rotated.jpg"]) as lazy:  # opened, not yet decoded
        first = load_image(lazy)
    assert first.image.size == (30, 60) and first.notes == ["EXIF orientation applied"]
    again = load_image(first.image)  # orientation metadata was dropped: no second rotation
    assert again.image.size == (30, 60) and again.notes == [] and again.key == first.key


def test_key_follows_pixels_only(corpus):
    red = Image.new("RGB", (6, 4), (255, 0, 0))
    as_png = io.BytesIO()
    red.save(as_png, "PNG", pnginfo=_text_chunk())
    as_bmp = io.BytesIO()
    red.save(as_bmp, "BMP")
    keys = {load_image(as_png.getvalue()).key, load_image(as_bmp.getvalue()).key, image_key(red)}
    assert len(keys) == 1  # same pixels, different containers and metadata
    changed = red.copy()
    changed.putpixel((5, 3), (255, 0, 1))
    assert image_key(changed) != image_key(red)
    same_bytes_other_shape = Image.frombytes("RGB", (4, 6), red.tobytes())
    assert image_key(same_bytes_other_shape) != image_key(red)
    assert len(image_key(red)) == 64


def _text_chunk():
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "metadata must not change the key")
    return info


def test_key_hashes_in_strips_like_whole_image():
    im = Image.fromarray(np.random.default_rng(1).integers(0, 256, (3000, 700, 3), dtype=np.uint8))
    import hashlib

    whole = hashlib.sha256(b"RGB 700x3000\n" + im.tobytes()).hexdigest()
    assert image_key(im) == whole  # several strips of rows hash like one buffer


def test_missing_file_and_bad_sources(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError, match="nope.png") as info:
        load_image(missing)
    assert info.value.kind == "unreadable"
    with pytest.raises(TypeError):
        load_image(12345)
    with pytest.raises(TypeError, match="binary"):
        load_image(io.StringIO("not bytes"))


def test_truncated_images_are_never_padded():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False

"""How maps are shown (viz): colours, opacity that follows the value, colour bars, numbered boxes, the answer map's
picture and its summary in words. Exact values on small made-up maps; no model."""
import matplotlib
import numpy as np
import pytest
from PIL import Image

from mini_gemini.viz import answer_map
from mini_gemini.viz import heatmap as hm
from mini_gemini.viz.hr_map import mined_pixels, tile_views
from mini_gemini.viz.legend import legend_height, with_colorbar


def test_colours_are_matplotlibs_own():
    values = np.random.default_rng(0).random((17, 23)) * 3 - 1
    values[0, :3] = [np.nan, -1, 2]
    for cmap in ("inferno", "magma", "gray", "coolwarm"):
        t = np.clip(np.nan_to_num((values - 0.2) / (1.5 - 0.2)), 0, 1)
        want = (matplotlib.colormaps[cmap](t)[..., :3] * 255 + 0.5).astype(np.uint8)
        np.testing.assert_array_equal(hm.colorize(values, cmap, 0.2, 1.5), want)


def test_the_opacity_follows_the_value():
    photo = Image.new("RGB", (40, 20), (0, 0, 255))
    m = np.array([[0.0, 0.25, 0.5, 1.0]])      # four columns over the padded square; the photo sits in its middle
    out = np.asarray(hm.overlay(photo, m, cmap="gray", alpha=0.8, size=(40, 20), vmin=0, vmax=1, fade=True),
                     dtype=np.float64)
    assert out[10, 2].tolist() == [0, 0, 255]                 # value 0: the photo as it is
    for x, v in ((12, 0.25), (22, 0.5), (35, 1.0)):
        a = 0.8 * v ** hm.FADE_GAMMA
        grey = float(hm.colorize(np.array([v]), "gray", 0, 1)[0, 0])  # the gray colormap's level for v
        want = np.array([0, 0, 255]) * (1 - a) + grey * a
        np.testing.assert_allclose(out[10, x], np.floor(want + 0.5), atol=1)
    flat = np.asarray(hm.overlay(photo, m, cmap="gray", alpha=0.8, size=(40, 20), vmin=0, vmax=1))
    assert flat[10, 2].tolist() == [0, 0, round(255 * 0.2)]  # without fade every pixel is blended alike


def test_colour_bars_scale_with_the_picture_and_say_open_ends():
    small, large = with_colorbar(Image.new("RGB", (300, 50)), "gray", 0, 2, "a label"), \
        with_colorbar(Image.new("RGB", (1200, 50)), "gray", 0, 2, "a label")
    assert small.size == (300, 50 + legend_height(300)) and large.size == (1200, 50 + legend_height(1200))
    assert legend_height(1200) > 1.5 * legend_height(300)     # the text grows with the picture
    long = "word " * 200                                      # a label longer than two lines is cut, never clipped
    assert with_colorbar(Image.new("RGB", (300, 50)), "gray", 0, 2, long).size == small.size
    faded = np.asarray(with_colorbar(Image.new("RGB", (300, 50)), "inferno", 0, 1, "x", fade=0.8))
    row = faded[50 + round(0.5 * 14) + 7]                     # through the ramp: clear grey at its low end
    assert row[16].tolist() == [150, 150, 150]                 # the ramp's first pixel (x0 = 0.6 * 14 + 8): t = 0
    assert row[280][0] > 200                                  # its last: inferno's top colour, nearly opaque


def test_numbered_boxes_are_drawn_where_the_text_is():
    picture = Image.new("RGB", (400, 200), (255, 255, 255))
    hm.outline_boxes(picture, [[(20, 30), (180, 30), (180, 60), (20, 60)]], (200, 100))   # photo shown at 2x
    px = np.asarray(picture)
    assert px[60, 200].tolist() == [0, 255, 120]              # the box's top edge, at 2x
    assert px[90, 200].tolist() == [255, 255, 255]            # inside: left as it was
    assert (px[40:58, 38:60] == 0).all(axis=-1).any()         # the dark number tag above its top-left corner


def test_per_view_maps_tile_as_the_mined_pixels_do():
    layout = hm.Layout(side=2, patch=3, grid=2, global_view=True)
    attn = np.random.default_rng(1).random((5, 4, 9)).astype(np.float32)
    per_view = attn.reshape(5, 2, 2, 3, 3).transpose(0, 1, 3, 2, 4).reshape(5, 6, 6)
    for which in layout.choices():
        np.testing.assert_array_equal(tile_views(per_view, layout, which), mined_pixels(attn, layout, which))
    with pytest.raises(ValueError):
        tile_views(per_view[1:], hm.Layout(side=2, patch=3, grid=2), hm.GLOBAL)


def test_the_answer_map_is_shown_in_times_an_even_spread():
    layout = hm.Layout(side=2, patch=2)
    maps = np.zeros((1, 4, 4), np.float32)
    maps[0, 0, 0], maps[0, 3, 3] = 3.0, 1.0                   # the mass: 3/4 top-left, 1/4 bottom-right
    photo = Image.new("RGB", (64, 64), (255, 255, 255))
    picture, shown, (lo, top) = answer_map.picture(photo, maps, layout, size=(64, 64), alpha=1.0)
    assert shown[0, 0] == pytest.approx(12.0) and shown[3, 3] == pytest.approx(4.0) and shown[1, 1] == 0
    assert lo == 0 and top == pytest.approx(np.percentile(shown, answer_map.TOP_PERCENTILE))
    assert picture.size == (64, 64 + legend_height(64))
    px = np.asarray(picture)
    assert px[40, 20].tolist() == [255, 255, 255]             # no mass: the photo shows through
    assert px[2, 2].tolist() == hm.colorize(np.array([1.0]), "inferno", 0, 1)[0].tolist()  # the top: full colour


def test_the_answer_summary_in_words():
    layout = hm.Layout(side=3, patch=1)                       # 3 x 3 cells: the ninths of a square photo
    maps = np.zeros((1, 3, 3), np.float32)
    maps[0, 0, 2] = 0.3                                       # top-right
    maps[0, 2, 0] = 0.1                                       # bottom-left
    s = answer_map.image_summary(maps, layout, 90, 90, attention=0.4)
    assert [r["region"] for r in s["regions"][:2]] == ["top-right", "bottom-left"]
    assert s["regions"][0]["share"] == pytest.approx(0.75) and s["attention"] == pytest.approx(0.4)
    assert answer_map.describe(s, 2) == ("Image 2 (90×90 px): the answer drew on the top-right 75 %, bottom-left "
                                         "25 % (40 % of its attention went to this image).")
    abl = answer_map.ablation([0.9, 0.5, 0.2], [0.3, 0.4, 0.2])
    assert abl == {"median_ratio": pytest.approx(0.8), "halved": 1, "tokens": 3}
    assert answer_map.describe_ablation(abl) == ("Without the mined detail its words would be 0.8× as likely (median "
                                                 "over 3 tokens; 1 of 3 lose half their probability or more).")
    assert answer_map.ablation([0.5], None) is None

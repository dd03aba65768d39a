"""The README's figure of "where the answer looked", from a real photo, with the bundled demo model:

    python tools/answer_map_figure.py                       # writes docs/answer-map.png
    python tools/answer_map_figure.py --photo my.jpg --out figure.png

The photo (default: matplotlib's bundled sample photo of Grace Hopper, `matplotlib.get_data_path()/sample_data/
grace_hopper.jpg`) goes on a plain 640x480 canvas beside three coloured squares, one of them red with a digit: the
demo model knows only such scenes (on a photo alone it answers at random). It is asked "What digit is in the red
square?". The figure shows, left to right: where its answer looked (`ChatSession.explain`, the whole answer's map
over the picture: on the digit, not on the photo), and what patch info mining picked out whatever was asked (the
mined high-resolution pixels: all over, the photo included); the title gives its answer with and without the mined
detail (`ChatSession.answer_without_mining`). Everything runs on the CPU in a few seconds.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def collage(photo, digit: int = 3):
    """A 640x480 plain canvas: the photo (300 px tall) at the top left, a red square holding `digit` at the right, a
    blue and a green square (squares 120 px, as the demo model's training scenes have them)."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont
    canvas = Image.new("RGB", (640, 480), (238, 238, 238))
    small = photo.convert("RGB").copy()
    small.thumbnail((300, 300))
    canvas.paste(small, (20, 20))
    draw = ImageDraw.Draw(canvas)
    for (x, y), colour in (((470, 180), (228, 26, 28)), ((480, 40), (35, 60, 220)), ((470, 330), (30, 150, 50))):
        draw.rectangle((x, y, x + 119, y + 119), fill=colour)
    font = ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf"), 36)
    draw.text((540, 240), str(digit), font=font, fill=(255, 255, 255), anchor="mm")
    return canvas


def main(argv=None) -> int:
    import matplotlib
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photo", default=os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "answer-map.png"))
    args = ap.parse_args(argv)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from mini_gemini.chat.engine import Engine, GenOptions
    from mini_gemini.modeling.loading import load_pretrained
    from mini_gemini.resources import demo_model_path
    from mini_gemini.viz import answer_map
    from mini_gemini.viz import heatmap as hm
    from mini_gemini.viz.hr_map import mined_pixels
    from mini_gemini.viz.legend import with_colorbar

    question = "What digit is in the red square?"
    photo = collage(Image.open(args.photo))
    model = load_pretrained(str(demo_model_path()), device="cpu")
    session = Engine(model).session()
    greedy = GenOptions(temperature=0, max_new_tokens=8)
    list(session.chat(question, [photo], options=greedy))
    answer = session.turns[-1].assistant
    attribution = session.explain()
    plain = [e for e in session.answer_without_mining(options=greedy) if e.kind == "done"][0].text
    layout = hm.Layout.from_config(model.config)
    entry = session.images[0]
    size = hm.display_size(*photo.size, low=512, high=640)
    looked, _, _ = answer_map.picture(entry.image, attribution.images[0].answer_map().numpy(), layout, size=size)
    mined = mined_pixels(entry.attn.numpy(), layout)
    import numpy as np
    top = float(np.percentile(mined, 99.5))
    mining = with_colorbar(hm.overlay(entry.image, mined, alpha=0.85, size=size, vmin=0, vmax=top, fade=True),
                           "inferno", 0.0, top, f"mining weight (1/{layout.patch ** 2} = an even spread)", fade=0.85,
                           open_top=True)
    where = answer_map.top_regions(attribution.images[0].answer_map().numpy(), layout, *photo.size)
    p, q = float(attribution.prob[0]), float(attribution.prob_no_mining[0])

    fig, axes = plt.subplots(1, 2, figsize=(11, 6.2), dpi=100)
    for ax, pic, title in ((axes[0], looked, f"Where the answer “{answer}” looked\n(bright = where it drew its "
                                              "detail from)"),
                           (axes[1], mining, "What patch info mining picked out\n(whatever was asked)")):
        ax.imshow(pic)
        ax.set_title(title, fontsize=12)
        ax.axis("off")
    fig.suptitle(f"Demo model, a real photo beside three squares: “{question}”\n"
                 f"With mining: “{answer}” (p = {p:.2f}).  Without the mined detail: “{plain}” "
                 f"(p of “{answer}” = {q:.2f}).", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    canvas = fig.canvas
    canvas.draw()
    figure = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3])
    plt.close(fig)
    figure.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)  # a small file
    print(f"{args.out}: {answer!r} ({p:.2f}); without mining {plain!r} ({q:.2f}); the answer drew on {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

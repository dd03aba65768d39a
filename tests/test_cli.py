"""The command line: one JSON answer equal to the reference's greedy tokens, mining maps saved as .npz."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reference import Reference, official_prompt

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Describe the image in detail."


def write_images(folder: Path):
    rng = np.random.default_rng(7)
    paths = []
    for i, (h, w) in enumerate([(30, 45), (50, 30)]):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def check_answer(out: dict, mining_file: Path, folder: Path, images, template: str, views: int):
    ref = Reference(folder)
    prompt, expect, ref_attn = ref.answer([Image.open(p) for p in images], PROMPT, template, max_new=5)
    assert out["prompt"] == prompt == official_prompt(template, PROMPT, len(images))
    assert out["token_ids"] == expect
    assert out["text"] == ref.tokenizer.decode(expect, skip_special_tokens=True).strip()
    saved = np.load(mining_file)
    assert sorted(saved.files) == [f"image{i}" for i in range(len(images))]
    for i, w in enumerate(ref_attn):
        arr = saved[f"image{i}"]
        assert arr.dtype == np.float32 and arr.shape == (views, 16, 16)
        np.testing.assert_allclose(arr, w.numpy(), atol=2e-6, rtol=1e-4)


def test_cli_json_two_images_hd_subprocess(tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint("vicuna", hd=True)
    images = write_images(tmp_path)
    mining = tmp_path / "mining.npz"
    cmd = [sys.executable, "-m", "mini_gemini.cli", "--model", str(folder), "--image", str(images[0]),
           "--image", str(images[1]), "--prompt", PROMPT, "--json", "--max-new-tokens", "5",
           "--save-mining", str(mining)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert "Image 1:<image>\nImage 2:<image>\n" + PROMPT in out["prompt"]
    check_answer(out, mining, folder, images, "vicuna_v1", views=5)


@pytest.mark.parametrize("family,template", [("gemma", "gemma")])
def test_cli_json_one_image(family, template, tiny_checkpoint, tmp_path, capsys):
    from mini_gemini.cli import main
    folder = tiny_checkpoint(family)
    images = write_images(tmp_path)[:1]
    mining = tmp_path / "m.npz"
    code = main(["--model", str(folder), "--image", str(images[0]), "--prompt", PROMPT, "--json",
                 "--max-new-tokens", "5", "--save-mining", str(mining)])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    check_answer(out, mining, folder, images, template, views=1)


def test_cli_bad_image_path_fails_clearly(tiny_checkpoint, tmp_path, capsys):
    from mini_gemini.cli import main
    missing = tmp_path / "no-such-photo.png"
    code = main(["--model", str(tiny_checkpoint("vicuna")), "--image", str(missing), "--prompt", "Hi",
                 "--json", "--max-new-tokens", "3"])
    err = capsys.readouterr()
    assert code != 0
    assert "error:" in err.err and "no-such-photo.png" in err.err and "Could not open" in err.err
    assert not err.out.strip()  # no JSON answer for a failed turn


def test_cli_bad_model_path_fails_clearly(tmp_path, capsys):
    from mini_gemini.cli import main
    code = main(["--model", str(tmp_path / "MGM-missing"), "--prompt", "Hi"])
    assert code != 0
    assert "not found" in capsys.readouterr().err


def test_cli_generate_image_writes_png_and_reports_its_prompt(tiny_checkpoint, tiny_sdxl, tmp_path, capsys):
    from mini_gemini.cli import main
    images = write_images(tmp_path)[:1]
    out_dir = tmp_path / "out"
    code = main(["--model", str(tiny_checkpoint("vicuna")), "--image", str(images[0]), "--prompt", "Draw a cat",
                 "--generate-image", "--sdxl", str(tiny_sdxl), "--out-dir", str(out_dir), "--json",
                 "--max-new-tokens", "4", "--seed", "0"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["prompt"].endswith("Draw a cat <GEN> ASSISTANT:")  # the official demo's tag, then the answer
    from mini_gemini.imagegen import extract_image_prompt
    assert out["image_prompt"] and extract_image_prompt(out["text"]) == out["image_prompt"]
    png = Path(out["image_path"])
    assert png.parent == out_dir and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        assert im.mode == "RGB" and im.size == (64, 64)

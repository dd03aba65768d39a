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
    assert out["input_ids"] == ref.tokenize(prompt) and out["input_ids"].count(-200) == len(images)
    assert out["token_ids"] == expect
    assert out["text"] == ref.tokenizer.decode(expect, skip_special_tokens=True).strip()
    saved = np.load(mining_file)
    # the one documented layout (the app's download is the same): image{k} weights and gain{k}
    assert sorted(saved.files) == sorted([f"image{i}" for i in range(len(images))] +
                                         [f"gain{i}" for i in range(len(images))])
    for i, w in enumerate(ref_attn):
        arr = saved[f"image{i}"]
        assert arr.dtype == np.float32 and arr.shape == (views, 16, 16)
        assert saved[f"gain{i}"].dtype == np.float32 and saved[f"gain{i}"].shape == (views, 16)
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
    (line,) = err.out.strip().splitlines()  # one JSON object, with the error instead of an answer
    out = json.loads(line)
    assert "no-such-photo.png" in out["error"] and "Could not open" in out["error"] and out["error_kind"]
    assert "text" not in out


def test_cli_bad_model_path_fails_clearly(tmp_path, capsys):
    from mini_gemini.cli import main
    code = main(["--model", str(tmp_path / "MGM-missing"), "--prompt", "Hi"])
    assert code != 0
    assert "not found" in capsys.readouterr().err
    code = main(["--model", str(tmp_path / "MGM-missing"), "--prompt", "Hi", "--json"])
    err = capsys.readouterr()
    assert code == 2 and "not found" in err.err
    out = json.loads(err.out.strip())
    assert "not found" in out["error"] and out["error_kind"] == "model"


def test_cli_blank_prompt_says_why_on_stderr_and_in_json(tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint("vicuna")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    for extra in (["--json"], []):
        cmd = [sys.executable, "-m", "mini_gemini.cli", "--model", str(folder), "--prompt", "   ", *extra]
        run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 1 and "error: Nothing to answer" in run.stderr and "empty" in run.stderr
        if extra:
            (line,) = run.stdout.strip().splitlines()
            out = json.loads(line)
            assert out["error"].startswith("Nothing to answer") and out["error_kind"] == "empty_message"
        else:
            assert not run.stdout.strip()


def test_cli_json_every_failure_is_one_json_line(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from mini_gemini import cli
    folder = str(tiny_checkpoint("vicuna"))
    # a usage error (argparse exits 2)
    with pytest.raises(SystemExit) as exc:
        cli.main(["--model", folder, "--prompt", "Hi", "--temperature", "warm", "--json"])
    err = capsys.readouterr()
    assert exc.value.code == 2 and "error:" in err.err
    out = json.loads(err.out.strip())
    assert out["error_kind"] == "usage" and "warm" in out["error"]
    # a file that is not an image
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    assert cli.main(["--model", folder, "--image", str(bad), "--prompt", "Hi", "--json"]) == 1
    err = capsys.readouterr()
    out = json.loads(err.out.strip())
    assert "error:" in err.err and out["error"] and out["error_kind"] not in (None, "internal")
    # an output that cannot be written: the answer comes with the error
    blocker = tmp_path / "file"
    blocker.write_text("x")
    good = write_images(tmp_path)[0]
    code = cli.main(["--model", folder, "--image", str(good), "--prompt", "Hi", "--json", "--max-new-tokens", "2",
                     "--save-mining", str(blocker / "m.npz")])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 1 and out["error_kind"] == "write" and "token_ids" in out
    # anything unexpected
    import mini_gemini.chat.engine as engine_mod

    def broken(*a, **k):
        raise RuntimeError("boom")
    monkeypatch.setattr(engine_mod.Engine, "session", broken)
    assert cli.main(["--model", folder, "--prompt", "Hi", "--json"]) == 1
    err = capsys.readouterr()
    out = json.loads(err.out.strip())
    assert out == {"error": "RuntimeError: boom", "error_kind": "internal"} and "Traceback" in err.err


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
    assert out["image_prompt"] and extract_image_prompt(out["text"]).startswith(out["image_prompt"])  # as drawn
    png = Path(out["image_path"])
    assert png.parent == out_dir and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        assert im.mode == "RGB" and im.size == (64, 64)


# ---- no file is ever replaced -------------------------------------------------------------------------------
def test_generated_images_take_new_names_and_never_replace_a_file(tiny_checkpoint, tiny_sdxl, tmp_path, capsys):
    from mini_gemini.cli import main
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    mine = {"mgm-image-1.png": b"the user's own picture", "mgm-image-3.png": b"another one"}
    for name, data in mine.items():
        (out_dir / name).write_bytes(data)
    written = []
    for _ in range(3):
        code = main(["--model", str(tiny_checkpoint("vicuna")), "--prompt", "Draw a cat", "--generate-image",
                     "--sdxl", str(tiny_sdxl), "--out-dir", str(out_dir), "--json", "--max-new-tokens", "4",
                     "--seed", "0"])
        assert code == 0
        written.append(Path(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["image_path"]))
    assert len(set(written)) == 3 and not {p.name for p in written} & set(mine)
    for name, data in mine.items():
        assert (out_dir / name).read_bytes() == data
    for p in written:
        assert p.parent == out_dir and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_save_mining_never_overwrites_a_file(tiny_checkpoint, tmp_path, capsys):
    from mini_gemini.cli import main
    image = write_images(tmp_path)[0]
    taken = tmp_path / "maps.npz"
    taken.write_bytes(b"results of last week")
    args = ["--model", str(tiny_checkpoint("vicuna")), "--image", str(image), "--prompt", "Hi", "--json",
            "--max-new-tokens", "2", "--save-mining"]
    assert main(args + [str(taken)]) == 1
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["error_kind"] == "write" and "already exists" in out["error"] and "text" not in out  # said first
    assert taken.read_bytes() == b"results of last week"
    fresh = tmp_path / "maps-new"  # the name as given: no ".npz" is added behind the user's back
    assert main(args + [str(fresh)]) == 0
    assert np.load(fresh, allow_pickle=False)["image0"].dtype == np.float32


def test_new_file_names_are_taken_atomically(tmp_path):
    import threading

    from mini_gemini.files import create_new, new_file
    (tmp_path / "x-2.png").write_bytes(b"keep")
    names, barrier = [], threading.Barrier(16)

    def writer(i):
        barrier.wait()
        with new_file(tmp_path, "x", ".png") as (path, f):
            f.write(str(i).encode())
        names.append(path.name)
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == 16 and "x-2.png" not in names and (tmp_path / "x-2.png").read_bytes() == b"keep"
    assert sorted(int((tmp_path / n).read_text()) for n in names) == list(range(16))  # each kept its own content
    with pytest.raises(RuntimeError):  # a write that fails leaves nothing behind
        with new_file(tmp_path, "y", ".png"):
            raise RuntimeError("disk full")
    assert not list(tmp_path.glob("y-*"))
    path, fd = create_new(tmp_path / "sub", "z", ".bin")  # the folder is made when missing
    os.close(fd)
    assert path == tmp_path / "sub" / "z-1.bin"


# ---- --explain: where the answer looked ---------------------------------------------------------------------------
def _engine_explanation(folder, images, method="attention", layers=None):
    """The same conversation in a fresh engine, and its `ChatSession.explain` (the reference for the CLI's output)."""
    from mini_gemini.chat.engine import Engine, GenOptions
    from mini_gemini.chat.explanation import token_texts
    from mini_gemini.modeling.loading import load_pretrained
    engine = Engine(load_pretrained(str(folder), device="cpu"))
    session = engine.session()
    list(session.chat(PROMPT, [str(p) for p in images], options=GenOptions(temperature=0, max_new_tokens=5)))
    attribution = session.explain(method=method, layers=layers)
    return session, attribution, token_texts(engine.detokenizer, attribution.answer_ids)


def test_cli_explain_saves_each_answer_tokens_map_and_its_probabilities(tiny_checkpoint, tmp_path, capsys):
    from mini_gemini.cli import main
    folder = tiny_checkpoint("vicuna", hd=True)
    images = write_images(tmp_path)
    mining = tmp_path / "m.npz"
    code = main(["--model", str(folder), "--image", str(images[0]), "--image", str(images[1]), "--prompt", PROMPT,
                 "--json", "--max-new-tokens", "5", "--save-mining", str(mining), "--explain"])
    assert code == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    session, want, tokens = _engine_explanation(folder, images)
    assert out["token_ids"] == want.answer_ids and out["answer_tokens"] == tokens
    assert "".join(tokens).strip() == out["text"]
    assert out["answer_token_prob"] == pytest.approx(want.prob.tolist(), abs=1e-6)
    assert out["answer_token_prob_no_mining"] == pytest.approx(want.prob_no_mining.tolist(), abs=1e-6)
    assert out["explain_method"] == "attention" and out["explain_layers"] == list(want.layers) == [0, 2]
    assert out["answer_summary"].startswith("Image 1 (45×30 px): the answer drew on")
    assert "[where the answer looked: Image 1" in captured.err
    saved = np.load(mining)
    assert sorted(saved.files) == ["answer0", "answer1", "answer_tokens", "gain0", "gain1", "image0", "image1"]
    assert saved["answer_tokens"].tolist() == tokens
    for k, image in enumerate(want.images):   # (answer tokens, views, side*P, side*P): 5 views of 4x4 tokens, P = 4
        arr = saved[f"answer{k}"]
        assert arr.dtype == np.float32 and arr.shape == (len(want.answer_ids), 5, 16, 16)
        np.testing.assert_allclose(arr, image.hr_map.numpy(), atol=1e-6)
        # the geometry of viz.hr_map.mined_pixels per view: token t's map is its relevance times the mining weights
        attn = saved[f"image{k}"]
        np.testing.assert_allclose(arr[0, 2, 4:8, 0:4],
                                   image.relevance[0, 2, 4].item() * attn[2, 4].reshape(4, 4), rtol=1e-5, atol=1e-9)


def test_cli_explain_relevancy_with_a_layer_range_and_its_errors(tiny_checkpoint, tmp_path, capsys):
    from mini_gemini.cli import main
    folder = tiny_checkpoint("gemma")
    images = write_images(tmp_path)[:1]
    code = main(["--model", str(folder), "--image", str(images[0]), "--prompt", PROMPT, "--json",
                 "--max-new-tokens", "5", "--explain", "relevancy", "--explain-layers", "1:2"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    _, want, tokens = _engine_explanation(folder, images, "relevancy", (1, 2))
    assert out["explain_method"] == "relevancy" and out["explain_layers"] == [1, 2]
    assert out["answer_tokens"] == tokens
    assert out["answer_token_prob"] == pytest.approx(want.prob.tolist(), abs=1e-6)
    # a layer range the LLM does not have, and --explain with the LLM on a server: said in one line, no answer
    assert main(["--model", str(folder), "--image", str(images[0]), "--prompt", PROMPT, "--json",
                 "--explain", "--explain-layers", "1:9"]) == 2
    err = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert err["error_kind"] == "usage" and "2 layers" in err["error"]
    assert main(["--model", str(folder), "--prompt", PROMPT, "--json", "--explain",
                 "--llm-server", "http://127.0.0.1:9"]) == 2
    err = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert err["error_kind"] == "usage" and "--llm-server" in err["error"]

"""Shared fixtures: tiny checkpoints in the official layout, written once per test session."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread is fastest on small shared machines


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(family, hd=False, seed=0) -> folder with a tiny MGM in the official layout."""
    from mini_gemini.modeling.loading import save_pretrained
    from mini_gemini.testing.tiny import build_tiny
    made = {}

    def make(family: str, hd: bool = False, seed: int = 0) -> Path:
        key = (family, hd, seed)
        if key not in made:
            out = tmp_path_factory.mktemp(f"mgm-{family}{'-hd' if hd else ''}-{seed}")
            save_pretrained(build_tiny(family, hd=hd, seed=seed), out)
            made[key] = out
        return made[key]
    return make


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """Folder with a tiny random Stable Diffusion XL pipeline (diffusers layout)."""
    from mini_gemini.testing.tiny_sdxl import build_tiny_sdxl
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl-tiny"), seed=0)


@pytest.fixture(scope="session")
def newcomer_app(tmp_path_factory):
    """URL of `python app.py --model demo` as a newcomer starts it: offline, with a Stable Diffusion XL it cannot
    have (its log: test_app.LOGS[url])."""
    from test_app import start_app
    tmp = tmp_path_factory.mktemp("newcomer")
    return start_app("demo", tmp / "no-sdxl-here", tmp)

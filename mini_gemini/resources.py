"""Where the files the project ships live: the bundled demo model and the app's example pictures.

They stay in the top-level `assets/` folder of a checkout (the Hugging Face Space's layout) and are copied
into the wheel as `mini_gemini/assets/`, so `--model demo` works from a clone, an editable install and an
installed package alike, from any working folder.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

DEMO_MODEL_NAME = "demo"  # what `--model demo` / MGM_MODEL=demo mean


def assets_dir() -> Path:
    """The `assets/` folder: inside the installed package (wheel), else next to the package (checkout).

    Raises:
        FileNotFoundError: neither exists (a wheel built without its package data).
    """
    package = Path(str(resources.files("mini_gemini")))
    for candidate in (package / "assets", package.parent / "assets"):
        if (candidate / "demo-model").is_dir():
            return candidate
    raise FileNotFoundError(f"the bundled assets/ folder was not found next to {package}; reinstall the package")


def demo_model_path() -> Path:
    """Folder of the bundled demo model (official checkpoint layout)."""
    return assets_dir() / "demo-model"


def examples_dir() -> Path:
    """Folder of the app's example pictures."""
    return assets_dir() / "examples"


def resolve_model_name(name: str) -> str:
    """`demo` is the bundled model; anything else (hub id, folder) is returned as given."""
    return str(demo_model_path()) if name == DEMO_MODEL_NAME else name

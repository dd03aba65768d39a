"""The layers talk through public APIs: the app and the CLI never touch the engine's private state, model
code knows nothing of Gradio, and the package installs with its assets found through one helper."""
import re
from pathlib import Path

import mini_gemini
from mini_gemini.resources import demo_model_path, examples_dir, resolve_model_name

PKG = Path(mini_gemini.__file__).parent

# writes to engine state, or reads of private attributes of engine objects, from outside the engine
_PRIVATE = re.compile(r"\b(?:session|engine|eng|s|im|turn|LOADER\.engine)\._[a-z]\w*"
                      r"|\.kv\b|\bengine\.sessions\b|\bsession\.turns\s*=|\bim\.tokens\s*=")


def _sources(*parts):
    for part in parts:
        path = PKG / part
        yield from ([path] if path.suffix == ".py" else sorted(path.rglob("*.py")))


def test_app_and_cli_use_only_the_engine_api():
    offenders = [f"{p.relative_to(PKG)}:{i}: {line.strip()}"
                 for p in _sources("ui", "cli.py") for i, line in enumerate(p.read_text().splitlines(), 1)
                 if _PRIVATE.search(line)]
    assert offenders == []


def test_model_and_engine_know_nothing_of_gradio():
    for p in _sources("modeling", "chat", "inputs", "imagegen", "viz", "training", "testing"):
        assert "gradio" not in p.read_text(), p


def test_the_demo_model_is_found_through_one_helper():
    assert (demo_model_path() / "config.json").is_file() and any(examples_dir().glob("*.png"))
    assert resolve_model_name("demo") == str(demo_model_path()) and resolve_model_name("x/y") == "x/y"
    assert not [p for p in PKG.rglob("*.py") if "parents[1]" in p.read_text()]

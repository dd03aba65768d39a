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


# ---- who owns what (issue 19) --------------------------------------------------------------------------------
import ast  # noqa: E402

# Private names of other libraries that have no public equivalent, each with why it is used.
THIRD_PARTY_PRIVATE = {
    ("inputs/images.py", "_new"): "Pillow: wrap a decoded pixel core in a plain Image without a copy",
    ("modeling/quantization.py", "_int_mm"): "PyTorch's int8 x int8 -> int32 product (what torchao uses on CPU)",
    ("modeling/attribution.py", "_attn_implementation"): "transformers documents config._attn_implementation "
                                                          "as the way to read the attention implementation in use",
}
# namedtuple's public API starts with an underscore
NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make", "_field_defaults"}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _defined_here(tree) -> set[str]:
    """Every name a module defines: functions, classes, attributes it assigns, variables, arguments, imports."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            names.add(node.attr)  # an attribute of this module's own objects
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update(a.asname or a.name.split(".")[0] for a in node.names)
    return names


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        yield str(path.relative_to(PKG)), ast.parse(path.read_text())


def _private_offences(rel: str, tree) -> list[str]:
    own = _defined_here(tree)
    offenders = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in NAMEDTUPLE_API:
            if node.attr not in own and (rel, node.attr) not in THIRD_PARTY_PRIVATE:
                offenders.append(f"{rel}:{node.lineno}: .{node.attr}")
        if isinstance(node, ast.ImportFrom):
            offenders += [f"{rel}:{node.lineno}: imports {a.name}" for a in node.names if _private(a.name)]
    return offenders


def test_no_module_touches_another_modules_private_names():
    """A module reads or writes `obj._x` only when `_x` is its own (an attribute its objects set on `self`, or a
    name it defines), and imports no private name from another module: state has one owner, reached through
    its public API."""
    assert [o for rel, tree in _modules() for o in _private_offences(rel, tree)] == []


def test_the_private_name_check_sees_a_violation():
    """The check above is not blind: another object's private attribute, read or written, or a private import."""
    source = ("from .session import _Busy\n"
              "class Engine:\n    def __init__(self):\n        self._lock = None\n"
              "    def stop(self, session):\n        session._cancel.set()\n        session._busy = None\n"
              "        return self._lock\n")
    found = _private_offences("chat/x.py", ast.parse(source))
    assert sorted(f.split(": ", 1)[1] for f in found) == ["._busy", "._cancel", "imports _Busy"]


def _imports(tree) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_layers_point_down():
    """modeling/ imports nothing from chat/ or ui/; ui/ runs nothing from training/ or testing/."""
    for rel, tree in _modules():
        names = _imports(tree)
        if rel.startswith("modeling/"):
            assert not [n for n in names if re.match(r"(\.\.|mini_gemini\.)(chat|ui)\b", n)], rel
        if rel.startswith("ui/"):
            assert not [n for n in names if re.match(r"(\.\.|mini_gemini\.)(training|testing)\b", n)], rel


def test_kv_caches_have_one_home():
    """KV caches are made and kept in chat/kv_store.py only; a conversation's cache key is set in session.py only."""
    made, owner_set = set(), set()
    for rel, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "DynamicCache":
                made.add(rel)
            if isinstance(node, ast.Attribute) and node.attr == "cache_owner" and isinstance(node.ctx, ast.Store):
                owner_set.add(rel)
    assert {m for m in made if m.startswith("chat/")} == {"chat/kv_store.py"}
    assert owner_set == {"chat/session.py"}


def test_the_openai_endpoint_stands_without_the_app():
    """serve/ and eval/ (the OpenAI-compatible endpoint, also headless, and the harness around it) know nothing of
    Gradio or ui/ and use only the engine's API; the model and the engine import nothing from them."""
    for p in _sources("serve", "eval"):
        text = p.read_text()
        assert "gradio" not in text and not _PRIVATE.search(text), p
    for rel, tree in _modules():
        names = _imports(tree)
        if rel.startswith(("serve/", "eval/")):
            assert not [n for n in names if re.match(r"(\.\.|mini_gemini\.)ui\b", n)], rel
        if rel.startswith(("modeling/", "chat/", "inputs/", "viz/")):
            assert not [n for n in names if re.match(r"(\.\.|mini_gemini\.)(serve|eval)\b", n)], rel

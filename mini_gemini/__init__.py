"""Mini-Gemini (MGM): a vision-language model that mines high-resolution detail for low-resolution tokens.

    from mini_gemini import load_pretrained, Engine
    model = load_pretrained("YanweiLi/MGM-2B")         # hub id or local folder
    session = Engine(model).session()
    for event in session.chat("What is written here?", ["photo.jpg"]): ...

Names are imported on first use: `import mini_gemini` (and the app's page) does not wait for torch.
"""
from importlib import import_module

_LAZY = {"MGMConfig": ".modeling.config", "MiniGemini": ".modeling.model", "load_pretrained": ".modeling.loading",
         "save_pretrained": ".modeling.loading", "ModelLoadError": ".errors", "MGMError": ".errors",
         "Engine": ".chat.engine", "GenOptions": ".chat.types"}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'mini_gemini' has no attribute {name!r}")

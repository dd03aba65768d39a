"""Mini-Gemini (MGM): a vision-language model that mines high-resolution detail for low-resolution tokens.

    from mini_gemini import load_pretrained, Engine
    model = load_pretrained("YanweiLi/MGM-2B")         # hub id or local folder
    session = Engine(model).session()
    for event in session.chat("What is written here?", ["photo.jpg"]): ...
"""
from .modeling.config import MGMConfig
from .modeling.loading import ModelLoadError, load_pretrained, save_pretrained
from .modeling.model import MiniGemini

__all__ = ["MGMConfig", "MiniGemini", "ModelLoadError", "load_pretrained", "save_pretrained", "Engine"]


def __getattr__(name):  # the engine pulls in image decoding; import it on first use
    if name == "Engine":
        from .chat.engine import Engine
        return Engine
    raise AttributeError(name)

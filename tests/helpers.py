"""Small helpers shared by the engine, robustness and API tests."""
from mini_gemini.chat.engine import Engine


def run(session, *args, **kw):
    """All events of one turn, plus the finished Turn (or None)."""
    events = list(session.chat(*args, **kw))
    done = [e.data for e in events if e.kind == "done"]
    return events, (done[0] if done else None)


def kinds(events, kind):
    return [e for e in events if e.kind == kind]


class FaultyStreamer:
    """Wraps generate's streamer and fails after `after` puts: the device breaks mid-answer,
    with the KV cache already half written."""

    def __init__(self, streamer, after: int = 3):
        self.streamer, self.after, self.n = streamer, after, 0

    def put(self, value):
        self.n += 1
        if self.n > self.after:
            raise RuntimeError("device lost")
        self.streamer.put(value)

    def end(self):
        self.streamer.end()


def no_eos(monkeypatch, model):
    """Make the model unable to end its answer, so that it runs until max_new_tokens."""
    real = model.llm.generate
    stop_ids, _ = Engine._stops(model.processor.tokenizer, model.processor.template.stop_strings)

    def generate(*args, **kw):
        kw["suppress_tokens"] = sorted(set(kw.get("suppress_tokens") or []) | set(stop_ids))
        return real(*args, **kw)
    monkeypatch.setattr(model.llm, "generate", generate)

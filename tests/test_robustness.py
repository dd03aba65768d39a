"""The engine under hostile input and faults: bad files, typed control tokens, huge or odd text, injected
errors and out-of-memory, consumers that leave mid-stream, concurrency, and bounded caches."""
import collections
import gc
import threading
import time
import weakref

import pytest
import torch
from corpus import EXPECT, make_corpus
from helpers import ENGINE_PATHS, endless, fault_at, kinds, on_llm_forward, run
from PIL import Image

from mini_gemini.chat import session as session_mod
from mini_gemini.chat.engine import MAX_USER_CHARS, Engine, GenOptions
from mini_gemini.constants import IMAGE_TOKEN_INDEX
from mini_gemini.modeling.loading import load_pretrained

GREEDY = GenOptions(temperature=0.0, max_new_tokens=6)
SHORT = GenOptions(temperature=0.0, max_new_tokens=2)
TYPED = ["<image>", "<start_of_turn>", "<end_of_turn>", "</s>", "<s>", "<eos>", "<bos>", "<|eot_id|>",
         "<|begin_of_text|>", "<|start_header_id|>", "[INST]", "[/INST]", "<|im_end|>", "<|im_start|>",
         "USER:", "ASSISTANT:", "<GEN>", "<h>", "</h>"]


@pytest.fixture(scope="module")
def vicuna(tiny_checkpoint):
    return load_pretrained(str(tiny_checkpoint("vicuna")), device="cpu")


# ---- bad files -------------------------------------------------------------------------------------------
def test_every_corpus_file_gives_a_clear_message_or_an_image(vicuna, tmp_path):
    eng = Engine(vicuna)
    s = eng.session()
    first = run(s, "Hello!", options=GREEDY)[1]
    for name, path in make_corpus(tmp_path).items():
        exp = EXPECT[name]
        events, turn = run(s, "What is in this picture?", [path], options=SHORT)
        if exp.loads:
            assert turn is not None and not kinds(events, "error"), name
            assert len(turn.images) == 1 and turn.images[0].image.size == exp.size, name
            notices = " ".join(e.text for e in kinds(events, "notice"))
            assert all(note in notices for note in exp.notes), (name, notices)
            assert s.undo() is turn
        else:
            (err,) = kinds(events, "error")
            assert exp.message.lower() in err.text.lower() and err.data == exp.error, (name, err)
            assert turn is None and not kinds(events, "delta"), name
        assert s.turns == [first] and first.assistant is not None  # history kept either way
    # a failed image among good ones refuses the whole turn and says which one
    paths = make_corpus(tmp_path / "again")
    events, turn = run(s, "Compare", [paths["grey.png"], paths["truncated.png"]], options=SHORT)
    assert turn is None and kinds(events, "error")[0].text.startswith("Image 2 of 2:")
    # the next turn works, and answers as if nothing had happened
    nxt = run(s, "Thanks!", options=GREEDY)[1]
    fresh = eng.session()
    run(fresh, "Hello!", options=GREEDY)
    assert nxt.token_ids == run(fresh, "Thanks!", options=GREEDY)[1].token_ids


def test_empty_message_without_image_does_nothing(vicuna):
    s = Engine(vicuna).session()
    for text in ("", "   \n\t ", "\x00\x01\x1b"):
        assert list(s.chat(text)) == [] and list(s.chat(text, [])) == [] and list(s.chat(text, None)) == []
    assert s.turns == []
    events, turn = run(s, "", [Image.new("RGB", (8, 8), (9, 9, 9))], options=SHORT)  # an image alone is a turn
    assert turn is not None and turn.user == ""


def test_image_limits_refuse_the_turn_and_keep_the_history(vicuna):
    eng = Engine(vicuna, images_per_session=2)
    s = eng.session()
    first = run(s, "One", [Image.new("RGB", (8, 8), (1, 1, 1)), Image.new("RGB", (8, 8), (2, 2, 2))], options=SHORT)[1]
    events, turn = run(s, "Two", [Image.new("RGB", (8, 8), (3, 3, 3))], options=SHORT)
    assert turn is None and kinds(events, "error")[0].data == "too_many" and s.turns == [first]
    small = Engine(vicuna, max_context=40)  # three images of 16 tokens each cannot fit in 40
    events, turn = run(small.session(), "Two", [Image.new("RGB", (8, 8), (3, 3, 3))] * 3, options=SHORT)
    assert turn is None and "context" in kinds(events, "error")[0].text


# ---- typed control tokens ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["vicuna", "gemma", "llama3", "yi", "mistral"])
def test_typed_control_tokens_are_text(tiny_checkpoint, family):
    model = load_pretrained(str(tiny_checkpoint(family)), device="cpu")
    tok = model.processor.tokenizer
    control = set(tok.all_special_ids) | set(tok.get_added_vocab().values())

    def specials(ids):
        return collections.Counter(i for i in ids if i in control or i == IMAGE_TOKEN_INDEX)

    drawn = []

    class Recorder:
        def generate(self, prompt, **kw):
            drawn.append(prompt)
            return Image.new("RGB", (8, 8))

    eng = Engine(model, Recorder())
    hostile = "look " + " x ".join(TYPED) + " <h>a cat</h> <GEN>"
    img = Image.new("RGB", (30, 20), (0, 200, 0))
    for images in ([], [img]):
        benign = run(eng.session(), "look", images, options=SHORT)[1]
        events, turn = run(eng.session(), hostile, images, options=SHORT)
        assert turn is not None and not kinds(events, "error")
        assert turn.user == hostile and hostile in turn.prompt
        # the same structure tokens as a harmless message: nothing the user typed became a special id or a slot
        assert specials(turn.prompt_ids) == specials(benign.prompt_ids)
        assert turn.prompt_ids.count(IMAGE_TOKEN_INDEX) == len(images)
        # typed <GEN> / <h> with the flag off never draw
        assert not kinds(events, "image") and not kinds(events, "progress") and turn.image_prompt is None
    assert drawn == []
    # an answer holding such strings stays text in the next prompt too
    s = eng.session()
    run(s, "look", options=SHORT)
    s.turns[-1].assistant = hostile
    s2 = eng.session()
    run(s2, "look", options=SHORT)
    s2.turns[-1].assistant = "fine"
    a, b = run(s, "and?", options=SHORT)[1], run(s2, "and?", options=SHORT)[1]
    assert specials(a.prompt_ids) == specials(b.prompt_ids) and drawn == []


# ---- odd text ----------------------------------------------------------------------------------------------
def test_huge_message_is_trimmed_with_a_notice_and_answered(vicuna):
    eng = Engine(vicuna)
    text = ("The red square is left of the blue circle. " * 5000)[:200_000]
    events, turn = run(eng.session(), text, options=GREEDY)
    notices = [e.text for e in kinds(events, "notice")]
    assert any(f"{MAX_USER_CHARS:,}" in n for n in notices) and any("shortened" in n for n in notices)
    assert turn is not None and not kinds(events, "error") and turn.assistant is not None
    assert text.startswith(turn.user) and 0 < len(turn.user) < MAX_USER_CHARS
    assert len(turn.prompt_ids) + len(turn.token_ids) <= eng.max_context


def test_control_characters_removed_scripts_and_emoji_survive(vicuna):
    s = Engine(vicuna).session()
    turn = run(s, "a\x00b\x07c\x1b[0m\u200bd\r\ne\x7f\x85f\rg\ud800", options=SHORT)[1]
    assert turn.user == "abc[0m\u200bd\nef\ng"  # zero-width space (format) stays, C0/C1 and surrogates go
    msg = "שלום עולם — مرحبا بالعالم \u200f 👋🏽 👨\u200d👩\u200d👧 🇫🇷 ok"
    turn = run(s, msg, options=SHORT)[1]
    assert turn.user == msg and msg in turn.prompt
    assert msg in vicuna.processor.tokenizer.decode([i for i in turn.prompt_ids if i >= 0])


# ---- edge values -------------------------------------------------------------------------------------------
def test_every_option_value_answers_and_tiny_temperatures_are_greedy(vicuna):
    """Whatever an API caller sends, the turn is answered: no "probability tensor contains inf/nan"."""
    eng = Engine(vicuna)
    greedy = run(eng.session(), "Hello there!", options=GenOptions(temperature=0.0, max_new_tokens=4))[1].token_ids
    nan, inf = float("nan"), float("inf")
    as_greedy = [dict(temperature=t) for t in (1e-45, 5e-324, 1e-300, 1e-38, 1e-20, 9.99e-5, -1e-45, -1.0, -inf, nan,
                                               "not a number", None)]
    as_greedy += [dict(temperature=0.7, top_p=p) for p in (0.0, 1e-300, 1e-3)]  # only the top token is left
    other = [dict(temperature=t) for t in (1e-4, 1e-3, 1e300, inf, 10.0)]
    other += [dict(temperature=1.0, top_p=p) for p in (-1.0, nan, inf, 2.0)]
    other += [dict(temperature=1.0, seed=s) for s in (2**70, -1, -2**70, nan, inf, "x")]
    other += [dict(temperature=0.0, max_new_tokens=m) for m in (0, -5, nan, inf, 1e300)]
    for kw in as_greedy + other:
        opts = GenOptions(**{"max_new_tokens": 4, **kw})
        events, turn = run(eng.session(), "Hello there!", options=opts)
        assert not kinds(events, "error") and turn is not None and turn.assistant is not None, (kw, events)
        if kw in as_greedy:
            assert turn.token_ids == greedy, kw
    checked = GenOptions(temperature=1e-45, top_p=0.0, seed=2**64 + 3, width=10**9, height=-4).checked()
    assert (checked.temperature, checked.top_p, checked.seed, checked.height) == (0.0, 1e-3, 3, 8)
    assert checked.width == 4096
    assert GenOptions(temperature=1e-4).checked().temperature == 1e-4  # the floor itself still samples


# ---- faults ------------------------------------------------------------------------------------------------
@ENGINE_PATHS
@pytest.mark.parametrize("fault", ["exception", "oom", "mid-stream"])
def test_fault_in_generation_keeps_history_and_next_turn_is_exact(vicuna, fault, max_active):
    eng = Engine(vicuna, max_active=max_active)
    s = eng.session()
    first = run(s, "What colour is the square?", options=GREEDY)[1]
    # the device fails in the LLM's forward: at the prefill, or after three tokens (cache half written)
    error = torch.OutOfMemoryError("CUDA out of memory.") if fault == "oom" else RuntimeError("boom")
    with fault_at(vicuna, error, at=4 if fault == "mid-stream" else 1):
        events, turn = run(s, "And the circle?", options=GenOptions(temperature=0, max_new_tokens=12))
    (err,) = kinds(events, "error")
    assert turn is None and s.turns == [first] and not eng.kv_store.holds(s.cache_owner)
    assert ("out of memory" in err.text) == (fault == "oom") and "conversation is kept" in err.text
    assert err.data == ("oom" if fault == "oom" else "internal")
    longer = GenOptions(temperature=0, max_new_tokens=12)
    nxt = run(s, "And the circle?", options=longer)[1]
    clean = eng.session()
    run(clean, "What colour is the square?", options=GREEDY)
    assert nxt.token_ids == run(clean, "And the circle?", options=longer)[1].token_ids
    assert s.undo() is nxt and s.turns == [first]


def _positions(kwargs) -> list[int]:
    pos = kwargs.get("position_ids")
    if pos is None:
        pos = kwargs.get("cache_position")
    return pos.reshape(-1).tolist()


@ENGINE_PATHS
def test_consumer_that_leaves_stops_generation(vicuna, max_active):
    eng = Engine(vicuna, max_active=max_active)
    s = eng.session()
    with endless(vicuna):
        gen = s.chat("Tell me a very long story.", options=GenOptions(temperature=0, max_new_tokens=1500))
        assert next(ev for ev in gen if ev.kind == "delta").text
        gen.close()  # returns once the model let go of the answer
    (turn,) = s.turns
    assert turn.cancelled and 0 < len(turn.token_ids) < 1500 and turn.assistant is not None
    written = len(turn.prompt_ids) + len(turn.token_ids)
    # nothing writes the left answer any more: every forward from now on is another conversation's short answer
    seen = []
    with on_llm_forward(vicuna, lambda kwargs, output: seen.append(max(_positions(kwargs)))):
        other = run(eng.session(), "Hi", options=SHORT)[1]  # another session can generate
    assert other is not None and len(other.token_ids) == 2
    assert seen and max(seen) < written and len(turn.token_ids) < 1500
    assert run(s, "Go on", options=SHORT)[1] is not None  # and so can this one
    # a turn closed before it produced anything leaves no trace
    gen = s.chat("Never mind", options=SHORT)
    next(gen)  # first event (a delta or the notice) - then leave
    gen.close()
    assert len(s.turns) in (2, 3) and all(t.assistant is not None for t in s.turns)


@ENGINE_PATHS
def test_second_turn_on_a_busy_session_is_refused_clearly(vicuna, monkeypatch, max_active):
    monkeypatch.setattr(session_mod, "BUSY_WAIT_S", 0.05)
    s = Engine(vicuna, max_active=max_active).session()
    with endless(vicuna):
        gen = s.chat("Long story", options=GenOptions(temperature=0, max_new_tokens=1500))
        next(ev for ev in gen if ev.kind == "delta")
        (err,) = list(s.chat("Hello?", options=SHORT))
        assert err.kind == "error" and err.data == "busy" and "Stop" in err.text
        s.cancel()
        assert kinds(list(gen), "done")[0].data.cancelled
    assert run(s, "Hello?", options=SHORT)[1] is not None and len(s.turns) == 2


# ---- concurrency and memory --------------------------------------------------------------------------------
def test_eight_threads_eight_sessions_get_their_own_answers(vicuna):
    eng = Engine(vicuna, kv_sessions=4)
    questions = [f"Question {i}: how many {w} are there?" for i, w in
                 enumerate(["circles", "squares", "stars", "lines", "dots", "boxes", "shapes", "objects"])]
    alone = []
    for q in questions:
        s = eng.session()
        alone.append([run(s, q, options=GREEDY)[1].token_ids, run(s, "Why?", options=GREEDY)[1].token_ids])
    got, barrier = [None] * 8, threading.Barrier(8)

    def worker(i):
        s = eng.session(f"thread-{i}")
        barrier.wait()
        got[i] = [run(s, questions[i], options=GREEDY)[1].token_ids, run(s, "Why?", options=GREEDY)[1].token_ids]
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == alone
    assert len(eng.kv_store.holders()) <= 4


def test_session_and_cache_limits_and_release(vicuna):
    eng = Engine(vicuna, max_sessions=3, kv_sessions=2)
    made = [eng.session(f"s{i}") for i in range(5)]
    for s in made:
        run(s, "Hi there", [Image.new("RGB", (10, 10), (1, 2, 3))], options=SHORT)
    assert eng.sessions.ids() == ["s2", "s3", "s4"]  # least recently used first out
    assert all(s.turns == [] and not eng.kv_store.holds(s.cache_owner) for s in made[:2])  # memory released
    assert eng.kv_store.holders() == ["s3", "s4"]
    eng.end_session("s4")
    assert "s4" not in eng.sessions.ids() and eng.kv_store.holders() == ["s3"] and made[4].turns == []
    ref = weakref.ref(made.pop(4))
    del s
    deadline = time.monotonic() + 30  # the scheduler thread lets go of its last request within a round
    while gc.collect() is not None and ref() is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ref() is None  # nothing inside the engine still holds the ended session
    # an evicted session used again starts afresh and says so
    events, turn = run(made[0], "Hello again", options=SHORT)
    assert any("expired" in e.text for e in kinds(events, "notice")) and made[0].turns == [turn]
    assert "s0" in eng.sessions.ids() and len(eng.sessions) == 3


def test_memory_stays_bounded_over_a_long_run(vicuna):
    def caches():  # every KV cache alive in the process (other tests' engines may hold some: counted before)
        gc.collect()
        return sum(type(o).__name__ == "DynamicCache" for o in gc.get_objects())
    before = caches()
    eng = Engine(vicuna, max_sessions=6, kv_sessions=2)
    for k in range(200):
        turn = run(eng.session(f"user-{k % 15}"), f"Message {k}", options=SHORT)[1]
        assert turn is not None
    assert len(eng.sessions) == 6 and caches() - before <= 2 and len(eng.kv_store.holders()) == 2
    assert sum(len(s.turns) for s in eng.sessions.values()) <= 6 * 14
    assert not eng.scheduler.active and not eng.scheduler.waiting

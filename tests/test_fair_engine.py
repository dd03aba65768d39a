"""The fair built-in engine (chat/scheduler.py): many conversations at once advance step by step, batched,
and every greedy answer equals the same request served alone, token for token - with Stop pressed mid-way,
with a queue beyond `max_active`, with faults in one request, with images and KV reuse.

A packed step multiplies more rows at once than a lone one, so logits may differ in their last float bits
(as in any batching server); a greedy choice between two tokens whose logits tie to ~1e-6 can then go either
way. The prompts are therefore drawn from those whose answers never come near such a tie (`decided`)."""
import threading

import pytest
import torch
from helpers import kinds, on_llm_forward
from PIL import Image

from mini_gemini.chat.engine import Engine, GenOptions
from mini_gemini.modeling.chat_template import PromptTurn
from mini_gemini.modeling.loading import load_pretrained

POOL = ["What is in the picture?", "Describe a red square.", "Hello there!", "Count to ten, please.",
        "What colour is the sky?", "Tell me a story about a cat.", "Is it round?", "Why is the circle blue?",
        "Name three fruits.", "Where do birds live?", "How many legs has a dog?", "Say something nice.",
        "What is two plus two?", "Describe the weather today.", "Which shape is bigger?", "Write a short poem."]
GREEDY = GenOptions(temperature=0.0, max_new_tokens=20, ignore_eos=True)  # every answer runs to its length
RED = Image.new("RGB", (40, 24), (220, 30, 30))


def decided(model, n=8, max_new=20, margin=1e-3):
    """The first `n` prompts of POOL whose greedy answer (alone, max_new tokens) never has its top two
    logits within `margin` of each other."""
    eng = Engine(model)
    chosen = []
    for p in POOL:
        _, ids = eng.build_prompt([PromptTurn(p, 0, None)])
        emb = model.embed(ids)
        with torch.no_grad():
            out = model.llm.generate(inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.long),
                                     max_new_tokens=max_new, do_sample=False, temperature=None, top_p=None,
                                     top_k=None, eos_token_id=[], pad_token_id=eng.detokenizer.pad_id, output_logits=True,
                                     return_dict_in_generate=True)
        if all((lambda t: t[0] - t[1])(step[0].topk(2).values) > margin for step in out.logits):
            chosen.append(p)
        if len(chosen) == n:
            return chosen
    pytest.fail(f"only {len(chosen)} decided prompts")


def answer(session, text, images=(), options=GREEDY):
    events = list(session.chat(text, images, options=options))
    done = kinds(events, "done")
    return events, (done[0].data if done else None)


def crowd(engine, jobs):
    """Run jobs(k) -> result in threads that start together; returns the results in order."""
    out = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def work(k):
        start.wait()
        out[k] = jobs[k]()
    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    return out


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    made = {}

    def get(family):
        if family not in made:
            made[family] = load_pretrained(str(tiny_checkpoint(family)), device="cpu")
        return made[family]
    return get


@pytest.mark.parametrize("family", ["vicuna", "gemma", "mistral", "mixtral"])
def test_concurrent_answers_equal_solo_ones(models, family):
    model = models(family)
    PROMPTS = decided(model)
    alone = Engine(model, max_active=0)        # one generate at a time, as before
    solo = [answer(alone.session(), p)[1].token_ids for p in PROMPTS]
    eng = Engine(model)
    assert [answer(eng.session(), p)[1].token_ids for p in PROMPTS[:2]] == solo[:2]  # scheduler, alone
    turns = crowd(eng, [lambda p=p: answer(eng.session(), p)[1] for p in PROMPTS])
    assert [t.token_ids for t in turns] == solo
    assert all(len(t.token_ids) == GREEDY.max_new_tokens for t in turns)
    assert eng.scheduler.peak_batch > 1  # the answers really were batched


def test_images_and_follow_ups_with_kv_reuse_under_load(models):
    model = models("vicuna")
    PROMPTS = decided(model)
    alone = Engine(model, max_active=0)

    def conversation(engine, k):
        s = engine.session()
        first = answer(s, PROMPTS[k], [RED] if k % 2 else [])[1]
        second = answer(s, "And then?")[1]
        return first.token_ids, second.token_ids, second.cached_tokens

    expected = [conversation(alone, k) for k in range(6)]
    eng = Engine(model, kv_sessions=8)  # every conversation keeps its cache
    got = crowd(eng, [lambda k=k: conversation(eng, k) for k in range(6)])
    assert [g[:2] for g in got] == [e[:2] for e in expected]
    assert all(g[2] > 0 for g in got)  # the follow-ups reused their session's cache


def test_stop_mid_way_leaves_the_others_exact(models):
    model = models("vicuna")
    PROMPTS = decided(model, n=5, max_new=60)
    eng = Engine(model)
    options = GenOptions(temperature=0.0, max_new_tokens=60, ignore_eos=True)
    solo = [answer(eng.session(), p, options=options)[1].token_ids for p in PROMPTS[:5]]
    stopper = eng.session("stopper")

    def stopping():
        events = []
        for ev in stopper.chat(PROMPTS[0], options=options):
            events.append(ev)
            if len(kinds(events, "delta")) == 3:
                stopper.cancel()
        return kinds(events, "done")[0].data

    jobs = [stopping] + [lambda p=p: answer(eng.session(), p, options=options)[1] for p in PROMPTS[1:5]]
    turns = crowd(eng, jobs)
    stopped = turns[0]
    assert stopped.cancelled and 0 < len(stopped.token_ids) < 60
    assert stopped.token_ids == solo[0][:len(stopped.token_ids)]
    assert [t.token_ids for t in turns[1:]] == solo[1:]
    # the stopped conversation goes on normally
    assert answer(stopper, "Go on.")[1] is not None


def test_queue_beyond_max_active_says_where_it_stands(models):
    model = models("vicuna")
    PROMPTS = decided(model)
    eng = Engine(model, max_active=2)
    solo = [answer(eng.session(), p)[1].token_ids for p in PROMPTS[:6]]
    results = crowd(eng, [lambda p=p: answer(eng.session(), p) for p in PROMPTS[:6]])
    assert [turn.token_ids for _, turn in results] == solo
    assert eng.scheduler.peak_batch == 2  # never more caches than allowed
    waits = [e for events, _ in results for e in kinds(events, "notice") if getattr(e.text, "kind", "") == "queue"]
    assert waits and all(e.text.startswith("Waiting: ") and "ahead" in e.text for e in waits)
    for events, turn in results:  # the notice never leaks into the answer
        assert "Waiting" not in turn.assistant and "".join(e.text for e in kinds(events, "delta")) == turn.assistant


def _last_positions(kwargs) -> list[int]:
    """The last position of each request packed in a step, in the order of the step's logits rows: the packed
    forward keeps one row per request (`logits_to_keep` = the index of its last input). Position runs alone
    would not tell two requests apart where one's positions happen to continue the other's."""
    return kwargs["position_ids"][0, kwargs["logits_to_keep"]].tolist()


def test_a_fault_in_one_request_ends_only_that_one(models):
    """Two requests meet faults in the model itself: the device fails whenever one is in the step, and the other's
    logits turn to NaN (its sampling fails). The scheduler must end those two alone."""
    model = models("vicuna")
    PROMPTS = decided(model)
    eng = Engine(model)
    solo = [answer(eng.session(), p)[1].token_ids for p in PROMPTS[:4]]
    # the faulty requests are told apart by their positions: prompts far longer than the others'
    bad_forward, bad_sampling = "Hello? " * 60, "Hello? " * 120
    short = max(len(eng.build_prompt([PromptTurn(p, 0, None)])[1]) for p in PROMPTS[:4]) + GREEDY.max_new_tokens
    lengths = [len(eng.build_prompt([PromptTurn(t, 0, None)])[1]) for t in (bad_forward, bad_sampling)]
    assert short < lengths[0] < lengths[1] - 30

    def hook(kwargs, output):
        lasts = _last_positions(kwargs)
        if any(lengths[0] - 1 <= last < lengths[1] - 1 for last in lasts):
            raise RuntimeError("device lost")
        for row, last in enumerate(lasts):
            if last >= lengths[1] + 1:  # its third token on: probabilities that are not numbers
                output.logits[0, row] = float("nan")

    sampled = GenOptions(temperature=0.7, max_new_tokens=20, seed=3, ignore_eos=True)
    bad = {"forward": eng.session("bad-forward"), "sampling": eng.session("bad-sampling")}
    jobs = [lambda p=p: answer(eng.session(), p) for p in PROMPTS[:4]]
    jobs += [lambda: answer(bad["forward"], bad_forward, options=sampled),
             lambda: answer(bad["sampling"], bad_sampling, options=sampled)]
    with on_llm_forward(model, hook):
        results = crowd(eng, jobs)
    assert [turn.token_ids for _, turn in results[:4]] == solo
    for events, turn in results[4:]:
        (err,) = kinds(events, "error")
        assert turn is None and err.data == "internal" and "conversation is kept" in err.text
    assert "device lost" in kinds(results[4][0], "error")[0].text
    for s in bad.values():  # both conversations work again
        assert answer(s, "Hello?")[1] is not None


def test_seeded_sampling_is_reproducible_under_load(models):
    model = models("vicuna")
    PROMPTS = decided(model)
    eng = Engine(model)
    opts = GenOptions(temperature=0.9, top_p=0.9, max_new_tokens=16, seed=7)
    alone = answer(eng.session(), "Describe a square.", options=opts)[1].token_ids
    turns = crowd(eng, [lambda: answer(eng.session(), "Describe a square.", options=opts)[1]] * 3 +
                  [lambda p=p: answer(eng.session(), p)[1] for p in PROMPTS[:3]])
    assert all(t.token_ids == alone for t in turns[:3])


def test_stop_while_queued_and_consumer_leaving_end_their_answers(models):
    model = models("vicuna")
    eng = Engine(model, max_active=1)
    busy = eng.session("busy")
    gen = busy.chat("Tell me a very long story.",
                    options=GenOptions(temperature=0.0, max_new_tokens=100_000, ignore_eos=True))
    next(ev for ev in gen if ev.kind == "delta")  # the only place is taken
    s, events, stopped = eng.session("queued"), [], False
    for ev in s.chat("Hello?", options=GREEDY):  # ends only because Stop was pressed while it waited
        events.append(ev)
        if ev.kind == "notice" and getattr(ev.text, "kind", "") == "queue":
            stopped = True
            s.cancel()
    assert stopped
    turn = kinds(events, "done")[0].data
    assert turn.cancelled and turn.token_ids == [] and not kinds(events, "delta")
    gen.close()  # the consumer of the long answer leaves: the scheduler drops it at its next round
    (long_turn,) = busy.turns
    assert long_turn.cancelled and 0 < len(long_turn.token_ids) < 100_000
    # the place is free again: the next answer is written (it would wait forever behind the long one otherwise)
    done = threading.Event()
    threading.Thread(target=lambda: answer(s, "Hello?")[1].token_ids and done.set(), daemon=True).start()
    assert done.wait(120)

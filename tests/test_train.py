"""Training: answer-only labels, LLaVA data, a few steps that lower the loss, checkpoints and --resume."""
import json
import random

import pytest
import torch

from mini_gemini.modeling.chat_template import PromptTurn
from mini_gemini.testing.tiny import build_tiny
from mini_gemini.training.synthetic import sample, scene, token_targets, write_llava_json
from mini_gemini.training.train import IGNORE_INDEX, encode_conversation, llava_turns, main


def test_synthetic_is_deterministic_and_well_formed():
    a, b = scene(3, 7), scene(3, 7)
    assert a.image.tobytes() == b.image.tobytes() and a.digit == b.digit
    assert scene(3, 8).image.tobytes() != a.image.tobytes()
    for i in range(20):
        sc = scene(0, i)
        assert 3 <= len(sc.squares) <= 5 and len({s.colour for s in sc.squares}) == len(sc.squares)
        x0, y0, x1, y1 = sc.digit_box
        box = sc.square_of_digit().box
        assert box[0] <= x0 and box[1] <= y0 and x1 <= box[2] and y1 <= box[3]  # the digit sits in its square
        assert 0.03 <= (y1 - y0) / sc.size <= 0.08                              # 4-7% of the side (rounding)
        colour, digit = token_targets(sc, 8)
        assert digit.count(sc.digit) >= 1 and len(colour) == 64
    s = sample(0, 1, digit_fraction=1.0)
    assert s["kind"] == "digit" and s["answer"] == str(s["scene"].digit)


def test_labels_cover_only_the_answers():
    model = build_tiny("vicuna")
    turns = [PromptTurn("What digit is in the red square?", 1, "7"), PromptTurn("And the colour?", 0, "red")]
    ids, labels = encode_conversation(model, turns)
    learnt = model.processor.tokenizer.decode([i for i, y in zip(ids, labels) if y != IGNORE_INDEX])
    assert learnt.replace(" ", "") == "7</s>red</s>"
    assert all(y == IGNORE_INDEX or y == i for i, y in zip(ids, labels))
    got = llava_turns([{"from": "human", "value": "<image>\nWhat digit?"}, {"from": "gpt", "value": "3"}])
    assert got == [PromptTurn("What digit?", 1, "3")]


def test_a_few_steps_lower_the_loss_then_resume(tmp_path, tiny_checkpoint):
    torch.set_num_threads(1)
    init = tiny_checkpoint("vicuna")
    out = tmp_path / "run"
    common = ["--init", str(init), "--stage", "2", "--lr", "3e-3", "--batch-size", "4", "--log-every", "1",
              "--out", str(out), "--seed", "0"]
    main(common + ["--steps", "12", "--save-every", "6"])
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    first, last = sum(r["lm"] for r in log[:3]) / 3, sum(r["lm"] for r in log[-3:]) / 3
    assert last < 0.85 * first, (first, last)
    assert (out / "checkpoint-6" / "trainer_state.pt").exists() and (out / "config.json").exists()

    # --resume continues from the newest checkpoint (step 12) to step 14
    main(common + ["--steps", "14", "--resume", "--save-every", "14"])
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps[12:] == [13, 14]

    # LLaVA-format JSON data (stage 1: the LLM stays frozen)
    data = write_llava_json(tmp_path / "llava", 4, seed=5)
    main(["--init", str(out), "--data", str(data), "--stage", "1", "--steps", "2", "--batch-size", "2",
                  "--out", str(tmp_path / "ft")])
    from mini_gemini import load_pretrained
    before, after = load_pretrained(str(out), device="cpu"), load_pretrained(str(tmp_path / "ft"), device="cpu")
    assert torch.equal(before.llm.lm_head.weight, after.llm.lm_head.weight)
    assert not torch.equal(before.mm_projector[0].weight, after.mm_projector[0].weight)


def test_hr_pretraining_crops_are_token_windows_around_the_digit():
    from mini_gemini.training.train import build_demo_model, hr_crops, pretrain_hr
    torch.set_num_threads(1)
    model = build_demo_model(0)
    x, y = hr_crops(6, 4, model)
    assert x.shape == (6, 3, 64, 64) and y.shape == (6, 4)  # 2 x 2 windows of 256 / 8 = 32 HR pixels
    for i in range(6):
        digit_windows = y[i][(y[i] >= 0) & (y[i] < 10)]
        assert digit_windows.tolist() == [scene(4, i).digit]  # exactly one window holds the digit's centre
    before = model.vision_tower_aux.vision_stem[0].weight.clone()
    acc = pretrain_hr(model, 2, batch_size=4, n_scenes=12, log=lambda *a, **k: None)
    assert 0.0 <= acc <= 1.0
    assert not torch.equal(before, model.vision_tower_aux.vision_stem[0].weight)


def test_conversations_name_their_pictures_as_the_engine_does():
    from mini_gemini.modeling.chat_template import build_prompt
    from mini_gemini.training.conversations import CHATTER_ANSWER, chat_sample
    model = build_tiny("vicuna")
    a, b = chat_sample(3, 5), chat_sample(3, 5)
    assert [t.user for t in a["turns"]] == [t.user for t in b["turns"]]
    multi = 0
    for i in range(40):
        c = chat_sample(7, i)
        assert sum(t.n_images for t in c["turns"]) == len(c["images"]) == len(c["scenes"]) <= 4
        text = build_prompt(model.processor.template, c["turns"]).text
        if len(c["images"]) >= 2:
            multi += 1
            assert all(f"Image {k}:<image>" in text for k in range(1, len(c["images"]) + 1))
        for turn, (k, kind) in zip(c["turns"], c["asked"]):
            if kind == "chatter":
                assert turn.assistant == CHATTER_ANSWER and turn.n_images == 0
                continue
            sc = c["scenes"][k - 1]
            if kind == "digit":
                assert turn.assistant == str(sc.digit) and sc.square_of_digit().colour in turn.user
        ids, labels = encode_conversation(model, c["turns"])
        learnt = model.processor.tokenizer.decode([i for i, y in zip(ids, labels) if y != IGNORE_INDEX])
        assert learnt.replace(" ", "") == "".join(t.assistant.replace(" ", "") + "</s>" for t in c["turns"])
    assert multi >= 15


def test_cached_visual_tokens_train_the_projector_and_llm_only(tmp_path, tiny_checkpoint):
    from mini_gemini import load_pretrained
    torch.set_num_threads(1)
    init = tiny_checkpoint("vicuna")
    out = tmp_path / "chat"
    main(["--init", str(init), "--stage", "2", "--steps", "3", "--batch-size", "4", "--lr", "3e-3",
          "--chat-fraction", "0.7", "--scene-pool", "6", "--cache-visual", "--train-projector", "--out", str(out)])
    before, after = load_pretrained(str(init), device="cpu"), load_pretrained(str(out), device="cpu")
    assert torch.equal(before.vision_tower_aux.vision_stem[0].weight, after.vision_tower_aux.vision_stem[0].weight)
    assert all(torch.equal(p, q) for p, q in zip(before.mining.parameters(), after.mining.parameters()))
    assert not torch.equal(before.mm_projector[0].weight, after.mm_projector[0].weight)
    assert not torch.equal(before.llm.lm_head.weight, after.llm.lm_head.weight)


def test_reset_llm_draws_a_new_llm_of_the_asked_depth_and_keeps_the_visual_side(tmp_path, tiny_checkpoint):
    from mini_gemini import load_pretrained
    torch.set_num_threads(1)
    init = tiny_checkpoint("vicuna")
    before = load_pretrained(str(init), device="cpu")
    depth = before.config.llm.num_hidden_layers
    out = tmp_path / "fresh"
    main(["--init", str(init), "--stage", "2", "--steps", "1", "--batch-size", "2", "--lr", "1e-9",
          "--chat-fraction", "0.5", "--scene-pool", "4", "--cache-visual", "--train-projector",
          "--reset-llm", "--llm-layers", str(depth + 1), "--out", str(out)])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == depth + 1
    after = load_pretrained(str(out), device="cpu")
    assert len(after.llm.model.layers) == depth + 1
    # the visual side is kept; the LLM is new (an lr of 1e-9 cannot explain the change)
    for part in ("vision_tower", "vision_tower_aux", "mining"):
        assert all(torch.equal(p, q) for p, q in zip(getattr(before, part).parameters(),
                                                     getattr(after, part).parameters())), part
    assert torch.allclose(before.mm_projector[0].weight, after.mm_projector[0].weight, atol=1e-6)
    assert (before.llm.lm_head.weight - after.llm.lm_head.weight).abs().max() > 1e-3


def test_earlier_sets_how_often_a_turn_asks_about_an_earlier_picture():
    from mini_gemini.training.conversations import chat_sample

    def share(earlier):
        convs = [chat_sample(11, i, earlier=earlier) for i in range(80)]
        without = sum(turn.n_images == 0 for c in convs for turn in c["turns"][1:])
        return without / sum(len(c["turns"]) - 1 for c in convs)
    assert share(0.1) < 0.3 < share(0.6)


def test_quizzes_bring_their_pictures_first_and_name_them_in_every_question():
    from mini_gemini.training.conversations import ORDINALS, quiz_sample
    from mini_gemini.training.data import ChatMixData
    from mini_gemini.training.synthetic import COLOUR_NAMES
    model = build_tiny("vicuna")
    several = 0
    for i in range(30):
        q = quiz_sample(5, i)
        n = len(q["images"])
        assert [t.n_images for t in q["turns"]] == [n] + [0] * (len(q["turns"]) - 1)
        assert 3 <= len(q["turns"]) <= 8 and 1 <= n <= 4
        for turn, (k, kind) in zip(q["turns"], q["asked"]):
            sc = q["scenes"][k - 1]
            if kind == "digit":
                assert turn.assistant == str(sc.digit)
            if n > 1:
                several += 1
                names = (f"Image {k}", f"image {k}", f"picture {k}", f"the {ORDINALS[k - 1]} ")
                assert any(name in turn.user for name in names), turn.user
        ids, labels = encode_conversation(model, q["turns"])
        learnt = model.processor.tokenizer.decode([i for i, y in zip(ids, labels) if y != IGNORE_INDEX])
        assert learnt.replace(" ", "") == "".join(t.assistant.replace(" ", "") + "</s>" for t in q["turns"])
    assert several >= 40
    lists = [(t.assistant, q["scenes"][k - 1]) for i in range(20) for q in [quiz_sample(6, i, list_fraction=0.5)]
             for t, (k, kind) in zip(q["turns"], q["asked"]) if kind == "list"]
    assert len(lists) >= 10
    for answer, sc in lists:  # every colour present, in COLOUR_NAMES order
        assert answer.split(", ") == [c for c in COLOUR_NAMES if c in {s.colour for s in sc.squares}]
    data = ChatMixData(40, seed=2, chat_fraction=0.3, pool=8, quiz_fraction=1.0)
    ex = data[3]
    assert ex["turns"][0].n_images == len(ex["images"]) == len(ex["keys"]) and len(ex["turns"]) >= 3


def test_other_mix_sets_the_share_of_colour_count_and_yes_no_questions():
    from mini_gemini.training.data import ChatMixData
    from mini_gemini.training.synthetic import COUNT_QUESTIONS, OTHER_MIX, other_question, scene
    sc = scene(4, 0)
    # the default weights draw exactly what they drew before they could be set
    assert [other_question(sc, random.Random(i)) for i in range(50)] == \
           [other_question(sc, random.Random(i), OTHER_MIX) for i in range(50)]

    def kinds(mix):
        data = ChatMixData(300, seed=3, digit_fraction=0.0, chat_fraction=1e-9, pool=16, other_mix=mix)
        got = {"yes/no": 0, "count": 0, "colour": 0}
        for i in range(len(data)):
            turn = data[i]["turns"][0]
            kind = ("yes/no" if turn.assistant in ("Yes", "No") else
                    "count" if turn.user in COUNT_QUESTIONS else "colour")
            got[kind] += 1
        return got
    assert kinds((0, 0, 1)) == {"yes/no": 300, "count": 0, "colour": 0}
    default, heavy = kinds(None), kinds((0.1, 0.3, 0.6))
    assert 60 <= default["yes/no"] <= 120 and 150 <= heavy["yes/no"] <= 210, (default, heavy)
    assert 60 <= heavy["count"] <= 120 and heavy["colour"] <= 50, heavy
    from mini_gemini.training.train import parse_args
    assert parse_args(["--other-mix", "0.1,0.3,0.6"]).other_mix == (0.1, 0.3, 0.6)
    for bad in ("1,2", "1,-1,1", "0,0,0", "a,b,c"):
        with pytest.raises(SystemExit):
            parse_args(["--other-mix", bad])

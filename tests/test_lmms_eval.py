"""Evaluation with a standard harness: lmms-eval (PyPI `lmms-eval`, its built-in `openai` model) against the
OpenAI-compatible endpoint serving the bundled demo model, on the demo model's digit questions written as a local
lmms-eval task: it must score exactly what the project's own evaluation scores on the same items, answer for answer.

lmms-eval lives in its own environment: set MGM_LMMS_PYTHON to its python (tools/setup_lmms_eval.sh prints it;
.ci/run makes one). Without it the harness test is skipped (in CI, with CI=true, the environment is made here);
the checks of the task files run anyway."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, side_env_python

from mini_gemini.eval import digits, lmms
from mini_gemini.training.evaluate import is_right

N = 200   # held-out items (the demo model gets 7 of them wrong: the scores are not trivially 1)


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lmms_py():
    return side_env_python("MGM_LMMS_PYTHON", "setup_lmms_eval.sh", "/tmp/venv-lmms", "lmms-eval")


def test_lmms_eval_scores_the_demo_model_as_the_projects_own_evaluation(lmms_py, tmp_path):
    from mini_gemini.chat.engine import Engine, GenOptions
    from mini_gemini.modeling.loading import load_pretrained
    from mini_gemini.resources import demo_model_path
    from mini_gemini.training.evaluate import EVAL_NEW_TOKENS, evaluate
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "mini_gemini.eval.lmms", "--lmms-python", lmms_py, "--model", "demo",
                          "--tasks", "mgm_digits", "--digits", str(N), "--output", str(tmp_path),
                          "--serve-arg=--device=cpu"], capture_output=True, text=True, timeout=1200, env=env, cwd=ROOT)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    harness = report["results"]["mgm_digits"]["accuracy"]

    model = load_pretrained(str(demo_model_path()), device="cpu", dtype="float32")
    own = evaluate(model, n=N, kind="digit")
    assert harness == own["accuracy"] and 0.5 < harness < 1.0, (harness, own["accuracy"])

    # answer for answer: lmms-eval's logged samples against the engine's answers to the same items
    (samples_file,) = Path(tmp_path).rglob("*_samples_mgm_digits.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert len(samples) == N
    engine, options = Engine(model), GenOptions(temperature=0, max_new_tokens=EVAL_NEW_TOKENS)
    for item, sample in zip(digits.items(N), samples):
        events = list(engine.session().chat(item["question"], [item["scene"].image], options=options))
        answer = events[-1].data.assistant
        got = sample["filtered_resps"]
        got = got[0] if isinstance(got, list) else got
        assert (sample["input"], sample["target"], got) == (item["question"], item["answer"], answer)
        assert sample["accuracy"] == float(is_right(answer, item["answer"]))


# ---- the task files (no harness needed) ----------------------------------------------------------------------
def test_the_digits_task_folder_holds_the_evaluations_items_and_scoring(tmp_path):
    folder = digits.write_task(tmp_path / "t", n=5)
    rows = [json.loads(line) for line in (folder / "data" / "digits.jsonl").read_text().splitlines()]
    assert [(r["question"], r["answer"]) for r in rows] == [(it["question"], it["answer"]) for it in digits.items(5)]
    task = (folder / "mgm_digits.yaml").read_text()
    assert "task: mgm_digits" in task and "max_new_tokens: 4" in task and "temperature: 0" in task
    utils = _module(folder / "utils.py")
    (picture,) = utils.doc_to_visual(rows[0])
    assert list(picture.getdata()) == list(digits.items(1)[0]["scene"].image.getdata())
    for answer in ("7", " 7.", "7 ", "Seven", "77", "", "7.."):
        assert utils.process_results({"answer": "7"}, [answer])["accuracy"] == float(is_right(answer, "7"))


def test_the_paper_tasks_prompt_as_the_paper_did():
    """The prompts of LLaVA's question files, which MGM's evaluation scripts use."""
    utils = _module(lmms.TASKS_DIR / "mgm_utils.py")
    assert utils.textvqa_doc_to_text({"question": "what is the brand of this camera?",
                                      "ocr_tokens": ["dakota", "digital"]}) == (
        "what is the brand of this camera?\nReference OCR token: dakota, digital\n"
        "Answer the question using a single word or phrase.")
    doc = {"hint": float("nan"), "question": "Which one is red?", "A": "apple", "B": "sky", "C": "nan", "D": None}
    assert utils.mmbench_doc_to_text(doc) == ("Which one is red?\nA. apple\nB. sky\n"
                                              "Answer with the option's letter from the given choices directly.")
    assert utils.mmbench_doc_to_text({**doc, "hint": "Look closely."}).startswith("Look closely.\nWhich one")
    assert utils.mmvet_doc_to_text({"question": "What is x?"}) == "What is x?"
    names = sorted(p.stem for p in lmms.TASKS_DIR.glob("*.yaml"))
    assert names == sorted(lmms.PAPER_TASKS)
    for name in names:
        text = (lmms.TASKS_DIR / f"{name}.yaml").read_text()
        assert f"task: {name}" in text and "temperature: 0" in text and "do_sample: false" in text
    assert lmms.paper_row("YanweiLi/MGM-2B") == {"TextVQA": 56.2, "MMBench": 59.8, "MME perception": 1341,
                                                 "MME cognition": 312, "MM-Vet": 31.1}
    measured = {"mgm_textvqa_val": {"exact_match": 0.5623}, "mgm_mme": {"mme_perception_score": 1340.9}}
    assert lmms.compare(measured, "YanweiLi/MGM-2B") == {"TextVQA": {"paper": 56.2, "measured": 56.23},
                                                         "MME perception": {"paper": 1341, "measured": 1340.9}}


def test_the_paper_task_files_load_in_lmms_eval(lmms_py, tmp_path):
    folder = lmms.task_folder(tmp_path / "tasks", digits=3)
    code = ("import glob, json, sys\nfrom lmms_eval.utils import load_yaml_config\n"
            "from lmms_eval.tasks import TaskManager\n"
            "cfgs = {c['task']: c for c in (load_yaml_config(f, mode='full') for f in sorted(glob.glob(sys.argv[1] + "
            "'/*/*.yaml')))}\n"
            "tm = TaskManager(include_path=sys.argv[1])\n"
            "print(json.dumps({t: [c['doc_to_text'].__module__, c['process_results'].__module__, t in tm.all_tasks] "
            "for t, c in cfgs.items()}))\n")
    out = subprocess.run([lmms_py, "-c", code, str(folder)], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, HF_HUB_OFFLINE="1", OPENAI_API_KEY="unused-here"))
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["mgm_textvqa_val"] == ["mgm_utils", "lmms_eval.tasks.textvqa.utils", True]
    assert found["mgm_mmbench_en_dev"] == ["mgm_utils", "lmms_eval.tasks.mmbench.en_utils", True]
    assert found["mgm_mme"] == ["lmms_eval.tasks.mme.utils", "lmms_eval.tasks.mme.utils", True]
    assert found["mgm_mmvet"] == ["mgm_utils", "lmms_eval.tasks.mmvet.utils", True]
    assert found["mgm_digits"] == ["utils", "utils", True]

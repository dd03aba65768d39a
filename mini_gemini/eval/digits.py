"""The bundled demo model's held-out digit questions as a local lmms-eval task (task name `mgm_digits`).

    python -m mini_gemini.eval.digits --out DIR [--n 40] [--seed 12345]

writes DIR/mgm_digits.yaml, DIR/utils.py and DIR/data/ (digits.jsonl + PNGs): the first `n` held-out scenes and
questions of `mini_gemini.training.evaluate` (the project's own evaluation: same pictures, same questions, same
greedy decoding of at most 4 tokens, same scoring). lmms-eval then runs it with `--include_path DIR --tasks
mgm_digits` against the OpenAI-compatible endpoint, and its accuracy must equal `evaluate(model, n)["accuracy"]`.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from ..training.evaluate import EVAL_NEW_TOKENS, EVAL_SEED, held_out_question

TASK = "mgm_digits"
TASK_YAML = f"""# The bundled demo model's held-out digit questions (mini_gemini.training.evaluate), as a local lmms-eval task.
# Written by `python -m mini_gemini.eval.digits`; run with --include_path <this folder> --tasks {TASK}.
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/digits.jsonl
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {EVAL_NEW_TOKENS}
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def items(n: int, seed: int = EVAL_SEED) -> list[dict]:
    """The first `n` held-out digit items: {"id", "scene", "question", "answer"} (`scene.image`: PIL RGB)."""
    from ..training.synthetic import scene
    out = []
    for i in range(n):
        sc = scene(seed, i)
        q, a = held_out_question(sc, seed, i, "digit")
        out.append({"id": f"{seed}-{i}", "scene": sc, "question": q, "answer": a})
    return out


def write_task(out: str | Path, n: int = 40, seed: int = EVAL_SEED) -> Path:
    """Write the task folder (see the module docstring); returns it."""
    out = Path(out)
    (out / "data" / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for it in items(n, seed):
        name = f"data/images/{it['id']}.png"
        it["scene"].image.save(out / name)
        rows.append({"id": it["id"], "image": name, "question": it["question"], "answer": it["answer"]})
    (out / "data" / "digits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copyfile(Path(__file__).with_name("lmms_tasks") / "digits_utils.py", out / "utils.py")
    (out / f"{TASK}.yaml").write_text(TASK_YAML)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mini_gemini.eval.digits", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder to write the task into")
    ap.add_argument("--n", type=int, default=40, help="how many items (default 40)")
    ap.add_argument("--seed", type=int, default=EVAL_SEED, help=f"held-out stream (default {EVAL_SEED})")
    args = ap.parse_args(argv)
    print(write_task(args.out, args.n, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

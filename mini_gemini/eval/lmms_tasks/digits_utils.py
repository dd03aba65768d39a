"""lmms-eval task functions of the demo model's digit questions (`mini_gemini.eval.digits` writes this file
next to the task's YAML as utils.py). Runs inside lmms-eval's own environment: standard library and Pillow only.

Scoring is the project's own (`mini_gemini.training.evaluate.is_right`): the answer, without surrounding spaces
and a final full stop, equals the expected digit, ignoring case.
"""
import os

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))


def doc_to_visual(doc):
    with Image.open(os.path.join(HERE, doc["image"])) as im:
        return [im.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    answer = results[0] if results else ""
    return {"accuracy": float(answer.strip().rstrip(".").lower() == doc["answer"].lower())}

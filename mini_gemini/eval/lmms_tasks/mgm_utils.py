"""Prompt functions for the paper's benchmarks as Mini-Gemini was evaluated (dvlab-research/MGM's
scripts/*/eval/*.sh, which use LLaVA's question files and scripts), for lmms-eval's task YAMLs in this folder.
Runs inside lmms-eval's own environment (tools/setup_lmms_eval.sh): standard library only.

The chat template (gemma for MGM-2B, vicuna_v1 for the Vicuna models, ...) and the image slot are not written
here: the endpoint applies the checkpoint's own template, as the official `--conv-mode` did.
"""
import math

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."


def textvqa_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """LLaVA's llava_textvqa_val_v051_ocr.jsonl prompt: the question as written, the dataset's OCR tokens, the
    short-answer instruction, one per line."""
    return f"{doc['question']}\nReference OCR token: {', '.join(doc['ocr_tokens'])}\n{SHORT_ANSWER}"


def _present(value) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return str(value).strip().lower() not in ("", "nan", "none")


def mmbench_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """LLaVA's model_vqa_mmbench with --single-pred-prompt: the hint (if any), the question, each option as
    "A. ...", then the letter instruction, one per line."""
    lines = ([doc["hint"]] if _present(doc.get("hint")) else []) + [doc["question"]]
    lines += [f"{letter}. {doc[letter]}" for letter in "ABCD" if _present(doc.get(letter))]
    return "\n".join(lines + [LETTER_ANSWER])


def mmvet_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """LLaVA's llava-mm-vet.jsonl prompt: the question alone."""
    return doc["question"]

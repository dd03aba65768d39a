"""Evaluation with a standard harness (lmms-eval) through the OpenAI-compatible endpoint.

- `lmms.py`: run lmms-eval (in its own environment, tools/setup_lmms_eval.sh) against `mgm-serve`, and the
  paper's table to compare with;
- `digits.py`: the bundled demo model's digit questions written as a local lmms-eval task (CI-sized check that
  the harness scores what the project's own evaluation scores);
- `lmms_tasks/`: lmms-eval task files for the paper's benchmarks, set up as the paper evaluated them.
"""

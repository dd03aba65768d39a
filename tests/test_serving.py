"""What a server sets once its engine is built (`mini_gemini.chat.serving.settle`): CPU threads by the model's size,
the loaded heap out of the collector's sight."""
import gc

import pytest
import torch

from mini_gemini.chat.engine import Engine
from mini_gemini.chat.serving import SMALL_MODEL_PARAMS, cpu_threads, model_size, settle
from mini_gemini.modeling.loading import load_pretrained
from mini_gemini.testing.tiny import build_tiny


@pytest.fixture
def two_threads(monkeypatch):
    """torch at two threads (as a fresh process on a 2-core machine), restored afterwards; OMP_NUM_THREADS unset; no
    frozen heap."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    gc.unfreeze()  # an earlier test's server may have frozen the heap: only settle() may freeze it here
    yield
    torch.set_num_threads(before)
    gc.unfreeze()


def test_model_size_counts_parameters_buffers_and_int8_tables_once(tiny_checkpoint):
    path = str(tiny_checkpoint("gemma"))
    fp32 = load_pretrained(path, device="cpu")
    params = {t.data_ptr(): t.numel() for t in fp32.parameters()}  # tied head and embedding: one storage
    buffers = {t.data_ptr(): t.numel() for t in fp32.buffers() if t.data_ptr() not in params}
    assert model_size(fp32) == sum(params.values()) + sum(buffers.values())
    int8 = load_pretrained(path, device="cpu", quantization="int8")
    # the int8 tables are buffers: the same weights are counted, plus one scale per row
    assert model_size(fp32) < model_size(int8) < model_size(fp32) * 1.1


def test_small_model_is_served_on_one_thread(two_threads):
    engine = Engine(build_tiny("vicuna"))
    assert model_size(engine.model) < SMALL_MODEL_PARAMS
    settle(engine)
    assert torch.get_num_threads() == 1
    assert gc.get_freeze_count() > 0  # what was loaded is out of the collector's sight


def test_real_sized_model_keeps_torchs_threads(two_threads):
    # the benchmark's speed model: CLIP at 336 px, ConvNeXt at 768 px, a 512-wide Llama (23.6M weights)
    from mini_gemini.bench_models import speed_model
    model = speed_model()
    assert model_size(model) > SMALL_MODEL_PARAMS
    assert cpu_threads(model) is None
    settle(Engine(model))
    assert torch.get_num_threads() == 2


def test_omp_num_threads_is_the_users_choice(two_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    engine = Engine(build_tiny("vicuna"))
    assert cpu_threads(engine.model) is None
    settle(engine)
    assert torch.get_num_threads() == 2

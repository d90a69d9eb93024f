"""The hf backend's KV budget: estimated from the model config, compared with the memory available
(or --kv-cache-memory); a request that cannot fit is a clear error, and a batch takes only the
sequences whose caches fit together."""
import pytest
import torch

from jupyter_llm.backends.hf import HFBackend, HFStepEngine, kv_bytes_per_token
from jupyter_llm.completions import build_requests
from jupyter_llm.errors import ParamError
from jupyter_llm.manager import EngineManager
from jupyter_llm.schema import SamplingParams
from tiny_models import tiny_llama_folder


def test_kv_bytes_per_token_from_the_config(tiny_llama, tiny_gpt2):
    from transformers import AutoConfig

    # 2 (K and V) x 2 layers x 2 KV heads x 16 dims x 4 bytes; GPT-2: 2 x 2 layers x 4 heads x 16 dims x 2 bytes
    assert kv_bytes_per_token(AutoConfig.from_pretrained(tiny_llama), torch.float32) == 512
    assert kv_bytes_per_token(AutoConfig.from_pretrained(tiny_gpt2), torch.float16) == 512


def test_a_request_larger_than_the_memory_available_is_refused_before_it_runs(tmp_path):
    # a context of a billion tokens: 16 samples of it would take 8 TB of KV cache
    backend = HFBackend(str(tiny_llama_folder(tmp_path / "huge", max_position_embeddings=10**9)))
    backend.load(progress=False)
    [request] = build_requests("Hello", SamplingParams(max_tokens=10**9 - 100, n=16))
    with pytest.raises(ParamError, match=r"^max_tokens x n: this request needs .* MiB of KV cache .* more than "
                                         r"the .* MiB this backend may use \(80% of the memory available on cpu\)"):
        backend.prepare(request)
    [small] = build_requests("Hello", SamplingParams(max_tokens=100, n=16))
    assert backend.prepare(small).prompt_token_ids


def test_kv_cache_memory_bounds_each_request_and_each_batch(tiny_llama, monkeypatch):
    batches = []
    prefill = HFStepEngine._prefill

    def recorded(self):
        logits = prefill(self)
        batches.append(len(self.rows))
        return logits

    monkeypatch.setattr(HFStepEngine, "_prefill", recorded)
    m = EngineManager()
    try:
        m.load("hf", str(tiny_llama), progress=False, kv_cache_memory="64KiB")  # 128 tokens of 512 bytes
        with pytest.raises(ParamError, match=r"needs 0.1 MiB of KV cache \(\d+ tokens of 512 bytes\), more than "
                                             r"the 0.1 MiB this backend may use \(--kv-cache-memory\)"):
            m.generate("Hello", SamplingParams(max_tokens=60, n=3))
        # each fits alone, two fit together: three prompts run as batches of two and one
        out = m.generate(["Hi", "Hi", "Hi"], SamplingParams(max_tokens=50, ignore_eos=True))
        assert [c.completion_tokens for c in out] == [50, 50, 50] and batches == [2, 1]
    finally:
        m.shutdown()

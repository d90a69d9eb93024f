"""The stored int8 model: the same layers and logits as the freshly quantized one, read without
building float32 weights; a damaged file is quantized again."""
from __future__ import annotations

import pytest
import torch

from jupyter_llm.backends.native import quant_cache
from jupyter_llm.backends.native.backend import NativeBackend
from jupyter_llm.backends.native.int8_linear import Int8Linear
from jupyter_llm.backends.native.loader import load_model
from jupyter_llm.backends.native.model_runner import prefill_logits
from jupyter_llm.backends.native.quant import quantize_int8


def test_int8_linear_round_trips_through_its_stored_parts():
    gen = torch.Generator().manual_seed(0)
    layer = Int8Linear(torch.randn(40, 24, generator=gen), torch.randn(40, generator=gen))
    weight, scales, bias = layer.int8_state()
    assert weight.dtype == torch.int8 and scales.dtype == torch.float64 and bias.shape == (40,)
    again = Int8Linear.from_int8(weight, scales, bias)
    x = torch.randn(3, 24, generator=gen)
    assert torch.equal(layer(x), again(x)) and (again.in_features, again.out_features) == (24, 40)


@pytest.mark.parametrize("kind", ["llama_gqa", "llama3_tied", "gpt2_tied"])
def test_stored_model_gives_the_quantized_models_logits(kind, tiny_hf, save_hf, tmp_path):
    model, config = load_model(save_hf(tiny_hf(kind)), dtype=torch.float32)
    quantize_int8(model, list(range(2, 60)))
    path = tmp_path / "int8" / "model.safetensors"
    quant_cache.save_int8(model, path)
    loaded = quant_cache.load_int8(config, path)
    assert sum(isinstance(m, Int8Linear) for m in loaded.modules()) == sum(
        isinstance(m, Int8Linear) for m in model.modules())
    ids = list(range(3, 20))
    assert torch.equal(prefill_logits(loaded, config, ids, num_logits=4), prefill_logits(model, config, ids,
                                                                                          num_logits=4))


def test_backend_reads_the_stored_model_on_the_next_load(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_LLM_CACHE", str(tmp_path / "cache"))
    first = NativeBackend(str(tiny_llama), quantization="int8", kv_cache_memory="1MiB")
    first.load(progress=False)
    path = quant_cache.cache_path(tiny_llama)
    assert path.is_file()

    def refuse(*args, **kwargs):
        raise AssertionError("quantized again although the int8 model was stored")

    monkeypatch.setattr(quant_cache, "quantize_int8", refuse)
    second = NativeBackend(str(tiny_llama), quantization="int8", kv_cache_memory="1MiB")
    second.load(progress=False)
    ids = list(range(5, 25))
    assert torch.equal(prefill_logits(first.model, first.model_config, ids),
                       prefill_logits(second.model, second.model_config, ids))

    monkeypatch.undo()
    monkeypatch.setenv("JUPYTER_LLM_CACHE", str(tmp_path / "cache"))
    path.write_bytes(b"not a safetensors file")
    third = NativeBackend(str(tiny_llama), quantization="int8", kv_cache_memory="1MiB")
    third.load(progress=False)  # quantizes again and stores a good file
    assert torch.equal(prefill_logits(first.model, first.model_config, ids),
                       prefill_logits(third.model, third.model_config, ids))
    assert quant_cache.load_int8(third.model_config, path) is not None

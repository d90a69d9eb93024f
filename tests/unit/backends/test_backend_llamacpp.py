"""The GGUF tokenizer behind the llamacpp backend, and the backend's option errors."""
from __future__ import annotations

import pytest

from jupyter_llm.backends.llamacpp.backend import LlamaCppBackend, LlamaCppOptions
from jupyter_llm.errors import BackendError, ParamError
from jupyter_llm.output import IncrementalDetokenizer
from jupyter_llm.schema import GenerationRequest

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def tokenizer(embedded_model):
    from jupyter_llm.tokenizers import load_gguf_tokenizer

    return load_gguf_tokenizer(str(embedded_model))


def test_encode_decode_round_trip_and_special_tokens(tokenizer):
    ids = tokenizer.encode("The capital of France is Paris.")
    assert tokenizer.decode(ids) == "The capital of France is Paris."
    assert tokenizer.encode("<|im_start|>", add_special_tokens=False) == [1]  # one special token
    assert tokenizer.decode([2]) == "" and tokenizer.decode([2], skip_special_tokens=False) == "<|im_end|>"


def test_end_of_sequence_ids(tokenizer):
    # SmolLM2's GGUF names <|im_end|> as EOS; the shared Tokenizer adds <|endoftext|>, as for transformers.
    assert tokenizer.eos_token_ids == frozenset({0, 2})


def test_chat_template_from_the_gguf(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    request = GenerationRequest(messages=[{"role": "user", "content": "Hi"}])
    assert tokenizer.prompt_ids(request) == tokenizer.encode(text, add_special_tokens=False)


def test_the_shared_incremental_detokenizer_handles_multibyte_text(tokenizer):
    text = "naïve café — 東京"
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(detok.add(i) for i in tokenizer.encode(text)) + detok.flush() == text


def test_options_from_strings():
    options = LlamaCppOptions.parse({"n_threads": "2", "n_ctx": "1024", "n_gpu_layers": "0"}, "llamacpp")
    assert (options.n_threads, options.n_ctx, options.n_gpu_layers) == (2, 1024, 0)
    with pytest.raises(ParamError, match="unknown option"):
        LlamaCppOptions.parse({"n_context": "1"}, "llamacpp")


def test_gpu_layers_on_a_cpu_build_are_refused_in_one_line(embedded_model, monkeypatch):
    import llama_cpp

    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: False)
    with pytest.raises(BackendError, match="n-gpu-layers needs llama-cpp-python built with GPU support"):
        LlamaCppBackend(n_gpu_layers="-1").load(progress=False)


def test_a_model_that_is_not_gguf_is_refused(tiny_llama):
    with pytest.raises(BackendError, match="reads .gguf files"):
        LlamaCppBackend(str(tiny_llama)).load(progress=False)


def test_capabilities_say_one_sequence_at_a_time():
    assert LlamaCppBackend.capabilities.batching == "none"

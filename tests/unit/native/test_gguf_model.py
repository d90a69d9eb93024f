"""The embedded SmolLM2 in the GGUF file's own blocks (the default format for it, or
--quantization gguf; gguf_loader.py): the float32 model's exact weights, float32's quality, and
answers that do not depend on the requests batched beside them, on speculation or on how the
prompt was split into steps."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from jupyter_llm.backends.native.backend import NativeBackend
from jupyter_llm.backends.native.block_quant import BlockEmbedding, BlockLinear
from jupyter_llm.backends.native.fused.ops import fused_ops
from jupyter_llm.backends.native.model_runner import prefill_logits
from jupyter_llm.errors import ParamError
from jupyter_llm.schema import SamplingParams
from manager_helpers import load_keeping_default

pytestmark = [pytest.mark.embedded, pytest.mark.skipif(fused_ops() is None, reason="fused ops not built")]

TEXT = ("Photosynthesis is the process by which green plants use sunlight to turn water and carbon dioxide "
        "into sugar and oxygen. It takes place in the chloroplasts of the leaves, where chlorophyll absorbs "
        "light. def mean(values):\n    return sum(values) / len(values)\n\nDear Anna, thank you for your "
        "letter; the garden is in bloom and we hope to see you in May.")


def perplexity(backend, ids: list[int]) -> float:
    logits = prefill_logits(backend.model, backend.model_config, ids, num_logits=len(ids))[:-1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    return math.exp(nll.item())


def test_gguf_format_loads_the_blocks_and_says_so(manager, embedded_native_gguf):
    backend = manager.get(embedded_native_gguf)
    assert backend.dtype == "gguf Q4_1/Q8_0 (float32)"
    assert manager.info(embedded_native_gguf).dtype == backend.dtype
    model = backend.model
    assert isinstance(model.embed_tokens, BlockEmbedding) and model.lm_head is model.embed_tokens.linear
    assert all(isinstance(layer.mlp.gate_up_proj, BlockLinear) for layer in model.layers)
    assert backend.engine.stats()["decode_ops"] == "fused"


def test_blocks_hold_exactly_the_float32_weights(manager, embedded_native_gguf, embedded_native):
    blocks, float32 = manager.get(embedded_native_gguf).model, manager.get(embedded_native).model
    for i in (0, 17, 29):
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            ours = blocks.layers[i].get_submodule(name).blocks().dequantize()
            assert torch.equal(ours, float32.layers[i].get_submodule(name).weight), (i, name)
        assert torch.equal(blocks.layers[i].input_layernorm.weight, float32.layers[i].input_layernorm.weight)
    assert torch.equal(blocks.lm_head.blocks().dequantize(), float32.embed_tokens.weight)


def test_quality_holds_against_float32(manager, embedded_native_gguf, embedded_native):
    ours, reference = manager.get(embedded_native_gguf), manager.get(embedded_native)
    ids = ours.tokenizer.encode(TEXT)
    ratio = perplexity(ours, ids) / perplexity(reference, ids)
    assert 0.97 < ratio < 1.03  # the quality bar: within 3% of float32
    # The second bar: as many right answers as float32 (greedy, first word).
    facts = {"The capital of Germany is": "berlin", "The capital of Spain is": "madrid",
             "The color of a clear sky is": "blue", "Two plus two equals": "four",
             "The month after January is": "february", "Ice is frozen": "water"}
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    right = [sum(c.text.strip().split(" ")[0].strip(".,").lower() == answer
                 for c, answer in zip(manager.generate(list(facts), params, backend=name), facts.values()))
             for name in (embedded_native_gguf, embedded_native)]
    assert right[0] == right[1] > 0


def test_blocks_are_the_default_for_the_embedded_file():
    default = NativeBackend(None, kv_cache_memory="16MiB")
    default.load(progress=False)
    assert default.dtype == "gguf Q4_1/Q8_0 (float32)"
    for forced in ({"dtype": "float32"}, {"quantization": "none"}):  # either option forces float32
        backend = NativeBackend(None, kv_cache_memory="16MiB", **forced)
        backend.load(progress=False)
        assert backend.dtype == "float32" and not any(isinstance(m, BlockLinear) for m in backend.model.modules())


def test_a_token_gets_the_same_logits_in_a_chunk_alone_or_beside_others(manager, embedded_native_gguf, engine_cls):
    """Every step computes a token's row alike: a prompt prefilled as one chunk, as chunks of
    3 beside another sequence's decodes, or token by token gives bitwise the same logits."""
    backend = manager.get(embedded_native_gguf)
    ids = backend.tokenizer.encode("The quick brown fox jumps over the lazy dog, and then it")
    other = backend.tokenizer.encode("Once upon a time")
    runs = []
    for chunk in (len(ids), 3, 1):
        engine = engine_cls(backend.model, backend.model_config, num_blocks=16, block_size=4, prefix_caching=False)
        engine.add(0, ids)
        engine.add(1, other)
        engine.step({1: len(other)})
        rows = []
        while engine.computed[0] < len(ids):
            n = min(chunk, len(ids) - engine.computed[0])
            engine.tokens[1].append(7)
            rows.append(engine.step({0: n, 1: 1})[0])  # a decode of sequence 1 in every step
        runs.append(torch.cat(rows))
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("speculative", [{"speculative": "ngram", "num_speculative_tokens": 4},
                                         {"speculative": "draft", "num_speculative_tokens": 3,
                                          "draft_quantization": "int8"}])  # a gguf copy keeps its blocks
def test_speculation_keeps_greedy_answers_token_for_token(manager, embedded_native_gguf, speculative):
    prompts = ["Repeat after me: red green blue, red green blue, red green blue,",
               "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return"]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    plain = [c.token_ids for c in manager.generate(prompts, params, backend=embedded_native_gguf)]
    name = load_keeping_default(manager, "native", name="gguf-speculative", progress=False,
                                kv_cache_memory="32MiB", max_num_seqs=4, **speculative)
    try:
        assert manager.get(name).dtype == "gguf Q4_1/Q8_0 (float32)"
        assert [c.token_ids for c in manager.generate(prompts, params, backend=name)] == plain
        stats = manager.get(name).engine.stats()
        if speculative["speculative"] == "draft":  # the draft is the target's copy: it guesses every token
            assert stats["spec_acceptance_rate"] == 1.0
    finally:
        manager.unload(name)


def test_answers_do_not_depend_on_the_batch(manager, embedded_native_gguf):
    prompts = ["Once upon a time,", "def fibonacci(n):", "The three primary colors are",
               "Q: What is 12 times 7?\nA:", "Dear team, I am writing to let you know that"]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    alone = [manager.generate(p, params, backend=embedded_native_gguf)[0].token_ids for p in prompts]
    together = [c.token_ids for c in manager.generate(prompts, params, backend=embedded_native_gguf)]
    assert together == alone


def test_gguf_format_needs_a_gguf_file(tiny_llama):
    with pytest.raises(ParamError, match="needs a .gguf model file"):
        NativeBackend(str(tiny_llama), quantization="gguf", kv_cache_memory="1MiB").load(progress=False)
    with pytest.raises(ParamError, match="CPU in float32"):
        NativeBackend(None, quantization="gguf", dtype="bfloat16").load(progress=False)


def test_blocks_are_stored_once_and_read_back_as_they_were(manager, embedded_native_gguf, tmp_path):
    """gguf-py's reader takes seconds over the tokenizer's metadata: a load stores the blocks in
    the model cache, and a later load reads them back bitwise, tied embedding included."""
    from jupyter_llm.backends.native import gguf_loader
    from jupyter_llm.model_files import embedded_gguf_path

    backend = manager.get(embedded_native_gguf)
    assert gguf_loader.cache_path(Path(embedded_gguf_path())).exists()  # the fixture's load stored them
    fresh = gguf_loader.read_gguf_blocks(Path(embedded_gguf_path()), backend.model_config)
    gguf_loader.write_cached_blocks(fresh, tmp_path / "blocks.safetensors")
    back = gguf_loader.read_cached_blocks(tmp_path / "blocks.safetensors", backend.model_config)
    assert isinstance(back.embed_tokens, BlockEmbedding) and back.lm_head is back.embed_tokens.linear
    ours, theirs = fresh.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ids = backend.tokenizer.encode(TEXT)[:40]
    config = backend.model_config
    assert torch.equal(prefill_logits(back, config, ids), prefill_logits(fresh, config, ids))

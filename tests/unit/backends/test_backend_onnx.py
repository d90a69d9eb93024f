"""The onnx backend: export and cache, loading a GenAI folder, options, static batching, the
padding and end-token details of the generator, and greedy parity with transformers on the
embedded model in fp32 (its exports go to the user cache, so a second run is fast)."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from jupyter_llm.errors import BackendError, ParamError
from jupyter_llm.manager import build_requests
from jupyter_llm.schema import GenerationRequest, SamplingParams

pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-exports")


@pytest.fixture(scope="module")
def tiny_fp32(manager, tiny_llama, export_dir):
    manager.load("onnx", str(tiny_llama), name="unit-onnx", progress=False, precision="fp32",
                 export_dir=str(export_dir), threads=2)
    yield "unit-onnx"
    manager.unload("unit-onnx")


def greedy_reference(model, prompt_ids: list[int], max_new_tokens: int, eos: list[int], ignore_eos: bool) -> list[int]:
    """transformers' greedy tokens; with ignore_eos, end tokens are masked (min_new_tokens), as ours."""
    mask = torch.ones(1, len(prompt_ids), dtype=torch.long)
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=mask, do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens if ignore_eos else 0,
                             pad_token_id=eos[0], eos_token_id=eos)
    new = out[0, len(prompt_ids):].tolist()
    ends = [i for i, t in enumerate(new) if t in eos]
    return new[:ends[0]] if ends and not ignore_eos else new


def test_listed_as_loadable(manager):
    from jupyter_llm.backends import available_backends

    [row] = [b for b in available_backends() if b.kind == "onnx"]
    assert row.available, row.reason


@pytest.mark.parametrize("options, error, message", [
    ({"precision": "fp8"}, ParamError, "unknown precision 'fp8'; accepted: fp32, int8, int4"),
    ({"execution_provider": "tpu"}, ParamError, "accepted: cpu, cuda"),
    ({"max_num_seqs": "many"}, ParamError, "--max-num-seqs expects int"),
])
def test_bad_options_are_refused_before_any_export(manager, tiny_llama, options, error, message):
    with pytest.raises(error, match=message):
        manager.load("onnx", str(tiny_llama), name="bad", progress=False, **options)


def test_cuda_without_a_cuda_build_says_how_to_get_one(manager, tiny_llama):
    import onnxruntime_genai as og

    if og.is_cuda_available():
        pytest.skip("this machine has the CUDA build")
    with pytest.raises(BackendError, match="pip install onnxruntime-genai-cuda"):
        manager.load("onnx", str(tiny_llama), name="bad", progress=False, execution_provider="cuda")


def test_the_export_is_cached_by_source_and_precision(manager, tiny_fp32, tiny_llama, export_dir):
    backend = manager.get(tiny_fp32)
    assert backend.folder.parent == export_dir and backend.folder.name.endswith("-fp32-cpu")
    assert backend.dtype == "fp32" and backend.device == "cpu"
    stamp = (backend.folder / "model.onnx").stat().st_mtime_ns
    start = time.monotonic()
    manager.load("onnx", str(tiny_llama), name="again", progress=False, precision="fp32", export_dir=str(export_dir))
    try:
        assert time.monotonic() - start < 5
        assert manager.get("again").folder == backend.folder
        assert (backend.folder / "model.onnx").stat().st_mtime_ns == stamp
    finally:
        manager.unload("again")


def test_a_genai_folder_loads_as_it_is(manager, tiny_fp32):
    folder = manager.get(tiny_fp32).folder
    manager.load("onnx", str(folder), name="folder", progress=False)
    try:
        backend = manager.get("folder")
        assert backend.model_name == folder.name and backend.dtype == "fp32"  # from our export's metadata
        same = [manager.generate("Hello", GREEDY, backend=name)[0].token_ids for name in (tiny_fp32, "folder")]
        assert same[0] == same[1]
    finally:
        manager.unload("folder")
    with pytest.raises(ParamError, match="--precision applies only when exporting"):
        manager.load("onnx", str(folder), name="folder", progress=False, precision="int4")


def test_a_failed_export_shows_the_builder_output(manager, tiny_gpt2, export_dir):
    with pytest.raises(BackendError, match="model builder failed(.|\n)*not currently supported"):
        manager.load("onnx", str(tiny_gpt2), name="gpt2", progress=False, precision="fp32", export_dir=str(export_dir))


def test_prompt_ending_in_the_pad_token_matches_transformers(manager, tiny_fp32, tiny_llama):
    """The generator would mask a real last token equal to the pad id; we pad with -1 instead."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    pad = 0  # the tiny llama's pad, EOS and <|endoftext|>
    prompts = [[40, 50, 60, pad], [70, pad, 80, 90, 100, pad, pad]]
    expected = [greedy_reference(model, ids, 8, [pad], ignore_eos=True) for ids in prompts]
    requests = [GenerationRequest(prompt_token_ids=ids, params=GREEDY) for ids in prompts]

    async def run_together() -> list[list[int]]:
        tokens: list[list[int]] = [[] for _ in requests]
        async for event in manager.astream(requests, backend=tiny_fp32):
            tokens[event.prompt_index] += event.token_ids
        return tokens

    assert asyncio.run(run_together()) == expected


def test_a_request_arriving_during_a_batch_waits_for_the_next_one(manager, tiny_fp32):
    backend = manager.get(tiny_fp32)
    first = manager.stream("Hello", SamplingParams(max_tokens=400, temperature=0, ignore_eos=True), backend=tiny_fp32)
    next(first)
    second = manager.stream("Once", GREEDY, backend=tiny_fp32)
    deadline = time.time() + 5
    while backend.stats()["waiting"] != 1 and time.time() < deadline:
        time.sleep(0.01)
    stats = backend.stats()
    assert stats["running"] == 1 and stats["waiting"] == 1 and backend.capabilities.batching == "static"
    first.cancel()
    list(first)
    assert len([t for e in second for t in e.token_ids]) == 8
    assert backend.engine.generator is None and backend.stats()["batch_rows"] == 0  # the KV cache is freed


def test_magic_options_arrive_as_strings(shell, manager, tiny_llama, tiny_fp32, export_dir):
    shell.run_cell(f"%llm_backend onnx {tiny_llama} --name magic-onnx --precision fp32 --export-dir {export_dir} "
                   f"--max-num-seqs 4 --threads 1")
    try:
        backend = manager.get("magic-onnx")
        assert backend.engine.max_num_seqs == 4 and backend.folder == manager.get(tiny_fp32).folder
    finally:
        manager.unload("magic-onnx")


@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_fp32_greedy_equals_transformers(manager, embedded_hf):
    """fp32 export of the embedded SmolLM2: 32 greedy tokens equal transformers', alone and batched;
    a chat answer that ends early checks ignore_eos (end tokens masked, as min_new_tokens does)."""
    hf = manager.get(embedded_hf)
    eos = sorted(hf.tokenizer.eos_token_ids)
    cases = [(["The capital of France is", "Once upon a time,", "def fibonacci(n):"], False),
             ([[{"role": "user", "content": "Say OK."}]], True)]
    expected = [[greedy_reference(hf.hf_model, hf.tokenizer.prompt_ids(r), 32, eos, ignore_eos)
                 for r in build_requests(prompts)] for prompts, ignore_eos in cases]
    manager.load("onnx", name="embedded-onnx-fp32", precision="fp32", progress=False)
    try:
        for (prompts, ignore_eos), wanted in zip(cases, expected):
            params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=ignore_eos)
            alone = [manager.generate([p], params, backend="embedded-onnx-fp32")[0].token_ids for p in prompts]
            together = [c.token_ids for c in manager.generate(prompts, params, backend="embedded-onnx-fp32")]
            assert alone == wanted and together == wanted
    finally:
        manager.unload("embedded-onnx-fp32")

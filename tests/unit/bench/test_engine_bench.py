"""benchmarks/engine_bench.py without the embedded model: quality scoring, ratios, the table,
option parsing, and the quality path on tiny native and transformers
engines (which must agree)."""
from __future__ import annotations

import math

import engine_bench as eb
import pytest


def test_exact_match_scores_the_first_word():
    assert eb.first_word(" Paris. It is") == "paris" and eb.first_word("...") == ""
    assert eb.first_word("\n\nGeorge Washington") == "george"
    assert eb.exact_matches([" Paris.", " capital of France.", "TOKYO!"], ["Paris", "Paris", "Tokyo"]) == 2
    with pytest.raises(ValueError):
        eb.exact_matches(["Paris"], ["Paris", "Rome"])
    assert eb.until_eos([5, 6, 2, 7], frozenset({0, 2})) == [5, 6] and eb.until_eos([2], frozenset({2})) == []


def test_perplexity_from_logits():
    import numpy as np
    import torch

    ids = [3, 1, 4, 1, 5]
    assert eb.perplexity(eb.token_logprobs(np.zeros((4, 7)), ids)) == pytest.approx(7.0)  # uniform over 7
    logits = np.full((4, 7), -1e9)
    logits[np.arange(4), ids[1:]] = 0.0  # certain of every next token
    assert eb.perplexity(eb.token_logprobs(logits, ids)) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 7)).astype(np.float32) * 30  # large values: the log-softmax must be stable
    expected = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), -1)[range(4), ids[1:]]
    assert eb.token_logprobs(logits, ids) == pytest.approx(expected.numpy())
    with pytest.raises(ValueError, match="5 rows of logits for 5 tokens"):
        eb.token_logprobs(np.zeros((5, 7)), ids)
    assert math.isnan(eb.perplexity([]))


def test_ratios_skip_engines_that_did_not_run():
    sizes = eb.Sizes()
    summary = {"native-int8": {"single_decode_tok_s": 40.0, "batch_tok_s": 100.0, "perplexity": 14.0},
               "onnx-int8": {"single_decode_tok_s": 30.0, "batch_tok_s": 80.0},
               "onnx-int4": {"single_decode_tok_s": 35.0, "perplexity": 15.4},
               "onnx-fp32": {"perplexity": 14.0},
               "native-gguf": {"prefill_tok_s": 150.0, "single_decode_tok_s": 45.0},
               "llama.cpp": {"prefill_tok_s": 100.0}}
    got = {label: (value, target) for label, value, target in eb.ratios(summary, sizes)}
    assert got["prefill: native gguf / llama.cpp"] == (pytest.approx(1.5), 2.0)  # issue 16's bar
    assert got["single: native gguf / llama.cpp"] == (None, 1.0)  # llama.cpp's single stream did not run
    assert got["single: onnx int8 / native int8"] == (pytest.approx(0.75), None)
    assert got["batch 16: onnx int8 / native int8"] == (pytest.approx(0.8), None)
    assert got["perplexity: onnx int4 / onnx fp32"] == (pytest.approx(1.1), None)
    assert got["single: onnx int4 / llama.cpp"] == (None, None)  # llama.cpp's single stream did not run
    assert got["uniform: native int8 / transformers"] == (None, 2.5)
    assert eb.ratio(1.0, 0.0) is None and eb.ratio(float("nan"), 1.0) is None


def report(summary: dict, quick: bool = True) -> dict:
    sizes = eb.Sizes.quick() if quick else eb.Sizes()
    env = {"cpu": "test cpu", "cores": 2, "torch": "t", "transformers": "tf", "llama_cpp": "l",
           "onnxruntime_genai": "0.18.0", "commit": "abc"}
    out = {"date": "2026-01-01", "quick": quick, "threads": 2, "sizes": eb.asdict(sizes), "environment": env,
           "summary": summary}
    out["ratios"] = eb.ratios(summary, sizes)
    return out


def test_markdown_table_has_the_onnx_columns_and_only_the_rows_that_ran():
    summary = {"native-fp32": {"batch_tok_s": 50.0, "single_decode_tok_s": 17.0, "exact_match": 9,
                               "perplexity": 13.771},
               "onnx-int4": {"batch_tok_s": 99.24, "single_decode_tok_s": 33.1, "exact_match": 7,
                             "perplexity": float("nan")}}
    text = eb.markdown(report(summary))
    lines = text.splitlines()
    assert "| metric | native-fp32 | onnx-int4 |" in lines
    assert "| batch 4x12: output tok/s | 50.0 | 99.2 |" in lines
    assert "| single stream: decode tok/s | 17.0 | 33.1 |" in lines
    assert "| exact match, factual completions | 9/12 | 7/12 |" in lines
    assert "| perplexity, fixed text | 13.77 | — |" in lines
    # Scenarios that did not run leave no empty rows; ratios of engines that did not run are left out.
    assert not [line for line in lines if line.startswith(("| uniform", "| mixed", "| peak", "| TTFT"))]
    assert "Memory:" not in text and "targets below" not in text
    assert "| ratio | measured | target |" not in text
    assert "onnxruntime-genai 0.18.0" in text and "Quality, once per engine" in text
    assert "onnx batches statically (max_num_seqs 8" in text and "transformers serves" not in text

    summary["native-int8"] = {"uniform_tok_s": 186.0, "single_decode_tok_s": 43.0, "peak_mib": 1905.0, "load_s": 3.04}
    summary["native-fp32"]["uniform_tok_s"] = 45.8
    text = eb.markdown(report(summary))
    assert "| uniform 8x12: output tok/s | 45.8 | — | 186.0 |" in text
    assert "| single: native int8 / native fp32 | 2.53 ✓ | ≥ 2 |" in text
    assert "| peak resident memory, alone (MiB) | — | — | 1905 |" in text
    assert "| load, in the benchmark process (s) | — | — | 3.0 |" in text


def test_option_lists():
    assert eb.parse_list("onnx-int4, native-fp32,onnx-int4", eb.ENGINES, "engine") == ["onnx-int4", "native-fp32"]
    assert eb.parse_list(None, eb.SCENARIOS, "scenario") == list(eb.SCENARIOS)
    with pytest.raises(SystemExit, match="unknown engine 'onnx-int2'"):
        eb.parse_list("onnx-int2", eb.ENGINES, "engine")
    with pytest.raises(SystemExit, match="unknown scenario"):
        eb.parse_list(",", eb.SCENARIOS, "scenario")
    assert eb.installed("native-fp32")
    assert eb.Sizes().largest_batch() == 32 and eb.Sizes(uniform_requests=8, batch_requests=12).largest_batch() == 16


@pytest.mark.slow
def test_quality_agrees_between_native_and_transformers_on_a_tiny_model(tiny_llama):
    import torch

    from jupyter_llm.tokenizers import load_tokenizer

    threads = torch.get_num_threads()
    native = eb.NativeEngine("bench-tiny-native", 1, None, "8MiB", model=str(tiny_llama))
    try:
        hf = eb.TransformersEngine(threads, folder=str(tiny_llama))
        tokenizer = load_tokenizer(str(tiny_llama))
        ids = tokenizer.encode(eb.PARAGRAPH)[:60]
        assert native.next_token_logits(ids) == pytest.approx(hf.next_token_logits(ids), abs=1e-4)
        prompts = [tokenizer.encode(p) for p, _ in eb.FACTS[:3]]
        assert native.greedy(prompts, 4, tokenizer.eos_token_ids) == hf.greedy(prompts, 4, tokenizer.eos_token_ids)
        quality = eb.measure_quality({native.name: native, hf.name: hf}, say=lambda *a, **k: None, tokenizer=tokenizer,
                                     text=eb.PARAGRAPH[:200])  # the tiny model's context is 512 tokens
    finally:
        native.close()
    ours, theirs = quality["bench-tiny-native"], quality["transformers"]
    assert ours["exact_match"] == theirs["exact_match"] and ours["completions"] == theirs["completions"]
    assert ours["perplexity"] == pytest.approx(theirs["perplexity"], rel=1e-4)
    assert ours["perplexity"] > 1 and theirs["asked"] == len(eb.FACTS)

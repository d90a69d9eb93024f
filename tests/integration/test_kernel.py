"""The magics in a real kernel: streaming into the cell, an interrupt that cancels the
generation and keeps what was generated, and the next request still working."""
from __future__ import annotations

import pytest

from kernel_helpers import Kernel


@pytest.fixture(scope="module")
def kernel(tiny_llama):
    k = Kernel()
    k.run("%load_ext jupyter_llm")
    loaded = k.run(f"%llm_backend hf {tiny_llama} --name tiny")
    assert "loaded" in loaded.text, loaded.text
    yield k
    k.shutdown()


def test_tokens_stream_into_the_cell_through_display_updates(kernel):
    result = kernel.run("%%generate --max-tokens 400 --ignore-eos --temperature 1 --seed 0\nHello")
    updates = [m for m in result.outputs if m["msg_type"] == "update_display_data"]
    assert len(updates) >= 2, "the answer should arrive in several display updates"
    first = next(m for m in result.outputs if m["msg_type"] == "display_data")
    meta = first["content"]["metadata"]["application/vnd.jupyter-llm+json"]
    assert meta["backend"] == "hf" and meta["params"]["max_tokens"] == 400
    assert "400 tokens" in result.text and not result.errors


def test_interrupt_cancels_keeps_partial_output_and_next_request_works(kernel):
    seen = {"updates": 0}

    def on_output(msg):
        if msg["msg_type"] == "update_display_data":
            seen["updates"] += 1
            if seen["updates"] == 3:
                kernel.interrupt()

    result = kernel.run("%%generate --max-tokens 100000 --ignore-eos --temperature 1 --seed 1 -o partial\n"
                        "Once upon a time", on_output=on_output, timeout=120)
    assert seen["updates"] >= 3
    assert "interrupted: generation cancelled, partial output kept" in result.text
    check = kernel.run("print(partial[0].finish_reason, len(partial[0].token_ids) > 0, len(partial[0].text) > 0)")
    assert check.text.strip() == "cancelled True True"
    stats = kernel.run("import jupyter_llm; print(jupyter_llm.get_manager().get('tiny').stats()['running'])")
    assert stats.text.strip() == "0"
    after = kernel.run("%%generate --max-tokens 5 --ignore-eos\nHello")
    assert "5 tokens" in after.text and not after.errors


def test_usage_errors_are_one_line(kernel):
    result = kernel.run("%%generate --temperature -1\nHello")
    assert result.reply["status"] == "error" and result.reply["ename"] == "UsageError"
    assert result.reply["traceback"] == []
    assert result.text.strip() == "UsageError: temperature must be >= 0 (0 = greedy), got -1.0"

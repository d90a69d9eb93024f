"""`jupyter-llm serve` as a shell user runs it: keys, graceful shutdown on SIGINT and SIGTERM,
and one-line errors."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading

import httpx
import openai
import pytest

from server_helpers import sse_data
from server_processes import cli_server

pytestmark = pytest.mark.slow


def tiny_args(tiny_llama, *extra: str) -> list[str]:
    # one compute thread: on a busy machine two threads can stall each other at every step
    return ["--backend", "hf", "--model", str(tiny_llama), "--name", "tiny", "--port", "0", "--threads", "1", *extra]


def test_api_key_from_the_environment(tiny_llama):
    with cli_server(tiny_args(tiny_llama, "--api-key-env", "TEST_LLM_KEY"), env={"TEST_LLM_KEY": "sk-test"}) as s:
        banner = "".join(s.stdout)
        assert "Bearer $TEST_LLM_KEY" in banner and "sk-test" not in banner
        with openai.OpenAI(base_url=s.url + "/v1", api_key="sk-wrong", max_retries=0) as wrong:
            with pytest.raises(openai.AuthenticationError) as denied:
                wrong.models.list()
            assert denied.value.body["code"] == "invalid_api_key"
        with openai.OpenAI(base_url=s.url + "/v1", api_key="sk-test", max_retries=0) as right:
            assert right.completions.create(model="tiny", prompt="Hi", max_tokens=2).usage.completion_tokens >= 1


def test_backend_options_reach_the_served_backend(tiny_llama):
    # a free --key value word and a --backend-option item; --api-key stays the server's own flag
    args = tiny_args(tiny_llama, "--max-model-len", "96", "--backend-option", "max_num_seqs=2", "--api-key", "sk-a")
    with cli_server(args) as server:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="sk-a", max_retries=0) as client:
            [card] = client.models.list().data
        assert card.model_extra["max_model_len"] == 96


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_in_flight_requests_then_exits_cleanly(tiny_llama, sig):
    # the native engine batches continuously: both requests run at once, whatever their timing
    args = ["--backend", "native", "--model", str(tiny_llama), "--name", "tiny", "--port", "0", "--threads", "1",
            "--backend-option", "kv_cache_memory=4MiB"]
    with cli_server(args) as server:
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 40, "ignore_eos": True}
        results = {}
        whole = threading.Thread(target=lambda: results.update(
            whole=httpx.post(server.url + "/v1/completions", json=body, timeout=60)))
        whole.start()
        streaming = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", server.url + "/v1/completions", json=streaming, timeout=60) as response:
            lines = response.iter_lines()
            first = next(lines)  # the stream is in flight: now stop the server
            code = server.stop(sig)
            events = sse_data([first, *lines])
        whole.join(60)
    assert code == 0, "".join(server.stderr)[-2000:]
    assert results["whole"].status_code == 200, results["whole"].text
    assert results["whole"].json()["usage"]["completion_tokens"] == 40
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 40
    assert "Traceback" not in "".join(server.stderr)


def test_a_taken_port_and_bad_options_are_one_line_errors(tiny_llama):
    with cli_server(tiny_args(tiny_llama)) as server:
        port = server.url.rsplit(":", 1)[1]
        taken = subprocess.run([sys.executable, "-m", "jupyter_llm.cli", "serve", "--backend", "hf", "--model",
                                str(tiny_llama), "--port", port],
                               capture_output=True, text=True, timeout=120, check=False)
    assert taken.returncode == 2
    assert taken.stderr.strip().splitlines()[-1] == (
        f"jupyter-llm: error: cannot listen on 127.0.0.1:{port}: it is already in use; "
        f"pick another --port (0 picks a free one)")
    bad = subprocess.run([sys.executable, "-m", "jupyter_llm.cli", "serve", "--rate-limit", "often"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("jupyter-llm: error: --rate-limit")

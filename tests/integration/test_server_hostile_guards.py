"""The guards of a real `jupyter-llm serve` against hostile clients (issue 19): the app mounted
under a prefix (item 4), Host names and the bodies a web page can send without a preflight (5),
many messages and huge prompts (6), X-Forwarded-For and refused keys against the rate limit (7),
keys that are not ASCII or not the right length (10), and a prefix cache kept apart per key (11).
Each case asserts the refusal, that a normal request still answers (and /health within a
second), and that afterwards nothing runs and the KV cache is back to where it was."""
from __future__ import annotations

import json
import random
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from hostile_clients import assert_health_fast, assert_serves_meanwhile, metrics, raw_exchange, settled
from server_helpers import assert_openai_error, wait_until
from server_processes import cli_server
from tiny_models import tiny_llama_folder

pytestmark = pytest.mark.slow

MOUNTED_SERVER = Path(__file__).parents[1] / "helpers" / "mounted_server.py"
KEY = "sk-café-ключ-🔑"  # not ASCII: sent as its UTF-8 bytes
OTHER_KEY = "sk-plain"
RATE = 10  # requests per second (and the burst) of the keyed server


def native_args(model: Path, *extra: str) -> list[str]:
    return ["--backend", "native", "--model", str(model), "--name", "tiny", "--port", "0", "--threads", "1",
            "--backend-option", "kv_cache_memory=32MiB", "--backend-option", "fused_ops=false", *extra]


@pytest.fixture(scope="module")
def open_server(tiny_llama):
    """No key (the default), bound to loopback, one more Host name allowed."""
    with cli_server(native_args(tiny_llama, "--allowed-host", "llm.example")) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """Two keys, one of them not ASCII (from the environment), and a rate limit; a 4,096-token
    context, so that a prompt is long enough for its prefix-cache hit to show in its latency."""
    model = tiny_llama_folder(tmp_path_factory.mktemp("tiny-llama-4k"), max_position_embeddings=4096)
    args = native_args(model, "--api-key-env", "HOSTILE_TEST_KEY", "--api-key", OTHER_KEY,
                       "--rate-limit", f"{RATE}/s")
    with cli_server(args, env={"HOSTILE_TEST_KEY": KEY}) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def bearer(key: str) -> dict[str, bytes]:
    return {"Authorization": f"Bearer {key}".encode()}  # httpx sends str header values as ASCII only


def port_of(client: httpx.Client) -> int:
    return urlsplit(str(client.base_url)).port


def test_keys_and_rate_limits_hold_when_the_app_is_mounted_under_a_prefix(tiny_llama):
    args = ["--model", str(tiny_llama), "--prefix", "/llm", "--api-key", "sk-mounted", "--rate-limit", "2"]
    with cli_server(args, command=[sys.executable, str(MOUNTED_SERVER)]) as server, \
            httpx.Client(base_url=server.url + "/llm", timeout=60) as client:
        before = metrics(client)
        assert_health_fast(client)  # /llm/health: no key, no rate limit
        body = {"prompt": "Hi", "max_tokens": 2}
        assert_openai_error(client.post("/v1/completions", json=body), 401, code="invalid_api_key")
        assert_openai_error(client.get("/v1/models", headers=bearer("sk-wrong")), 401, code="invalid_api_key")
        # the address's bucket (2 a second) is spent by the refusals: the limiter runs under the mount too
        limited = client.post("/v1/completions", json=body)
        assert_openai_error(limited, 429, code="rate_limit_exceeded")
        assert int(limited.headers["retry-after"]) >= 1
        key = bearer("sk-mounted")
        assert_serves_meanwhile(client, headers=key)  # the key's own bucket
        assert client.get("/v1/models", headers=key).json()["data"][0]["id"] == "tiny"
        assert_openai_error(client.get("/v1/models", headers=key), 429, code="rate_limit_exceeded")
        assert httpx.get(server.url + "/", timeout=30).text == "the host service"  # beside the mount
        assert wait_until(lambda: settled(client, before), timeout=10), metrics(client)


def test_only_loopback_and_allowed_host_names_are_answered(open_server):
    """DNS rebinding: a page at evil.example whose name resolves to 127.0.0.1 sends its own Host."""
    url, port, before = str(open_server.base_url), port_of(open_server), metrics(open_server)
    body = {"prompt": "Hi", "max_tokens": 2}
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", "localhost.evil.example"):
        for method, path, payload in (("GET", "/health", None), ("GET", "/v1/models", None),
                                      ("POST", "/v1/completions", body)):
            status, _, answer = raw_exchange(url, method, path, payload, {"Host": host})
            assert status == 403, (host, path, answer)
            assert json.loads(answer)["error"]["code"] == "host_not_allowed"
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", f"LLM.example:{port}", "llm.example"):
        status, _, answer = raw_exchange(url, "POST", "/v1/completions", body, {"Host": host})
        assert status == 200, (host, answer)
    assert_serves_meanwhile(open_server)
    assert wait_until(lambda: settled(open_server, before), timeout=10), metrics(open_server)


def test_bodies_a_page_can_send_without_a_preflight_never_start_a_generation(open_server):
    url, before = str(open_server.base_url), metrics(open_server)
    tokens = prompt_tokens(open_server)
    payload = json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()
    for content_type in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                         "multipart/form-data; boundary=x", None):
        status, _, answer = raw_exchange(url, "POST", "/v1/completions", payload, {"Content-Type": content_type})
        assert status == 400, (content_type, answer)
        assert json.loads(answer)["error"]["code"] == "invalid_json"
    assert prompt_tokens(open_server) == tokens  # nothing was generated
    assert_serves_meanwhile(open_server)
    assert wait_until(lambda: settled(open_server, before), timeout=10), metrics(open_server)


def prompt_tokens(client: httpx.Client) -> float:
    from server_helpers import metric

    return metric(client.get("/metrics").text, "jupyter_llm:prompt_tokens_total", model_name="tiny") or 0.0


def test_many_messages_and_huge_prompts_are_refused_before_any_work(open_server):
    before = metrics(open_server)
    tokens = prompt_tokens(open_server)
    # the defaults: --max-messages 2048, --max-prompt-chars 500000 (empty messages: rendered and
    # tokenized, they cost work too)
    refusals = [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": ""}] * 2049}, "messages",
         "invalid_value", "at most 2048 items"),
        ("/v1/completions", {"prompt": "x" * 500_001}, "prompt", "string_above_max_length", "at most 500000"),
        ("/v1/completions", {"prompt": ["x" * 250_000, "y" * 250_001]}, "prompt", "string_above_max_length",
         "at most 500000"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 250_001}] * 2}, "messages",
         "string_above_max_length", "at most 500000"),
    ]
    for path, body, param, code, says in refusals:
        started = time.monotonic()
        error = assert_openai_error(open_server.post(path, json={**body, "max_tokens": 2}), 400, param=param,
                                    code=code)
        assert says in error["message"], error
        assert time.monotonic() - started < 2.0
    assert prompt_tokens(open_server) == tokens

    # prompts at the bound are tokenized off the event loop (then refused: longer than the context)
    at_bound = {"prompt": "Paris is " * 55_555, "max_tokens": 2}  # 499,995 characters
    answers: list[httpx.Response] = []

    def send() -> None:
        for _ in range(2):
            answers.append(httpx.post(f"{open_server.base_url}/v1/completions", json=at_bound, timeout=60))

    threads = [threading.Thread(target=send) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(0.1)
    assert_serves_meanwhile(open_server)
    while any(thread.is_alive() for thread in threads) and len(answers) < 3:
        assert_serves_meanwhile(open_server)
    for thread in threads:
        thread.join(60)
    assert len(answers) == 4
    for answer in answers:
        assert_openai_error(answer, 400, param="prompt", code="context_length_exceeded")
    assert wait_until(lambda: settled(open_server, before), timeout=10), metrics(open_server)


def test_a_key_that_is_not_ascii_matches_and_keys_of_other_lengths_do_not(keyed):
    url, before = str(keyed.base_url), metrics(keyed)
    body = {"prompt": "Hi", "max_tokens": 2, "ignore_eos": True}
    status, _, answer = raw_exchange(url, "POST", "/v1/completions", body, {"Authorization": f"Bearer {KEY}"})
    assert status == 200, answer
    assert json.loads(answer)["usage"]["completion_tokens"] == 2
    # the key's UTF-8 bytes read as Latin-1 and encoded again (what the server used to compare), a
    # key one character short or long, twice as long, one character, none
    mojibake = KEY.encode().decode("latin-1")
    for wrong in (mojibake, KEY[:-1], KEY + "x", KEY * 2, "s", ""):
        status, _, answer = raw_exchange(url, "POST", "/v1/completions", body, {"Authorization": f"Bearer {wrong}"})
        assert status == 401, (wrong, answer)
        assert json.loads(answer)["error"]["code"] == "invalid_api_key"
    assert_serves_meanwhile(keyed, headers=bearer(OTHER_KEY))
    assert wait_until(lambda: settled(keyed, before), timeout=10), metrics(keyed)


def test_the_prefix_cache_is_kept_apart_per_key(keyed):
    """A prompt another key computed is cold for this one, even under the same cache_salt: time to
    first token tells a key nothing about another key's prompts."""
    before = metrics(keyed)

    def seconds(prompt: str, key: str) -> float:
        started = time.monotonic()
        answer = keyed.post("/v1/completions", headers=bearer(key),
                            json={"prompt": prompt, "max_tokens": 1, "cache_salt": "shared"})
        assert answer.status_code == 200, answer.text
        return time.monotonic() - started

    cold, warm = [], []
    for _ in range(3):
        words = random.Random(uuid.uuid4().int).choices(["the", "of", "capital", "France", "Paris", "hello"], k=700)
        prompt = " ".join(words)  # about 2,000 tokens, new to the server
        seconds(prompt, KEY)
        cold.append(seconds(prompt, OTHER_KEY))  # the prompt is cached under the other key only
        warm.append(seconds(prompt, OTHER_KEY))
    assert sorted(cold)[1] > 3 * sorted(warm)[1], (cold, warm)
    assert wait_until(lambda: settled(keyed, before), timeout=10), metrics(keyed)


def test_forwarded_for_picks_no_fresh_bucket_and_refused_keys_count(keyed):
    """Without --forwarded-allow-ips, X-Forwarded-For is not the client's address; and guessing keys
    spends the address's bucket, so that a refusal is no free retry."""
    before = metrics(keyed)
    time.sleep(1.5)  # the address's bucket full again after the tests before
    statuses = []
    for i in range(3 * RATE):
        answer = keyed.get("/v1/models", headers={**bearer(f"sk-guess-{i}"), "X-Forwarded-For": f"203.0.113.{i}"})
        statuses.append(answer.status_code)
        if answer.status_code == 429:
            assert_openai_error(answer, 429, code="rate_limit_exceeded")
            assert int(answer.headers["retry-after"]) >= 1
            break
    assert statuses[0] == 401 and statuses[-1] == 429, statuses
    assert len(statuses) <= 2 * RATE, statuses  # a burst of RATE, and what refills meanwhile
    assert_serves_meanwhile(keyed, headers=bearer(KEY))  # a valid key has a bucket of its own
    assert wait_until(lambda: settled(keyed, before), timeout=10), metrics(keyed)

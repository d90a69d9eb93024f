"""Keys on every /v1 route (401), per-key rate limits (429), loopback by default, CORS only
when asked for, and the settings parsed from the command line."""
import argparse

import httpx
import pytest

from jupyter_llm.errors import ParamError
from jupyter_llm.server import security
from jupyter_llm.server.security import KeyChecker, RateLimiter, TokenBucket
from jupyter_llm.server.settings import SERVE, ServerSettings, parse_rate, settings_from_args
from server_helpers import assert_openai_error, running_server

V1_ROUTES = [("GET", "/v1/models", None), ("GET", "/v1/models/tiny-hf", None),
             ("POST", "/v1/completions", {"model": "tiny-hf", "prompt": "Hi", "max_tokens": 2}),
             ("POST", "/v1/chat/completions",
              {"model": "tiny-hf", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})]


def test_key_checker_compares_with_every_key_in_constant_time(monkeypatch):
    calls = []

    def counting(a, b):
        calls.append((a, b))
        return a == b

    monkeypatch.setattr(security.hmac, "compare_digest", counting)
    checker = KeyChecker(("first-key", "second-key", "third-key"))
    for presented, expected in (("first-key", True), ("third-key", True), ("nope", False), ("", False)):
        calls.clear()
        assert checker.valid(presented) is expected
        assert len(calls) == 3  # never stops at the first match
    assert not KeyChecker(()).enabled


def test_token_bucket_allows_a_burst_then_refills_at_the_rate():
    bucket = TokenBucket(rate=2.0, burst=2.0)
    start = bucket.updated
    assert bucket.take(start) == 0 and bucket.take(start) == 0
    assert bucket.take(start) == pytest.approx(0.5)
    assert bucket.take(start + 0.5) == 0


def test_rate_limiter_forgets_the_least_recent_clients_past_its_bound():
    limiter = RateLimiter(rate=1.0, max_clients=3)
    for client in "abcd":
        assert limiter.retry_after(client) == 0
    assert list(limiter._buckets) == ["b", "c", "d"]
    assert limiter.retry_after("d") > 0 and limiter.retry_after("a") == 0


@pytest.fixture(scope="module")
def keyed(manager, tiny_hf):
    with running_server(manager, api_keys=("sk-right", "sk-other")) as handle:
        yield handle


@pytest.fixture(scope="module")
def keyed_limited(manager, tiny_hf):
    with running_server(manager, api_keys=("sk-right", "sk-other"), rate_limit=3.0) as handle:
        yield handle


@pytest.mark.parametrize("method,path,body", V1_ROUTES)
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "Bearer"},
                                     {"Authorization": "Basic sk-right"}, {"Authorization": "sk-right"}])
def test_missing_or_wrong_key_is_401_on_every_v1_route(keyed, method, path, body, headers):
    response = httpx.request(method, keyed.url + path, json=body, headers=headers, timeout=30)
    assert_openai_error(response, 401, code="invalid_api_key")


def test_the_key_is_checked_before_the_body_is_read(keyed):
    response = httpx.post(keyed.url + "/v1/completions", content=b"{not json", timeout=30,
                          headers={"content-type": "application/json"})
    assert_openai_error(response, 401, code="invalid_api_key")


def test_health_and_metrics_need_no_key(keyed):
    assert httpx.get(keyed.url + "/health").status_code == 200
    assert httpx.get(keyed.url + "/metrics").status_code == 200


def test_rate_limit_is_429_with_retry_after_per_key(keyed_limited):
    def models(key):
        return httpx.get(keyed_limited.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)

    statuses = [models("sk-right") for _ in range(6)]
    assert statuses[0].status_code == 200
    limited = next(r for r in statuses if r.status_code == 429)
    assert_openai_error(limited, 429, code="rate_limit_exceeded")
    assert int(limited.headers["retry-after"]) >= 1
    assert models("sk-other").status_code == 200  # its own bucket


def test_default_bind_is_loopback(manager, tiny_hf):
    assert ServerSettings().host == "127.0.0.1"
    parser = argparse.ArgumentParser()
    SERVE.add_to(parser)
    assert settings_from_args(parser.parse_args([])).host == "127.0.0.1"
    with running_server(manager) as handle:
        assert handle.url.startswith("http://127.0.0.1:")
        assert {s.getsockname()[0] for server in handle.server.servers for s in server.sockets} == {"127.0.0.1"}


@pytest.mark.parametrize("host,keys,warns", [
    ("127.0.0.1", (), False), ("localhost", (), False), ("::1", (), False),
    ("0.0.0.0", (), True), ("::", (), True), ("192.168.1.5", (), True), ("0.0.0.0", ("k",), False),
])
def test_a_public_bind_without_a_key_warns(host, keys, warns):
    assert (ServerSettings(host=host, api_keys=keys).warning is not None) is warns


def test_cors_is_off_unless_asked_for(manager, tiny_hf):
    preflight = {"Origin": "http://notebook.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    with running_server(manager) as handle:
        response = httpx.options(handle.url + "/v1/completions", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
        response = httpx.get(handle.url + "/v1/models", headers={"Origin": "http://notebook.example"})
        assert "access-control-allow-origin" not in response.headers
    with running_server(manager, cors_origins=("http://notebook.example",), api_keys=("k",)) as handle:
        response = httpx.options(handle.url + "/v1/completions", headers=preflight)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "http://notebook.example"
        denied = httpx.get(handle.url + "/v1/models", headers={"Origin": "http://notebook.example"})
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "http://notebook.example"


@pytest.mark.parametrize("text,rate", [("5", 5.0), ("5/s", 5.0), ("0.5/s", 0.5), ("120/min", 2.0), ("3600/h", 1.0)])
def test_parse_rate(text, rate):
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "fast", "0/s", "-1/s", "5/week", "inf"])
def test_parse_rate_refuses_nonsense(text):
    with pytest.raises(ParamError, match="--rate-limit"):
        parse_rate(text)


def test_settings_from_args_reads_the_key_from_the_environment(monkeypatch):
    parser = argparse.ArgumentParser()
    SERVE.add_to(parser)
    monkeypatch.setenv("MY_LLM_KEY", "sk-env")
    settings = settings_from_args(parser.parse_args(["--api-key-env", "MY_LLM_KEY", "--api-key", "sk-1",
                                                     "--rate-limit", "10/s", "--port", "0", "--cors", "http://a"]))
    assert settings.api_keys == ("sk-1", "sk-env") and settings.rate_limit == 10 and settings.port == 0
    assert settings.cors_origins == ("http://a",) and settings.max_queue == 256
    assert (settings.max_request_tokens, settings.stream_write_timeout) == (65536, 30.0)
    limits = settings_from_args(parser.parse_args(["--max-request-tokens", "5000", "--stream-write-timeout", "2.5"]))
    assert (limits.max_request_tokens, limits.stream_write_timeout) == (5000, 2.5)
    for flag, value in (("--stream-write-timeout", "0"), ("--stream-write-timeout", "nan"),
                        ("--max-request-tokens", "0")):
        with pytest.raises(ParamError, match=flag.strip("-").replace("-", "[-_]")):
            settings_from_args(parser.parse_args([flag, value]))
    monkeypatch.delenv("MY_LLM_KEY")
    with pytest.raises(ParamError, match="MY_LLM_KEY"):
        settings_from_args(parser.parse_args(["--api-key-env", "MY_LLM_KEY"]))
    with pytest.raises(ParamError, match="--port"):
        settings_from_args(parser.parse_args(["--port", "70000"]))


def test_keys_are_compared_as_digests_of_one_length(monkeypatch):
    lengths = []

    def recording(a, b):
        lengths.append((len(a), len(b)))
        return a == b

    monkeypatch.setattr(security.hmac, "compare_digest", recording)
    checker = KeyChecker(("short", "a-much-longer-key-" * 4))
    for presented in ("s", "short", "x" * 500):
        checker.valid(presented)
    assert set(lengths) == {(32, 32)}, "the time taken must not depend on the keys' or the guess's length"


def test_a_non_ascii_key_matches_as_sent(manager, tiny_hf):
    with running_server(manager, api_keys=("sk-clé-ünï",)) as handle:
        right = httpx.get(handle.url + "/v1/models", headers={"Authorization": "Bearer sk-clé-ünï".encode()})
        wrong = httpx.get(handle.url + "/v1/models", headers={"Authorization": b"Bearer sk-cle-uni"})
    assert right.status_code == 200, right.text
    assert_openai_error(wrong, 401, code="invalid_api_key")


def test_keys_hold_when_the_app_is_mounted_under_a_prefix(manager, tiny_hf):
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.testclient import TestClient

    from jupyter_llm.server.app import create_app

    app = create_app(manager, ServerSettings(api_keys=("sk-right",)))
    with TestClient(Starlette(routes=[Mount("/llm", app=app)]), base_url="http://localhost") as client:
        body = {"model": "tiny-hf", "prompt": "Hi", "max_tokens": 2}
        refused = client.post("/llm/v1/completions", json=body)
        listed = client.get("/llm/v1/models", headers={"Authorization": "Bearer sk-right"})
    assert_openai_error(refused, 401, code="invalid_api_key")
    assert listed.status_code == 200 and listed.json()["object"] == "list"


def test_refused_keys_count_against_the_rate_limit(manager, tiny_hf):
    """Guessing keys is rate limited: refused requests take from their address's bucket."""
    with running_server(manager, api_keys=("sk-right",), rate_limit=1.0) as handle:
        statuses = [httpx.get(handle.url + "/v1/models", headers={"Authorization": f"Bearer sk-guess-{i}"},
                              timeout=30).status_code for i in range(4)]
    assert statuses[0] == 401 and 429 in statuses


def _statuses_with_forwarded_for(handle, count: int) -> list[int]:
    return [httpx.get(handle.url + "/v1/models", headers={"X-Forwarded-For": f"203.0.113.{i}"},
                      timeout=30).status_code for i in range(count)]


def test_a_client_cannot_pick_its_rate_limit_bucket_with_forwarded_headers(manager, tiny_hf):
    with running_server(manager, rate_limit=1.0) as handle:
        assert 429 in _statuses_with_forwarded_for(handle, 4)  # one bucket: the socket's address


def test_forwarded_headers_are_believed_from_the_proxies_named(manager, tiny_hf):
    with running_server(manager, rate_limit=1.0, forwarded_allow_ips=("127.0.0.1",)) as handle:
        assert _statuses_with_forwarded_for(handle, 4) == [200] * 4  # a bucket per forwarded client
    parser = SERVE.add_to(argparse.ArgumentParser())
    args = parser.parse_args(["--forwarded-allow-ips", "10.0.0.1", "--forwarded-allow-ips", "10.0.0.2"])
    assert settings_from_args(args).forwarded_allow_ips == ("10.0.0.1", "10.0.0.2")
    assert settings_from_args(parser.parse_args([])).forwarded_allow_ips == ()


@pytest.mark.parametrize("host, allowed", [("evil.example", False), ("evil.example:8000", False),
                                           ("localhost", True), ("127.0.0.1:1234", True), ("[::1]:80", True)])
def test_a_loopback_server_answers_only_loopback_host_names(manager, tiny_hf, host, allowed):
    """DNS rebinding: a page at evil.example that resolves to 127.0.0.1 sends Host: evil.example."""
    with running_server(manager) as handle:
        for path in ("/health", "/v1/models"):
            answer = httpx.get(handle.url + path, headers={"Host": host}, timeout=30)
            if allowed:
                assert answer.status_code == 200, answer.text
            else:
                assert_openai_error(answer, 403, code="host_not_allowed")
                assert "--allowed-host evil.example" in answer.json()["error"]["message"]


def test_allowed_hosts_extend_the_list(manager, tiny_hf):
    with running_server(manager, allowed_hosts=("llm.internal",)) as handle:
        assert httpx.get(handle.url + "/health", headers={"Host": "llm.internal:8000"}, timeout=30).status_code == 200
        assert httpx.get(handle.url + "/health", headers={"Host": "evil.example"}, timeout=30).status_code == 403
    with running_server(manager, allowed_hosts=("*",)) as handle:
        assert httpx.get(handle.url + "/health", headers={"Host": "anything"}, timeout=30).status_code == 200
    assert ServerSettings(host="0.0.0.0").host_allow_list is None  # a public bind: reached by its names
    assert "lab.example" in ServerSettings(host="0.0.0.0", allowed_hosts=("lab.example",)).host_allow_list
    args = SERVE.add_to(argparse.ArgumentParser()).parse_args(["--allowed-host", "a.b", "--allowed-host", "c"])
    assert settings_from_args(args).allowed_hosts == ("a.b", "c")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_bodies_a_page_can_send_without_a_preflight_are_refused(manager, tiny_hf, content_type):
    """A web page can POST these content types cross-origin without asking (no CORS preflight):
    with no key set, they must still never start a generation."""
    with running_server(manager) as handle:
        headers = {"content-type": content_type} if content_type else {}
        body = b'{"model": "tiny-hf", "prompt": "Hi", "max_tokens": 2}'
        request = httpx.Request("POST", handle.url + "/v1/completions", content=body, headers=headers)
        assert request.headers.get("content-type") == content_type  # httpx adds none to raw bytes
        answer = httpx.Client(timeout=30).send(request)
        assert answer.status_code == 400, answer.text


def test_the_prefix_cache_is_kept_apart_per_key_and_per_cache_salt(manager, tiny_llama):
    """Time to first token must not tell one key another's prompt (vLLM's CVE-2025-25183): with
    keys, each key (and each cache_salt a client sends) gets its own prefix-cache namespace."""
    from manager_helpers import load_keeping_default

    name = load_keeping_default(manager, "native", str(tiny_llama), name="tiny-salted", progress=False,
                                kv_cache_memory="4MiB", max_num_batched_tokens=64)
    blocks = manager.get(name).engine.blocks
    prompt = " ".join(f"w{i}" for i in range(40))  # several full blocks
    try:
        with running_server(manager, api_keys=("sk-a", "sk-b")) as handle:
            def hits_after(key: str, **extra) -> int:
                before = blocks.prefix_cache_hits
                answer = httpx.post(handle.url + "/v1/completions", headers={"Authorization": f"Bearer {key}"},
                                    json={"model": name, "prompt": prompt, "max_tokens": 1, **extra}, timeout=60)
                assert answer.status_code == 200, answer.text
                return blocks.prefix_cache_hits - before

            hits_after("sk-a")
            assert hits_after("sk-a") > 0  # the same key: its prompt's blocks are reused
            assert hits_after("sk-b") == 0  # another key: computed afresh
            assert hits_after("sk-a", cache_salt="tenant-2") == 0  # a client's own salt splits further
            assert hits_after("sk-a", cache_salt="tenant-2") > 0
    finally:
        manager.unload(name)

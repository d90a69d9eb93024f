"""Bad input gets the right 4xx with OpenAI's error object, never FastAPI's 422 or a trace."""
import httpx
import pytest

from server_helpers import assert_openai_error, running_server

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def client(manager, tiny_hf):
    with running_server(manager, max_body_bytes=20_000) as server, \
            httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.mark.parametrize("path,body,status,param,code", [
    (COMPLETIONS, {"model": "tiny-hf", "prompt": "Hi", "max_tokens": "ten"}, 400, "max_tokens", "invalid_type"),
    (COMPLETIONS, {"model": "tiny-hf", "prompt": "Hi", "temperature": "0.5"}, 400, "temperature", "invalid_type"),
    (COMPLETIONS, {"model": "tiny-hf", "prompt": 42}, 400, "prompt", "invalid_type"),
    (COMPLETIONS, {"model": "tiny-hf"}, 400, "prompt", "missing_required_parameter"),
    (COMPLETIONS, {"model": "tiny-hf", "prompt": "Hi", "temperature": -1}, 400, "temperature", "invalid_value"),
    (COMPLETIONS, {"model": "tiny-hf", "prompt": "Hi", "top_p": 0}, 400, "top_p", "invalid_value"),
    (COMPLETIONS, {"model": "tiny-hf", "prompt": "Hi", "n": 0}, 400, "n", "invalid_value"),
    (COMPLETIONS, {"model": "tiny-hf", "prompt": "Hi", "n": 17}, 400, "n", "invalid_value"),
    (COMPLETIONS, {"model": "tiny-hf", "prompt": "Hi", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    (COMPLETIONS, {"model": "tiny-hf", "prompt": "Hi", "max_tokens": 600}, 400, "max_tokens",
     "context_length_exceeded"),
    (COMPLETIONS, {"model": "tiny-hf", "prompt": "Hello " * 600}, 400, "prompt", "context_length_exceeded"),
    (COMPLETIONS, {"model": "tiny-hf", "prompt": ""}, 400, "prompt", "invalid_value"),
    (COMPLETIONS, {"model": "tiny-hf", "prompt": []}, 400, "prompt", "invalid_value"),
    (COMPLETIONS, {"model": "tiny-hf", "prompt": "Hi", "stop": ""}, 400, "stop", "invalid_value"),
    (COMPLETIONS, {"model": "tiny-hf", "prompt": "Hi", "logprobs": 21}, 400, "logprobs", "invalid_value"),
    (COMPLETIONS, {"model": "tiny-hf", "prompt": "Hi", "echo": True}, 400, "echo", "unsupported"),
    (COMPLETIONS, {"model": "tiny-hf", "prompt": "Hi", "logit_bias": {"1": 5}}, 400, "logit_bias", "unsupported"),
    (COMPLETIONS, {"model": "tiny-hf", "prompt": "Hi", "stream_options": {"include_usage": True}}, 400,
     "stream_options", "invalid_value"),
    (COMPLETIONS, {"model": "nope", "prompt": "Hi"}, 404, "model", "model_not_found"),
    (CHAT, {"model": "tiny-hf", "messages": []}, 400, "messages", "invalid_value"),
    (CHAT, {"model": "tiny-hf"}, 400, "messages", "missing_required_parameter"),
    (CHAT, {"model": "tiny-hf", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role",
     "invalid_value"),
    (CHAT, {"model": "tiny-hf", "messages": [{"role": "user"}]}, 400, "messages.0.content",
     "missing_required_parameter"),
    (CHAT, {"model": "tiny-hf", "messages": "Hello"}, 400, "messages", "invalid_type"),
    (COMPLETIONS, {"model": "tiny-hf", "prompt": "Hi", "stop": ["a", 1]}, 400, "stop.1", "invalid_type"),
    (CHAT, {"model": "tiny-hf", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages.0.content", "unsupported"),
    (CHAT, {"model": "tiny-hf", "messages": HELLO, "max_completion_tokens": 1000}, 400, "max_completion_tokens",
     "context_length_exceeded"),
    (CHAT, {"model": "tiny-hf", "messages": HELLO, "top_logprobs": 2}, 400, "top_logprobs", "invalid_value"),
    (CHAT, {"model": "tiny-hf", "messages": HELLO, "tools": [{"type": "function"}]}, 400, "tools", "invalid_value"),
    (CHAT, {"model": "tiny-hf", "messages": HELLO, "presence_penalty": 3}, 400, "presence_penalty",
     "invalid_value"),
    # a field nobody knows is named, not dropped (OpenAI's words); so is one inside a message
    (COMPLETIONS, {"model": "tiny-hf", "prompt": "Hi", "temprature": 0.5}, 400, "temprature", "unknown_parameter"),
    (CHAT, {"model": "tiny-hf", "messages": [{"role": "user", "content": "x", "mood": "happy"}]}, 400,
     "messages.0.mood", "unknown_parameter"),
    # output constraints: each mistake names the field that carried it
    (CHAT, {"model": "tiny-hf", "messages": HELLO, "response_format": {"type": "yaml"}}, 400, "response_format",
     "invalid_value"),
    (CHAT, {"model": "tiny-hf", "messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objectx"}}}}, 400, "response_format", "invalid_value"),
    (CHAT, {"model": "tiny-hf", "messages": HELLO, "response_format": {"type": "json_schema"}}, 400,
     "response_format", "invalid_value"),
    (COMPLETIONS, {"model": "tiny-hf", "prompt": "Hi", "structured_outputs": {"choice": []}}, 400,
     "structured_outputs", "invalid_value"),
    (COMPLETIONS, {"model": "tiny-hf", "prompt": "Hi", "structured_outputs": {"regex": "[a&&b]"}}, 400,
     "structured_outputs", "invalid_value"),
    (COMPLETIONS, {"model": "tiny-hf", "prompt": "Hi", "structured_outputs": {"regex": "a", "choice": ["b"]}}, 400,
     "structured_outputs", "invalid_value"),
    (COMPLETIONS, {"model": "tiny-hf", "prompt": "Hi", "structured_outputs": {"structural_tag": "x"}}, 400,
     "structured_outputs", "invalid_value"),
    (COMPLETIONS, {"model": "tiny-hf", "prompt": "Hi", "guided_regex": "[a-"}, 400, "guided_regex", "invalid_value"),
    (COMPLETIONS, {"model": "tiny-hf", "prompt": "Hi", "guided_grammar": "root ::= nothing"}, 400, "guided_grammar",
     "invalid_value"),
    (COMPLETIONS, {"model": "tiny-hf", "prompt": "Hi", "guided_regex": "a", "guided_choice": ["a"]}, 400,
     "guided_choice", "invalid_value"),
])
def test_bad_input_gets_an_openai_error(client, path, body, status, param, code):
    assert_openai_error(client.post(path, json=body), status, param, code)


def test_a_lone_surrogate_cannot_be_tokenized_and_is_400(client):
    body = b'{"model": "tiny-hf", "messages": [{"role": "user", "content": "\\ud800"}]}'
    response = client.post(CHAT, content=body, headers={"content-type": "application/json"})
    assert "cannot tokenize" in assert_openai_error(response, 400, "messages", "invalid_value")["message"]


def test_malformed_json_is_400(client):
    response = client.post(COMPLETIONS, content=b'{"prompt": "Hi",', headers={"content-type": "application/json"})
    error = assert_openai_error(response, 400, code="invalid_json")
    assert "could not parse the JSON body" in error["message"]


def test_a_body_that_is_not_json_says_how_to_send_it(client):
    response = client.post(COMPLETIONS, content=b'{"prompt": "Hi"}', headers={"content-type": "text/plain"})
    assert "Content-Type: application/json" in assert_openai_error(response, 400)["message"]


def test_a_json_array_body_is_400(client):
    assert_openai_error(client.post(COMPLETIONS, json=["Hi"]), 400, code="invalid_json")


def test_oversized_body_is_413(client):
    response = client.post(COMPLETIONS, json={"model": "tiny-hf", "prompt": "x" * 30_000})
    assert_openai_error(response, 413, code="request_too_large")


def test_oversized_body_without_content_length_is_413(client):
    chunks = (b'{"prompt": "' + b"x" * 5000 for _ in range(5))  # chunked: no Content-Length
    response = client.post(COMPLETIONS, content=chunks, headers={"content-type": "application/json"})
    assert_openai_error(response, 413, code="request_too_large")


def test_unknown_route_and_method_use_the_error_object(client):
    assert_openai_error(client.get("/v1/nope"), 404, code="unknown_url")
    assert client.get(COMPLETIONS).json()["error"]["code"] == "method_not_allowed"
    assert_openai_error(client.get("/v1/models/nope"), 404, param="model", code="model_not_found")


def test_validation_errors_are_never_422(client):
    for body in ({"prompt": None}, {"prompt": "x", "n": "2"}, {"messages": "hi"}, {"prompt": "x", "seed": 2**70}):
        assert client.post(COMPLETIONS, json=body).status_code == 400
        assert client.post(CHAT, json=body).status_code == 400


def test_openapi_states_the_bounds_the_server_enforces(client):
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    n = next(s for s in schema["CompletionRequest"]["properties"]["n"]["anyOf"] if s.get("type") == "integer")
    tokens = next(s for s in schema["ChatCompletionRequest"]["properties"]["max_tokens"]["anyOf"]
                  if s.get("type") == "integer")
    assert (n["minimum"], n["maximum"]) == (1, 16) and (tokens["minimum"], tokens["maximum"]) == (1, 4096)


def test_the_token_budget_of_one_request_counts_prompts_and_samples(manager, tiny_hf):
    with running_server(manager, max_request_tokens=200) as server, \
            httpx.Client(base_url=server.url, timeout=60) as c:
        wide = {"model": "tiny-hf", "prompt": ["Hello", "Hi"], "n": 4, "max_tokens": 30}  # 2 x 4 x 30 > 200
        error = assert_openai_error(c.post(COMPLETIONS, json=wide), 400, "max_tokens", "request_too_large")
        assert "max_tokens x n 4 x 2 prompts" in error["message"] and "at most 200 tokens" in error["message"]
        assert c.post(COMPLETIONS, json={**wide, "max_tokens": 20}).status_code == 200
        # a chat request without a max gets the rest of the budget, not a refusal
        out = c.post(CHAT, json={"model": "tiny-hf", "messages": HELLO, "n": 4, "ignore_eos": True}).json()
        prompt = out["usage"]["prompt_tokens"]
        assert out["usage"]["completion_tokens"] == 4 * ((200 - prompt) // 4)

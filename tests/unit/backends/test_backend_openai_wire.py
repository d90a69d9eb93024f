"""The openai backend's wire format: request bodies per dialect, stream chunks, server errors."""
from __future__ import annotations

import ast
import importlib.util
import json

import pytest

from jupyter_llm.backends.openai.backend import OpenAIBackend, normalize_url
from jupyter_llm.backends.openai.wire import (
    capabilities_for,
    detect_dialect,
    error_message,
    gbnf_choice,
    parse_chunk,
    refusal_error,
    refusals,
    request_body,
    sse_payload,
    structured_fields,
)
from jupyter_llm.errors import BackendError, ParamError
from jupyter_llm.schema import GenerationRequest, SamplingParams
from jupyter_llm.structured import KINDS, StructuredOutput

FULL = SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, top_k=5, min_p=0.1, repetition_penalty=1.2,
                      presence_penalty=0.3, frequency_penalty=0.4, seed=3, stop=("x",), n=2, logprobs=2,
                      ignore_eos=True)


def test_every_sampling_field_reaches_a_vllm_server():
    path, body = request_body(GenerationRequest(prompt="hi", params=FULL), "m", "vllm", n=2, seed=4,
                              token_ids=True)
    assert path == "/completions"
    assert body == {"model": "m", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 7,
                    "temperature": 0.5, "top_p": 0.9, "presence_penalty": 0.3, "frequency_penalty": 0.4,
                    "n": 2, "stop": ["x"], "seed": 4, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2,
                    "ignore_eos": True, "return_token_ids": True, "prompt": "hi", "logprobs": 2}


def test_n_and_stop_strings_go_to_the_servers_that_honour_them():
    for dialect in ("vllm", "openai"):
        _, body = request_body(GenerationRequest(prompt="hi", params=FULL), "m", dialect, n=2, seed=None)
        assert body["n"] == 2 and body["stop"] == ["x"], dialect
    # llama-cpp-python ignores n (one request per sample) and drops a stop string without saying
    # which one matched (they are matched here, and closing the request stops it)
    _, body = request_body(GenerationRequest(prompt="hi", params=FULL), "m", "llamacpp", n=1, seed=None)
    assert "n" not in body and "stop" not in body
    _, single = request_body(GenerationRequest(prompt="hi"), "m", "vllm", seed=None)
    assert "n" not in single and "stop" not in single


def test_openai_dialect_chat_sends_max_completion_tokens():
    chat = GenerationRequest(messages=[{"role": "user", "content": "hi"}], params=SamplingParams(max_tokens=9))
    _, body = request_body(chat, "m", "openai", seed=None)
    assert body["max_completion_tokens"] == 9 and "max_tokens" not in body  # reasoning models refuse max_tokens
    _, legacy = request_body(GenerationRequest(prompt="hi", params=SamplingParams(max_tokens=9)), "m", "openai",
                             seed=None)
    assert legacy["max_tokens"] == 9  # /v1/completions knows only max_tokens
    _, vllm = request_body(chat, "m", "vllm", seed=None)
    assert vllm["max_tokens"] == 9


def test_vllm_dialect_disables_top_k_with_minus_one():
    _, body = request_body(GenerationRequest(prompt="hi"), "m", "vllm", seed=None)
    assert body["top_k"] == -1 and "seed" not in body


def test_llamacpp_dialect_sends_its_names_and_bans_eos_for_ignore_eos():
    _, body = request_body(GenerationRequest(prompt="hi", params=FULL), "m", "llamacpp", seed=3,
                           eos_ids=frozenset({0, 2}))
    assert body["repeat_penalty"] == 1.2 and "repetition_penalty" not in body and "ignore_eos" not in body
    assert body["logit_bias"] == {"0": -100.0, "2": -100.0}
    # llama-cpp-python's own defaults (top_k 40, min_p 0.05, repeat 1.1) are overridden explicitly
    _, plain = request_body(GenerationRequest(prompt="hi"), "m", "llamacpp", seed=None)
    assert plain["top_k"] == 0 and plain["min_p"] == 0.0 and plain["repeat_penalty"] == 1.0


def test_openai_dialect_sends_only_openai_fields_and_refuses_the_rest():
    _, body = request_body(GenerationRequest(prompt="hi"), "m", "openai", seed=None)
    assert not {"top_k", "min_p", "repetition_penalty", "ignore_eos", "repeat_penalty"} & set(body)
    assert refusals(FULL, "openai", eos_known=True) == ["repetition_penalty", "ignore_eos"]
    caps = capabilities_for("openai")
    assert not caps.top_k and not caps.min_p
    assert refusals(FULL, "llamacpp", eos_known=False)[0].startswith("ignore_eos")
    assert refusals(FULL, "vllm", eos_known=False) == []


def test_chat_body_and_max_tokens_override():
    request = GenerationRequest(messages=[{"role": "user", "content": "hi"}], params=SamplingParams(logprobs=3))
    path, body = request_body(request, "m", "vllm", seed=None, max_tokens=5)
    assert path == "/chat/completions" and body["messages"] == request.messages
    assert body["logprobs"] is True and body["top_logprobs"] == 3 and body["max_tokens"] == 5


def test_token_id_prompts_are_sent_as_ids():
    _, body = request_body(GenerationRequest(prompt_token_ids=[1, 2, 3]), "m", "vllm", seed=None)
    assert body["prompt"] == [1, 2, 3]


def test_dialect_detection_from_owned_by():
    assert detect_dialect("vllm") == "vllm" and detect_dialect("sglang") == "vllm"
    assert detect_dialect("jupyter-llm") == "vllm"
    assert detect_dialect("me") == "llamacpp" and detect_dialect("llamacpp") == "llamacpp"
    assert detect_dialect("openai") == "openai" and detect_dialect("system") == "openai"


def test_completion_chunk_with_logprobs():
    payload = {"choices": [{"index": 0, "text": " Paris", "finish_reason": None,
                            "logprobs": {"tokens": [" Paris"], "token_logprobs": [-0.1],
                                         "top_logprobs": [{" London": -3.0, " Paris": -0.1, " Rome": -2.0}]}}]}
    [(index, delta)], prompt_tokens = parse_chunk(payload, chat=False, top=2)
    assert index == 0 and delta.text == " Paris" and delta.token_ids is None and prompt_tokens is None
    assert delta.logprobs == [(" Paris", -0.1, [(" Paris", -0.1), (" Rome", -2.0)])]


def test_chat_chunk_with_logprobs_ids_and_usage():
    payload = {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": "length", "token_ids": [5],
                            "logprobs": {"content": [{"token": "Hi", "logprob": -0.5, "top_logprobs": [
                                {"token": "Yo", "logprob": -1.5}, {"token": "Hi", "logprob": -0.5}]}]}}],
               "usage": {"prompt_tokens": 9}}
    [(_, delta)], prompt_tokens = parse_chunk(payload, chat=True, top=1)
    assert (delta.text, delta.token_ids, delta.finish_reason, prompt_tokens) == ("Hi", [5], "length", 9)
    assert delta.logprobs == [("Hi", -0.5, [("Hi", -0.5)])]
    assert parse_chunk({"choices": [], "usage": {"prompt_tokens": 4}}, chat=True, top=0) == ([], 4)


def test_a_chunk_of_several_choices_and_the_stop_string_that_matched():
    payload = {"choices": [{"index": 1, "text": " b", "finish_reason": "stop", "stop_reason": "."},
                           {"index": 0, "text": " a", "finish_reason": None},
                           {"index": 2, "text": "", "finish_reason": "stop", "stop_reason": 2}]}
    deltas, _ = parse_chunk(payload, chat=False, top=0)
    assert [(i, d.text, d.stop_reason) for i, d in deltas] == [(1, " b", "."), (0, " a", None), (2, "", None)]


def test_sse_lines():
    assert sse_payload('data: {"a": 1}') == {"a": 1}
    assert sse_payload("data: [DONE]") == "[DONE]"
    assert sse_payload(": ping") is None and sse_payload("event: x") is None and sse_payload("") is None
    with pytest.raises(ValueError):
        sse_payload('data: "not an object"')


@pytest.mark.parametrize("body, message", [
    ('{"error": {"message": "bad top_k", "type": "invalid_request_error"}}', "bad top_k"),
    ('{"object": "error", "message": "vllm says no", "code": 400}', "vllm says no"),
    ('{"detail": "Invalid API key"}', "Invalid API key"),
    ("plain text failure", "plain text failure"),
])
def test_error_messages_in_every_shape(body, message):
    assert error_message(body.encode()) == message


def test_refusals_become_clear_errors():
    assert isinstance(refusal_error(400, "top_k must be positive", "U"), ParamError)
    context = refusal_error(400, "This model's maximum context length is 2048 tokens", "U", 2048)
    assert isinstance(context, ParamError) and "max_model_len 2048" in str(context)
    assert "--max-model-len" in str(refusal_error(400, "Requested tokens exceed context window", "U"))
    assert "--api-key" in str(refusal_error(401, "no", "U"))
    for status in (404, 429, 500, 503):
        assert isinstance(refusal_error(status, "x", "U"), BackendError)


def test_only_a_refused_request_repeats_the_servers_message():
    """The server's own words for a failure (an internal error, its rate limits) go to the log only."""
    secret = "worker 3 at /opt/models/llama died"
    for status in (401, 403, 404, 429, 500, 502, 503):
        error = refusal_error(status, secret)
        assert secret not in str(error) and str(error).startswith("the upstream server"), status
    assert "top_k must be positive" in str(refusal_error(400, "top_k must be positive"))


def test_urls():
    assert normalize_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert normalize_url("http://h:1/v1/") == "http://h:1/v1"
    assert normalize_url("https://api.example.com/openai/v1") == "https://api.example.com/openai/v1"
    with pytest.raises(ParamError):
        normalize_url("localhost:8000")


# --- structured output -------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
CHAT = [{"role": "user", "content": "hi"}]


def body_for(structured, dialect, chat=False):
    params = SamplingParams(structured=structured)
    request = GenerationRequest(messages=CHAT, params=params) if chat else GenerationRequest(prompt="hi", params=params)
    return request_body(request, "m", dialect, seed=None)[1]


@pytest.mark.parametrize("chat", [False, True])
def test_vllm_dialect_sends_json_as_response_format_and_the_rest_as_structured_outputs(chat):
    strict = body_for(StructuredOutput.json(SCHEMA, strict=True), "vllm", chat)
    assert strict["response_format"] == {"type": "json_schema",
                                         "json_schema": {"name": "output", "schema": SCHEMA, "strict": True}}
    assert body_for(StructuredOutput.json(), "vllm", chat)["response_format"] == {"type": "json_object"}
    assert body_for(StructuredOutput.regex("[0-9]+"), "vllm", chat)["structured_outputs"] == {"regex": "[0-9]+"}
    assert body_for(StructuredOutput.choice(["a", "b"]), "vllm", chat)["structured_outputs"] == {"choice": ["a", "b"]}
    grammar = 'root ::= "x"'
    assert body_for(StructuredOutput.grammar(grammar), "vllm", chat)["structured_outputs"] == {"grammar": grammar}
    assert "structured_outputs" not in strict and "response_format" not in body_for(None, "vllm", chat)


def test_openai_dialect_takes_json_on_chat_only():
    body = body_for(StructuredOutput.json(SCHEMA), "openai", chat=True)
    assert body["response_format"]["json_schema"] == {"name": "output", "schema": SCHEMA, "strict": False}
    json_only = SamplingParams(structured=StructuredOutput.json())
    assert refusals(json_only, "openai", eos_known=True, chat=True) == []
    [refused] = refusals(json_only, "openai", eos_known=True, chat=False)
    assert refused.startswith("structured output on /v1/completions")
    caps = capabilities_for("openai")
    assert caps.structured and caps.structured_kinds == ("json_object", "json_schema")
    others = (StructuredOutput.regex("a"), StructuredOutput.choice(["a"]), StructuredOutput.grammar('root ::= "a"'))
    for structured in others:
        request = GenerationRequest(messages=CHAT, params=SamplingParams(structured=structured))
        assert f"does not support {structured.kind} structured output" in caps.refusal(request, "openai")
        with pytest.raises(ParamError, match=f"cannot send {structured.kind}"):
            structured_fields(structured, "openai", chat=True)


def test_llamacpp_dialect_sends_gbnf_on_completions_and_the_schema_on_chat():
    llama_grammar = pytest.importorskip("llama_cpp.llama_grammar")
    completion = body_for(StructuredOutput.json(SCHEMA), "llamacpp")
    assert completion["grammar"] == llama_grammar.json_schema_to_gbnf(json.dumps(SCHEMA))
    assert "response_format" not in completion
    any_object = body_for(StructuredOutput.json(), "llamacpp")["grammar"]
    assert any_object == llama_grammar.json_schema_to_gbnf('{"type": "object"}')
    chat = body_for(StructuredOutput.json(SCHEMA), "llamacpp", chat=True)
    assert chat["response_format"] == {"type": "json_object", "schema": SCHEMA} and "grammar" not in chat
    assert body_for(StructuredOutput.json(), "llamacpp", chat=True)["response_format"]["schema"] == {"type": "object"}
    grammar = 'root ::= "yes" | "no"'
    for chat in (False, True):
        assert body_for(StructuredOutput.grammar(grammar), "llamacpp", chat)["grammar"] == grammar


def test_a_choice_becomes_a_gbnf_alternation_of_escaped_literals():
    options = ("Paris", 'say "hi"', "back\\slash", "two\nlines\ttab", "bell\x07", "café")
    grammar = gbnf_choice(options)
    assert body_for(StructuredOutput.choice(options), "llamacpp")["grammar"] == grammar
    head, _, alternatives = grammar.partition(" ::= ")
    assert head == "root" and "\n" not in grammar and "\x07" not in grammar  # no raw control characters
    # GBNF's escapes (\\ \" \n \t \xHH) read as Python's: each literal reads back as its option
    assert tuple(ast.literal_eval(literal) for literal in alternatives.split(" | ")) == options


def test_llamacpp_dialect_refuses_what_its_servers_cannot_constrain(monkeypatch):
    caps = capabilities_for("llamacpp")
    assert caps.structured and "regex" not in caps.structured_kinds and not caps.structured_logprobs
    regex = GenerationRequest(prompt="hi", params=SamplingParams(structured=StructuredOutput.regex("a+")))
    assert "does not support regex structured output" in caps.refusal(regex, "openai")
    scored = GenerationRequest(prompt="hi", params=SamplingParams(logprobs=2, structured=StructuredOutput.json()))
    assert "logprobs with structured output" in caps.refusal(scored, "openai")

    def refused(structured, chat=False):
        return refusals(SamplingParams(structured=structured), "llamacpp", eos_known=True, chat=chat)

    assert refused(StructuredOutput.json(SCHEMA, strict=True))[0].startswith("a strict json_schema")
    assert refused(StructuredOutput.grammar('start: "yes" | "no"'))[0].startswith("a Lark grammar")
    assert refused(StructuredOutput.grammar('root ::= "yes"')) == [] and refused(StructuredOutput.choice(["a"])) == []
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    [missing] = refused(StructuredOutput.json(SCHEMA))
    assert "without llama-cpp-python installed here" in missing
    assert refused(StructuredOutput.json(SCHEMA), chat=True) == []  # the server converts it


def test_a_schema_llamacpp_cannot_convert_is_refused_before_sending():
    pytest.importorskip("llama_cpp")
    backend = OpenAIBackend(url="http://127.0.0.1:1", dialect="llamacpp")
    backend.capabilities = capabilities_for("llamacpp")
    unconvertible = StructuredOutput.json({"not": {"type": "string"}})  # valid JSON Schema, no GBNF for it
    with pytest.raises(ParamError, match="llama.cpp's converter cannot turn this JSON schema"):
        backend.check_request(GenerationRequest(prompt="hi", params=SamplingParams(structured=unconvertible)))
    backend.check_request(GenerationRequest(messages=CHAT, params=SamplingParams(structured=unconvertible)))


def test_structured_capabilities_per_dialect_and_server():
    vllm = capabilities_for("vllm", "vllm")
    assert vllm.structured and vllm.structured_kinds == KINDS and vllm.structured_logprobs
    # this project's server speaks vLLM's dialect but does not read its structured-output fields yet
    assert detect_dialect("jupyter-llm") == "vllm" and not capabilities_for("vllm", "jupyter-llm").structured

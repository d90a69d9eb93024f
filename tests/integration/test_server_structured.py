"""Structured output through the server with the official openai client: OpenAI's
response_format (and the client's `parse` with a pydantic model), vLLM's structured_outputs
and guided_* fields, streamed and not; the answers parse whatever the (random) weights."""
from __future__ import annotations

import json
import re

import jsonschema
import openai
import pydantic
import pytest

from server_helpers import running_server


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=10)
    population: int = pydantic.Field(ge=0, le=10**7)
    capital: bool


@pytest.fixture(scope="module")
def client(manager, tiny_hf):
    with running_server(manager) as server, \
            openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def test_response_format_json_schema_and_the_clients_parse(client):
    schema = City.model_json_schema()
    for temperature in (0.0, 1.0):
        answer = client.chat.completions.create(
            model="tiny-hf", messages=[{"role": "user", "content": "A city as JSON"}], max_tokens=200,
            temperature=temperature, seed=4, n=2,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}})
        for choice in answer.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), schema)
    parsed = client.chat.completions.parse(model="tiny-hf", messages=[{"role": "user", "content": "A city"}],
                                           max_tokens=200, temperature=1.0, seed=9, response_format=City)
    assert isinstance(parsed.choices[0].message.parsed, City)


def test_a_stream_under_json_object_assembles_into_json(client):
    chunks = client.chat.completions.create(
        model="tiny-hf", messages=[{"role": "user", "content": "JSON please"}], max_tokens=60, temperature=0,
        stream=True, response_format={"type": "json_object"},
        extra_body={"structured_outputs": None})  # None means absent: one constraint only
    parts, finish = [], None
    for chunk in chunks:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    text = "".join(parts)
    assert text.startswith("{") and (finish == "length" or isinstance(json.loads(text), dict)), (finish, text)


@pytest.mark.parametrize("extra, holds", [
    ({"structured_outputs": {"choice": ["north", "south"]}}, lambda t: t in ("north", "south")),
    ({"structured_outputs": {"regex": "[0-9]{2}:[0-9]{2}"}}, lambda t: re.fullmatch("[0-9]{2}:[0-9]{2}", t)),
    ({"structured_outputs": {"grammar": 'root ::= "on" | "off"'}}, lambda t: t in ("on", "off")),
    ({"guided_choice": ["red", "blue"]}, lambda t: t in ("red", "blue")),
    ({"guided_regex": "[a-c]{4}"}, lambda t: re.fullmatch("[a-c]{4}", t)),
    ({"guided_json": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                      "additionalProperties": False}},
     lambda t: json.loads(t)["ok"] in (True, False)),
])
def test_vllms_fields_on_completions(client, extra, holds):
    answer = client.completions.create(model="tiny-hf", prompt="Answer:", max_tokens=30, temperature=1.0, seed=1,
                                       n=3, extra_body=extra)
    for choice in answer.choices:
        assert choice.finish_reason == "stop" and holds(choice.text), choice.text


def test_a_bad_schema_is_a_400_and_the_server_keeps_serving(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="tiny-hf", messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": {"type": 3}}})
    assert error.value.body["param"] == "response_format" and "invalid at type" in error.value.body["message"]
    ok = client.completions.create(model="tiny-hf", prompt="Hi", max_tokens=3, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")

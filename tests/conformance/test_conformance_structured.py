"""Constrained output on every backend that says it can constrain: the text is what the model
sampled under the grammar's mask, so every answer parses, whatever the weights."""
from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest

from jupyter_llm.errors import ParamError
from jupyter_llm.schema import SamplingParams
from jupyter_llm.structured import StructuredOutput

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3},
                         "nickname": {"type": "string", "pattern": "^[a-z]{1,6}$"}}}


@pytest.fixture
def capable(manager, backend):
    if not manager.get(backend).capabilities.structured:
        pytest.skip(f"backend {backend!r} does not constrain output (capabilities.structured is False)")
    return backend


def claims(manager, backend, kind):
    """Whether the backend constrains this kind (one that it does not is refused, as every unclaimed kind is)."""
    return kind in manager.get(backend).capabilities.structured_kinds


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_answers_validate(manager, capable, temperature):
    params = SamplingParams(max_tokens=120, temperature=temperature, seed=3, n=3,
                            structured=StructuredOutput.json(PERSON))
    for c in manager.generate("Describe a person as JSON:", params, backend=capable):
        assert c.finish_reason == "stop", (c.finish_reason, c.text)
        value = json.loads(c.text)
        jsonschema.validate(value, PERSON)
        assert c.parsed == value


def test_choice_regex_and_grammar_hold_at_temperature_one(manager, capable):
    def answers(structured):
        params = SamplingParams(max_tokens=40, temperature=1.0, seed=11, n=4, structured=structured)
        out = manager.generate("Answer:", params, backend=capable)
        assert all(c.finish_reason == "stop" for c in out), [(c.finish_reason, c.text) for c in out]
        return [c.text for c in out]

    assert set(answers(StructuredOutput.choice(["Paris", "London", "Rome"]))) <= {"Paris", "London", "Rome"}
    if claims(manager, capable, "regex"):
        assert all(re.fullmatch(r"[0-9]{3}-[A-Z]{2}", t) for t in answers(StructuredOutput.regex(r"[0-9]{3}-[A-Z]{2}")))
    assert set(answers(StructuredOutput.grammar('root ::= "yes" | "no" | "maybe"'))) <= {"yes", "no", "maybe"}
    # any JSON object: free strings may run to max_tokens (random weights), but never out of JSON
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=11, n=4, structured=StructuredOutput.json())
    for c in manager.generate("Answer:", params, backend=capable):
        assert isinstance(json.loads(c.text), dict) if c.finish_reason == "stop" else c.text.startswith("{")


def test_a_seed_reproduces_a_constrained_answer_and_max_tokens_still_cuts(manager, capable):
    params = SamplingParams(max_tokens=80, temperature=1.0, seed=5, structured=StructuredOutput.json(PERSON))
    [a] = manager.generate("Person:", params, backend=capable)
    [b] = manager.generate("Person:", params, backend=capable)
    assert a.token_ids == b.token_ids
    [cut] = manager.generate("Person:", params.replace(max_tokens=3), backend=capable)
    assert cut.finish_reason == "length" and cut.completion_tokens == 3 and cut.parsed is None
    assert cut.text.startswith("{")  # what was sampled under the mask, not repaired


def test_logprobs_report_the_constrained_distribution(manager, capable):
    options = ["Paris", "London"]
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=5, structured=StructuredOutput.choice(options))
    if not manager.get(capable).capabilities.structured_logprobs:
        with pytest.raises(ParamError, match="does not support logprobs with structured output"):
            manager.generate("The capital of France is", params, backend=capable)
        return
    [c] = manager.generate("The capital of France is", params, backend=capable)
    assert c.text in options and c.logprobs
    first = c.logprobs[0]
    possible = [text for _, text, value in first.top if value > -1e4]  # -inf: forbidden by the mask
    assert possible and all(any(o.startswith(text) for o in options) for text in possible), first.top
    assert sum(2.718281828 ** value for _, _, value in first.top if value > -1e4) <= 1.0001


def test_constrained_and_free_rows_share_a_batch(manager, capable):
    free = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    [alone] = manager.generate("Once upon a time", free, backend=capable)
    constrained = SamplingParams(max_tokens=60, temperature=1.0, seed=2, structured=StructuredOutput.json(PERSON))

    async def together():
        return await asyncio.gather(manager.agenerate("Once upon a time", free, backend=capable),
                                    manager.agenerate("Person:", constrained, backend=capable))

    [[mixed_free], [mixed_json]] = asyncio.run(together())
    assert mixed_free.token_ids == alone.token_ids  # the mask touched only its own row
    jsonschema.validate(json.loads(mixed_json.text), PERSON)


def test_a_constraint_that_admits_nothing_is_refused_and_compiles_once(manager, capable):
    refused = "admits no text" if claims(manager, capable, "regex") else "does not support regex"
    with pytest.raises(ParamError, match=refused):
        manager.generate("x", SamplingParams(structured=StructuredOutput.regex("[a&&b]")), backend=capable)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}}, "required": ["n"]}
    before = manager.get(capable).stats().get("grammars_compiled", 0)
    params = SamplingParams(max_tokens=20, temperature=0, structured=StructuredOutput.json(schema))
    manager.generate(["a", "b"], params, backend=capable)
    manager.generate("c", params, backend=capable)
    stats = manager.get(capable).stats()
    if "grammars_compiled" in stats:  # in-process backends compile here; a remote one compiles on its server
        assert stats["grammars_compiled"] == before + 1 and stats["last_grammar_compile_ms"] >= 0

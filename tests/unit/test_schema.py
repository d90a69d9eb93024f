import pytest

from jupyter_llm.errors import ParamError
from jupyter_llm.schema import Completion, GenerationRequest, SamplingParams


@pytest.mark.parametrize("field,value,expected", [
    ("temperature", -0.1, "temperature must be >= 0"),
    ("top_p", 0.0, "top_p must be in (0, 1]"),
    ("top_p", 1.5, "top_p must be in (0, 1]"),
    ("max_tokens", 0, "max_tokens must be >= 1"),
    ("top_k", -3, "top_k must be >= 0"),
    ("min_p", 2.0, "min_p must be in [0, 1]"),
    ("repetition_penalty", 0.0, "repetition_penalty must be > 0"),
    ("presence_penalty", 3.0, "presence_penalty must be in [-2, 2]"),
    ("frequency_penalty", -2.5, "frequency_penalty must be in [-2, 2]"),
    ("n", 0, "n must be in [1, 128]"),
    ("logprobs", 21, "logprobs must be an integer in [0, 20]"),
    ("seed", 1.5, "seed must be an integer"),
    ("stop", [""], "stop must be non-empty strings"),
    ("temperature", float("nan"), "temperature must be a finite number"),
    ("max_tokens", "10", "max_tokens must be an integer"),
])
def test_invalid_values_are_refused_with_what_is_accepted(field, value, expected):
    with pytest.raises(ParamError, match=expected.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        SamplingParams(**{field: value})


def test_defaults_and_normalisation():
    p = SamplingParams(stop="###", top_k=-1)
    assert p.stop == ("###",) and p.top_k == 0 and not p.greedy
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(presence_penalty=0.5).uses_penalties
    assert not SamplingParams().uses_penalties


def test_round_trip_and_unknown_names():
    p = SamplingParams(max_tokens=7, stop=("x",), seed=3, logprobs=2)
    assert SamplingParams.from_dict(p.to_dict()) == p
    with pytest.raises(ParamError, match="unknown sampling parameter"):
        SamplingParams.from_dict({"temprature": 1})


def test_requests_need_exactly_one_kind_of_prompt():
    with pytest.raises(ParamError):
        GenerationRequest()
    with pytest.raises(ParamError, match="not both"):
        GenerationRequest(prompt="a", messages=[{"role": "user", "content": "b"}])
    with pytest.raises(ParamError, match="non-empty list"):
        GenerationRequest(messages=[])
    with pytest.raises(ParamError, match="role"):
        GenerationRequest(messages=[{"role": "user"}])
    many = GenerationRequest(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                       {"role": "user", "content": "c"}])
    assert many.is_chat and GenerationRequest(prompt="x").id != GenerationRequest(prompt="x").id


def test_completion_usage():
    c = Completion(text="ab", token_ids=[1, 2, 3], prompt_tokens=4, finish_reason="length")
    assert c.usage == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert str(c) == "ab"

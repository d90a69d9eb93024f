"""StructuredOutput: what can be asked, and the mistakes users make, refused where they are made."""
import pytest

from jupyter_llm.errors import ParamError
from jupyter_llm.schema import SamplingParams
from jupyter_llm.structured import StructuredOutput

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


@pytest.mark.parametrize("structured", [
    StructuredOutput.json(), StructuredOutput.json(PERSON, strict=True), StructuredOutput.regex(r"\d{3}"),
    StructuredOutput.choice(["yes", "no"]), StructuredOutput.grammar('root ::= "a" | "b"'),
    StructuredOutput.grammar('start: "a" | "b"'),
])
def test_every_kind_round_trips_through_its_dict_form_and_sampling_params(structured):
    assert StructuredOutput.from_dict(structured.to_dict()) == structured
    params = SamplingParams(structured=structured.to_dict())
    assert params.structured == structured
    assert SamplingParams.from_dict(params.to_dict()) == params
    assert structured.grammar_text()  # one llguidance grammar for each


def test_a_schema_keeps_its_property_order_and_equal_schemas_are_equal():
    a = StructuredOutput.json(PERSON)
    assert list(a.schema["properties"]) == ["name", "age"]  # the order the answer is generated in
    assert StructuredOutput.json(dict(PERSON)) == a and hash(StructuredOutput.json(dict(PERSON))) == hash(a)
    assert StructuredOutput.json().schema == {"type": "object"} and StructuredOutput.regex("a").schema is None


@pytest.mark.parametrize("build, says", [
    (lambda: StructuredOutput.json({"type": "objectx"}), "the JSON schema is invalid at type"),
    (lambda: StructuredOutput.json({"type": "object", "properties": {"a": {"minimum": "x"}}}),
     "the JSON schema is invalid at properties/a/minimum"),
    (lambda: StructuredOutput.json("{not json"), "the JSON schema is not JSON"),
    (lambda: StructuredOutput.json([1, 2]), "a JSON schema is an object"),
    (lambda: StructuredOutput.json({"type": "array", "uniqueItems": True}, strict=True), "Unimplemented keys"),
    (lambda: StructuredOutput.regex("[a-"), "regex does not compile"),
    (lambda: StructuredOutput.regex(""), "regex must be a non-empty string"),
    (lambda: StructuredOutput.choice([]), "choice needs a non-empty list"),
    (lambda: StructuredOutput.choice(["a", ""]), "choice options must be non-empty strings"),
    (lambda: StructuredOutput.grammar("root ::= undefined-rule"), "grammar does not compile"),
    (lambda: StructuredOutput.grammar("start: missing"), "grammar does not compile"),
    (lambda: StructuredOutput("yaml", "x"), "kind must be one of"),
    (lambda: StructuredOutput.from_dict({"regex": "a", "choice": ["b"]}), "exactly one of"),
    (lambda: StructuredOutput.from_dict({"regexp": "a"}), "unknown field(s) ['regexp']"),
    (lambda: SamplingParams(structured="json"), "structured must be a StructuredOutput"),
])
def test_mistakes_are_one_clear_param_error(build, says):
    with pytest.raises(ParamError, match=None) as error:
        build()
    assert says in str(error.value), str(error.value)
    assert "\n" not in str(error.value)


def test_a_schema_keyword_the_compiler_lacks_is_ignored_unless_strict():
    loose = StructuredOutput.json({"type": "array", "uniqueItems": True})
    assert loose.kind == "json_schema" and not loose.strict


def test_strict_closes_every_object_that_does_not_say_and_only_those():
    from jupyter_llm.structured import closed_objects

    schema = {"type": "object", "properties": {
        "properties": {"type": "object"},  # a property that happens to be named "properties"
        "open": {"type": "object", "additionalProperties": True},
        "list": {"type": "array", "items": {"properties": {"x": {"type": "integer"}}}}},
        "$defs": {"D": {"type": "object"}}, "anyOf": [{"type": "object"}, {"type": "string"}]}
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]  # the map of names is not a schema
    assert closed["properties"]["open"]["additionalProperties"] is True
    assert closed["properties"]["list"]["items"]["additionalProperties"] is False
    assert closed["$defs"]["D"]["additionalProperties"] is False
    assert closed["anyOf"][0]["additionalProperties"] is False and "additionalProperties" not in closed["anyOf"][1]
    assert schema["properties"]["properties"] == {"type": "object"}  # the caller's schema is not changed

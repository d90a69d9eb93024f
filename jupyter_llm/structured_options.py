"""The structured-output options of `%%generate` and `jupyter-llm generate`, turned into one
`StructuredOutput` (structured.py):

    --json-schema VAR_OR_FILE   JSON valid against a schema
    --json                      any JSON object
    --regex R                   text matching a regular expression
    --choice A B C              exactly one of the options
    --grammar VAR_OR_FILE       text of a GBNF or Lark grammar

VAR_OR_FILE is a variable of the caller's namespace (the magic passes the notebook's), else a file
path; --json-schema also takes the schema's JSON text itself. From Python: `structured_output(...)`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jupyter_llm.argtable import ArgTable
from jupyter_llm.errors import ParamError
from jupyter_llm.structured import StructuredOutput

STRUCTURED = ArgTable([
    (("--json-schema",), {"metavar": "VAR_OR_FILE",
                          "help": "answer JSON valid against a schema: a .json file, the schema's JSON text, or "
                                  "(in a notebook) a variable holding a dict, JSON text or pydantic model class"}),
    (("--json",), {"action": "store_true", "help": "answer any JSON object"}),
    (("--regex",), {"metavar": "R", "help": "answer text matching the regular expression R (quote it)"}),
    (("--choice",), {"nargs": "+", "metavar": "OPTION", "help": "answer exactly one of the options"}),
    (("--grammar",), {"metavar": "VAR_OR_FILE",
                      "help": "answer text of a GBNF or Lark grammar: a file, or (in a notebook) a variable "
                              "holding its text"}),
])
FLAGS = ("--json-schema", "--json", "--regex", "--choice", "--grammar")


def structured_from_args(args: Any, namespace: Mapping[str, Any] | None = None) -> StructuredOutput | None:
    """The constraint that parsed STRUCTURED arguments ask for (None: no constraint)."""
    return structured_output(json_schema=args.json_schema, json_object=args.json, regex=args.regex,
                             choice=args.choice, grammar=args.grammar, namespace=namespace)


def structured_output(json_schema: Any = None, json_object: bool = False, regex: str | None = None,
                      choice: Sequence[str] | None = None, grammar: str | None = None,
                      namespace: Mapping[str, Any] | None = None) -> StructuredOutput | None:
    """At most one constraint, as the options name it; a mistake is one ParamError line that
    starts with the option. `json_schema` and `grammar` are VAR_OR_FILE names (or, for the
    schema, a dict, a pydantic model class or JSON text)."""
    given = [flag for flag, value in zip(FLAGS, (json_schema, json_object or None, regex, choice, grammar))
             if value is not None]
    if len(given) > 1:
        raise ParamError(f"give at most one of {', '.join(FLAGS)}; got {' and '.join(given)}")
    if not given:
        return None
    flag = given[0]
    try:
        if flag == "--json-schema":
            return StructuredOutput.json(_schema(json_schema, namespace))
        if flag == "--json":
            return StructuredOutput.json()
        if flag == "--regex":
            return StructuredOutput.regex(regex)  # type: ignore[arg-type]
        if flag == "--choice":
            return StructuredOutput.choice(list(choice))  # type: ignore[arg-type]
        return StructuredOutput.grammar(_grammar(grammar, namespace))  # type: ignore[arg-type]
    except ParamError as error:
        message = str(error)
        raise ParamError(message if message.startswith(flag) else f"{flag}: {message}") from None


def _schema(value: Any, namespace: Mapping[str, Any] | None) -> Any:
    if isinstance(value, str) and not value.lstrip().startswith("{"):
        value = _resolve("--json-schema", value, namespace)
    if callable(getattr(value, "model_json_schema", None)):  # a pydantic model class
        return value.model_json_schema()
    if not isinstance(value, (dict, str)):
        raise ParamError(f"--json-schema: got a value of type {type(value).__name__}; give a dict, JSON text, "
                         "a pydantic model class or a .json file")
    return value


def _grammar(name: str, namespace: Mapping[str, Any] | None) -> str:
    text = _resolve("--grammar", name, namespace)
    if not isinstance(text, str):
        raise ParamError(f"--grammar: {name!r} is of type {type(text).__name__}; give the grammar's text or a file")
    return text


def _resolve(flag: str, name: str, namespace: Mapping[str, Any] | None) -> Any:
    """What VAR_OR_FILE names: the variable, else the file's text."""
    if namespace is not None and name in namespace:
        return namespace[name]
    path = Path(name).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ParamError(f"{flag}: cannot read {name}: {error}") from None
    if namespace is not None and name.isidentifier():
        raise ParamError(f"{flag}: no variable {name!r} in the notebook, nor a file of that name")
    raise ParamError(f"{flag}: no file {name!r}" + (" (nor a variable of that name)" if namespace is not None else ""))

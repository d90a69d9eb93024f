"""Command-line tables written once for both front ends: an `ArgTable` gives the IPython
magic its `@argument` stack and the CLI its argparse arguments. The tables shared by several
commands live here: the sampling options (`%%generate`, `jupyter-llm generate`, named as OpenAI
and vLLM name them) and the backend options, which every command that loads a backend takes
the same way:

    --key value, --key=value, --flag, --no-flag   any option the command does not define itself
    --backend-option key=value                    always (e.g. when the command has its own --key)
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from jupyter_llm.backends.options import options_from_args
from jupyter_llm.errors import ParamError
from jupyter_llm.schema import SamplingParams

Row = tuple[tuple[str, ...], dict[str, Any]]  # (flags, argparse keyword arguments)


class ArgTable:
    """One table of options, given to a magic (`decorate`) and to an argparse parser (`add_to`)."""

    def __init__(self, rows: Sequence[Row]):
        self.rows = tuple(rows)

    def decorate(self, func: Callable) -> Callable:
        """Adds the rows to an IPython magic (inside @magic_arguments()), in table order."""
        from IPython.core.magic_arguments import argument

        for flags, kwargs in reversed(self.rows):
            func = argument(*flags, **kwargs)(func)
        return func

    def add_to(self, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        for flags, kwargs in self.rows:
            parser.add_argument(*flags, **kwargs)
        return parser


SAMPLING = ArgTable([
    (("--max-tokens",), {"type": int, "help": "most tokens to generate"}),
    (("--temperature",), {"type": float, "help": "0 = greedy"}),
    (("--top-p",), {"type": float}),
    (("--top-k",), {"type": int}),
    (("--min-p",), {"type": float}),
    (("--repetition-penalty",), {"type": float}),
    (("--presence-penalty",), {"type": float}),
    (("--frequency-penalty",), {"type": float}),
    (("--seed",), {"type": int}),
    (("--stop",), {"nargs": "+", "action": "extend", "metavar": "S",
                   "help": "stop strings (\\n and \\t are understood)"}),
    (("-n",), {"type": int, "help": "samples per prompt"}),
    (("--logprobs",), {"type": int, "metavar": "K", "help": "log-probabilities with K top alternatives"}),
    (("--ignore-eos",), {"action": "store_true", "help": "keep going past end-of-sequence"}),
])

_OPTIONAL = ("top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
             "seed", "stop", "n", "logprobs")


def params_from_args(args: Any, max_tokens: int, temperature: float) -> SamplingParams:
    """SamplingParams from parsed SAMPLING arguments; max_tokens and temperature fall back to the defaults."""
    values: dict[str, Any] = {
        "max_tokens": args.max_tokens if args.max_tokens is not None else max_tokens,
        "temperature": args.temperature if args.temperature is not None else temperature,
        "ignore_eos": bool(args.ignore_eos),
    }
    values.update({name: getattr(args, name) for name in _OPTIONAL if getattr(args, name) is not None})
    if "stop" in values:  # a shell line cannot hold a newline: accept the usual escapes
        values["stop"] = [s.replace("\\n", "\n").replace("\\t", "\t") for s in values["stop"]]
    return SamplingParams(**values)


BACKEND_OPTIONS = ArgTable([
    (("--backend-option",), {"action": "append", "metavar": "KEY=VALUE",
                             "help": "a backend option, e.g. max_num_seqs=64 (repeatable); other --key value "
                                     "words the command does not know go to the backend too"}),
])


def split_backend_words(words: Sequence[str], parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """(the command's own words, backend option words). A `--name` that is not one of the parser's
    flags (nor, as argparse allows, the start of one) is a backend option, with the next word as its
    value unless that word starts with `--`; split before argparse, which would take the value for a
    positional. Words after `--` stay the command's."""
    flags = list(parser._option_string_actions)  # argparse keeps no public list of its flags
    own: list[str] = []
    backend: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        name = word.partition("=")[0]
        if word == "--":
            own += words[i:]
            break
        if not word.startswith("--") or len(word) < 3 or any(flag.startswith(name) for flag in flags):
            own.append(word)
        else:
            backend.append(word)
            if "=" not in word and i + 1 < len(words) and not words[i + 1].startswith("--"):
                i += 1
                backend.append(words[i])
        i += 1
    return own, backend


def backend_options(words: Sequence[str], items: Sequence[str] | None = None) -> dict[str, Any]:
    """Backend options from free words (`--key value`...) and `--backend-option key=value` items;
    an item wins over a word of the same name. Keys take underscores: max_num_seqs."""
    options = options_from_args(list(words))
    for item in items or ():
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ParamError(f"--backend-option expects KEY=VALUE, got {item!r}")
        options[key.replace("-", "_")] = value
    return options

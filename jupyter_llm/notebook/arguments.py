"""Sampling options shared by `%%generate` and `jupyter-llm generate`: defined once,
named as OpenAI and vLLM name them."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jupyter_llm.schema import SamplingParams

SAMPLING_ARGUMENTS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
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
]

_OPTIONAL = ("top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
             "seed", "stop", "n", "logprobs")


def sampling_arguments(func: Callable) -> Callable:
    """Decorator adding SAMPLING_ARGUMENTS to an IPython magic (inside @magic_arguments())."""
    from IPython.core.magic_arguments import argument

    for flags, kwargs in reversed(SAMPLING_ARGUMENTS):
        func = argument(*flags, **kwargs)(func)
    return func


def add_sampling_arguments(parser: Any) -> None:
    for flags, kwargs in SAMPLING_ARGUMENTS:
        parser.add_argument(*flags, **kwargs)


def params_from_args(args: Any, max_tokens: int, temperature: float) -> SamplingParams:
    """SamplingParams from parsed arguments; max_tokens and temperature fall back to the defaults."""
    values: dict[str, Any] = {
        "max_tokens": args.max_tokens if args.max_tokens is not None else max_tokens,
        "temperature": args.temperature if args.temperature is not None else temperature,
        "ignore_eos": bool(args.ignore_eos),
    }
    values.update({name: getattr(args, name) for name in _OPTIONAL if getattr(args, name) is not None})
    if "stop" in values:  # a shell line cannot hold a newline: accept the usual escapes
        values["stop"] = [s.replace("\\n", "\n").replace("\\t", "\t") for s in values["stop"]]
    return SamplingParams(**values)

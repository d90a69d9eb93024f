"""Benchmark workloads: what to send. Synthetic (lengths fixed or drawn from a range with a
seed), a list of prompts from a Python variable, or a text/JSONL file; completion or chat form."""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jupyter_llm.errors import ParamError
from jupyter_llm.schema import Message

# Common English words that byte-level BPE tokenizers encode as one token each (with their
# leading space), so a prompt of N words is about N tokens on every target.
_WORDS = (  # noqa: SIM905 (a wrapped paragraph reads better than 200 quoted words)
    "the of and to in is was for on that with as by at from his her they this which had are were but not have one "
    "all been their has more when will would who there can its time only new some could these two may first then do "
    "any like my now over such our man me even most made after also did many before must through back years where "
    "much your way well down should because each just those people how too little state good very make world still "
    "own see men work long get here between both life being under never day same another know while last might us "
    "great old year off come since against go came right used take three"
).split()

LengthSpec = int | tuple[int, int]


def parse_length(text: str | int | tuple[int, int]) -> LengthSpec:
    """'64' -> 64, '32-512' -> (32, 512)."""
    if isinstance(text, (int, tuple)):
        return text
    try:
        if "-" in text:
            low, high = (int(x) for x in text.split("-", 1))
            if not 1 <= low <= high:
                raise ValueError
            return (low, high)
        value = int(text)
        if value < 1:
            raise ValueError
        return value
    except ValueError:
        raise ParamError(f"a length must be a positive integer N or a range A-B with A <= B, got {text!r}") from None


@dataclass
class BenchRequest:
    prompt: str | None = None
    messages: list[Message] | None = None
    max_tokens: int = 128
    ignore_eos: bool = True


@dataclass
class Workload:
    requests: list[BenchRequest]
    description: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def chat(self) -> bool:
        return any(r.messages is not None for r in self.requests)

    def to_dict(self) -> dict[str, Any]:
        return {"description": self.description, "requests": [asdict(r) for r in self.requests]}


def _draw(rng: random.Random, spec: LengthSpec) -> int:
    return rng.randint(*spec) if isinstance(spec, tuple) else spec


def _as_chat(prompt: str, chat: bool) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}


def synthetic(num_prompts: int = 32, prompt_len: LengthSpec = 64, max_tokens: LengthSpec = 64, seed: int = 0,
              chat: bool = False, ignore_eos: bool = True) -> Workload:
    """Random-word prompts of about `prompt_len` tokens; output lengths enforced with ignore_eos."""
    if num_prompts < 1:
        raise ParamError(f"num_prompts must be >= 1, got {num_prompts}")
    rng = random.Random(seed)
    requests = []
    for _ in range(num_prompts):
        words = " ".join(rng.choice(_WORDS) for _ in range(_draw(rng, prompt_len)))
        requests.append(BenchRequest(max_tokens=_draw(rng, max_tokens), ignore_eos=ignore_eos,
                                     **_as_chat(words, chat)))
    return Workload(requests, {"kind": "synthetic", "num_prompts": num_prompts, "prompt_len": prompt_len,
                               "max_tokens": max_tokens, "seed": seed, "chat": chat})


def from_prompts(prompts: list[Any], max_tokens: LengthSpec = 64, seed: int = 0, chat: bool = False,
                 ignore_eos: bool = True) -> Workload:
    """A workload from a list of strings (or of chat message lists)."""
    if not prompts:
        raise ParamError("the prompt list is empty")
    rng = random.Random(seed)
    requests = []
    for prompt in prompts:
        if isinstance(prompt, list):
            requests.append(BenchRequest(messages=prompt, max_tokens=_draw(rng, max_tokens), ignore_eos=ignore_eos))
        elif isinstance(prompt, str):
            requests.append(BenchRequest(max_tokens=_draw(rng, max_tokens), ignore_eos=ignore_eos,
                                         **_as_chat(prompt, chat)))
        else:
            raise ParamError(f"prompts must be strings or lists of chat messages, got {type(prompt).__name__}")
    return Workload(requests, {"kind": "prompts", "num_prompts": len(requests), "max_tokens": max_tokens,
                               "seed": seed, "chat": chat})


def from_file(path: str | Path, max_tokens: LengthSpec = 64, seed: int = 0, chat: bool = False,
              ignore_eos: bool = True) -> Workload:
    """A .txt file (one prompt per line) or .jsonl ({"prompt": ...} or {"messages": [...]},
    optionally with "max_tokens" per line)."""
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"no workload file at {path}")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        workload = from_prompts(lines, max_tokens, seed, chat, ignore_eos)
    else:
        rng = random.Random(seed)
        requests = []
        for number, line in enumerate(lines, 1):
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ParamError(f"{path}:{number}: not JSON ({error.msg})") from None
            if not isinstance(item, dict) or not ("prompt" in item or "messages" in item):
                raise ParamError(f"{path}:{number}: each line needs a 'prompt' or 'messages' field")
            tokens = int(item.get("max_tokens", _draw(rng, max_tokens)))
            if "messages" in item:
                requests.append(BenchRequest(messages=item["messages"], max_tokens=tokens, ignore_eos=ignore_eos))
            else:
                requests.append(BenchRequest(max_tokens=tokens, ignore_eos=ignore_eos,
                                             **_as_chat(item["prompt"], chat)))
        workload = Workload(requests)
    workload.description = {"kind": "file", "path": str(path), "num_prompts": len(workload), "chat": chat}
    return workload

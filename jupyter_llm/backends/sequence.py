"""`EngineSequence`: one sample of one request inside an in-process engine, and the one owner
of its tokens (as nano-vllm's sequence.py).

`token_ids` holds the prompt, then every sampled token. The sampler appends to it (through the
sequence's `SamplingState`, which keeps its penalty counts in step), and everything else reads
it: the native scheduler computes from it, the engines feed it to their models, the output
processor counts what it has turned into events. Nobody keeps a copy.
"""
from __future__ import annotations

import enum
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from jupyter_llm.sampling import SamplingState
from jupyter_llm.schema import GenerationRequest, TokenEvent

if TYPE_CHECKING:
    from jupyter_llm.backends.constraints import Constraint

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    """Where a sequence stands in the native scheduler."""

    WAITING = "waiting"
    RUNNING = "running"


class EngineSequence:
    """One sample of one request inside an in-process engine."""

    def __init__(self, request: GenerationRequest, index: int, prompt_ids: list[int],
                 processor: Any, sink: Callable[[TokenEvent], None] | None, constraint: Constraint | None = None):
        self.seq_id = next(_seq_ids)
        self.request_id = request.id
        self.index = index
        self.params = request.params
        self.cache_salt = request.cache_salt  # shares prefix-cache blocks only with the same salt
        self.token_ids: list[int] = list(prompt_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.sampling = SamplingState(request.params, self.token_ids, index, constraint)
        self.processor = processor  # a SampleOutputProcessor (None where a test drives an engine directly)
        self.sink = sink
        # The native scheduler's bookkeeping: its state, arrival order and tokens with K/V in the cache.
        self.status: SequenceStatus | None = None
        self.arrival = 0
        self.num_computed_tokens = 0

    @property
    def prompt_ids(self) -> list[int]:
        """A copy; the engines' per-step paths read `token_ids` and the counts instead."""
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_ids(self) -> list[int]:
        """A copy; the engines' per-step paths read `token_ids` and the counts instead."""
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.processor.finished

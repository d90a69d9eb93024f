"""Speculative decoding for the native engine: its config and the bookkeeping around proposers and verification.

Each step, a cheap *proposer* guesses the next K tokens of every decoding sequence; the
target model then computes its last token plus the K guesses in one forward (a K+1-token
chunk inside the usual continuous batch), and `verify` keeps the longest prefix of guesses
that the target agrees with, plus one token of the target's own: between 1 and K+1 tokens
per sequence for the price of about one decode step, since a CPU decode is bound by reading
the weights, not by the few extra tokens.

Proposers, with vLLM's names:
  * `ngram` (prompt lookup, proposers.py): the longest suffix of the sequence (prompt_lookup_max
    down to prompt_lookup_min tokens) that occurred before; propose what followed it. Free, and
    very good when the output copies the prompt (summaries, edits, code rewrites).
  * `draft` (proposers.py, loaded by draft.py): a smaller model with the same tokenizer, or
    the target's own int8 copy (`--draft-quantization int8`), runs K decode steps over its own
    paged KV cache, kept in step with the target's and rolled back to what was accepted.

Verification (verify.py) follows speculative sampling: the output is distributed exactly as
without speculation, and greedy output is token for token the same.

Requests with repetition/presence/frequency penalties decode without guesses (the penalties
would change between the guessed positions). Speculation backs off per sequence when its
guesses keep failing, and for the whole batch above `disable_by_batch_size` sequences.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from jupyter_llm.backends.native.proposers import DraftModelProposer, ngram_propose
from jupyter_llm.backends.native.verify import Proposal
from jupyter_llm.backends.sequence import EngineSequence
from jupyter_llm.errors import ParamError

METHODS = ("ngram", "draft")
# vLLM's speculative_config keys (and its method names) that mean something here.
_CONFIG_KEYS = {"method", "model", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
                "quantization", "disable_by_batch_size"}
_METHOD_ALIASES = {"ngram": "ngram", "draft": "draft", "draft_model": "draft"}


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str  # ngram | draft
    num_speculative_tokens: int = 5
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    draft_model: str | None = None  # None with method draft: the target's own weights (quantized)
    draft_quantization: str | None = None
    disable_by_batch_size: int | None = None  # no guesses while more sequences than this run

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ParamError(f"unknown speculative method {self.method!r}; accepted: {', '.join(METHODS)}")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ParamError(f"--num-speculative-tokens must be in [1, 16], got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ParamError("--prompt-lookup-min and --prompt-lookup-max must satisfy 1 <= min <= max, got "
                             f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")
        if self.draft_quantization not in (None, "int8"):
            raise ParamError(f"unknown draft quantization {self.draft_quantization!r}; accepted: int8")
        if self.method == "draft" and self.draft_model is None and self.draft_quantization is None:
            raise ParamError("--speculative draft needs --draft-model M, or --draft-quantization int8 to draft "
                             "with the target's own int8 copy")
        if self.method == "ngram" and (self.draft_model or self.draft_quantization):
            raise ParamError("--draft-model and --draft-quantization go with --speculative draft, not ngram")
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ParamError(f"--speculative-disable-by-batch-size must be >= 1, got {self.disable_by_batch_size}")

    @classmethod
    def from_options(cls, speculative: str | None, speculative_config: dict | str | None,
                     **fields: Any) -> SpeculativeConfig | None:
        """The config from `--speculative` and friends, or from vLLM's `speculative_config` dict
        (keys method, model, num_speculative_tokens, prompt_lookup_min/max, quantization,
        disable_by_batch_size; a JSON string from a magic line). None when not speculating."""
        if isinstance(speculative_config, str):
            try:
                speculative_config = json.loads(speculative_config)
            except ValueError as error:
                raise ParamError(f"--speculative-config expects a JSON object, got {speculative_config!r}") from error
        values = {k: v for k, v in fields.items() if v is not None}
        if speculative_config is not None:
            if not isinstance(speculative_config, dict):
                raise ParamError(f"speculative_config must be a dict, got {type(speculative_config).__name__}")
            unknown = sorted(set(speculative_config) - _CONFIG_KEYS)
            if unknown:
                raise ParamError(f"unknown speculative_config key(s) {', '.join(unknown)}; accepted: "
                                 f"{', '.join(sorted(_CONFIG_KEYS))}")
            config = dict(speculative_config)
            drafts = config.get("model") or config.get("quantization")
            method = config.pop("method", None) or ("draft" if drafts else None)
            if speculative is None:
                speculative = method
            if "model" in config:
                config["draft_model"] = config.pop("model")
            if "quantization" in config:
                config["draft_quantization"] = config.pop("quantization")
            values = {**{k: v for k, v in config.items() if v is not None}, **values}
        if speculative is None:
            if values:
                names = ", ".join("--" + k.replace("_", "-") for k in sorted(values))
                raise ParamError(f"{names} need(s) --speculative ngram|draft")
            return None
        method = _METHOD_ALIASES.get(str(speculative).lower())
        if method is None:
            raise ParamError(f"unknown speculative method {speculative!r}; accepted: {', '.join(METHODS)}")
        return cls(method=method, **values)

    def describe(self) -> str:
        if self.method == "ngram":
            return f"ngram k={self.num_speculative_tokens} ({self.prompt_lookup_min}-{self.prompt_lookup_max})"
        draft = self.draft_model or "self"
        return f"draft {draft}{' int8' if self.draft_quantization else ''} k={self.num_speculative_tokens}"


# -- back-off and statistics ----------------------------------------------------------


class Backoff:
    """Per-sequence back-off. A verification costs more than a plain decode step, so guessing
    pays only while guesses are accepted: the sequence keeps a moving average of accepted
    tokens per verification, and while it is below MIN_GAIN the sequence skips guessing for
    1, 2, 4... up to MAX_SKIP steps between tries. In open-ended text the
    n-gram proposer then rarely costs a verification, while a sequence that copies its prompt
    keeps guessing through an occasional miss."""

    MIN_GAIN = 0.6
    MAX_SKIP = 32

    def __init__(self) -> None:
        self.gain = 1.0  # moving average of accepted tokens per verification
        self.misses = 0
        self.skip = 0

    def wants_guess(self) -> bool:
        if self.skip:
            self.skip -= 1
            return False
        return True

    def record(self, accepted: int) -> None:
        self.gain = 0.5 * self.gain + 0.5 * accepted
        if self.gain >= self.MIN_GAIN:
            self.misses = 0
            return
        self.misses += 1
        self.skip = min(2 ** (self.misses - 1), self.MAX_SKIP)


@dataclass
class SpeculationStats:
    """Counters (vLLM's names) and the measured speed-up.

    The speed-up compares seconds per emitted token of decode steps with guesses against
    decode steps without them, both over a recent window; when every recent step guessed,
    one step in `PROBE_EVERY` runs without guesses to keep the comparison current."""

    num_drafts: int = 0  # verifications of a sequence with guesses
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    _plain: list[float] = field(default_factory=lambda: [0.0, 0.0])  # decayed [seconds, tokens]
    _spec: list[float] = field(default_factory=lambda: [0.0, 0.0])
    _steps_since_plain: int = 0

    DECAY = 0.97  # per step: about the last 30 steps of each kind count
    PROBE_EVERY = 64

    def record_verification(self, proposed: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted

    def record_step(self, seconds: float, tokens: int, speculative: bool) -> None:
        window = self._spec if speculative else self._plain
        window[0] = window[0] * self.DECAY + seconds
        window[1] = window[1] * self.DECAY + tokens
        self._steps_since_plain = self._steps_since_plain + 1 if speculative else 0

    def wants_probe(self) -> bool:
        return self._steps_since_plain >= self.PROBE_EVERY

    @property
    def acceptance_rate(self) -> float | None:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens emitted per verification (accepted guesses plus the target's own token)."""
        return (self.num_accepted_tokens + self.num_drafts) / self.num_drafts if self.num_drafts else None

    @property
    def speedup(self) -> float | None:
        if not (self._plain[1] and self._spec[1] and self._spec[0]):
            return None
        return (self._plain[0] / self._plain[1]) / (self._spec[0] / self._spec[1])

    def as_dict(self) -> dict[str, Any]:
        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 3)

        return {"spec_num_drafts": self.num_drafts, "spec_num_draft_tokens": self.num_draft_tokens,
                "spec_num_accepted_tokens": self.num_accepted_tokens,
                "spec_acceptance_rate": rounded(self.acceptance_rate),
                "spec_mean_accepted_length": rounded(self.mean_accepted_length),
                "spec_speedup": rounded(self.speedup)}


class Speculator:
    """What the engine asks each step: the guesses for its decoding sequences; and what it
    tells after verifying them."""

    def __init__(self, config: SpeculativeConfig, draft: DraftModelProposer | None = None) -> None:
        self.config = config
        self.draft = draft
        self.stats = SpeculationStats()
        self._backoff: dict[int, Backoff] = {}
        self._cursor: dict[int, int] = {}  # prompt lookup: where the last accepted copy ended

    def propose(self, decoding: Sequence[tuple[EngineSequence, list[int]]], max_len: int) -> dict[int, Proposal]:
        """decoding: (sequence, its tokens) of every sequence whose next step is a decode."""
        config = self.config
        if not decoding or (config.disable_by_batch_size is not None and len(decoding) > config.disable_by_batch_size):
            return {}
        if self.stats.wants_probe():  # this decode step runs without guesses, to time a plain step
            return {}
        wanted = []
        for seq, tokens in decoding:
            params = seq.params
            # penalties would change the verified distributions; a constrained sample's mask at a
            # guessed position needs its grammar advanced over the guesses first: one token a step
            if params.uses_penalties or params.structured is not None:
                continue
            # Guessing beyond what the request may still emit (or the model may hold) is waste.
            room = min(params.max_tokens - seq.num_output_tokens, max_len - len(tokens)) - 1
            k = min(config.num_speculative_tokens, room)
            if k < 1 or not self._backoff.setdefault(seq.seq_id, Backoff()).wants_guess():
                continue
            wanted.append((seq, tokens, k))
        if config.method == "ngram":
            proposals = {}
            for seq, tokens, k in wanted:
                guess, source = ngram_propose(tokens, k, config.prompt_lookup_min, config.prompt_lookup_max,
                                              self._cursor.get(seq.seq_id, 0))
                if guess:
                    proposals[seq.seq_id] = Proposal(guess, source=source)
            return proposals
        assert self.draft is not None
        return self.draft.propose(wanted)

    def verified(self, proposal: Proposal, seq_id: int, proposed: int, accepted: int) -> None:
        self.stats.record_verification(proposed, accepted)
        backoff = self._backoff.get(seq_id)
        if backoff is not None:
            backoff.record(accepted)
        if proposal.source >= 0:  # the next lookup prefers to go on from here
            self._cursor[seq_id] = proposal.source + accepted

    def committed(self, seq_id: int, num_valid: int) -> None:
        """The target holds K/V for the sequence's first num_valid tokens: roll the draft back to match."""
        if self.draft is not None:
            self.draft.commit(seq_id, num_valid)

    def remove(self, seq_id: int) -> None:
        self._backoff.pop(seq_id, None)
        self._cursor.pop(seq_id, None)
        if self.draft is not None:
            self.draft.remove(seq_id)

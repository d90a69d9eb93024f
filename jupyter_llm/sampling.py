"""The one batched sampler every in-process backend uses.

Each row of a batch carries its own `SamplingState`: its parameters, its own
`torch.Generator` when the request has a seed (so a seeded request draws the same
tokens alone or batched), and the token counts that the penalties need.
Order of operations, as in vLLM: constraint mask -> penalties -> temperature -> min-p,
top-k, top-p -> draw. Logprobs are those of the model's distribution (log-softmax of the
logits), under the constraint's mask for a constrained row (as vLLM reports them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from jupyter_llm.schema import MIN_TEMPERATURE, SamplingParams

if TYPE_CHECKING:
    from jupyter_llm.backends.constraints import Constraint

_SEED_STRIDE = 1_000_003  # sample j > 0 of a seeded request uses seed + j * stride


class SamplingState:
    """Per-sequence sampler state: parameters, generator and token counts for penalties.

    `token_ids` is the sequence's own list (prompt, then output), read here and extended by
    `append`: the state keeps no copy of the tokens, only the penalty tensors derived from them.
    A constrained sample's `constraint` advances over every token appended."""

    def __init__(self, params: SamplingParams, token_ids: list[int], sample_index: int = 0,
                 constraint: Constraint | None = None):
        self.params = params
        self.constraint = constraint
        self.token_ids = token_ids
        self.num_prompt_tokens = len(token_ids)  # what the list holds now is the prompt
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator()
            self.generator.manual_seed((params.seed + sample_index * _SEED_STRIDE) % (2**63))
        self._output_counts: torch.Tensor | None = None
        self._prompt_mask: torch.Tensor | None = None

    def append(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if self.constraint is not None:
            self.constraint.advance(token_id)
        if self._output_counts is not None:
            self._output_counts[token_id] += 1

    def penalty_tensors(self, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(output token counts [V], prompt-or-output mask [V]); built once, then kept up to date."""
        if self._output_counts is None or self._output_counts.numel() != vocab_size:
            counts = torch.zeros(vocab_size)
            ids = [t for t in self.token_ids[self.num_prompt_tokens:] if t < vocab_size]
            if ids:
                counts.index_add_(0, torch.tensor(ids), torch.ones(len(ids)))
            prompt_mask = torch.zeros(vocab_size, dtype=torch.bool)
            prompt_ids = [t for t in self.token_ids[:self.num_prompt_tokens] if t < vocab_size]
            if prompt_ids:
                prompt_mask[torch.tensor(prompt_ids)] = True
            self._output_counts, self._prompt_mask = counts, prompt_mask
        return self._output_counts, self._prompt_mask | (self._output_counts > 0)


@dataclass
class SampleOutput:
    token_ids: list[int]
    # Per row: (logprob of the chosen token, top ids, top logprobs) or None when not asked for.
    logprobs: list[tuple[float, list[int], list[float]] | None]


def apply_constraints(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """The logits with what each constrained row's grammar forbids at -inf (a copy when any row
    is constrained; the rows without a constraint are untouched)."""
    rows = [row for row, s in enumerate(states) if s.constraint is not None]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    words = torch.empty((len(rows), states[rows[0]].constraint.mask_words), dtype=torch.int32)  # type: ignore[union-attr]
    for i, row in enumerate(rows):
        states[row].constraint.fill_mask(words[i])  # type: ignore[union-attr]
    bits = torch.from_numpy(np.unpackbits(words.numpy().view(np.uint8), axis=1, bitorder="little"))
    # columns past the tokenizer's vocabulary (a padded embedding) stay forbidden
    forbidden = torch.ones((len(rows), vocab), dtype=torch.bool)
    width = min(vocab, bits.shape[1])
    forbidden[:, :width] = bits[:, :width] == 0
    logits = logits.clone()
    logits[rows] = logits[rows].masked_fill(forbidden, float("-inf"))
    return logits


def apply_penalties(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Repetition (prompt and output), presence and frequency (output only) penalties, in place."""
    vocab_size = logits.shape[-1]
    for row, state in enumerate(states):
        p = state.params
        if not p.uses_penalties:
            continue
        counts, seen = state.penalty_tensors(vocab_size)
        if p.repetition_penalty != 1.0:
            penalized = torch.where(logits[row] > 0, logits[row] / p.repetition_penalty,
                                    logits[row] * p.repetition_penalty)
            # A vanishing or huge penalty overflows to inf (then NaN in softmax): clamp to a bound
            # that even the smallest temperature can divide without overflowing.
            bound = torch.finfo(logits.dtype).max * MIN_TEMPERATURE / 4
            logits[row] = torch.where(seen, penalized.clamp(-bound, bound), logits[row])
        if p.frequency_penalty:
            logits[row] -= p.frequency_penalty * counts
        if p.presence_penalty:
            logits[row] -= p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_probs(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 min_p: torch.Tensor) -> torch.Tensor:
    """Zero out what min-p, top-k and top-p exclude (per-row values; 0/1/0 disable). Not renormalized."""
    if bool((min_p > 0).any()):
        threshold = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
        probs = probs.masked_fill(probs < threshold, 0.0)
    rows = ((top_k > 0) | (top_p < 1)).nonzero().flatten()
    if len(rows) == 0:
        return probs
    if len(rows) < probs.shape[0]:  # sorting 49k-entry rows is costly: only the rows that filter
        probs = probs.clone()
        probs[rows] = _filter_sorted(probs[rows], top_k[rows], top_p[rows])
        return probs
    return _filter_sorted(probs, top_k, top_p)


def _filter_sorted(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-k and top-p over rows sorted by probability."""
    need_k = bool((top_k > 0).any())
    need_p = bool((top_p < 1).any())
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    remove = torch.zeros_like(sorted_probs, dtype=torch.bool)
    if need_k:
        ranks = torch.arange(probs.shape[-1], device=probs.device).unsqueeze(0)
        k = torch.where(top_k > 0, top_k, probs.shape[-1]).unsqueeze(1)
        remove |= ranks >= k
    if need_p:
        kept = sorted_probs.masked_fill(remove, 0.0)
        cumulative = kept.cumsum(dim=-1) / kept.sum(dim=-1, keepdim=True)
        # Remove a token when the tokens before it already reach top_p (the first always stays).
        before = cumulative - kept / kept.sum(dim=-1, keepdim=True)
        remove |= (before >= top_p.unsqueeze(1)) & (top_p < 1).unsqueeze(1)
    sorted_probs = sorted_probs.masked_fill(remove, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def processed_probs(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """The distribution each row samples from (penalties, temperature, filters): float32, rows not
    renormalized; a greedy row is one-hot on its argmax."""
    logits = apply_penalties(logits.float().clone(), states)
    temperature = torch.tensor([s.params.temperature for s in states], dtype=torch.float32)
    greedy = torch.tensor([s.params.greedy for s in states])
    scaled = logits / torch.where(greedy, 1.0, temperature).unsqueeze(1)
    probs = torch.softmax(scaled, dim=-1)
    probs = filter_probs(
        probs,
        torch.tensor([s.params.top_k for s in states]),
        torch.tensor([s.params.top_p for s in states], dtype=torch.float32),
        torch.tensor([s.params.min_p for s in states], dtype=torch.float32),
    )
    if bool(greedy.any()):
        one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(greedy.unsqueeze(1), one_hot, probs)
    return probs


def draw(probs: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """One token per row by the exponential race (argmax p/q, q ~ Exp(1)), which samples from p.

    Seeded rows draw their noise from their own generator; the others from the global one.
    """
    noise = torch.empty_like(probs)
    unseeded = [row for row, s in enumerate(states) if s.generator is None]
    if unseeded:
        noise[unseeded] = torch.empty(len(unseeded), probs.shape[-1]).exponential_()
    for row, state in enumerate(states):
        if state.generator is not None:
            noise[row].exponential_(generator=state.generator)
    return (probs / noise).argmax(dim=-1)


class Sampler:
    """Samples one token for every row of a batch of logits, each row with its own state."""

    def __call__(self, logits: torch.Tensor, states: list[SamplingState]) -> SampleOutput:
        assert logits.shape[0] == len(states), "one sampling state per row of logits"
        logits = apply_constraints(logits, states)
        if all(s.params.greedy and not s.params.uses_penalties for s in states):
            token_ids = logits.argmax(dim=-1).tolist()  # the common greedy case: no distribution needed
        else:
            token_ids = draw(processed_probs(logits, states), states).tolist()
        logprobs = token_logprobs(logits, token_ids, [s.params.logprobs for s in states])
        for state, token in zip(states, token_ids):
            state.append(token)
        return SampleOutput(token_ids, logprobs)


def token_logprobs(logits: torch.Tensor, token_ids: list[int],
                   num_top: list[int | None]) -> list[tuple[float, list[int], list[float]] | None]:
    """Per row: (logprob of its token, top ids, top logprobs) under the raw distribution
    (log-softmax of the logits), or None where num_top is None (not asked for)."""
    logprobs: list[tuple[float, list[int], list[float]] | None] = [None] * len(token_ids)
    wanted = [row for row, k in enumerate(num_top) if k is not None]
    if wanted:
        raw = torch.log_softmax(logits[wanted].float(), dim=-1)
        for i, row in enumerate(wanted):
            k = num_top[row]
            top = raw[i].topk(k) if k else None
            logprobs[row] = (float(raw[i, token_ids[row]]),
                             top.indices.tolist() if top is not None else [],
                             top.values.tolist() if top is not None else [])
    return logprobs

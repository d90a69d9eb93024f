"""Speculative verification: which guesses the target keeps, and the token it adds.

Verification follows speculative sampling (Leviathan et al. 2023, Chen et al. 2023): guess
x_i drawn from the proposer's q is accepted with probability min(1, p(x_i) / q(x_i)), where
p is the target's distribution after temperature, top-k, top-p and min-p; on the first
rejection the token is drawn from max(0, p - q), renormalized; after K acceptances a bonus
token comes from p. The output is distributed exactly as without speculation. An n-gram
guess is deterministic (q is one-hot), and for greedy requests p is one-hot on the argmax, so
greedy output is token for token the same as without speculation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from jupyter_llm.sampling import SamplingState, draw, processed_probs


@dataclass
class Proposal:
    """Guessed next tokens of one sequence; `probs[i]` is the proposer's distribution that
    tokens[i] was drawn from (None for a deterministic guess: q is one-hot)."""

    tokens: list[int]
    probs: torch.Tensor | None = None  # [len(tokens), V], float32, rows sum to 1
    source: int = -1  # prompt lookup: where in the sequence the guessed tokens were copied from


def normalized(probs: torch.Tensor) -> torch.Tensor:
    return probs / probs.sum(dim=-1, keepdim=True)


def verify(logits: torch.Tensor, proposal: Proposal, state: SamplingState) -> list[int]:
    """The tokens a sequence emits this step: the accepted guesses, then one token of the
    target's own (a replacement for the first rejected guess, or a bonus after all K).

    logits: the target's [K + 1, V] rows for the positions of the last known token and of
    each guess. Does not touch `state` (the caller appends what it emits)."""
    guesses = proposal.tokens
    k = len(guesses)
    if state.params.greedy:
        best = logits.argmax(dim=-1).tolist()
        accepted = 0
        while accepted < k and guesses[accepted] == best[accepted]:
            accepted += 1
        return guesses[:accepted] + [best[accepted]]
    p = normalized(processed_probs(logits, [state] * (k + 1)))
    if proposal.probs is None:  # deterministic guesses: q is one-hot
        q_of_guess = torch.ones(k)
    else:
        q_of_guess = proposal.probs[torch.arange(k), guesses]
    p_of_guess = p[torch.arange(k), guesses]
    uniforms = torch.rand(k, generator=state.generator)
    accept = uniforms * q_of_guess < p_of_guess  # u < p / q, without dividing by a zero q
    accepted = k if bool(accept.all()) else int((~accept).nonzero()[0])
    if accepted == k:
        return guesses + [int(draw(p[k : k + 1], [state])[0])]
    if proposal.probs is None:
        residual = p[accepted].clone()
        residual[guesses[accepted]] = 0.0
    else:
        residual = (p[accepted] - proposal.probs[accepted]).clamp_(min=0.0)
    if float(residual.sum()) <= 0.0:  # p == q on the support: fall back to p itself
        residual = p[accepted]
    return guesses[:accepted] + [int(draw(residual.unsqueeze(0), [state])[0])]

"""The speculative proposers, with vLLM's names: prompt lookup (`ngram_propose`) and a draft
model over its own paged KV cache (`DraftModelProposer`). See speculative.py."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from jupyter_llm.backends.native.kv_cache import BlockManager
from jupyter_llm.backends.native.model_runner import ModelRunner, StepItem
from jupyter_llm.backends.native.verify import Proposal, normalized
from jupyter_llm.backends.sequence import EngineSequence
from jupyter_llm.sampling import SamplingState, draw, processed_probs


def ngram_propose(tokens: Sequence[int], k: int, min_n: int = 1, max_n: int = 4, after: int = 0
                  ) -> tuple[list[int], int]:
    """Prompt lookup: find an earlier occurrence of the longest suffix of `tokens` (max_n down to
    min_n tokens) and return up to k tokens that followed it, with their position in `tokens`
    (([], -1) if none). Among occurrences of that suffix, the first one that continues at or
    after position `after` wins (where the previous guesses came from, so a copy goes on
    through the prompt in order); without one, the latest with k tokens after it (in a
    repeating stretch, the very latest is followed by fewer)."""
    length = len(tokens)
    if length < min_n + 1 or k < 1:
        return [], -1
    arr = np.asarray(tokens)
    # Candidates: earlier positions holding the last token (the suffix's own end excluded).
    ends = np.flatnonzero(arr[: length - 1] == arr[-1])
    best_n, found = 0, []
    for end in ends[::-1]:  # latest first
        n = 1
        limit = min(max_n, end + 1)
        while n < limit and arr[end - n] == arr[length - 1 - n]:
            n += 1
        if n > best_n:
            best_n, found = n, []
        if n == best_n:
            found.append(int(end))
    if best_n < min_n:
        return [], -1
    ahead = [end for end in found if end + 1 >= after]
    if after and ahead:
        end = min(ahead)
    else:
        end = next((e for e in found if length - 1 - e >= k), found[0])
    return arr[end + 1 : end + 1 + k].tolist(), end + 1


class DraftModelProposer:
    """Guesses with a draft model over its own paged KV cache.

    For each sequence the draft keeps how many of the sequence's tokens it has K/V for. A
    proposal of K tokens first catches up (computes the tokens the draft has not seen, which
    also yields guess 1), then runs K - 1 single-token steps; all sequences go in one batched
    forward per step. `commit` rolls the draft's cache back to what the target accepted.
    A sequence the draft cannot hold (its pool is full) simply gets no guesses.
    """

    def __init__(self, runner: ModelRunner, blocks: BlockManager) -> None:
        self.runner = runner
        self.blocks = blocks
        self.computed: dict[int, int] = {}

    @torch.inference_mode()
    def propose(self, requests: Sequence[tuple[EngineSequence, list[int], int]]) -> dict[int, Proposal]:
        """requests: (sequence, its tokens, K) per decoding sequence."""
        guesses: dict[int, list[int]] = {}
        probs: dict[int, list[torch.Tensor]] = {}
        active = []
        for seq, tokens, k in requests:
            if seq.seq_id not in self.computed:
                if not self.blocks.can_allocate(len(tokens)):
                    continue
                self.computed[seq.seq_id] = self.blocks.allocate(seq.seq_id, tokens, seq.cache_salt)
            elif self.computed[seq.seq_id] >= len(tokens):  # the last token's logits are needed again
                self.commit(seq.seq_id, len(tokens) - 1)
                if seq.seq_id not in self.computed:
                    continue
            active.append((seq, tokens, k))
            guesses[seq.seq_id], probs[seq.seq_id] = [], []
        for step in range(max((k for _, _, k in active), default=0)):
            items, stepping = [], []
            for seq, tokens, k in active:
                if step >= k:
                    continue
                known = tokens + guesses[seq.seq_id]  # step 0 catches up; later steps feed the last guess
                start, end = self.computed[seq.seq_id], len(known)
                if not self.blocks.append_slots(seq.seq_id, known, end - start):
                    self.remove(seq.seq_id)
                    continue
                items.append(StepItem(seq.seq_id, known[start:end], start, self.blocks.block_table(seq.seq_id),
                                      self.blocks.slot_mapping(seq.seq_id, start, end)))
                stepping.append(seq)
                self.computed[seq.seq_id] = end
            if not items:
                break
            logits = self.runner.run(items)
            if logits.device.type != "cpu":
                logits = logits.cpu()
            for row, seq in enumerate(stepping):
                token, q = draft_sample(logits[row : row + 1], seq.sampling)
                guesses[seq.seq_id].append(token)
                if q is not None:
                    probs[seq.seq_id].append(q)
            active = [a for a in active if a[0].seq_id in self.computed]
        return {sid: Proposal(g, torch.cat(probs[sid]) if probs[sid] else None)
                for sid, g in guesses.items() if g and sid in self.computed}

    def commit(self, seq_id: int, num_valid: int) -> None:
        """Keep the draft's K/V of the sequence's first `num_valid` tokens only."""
        computed = self.computed.get(seq_id)
        if computed is None or computed <= num_valid:
            return
        try:
            copies = self.blocks.truncate(seq_id, num_valid)
        except RuntimeError:  # no block for a copy-on-write: start this sequence over in the draft
            self.remove(seq_id)
            return
        self.runner.kv_pool.copy_blocks(copies)
        self.computed[seq_id] = num_valid

    def remove(self, seq_id: int) -> None:
        if self.computed.pop(seq_id, None) is not None:
            self.blocks.free(seq_id)


def draft_sample(logits: torch.Tensor, state: SamplingState) -> tuple[int, torch.Tensor | None]:
    """One guess from [1, V] draft logits with the sequence's sampling parameters: the argmax
    for a greedy request (q is then one-hot: None), else a draw from q (returned, [1, V])."""
    if state.params.greedy:
        return int(logits.argmax()), None
    q = normalized(processed_probs(logits, [state]))
    return int(draw(q, [state])[0]), q

"""Continuous batching for the native engine: which tokens of which sequences run in the next step.

Every step, in this order:

1. **Running sequences**, oldest first, each get their next tokens: one for a sequence that
   decodes, the next chunk of its prompt for one whose prefill is still in progress. A
   step computes at most `max_num_batched_tokens` tokens in all, so a long prompt is split
   over several steps (chunked prefill) and never stalls the decodes that run beside it.
2. **Preemption.** Before a sequence's tokens run, `BlockManager.append_slots` must find
   blocks for them. When the pool is out of blocks, the *newest* running sequence (by
   arrival) is preempted: its blocks are freed and it goes back to the front of the waiting
   queue, to be recomputed later from its prompt plus the output it has so far (nothing is
   lost: its sampler state and output stay with it, and the prefix cache often still holds
   its blocks). The oldest sequences therefore always make progress: no deadlock, no
   starvation.
3. **Admission.** While the token budget, `max_num_seqs` and free blocks allow (and no
   sequence was preempted in this step), waiting sequences start in arrival order (first
   come, first served: the head of the queue is never overtaken). A sequence's block table
   covers its whole prompt from the start; leading blocks found in the prefix cache are not
   computed again. While something runs, admission keeps a small watermark of free blocks
   so that running decodes do not preempt the newcomer at once.

A sequence in a step samples a token only when the step computes its last known token
(`ScheduledChunk.samples`); a chunk in the middle of a prompt produces none.

**Speculative decoding.** `schedule(guesses)` takes guessed next tokens for decoding
sequences (see speculative.py): such a decode computes its last token plus the guesses (a
chunk of 1 + K tokens, within the token budget; the guesses are dropped before anything is
preempted for them), and `commit` takes the tokens each sequence emitted, keeps the K/V of
the accepted guesses and truncates the blocks of the rejected ones.

The scheduler schedules the engine's sequences themselves (`EngineSequence`, which owns the
tokens): it reads `seq.token_ids`, which the sampler extends, and keeps its bookkeeping on the
sequence (`status`, `arrival`, `num_computed_tokens`), as nano-vllm's does.
"""
from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter

from jupyter_llm.backends.native.kv_cache import BlockManager
from jupyter_llm.backends.sequence import EngineSequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64  # running sequences at most
    max_num_batched_tokens: int = 512  # tokens computed in one step at most
    max_model_len: int = 2048  # prompt + output tokens of one sequence at most
    watermark: float = 0.01  # fraction of the pool kept free when admitting beside running sequences

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class ScheduledChunk:
    """Compute seq.token_ids[start:end] in this step."""

    seq: EngineSequence
    start: int
    end: int
    samples: bool  # the chunk reaches the sequence's last token (when scheduled): its logits give the next one
    guesses: list[int] = field(default_factory=list)  # speculative tokens computed after tokens[end - 1]

    @property
    def num_tokens(self) -> int:
        return self.end - self.start + len(self.guesses)

    @property
    def token_ids(self) -> list[int]:
        """The tokens this chunk computes."""
        return self.seq.token_ids[self.start:self.end] + self.guesses


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[EngineSequence] = field(default_factory=list)  # sequences preempted while scheduling
    admitted: list[EngineSequence] = field(default_factory=list)  # sequences that started (or restarted) now

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    """Continuous batching over a `BlockManager` (see the module docstring for the policy)."""

    def __init__(self, blocks: BlockManager, config: SchedulerConfig) -> None:
        self.blocks = blocks
        self.config = config
        self.waiting: deque[EngineSequence] = deque()
        self.running: list[EngineSequence] = []  # sorted by arrival order
        self._order = itertools.count()
        self.num_preemptions = 0
        self._watermark_blocks = max(1, int(config.watermark * blocks.num_total_blocks())) if config.watermark else 0

    # -- queries --------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def counts(self) -> tuple[int, int]:
        """(running, waiting) sequences."""
        return len(self.running), len(self.waiting)

    def __contains__(self, seq: EngineSequence) -> bool:
        return seq.status is not None

    def decoding(self) -> list[tuple[EngineSequence, list[int]]]:
        """(sequence, its tokens) of the running sequences whose next step is a decode."""
        return [(s, s.token_ids) for s in self.running if len(s.token_ids) - s.num_computed_tokens == 1]

    # -- life cycle -----------------------------------------------------------------------

    def add(self, seq: EngineSequence) -> None:
        if seq.status is not None:
            raise ValueError(f"sequence {seq.seq_id} is already scheduled")
        tokens = len(seq.token_ids)
        if tokens >= self.config.max_model_len:
            raise ValueError(f"sequence of {tokens} tokens does not fit max_model_len {self.config.max_model_len}")
        seq.status, seq.arrival, seq.num_computed_tokens = SequenceStatus.WAITING, next(self._order), 0
        self.waiting.append(seq)

    def remove(self, seq: EngineSequence) -> None:
        """Forget a sequence (finished, cancelled or failed) and free its blocks. Idempotent."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.blocks.free(seq.seq_id)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = None

    # -- one step -------------------------------------------------------------------------

    def schedule(self, guesses: dict[int, list[int]] | None = None) -> SchedulerOutput:
        """Pick this step's chunks; their slots are reserved (append_slots) when this returns.
        `guesses`: speculative tokens by seq_id, for sequences that decode (see `decoding`).
        Follow with `commit` once the step ran, or `abort` if it failed."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        blocks = self.blocks
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            all_tokens, start = seq.token_ids, seq.num_computed_tokens
            n = min(len(all_tokens) - start, budget)
            end = start + n
            last = end == len(all_tokens)
            tokens = all_tokens if last else all_tokens[:end]
            guess = self._fit_guess(seq, guesses, budget) if guesses and n == 1 and last else []
            if guess and blocks.append_slots(seq.seq_id, tokens + guess, n + len(guess)):
                out.chunks.append(ScheduledChunk(seq, start, end, last, guess))
                budget -= n + len(guess)
                i += 1
                continue
            while not blocks.append_slots(seq.seq_id, tokens, n):
                victim = self.running[-1]  # the newest; never one already scheduled in this step
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.chunks.append(ScheduledChunk(seq, start, end, last))
                budget -= n
                i += 1
        if out.preempted:
            return out
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            all_tokens = seq.token_ids
            reserve = self._watermark_blocks if self.running else 0
            if blocks.blocks_needed(len(all_tokens)) + reserve > blocks.num_free_blocks():
                break
            self.waiting.popleft()
            start = seq.num_computed_tokens = blocks.allocate(seq.seq_id, all_tokens, seq.cache_salt)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=attrgetter("arrival"))
            n = min(len(all_tokens) - start, budget)
            end = start + n
            last = end == len(all_tokens)
            ok = blocks.append_slots(seq.seq_id, all_tokens if last else all_tokens[:end], n)
            assert ok, "the table of a newly allocated sequence covers its prompt"
            out.chunks.append(ScheduledChunk(seq, start, end, last))
            out.admitted.append(seq)
            budget -= n
        return out

    def commit(self, out: SchedulerOutput, emitted: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
        """The step ran: its chunks are computed, and `emitted` holds the new tokens of each chunk
        that samples, in chunk order (the sampler has already appended them to the sequences): one
        token, or for a chunk with guesses the accepted guesses plus one. Returns the KV block copies
        that `KVCachePool.copy_blocks` must apply (copy-on-write after dropping rejected guesses;
        usually none)."""
        copies: list[tuple[int, int]] = []
        tokens = iter(emitted)
        for chunk in out.chunks:
            new = next(tokens) if chunk.samples else ()
            seq = chunk.seq
            if seq.status is None:
                continue
            accepted = max(len(new) - 1, 0) if chunk.guesses else 0
            seq.num_computed_tokens = chunk.end + accepted
            if accepted < len(chunk.guesses) and seq.status is SequenceStatus.RUNNING:
                try:
                    copies += self.blocks.truncate(seq.seq_id, seq.num_computed_tokens)
                except RuntimeError:  # no block for the copy-on-write: recompute this sequence later
                    self._preempt(seq)
        return copies

    def abort(self, out: SchedulerOutput) -> None:
        """The step failed: forget the slots it announced (blocks it would have completed must
        not stay in the prefix cache without their K/V)."""
        admitted = {seq.seq_id for seq in out.admitted}
        for chunk in reversed(out.chunks):
            seq = chunk.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            if seq.seq_id in admitted:
                # Its cache hits may be blocks that another chunk of this step was to fill: drop
                # them all (truncate, unlike free, unregisters) and queue it again.
                self.blocks.truncate(seq.seq_id, 0)
                self.blocks.free(seq.seq_id)
                self.running.remove(seq)
                seq.status, seq.num_computed_tokens = SequenceStatus.WAITING, 0
                self.waiting.appendleft(seq)
            else:
                self.blocks.truncate(seq.seq_id, chunk.start)

    # -- internals ------------------------------------------------------------------------

    def _fit_guess(self, seq: EngineSequence, guesses: dict[int, list[int]], budget: int) -> list[int]:
        """The sequence's guesses cut to the token budget and to max_model_len."""
        guess = guesses.get(seq.seq_id)
        if not guess:
            return []
        room = min(budget - 1, self.config.max_model_len - len(seq.token_ids) - 1)
        return list(guess[:max(room, 0)])

    def _preempt(self, seq: EngineSequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.status, seq.num_computed_tokens = SequenceStatus.WAITING, 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

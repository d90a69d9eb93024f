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

The scheduler works on any object with `seq_id`, `prompt_ids` and `output_ids` (the engine's
`Sequence`); it keeps its own copy of each sequence's tokens, extended by `commit`.
"""
from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from jupyter_llm.backends.native.kv_cache import BlockManager


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


class _Entry:
    """The scheduler's record of one sequence."""

    __slots__ = ("num_computed", "order", "running", "seq", "seq_id", "tokens")

    def __init__(self, seq: Any, order: int) -> None:
        self.seq = seq
        self.seq_id = seq.seq_id
        self.tokens: list[int] = list(seq.prompt_ids) + list(seq.output_ids)
        self.num_computed = 0  # tokens whose K/V are in this sequence's blocks
        self.order = order  # arrival order: lower is older
        self.running = False

    def __lt__(self, other: _Entry) -> bool:
        return self.order < other.order


@dataclass
class ScheduledChunk:
    """Compute tokens[start:end] of a sequence in this step."""

    seq: Any
    tokens: list[int]  # the sequence's tokens (the scheduler's list: read, don't modify)
    start: int
    end: int
    guesses: list[int] = field(default_factory=list)  # speculative tokens computed after tokens[end - 1]

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's last token, so its logits give the next one."""
        return self.end == len(self.tokens)

    @property
    def num_tokens(self) -> int:
        return self.end - self.start + len(self.guesses)

    @property
    def token_ids(self) -> list[int]:
        """The tokens this chunk computes."""
        return self.tokens[self.start:self.end] + self.guesses


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Any] = field(default_factory=list)  # sequences preempted while scheduling
    admitted: list[Any] = field(default_factory=list)  # sequences that started (or restarted) in this step

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    """Continuous batching over a `BlockManager` (see the module docstring for the policy)."""

    def __init__(self, blocks: BlockManager, config: SchedulerConfig) -> None:
        self.blocks = blocks
        self.config = config
        self.waiting: deque[_Entry] = deque()
        self.running: list[_Entry] = []  # sorted by arrival order
        self._entries: dict[int, _Entry] = {}
        self._order = itertools.count()
        self.num_preemptions = 0
        self._watermark_blocks = max(1, int(config.watermark * blocks.num_total_blocks())) if config.watermark else 0

    # -- queries --------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def counts(self) -> tuple[int, int]:
        """(running, waiting) sequences."""
        return len(self.running), len(self.waiting)

    def __contains__(self, seq: Any) -> bool:
        return seq.seq_id in self._entries

    def num_computed(self, seq: Any) -> int:
        return self._entries[seq.seq_id].num_computed

    def tokens(self, seq: Any) -> list[int]:
        return self._entries[seq.seq_id].tokens

    def decoding(self) -> list[tuple[Any, list[int]]]:
        """(sequence, its tokens) of the running sequences whose next step is a decode."""
        return [(e.seq, e.tokens) for e in self.running if len(e.tokens) - e.num_computed == 1]

    # -- life cycle -----------------------------------------------------------------------

    def add(self, seq: Any) -> None:
        if seq.seq_id in self._entries:
            raise ValueError(f"sequence {seq.seq_id} is already scheduled")
        tokens = len(seq.prompt_ids) + len(seq.output_ids)
        if tokens >= self.config.max_model_len:
            raise ValueError(f"sequence of {tokens} tokens does not fit max_model_len {self.config.max_model_len}")
        entry = _Entry(seq, next(self._order))
        self._entries[entry.seq_id] = entry
        self.waiting.append(entry)

    def remove(self, seq: Any) -> None:
        """Forget a sequence (finished, cancelled or failed) and free its blocks. Idempotent."""
        entry = self._entries.pop(seq.seq_id, None)
        if entry is None:
            return
        if entry.running:
            self.running.remove(entry)
            self.blocks.free(entry.seq_id)
        else:
            self.waiting.remove(entry)

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
            entry = self.running[i]
            n = min(len(entry.tokens) - entry.num_computed, budget)
            end = entry.num_computed + n
            tokens = entry.tokens if end == len(entry.tokens) else entry.tokens[:end]
            guess = self._fit_guess(entry, guesses, budget) if guesses and n == 1 and end == len(tokens) else []
            if guess and blocks.append_slots(entry.seq_id, tokens + guess, n + len(guess)):
                out.chunks.append(ScheduledChunk(entry.seq, entry.tokens, entry.num_computed, end, guess))
                budget -= n + len(guess)
                i += 1
                continue
            while not blocks.append_slots(entry.seq_id, tokens, n):
                victim = self.running[-1]  # the newest; never one already scheduled in this step
                self._preempt(victim)
                out.preempted.append(victim.seq)
                if victim is entry:
                    break
            else:
                out.chunks.append(ScheduledChunk(entry.seq, entry.tokens, entry.num_computed, end))
                budget -= n
                i += 1
        if out.preempted:
            return out
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            entry = self.waiting[0]
            reserve = self._watermark_blocks if self.running else 0
            if blocks.blocks_needed(len(entry.tokens)) + reserve > blocks.num_free_blocks():
                break
            self.waiting.popleft()
            entry.num_computed = blocks.allocate(entry.seq_id, entry.tokens)
            entry.running = True
            bisect.insort(self.running, entry)
            n = min(len(entry.tokens) - entry.num_computed, budget)
            end = entry.num_computed + n
            tokens = entry.tokens if end == len(entry.tokens) else entry.tokens[:end]
            ok = blocks.append_slots(entry.seq_id, tokens, n)
            assert ok, "the table of a newly allocated sequence covers its prompt"
            out.chunks.append(ScheduledChunk(entry.seq, entry.tokens, entry.num_computed, end))
            out.admitted.append(entry.seq)
            budget -= n
        return out

    def commit(self, out: SchedulerOutput, emitted: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
        """The step ran: its chunks are computed, and `emitted` holds the new tokens of each chunk
        that samples, in chunk order: one token, or for a chunk with guesses the accepted
        guesses plus one. Returns the KV block copies that `KVCachePool.copy_blocks` must apply
        (copy-on-write after dropping rejected guesses; usually none)."""
        copies: list[tuple[int, int]] = []
        tokens = iter(emitted)
        for chunk in out.chunks:
            new = next(tokens) if chunk.samples else ()
            entry = self._entries.get(chunk.seq.seq_id)
            if entry is None:
                continue
            entry.tokens.extend(new)
            accepted = max(len(new) - 1, 0) if chunk.guesses else 0
            entry.num_computed = chunk.end + accepted
            if accepted < len(chunk.guesses) and entry.running:
                try:
                    copies += self.blocks.truncate(entry.seq_id, entry.num_computed)
                except RuntimeError:  # no block for the copy-on-write: recompute this sequence later
                    self._preempt(entry)
        return copies

    def abort(self, out: SchedulerOutput) -> None:
        """The step failed: forget the slots it announced (blocks it would have completed must
        not stay in the prefix cache without their K/V)."""
        admitted = {seq.seq_id for seq in out.admitted}
        for chunk in reversed(out.chunks):
            entry = self._entries.get(chunk.seq.seq_id)
            if entry is None or not entry.running:
                continue
            if entry.seq_id in admitted:
                # Its cache hits may be blocks that another chunk of this step was to fill: drop
                # them all (truncate, unlike free, unregisters) and queue it again.
                self.blocks.truncate(entry.seq_id, 0)
                self.blocks.free(entry.seq_id)
                self.running.remove(entry)
                entry.running, entry.num_computed = False, 0
                self.waiting.appendleft(entry)
            else:
                self.blocks.truncate(entry.seq_id, chunk.start)

    # -- internals ------------------------------------------------------------------------

    def _fit_guess(self, entry: _Entry, guesses: dict[int, list[int]], budget: int) -> list[int]:
        """The entry's guesses cut to the token budget and to max_model_len."""
        guess = guesses.get(entry.seq_id)
        if not guess:
            return []
        room = min(budget - 1, self.config.max_model_len - len(entry.tokens) - 1)
        return list(guess[:max(room, 0)])

    def _preempt(self, entry: _Entry) -> None:
        self.running.remove(entry)
        self.blocks.free(entry.seq_id)
        entry.running = False
        entry.num_computed = 0
        self.waiting.appendleft(entry)
        self.num_preemptions += 1

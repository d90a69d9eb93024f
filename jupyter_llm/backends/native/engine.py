"""The native engine's step: `NativeStepEngine` and `build_engine`, which puts it together.

`NativeStepEngine.step` asks the `Scheduler` for this step's chunks (decodes of every running
sequence plus prefill chunks of waiting prompts, within a token budget), runs them in one
batched forward through the `ModelRunner` over the paged KV pool, samples the sequences
whose chunk reached their last token with the shared `Sampler`, and hands the tokens back
to the compute thread, which detokenizes, matches stop strings and ends sequences (calling
`remove`, which frees their blocks).
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from jupyter_llm.backends.inprocess import LogprobEntry, StepEngine
from jupyter_llm.backends.native.config import ModelConfig
from jupyter_llm.backends.native.model_runner import ModelRunner, StepItem, build_runner
from jupyter_llm.backends.native.proposers import DraftModelProposer
from jupyter_llm.backends.native.scheduler import ScheduledChunk, Scheduler, SchedulerConfig
from jupyter_llm.backends.native.speculative import SpeculativeConfig, Speculator
from jupyter_llm.backends.native.verify import Proposal, verify
from jupyter_llm.backends.sequence import EngineSequence
from jupyter_llm.sampling import Sampler, token_logprobs

SAMPLER_ROWS = 8  # rows per call of the shared sampler (see NativeStepEngine._sample)
Emitted = tuple[list[int], list[LogprobEntry | None]]  # a sequence's tokens this step and their logprobs


class NativeStepEngine(StepEngine):
    """Continuous batching: one forward per step over every scheduled chunk, with speculative
    guesses verified in that same forward when a `Speculator` is given."""

    def __init__(self, runner: ModelRunner, scheduler: Scheduler, speculator: Speculator | None = None) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.blocks = scheduler.blocks
        self.sampler = Sampler()
        self.speculator = speculator
        self.steps = 0

    def add(self, seq: EngineSequence) -> None:
        self.scheduler.add(seq)

    def remove(self, seq: EngineSequence) -> None:
        self.scheduler.remove(seq)
        if self.speculator is not None:
            self.speculator.remove(seq.seq_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def counts(self) -> tuple[int, int]:
        return self.scheduler.counts()

    def stats(self) -> dict[str, Any]:
        blocks = self.blocks
        total = blocks.num_total_blocks()
        queries = blocks.prefix_cache_queries
        stats = {
            "kv_blocks_used": total - blocks.num_free_blocks(),
            "kv_blocks_total": total,
            "prefix_cache_hit_rate": round(blocks.prefix_cache_hits / queries, 3) if queries else 0.0,
            "preemptions": self.scheduler.num_preemptions,
            "decode_ops": "fused" if self.runner.fused is not None else "eager",
        }
        if self.speculator is not None:
            stats["speculative"] = self.speculator.config.describe()
            stats.update(self.speculator.stats.as_dict())
        return stats

    def step(self) -> list[tuple[EngineSequence, int, LogprobEntry | None]]:
        started = time.perf_counter()  # the speed-up estimate counts the proposer's time too
        proposals, base_len = self._propose()
        out = self.scheduler.schedule({sid: p.tokens for sid, p in proposals.items()} if proposals else None)
        if not out.chunks:
            self._roll_back_draft(proposals, base_len, {})
            return []
        blocks = self.blocks
        items = [StepItem(c.seq.seq_id, c.token_ids, c.start, blocks.block_table(c.seq.seq_id),
                          blocks.slot_mapping(c.seq.seq_id, c.start, c.start + c.num_tokens)) for c in out.chunks]
        guessing = any(c.guesses for c in out.chunks)
        sampling = [c for c in out.chunks if c.samples]
        try:
            num_logits = [1 + len(c.guesses) if c.samples else 1 for c in out.chunks] if guessing else None
            logits = self.runner.run(items, num_logits=num_logits)
            if logits.device.type != "cpu":  # the shared sampler's per-row tensors live on the CPU
                logits = logits.cpu()
            emitted = self._emit(out.chunks, logits, proposals)
        except BaseException:
            self.scheduler.abort(out)
            self._roll_back_draft(proposals, base_len, {})
            raise
        self.runner.kv_pool.copy_blocks(self.scheduler.commit(out, [tokens for tokens, _ in emitted.values()]))
        self.steps += 1
        results = []
        for chunk in sampling:
            tokens, logprobs = emitted[chunk.seq.seq_id]
            results += [(chunk.seq, token, logprob) for token, logprob in zip(tokens, logprobs)]
        if self.speculator is not None:
            accepted = {c.seq.seq_id: len(emitted[c.seq.seq_id][0]) - 1 for c in sampling if c.guesses}
            for chunk in sampling:
                if chunk.guesses:
                    self.speculator.verified(proposals[chunk.seq.seq_id], chunk.seq.seq_id, len(chunk.guesses),
                                             accepted[chunk.seq.seq_id])
            self._roll_back_draft(proposals, base_len, accepted)
            if all(c.end - c.start == 1 for c in out.chunks):  # decode-only steps measure the speed-up
                self.speculator.stats.record_step(time.perf_counter() - started, len(results), guessing)
        return results

    def _propose(self) -> tuple[dict[int, Proposal], dict[int, int]]:
        """This step's guesses by seq_id, and each guessed sequence's length before the step."""
        if self.speculator is None:
            return {}, {}
        decoding = self.scheduler.decoding()
        proposals = self.speculator.propose(decoding, self.scheduler.config.max_model_len)
        return proposals, {seq.seq_id: len(tokens) for seq, tokens in decoding if seq.seq_id in proposals}

    def _roll_back_draft(self, proposals: dict[int, Proposal], base_len: dict[int, int],
                         accepted: dict[int, int]) -> None:
        """Keep the draft model's K/V of the tokens that stay: those known before the step plus
        the accepted guesses (none for a sequence whose guesses did not run)."""
        for seq_id in proposals:
            self.speculator.committed(seq_id, base_len[seq_id] + accepted.get(seq_id, 0))

    def _emit(self, chunks: list[ScheduledChunk], logits: torch.Tensor,
              proposals: dict[int, Proposal]) -> dict[int, Emitted]:
        """The tokens (and logprobs) each sampling chunk emits, by seq_id. `logits` holds one row
        per chunk, or 1 + len(guesses) rows for a sampling chunk with guesses."""
        emitted: dict[int, Emitted] = {}
        plain_rows: list[int] = []
        plain: list[EngineSequence] = []
        row = 0
        for chunk in chunks:
            width = 1 + len(chunk.guesses) if chunk.samples and chunk.guesses else 1
            if chunk.samples and chunk.guesses:
                seq = chunk.seq
                rows = logits[row:row + width]
                proposal = proposals[seq.seq_id]
                proposal.tokens = chunk.guesses  # the scheduler may have cut them to its budget
                if proposal.probs is not None:
                    proposal.probs = proposal.probs[:len(chunk.guesses)]
                tokens = verify(rows, proposal, seq.sampling)
                logprobs = token_logprobs(rows[:len(tokens)], tokens, [seq.params.logprobs] * len(tokens))
                for token in tokens:
                    seq.sampling.append(token)
                emitted[seq.seq_id] = (tokens, logprobs)
            elif chunk.samples:
                plain_rows.append(row)
                plain.append(chunk.seq)
            row += width
        if plain:
            rows = logits if len(plain_rows) == logits.shape[0] else logits[plain_rows]
            token_ids, logprobs = self._sample(rows, plain)
            for seq, token, logprob in zip(plain, token_ids, logprobs):
                emitted[seq.seq_id] = ([token], [logprob])
        return {c.seq.seq_id: emitted[c.seq.seq_id] for c in chunks if c.samples}

    def _sample(self, logits: torch.Tensor, seqs: list[EngineSequence]) -> Emitted:
        """The shared sampler over blocks of SAMPLER_ROWS rows: every row is sampled on its own
        (its own parameters and generator), and a [8, vocab] block stays in the CPU cache across
        the sampler's passes, which makes a batch cheaper than one call over every row."""
        token_ids: list[int] = []
        logprobs: list[LogprobEntry | None] = []
        for start in range(0, len(seqs), SAMPLER_ROWS):
            block = seqs[start:start + SAMPLER_ROWS]
            rows = logits if len(block) == len(seqs) else logits[start:start + len(block)]
            sampled = self.sampler(rows, [s.sampling for s in block])
            token_ids += sampled.token_ids
            logprobs += sampled.logprobs
        return token_ids, logprobs


def build_engine(model: nn.Module, config: ModelConfig, *, num_blocks: int, block_size: int = 16,
                 enable_prefix_caching: bool = True, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 max_model_len: int | None = None, speculative: SpeculativeConfig | None = None,
                 draft: tuple[nn.Module, ModelConfig, int] | None = None, fused_ops: bool = True) -> NativeStepEngine:
    """A step engine over `model`: its runner and KV pool, a Scheduler, and with a
    `SpeculativeConfig` a Speculator (`draft`: the draft model, its config and its pool's
    block count, for method "draft"; `fused_ops`: decode steps through fused/, see model_runner.py).
    What `NativeBackend.load` builds; tests use it directly."""
    runner, blocks = build_runner(model, config, num_blocks, block_size, enable_prefix_caching, fused_ops)
    scheduler = Scheduler(blocks, SchedulerConfig(max_num_seqs=max_num_seqs,
                                                  max_num_batched_tokens=max_num_batched_tokens,
                                                  max_model_len=max_model_len or config.max_position_embeddings))
    speculator = None
    if speculative is not None:
        proposer = None
        if speculative.method == "draft":
            if draft is None:
                raise ValueError("speculative method 'draft' needs the draft model")
            draft_model, draft_config, draft_blocks = draft
            proposer = DraftModelProposer(*build_runner(draft_model, draft_config, draft_blocks, block_size,
                                                        enable_prefix_caching))
        speculator = Speculator(speculative, proposer)
    return NativeStepEngine(runner, scheduler, speculator)

"""`ModelRunner`: turns one scheduled step (a list of `StepItem`s) into tensors, runs the model, returns logits.

`build_runner` gives a runner its KV pool and the pool's BlockManager; `prefill_logits` runs one
prompt over a scratch pool of its own (calibration, perplexity, tests)."""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from jupyter_llm.backends.native.attention import AttentionMetadata
from jupyter_llm.backends.native.config import ModelConfig
from jupyter_llm.backends.native.fused.decode import FusedLlamaDecoder, TokenRows
from jupyter_llm.backends.native.fused.ops import fused_ops
from jupyter_llm.backends.native.kv_cache import BlockManager, KVCachePool
from jupyter_llm.backends.native.threads import ThreadChooser


@dataclass
class StepItem:
    """One sequence's share of a step: compute `token_ids`, which sit at positions
    [start_pos, start_pos + len(token_ids)); the first start_pos tokens already have K/V in the
    blocks of `block_table`. `slot_mapping` gives the pool slot of each new token
    (`BlockManager.slot_mapping(seq_id, start_pos, start_pos + len(token_ids))`)."""

    seq_id: int
    token_ids: Sequence[int]
    start_pos: int
    block_table: Sequence[int]
    slot_mapping: Sequence[int]


class ModelRunner:
    """Runs the model over a batch that mixes decode tokens and prefill chunks of several sequences."""

    def __init__(self, model: nn.Module, config: ModelConfig, kv_pool: KVCachePool, fused: bool = True) -> None:
        self.model = model
        self.config = config
        self.kv_pool = kv_pool
        self.device = kv_pool.k.device
        self.thread_chooser = ThreadChooser()
        # Every step of a float32 Llama runs through the fused ops when they are built here.
        ops = fused_ops() if fused and FusedLlamaDecoder.supports(model) and self.device.type == "cpu" else None
        self.fused = FusedLlamaDecoder(model, ops) if ops is not None else None

    @torch.inference_mode()
    def run(self, batch: Sequence[StepItem], num_logits: Sequence[int] | None = None) -> torch.Tensor:
        """Compute one step; return logits (float32, or float64 for a float64 model) of the last
        new token of each item, [B, V] (for an item that is a mid-prompt chunk the caller ignores
        its row). With `num_logits`, return the logits of the last num_logits[i] new tokens of
        item i instead, concatenated in batch order (speculative verification needs every
        guessed position).

        On the eager path, single-token items (decodes) go first in the flat batch, sorted by
        context length, so that attention batches them with no reordering (see attention.py);
        rows come back in the caller's order."""
        query_lens = [len(item.token_ids) for item in batch]
        wanted = num_logits or [1] * len(batch)
        if self.fused is not None:
            return self._run_fused(batch, query_lens, wanted)
        # Decodes first, shortest context first (attention groups them by length), then chunks.
        order = sorted(range(len(batch)),
                       key=lambda i: (query_lens[i] != 1, batch[i].start_pos if query_lens[i] == 1 else 0))
        positions: list[int] = []
        input_ids: list[int] = []
        slots: list[int] = []
        starts = [0] * len(batch)  # row of each item's first token in the flat batch
        for i in order:
            item, n = batch[i], query_lens[i]
            starts[i] = len(input_ids)
            input_ids.extend(item.token_ids)
            positions.extend(range(item.start_pos, item.start_pos + n))
            slots.extend(item.slot_mapping)
        meta = AttentionMetadata.build(
            query_lens=[query_lens[i] for i in order],
            context_lens=[batch[i].start_pos + query_lens[i] for i in order],
            block_tables=[batch[i].block_table for i in order],
            slot_mapping=slots,
            block_size=self.kv_pool.block_size,
            device=self.device,
        )
        ids = torch.tensor(input_ids, device=self.device)
        pos = torch.tensor(positions, device=self.device)
        rows = [starts[i] + j for i in range(len(batch)) for j in range(query_lens[i] - wanted[i], query_lens[i])]

        def compute() -> torch.Tensor:
            hidden = self.model(ids, pos, meta, self.kv_pool)
            if rows != list(range(len(input_ids))):
                hidden = hidden.index_select(0, torch.tensor(rows, device=self.device))
            return self.model.compute_logits(hidden)

        logits = self._on_chosen_threads(len(batch), compute) if max(query_lens) == 1 else compute()
        return logits.to(torch.promote_types(logits.dtype, torch.float32))


    def _run_fused(self, batch: Sequence[StepItem], query_lens: list[int], wanted: Sequence[int]) -> torch.Tensor:
        """A step through the fused ops: every token a row, in the caller's order."""
        tokens = TokenRows.build([item.start_pos for item in batch], query_lens,
                                 [slot for item in batch for slot in item.slot_mapping],
                                 [item.block_table for item in batch], self.kv_pool.block_size)
        ids = torch.tensor([token for item in batch for token in item.token_ids])
        rows = [end - j for end, n in zip(itertools.accumulate(query_lens), wanted) for j in range(n, 0, -1)]

        def compute() -> torch.Tensor:
            hidden = self.fused.hidden(ids, tokens, self.kv_pool)
            if len(rows) != len(ids):
                hidden = hidden.index_select(0, torch.tensor(rows))
            return self.model.compute_logits(hidden)

        return self._on_chosen_threads(len(ids), compute)

    def _on_chosen_threads(self, tokens: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A step on the thread count `ThreadChooser` picks for its size, timed for it."""
        available = torch.get_num_threads()
        threads = self.thread_chooser.threads_for(tokens, available)
        if threads != available:
            torch.set_num_threads(threads)
        started = time.perf_counter()
        try:
            out = compute()
        finally:
            if threads != available:
                torch.set_num_threads(available)
        self.thread_chooser.record(tokens, threads, time.perf_counter() - started, available)
        return out


def build_runner(model: nn.Module, config: ModelConfig, num_blocks: int, block_size: int,
                 enable_prefix_caching: bool, fused: bool = True) -> tuple[ModelRunner, BlockManager]:
    """A ModelRunner over a KV pool of `num_blocks` blocks in the model's dtype and device, and
    the pool's BlockManager (`fused`: decode steps through the fused ops where they apply)."""
    param = next(model.parameters())  # the embedding: float even in an int8 model
    pool = KVCachePool.for_model(config, num_blocks, block_size, param.dtype, param.device)
    return ModelRunner(model, config, pool, fused), BlockManager(num_blocks, block_size, enable_prefix_caching)


def prefill_logits(model: nn.Module, config: ModelConfig, token_ids: Sequence[int], num_logits: int = 1,
                   block_size: int = 16, fused: bool = True) -> torch.Tensor:
    """The logits of the last `num_logits` of `token_ids` from one prefill over a scratch KV pool
    just large enough (any engine's own pool is left alone). `fused=False` runs the modules'
    own forward (forward hooks see it)."""
    n = len(token_ids)
    runner, blocks = build_runner(model, config, -(-n // block_size), block_size, enable_prefix_caching=False,
                                  fused=fused)
    blocks.allocate(0, token_ids)
    blocks.append_slots(0, token_ids, n)
    item = StepItem(0, token_ids, 0, blocks.block_table(0), blocks.slot_mapping(0, 0, n))
    return runner.run([item], num_logits=[num_logits])

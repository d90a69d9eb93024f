"""The paged KV cache: a pool of fixed-size blocks and the manager of who owns which block.

Vocabulary:
  * a *block* holds the K/V of `block_size` consecutive tokens of one sequence, in every layer;
  * a sequence's *block table* lists its block ids in order: token at position p lives in block
    `table[p // block_size]`, offset `p % block_size`;
  * its *slot* is the flat index `table[p // block_size] * block_size + p % block_size` into the
    pool viewed as [num_layers, num_blocks * block_size, num_kv_heads, head_dim] (for each layer
    and KV head, the slots are contiguous rows of head_dim: see `KVCachePool`);
  * the *prefix cache* maps the hash of a FULL block (hash of the previous block, its token ids)
    to the block that holds its K/V, so that a new sequence with the same leading tokens
    shares those blocks (reference counted) instead of recomputing them.

`kv_cache_budget` and `size_kv_pool` decide how large the pool of a loaded model is.
"""
from __future__ import annotations

import hashlib
import math
import mmap
import warnings
from collections import OrderedDict
from collections.abc import Sequence

import torch

from jupyter_llm.backends.native.config import ModelConfig
from jupyter_llm.errors import ParamError

DEFAULT_CPU_KV_CACHE_MEMORY = 1 << 30
CUDA_KV_SHARE = 0.6  # of the GPU memory free after loading the weights (the rest: activations)


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zero tensor whose CPU pages become resident only when written: an anonymous memory map
    is zero pages until touched (torch.zeros writes every byte), so a 1 GiB pool costs the memory
    of the blocks in use. Not numpy's zeros: numpy asks for huge pages on large arrays, and one
    block touches a page in each (layer, head) slab of the pool, which would fault in 2 MiB per
    slab. Other devices get torch.zeros."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    with warnings.catch_warnings():  # "the given buffer is not writable" does not apply to an anonymous map
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8).view(dtype).view(shape)


class KVCachePool:
    """Preallocated K and V tensors, indexed [layer, block, offset, kv_head, dim].

    In memory they are head-major, [num_layers, num_kv_heads, num_blocks, block_size, head_dim]
    (`k_heads`, `v_heads`); `k` and `v` are views of them in the indexing order above. Head-major
    storage lets decode attention gather a sequence's keys per KV head as one contiguous
    [tokens, head_dim] matrix and multiply it without another copy (see attention.py).
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_layers, num_kv_heads, num_blocks, block_size, head_dim)
        # Zeros, not empty: attention reads padded slots (masked out), which must never be NaN.
        self.k_heads = lazy_zeros(shape, dtype, device)
        self.v_heads = lazy_zeros(shape, dtype, device)
        self.k = self.k_heads.permute(0, 2, 3, 1, 4)  # [layers, blocks, block_size, kv_heads, head_dim]
        self.v = self.v_heads.permute(0, 2, 3, 1, 4)
        self.num_blocks = num_blocks
        self.block_size = block_size

    @classmethod
    def for_model(
        cls, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str
    ) -> KVCachePool:
        return cls(config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim, dtype, device)

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block takes in K and V together, across all layers."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * elem

    @classmethod
    def num_blocks_for_budget(cls, budget_bytes: int, config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """How many blocks fit in `budget_bytes` of memory."""
        return max(0, budget_bytes // cls.bytes_per_block(config, block_size, dtype))

    def copy_blocks(self, copies: Sequence[tuple[int, int]]) -> None:
        """Copy the K/V of block src into block dst for each (src, dst): applies `BlockManager.truncate`'s answer."""
        if copies:
            src = torch.tensor([s for s, _ in copies], device=self.k.device)
            dst = torch.tensor([d for _, d in copies], device=self.k.device)
            self.k[:, dst] = self.k[:, src]
            self.v[:, dst] = self.v[:, src]


def kv_cache_budget(requested: int | None, device: str) -> int:
    """Bytes for the KV pool: `requested`, else 1 GiB on the CPU or a share of the GPU's free memory."""
    if requested is not None:
        return requested
    if not device.startswith("cuda"):
        return DEFAULT_CPU_KV_CACHE_MEMORY
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(free * CUDA_KV_SHARE)


def size_kv_pool(budget: int, config: ModelConfig, block_size: int, dtype: torch.dtype, max_num_seqs: int,
                 max_model_len: int, fixed_len: bool) -> tuple[int, int]:
    """(num_blocks, max_model_len) of a pool in `budget` bytes. A pool too small for one sequence
    of `max_model_len` lowers it to what the pool holds, unless the length was asked for
    (`fixed_len`) or the pool holds less than two blocks: then it is an error."""
    num_blocks = KVCachePool.num_blocks_for_budget(budget, config, block_size, dtype)
    # More than every sequence at full length can use is wasted memory.
    num_blocks = min(num_blocks, max_num_seqs * -(-max_model_len // block_size) + 1)
    capacity = num_blocks * block_size
    if capacity >= max_model_len:
        return num_blocks, max_model_len
    if fixed_len or capacity < 2 * block_size:
        per_token = KVCachePool.bytes_per_block(config, block_size, dtype) // block_size
        raise ParamError(f"the KV cache ({budget} bytes, {capacity} tokens of {per_token} bytes) cannot "
                         f"hold one sequence of max_model_len {max_model_len}; raise --kv-cache-memory "
                         f"or lower --max-model-len")
    return num_blocks, capacity


class BlockManager:
    """Fixed-size block pool with per-sequence block tables, reference counts and a prefix cache.

    Protocol for a scheduler (every step, for every sequence that runs in it):

      * new sequence: `can_allocate(len(prompt))`, then `n = allocate(seq_id, prompt)`; the table
        then covers the whole prompt and the first `n` tokens (`num_cached_tokens`) already have
        their K/V in shared blocks: compute only prompt[n:];
      * before the step that computes tokens [start, end) of the sequence, call
        `append_slots(seq_id, token_ids[:end], end - start)`; it grows the table if needed (False,
        and nothing changed, when the pool is out of blocks) and registers in the prefix cache the
        blocks that these tokens complete. Call it only for steps that do run: a registered block
        is trusted to hold its K/V (if a step is abandoned, `truncate` back to `start`);
      * `slot_mapping(seq_id, start, end)` and `block_table(seq_id)` feed the model runner;
      * `truncate(seq_id, n)` drops tokens from position n on (rejected speculative tokens);
      * `free(seq_id)` when the sequence ends or is preempted.

    Blocks shared through the prefix cache are always full and are never written again. Freed
    blocks that are registered stay cached (evictable, LRU) until a fresh block is needed;
    `num_free_blocks()` counts them as free.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._num_blocks = num_blocks
        self._ref_count = [0] * num_blocks
        # Content hash of each block registered full by append_slots (else None); chains the next hash.
        self._block_hash: list[int | None] = [None] * num_blocks
        # (parent hash, token ids) per registered block, to tell hash collisions from hits.
        self._block_key: dict[int, tuple[int | str | None, tuple[int, ...]]] = {}
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # unreferenced, unregistered
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced, registered; LRU first
        self._hash_to_block: dict[int, int] = {}
        self._salts: dict[int, str | None] = {}  # per sequence: the start of its hash chain
        self._tables: dict[int, list[int]] = {}
        self.prefix_cache_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_cache_hits = 0  # of which found cached

    # -- queries ------------------------------------------------------------------------

    def num_total_blocks(self) -> int:
        return self._num_blocks

    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now: free ones plus cached blocks nobody references."""
        return len(self._free) + len(self._evictable)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether `allocate` of a prompt of `num_tokens` tokens will succeed (ignoring cache hits)."""
        return self.blocks_needed(num_tokens) <= self.num_free_blocks()

    def block_table(self, seq_id: int) -> list[int]:
        """The sequence's block ids in order (the manager's own list: do not modify)."""
        return self._tables[seq_id]

    def slot_mapping(self, seq_id: int, start: int, end: int) -> list[int]:
        """Flat slots (block_id * block_size + offset) of the sequence's positions [start, end)."""
        table, bs = self._tables[seq_id], self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    # -- mutations ----------------------------------------------------------------------

    def allocate(self, seq_id: int, token_ids: Sequence[int], salt: str | None = None) -> int:
        """Give a new sequence a table covering its prompt; return num_cached_tokens.

        `salt` starts the sequence's hash chain: blocks are shared only between sequences of
        the same salt (vLLM's cache_salt), so that time to first token cannot tell one API key
        another's prompt.

        num_cached_tokens is a multiple of block_size: the leading full blocks found in the
        prefix cache, which the prefill skips. The block holding the last prompt token is
        never taken from the cache, so at least that token is computed (its logits are needed).
        """
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} already has blocks")
        if not self.can_allocate(len(token_ids)):
            raise RuntimeError(f"not enough free KV blocks for {len(token_ids)} tokens")
        table: list[int] = []
        self._salts[seq_id] = salt
        if self.enable_prefix_caching:
            parent: int | str | None = salt
            for i in range((len(token_ids) - 1) // self.block_size):
                key = (parent, tuple(token_ids[i * self.block_size : (i + 1) * self.block_size]))
                block = self._hash_to_block.get(_digest(key))
                if block is None or self._block_key[block] != key:
                    break
                if self._ref_count[block] == 0:
                    del self._evictable[block]
                self._ref_count[block] += 1
                table.append(block)
                parent = self._block_hash[block]
            self.prefix_cache_queries += len(token_ids)
            self.prefix_cache_hits += len(table) * self.block_size
        num_cached = len(table) * self.block_size
        while len(table) < self.blocks_needed(len(token_ids)):
            table.append(self._take_free_block())
        self._tables[seq_id] = table
        return num_cached

    def append_slots(self, seq_id: int, token_ids: Sequence[int], num_new: int) -> bool:
        """Make room for the last `num_new` of `token_ids` (all of the sequence's tokens up to the
        end of this step) and register the blocks they complete in the prefix cache.

        Returns False, changing nothing, if the pool lacks free blocks.
        """
        table = self._tables[seq_id]
        missing = self.blocks_needed(len(token_ids)) - len(table)
        if missing > self.num_free_blocks():
            return False
        for _ in range(missing):
            table.append(self._take_free_block())
        if self.enable_prefix_caching:
            bs = self.block_size
            for i in range((len(token_ids) - num_new) // bs, len(token_ids) // bs):
                parent = self._block_hash[table[i - 1]] if i else self._salts.get(seq_id)
                self._register(table[i], (parent, tuple(token_ids[i * bs : (i + 1) * bs])))
        return True

    def truncate(self, seq_id: int, num_tokens: int) -> list[tuple[int, int]]:
        """Keep only the first `num_tokens` tokens of the sequence (drop rejected speculative tokens).

        Dropped blocks leave the prefix cache. If the block that now ends the sequence is
        shared, the sequence gets a private copy: the returned (src, dst) block pairs must be
        applied with `KVCachePool.copy_blocks` before the next step (usually the list is empty).
        Raises RuntimeError, changing nothing, if that copy needs a block and none is free.
        """
        table = self._tables[seq_id]
        keep = self.blocks_needed(num_tokens)
        if keep > len(table):
            raise ValueError(f"sequence {seq_id} holds fewer than {num_tokens} tokens")
        partial = num_tokens % self.block_size != 0  # the new last block will be written again
        needs_copy = partial and self._ref_count[table[keep - 1]] > 1
        # Dropping the tail frees a block unless all of it is shared too.
        if needs_copy and self.num_free_blocks() == 0 and all(self._ref_count[b] > 1 for b in table[keep:]):
            raise RuntimeError("no free KV block for the copy-on-write of a shared block")
        while len(table) > keep:
            self._release(table.pop(), keep_cached=False)
        copies: list[tuple[int, int]] = []
        if partial:
            last = table[-1]
            if needs_copy:
                table[-1] = self._take_free_block()
                self._ref_count[last] -= 1
                copies.append((last, table[-1]))
            else:
                self._unregister(last)
        return copies

    def free(self, seq_id: int) -> None:
        """Release the sequence's blocks; registered ones stay in the prefix cache until evicted."""
        self._salts.pop(seq_id, None)
        for block in reversed(self._tables.pop(seq_id)):  # tail first: evicted before the shared head
            self._release(block, keep_cached=True)

    # -- internals ----------------------------------------------------------------------

    def _take_free_block(self) -> int:
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)  # least recently used
            self._unregister(block)
        self._ref_count[block] = 1
        return block

    def _release(self, block: int, keep_cached: bool) -> None:
        self._ref_count[block] -= 1
        if self._ref_count[block] > 0:
            return
        if keep_cached and block in self._block_key:
            self._evictable[block] = None
        else:
            self._unregister(block)
            self._free.append(block)

    def _register(self, block: int, key: tuple[int | str | None, tuple[int, ...]]) -> None:
        h = _digest(key)
        self._block_hash[block] = h
        if h not in self._hash_to_block:  # first wins; an equal block computed twice stays private
            self._hash_to_block[h] = block
            self._block_key[block] = key

    def _unregister(self, block: int) -> None:
        h = self._block_hash[block]
        self._block_hash[block] = None
        if self._block_key.pop(block, None) is not None:
            del self._hash_to_block[h]


def _digest(key: tuple[int | str | None, tuple[int, ...]]) -> int:
    """A block's content hash: SHA-256 of (parent hash or salt, token ids). Python's `hash` of
    ints is predictable, so crafted prompts could pile blocks onto one bucket."""
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:16], "little")

"""BlockManager and KVCachePool: examples, then a hypothesis property test over random interleavings."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jupyter_llm.backends.native.config import ModelConfig
from jupyter_llm.backends.native.kv_cache import BlockManager, KVCachePool

BS = 4


def computed(bm: BlockManager, seq_id: int, tokens: list[int], start: int = 0) -> None:
    """Tell the manager that tokens[start:] are computed in the step that follows."""
    assert bm.append_slots(seq_id, tokens, len(tokens) - start)


def test_tables_and_slot_mapping():
    bm = BlockManager(8, BS)
    assert bm.allocate(0, list(range(6))) == 0
    table = bm.block_table(0)
    assert len(table) == 2 and bm.num_free_blocks() == 6
    assert bm.slot_mapping(0, 3, 6) == [table[0] * BS + 3, table[1] * BS, table[1] * BS + 1]
    assert bm.append_slots(0, list(range(9)), 3)  # grows to 3 blocks
    assert len(bm.block_table(0)) == 3
    bm.free(0)
    assert bm.num_free_blocks() == 8


def test_a_salt_keeps_its_cached_blocks_to_itself():
    """vLLM's cache_salt: a prefix computed under one salt is a hit only for the same salt."""
    bm = BlockManager(16, BS)
    prefix = [7, 1, 2, 3, 4, 5, 6, 8]
    bm.allocate(0, prefix + [9], salt="key-a")
    computed(bm, 0, prefix + [9])
    assert bm.allocate(1, prefix + [1], salt="key-b") == 0  # another key: nothing shared
    assert bm.allocate(2, prefix + [1]) == 0  # no salt is a namespace of its own too
    assert bm.allocate(3, prefix + [1], salt="key-a") == 8  # the same key: its blocks
    assert bm.block_table(3)[:2] == bm.block_table(0)[:2]
    computed(bm, 1, prefix + [1])
    bm.free(1)
    assert bm.allocate(4, prefix + [2], salt="key-b") == 8  # key-b's own blocks, cached after free


def test_shared_prefix_reuses_full_blocks_and_survives_free():
    bm = BlockManager(8, BS)
    prefix = [7, 1, 2, 3, 4, 5, 6, 8]
    bm.allocate(0, prefix + [9, 9])
    computed(bm, 0, prefix + [9, 9])
    assert bm.allocate(1, prefix + [1]) == 8
    assert bm.block_table(1)[:2] == bm.block_table(0)[:2]
    assert bm.prefix_cache_hits == 8 and bm.prefix_cache_queries == 10 + 9
    bm.free(0)
    bm.free(1)
    assert bm.num_free_blocks() == 8  # cached blocks count as free
    assert bm.allocate(2, prefix + [3, 3, 3]) == 8  # still cached after everyone freed them


def test_blocks_are_cached_only_once_computed_and_last_token_is_always_computed():
    bm = BlockManager(8, BS)
    prompt = list(range(8))
    bm.allocate(0, prompt)
    assert bm.allocate(1, prompt) == 0  # sequence 0 has not announced its step yet
    computed(bm, 0, prompt)
    assert bm.allocate(2, prompt) == 4  # the block of the last prompt token is recomputed


def test_lru_eviction_keeps_recently_freed_blocks():
    bm = BlockManager(4, BS)
    a, b = [1] * 8, [2] * 8
    for seq_id, prompt in ((0, a), (1, b)):
        bm.allocate(seq_id, prompt)
        computed(bm, seq_id, prompt)
        bm.free(seq_id)  # a's blocks freed first: least recently used
    bm.allocate(2, [3] * 8)  # needs 2 of the 4 cached blocks
    bm.free(2)
    assert bm.allocate(3, b + [0]) == 8
    bm.free(3)
    assert bm.allocate(4, a + [0]) == 0


def test_truncate_copies_a_shared_boundary_block():
    bm = BlockManager(8, BS)
    prompt = list(range(10))
    bm.allocate(0, prompt)
    computed(bm, 0, prompt)
    assert bm.allocate(1, prompt[:8] + [5]) == 8
    shared = bm.block_table(1)[1]
    copies = bm.truncate(1, 6)  # block 1 would be written again but sequence 0 uses it
    assert copies == [(shared, bm.block_table(1)[1])] and shared != bm.block_table(1)[1]
    assert bm.block_table(0)[1] == shared
    assert bm.truncate(0, 6) == []  # private now: no copy, and it leaves the prefix cache
    assert bm.allocate(2, prompt[:8] + [0]) == 4


def test_prefix_caching_can_be_disabled():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    bm.allocate(0, list(range(9)))
    computed(bm, 0, list(range(9)))
    assert bm.allocate(1, list(range(9))) == 0
    bm.free(0)
    bm.free(1)
    assert bm.num_free_blocks() == 8


def test_pool_shape_budget_and_copy():
    cfg = ModelConfig("llama", 10, 8, num_layers=3, num_heads=2, num_kv_heads=1, head_dim=4,
                      intermediate_size=16, max_position_embeddings=32, norm_eps=1e-5)
    per_block = KVCachePool.bytes_per_block(cfg, BS, torch.float32)
    assert per_block == 2 * 3 * BS * 1 * 4 * 4
    assert KVCachePool.num_blocks_for_budget(10 * per_block + 1, cfg, BS, torch.float32) == 10
    pool = KVCachePool.for_model(cfg, 5, BS, torch.float32, "cpu")
    assert pool.k.shape == (3, 5, BS, 1, 4)
    pool.k[:, 1] = 1.0
    pool.copy_blocks([(1, 3)])
    assert bool((pool.k[:, 3] == 1).all()) and bool((pool.k[:, 2] == 0).all())


# --- property test -------------------------------------------------------------------------

PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 0, 0, 0, 0, 0], [5] * 12]
NUM_BLOCKS = 10
tokens_st = st.lists(st.integers(0, 3), max_size=6)
op_st = st.one_of(
    st.tuples(st.just("alloc"), st.integers(0, 2), st.integers(4, 12), tokens_st),
    st.tuples(st.just("append"), st.integers(0, 9), tokens_st.filter(bool)),
    st.tuples(st.just("truncate"), st.integers(0, 9), st.integers(0, 30)),
    st.tuples(st.just("free"), st.integers(0, 9)),
)


class Model:
    """What the manager should guarantee, checked against a simulated KV content per slot."""

    def __init__(self, prefix_caching: bool) -> None:
        self.bm = BlockManager(NUM_BLOCKS, BS, enable_prefix_caching=prefix_caching)
        self.content: dict[int, list] = {b: [None] * BS for b in range(NUM_BLOCKS)}
        self.seqs: dict[int, list[int]] = {}  # every token of a live sequence is computed
        self.next_id = 0

    def write(self, seq_id: int, start: int) -> None:
        tokens = self.seqs[seq_id]
        others = {b for s, _ in self.seqs.items() if s != seq_id for b in self.bm.block_table(s)}
        for p, slot in zip(range(start, len(tokens)), self.bm.slot_mapping(seq_id, start, len(tokens))):
            block = slot // BS
            assert self.bm._ref_count[block] == 1 and block not in others, "write into a shared block"
            self.content[block][slot % BS] = tokens[p]

    def pick(self, index: int) -> int | None:
        return sorted(self.seqs)[index % len(self.seqs)] if self.seqs else None

    def apply(self, op: tuple) -> None:
        bm = self.bm
        if op[0] == "alloc":
            prompt = PREFIXES[op[1]][: op[2]] + op[3]
            if not prompt or not bm.can_allocate(len(prompt)):
                return
            floor = self.expected_min_hit(prompt)
            seq_id, self.next_id = self.next_id, self.next_id + 1
            n = bm.allocate(seq_id, prompt)
            assert n % BS == 0 and n <= len(prompt) - 1 and n >= floor
            self.seqs[seq_id] = prompt
            self.check_content(seq_id, n)  # cached blocks really hold these tokens
            assert bm.append_slots(seq_id, prompt, len(prompt) - n)
            self.write(seq_id, n)
        elif op[0] == "append" and self.seqs:
            seq_id = self.pick(op[1])
            before = (list(bm.block_table(seq_id)), bm.num_free_blocks())
            if bm.append_slots(seq_id, self.seqs[seq_id] + op[2], len(op[2])):
                self.seqs[seq_id] = self.seqs[seq_id] + op[2]
                self.write(seq_id, len(self.seqs[seq_id]) - len(op[2]))
            else:
                assert (list(bm.block_table(seq_id)), bm.num_free_blocks()) == before
        elif op[0] == "truncate" and self.seqs:
            seq_id = self.pick(op[1])
            keep = op[2] % (len(self.seqs[seq_id]) + 1)
            try:
                copies = bm.truncate(seq_id, keep)
            except RuntimeError:
                return
            for src, dst in copies:
                self.content[dst] = list(self.content[src])
            self.seqs[seq_id] = self.seqs[seq_id][:keep]
            assert len(bm.block_table(seq_id)) == bm.blocks_needed(keep)
        elif op[0] == "free" and self.seqs:
            seq_id = self.pick(op[1])
            bm.free(seq_id)
            del self.seqs[seq_id]

    def expected_min_hit(self, prompt: list[int]) -> int:
        """Tokens that must hit: leading blocks a live sequence holds registered with equal content."""
        if not self.bm.enable_prefix_caching:
            return 0
        best = 0
        for seq_id, tokens in self.seqs.items():
            n = 0
            for block in self.bm.block_table(seq_id)[: (len(prompt) - 1) // BS]:
                if block not in self.bm._block_key or tokens[n : n + BS] != prompt[n : n + BS]:
                    break
                n += BS
            best = max(best, n)
        return best

    def check_content(self, seq_id: int, upto: int) -> None:
        table = self.bm.block_table(seq_id)
        got = [self.content[table[p // BS]][p % BS] for p in range(upto)]
        assert got == self.seqs[seq_id][:upto]

    def check_invariants(self) -> None:
        bm = self.bm
        uses = [0] * NUM_BLOCKS
        for seq_id, tokens in self.seqs.items():
            table = bm.block_table(seq_id)
            assert len(table) == bm.blocks_needed(len(tokens))
            for b in table:
                uses[b] += 1
            self.check_content(seq_id, len(tokens))
        assert bm._ref_count == uses  # hence never negative
        used = {b for b in range(NUM_BLOCKS) if uses[b]}
        free, evictable = set(bm._free), set(bm._evictable)
        assert len(free) == len(bm._free)
        assert not (free & evictable) and not (used & (free | evictable))
        assert free | evictable | used == set(range(NUM_BLOCKS))
        assert bm.num_free_blocks() == NUM_BLOCKS - len(used)
        for b in range(NUM_BLOCKS):
            if uses[b] > 1 or b in evictable:
                assert b in bm._block_key, "shared or cached blocks are registered (hence full)"
            if b in bm._block_key:
                assert self.content[b] == list(bm._block_key[b][1]), "registered key matches the K/V"


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(op_st, min_size=10, max_size=60), prefix_caching=st.booleans())
def test_block_manager_invariants_under_random_interleavings(ops, prefix_caching):
    model = Model(prefix_caching)
    for op in ops:
        model.apply(op)
        model.check_invariants()
    for seq_id in list(model.seqs):
        model.bm.free(seq_id)
    assert model.bm.num_free_blocks() == NUM_BLOCKS
    assert model.bm._ref_count == [0] * NUM_BLOCKS


def test_allocate_twice_or_too_much_is_an_error():
    bm = BlockManager(2, BS)
    bm.allocate(0, [1])
    with pytest.raises(ValueError):
        bm.allocate(0, [1])
    with pytest.raises(RuntimeError):
        bm.allocate(1, list(range(9)))


def _resident_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_pool_memory_becomes_resident_only_as_blocks_are_written():
    """A 512 MiB pool costs next to nothing until used, reads as zeros, and writes stick."""
    before = _resident_mib()
    pool = KVCachePool(num_layers=4, num_blocks=4096, block_size=16, num_kv_heads=4, head_dim=64,
                       dtype=torch.float32, device="cpu")
    assert pool.k_heads.numel() * 4 * 2 == 512 << 20
    assert _resident_mib() - before < 64  # torch.zeros would have written all 512 MiB
    assert pool.k[1, 7].abs().sum().item() == 0 and pool.v.dtype == torch.float32
    pool.k[1, 7, 3] = 1.5
    assert pool.k_heads[1, :, 7, 3].eq(1.5).all()  # k is a view of the head-major storage
    half = KVCachePool(2, 8, 4, 2, 8, torch.bfloat16, "cpu")
    assert half.v_heads.dtype == torch.bfloat16 and half.v_heads.float().abs().sum().item() == 0

"""The continuous-batching scheduler on its own (no model): budgets, chunked prefill, admission
order, preemption and recompute, and a hypothesis property over random interleavings."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jupyter_llm.backends.native.kv_cache import BlockManager
from jupyter_llm.backends.native.scheduler import Scheduler, SchedulerConfig
from jupyter_llm.backends.sequence import EngineSequence
from jupyter_llm.schema import GenerationRequest

BS = 4


def new_seq(prompt: list[int], max_tokens: int = 8) -> EngineSequence:
    """A sequence as the engine makes them, with the number of tokens it will sample."""
    seq = EngineSequence(GenerationRequest(prompt_token_ids=list(prompt)), 0, list(prompt), processor=None, sink=None)
    seq.max_tokens = max_tokens
    return seq


def token_for(seq: EngineSequence) -> int:
    """A deterministic 'sampled' token that depends only on the sequence's own history."""
    return (seq.seq_id * 31 + len(seq.output_ids) * 7 + sum(seq.prompt_ids)) % 97


def make(num_blocks=16, max_num_seqs=8, budget=16, max_model_len=64, prefix=True, watermark=0.01):
    blocks = BlockManager(num_blocks, BS, enable_prefix_caching=prefix)
    return Scheduler(blocks, SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                             max_model_len=max_model_len, watermark=watermark))


def step(sched: Scheduler):
    """One scheduled step: sample for the chunks that reach their sequence's end."""
    out = sched.schedule()
    sampled = []
    for chunk in out.chunks:
        if chunk.samples:
            token = token_for(chunk.seq)
            chunk.seq.token_ids.append(token)  # as the sampler does
            sampled.append([token])
    sched.commit(out, sampled)
    return out


def run_to_end(sched: Scheduler, seqs: list[EngineSequence], max_steps: int = 1000) -> int:
    for n in range(max_steps):
        for s in seqs:
            if s in sched and len(s.output_ids) >= s.max_tokens:
                sched.remove(s)
        if not sched.has_work():
            return n
        step(sched)
    raise AssertionError("the scheduler did not finish (deadlock or livelock)")


def test_chunked_prefill_keeps_decodes_running():
    sched = make(num_blocks=64, budget=8)
    short = new_seq([1, 2, 3], max_tokens=20)
    sched.add(short)
    step(sched)  # prefill of the short prompt, and its first token
    assert short.output_ids
    long = new_seq(list(range(30)), max_tokens=2)
    sched.add(long)
    chunks_of_long = []
    for _ in range(5):
        out = step(sched)
        assert out.num_tokens <= 8
        by_seq = {c.seq.seq_id: c for c in out.chunks}
        assert by_seq[short.seq_id].num_tokens == 1  # the decode runs every step
        if long.seq_id in by_seq:
            chunks_of_long.append((by_seq[long.seq_id].start, by_seq[long.seq_id].end))
    # 30 prompt tokens in chunks of at most 7 (8 minus the decode), contiguous, the last one samples
    assert chunks_of_long[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(chunks_of_long))
    assert chunks_of_long[-1][1] == 30 and len(long.output_ids) == 1
    assert all(e - s <= 7 for s, e in chunks_of_long)


def test_admission_is_first_come_first_served_and_bounded():
    sched = make(num_blocks=64, max_num_seqs=2, budget=64)
    seqs = [new_seq([i] * 5, max_tokens=3) for i in range(4)]
    for s in seqs:
        sched.add(s)
    out = step(sched)
    assert [c.seq for c in out.chunks] == seqs[:2] and sched.counts() == (2, 2)
    run_to_end(sched, seqs)
    assert all(len(s.output_ids) == 3 for s in seqs)
    assert sched.blocks.num_free_blocks() == 64


def test_pool_exhaustion_preempts_the_newest_and_recomputes_it():
    sched = make(num_blocks=6, budget=64, watermark=0)  # 24 token slots
    old, new = new_seq([1] * 7, max_tokens=12), new_seq([2] * 7, max_tokens=12)
    sched.add(old)
    sched.add(new)
    preempted_at = None
    for n in range(40):
        out = step(sched)
        if out.preempted and preempted_at is None:
            preempted_at = n
            assert out.preempted == [new]
            assert new not in [c.seq for c in out.chunks] and sched.counts() == (1, 1)
        for s in (old, new):
            if s in sched and len(s.output_ids) >= s.max_tokens:
                sched.remove(s)
        if not sched.has_work():
            break
    assert preempted_at is not None and sched.num_preemptions >= 1
    # Both finished with the tokens they would have had alone: recompute lost nothing.
    for s in (old, new):
        alone = new_seq(s.prompt_ids, s.max_tokens)
        alone.seq_id = s.seq_id
        solo = make(num_blocks=64)
        solo.add(alone)
        run_to_end(solo, [alone])
        assert s.output_ids == alone.output_ids
    assert sched.blocks.num_free_blocks() == 6


def test_recompute_covers_prompt_and_output():
    sched = make(num_blocks=64, budget=64)
    s = new_seq([5] * 6, max_tokens=10)
    sched.add(s)
    for _ in range(3):
        step(sched)
    assert len(s.output_ids) == 3
    sched._preempt(sched.running[0])
    out = step(sched)
    [chunk] = out.chunks
    assert chunk.end == 6 + 3 and chunk.seq.token_ids[:chunk.end] == s.prompt_ids + s.output_ids[:3]
    assert chunk.start == 8  # the prefix cache still holds its first two full blocks


def test_a_lone_sequence_always_fits_and_never_deadlocks():
    sched = make(num_blocks=4, max_model_len=16, budget=3)  # exactly one full-length sequence fits
    seqs = [new_seq([i + 1] * 5, max_tokens=10) for i in range(3)]
    for s in seqs:
        sched.add(s)
    run_to_end(sched, seqs)
    assert all(len(s.output_ids) == 10 for s in seqs)
    assert sched.blocks.num_free_blocks() == 4


def test_remove_waiting_running_and_unknown():
    sched = make()
    a, b = new_seq([1, 2]), new_seq([3, 4])
    sched.add(a)
    step(sched)
    sched.add(b)
    sched.remove(b)  # waiting
    sched.remove(a)  # running
    sched.remove(a)  # again: no-op
    assert not sched.has_work() and sched.blocks.num_free_blocks() == 16


def test_abort_forgets_the_slots_of_a_failed_step():
    sched = make(num_blocks=16, budget=64)
    a = new_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    sched.add(a)
    step(sched)
    a.token_ids.extend([1, 2, 3])  # pretend: decoding tokens 10..12 next, completing block 2
    a.num_computed_tokens = 9
    out = sched.schedule()
    assert [(c.start, c.end) for c in out.chunks] == [(9, 13)]
    sched.abort(out)  # the forward failed: block 2 must not be served from the prefix cache
    assert a.num_computed_tokens == 9 and sched.counts() == (1, 0)
    probe = a.prompt_ids + a.output_ids + [0]
    assert sched.blocks.allocate(-1, probe) == 8  # blocks 0 and 1 (computed earlier) only
    sched.blocks.free(-1)
    sched.remove(a)
    assert sched.blocks.num_free_blocks() == 16


def test_abort_requeues_what_the_failed_step_admitted():
    sched = make(num_blocks=16, budget=64)
    a = new_seq(list(range(9)))
    sched.add(a)
    out = sched.schedule()
    sched.abort(out)
    assert sched.counts() == (0, 1) and sched.blocks.num_free_blocks() == 16
    sched.remove(a)
    b = new_seq(list(range(9)))
    sched.add(b)
    assert [c.start for c in sched.schedule().chunks] == [0]  # nothing of a's step stayed cached


def test_too_long_is_refused():
    sched = make(max_model_len=8)
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add(new_seq(list(range(8))))


# -- property: random interleavings --------------------------------------------------------

OPS = st.lists(
    st.one_of(
        # prompt length, max tokens, how many such sequences at once
        st.tuples(st.just("submit"), st.integers(1, 14), st.integers(1, 15), st.integers(1, 4)),
        st.tuples(st.just("cancel"), st.integers(0, 50), st.just(0), st.just(0)),
        st.tuples(st.just("step"), st.integers(1, 4), st.just(0), st.just(0)),  # how many steps
    ),
    min_size=1, max_size=30,
)


@settings(max_examples=150, deadline=None)
@given(ops=OPS, num_blocks=st.integers(4, 8), budget=st.integers(1, 12), max_num_seqs=st.integers(1, 5),
       prefix=st.booleans(), watermark=st.sampled_from([0.0, 0.01]))
def test_random_interleavings_never_leak_or_mix_up(ops, num_blocks, budget, max_num_seqs, prefix, watermark):
    sched = make(num_blocks=num_blocks, budget=budget, max_num_seqs=max_num_seqs, max_model_len=16,
                 prefix=prefix, watermark=watermark)
    live: list[EngineSequence] = []
    done: list[EngineSequence] = []

    def check(out):
        ids = [c.seq.seq_id for c in out.chunks]
        assert len(ids) == len(set(ids)) and out.num_tokens <= budget
        assert len(sched.running) <= max_num_seqs
        for c in out.chunks:
            # A chunk computes the sequence's own tokens: its prompt, then its own samples.
            assert c.seq.token_ids == c.seq.prompt_ids + c.seq.output_ids
            assert 0 <= c.start < c.end <= len(c.seq.token_ids)
        used = num_blocks - sched.blocks.num_free_blocks()
        assert used <= num_blocks

    def finish_done():
        for s in list(live):
            if len(s.output_ids) >= s.max_tokens or len(s.prompt_ids) + len(s.output_ids) >= 16:
                sched.remove(s)
                live.remove(s)
                done.append(s)

    for op, a, b, copies in ops:
        if op == "submit":
            for c in range(copies):
                s = new_seq([(a * 3 + i + c) % 5 for i in range(a)], max_tokens=b)  # shared prefixes are common
                sched.add(s)
                live.append(s)
        elif op == "cancel" and live:
            s = live.pop(a % len(live))
            sched.remove(s)
        elif op == "step":
            for _ in range(a):
                if sched.has_work():
                    check(step(sched))
                    finish_done()
    for _ in range(2000):  # drain: every sequence finishes
        if not sched.has_work():
            break
        check(step(sched))
        finish_done()
    assert not sched.has_work() and not live
    assert sched.blocks.num_free_blocks() == num_blocks  # no leak
    for s in done:  # each output is what the sequence would produce alone
        expected = new_seq(s.prompt_ids)
        expected.seq_id = s.seq_id
        for _ in s.output_ids:
            expected.token_ids.append(token_for(expected))
        assert s.output_ids == expected.output_ids

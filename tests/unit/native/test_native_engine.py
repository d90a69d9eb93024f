"""The native step engine (scheduler + runner + shared sampler) on a tiny float64 Llama, driven
synchronously: outputs do not depend on what else runs (batching, chunking, preemption, the
prefix cache), and no interleaving of submit / cancel / finish / preempt leaks a block."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jupyter_llm.backends.native.engine import build_engine
from jupyter_llm.backends.native.loader import load_model
from jupyter_llm.backends.sequence import EngineSequence
from jupyter_llm.schema import GenerationRequest, SamplingParams
from tiny_models import tiny_llama_folder

MAX_LEN = 40
BASE = [5, 17, 33, 2, 8, 61, 40, 12, 9, 77, 3, 25]
PROMPTS = [BASE[:3], BASE[:9], BASE + [1, 2, 3, 4, 5, 6], BASE[:5] + [90, 91], [44] * 17, BASE[:8]]
PARAMS = [
    SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True),
    SamplingParams(max_tokens=8, temperature=0.8, top_k=20, top_p=0.9, seed=3, ignore_eos=True),
    SamplingParams(max_tokens=9, temperature=1.0, seed=11, presence_penalty=0.5, repetition_penalty=1.2,
                   ignore_eos=True),
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tiny_llama_folder(tmp_path_factory.mktemp("engine-llama"), seed=1)
    return load_model(folder, dtype=torch.float64)


def new_seq(prompt_idx: int, params_idx: int) -> EngineSequence:
    request = GenerationRequest(prompt_token_ids=PROMPTS[prompt_idx], params=PARAMS[params_idx])
    seq = EngineSequence(request, 0, list(PROMPTS[prompt_idx]), processor=None, sink=None)
    seq.key = (prompt_idx, params_idx)
    return seq


def engine_for(tiny_model, **kw):
    model, config = tiny_model
    defaults = {"num_blocks": 64, "block_size": 4, "max_num_seqs": 16, "max_num_batched_tokens": 64,
                "max_model_len": MAX_LEN}
    return build_engine(model, config, **{**defaults, **kw})


def finished(seq: EngineSequence) -> bool:
    return len(seq.output_ids) >= seq.params.max_tokens or len(seq.token_ids) >= MAX_LEN


def drive(engine, seqs: list[EngineSequence], max_steps: int = 500) -> None:
    """Step until every live sequence is finished (removing them as they finish)."""
    for _ in range(max_steps):
        if not engine.has_work():
            return
        for seq, token, _ in engine.step():
            assert seq.output_ids[-1] == token
            if finished(seq):
                engine.remove(seq)
    raise AssertionError("the engine did not finish (deadlock?)")


_reference: dict[tuple[int, int], list[int]] = {}


def reference(tiny_model, key: tuple[int, int]) -> list[int]:
    """The output of a request run alone in a roomy engine."""
    if key not in _reference:
        engine = engine_for(tiny_model)
        seq = new_seq(*key)
        engine.add(seq)
        drive(engine, [seq])
        _reference[key] = list(seq.output_ids)
    return _reference[key]


def test_batched_chunked_and_preempted_outputs_equal_alone(tiny_model):
    # 12 blocks of 4 tokens: 12 sequences of up to 40 tokens must preempt; budget 8 chunks prompts;
    # more than 8 rows sample in blocks (SAMPLER_ROWS).
    engine = engine_for(tiny_model, num_blocks=12, max_num_batched_tokens=8)
    seqs = [new_seq(p, q) for p in range(len(PROMPTS)) for q in (0, 1)]
    for seq in seqs:
        engine.add(seq)
    drive(engine, seqs)
    assert engine.scheduler.num_preemptions > 0
    assert engine.blocks.prefix_cache_hits > 0
    roomy = engine_for(tiny_model, max_num_batched_tokens=256)  # all 12 decode together
    again = [new_seq(*seq.key) for seq in seqs]
    for seq in again:
        roomy.add(seq)
    drive(roomy, again)
    assert [s.output_ids for s in again] == [s.output_ids for s in seqs]
    for seq in seqs:
        assert seq.output_ids == reference(tiny_model, seq.key), seq.key
    assert engine.blocks.num_free_blocks() == 12
    assert engine.stats()["kv_blocks_used"] == 0 and engine.counts() == (0, 0)


def test_step_returns_only_sequences_that_reached_their_last_token(tiny_model):
    engine = engine_for(tiny_model, max_num_batched_tokens=5)
    seq = new_seq(2, 0)  # 18 prompt tokens: four chunks of 5, 5, 5, 3
    engine.add(seq)
    produced = [len(engine.step()) for _ in range(4)]
    assert produced == [0, 0, 0, 1] and len(seq.output_ids) == 1
    engine.remove(seq)
    assert engine.blocks.num_free_blocks() == 64


def test_a_failed_step_frees_nothing_twice_and_leaves_no_bad_cache(tiny_model, monkeypatch):
    engine = engine_for(tiny_model)
    seq = new_seq(1, 0)
    engine.add(seq)
    calls = {"n": 0}
    run = engine.runner.run

    def failing(items, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return run(items, **kw)

    monkeypatch.setattr(engine.runner, "run", failing)
    with pytest.raises(RuntimeError, match="boom"):
        engine.step()
    engine.remove(seq)  # what the compute thread does for the failed sequences
    assert engine.blocks.num_free_blocks() == 64 and not engine.has_work()
    again = new_seq(1, 0)
    engine.add(again)
    drive(engine, [again])
    assert again.output_ids == reference(tiny_model, (1, 0))


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.integers(0, len(PROMPTS) - 1), st.integers(0, len(PARAMS) - 1)),
        st.tuples(st.just("cancel"), st.integers(0, 30), st.just(0)),
        st.tuples(st.just("step"), st.integers(1, 6), st.just(0)),
    ),
    min_size=1, max_size=16,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, num_blocks=st.integers(10, 24), budget=st.integers(4, 32), prefix=st.booleans())
def test_random_interleavings_keep_outputs_and_blocks(tiny_model, ops, num_blocks, budget, prefix):
    engine = engine_for(tiny_model, num_blocks=num_blocks, max_num_batched_tokens=budget,
                        enable_prefix_caching=prefix, max_num_seqs=6)
    live: list[EngineSequence] = []
    done: list[EngineSequence] = []
    cancelled: list[EngineSequence] = []

    def step():
        for seq, _, _ in engine.step():
            if finished(seq):
                engine.remove(seq)
                live.remove(seq)
                done.append(seq)

    for op, a, b in ops:
        if op == "submit":
            seq = new_seq(a, b)
            engine.add(seq)
            live.append(seq)
        elif op == "cancel" and live:
            seq = live.pop(a % len(live))
            engine.remove(seq)
            cancelled.append(seq)
        elif op == "step":
            for _ in range(a):
                if engine.has_work():
                    step()
    for _ in range(1000):
        if not engine.has_work():
            break
        step()
    assert not live and not engine.has_work()
    assert engine.blocks.num_free_blocks() == num_blocks
    for seq in done:
        assert seq.output_ids == reference(tiny_model, seq.key)
    for seq in cancelled:
        expected = reference(tiny_model, seq.key)
        assert seq.output_ids == expected[:len(seq.output_ids)]

"""Speculative decoding: proposers, the verification rule (greedy identity, and the target
distribution kept exactly under sampling), the engine's bookkeeping (no leaked blocks in the
target's or the draft's pool), options and statistics."""
from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jupyter_llm.backends.native.engine import build_engine
from jupyter_llm.backends.native.loader import load_model
from jupyter_llm.backends.native.proposers import ngram_propose
from jupyter_llm.backends.native.speculative import Backoff, SpeculationStats, SpeculativeConfig
from jupyter_llm.backends.native.verify import Proposal, verify
from jupyter_llm.backends.sequence import EngineSequence
from jupyter_llm.errors import ParamError
from jupyter_llm.sampling import SamplingState, processed_probs
from jupyter_llm.schema import GenerationRequest, SamplingParams
from manager_helpers import load_keeping_default
from tiny_models import tiny_llama_folder

# -- n-gram proposer ------------------------------------------------------------------


def guess(tokens, k, min_n=1, max_n=4, after=0):
    return ngram_propose(tokens, k, min_n, max_n, after)[0]


def test_ngram_proposes_what_followed_the_longest_latest_match():
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 4, 7, 8, 1, 2, 3, 4]
    # Suffix [2, 3, 4] (and [1, 2, 3, 4]) occurred at the start: the 4-gram match wins over the later 3-gram.
    assert ngram_propose(tokens, k=3, min_n=1, max_n=4) == ([5, 9, 2], 4)
    # Limited to 3-grams, the latest occurrence of [2, 3, 4] wins.
    assert guess(tokens, k=3, max_n=3) == [7, 8, 1]
    assert guess(tokens, k=1, max_n=3) == [7]


def test_ngram_goes_on_from_where_the_last_copy_ended():
    # " the" occurs twice in the "prompt"; after copying up to position 6 the later one is the right one.
    prompt = [10, 11, 50, 12, 13, 14, 50, 15, 16]
    output = [11, 99, 50]  # copied 11, then a token of its own (a corrected typo), then " the"
    tokens = prompt + output
    assert guess(tokens, k=2) == [15, 16]  # without a cursor: the latest occurrence
    assert guess(tokens, k=2, after=2) == [12, 13]  # the first occurrence at or after the cursor
    assert guess(tokens, k=2, after=5) == [15, 16]


def test_ngram_respects_min_n_and_returns_nothing_without_match():
    assert ngram_propose([1, 2, 3, 4], k=5) == ([], -1)
    tokens = [7, 1, 2, 9, 3, 2]  # only the 1-gram [2] matches
    assert guess(tokens, k=2, min_n=1, max_n=4) == [9, 3]
    assert guess(tokens, k=2, min_n=2, max_n=4) == []
    assert guess([5], k=3) == []
    # The match may run up to the end of the sequence: fewer than k tokens then.
    assert guess([4, 6, 4], k=5) == [6, 4]
    # In a repeating stretch, an earlier occurrence with k tokens after it beats the latest one.
    assert guess([3, 7, 7, 7, 7, 7, 7], k=3, max_n=2) == [7, 7, 7]
    assert guess([1, 2, 1, 2, 1, 2], k=3, max_n=2) == [1, 2, 1]


# -- configuration --------------------------------------------------------------------


def test_config_defaults_and_vllm_speculative_config():
    config = SpeculativeConfig.from_options("ngram", None)
    assert (config.method, config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max) == \
        ("ngram", 5, 1, 4)
    config = SpeculativeConfig.from_options(None, {"method": "ngram", "num_speculative_tokens": 3,
                                                   "prompt_lookup_max": 2})
    assert (config.num_speculative_tokens, config.prompt_lookup_max) == (3, 2)
    config = SpeculativeConfig.from_options(None, '{"model": "tiny", "quantization": "int8"}')
    assert (config.method, config.draft_model, config.draft_quantization) == ("draft", "tiny", "int8")
    # Options given one by one win over the dict.
    config = SpeculativeConfig.from_options(None, {"method": "ngram", "num_speculative_tokens": 3},
                                            num_speculative_tokens=7)
    assert config.num_speculative_tokens == 7
    assert SpeculativeConfig.from_options(None, None) is None


@pytest.mark.parametrize("args, message", [
    (("medusa", None), "unknown speculative method 'medusa'; accepted: ngram, draft"),
    (("draft", None), "--speculative draft needs --draft-model M, or --draft-quantization int8"),
    ((None, {"method": "ngram", "typo": 1}), "unknown speculative_config key(s) typo"),
    ((None, "{not json"), "--speculative-config expects a JSON object"),
    (("ngram", None, {"num_speculative_tokens": 0}), "--num-speculative-tokens must be in [1, 16]"),
    (("ngram", None, {"prompt_lookup_min": 3, "prompt_lookup_max": 2}), "1 <= min <= max"),
    ((None, None, {"num_speculative_tokens": 4}), "need(s) --speculative ngram|draft"),
    (("ngram", None, {"draft_quantization": "int8"}), "go with --speculative draft"),
])
def test_config_errors_say_what_is_accepted(args, message):
    speculative, config, *fields = args
    with pytest.raises(ParamError, match=None) as error:
        SpeculativeConfig.from_options(speculative, config, **(fields[0] if fields else {}))
    assert message in str(error.value)


# -- verification ---------------------------------------------------------------------


def state_for(params: SamplingParams, seed: int | None = None) -> SamplingState:
    return SamplingState(params if seed is None else params.replace(seed=seed), [1, 2, 3])


def test_greedy_verify_accepts_the_agreeing_prefix_then_the_target_token():
    logits = torch.full((4, 10), -5.0)
    for row, best in enumerate([3, 6, 1, 8]):
        logits[row, best] = 5.0
    state = state_for(SamplingParams(temperature=0))
    assert verify(logits, Proposal([3, 6, 1]), state) == [3, 6, 1, 8]  # all accepted + bonus
    assert verify(logits, Proposal([3, 5, 1]), state) == [3, 6]  # second rejected, replaced
    assert verify(logits, Proposal([0, 6, 1]), state) == [3]


SAMPLING = SamplingParams(temperature=0.8, top_k=6, top_p=0.95, min_p=0.02)


def tv_distance(counts: Counter, probs: torch.Tensor, total: int) -> float:
    return 0.5 * sum(abs(counts.get(i, 0) / total - float(p)) for i, p in enumerate(probs))


@pytest.mark.parametrize("with_draft_probs", [False, True], ids=["ngram", "draft"])
def test_sampled_verify_keeps_the_target_distribution(with_draft_probs):
    """Draws from verify follow the target's processed distribution p (temperature, top-k, top-p,
    min-p) at the first position, and at the second given the first guess was accepted, although
    the guesses come from a very different q."""
    vocab, draws = 10, 12000
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, vocab, generator=gen) * 2
    state = state_for(SAMPLING, seed=1)
    p = processed_probs(logits, [state] * 3)
    p = p / p.sum(-1, keepdim=True)
    # q is half p, half a peaked random distribution: accepting every guess (or resampling
    # wrongly) would fail the checks below, and enough first guesses pass to test the second.
    q = 0.5 * p[:2] + 0.5 * torch.softmax(torch.randn(2, vocab, generator=gen) * 3, -1)
    first, second = Counter(), Counter()
    noise = torch.Generator().manual_seed(2)
    for _ in range(draws):
        if with_draft_probs:
            guesses = [int(torch.multinomial(q[i], 1, generator=noise)) for i in range(2)]
            proposal = Proposal(guesses, q.clone())
        else:
            guesses = [int(p[0].argmax()), int(p[1].argsort(descending=True)[1])]  # fixed guesses: q one-hot
            proposal = Proposal(guesses)
        out = verify(logits, proposal, state)
        first[out[0]] += 1
        if out[0] == guesses[0] and len(out) > 1:
            second[out[1]] += 1
    assert tv_distance(first, p[0], draws) < 0.025
    assert sum(second.values()) > 2000
    assert tv_distance(second, p[1], sum(second.values())) < 0.05
    assert set(first) <= set(torch.nonzero(p[0]).flatten().tolist())  # never a filtered-out token


def test_backoff_skips_growing_after_repeated_misses_and_resets_on_success():
    backoff = Backoff()
    backoff.record(0)  # average 0.5: below MIN_GAIN, skip one step
    assert [backoff.wants_guess() for _ in range(2)] == [False, True]
    backoff.record(0)
    assert [backoff.wants_guess() for _ in range(3)] == [False, False, True]
    backoff.record(0)
    assert [backoff.wants_guess() for _ in range(5)] == [False] * 4 + [True]
    backoff.record(4)  # a good verification: back to guessing every step
    assert backoff.wants_guess() and backoff.wants_guess()
    backoff.record(0)  # one miss after successes: keep guessing
    assert backoff.wants_guess()
    for _ in range(12):
        backoff.record(0)
        while not backoff.wants_guess():
            pass
    assert backoff.skip == 0 and backoff.misses >= 6
    backoff.record(0)
    assert backoff.skip == Backoff.MAX_SKIP


def test_stats_measure_acceptance_length_and_speedup():
    stats = SpeculationStats()
    stats.record_verification(proposed=5, accepted=3)
    stats.record_verification(proposed=5, accepted=1)
    assert stats.acceptance_rate == pytest.approx(0.4)
    assert stats.mean_accepted_length == pytest.approx(3.0)  # (3 + 1 + 2 bonus/replacement) / 2
    assert stats.speedup is None
    stats.record_step(0.05, 1, speculative=False)  # 50 ms per token plain
    stats.record_step(0.06, 3, speculative=True)  # 20 ms per token speculating
    assert stats.speedup == pytest.approx(2.5)
    for _ in range(SpeculationStats.PROBE_EVERY):
        stats.record_step(0.06, 3, speculative=True)
    assert stats.wants_probe()
    stats.record_step(0.05, 1, speculative=False)
    assert not stats.wants_probe()


# -- the engine on tiny float64 models -----------------------------------------------

MAX_LEN = 48
PATTERN = [5, 17, 33, 2, 8, 61, 40, 12]
PROMPTS = [PATTERN * 3, PATTERN[:5] + [90, 91] + PATTERN[:5], [44] * 17, list(range(20, 32)), PATTERN[::-1] * 2]
GREEDY = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    folder = tiny_llama_folder(tmp_path_factory.mktemp("spec-llama"), seed=3)
    return load_model(folder, dtype=torch.float64)


@pytest.fixture(scope="module")
def tiny_draft(tiny_target):
    """The target with noise on its weights: it agrees with the target often, not always."""
    model, config = tiny_target
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in draft.parameters():
            param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * param.std() * 0.5)
    return draft, config


def engine(tiny_target, tiny_draft=None, spec: SpeculativeConfig | None = None, draft_blocks: int = 64, **kw):
    model, config = tiny_target
    defaults = {"num_blocks": 64, "block_size": 4, "max_num_seqs": 16, "max_num_batched_tokens": 64,
                "max_model_len": MAX_LEN}
    draft = (tiny_draft[0], tiny_draft[1], draft_blocks) if spec is not None and spec.method == "draft" else None
    return build_engine(model, config, speculative=spec, draft=draft, **{**defaults, **kw})


def new_seq(prompt: list[int], params: SamplingParams, index: int = 0) -> EngineSequence:
    request = GenerationRequest(prompt_token_ids=prompt, params=params)
    return EngineSequence(request, index, list(prompt), processor=None, sink=None)


def done(seq: EngineSequence) -> bool:
    return len(seq.output_ids) >= seq.params.max_tokens or len(seq.token_ids) >= MAX_LEN


def run(eng, seqs: list[EngineSequence], max_steps: int = 2000) -> None:
    """Step until every sequence finished; tokens past a sequence's end are dropped, as the
    compute thread does."""
    for seq in seqs:
        eng.add(seq)
    live = {seq.seq_id for seq in seqs}
    for _ in range(max_steps):
        if not eng.has_work():
            return
        for seq, _, _ in eng.step():
            if seq.seq_id in live and done(seq):
                del seq.token_ids[seq.num_prompt_tokens + seq.params.max_tokens:]
                eng.remove(seq)
                live.discard(seq.seq_id)
    raise AssertionError("the engine did not finish")


def outputs(eng, prompts, params, batched: bool) -> list[list[int]]:
    seqs = [new_seq(p, params) for p in prompts]
    if batched:
        run(eng, seqs)
    else:
        for seq in seqs:
            run(eng, [seq])
    return [s.output_ids[:params.max_tokens] for s in seqs]


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_output_is_identical_with_speculation_alone_and_batched(tiny_target, tiny_draft, method):
    expected = outputs(engine(tiny_target), PROMPTS, GREEDY, batched=True)
    spec = SpeculativeConfig(method=method, num_speculative_tokens=4,
                             draft_model="tiny" if method == "draft" else None)
    for batched in (False, True):
        eng = engine(tiny_target, tiny_draft, spec)
        assert outputs(eng, PROMPTS, GREEDY, batched) == expected
        stats = eng.speculator.stats
        # Both paths ran: some guesses were accepted and some rejected.
        assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
        assert eng.blocks.num_free_blocks() == eng.blocks.num_total_blocks()
        if method == "draft":
            assert eng.speculator.draft.blocks.num_free_blocks() == eng.speculator.draft.blocks.num_total_blocks()


def chi_square_p_value(a: Counter, b: Counter) -> float:
    """Two-sample chi-square test of homogeneity (categories with >= 5 expected counts; the rest
    pooled); p-value by the Wilson-Hilferty approximation."""
    total_a, total_b = sum(a.values()), sum(b.values())
    keys = sorted(set(a) | set(b), key=lambda k: -(a[k] + b[k]))
    groups, rest = [], (0, 0)
    for k in keys:
        if (a[k] + b[k]) * min(total_a, total_b) / (total_a + total_b) >= 5:
            groups.append((a[k], b[k]))
        else:
            rest = (rest[0] + a[k], rest[1] + b[k])
    if sum(rest):
        groups.append(rest)
    stat = 0.0
    for x, y in groups:
        n = x + y
        ex, ey = n * total_a / (total_a + total_b), n * total_b / (total_a + total_b)
        stat += (x - ex) ** 2 / ex + (y - ey) ** 2 / ey
    dof = len(groups) - 1
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_sampled_distribution_with_speculation_matches_without(tiny_target, tiny_draft):
    """Many seeded draws of the first three generated tokens from a tiny target, with a draft
    model guessing and without: the joint distributions agree (chi-square), while sampling the
    draft alone gives a clearly different one (the test can tell)."""
    params = SamplingParams(max_tokens=3, temperature=0.7, top_k=3, top_p=0.9, ignore_eos=True)
    prompt = PATTERN * 2
    draws = 1200

    def sample(eng, model_seed: int) -> Counter:
        seqs = [new_seq(prompt, params.replace(seed=model_seed * 100_000 + i)) for i in range(draws)]
        run(eng, seqs)
        return Counter(tuple(s.output_ids[:3]) for s in seqs)

    plain = sample(engine(tiny_target, max_num_seqs=256, num_blocks=2048), 1)
    config = SpeculativeConfig(method="draft", num_speculative_tokens=2, draft_model="tiny")
    spec_engine = engine(tiny_target, tiny_draft, config, max_num_seqs=256, num_blocks=2048)
    speculative = sample(spec_engine, 2)
    assert spec_engine.speculator.stats.num_accepted_tokens > 0.2 * draws
    assert chi_square_p_value(plain, speculative) > 1e-3
    draft_alone = sample(engine(tiny_draft, max_num_seqs=256, num_blocks=2048), 3)
    assert chi_square_p_value(plain, draft_alone) < 1e-6


OPS = st.lists(
    st.tuples(st.sampled_from(["submit", "cancel", "step"]), st.integers(0, 4), st.integers(0, 2)),
    min_size=1, max_size=16,
)
PARAMS = [GREEDY, SamplingParams(max_tokens=10, temperature=1.0, seed=7, ignore_eos=True),
          SamplingParams(max_tokens=8, temperature=0.9, top_k=20, top_p=0.9, seed=3, ignore_eos=True)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, method=st.sampled_from(["ngram", "draft"]), num_blocks=st.integers(12, 24),
       draft_blocks=st.integers(2, 16), budget=st.integers(4, 32), prefix=st.booleans(), k=st.integers(1, 5))
def test_random_interleavings_with_speculation_never_leak_blocks(tiny_target, tiny_draft, ops, method, num_blocks,
                                                                 draft_blocks, budget, prefix, k):
    """Submit / cancel / step in any order, pools small enough to preempt (and a draft pool that
    fills up): every block of both pools comes back, and greedy outputs stay those of the
    target alone."""
    spec = SpeculativeConfig(method=method, num_speculative_tokens=k, draft_model="tiny" if method == "draft" else None)
    eng = engine(tiny_target, tiny_draft, spec, draft_blocks=draft_blocks, num_blocks=num_blocks,
                 max_num_batched_tokens=budget, enable_prefix_caching=prefix, max_num_seqs=6)
    live: list[EngineSequence] = []
    finished: list[EngineSequence] = []

    def step():
        for seq, _, _ in eng.step():
            if seq in live and done(seq):
                eng.remove(seq)
                live.remove(seq)
                finished.append(seq)

    for op, a, b in ops:
        if op == "submit":
            seq = new_seq(PROMPTS[a], PARAMS[b])
            eng.add(seq)
            live.append(seq)
        elif op == "cancel" and live:
            eng.remove(live.pop(a % len(live)))
        elif op == "step":
            for _ in range(a):
                if eng.has_work():
                    step()
    for _ in range(2000):
        if not eng.has_work():
            break
        step()
    assert not live and not eng.has_work()
    assert eng.blocks.num_free_blocks() == num_blocks
    if method == "draft":
        assert eng.speculator.draft.blocks.num_free_blocks() == draft_blocks
        assert not eng.speculator.draft.computed
    for seq in finished:
        if seq.params.greedy:
            assert seq.output_ids[:GREEDY.max_tokens] == greedy_reference(tiny_target, tuple(seq.prompt_ids))


_greedy: dict[tuple[int, ...], list[int]] = {}


def greedy_reference(tiny_target, prompt: tuple[int, ...]) -> list[int]:
    if prompt not in _greedy:
        seq = new_seq(list(prompt), GREEDY)
        run(engine(tiny_target), [seq])
        _greedy[prompt] = seq.output_ids[:GREEDY.max_tokens]
    return _greedy[prompt]


def test_requests_with_penalties_and_the_batch_size_limit_get_no_guesses(tiny_target):
    spec = SpeculativeConfig(method="ngram", disable_by_batch_size=2)
    eng = engine(tiny_target, None, spec)
    penalized = SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.3, ignore_eos=True)
    run(eng, [new_seq(PROMPTS[2], penalized)])
    assert eng.speculator.stats.num_drafts == 0
    run(eng, [new_seq(PROMPTS[2], GREEDY) for _ in range(3)])  # 3 > disable_by_batch_size
    assert eng.speculator.stats.num_drafts == 0
    run(eng, [new_seq(PROMPTS[2], GREEDY)])
    assert eng.speculator.stats.num_drafts > 0


# -- the backend ----------------------------------------------------------------------


def test_backend_options_status_and_vllm_dict(manager, tiny_llama):
    name = load_keeping_default(manager, "native", str(tiny_llama), name="spec-ngram", progress=False,
                                kv_cache_memory="8MiB", speculative="ngram", num_speculative_tokens="3")
    try:
        backend = manager.get(name)
        assert backend.capabilities.speculative
        completion = manager.generate("a b a b a b a b a b", GREEDY.replace(max_tokens=20), backend=name)[0]
        assert len(completion.token_ids) == 20
        extra = manager.info(name).extra
        assert extra["speculative"] == "ngram k=3 (1-4)"
        assert extra["spec_num_drafts"] > 0 and 0 <= extra["spec_acceptance_rate"] <= 1
        assert extra["spec_mean_accepted_length"] >= 1
    finally:
        manager.unload(name)
    name = load_keeping_default(manager, "native", str(tiny_llama), name="spec-dict", progress=False,
                                kv_cache_memory="8MiB", speculative_config={"model": str(tiny_llama),
                                                                            "num_speculative_tokens": 2})
    try:
        assert manager.info(name).extra["speculative"].startswith("draft ") and \
            manager.info(name).extra["speculative"].endswith("k=2")
        assert manager.get(name).engine.speculator.draft is not None
    finally:
        manager.unload(name)


def test_backend_refuses_bad_speculative_options_before_loading(manager, tiny_llama):
    with pytest.raises(ParamError, match="--speculative draft needs --draft-model"):
        manager.load("native", str(tiny_llama), name="spec-bad", progress=False, speculative="draft")
    with pytest.raises(ParamError, match="unknown speculative method 'eagle'"):
        manager.load("native", str(tiny_llama), name="spec-bad", progress=False, speculative="eagle")
    assert "spec-bad" not in manager.names()


def test_a_draft_with_another_vocabulary_is_refused():
    from jupyter_llm.backends.native.draft import same_vocabulary

    class Hf:
        def __init__(self, vocab):
            self.vocab = vocab

        def __len__(self):
            return len(self.vocab)

        def get_vocab(self):
            return self.vocab

    class Tok:
        def __init__(self, vocab):
            self.hf = Hf(vocab)

    assert same_vocabulary(Tok({"a": 0, "b": 1}), Tok({"a": 0, "b": 1}))
    assert not same_vocabulary(Tok({"a": 0, "b": 1}), Tok({"a": 1, "b": 0}))
    assert not same_vocabulary(Tok({"a": 0}), Tok({"a": 0, "b": 1}))


GROUNDED = "Repeat this sentence exactly: The quick brown fox jumps over the lazy dog near the river bank.\n"
EMBEDDED_PROMPTS = [GROUNDED, "Fix the typos: Teh cat sat on teh mat and lokked at the dgo.\nFixed:",
                    "def add(a, b):\n    return a + b\n\n# The same function with type hints:\n", "Once upon a time"]


@pytest.mark.embedded
@pytest.mark.parametrize("options", [{"speculative": "ngram"}, {"speculative": "draft", "draft_quantization": "int8"}],
                         ids=["ngram", "int8-draft"])
def test_embedded_greedy_output_is_identical_alone_and_batched(manager, embedded_native, options):
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    expected = [c.token_ids for c in manager.generate(EMBEDDED_PROMPTS, params, backend=embedded_native)]
    name = load_keeping_default(manager, "native", name="embedded-spec", progress=False, kv_cache_memory="256MiB",
                                max_num_seqs=16, dtype="float32", **options)
    try:
        batched = [c.token_ids for c in manager.generate(EMBEDDED_PROMPTS, params, backend=name)]
        alone = [manager.generate(p, params, backend=name)[0].token_ids for p in EMBEDDED_PROMPTS]
        assert batched == expected
        assert alone == expected
        extra = manager.info(name).extra
        assert extra["spec_num_accepted_tokens"] > 0
        assert extra["kv_blocks_used"] == 0
    finally:
        manager.unload(name)

import math

import pytest
import torch

from jupyter_llm.sampling import Sampler, SamplingState, apply_penalties, filter_probs, processed_probs
from jupyter_llm.schema import SamplingParams


def state(prompt=(1, 2), sample_index=0, **params):
    return SamplingState(SamplingParams(**params), list(prompt), sample_index)


def test_same_seed_same_tokens_alone_or_batched():
    torch.manual_seed(0)
    logits = torch.randn(20, 4, 50)  # 20 steps, 4 rows
    sampler = Sampler()
    seeded = state(seed=1234, temperature=0.9, top_p=0.95)
    alone = [sampler(logits[t, :1], [seeded]).token_ids[0] for t in range(20)]
    seeded_again = state(seed=1234, temperature=0.9, top_p=0.95)
    others = [state(temperature=1.0), state(seed=7, temperature=1.3), state(temperature=0)]
    batched = [sampler(logits[t], [seeded_again] + others).token_ids[0] for t in range(20)]
    assert alone == batched
    different = state(seed=4321, temperature=0.9, top_p=0.95)
    assert [sampler(logits[t, :1], [different]).token_ids[0] for t in range(20)] != alone


def test_n_samples_of_one_seed_differ_but_reproduce():
    logits = torch.zeros(1, 1000)
    def draws(i):
        return [Sampler()(logits, [s]).token_ids[0] for s in [state(seed=5, sample_index=i)] * 5]
    assert draws(0) == draws(0)
    assert draws(0) != draws(1)


def test_greedy_is_argmax_and_ignores_seed():
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0]])
    assert Sampler()(logits, [state(temperature=0, seed=3)]).token_ids == [1]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().repeat(4000, 1)
    states = [state(seed=i) for i in range(4000)]
    tokens = torch.tensor(Sampler()(logits, states).token_ids)
    freq = torch.bincount(tokens, minlength=3).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


def test_filters():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]] * 3)
    out = filter_probs(probs, top_k=torch.tensor([2, 0, 0]), top_p=torch.tensor([1.0, 0.6, 1.0]),
                       min_p=torch.tensor([0.0, 0.0, 0.4]))
    assert out[0].tolist() == pytest.approx([0.4, 0.3, 0, 0])  # top-k 2
    assert out[1].tolist() == pytest.approx([0.4, 0.3, 0, 0])  # top-p 0.6: 0.4 < 0.6, 0.4+0.3 >= 0.6
    assert out[2].tolist() == pytest.approx([0.4, 0.3, 0.2, 0])  # min-p 0.4 * 0.4 = 0.16


def test_top_p_one_keeps_everything():
    probs = torch.softmax(torch.randn(2, 5000), -1)
    out = filter_probs(probs, torch.tensor([0, 0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]))
    assert torch.equal(out, probs)


def test_penalties_as_defined():
    logits = torch.tensor([[2.0, -2.0, 1.0, 1.0, 0.5]])
    s = state(prompt=(0,), repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    for token in (1, 3, 3):
        s.append(token)
    out = apply_penalties(logits.clone(), [s])[0]
    # token 0: in prompt only: repetition only (2.0 / 2); token 1: output once: -2*2 - 0.5 - 0.25
    # token 3: output twice: 1/2 - 0.5 - 0.5; tokens 2 and 4 untouched
    assert out.tolist() == pytest.approx([1.0, -4.75, 1.0, -0.5, 0.5])


def test_penalties_change_the_sampled_distribution():
    logits = torch.zeros(1, 4)
    s = state(prompt=(), frequency_penalty=2.0)
    s.append(0)
    p = processed_probs(logits, [s])[0]
    expected = torch.softmax(torch.tensor([-2.0, 0, 0, 0]), -1)
    assert torch.allclose(p, expected)


def test_temperature_sharpens():
    logits = torch.tensor([[1.0, 0.0]])
    cold = processed_probs(logits, [state(temperature=0.5)])[0]
    assert cold[0] / cold[1] == pytest.approx(math.exp(2.0), rel=1e-5)


def test_logprobs_are_raw_log_softmax_with_top_alternatives():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    out = Sampler()(logits, [state(temperature=0, logprobs=2)])
    chosen, top_ids, top_values = out.logprobs[0]
    expected = torch.log_softmax(logits[0], -1)
    assert out.token_ids == [0] and chosen == pytest.approx(float(expected[0]))
    assert top_ids == [0, 2] and top_values == pytest.approx(expected[[0, 2]].tolist())
    assert Sampler()(logits, [state(temperature=0)]).logprobs == [None]


@pytest.mark.parametrize("temperature", [1e-39, 1e-45, 1e-6])
def test_a_vanishing_temperature_decodes_greedily_not_into_nan(temperature):
    logits = torch.tensor([[-3.0, 1.0, 7.5, 2.0, -40.0]])
    tiny = state(temperature=temperature, seed=3, logprobs=1)
    out = Sampler()(logits, [tiny])
    assert out.token_ids == [2]  # the argmax, never token 0 from a row of NaN
    assert math.isfinite(out.logprobs[0][0])
    probs = processed_probs(logits, [tiny])
    assert not torch.isnan(probs).any() and probs[0, 2] == 1


@pytest.mark.parametrize("penalty", [1e-37, 1e-45, 1e38])
@pytest.mark.parametrize("temperature", [1.0, 1e-5, 0.0])
def test_an_extreme_repetition_penalty_stays_finite(penalty, temperature):
    """Dividing positive logits by a vanishing penalty (or multiplying by a huge one) overflows;
    the penalized logits are clamped so that every row keeps a real distribution."""
    logits = torch.tensor([[3.0, 2.0, 7.5, -1.0, 1.0]])
    row = state(prompt=(0, 1, 3), repetition_penalty=penalty, temperature=temperature, seed=5)
    probs = processed_probs(logits, [row])
    assert torch.isfinite(probs).all() and float(probs.sum()) > 0
    token = Sampler()(logits, [row]).token_ids[0]
    if penalty < 1:  # a seen token (0, 1 or 3), favoured without bound: never garbage from a NaN row
        assert token in (0, 1)
    else:  # seen tokens pushed away: the unseen best wins at low temperature
        assert token in (2, 4) and (temperature > 1e-5 or token == 2)

"""Sampling: seeded, split-independent, greedy when asked, honest logprobs, validated params."""

from __future__ import annotations

import math

import pytest
import torch

from modelgrid.model import Sampler, SamplingParams, load_stage

pytestmark = pytest.mark.usefixtures("torch_one_thread")

MODEL = dict(
    architecture="llama", num_layers=6, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=512,
    init_std=0.2, random_norms_and_biases=True,
)
PROMPT = torch.tensor([1, 17, 203, 99, 5, 311, 42])
SAMPLED = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=1234)


def run(directory, ranges, params: SamplingParams, new_tokens: int = 24) -> list[tuple[int, float]]:
    """Decode new_tokens through the stages, sampling each from the last stage's logits."""
    stages = [load_stage(directory, start, end) for start, end in ranges]
    caches = [s.new_cache() for s in stages]
    sampler = Sampler(params)
    out, x = [], PROMPT
    for _ in range(new_tokens):
        for stage, kv in zip(stages, caches):
            x = stage(x, kv, last_only=True)
        token, logprob = sampler.sample(x[-1])
        out.append((token, logprob))
        x = torch.tensor([token])
    return out


def tokens(pairs: list[tuple[int, float]]) -> list[int]:
    return [t for t, _ in pairs]


def test_same_seed_same_tokens_in_one_stage_or_three(make_checkpoint):
    directory = make_checkpoint(**MODEL)
    one = run(directory, [(0, 6)], SAMPLED)
    three = run(directory, [(0, 2), (2, 3), (3, 6)], SAMPLED)
    assert tokens(one) == tokens(three)
    assert len(set(tokens(one))) > 5  # really sampled, not stuck on one token


def test_different_seeds_give_different_tokens(make_checkpoint):
    directory = make_checkpoint(**MODEL)
    a = run(directory, [(0, 6)], SAMPLED)
    b = run(directory, [(0, 6)], SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=4321))
    assert tokens(a) != tokens(b)


def test_greedy_ignores_the_seed_and_top_k_1_is_greedy(make_checkpoint):
    directory = make_checkpoint(**MODEL)
    greedy = tokens(run(directory, [(0, 6)], SamplingParams(temperature=0, seed=1)))
    assert greedy == tokens(run(directory, [(0, 6)], SamplingParams(temperature=0, seed=2)))
    assert greedy == tokens(run(directory, [(0, 3), (3, 6)], SamplingParams(temperature=0)))
    assert greedy == tokens(run(directory, [(0, 6)], SamplingParams(temperature=1.3, top_k=1, seed=3)))


def test_logprob_is_log_softmax_of_the_raw_logits():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    expected = logits.double() - torch.logsumexp(logits.double(), 0)  # computed independently, in float64
    for params in (SAMPLED, SamplingParams(temperature=0), SamplingParams(temperature=2.0, seed=0)):
        sampler = Sampler(params)
        for _ in range(20):
            token, logprob = sampler.sample(logits)
            assert logprob == pytest.approx(float(expected[token]), abs=1e-5)


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    probs = torch.softmax(logits, 0)
    top_k = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=0))
    assert {top_k.sample(logits)[0] for _ in range(200)} == {0, 1}
    # top_p keeps the smallest prefix whose mass reaches p: here the first three tokens
    p = float(probs[:2].sum()) + 0.01
    top_p = Sampler(SamplingParams(temperature=1.0, top_p=p, seed=0))
    assert {top_p.sample(logits)[0] for _ in range(300)} == {0, 1, 2}


def test_sampling_upcasts_to_float32_and_flattens():
    logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    as_given = Sampler(SamplingParams(seed=9)).sample(logits)
    as_float = Sampler(SamplingParams(seed=9)).sample(logits.float().reshape(-1))
    assert as_given == as_float


def test_unseeded_samplers_draw_their_own_seeds():
    assert Sampler(SamplingParams()).seed != Sampler(SamplingParams()).seed


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(temperature=math.nan), "temperature must be a finite number"),
        (dict(temperature=math.inf), "temperature must be a finite number"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    ],
)
def test_invalid_params_are_rejected_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)

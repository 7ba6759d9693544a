"""Per-step sampling seeds: derived from (seed, step) alone, so a replayed step samples the same token."""

from __future__ import annotations

import torch

from modelgrid.model.sampling import Sampler, SamplingParams
from services.worker.steps import derive_seed


def test_derivation_is_a_pure_function_of_seed_and_step() -> None:
    assert derive_seed(42, 3) == derive_seed(42, 3)
    seeds = {derive_seed(seed, step) for seed in range(20) for step in range(50)}
    assert len(seeds) == 1000  # no two (seed, step) pairs share a generator here
    assert derive_seed(1, 0) != derive_seed(0, 1)  # not seed + step
    assert all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(2**64 - 1, 10**9) >= 0  # the proto's uint64 seed range


def test_same_step_samples_the_same_token_in_a_fresh_sampler() -> None:
    logits = torch.randn(500, generator=torch.Generator().manual_seed(0))

    def draw(step: int) -> int:
        params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=derive_seed(7, step))
        return Sampler(params).sample(logits)[0]

    tokens = [draw(step) for step in range(40)]
    assert tokens == [draw(step) for step in range(40)]  # "another worker" replays every step
    assert len(set(tokens)) > 5  # steps do get different generators

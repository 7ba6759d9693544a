"""KVCache growth and limits, and forward_batch against per-session forward."""

from __future__ import annotations

import pytest
import torch

from modelgrid.model import CacheCapacityError, load_stage
from modelgrid.model.kv_cache import BLOCK_TOKENS

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# init_std 0.05: float32 noise from regrouping rows (~1e-6) stays well under the 1e-5 tolerance,
# while mixing up two sessions' caches moves logits by ~1
MODEL = dict(
    architecture="qwen2", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=512,
    init_std=0.05, random_norms_and_biases=True,
)


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed))


def test_cache_grows_in_blocks_and_reports_bytes(make_checkpoint):
    stage = load_stage(make_checkpoint(**MODEL), 0, 2)
    kv = stage.new_cache()
    assert kv.length == 0 and kv.nbytes == 0
    stage(ids(3, 0), kv)
    assert kv.length == 3 and kv.capacity == BLOCK_TOKENS
    per_token = 2 * 2 * 2 * 16 * 4  # k and v, 2 layers, 2 kv heads, head_dim 16, float32
    assert kv.nbytes == BLOCK_TOKENS * per_token
    stage(ids(BLOCK_TOKENS, 1), kv)
    assert kv.length == 3 + BLOCK_TOKENS and kv.capacity == 2 * BLOCK_TOKENS
    stage(ids(BLOCK_TOKENS + 5, 2), kv)  # needs 2 blocks + 8 tokens: capacity doubles rather than creeps
    assert kv.length == 8 + 2 * BLOCK_TOKENS and kv.capacity == 4 * BLOCK_TOKENS
    assert stage.spec.kv_bytes_per_token(torch.float32, num_layers=2) == per_token
    assert stage.spec.kv_bytes_per_token(torch.bfloat16) == 2 * 4 * 2 * 16 * 2  # all 4 layers


def test_cache_limit_is_enforced_without_corrupting_the_session(make_checkpoint):
    stage = load_stage(make_checkpoint(**MODEL), 0, 4)
    kv = stage.new_cache(max_tokens=10)
    stage(ids(8, 0), kv)
    with pytest.raises(CacheCapacityError, match="limit of 10"):
        stage(ids(3, 1), kv)
    assert kv.length == 8 and kv.capacity == 10
    reference = stage.new_cache()
    stage(ids(8, 0), reference)
    torch.testing.assert_close(stage(ids(2, 2), kv), stage(ids(2, 2), reference), atol=0, rtol=0)


def test_truncate_rolls_back_to_an_earlier_state(make_checkpoint):
    stage = load_stage(make_checkpoint(**MODEL), 0, 4)
    kv, fresh = stage.new_cache(), stage.new_cache()
    stage(ids(9, 0), kv)
    kv.truncate(5)
    stage(ids(9, 0)[:5], fresh)
    torch.testing.assert_close(stage(ids(1, 3), kv), stage(ids(1, 3), fresh), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        kv.truncate(7)


@pytest.mark.parametrize("start, end", [(0, 4), (0, 2), (2, 4), (1, 3)])
def test_forward_batch_equals_forward_per_session(make_checkpoint, start, end):
    stage = load_stage(make_checkpoint(**MODEL), start, end)
    hidden = stage.spec.hidden_size

    def make_input(n: int, seed: int) -> torch.Tensor:
        if stage.is_first:
            return ids(n, seed)
        return torch.randn(n, hidden, generator=torch.Generator().manual_seed(seed))

    # three sessions with different histories: one fresh, two part-way through
    solo, batched = [stage.new_cache() for _ in range(3)], [stage.new_cache() for _ in range(3)]
    for kv_solo, kv_batched, past in zip(solo, batched, (0, 5, 12)):
        if past:
            stage(make_input(past, past), kv_solo)
            stage(make_input(past, past), kv_batched)
    steps = [((6, 3, 1), False), ((1, 1, 1), True), ((1, 4, 1), True), ((2, 1, 3), False)]
    for step, (lengths, last_only) in enumerate(steps):
        inputs = [make_input(n, 100 * step + i) for i, n in enumerate(lengths)]
        expected = [stage(x, kv, last_only=last_only) for x, kv in zip(inputs, solo)]
        got = stage.forward_batch(list(zip(inputs, batched)), last_only=last_only)
        assert len(got) == 3
        for e, g in zip(expected, got):
            assert e.shape == g.shape
            torch.testing.assert_close(g, e, atol=1e-5, rtol=0)
        assert [kv.length for kv in solo] == [kv.length for kv in batched]


def test_forward_batch_refuses_one_session_twice(make_checkpoint):
    stage = load_stage(make_checkpoint(**MODEL), 0, 4)
    kv = stage.new_cache()
    with pytest.raises(ValueError, match="same KVCache"):
        stage.forward_batch([(ids(2, 0), kv), (ids(2, 1), kv)])

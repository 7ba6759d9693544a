"""Our decoder stages, chained, against transformers on the same random checkpoints.

transformers is the independent reference: every expected number here comes from it.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch

from modelgrid.model import DecoderStage, load_spec, load_stage

pytestmark = pytest.mark.usefixtures("torch_one_thread")

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4
VOCAB = 512
NEW_TOKENS = 32
# init_std 0.2 makes attention far from uniform and generations varied; random norms and biases
# make a dropped or misplaced norm weight or bias visible
INIT = dict(init_std=0.2, random_norms_and_biases=True, vocab_size=VOCAB, hidden_size=64, num_heads=4)
MODELS = {
    "llama": dict(architecture="llama", num_layers=4),
    "qwen2": dict(architecture="qwen2", num_layers=4, num_kv_heads=2),  # GQA, qkv bias, tied embeddings
    "mistral": dict(architecture="mistral", num_layers=4, num_kv_heads=2),
}
SPLITS = {
    1: [(0, 4)],
    2: [(0, 2), (2, 4)],
    3: [(0, 1), (1, 3), (3, 4)],
    4: [(0, 1), (1, 2), (2, 3), (3, 4)],
}


def prompt(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


@cache
def reference_model(directory: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # generate exactly NEW_TOKENS, like our loop
    model.generation_config.pad_token_id = 0
    return model


def reference_logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return reference_model(directory)(ids[None]).logits[0]


def reference_generate(directory: Path, ids: torch.Tensor, new_tokens: int = NEW_TOKENS) -> list[int]:
    out = reference_model(directory).generate(
        ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
        max_new_tokens=new_tokens,
    )
    return out[0, len(ids):].tolist()


def chain(stages: list[DecoderStage], x: torch.Tensor, caches: list, last_only: bool = False) -> torch.Tensor:
    for stage, kv in zip(stages, caches):
        x = stage(x, kv, last_only=last_only)
    return x


def generate(stages: list[DecoderStage], ids: torch.Tensor, new_tokens: int = NEW_TOKENS) -> list[int]:
    """Greedy: prefill, then one token at a time through every stage, each with its own cache."""
    caches = [s.new_cache() for s in stages]
    tokens, x = [], ids
    for _ in range(new_tokens):
        token = int(chain(stages, x, caches, last_only=True)[-1].argmax())
        tokens.append(token)
        x = torch.tensor([token])
    return tokens


def assert_matches_reference(stages: list[DecoderStage], directory: Path, ids: torch.Tensor) -> None:
    ours = chain(stages, ids, [s.new_cache() for s in stages])
    torch.testing.assert_close(ours, reference_logits(directory, ids), atol=TOLERANCE, rtol=0)


def load(directory: Path, ranges: list[tuple[int, int]]) -> list[DecoderStage]:
    return [load_stage(directory, start, end) for start, end in ranges]


@pytest.mark.parametrize("arch", MODELS)
def test_spec_covers_the_features_under_test(make_checkpoint, arch):
    spec = load_spec(make_checkpoint(**INIT, **MODELS[arch]))
    assert spec.architecture == arch
    if arch == "qwen2":
        assert spec.num_kv_heads < spec.num_heads and spec.qkv_bias and spec.tie_word_embeddings
    if arch == "mistral":
        assert spec.num_kv_heads < spec.num_heads and not spec.tie_word_embeddings


@pytest.mark.parametrize("ways", SPLITS)
@pytest.mark.parametrize("arch", MODELS)
def test_chained_stages_reproduce_transformers_logits(make_checkpoint, arch, ways):
    directory = make_checkpoint(**INIT, **MODELS[arch])
    stages = load(directory, SPLITS[ways])
    for length in (1, 7, 64):
        ids = prompt(length)
        ours = chain(stages, ids, [s.new_cache() for s in stages])
        assert ours.dtype == torch.float32 and ours.shape == (length, VOCAB)
        torch.testing.assert_close(ours, reference_logits(directory, ids), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("ways", SPLITS)
@pytest.mark.parametrize("arch", MODELS)
def test_greedy_generation_matches_transformers_generate(make_checkpoint, arch, ways):
    directory = make_checkpoint(**INIT, **MODELS[arch])
    ids = prompt(7)
    expected = reference_generate(directory, ids)
    assert len(set(expected)) >= 8, "reference generation is degenerate; the comparison would be weak"
    assert generate(load(directory, SPLITS[ways]), ids) == expected


def test_uneven_split_of_seven_layers_in_three_stages(make_checkpoint):
    directory = make_checkpoint(**INIT, architecture="llama", num_layers=7, num_kv_heads=2)
    stages = load(directory, [(0, 2), (2, 5), (5, 7)])
    ids = prompt(64)
    assert_matches_reference(stages, directory, ids)
    assert generate(stages, ids[:7]) == reference_generate(directory, ids[:7])


def test_sharded_checkpoint_with_index(make_checkpoint):
    directory = make_checkpoint(**INIT, architecture="llama", num_layers=4, shard_size_bytes=100_000)
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("*.safetensors"))) >= 3
    stages = load(directory, SPLITS[2])
    ids = prompt(7)
    assert_matches_reference(stages, directory, ids)


LLAMA3_ROPE = {
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        # small, so that prompt positions fall in all three frequency bands
        "original_max_position_embeddings": 16,
    },
}


@pytest.mark.parametrize(
    "model, overrides",
    [
        (dict(architecture="llama"), LLAMA3_ROPE),
        (dict(architecture="mistral", num_kv_heads=2), {"sliding_window": 8}),
        (
            dict(architecture="qwen2", num_kv_heads=2),
            {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2},
        ),
    ],
    ids=["llama3-rope-scaling", "mistral-sliding-window", "qwen2-sliding-upper-layers"],
)
def test_rope_scaling_and_sliding_windows(make_checkpoint, model, overrides):
    directory = make_checkpoint(config_overrides=overrides, **INIT, num_layers=4, **model)
    spec = load_spec(directory)
    assert spec.rope_scaling or any(spec.layer_windows)
    stages = load(directory, SPLITS[3])
    ids = prompt(64)
    assert_matches_reference(stages, directory, ids)
    # 7 + 32 tokens run well past the window of 8
    assert generate(stages, ids[:7]) == reference_generate(directory, ids[:7])


def test_replaying_a_session_rebuilds_the_same_cache(make_checkpoint):
    directory = make_checkpoint(**INIT, **MODELS["mistral"])
    stages = load(directory, SPLITS[2])
    ids = prompt(7)
    tokens = generate(stages, ids, new_tokens=10)
    session = torch.cat([ids, torch.tensor(tokens)])

    # the original session: prefill + one token at a time
    caches = [s.new_cache() for s in stages]
    chain(stages, session[:7], caches)
    for t in session[7:]:
        last = chain(stages, t[None], caches)
    # a replay into fresh caches, in uneven chunks with explicit positions
    replayed = [s.new_cache() for s in stages]
    for lo, hi in ((0, 5), (5, 6), (6, 17)):
        x = session[lo:hi]
        for stage, kv in zip(stages, replayed):
            x = stage(x, kv, positions=torch.arange(lo, hi))
    for a, b in zip(caches, replayed):
        assert a.length == b.length == len(session)
        torch.testing.assert_close(a.k[:, :, : a.length], b.k[:, :, : b.length], atol=1e-5, rtol=0)
        torch.testing.assert_close(a.v[:, :, : a.length], b.v[:, :, : b.length], atol=1e-5, rtol=0)
    torch.testing.assert_close(x[-1:], last, atol=1e-5, rtol=0)


def _linear_weights(stage: DecoderStage) -> dict[str, torch.Tensor]:
    return {name: m.weight for name, m in stage.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_float32_projections_on_cpu_are_column_major_and_a_tied_head_keeps_rows(make_checkpoint, arch):
    """The layout load_stage picks for speed (layers.column_major_pays); the parity tests above check that
    the numbers still match transformers with it."""
    directory = make_checkpoint(**INIT, **MODELS[arch])
    whole, last = load_stage(directory, 0, 4), load_stage(directory, 2, 4)
    for stage in (whole, last):
        weights = _linear_weights(stage)
        assert len(weights) == 7 * (stage.end - stage.start) + 1  # q, k, v, o, gate, up, down per layer; lm_head
        tied_here = arch == "qwen2" and stage.is_first  # lm_head is embed_tokens' matrix: a lookup wants rows
        for name, w in weights.items():
            if name == "lm_head" and tied_here:
                assert w is stage.embed_tokens.weight and w.is_contiguous()
            else:
                assert w.t().is_contiguous() and not w.is_contiguous(), name
    # other dtypes keep the checkpoint's row-major layout (float16's kernels are slower column-major)
    bf16 = load_stage(directory, 0, 4, dtype="bfloat16")
    assert all(w.is_contiguous() for w in _linear_weights(bf16).values())

"""The model code on a CUDA device (skipped without one): bf16 by default, mixed-device pipelines,
and sampling that does not depend on where the logits were computed."""

from __future__ import annotations

import pytest
import torch

from modelgrid.model import Sampler, SamplingParams, load_stage

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MODEL = dict(architecture="qwen2", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=512)
PROMPT = torch.tensor([1, 17, 203, 99, 5, 311, 42])


def decode(stages, params: SamplingParams, new_tokens: int = 16) -> list[int]:
    caches = [s.new_cache() for s in stages]
    sampler, out, x = Sampler(params), [], PROMPT
    for _ in range(new_tokens):
        for stage, kv in zip(stages, caches):
            x = stage(x, kv, last_only=True)
        token, _ = sampler.sample(x[-1])
        out.append(token)
        x = torch.tensor([token])
    return out


def test_cuda_stage_defaults_to_bfloat16_and_is_close_to_cpu(make_checkpoint):
    directory = make_checkpoint(**MODEL)
    gpu = load_stage(directory, 0, 4, device="cuda")
    cpu = load_stage(directory, 0, 4)
    assert gpu.dtype == torch.bfloat16 and gpu.device.type == "cuda"
    kv = gpu.new_cache()
    logits = gpu(PROMPT, kv)
    assert logits.device.type == "cuda" and logits.dtype == torch.float32
    assert kv.k.device.type == "cuda" and kv.nbytes > 0
    torch.testing.assert_close(logits.cpu(), cpu(PROMPT, cpu.new_cache()), atol=0.05, rtol=0)


def test_mixed_device_pipeline_samples_like_the_cpu(make_checkpoint):
    """float32 on both devices: the same seed gives the same tokens wherever the stages run."""
    directory = make_checkpoint(**MODEL, init_std=0.2)
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=7)
    on_cpu = [load_stage(directory, 0, 4)]
    mixed = [load_stage(directory, 0, 2, device="cuda", dtype=torch.float32), load_stage(directory, 2, 4)]
    assert decode(on_cpu, params) == decode(mixed, params)
    assert decode(on_cpu, SamplingParams(temperature=0)) == decode(mixed, SamplingParams(temperature=0))


def test_bf16_activations_flow_into_a_float32_stage(make_checkpoint):
    directory = make_checkpoint(**MODEL)
    first = load_stage(directory, 0, 2, device="cuda")  # bfloat16
    last = load_stage(directory, 2, 4)  # float32 on the CPU
    hidden = first(PROMPT, first.new_cache())
    assert hidden.dtype == torch.bfloat16
    assert last(hidden, last.new_cache()).shape == (len(PROMPT), 512)


def test_forward_batch_on_cuda(make_checkpoint):
    stage = load_stage(make_checkpoint(**MODEL), 0, 4, device="cuda", dtype=torch.float32)
    inputs = [PROMPT, PROMPT[:3], PROMPT[2:]]
    solo = [stage(x, stage.new_cache(), last_only=True) for x in inputs]
    batched = stage.forward_batch([(x, stage.new_cache()) for x in inputs])
    for a, b in zip(solo, batched):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_encoder_on_cuda(minilm_dir):
    ids = torch.tensor([[101, 1037, 2158, 2003, 5983, 2833, 1012, 102], [101, 7592, 102, 0, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    gpu = load_stage(minilm_dir, 0, 6, device="cuda")
    cpu = load_stage(minilm_dir, 0, 6)
    similarity = (gpu(ids, mask).cpu() * cpu(ids, mask)).sum(1)
    assert (similarity > 0.99).all()

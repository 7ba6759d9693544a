"""Which tensors a stage reads, how many bytes it holds, and what memory it takes."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import modelgrid.model.checkpoint as checkpoint_module
from modelgrid.model import Checkpoint, layer_bytes, load_spec, load_stage, stage_tensor_names

pytestmark = pytest.mark.usefixtures("torch_one_thread")

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(num_layers=4, hidden_size=64, num_heads=4, vocab_size=512)
MODELS = {
    "llama-untied": dict(architecture="llama", **SMALL),
    "qwen2-tied": dict(architecture="qwen2", num_kv_heads=2, **SMALL),
}
STAGES = [(0, 4), (0, 1), (1, 3), (3, 4)]


def header_sizes(directory: Path) -> dict[str, int]:
    """Tensor name -> bytes, parsed straight from the safetensors headers (not via our reader)."""
    sizes = {}
    for file in directory.glob("*.safetensors"):
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            sizes[name] = end - begin
    return sizes


def expected_names(names: list[str], tied: bool, start: int, end: int, num_layers: int) -> set[str]:
    """The HF-naming rule for what a stage needs, written independently of the library."""
    wanted = set()
    for name in names:
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if layer and start <= int(layer.group(1)) < end:
            wanted.add(name)
    if start == 0:
        wanted.add("model.embed_tokens.weight")
    if end == num_layers:
        wanted |= {"model.norm.weight", "model.embed_tokens.weight" if tied else "lm_head.weight"}
    return wanted


@pytest.mark.parametrize("start, end", STAGES)
@pytest.mark.parametrize("model", MODELS)
def test_stage_needs_exactly_its_tensors_and_holds_their_bytes(make_checkpoint, model, start, end):
    directory = make_checkpoint(**MODELS[model])
    sizes = header_sizes(directory)
    spec = load_spec(directory)
    needed = expected_names(list(sizes), spec.tie_word_embeddings, start, end, spec.num_layers)
    assert set(stage_tensor_names(spec, start, end)) == needed
    stage = load_stage(directory, start, end)
    assert stage.param_bytes() == sum(sizes[n] for n in needed)
    assert layer_bytes(Checkpoint(directory)).stage_bytes(start, end) == stage.param_bytes()


def test_layer_bytes_add_up_to_the_checkpoint(make_checkpoint):
    for model in MODELS.values():
        directory = make_checkpoint(**model)
        parts = layer_bytes(Checkpoint(directory))
        sizes = header_sizes(directory)
        assert len(parts.layers) == 4 and len(set(parts.layers)) == 1
        assert sum(parts.layers) + parts.embed + parts.head - parts.shared == sum(sizes.values())
        assert parts.layers[2] == sum(v for k, v in sizes.items() if k.startswith("model.layers.2."))


def test_building_a_stage_reads_only_its_tensors(make_checkpoint, monkeypatch):
    directory = make_checkpoint(**MODELS["llama-untied"], shard_size_bytes=200_000)
    read: list[str] = []

    class RecordingSafeOpen:
        def __init__(self, *args, **kwargs):
            self.inner = safe_open(*args, **kwargs)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_tensor(self, name):
            read.append(name)
            return self.inner.get_tensor(name)

    monkeypatch.setattr(checkpoint_module, "safe_open", RecordingSafeOpen)
    load_stage(directory, 1, 3)
    assert sorted(read) == stage_tensor_names(load_spec(directory), 1, 3)
    assert all(".layers.1." in n or ".layers.2." in n for n in read)


def test_a_directory_with_only_the_stage_tensors_is_enough(make_checkpoint, tmp_path):
    full = make_checkpoint(**MODELS["qwen2-tied"])
    spec = load_spec(full)
    names = stage_tensor_names(spec, 2, 4)  # the last stage; tied, so it needs the embedding
    with safe_open(full / "model.safetensors", framework="pt") as f:
        save_file({n: f.get_tensor(n) for n in names}, tmp_path / "stage.safetensors")
    shutil.copy(full / "config.json", tmp_path)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    a, b = load_stage(full, 2, 4), load_stage(tmp_path, 2, 4)
    torch.testing.assert_close(a(x, a.new_cache()), b(x, b.new_cache()), atol=0, rtol=0)


def test_bfloat16_checkpoint_loads_in_the_requested_dtype(make_checkpoint):
    directory = make_checkpoint(**MODELS["llama-untied"], dtype="bfloat16")
    assert load_spec(directory).torch_dtype == "bfloat16"
    as_float = load_stage(directory, 0, 4)  # dtype None on CPU: float32
    as_bf16 = load_stage(directory, 0, 4, dtype="bfloat16")
    assert as_float.dtype == torch.float32 and as_bf16.dtype == torch.bfloat16
    assert as_bf16.param_bytes() * 2 == as_float.param_bytes()
    ids = torch.arange(3, 19)
    logits_bf16 = as_bf16(ids, as_bf16.new_cache())
    logits_f32 = as_float(ids, as_float.new_cache())
    assert logits_bf16.dtype == torch.float32  # logits always come back in float32
    torch.testing.assert_close(logits_bf16, logits_f32, atol=0.05, rtol=0)


_RSS_PROBE = """
import sys
import safetensors, torch
from modelgrid.model import load_stage

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

before = rss()
stage = load_stage(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
print(rss() - before, stage.param_bytes())
"""


def rss_growth(directory: Path, start: int, end: int) -> tuple[int, int]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(directory), str(start), str(end)],
        capture_output=True, text=True, env=env, check=True, timeout=120,
    )
    growth, param_bytes = map(int, out.stdout.split())
    return growth, param_bytes


def test_half_the_layers_take_about_half_the_memory(large_checkpoint):
    total = sum(f.stat().st_size for f in large_checkpoint.glob("*.safetensors"))
    assert total > 250e6
    full, full_params = rss_growth(large_checkpoint, 0, 8)
    half, half_params = rss_growth(large_checkpoint, 0, 4)
    assert full_params > 250e6
    assert full < 1.15 * full_params  # nothing but the weights stays resident
    assert half < 0.65 * full, f"half the layers grew RSS by {half / 1e6:.0f} MB, all by {full / 1e6:.0f} MB"

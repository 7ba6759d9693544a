"""The local stage cache: streamed fill, sha256 per tensor, atomic install, damaged entries detected.

The tensor source here is an in-memory stand-in for Registry.FetchTensors (the gRPC path is covered
by tests/integration/test_worker_pipeline.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modelgrid.errors import InvalidArgument
from services.worker.shard_cache import DataLoss, ShardCache, TensorPiece, VersionInfo
from services.worker.tensors import encode

TENSORS = {
    "model.embed_tokens.weight": torch.randn(300, 16, generator=torch.Generator().manual_seed(0)),
    "model.layers.0.mlp.up_proj.weight": torch.randn(32, 16).to(torch.bfloat16),
    "model.norm.weight": torch.ones(16),
}
INFO = VersionInfo("tiny", "v1", "decoder", 2, (0, 0), 0, 0, 300, 64, json.dumps({"model_type": "llama"}))


class MemorySource:
    """Serves TENSORS in 1000-byte chunks like the registry does; can lie about one tensor's sha256."""

    def __init__(self, bad_sha: str | None = None, drop: str | None = None) -> None:
        self.bad_sha, self.drop, self.calls = bad_sha, drop, 0

    async def fetch_tensors(self, model, version, names):
        self.calls += 1
        for name in names:
            if name == self.drop:
                continue
            wire = encode(TENSORS[name])
            sha = hashlib.sha256(wire.data).hexdigest()
            if name == self.bad_sha:
                sha = "0" * 64
            for off in range(0, len(wire.data), 1000):
                last = off + 1000 >= len(wire.data)
                yield TensorPiece(name, wire.dtype, wire.shape, off, wire.data[off:off + 1000], len(wire.data),
                                  sha if last else "")
                await asyncio.sleep(0)


async def test_fill_then_hit_then_detect_damage(tmp_path: Path) -> None:
    source = MemorySource()
    cache = ShardCache(tmp_path, source)
    assert await cache.lookup("tiny", "v1", 0, 2) is None
    path = await cache.fill(INFO, 0, 2, sorted(TENSORS))
    assert path == tmp_path / "tiny" / "v1" / "0-2"
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "manifest.json", "stage.safetensors"]
    assert [p.name for p in path.parent.iterdir()] == ["0-2"]  # no temporary directory left behind
    loaded = load_file(path / "stage.safetensors")
    assert loaded.keys() == TENSORS.keys()
    for name, t in TENSORS.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)

    assert await cache.lookup("tiny", "v1", 0, 2) == path
    assert cache.stats.hits == 1 and source.calls == 1

    # flip one byte of tensor data: the entry is damaged, removed, and reported as a miss
    raw = bytearray((path / "stage.safetensors").read_bytes())
    raw[-5] ^= 0xFF
    (path / "stage.safetensors").write_bytes(bytes(raw))
    assert await cache.lookup("tiny", "v1", 0, 2) is None
    assert cache.stats.corrupt == 1 and not path.exists()

    # a truncated file is caught too
    path = await cache.fill(INFO, 0, 2, sorted(TENSORS))
    data = (path / "stage.safetensors").read_bytes()
    (path / "stage.safetensors").write_bytes(data[:-100])
    assert await cache.lookup("tiny", "v1", 0, 2) is None


async def test_sha_mismatch_is_refused_and_leaves_no_entry(tmp_path: Path) -> None:
    cache = ShardCache(tmp_path, MemorySource(bad_sha="model.norm.weight"))
    with pytest.raises(DataLoss, match="'model.norm.weight' of tiny v1 failed its sha256 check"):
        await cache.fill(INFO, 0, 2, sorted(TENSORS))
    assert list((tmp_path / "tiny" / "v1").iterdir()) == []
    assert await cache.lookup("tiny", "v1", 0, 2) is None


async def test_missing_tensor_is_refused(tmp_path: Path) -> None:
    cache = ShardCache(tmp_path, MemorySource(drop="model.norm.weight"))
    with pytest.raises(DataLoss, match="did not send tensor.*model.norm.weight"):
        await cache.fill(INFO, 0, 2, sorted(TENSORS))


@pytest.mark.parametrize("model,version", [("../etc", "v1"), ("tiny", "../v1"), ("Tiny", "v1"), ("tiny", "v1/x")])
async def test_names_that_could_escape_the_cache_dir_are_refused(tmp_path: Path, model: str, version: str) -> None:
    with pytest.raises(InvalidArgument):
        await ShardCache(tmp_path, MemorySource()).lookup(model, version, 0, 2)

"""Upload chunking: the header lists every file with its size and sha256; the chunks rebuild the files."""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from pathlib import Path

import pytest

from modelgrid.channel import CHUNK_BYTES
from modelgrid.client import Client
from modelgrid.errors import InvalidArgument
from modelgrid.upload import aiter_upload_chunks, iter_upload_chunks, plan_upload


def _write(path: Path, data: bytes) -> bytes:
    path.write_bytes(data)
    return data


@pytest.fixture()
def checkpoint(tmp_path: Path) -> dict[str, bytes]:
    """A checkpoint-shaped directory: what an upload sends, and files it must leave out."""
    files = {
        "config.json": _write(tmp_path / "config.json", b'{"model_type": "llama"}'),
        "model-00001-of-00002.safetensors": _write(tmp_path / "model-00001-of-00002.safetensors", os.urandom(2500)),
        "model-00002-of-00002.safetensors": _write(tmp_path / "model-00002-of-00002.safetensors", os.urandom(2000)),
        "tokenizer.json": _write(tmp_path / "tokenizer.json", os.urandom(999)),
        "empty.txt": _write(tmp_path / "empty.txt", b""),
    }
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")  # never sent
    (tmp_path / "model.onnx").write_bytes(b"onnx")  # never sent
    (tmp_path / ".gitattributes").write_text("*")  # hidden: never sent
    (tmp_path / "1_Pooling").mkdir()  # subdirectory: never sent
    (tmp_path / "1_Pooling" / "config.json").write_text("{}")
    return files


def _reassemble(messages) -> tuple[object, dict[str, bytes], list[int]]:
    header = messages[0].header
    assert messages[0].WhichOneof("part") == "header"
    data: dict[str, bytearray] = defaultdict(bytearray)
    sizes = []
    for m in messages[1:]:
        assert m.WhichOneof("part") == "chunk"
        chunk = m.chunk
        assert chunk.offset == len(data[chunk.path]), "chunks of a file arrive in order, contiguous"
        data[chunk.path] += chunk.data
        sizes.append(len(chunk.data))
    return header, {k: bytes(v) for k, v in data.items()}, sizes


def test_header_and_chunks_rebuild_the_files(tmp_path: Path, checkpoint: dict[str, bytes]) -> None:
    progress: list[tuple[int, int]] = []
    plan = plan_upload(tmp_path)
    messages = list(iter_upload_chunks(plan, "tiny", aliases=["prod"], replicas=2, num_stages=3, chunk_bytes=1000,
                                       on_progress=lambda sent, total: progress.append((sent, total))))
    header, files, sizes = _reassemble(messages)

    assert header.model == "tiny" and list(header.aliases) == ["prod"]
    assert header.replicas == 2 and header.num_stages == 3
    assert [f.path for f in header.files] == sorted(checkpoint)
    for f in header.files:
        assert f.size == len(checkpoint[f.path])
        assert f.sha256 == hashlib.sha256(checkpoint[f.path]).hexdigest()
    assert files == checkpoint  # includes the empty file, as one empty chunk
    assert max(sizes) == 1000
    assert sorted(plan.skipped) == ["1_Pooling/", "model.onnx", "pytorch_model.bin"]
    total = sum(len(v) for v in checkpoint.values())
    assert progress[-1] == (total, total) and plan.total_bytes == total


def test_default_chunk_size_is_the_shared_constant(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    big = _write(tmp_path / "model.safetensors", os.urandom(CHUNK_BYTES + 10))
    messages = list(iter_upload_chunks(plan_upload(tmp_path), "m"))
    _, files, sizes = _reassemble(messages)
    assert files["model.safetensors"] == big
    assert sorted(sizes) == [2, 10, CHUNK_BYTES]  # config.json, then the big file in two chunks


async def test_async_chunks_match_sync(tmp_path: Path, checkpoint: dict[str, bytes]) -> None:
    plan = plan_upload(tmp_path)
    sync = list(iter_upload_chunks(plan, "tiny", chunk_bytes=700))
    async_ = [m async for m in aiter_upload_chunks(plan, "tiny", chunk_bytes=700)]
    assert async_ == sync


def test_directory_without_safetensors_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(InvalidArgument, match=r"no \*\.safetensors.*pickled weights \(pytorch_model\.bin\)"):
        plan_upload(tmp_path)


def test_missing_directory_and_missing_config_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="not a directory"):
        plan_upload(tmp_path / "nope")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(InvalidArgument, match="no config.json"):
        plan_upload(tmp_path)


def test_client_register_refuses_locally_before_any_call(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with Client("127.0.0.1:9") as client:  # never dialled: the check is local
        with pytest.raises(InvalidArgument, match="safetensors"):
            client.register(tmp_path, "m")
        with pytest.raises(InvalidArgument, match="replicas"):
            client.register(tmp_path, "m", replicas=-1)

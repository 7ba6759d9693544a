"""Registry file handling: safetensors layouts and manifests, tensor streaming, upload receiving,
checkpoint inspection, and the client-side upload helper (on files in tmp_path; no network)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modelgrid.errors import FailedPrecondition, InvalidArgument
from modelgrid.model import write_random_checkpoint
from services.registry.artifacts import ArtifactStore, UploadReceiver
from services.registry.checkpoint import inspect_checkpoint
from services.registry.records import FileEntry, FilePart
from services.registry.tensors import build_manifest, iter_file_pieces, iter_tensor_pieces, read_tensor_layout
from modelgrid.upload import iter_upload_chunks, plan_upload

TINY = dict(num_layers=2, hidden_size=32, num_heads=2, vocab_size=300, max_position_embeddings=64)


def entries(directory: Path) -> list[FileEntry]:
    return [FileEntry(p.name, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(directory.iterdir())]


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def test_layout_and_manifest_match_safetensors(tmp_path: Path) -> None:
    tensors = {
        "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.randn(5, dtype=torch.float32).to(torch.bfloat16),
        "c": torch.tensor([1, 2, 3], dtype=torch.int64),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, tmp_path / "m.safetensors")
    layout = read_tensor_layout(tmp_path / "m.safetensors")
    assert {n: (e.dtype, e.shape) for n, e in layout.items()} == {
        "a": ("float32", (3, 4)), "b": ("bfloat16", (5,)), "c": ("int64", (3,)), "empty": ("float32", (0, 4))
    }
    manifest = build_manifest(tmp_path, {"m.safetensors": layout})
    data = (tmp_path / "m.safetensors").read_bytes()
    for name, t in tensors.items():
        e = manifest[name]
        assert data[e.begin:e.end] == raw(t)
        assert e.sha256 == hashlib.sha256(raw(t)).hexdigest()

    pieces = list(iter_tensor_pieces(tmp_path, ["c", "a", "empty"], manifest, chunk_bytes=10))
    assert [p.name for p in pieces if p.sha256] == ["c", "a", "empty"]  # sha256 on each tensor's last piece only
    for name in ("c", "a", "empty"):
        mine = [p for p in pieces if p.name == name]
        assert b"".join(p.data for p in mine) == raw(tensors[name])
        assert [p.offset for p in mine] == [10 * i for i in range(len(mine))]
        assert all(len(p.data) <= 10 for p in mine)


def test_corrupted_tensor_is_reported_before_its_last_chunk(tmp_path: Path) -> None:
    save_file({"a": torch.ones(64)}, tmp_path / "m.safetensors")
    manifest = build_manifest(tmp_path, {"m.safetensors": read_tensor_layout(tmp_path / "m.safetensors")})
    path = tmp_path / "m.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    pieces = iter_tensor_pieces(tmp_path, ["a"], manifest, chunk_bytes=100)
    assert next(pieces).sha256 == ""
    with pytest.raises(FailedPrecondition, match="corrupted"):
        list(pieces)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x01\x02", "shorter than 8 bytes"),
        (struct.pack("<Q", 1 << 40) + b"{}", "implausible"),
        (struct.pack("<Q", 4) + b"nope", "bad header JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (struct.pack("<Q", 64) + json.dumps({"a": {"dtype": "F32", "shape": [2]}}).encode().ljust(64), "malformed"),
        (struct.pack("<Q", 64) + json.dumps({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}})
         .encode().ljust(64) + b"\0" * 8, "not supported"),
        (struct.pack("<Q", 64) + json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 80]}})
         .encode().ljust(64) + b"\0" * 8, "outside the file"),
        (struct.pack("<Q", 64) + json.dumps({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})
         .encode().ljust(64) + b"\0" * 8, "needs 12"),
    ],
)
def test_bad_safetensors(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "x.safetensors").write_bytes(content)
    with pytest.raises(InvalidArgument, match=message):
        read_tensor_layout(tmp_path / "x.safetensors")


def test_tensor_in_two_shards_refused(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "1.safetensors")
    save_file({"a": torch.ones(2)}, tmp_path / "2.safetensors")
    layouts = {n: read_tensor_layout(tmp_path / n) for n in ("1.safetensors", "2.safetensors")}
    with pytest.raises(InvalidArgument, match="in both"):
        build_manifest(tmp_path, layouts)


def test_file_pieces(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(bytes(range(25)))
    assert list(iter_file_pieces(tmp_path / "f", 10)) == [(0, bytes(range(10))), (10, bytes(range(10, 20))),
                                                          (20, bytes(range(20, 25)))]
    (tmp_path / "e").write_bytes(b"")
    assert list(iter_file_pieces(tmp_path / "e", 10)) == [(0, b"")]


def test_receiver_checks_order_size_and_hash(tmp_path: Path) -> None:
    data = b"hello world"
    good = FileEntry("a.json", len(data), hashlib.sha256(data).hexdigest())
    r = UploadReceiver(tmp_path, [good, FileEntry("empty.txt", 0, hashlib.sha256(b"").hexdigest())])
    r.write(FilePart("a.json", 0, data[:5]))
    with pytest.raises(InvalidArgument, match="expected 5"):
        r.write(FilePart("a.json", 0, data[:5]))
    with pytest.raises(InvalidArgument, match="longer than"):
        r.write(FilePart("a.json", 5, data[5:] + b"!"))
    with pytest.raises(InvalidArgument, match="does not list"):
        r.write(FilePart("b.json", 0, b""))
    with pytest.raises(InvalidArgument, match="incomplete"):
        r.finish()
    r.write(FilePart("a.json", 5, data[5:]))
    r.finish()
    assert (tmp_path / "a.json").read_bytes() == data and (tmp_path / "empty.txt").read_bytes() == b""

    bad = tmp_path / "bad"
    bad.mkdir()
    r = UploadReceiver(bad, [FileEntry("a.json", len(data), "0" * 64)])
    r.write(FilePart("a.json", 0, data))
    with pytest.raises(InvalidArgument, match="sha256 mismatch"):
        r.finish()


def test_store_install_is_one_rename(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    upload = store.new_upload_dir()
    (upload / "config.json").write_text("{}")
    stale = store.version_dir("m", "v1")
    stale.mkdir(parents=True)
    (stale / "junk").write_text("left by a crash")
    store.install(upload, "m", "v1")
    assert not upload.exists() and sorted(p.name for p in stale.iterdir()) == ["config.json"]
    assert list(store.incoming.iterdir()) == []
    store.uninstall(upload, "m", "v1")
    assert not stale.exists() and (upload / "config.json").read_text() == "{}"


def test_inspect_checkpoint_llama_and_bert(tmp_path: Path) -> None:
    llama = write_random_checkpoint(tmp_path / "llama", **TINY, num_kv_heads=1, tie_word_embeddings=True)
    facts = inspect_checkpoint(llama, entries(llama))
    assert (facts.architecture, facts.kind, facts.num_layers, facts.vocab_size, facts.max_context) == (
        "llama", "decoder", 2, 300, 64)
    embed = 300 * 32 * 4
    assert facts.embed_bytes == embed and facts.head_bytes == embed + 32 * 4  # tied matrix + final norm
    assert facts.kv_bytes_per_token_per_layer == 2 * 1 * 16 * 4
    with safe_open(llama / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        layer0 = sum(f.get_tensor(n).numel() * 4 for n in names if n.startswith("model.layers.0."))
    assert set(facts.tensors) == names and facts.layer_bytes == [layer0, layer0]

    bert = write_random_checkpoint(tmp_path / "bert", "bert", **TINY)
    facts = inspect_checkpoint(bert, entries(bert))
    assert (facts.architecture, facts.kind, facts.kv_bytes_per_token_per_layer) == ("bert", "encoder", 0)


def test_inspect_sharded_index_must_agree(tmp_path: Path) -> None:
    d = write_random_checkpoint(tmp_path / "s", **TINY, shard_size_bytes=40_000)
    assert len(list(d.glob("*.safetensors"))) > 1
    assert inspect_checkpoint(d, entries(d)).num_layers == 2
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = "model.layers.0.mlp.up_proj.weight"
    wrong = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][name])
    index["weight_map"][name] = wrong
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidArgument, match=f"puts tensor '{name}'"):
        inspect_checkpoint(d, entries(d))


def test_upload_helper_stream_reassembles(tmp_path: Path) -> None:
    d = write_random_checkpoint(tmp_path / "ck", **TINY)
    (d / "pytorch_model.bin").write_bytes(b"pickle")  # left out next to safetensors
    (d / ".gitattributes").write_text("*")
    (d / "1_Pooling").mkdir()
    messages = list(iter_upload_chunks(d, "tiny", ["prod"], replicas=2, num_stages=1, chunk_bytes=4096))
    header = messages[0].header
    assert (header.model, list(header.aliases), header.replicas, header.num_stages) == ("tiny", ["prod"], 2, 1)
    names = sorted(p.name for p in d.iterdir() if p.is_file() and p.suffix != ".bin" and not p.name.startswith("."))
    assert [f.path for f in header.files] == names
    rebuilt: dict[str, bytes] = {}
    for m in messages[1:]:
        assert m.WhichOneof("part") == "chunk" and len(m.chunk.data) <= 4096
        assert m.chunk.offset == len(rebuilt.get(m.chunk.path, b""))
        rebuilt[m.chunk.path] = rebuilt.get(m.chunk.path, b"") + m.chunk.data
    for f in header.files:
        data = (d / f.path).read_bytes()
        assert rebuilt[f.path] == data and f.size == len(data) and f.sha256 == hashlib.sha256(data).hexdigest()


def test_upload_helper_refuses_pickled_only_locally(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(InvalidArgument, match="pickled weights"):
        next(iter_upload_chunks(tmp_path, "m"))
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(InvalidArgument, match="no \\*.safetensors"):
        plan_upload(tmp_path)
    with pytest.raises(InvalidArgument, match="not a directory"):
        plan_upload(tmp_path / "missing")

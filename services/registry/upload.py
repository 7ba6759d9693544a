"""Client side of UploadVersion: hash a checkpoint directory, then yield its header and chunks.

Shared by the SDK, the CLI and the gateway, so it imports nothing heavy (no torch).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Iterator

from modelgrid.channel import CHUNK_BYTES
from modelgrid.errors import InvalidArgument
from modelgrid.v1 import common_pb2

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
OTHER_WEIGHT_SUFFIXES = (".h5", ".msgpack", ".onnx", ".ot", ".gguf")  # other frameworks' weights: never needed
_HASH_BLOCK = 1024 * 1024


def upload_files(directory: str | Path) -> list[Path]:
    """The files of a checkpoint directory that an upload sends, sorted by name.

    Top-level regular files only (subdirectories such as sentence-transformers' 1_Pooling/ and
    hidden files are not part of a model version); pickled and other frameworks' weights are left
    out when *.safetensors are there, and refused when they are not.
    """
    root = Path(directory)
    if not root.is_dir():
        raise InvalidArgument(f"{root} is not a directory")
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    if not any(p.suffix == ".safetensors" for p in files):
        pickled = [p.name for p in files if p.name.endswith(PICKLE_SUFFIXES)]
        if pickled:
            raise InvalidArgument(
                f"{root} holds pickled weights ({', '.join(pickled)}) and no *.safetensors: pickled weights "
                "are refused because loading them can run arbitrary code. Convert the checkpoint first "
                "(transformers: save_pretrained(dir, safe_serialization=True))"
            )
        raise InvalidArgument(f"{root} has no *.safetensors weights")
    return [p for p in files if not p.name.endswith(PICKLE_SUFFIXES + OTHER_WEIGHT_SUFFIXES)]


def file_info(path: Path) -> common_pb2.FileInfo:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
            size += len(block)
    return common_pb2.FileInfo(path=path.name, size=size, sha256=digest.hexdigest())


def iter_upload_chunks(
    directory: str | Path,
    model: str,
    aliases: Iterable[str] = (),
    replicas: int = 0,
    num_stages: int = 0,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[common_pb2.UploadVersionChunk]:
    """The UploadVersion request stream for a checkpoint directory: the header (every file's size
    and sha256), then each file's bytes in chunks of at most chunk_bytes.

    Files are read twice (hash, then send); the registry rejects the upload if one changed between.
    replicas / num_stages 0 keep the model's current values.
    """
    files = upload_files(directory)
    infos = [file_info(p) for p in files]
    header = common_pb2.UploadHeader(
        model=model, aliases=list(aliases), replicas=replicas, num_stages=num_stages, files=infos
    )
    yield common_pb2.UploadVersionChunk(header=header)
    for path in files:
        with open(path, "rb") as f:
            offset = 0
            while block := f.read(chunk_bytes):
                yield common_pb2.UploadVersionChunk(
                    chunk=common_pb2.FileChunk(path=path.name, offset=offset, data=block)
                )
                offset += len(block)

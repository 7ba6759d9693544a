"""Turn a local checkpoint directory into the client-streamed RegisterModel upload (torch-free).

The upload is one `UploadHeader` (model, aliases, replicas, stages, and every file's size and
sha256), then each file's bytes in order, in `FileChunk`s of at most CHUNK_BYTES. The registry
checks sizes and hashes, so a file that changes while it is being sent is refused there.

Only the top level of the directory is uploaded. Hidden files, subdirectories (sentence-transformers
extras, ONNX exports) and weights in other formats are skipped; pickled weights (*.bin, *.pt, ...)
are never sent, since the platform only loads safetensors.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator, Sequence

from modelgrid.channel import CHUNK_BYTES
from modelgrid.errors import InvalidArgument
from modelgrid.types import FileInfo
from modelgrid.v1 import common_pb2

log = logging.getLogger(__name__)

# Weight formats other than safetensors: pickled (refused by the registry) or for other frameworks.
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SKIPPED_SUFFIXES = PICKLED_SUFFIXES + (".h5", ".msgpack", ".onnx", ".ot", ".gguf")
_HASH_BLOCK = 1024 * 1024

ProgressFn = Callable[[int, int], None]  # (bytes sent so far, total bytes)


@dataclass(frozen=True)
class UploadPlan:
    """What will be sent: files (relative paths, sizes, sha256) and what was left out."""

    directory: Path
    files: list[FileInfo]
    skipped: list[str]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def plan_upload(directory: str | Path) -> UploadPlan:
    """List and hash the files to upload; InvalidArgument when the directory cannot be a checkpoint."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise InvalidArgument(f"{str(directory)!r} is not a directory; pass a Hugging Face checkpoint directory")
    files: list[FileInfo] = []
    skipped: list[str] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_file():
            skipped.append(entry.name + ("/" if entry.is_dir() else ""))
            continue
        if entry.name.lower().endswith(SKIPPED_SUFFIXES):
            skipped.append(entry.name)
            continue
        files.append(FileInfo(path=entry.name, size=entry.stat().st_size, sha256=sha256_file(entry)))
    if not any(f.path.endswith(".safetensors") for f in files):
        found = ", ".join(sorted([f.path for f in files] + skipped)) or "nothing"
        pickled = [name for name in skipped if name.lower().endswith(PICKLED_SUFFIXES)]
        why = (f"; pickled weights ({', '.join(pickled)}) are refused because loading them can run arbitrary code"
               if pickled else "")
        raise InvalidArgument(
            f"{str(directory)!r} has no *.safetensors weights (found: {found}){why}; ModelGrid only loads "
            "safetensors: convert with transformers' `model.save_pretrained(dir, safe_serialization=True)`"
        )
    if not any(f.path == "config.json" for f in files):
        raise InvalidArgument(f"{str(directory)!r} has no config.json; pass a Hugging Face checkpoint directory")
    for name in skipped:
        log.info("not uploading %s", name)
    return UploadPlan(directory=root, files=files, skipped=skipped)


def iter_upload_chunks(
    plan: UploadPlan | str | Path,
    model: str,
    aliases: Sequence[str] = (),
    replicas: int = 0,
    num_stages: int = 0,
    chunk_bytes: int = CHUNK_BYTES,
    on_progress: ProgressFn | None = None,
) -> Iterator[common_pb2.UploadVersionChunk]:
    """The upload stream: the header, then every file of the plan in chunks of at most chunk_bytes.

    An empty file is sent as one empty chunk, so the receiver sees every file. on_progress is called
    after each chunk with (bytes sent, total bytes).
    """
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    if not isinstance(plan, UploadPlan):
        plan = plan_upload(plan)
    header = common_pb2.UploadHeader(
        model=model,
        aliases=list(aliases),
        replicas=replicas,
        num_stages=num_stages,
        files=[common_pb2.FileInfo(path=f.path, size=f.size, sha256=f.sha256) for f in plan.files],
    )
    yield common_pb2.UploadVersionChunk(header=header)
    total = plan.total_bytes
    sent = 0
    if on_progress is not None:
        on_progress(0, total)
    for info in plan.files:
        offset = 0
        with open(plan.directory / info.path, "rb") as fh:
            while True:
                data = fh.read(chunk_bytes)
                if not data and offset > 0:
                    break
                if offset + len(data) > info.size:
                    raise InvalidArgument(f"{info.path} grew while it was being uploaded; try again")
                yield common_pb2.UploadVersionChunk(chunk=common_pb2.FileChunk(path=info.path, offset=offset, data=data))
                offset += len(data)
                sent += len(data)
                if on_progress is not None:
                    on_progress(sent, total)
                if not data:
                    break
        if offset != info.size:
            raise InvalidArgument(f"{info.path} shrank while it was being uploaded; try again")


async def aiter_upload_chunks(
    plan: UploadPlan,
    model: str,
    aliases: Sequence[str] = (),
    replicas: int = 0,
    num_stages: int = 0,
    chunk_bytes: int = CHUNK_BYTES,
    on_progress: ProgressFn | None = None,
) -> AsyncIterator[common_pb2.UploadVersionChunk]:
    """iter_upload_chunks for asyncio: file reads run in a thread, off the event loop."""
    chunks = iter_upload_chunks(plan, model, aliases, replicas, num_stages, chunk_bytes, on_progress)
    done = object()
    while True:
        message = await asyncio.to_thread(next, chunks, done)
        if message is done:
            return
        yield message

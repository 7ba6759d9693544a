"""Registry: the registry's domain logic over its database and artifact store (no protobuf here).

Blocking work (SQL, disk, hashing, checkpoint validation) runs in threads, so the event loop keeps
answering health checks and other calls while a large upload is received or validated.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, TypeVar

from modelgrid.errors import InvalidArgument, NotFound, ResourceExhausted
from services.registry.artifacts import ArtifactStore, UploadReceiver
from services.registry.db import RegistryDB
from services.registry.records import (
    Deployment,
    FilePart,
    Limits,
    Manifest,
    ModelRecord,
    TensorPiece,
    UploadHeader,
    VersionRecord,
)
from services.registry.tensors import iter_file_pieces, iter_tensor_pieces
from services.registry.validation import (
    check_alias,
    check_file_path,
    check_header,
    check_replicas,
    is_weight_file,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
MANIFEST_CACHE = 64  # versions are immutable, so their manifests can be cached


class Registry:
    """Registers versions from uploads and serves what the scheduler, workers and gateway ask for."""

    def __init__(self, db: RegistryDB, store: ArtifactStore, limits: Limits, chunk_bytes: int) -> None:
        self.db = db
        self.store = store
        self.limits = limits
        self.chunk_bytes = chunk_bytes
        self._manifests: OrderedDict[tuple[str, str], Manifest] = OrderedDict()

    # ---- registration --------------------------------------------------------------------------

    async def upload(self, parts: AsyncIterator[UploadHeader | FilePart]) -> VersionRecord:
        """Receive, verify, validate and record one version; on any failure nothing is left behind."""
        started = time.monotonic()
        header = check_header(await _first_header(parts), self.limits)
        total = sum(f.size for f in header.files)
        free = shutil.disk_usage(self.store.incoming).free
        if total > free:
            raise ResourceExhausted(f"the upload is {total} bytes but the registry's disk has only {free} free")
        directory = self.store.new_upload_dir()
        pending: asyncio.Future[Any] | None = None
        try:
            receiver = UploadReceiver(directory, header.files)
            async for part in parts:
                if not isinstance(part, FilePart):
                    raise InvalidArgument("an upload carries one header, first; a second header arrived")
                pending = asyncio.ensure_future(asyncio.to_thread(receiver.write, part))
                await asyncio.shield(pending)
            pending = asyncio.ensure_future(asyncio.to_thread(self._register, directory, header, receiver))
            record: VersionRecord = await asyncio.shield(pending)
        finally:
            # after a cancel the thread may still be writing: remove the directory once it is done
            _after(pending, lambda: shutil.rmtree(directory, ignore_errors=True))
        log.info(
            "registered %s %s (%s, %d layers, %d files, %d bytes) in %.1f s",
            record.model, record.version, record.architecture, record.num_layers, len(record.files), total,
            time.monotonic() - started,
        )
        return record

    def _register(self, directory: Path, header: UploadHeader, receiver: UploadReceiver) -> VersionRecord:
        # imported on first use: it pulls in torch (seconds), which nothing else in the registry needs
        from services.registry.checkpoint import inspect_checkpoint

        receiver.finish()
        facts = inspect_checkpoint(directory, header.files)
        return self.db.add_version(
            header,
            facts,
            install=lambda version: self.store.install(directory, header.model, version),
            uninstall=lambda version: self.store.uninstall(directory, header.model, version),
        )

    # ---- models, versions, aliases -------------------------------------------------------------

    async def list_models(self) -> list[ModelRecord]:
        return await asyncio.to_thread(self.db.list_models)

    async def get_model(self, name: str) -> ModelRecord:
        return await asyncio.to_thread(self.db.get_model, name)

    async def resolve(self, model: str, ref: str) -> VersionRecord:
        return await asyncio.to_thread(self.db.resolve, model, ref)

    async def set_alias(self, model: str, alias: str, ref: str) -> VersionRecord:
        """Point alias at a version or at what another alias points at now. "latest" is refused
        (FAILED_PRECONDITION): the registry keeps it on the newest version."""
        check_alias(alias)
        if not ref:
            raise InvalidArgument("set_alias needs the version (or alias) to point at, e.g. 'v2'")
        return await asyncio.to_thread(self.db.set_alias, model, alias, ref)

    async def set_replicas(self, model: str, replicas: int) -> ModelRecord:
        check_replicas(replicas, allow_zero=False)
        return await asyncio.to_thread(self.db.set_replicas, model, replicas)

    async def list_deployments(self) -> list[Deployment]:
        return await asyncio.to_thread(self.db.list_deployments)

    # ---- artifacts -----------------------------------------------------------------------------

    async def fetch_tensors(self, model: str, version: str, names: list[str]) -> AsyncIterator[TensorPiece]:
        """Exactly the named tensors (each once, in the order asked), chunked."""
        if not names:
            raise InvalidArgument("FetchTensors needs at least one tensor name")
        manifest = await self._manifest(model, version)
        wanted = list(dict.fromkeys(names))
        unknown = [n for n in wanted if n not in manifest.tensors]
        if unknown:
            shown = ", ".join(repr(n) for n in unknown[:5])
            if len(unknown) > 5:
                shown += f" and {len(unknown) - 5} more"
            raise NotFound(
                f"model {model!r} version {version!r} has no tensor {shown} ({len(manifest.tensors)} tensors, "
                f"e.g. {next(iter(sorted(manifest.tensors)), '-')!r})"
            )
        directory = self.store.version_dir(model, version)
        pieces = iter_tensor_pieces(directory, wanted, manifest.tensors, self.chunk_bytes)
        async for piece in _in_thread(pieces):
            yield piece

    async def fetch_file(self, model: str, version: str, path: str) -> AsyncIterator[tuple[int, bytes]]:
        """A non-weight file of a version, as (offset, data) chunks."""
        check_file_path(path)
        if is_weight_file(path):
            raise InvalidArgument(f"{path!r} is a weight file: fetch its tensors with FetchTensors")
        manifest = await self._manifest(model, version)
        stored = [f.path for f in manifest.files if not is_weight_file(f.path)]
        if path not in stored:
            raise NotFound(f"model {model!r} version {version!r} has no file {path!r}; files: {', '.join(stored)}")
        full = self.store.file_path(model, version, path)
        async for piece in _in_thread(iter_file_pieces(full, self.chunk_bytes)):
            yield piece

    async def _manifest(self, model: str, version: str) -> Manifest:
        key = (model, version)
        cached = self._manifests.get(key)
        if cached is not None:
            self._manifests.move_to_end(key)
            return cached
        manifest = await asyncio.to_thread(self.db.manifest, model, version)
        self._manifests[key] = manifest
        while len(self._manifests) > MANIFEST_CACHE:
            self._manifests.popitem(last=False)
        return manifest


async def _first_header(parts: AsyncIterator[UploadHeader | FilePart]) -> UploadHeader:
    async for part in parts:
        if not isinstance(part, UploadHeader):
            raise InvalidArgument("the first message of an upload must be its header (model, files, sizes, sha256)")
        return part
    raise InvalidArgument("empty upload: send an UploadHeader, then the files' chunks")


def _after(pending: asyncio.Future[Any] | None, action: Callable[[], None]) -> None:
    """Run action now, or once pending (a thread that cannot be interrupted) has finished."""
    if pending is None or pending.done():
        action()
        return

    def done(fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled():
            fut.exception()  # retrieved: its caller is gone and already answered
        action()

    pending.add_done_callback(done)


async def _in_thread(items: Iterator[T]) -> AsyncIterator[T]:
    """Iterate a blocking iterator (disk reads) from async code, one next() per thread hop."""
    end = object()
    pending: asyncio.Future[Any] | None = None
    try:
        while True:
            pending = asyncio.ensure_future(asyncio.to_thread(next, items, end))
            item = await asyncio.shield(pending)
            if item is end:
                return
            yield item
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            _after(pending, close)

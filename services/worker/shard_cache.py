"""The local stage cache: exactly a stage's tensors, fetched from the registry and verified.

Layout: <cache-dir>/<model>/<version>/<start>-<end>/{config.json, stage.safetensors, manifest.json}.
manifest.json records each tensor's dtype, shape and the registry's sha256; a hit is only a hit when
the file's header matches it and every tensor hashes to its recorded sha256, so a corrupted or
truncated file is detected, removed and fetched again. A fill streams the registry's chunks straight
into stage.safetensors (header space reserved up front, written last), verifying each tensor's
sha256 as its bytes arrive, in a temporary directory renamed into place only when complete.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, BinaryIO, Protocol, Sequence

from modelgrid.errors import InvalidArgument, ModelGridError, Unavailable

log = logging.getLogger(__name__)

STAGE_FILE = "stage.safetensors"
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"

# dtype as the registry may name it (torch name or safetensors code) -> (safetensors code, bytes per element)
_ST_DTYPES: dict[str, tuple[str, int]] = {}
for _codes, _size in (
    (("F64", "float64"), 8), (("F32", "float32"), 4), (("F16", "float16"), 2), (("BF16", "bfloat16"), 2),
    (("I64", "int64"), 8), (("I32", "int32"), 4), (("I16", "int16"), 2), (("I8", "int8"), 1),
    (("U8", "uint8"), 1), (("U16", "uint16"), 2), (("U32", "uint32"), 4), (("U64", "uint64"), 8),
    (("BOOL", "bool"), 1), (("F8_E4M3", "float8_e4m3fn"), 1), (("F8_E5M2", "float8_e5m2"), 1),
):
    for _code in _codes:
        _ST_DTYPES[_code] = (_codes[0], _size)

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class DataLoss(ModelGridError):
    """Tensor bytes that fail their sha256 (or a stream that lost some): gRPC DATA_LOSS."""

    code = "DATA_LOSS"


@dataclass(frozen=True)
class VersionInfo:
    """The parts of a registered version (common.ModelVersion) the worker needs."""

    model: str
    version: str
    kind: str
    num_layers: int
    layer_bytes: tuple[int, ...]
    embed_bytes: int
    head_bytes: int
    vocab_size: int
    max_context: int
    config_json: str


@dataclass(frozen=True)
class TensorPiece:
    """One chunk of one tensor from Registry.FetchTensors (registry.TensorChunk)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    data: bytes
    total_bytes: int
    sha256: str  # set on the tensor's last chunk only


class TensorSource(Protocol):
    """Where tensors come from: the registry (services.worker.clients.RegistryClient)."""

    def fetch_tensors(self, model: str, version: str, names: Sequence[str]) -> AsyncIterator[TensorPiece]: ...


@dataclass
class CacheStats:
    hits: int = 0
    fills: int = 0
    corrupt: int = 0


def check_names(model: str, version: str) -> None:
    """Model and version become path components: refuse anything that could escape the cache dir."""
    if not _NAME_RE.match(model) or ".." in model:
        raise InvalidArgument(f"model name {model!r} is invalid: it must match ^[a-z0-9][a-z0-9._-]{{0,63}}$")
    if not _VERSION_RE.match(version) or ".." in version:
        raise InvalidArgument(f"version {version!r} is invalid: expected a version such as 'v1'")


class ShardCache:
    def __init__(self, root: Path, source: TensorSource) -> None:
        self.root = Path(root)
        self.source = source
        self.stats = CacheStats()

    def stage_dir(self, model: str, version: str, start: int, end: int) -> Path:
        check_names(model, version)
        return self.root / model / version / f"{start}-{end}"

    async def lookup(self, model: str, version: str, start: int, end: int) -> Path | None:
        """The stage's cached directory if present and intact; a damaged entry is removed (None)."""
        path = self.stage_dir(model, version, start, end)
        if not path.is_dir():
            return None
        problem = await asyncio.to_thread(_verify, path)
        if problem is None:
            self.stats.hits += 1
            return path
        self.stats.corrupt += 1
        log.warning("cached %s is damaged (%s); removing it and fetching again", path, problem)
        await asyncio.to_thread(shutil.rmtree, path, True)
        return None

    async def fill(self, info: VersionInfo, start: int, end: int, names: Sequence[str]) -> Path:
        """Fetch exactly `names` for the stage, verify them, and install the cache entry atomically."""
        final = self.stage_dir(info.model, info.version, start, end)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{start}-{end}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            (tmp / CONFIG_FILE).write_text(info.config_json)
            manifest = await self._fetch_into(tmp / STAGE_FILE, info, names)
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            await asyncio.to_thread(_install, tmp, final)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, tmp, True)
            raise
        self.stats.fills += 1
        return final

    async def _fetch_into(self, path: Path, info: VersionInfo, names: Sequence[str]) -> dict:
        wanted = set(names)
        where = f"{info.model} {info.version}"
        writer = _StreamingWriter(path, names)
        current: _Incoming | None = None
        done: dict[str, dict] = {}
        try:
            async for piece in self.source.fetch_tensors(info.model, info.version, sorted(wanted)):
                if current is None or piece.name != current.name:
                    if current is not None:
                        raise DataLoss(f"registry stream for {where} ended tensor {current.name!r} without its sha256")
                    current = _start_tensor(piece, wanted, done, where)
                    writer.begin(piece.name, current.st_dtype, current.shape, current.total)
                if piece.offset != current.received:
                    raise DataLoss(
                        f"registry stream for {where} sent tensor {piece.name!r} bytes at offset {piece.offset}, "
                        f"expected {current.received}"
                    )
                current.received += len(piece.data)
                if current.received > current.total:
                    raise DataLoss(f"registry sent more than {current.total} bytes for tensor {piece.name!r}")
                current.hash.update(piece.data)
                await asyncio.to_thread(writer.write, piece.data)
                if piece.sha256:
                    done[piece.name] = _finish_tensor(current, piece.sha256, where)
                    current = None
            if current is not None:
                raise DataLoss(f"registry stream for {where} ended inside tensor {current.name!r}")
            missing = sorted(wanted - set(done))
            if missing:
                raise DataLoss(f"registry did not send tensor(s) {', '.join(missing[:5])} of {where}")
            await asyncio.to_thread(writer.finish)
        finally:
            writer.close()
        return {"model": info.model, "version": info.version, "tensors": done}


@dataclass
class _Incoming:
    name: str
    st_dtype: str
    shape: tuple[int, ...]
    total: int
    received: int = 0
    hash: "hashlib._Hash" = field(default_factory=hashlib.sha256)


def _start_tensor(piece: TensorPiece, wanted: set[str], done: dict, where: str) -> _Incoming:
    if piece.name not in wanted:
        raise DataLoss(f"registry sent tensor {piece.name!r}, which was not asked for ({where})")
    if piece.name in done:
        raise DataLoss(f"registry sent tensor {piece.name!r} twice ({where})")
    if piece.dtype not in _ST_DTYPES:
        raise DataLoss(f"registry sent tensor {piece.name!r} with unknown dtype {piece.dtype!r}")
    code, size = _ST_DTYPES[piece.dtype]
    shape = tuple(int(d) for d in piece.shape)
    total = math.prod(shape) * size
    if piece.total_bytes != total:
        raise DataLoss(
            f"registry says tensor {piece.name!r} has {piece.total_bytes} bytes, but {list(shape)} of {code} is {total}"
        )
    return _Incoming(piece.name, code, shape, total)


def _finish_tensor(incoming: _Incoming, sha256: str, where: str) -> dict:
    if incoming.received != incoming.total:
        raise DataLoss(f"tensor {incoming.name!r} of {where}: got {incoming.received} of {incoming.total} bytes")
    digest = incoming.hash.hexdigest()
    if digest != sha256.lower():
        raise DataLoss(
            f"tensor {incoming.name!r} of {where} failed its sha256 check (registry recorded {sha256}, "
            f"received bytes hash to {digest})"
        )
    return {"dtype": incoming.st_dtype, "shape": list(incoming.shape), "sha256": digest}


class _StreamingWriter:
    """Writes a safetensors file whose tensors arrive one after another, without holding them.

    The header's size is bounded from the tensor names up front; that space is reserved, data
    streams after it, and the real header (padded with spaces, which the format allows) goes in last.
    """

    def __init__(self, path: Path, names: Sequence[str]) -> None:
        self.path = path
        # per entry: quoted name + dtype + shape (<= 8 dims of 20 digits) + two 20-digit offsets + punctuation
        self.reserved = _align8(64 + sum(len(json.dumps(n)) + 280 for n in names))
        self.entries: dict[str, dict] = {}
        self.offset = 0
        self.file: BinaryIO = open(path, "wb")
        self.file.write(b"\0" * (8 + self.reserved))

    def begin(self, name: str, dtype: str, shape: tuple[int, ...], nbytes: int) -> None:
        self.entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [self.offset, self.offset + nbytes]}
        self.offset += nbytes

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def finish(self) -> None:
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        if len(header) > self.reserved:  # cannot happen with the bound above; stay correct anyway
            raise RuntimeError(f"safetensors header of {len(header)} bytes exceeds the {self.reserved} reserved")
        self.file.seek(0)
        self.file.write(struct.pack("<Q", self.reserved))
        self.file.write(header + b" " * (self.reserved - len(header)))
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def _align8(n: int) -> int:
    return (n + 7) // 8 * 8


def _install(tmp: Path, final: Path) -> None:
    """Rename the finished entry into place (replacing a stale one)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    try:  # make the rename durable
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _verify(path: Path) -> str | None:
    """None when the entry is intact, else what is wrong with it."""
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())["tensors"]
        json.loads((path / CONFIG_FILE).read_text())
        stage = path / STAGE_FILE
        size = stage.stat().st_size
        with open(stage, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size:
                return "header length beyond the end of the file"
            header = json.loads(f.read(header_len))
            header.pop("__metadata__", None)
            if set(header) != set(manifest):
                return "tensor names differ from the manifest"
            base = 8 + header_len
            end = base
            for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                want = manifest[name]
                if entry["dtype"] != want["dtype"] or list(entry["shape"]) != list(want["shape"]):
                    return f"tensor {name!r} header differs from the manifest"
                begin, stop = entry["data_offsets"]
                if base + begin != end:
                    return f"tensor {name!r} is not contiguous"
                f.seek(base + begin)
                digest = hashlib.sha256()
                remaining = stop - begin
                while remaining > 0:
                    block = f.read(min(remaining, 8 << 20))
                    if not block:
                        return f"tensor {name!r} is truncated"
                    digest.update(block)
                    remaining -= len(block)
                if digest.hexdigest() != want["sha256"]:
                    return f"tensor {name!r} fails its sha256"
                end = base + stop
            if end != size:
                return f"file is {size} bytes, expected {end}"
    except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
        return f"{type(err).__name__}: {err}"
    return None


def retryable(err: Exception) -> bool:
    """Whether a fill failed in a way a second fetch may fix."""
    return isinstance(err, (DataLoss, Unavailable))

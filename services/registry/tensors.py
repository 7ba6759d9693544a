"""Tensor manifests of safetensors files, and streaming tensor bytes straight from them.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
({name: {dtype, shape, data_offsets: [begin, end]}}, offsets relative to the end of the header),
then the data. Serving a tensor is reading its byte range: no torch, no deserialisation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
from pathlib import Path
from typing import BinaryIO, Iterator

from modelgrid.errors import FailedPrecondition, InvalidArgument
from services.registry.records import TensorEntry, TensorPiece

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
READ_BYTES = 4 * 1024 * 1024

# safetensors dtype code -> (torch dtype name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}


def read_tensor_layout(path: Path) -> dict[str, TensorEntry]:
    """Every tensor of one safetensors file with its absolute byte range (sha256 left empty).

    Checks what serving byte ranges relies on: a well-formed header, known dtypes, ranges inside
    the file that match dtype x shape.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise InvalidArgument(f"{path.name} is not a safetensors file: it is shorter than 8 bytes")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise InvalidArgument(f"{path.name} is not a safetensors file: header length {header_len} is implausible")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as exc:
            raise InvalidArgument(f"{path.name} is not a safetensors file: bad header JSON ({exc})") from None
    if not isinstance(header, dict):
        raise InvalidArgument(f"{path.name} is not a safetensors file: its header is not a JSON object")
    data_start = 8 + header_len
    out: dict[str, TensorEntry] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = meta["dtype"], tuple(int(d) for d in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InvalidArgument(f"{path.name}: malformed header entry for tensor {name!r}") from None
        if code not in DTYPES:
            raise InvalidArgument(f"{path.name}: tensor {name!r} has dtype {code}, which is not supported")
        dtype, itemsize = DTYPES[code]
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= size - data_start):
            raise InvalidArgument(f"{path.name}: tensor {name!r} has byte range {begin}..{end} outside the file")
        if any(d < 0 for d in shape) or (end - begin) != math.prod(shape) * itemsize:
            raise InvalidArgument(
                f"{path.name}: tensor {name!r} holds {end - begin} bytes but {dtype} {list(shape)} needs "
                f"{math.prod(shape) * itemsize}"
            )
        out[name] = TensorEntry(path.name, dtype, shape, data_start + begin, data_start + end, "")
    return out


def build_manifest(directory: Path, layouts: dict[str, dict[str, TensorEntry]]) -> dict[str, TensorEntry]:
    """name -> TensorEntry (sha256 included) for every tensor of the given files' layouts
    (file name -> read_tensor_layout(file)).

    Reads each file once, front to back, hashing every tensor's bytes.
    """
    manifest: dict[str, TensorEntry] = {}
    for file, layout in sorted(layouts.items()):
        twice = sorted(set(layout) & set(manifest))
        if twice:
            raise InvalidArgument(
                f"tensor {twice[0]!r} is in both {manifest[twice[0]].file} and {file}; each tensor must be in one file"
            )
        with open(directory / file, "rb") as f:
            for name, entry in sorted(layout.items(), key=lambda item: item[1].begin):
                digest = hashlib.sha256()
                for block in _read_range(f, entry.begin, entry.end):
                    digest.update(block)
                manifest[name] = TensorEntry(entry.file, entry.dtype, entry.shape, entry.begin, entry.end,
                                             digest.hexdigest())
    return manifest


def iter_tensor_pieces(
    directory: Path, names: list[str], manifest: dict[str, TensorEntry], chunk_bytes: int
) -> Iterator[TensorPiece]:
    """The named tensors' bytes in chunks of at most chunk_bytes, in the order asked.

    Bytes are re-hashed while read: a stored tensor that no longer matches its recorded sha256 is
    reported (FAILED_PRECONDITION) before its last chunk goes out.
    """
    handles: dict[str, BinaryIO] = {}
    try:
        for name in names:
            entry = manifest[name]
            f = handles.get(entry.file)
            if f is None:
                f = handles[entry.file] = _open_stored(directory / entry.file)
            digest = hashlib.sha256()
            offset = 0
            blocks = _read_range(f, entry.begin, entry.end, chunk_bytes)
            block = next(blocks, b"")
            while True:
                following = next(blocks, None)
                digest.update(block)
                if following is None:
                    if digest.hexdigest() != entry.sha256:
                        log.error("tensor %s in %s/%s does not match its recorded sha256", name, directory, entry.file)
                        raise FailedPrecondition(
                            f"stored tensor {name!r} is corrupted (sha256 mismatch); re-register the version"
                        )
                    yield TensorPiece(name, entry, offset, block, entry.sha256)
                    break
                yield TensorPiece(name, entry, offset, block)
                offset += len(block)
                block = following
    finally:
        for f in handles.values():
            f.close()


def iter_file_pieces(path: Path, chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(offset, data) chunks of a whole file; one empty chunk for an empty file."""
    with _open_stored(path) as f:
        size = path.stat().st_size
        if size == 0:
            yield 0, b""
            return
        offset = 0
        for block in _read_range(f, 0, size, chunk_bytes):
            yield offset, block
            offset += len(block)


def _open_stored(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        log.error("stored artifact %s is missing", path)
        raise FailedPrecondition(
            f"the registry's stored file {path.parent.parent.name}/{path.parent.name}/{path.name} is missing from "
            "its disk; re-register the version"
        ) from None


def _read_range(f: BinaryIO, begin: int, end: int, chunk_bytes: int = READ_BYTES) -> Iterator[bytes]:
    f.seek(begin)
    left = end - begin
    while left > 0:
        block = f.read(min(chunk_bytes, left))
        if not block:
            raise FailedPrecondition(f"{getattr(f, 'name', 'a stored file')} is shorter than its manifest says")
        left -= len(block)
        yield block

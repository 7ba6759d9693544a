"""Finding and reading safetensors files without loading tensors (and refusing pickled weights)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from modelgrid.model.errors import ModelFormatError

INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, read from a safetensors header."""

    file: Path  # the .safetensors file holding it
    dtype: str  # safetensors dtype code: "F32", "BF16", "F16", "I64", ...
    shape: tuple[int, ...]
    nbytes: int  # bytes on disk, from the header's data_offsets


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header (8-byte little-endian length, then JSON); no tensor data is read."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ModelFormatError(f"{path} is not a safetensors file: it is shorter than 8 bytes")
        (size,) = struct.unpack("<Q", prefix)
        if size > _MAX_HEADER_BYTES:
            raise ModelFormatError(f"{path} is not a safetensors file: header length {size} is implausible")
        try:
            header = json.loads(f.read(size))
        except ValueError as exc:
            raise ModelFormatError(f"{path} is not a safetensors file: bad header JSON ({exc})") from None
    out = {}
    try:
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            out[name] = TensorInfo(path, entry["dtype"], tuple(entry["shape"]), end - begin)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ModelFormatError(f"{path} is not a safetensors file: malformed header") from None
    return out


def safetensors_files(directory: Path) -> list[Path]:
    """The directory's *.safetensors files, sorted; refuses pickled weights when there are none.

    Pickled checkpoints (pytorch_model.bin, *.pt, ...) can run arbitrary code when unpickled, so
    this library never opens them.
    """
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ModelFormatError(
            f"{directory} holds pickled weights ({', '.join(pickled)}) and no *.safetensors: pickled "
            "weights are refused because loading them can run arbitrary code. Convert the checkpoint "
            "to safetensors (e.g. transformers' save_pretrained(dir, safe_serialization=True))."
        )
    raise ModelFormatError(f"{directory} has no *.safetensors files")

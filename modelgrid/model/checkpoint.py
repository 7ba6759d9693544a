"""Checkpoint: tensor name -> file for a directory of safetensors, read lazily one tensor at a time."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from modelgrid.model.decoder import DecoderStage
from modelgrid.model.encoder import EncoderStage
from modelgrid.model.errors import ModelFormatError
from modelgrid.model.safetensors_io import INDEX_FILE, TensorInfo, read_header, safetensors_files
from modelgrid.model.spec import ModelSpec, load_spec
from modelgrid.model.stage_base import StageModule

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class Checkpoint:
    """The tensors of a model directory (single file, sharded with an index, or a subset).

    Names, shapes and sizes come from the safetensors headers of the files present (only headers
    are read here). A model.safetensors.index.json, when present, only serves to say which file
    a missing tensor should have been in.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ModelFormatError(f"model directory {self.directory} does not exist")
        self.files = safetensors_files(self.directory)
        self._tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            self._tensors.update(read_header(file))
        self._index = _read_index(self.directory / INDEX_FILE)

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        code = self._info(name).dtype
        if code not in _DTYPES:
            raise ModelFormatError(f"tensor {name!r} has dtype {code}, which is not supported")
        return _DTYPES[code]

    def nbytes(self, name: str) -> int:
        return self._info(name).nbytes

    def require(self, names: Iterable[str], needed_by: str) -> None:
        """Raise ModelFormatError naming every tensor of `names` this checkpoint lacks."""
        missing = [n for n in names if n not in self._tensors]
        if not missing:
            return
        shown = ", ".join(repr(n) for n in missing[:5])
        if len(missing) > 5:
            shown += f" and {len(missing) - 5} more"
        hint = ""
        lost_files = sorted({self._index[n] for n in missing if n in self._index})
        if lost_files:
            hint = f"; {INDEX_FILE} puts them in {', '.join(lost_files)}, which is not in the directory"
        raise ModelFormatError(
            f"checkpoint {self.directory} lacks tensor {shown} needed by {needed_by} "
            f"(files: {', '.join(f.name for f in self.files)}){hint}"
        )

    def load(
        self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """One tensor, read from its file on demand, cast to dtype and moved to device."""
        return next(self.load_many([name], device, dtype))[1]

    def load_many(
        self, names: Iterable[str], device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
        column_major: Collection[str] = (),
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) one at a time, opening each file once; nothing else is read. The 2-D tensors
        named in column_major come stored column-major (same shape, transpose contiguous), converted and
        transposed in one copy: a second copy, freed under the next one's allocation, would stay resident."""
        names = list(names)
        self.require(names, "this load")
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._tensors[name].file, []).append(name)
        for file, group in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in group:
                    # get_tensor returns a view of the file's mmap: copy, so that weights live in our
                    # memory (a file truncated under a mapping kills the process with SIGBUS) and the
                    # mapping goes away once the file is done
                    view, target = f.get_tensor(name), dtype or self.dtype(name)
                    if name in column_major and view.dim() == 2:
                        out = torch.empty(view.shape[::-1], dtype=target, device=device)
                        yield name, out.copy_(view.t()).t()
                    else:
                        yield name, view.to(device=device, dtype=target, copy=True)

    def _info(self, name: str) -> TensorInfo:
        if name not in self._tensors:
            self.require([name], "this lookup")
        return self._tensors[name]


def _read_index(path: Path) -> dict[str, str]:
    """The index's weight_map (tensor name -> file name), or {} without an index."""
    if not path.is_file():
        return {}
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError):
        raise ModelFormatError(f"{path} is not a valid index: expected JSON with a 'weight_map' object") from None
    return dict(weight_map)


def meta_stage(spec: ModelSpec, start: int, end: int) -> StageModule:
    """The stage's modules on the meta device: shapes and names, no memory."""
    with torch.device("meta"):
        return (DecoderStage if spec.kind == "decoder" else EncoderStage)(spec, start, end)


def stage_tensor_names(spec: ModelSpec, start: int, end: int) -> list[str]:
    """Exactly the checkpoint tensors the stage [start, end) needs, sorted (tied: the last stage
    needs the embedding matrix)."""
    return sorted(set(meta_stage(spec, start, end).checkpoint_names().values()))


@dataclass(frozen=True)
class LayerBytes:
    """Checkpoint bytes by part, as stored on disk (a different load dtype scales them)."""

    layers: list[int]  # bytes of each transformer layer
    embed: int  # what the first stage holds beyond its layers (token embeddings)
    head: int  # what the last stage holds beyond its layers (final norm, LM head)
    shared: int  # bytes counted in both embed and head (the tied embedding matrix), else 0

    def stage_bytes(self, start: int, end: int) -> int:
        """Bytes of the tensors stage [start, end) loads."""
        total = sum(self.layers[start:end])
        first, last = start == 0, end == len(self.layers)
        total += (self.embed if first else 0) + (self.head if last else 0)
        return total - (self.shared if first and last else 0)


def layer_bytes(checkpoint: Checkpoint, spec: ModelSpec | None = None) -> LayerBytes:
    """Bytes per layer and of the embed and head parts, from the checkpoint's headers."""
    spec = spec or load_spec(checkpoint.directory)
    names = meta_stage(spec, 0, spec.num_layers).checkpoint_names()
    checkpoint.require(names.values(), "the whole model")
    layers = [0] * spec.num_layers
    embed, head = set(), set()
    for key, name in names.items():
        if key.startswith("layers."):
            layers[int(key.split(".")[1])] += checkpoint.nbytes(name)
        elif key.startswith(("embed_tokens.", "embeddings.")):
            embed.add(name)
        else:
            head.add(name)
    return LayerBytes(
        layers=layers,
        embed=sum(checkpoint.nbytes(n) for n in embed),
        head=sum(checkpoint.nbytes(n) for n in head),
        shared=sum(checkpoint.nbytes(n) for n in embed & head),
    )

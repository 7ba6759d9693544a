"""Tensors on the wire: raw little-endian bytes + dtype name + shape. Never pickle.

bfloat16 has no numpy dtype, so its bytes travel through an int16 view and come back with
torch.frombuffer(...).view(torch.bfloat16). The same codec serves every dtype below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from modelgrid.errors import InvalidArgument

# dtype name on the wire -> (torch dtype, dtype of the view used to get at the bytes)
DTYPES: dict[str, tuple[torch.dtype, torch.dtype]] = {
    "float32": (torch.float32, torch.float32),
    "float16": (torch.float16, torch.float16),
    "bfloat16": (torch.bfloat16, torch.int16),
    "int64": (torch.int64, torch.int64),
    "int32": (torch.int32, torch.int32),
    "int8": (torch.int8, torch.int8),
    "uint8": (torch.uint8, torch.uint8),
    "bool": (torch.bool, torch.bool),
}
NAMES: dict[torch.dtype, str] = {dtype: name for name, (dtype, _) in DTYPES.items()}


@dataclass(frozen=True)
class WireTensor:
    """What a common.Tensor carries, without the protobuf type."""

    data: bytes
    dtype: str
    shape: tuple[int, ...]


def encode(tensor: torch.Tensor) -> WireTensor:
    """A tensor (any device, any layout) as raw bytes."""
    if tensor.dtype not in NAMES:
        raise ValueError(f"cannot send a {tensor.dtype} tensor; supported: {', '.join(DTYPES)}")
    name = NAMES[tensor.dtype]
    view = DTYPES[name][1]
    flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(view)
    return WireTensor(flat.numpy().tobytes(), name, tuple(tensor.shape))


def decode(data: bytes, dtype: str, shape: Sequence[int], what: str = "tensor") -> torch.Tensor:
    """Rebuild a tensor from its bytes, checking dtype and that the byte count matches the shape.

    Raises InvalidArgument naming `what` (e.g. "hidden") on a mismatch; the result owns its memory.
    """
    if dtype not in DTYPES:
        raise InvalidArgument(f"{what} has dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{what} has a negative dimension in shape {list(shape)}")
    torch_dtype, view = DTYPES[dtype]
    itemsize = view.itemsize
    numel = math.prod(shape)
    if len(data) != numel * itemsize:
        raise InvalidArgument(
            f"{what} has {len(data)} bytes, but shape {list(shape)} of {dtype} needs {numel * itemsize}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=torch_dtype)
    flat = torch.frombuffer(bytearray(data), dtype=view)
    return flat.view(torch_dtype).reshape(shape)

"""The worker's tensor wire codec: raw bytes + dtype + shape, exact round trips, clear refusals."""

from __future__ import annotations

import pytest
import torch

from modelgrid.errors import InvalidArgument
from services.worker.tensors import decode, encode


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(3, 5, generator=torch.Generator().manual_seed(0)),
        torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16),
        torch.tensor([[0, -1, 2**62], [7, 8, -(2**63)]], dtype=torch.int64),
        torch.randn(4, generator=torch.Generator().manual_seed(2)).to(torch.float16),
        torch.tensor([[1, 0, 1]], dtype=torch.int32),
        torch.zeros(0, 8),
    ],
    ids=["float32", "bfloat16", "int64", "float16", "int32", "empty"],
)
def test_round_trip_is_bit_exact(tensor: torch.Tensor) -> None:
    wire = encode(tensor)
    assert isinstance(wire.data, bytes)
    assert wire.dtype == str(tensor.dtype).removeprefix("torch.")
    assert wire.shape == tuple(tensor.shape)
    back = decode(wire.data, wire.dtype, wire.shape)
    assert back.dtype == tensor.dtype and back.shape == tensor.shape
    # bitwise: compare the raw bytes too (catches a lossy bf16 path that happens to look equal)
    assert torch.equal(back, tensor)
    assert encode(back).data == wire.data


def test_bfloat16_bytes_are_the_int16_view() -> None:
    t = torch.tensor([1.0, -2.5, 3.140625], dtype=torch.bfloat16)
    assert encode(t).data == t.view(torch.int16).numpy().tobytes()
    assert len(encode(t).data) == 2 * t.numel()


def test_non_contiguous_and_decoded_tensor_is_writable() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    back = decode(*_fields(encode(t)))
    assert torch.equal(back, t)
    back += 1  # owns its memory (not a read-only view of the message bytes)


def _fields(wire):
    return wire.data, wire.dtype, wire.shape


@pytest.mark.parametrize(
    "data,dtype,shape,message",
    [
        (b"\0" * 12, "float32", (2, 2), "needs 16"),
        (b"\0" * 8, "complex64", (1,), "dtype 'complex64'"),
        (b"\0" * 4, "float32", (-1,), "negative"),
    ],
)
def test_bad_wire_tensors_are_invalid_argument(data: bytes, dtype: str, shape: tuple, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        decode(data, dtype, shape, "hidden")

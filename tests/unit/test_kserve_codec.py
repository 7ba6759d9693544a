"""The KServe tensor codecs and parameter parsing (services/gateway/kserve.py), against Triton's own serializer.

tritonclient.utils is Triton's numpy helpers only (not its generated protobuf code, which would clash with
ours in one process: see tests/integration/test_kserve_api.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from modelgrid.errors import InvalidArgument
from modelgrid.inference import grpc_predict_v2_pb2 as pb
from services.gateway.kserve import (
    decode_bytes_raw,
    encode_bytes_raw,
    input_ids,
    input_texts,
    sampling_parameters,
)

VALUES = [b"", b"a", "café 日本".encode(), bytes(range(256)), b"\x00\x00trailing zeros\x00"]


def test_bytes_raw_contents_are_tritons_format() -> None:
    theirs = serialize_byte_tensor(np.array(VALUES, dtype=np.object_)).item()  # (a 0-d array of bytes)
    assert decode_bytes_raw(theirs, "x") == VALUES
    assert encode_bytes_raw(VALUES) == theirs
    assert list(deserialize_bytes_tensor(encode_bytes_raw(VALUES))) == VALUES


def _tensor(datatype: str, shape: list[int], **contents: list) -> pb.ModelInferRequest.InferInputTensor:
    return pb.ModelInferRequest.InferInputTensor(name="t", datatype=datatype, shape=shape,
                                                 contents=pb.InferTensorContents(**contents))


def test_texts_from_raw_or_typed_contents_of_any_shape() -> None:
    texts = ["one", "two", "drei", "四"]
    raw = encode_bytes_raw([t.encode() for t in texts])
    assert input_texts(_tensor("BYTES", [2, 2]), raw) == texts
    assert input_texts(_tensor("BYTES", [4], bytes_contents=[t.encode() for t in texts]), None) == texts
    with pytest.raises(InvalidArgument, match="holds 4"):
        input_texts(_tensor("BYTES", [3]), raw)


def test_ids_from_int64_or_int32_raw_or_typed() -> None:
    ids = [1, 5, 70000, 2**40]
    assert input_ids(_tensor("INT64", [1, 4]), np.array(ids, "<i8").tobytes()) == ids
    assert input_ids(_tensor("INT32", [3]), np.array(ids[:3], "<i4").tobytes()) == ids[:3]
    assert input_ids(_tensor("INT64", [1, 4], int64_contents=ids), None) == ids
    assert input_ids(_tensor("INT32", [2], int_contents=[7, 8]), None) == [7, 8]
    with pytest.raises(InvalidArgument, match="expected 32"):
        input_ids(_tensor("INT64", [1, 4]), b"\0" * 16)
    with pytest.raises(InvalidArgument, match="one prompt"):
        input_ids(_tensor("INT64", [1, 2, 2]), b"\0" * 32)


def _params(**values: tuple[str, object]) -> dict[str, pb.InferParameter]:
    out = {}
    for key, (kind, value) in values.items():
        out[key] = pb.InferParameter(**{kind: value})
    return out


def test_sampling_parameters_accept_every_numeric_kind_that_fits() -> None:
    got = sampling_parameters(_params(
        max_tokens=("uint64_param", 8), temperature=("double_param", 0.7), top_p=("string_param", "0.9"),
        top_k=("double_param", 5.0), seed=("int64_param", 3), priority=("uint64_param", 1),
    ))
    assert got == {"max_tokens": 8, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "seed": 3}
    for bad, message in [
        (_params(seed=("int64_param", -1)), "seed"),
        (_params(max_tokens=("double_param", 1.5)), "integer"),
        (_params(temperature=("bool_param", True)), "number"),
        (_params(temperature=("string_param", "warm")), "number"),
        (_params(max_token=("int64_param", 4)), "unknown parameter 'max_token'"),
    ]:
        with pytest.raises(InvalidArgument, match=message):
            sampling_parameters(bad)

"""The KServe Open Inference Protocol (v2) on the gateway's gRPC port, against `modelgrid up` as real processes.

Triton's client (`tritonclient.grpc`) runs in a child Python process: its generated code and ours define the
same protobuf package `inference` (the package name is the wire protocol), and one process's default
descriptor pool cannot hold both. The child runs `python -m tests.integration.test_kserve_api ARGS`
(`triton_session` below) and prints what it got as JSON; this process compares it with the gateway's own
gRPC Embed and Generate. The typed-contents and error cases use our generated stub directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import numpy as np
import pytest

from tests.integration.test_openai_api import ADMIN_KEY, BERT, LLM, Platform, checkpoints, running_platform
from tests.support import ROOT

pytestmark = [pytest.mark.timeout(300)]

TEXTS = ["short", "a somewhat longer sentence about rivers and mills", "café 日本"]
PROMPT_IDS = [1, 17, 250, 3, 99, 42, 7]
NEW_TOKENS = 8
AUTH = (("authorization", f"Bearer {ADMIN_KEY}"),)

__all__ = ["checkpoints"]  # the checkpoint fixture, shared with test_openai_api.py


def triton_session(address: str, api_key: str) -> dict[str, Any]:
    """What tritonclient.grpc gets from the gateway (run in a child process: see the module docstring)."""
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(address)
    auth = {"authorization": f"Bearer {api_key}"}
    out: dict[str, Any] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": {m: client.is_model_ready(m, headers=auth) for m in (BERT, LLM)},
        "server": client.get_server_metadata(headers=auth, as_json=True),
        "metadata": {m: client.get_model_metadata(m, headers=auth, as_json=True) for m in (BERT, LLM)},
    }
    texts = triton.InferInput("text", [len(TEXTS)], "BYTES")
    texts.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=np.object_))
    result = client.infer(BERT, [texts], headers=auth, outputs=[triton.InferRequestedOutput("embeddings")])
    out["embeddings"] = result.as_numpy("embeddings").tolist()
    out["embeddings_dtype"] = str(result.as_numpy("embeddings").dtype)

    ids = triton.InferInput("input_ids", [1, len(PROMPT_IDS)], "INT64")
    ids.set_data_from_numpy(np.array([PROMPT_IDS], dtype=np.int64))
    greedy = client.infer(LLM, [ids], headers=auth, parameters={"max_tokens": NEW_TOKENS, "temperature": 0.0},
                          request_id="req-1")
    out["greedy_ids"] = greedy.as_numpy("output_ids").tolist()
    out["greedy_response"] = greedy.get_response(as_json=True)
    sampled = client.infer(LLM, [ids], headers=auth,
                           parameters={"max_tokens": NEW_TOKENS, "temperature": 0.8, "top_p": 0.9, "seed": 11})
    out["sampled_ids"] = sampled.as_numpy("output_ids").tolist()

    def status(call: Callable[[], Any]) -> str:
        try:
            call()
        except InferenceServerException as err:
            return f"{err.status()} {err.message()}"
        return "OK"

    out["ghost_ready"] = status(lambda: client.is_model_ready("ghost", headers=auth))
    out["no_key"] = status(lambda: client.infer(LLM, [ids]))
    client.close()
    return out


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path]) -> Iterator[Platform]:
    models = {name: checkpoints[name] for name in (LLM, BERT)}
    with running_platform(tmp_path_factory.mktemp("platform") / "data", models) as running:
        yield running


@pytest.fixture(scope="module")
def expected(platform: Platform) -> dict[str, Any]:
    """The gateway's own gRPC answers (Embed, Generate) for the same inputs."""
    with platform.client() as client:
        return {
            "embeddings": np.array(client.embed(BERT, TEXTS), dtype=np.float32),
            "greedy": client.generate_text(LLM, prompt_ids=PROMPT_IDS, max_tokens=NEW_TOKENS, temperature=0),
            "sampled": client.generate_text(LLM, prompt_ids=PROMPT_IDS, max_tokens=NEW_TOKENS, temperature=0.8,
                                            top_p=0.9, seed=11).token_ids,
        }


def test_tritonclient_against_the_gateway(platform: Platform, expected: dict[str, Any]) -> None:
    child = subprocess.run(
        [sys.executable, "-m", "tests.integration.test_kserve_api", platform.up.gateway, ADMIN_KEY],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )
    assert child.returncode == 0, child.stderr[-4000:]
    got = json.loads(child.stdout.splitlines()[-1])

    assert got["live"] and got["ready"] and got["model_ready"] == {BERT: True, LLM: True}
    assert got["server"]["name"] == "modelgrid" and got["server"]["version"]
    bert, llama = got["metadata"][BERT], got["metadata"][LLM]
    assert (bert["platform"], bert["versions"]) == ("modelgrid_bert", ["v1"])
    assert bert["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": ["-1"]}]
    assert bert["outputs"] == [{"name": "embeddings", "datatype": "FP32", "shape": ["-1", "32"]}]
    assert llama["inputs"] == [{"name": "input_ids", "datatype": "INT64", "shape": ["1", "-1"]}]

    assert got["embeddings_dtype"] == "float32"
    np.testing.assert_allclose(np.array(got["embeddings"]), expected["embeddings"], rtol=0, atol=1e-6)
    greedy = expected["greedy"]
    assert got["greedy_ids"] == [greedy.token_ids]
    params = got["greedy_response"]["parameters"]
    assert got["greedy_response"]["id"] == "req-1" and got["greedy_response"]["model_version"] == "v1"
    assert params["finish_reason"]["string_param"] == greedy.finish_reason
    assert int(params["prompt_tokens"]["int64_param"]) == len(PROMPT_IDS)
    assert int(params["completion_tokens"]["int64_param"]) == len(greedy.token_ids)
    assert got["sampled_ids"] == [expected["sampled"]]  # temperature (a double), top_p, seed all reached the sampler

    assert got["ghost_ready"].startswith("StatusCode.NOT_FOUND") and "ghost" in got["ghost_ready"]
    assert got["no_key"].startswith("StatusCode.UNAUTHENTICATED")


# ---- our own stub: typed contents and bad requests ------------------------------------------------

@pytest.fixture(scope="module")
def kserve(platform: Platform) -> Iterator[Any]:
    """(pb2 module, stub). Imported here, not at the top: the tritonclient child imports this module."""
    from modelgrid.inference import grpc_predict_v2_pb2 as pb, grpc_predict_v2_pb2_grpc as pb_grpc

    with grpc.insecure_channel(platform.up.gateway) as channel:
        yield pb, pb_grpc.GRPCInferenceServiceStub(channel)


def test_typed_contents_in_typed_contents_out(kserve: Any, expected: dict[str, Any]) -> None:
    pb, stub = kserve
    request = pb.ModelInferRequest(model_name=BERT, inputs=[pb.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[len(TEXTS), 1],
        contents=pb.InferTensorContents(bytes_contents=[t.encode() for t in TEXTS]))])
    reply = stub.ModelInfer(request, metadata=AUTH, timeout=60)
    assert not reply.raw_output_contents and list(reply.outputs[0].shape) == [len(TEXTS), 32]
    vectors = np.array(reply.outputs[0].contents.fp32_contents).reshape(len(TEXTS), 32)
    np.testing.assert_allclose(vectors, expected["embeddings"], rtol=0, atol=1e-6)

    request = pb.ModelInferRequest(model_name=LLM, model_version="latest", inputs=[
        pb.ModelInferRequest.InferInputTensor(name="input_ids", datatype="INT32", shape=[len(PROMPT_IDS)],
                                              contents=pb.InferTensorContents(int_contents=PROMPT_IDS))])
    request.parameters["max_tokens"].int64_param = NEW_TOKENS
    request.parameters["temperature"].string_param = "0"
    reply = stub.ModelInfer(request, metadata=AUTH, timeout=60)
    assert list(reply.outputs[0].contents.int64_contents) == expected["greedy"].token_ids
    assert reply.model_version == "v1"


def _ids(pb: Any, datatype: str = "INT64", shape: list[int] | None = None, raw: bytes | None = None) -> Any:
    request = pb.ModelInferRequest(model_name=LLM, inputs=[pb.ModelInferRequest.InferInputTensor(
        name="input_ids", datatype=datatype, shape=shape or [1, len(PROMPT_IDS)])])
    request.raw_input_contents.append(np.array(PROMPT_IDS, dtype="<i8").tobytes() if raw is None else raw)
    return request


def _texts(pb: Any, raw: bytes, shape: list[int], datatype: str = "BYTES") -> Any:
    request = pb.ModelInferRequest(model_name=BERT, inputs=[pb.ModelInferRequest.InferInputTensor(
        name="text", datatype=datatype, shape=shape)])
    request.raw_input_contents.append(raw)
    return request


def _with(request: Any, **parameters: Any) -> Any:
    for key, (kind, value) in parameters.items():
        setattr(request.parameters[key], kind, value)
    return request


def _output(request: Any, name: str) -> Any:
    request.outputs.add(name=name)
    return request


BAD = grpc.StatusCode.INVALID_ARGUMENT
BAD_INFERS: list[tuple[str, Callable[[Any], Any], grpc.StatusCode, str]] = [
    ("unknown model", lambda pb: pb.ModelInferRequest(model_name="ghost"), grpc.StatusCode.NOT_FOUND, "ghost"),
    ("bad model name", lambda pb: pb.ModelInferRequest(model_name="../x"), BAD, "model name"),
    ("no input", lambda pb: pb.ModelInferRequest(model_name=LLM), BAD, "exactly one input"),
    ("float ids", lambda pb: _ids(pb, "FP32"), BAD, "INT64"),
    ("batch of 2", lambda pb: _ids(pb, shape=[2, 4], raw=b"\0" * 64), BAD, "one prompt"),
    ("raw size", lambda pb: _ids(pb, raw=b"\0" * 5), BAD, "raw bytes"),
    ("negative dim", lambda pb: _ids(pb, shape=[1, -7]), BAD, "negative"),
    ("vocab", lambda pb: _ids(pb, raw=np.array([1, 99999], "<i8").tobytes(), shape=[1, 2]), BAD,
     "outside the vocabulary"),
    ("unknown parameter", lambda pb: _with(_ids(pb), temprature=("double_param", 0.5)), BAD, "unknown parameter"),
    ("text temperature", lambda pb: _with(_ids(pb), temperature=("string_param", "hot")), BAD, "must be a number"),
    ("fractional max_tokens", lambda pb: _with(_ids(pb), max_tokens=("double_param", 2.5)), BAD, "integer"),
    ("zero max_tokens", lambda pb: _with(_ids(pb), max_tokens=("int64_param", 0)), BAD, "max_tokens"),
    ("unknown output", lambda pb: _output(_ids(pb), "logits"), BAD, "has no output 'logits'"),
    ("texts as ints", lambda pb: _texts(pb, b"\0" * 8, [1], "INT64"), BAD, "BYTES"),
    ("cut length prefix", lambda pb: _texts(pb, b"\x05\0", [1]), BAD, "length prefix"),
    ("element past the end", lambda pb: _texts(pb, b"\x09\0\0\0abc", [1]), BAD, "past the end"),
    ("count mismatch", lambda pb: _texts(pb, b"\x01\0\0\0a", [2]), BAD, "holds 1"),
    ("invalid utf-8", lambda pb: _texts(pb, b"\x02\0\0\0\xff\xfe", [1]), BAD, "UTF-8"),
    ("empty text", lambda pb: _texts(pb, b"\0\0\0\0", [1]), BAD, "empty"),
    ("embedding parameters", lambda pb: _with(_texts(pb, b"\x01\0\0\0a", [1]), seed=("int64_param", 1)), BAD,
     "no parameters"),
]


@pytest.mark.parametrize("build,code,message", [b[1:] for b in BAD_INFERS], ids=[b[0] for b in BAD_INFERS])
def test_bad_infer_requests(kserve: Any, build: Callable[[Any], Any], code: grpc.StatusCode, message: str) -> None:
    pb, stub = kserve
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(build(pb), metadata=AUTH, timeout=60)
    assert info.value.code() == code and message in info.value.details(), info.value.details()


def test_model_calls_need_a_key_and_probes_do_not(kserve: Any) -> None:
    pb, stub = kserve
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelMetadata(pb.ModelMetadataRequest(name=LLM), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


if __name__ == "__main__":  # the tritonclient child: ARGS = gateway address, API key
    print(json.dumps(triton_session(sys.argv[1], sys.argv[2])))

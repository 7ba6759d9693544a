"""`python -m services.registry` as a user runs it: starts, answers, exits 0 on SIGTERM."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc

from modelgrid.model import write_random_checkpoint
from modelgrid.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from modelgrid.upload import iter_upload_chunks
from tests.support import ROOT, Service, free_port


def test_registry_process_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    service = Service(
        "registry",
        ["--listen", f"127.0.0.1:{port}", "--data-dir", str(data), "--metrics-port", "-1", "--grace-s", "2"],
        port,
        tmp_path / "registry.log",
        env={"MODELGRID_DB_URL": ""},
    )
    service.start()
    try:
        checkpoint = write_random_checkpoint(tmp_path / "ck", num_layers=2, hidden_size=32, num_heads=2, vocab_size=300)
        with grpc.insecure_channel(service.address) as channel:
            stub = registry_pb2_grpc.RegistryStub(channel)
            assert list(stub.ListModels(common_pb2.ListModelsRequest(), timeout=10).models) == []
            version = stub.UploadVersion(iter_upload_chunks(checkpoint, "tiny"), timeout=60)
            assert version.version == "v1"
            request = registry_pb2.FetchFileRequest(model="tiny", version="v1", path="tokenizer.json")
            fetched = b"".join(c.data for c in stub.FetchFile(request, timeout=10))
        assert fetched == (checkpoint / "tokenizer.json").read_bytes()
        assert (data / "registry.db").is_file() and (data / "artifacts" / "tiny" / "v1" / "config.json").is_file()
    finally:
        code = service.stop()
    assert code == 0, service.log()


def test_bad_flag_exits_with_a_message(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "services.registry", "--listen", "nowhere", "--data-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2 and "--listen must be host:port" in done.stderr


"""The generated gRPC code in modelgrid/v1/ and modelgrid/inference/ must match protos/ (run scripts/gen_protos.py after editing a proto)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATED_PACKAGES = ("modelgrid/v1", "modelgrid/inference")


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    gen = _load_generator()
    fresh = {str(p.relative_to(tmp_path)): p.read_bytes() for p in gen.generate(tmp_path)}
    committed = {
        str(p.relative_to(ROOT)): p.read_bytes()
        for package in GENERATED_PACKAGES
        for p in (ROOT / package).iterdir()
        if p.is_file()
    }
    assert {name.rsplit("/", 1)[0] for name in fresh} == set(GENERATED_PACKAGES)
    assert sorted(fresh) == sorted(committed), "generated file set differs: run python scripts/gen_protos.py"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated code {stale}: run python scripts/gen_protos.py"


def test_every_proto_declares_the_versioned_package() -> None:
    protos = sorted((ROOT / "protos" / "modelgrid" / "v1").glob("*.proto"))
    assert protos
    for proto in protos:
        assert "package modelgrid.v1;" in proto.read_text(), proto


def test_the_kserve_proto_keeps_the_open_inference_protocol_names() -> None:
    """Clients call /inference.GRPCInferenceService/<Method>: the package and service names are the wire."""
    text = (ROOT / "protos" / "inference" / "grpc_predict_v2.proto").read_text()
    assert "package inference;" in text and "service GRPCInferenceService" in text

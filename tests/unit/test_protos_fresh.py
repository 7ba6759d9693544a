"""The generated gRPC code in modelgrid/v1/ must match protos/ (run scripts/gen_protos.py after editing a proto)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    gen = _load_generator()
    fresh = {p.name: p.read_bytes() for p in gen.generate(tmp_path)}
    committed_dir = ROOT / "modelgrid" / "v1"
    committed = {p.name: p.read_bytes() for p in committed_dir.iterdir() if p.is_file()}
    assert sorted(fresh) == sorted(committed), "generated file set differs: run python scripts/gen_protos.py"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated code {stale}: run python scripts/gen_protos.py"


def test_every_proto_declares_the_versioned_package() -> None:
    protos = sorted((ROOT / "protos" / "modelgrid" / "v1").glob("*.proto"))
    assert protos
    for proto in protos:
        assert "package modelgrid.v1;" in proto.read_text(), proto

"""RegistryDB on a real SQLite file and PostgreSQL: numbering under concurrency, aliases, rollback."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select

from modelgrid.errors import FailedPrecondition, InvalidArgument, NotFound
from services.registry.db import AliasRow, RegistryDB, VersionRow
from services.registry.records import FileEntry, TensorEntry, UploadHeader, VersionFacts

FACTS = VersionFacts(
    architecture="llama", kind="decoder", num_layers=2, layer_bytes=[10, 10], embed_bytes=5, head_bytes=6,
    kv_bytes_per_token_per_layer=64, vocab_size=300, max_context=128, config_json='{"model_type": "llama"}',
    files=[FileEntry("config.json", 24, "ab" * 32)],
    tensors={"w": TensorEntry("model.safetensors", "float32", (2, 3), 100, 124, "cd" * 32)},
)


def header(model: str = "m", aliases: list[str] | None = None, replicas: int = 0, num_stages: int = 0) -> UploadHeader:
    return UploadHeader(model, aliases or [], replicas, num_stages, FACTS.files)


@pytest.fixture()
def db(db_url: str):
    registry_db = RegistryDB(db_url)
    yield registry_db
    registry_db.close()


def add(db: RegistryDB, h: UploadHeader, installed: list[str] | None = None) -> str:
    return db.add_version(h, FACTS, install=lambda v: (installed or []).append(v), uninstall=lambda v: None).version


def test_concurrent_registrations_of_a_new_model(db: RegistryDB) -> None:
    installed: list[str] = []
    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(lambda _: add(db, header("fresh"), installed), range(8)))
    assert sorted(versions, key=lambda v: int(v[1:])) == [f"v{i}" for i in range(1, 9)]
    assert db.resolve("fresh", "").version == "v8"
    assert len(db.list_models()) == 1


def test_record_roundtrip_and_manifest(db: RegistryDB) -> None:
    add(db, header(aliases=["prod"], replicas=2, num_stages=2))
    v = db.resolve("m", "prod")
    assert (v.version, v.layer_bytes, v.kv_bytes_per_token_per_layer) == ("v1", [10, 10], 64)
    assert v.aliases == ["latest", "prod"]
    assert v.files == FACTS.files and v.created_unix_ms > 0
    manifest = db.manifest("m", "v1")
    assert manifest.tensors == FACTS.tensors and manifest.files == FACTS.files
    with pytest.raises(InvalidArgument, match="alias"):
        db.manifest("m", "prod")
    with pytest.raises(NotFound, match="versions: v1; aliases: latest, prod"):
        db.manifest("m", "v3")


def test_aliases_and_latest(db: RegistryDB) -> None:
    for _ in range(10):
        add(db, header())
    assert db.resolve("m", "latest").version == "v10"  # ordered by number, not by text
    db.set_alias("m", "prod", "v2")
    db.set_alias("m", "stable", "prod")  # an alias may target what another alias points at now
    db.set_alias("m", "prod", "v9")
    model = db.get_model("m")
    assert model.aliases == {"latest": "v10", "prod": "v9", "stable": "v2"}
    assert [d.version.version for d in db.list_deployments()] == ["v2", "v9", "v10"]
    with pytest.raises(FailedPrecondition, match="'latest' is managed"):
        db.set_alias("m", "latest", "v1")
    with db.engine.connect() as c:
        assert c.scalar(select(func.count()).select_from(AliasRow)) == 2  # "latest" is never stored


def test_failed_install_or_bad_stages_leave_no_rows(db: RegistryDB) -> None:
    def explode(version: str) -> None:
        raise OSError("disk full")

    uninstalled: list[str] = []
    with pytest.raises(OSError):
        db.add_version(header(aliases=["prod"]), FACTS, install=explode, uninstall=uninstalled.append)
    with pytest.raises(InvalidArgument, match="only 2 layers"):
        add(db, header(num_stages=3))
    with pytest.raises(NotFound, match="models: none"):
        db.get_model("m")
    with db.engine.connect() as c:
        assert c.scalar(select(func.count()).select_from(VersionRow)) == 0
    assert add(db, header(replicas=3)) == "v1"
    assert db.get_model("m").replicas == 3
    assert db.set_replicas("m", 5).replicas == 5
    add(db, header())  # replicas 0 keeps the model's value
    assert db.get_model("m").replicas == 5


def test_lost_connection_at_commit_undoes_install(db_url: str, tmp_path) -> None:
    """The connection dies between install and commit: files go back, no rows, UNAVAILABLE (PostgreSQL:
    the backend is terminated for real from another connection)."""
    if not db_url.startswith("postgresql"):
        pytest.skip("needs a server whose backend can be terminated")
    import uuid

    from sqlalchemy import create_engine, text

    from modelgrid.errors import Unavailable

    tag = f"mg-registry-test-{uuid.uuid4().hex[:8]}"
    db = RegistryDB(f"{db_url}?application_name={tag}")
    admin = create_engine(db_url)
    upload_dir = tmp_path / "upload"
    upload_dir.mkdir()
    installed = tmp_path / "installed"

    def install(version: str) -> None:
        upload_dir.rename(installed)
        with admin.connect() as c:
            c.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :t"),
                      {"t": tag})

    try:
        with pytest.raises(Unavailable, match="unavailable"):
            db.add_version(header(), FACTS, install=install, uninstall=lambda v: installed.rename(upload_dir))
        assert upload_dir.is_dir() and not installed.exists()
        with pytest.raises(NotFound):  # a fresh connection from the pool; nothing was recorded
            db.get_model("m")
        assert add(db, header()) == "v1"
    finally:
        db.close()
        admin.dispose()

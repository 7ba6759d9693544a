"""The registry's API keys over a real SQLite file: stored hashed, listed without secrets, revoked for good,
bootstrapped once."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from modelgrid.errors import AlreadyExists, InvalidArgument, NotFound, Unauthenticated
from services.registry.db import RegistryDB
from services.registry.keys import ApiKeys, KeyLimits, KeyStore, hash_secret, shown_prefix


@pytest.fixture()
def db_file(tmp_path: Path) -> Path:
    return tmp_path / "registry.db"


@pytest.fixture()
def keys(db_file: Path):
    db = RegistryDB(f"sqlite:///{db_file}")
    yield ApiKeys(KeyStore(db))
    db.close()


def all_text(db_file: Path) -> str:
    """Every value of every table, as text, plus the raw bytes of the database files."""
    out = []
    with sqlite3.connect(db_file) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            out += [repr(row) for row in conn.execute(f'SELECT * FROM "{table}"')]
    for path in db_file.parent.glob(db_file.name + "*"):
        out.append(path.read_bytes().decode("latin-1"))
    return "\n".join(out)


async def test_created_keys_verify_and_only_their_hash_is_stored(keys: ApiKeys, db_file: Path) -> None:
    record, secret = await keys.create("alice", False, KeyLimits(60, 1000, 2))
    assert secret.startswith("mg_") and len(secret) >= 40
    assert record.prefix == secret[:10] and not record.admin and record.limits == KeyLimits(60, 1000, 2)
    assert (await keys.verify(secret)) == record
    stored = all_text(db_file)
    assert secret not in stored and secret[10:30] not in stored
    assert hash_secret(secret) in stored  # what is stored instead


async def test_unknown_and_revoked_keys_are_refused(keys: ApiKeys) -> None:
    record, secret = await keys.create("bob", True, KeyLimits())
    with pytest.raises(Unauthenticated, match="unknown API key"):
        await keys.verify(secret + "x")
    with pytest.raises(Unauthenticated):
        await keys.verify("")
    revoked = await keys.revoke("bob")
    assert revoked.revoked_unix_ms > 0 and revoked.key_id == record.key_id
    with pytest.raises(Unauthenticated, match="was revoked"):
        await keys.verify(secret)
    assert (await keys.revoke(record.key_id)).revoked_unix_ms == revoked.revoked_unix_ms  # by id; idempotent
    assert [k.name for k in await keys.list()] == []
    assert [k.name for k in await keys.list(include_revoked=True)] == ["bob"]
    with pytest.raises(AlreadyExists, match="names of revoked keys stay taken"):
        await keys.create("bob", False, KeyLimits())
    with pytest.raises(NotFound, match="no API key named or with id 'carol'"):
        await keys.revoke("carol")


@pytest.mark.parametrize("name", ["", "-x", "a b", "key_1", "x" * 65, "é"])
async def test_bad_names_are_refused(keys: ApiKeys, name: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid key name"):
        await keys.create(name, False, KeyLimits())


async def test_negative_limits_are_refused(keys: ApiKeys) -> None:
    with pytest.raises(InvalidArgument, match="requests per minute must be >= 0"):
        await keys.create("a", False, KeyLimits(requests_per_minute=-1))


async def test_bootstrap_adds_the_first_admin_once(keys: ApiKeys) -> None:
    secret = "a-bootstrap-key-of-enough-length"
    keys.bootstrap(secret)
    keys.bootstrap(secret)  # known: nothing happens
    (boot,) = await keys.list()
    assert boot.name == "bootstrap" and boot.admin and boot.prefix == shown_prefix(secret) == secret[:8]
    assert (await keys.verify(secret)).key_id == boot.key_id

    keys.bootstrap("another-bootstrap-key-of-length")  # an active admin exists: ignored
    assert len(await keys.list(include_revoked=True)) == 1

    await keys.revoke("bootstrap")
    keys.bootstrap(secret)  # a revoked bootstrap key never comes back
    with pytest.raises(Unauthenticated, match="revoked"):
        await keys.verify(secret)
    keys.bootstrap("a-fresh-key-after-a-lockout")  # no active admin: a new key is let in, under a free name
    names = {k.name: k.admin for k in await keys.list()}
    assert names == {"bootstrap-2": True}


def test_weak_bootstrap_keys_are_refused(keys: ApiKeys) -> None:
    with pytest.raises(InvalidArgument, match="16 to 256 printable characters"):
        keys.bootstrap("CHANGE-ME")


def test_registry_config_refuses_a_weak_bootstrap_key() -> None:
    from services.registry.config import RegistryConfig

    with pytest.raises(ValueError, match="MODELGRID_BOOTSTRAP_API_KEY must be 16 to 256"):
        RegistryConfig(bootstrap_api_key="CHANGE-ME").validate()
    RegistryConfig(bootstrap_api_key="x" * 20).validate()

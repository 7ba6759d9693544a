"""Fixtures shared by every test layer."""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from tests.support import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real, private redis-server for the test session (never the shared one on 6379)."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture()
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """URL of the session's Redis, flushed before each test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


def postgres_url() -> str | None:
    """MODELGRID_TEST_POSTGRES_URL, e.g. postgresql+psycopg://root@127.0.0.1:5432/test (set by .ci/run)."""
    return os.environ.get("MODELGRID_TEST_POSTGRES_URL") or None


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """A fresh registry database: a SQLite file, and PostgreSQL when MODELGRID_TEST_POSTGRES_URL is set.

    For PostgreSQL each test gets its own schema-free database state by dropping all tables first.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    url = postgres_url()
    if url is None:
        pytest.skip("MODELGRID_TEST_POSTGRES_URL not set")
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    meta = sqlalchemy.MetaData()
    meta.reflect(engine)
    meta.drop_all(engine)
    engine.dispose()
    yield url

"""API keys: created with a random secret, stored as its sha256 (never the clear key), verified by hash.

A key is "mg_" + 43 URL-safe characters (256 random bits), so an unsalted sha256 is as good as a slow
hash for looking it up: nobody can guess a preimage. The table keeps a short prefix of the key for
display ("mg_AbCdEf1"), its name, whether it is an admin key, its limits (enforced by the gateways)
and when it was created and revoked. Revoked keys stay in the table (their names stay taken), so a
revoked key can never come back by accident.

Bootstrap: the registry's MODELGRID_BOOTSTRAP_API_KEY becomes an admin key named "bootstrap" when no
active admin key exists and that key was never stored before (a revoked bootstrap key stays revoked).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import BigInteger, DateTime, String, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from modelgrid.errors import AlreadyExists, InvalidArgument, NotFound, Unauthenticated
from services.registry.db import Base, RegistryDB, _now, _unavailable_on_db_errors, _unix_ms

log = logging.getLogger(__name__)

SECRET_PREFIX = "mg_"
SHOWN_CHARS = 10  # of a generated key: "mg_" + 7 random characters
MIN_SECRET_CHARS = 16  # a key given from outside (the bootstrap key) must be at least this long
MAX_SECRET_CHARS = 256
KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
BOOTSTRAP_NAME = "bootstrap"
INT32_MAX = 2**31 - 1


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # the key's first characters, for display
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the key
    admin: Mapped[bool]
    requests_per_minute: Mapped[int]  # 0 = unlimited, for every limit
    tokens_per_minute: Mapped[int] = mapped_column(BigInteger)
    max_streams: Mapped[int]
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


@dataclass(frozen=True)
class KeyLimits:
    """What the gateways enforce for a key; 0 = unlimited."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_streams: int = 0


@dataclass(frozen=True)
class ApiKeyRecord:
    key_id: str
    name: str
    prefix: str
    admin: bool
    limits: KeyLimits
    created_unix_ms: int
    revoked_unix_ms: int  # 0 while active


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def shown_prefix(secret: str) -> str:
    """Enough of the key to recognise it, never enough to matter (a quarter of a short key at most)."""
    return secret[: min(SHOWN_CHARS, len(secret) // 4)]


def check_secret(secret: str, what: str = "the API key") -> None:
    if not MIN_SECRET_CHARS <= len(secret) <= MAX_SECRET_CHARS or not secret.isprintable() or " " in secret:
        raise InvalidArgument(
            f"{what} must be {MIN_SECRET_CHARS} to {MAX_SECRET_CHARS} printable characters without spaces; "
            "make one with: python -c \"import secrets; print('mg_' + secrets.token_urlsafe(32))\""
        )


def check_new_key(name: str, limits: KeyLimits) -> None:
    if not KEY_NAME.match(name) or name.startswith("key_"):
        raise InvalidArgument(
            f"invalid key name {name!r}: use 1-64 characters a-z A-Z 0-9 . _ -, starting with a letter or "
            "digit and not with 'key_' (e.g. 'ci' or 'alice')"
        )
    for field, value, top in (
        ("requests per minute", limits.requests_per_minute, INT32_MAX),
        ("tokens per minute", limits.tokens_per_minute, 2**63 - 1),
        ("max streams", limits.max_streams, INT32_MAX),
    ):
        if not 0 <= value <= top:
            raise InvalidArgument(f"{field} must be >= 0 (0 = unlimited), got {value}")


def _record(row: ApiKeyRow) -> ApiKeyRecord:
    return ApiKeyRecord(
        key_id=row.key_id,
        name=row.name,
        prefix=row.prefix,
        admin=row.admin,
        limits=KeyLimits(row.requests_per_minute, row.tokens_per_minute, row.max_streams),
        created_unix_ms=_unix_ms(row.created),
        revoked_unix_ms=_unix_ms(row.revoked) if row.revoked is not None else 0,
    )


class KeyStore:
    """The api_keys table (created on first use next to the registry's tables). Synchronous, short calls."""

    def __init__(self, db: RegistryDB) -> None:
        ApiKeyRow.__table__.create(db.engine, checkfirst=True)
        self._sessions = sessionmaker(db.engine, expire_on_commit=False)

    @_unavailable_on_db_errors
    def create(self, name: str, admin: bool, limits: KeyLimits, secret: str) -> ApiKeyRecord:
        row = ApiKeyRow(
            key_id="key_" + secrets.token_hex(6),
            name=name,
            prefix=shown_prefix(secret),
            key_hash=hash_secret(secret),
            admin=admin,
            requests_per_minute=limits.requests_per_minute,
            tokens_per_minute=limits.tokens_per_minute,
            max_streams=limits.max_streams,
            created=_now(),
        )
        with self._sessions() as s:
            s.add(row)
            try:
                s.commit()
            except IntegrityError:
                s.rollback()
                raise AlreadyExists(
                    f"an API key named {name!r} already exists (names of revoked keys stay taken); "
                    "choose another name"
                ) from None
            return _record(row)

    @_unavailable_on_db_errors
    def list(self, include_revoked: bool) -> list[ApiKeyRecord]:
        query = select(ApiKeyRow).order_by(ApiKeyRow.created, ApiKeyRow.id)
        if not include_revoked:
            query = query.where(ApiKeyRow.revoked.is_(None))
        with self._sessions() as s:
            return [_record(r) for r in s.scalars(query)]

    @_unavailable_on_db_errors
    def revoke(self, ref: str) -> ApiKeyRecord:
        with self._sessions() as s:
            row = s.scalar(select(ApiKeyRow).where(ApiKeyRow.key_id == ref)) or s.scalar(
                select(ApiKeyRow).where(ApiKeyRow.name == ref)
            )
            if row is None:
                active = select(ApiKeyRow.name).where(ApiKeyRow.revoked.is_(None)).order_by(ApiKeyRow.name)
                names = list(s.scalars(active))
                raise NotFound(f"no API key named or with id {ref!r}; active keys: {', '.join(names) or 'none'}")
            if row.revoked is None:
                row.revoked = _now()
                s.commit()
            return _record(row)

    @_unavailable_on_db_errors
    def find(self, secret: str) -> ApiKeyRecord | None:
        with self._sessions() as s:
            row = s.scalar(select(ApiKeyRow).where(ApiKeyRow.key_hash == hash_secret(secret)))
            return _record(row) if row is not None else None

    @_unavailable_on_db_errors
    def bootstrap(self, secret: str) -> ApiKeyRecord | None:
        """Store secret as an admin key unless it is known or an active admin key exists; the new record or None."""
        with self._sessions() as s:
            if s.scalar(select(ApiKeyRow.id).where(ApiKeyRow.key_hash == hash_secret(secret))) is not None:
                return None
            admins = select(ApiKeyRow.id).where(ApiKeyRow.admin.is_(True), ApiKeyRow.revoked.is_(None))
            if s.scalar(admins.limit(1)) is not None:
                log.warning("MODELGRID_BOOTSTRAP_API_KEY is set but active admin keys exist: not adding it")
                return None
            name = _free_name(s, BOOTSTRAP_NAME)
        try:
            return self.create(name, True, KeyLimits(), secret)
        except AlreadyExists:  # another registry replica bootstrapped at the same moment
            return None


def _free_name(s: Session, base: str) -> str:
    taken = set(s.scalars(select(ApiKeyRow.name).where(ApiKeyRow.name.like(f"{base}%"))))
    n, name = 1, base
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


class ApiKeys:
    """The registry's key operations (async: SQL runs in a thread)."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store

    async def create(self, name: str, admin: bool, limits: KeyLimits) -> tuple[ApiKeyRecord, str]:
        """The new key's record and its secret (the only time the secret exists outside the client)."""
        check_new_key(name, limits)
        secret = new_secret()
        record = await asyncio.to_thread(self.store.create, name, admin, limits, secret)
        log.info("created %s API key %r (%s, %s...)", "an admin" if admin else "a user", name, record.key_id,
                 record.prefix)
        return record, secret

    async def list(self, include_revoked: bool = False) -> list[ApiKeyRecord]:
        return await asyncio.to_thread(self.store.list, include_revoked)

    async def revoke(self, ref: str) -> ApiKeyRecord:
        if not ref:
            raise InvalidArgument("say which key to revoke: its name or its key id")
        record = await asyncio.to_thread(self.store.revoke, ref)
        log.info("revoked API key %r (%s, %s...)", record.name, record.key_id, record.prefix)
        return record

    async def verify(self, secret: str) -> ApiKeyRecord:
        """The active key of secret; Unauthenticated when it is unknown or revoked."""
        if not secret or len(secret) > MAX_SECRET_CHARS:
            raise Unauthenticated("unknown API key")
        record = await asyncio.to_thread(self.store.find, secret)
        if record is None:
            raise Unauthenticated("unknown API key")
        if record.revoked_unix_ms:
            raise Unauthenticated(f"API key {record.prefix}... ({record.name!r}) was revoked")
        return record

    def bootstrap(self, secret: str) -> None:
        """At start-up (blocking): make secret the first admin key when appropriate (see the module doc)."""
        if not secret:
            return
        check_secret(secret, "MODELGRID_BOOTSTRAP_API_KEY")
        record = self.store.bootstrap(secret)
        if record is not None:
            log.info("created the bootstrap admin API key %r (%s, %s...)", record.name, record.key_id, record.prefix)

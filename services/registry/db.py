"""The registry's tables (SQLAlchemy 2, typed declarative) and RegistryDB, the one class that queries them.

SQLite (a file, the default) and PostgreSQL (by URL) alike. Tables are created on start
(metadata.create_all); there is no migrations framework yet. Later issues add, next to these:
  api_keys (key hash, owner, scopes, created, revoked) and
  jobs (batch job id, model, version, state, input/output locations, counts, created, finished).

Methods are synchronous and short; the async Registry calls them through asyncio.to_thread.
"""

from __future__ import annotations

import functools
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, selectinload, sessionmaker

from modelgrid.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.registry.records import (
    LATEST,
    Deployment,
    FileEntry,
    Manifest,
    ModelRecord,
    TensorEntry,
    UploadHeader,
    VersionFacts,
    VersionRecord,
)

log = logging.getLogger(__name__)

WRITE_RETRIES = 8  # a concurrent registration took our version number or alias: try again
F = TypeVar("F", bound=Callable[..., Any])


class Base(DeclarativeBase):
    pass


class ModelRow(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    replicas: Mapped[int]  # copies of every stage the scheduler places
    num_stages: Mapped[int]  # 0 = the scheduler chooses
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    versions: Mapped[list[VersionRow]] = relationship(
        back_populates="model", order_by="VersionRow.number", cascade="all, delete-orphan"
    )
    aliases: Mapped[list[AliasRow]] = relationship(back_populates="model", cascade="all, delete-orphan")


class VersionRow(Base):
    """One immutable registered version; its files live under <artifacts>/<model>/<version>/."""

    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("model_id", "number"), UniqueConstraint("model_id", "version"))

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    number: Mapped[int]  # 1, 2, ...: registration order (and sort key: "v10" comes after "v9")
    version: Mapped[str] = mapped_column(String(16))  # "v<number>"
    architecture: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(16))
    num_layers: Mapped[int]
    layer_bytes: Mapped[list[int]] = mapped_column(JSON)
    embed_bytes: Mapped[int] = mapped_column(BigInteger)
    head_bytes: Mapped[int] = mapped_column(BigInteger)
    kv_bytes_per_token_per_layer: Mapped[int] = mapped_column(BigInteger)
    vocab_size: Mapped[int]
    max_context: Mapped[int]
    config_json: Mapped[str] = mapped_column(Text)
    files: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # [{path, size, sha256}]
    # {name: {file, dtype, shape, begin, end, sha256}}: large, so loaded only when asked for
    tensors: Mapped[dict[str, Any]] = mapped_column(JSON, deferred=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    model: Mapped[ModelRow] = relationship(back_populates="versions")


class AliasRow(Base):
    """A user alias ("prod") pointing at a version. "latest" is not stored: it is the newest version."""

    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("model_id", "alias"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    alias: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"))
    model: Mapped[ModelRow] = relationship(back_populates="aliases")
    version: Mapped[VersionRow] = relationship()


def make_engine(url: str) -> Engine:
    """An engine for url; SQLite gets a busy timeout and BEGIN IMMEDIATE transactions, so
    concurrent writers queue instead of failing on a stale snapshot."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy's begin event below opens transactions
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _unix_ms(value: datetime) -> int:
    if value.tzinfo is None:  # SQLite returns naive datetimes; we stored UTC
        value = value.replace(tzinfo=timezone.utc)
    return int(value.timestamp() * 1000)


def _unavailable_on_db_errors(method: F) -> F:
    """A lost connection or a locked SQLite file is the database's state, not the caller's fault:
    UNAVAILABLE (retryable), never INTERNAL."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except OperationalError as exc:
            log.warning("database error in %s: %s", method.__name__, exc.orig)
            raise Unavailable(f"the registry database is unavailable ({type(exc.orig).__name__}); retry") from exc

    return wrapper  # type: ignore[return-value]


def _names(items: list[str]) -> str:
    return ", ".join(items) if items else "none"


class RegistryDB:
    """Models, versions and aliases in SQL. Raises NotFound / InvalidArgument / FailedPrecondition."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        log.info("registry database: %s", make_url(url).render_as_string(hide_password=True))

    def close(self) -> None:
        self.engine.dispose()

    # ---- reads -------------------------------------------------------------------------------

    @_unavailable_on_db_errors
    def list_models(self) -> list[ModelRecord]:
        with self._sessions() as s:
            return [self._model_record(m) for m in s.scalars(self._models_query().order_by(ModelRow.name))]

    @_unavailable_on_db_errors
    def get_model(self, name: str) -> ModelRecord:
        with self._sessions() as s:
            return self._model_record(self._model_row(s, name, load=True))

    @_unavailable_on_db_errors
    def resolve(self, model: str, ref: str) -> VersionRecord:
        """A version by name ("v2"), alias ("prod"), or the newest one when ref is "" or "latest"."""
        with self._sessions() as s:
            row = self._model_row(s, model, load=True)
            return self._version_record(row, self._find_version(row, ref))

    @_unavailable_on_db_errors
    def list_deployments(self) -> list[Deployment]:
        """Every version some alias ("latest" included) points at, with its model's replicas and stages."""
        out = []
        with self._sessions() as s:
            for m in s.scalars(self._models_query().order_by(ModelRow.name)):
                record = self._model_record(m)
                deployed = set(record.aliases.values())
                out += [Deployment(v, m.replicas, m.num_stages) for v in record.versions if v.version in deployed]
        return out

    @_unavailable_on_db_errors
    def manifest(self, model: str, version: str) -> Manifest:
        """The files and tensor manifest of a concrete version (not an alias)."""
        with self._sessions() as s:
            row = self._model_row(s, model, load=True)
            found = next((v for v in row.versions if v.version == version), None)
            if found is None:
                aliases = self._alias_map(row)
                if not version or version in aliases:
                    raise InvalidArgument(
                        f"fetch model {model!r} by version, not by alias ({version or 'empty'!r}): resolve the "
                        "alias with ResolveVersion first, so every stage reads the same version"
                    )
                raise NotFound(
                    f"model {model!r} has no version {version!r}; versions: "
                    f"{_names([v.version for v in row.versions])}; aliases: {_names(list(aliases))}"
                )
            tensors = {
                name: TensorEntry(t["file"], t["dtype"], tuple(t["shape"]), t["begin"], t["end"], t["sha256"])
                for name, t in found.tensors.items()
            }
            return Manifest(model, version, self._files(found), tensors)

    # ---- writes ------------------------------------------------------------------------------

    @_unavailable_on_db_errors
    def add_version(
        self,
        header: UploadHeader,
        facts: VersionFacts,
        install: Callable[[str], None],
        uninstall: Callable[[str], None],
    ) -> VersionRecord:
        """Record a new version v<n+1> of header.model (creating the model if new).

        install(version) moves the files into place inside the transaction, just before commit;
        uninstall(version) undoes it if the commit fails. A concurrent registration that takes
        the same number makes the insert fail on the unique constraint: then we try again.
        """
        for attempt in range(WRITE_RETRIES):
            with self._sessions() as s:
                try:
                    record = self._insert_version(s, header, facts)
                except IntegrityError:
                    s.rollback()
                    log.info("version number of %s taken concurrently; retrying (%d)", header.model, attempt + 1)
                    continue
                install(record.version)
                try:
                    s.commit()
                except IntegrityError:
                    uninstall(record.version)
                    continue
                except BaseException:
                    uninstall(record.version)
                    raise
                return record
        raise FailedPrecondition(f"too many concurrent registrations of model {header.model!r}; try again")

    @_unavailable_on_db_errors
    def set_alias(self, model: str, alias: str, ref: str) -> VersionRecord:
        if alias == LATEST:
            raise FailedPrecondition(
                "'latest' is managed by the registry: it always points at the newest version. Pin a "
                "version with another alias (e.g. 'prod')"
            )
        for _ in range(WRITE_RETRIES):
            with self._sessions() as s:
                row = self._model_row(s, model, load=True)
                target = self._find_version(row, ref)
                try:
                    self._point_alias(s, row, alias, target)
                    s.commit()
                except IntegrityError:  # someone created the same alias meanwhile
                    s.rollback()
                    continue
                return self._version_record(row, target)
        raise FailedPrecondition(f"alias {alias!r} of model {model!r} changed concurrently; try again")

    @_unavailable_on_db_errors
    def set_replicas(self, model: str, replicas: int) -> ModelRecord:
        with self._sessions() as s:
            row = self._model_row(s, model, load=True)
            row.replicas = replicas
            s.commit()
            return self._model_record(row)

    # ---- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _models_query() -> Any:
        return select(ModelRow).options(
            selectinload(ModelRow.versions), selectinload(ModelRow.aliases).selectinload(AliasRow.version)
        )

    def _model_row(self, s: Session, name: str, load: bool = False) -> ModelRow:
        query = self._models_query() if load else select(ModelRow)
        row = s.scalar(query.where(ModelRow.name == name))
        if row is None:
            names = list(s.scalars(select(ModelRow.name).order_by(ModelRow.name)))
            raise NotFound(f"model {name!r} not found; models: {_names(names)}")
        return row

    @staticmethod
    def _alias_map(row: ModelRow) -> dict[str, str]:
        aliases = {a.alias: a.version.version for a in row.aliases}
        if row.versions:
            aliases[LATEST] = row.versions[-1].version
        return dict(sorted(aliases.items()))

    def _find_version(self, row: ModelRow, ref: str) -> VersionRow:
        ref = ref or LATEST
        by_name = {v.version: v for v in row.versions}
        if ref in by_name:
            return by_name[ref]
        if ref == LATEST and row.versions:
            return row.versions[-1]
        for a in row.aliases:
            if a.alias == ref:
                return a.version
        raise NotFound(
            f"model {row.name!r} has no version or alias {ref!r}; versions: {_names(list(by_name))}; "
            f"aliases: {_names(list(self._alias_map(row)))}"
        )

    @staticmethod
    def _files(v: VersionRow) -> list[FileEntry]:
        return [FileEntry(f["path"], f["size"], f["sha256"]) for f in v.files]

    def _version_record(self, row: ModelRow, v: VersionRow) -> VersionRecord:
        aliases = sorted(a for a, target in self._alias_map(row).items() if target == v.version)
        return VersionRecord(
            model=row.name,
            version=v.version,
            number=v.number,
            architecture=v.architecture,
            kind=v.kind,
            num_layers=v.num_layers,
            layer_bytes=list(v.layer_bytes),
            embed_bytes=v.embed_bytes,
            head_bytes=v.head_bytes,
            kv_bytes_per_token_per_layer=v.kv_bytes_per_token_per_layer,
            vocab_size=v.vocab_size,
            max_context=v.max_context,
            config_json=v.config_json,
            files=self._files(v),
            aliases=aliases,
            created_unix_ms=_unix_ms(v.created),
        )

    def _model_record(self, row: ModelRow) -> ModelRecord:
        return ModelRecord(
            name=row.name,
            replicas=row.replicas,
            num_stages=row.num_stages,
            versions=[self._version_record(row, v) for v in row.versions],
            aliases=self._alias_map(row),
            created_unix_ms=_unix_ms(row.created),
        )

    def _point_alias(self, s: Session, row: ModelRow, alias: str, target: VersionRow) -> None:
        existing = next((a for a in row.aliases if a.alias == alias), None)
        if existing is None:
            row.aliases.append(AliasRow(alias=alias, version=target))
        else:
            existing.version = target
        s.flush()

    def _insert_version(self, s: Session, header: UploadHeader, facts: VersionFacts) -> VersionRecord:
        row = s.scalar(self._models_query().where(ModelRow.name == header.model).with_for_update(of=ModelRow))
        now = _now()
        if row is None:
            row = ModelRow(name=header.model, replicas=header.replicas or 1, num_stages=header.num_stages, created=now)
            s.add(row)
            s.flush()
        else:
            row.replicas = header.replicas or row.replicas
            row.num_stages = header.num_stages or row.num_stages
        if row.num_stages > facts.num_layers:
            raise InvalidArgument(
                f"model {header.model!r} is set to {row.num_stages} pipeline stages but this checkpoint has only "
                f"{facts.num_layers} layers; pass num_stages <= {facts.num_layers} (0 = auto)"
            )
        number = (s.scalar(select(func.max(VersionRow.number)).where(VersionRow.model_id == row.id)) or 0) + 1
        version = VersionRow(
            model=row,
            number=number,
            version=f"v{number}",
            architecture=facts.architecture,
            kind=facts.kind,
            num_layers=facts.num_layers,
            layer_bytes=list(facts.layer_bytes),
            embed_bytes=facts.embed_bytes,
            head_bytes=facts.head_bytes,
            kv_bytes_per_token_per_layer=facts.kv_bytes_per_token_per_layer,
            vocab_size=facts.vocab_size,
            max_context=facts.max_context,
            config_json=facts.config_json,
            files=[{"path": f.path, "size": f.size, "sha256": f.sha256} for f in facts.files],
            tensors={
                name: {"file": t.file, "dtype": t.dtype, "shape": list(t.shape), "begin": t.begin, "end": t.end,
                       "sha256": t.sha256}
                for name, t in facts.tensors.items()
            },
            created=now,
        )
        s.add(version)
        s.flush()
        for alias in header.aliases:
            self._point_alias(s, row, alias, version)
        return self._version_record(row, version)
